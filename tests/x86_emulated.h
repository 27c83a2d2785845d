/*
 * Force-included (gcc -include) before model/kernels/cpu_kernels.c by tests/test_kernels_cross.py's "avx512" and
 * "avx512bw" builds: the kernels' AVX-512 branches (and, in "avx512", the AMX-int8 one), compiled for this CPU,
 * each 512-bit intrinsic computed by SIMDe (SIMD Everywhere, Debian's libsimde-dev), or by the definitions below
 * where SIMDe 0.7.4 has none or a wrong one, and the AMX tiles by the emulator below (Intel's definitions of the
 * instructions; the int8 products are exact, so it computes what the hardware does, bit for bit). The test then adds
 * `#define _mm512_x simde_mm512_x` for every 512-bit name the kernel source uses.
 *
 * What this checks: the code's logic (layouts, loops, tails, masks, which lanes go where, tile shapes) against numpy
 * and bit for bit against the other builds. What it cannot: speed, and instruction-level faults (alignment, an
 * instruction the real CPU lacks), which only a machine with AVX-512 or AMX shows (there "native" is that build).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <math.h>
#include <string.h>
#include <simde/x86/avx512.h>

#define __AVX512F__ 1
#define __AVX512BW__ 1
#if defined(GPT2_EMULATE_NO_VNNI) /* the "avx512bw" build: AVX-512 without VNNI or AMX (Skylake-SP) */
#undef __AVX512VNNI__
#undef __AMX_TILE__
#undef __AMX_INT8__
#else /* "avx512": Sapphire Rapids' VNNI and AMX-int8 (not AMX-bf16: its bf16 rounding is not emulated here) */
#define __AVX512VNNI__ 1
#define __AMX_TILE__ 1
#define __AMX_INT8__ 1
#undef __AMX_BF16__
#define GPT2_EMULATED_AMX 1 /* cpu_kernels.c: nothing to ask Linux for */
#endif

/* Intrinsics SIMDe 0.7.4 (Debian 12) lacks, written from Intel's definitions. */

/* vpermilps with an immediate: each 128-bit lane's four floats picked by imm's 2-bit fields. */
static inline simde__m512 simde_mm512_permute_ps(simde__m512 a, int imm) {
    simde__m512_private r, x = simde__m512_to_private(a);
    for (int i = 0; i < 16; i++) r.f32[i] = x.f32[(i & ~3) + ((imm >> (2 * (i & 3))) & 3)];
    return simde__m512_from_private(r);
}

/* vcvtps2dq: the current rounding mode (MXCSR); NaN and out-of-range values give INT32_MIN ("integer
 * indefinite"). */
static inline simde__m512i simde_mm512_cvtps_epi32(simde__m512 a) {
    simde__m512_private x = simde__m512_to_private(a);
    simde__m512i_private r;
    for (int i = 0; i < 16; i++) {
        const float v = nearbyintf(x.f32[i]);
        r.i32[i] = (v >= -2147483648.f && v < 2147483648.f) ? (int32_t)v : INT32_MIN;
    }
    return simde__m512i_from_private(r);
}

/* vgatherdps with a mask: lanes whose mask bit is set load base + idx * scale bytes, the others keep src. */
static inline simde__m512 simde_mm512_mask_i32gather_ps(simde__m512 src, simde__mmask16 k, simde__m512i idx,
                                                        const void *base, int scale) {
    simde__m512_private r = simde__m512_to_private(src);
    simde__m512i_private ix = simde__m512i_to_private(idx);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) memcpy(&r.f32[i], (const char *)base + (int64_t)ix.i32[i] * scale, sizeof(float));
    return simde__m512_from_private(r);
}

/* vrndscaleps: SIMDe 0.7.4's returns its input unchanged for imm 0x09 (round down, no exceptions), which exp's range
 * reduction uses. imm[7:4] fraction bits kept, imm[1:0] the rounding (imm[2]: the current mode instead). */
#undef simde_mm512_roundscale_ps
static inline simde__m512 simde_mm512_roundscale_ps(simde__m512 a, int imm) {
    simde__m512_private r, x = simde__m512_to_private(a);
    const float up = ldexpf(1.f, (imm >> 4) & 15), down = 1.f / up;
    for (int i = 0; i < 16; i++) {
        const float v = x.f32[i] * up;
        const float q = imm & 4 ? nearbyintf(v)
                        : (imm & 3) == 0 ? roundevenf(v)
                        : (imm & 3) == 1 ? floorf(v)
                        : (imm & 3) == 2 ? ceilf(v)
                                         : truncf(v);
        r.f32[i] = isfinite(v) ? q * down : x.f32[i];
    }
    return simde__m512_from_private(r);
}

