/*
 * Force-included (gcc -include) before model/kernels/cpu_kernels.c by tests/test_kernels_cross.py's "avx512"
 * build on a machine without AVX-512: the kernels' AVX-512 branches, compiled for this CPU, with each 512-bit
 * intrinsic computed by SIMDe (SIMD Everywhere, Debian's libsimde-dev), or by the definitions below where SIMDe 0.7.4
 * has none or a wrong one. The test then adds `#define _mm512_x simde_mm512_x` for every 512-bit name the kernel
 * source uses.
 *
 * What this checks: the AVX-512 code's logic (layouts, loops, tails, masks, which lanes go where) against numpy and
 * bit for bit against the other builds. What it cannot: speed, and instruction-level faults (alignment, an
 * instruction the real CPU lacks), which only a machine with AVX-512 shows (there the "native" build is AVX-512).
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <math.h>
#include <string.h>
#include <simde/x86/avx512.h>

#define __AVX512F__ 1
#define __AVX512BW__ 1
#if defined(GPT2_EMULATE_NO_VNNI) /* the "avx512bw" build: AVX-512 without VNNI (Skylake-SP) */
#undef __AVX512VNNI__
#else
#define __AVX512VNNI__ 1
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
