/* Bit-packed popcount kernels for the bestcompress 1-bit engine (CPython extension, no NumPy headers).
 *
 * Values are non-negative dyadic numbers x = q * 2^lsb with q a P-bit integer, stored as P bit planes of
 * 64-bit words (plane p holds bit p of q); a {0,1} spike tensor is one plane with lsb = 0. Every function takes
 * raw addresses (torch's data_ptr()) and sizes that the Python wrapper (kernels.py) has checked.
 *
 *   analyze(x, n)               -> (P, lsb), or (-1, 0) when x does not pack (bk_pack.c)
 *   pack, pack_nchw, im2col, im2col_cols, transpose: the operand layouts (bk_pack.c)
 *   gemm(...)                   out[m, n] = sum_k a[m, k] * b[k, n] with popcounts (bk_gemm.c):
 *        mode 0 (b = +-1 weights, one plane of w+ bits): 2 * popcount(a & w+) - popcount(a), times alpha[n],
 *        plus bias[n]; mode 1 (both operands planes): sum over plane pairs of 2^(i+j) popcount(a_i & b_j).
 *   linear(...), conv(...)      a whole layer in one call: analyze, pack once per input (not per output
 *                               channel), product, epilogue; operands live in thread-local scratch memory.
 *                               linear takes the int8 matrix units (bk_amx.c) for multi-plane inputs when asked.
 *   maxpool(...)                max pooling of float32 NCHW planes (bk_pack.c)
 *   isa(), isa_name(i), isa_supported(i), amx_available(): what the CPU runs.
 *
 * Integer sums are exact; the float result is the exact sum rounded once (then alpha and bias), which is what
 * float32 PyTorch computes too while the sums stay below 2^24. Floating point is never contracted (the build
 * passes -ffp-contract=off) so the rounding is the documented one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "bk.h"

#define NSLOTS 8
static __thread struct { void *p; size_t n; } scratch[NSLOTS];

void *bk_scratch(int slot, size_t bytes) {
    if (slot < 0 || slot >= NSLOTS) return NULL;
    if (bytes == 0) bytes = 64;
    if (scratch[slot].n < bytes) {
        size_t n = (bytes + 4095) / 4096 * 4096;
        void *p = NULL;
        if (posix_memalign(&p, 64, n) != 0) return NULL;
        free(scratch[slot].p);
        scratch[slot].p = p;
        scratch[slot].n = n;
    }
    return scratch[slot].p;
}

#define PTR(T, a) ((T)(uintptr_t)(a))

static PyObject *bc_analyze(PyObject *self, PyObject *args) {
    unsigned long long addr;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "Kn", &addr, &n)) return NULL;
    int planes, lsb;
    Py_BEGIN_ALLOW_THREADS
    planes = bk_analyze(PTR(const float *, addr), n, &lsb);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("ii", planes, planes < 0 ? 0 : lsb);
}

static PyObject *bc_pack(PyObject *self, PyObject *args) {
    unsigned long long xa, oa, ra, ma = 0;
    Py_ssize_t rows, K, Kw;
    int P, lsb;
    if (!PyArg_ParseTuple(args, "KnnniiKK|K", &xa, &rows, &K, &Kw, &P, &lsb, &oa, &ra, &ma)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    bk_pack(PTR(const float *, xa), rows, K, Kw, P, lsb, PTR(uint64_t *, oa), PTR(int64_t *, ra),
            PTR(uint32_t *, ma));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *bc_im2col(PyObject *self, PyObject *args) {
    unsigned long long ia, ra, oa, sa;
    bk_conv c;
    if (!PyArg_ParseTuple(args, "KKnnnnnnnnnnnnnnnKK", &ia, &ra, &c.P, &c.N, &c.H, &c.W, &c.Cw, &c.kh, &c.kw,
                          &c.sh, &c.sw, &c.ph, &c.pw, &c.dh, &c.dw, &c.Ho, &c.Wo, &oa, &sa))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    bk_im2col(PTR(const uint64_t *, ia), PTR(const int64_t *, ra), &c, PTR(uint64_t *, oa), PTR(int64_t *, sa));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *bc_pack_nchw(PyObject *self, PyObject *args) {
    unsigned long long xa, oa, ra;
    Py_ssize_t N, C, HW, Cw;
    int P, lsb;
    if (!PyArg_ParseTuple(args, "KnnnniiKK", &xa, &N, &C, &HW, &Cw, &P, &lsb, &oa, &ra)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    bk_pack_nchw(PTR(const float *, xa), N, C, HW, Cw, P, lsb, PTR(uint64_t *, oa), PTR(int64_t *, ra));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *bc_im2col_cols(PyObject *self, PyObject *args) {
    unsigned long long ia, ra, oa, sa;
    Py_ssize_t Npad;
    bk_conv c;
    if (!PyArg_ParseTuple(args, "KKnnnnnnnnnnnnnnnnKK", &ia, &ra, &c.P, &c.N, &c.H, &c.W, &c.Cw, &c.kh, &c.kw,
                          &c.sh, &c.sw, &c.ph, &c.pw, &c.dh, &c.dw, &c.Ho, &c.Wo, &Npad, &oa, &sa))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    bk_im2col_cols(PTR(const uint64_t *, ia), PTR(const int64_t *, ra), &c, Npad, PTR(uint64_t *, oa),
                   PTR(int64_t *, sa));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *bc_transpose(PyObject *self, PyObject *args) {
    unsigned long long ia, oa;
    Py_ssize_t B, rows, Kw, Npad;
    if (!PyArg_ParseTuple(args, "KnnnnK", &ia, &B, &rows, &Kw, &Npad, &oa)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    bk_transpose(PTR(const uint64_t *, ia), B, rows, Kw, Npad, PTR(uint64_t *, oa));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void set_bn(gemm_args *g, unsigned long long b0, unsigned long long b1, unsigned long long b2,
                   unsigned long long b3) {
    g->bp[0] = PTR(const float *, b0);
    g->bp[1] = PTR(const float *, b1);
    g->bp[2] = PTR(const float *, b2);
    g->bp[3] = PTR(const float *, b3);
}

static PyObject *bc_gemm(PyObject *self, PyObject *args) {
    unsigned long long aa, ba, ra, oa, la, bia, ca, b0 = 0, b1 = 0, b2 = 0, b3 = 0, ma = 0;
    Py_ssize_t batch;
    int isa;
    gemm_args g;
    memset(&g, 0, sizeof g);
    if (!PyArg_ParseTuple(args, "KKKKKKinnnnnnnnnnniifiKi|iKKKKK", &aa, &ba, &ra, &oa, &la, &bia, &g.mode, &batch,
                          &g.M, &g.N, &g.Npad, &g.Kw, &g.a_ps, &g.a_bs, &g.b_ps, &g.b_bs, &g.obs, &g.ors, &g.Pa,
                          &g.Pb, &g.scale, &isa, &ca, &g.trans, &g.bn, &b0, &b1, &b2, &b3, &ma))
        return NULL;
    set_bn(&g, b0, b1, b2, b3);
    g.a = PTR(const uint64_t *, aa);
    g.b = PTR(const uint64_t *, ba);
    g.rowsum = PTR(const int64_t *, ra);
    g.colsum = PTR(const int64_t *, ca);
    g.amask = PTR(const uint32_t *, ma);
    g.out = PTR(float *, oa);
    g.alpha = PTR(const float *, la);
    g.bias = PTR(const float *, bia);
    Py_BEGIN_ALLOW_THREADS
    bk_gemm(&g, batch, isa);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The int8 route with q = x * 2^(7 - hi): 1 when done (P and lsb set), 0 when some q is not an integer in
 * [0, 255] (x needs another hi, or more than 8 planes, or is not a dyadic number >= 0), when x is all zero, or
 * when the CPU has no AMX.
 * bk_quantize8 checks every value in the pass that converts it, so any hi that passes gives the exact sums. */
