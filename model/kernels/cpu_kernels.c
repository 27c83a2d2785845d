/*
 * CPU kernels for the inference step, called from compiled MindSpore graphs as AOT Custom ops
 * (model/kernels/__init__.py says why they exist and how they are built and chosen).
 *
 * Every exported function has MindSpore's AOT signature: params holds the inputs, then the outputs; shapes and
 * ndims describe them. Tensors are float32 or int32, contiguous, row-major.
 *
 * Results do not depend on the number of rows in a call or on the thread count: each output element is computed
 * by the same sequence of operations whatever the batch, so a request's logits are the same alone or in a batch.
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

#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec vset1(float v) { return _mm512_set1_ps(v); }
static inline void vstore(float *p, vec a) { _mm512_storeu_ps(p, a); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VW 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vec vset1(float v) { return _mm256_set1_ps(v); }
static inline void vstore(float *p, vec a) { _mm256_storeu_ps(p, a); }
#else
#define VW 4
typedef struct { float v[4]; } vec;
static inline vec vzero(void) { vec r = {{0, 0, 0, 0}}; return r; }
static inline vec vload(const float *p) { vec r = {{p[0], p[1], p[2], p[3]}}; return r; }
static inline vec vfma(vec a, vec b, vec c) {
    for (int i = 0; i < 4; i++) c.v[i] += a.v[i] * b.v[i];
    return c;
}
static inline float vsum(vec a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
static inline vec vset1(float v) { vec r = {{v, v, v, v}}; return r; }
static inline void vstore(float *p, vec a) { memcpy(p, a.v, sizeof a.v); }
#endif

/* ---- thread pool ------------------------------------------------------------------------------------------ */

#define MAX_THREADS 64
typedef void (*task_fn)(void *arg, int tid, int nthreads);

static int pool_n = 0;                 /* threads including the caller; 0 = not started */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static _Atomic uint32_t pool_gen = 0;  /* bumped to start a task; workers futex-wait on it */
static _Atomic int pool_pending = 0;   /* workers still running the current task */
static task_fn pool_fn;
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
        while ((g = atomic_load_explicit(&pool_gen, memory_order_acquire)) == seen && now_s() < until) {
#if defined(__x86_64__)
            __builtin_ia32_pause();
#endif
        }
        while ((g = atomic_load_explicit(&pool_gen, memory_order_acquire)) == seen)
            syscall(SYS_futex, &pool_gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
        seen = g;
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
    pool_arg = arg;
    atomic_store(&pool_pending, pool_n - 1);
    atomic_fetch_add_explicit(&pool_gen, 1, memory_order_release);
    syscall(SYS_futex, &pool_gen, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
    fn(arg, 0, pool_n);
    while (atomic_load_explicit(&pool_pending, memory_order_acquire) > 0) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
    }
    pthread_mutex_unlock(&pool_lock);
}

/* [lo, hi) of n items for thread tid of nt: contiguous, so each thread streams its own part of the weights. */
static void split(int64_t n, int tid, int nt, int64_t *lo, int64_t *hi) {
    *lo = n * tid / nt;
    *hi = n * (tid + 1) / nt;
}

static int64_t rows_of(int nd, const int64_t *shape) {
    int64_t m = 1;
    for (int i = 0; i < nd - 1; i++) m *= shape[i];
    return m;
}

/* ---- linear ----------------------------------------------------------------------------------------------- */

enum { EPI_NONE = 0, EPI_GELU = 1, EPI_ADD = 2 };

typedef struct {
    const float *x, *w, *b, *r;
    float *y;
    int64_t M, K, N;
    int epi;
} linear_args;

/* GPT-2's GELU (tanh form) as x * sigmoid(2z), the form model/gpt2.py uses. */
static inline float gelu(float v) { return v / (1.f + expf(-1.5957691216057308f * (v + 0.044715f * v * v * v))); }

static inline void store(const linear_args *a, int64_t m, int64_t n, float acc) {
    float v = a->b ? acc + a->b[n] : acc;
    if (a->epi == EPI_GELU) v = gelu(v);
    else if (a->epi == EPI_ADD) v += a->r[m * a->N + n];
    a->y[m * a->N + n] = v;
}

/* Blocks of 4 weight rows x 4 input rows keep 16 accumulators in registers, so each weight row is read from
 * memory once per call whatever the number of input rows (decode is bound by reading the weights). */
static void linear_task(void *p, int tid, int nt) {
    const linear_args *a = p;
    const int64_t K = a->K, M = a->M, N = a->N;
    int64_t lo, hi;
    split((N + 3) / 4, tid, nt, &lo, &hi);
    for (int64_t nb = lo; nb < hi; nb++) {
        const int64_t n0 = nb * 4, nn = N - n0 < 4 ? N - n0 : 4;
        const float *wr[4];
        for (int j = 0; j < 4; j++) wr[j] = a->w + (n0 + (j < nn ? j : 0)) * K;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            vec acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = vzero();
            const float *xr = a->x + m * K;
            for (int64_t k = 0; k < K; k += VW) {
                vec wv[4], xv[4];
                for (int j = 0; j < 4; j++) wv[j] = vload(wr[j] + k);
                for (int i = 0; i < 4; i++) xv[i] = vload(xr + i * K + k);
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++) acc[i][j] = vfma(xv[i], wv[j], acc[i][j]);
            }
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < nn; j++) store(a, m + i, n0 + j, vsum(acc[i][j]));
        }
        for (; m < M; m++) {
            vec acc[4];
            for (int j = 0; j < 4; j++) acc[j] = vzero();
            const float *xr = a->x + m * K;
            for (int64_t k = 0; k < K; k += VW) {
                vec xv = vload(xr + k);
                for (int j = 0; j < 4; j++) acc[j] = vfma(xv, vload(wr[j] + k), acc[j]);
            }
            for (int j = 0; j < nn; j++) store(a, m, n0 + j, vsum(acc[j]));
        }
    }
}

