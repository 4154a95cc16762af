/* Bit-packed popcount kernels for the bestcompress 1-bit engine (CPython extension, no NumPy headers).
 *
 * Values are non-negative dyadic numbers x = q * 2^lsb with q a P-bit integer, stored as P bit planes of
 * 64-bit words (plane p holds bit p of q); a {0,1} spike tensor is one plane with lsb = 0. Every function takes
 * raw addresses (torch's data_ptr()) and sizes that the Python wrapper (kernels.py) has checked.
 *
 *   analyze(x, n)                       -> (P, lsb), or (-1, 0) when x holds a negative, non-finite, subnormal
 *                                          value or needs more than 24 planes
 *   pack(x, rows, K, Kw, P, lsb, out, rowsum)   planes [P, rows, Kw], rowsum[r] = sum of q over the row
 *   im2col(planes, rowsum, ...)         bit im2col for convolutions over a [P, N, H, W, Cw] word layout
 *   transpose(in, P, rows, Kw, Npad, out)       [P, rows, Kw] -> [P, Kw, Npad] (the B operand layout)
 *   gemm(...)                           out[m, n] = sum_k a[m, k] * b[k, n] with popcounts:
 *        mode 0 (b = +-1 weights, one plane of w+ bits): 2 * popcount(a & w+) - popcount(a), times alpha[n],
 *        plus bias[n]; mode 1 (both operands planes): sum over plane pairs of 2^(i+j) popcount(a_i & b_j).
 *
 * Integer sums are exact; the float result is the exact sum rounded once (then alpha and bias), which is what
 * float32 PyTorch computes too while the sums stay below 2^24. Floating point is never contracted (the build
 * passes -ffp-contract=off) so the rounding is the documented one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

/* AVX-512 (VPOPCNTDQ, with DQ/VL/CD) gets vectorised tiles: 8 popcounts per instruction, 4 x 32 outputs in
 * registers. Elsewhere (AVX2-only x86, ARM) the portable tiles use the compiler's 64-bit popcount, which is the
 * POPCNT instruction on x86 and NEON CNT on ARM; no AVX2/NEON-specific tiles yet. */
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    defined(__AVX512CD__)
#include <immintrin.h>
#define BC_AVX512 1
#endif

#define MAX_PLANES 24

static const char *isa_name(void) {
#if defined(BC_AVX512)
    return "avx512-vpopcntdq";
#elif defined(__ARM_NEON)
    return "neon-cnt (one 64-bit word per popcount)";
#else
    return "scalar popcount (one 64-bit word per popcount)";
#endif
}

/* ------------------------------------------------------------------------------------------------ analyze */

static PyObject *bc_analyze(PyObject *self, PyObject *args) {
    unsigned long long addr;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "Kn", &addr, &n)) return NULL;
    const uint32_t *u = (const uint32_t *)(uintptr_t)addr;
    int lo = 1 << 20, hi = -(1 << 20), bad = 0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
