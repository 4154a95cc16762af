/* Packing of the engine's operands: values x = q * 2^lsb (q a P-bit integer) as P bit planes of 64-bit words
 * (plane p holds bit p of q; spikes are one plane with lsb = 0), and the bit im2col of convolutions.
 *
 *   bk_analyze(x, n, &lsb)        -> P, or -1 when x holds a negative, non-finite or subnormal value or needs
 *                                    more than 24 planes
 *   bk_pack(x, rows, K, Kw, ...)  planes [P, rows, Kw], rowsum[r] = sum of q over the row, amask[r] = the planes
 *                                 with a set bit in row r
 *   bk_pack_nchw                  planes [P, N*HW, Cw] read straight from an NCHW tensor
 *   bk_im2col, bk_im2col_cols     bit im2col into rows [P, N*Ho*Wo, Kw] or columns [P, N, Kw, Npad]
 *   bk_transpose                  [B, rows, Kw] -> [B, Kw, Npad] (the B operand layout)
 * AVX-512 paths are compiled in when the build targets a CPU that has them (-march=native); the portable loops
 * compute the same words.
 */
#include "bk.h"

#include <math.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512CD__)
#include <immintrin.h>
#define BC_AVX512 1
#endif

/* ------------------------------------------------------------------------------------------------ analyze */

/* the exact reference: every value's exponent and lowest set mantissa bit */
static int analyze_exact(const uint32_t *u, ptrdiff_t n, int *lsb) {
    int lo = 1 << 20, hi = -(1 << 20);
    *lsb = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        uint32_t v = u[i];
        if ((v & 0x7fffffffu) == 0) continue;          /* +0 and -0 */
        uint32_t e = (v >> 23) & 0xffu;
        if ((v >> 31) || e == 0 || e == 0xffu) return -1;  /* negative, subnormal, inf/nan */
        uint32_t m = (v & 0x7fffffu) | 0x800000u;
        int l = (int)e - 150 + __builtin_ctz(m);
        int h = (int)e - 127;
        if (l < lo) lo = l;
        if (h > hi) hi = h;
    }
    if (hi < lo) return 1;       /* all zero: one empty plane */
    int planes = hi - lo + 1;
    if (planes > MAX_PLANES) return -1;
    *lsb = lo;
    return planes;
}

uint32_t bk_max_bits(const float *x, ptrdiff_t n) {
    const uint32_t *u = (const uint32_t *)x;
    ptrdiff_t i = 0;
    uint32_t mx = 0;
#if defined(BC_AVX512)
    __m512i v0 = _mm512_setzero_si512(), v1 = _mm512_setzero_si512();
    for (; i + 32 <= n; i += 32) {
        v0 = _mm512_max_epu32(v0, _mm512_loadu_si512((const void *)(u + i)));
        v1 = _mm512_max_epu32(v1, _mm512_loadu_si512((const void *)(u + i + 16)));
    }
    mx = _mm512_reduce_max_epu32(_mm512_max_epu32(v0, v1));
#endif
    for (; i < n; i++) mx = u[i] > mx ? u[i] : mx;
    return mx;
}

int bk_pack_spikes(const float *x, ptrdiff_t rows, ptrdiff_t K, ptrdiff_t Kw, uint64_t *out, int64_t *rowsum,
                   uint32_t *amask) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *xr = x + r * K;
        int64_t total = 0;
        for (ptrdiff_t w = 0; w < Kw; w++) {
            ptrdiff_t k0 = w * 64, k1 = k0 + 64 < K ? k0 + 64 : K;
            uint64_t word = 0;
#if defined(BC_AVX512)
            if (k1 - k0 == 64) {
                uint64_t zero_or_one = 0;
                const __m512 z = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
                for (int c = 0; c < 4; c++) {
                    __m512 v = _mm512_loadu_ps(xr + k0 + 16 * c);
                    word |= (uint64_t)_mm512_cmp_ps_mask(v, z, _CMP_NEQ_UQ) << (16 * c);
                    zero_or_one |= (uint64_t)(_mm512_cmp_ps_mask(v, z, _CMP_EQ_OQ) |
                                              _mm512_cmp_ps_mask(v, one, _CMP_EQ_OQ)) << (16 * c);
                }
                if (~zero_or_one) return 0;
            } else
#endif
            {
                for (ptrdiff_t k = k0; k < k1; k++) {
                    if (xr[k] != 0.0f && xr[k] != 1.0f) return 0;
                    word |= (uint64_t)(xr[k] != 0.0f) << (k - k0);
                }
            }
            out[r * Kw + w] = word;
            total += __builtin_popcountll(word);
        }
        rowsum[r] = total;
        amask[r] = total != 0;
    }
    return 1;
}

