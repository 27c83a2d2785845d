/*
 * CPU kernels for the inference step, called from compiled MindSpore graphs as AOT Custom ops
 * (model/kernels/__init__.py says why they exist and how they are built and chosen).
 *
 * Every exported function has MindSpore's AOT signature: params holds the inputs, then the outputs; shapes and
 * ndims describe them. Tensors are float32 or int32 (int8: the Q8 ops' weights), contiguous, row-major.
 * The ops: Linear and its forms (GELU, residual, layer norm first; int8 weights: the Q8 ops), CachedAttention,
 * Block (a transformer layer's step: five of those calls in one, with their bits), CopySlotRows (prefix caching).
 *
 * Batch invariance: a row's (a token's) results are computed by the same sequence of operations whatever else is
 * in the call: how many rows, where the row sits, which thread takes it, and (attention) how its prompt was
 * chunked. So a request's logits are bitwise the same alone or under any load. Linear has one arithmetic per
 * session (float32 FMA chains, or AMX bf16x3 for every row count where the session packed for AMX; the Q8 ops'
 * int8 weights: exact integer sums of each row quantized on its own); every thread runs with the caller's
 * floating-point mode (denormals flushed or not).
 *
 * Threads: a small pool of our own (not OpenMP). Workers spin briefly after a kernel, because the next one
 * usually follows within tens of microseconds, then sleep on a futex, so they do not compete with MindSpore's
 * own threads for the cores while its kernels run. GPT2_KERNEL_THREADS sets the count (default: usable CPUs).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <float.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vec a) { _mm512_storeu_ps(p, a); }
static inline vec vset1(float v) { return _mm512_set1_ps(v); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
/* The sum of a's lanes, always in this order (vsum4 below sums each of its inputs the same way):
 * y_i = (a_i + a_{8+i}) + (a_{4+i} + a_{12+i}), then (y_0 + y_1) + (y_2 + y_3). Not _mm512_reduce_add_ps, whose
 * last two steps pair the lanes differently. */
static inline float vsum(vec a) {
    const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 y = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    const __m128 z = _mm_add_ps(y, _mm_permute_ps(y, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtss_f32(_mm_add_ps(z, _mm_permute_ps(z, _MM_SHUFFLE(1, 0, 3, 2))));
}
/* The lane sums of a, b, c, d as one 4-float vector, each summed exactly as vsum sums it. */
static inline __m128 vsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    y = _mm512_add_ps(y, _mm512_permute_ps(y, _MM_SHUFFLE(2, 3, 0, 1)));
    y = _mm512_add_ps(y, _mm512_permute_ps(y, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                           0, 0, 0), y));
}
/* exp's range reduction: 2^n for integral n in [-126, 127], and x < lo as a mask (exp is then taken as 0). */
static inline vec vfloor(vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline vec vpow2i(vec n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
static inline vec vzero_below(vec r, vec x, float lo) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset1(lo), _CMP_GE_OQ), r);
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VW 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vec a) { _mm256_storeu_ps(p, a); }
static inline vec vset1(float v) { return _mm256_set1_ps(v); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
/* The sum of a's lanes: ((a_0 + a_4) + (a_2 + a_6)) + ((a_1 + a_5) + (a_3 + a_7)). */
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* The lane sums of a, b, c, d as one 4-float vector, each summed exactly as vsum sums it (the same additions of
 * the same operands; IEEE addition is commutative, so hadd's operand order does not matter). */
static inline __m128 vsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 ab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    const __m256 cd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
    /* per 128-bit lane: [x0 + x2, x1 + x3, y0 + y2, y1 + y3] for (x, y) = (a, c) low, (b, d) high */
    const __m256 w = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 h = _mm256_hadd_ps(w, w); /* [a, c, a, c | b, d, b, d] */
    return _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
static inline vec vfloor(vec a) { return _mm256_floor_ps(a); }
static inline vec vpow2i(vec n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline vec vzero_below(vec r, vec x, float lo) {
    return _mm256_and_ps(_mm256_cmp_ps(x, vset1(lo), _CMP_GE_OQ), r);
}
#elif defined(__aarch64__) && defined(__ARM_NEON)
/* ARM (Graviton, Kunpeng, Ampere): NEON's 4-float vectors. Every operation rounds as the portable path's does (min
 * and max differ only for NaN), so the two compute the same bits (tests/test_kernels_cross.py checks it, in qemu). */
#include <arm_neon.h>
#define VW 4
typedef float32x4_t vec;
static inline vec vzero(void) { return vdupq_n_f32(0.f); }
static inline vec vload(const float *p) { return vld1q_f32(p); }
static inline void vstore(float *p, vec a) { vst1q_f32(p, a); }
static inline vec vset1(float v) { return vdupq_n_f32(v); }
static inline vec vadd(vec a, vec b) { return vaddq_f32(a, b); }
static inline vec vsub(vec a, vec b) { return vsubq_f32(a, b); }
static inline vec vmul(vec a, vec b) { return vmulq_f32(a, b); }
static inline vec vdiv(vec a, vec b) { return vdivq_f32(a, b); }
static inline vec vmin(vec a, vec b) { return vminq_f32(a, b); }
static inline vec vmax(vec a, vec b) { return vmaxq_f32(a, b); }
/* a * b + c with one rounding, as on x86: one FMLA. Written per lane, which GCC turns into FMLA (by element, where
 * a is a broadcast): with vfmaq_f32 GCC 12 stored every accumulator of the Linear micro-kernel to the stack on
 * every k step (the x86 intrinsics do not). tests/test_kernels_cross.py checks the kernel's instructions. */
static inline vec vfma(vec a, vec b, vec c) {
    vec r;
    for (int i = 0; i < 4; i++) r[i] = __builtin_fmaf(a[i], b[i], c[i]);
    return r;
}
/* (a_0 + a_1) + (a_2 + a_3), the portable path's order: two pairwise adds (FADDP). */
static inline float vsum(vec a) {
    const float32x4_t p = vpaddq_f32(a, a);
    return vpadds_f32(vget_low_f32(p));
}
static inline vec vfloor(vec a) { return vrndmq_f32(a); }
static inline vec vpow2i(vec n) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23));
}
static inline vec vzero_below(vec r, vec x, float lo) {
    return vreinterpretq_f32_u32(vandq_u32(vcgeq_f32(x, vset1(lo)), vreinterpretq_u32_f32(r)));
}
#else
/* Portable 4-float vectors (GCC/Clang vector extensions); the build has no -ffast-math, so every operation below
 * is done as written. */
#define VW 4
typedef float vec __attribute__((vector_size(16)));
static inline vec vzero(void) { return (vec){0, 0, 0, 0}; }
static inline vec vload(const float *p) { vec r; memcpy(&r, p, sizeof r); return r; }
static inline void vstore(float *p, vec a) { memcpy(p, &a, sizeof a); }
static inline vec vset1(float v) { return (vec){v, v, v, v}; }
static inline vec vadd(vec a, vec b) { return a + b; }
static inline vec vsub(vec a, vec b) { return a - b; }
static inline vec vmul(vec a, vec b) { return a * b; }
static inline vec vdiv(vec a, vec b) { return a / b; }
static inline vec vmin(vec a, vec b) { vec r; for (int i = 0; i < 4; i++) r[i] = a[i] < b[i] ? a[i] : b[i]; return r; }
static inline vec vmax(vec a, vec b) { vec r; for (int i = 0; i < 4; i++) r[i] = a[i] > b[i] ? a[i] : b[i]; return r; }
static inline vec vfma(vec a, vec b, vec c) {
    vec r;
    for (int i = 0; i < 4; i++) r[i] = fmaf(a[i], b[i], c[i]);
    return r;
}
static inline float vsum(vec a) { return (a[0] + a[1]) + (a[2] + a[3]); }
static inline vec vfloor(vec a) { vec r; for (int i = 0; i < 4; i++) r[i] = floorf(a[i]); return r; }
static inline vec vpow2i(vec n) {
    vec r;
    for (int i = 0; i < 4; i++) {
        const uint32_t bits = (uint32_t)((int32_t)n[i] + 127) << 23;
        memcpy(&r[i], &bits, 4);
    }
    return r;
}
static inline vec vzero_below(vec r, vec x, float lo) { for (int i = 0; i < 4; i++) r[i] = x[i] >= lo ? r[i] : 0.f; return r; }
#endif

/* exp(x), the same operations in every lane (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times
 * 2^n): ~2 ulp, exactly 0 below -87 and capped at exp(88). Ours rather than libm's so that every path, vector
 * or not, computes the same bits: libm's may be vectorised differently from one loop to the next. */
static inline vec vexp(vec x) {
    const vec xc = vmin(vmax(x, vset1(-87.f)), vset1(88.f));
    const vec n = vfloor(vfma(xc, vset1(1.44269504088896341f), vset1(0.5f)));
    vec r = vsub(xc, vmul(n, vset1(0.693359375f)));
    r = vsub(r, vmul(n, vset1(-2.12194440e-4f)));
    vec p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.f)));
    return vzero_below(vmul(p, vpow2i(n)), x, -87.f);
}

/* p[0, n) = exp(p[0, n)); p has room for a whole vector past n (those lanes get garbage). */
static void exp_inplace(float *p, int64_t n) {
    for (int64_t j = 0; j < n; j += VW) vstore(p + j, vexp(vload(p + j)));
}

/* Up to VW floats, the rest of the vector zero. */
static inline vec vload_n(const float *p, int64_t n) {
    if (n >= VW) return vload(p);
    float t[VW] = {0};
    memcpy(t, p, sizeof(float) * (size_t)n);
    return vload(t);
}

static inline void vstore_n(float *p, vec a, int64_t n) {
    if (n >= VW) { vstore(p, a); return; }
    float t[VW];
    vstore(t, a);
    memcpy(p, t, sizeof(float) * (size_t)n);
}

/* ---- thread pool ------------------------------------------------------------------------------------------ */

#define MAX_THREADS 64
typedef void (*task_fn)(void *arg, int tid, int nthreads);

/* The thread's floating-point control: flush-to-zero of denormals, rounding (MXCSR on x86, FPCR on ARM). */
#if defined(__x86_64__)
typedef unsigned fp_mode;
static inline fp_mode fp_mode_get(void) { return _mm_getcsr(); }
static inline void fp_mode_set(fp_mode m) { _mm_setcsr(m); }
#elif defined(__aarch64__)
typedef uint64_t fp_mode;
static inline fp_mode fp_mode_get(void) {
    uint64_t m;
    __asm__ volatile("mrs %0, fpcr" : "=r"(m));
    return m;
}
static inline void fp_mode_set(fp_mode m) { __asm__ volatile("msr fpcr, %0" : : "r"(m)); }
#else
typedef int fp_mode;
static inline fp_mode fp_mode_get(void) { return 0; }
static inline void fp_mode_set(fp_mode m) { (void)m; }
#endif

/* A spin-wait hint: lets the core's other hardware thread run, and saves power. */
static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

static int pool_n = 0;                 /* threads including the caller; 0 = not started */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static _Atomic uint32_t pool_gen = 0;  /* bumped to start a task; workers futex-wait on it */
static _Atomic int pool_pending = 0;   /* workers still running the current task */
static task_fn pool_fn;
static fp_mode pool_fp; /* the caller's floating-point mode: workers compute with its denormal and rounding modes */
static void *pool_arg;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;  /* one task at a time */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *worker(void *p) {
    const int tid = (int)(intptr_t)p;
    uint32_t seen = 0; /* pool_start runs before the first task is posted */
    for (;;) {
        /* Spin up to ~100 us for the next task, then sleep until one is posted. */
        double until = now_s() + 100e-6;
        uint32_t g;
        while ((g = atomic_load_explicit(&pool_gen, memory_order_acquire)) == seen && now_s() < until) cpu_relax();
        while ((g = atomic_load_explicit(&pool_gen, memory_order_acquire)) == seen)
            syscall(SYS_futex, &pool_gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
        seen = g;
        /* MindSpore's threads flush denormals and Python's main thread does not: a worker takes the caller's mode,
         * so that an item's bits do not depend on which thread computes it. */
        fp_mode_set(pool_fp);
        pool_fn(pool_arg, tid, pool_n);
        atomic_fetch_sub_explicit(&pool_pending, 1, memory_order_release);
    }
    return NULL;
}

static void pool_start(void) {
    /* MindSpore dlcloses this library when the last graph using it goes away and may map it again later; our
     * worker threads live in its code and statics, so pin it in memory for the life of the process. */
    Dl_info info;
    if (dladdr((void *)pool_start, &info) && info.dli_fname) dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE);
    int n = 0;
    const char *env = getenv("GPT2_KERNEL_THREADS");
    if (env) n = atoi(env);
    if (n <= 0) {
        cpu_set_t set;
        n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    }
    if (n > MAX_THREADS) n = MAX_THREADS;
    pool_n = n;
    for (int t = 1; t < n; t++) {
        pthread_t th;
        if (pthread_create(&th, NULL, worker, (void *)(intptr_t)t) != 0) { pool_n = t; break; }
        pthread_detach(th);
    }
}