static int amx_try(gemm_args *g, const float *x, ptrdiff_t rows, ptrdiff_t K, int hi, int *P, int *lsb) {
    if (hi < -80 || hi > 23 || !bk_amx_available()) return 0;
    const ptrdiff_t mpad = (rows + 31) / 32 * 32, kpad = 64 * g->Kw;
    uint8_t *q = bk_scratch(0, (size_t)(mpad * kpad));
    int64_t *rowsum = bk_scratch(1, (size_t)rows * sizeof(int64_t));
    if (!q || !rowsum) return 0;
    int ors = bk_quantize8(x, rows, K, kpad, hi, q, rowsum);
    if (ors <= 0) return 0; /* all zero: the popcount route's one empty plane, as from the max pass */
    memset(q + rows * kpad, 0, (size_t)((mpad - rows) * kpad)); /* the row tiles past M read zeros */
    int low = __builtin_ctz((unsigned)ors), top = 31 - __builtin_clz((unsigned)ors);
    *lsb = hi - 7 + low;
    *P = top - low + 1;
    g->rowsum = rowsum;
    g->scale = ldexpf(1.0f, hi - 7); /* q is x / 2^(hi - 7): the same exact sums times a power of two */
    return bk_amx_linear(g, q, kpad) == 0;
}

/* The top plane the last input of a layer had, keyed by the layer's weight address (a direct-mapped table): the
 * int8 route tries it first and skips the separate max pass over x when it holds. Only a hint: a wrong or torn
 * entry costs one more pass, never a wrong result. */