#if defined(BC_AVX512)
    {
        const __m512i absmask = _mm512_set1_epi32(0x7fffffff), ff = _mm512_set1_epi32(0xff);
        const __m512i mmask = _mm512_set1_epi32(0x7fffff), hidden = _mm512_set1_epi32(0x800000);
        __m512i vlo = _mm512_set1_epi32(1 << 20), vhi = _mm512_set1_epi32(-(1 << 20));
        __mmask16 badm = 0;
        for (; i + 16 <= n; i += 16) {
            __m512i v = _mm512_loadu_si512((const void *)(u + i));
            __mmask16 nz = _mm512_test_epi32_mask(v, absmask);
            if (!nz) continue;
            __m512i e = _mm512_and_si512(_mm512_srli_epi32(v, 23), ff);
            badm |= _mm512_mask_cmplt_epi32_mask(nz, v, _mm512_setzero_si512());          /* sign bit */
            badm |= _mm512_mask_cmpeq_epi32_mask(nz, e, _mm512_setzero_si512());          /* subnormal */
            badm |= _mm512_mask_cmpeq_epi32_mask(nz, e, ff);                              /* inf / nan */
            __m512i m = _mm512_or_si512(_mm512_and_si512(v, mmask), hidden);
            __m512i low = _mm512_and_si512(m, _mm512_sub_epi32(_mm512_setzero_si512(), m));
            __m512i ctz = _mm512_sub_epi32(_mm512_set1_epi32(31), _mm512_lzcnt_epi32(low));
            __m512i l = _mm512_add_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(150)), ctz);
            __m512i h = _mm512_sub_epi32(e, _mm512_set1_epi32(127));
            vlo = _mm512_mask_min_epi32(vlo, nz, vlo, l);
            vhi = _mm512_mask_max_epi32(vhi, nz, vhi, h);
        }
        bad = badm != 0;
        lo = _mm512_reduce_min_epi32(vlo);
        hi = _mm512_reduce_max_epi32(vhi);
    }
#endif
    for (; !bad && i < n; i++) {
        uint32_t v = u[i];
        if ((v & 0x7fffffffu) == 0) continue;          /* +0 and -0 */
        uint32_t e = (v >> 23) & 0xffu;
        if ((v >> 31) || e == 0 || e == 0xffu) { bad = 1; break; }  /* negative, subnormal, inf/nan */
        uint32_t m = (v & 0x7fffffu) | 0x800000u;
        int l = (int)e - 150 + __builtin_ctz(m);
        int h = (int)e - 127;
        if (l < lo) lo = l;
        if (h > hi) hi = h;
    }
    Py_END_ALLOW_THREADS
    if (bad) return Py_BuildValue("ii", -1, 0);
    if (hi < lo) return Py_BuildValue("ii", 1, 0);       /* all zero: one empty plane */
    int planes = hi - lo + 1;
    if (planes > MAX_PLANES) return Py_BuildValue("ii", -1, 0);
    return Py_BuildValue("ii", planes, lo);
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

static PyObject *bc_pack(PyObject *self, PyObject *args) {
    unsigned long long xa, oa, ra;
    Py_ssize_t rows, K, Kw;
    int P, lsb;
    if (!PyArg_ParseTuple(args, "KnnniiKK", &xa, &rows, &K, &Kw, &P, &lsb, &oa, &ra)) return NULL;
    const float *x = (const float *)(uintptr_t)xa;
    uint64_t *out = (uint64_t *)(uintptr_t)oa;
    int64_t *rowsum = (int64_t *)(uintptr_t)ra;
    Py_BEGIN_ALLOW_THREADS
    const Py_ssize_t plane = rows * Kw;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *xr = x + r * K;
        int64_t total = 0;
        for (Py_ssize_t w = 0; w < Kw; w++) {
            Py_ssize_t k0 = w * 64, k1 = k0 + 64 < K ? k0 + 64 : K;
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
                    for (Py_ssize_t k = k0; k < k1; k++)
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
                for (Py_ssize_t k = k0; k < k1; k++) {
                    uint32_t q = quantum(ur[k], lsb);
                    total += q;
                    for (int p = 0; p < P; p++) words[p] |= (uint64_t)((q >> p) & 1u) << (k - k0);
                }
            }
            for (int p = 0; p < P; p++) out[p * plane + r * Kw + w] = words[p];
        }
        if (rowsum) rowsum[r] = total;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------------------------------------- im2col */