/* Run fn(arg, tid, n) on every pool thread (the caller is tid 0) and wait for all of them. */
static void run_parallel(task_fn fn, void *arg) {
    pthread_once(&pool_once, pool_start);
    if (pool_n <= 1) { fn(arg, 0, 1); return; }
    pthread_mutex_lock(&pool_lock);
    pool_fn = fn;
    pool_fp = fp_mode_get();
    pool_arg = arg;
    atomic_store(&pool_pending, pool_n - 1);
    atomic_fetch_add_explicit(&pool_gen, 1, memory_order_release);
    syscall(SYS_futex, &pool_gen, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
    fn(arg, 0, pool_n);
    while (atomic_load_explicit(&pool_pending, memory_order_acquire) > 0) cpu_relax();
    pthread_mutex_unlock(&pool_lock);
}

/* [lo, hi) of n items for thread tid of nt: contiguous, so each thread streams its own part of the weights. */
static void split(int64_t n, int tid, int nt, int64_t *lo, int64_t *hi) {
    *lo = n * tid / nt;
    *hi = n * (tid + 1) / nt;
}

/* Claim the next chunk [lo, hi) of n items from *next (shared by a task's threads), about 8 chunks per thread and
 * at least `least` items:
 * a thread that the OS holds up (the event loop, the HTTP client on the same 2 cores) leaves the rest of its share
 * to the others instead of stalling the whole op. A static split made decode at batch 16 44% slower next to a
 * process busy 30% of one core (66 ms per step, 46 alone); claiming took 54 ms. 0 when none is left. */
static int claim(_Atomic int64_t *next, int64_t n, int nt, int64_t least, int64_t *lo, int64_t *hi) {
    const int64_t chunk = n / (8 * (int64_t)nt) > least ? n / (8 * (int64_t)nt) : least;
    *lo = atomic_fetch_add_explicit(next, chunk, memory_order_relaxed);
    *hi = *lo + chunk < n ? *lo + chunk : n;
    return *lo < n;
}

static int64_t rows_of(int nd, const int64_t *shape) {
    int64_t m = 1;
    for (int i = 0; i < nd - 1; i++) m *= shape[i];
    return m;
}

/* ---- linear -----------------------------------------------------------------------------------------------
 * y = x @ W^T (+ b) (GELU | + r), W (N, K) in the [out, in] layout. One arithmetic for every row count: each output
 * element is a single FMA chain over k = 0 .. K-1 in order, starting from x[0] w[0], then the epilogue. So a row's
 * result depends only on that row and the weights: never on how many rows the call has, where the row sits, or
 * which thread computes it (the engine relies on this for batch-invariant output).
 *
 * The chain runs across output columns: a register tile of MR rows x NR columns (two vectors), per k one broadcast
 * of x and two loads of W^T's row k. W^T comes in "panels" of NR columns, [k][NR], zero past N: either packed once
 * by the session (model.kernels.pack_panels; decode then streams each weight once, contiguously) or packed per call
 * into a per-thread buffer. Many rows (prefill, scoring) follow the usual packed GEMM (Goto/BLIS): per thread a range
 * of panels; per KC-deep block of K the W block stays in L1 while MC-row blocks of x, packed [k][MR], stream from
 * L2; partial sums are stored in y and reloaded exactly between K blocks, so the chain is the same as unblocked.
 * Int8 weights take the integer path below (run_q8). */
#if VW == 16
#define MR 14 /* 14 x 2 accumulators + 2 W vectors + 1 broadcast = 31 of AVX-512's 32 registers */
#elif VW == 8
#define MR 6  /* AVX2: 12 accumulators of 16 registers */
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define MR 8  /* NEON: 16 accumulators + 2 W vectors + x's 8 floats (2 vectors, by lane) of 32 registers */
#else
#define MR 4
#endif
#define NR (2 * VW)
#define KC 256
#define MC (MR * 8)
#define NP 64 /* W panels per block: 64 x KC x NR floats = 2 MB (AVX-512), about one core's L2 */

enum { EPI_NONE = 0, EPI_GELU = 1, EPI_ADD = 2 };

typedef struct {
    const float *x, *w, *b, *r;
    const float *panels; /* W packed as panels [N / NR][K][NR] (pack_panels), or NULL: packed per call */
    const uint32_t *wp;  /* W packed for AMX (see amx_task), or NULL */
    const int8_t *q8;    /* int8 panels (pack_panels_int8), or NULL: the integer path (run_q8) */
    const float *scale;  /* with q8: (N,) each column's scale */
    int16_t *xq;         /* with q8: x's rows quantized (M, K), their scales sx (M,) and ex (M,) (quantize_row) */
    float *sx, *ex;
    int8_t *xh;          /* with q8 on AMX: xq's high bytes (signed) and low bytes (unsigned), (Mp, K) each, Mp: */
                         /* M rounded up to 16 */
    uint8_t *xl;
    float *y;
    int64_t M, K, N;
    int epi;
    _Atomic int failed;
    _Atomic int64_t next; /* the next panel (or AMX column block) to claim */
    /* More than MR rows: rows [m_lo, m_hi) of this pass, packed once (pack_rows_task) into ap: group g of MR rows
     * at ap + (g - m_lo / MR) * MR * K, k-major over all of K (pack_x's layout). */
    int64_t m_lo, m_hi;
    float *ap;
} linear_args;

/* NR: the panel width pack_panels must use on this machine. */
int PanelWidth(void) { return NR; }

/* GPT-2's GELU (tanh form) as v * sigmoid(2z) = v / (1 + exp(-2z)), the form model/gpt2.py uses; the exponent is
 * capped so that 1 + exp stays finite. */
static inline vec vgelu(vec v) {
    const vec z = vadd(v, vmul(vset1(0.044715f), vmul(vmul(v, v), v)));
    const vec e = vmin(vmul(vset1(-1.5957691216057308f), z), vset1(80.f));
    return vdiv(v, vadd(vset1(1.f), vexp(e)));
}

/* Bias, GELU or residual on rows [m0, m0+mm) x columns [n0, n0+nn) of y once their sums are complete: in place,
 * or (src != NULL) from the sums in src (row stride lds) into y, so that y is written once. */
static void epilogue_from(const linear_args *a, const float *src, int64_t lds, int64_t m0, int64_t mm, int64_t n0,
                          int64_t nn) {
    for (int64_t i = m0; i < m0 + mm; i++) {
        float *y = a->y + i * a->N + n0;
        const float *s = src ? src + (i - m0) * lds : y;
        for (int64_t j = 0; j < nn; j += VW) {
            const int64_t w = nn - j;
            vec v = vload_n(s + j, w);
            if (a->scale) v = vmul(v, vload_n(a->scale + n0 + j, w));
            if (a->b) v = vadd(v, vload_n(a->b + n0 + j, w));
            if (a->epi == EPI_GELU) v = vgelu(v);
            else if (a->epi == EPI_ADD) v = vadd(v, vload_n(a->r + i * a->N + n0 + j, w));
            vstore_n(y + j, v, w);
        }
    }
}

static void epilogue(const linear_args *a, int64_t m0, int64_t mm, int64_t n0, int64_t nn) {
    epilogue_from(a, NULL, 0, m0, mm, n0, nn);
}

static __thread float *tls_buf;
static __thread size_t tls_cap;

/* *buf grown to hold at least n floats (64-byte aligned, a quarter of slack); NULL if out of memory. */
static float *grow(float **buf, size_t *cap, size_t n) {
    if (n > *cap) {
        free(*buf);
        *cap = n + (n >> 2);
        *buf = aligned_alloc(64, (*cap * sizeof(float) + 63) & ~(size_t)63);
        if (!*buf) *cap = 0;
    }
    return *buf;
}

/* The calling thread's packing buffer. */
static float *scratch(size_t n) { return grow(&tls_buf, &tls_cap, n); }

/* c[ROWS][NR] (row stride ldc) [+]= ap (kc x MR, the first ROWS used) . bp (kc x NR); load: continue the sums in
 * c. Specialised per ROWS (always_inline with a constant) so that a decode step of one row does one row's work. */
static inline __attribute__((always_inline)) void micro_rows(const int ROWS, int64_t kc, const float *restrict ap,
                                                             const float *restrict bp, float *c, int64_t ldc,
                                                             int load) {
    vec acc[MR][2];
    for (int i = 0; i < ROWS; i++) {
        acc[i][0] = load ? vload(c + i * ldc) : vzero();
        acc[i][1] = load ? vload(c + i * ldc + VW) : vzero();
    }
    for (int64_t k = 0; k < kc; k++) {
        const vec b0 = vload(bp + k * NR), b1 = vload(bp + k * NR + VW);
#pragma GCC unroll 16
        for (int i = 0; i < ROWS; i++) {
            const vec a = vset1(ap[k * MR + i]);
            acc[i][0] = vfma(a, b0, acc[i][0]);
            acc[i][1] = vfma(a, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < ROWS; i++) {
        vstore(c + i * ldc, acc[i][0]);
        vstore(c + i * ldc + VW, acc[i][1]);
    }
}

_Static_assert(MR == 4 || MR == 6 || MR == 8 || MR == 14, "micro_kernel has a case for each row count up to MR");
static void micro_kernel(int rows, int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, int load) {
    switch (rows) {
#define ROWS_CASE(r) \
    case r: micro_rows(r, kc, ap, bp, c, ldc, load); break;
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
#if MR > 4
        ROWS_CASE(5) ROWS_CASE(6)
#endif
#if MR > 6
        ROWS_CASE(7) ROWS_CASE(8)
#endif
#if MR > 8
        ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11) ROWS_CASE(12) ROWS_CASE(13) ROWS_CASE(14)
#endif
#undef ROWS_CASE
        default: break;
    }
}

/* bp[k][j] = w[n0 + j][k0 + k] for the panel's NR columns (zero past N): W^T, k-major. */
static void pack_w(const float *w, int64_t K, int64_t N, int64_t n0, int64_t k0, int64_t kc, float *bp) {
    const int64_t nn = N - n0 < NR ? N - n0 : NR;
#if VW == 16
    /* Gathers read the panel's 32 rows at once (a scalar transpose took longer than the multiplications for
     * tens of rows); the rows' cache lines stay in L1 across consecutive k. K * 32 fits in int32 for any GPT-2. */
    if ((K * NR) < INT32_MAX) {
        const __m512i step = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                                                                   15), _mm512_set1_epi32((int)K));
        const __m512i idx0 = step, idx1 = _mm512_add_epi32(step, _mm512_set1_epi32((int)(16 * K)));
        const __mmask16 m0 = nn >= 16 ? 0xFFFF : (__mmask16)((1u << nn) - 1);
        const __mmask16 m1 = nn >= 32 ? 0xFFFF : nn <= 16 ? 0 : (__mmask16)((1u << (nn - 16)) - 1);
        const float *src = w + n0 * K + k0;
        for (int64_t k = 0; k < kc; k++) {
            _mm512_storeu_ps(bp + k * NR, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, idx0, src + k, 4));
            _mm512_storeu_ps(bp + k * NR + 16,
                             _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, idx1, src + k, 4));
        }
        return;
    }