#define NHINTS 64
static struct { uintptr_t key; int hi; } hints[NHINTS];

static inline unsigned hint_slot(uintptr_t key) { return (unsigned)((key >> 6) ^ (key >> 12)) % NHINTS; }

/* the int8 route from the largest bit pattern mx of x (bk_max_bits) */
static int linear_int8(gemm_args *g, const float *x, ptrdiff_t rows, ptrdiff_t K, uint32_t mx, int *P, int *lsb) {
    int e = (int)(mx >> 23), hi = e - 127;
    if ((mx >> 31) || e == 0 || e == 0xff) return 0;
    if (!amx_try(g, x, rows, K, hi, P, lsb)) return 0;
    unsigned s = hint_slot((uintptr_t)g->b);
    hints[s].key = (uintptr_t)g->b;
    hints[s].hi = hi;
    return 1;
}

/* linear(x, rows, K, max_planes, wcols, Npad, N, alpha, bias, bn, b0, b1, b2, b3, out, isa, int8[, inner])
 *   -> (P, lsb, kernel): kernel 0 = popcount, 1 = int8 matrix units; P = -1 when x does not pack.
 *   int8: 0 never, 1 inputs other than {0, 1} spikes, 2 every input (when the CPU has AMX);
 *   inner > 0: x's memory is [rows / inner][K][inner] (a transposed view), gathered into rows first */