#if defined(GPT2_EMULATED_AMX)
/* The AMX tile unit, per thread as on the hardware: 8 tiles of up to 16 rows x 64 bytes, shaped by the last
 * LDTILECFG (palette 1: colsb[16] at byte 16, rows[16] at byte 48). A product whose shapes the hardware would refuse
 * (#UD) aborts. */
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
static __thread uint8_t emu_tile[8][16][64];
static __thread uint16_t emu_colsb[8];
static __thread uint8_t emu_rows[8];
static __thread int emu_configured; /* tile instructions without a configuration: #UD on the hardware */
static _Atomic long emu_products;   /* tile products computed, printed at exit with GPT2_EMULATED_AMX_COUNT=1 */

static void emu_report(void) { fprintf(stderr, "emulated tile products: %ld\n", (long)emu_products); }

__attribute__((constructor)) static void emu_report_at_exit(void) {
    if (getenv("GPT2_EMULATED_AMX_COUNT")) atexit(emu_report);
}

static void emu_check_configured(void) {
    if (!emu_configured) {
        fprintf(stderr, "x86_emulated.h: a tile instruction without a tile configuration\n");
        abort();
    }
}

static inline void emu_tile_loadconfig(const void *config) {
    const uint8_t *c = config;
    memcpy(emu_colsb, c + 16, sizeof emu_colsb);
    memcpy(emu_rows, c + 48, sizeof emu_rows);
    memset(emu_tile, 0, sizeof emu_tile);
    emu_configured = 1;
    for (int t = 0; t < 8; t++)
        if (c[0] != 1 || emu_rows[t] > 16 || emu_colsb[t] > 64) {
            fprintf(stderr, "x86_emulated.h: tile config not valid\n");
            abort();
        }
}

static inline void emu_tile_release(void) {
    emu_configured = 0;
    memset(emu_colsb, 0, sizeof emu_colsb);
    memset(emu_rows, 0, sizeof emu_rows);
}

static inline void emu_tile_loadd(int t, const void *base, long stride) {
    emu_check_configured();
    for (int r = 0; r < emu_rows[t]; r++) memcpy(emu_tile[t][r], (const char *)base + r * stride, emu_colsb[t]);
}

static inline void emu_tile_stored(int t, void *base, long stride) {
    emu_check_configured();
    for (int r = 0; r < emu_rows[t]; r++) memcpy((char *)base + r * stride, emu_tile[t][r], emu_colsb[t]);
}

static inline void emu_tile_zero(int t) {
    emu_check_configured();
    memset(emu_tile[t], 0, sizeof emu_tile[t]);
}

/* TDPB{S,U}{S,U}D: d's int32 [m][n] += the four products a.byte[m][4k + i] * b.byte[k][4n + i] for every k, each
 * operand signed or unsigned as the instruction says, the adds wrapping. */
static inline void emu_tile_dp(int d, int a, int b, int a_signed, int b_signed) {
    emu_check_configured();
    emu_products++;
    if (emu_rows[d] != emu_rows[a] || emu_colsb[d] != emu_colsb[b] || emu_rows[b] * 4 != emu_colsb[a] ||
        emu_colsb[d] % 4) {
        fprintf(stderr, "x86_emulated.h: tile shapes do not agree\n");
        abort();
    }
    for (int m = 0; m < emu_rows[d]; m++)
        for (int n = 0; n < emu_colsb[d] / 4; n++) {
            uint32_t acc;
            memcpy(&acc, &emu_tile[d][m][4 * n], 4);
            for (int k = 0; k < emu_colsb[a] / 4; k++)
                for (int i = 0; i < 4; i++) {
                    const uint8_t x = emu_tile[a][m][4 * k + i], y = emu_tile[b][k][4 * n + i];
                    acc += (uint32_t)((a_signed ? (int32_t)(int8_t)x : (int32_t)x) *
                                      (b_signed ? (int32_t)(int8_t)y : (int32_t)y));
                }
            memcpy(&emu_tile[d][m][4 * n], &acc, 4);
        }
}

#undef _tile_loadconfig
#undef _tile_release
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#undef _tile_dpbusd
#define _tile_loadconfig(config) emu_tile_loadconfig(config)
#define _tile_release() emu_tile_release()
#define _tile_loadd(t, base, stride) emu_tile_loadd(t, base, stride)
#define _tile_stored(t, base, stride) emu_tile_stored(t, base, stride)
#define _tile_zero(t) emu_tile_zero(t)
#define _tile_dpbssd(d, a, b) emu_tile_dp(d, a, b, 1, 1)
#define _tile_dpbusd(d, a, b) emu_tile_dp(d, a, b, 0, 1)
#endif