#endif
    for (int64_t j = 0; j < nn; j++) {
        const float *src = w + (n0 + j) * K + k0;
        for (int64_t k = 0; k < kc; k++) bp[k * NR + j] = src[k];
    }
    for (int64_t j = nn; j < NR; j++)
        for (int64_t k = 0; k < kc; k++) bp[k * NR + j] = 0.f;
}

/* ap[k][i] = x[m0 + i][k0 + k] for MR rows (zero past M). */
static void pack_x(const float *x, int64_t K, int64_t M, int64_t m0, int64_t k0, int64_t kc, float *ap) {
    const int64_t mm = M - m0 < MR ? M - m0 : MR;
    for (int64_t i = 0; i < mm; i++) {
        const float *src = x + (m0 + i) * K + k0;
        for (int64_t k = 0; k < kc; k++) ap[k * MR + i] = src[k];
    }
    for (int64_t i = mm; i < MR; i++)
        for (int64_t k = 0; k < kc; k++) ap[k * MR + i] = 0.f;
}

/* The KC-deep block at k0 of panel p: the session's packing, or packed now into buf. */
static const float *panel_block(const linear_args *a, int64_t p, int64_t k0, int64_t kc, float *buf) {
    if (a->panels) return a->panels + (p * a->K + k0) * NR;
    pack_w(a->w, a->K, a->N, p * NR, k0, kc, buf);
    return buf;
}

/* Rows [m0, m0 + mm) (mm <= MR) x panel p (bp), its sums continued (load) or started; an edge panel (fewer than
 * NR columns left) goes through tile, so that the kernel is the same. */
static void tile_op(const linear_args *a, int64_t mm, int64_t kc, const float *ap, const float *bp, int64_t m0,
                    int64_t p, int load, float *tile) {
    const int64_t n0 = p * NR, nn = a->N - n0 < NR ? a->N - n0 : NR;
    float *c = a->y + m0 * a->N + n0;
    if (nn == NR) {
        micro_kernel((int)mm, kc, ap, bp, c, a->N, load);
        return;
    }
    if (load)
        for (int64_t r = 0; r < mm; r++) memcpy(tile + r * NR, c + r * a->N, sizeof(float) * (size_t)nn);
    micro_kernel((int)mm, kc, ap, bp, tile, NR, load);
    for (int64_t r = 0; r < mm; r++) memcpy(c + r * a->N, tile + r * NR, sizeof(float) * (size_t)nn);
}

/* One row times four packed panels at once (decode): eight independent FMA chains in flight instead of two, so
 * the weights stream at memory speed; each column is still one chain over k in order from zero, exactly what
 * micro_rows(1, ...) computes for it. */
static void row_x4(int64_t K, const float *restrict ap, const float *restrict bp, float *c) {
    const int64_t ps = K * NR; /* one panel, in elements */
    vec acc[8];
    for (int j = 0; j < 8; j++) acc[j] = vzero();
    for (int64_t k = 0; k < K; k++) {
        const vec a = vset1(ap[k * MR]);
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
            const vec b0 = vload(bp + q * ps + k * NR), b1 = vload(bp + q * ps + k * NR + VW);
            acc[2 * q] = vfma(a, b0, acc[2 * q]);
            acc[2 * q + 1] = vfma(a, b1, acc[2 * q + 1]);
        }
    }
    for (int j = 0; j < 8; j++) vstore(c + j * VW, acc[j]);
}

/* Up to MR rows (decode): x packed once per thread, then each panel over all of K at once, so that packed panels
 * stream from memory once, contiguously. */
static void few_rows_task(linear_args *a, int nt, float *buf) {
    const int64_t M = a->M, K = a->K, N = a->N, P = (N + NR - 1) / NR;
    const int packed = a->panels != NULL;
    float *ap = buf, *bp = buf + MR * K, *tile = bp + (packed ? 0 : K * NR);
    pack_x(a->x, K, M, 0, 0, K, ap);
    int64_t lo, hi;
    while (claim(&a->next, P, nt, 4, &lo, &hi))
        for (int64_t p = lo; p < hi; p++) {
            if (M == 1 && packed && p + 4 <= hi && (p + 4) * NR <= N) {
                row_x4(K, ap, a->panels + p * K * NR, a->y + p * NR);
                epilogue(a, 0, 1, p * NR, 4 * NR);
                p += 3;
                continue;
            }
            tile_op(a, M, K, ap, panel_block(a, p, 0, K, bp), 0, p, 0, tile);
            const int64_t n0 = p * NR;
            epilogue(a, 0, M, n0, N - n0 < NR ? N - n0 : NR);
        }
}

/* Rows [m_lo, m_hi) of x packed into a->ap, row groups split between the threads: done once per pass, not once
 * per chunk of panels (that was ~8% of a 256-token prefill, as scalar strided copies). */
static void pack_rows_task(void *p, int tid, int nt) {
    linear_args *a = p;
    int64_t lo, hi;
    split((a->m_hi - a->m_lo + MR - 1) / MR, tid, nt, &lo, &hi);
    for (int64_t g = lo; g < hi; g++) pack_x(a->x, a->K, a->m_hi, a->m_lo + g * MR, 0, a->K, a->ap + g * MR * a->K);
}

static void linear_task(void *p, int tid, int nt) {
    linear_args *a = p;
    const int64_t M = a->M, K = a->K, N = a->N, P = (N + NR - 1) / NR;
    (void)tid;
    float *buf = scratch((size_t)(M <= MR ? MR * K + K * NR + MR * NR : NP * KC * NR + MR * NR));
    if (!buf) { /* no memory for the packing buffers (a few MB): fail the op, MindSpore raises */
        atomic_store(&a->failed, 1);
        return;
    }
    if (M <= MR) {
        few_rows_task(a, nt, buf);
        return;
    }
    float *bp = buf, *tile = bp + NP * KC * NR;
    const int64_t m_lo = a->m_lo, m_hi = a->m_hi;
    int64_t lo, hi;
    while (claim(&a->next, P, nt, 4, &lo, &hi))
    for (int64_t p0 = lo; p0 < hi; p0 += NP) { /* NP panels at a time bound the buffer (LM head: 1,571 panels) */
        const int64_t np = hi - p0 < NP ? hi - p0 : NP;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = K - k0 < KC ? K - k0 : KC;
            const int first = k0 == 0, last = k0 + kc == K;
            const float *bps[NP];
            for (int64_t q = 0; q < np; q++) bps[q] = panel_block(a, p0 + q, k0, kc, bp + q * KC * NR);
            for (int64_t m0 = m_lo; m0 < m_hi; m0 += MC) {
                const int64_t mc = m_hi - m0 < MC ? m_hi - m0 : MC;
                const float *ap = a->ap + (m0 - m_lo) * K + k0 * MR; /* row group (m0 - m_lo) / MR at k0 */
                for (int64_t q = 0; q < np; q++)
                    for (int64_t i = 0; i < mc; i += MR) {
                        const int64_t mm = mc - i < MR ? mc - i : MR;
                        tile_op(a, mm, kc, ap + i * K, bps[q], m0 + i, p0 + q, !first, tile);
                        if (last) {
                            const int64_t n0 = (p0 + q) * NR;
                            epilogue(a, m0 + i, mm, n0, N - n0 < NR ? N - n0 : NR);
                        }
                    }
            }
        }
    }
}

/* ---- int8 weights: integer dot products ----------------------------------------------------------------------
 * The Q8 ops ("--quantize int8"): W = q * s, q int8 (N, K), s one float32 scale per output column. Each row of x
 * is quantized on its own to int16 with one scale (dynamic, per row: sx = max|x| / QMAX, xq = rint(x / sx)), and
 * each output is an exact int32 sum of xq * q over all of K, then y = ((float)sum * sx) * s[n] before the bias.
 * Integer sums are exact in any order, so a row's bits depend only on that row and the weights: the same for every
 * row count, tiling and thread (batch invariance), and the same on every machine (AMX, AVX-512, AVX2, NEON and the
 * portable C give identical bits). QMAX is as large as int32 sums allow for this K (|q| <= 127): 11 to 15 bits of
 * the row's range, finer than the weights' 8: on the default model and random weights the error stayed the
 * weights' (bench/quality.py; a pretrained GPT-2's outlier activations, which cost a per-row scale bits, could not
 * be measured here).
 * Denormals: where the caller flushes them (DAZ/FTZ), a row whose largest value is denormal reads as zeros.
 * Why int16 and not int8 activations: AVX2 has no int8 x int8 multiply without vpmaddubsw's unsigned operand and
 * its saturating pair sums; vpmaddwd (int16 pairs into int32) does the same multiply-adds per instruction as
 * vpmaddubsw + vpmaddwd, exactly, and keeps 4-8 more bits of x.
 * AVX-512 (BW) does the same vpmaddwd on a whole panel's 16 columns at once, and with VNNI one vpdpwssd adds the
 * products into the sums too (no saturation: the same wrapping int32 adds as vpaddd, so the same sums).
 * Panels (pack_panels_int8): [P][K / 2][16][2] (16 columns per panel on every machine), each column's k-pair
 * side by side, so that one vpmaddwd of a broadcast (x[k], x[k+1]) against 8 columns' pairs adds both products into
 * each column's int32 sum. */
#define Q8_NR 16 /* columns per int8 panel, on every machine */
#if defined(__AVX512BW__)
#define Q8_MR 12 /* rows per register tile: 12 accumulators (a panel's 16 columns each), the weights, a broadcast */
#else
#define Q8_MR 6 /* rows per register tile: AVX2's 12 accumulators (16 columns), 2 weight vectors, 1 broadcast */
#endif
#define Q8_RB 48 /* rows per block: their int16 x (K = 3,072: 288 KB) stays in L2 across a chunk of panels */

/* The int16 range for rows of K: the largest q with K * 128 * q < 2^31 (|weights| <= 127, so no int32 sum can
 * overflow), at most 32,767. */
static int32_t q8_qmax(int64_t K) {
    const int64_t q = INT32_MAX / (128 * K);
    return (int32_t)(q > 32767 ? 32767 : q);
}

/* xq[0, K) = rint(x * (qmax / max|x|)); returns sx = max|x| / qmax (0 for a row of zeros; NaN if x has a NaN or
 * an infinity, so that the row's outputs are NaN as the float32 path's would be) and sets *ex to 1. A row whose
 * largest value is below 2^-60 (where qmax / max|x| could overflow: denormals) is taken times 2^100 first, exactly,
 * and *ex = 2^-100 scales its sums back: (sum * sx) * ex. */
static float quantize_row(const float *x, int64_t K, int32_t qmax, int16_t *xq, float *ex) {
    *ex = 1.f;
    float amax = 0.f;
    int bad = 0;
    int64_t k = 0;
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 vmx = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k));
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(v, _mm256_set1_ps(FLT_MAX), _CMP_NLE_UQ)); /* NaN or inf */
        vmx = _mm256_max_ps(vmx, v);
    }
    bad = _mm256_movemask_ps(vbad) != 0;
    float lanes[8];
    _mm256_storeu_ps(lanes, vmx);
    for (int i = 0; i < 8; i++) amax = lanes[i] > amax ? lanes[i] : amax;
#endif
    for (; k < K; k++) {
        const float v = fabsf(x[k]);
        if (!(v <= FLT_MAX)) bad = 1;
        else if (v > amax) amax = v;
    }
    if (bad) {
        memset(xq, 0, sizeof(int16_t) * (size_t)K);
        return NAN;
    }
    if (amax == 0.f) {
        memset(xq, 0, sizeof(int16_t) * (size_t)K);
        return 0.f;
    }
    float up = 1.f;
    if (amax < 0x1p-60f) {
        up = 0x1p100f;
        amax *= up;
        *ex = 0x1p-100f;
    }
    /* |x| * inv <= qmax (amax * (qmax / amax) rounds to within an ulp of qmax), so rint stays in range */
    const float inv = (float)qmax / amax;
    k = 0;
#if defined(__AVX2__)
    const __m256 vinv = _mm256_set1_ps(inv);
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k), _mm256_set1_ps(up));
        const __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(v, vinv)); /* nearest even */
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        _mm_storeu_si128((__m128i *)(xq + k), i16);
    }
