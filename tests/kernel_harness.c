/*
 * Runs model/kernels/cpu_kernels.c's ops outside MindSpore, for tests/test_kernels_cross.py: built together with
 * the kernel source (no dlopen), natively or for another CPU (aarch64 under qemu-user).
 *
 *   kernel_harness --panel-width     prints PanelWidth()
 *   kernel_harness CALLS RESULTS     runs the calls in CALLS, writes every call's status and tensors to RESULTS
 *
 * Each op is called as MindSpore calls an AOT Custom op: (nparam, params, ndims, shapes, dtypes, NULL, NULL), the
 * outputs last among params. All integers in the files are little-endian int64. CALLS holds, per call: the op's
 * name (length, bytes), flush (1: the caller's thread flushes denormals), the tensor count, then per tensor its
 * dtype (0 float32, 1 int32, 2 int8; passed to the op by MindSpore's names), ndim, shape and data (4 bytes an
 * element, 1 for int8). A name of length 0 ends the list.
 * RESULTS holds, per call: the status, then every tensor's data after the call (outputs, caches written in place).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

typedef int (*aot_op)(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra);
int Linear(int, void **, int *, int64_t **, const char **, void *, void *);
int LinearGelu(int, void **, int *, int64_t **, const char **, void *, void *);
int LinearAdd(int, void **, int *, int64_t **, const char **, void *, void *);
int CachedAttention(int, void **, int *, int64_t **, const char **, void *, void *);
int LnLinear(int, void **, int *, int64_t **, const char **, void *, void *);
int LnLinearGelu(int, void **, int *, int64_t **, const char **, void *, void *);
int LinearQ8(int, void **, int *, int64_t **, const char **, void *, void *);
int LinearQ8Gelu(int, void **, int *, int64_t **, const char **, void *, void *);
int LinearQ8Add(int, void **, int *, int64_t **, const char **, void *, void *);
int LnLinearQ8(int, void **, int *, int64_t **, const char **, void *, void *);
int LnLinearQ8Gelu(int, void **, int *, int64_t **, const char **, void *, void *);
int Block(int, void **, int *, int64_t **, const char **, void *, void *);
int PanelWidth(void);

static const struct {
    const char *name;
    aot_op fn;
} OPS[] = {{"Linear", Linear}, {"LinearGelu", LinearGelu}, {"LinearAdd", LinearAdd},
           {"CachedAttention", CachedAttention}, {"LnLinear", LnLinear}, {"LnLinearGelu", LnLinearGelu},
           {"LinearQ8", LinearQ8}, {"LinearQ8Gelu", LinearQ8Gelu}, {"LinearQ8Add", LinearQ8Add},
           {"LnLinearQ8", LnLinearQ8}, {"LnLinearQ8Gelu", LnLinearQ8Gelu}, {"Block", Block}};

/* MindSpore's dtype names (an AOT op gets them as strings) and element sizes, by the files' dtype code. */
static const char *const DTYPE_NAMES[] = {"float32", "int32", "int8"};
static const size_t DTYPE_SIZES[] = {4, 4, 1};

#define MAX_PARAMS 32 /* Block: 27 with int8 weights */
#define MAX_DIMS 8

static FILE *in, *out;

static void die(const char *what) {
    fprintf(stderr, "kernel_harness: %s\n", what);
    exit(2);
}

static int64_t read_i64(void) {
    int64_t v;
    if (fread(&v, sizeof v, 1, in) != 1) die("truncated input");
    return v;
}

static void write_bytes(const void *p, size_t n) {
    if (fwrite(p, 1, n, out) != n) die("cannot write results");
}

/* Denormals flushed to zero (and read as zero) in this thread, or not: what MindSpore's threads do. */
static void set_flush(int on) {
#if defined(__x86_64__)
    const unsigned bits = 0x8040; /* FTZ | DAZ */
    _mm_setcsr(on ? _mm_getcsr() | bits : _mm_getcsr() & ~bits);
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    const uint64_t fz = 1u << 24;
    fpcr = on ? fpcr | fz : fpcr & ~fz;
    __asm__ volatile("msr fpcr, %0" : : "r"(fpcr));
#else
    if (on) die("flushing denormals is not supported on this CPU");
#endif
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--panel-width") == 0) {
        printf("%d\n", PanelWidth());
        return 0;
    }
    if (argc != 3) die("usage: kernel_harness --panel-width | kernel_harness CALLS RESULTS");
    if (!(in = fopen(argv[1], "rb"))) die("cannot open CALLS");
    if (!(out = fopen(argv[2], "wb"))) die("cannot open RESULTS");
    for (;;) {
        char name[64];
        const int64_t len = read_i64();
        if (len == 0) break;
        if (len < 0 || len >= (int64_t)sizeof name || fread(name, 1, (size_t)len, in) != (size_t)len) die("bad name");
        name[len] = 0;
        aot_op fn = NULL;
        for (size_t i = 0; i < sizeof OPS / sizeof OPS[0]; i++)
            if (strcmp(OPS[i].name, name) == 0) fn = OPS[i].fn;
        if (!fn) die("unknown op");
        const int flush = (int)read_i64();
        const int64_t n = read_i64();
        if (n < 1 || n > MAX_PARAMS) die("bad tensor count");
        void *params[MAX_PARAMS];
        int ndims[MAX_PARAMS];
        int64_t dims[MAX_PARAMS][MAX_DIMS], *shapes[MAX_PARAMS];
        const char *dtypes[MAX_PARAMS];
        size_t bytes[MAX_PARAMS];
        for (int64_t p = 0; p < n; p++) {
            const int64_t dtype = read_i64(), nd = read_i64();
            if (dtype < 0 || dtype > 2 || nd < 1 || nd > MAX_DIMS) die("bad tensor header");
            dtypes[p] = DTYPE_NAMES[dtype];
            ndims[p] = (int)nd;
            size_t count = 1;
            for (int64_t d = 0; d < nd; d++) {
                dims[p][d] = read_i64();
                count *= (size_t)dims[p][d];
            }
            shapes[p] = dims[p];
            bytes[p] = count * DTYPE_SIZES[dtype];
            params[p] = aligned_alloc(64, (bytes[p] + 63) & ~(size_t)63);
            if (!params[p] || fread(params[p], 1, bytes[p], in) != bytes[p]) die("truncated tensor");
        }
        set_flush(flush);
        const int64_t status = fn((int)n, params, ndims, shapes, dtypes, NULL, NULL);
        set_flush(0);
        write_bytes(&status, sizeof status);
        for (int64_t p = 0; p < n; p++) {
            write_bytes(params[p], bytes[p]);
            free(params[p]);
        }
    }
    if (fclose(out) != 0) die("cannot write results");
    return 0;
}