#if defined(BC_AVX512)
/* Two cheap passes instead of per-value exponent arithmetic: the largest value (as an unsigned integer: the
 * order of non-negative floats) gives the top plane hi; every value times 2^(23 - hi) is then below 2^24, and it
 * is an integer for all of them exactly when the input needs at most 24 planes (a nonzero value that scales to
 * 0 or to a fraction needs more). The OR of those integers gives the lowest plane. Sign bits (negatives, -0)
 * and extreme ranges go to the exact loop. */
static int analyze512(const uint32_t *u, ptrdiff_t n, int *lsb) {
    ptrdiff_t i;
    uint32_t mx = bk_max_bits((const float *)u, n);
    *lsb = 0;
    if (mx == 0) return 1;
    uint32_t e = mx >> 23;
    if (mx >> 31) return analyze_exact(u, n, lsb);
    if (e == 0 || e == 0xffu) return -1;        /* every nonzero value subnormal, or an inf/nan */
    int hi = (int)e - 127, shift = 23 - hi;
    /* shift >= 0: a nonzero value never scales to 0; shift <= 103: a subnormal scales below 2^-23, a fraction */
    if (hi < -80 || hi > 23) return analyze_exact(u, n, lsb);
    const __m512 sc = _mm512_set1_ps(ldexpf(1.0f, shift));
    __m512i ors0 = _mm512_setzero_si512(), ors1 = _mm512_setzero_si512();
    __mmask16 bad0 = 0, bad1 = 0;
    for (i = 0; i + 32 <= n; i += 32) {
        __m512 p0 = _mm512_mul_ps(_mm512_loadu_ps((const float *)(u + i)), sc);
        __m512 p1 = _mm512_mul_ps(_mm512_loadu_ps((const float *)(u + i + 16)), sc);
        __m512i q0 = _mm512_cvttps_epi32(p0), q1 = _mm512_cvttps_epi32(p1);
        bad0 |= _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(q0), p0, _CMP_NEQ_UQ);
        bad1 |= _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(q1), p1, _CMP_NEQ_UQ);
        ors0 = _mm512_or_si512(ors0, q0);
        ors1 = _mm512_or_si512(ors1, q1);
    }
    for (; i < n; i += 16) {
        __mmask16 mk = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, (const float *)(u + i)), sc);
        __m512i q = _mm512_cvttps_epi32(p);
        bad0 |= _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(q), p, _CMP_NEQ_UQ);
        ors0 = _mm512_or_si512(ors0, q);
    }
    __m512i ors = _mm512_or_si512(ors0, ors1);
    if (bad0 | bad1) return -1;
    int lo = __builtin_ctz((unsigned)_mm512_reduce_or_epi32(ors)) - shift;
    *lsb = lo;
    return hi - lo + 1;
}
#endif

int bk_analyze(const float *x, ptrdiff_t n, int *lsb) {
#if defined(BC_AVX512)
    return analyze512((const uint32_t *)x, n, lsb);
#else
    return analyze_exact((const uint32_t *)x, n, lsb);
#endif
}

/* ------------------------------------------------------------------------------------------------- pack */

static inline uint32_t quantum(uint32_t v, int lsb) {
    /* q = x / 2^lsb for a value analyze() accepted */
    if ((v & 0x7fffffffu) == 0) return 0;
    int e = (int)((v >> 23) & 0xffu);
    uint32_t m = (v & 0x7fffffu) | 0x800000u;
    int s = e - 150 - lsb;
    return s >= 0 ? (m << s) : (m >> (-s));
}