#endif
    for (; k < K; k++) xq[k] = (int16_t)nearbyintf(x[k] * up * inv); /* the caller's rounding mode: nearest even */
    return amax / (float)qmax;
}

#if defined(__AVX512BW__)
/* acc + each int32 lane's two int16 products (x's pair times a column's pair) */
static inline __m512i q8_dot(__m512i acc, __m512i x, __m512i w) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, x, w);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
#endif
}

/* A panel's k-pair kp: its 16 columns' int8 pairs widened to int16, column j's pair in int32 lane j. */
static inline __m512i q8_pairs(const int8_t *bp, int64_t kp) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(bp + kp * 2 * Q8_NR)));
}
#endif

/* c[ROWS][16] = the int32 sums of rows xq (row stride ldx) against an int8 panel (bp) over K2 k-pairs. */
static inline __attribute__((always_inline)) void q8_rows(const int ROWS, int64_t K2, const int16_t *restrict xq,
                                                          int64_t ldx, const int8_t *restrict bp, int32_t *restrict c) {
#if defined(__AVX512BW__)
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
            c9 = c0, c10 = c0, c11 = c0;
#define Q8_ROW(i) \
    if (ROWS > i) { \
        int32_t pair; \
        memcpy(&pair, xq + i * ldx + 2 * kp, sizeof pair); \
        c##i = q8_dot(c##i, _mm512_set1_epi32(pair), w); \
    }
#define Q8_STORE(i) \
    if (ROWS > i) _mm512_storeu_si512(c + i * 16, c##i);
    for (int64_t kp = 0; kp < K2; kp++) {
        const __m512i w = q8_pairs(bp, kp);
        Q8_ROW(0) Q8_ROW(1) Q8_ROW(2) Q8_ROW(3) Q8_ROW(4) Q8_ROW(5)
        Q8_ROW(6) Q8_ROW(7) Q8_ROW(8) Q8_ROW(9) Q8_ROW(10) Q8_ROW(11)
    }
    Q8_STORE(0) Q8_STORE(1) Q8_STORE(2) Q8_STORE(3) Q8_STORE(4) Q8_STORE(5)
    Q8_STORE(6) Q8_STORE(7) Q8_STORE(8) Q8_STORE(9) Q8_STORE(10) Q8_STORE(11)
#undef Q8_ROW
#undef Q8_STORE
#elif defined(__AVX2__)
    /* Named accumulators, not an array: GCC then keeps all twelve in registers (with an array it spilled some). */
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define Q8_ROW(i) \
    if (ROWS > i) { \
        int32_t pair; \
        memcpy(&pair, xq + i * ldx + 2 * kp, sizeof pair); \
        const __m256i a = _mm256_set1_epi32(pair); \
        c##i##0 = _mm256_add_epi32(c##i##0, _mm256_madd_epi16(a, w0)); \
        c##i##1 = _mm256_add_epi32(c##i##1, _mm256_madd_epi16(a, w1)); \
    }
#define Q8_STORE(i) \
    if (ROWS > i) { \
        _mm256_storeu_si256((__m256i *)(c + i * 16), c##i##0); \
        _mm256_storeu_si256((__m256i *)(c + i * 16 + 8), c##i##1); \
    }
    for (int64_t kp = 0; kp < K2; kp++) {
        const int8_t *w = bp + kp * 2 * Q8_NR;
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
        Q8_ROW(0) Q8_ROW(1) Q8_ROW(2) Q8_ROW(3) Q8_ROW(4) Q8_ROW(5)
    }
    Q8_STORE(0) Q8_STORE(1) Q8_STORE(2) Q8_STORE(3) Q8_STORE(4) Q8_STORE(5)
#undef Q8_ROW
#undef Q8_STORE
#else
    /* Portable (and NEON, which GCC vectorises into widening multiply-adds): the same exact sums. */
    int32_t acc[Q8_MR][16];
    memset(acc, 0, sizeof acc);
    for (int64_t kp = 0; kp < K2; kp++) {
        const int8_t *w = bp + kp * 2 * Q8_NR;
        for (int i = 0; i < ROWS; i++) {
            const int32_t x0 = xq[i * ldx + 2 * kp], x1 = xq[i * ldx + 2 * kp + 1];
            for (int j = 0; j < 16; j++) acc[i][j] += x0 * w[2 * j] + x1 * w[2 * j + 1];
        }
    }
    for (int i = 0; i < ROWS; i++) memcpy(c + i * 16, acc[i], sizeof acc[i]);
#endif
}

static void q8_tile(int rows, int64_t K2, const int16_t *xq, int64_t ldx, const int8_t *bp, int32_t *c) {
    switch (rows) {
#define Q8_CASE(r) \
    case r: q8_rows(r, K2, xq, ldx, bp, c); break;
        Q8_CASE(1) Q8_CASE(2) Q8_CASE(3) Q8_CASE(4) Q8_CASE(5) Q8_CASE(6)
#if Q8_MR > 6
        Q8_CASE(7) Q8_CASE(8) Q8_CASE(9) Q8_CASE(10) Q8_CASE(11) Q8_CASE(12)
#endif
#undef Q8_CASE
        default: break;
    }
}
_Static_assert(Q8_MR == 6 || Q8_MR == 12, "q8_tile has a case for each row count up to Q8_MR");

/* One row against four consecutive panels (bp, the next at + ps bytes) at once (decode): four weight streams in
 * flight instead of one, so that they come at memory speed (one stream left the loads waiting); c[4][16]. The
 * same exact sums as q8_rows(1, ...) per panel. */
static void q8_row_x4(int64_t K2, const int16_t *restrict xq, const int8_t *restrict bp, int64_t ps,
                      int32_t *restrict c) {
#if defined(__AVX512BW__)
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t kp = 0; kp < K2; kp++) {
        int32_t pair;
        memcpy(&pair, xq + 2 * kp, sizeof pair);
        const __m512i x = _mm512_set1_epi32(pair);
        a0 = q8_dot(a0, x, q8_pairs(bp, kp));
        a1 = q8_dot(a1, x, q8_pairs(bp + ps, kp));
        a2 = q8_dot(a2, x, q8_pairs(bp + 2 * ps, kp));
        a3 = q8_dot(a3, x, q8_pairs(bp + 3 * ps, kp));
    }
    _mm512_storeu_si512(c, a0);
    _mm512_storeu_si512(c + Q8_NR, a1);
    _mm512_storeu_si512(c + 2 * Q8_NR, a2);
    _mm512_storeu_si512(c + 3 * Q8_NR, a3);
#elif defined(__AVX2__)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
#define Q8_PANEL(q, lo, hi) \
    { \
        const int8_t *w = bp + q * ps + kp * 2 * Q8_NR; \
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)); \
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16))); \
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(x, w0)); \
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(x, w1)); \
    }
    for (int64_t kp = 0; kp < K2; kp++) {
        int32_t pair;
        memcpy(&pair, xq + 2 * kp, sizeof pair);
        const __m256i x = _mm256_set1_epi32(pair);
        Q8_PANEL(0, a0, a1) Q8_PANEL(1, a2, a3) Q8_PANEL(2, a4, a5) Q8_PANEL(3, a6, a7)
    }
#undef Q8_PANEL
    const __m256i acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(c + 8 * j), acc[j]);
#else
    for (int q = 0; q < 4; q++) q8_rows(1, K2, xq, 0, bp + q * ps, c + q * Q8_NR);
#endif
}

/* Row 0 x panels [p, p + 4) (decode), as q8_block does it one panel at a time. */
static void q8_row_block_x4(const linear_args *a, int64_t p) {
    const int64_t K = a->K, n0 = p * Q8_NR, nn = a->N - n0 < 4 * Q8_NR ? a->N - n0 : 4 * Q8_NR;
    int32_t c[4 * Q8_NR];
    float t[4 * Q8_NR];
    q8_row_x4(K / 2, a->xq, a->q8 + p * K * Q8_NR, K * Q8_NR, c);
    for (int64_t j = 0; j < 4 * Q8_NR; j++) t[j] = (float)c[j] * a->sx[0] * a->ex[0];
    epilogue_from(a, t, 4 * Q8_NR, 0, 1, n0, nn);
}

/* Rows [m0, m0 + mm) (mm <= Q8_MR) x panel p: the int32 sums, each times its row's scale, then y. */
static void q8_block(const linear_args *a, int64_t m0, int64_t mm, int64_t p) {
    const int64_t K = a->K, n0 = p * Q8_NR, nn = a->N - n0 < Q8_NR ? a->N - n0 : Q8_NR;
    int32_t c[Q8_MR * Q8_NR];
    float t[Q8_MR * Q8_NR];
    q8_tile((int)mm, K / 2, a->xq + m0 * K, K, a->q8 + p * K * Q8_NR, c);
    for (int64_t i = 0; i < mm; i++)
        for (int64_t j = 0; j < Q8_NR; j++) t[i * Q8_NR + j] = (float)c[i * Q8_NR + j] * a->sx[m0 + i] * a->ex[m0 + i];
    epilogue_from(a, t, Q8_NR, m0, mm, n0, nn); /* times s[n], then the bias, GELU or residual */
}

/* Each thread claims chunks of panels; per block of Q8_RB rows, the chunk's panels (in L2) against the block's
 * rows, Q8_MR at a time. */
static void q8_task(void *p, int tid, int nt) {
    linear_args *a = p;
    const int64_t P = (a->N + Q8_NR - 1) / Q8_NR;
    (void)tid;
    int64_t lo, hi;
    while (claim(&a->next, P, nt, a->M == 1 ? 4 : 1, &lo, &hi))
        for (int64_t r0 = 0; r0 < a->M; r0 += Q8_RB) {
            const int64_t r1 = a->M - r0 < Q8_RB ? a->M : r0 + Q8_RB;
            for (int64_t q = lo; q < hi; q++) {
                if (a->M == 1 && q + 4 <= hi) {
                    q8_row_block_x4(a, q);
                    q += 3;
                    continue;
                }
                for (int64_t m0 = r0; m0 < r1; m0 += Q8_MR) q8_block(a, m0, r1 - m0 < Q8_MR ? r1 - m0 : Q8_MR, q);
            }
        }
}

static void q8_quantize_task(void *p, int tid, int nt) {
    linear_args *a = p;
    const int32_t qmax = q8_qmax(a->K);
    int64_t lo, hi;
    split(a->M, tid, nt, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        const int16_t *xq = a->xq + i * a->K;
        a->sx[i] = quantize_row(a->x + i * a->K, a->K, qmax, a->xq + i * a->K, a->ex + i);
        if (a->xh)
            for (int64_t k = 0; k < a->K; k++) {
                a->xh[i * a->K + k] = (int8_t)(xq[k] >> 8); /* arithmetic shift (GCC, Clang): floor(xq / 256) */
                a->xl[i * a->K + k] = (uint8_t)(xq[k] & 255);
            }
    }
}

/* ---- AMX: the tile state ---------------------------------------------------------------------------------------
 * Used where the build has AMX (-march=native on Sapphire Rapids and later) and Linux grants the tile state to the
 * process; GPT2_AMX=0 turns every AMX path off (read once per process). tests/x86_emulated.h emulates the tiles
 * (GPT2_EMULATED_AMX). */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define AMX_BF16 1
#else
#define AMX_BF16 0
#endif
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__)
#define AMX_INT8 1
#else
#define AMX_INT8 0
#endif
#if defined(__AMX_TILE__)
static int amx_ok = 0; /* the kernels may use the tile registers (set by amx_enable) */