static PyObject *bc_im2col(PyObject *self, PyObject *args) {
    unsigned long long ia, ra, oa, sa;
    Py_ssize_t P, N, H, W, Cw, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
    if (!PyArg_ParseTuple(args, "KKnnnnnnnnnnnnnnnKK", &ia, &ra, &P, &N, &H, &W, &Cw, &kh, &kw, &sh, &sw, &ph,
                          &pw, &dh, &dw, &Ho, &Wo, &oa, &sa))
        return NULL;
    const uint64_t *in = (const uint64_t *)(uintptr_t)ia;
    const int64_t *pix = (const int64_t *)(uintptr_t)ra;
    uint64_t *out = (uint64_t *)(uintptr_t)oa;
    int64_t *rowsum = (int64_t *)(uintptr_t)sa;
    Py_BEGIN_ALLOW_THREADS
    const Py_ssize_t Kw = kh * kw * Cw, rows = N * Ho * Wo;
    for (Py_ssize_t p = 0; p < P; p++) {
        const uint64_t *ip = in + p * N * H * W * Cw;
        uint64_t *op = out + p * rows * Kw;
        for (Py_ssize_t n = 0; n < N; n++)
            for (Py_ssize_t y = 0; y < Ho; y++)
                for (Py_ssize_t x = 0; x < Wo; x++) {
                    Py_ssize_t r = (n * Ho + y) * Wo + x;
                    uint64_t *dst = op + r * Kw;
                    int64_t total = 0;
                    for (Py_ssize_t i = 0; i < kh; i++) {
                        Py_ssize_t yy = y * sh - ph + i * dh;
                        for (Py_ssize_t j = 0; j < kw; j++) {
                            Py_ssize_t xx = x * sw - pw + j * dw;
                            uint64_t *d = dst + (i * kw + j) * Cw;
                            if (yy < 0 || yy >= H || xx < 0 || xx >= W) {
                                memset(d, 0, Cw * sizeof(uint64_t));
                            } else {
                                Py_ssize_t q = (n * H + yy) * W + xx;
                                memcpy(d, ip + q * Cw, Cw * sizeof(uint64_t));
                                total += pix[q];
                            }
                        }
                    }
                    if (p == 0 && rowsum) rowsum[r] = total;
                }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------- channel-major (NCHW) inputs */

/* planes [P, N*HW, Cw] (pixel-major words, bit c%64 of word c/64) and per-pixel sums of q, read straight from
 * an NCHW tensor: no transposing copy. Spikes (P = 1, lsb = 0) visit only the set bits. */
static PyObject *bc_pack_nchw(PyObject *self, PyObject *args) {
    unsigned long long xa, oa, ra;
    Py_ssize_t N, C, HW, Cw;
    int P, lsb;
    if (!PyArg_ParseTuple(args, "KnnnniiKK", &xa, &N, &C, &HW, &Cw, &P, &lsb, &oa, &ra)) return NULL;
    const float *x = (const float *)(uintptr_t)xa;
    uint64_t *out = (uint64_t *)(uintptr_t)oa;
    int64_t *rowsum = (int64_t *)(uintptr_t)ra;
    Py_BEGIN_ALLOW_THREADS
    const Py_ssize_t plane = N * HW * Cw;
    memset(out, 0, (size_t)(P * plane) * sizeof(uint64_t));
    memset(rowsum, 0, (size_t)(N * HW) * sizeof(int64_t));
    for (Py_ssize_t n = 0; n < N; n++)
        for (Py_ssize_t c = 0; c < C; c++) {
            const float *xc = x + (n * C + c) * HW;
            uint64_t *base = out + n * HW * Cw + (c >> 6);
            int64_t *rs = rowsum + n * HW;
            const uint64_t bit = 1ull << (c & 63);
            Py_ssize_t p = 0;
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
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* bit im2col straight into the column layout [P, N, Kw, Npad] (Npad >= Ho*Wo, Kw = kh*kw*Cw) with per-patch sums
 * colsum [N, Npad]: the B operand of out[n] = W · patches[n]ᵀ, whose rows are NCHW output channels. */
static PyObject *bc_im2col_cols(PyObject *self, PyObject *args) {
    unsigned long long ia, ra, oa, sa;
    Py_ssize_t P, N, H, W, Cw, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, Npad;
    if (!PyArg_ParseTuple(args, "KKnnnnnnnnnnnnnnnnKK", &ia, &ra, &P, &N, &H, &W, &Cw, &kh, &kw, &sh, &sw, &ph,
                          &pw, &dh, &dw, &Ho, &Wo, &Npad, &oa, &sa))
        return NULL;
    const uint64_t *in = (const uint64_t *)(uintptr_t)ia;
    const int64_t *pix = (const int64_t *)(uintptr_t)ra;
    uint64_t *out = (uint64_t *)(uintptr_t)oa;
    int64_t *colsum = (int64_t *)(uintptr_t)sa;
    Py_BEGIN_ALLOW_THREADS
    const Py_ssize_t Kw = kh * kw * Cw;
    memset(out, 0, (size_t)(P * N * Kw * Npad) * sizeof(uint64_t));
    memset(colsum, 0, (size_t)(N * Npad) * sizeof(int64_t));
    for (Py_ssize_t p = 0; p < P; p++)
        for (Py_ssize_t n = 0; n < N; n++) {
            const uint64_t *ip = in + (p * N + n) * H * W * Cw;
            uint64_t *op = out + (p * N + n) * Kw * Npad;
            for (Py_ssize_t i = 0; i < kh; i++)
                for (Py_ssize_t j = 0; j < kw; j++)
                    for (Py_ssize_t y = 0; y < Ho; y++) {
                        Py_ssize_t yy = y * sh - ph + i * dh;
                        if (yy < 0 || yy >= H) continue;
                        for (Py_ssize_t x = 0; x < Wo; x++) {
                            Py_ssize_t xx = x * sw - pw + j * dw;
                            if (xx < 0 || xx >= W) continue;
                            Py_ssize_t q = yy * W + xx, col = y * Wo + x;
                            const uint64_t *src = ip + q * Cw;
                            uint64_t *dst = op + ((i * kw + j) * Cw) * Npad + col;
                            for (Py_ssize_t c = 0; c < Cw; c++) dst[c * Npad] = src[c];
                            if (p == 0) colsum[n * Npad + col] += pix[n * H * W + q];
                        }
                    }
        }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* -------------------------------------------------------------------------------------------- transpose */

static PyObject *bc_transpose(PyObject *self, PyObject *args) {
    unsigned long long ia, oa;
    Py_ssize_t B, rows, Kw, Npad;
    if (!PyArg_ParseTuple(args, "KnnnnK", &ia, &B, &rows, &Kw, &Npad, &oa)) return NULL;
    const uint64_t *in = (const uint64_t *)(uintptr_t)ia;
    uint64_t *out = (uint64_t *)(uintptr_t)oa;
    Py_BEGIN_ALLOW_THREADS
    memset(out, 0, (size_t)(B * Kw * Npad) * sizeof(uint64_t));
    for (Py_ssize_t b = 0; b < B; b++)
        for (Py_ssize_t r = 0; r < rows; r++)
            for (Py_ssize_t k = 0; k < Kw; k++)
                out[(b * Kw + k) * Npad + r] = in[(b * rows + r) * Kw + k];
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------- gemm */

typedef struct {
    const uint64_t *a;      /* [Pa][batch][M][Kw] */
    const uint64_t *b;      /* [Pb][batch][Kw][Npad] */
    const int64_t *rowsum;  /* [batch][M] (mode 0) */
    const int64_t *colsum;  /* [batch][Npad] (mode 0, trans: the activations are the columns) */
    int trans;              /* trans: a = weights, b = activations; alpha/bias per row */
    int bn;                 /* folded BatchNorm: 0 none; 1 fma(y, p0, p1); 2 ((y - p0) * p1) * p2 + p3 */
    const float *bp[4];
    float *out;             /* out[batch * obs + m * ors + n] */
    const float *alpha, *bias;
    Py_ssize_t M, N, Npad, Kw, a_ps, a_bs, b_ps, b_bs, obs, ors;
    int Pa, Pb, mode;
    float scale;            /* 2^(lsb_a + lsb_b) */
} gemm_args;

static inline float finish(const gemm_args *g, int64_t acc, int64_t rs, Py_ssize_t m, Py_ssize_t n) {
    int64_t v = g->mode == 0 ? 2 * acc - rs : acc;
    float f = (float)v * g->scale;
    Py_ssize_t c = g->trans ? m : n;
    if (g->alpha) f = f * g->alpha[c];
    if (g->bias) f = f + g->bias[c];
    if (g->bn == 1) f = fmaf(f, g->bp[0][c], g->bp[1][c]);
    else if (g->bn == 2) f = ((f - g->bp[0][c]) * g->bp[1][c]) * g->bp[2][c] + g->bp[3][c];
    return f;
}

/* scalar reference path: any tile, any ISA */
static void tile_scalar(const gemm_args *g, Py_ssize_t bt, Py_ssize_t m0, Py_ssize_t mb, Py_ssize_t n0,
                        Py_ssize_t nb) {
    for (Py_ssize_t m = m0; m < m0 + mb; m++)
        for (Py_ssize_t n = n0; n < n0 + nb; n++) {
            int64_t acc = 0;
            for (int s = g->Pa + g->Pb - 2; s >= 0; s--) {
                acc += acc;
                for (int i = 0; i < g->Pa; i++) {
                    int j = s - i;
                    if (j < 0 || j >= g->Pb) continue;
                    const uint64_t *ar = g->a + i * g->a_ps + bt * g->a_bs + m * g->Kw;
                    const uint64_t *bc = g->b + j * g->b_ps + bt * g->b_bs + n;
                    for (Py_ssize_t k = 0; k < g->Kw; k++)
                        acc += __builtin_popcountll(ar[k] & bc[k * g->Npad]);
                }
            }
            int64_t rs = g->trans ? (g->colsum ? g->colsum[bt * g->Npad + n] : 0)
                                  : (g->rowsum ? g->rowsum[bt * g->M + m] : 0);
            g->out[bt * g->obs + m * g->ors + n] = finish(g, acc, rs, m, n);
        }
}

#if defined(BC_AVX512)
/* MB rows x NV vectors of 8 outputs, accumulators in registers (MB * NV <= 16) */
#define TILE512(MB, NV)                                                                                        \
    static void tile512_##MB##_##NV(const gemm_args *g, Py_ssize_t bt, Py_ssize_t m0, Py_ssize_t n0) {        \
        __m512i acc[MB][NV];                                                                                   \
        for (int r = 0; r < MB; r++)                                                                           \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_si512();                                   \
        for (int s = g->Pa + g->Pb - 2; s >= 0; s--) {                                                         \
            for (int r = 0; r < MB; r++)                                                                       \
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_add_epi64(acc[r][v], acc[r][v]);               \
            for (int i = 0; i < g->Pa; i++) {                                                                  \
                int j = s - i;                                                                                 \
                if (j < 0 || j >= g->Pb) continue;                                                             \
                const uint64_t *ar = g->a + i * g->a_ps + bt * g->a_bs + m0 * g->Kw;                          \
                const uint64_t *bc = g->b + j * g->b_ps + bt * g->b_bs + n0;                                  \
                for (Py_ssize_t k = 0; k < g->Kw; k++) {                                                       \
                    __m512i w[NV];                                                                             \
                    for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_si512((const void *)(bc + k * g->Npad + 8 * v)); \
                    for (int r = 0; r < MB; r++) {                                                             \
                        __m512i x = _mm512_set1_epi64((long long)ar[r * g->Kw + k]);                           \
                        for (int v = 0; v < NV; v++)                                                           \
                            acc[r][v] = _mm512_add_epi64(acc[r][v], _mm512_popcnt_epi64(_mm512_and_si512(x, w[v]))); \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        __m256 sc = _mm256_set1_ps(g->scale);                                                                  \
        for (int r = 0; r < MB; r++) {                                                                         \
            Py_ssize_t m = m0 + r;                                                                             \
            __m512i rs = _mm512_set1_epi64(!g->trans && g->rowsum ? g->rowsum[bt * g->M + m] : 0);            \
            float *o = g->out + bt * g->obs + m * g->ors;                                                      \
            for (int v = 0; v < NV; v++) {                                                                     \
                Py_ssize_t n = n0 + 8 * v;                                                                     \
                if (n >= g->N) break;                                                                          \
                if (g->trans && g->colsum)                                                                     \
                    rs = _mm512_loadu_si512((const void *)(g->colsum + bt * g->Npad + n));                     \
                __m512i iv = g->mode == 0 ? _mm512_sub_epi64(_mm512_add_epi64(acc[r][v], acc[r][v]), rs) : acc[r][v]; \
                __m256 f = _mm256_mul_ps(_mm512_cvtepi64_ps(iv), sc);                                          \
                __mmask8 mk = g->N - n >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (g->N - n)) - 1u);            \
                if (g->trans) {                                                                                \
                    if (g->alpha) f = _mm256_mul_ps(f, _mm256_set1_ps(g->alpha[m]));                           \
                    if (g->bias) f = _mm256_add_ps(f, _mm256_set1_ps(g->bias[m]));                             \
                    if (g->bn == 1)                                                                            \
                        f = _mm256_fmadd_ps(f, _mm256_set1_ps(g->bp[0][m]), _mm256_set1_ps(g->bp[1][m]));       \
                    else if (g->bn == 2)                                                                       \
                        f = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(f, _mm256_set1_ps(g->bp[0][m])), \
                            _mm256_set1_ps(g->bp[1][m])), _mm256_set1_ps(g->bp[2][m])), _mm256_set1_ps(g->bp[3][m])); \
                } else {                                                                                       \
                    if (g->alpha) f = _mm256_mul_ps(f, _mm256_maskz_loadu_ps(mk, g->alpha + n));               \
                    if (g->bias) f = _mm256_add_ps(f, _mm256_maskz_loadu_ps(mk, g->bias + n));                 \
                    if (g->bn == 1)                                                                            \
                        f = _mm256_fmadd_ps(f, _mm256_maskz_loadu_ps(mk, g->bp[0] + n),                        \
                                            _mm256_maskz_loadu_ps(mk, g->bp[1] + n));                          \
                    else if (g->bn == 2)                                                                       \
                        f = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(                                         \
                                _mm256_sub_ps(f, _mm256_maskz_loadu_ps(mk, g->bp[0] + n)),                     \
                                _mm256_maskz_loadu_ps(mk, g->bp[1] + n)), _mm256_maskz_loadu_ps(mk, g->bp[2] + n)), \
                            _mm256_maskz_loadu_ps(mk, g->bp[3] + n));                                          \
                }                                                                                              \
                _mm256_mask_storeu_ps(o + n, mk, f);                                                           \
            }                                                                                                  \
        }                                                                                                      \
    }
TILE512(4, 4)
TILE512(1, 4)
TILE512(4, 1)
TILE512(1, 1)
#endif

static void gemm_run(const gemm_args *g, Py_ssize_t batch) {
    for (Py_ssize_t bt = 0; bt < batch; bt++) {
#if defined(BC_AVX512)
        Py_ssize_t n_main = (g->Npad / 32) * 32;
        Py_ssize_t m_main = (g->M / 4) * 4;
        for (Py_ssize_t n0 = 0; n0 < n_main; n0 += 32) {
            Py_ssize_t m0 = 0;
            for (; m0 < m_main; m0 += 4) tile512_4_4(g, bt, m0, n0);
            for (; m0 < g->M; m0++) tile512_1_4(g, bt, m0, n0);
        }
        for (Py_ssize_t n0 = n_main; n0 < g->Npad; n0 += 8) {
            if (n0 >= g->N) break;
            Py_ssize_t m0 = 0;
            for (; m0 < m_main; m0 += 4) tile512_4_1(g, bt, m0, n0);
            for (; m0 < g->M; m0++) tile512_1_1(g, bt, m0, n0);
        }
#else
        for (Py_ssize_t m0 = 0; m0 < g->M; m0 += 4) {
            Py_ssize_t mb = g->M - m0 < 4 ? g->M - m0 : 4;
            for (Py_ssize_t n0 = 0; n0 < g->N; n0 += 64) {
                Py_ssize_t nb = g->N - n0 < 64 ? g->N - n0 : 64;
                tile_scalar(g, bt, m0, mb, n0, nb);
            }
        }
#endif
    }
}

static PyObject *bc_gemm(PyObject *self, PyObject *args) {
    unsigned long long aa, ba, ra, oa, la, bia;
    Py_ssize_t batch;
    gemm_args g;
    int scalar_only;
    unsigned long long ca, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
    g.bn = 0;
    if (!PyArg_ParseTuple(args, "KKKKKKinnnnnnnnnnniifiKi|iKKKK", &aa, &ba, &ra, &oa, &la, &bia, &g.mode, &batch,
                          &g.M, &g.N, &g.Npad, &g.Kw, &g.a_ps, &g.a_bs, &g.b_ps, &g.b_bs, &g.obs, &g.ors, &g.Pa,
                          &g.Pb, &g.scale, &scalar_only, &ca, &g.trans, &g.bn, &b0, &b1, &b2, &b3))
        return NULL;
    g.colsum = (const int64_t *)(uintptr_t)ca;
    g.bp[0] = (const float *)(uintptr_t)b0;
    g.bp[1] = (const float *)(uintptr_t)b1;
    g.bp[2] = (const float *)(uintptr_t)b2;
    g.bp[3] = (const float *)(uintptr_t)b3;
    g.a = (const uint64_t *)(uintptr_t)aa;
    g.b = (const uint64_t *)(uintptr_t)ba;
    g.rowsum = (const int64_t *)(uintptr_t)ra;
    g.out = (float *)(uintptr_t)oa;
    g.alpha = (const float *)(uintptr_t)la;
    g.bias = (const float *)(uintptr_t)bia;
    Py_BEGIN_ALLOW_THREADS
    if (scalar_only) {
        for (Py_ssize_t bt = 0; bt < batch; bt++) tile_scalar(&g, bt, 0, g.M, 0, g.N);
    } else {
        gemm_run(&g, batch);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *bc_isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(isa_name()); }

static PyMethodDef methods[] = {
    {"analyze", bc_analyze, METH_VARARGS, "analyze(addr, n) -> (planes, lsb) or (-1, 0)"},
    {"pack", bc_pack, METH_VARARGS, "pack(x, rows, K, Kw, P, lsb, out, rowsum)"},
    {"im2col", bc_im2col, METH_VARARGS, "bit im2col over a [P, N, H, W, Cw] word layout"},
    {"transpose", bc_transpose, METH_VARARGS, "transpose(in, batch, rows, Kw, Npad, out)"},
    {"pack_nchw", bc_pack_nchw, METH_VARARGS, "pack an NCHW tensor along C into [P, N*HW, Cw] words"},
    {"im2col_cols", bc_im2col_cols, METH_VARARGS, "bit im2col into the column layout [P, N, Kw, Npad]"},
    {"gemm", bc_gemm, METH_VARARGS, "popcount GEMM (see the module docstring)"},
    {"isa", bc_isa, METH_NOARGS, "the vector instruction set the kernels were compiled for"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitkernels",
                                    "Bit-packed popcount kernels of the bestcompress engine.", -1, methods};

PyMODINIT_FUNC PyInit__bitkernels(void) { return PyModule_Create(&module); }
