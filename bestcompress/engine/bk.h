/* Shared declarations of the engine's compiled kernels (_bitkernels.c: the module, packing, im2col;
 * bk_gemm.c: the popcount products, one variant per instruction set chosen at run time; bk_amx.c: the int8
 * matrix-unit product for multi-bit inputs). */
#ifndef BK_H
#define BK_H
#include <stddef.h>
#include <stdint.h>

#define MAX_PLANES 24

typedef struct {
    const uint64_t *a;      /* [Pa][batch][M][Kw] */
    const uint64_t *b;      /* [Pb][batch][Kw][Npad] */
    const int64_t *rowsum;  /* [batch][M] (mode 0) */
    const int64_t *colsum;  /* [batch][Npad] (mode 0, trans: the activations are the columns) */
    const uint32_t *amask;  /* [batch][M]: bit i set when plane i of row m has a set bit (NULL: all planes) */
    int trans;              /* trans: a = weights, b = activations; alpha/bias per row */
    int bn;                 /* folded BatchNorm: 0 none; 1 fma(y, p0, p1); 2 ((y - p0) * p1) * p2 + p3 */
    const float *bp[4];
    float *out;             /* out[batch * obs + m * ors + n] */
    const float *alpha, *bias;
    ptrdiff_t M, N, Npad, Kw, a_ps, a_bs, b_ps, b_bs, obs, ors;
    int Pa, Pb, mode;
    float scale;            /* 2^(lsb_a + lsb_b) */
} gemm_args;

/* the exact float epilogue of one output (the rounding order every variant follows) */
float bk_finish(const gemm_args *g, int64_t acc, int64_t rs, ptrdiff_t m, ptrdiff_t n);

/* popcount product; isa: the variant (bk_isa_names), -1 = the best the CPU runs */
void bk_gemm(const gemm_args *g, ptrdiff_t batch, int isa);
int bk_best_isa(void);
const char *bk_isa_name(int isa);
int bk_isa_supported(int isa);
enum { BK_SCALAR = 0, BK_AVX2 = 1, BK_AVX512 = 2, BK_NEON = 3, BK_NISA = 4 };

/* int8 matrix units (x86 AMX): out = finish(q · w) for q in [0, 255] (at most 8 bit planes), w±1 bits given as
 * weight columns [Kw][Npad] (mode 0, not trans). Returns 0 when done, -1 when the CPU/OS has no AMX. */
int bk_amx_available(void);
int bk_amx_linear(const gemm_args *g, const uint8_t *q, ptrdiff_t kpad);
/* only after bk_amx_available(): the tile configuration (8 tiles of 16 x 64 bytes), and ±1 weight bits expanded
 * into 0/1 weight tiles (bk_amx.c) */
void bk_amx_tiles(void);
void bk_amx_expand(const uint64_t *b, ptrdiff_t ks, ptrdiff_t ns, ptrdiff_t nvalid, ptrdiff_t Kw, ptrdiff_t nb0,
                   ptrdiff_t nblk, uint8_t *wt);

/* packing (bk_pack.c; the one-pass packers bk_gather_rows, bk_quantize8, bk_pack_bytes, bk_pack_nchw_spikes:
 * bk_fastpack.c) */
typedef struct {
    ptrdiff_t P, N, H, W, Cw, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
} bk_conv;
/* a ±1-weight convolution of NCHW x (C channels) on the int8 matrix units, weight rows [cout][kh kw Cw] words; g:
 * out (NCHW), alpha, bias, bn. 1 when done (P, lsb set), 0 when not handled (no AMX, Wo not a multiple of 16, x
 * zero or not q * 2^lsb with q < 256): the popcount route then (bk_amx_conv.c) */
int bk_amx_conv(const float *x, ptrdiff_t C, const bk_conv *c, const uint64_t *wrows, ptrdiff_t cout, gemm_args *g,
                int *P, int *lsb);
int bk_analyze(const float *x, ptrdiff_t n, int *lsb);
/* x [outer][K][inner] (a transposed view's memory) -> dst [outer][inner][K]: rows of K values */
void bk_gather_rows(const float *x, ptrdiff_t outer, ptrdiff_t K, ptrdiff_t inner, float *dst);
uint32_t bk_max_bits(const float *x, ptrdiff_t n); /* the largest bit pattern: the top plane of x >= 0 */
/* one plane of {0, 1} spikes, rows layout; 0 (and nothing to use) when some value is neither 0 nor 1 */
int bk_pack_spikes(const float *x, ptrdiff_t rows, ptrdiff_t K, ptrdiff_t Kw, uint64_t *out, int64_t *rowsum,
                   uint32_t *amask);
void bk_pack(const float *x, ptrdiff_t rows, ptrdiff_t K, ptrdiff_t Kw, int P, int lsb, uint64_t *out,
             int64_t *rowsum, uint32_t *amask);
/* q8 = x * 2^(7 - hi) as bytes [rows][kpad] (kpad: a multiple of 64; zero past K; hi: the top plane, x < 2^(hi + 1),
 * or a guess of it: every value is checked) and, unless rowsum is NULL, rowsum[r] = sum of row r's q8: the OR of
 * all q8, -1 when some q8 is not an integer in [0, 255] (another hi, or more than 8 planes, or not a dyadic
 * number >= 0), -2 when the CPU has no AVX-512 (use bk_analyze + bk_pack). Both byte routes use it: the
 * popcount planes (bk_pack_bytes) and the int8 matrix units (bk_amx_linear). */
int bk_quantize8(const float *x, ptrdiff_t rows, ptrdiff_t K, ptrdiff_t kpad, int hi, uint8_t *q, int64_t *rowsum);
/* planes [P][rows][Kw] of bits low .. low + P - 1 of q8 rows (kpad = 64 Kw), rowsum = sum of q8 >> low, amask */
void bk_pack_bytes(const uint8_t *q, ptrdiff_t rows, ptrdiff_t Kw, int low, int P, uint64_t *out, int64_t *rowsum,
                   uint32_t *amask);
void bk_pack_nchw(const float *x, ptrdiff_t N, ptrdiff_t C, ptrdiff_t HW, ptrdiff_t Cw, int P, int lsb,
                  uint64_t *out, int64_t *rowsum);
/* {0, 1} spikes of NCHW x packed along C with the value check in the same pass; 0 when some value is neither */
int bk_pack_nchw_spikes(const float *x, ptrdiff_t N, ptrdiff_t C, ptrdiff_t HW, ptrdiff_t Cw, uint64_t *out,
                        int64_t *rowsum);
void bk_im2col(const uint64_t *in, const int64_t *pix, const bk_conv *c, uint64_t *out, int64_t *rowsum);
void bk_im2col_cols(const uint64_t *in, const int64_t *pix, const bk_conv *c, ptrdiff_t Npad, uint64_t *out,
                    int64_t *colsum);
void bk_transpose(const uint64_t *in, ptrdiff_t B, ptrdiff_t rows, ptrdiff_t Kw, ptrdiff_t Npad, uint64_t *out);

/* max pooling of planes [planes][H][W] (k, s, pad: height then width; every window holds a real value):
 * the max over the window's rows, then over its columns; tmp: W floats */
void bk_maxpool(const float *x, ptrdiff_t planes, ptrdiff_t H, ptrdiff_t W, const int *k, const int *s,
                const int *pad, ptrdiff_t Ho, ptrdiff_t Wo, float *out, float *tmp);

/* thread-local scratch memory, grown on demand (slot 0..7), 64-byte aligned; NULL when out of memory */
void *bk_scratch(int slot, size_t bytes);
#endif