static void amx_enable(void) {
    /* as model/kernels/__init__.py reads it ("0", "false", "no", "off", any case, blanks around), once */
    const char *env = getenv("GPT2_AMX");
    char v[8] = "";
    if (env) {
        while (*env == ' ' || *env == '\t' || *env == '\n') env++;
        size_t n = strcspn(env, " \t\n");
        if (n < sizeof v) memcpy(v, env, n), v[n] = 0;
    }
    if (!strcmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no") || !strcasecmp(v, "off")) return;
#if defined(GPT2_EMULATED_AMX)
    amx_ok = 1;
#else
    /* Linux hands out the tile state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA). */
    amx_ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#endif
}

static int amx_usable(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, amx_enable);
    return amx_ok;
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* All eight tiles 16 rows of 64 bytes. (GCC's tile intrinsics are asm statements that do not say they read
 * memory: the barriers here and after the repacking keep the stores before them where they are.) */
static void amx_tiles_16x64(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    __asm__ volatile("" ::: "memory");
    _tile_loadconfig(&cfg);
}
#else
static int amx_usable(void) { return 0; }
#endif

/* ---- int8 weights on AMX ---------------------------------------------------------------------------------------
 * The tiles multiply int8 by int8 (TDPBSSD; TDPBUSD with the first operand unsigned), so each int16 xq is taken as
 * hi * 256 + lo, hi = xq >> 8 signed and lo = xq & 255 unsigned, and sum = (sum(hi * q) << 8) + sum(lo * q): the
 * exact int32 sums of the other paths (both parts fit; the shift and add wrap as int32 and end at the true sum, which
 * fits), so the same bits, with two tile products per tile of sums. Used for calls of at least Q8_AMX_ROWS rows
 * (fewer would be mostly padding; decode reads weights, which the vector path does at memory speed) and K a
 * multiple of 64 (a tile's depth; every GPT-2 size). Each thread repacks two int8 panels at a time into the tile
 * unit's B layout ([K / 4][16][4]: a column's four consecutive k's side by side) in its scratch buffer, then runs
 * every 16-row block of x against them: tiles 0-1 the hi sums and 2-3 the lo sums of 16 rows x 32 columns, 4-5 x's
 * hi and lo bytes, 6-7 the two panels. */
#define Q8_AMX_ROWS 16
#if AMX_INT8
static void q8_amx_repack(const linear_args *a, int64_t p, int8_t *b) {
    /* out int16 2n = pair row 2kq's column n, 2n + 1 = pair row 2kq + 1's column n */
    static const int16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const int64_t K = a->K, P = (a->N + Q8_NR - 1) / Q8_NR;
    const __m512i idx = _mm512_loadu_si512(order);
    for (int q = 0; q < 2; q++) {
        int8_t *dst = b + q * K * Q8_NR;
        if (p + q >= P) {
            memset(dst, 0, (size_t)K * Q8_NR);
            continue;
        }
        const int8_t *src = a->q8 + (p + q) * K * Q8_NR;
        for (int64_t kq = 0; kq < K / 4; kq++)
            _mm512_storeu_si512(dst + kq * 64, _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(src + kq * 64)));
    }
}

static void q8_amx_task(void *p, int tid, int nt) {
    linear_args *a = p;
    const int64_t M = a->M, K = a->K, N = a->N, Mp = (M + 15) & ~(int64_t)15;
    const int64_t pairs = ((N + Q8_NR - 1) / Q8_NR + 1) / 2;
    (void)tid;
    int8_t *b = (int8_t *)scratch((size_t)K * 2 * Q8_NR / sizeof(float)); /* two panels, K x 16 bytes each */
    if (!b) {
        atomic_store(&a->failed, 1);
        return;
    }
    amx_tiles_16x64();
    int32_t hs[2][16][16], ls[2][16][16];
    float t[16 * 32];
    int64_t lo, hi;
    while (claim(&a->next, pairs, nt, 1, &lo, &hi))
        for (int64_t pp = lo; pp < hi; pp++) {
            q8_amx_repack(a, 2 * pp, b);
            __asm__ volatile("" ::: "memory");
            const int64_t n0 = pp * 32, nn = N - n0 < 32 ? N - n0 : 32;
            for (int64_t m0 = 0; m0 < Mp; m0 += 16) {
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t k = 0; k < K; k += 64) {
                    _tile_loadd(4, a->xh + m0 * K + k, K);
                    _tile_loadd(5, a->xl + m0 * K + k, K);
                    _tile_loadd(6, b + k * 16, 64);
                    _tile_loadd(7, b + K * Q8_NR + k * 16, 64);
                    _tile_dpbssd(0, 4, 6);
                    _tile_dpbssd(1, 4, 7);
                    _tile_dpbusd(2, 5, 6);
                    _tile_dpbusd(3, 5, 7);
                }
                _tile_stored(0, hs[0], 64);
                _tile_stored(1, hs[1], 64);
                _tile_stored(2, ls[0], 64);
                _tile_stored(3, ls[1], 64);
                const int64_t mm = M - m0 < 16 ? M - m0 : 16;
                for (int64_t i = 0; i < mm; i++)
                    for (int64_t j = 0; j < 32; j++) {
                        const uint32_t h = (uint32_t)hs[j / 16][i][j % 16], l = (uint32_t)ls[j / 16][i][j % 16];
                        const int32_t c = (int32_t)((h << 8) + l);
                        t[i * 32 + j] = (float)c * a->sx[m0 + i] * a->ex[m0 + i];
                    }
                epilogue_from(a, t, 32, m0, mm, n0, nn);
            }
        }
    _tile_release();
}
#else
static void q8_amx_task(void *p, int tid, int nt) { (void)p; (void)tid; (void)nt; }
#endif

/* x quantized into the caller's buffer (rows split between the threads), then the panels (on AMX: see above). */
static int run_q8(linear_args *a) {
    static __thread float *xbuf;
    static __thread size_t xcap;
    if (a->M == 0) return 0;
    const int amx = AMX_INT8 && a->M >= Q8_AMX_ROWS && a->K % 64 == 0 && amx_usable();
    const size_t Mp = (size_t)(a->M + 15) & ~(size_t)15, planes = amx ? 2 * Mp * (size_t)a->K : 0;
    const size_t n16 = (size_t)(a->M * a->K), nf = (n16 + 1) / 2 + 2 * (size_t)a->M + (planes + 3) / 4;
    float *buf = grow(&xbuf, &xcap, nf);
    if (!buf) return 1;
    a->sx = buf;
    a->ex = buf + a->M;
    a->xq = (int16_t *)(buf + 2 * a->M);
    a->xh = NULL;
    a->xl = NULL;
    if (amx) {
        a->xh = (int8_t *)(a->xq + n16);
        a->xl = (uint8_t *)(a->xh + Mp * a->K);
        /* the padding rows of the last 16-row block: zeros (their sums are dropped) */
        memset(a->xh + n16, 0, (Mp - a->M) * a->K);
        memset(a->xl + n16, 0, (Mp - a->M) * a->K);
    }
    if (a->M <= Q8_MR) q8_quantize_task(a, 0, 1); /* decode: not worth waking the workers */
    else run_parallel(q8_quantize_task, a);
    run_parallel(amx ? q8_amx_task : q8_task, a);
    return atomic_load(&a->failed);
}

/* ---- AMX (bf16 tiles) -----------------------------------------------------------------------------------------
 * Where the CPU has AMX (Sapphire Rapids and later) and the session packed the weights for it, every call goes
 * through the tile unit, whatever its row count (one arithmetic per session: decode and prefill compute a row the
 * same way). One TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 float32 sums.
 * float32 precision is kept by splitting each operand into two bf16 (hi = bf16(v), lo = bf16(v - hi)) and summing
 * hi.hi + hi.lo + lo.hi ("bf16x3"): measured error 5e-6 of the output's scale, against 1-2e-6 for the float32
 * kernels and the ~1e-2 of a plain bf16 product.
 * wp holds W's two parts as [2][Np / 16][K / 2][16] uint32 (Np: N rounded up to a multiple of 32 with zero rows):
 * for 16 output columns, each k-pair's two bf16 side by side (the "VNNI" layout the tile unit reads), packed once
 * by model.kernels.pack_weight_amx. x is split per call into the thread's scratch buffer. Each output element's
 * sums depend only on its row of x and the weights: not on M, the row's position or the thread count.
 * Rows are taken 32 at a time and a last 16 (zero-padded). */
#if AMX_BF16
#define AMX_PREFETCH 2 /* k-steps ahead */

/* x rows [0, M) -> hi, lo bf16 (Mp x K each, rows past M zero). */
static void split_x(const float *x, int64_t M, int64_t Mp, int64_t K, uint16_t *hi, uint16_t *lo) {
    for (int64_t i = 0; i < Mp; i++)
        for (int64_t k = 0; k < K; k += 32) {
            if (i >= M) {
                memset(hi + i * K + k, 0, 64);
                memset(lo + i * K + k, 0, 64);
                continue;
            }
            const __m512 a = _mm512_loadu_ps(x + i * K + k), b = _mm512_loadu_ps(x + i * K + k + 16);
            const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);
            const __m512 ah = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
            const __m512 bh = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
            _mm512_storeu_si512(hi + i * K + k, h);
            const __m512bh l = _mm512_cvtne2ps_pbh(_mm512_sub_ps(b, bh), _mm512_sub_ps(a, ah));
            _mm512_storeu_si512(lo + i * K + k, (__m512i)l);
        }
}

/* Tile numbers must be literals (the intrinsics paste them into the instruction). */
#define AMX_LOAD_X(p) do { _tile_loadd(4, (p) + k, lda); _tile_loadd(5, (p) + 16 * K + k, lda); } while (0)
#define AMX_LOAD_W(p0, p1) do { _tile_loadd(6, (p0) + kb, ldb); _tile_loadd(7, (p1) + kb, ldb); } while (0)
#define AMX_PRODUCTS() \
    do { \
        _tile_dpbf16ps(0, 4, 6); \
        _tile_dpbf16ps(1, 4, 7); \
        _tile_dpbf16ps(2, 5, 6); \
        _tile_dpbf16ps(3, 5, 7); \
    } while (0)

static void amx_task(void *p, int tid, int nt) {
    linear_args *a = p;
    const int64_t M = a->M, K = a->K, N = a->N, Mp = (M + 15) & ~(int64_t)15;
    (void)tid;
    /* x's two bf16 parts (Mp x K each) in the thread's scratch buffer (the float32 GEMM's, never in use at once) */
    uint16_t *xh = (uint16_t *)scratch((size_t)Mp * K);
    if (!xh) {
        atomic_store(&a->failed, 1);
        return;
    }
    uint16_t *xl = xh + (size_t)Mp * K;
    split_x(a->x, M, Mp, K, xh, xl);
    amx_tiles_16x64();
    /* 32-row blocks, tiles: 0-3 a 32 x 32 block of sums over all of K, 4-5 two 16-row x tiles, 6-7 two 16-column
     * W tiles. A last block of 16 rows (and decode's 1-16 rows, zero-padded to 16): 0-1 its 16 x 32 sums, 4-5 x's
     * hi and lo, 6-7 and 2-3 W's hi and lo. Either way each sum takes hi.hi, hi.lo, lo.hi per 32-deep step, in that
     * order: a row's result does not depend on the block it falls in. (Blocking K, with the sums stored and
     * reloaded between blocks, measured no faster here.) */
    const int64_t Np = (N + 31) & ~(int64_t)31; /* packed columns: N padded with zero rows of W */
    const uint32_t *wh = a->wp, *wl = a->wp + (size_t)Np * K / 2;
    const int64_t lda = K * 2, ldb = 64, panel = (K / 2) * 16;
    float tmp[32 * 32];
    int64_t lo, hi;
    while (claim(&a->next, (N + 31) / 32, nt, 1, &lo, &hi))
    for (int64_t nb = lo; nb < hi; nb++) { /* the last block may be narrower (the LM head: 50,257 columns) */
        const int64_t n0 = nb * 32, nn = N - n0 < 32 ? N - n0 : 32;
        const uint32_t *h0 = wh + (n0 / 16) * panel, *h1 = h0 + panel;
        const uint32_t *l0 = wl + (n0 / 16) * panel, *l1 = l0 + panel;
        for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
            const int64_t mm = M - m0 < 32 ? M - m0 : 32;
            const uint16_t *ah = xh + m0 * K, *al = xl + m0 * K;
            if (Mp - m0 == 16) {
                _tile_zero(0);
                _tile_zero(1);
                for (int64_t k = 0; k < K; k += 32) {
                    const int64_t kb = (k / 2) * 16;
                    /* Few rows: the step is bound by reading W, which the tile loads alone stream poorly (16 rows
                     * in 28 ms for 12 layers without this, 22 with it; float32 kernels 35). */
                    if (k + 32 * AMX_PREFETCH < K)
                        for (int l = 0; l < 256; l += 16) {
                            const int64_t at = kb + 256 * AMX_PREFETCH + l;
                            _mm_prefetch((const char *)(h0 + at), _MM_HINT_T0);
                            _mm_prefetch((const char *)(h1 + at), _MM_HINT_T0);
                            _mm_prefetch((const char *)(l0 + at), _MM_HINT_T0);
                            _mm_prefetch((const char *)(l1 + at), _MM_HINT_T0);
                        }
                    _tile_loadd(4, ah + k, lda);
                    _tile_loadd(6, h0 + kb, ldb);
                    _tile_loadd(7, h1 + kb, ldb);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_loadd(2, l0 + kb, ldb);
                    _tile_loadd(3, l1 + kb, ldb);
                    _tile_dpbf16ps(0, 4, 2);
                    _tile_dpbf16ps(1, 4, 3);
                    _tile_loadd(5, al + k, lda);
                    _tile_dpbf16ps(0, 5, 6);
                    _tile_dpbf16ps(1, 5, 7);
                }
                _tile_stored(0, tmp, 32 * 4);
                _tile_stored(1, tmp + 16, 32 * 4);
                epilogue_from(a, tmp, 32, m0, mm, n0, nn);
                continue;
            }
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t k = 0; k < K; k += 32) {
                const int64_t kb = (k / 2) * 16;
                /* hi.hi, hi.lo, lo.hi: 10 tile loads for 12 products (x hi stays while both W parts pass) */
                AMX_LOAD_X(ah);
                AMX_LOAD_W(h0, h1);
                AMX_PRODUCTS();
                AMX_LOAD_W(l0, l1);
                AMX_PRODUCTS();
                AMX_LOAD_X(al);
                AMX_LOAD_W(h0, h1);
                AMX_PRODUCTS();
            }
            /* The block through tmp (L1), then into y with its bias, GELU or residual: y is written once, and
             * never read back right after a tile store (that was 7.5% of a prefill pass in the epilogue, mostly
             * its stores); an edge block's padding rows and columns are dropped there. */
            _tile_stored(0, tmp, 32 * 4);
            _tile_stored(1, tmp + 16, 32 * 4);
            _tile_stored(2, tmp + 16 * 32, 32 * 4);
            _tile_stored(3, tmp + 16 * 32 + 16, 32 * 4);
            epilogue_from(a, tmp, 32, m0, mm, n0, nn);
        }
    }
    _tile_release(); /* so a context switch need not save 8 KB of tile state */
}
#else
static void amx_task(void *p, int tid, int nt) { (void)p; (void)tid; (void)nt; }
#endif