static PyObject *bc_linear(PyObject *self, PyObject *args) {
    unsigned long long xa, wa, la, bia, oa, b0, b1, b2, b3;
    Py_ssize_t rows, K, Npad, N;
    Py_ssize_t inner = 0;
    int maxp, isa, int8;
    gemm_args g;
    memset(&g, 0, sizeof g);
    if (!PyArg_ParseTuple(args, "KnniKnnKKiKKKKKii|n", &xa, &rows, &K, &maxp, &wa, &Npad, &N, &la, &bia, &g.bn, &b0,
                          &b1, &b2, &b3, &oa, &isa, &int8, &inner))
        return NULL;
    set_bn(&g, b0, b1, b2, b3);
    const float *x = PTR(const float *, xa);
    if (inner > 0) {
        float *rowsx = bk_scratch(5, (size_t)(rows * K) * sizeof(float));
        if (!rowsx) return PyErr_NoMemory();
        Py_BEGIN_ALLOW_THREADS
        bk_gather_rows(x, rows / inner, K, inner, rowsx);
        Py_END_ALLOW_THREADS
        x = rowsx;
    }
    const ptrdiff_t Kw = (K + 63) / 64;
    int P = 0, lsb = 0, kernel = 0, fail = 0;
    g.b = PTR(const uint64_t *, wa);
    g.out = PTR(float *, oa);
    g.alpha = PTR(const float *, la);
    g.bias = PTR(const float *, bia);
    g.M = rows; g.N = N; g.Npad = Npad; g.Kw = Kw;
    g.b_ps = Kw * Npad; g.obs = rows * N; g.ors = N;
    g.Pb = 1; g.mode = 0;
    Py_BEGIN_ALLOW_THREADS
    const unsigned hs = hint_slot((uintptr_t)wa);
    if (int8 == 2 && hints[hs].key == (uintptr_t)wa) kernel = amx_try(&g, x, rows, K, hints[hs].hi, &P, &lsb);
    uint32_t mx = kernel ? 0 : bk_max_bits(x, rows * K);
    const int spikes = mx == 0x3f800000u; /* the largest value is 1.0: {0, 1} spikes, unless a fraction hides */
    if (!kernel && (int8 == 2 || (int8 == 1 && !spikes))) kernel = linear_int8(&g, x, rows, K, mx, &P, &lsb);
    if (!kernel) {
        uint64_t *words = NULL;
        int64_t *rowsum = bk_scratch(1, (size_t)rows * sizeof(int64_t));
        uint32_t *amask = bk_scratch(2, (size_t)rows * sizeof(uint32_t));
        int packed = 0;
        if (spikes) {
            words = bk_scratch(0, (size_t)(rows * Kw) * sizeof(uint64_t));
            if (words && rowsum && amask && bk_pack_spikes(x, rows, K, Kw, words, rowsum, amask)) {
                P = 1; lsb = 0; packed = 1;
            }
        }
        if (!packed && !fail) {
            /* at most 8 planes: quantized to bytes and cut into planes (one read of x); else analyze + pack */
            int e = (int)(mx >> 23), hi = e - 127, ors = -1;
            uint8_t *q8 = NULL;
            if (!(mx >> 31) && e != 0 && e != 0xff && hi >= -80 && hi <= 23) {
                q8 = bk_scratch(6, (size_t)(rows * Kw * 64));
                if (q8) ors = bk_quantize8(x, rows, K, Kw * 64, hi, q8, NULL);
            }
            if (ors >= 0) {
                int low = ors ? __builtin_ctz((unsigned)ors) : 0;
                P = ors ? 8 - low : 1;
                lsb = ors ? hi - 7 + low : 0;
                if (P > maxp) P = -1;
                if (P > 0) {
                    words = bk_scratch(0, (size_t)(P * rows * Kw) * sizeof(uint64_t));
                    if (!words || !amask || !rowsum) fail = 1;
                    else bk_pack_bytes(q8, rows, Kw, low, P, words, rowsum, amask);
                    packed = !fail;
                }
            }
        }
        if (!packed && !fail && P >= 0) {
            P = bk_analyze(x, rows * K, &lsb);
            if (P > maxp) P = -1;
            if (P > 0) {
                words = bk_scratch(0, (size_t)(P * rows * Kw) * sizeof(uint64_t));
                if (!words || !amask || !rowsum) fail = 1;
                else bk_pack(x, rows, K, Kw, P, lsb, words, rowsum, amask);
                packed = !fail;
            }
        }
        if (packed) {
            g.a = words; g.amask = amask; g.rowsum = rowsum;
            g.a_ps = rows * Kw; g.a_bs = rows * Kw; g.Pa = P; g.scale = ldexpf(1.0f, lsb);
            bk_gemm(&g, 1, isa);
        }
    }
    Py_END_ALLOW_THREADS
    if (fail) return PyErr_NoMemory();
    return Py_BuildValue("iii", P, P < 0 ? 0 : lsb, kernel);
}

/* conv(x, N, C, H, W, max_planes, wrows, cout, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, alpha, bias, bn, b0..b3,
 *      out, isa[, int8]) -> (P, kernel): P = -1 when x does not pack; out [N, cout, Ho, Wo]; kernel 1 = the int8
 *      matrix units (int8 = 2, 'all': tried first where the CPU has AMX and the layer's shape suits them) */
