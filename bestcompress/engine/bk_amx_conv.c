/* The int8 matrix-unit convolution (x86 AMX) for a ±1-weight Conv2d of an NCHW input of at most 8 bit planes.
 *
 * An implicit GEMM: the input is quantized once into a zero-bordered NHWC byte image (q = x * 2^(7 - hi), every
 * value checked as in bk_quantize8), and a tile of 16 output pixels of one output row at tap (i, j) and channel
 * chunk cc is a plain strided tile load from that image (row stride: stride_w * channels), so no im2col copy is
 * made. The weights stay one bit each; each call expands one block of 32 output channels at a time into 0/1 tiles
 * (bk_amx_expand). Per output: acc = sum_k q * w+, then 2 * acc - patch sum of q, times 2^(hi - 7), alpha, bias,
 * folded BatchNorm in bk_finish's order, written to NCHW through a 16 x 16 register transpose of the sums.
 * Handled: groups of 16 output columns (Wo a multiple of 16); anything else returns 0 for the popcount route.
 */
#include "bk.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11
#include <immintrin.h>

#include "bk_amx.h"

/* a 16 x 16 block of 32-bit lanes transposed in registers (r[i] lane j -> r[j] lane i) */
TAMX static inline void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int j = 0; j < 8; j++) {
        a[2 * j] = _mm512_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
        a[2 * j + 1] = _mm512_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
    }
    for (int j = 0; j < 4; j++) {
        b[4 * j] = _mm512_unpacklo_epi64(a[4 * j], a[4 * j + 2]);
        b[4 * j + 1] = _mm512_unpackhi_epi64(a[4 * j], a[4 * j + 2]);
        b[4 * j + 2] = _mm512_unpacklo_epi64(a[4 * j + 1], a[4 * j + 3]);
        b[4 * j + 3] = _mm512_unpackhi_epi64(a[4 * j + 1], a[4 * j + 3]);
    }
    /* b[4j + e], 128-bit lane l: column 4l + e of rows 4j .. 4j + 3 */
    for (int e = 0; e < 4; e++) {
        __m512i c0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x88), c1 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xDD);
        __m512i c2 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x88);
        __m512i c3 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xDD);
        r[e] = _mm512_shuffle_i32x4(c0, c2, 0x88);
        r[4 + e] = _mm512_shuffle_i32x4(c1, c3, 0x88);
        r[8 + e] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
        r[12 + e] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
    }
}

/* x [N][C][HW] -> img [N][Hp][Wp][Cp] bytes at the border offset (ph, pw), the rest left as it is (zero): 16
 * channels x 16 pixels per step, transposed in registers. Returns the OR of all q, -1 when some q is not an integer
 * in [0, 255]. */
TAMX static int quantize_nhwc(const float *x, ptrdiff_t N, ptrdiff_t C, const bk_conv *c, ptrdiff_t Cp, int hi,
                              uint8_t *img) {
    const ptrdiff_t H = c->H, W = c->W, HW = H * W, Hp = H + 2 * c->ph, Wp = W + 2 * c->pw;
    const __m512 sc = _mm512_set1_ps(ldexpf(1.0f, 7 - hi));
    __m512i ors = _mm512_setzero_si512();
    __mmask16 bad = 0;
    for (ptrdiff_t n = 0; n < N; n++)
        for (ptrdiff_t p0 = 0; p0 < HW; p0 += 16) {
            const ptrdiff_t np = HW - p0 < 16 ? HW - p0 : 16;
            const __mmask16 mk = np == 16 ? (__mmask16)0xffff : (__mmask16)((1u << np) - 1u);
            for (ptrdiff_t c0 = 0; c0 < C; c0 += 16) {
                __m512i v[16];
                for (int i = 0; i < 16; i++) {
                    if (c0 + i >= C) { v[i] = _mm512_setzero_si512(); continue; }
                    __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + (n * C + c0 + i) * HW + p0), sc);
                    v[i] = _mm512_cvttps_epi32(p);
                    bad |= _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(v[i]), p, _CMP_NEQ_UQ);
                    ors = _mm512_or_si512(ors, v[i]);
                }
                transpose16(v); /* v[j]: the 16 channels of pixel p0 + j */
                for (ptrdiff_t j = 0; j < np; j++) {
                    const ptrdiff_t p = p0 + j, y = p / W, xx = p % W;
                    uint8_t *dst = img + ((n * Hp + y + c->ph) * Wp + xx + c->pw) * Cp + c0;
                    _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(v[j]));
                }
            }
        }
    int all = _mm512_reduce_or_epi32(ors);
    return bad || (all & ~0xff) ? -1 : all;
}