void bk_pack(const float *x, ptrdiff_t rows, ptrdiff_t K, ptrdiff_t Kw, int P, int lsb, uint64_t *out,
             int64_t *rowsum, uint32_t *amask) {
    const ptrdiff_t plane = rows * Kw;
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *xr = x + r * K;
        int64_t total = 0;
        uint32_t used = 0;
        for (ptrdiff_t w = 0; w < Kw; w++) {
            ptrdiff_t k0 = w * 64, k1 = k0 + 64 < K ? k0 + 64 : K;
            uint64_t words[MAX_PLANES];
            for (int p = 0; p < P; p++) words[p] = 0;
            if (P == 1 && lsb == 0) {
#if defined(BC_AVX512)
                if (k1 - k0 == 64) {
                    __m512 z = _mm512_setzero_ps();
                    uint64_t b0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(xr + k0), z, _CMP_NEQ_UQ);
                    uint64_t b1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(xr + k0 + 16), z, _CMP_NEQ_UQ);
                    uint64_t b2 = _mm512_cmp_ps_mask(_mm512_loadu_ps(xr + k0 + 32), z, _CMP_NEQ_UQ);
                    uint64_t b3 = _mm512_cmp_ps_mask(_mm512_loadu_ps(xr + k0 + 48), z, _CMP_NEQ_UQ);
                    words[0] = b0 | (b1 << 16) | (b2 << 32) | (b3 << 48);
                } else
#endif
                {
                    for (ptrdiff_t k = k0; k < k1; k++)
                        words[0] |= (uint64_t)(xr[k] != 0.0f) << (k - k0);
                }
                total += __builtin_popcountll(words[0]);
            }
#if defined(BC_AVX512)
            else if (k1 - k0 == 64) {
                const __m512 inv = _mm512_set1_ps(ldexpf(1.0f, -lsb));
                __m512i qs = _mm512_setzero_si512();
                for (int c = 0; c < 4; c++) {
                    __m512i q = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k0 + 16 * c), inv));
                    qs = _mm512_add_epi32(qs, q);
                    for (int p = 0; p < P; p++)
                        words[p] |= (uint64_t)_mm512_test_epi32_mask(q, _mm512_set1_epi32(1 << p)) << (16 * c);
                }
                total += _mm512_reduce_add_epi32(qs);
            }
#endif
            else {
                const uint32_t *ur = (const uint32_t *)xr;
                for (ptrdiff_t k = k0; k < k1; k++) {
                    uint32_t q = quantum(ur[k], lsb);
                    total += q;
                    for (int p = 0; p < P; p++) words[p] |= (uint64_t)((q >> p) & 1u) << (k - k0);
                }
            }
            for (int p = 0; p < P; p++) {
                out[p * plane + r * Kw + w] = words[p];
                used |= (uint32_t)(words[p] != 0) << p;
            }
        }
        if (rowsum) rowsum[r] = total;
        if (amask) amask[r] = used;
    }
}

/* ----------------------------------------------------------------------------------------------- im2col */

void bk_im2col(const uint64_t *in, const int64_t *pix, const bk_conv *c, uint64_t *out, int64_t *rowsum) {
    const ptrdiff_t P = c->P, N = c->N, H = c->H, W = c->W, Cw = c->Cw, kh = c->kh, kw = c->kw, sh = c->sh,
                    sw = c->sw, ph = c->ph, pw = c->pw, dh = c->dh, dw = c->dw, Ho = c->Ho, Wo = c->Wo;
    const ptrdiff_t Kw = kh * kw * Cw, rows = N * Ho * Wo;
    for (ptrdiff_t p = 0; p < P; p++) {
        const uint64_t *ip = in + p * N * H * W * Cw;
        uint64_t *op = out + p * rows * Kw;
        for (ptrdiff_t n = 0; n < N; n++)
            for (ptrdiff_t y = 0; y < Ho; y++)
                for (ptrdiff_t x = 0; x < Wo; x++) {
                    ptrdiff_t r = (n * Ho + y) * Wo + x;
                    uint64_t *dst = op + r * Kw;
                    int64_t total = 0;
                    for (ptrdiff_t i = 0; i < kh; i++) {
                        ptrdiff_t yy = y * sh - ph + i * dh;
                        for (ptrdiff_t j = 0; j < kw; j++) {
                            ptrdiff_t xx = x * sw - pw + j * dw;
                            uint64_t *d = dst + (i * kw + j) * Cw;
                            if (yy < 0 || yy >= H || xx < 0 || xx >= W) {
                                memset(d, 0, Cw * sizeof(uint64_t));
                            } else {
                                ptrdiff_t q = (n * H + yy) * W + xx;
                                memcpy(d, ip + q * Cw, Cw * sizeof(uint64_t));
                                total += pix[q];
                            }
                        }
                    }
                    if (p == 0 && rowsum) rowsum[r] = total;
                }
    }
}

/* ------------------------------------------------------------------------- channel-major (NCHW) inputs */