/* 1 if Linear uses AMX with pre-packed weights in this process (model.kernels asks once, at session set-up). */
int AmxAvailable(void) { return AMX_BF16 && amx_usable(); }

/* The call on the path for its row count (each computes a row the same way); a's inputs are checked. */
static int run_linear(linear_args *a) {
    atomic_store(&a->failed, 0);
    atomic_store(&a->next, 0);
    if (a->q8) return run_q8(a);
    if (a->wp) {
        run_parallel(amx_task, a);
    } else if (a->M <= MR) {
        run_parallel(linear_task, a);
    } else {
        /* Passes of at most ROWS_PER_PASS rows bound the packed copy of x (the caller's thread keeps it). */
        enum { ROWS_PER_PASS = 128 * MR };
        static __thread float *xbuf;
        static __thread size_t xcap;
        const int64_t rows = a->M < ROWS_PER_PASS ? (a->M + MR - 1) / MR * MR : ROWS_PER_PASS;
        a->ap = grow(&xbuf, &xcap, (size_t)rows * (size_t)a->K);
        if (!a->ap) return 1;
        for (int64_t m0 = 0; m0 < a->M && !atomic_load(&a->failed); m0 += ROWS_PER_PASS) {
            a->m_lo = m0;
            a->m_hi = a->M - m0 < ROWS_PER_PASS ? a->M : m0 + ROWS_PER_PASS;
            atomic_store(&a->next, 0);
            run_parallel(pack_rows_task, a);
            run_parallel(linear_task, a);
        }
    }
    return atomic_load(&a->failed);
}

static int linear(int nparam, void **params, int *ndims, int64_t **shapes, int epi) {
    /* (x, w[, packed][, b][, r], y) or (x, packed[, b][, r], y): packed is w as panels (3-D float32, pack_panels)
     * or for AMX (4-D int32, pack_weight_amx); given alone, its shape gives N (then a multiple of the panel
     * width, or of 32 for AMX). The tied LM head comes without a bias. */
    int i = 1;
    const float *w = NULL;
    int64_t N = 0, K = 0;
    if (ndims[1] == 2) {
        w = params[1];
        N = shapes[1][0];
        K = shapes[1][1];
        i = 2;
    }
    const uint32_t *wp = NULL;
    const float *panels = NULL;
    if (i < nparam - 1 && ndims[i] == 4) {
        const int64_t *ws = shapes[i];
        if (!w) N = ws[1] * 16, K = ws[2] * 2;
        if (ws[0] != 2 || ws[1] * 16 != (N + 31) / 32 * 32 || ws[2] * 2 != K || ws[3] != 16) return 1;
        wp = params[i++];
    } else if (i < nparam - 1 && ndims[i] == 3) {
        const int64_t *ws = shapes[i];
        if (!w) N = ws[0] * NR, K = ws[1];
        if (ws[0] != (N + NR - 1) / NR || ws[1] != K || ws[2] != NR) return 1;
        panels = params[i++];
    }
    if (!w && !wp && !panels) return 1;
    const float *b = epi == EPI_ADD ? params[i++] : i < nparam - 1 ? params[i++] : NULL;
    const float *r = epi == EPI_ADD ? params[i++] : NULL;
    linear_args a = {.x = params[0], .w = w, .b = b, .r = r, .panels = panels, .wp = wp, .y = params[nparam - 1],
                     .M = rows_of(ndims[0], shapes[0]), .K = shapes[0][ndims[0] - 1], .N = N, .epi = epi};
    if (a.K % VW || K != a.K) return 1;
    if (wp && (!AmxAvailable() || a.K % 32)) return 1; /* the session packs for AMX only where it is available */
    return run_linear(&a);
}

/* (x, wq, s[, b][, r], y): wq W's int8 panels (P, K, NR) (pack_panels_int8), s (N,) its scales; N is s's length.
 * Where MindSpore says the dtypes, wq must be int8 (float32 panels have the same shape). */
static int linear_q8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int epi) {
    if (nparam < (epi == EPI_ADD ? 6 : 4) || nparam > (epi == EPI_ADD ? 6 : 5)) return 1;
    if (ndims[1] != 3 || ndims[2] != 1 || (dtypes && strcmp(dtypes[1], "int8") != 0)) return 1;
    const int64_t N = shapes[2][0], *ws = shapes[1];
    linear_args a = {.x = params[0], .q8 = params[1], .scale = params[2], .b = nparam > 4 ? params[3] : NULL,
                     .r = epi == EPI_ADD ? params[4] : NULL, .y = params[nparam - 1],
                     .M = rows_of(ndims[0], shapes[0]), .K = shapes[0][ndims[0] - 1], .N = N, .epi = epi};
    if (a.K % VW || ws[0] != (N + Q8_NR - 1) / Q8_NR || ws[1] != a.K || ws[2] != Q8_NR) return 1;
    return run_linear(&a);
}

/* Linear: (x (..., K), w (N, K)[, b (N,)]) -> x @ w^T [+ b] (..., N); w in the [out, in] layout. */
int Linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
    (void)dtypes; (void)stream; (void)extra;
    return linear(nparam, params, ndims, shapes, EPI_NONE);
}

/* LinearGelu: gelu(x @ w^T + b). */
int LinearGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
               void *extra) {
    (void)dtypes; (void)stream; (void)extra;
    return linear(nparam, params, ndims, shapes, EPI_GELU);
}

/* LinearAdd: (x, w, b, r (..., N)) -> x @ w^T + b + r: a projection and its residual connection. */
int LinearAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
              void *extra) {
    (void)dtypes; (void)stream; (void)extra;
    return linear(nparam, params, ndims, shapes, EPI_ADD);
}

/* LinearQ8: (x (..., K), wq (P, K, 16) int8, s (N,)[, b (N,)]) -> x @ (q * s)^T [+ b] (..., N); LinearQ8Gelu and
 * LinearQ8Add (with b, and r (..., N)) as LinearGelu and LinearAdd. */
int LinearQ8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
             void *extra) {
    (void)stream; (void)extra;
    return linear_q8(nparam, params, ndims, shapes, dtypes, EPI_NONE);
}

int LinearQ8Gelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                 void *extra) {
    (void)stream; (void)extra;
    return linear_q8(nparam, params, ndims, shapes, dtypes, EPI_GELU);
}

int LinearQ8Add(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                void *extra) {
    (void)stream; (void)extra;
    return linear_q8(nparam, params, ndims, shapes, dtypes, EPI_ADD);
}

/* ---- layer norm fused into the projection that follows it --------------------------------------------------- */

/* y = (x - mean) / sqrt(var + eps) * g + b over one row of K (a multiple of VW): each sum one vector chain in k
 * order then vsum, so a row's result does not depend on the call it is in. */
static void layer_norm_row(const float *x, const float *g, const float *b, float eps, int64_t K, float *y) {
    vec s = vzero();
    for (int64_t k = 0; k < K; k += VW) s = vadd(s, vload(x + k));
    const vec mean = vset1(vsum(s) / (float)K);
    vec q = vzero();
    for (int64_t k = 0; k < K; k += VW) {
        const vec d = vsub(vload(x + k), mean);
        q = vfma(d, d, q);
    }
    const vec rstd = vset1(1.f / sqrtf(vsum(q) / (float)K + eps));
    for (int64_t k = 0; k < K; k += VW)
        vstore(y + k, vfma(vmul(vsub(vload(x + k), mean), rstd), vload(g + k), vload(b + k)));
}

typedef struct {
    const float *x, *g, *b;
    float *y;
    float eps;
    int64_t M, K;
} ln_args;

static void ln_task(void *p, int tid, int nt) {
    const ln_args *a = p;
    int64_t lo, hi;
    split(a->M, tid, nt, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) layer_norm_row(a->x + i * a->K, a->g, a->b, a->eps, a->K, a->y + i * a->K);
}

/* y = layer_norm of M rows of K (LnLinear's and Block's). */
static void layer_norm_rows(const float *x, const float *g, const float *b, float eps, int64_t M, int64_t K,
                            float *y) {
    ln_args a = {x, g, b, y, eps, M, K};
    if (M <= MR) ln_task(&a, 0, 1); /* decode: not worth waking the workers */
    else run_parallel(ln_task, &a);
}

/* (x, g, b, eps (1,), <Linear's weight and bias inputs, or LinearQ8's where q8>, y): Linear of layer_norm(x); one
 * op instead of two. */
static int ln_linear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int epi,
                     int q8) {
    if (nparam < 6) return 1;
    const int64_t M = rows_of(ndims[0], shapes[0]), K = shapes[0][ndims[0] - 1];
    if (K % VW || ndims[1] != 1 || shapes[1][0] != K || ndims[2] != 1 || shapes[2][0] != K) return 1;
    static __thread float *nbuf;
    static __thread size_t ncap;
    if (!grow(&nbuf, &ncap, (size_t)(M * K))) return 1;
    layer_norm_rows(params[0], params[1], params[2], ((const float *)params[3])[0], M, K, nbuf);
    void *p2[16];
    int nd2[16];
    int64_t *sh2[16];
    const char *dt2[16];
    if (nparam - 3 > 16) return 1;
    p2[0] = nbuf, nd2[0] = ndims[0], sh2[0] = shapes[0], dt2[0] = dtypes ? dtypes[0] : NULL;
    for (int i = 4; i < nparam; i++)
        p2[i - 3] = params[i], nd2[i - 3] = ndims[i], sh2[i - 3] = shapes[i], dt2[i - 3] = dtypes ? dtypes[i] : NULL;
    return q8 ? linear_q8(nparam - 3, p2, nd2, sh2, dtypes ? dt2 : NULL, epi) : linear(nparam - 3, p2, nd2, sh2, epi);
}