/* the outputs of a block of 32 output pixels (m0..) x 32 channels (n0..) from its sums [32][32] */
TAMX static void epilogue_nchw(const gemm_args *g, const int32_t *cbuf, const int64_t *rowsum, ptrdiff_t m0,
                               ptrdiff_t n0, ptrdiff_t M, ptrdiff_t HWo, ptrdiff_t cout) {
    const __m512 sc = _mm512_set1_ps(g->scale);
    const int bn = g->bn;
    for (int gi = 0; gi < 2; gi++) {
        const ptrdiff_t m = m0 + 16 * gi;
        if (m >= M) return;
        const ptrdiff_t img = m / HWo, pix = m % HWo; /* 16 pixels of one image, contiguous in NCHW */
        const __m512i rs = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(
                               _mm512_loadu_si512((const void *)(rowsum + m)))),
                           _mm512_cvtepi64_epi32(_mm512_loadu_si512((const void *)(rowsum + m + 8))), 1);
        for (int h = 0; h < 2; h++) {
            const ptrdiff_t ch0 = n0 + 16 * h;
            if (ch0 >= cout) break;
            __m512i v[16];
            for (int r = 0; r < 16; r++) v[r] = _mm512_load_si512((const void *)(cbuf + (16 * gi + r) * 32 + 16 * h));
            transpose16(v); /* v[t]: channel ch0 + t at the 16 pixels */
            for (int t = 0; t < 16 && ch0 + t < cout; t++) {
                const ptrdiff_t ch = ch0 + t;
                __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(v[t], v[t]), rs)), sc);
                if (g->alpha) f = _mm512_mul_ps(f, _mm512_set1_ps(g->alpha[ch]));
                if (g->bias) f = _mm512_add_ps(f, _mm512_set1_ps(g->bias[ch]));
                if (bn == 1) f = _mm512_fmadd_ps(f, _mm512_set1_ps(g->bp[0][ch]), _mm512_set1_ps(g->bp[1][ch]));
                else if (bn == 2)
                    f = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(f, _mm512_set1_ps(g->bp[0][ch])),
                                                                  _mm512_set1_ps(g->bp[1][ch])),
                                                    _mm512_set1_ps(g->bp[2][ch])),
                                      _mm512_set1_ps(g->bp[3][ch]));
                _mm512_storeu_ps(g->out + (img * cout + ch) * HWo + pix, f);
            }
        }
    }
}

