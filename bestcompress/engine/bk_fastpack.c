/* One-pass packers of the engine's common inputs (bk_pack.c has the general analyze + pack route):
 *   bk_gather_rows       a transposed view's floats into rows (16 x 16 register transposes)
 *   bk_quantize8         inputs of at most 8 planes as bytes q8 = x * 2^(7 - hi), checked in the same read
 *   bk_pack_bytes        bit planes cut from those bytes (VPTESTMB: 64 bits per instruction)
 *   bk_pack_nchw_spikes  {0, 1} spikes of an NCHW tensor packed along C, value check in the same pass
 * The byte route (bk_quantize8, bk_pack_bytes) is compiled with target attributes and picked at run time (AVX-512
 * F + BW); the gather and the NCHW packer take their AVX-512 paths when the build targets such a CPU
 * (-march=native). Without them: the plain gather and "not handled" answers that send the caller to bk_analyze +
 * bk_pack.
 */
#include "bk.h"

#include <math.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 8))
#include <immintrin.h>
#define BK_Q8 1 /* the byte route: target attributes, picked at run time */
#define TQ8 __attribute__((target("avx512f,avx512bw")))
#endif

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512CD__) && defined(__AVX512BW__)
#include <immintrin.h>
#define BC_AVX512 1
#endif

/* ---------------------------------------------------------------------------------- transposed views */

#if defined(BC_AVX512)
/* a 16 x 16 block of floats transposed in registers: 32-bit and 64-bit interleaves, then two 128-bit lane
 * shuffles (64 shuffles for 256 values; the bits are moved, never computed on) */
static inline void transpose16(const float *src, ptrdiff_t sstride, float *dst, ptrdiff_t dstride) {
    __m512 r[16], a[16], b[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * sstride);
    for (int j = 0; j < 8; j++) {
        a[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
        a[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
    }
    for (int j = 0; j < 4; j++) { /* b[4j + e], lane l: column 4l + e of rows 4j .. 4j + 3 */
        b[4 * j] = _mm512_shuffle_ps(a[4 * j], a[4 * j + 2], 0x44);
        b[4 * j + 1] = _mm512_shuffle_ps(a[4 * j], a[4 * j + 2], 0xEE);
        b[4 * j + 2] = _mm512_shuffle_ps(a[4 * j + 1], a[4 * j + 3], 0x44);
        b[4 * j + 3] = _mm512_shuffle_ps(a[4 * j + 1], a[4 * j + 3], 0xEE);
    }
    for (int e = 0; e < 4; e++) {
        __m512 c0 = _mm512_shuffle_f32x4(b[e], b[4 + e], 0x88), c1 = _mm512_shuffle_f32x4(b[e], b[4 + e], 0xDD);
        __m512 c2 = _mm512_shuffle_f32x4(b[8 + e], b[12 + e], 0x88), c3 = _mm512_shuffle_f32x4(b[8 + e], b[12 + e], 0xDD);
        _mm512_storeu_ps(dst + e * dstride, _mm512_shuffle_f32x4(c0, c2, 0x88));
        _mm512_storeu_ps(dst + (4 + e) * dstride, _mm512_shuffle_f32x4(c1, c3, 0x88));
        _mm512_storeu_ps(dst + (8 + e) * dstride, _mm512_shuffle_f32x4(c0, c2, 0xDD));
        _mm512_storeu_ps(dst + (12 + e) * dstride, _mm512_shuffle_f32x4(c1, c3, 0xDD));
    }
}
#endif

void bk_gather_rows(const float *x, ptrdiff_t outer, ptrdiff_t K, ptrdiff_t inner, float *dst) {
    for (ptrdiff_t o = 0; o < outer; o++) {
        const float *xo = x + o * K * inner;
        float *d = dst + o * inner * K;
        for (ptrdiff_t i0 = 0; i0 < inner; i0 += 16)     /* 16 x 16 blocks: both sides stay in cache */
            for (ptrdiff_t k0 = 0; k0 < K; k0 += 16) {
                ptrdiff_t i1 = i0 + 16 < inner ? i0 + 16 : inner, k1 = k0 + 16 < K ? k0 + 16 : K;
#if defined(BC_AVX512)
                if (i1 - i0 == 16 && k1 - k0 == 16) {
                    transpose16(xo + k0 * inner + i0, inner, d + i0 * K + k0, K);
                    continue;
                }
#endif
                for (ptrdiff_t i = i0; i < i1; i++)
                    for (ptrdiff_t k = k0; k < k1; k++) d[i * K + k] = xo[k * inner + i];
            }
    }
}

/* ----------------------------------------------------------------------------------- byte-quantized packing */

/* The one-pass route for inputs of at most 8 planes (the residual stream of spike sums): q8 = x * 2^(7 - hi) as
 * bytes (hi: the top plane, from bk_max_bits; x < 2^(hi + 1), so q8 < 256 when it is an integer), checked and
 * converted in one read of x; the planes are then cut from the bytes (VPTESTMB: 64 bits per instruction), so
 * analyze + pack's two passes over the floats become one over the floats and one over a quarter of the bytes.
 * The same quantizer feeds the int8 matrix units (bk_amx.c), which also take its per-row sums of q8. */
#if defined(BK_Q8)
/* 16 values of x (masked past K) times the power of two sc, truncated to int32; *bad collects the lanes where the
 * product was not an integer */
TQ8 static inline __m512i q8_lanes(const float *x, ptrdiff_t left, __m512 sc, __mmask16 *bad) {
    __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (left > 0 ? (__mmask16)((1u << left) - 1u) : 0);
    __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x), sc);
    __m512i v = _mm512_cvttps_epi32(p);
    *bad |= _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(v), p, _CMP_NEQ_UQ);
    return v;
}