/* LnLinear: (x, g, b, eps, w ...) -> layer_norm(x) @ w^T [+ bias]; LnLinearGelu: gelu of it (with the bias). */
int LnLinear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
             void *extra) {
    (void)stream; (void)extra;
    return ln_linear(nparam, params, ndims, shapes, dtypes, EPI_NONE, 0);
}

int LnLinearGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                 void *extra) {
    (void)stream; (void)extra;
    return ln_linear(nparam, params, ndims, shapes, dtypes, EPI_GELU, 0);
}

/* LnLinearQ8: (x, g, b, eps, wq, s[, bias]) -> layer_norm(x) @ (q * s)^T [+ bias]; LnLinearQ8Gelu: gelu of it. */
int LnLinearQ8(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
               void *extra) {
    (void)stream; (void)extra;
    return ln_linear(nparam, params, ndims, shapes, dtypes, EPI_NONE, 1);
}

int LnLinearQ8Gelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                   void *extra) {
    (void)stream; (void)extra;
    return ln_linear(nparam, params, ndims, shapes, dtypes, EPI_GELU, 1);
}

/* ---- attention over the KV cache -------------------------------------------------------------------------- */

typedef struct {
    const float *qkv;
    float *kc, *vc, *y;
    const int32_t *write_base, *read_base, *pos;
    int64_t B, T, D, hs, nh, L;
    int per_token; /* read_base has one entry per token (packed sequences), not one per row */
    float scale;
    _Atomic int failed;
    _Atomic int64_t next;
} attn_args;

static void write_task(void *p, int tid, int nt) {
    attn_args *a = p;
    int64_t lo, hi;
    split(a->B * a->T, tid, nt, &lo, &hi);
    for (int64_t bt = lo; bt < hi; bt++) {
        const float *k = a->qkv + bt * 3 * a->D + a->D, *v = k + a->D;
        for (int64_t h = 0; h < a->nh; h++) {
            const int64_t row = (int64_t)a->write_base[bt] + h * a->L;
            memcpy(a->kc + row * a->hs, k + h * a->hs, sizeof(float) * (size_t)a->hs);
            memcpy(a->vc + row * a->hs, v + h * a->hs, sizeof(float) * (size_t)a->hs);
        }
    }
}

#define GROUP_HS 64 /* the head size of the paths below that keep a head's vectors in registers: every GPT-2's */

/* Attention of one (token, head) over n cached keys: scores s_j = (q . k_j) scale, each dot product one FMA chain
 * over the head's vectors then vsum; p = exp(s - max) with vexp, summed in key order; y = sum_j (p_j / sum) v_j as
 * one FMA chain per output vector in key order. attend_group below computes four tokens at once with exactly these
 * operations, so a token's output does not depend on whether its chunk let it join a group. HS: the head size, a
 * constant where the compiler should keep q and y in registers (GPT-2's 64). */
static inline __attribute__((always_inline)) void attend_one(const int64_t HS, const float *q, const float *k0,
                                                             const float *v0, int64_t n, float scale, float *pr,
                                                             float *y) {
    enum { MAXV = 16 };
    const int64_t nv = HS / VW;
    vec qv[MAXV], yv[MAXV];
    for (int64_t c = 0; c < nv; c++) qv[c] = vload(q + c * VW);
    int64_t j = 0;
#if VW == 16 || VW == 8
    if (HS == GROUP_HS) /* four keys' dot products reduced together: a quarter of the shuffles, the same sums */
        for (; j + 4 <= n; j += 4) {
            vec acc[4];
            for (int u = 0; u < 4; u++) {
                const float *k = k0 + (j + u) * HS;
                acc[u] = vmul(qv[0], vload(k));
                for (int64_t c = 1; c < nv; c++) acc[u] = vfma(qv[c], vload(k + c * VW), acc[u]);
            }
            _mm_storeu_ps(pr + j, _mm_mul_ps(vsum4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale)));
        }
#endif
    for (; j < n; j++) {
        const float *k = k0 + j * HS;
        vec acc = vmul(qv[0], vload(k));
        for (int64_t c = 1; c < nv; c++) acc = vfma(qv[c], vload(k + c * VW), acc);
        pr[j] = vsum(acc) * scale;
    }
    float mx = -FLT_MAX;
    for (j = 0; j < n; j++) mx = pr[j] > mx ? pr[j] : mx;
    for (j = 0; j < n; j++) pr[j] = pr[j] - mx;
    exp_inplace(pr, n);
    float sum = 0.f;
    for (j = 0; j < n; j++) sum += pr[j];
    const float inv = 1.f / sum;
    for (int64_t c = 0; c < nv; c++) yv[c] = vzero();
    for (j = 0; j < n; j++) {
        const vec pj = vset1(pr[j] * inv);
        const float *v = v0 + j * HS;
        for (int64_t c = 0; c < nv; c++) yv[c] = vfma(pj, vload(v + c * VW), yv[c]);
    }
    for (int64_t c = 0; c < nv; c++) vstore(y + c * VW, yv[c]);
}

#if VW == 16 || VW == 8
/* Prompt tokens attend in groups of four: a sequence's tokens at positions 4g .. 4g+3, adjacent in the step and
 * all in it, share every key and value load. Each computes exactly what attend_one computes for it: the keys past
 * a token's own position get a score of -FLT_MAX, an exp of exactly 0, and add exact zeros to its sums. */
static int group_leader(const attn_args *a, int64_t bt) {
    const int32_t p = a->pos[bt];
    if (p < 0 || p % 4 != 0 || a->hs != GROUP_HS) return 0;
    const int64_t end = a->per_token ? a->B * a->T : (bt / a->T + 1) * a->T; /* the end of bt's row */
    if (bt + 3 >= end || (int64_t)p + 4 > a->L) return 0;
    for (int u = 1; u < 4; u++)
        if (a->pos[bt + u] != p + u || (a->per_token && a->read_base[bt + u] != a->read_base[bt])) return 0;
    return 1;
}

/* Whether token bt belongs to a group that another item computes. */
static int in_group(const attn_args *a, int64_t bt) {
    const int32_t p = a->pos[bt];
    const int64_t r = p > 0 ? p % 4 : 0;
    const int64_t start = a->per_token ? 0 : bt / a->T * a->T;
    return r > 0 && bt - r >= start && group_leader(a, bt - r);
}

/* The group's softmax over pr (query u's score of key j at 4j+u; the first query sees n0 keys, the last n0 + 3),
 * each query's as attend_one's: the max, exp(s - max), the sum in key order, then p / sum. */
static void group_softmax(float *pr, int64_t n0) {
    const int64_t n = n0 + 3;
    for (int u = 0; u < 3; u++) /* keys past a query's own position */
        for (int64_t j = n0 + u; j < n; j++) pr[4 * j + u] = -FLT_MAX;
    __m128 mx = _mm_set1_ps(-FLT_MAX);
    for (int64_t j = 0; j < n; j++) mx = _mm_max_ps(mx, _mm_loadu_ps(pr + 4 * j));
    for (int64_t j = 0; j < n; j++) _mm_storeu_ps(pr + 4 * j, _mm_sub_ps(_mm_loadu_ps(pr + 4 * j), mx));
    exp_inplace(pr, 4 * n);
    __m128 sum = _mm_setzero_ps();
    for (int64_t j = 0; j < n; j++) sum = _mm_add_ps(sum, _mm_loadu_ps(pr + 4 * j));
    const __m128 inv = _mm_div_ps(_mm_set1_ps(1.f), sum);
    for (int64_t j = 0; j < n; j++) _mm_storeu_ps(pr + 4 * j, _mm_mul_ps(_mm_loadu_ps(pr + 4 * j), inv));
}

/* Head h of tokens bt .. bt+3 (a group_leader's group); pr holds 4 * L floats (plus a vector), query u's score of
 * key j at 4j+u. */
static void attend_group(const attn_args *a, int64_t bt, int64_t h, const float *k0, const float *v0, float *pr) {
    enum { NV = GROUP_HS / VW };
    const int64_t D = a->D, n0 = (int64_t)a->pos[bt] + 1, n = n0 + 3;
    const float *qp[4];
    for (int u = 0; u < 4; u++) qp[u] = a->qkv + (bt + u) * 3 * D + h * GROUP_HS;
    const __m128 scale = _mm_set1_ps(a->scale);
#if VW == 16
    vec q[4][NV]; /* AVX-512: the four queries in 16 of the 32 registers */
    for (int u = 0; u < 4; u++)
        for (int c = 0; c < NV; c++) q[u][c] = vload(qp[u] + c * VW);
#endif
    for (int64_t j = 0; j < n; j++) {
        const float *k = k0 + j * GROUP_HS;
        vec kv[NV], acc[4];
        for (int c = 0; c < NV; c++) kv[c] = vload(k + c * VW);
        for (int u = 0; u < 4; u++) {
#if VW == 16
            acc[u] = vmul(q[u][0], kv[0]);
            for (int c = 1; c < NV; c++) acc[u] = vfma(q[u][c], kv[c], acc[u]);
#else /* AVX2's 16 registers hold the key: the queries are read from L1 */
            acc[u] = vmul(vload(qp[u]), kv[0]);
            for (int c = 1; c < NV; c++) acc[u] = vfma(vload(qp[u] + c * VW), kv[c], acc[u]);
#endif
        }
        _mm_storeu_ps(pr + 4 * j, _mm_mul_ps(vsum4(acc[0], acc[1], acc[2], acc[3]), scale));
    }
    group_softmax(pr, n0);
    /* y_u = sum_j p_uj v_j, NY output vectors of the four queries at a time (as many accumulators as registers
     * allow), each one FMA chain in key order */
    enum { NY = VW == 16 ? NV : 2 };
    for (int c0 = 0; c0 < NV; c0 += NY) {
        vec y[4][NY];
        for (int u = 0; u < 4; u++)
            for (int c = 0; c < NY; c++) y[u][c] = vzero();
        for (int64_t j = 0; j < n; j++) {
            const float *v = v0 + j * GROUP_HS + c0 * VW;
            vec vv[NY];
            for (int c = 0; c < NY; c++) vv[c] = vload(v + c * VW);
            for (int u = 0; u < 4; u++) {
                const vec pj = vset1(pr[4 * j + u]);
                for (int c = 0; c < NY; c++) y[u][c] = vfma(pj, vv[c], y[u][c]);
            }
        }
        for (int u = 0; u < 4; u++)
            for (int c = 0; c < NY; c++) vstore(a->y + (bt + u) * D + h * GROUP_HS + (c0 + c) * VW, y[u][c]);
    }
}
#endif

static void attend_task(void *p, int tid, int nt) {
    (void)tid; (void)nt;
    attn_args *a = p;
    const int64_t hs = a->hs, D = a->D, L = a->L, n_items = a->B * a->T * a->nh;
    /* the scores, in a buffer each thread keeps (a malloc per call and thread was one per layer and step) */
    static __thread float *pbuf;
    static __thread size_t pcap;
    float *pr = grow(&pbuf, &pcap, 4 * (size_t)L + VW);
    if (!pr) {
        atomic_store(&a->failed, 1);
        return;
    }
    for (;;) {
        /* Items (token, head) handed out one at a time (sequences differ in length), head by head: the tokens of
         * a prompt then read the same head's keys and values while they are in cache. */
        const int64_t i = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (i >= n_items) break;
        const int64_t h = i / (a->B * a->T), bt = i % (a->B * a->T), b = a->per_token ? bt : bt / a->T;
        float *y = a->y + bt * D + h * hs;
        const int64_t n = (int64_t)a->pos[bt] + 1;
        if (n <= 0 || n > L) {
            memset(y, 0, sizeof(float) * (size_t)hs);
            continue;
        }
        const float *k0 = a->kc + ((int64_t)a->read_base[b] + h * L) * hs;
        const float *v0 = a->vc + ((int64_t)a->read_base[b] + h * L) * hs;
#if VW == 16 || VW == 8
        if (group_leader(a, bt)) {
            attend_group(a, bt, h, k0, v0, pr);
            continue;
        }
        if (in_group(a, bt)) continue;
#endif
        const float *q = a->qkv + bt * 3 * D + h * hs;
        if (hs == 64) attend_one(64, q, k0, v0, n, a->scale, pr, y); /* every GPT-2 size's head */
        else attend_one(hs, q, k0, v0, n, a->scale, pr, y);
    }
}