static int linear(int nparam, void **params, int *ndims, int64_t **shapes, int epi) {
    /* Linear may come without a bias (x, w, y): the tied LM head. */
    const int has_bias = !(epi == EPI_NONE && nparam == 3);
    linear_args a = {params[0], params[1], has_bias ? params[2] : NULL, epi == EPI_ADD ? params[3] : NULL,
                     params[nparam - 1], rows_of(ndims[0], shapes[0]), shapes[0][ndims[0] - 1], shapes[1][0], epi};
    if (a.K % VW || shapes[1][1] != a.K) return 1;
    run_parallel(linear_task, &a);
    return 0;
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

/* ---- attention over the KV cache -------------------------------------------------------------------------- */

typedef struct {
    const float *qkv;
    float *kc, *vc, *y;
    const int32_t *write_base, *read_base, *pos;
    int64_t B, T, D, hs, nh, L;
    float scale;
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

static void attend_task(void *p, int tid, int nt) {
    (void)tid; (void)nt;
    attn_args *a = p;
    const int64_t hs = a->hs, D = a->D, L = a->L, n_items = a->B * a->T * a->nh;
    float *pr = malloc(sizeof(float) * (size_t)L);
    for (;;) {
        /* Items (token, head) handed out one at a time: sequences differ in length. */
        const int64_t i = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (i >= n_items) break;
        const int64_t bt = i / a->nh, h = i % a->nh, b = bt / a->T;
        const float *q = a->qkv + bt * 3 * D + h * hs;
        float *y = a->y + bt * D + h * hs;
        const int64_t n = (int64_t)a->pos[bt] + 1;
        if (n <= 0 || n > L) {
            memset(y, 0, sizeof(float) * (size_t)hs);
            continue;
        }
        const float *k0 = a->kc + ((int64_t)a->read_base[b] + h * L) * hs;
        const float *v0 = a->vc + ((int64_t)a->read_base[b] + h * L) * hs;
        if (hs == 4 * VW) {
            /* GPT-2's head size (64 floats with AVX-512): q and the output stay in registers. */
            const vec q0 = vload(q), q1 = vload(q + VW), q2 = vload(q + 2 * VW), q3 = vload(q + 3 * VW);
            float mx = -FLT_MAX;
            for (int64_t j = 0; j < n; j++) {
                const float *k = k0 + j * hs;
                vec acc = vfma(q0, vload(k), vzero());
                acc = vfma(q1, vload(k + VW), acc);
                acc = vfma(q2, vload(k + 2 * VW), acc);
                acc = vfma(q3, vload(k + 3 * VW), acc);
                pr[j] = vsum(acc) * a->scale;
                mx = pr[j] > mx ? pr[j] : mx;
            }
            float sum = 0.f;
            for (int64_t j = 0; j < n; j++) {
                pr[j] = expf(pr[j] - mx);
                sum += pr[j];
            }
            const float inv = 1.f / sum;
            vec y0 = vzero(), y1 = vzero(), y2 = vzero(), y3 = vzero();
            for (int64_t j = 0; j < n; j++) {
                const vec pj = vset1(pr[j] * inv);
                const float *v = v0 + j * hs;
                y0 = vfma(pj, vload(v), y0);
                y1 = vfma(pj, vload(v + VW), y1);
                y2 = vfma(pj, vload(v + 2 * VW), y2);
                y3 = vfma(pj, vload(v + 3 * VW), y3);
            }
            vstore(y, y0);
            vstore(y + VW, y1);
            vstore(y + 2 * VW, y2);
            vstore(y + 3 * VW, y3);
            continue;
        }
        float mx = -FLT_MAX;
        for (int64_t j = 0; j < n; j++) {
            vec acc = vzero();
            for (int64_t c = 0; c < hs; c += VW) acc = vfma(vload(q + c), vload(k0 + j * hs + c), acc);
            pr[j] = vsum(acc) * a->scale;
            if (pr[j] > mx) mx = pr[j];
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n; j++) {
            pr[j] = expf(pr[j] - mx);
            sum += pr[j];
        }
        const float inv = 1.f / sum;
        for (int64_t c = 0; c < hs; c++) y[c] = 0.f;
        for (int64_t j = 0; j < n; j++) {
            const float pj = pr[j] * inv, *vj = v0 + j * hs;
            for (int64_t c = 0; c < hs; c++) y[c] += pj * vj[c];
        }
    }
    free(pr);
}

/*
 * CachedAttention: write this step's keys and values into the cache, then attend, reading the cache in place.
 * Inputs: qkv (B, T, 3*D) (c_attn's output); k_cache, v_cache (rows, hs), written in place; write_base (B, T)
 * int32: cache row of (slot, head 0, this token's position), scratch rows for padding; read_base (B,) int32: row of
 * (slot, head 0, position 0); positions (B, T) int32, -1 = padding; meta (2,) int32 [max_seq_len, n_head];
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
                   .hs = shapes[1][1], .L = meta[0], .nh = meta[1]};
    atomic_store(&a.next, 0);
    if (a.nh * a.hs != a.D || a.hs % VW) return 1;
    run_parallel(write_task, &a);
    run_parallel(attend_task, &a);
    return 0;
}