/* planes [P, N*HW, Cw] (pixel-major words, bit c%64 of word c/64) and per-pixel sums of q, read straight from
 * an NCHW tensor: no transposing copy. Spikes (P = 1, lsb = 0) visit only the set bits. */
void bk_pack_nchw(const float *x, ptrdiff_t N, ptrdiff_t C, ptrdiff_t HW, ptrdiff_t Cw, int P, int lsb,
                  uint64_t *out, int64_t *rowsum) {
    const ptrdiff_t plane = N * HW * Cw;
    memset(out, 0, (size_t)(P * plane) * sizeof(uint64_t));
    memset(rowsum, 0, (size_t)(N * HW) * sizeof(int64_t));
    for (ptrdiff_t n = 0; n < N; n++)
        for (ptrdiff_t c = 0; c < C; c++) {
            const float *xc = x + (n * C + c) * HW;
            uint64_t *base = out + n * HW * Cw + (c >> 6);
            int64_t *rs = rowsum + n * HW;
            const uint64_t bit = 1ull << (c & 63);
            ptrdiff_t p = 0;
            if (P == 1 && lsb == 0) {
#if defined(BC_AVX512)
                const __m512 z = _mm512_setzero_ps();
                for (; p + 16 <= HW; p += 16) {
                    unsigned m = _mm512_cmp_ps_mask(_mm512_loadu_ps(xc + p), z, _CMP_NEQ_UQ);
                    while (m) {
                        int j = __builtin_ctz(m);
                        base[(p + j) * Cw] |= bit;
                        rs[p + j] += 1;
                        m &= m - 1;
                    }
                }
#endif
                for (; p < HW; p++)
                    if (xc[p] != 0.0f) { base[p * Cw] |= bit; rs[p] += 1; }
            } else {
                const uint32_t *uc = (const uint32_t *)xc;
                for (; p < HW; p++) {
                    uint32_t q = quantum(uc[p], lsb);
                    if (!q) continue;
                    rs[p] += q;
                    for (int pl = 0; pl < P; pl++)
                        if ((q >> pl) & 1u) base[pl * plane + p * Cw] |= bit;
                }
            }
        }
}

/* bit im2col straight into the column layout [P, N, Kw, Npad] (Npad >= Ho*Wo, Kw = kh*kw*Cw) with per-patch sums
 * colsum [N, Npad]: the B operand of out[n] = W · patches[n]ᵀ, whose rows are NCHW output channels. */
void bk_im2col_cols(const uint64_t *in, const int64_t *pix, const bk_conv *c, ptrdiff_t Npad, uint64_t *out,
                    int64_t *colsum) {
    const ptrdiff_t P = c->P, N = c->N, H = c->H, W = c->W, Cw = c->Cw, kh = c->kh, kw = c->kw, sh = c->sh,
                    sw = c->sw, ph = c->ph, pw = c->pw, dh = c->dh, dw = c->dw, Ho = c->Ho, Wo = c->Wo;
    const ptrdiff_t Kw = kh * kw * Cw;
    memset(out, 0, (size_t)(P * N * Kw * Npad) * sizeof(uint64_t));
    memset(colsum, 0, (size_t)(N * Npad) * sizeof(int64_t));
    /* output columns x whose input column x * sw - pw + j * dw lies inside the image: x0 <= x < x1 */
    for (ptrdiff_t p = 0; p < P; p++)
        for (ptrdiff_t n = 0; n < N; n++) {
            const uint64_t *ip = in + (p * N + n) * H * W * Cw;
            uint64_t *op = out + (p * N + n) * Kw * Npad;
            for (ptrdiff_t i = 0; i < kh; i++)
                for (ptrdiff_t j = 0; j < kw; j++) {
                    const ptrdiff_t off = j * dw - pw;
                    ptrdiff_t x0 = off >= 0 ? 0 : (-off + sw - 1) / sw, x1 = W - 1 - off < 0 ? 0 : (W - 1 - off) / sw + 1;
                    if (x1 > Wo) x1 = Wo;
                    if (x1 <= x0) continue;
                    for (ptrdiff_t y = 0; y < Ho; y++) {
                        ptrdiff_t yy = y * sh - ph + i * dh;
                        if (yy < 0 || yy >= H) continue;
                        const ptrdiff_t q0 = yy * W + x0 * sw + off; /* the input pixel of output column x0 */
                        for (ptrdiff_t ch = 0; ch < Cw; ch++) {  /* one contiguous run of output columns per word */
                            uint64_t *dst = op + ((i * kw + j) * Cw + ch) * Npad + y * Wo + x0;
                            const uint64_t *src = ip + q0 * Cw + ch;
                            if (sw == 1 && Cw == 1) memcpy(dst, src, (size_t)(x1 - x0) * sizeof(uint64_t));
                            else
                                for (ptrdiff_t x = 0; x < x1 - x0; x++) dst[x] = src[x * sw * Cw];
                        }
                        if (p == 0) {
                            const int64_t *prow = pix + n * H * W + q0;
                            int64_t *cs = colsum + n * Npad + y * Wo + x0;
                            for (ptrdiff_t x = 0; x < x1 - x0; x++) cs[x] += prow[x * sw];
                        }
                    }
                }
        }
}