TAMX int bk_amx_conv(const float *x, ptrdiff_t C, const bk_conv *c, const uint64_t *wrows, ptrdiff_t cout,
                     gemm_args *g, int *P, int *lsb) {
    const ptrdiff_t N = c->N, H = c->H, W = c->W, Cw = c->Cw, Cp = 64 * Cw, kh = c->kh, kw = c->kw;
    const ptrdiff_t Ho = c->Ho, Wo = c->Wo, HWo = Ho * Wo, M = N * HWo, Kw = kh * kw * Cw;
    if (Wo % 16 || M == 0 || !bk_amx_available()) return 0;
    const uint32_t mx = bk_max_bits(x, N * C * H * W);
    const int e = (int)(mx >> 23), hi = e - 127;
    if ((mx >> 31) || e == 0 || e == 0xff || hi < -80 || hi > 23) return 0; /* zero, negative, inf/nan: popcounts */
    const ptrdiff_t Hp = H + 2 * c->ph, Wp = W + 2 * c->pw, npix = N * Hp * Wp;
    uint8_t *img = bk_scratch(6, (size_t)(npix * Cp));
    int32_t *psum = bk_scratch(7, (size_t)npix * sizeof(int32_t));
    int64_t *rowsum = bk_scratch(1, (size_t)(M + 16) * sizeof(int64_t));
    uint8_t *wt = bk_scratch(3, (size_t)(2 * Kw * 1024));
    if (!img || !psum || !rowsum || !wt) return 0;
    memset(img, 0, (size_t)(npix * Cp));
    const int ors = quantize_nhwc(x, N, C, c, Cp, hi, img);
    if (ors <= 0) return 0;
    *lsb = hi - 7 + __builtin_ctz((unsigned)ors);
    *P = (31 - __builtin_clz((unsigned)ors)) - __builtin_ctz((unsigned)ors) + 1;
    /* per padded pixel the sum of its bytes, then per output pixel the sum over its taps */
    for (ptrdiff_t p = 0; p < npix; p++) {
        __m512i t = _mm512_setzero_si512();
        for (ptrdiff_t k = 0; k < Cp; k += 64)
            t = _mm512_add_epi64(t, _mm512_sad_epu8(_mm512_loadu_si512((const void *)(img + p * Cp + k)),
                                                    _mm512_setzero_si512()));
        psum[p] = (int32_t)_mm512_reduce_add_epi64(t);
    }
    for (ptrdiff_t n = 0; n < N; n++)
        for (ptrdiff_t y = 0; y < Ho; y++) {
            int64_t *rs = rowsum + (n * Ho + y) * Wo;
            for (ptrdiff_t xo = 0; xo < Wo; xo++) rs[xo] = 0;
            for (ptrdiff_t i = 0; i < kh; i++)
                for (ptrdiff_t j = 0; j < kw; j++) {
                    const int32_t *ps = psum + (n * Hp + y * c->sh + i * c->dh) * Wp + j * c->dw;
                    for (ptrdiff_t xo = 0; xo < Wo; xo++) rs[xo] += ps[xo * c->sw];
                }
        }
    memset(rowsum + M, 0, 16 * sizeof(int64_t));
    g->scale = ldexpf(1.0f, hi - 7);
    const ptrdiff_t nblk = (cout + 31) / 32 * 2, astride = c->sw * Cp;
    bk_amx_tiles();
    int32_t cbuf[32 * 32] __attribute__((aligned(64)));
    for (ptrdiff_t nb = 0; nb < nblk; nb += 2) {
        bk_amx_expand(wrows, 1, Kw, cout, Kw, nb, 2, wt);
        const uint8_t *b0 = wt, *b1 = wt + Kw * 1024;
        for (ptrdiff_t m0 = 0; m0 < M; m0 += 32) {
            const uint8_t *a[2];
            for (int gi = 0; gi < 2; gi++) { /* the first tap of 16 output pixels (the last block may have one) */
                const ptrdiff_t m = m0 + 16 * gi < M ? m0 + 16 * gi : m0;
                const ptrdiff_t n = m / HWo, y = (m % HWo) / Wo, xo = m % Wo;
                a[gi] = img + ((n * Hp + y * c->sh) * Wp + xo * c->sw) * Cp;
            }
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (ptrdiff_t i = 0; i < kh; i++)
                for (ptrdiff_t j = 0; j < kw; j++) {
                    const ptrdiff_t off = (i * c->dh * Wp + j * c->dw) * Cp;
                    for (ptrdiff_t cc = 0; cc < Cw; cc++) {
                        const ptrdiff_t kc = (i * kw + j) * Cw + cc;
                        bk_amx_step(a[0] + off + 64 * cc, a[1] + off + 64 * cc, astride, b0 + 1024 * kc,
                                    b1 + 1024 * kc);
                    }
                }
            _tile_stored(0, cbuf, 128);
            _tile_stored(1, cbuf + 16, 128);
            _tile_stored(2, cbuf + 16 * 32, 128);
            _tile_stored(3, cbuf + 16 * 32 + 16, 128);
            epilogue_nchw(g, cbuf, rowsum, m0, nb * 16, M, HWo, cout);
        }
    }
    _tile_release();
    return 1;
}

#else
int bk_amx_conv(const float *x, ptrdiff_t C, const bk_conv *c, const uint64_t *wrows, ptrdiff_t cout,
                gemm_args *g, int *P, int *lsb) {
    (void)x; (void)C; (void)c; (void)wrows; (void)cout; (void)g; (void)P; (void)lsb;
    return 0;
}
#endif