static PyObject *bc_conv(PyObject *self, PyObject *args) {
    unsigned long long xa, wa, la, bia, oa, b0, b1, b2, b3;
    Py_ssize_t C, cout;
    int maxp, isa, int8 = 0;
    bk_conv c;
    gemm_args g;
    memset(&g, 0, sizeof g);
    if (!PyArg_ParseTuple(args, "KnnnniKnnnnnnnnnnnKKiKKKKKi|i", &xa, &c.N, &C, &c.H, &c.W, &maxp, &wa, &cout, &c.kh,
                          &c.kw, &c.sh, &c.sw, &c.ph, &c.pw, &c.dh, &c.dw, &c.Ho, &c.Wo, &la, &bia, &g.bn, &b0, &b1,
                          &b2, &b3, &oa, &isa, &int8))
        return NULL;
    set_bn(&g, b0, b1, b2, b3);
    const float *x = PTR(const float *, xa);
    int P, lsb, fail = 0, kernel = 0;
    Py_BEGIN_ALLOW_THREADS
    c.Cw = (C + 63) / 64;
    if (int8 == 2) { /* first, before this function takes any scratch memory (bk_amx_conv may grow the slots) */
        g.out = PTR(float *, oa);
        g.alpha = PTR(const float *, la);
        g.bias = PTR(const float *, bia);
        kernel = bk_amx_conv(x, C, &c, PTR(const uint64_t *, wa), cout, &g, &P, &lsb);
        if (kernel && P > maxp) P = -1; /* computed, but more planes than the caller allows: refused */
    }
    if (!kernel) {
    const ptrdiff_t npix = c.N * c.H * c.W;
    uint64_t *pixels = NULL;
    int64_t *pixsum = bk_scratch(1, (size_t)npix * sizeof(int64_t));
    int spikes = 0;
    /* {0, 1} spikes (the largest value is 1): packed and checked in one pass; anything else: analyze, then pack */
    if (bk_max_bits(x, c.N * C * c.H * c.W) == 0x3f800000u) {
        pixels = bk_scratch(0, (size_t)(npix * c.Cw) * sizeof(uint64_t));
        spikes = pixels && pixsum && bk_pack_nchw_spikes(x, c.N, C, c.H * c.W, c.Cw, pixels, pixsum);
    }
    if (spikes) { P = 1; lsb = 0; }
    else P = bk_analyze(x, c.N * C * c.H * c.W, &lsb);
    if (P > maxp) P = -1;
    if (P > 0) {
        c.P = P;
        /* one spare vector of columns: a power-of-two row stride (32 x 32 maps: 8 KB) would map every k row of a
         * tile to the same L1 set */
        const ptrdiff_t pix = c.N * c.H * c.W, hw = c.Ho * c.Wo, npad = (hw + 7) / 8 * 8 + 8;
        const ptrdiff_t kwords = c.kh * c.kw * c.Cw;
        if (!spikes) pixels = bk_scratch(0, (size_t)(P * pix * c.Cw) * sizeof(uint64_t));
        uint64_t *cols = bk_scratch(4, (size_t)(P * c.N * kwords * npad) * sizeof(uint64_t));
        int64_t *colsum = bk_scratch(5, (size_t)(c.N * npad) * sizeof(int64_t));
        if (!pixels || !pixsum || !cols || !colsum) {
            fail = 1;
        } else {
            if (!spikes) bk_pack_nchw(x, c.N, C, c.H * c.W, c.Cw, P, lsb, pixels, pixsum);
            bk_im2col_cols(pixels, pixsum, &c, npad, cols, colsum);
            g.a = PTR(const uint64_t *, wa);
            g.b = cols;
            g.colsum = colsum;
            g.trans = 1;
            g.out = PTR(float *, oa);
            g.alpha = PTR(const float *, la);
            g.bias = PTR(const float *, bia);
            g.M = cout; g.N = hw; g.Npad = npad; g.Kw = kwords;
            g.a_ps = cout * kwords; g.a_bs = 0; g.b_ps = c.N * kwords * npad; g.b_bs = kwords * npad;
            g.obs = cout * hw; g.ors = hw; g.Pa = 1; g.Pb = P; g.mode = 0; g.scale = ldexpf(1.0f, lsb);
            bk_gemm(&g, c.N, isa);
        }
    }
    }
    Py_END_ALLOW_THREADS
    if (fail) return PyErr_NoMemory();
    return Py_BuildValue("ii", P, kernel);
}