/* the same for 64 values inside the row: plain loads, one mask for the four checks */
TQ8 static inline void q8_full(const float *x, __m512 sc, __m512i v[4], __mmask16 *bad) {
    __m512 p[4];
    for (int i = 0; i < 4; i++) {
        p[i] = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * i), sc);
        v[i] = _mm512_cvttps_epi32(p[i]);
    }
    __mmask16 b01 = _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(v[0]), p[0], _CMP_NEQ_UQ) |
                    _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(v[1]), p[1], _CMP_NEQ_UQ);
    __mmask16 b23 = _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(v[2]), p[2], _CMP_NEQ_UQ) |
                    _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(v[3]), p[3], _CMP_NEQ_UQ);
    *bad |= b01 | b23;
}

/* 64 values per step: four vectors of int32 packed to bytes with two saturating packs and one dword permute
 * (the OR of the int32 values catches anything outside [0, 255] that saturation would hide), row sums of the bytes
 * with VPSADBW */
TQ8 static int quantize8_512(const float *x, ptrdiff_t rows, ptrdiff_t K, ptrdiff_t kpad, int hi, uint8_t *q,
                             int64_t *rowsum) {
    const __m512 sc = _mm512_set1_ps(ldexpf(1.0f, 7 - hi)); /* a power of two: x * sc is exact */
    /* after the two packs, lane l holds dwords v0[4l..], v1[4l..], v2[4l..], v3[4l..]: put them back in order */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m512i ors = _mm512_setzero_si512();
    __mmask16 bad = 0;
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *xr = x + r * K;
        uint8_t *qr = q + r * kpad;
        __m512i tot = _mm512_setzero_si512();
        for (ptrdiff_t k = 0; k < kpad; k += 64) {
            __m512i v0, v1, v2, v3;
            if (k + 64 <= K) {
                __m512i v[4];
                q8_full(xr + k, sc, v, &bad);
                v0 = v[0]; v1 = v[1]; v2 = v[2]; v3 = v[3];
            } else {
                v0 = q8_lanes(xr + k, K - k, sc, &bad);
                v1 = q8_lanes(xr + k + 16, K - k - 16, sc, &bad);
                v2 = q8_lanes(xr + k + 32, K - k - 32, sc, &bad);
                v3 = q8_lanes(xr + k + 48, K - k - 48, sc, &bad);
            }
            ors = _mm512_or_si512(ors, _mm512_or_si512(_mm512_or_si512(v0, v1), _mm512_or_si512(v2, v3)));
            __m512i b = _mm512_packus_epi16(_mm512_packus_epi32(v0, v1), _mm512_packus_epi32(v2, v3));
            b = _mm512_permutexvar_epi32(order, b);
            _mm512_storeu_si512((void *)(qr + k), b);
            tot = _mm512_add_epi64(tot, _mm512_sad_epu8(b, _mm512_setzero_si512()));
        }
        if (rowsum) rowsum[r] = _mm512_reduce_add_epi64(tot);
    }
    int all = _mm512_reduce_or_epi32(ors);
    if (bad || (all & ~0xff)) return -1;
    return all;
}
#endif

int bk_quantize8(const float *x, ptrdiff_t rows, ptrdiff_t K, ptrdiff_t kpad, int hi, uint8_t *q, int64_t *rowsum) {
#if defined(BK_Q8)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        return quantize8_512(x, rows, K, kpad, hi, q, rowsum);
#endif
    (void)x; (void)rows; (void)K; (void)kpad; (void)hi; (void)q; (void)rowsum;
    return -2;
}