/* CachedAttention's work (and Block's): this step's rows written, then every token attends. */
static int cached_attention(attn_args *a) {
    atomic_store(&a->next, 0);
    atomic_store(&a->failed, 0);
    if (a->nh * a->hs != a->D || a->hs % VW || a->hs > 16 * VW) return 1;
    /* decode's few rows: copied on this thread rather than waking the workers for them */
    if (a->B * a->T <= MR) write_task(a, 0, 1);
    else run_parallel(write_task, a);
    run_parallel(attend_task, a);
    return atomic_load(&a->failed);
}

/*
 * CachedAttention: write this step's keys and values into the cache, then attend, reading the cache in place.
 * Inputs: qkv (B, T, 3*D) (c_attn's output); k_cache, v_cache (rows, hs), written in place; write_base (B, T)
 * int32: cache row of (slot, head 0, this token's position), scratch rows for padding; read_base (B,) int32: row of
 * (slot, head 0, position 0), or (B*T,) one per token, for rows that pack several sequences one after the other;
 * positions (B, T) int32, -1 = padding; meta (2,) int32 [max_seq_len, n_head];
 * scale (1,) float32. Output: y (B, T, D). Row of (slot, head h, position j) = read_base + h * max_seq_len + j;
 * a token at position p attends to positions 0..p of its slot. Padding tokens get zeros.
 */
int CachedAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                    void *extra) {
    (void)nparam; (void)dtypes; (void)stream; (void)extra; (void)ndims;
    const int32_t *meta = params[6];
    attn_args a = {.qkv = params[0], .kc = params[1], .vc = params[2], .write_base = params[3],
                   .read_base = params[4], .pos = params[5], .scale = ((const float *)params[7])[0],
                   .y = params[8], .B = shapes[0][0], .T = shapes[0][1], .D = shapes[0][2] / 3,
                   .hs = shapes[1][1], .L = meta[0], .nh = meta[1],
                   .per_token = shapes[4][0] == shapes[0][0] * shapes[0][1] && shapes[0][1] > 1};
    return cached_attention(&a);
}

/* ---- a transformer block in one op -------------------------------------------------------------------------
 * Block: a GPT-2 layer's whole step in one call, the five ops the step would otherwise call (LnLinear: ln_1 and
 * c_attn; CachedAttention; LinearAdd: attn.c_proj and the residual; LnLinearGelu: ln_2 and c_fc; LinearAdd:
 * mlp.c_proj and the residual) done here by the same functions, so with the same bits. Each op costs MindSpore's
 * dispatch and the bookkeeping of its output; measured on GPT-2 124M (2 Zen 3 cores), a batch-1 decode token
 * 0.2-0.5 ms faster (of ~8 int8, ~14 float32) and a 256-token prefill ~3%.
 *
 * Inputs, in the layer's order:
 *   x (B, T, D); ln_1's g (D,), b (D,), eps (1,); attn.c_attn's W, bias (3D,);
 *   k_cache, v_cache, write_base, read_base, positions, meta, scale: CachedAttention's, in its order;
 *   attn.c_proj's W, bias (D,); ln_2's g, b, eps; mlp.c_fc's W, bias (F,); mlp.c_proj's W, bias (D,).
 * Each W is one tensor (22 inputs): w (N, K) float32 (packed per call), or alone its panels (P, K, NR) float32
 * (pack_panels) or its AMX packing (2, Np / 16, K / 2, 16) int32 (pack_weight_amx), by its ndim; or two tensors
 * (26 inputs): int8 panels (P, K, 16) and scales (N,), the Q8 ops' form. Output: y (B, T, D), x's shape.
 * The intermediates (c_attn's and c_fc's outputs, the normed rows, attention's output, the residual stream between
 * the halves) live in the calling thread's buffer. */

/* A projection's weight at params[*at] (of Block's forms) and its bias, for N outputs of K inputs, into a: the checks
 * Linear and LinearQ8 make of theirs; *at moves past them. 1 if they do not fit. */
static int block_weight(linear_args *a, int q8, void **params, const int *ndims, int64_t **shapes,
                        const char **dtypes, int *at, int64_t K, int64_t N) {
    int i = *at;
    const int64_t *ws = shapes[i];
    if (q8) {
        if (ndims[i] != 3 || (dtypes && strcmp(dtypes[i], "int8") != 0) || ndims[i + 1] != 1 ||
            shapes[i + 1][0] != N || ws[0] != (N + Q8_NR - 1) / Q8_NR || ws[1] != K || ws[2] != Q8_NR)
            return 1;
        a->q8 = params[i];
        a->scale = params[i + 1];
        i += 2;
    } else if (dtypes && strcmp(dtypes[i], "int8") == 0) {
        return 1;
    } else if (ndims[i] == 2) {
        if (ws[0] != N || ws[1] != K) return 1;
        a->w = params[i++];
    } else if (ndims[i] == 3) {
        if (ws[0] != (N + NR - 1) / NR || ws[1] != K || ws[2] != NR) return 1;
        a->panels = params[i++];
    } else if (ndims[i] == 4) {
        if (ws[0] != 2 || ws[1] * 16 != (N + 31) / 32 * 32 || ws[2] * 2 != K || ws[3] != 16) return 1;
        if (!AmxAvailable() || K % 32) return 1; /* the session packs for AMX only where it is available */
        a->wp = params[i++];
    } else {
        return 1;
    }
    if (ndims[i] != 1 || shapes[i][0] != N) return 1;
    a->b = params[i++];
    a->K = K;
    a->N = N;
    *at = i;
    return 0;
}

static int is_vector(const int *ndims, int64_t **shapes, int i, int64_t n) {
    return ndims[i] == 1 && shapes[i][0] == n;
}

int Block(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
    (void)stream; (void)extra;
    const int q8 = nparam == 27, nw = q8 ? 2 : 1; /* tensors per weight */
    if ((nparam != 23 && !q8) || ndims[0] != 3) return 1;
    const int64_t B = shapes[0][0], T = shapes[0][1], D = shapes[0][2], M = B * T;
    /* where ln_1, the attention's inputs, ln_2 and c_fc start */
    const int ln1 = 1, att = 5 + nw, ln2 = att + 8 + nw, fc = ln2 + 3;
    if (ndims[fc + nw] != 1) return 1;
    const int64_t F = shapes[fc + nw][0]; /* c_fc's bias: the MLP's width */
    if (!is_vector(ndims, shapes, ln1, D) || !is_vector(ndims, shapes, ln1 + 1, D) ||
        !is_vector(ndims, shapes, ln2, D) || !is_vector(ndims, shapes, ln2 + 1, D) || D % VW || F % VW ||
        ndims[att] != 2)
        return 1;
    /* A pass padded to its bucket (fixed-shape graphs: a library built without the C++ shape functions) ends in
     * padding tokens (position -1): they are not computed (their outputs are zeros), so a pass costs its real
     * tokens. Every kernel gives a row the same bits whatever the row count. */
    const int32_t *pos = params[att + 4];
    int64_t Mr = M;
    if (B == 1 || T == 1)
        while (Mr > 0 && pos[Mr - 1] < 0) Mr--;
    float *y = params[nparam - 1];
    if (Mr < M) memset(y + Mr * D, 0, sizeof(float) * (size_t)((M - Mr) * D));
    if (Mr == 0) return 0;
    linear_args c_attn = {.M = Mr, .epi = EPI_NONE}, c_proj = {.M = Mr, .epi = EPI_ADD};
    linear_args c_fc = {.M = Mr, .epi = EPI_GELU}, mlp_proj = {.M = Mr, .epi = EPI_ADD};
    int at = 4;
    if (block_weight(&c_attn, q8, params, ndims, shapes, dtypes, &at, D, 3 * D)) return 1;
    at += 7; /* the attention's inputs */
    if (block_weight(&c_proj, q8, params, ndims, shapes, dtypes, &at, D, D)) return 1;
    at += 3; /* ln_2 */
    if (block_weight(&c_fc, q8, params, ndims, shapes, dtypes, &at, D, F) ||
        block_weight(&mlp_proj, q8, params, ndims, shapes, dtypes, &at, F, D) || at != nparam - 1)
        return 1;

    /* wide: c_attn's output, then c_fc's; narrow: ln_1(x), attention's output, then ln_2(x2); x2: x after the
     * attention half. One buffer, grown before anything points into it. */
    static __thread float *buf;
    static __thread size_t cap;
    const int64_t wn = F > 3 * D ? F : 3 * D;
    float *wide = grow(&buf, &cap, (size_t)(Mr * (wn + 2 * D)));
    if (!wide) return 1;
    float *narrow = wide + Mr * wn, *x2 = narrow + Mr * D;
    const float *x = params[0];
    const int32_t *meta = params[att + 5];
    attn_args a = {.qkv = wide, .kc = params[att], .vc = params[att + 1], .write_base = params[att + 2],
                   .read_base = params[att + 3], .pos = pos, .scale = ((const float *)params[att + 6])[0],
                   .y = narrow, .B = T == 1 ? Mr : B, .T = T == 1 ? 1 : B == 1 ? Mr : T, .D = D, .hs = shapes[att][1],
                   .L = meta[0], .nh = meta[1], .per_token = shapes[att + 3][0] == M && T > 1};

    layer_norm_rows(x, params[ln1], params[ln1 + 1], ((const float *)params[ln1 + 2])[0], Mr, D, narrow);
    c_attn.x = narrow, c_attn.y = wide;
    if (run_linear(&c_attn) || cached_attention(&a)) return 1;
    c_proj.x = narrow, c_proj.r = x, c_proj.y = x2;
    if (run_linear(&c_proj)) return 1;
    layer_norm_rows(x2, params[ln2], params[ln2 + 1], ((const float *)params[ln2 + 2])[0], Mr, D, narrow);
    c_fc.x = narrow, c_fc.y = wide;
    if (run_linear(&c_fc)) return 1;
    mlp_proj.x = wide, mlp_proj.r = x2, mlp_proj.y = y;
    return run_linear(&mlp_proj);
}

/* ---- prefix caching: a slot's first rows copied into another slot ------------------------------------------
 * CopySlotRows: (cache (rows, hs), meta (5,) int32 [src_base, dst_base, n, n_head, max_seq_len]) -> y (1,) = 0;
 * copies positions [0, n) of every head from the slot whose row of (head 0, position 0) is src_base to the one at
 * dst_base, in place (as CachedAttention writes). K and V of a position depend only on the tokens up to it, so a
 * prompt that starts with another sequence's first n tokens can take their rows instead of computing them. */
typedef struct {
    float *c;
    const int32_t *meta;
    int64_t hs;
} copy_args;

static void copy_task(void *p, int tid, int nt) {
    const copy_args *a = p;
    const int64_t src = a->meta[0], dst = a->meta[1], n = a->meta[2], L = a->meta[4];
    int64_t lo, hi;
    split(a->meta[3], tid, nt, &lo, &hi);
    for (int64_t h = lo; h < hi; h++)
        memcpy(a->c + (dst + h * L) * a->hs, a->c + (src + h * L) * a->hs, sizeof(float) * (size_t)(n * a->hs));
}

int CopySlotRows(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                 void *extra) {
    (void)dtypes; (void)stream; (void)extra;
    if (nparam != 3 || ndims[0] != 2 || ndims[1] != 1 || shapes[1][0] != 5) return 1;
    const int32_t *m = params[1];
    const int64_t rows = shapes[0][0];
    if (m[2] < 0 || m[2] > m[4] || m[0] < 0 || m[1] < 0 || m[0] + (int64_t)m[3] * m[4] > rows ||
        m[1] + (int64_t)m[3] * m[4] > rows)
        return 1;
    copy_args a = {params[0], m, shapes[0][1]};
    if (m[0] != m[1] && m[2] > 0) run_parallel(copy_task, &a);
    ((float *)params[2])[0] = 0.f;
    return 0;
}