/* -------------------------------------------------------------------------------------------- transpose */

void bk_transpose(const uint64_t *in, ptrdiff_t B, ptrdiff_t rows, ptrdiff_t Kw, ptrdiff_t Npad, uint64_t *out) {
    memset(out, 0, (size_t)(B * Kw * Npad) * sizeof(uint64_t));
    for (ptrdiff_t b = 0; b < B; b++)
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t k = 0; k < Kw; k++)
                out[(b * Kw + k) * Npad + r] = in[(b * rows + r) * Kw + k];
}

/* ------------------------------------------------------------------------------------------- max pooling */

static inline float pool_max(float a, float b) { return ((b > a) | (b != b)) ? b : a; } /* NaN wins, as in torch */

void bk_maxpool(const float *x, ptrdiff_t planes, ptrdiff_t H, ptrdiff_t W, const int *k, const int *s,
                const int *pad, ptrdiff_t Ho, ptrdiff_t Wo, float *out, float *tmp) {
    for (ptrdiff_t p = 0; p < planes; p++) {
        const float *xp = x + p * H * W;
        float *op = out + p * Ho * Wo;
        for (ptrdiff_t y = 0; y < Ho; y++) {
            ptrdiff_t y0 = y * s[0] - pad[0], y1 = y0 + k[0];
            if (y0 < 0) y0 = 0;
            if (y1 > H) y1 = H;
            memcpy(tmp, xp + y0 * W, (size_t)W * sizeof(float));
            for (ptrdiff_t r = y0 + 1; r < y1; r++) {
                const float *row = xp + r * W;
                ptrdiff_t i = 0;
#if defined(BC_AVX512)
                for (; i < W; i += 16) {  /* max, then a NaN in tmp wins back (vmaxps returns its second input) */
                    __mmask16 mk = W - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (W - i)) - 1u);
                    __m512 a = _mm512_maskz_loadu_ps(mk, tmp + i), b = _mm512_maskz_loadu_ps(mk, row + i);
                    __m512 m = _mm512_max_ps(a, b);
                    m = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), m, a);
                    _mm512_mask_storeu_ps(tmp + i, mk, m);
                }
#endif
                for (; i < W; i++) tmp[i] = pool_max(tmp[i], row[i]);
            }
            ptrdiff_t xo = 0;
#if defined(BC_AVX512)
            for (; xo + 16 <= Wo; xo += 16) {  /* the window's columns gathered 16 outputs at a time */
                const __m512i base = _mm512_add_epi32(
                    _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)xo),
                                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                          13, 14, 15)), _mm512_set1_epi32(s[1])),
                    _mm512_set1_epi32(-pad[1]));
                __m512 m = _mm512_set1_ps(-INFINITY);
                for (int j = 0; j < k[1]; j++) {
                    __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(j));
                    __mmask16 ok = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512()) &
                                   _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32((int)W));
                    __m512 v = _mm512_mask_i32gather_ps(m, ok, idx, tmp, 4);
                    __m512 mx = _mm512_max_ps(m, v); /* v when either is NaN ... */
                    m = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q), mx, m); /* ... a NaN m stays */
                }
                _mm512_storeu_ps(op + y * Wo + xo, m);
            }
#endif
            for (; xo < Wo; xo++) {
                ptrdiff_t x0 = xo * s[1] - pad[1], x1 = x0 + k[1];
                if (x0 < 0) x0 = 0;
                if (x1 > W) x1 = W;
                float m = tmp[x0];
                for (ptrdiff_t i = x0 + 1; i < x1; i++) m = pool_max(m, tmp[i]);
                op[y * Wo + xo] = m;
            }
        }
    }
}