/* maxpool(x, planes, H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, out) */
static PyObject *bc_maxpool(PyObject *self, PyObject *args) {
    unsigned long long xa, oa;
    Py_ssize_t planes, H, W, Ho, Wo;
    int k[2], st[2], pad[2];
    if (!PyArg_ParseTuple(args, "KnnniiiiiinnK", &xa, &planes, &H, &W, &k[0], &k[1], &st[0], &st[1], &pad[0],
                          &pad[1], &Ho, &Wo, &oa))
        return NULL;
    float *tmp = bk_scratch(5, (size_t)W * sizeof(float));
    if (!tmp) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    bk_maxpool(PTR(const float *, xa), planes, H, W, k, st, pad, Ho, Wo, PTR(float *, oa), tmp);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *bc_isa(PyObject *self, PyObject *args) { return PyUnicode_FromString(bk_isa_name(bk_best_isa())); }

static PyObject *bc_best_isa(PyObject *self, PyObject *args) { return PyLong_FromLong(bk_best_isa()); }

static PyObject *bc_isa_name(PyObject *self, PyObject *args) {
    int isa;
    if (!PyArg_ParseTuple(args, "i", &isa)) return NULL;
    return PyUnicode_FromString(bk_isa_name(isa));
}

static PyObject *bc_isa_supported(PyObject *self, PyObject *args) {
    int isa;
    if (!PyArg_ParseTuple(args, "i", &isa)) return NULL;
    return PyBool_FromLong(bk_isa_supported(isa));
}

static PyObject *bc_amx_available(PyObject *self, PyObject *args) { return PyBool_FromLong(bk_amx_available()); }

static PyMethodDef methods[] = {
    {"analyze", bc_analyze, METH_VARARGS, "analyze(addr, n) -> (planes, lsb) or (-1, 0)"},
    {"pack", bc_pack, METH_VARARGS, "pack(x, rows, K, Kw, P, lsb, out, rowsum[, amask])"},
    {"im2col", bc_im2col, METH_VARARGS, "bit im2col over a [P, N, H, W, Cw] word layout"},
    {"transpose", bc_transpose, METH_VARARGS, "transpose(in, batch, rows, Kw, Npad, out)"},
    {"pack_nchw", bc_pack_nchw, METH_VARARGS, "pack an NCHW tensor along C into [P, N*HW, Cw] words"},
    {"im2col_cols", bc_im2col_cols, METH_VARARGS, "bit im2col into the column layout [P, N, Kw, Npad]"},
    {"gemm", bc_gemm, METH_VARARGS, "popcount GEMM (see the module docstring)"},
    {"linear", bc_linear, METH_VARARGS, "a whole +-1 linear layer: analyze, pack, product -> (P, lsb, kernel)"},
    {"conv", bc_conv, METH_VARARGS, "a whole +-1 convolution over an NCHW input -> P"},
    {"maxpool", bc_maxpool, METH_VARARGS, "max pooling of float32 planes (NaN propagates, as in torch)"},
    {"isa", bc_isa, METH_NOARGS, "the popcount variant this CPU runs by default"},
    {"best_isa", bc_best_isa, METH_NOARGS, "its number"},
    {"isa_name", bc_isa_name, METH_VARARGS, "the name of variant i (0 scalar, 1 avx2, 2 avx512, 3 neon)"},
    {"isa_supported", bc_isa_supported, METH_VARARGS, "does this CPU run variant i"},
    {"amx_available", bc_amx_available, METH_NOARGS, "int8 matrix units (AMX) usable by this process"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitkernels",
                                    "Bit-packed popcount kernels of the bestcompress engine.", -1, methods};

PyMODINIT_FUNC PyInit__bitkernels(void) { return PyModule_Create(&module); }