/* only called after bk_quantize8 succeeded, so the CPU has AVX-512 F + BW */
#if defined(BK_Q8)
TQ8 void bk_pack_bytes(const uint8_t *q, ptrdiff_t rows, ptrdiff_t Kw, int low, int P, uint64_t *out,
                       int64_t *rowsum, uint32_t *amask) {
    const ptrdiff_t plane = rows * Kw;
    for (ptrdiff_t r = 0; r < rows; r++) {
        const uint8_t *qr = q + r * Kw * 64;
        __m512i tot = _mm512_setzero_si512();
        uint64_t any[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (ptrdiff_t w = 0; w < Kw; w++) {
            __m512i v = _mm512_loadu_si512((const void *)(qr + 64 * w));
            tot = _mm512_add_epi64(tot, _mm512_sad_epu8(v, _mm512_setzero_si512()));
            for (int p = 0; p < P; p++) {
                uint64_t m = _mm512_test_epi8_mask(v, _mm512_set1_epi8((char)(1u << (low + p))));
                out[p * plane + r * Kw + w] = m;
                any[p] |= m;
            }
        }
        uint32_t used = 0;
        for (int p = 0; p < P; p++) used |= (uint32_t)(any[p] != 0) << p;
        rowsum[r] = _mm512_reduce_add_epi64(tot) >> low; /* every q8 is a multiple of 2^low */
        amask[r] = used;
    }
}
#else
void bk_pack_bytes(const uint8_t *q, ptrdiff_t rows, ptrdiff_t Kw, int low, int P, uint64_t *out, int64_t *rowsum,
                   uint32_t *amask) {
    (void)q; (void)rows; (void)Kw; (void)low; (void)P; (void)out; (void)rowsum; (void)amask;
}
#endif

/* -------------------------------------------------------------------------------------- NCHW spikes */

/* {0, 1} spikes of an NCHW tensor packed along C ([N*HW, Cw] words, per-pixel sums) in one pass that also checks
 * the values: 1 when done, 0 (and nothing to use) when some value is neither 0 nor 1. Sixteen pixels at a time:
 * each channel's 16 values give a 16-bit mask that sets bit c of the 16 pixel words held in two registers. */
int bk_pack_nchw_spikes(const float *x, ptrdiff_t N, ptrdiff_t C, ptrdiff_t HW, ptrdiff_t Cw, uint64_t *out,
                        int64_t *rowsum) {
#if defined(BC_AVX512)
    const __m512 z = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    uint64_t words[16];
    for (ptrdiff_t n = 0; n < N; n++)
        for (ptrdiff_t p0 = 0; p0 < HW; p0 += 16) {
            const ptrdiff_t np = HW - p0 < 16 ? HW - p0 : 16;
            const __mmask16 mk = np == 16 ? (__mmask16)0xffff : (__mmask16)((1u << np) - 1u);
            __m512i rs_lo = _mm512_setzero_si512(), rs_hi = _mm512_setzero_si512();
            for (ptrdiff_t cw = 0; cw < Cw; cw++) {
                __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
                const ptrdiff_t c1 = 64 * cw + 64 < C ? 64 * cw + 64 : C;
                __mmask16 odd = 0;
                for (ptrdiff_t c = 64 * cw; c < c1; c++) {
                    __m512 v = _mm512_maskz_loadu_ps(mk, x + (n * C + c) * HW + p0);
                    __mmask16 m = _mm512_cmp_ps_mask(v, z, _CMP_NEQ_UQ);
                    odd |= m & _mm512_cmp_ps_mask(v, one, _CMP_NEQ_UQ);
                    const __m512i bit = _mm512_set1_epi64((long long)(1ull << (c & 63)));
                    lo = _mm512_mask_or_epi64(lo, (__mmask8)m, lo, bit);
                    hi = _mm512_mask_or_epi64(hi, (__mmask8)(m >> 8), hi, bit);
                }
                if (odd) return 0;
                rs_lo = _mm512_add_epi64(rs_lo, _mm512_popcnt_epi64(lo));
                rs_hi = _mm512_add_epi64(rs_hi, _mm512_popcnt_epi64(hi));
                _mm512_storeu_si512((void *)words, lo);
                _mm512_storeu_si512((void *)(words + 8), hi);
                uint64_t *dst = out + (n * HW + p0) * Cw + cw;
                for (ptrdiff_t j = 0; j < np; j++) dst[j * Cw] = words[j];
            }
            _mm512_mask_storeu_epi64(rowsum + n * HW + p0, (__mmask8)mk, rs_lo);
            _mm512_mask_storeu_epi64(rowsum + n * HW + p0 + 8, (__mmask8)(mk >> 8), rs_hi);
        }
    return 1;
#else
    (void)x; (void)N; (void)C; (void)HW; (void)Cw; (void)out; (void)rowsum;
    return 0;
#endif
}

