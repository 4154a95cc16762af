/* Popcount products out[m, n] = finish(sum over plane pairs 2^(i+j) sum_k popcount(a_i[m, k] & b_j[k, n])), one
 * variant per instruction set, picked at run time (__builtin_cpu_supports), so a portable build (no
 * -march=native) still runs the vector kernels the CPU has:
 *   avx512: VPOPCNTDQ, 8 popcounts per instruction; register tiles of 4 rows x 32 columns (16 accumulators,
 *           4 weight vectors, 1 broadcast row word), the float epilogue vectorised;
 *   avx2:   nibble-table popcount (VPSHUFB) of 4 words at once into byte counters, summed with VPSADBW every
 *           31 words (a byte counter holds at most 31 * 8 = 248); 2 rows x 8 columns;
 *   neon:   CNT (vcntq_u8) into byte counters, widened with pairwise adds every 31 words; 2 rows x 4 columns;
 *   scalar: the compiler's 64-bit popcount.
 * Every variant sums the same integers exactly and rounds them through bk_finish's order (or, avx512, the same
 * operations on 8 lanes), so all give bit-identical floats. Rows whose plane i is empty (amask) skip that plane.
 */
#include "bk.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 8))
#include <immintrin.h>
#define BK_X86 1
#define T512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512cd,avx512vpopcntdq,fma")))
#define T256 __attribute__((target("avx2,popcnt")))
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define BK_ARM 1
#endif

static const char *names[BK_NISA] = {"scalar popcount", "avx2 (vpshufb nibble popcount)",
                                     "avx512-vpopcntdq", "neon (vcntq_u8)"};

const char *bk_isa_name(int isa) { return isa >= 0 && isa < BK_NISA ? names[isa] : "?"; }

int bk_isa_supported(int isa) {
    if (isa == BK_SCALAR) return 1;
#if defined(BK_X86)
    __builtin_cpu_init();
    if (isa == BK_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    if (isa == BK_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512vpopcntdq") &&
               __builtin_cpu_supports("fma");
#endif
#if defined(BK_ARM)
    if (isa == BK_NEON) return 1;
#endif
    return 0;
}

int bk_best_isa(void) {
    for (int isa = BK_NEON; isa > BK_SCALAR; isa--)
        if (bk_isa_supported(isa)) return isa;
    return BK_SCALAR;
}

float bk_finish(const gemm_args *g, int64_t acc, int64_t rs, ptrdiff_t m, ptrdiff_t n) {
    int64_t v = g->mode == 0 ? 2 * acc - rs : acc;
    float f = (float)v * g->scale;
    ptrdiff_t c = g->trans ? m : n;
    if (g->alpha) f = f * g->alpha[c];
    if (g->bias) f = f + g->bias[c];
    if (g->bn == 1) f = fmaf(f, g->bp[0][c], g->bp[1][c]);
    else if (g->bn == 2) f = ((f - g->bp[0][c]) * g->bp[1][c]) * g->bp[2][c] + g->bp[3][c];
    return f;
}

static inline int64_t row_sum(const gemm_args *g, ptrdiff_t bt, ptrdiff_t m, ptrdiff_t n) {
    if (g->trans) return g->colsum ? g->colsum[bt * g->Npad + n] : 0;
    return g->rowsum ? g->rowsum[bt * g->M + m] : 0;
}

/* planes of a that rows m0..m0+mb-1 use (all when there is no mask) */
static inline uint32_t rows_mask(const gemm_args *g, ptrdiff_t bt, ptrdiff_t m0, ptrdiff_t mb) {
    if (!g->amask) return 0xffffffffu;
    uint32_t u = 0;
    for (ptrdiff_t r = 0; r < mb; r++) u |= g->amask[bt * g->M + m0 + r];
    return u;
}

/* ------------------------------------------------------------------------------------------------ scalar */

static void tile_scalar(const gemm_args *g, ptrdiff_t bt, ptrdiff_t m0, ptrdiff_t mb, ptrdiff_t n0, ptrdiff_t nb) {
    for (ptrdiff_t m = m0; m < m0 + mb; m++) {
        uint32_t use = rows_mask(g, bt, m, 1);
        for (ptrdiff_t n = n0; n < n0 + nb; n++) {
            int64_t acc = 0;
            for (int s = g->Pa + g->Pb - 2; s >= 0; s--) {
                acc += acc;
                for (int i = 0; i < g->Pa; i++) {
                    int j = s - i;
                    if (j < 0 || j >= g->Pb || !((use >> i) & 1u)) continue;
                    const uint64_t *ar = g->a + i * g->a_ps + bt * g->a_bs + m * g->Kw;
                    const uint64_t *bc = g->b + j * g->b_ps + bt * g->b_bs + n;
                    for (ptrdiff_t k = 0; k < g->Kw; k++) acc += __builtin_popcountll(ar[k] & bc[k * g->Npad]);
                }
            }
            g->out[bt * g->obs + m * g->ors + n] = bk_finish(g, acc, row_sum(g, bt, m, n), m, n);
        }
    }
}

static void run_scalar(const gemm_args *g, ptrdiff_t batch) {
    for (ptrdiff_t bt = 0; bt < batch; bt++)
        for (ptrdiff_t n0 = 0; n0 < g->N; n0 += 64)
            for (ptrdiff_t m0 = 0; m0 < g->M; m0 += 4)
                tile_scalar(g, bt, m0, g->M - m0 < 4 ? g->M - m0 : 4, n0, g->N - n0 < 64 ? g->N - n0 : 64);
}

/* ------------------------------------------------------------------------------------------------ avx512 */
#if defined(BK_X86)
/* MB rows x NV vectors of 8 columns, accumulators in registers */
#define TILE512(MB, NV)                                                                                        \
    T512 static void tile512_##MB##_##NV(const gemm_args *g, ptrdiff_t bt, ptrdiff_t m0, ptrdiff_t n0) {      \
        __m512i acc[MB][NV];                                                                                   \
        for (int r = 0; r < MB; r++)                                                                           \
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_si512();                                   \
        const uint32_t use = rows_mask(g, bt, m0, MB);                                                         \
        const ptrdiff_t Kw = g->Kw, Np = g->Npad;                                                              \
        for (int s = g->Pa + g->Pb - 2; s >= 0; s--) {                                                         \
            for (int r = 0; r < MB; r++)                                                                       \
                for (int v = 0; v < NV; v++) acc[r][v] = _mm512_add_epi64(acc[r][v], acc[r][v]);               \
            for (int i = 0; i < g->Pa; i++) {                                                                  \
                int j = s - i;                                                                                 \
                if (j < 0 || j >= g->Pb || !((use >> i) & 1u)) continue;                                       \
                const uint64_t *ar = g->a + i * g->a_ps + bt * g->a_bs + m0 * Kw;                             \
                const uint64_t *bc = g->b + j * g->b_ps + bt * g->b_bs + n0;                                  \
                for (ptrdiff_t k = 0; k < Kw; k++) {                                                           \
                    __m512i w[NV];                                                                             \
                    for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_si512((const void *)(bc + k * Np + 8 * v)); \
                    for (int r = 0; r < MB; r++) {                                                             \
                        __m512i x = _mm512_set1_epi64((long long)ar[r * Kw + k]);                              \
                        for (int v = 0; v < NV; v++)                                                           \
                            acc[r][v] = _mm512_add_epi64(acc[r][v], _mm512_popcnt_epi64(_mm512_and_si512(x, w[v]))); \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        if (NV % 2 == 0 && narrow32(g)) {                                                                      \
            for (int h = 0; h < NV / 2 && n0 + 16 * h < g->N; h++) {                                           \
                ep16 e;                                                                                        \
                ep16_columns(g, bt, n0 + 16 * h, &e);                                                          \
                for (int r = 0; r < MB; r++) ep16_row(g, bt, m0 + r, n0 + 16 * h, &e, acc[r][2 * h], acc[r][2 * h + 1]); \
            }                                                                                                  \
        } else {                                                                                               \
            for (int r = 0; r < MB; r++)                                                                       \
                for (int v = 0; v < NV; v++) epilogue512(g, bt, m0 + r, n0 + 8 * v, acc[r][v]);                \
        }                                                                                                      \
    }

/* 8 outputs of row m from columns n..n+7: bk_finish's operations, in the same order, on 8 lanes */
T512 static inline void epilogue512(const gemm_args *g, ptrdiff_t bt, ptrdiff_t m, ptrdiff_t n, __m512i acc) {
    if (n >= g->N) return;
    __m512i rs;
    if (g->trans) rs = g->colsum ? _mm512_loadu_si512((const void *)(g->colsum + bt * g->Npad + n))
                                 : _mm512_setzero_si512();
    else rs = _mm512_set1_epi64(g->rowsum ? g->rowsum[bt * g->M + m] : 0);
    __m512i iv = g->mode == 0 ? _mm512_sub_epi64(_mm512_add_epi64(acc, acc), rs) : acc;
    __m256 f = _mm256_mul_ps(_mm512_cvtepi64_ps(iv), _mm256_set1_ps(g->scale));
    __mmask8 mk = g->N - n >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (g->N - n)) - 1u);
#define CH(p) (g->trans ? _mm256_set1_ps((p)[m]) : _mm256_maskz_loadu_ps(mk, (p) + n))
    if (g->alpha) f = _mm256_mul_ps(f, CH(g->alpha));
    if (g->bias) f = _mm256_add_ps(f, CH(g->bias));
    if (g->bn == 1) f = _mm256_fmadd_ps(f, CH(g->bp[0]), CH(g->bp[1]));
    else if (g->bn == 2)
        f = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(f, CH(g->bp[0])), CH(g->bp[1])), CH(g->bp[2])),
                          CH(g->bp[3]));
#undef CH
    _mm256_mask_storeu_ps(g->out + bt * g->obs + m * g->ors + n, mk, f);
}

/* The same epilogue on 16 columns at once when every sum fits in int32 (narrow32): the two 8-lane int64
 * accumulators narrowed to one int32 vector, then bk_finish's float operations in its order on 16 lanes. The
 * per-column parameters (or, trans, the column sums) are loaded once per tile and reused for its rows. */
typedef struct {
    __m512 al, bi, p[4];
    __m512i rs;
    __mmask16 mk;
} ep16;

static inline int narrow32(const gemm_args *g) {
    /* |2 * acc - rowsum| <= 3 * 64 * Kw * (2^Pa - 1) * (2^Pb - 1) < 2^31 */
    return g->Pa + g->Pb <= 40 && (double)g->Kw * 192.0 * (double)(1ull << (g->Pa + g->Pb)) < 2147483648.0;
}

T512 static inline void ep16_columns(const gemm_args *g, ptrdiff_t bt, ptrdiff_t n, ep16 *e) {
    e->mk = g->N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (g->N - n)) - 1u);
    e->rs = _mm512_setzero_si512();
    e->al = e->bi = e->p[0] = e->p[1] = e->p[2] = e->p[3] = _mm512_setzero_ps();
    if (g->trans) {
        if (g->colsum) {
            const int64_t *cs = g->colsum + bt * g->Npad + n;
            __m256i lo = _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64((__mmask8)e->mk, cs));
            __m256i hi = _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64((__mmask8)(e->mk >> 8), cs + 8));
            e->rs = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
        return;
    }
    if (g->alpha) e->al = _mm512_maskz_loadu_ps(e->mk, g->alpha + n);
    if (g->bias) e->bi = _mm512_maskz_loadu_ps(e->mk, g->bias + n);
    for (int t = 0; t < 4; t++)
        if (g->bp[t] && g->bn) e->p[t] = _mm512_maskz_loadu_ps(e->mk, g->bp[t] + n);
}

T512 static inline void ep16_row(const gemm_args *g, ptrdiff_t bt, ptrdiff_t m, ptrdiff_t n, const ep16 *e,
                                 __m512i lo, __m512i hi) {
    __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
    if (g->mode == 0) {
        __m512i rs = g->trans ? e->rs : _mm512_set1_epi32(g->rowsum ? (int)g->rowsum[bt * g->M + m] : 0);
        a = _mm512_sub_epi32(_mm512_add_epi32(a, a), rs);
    }
    __m512 f = _mm512_cvtepi32_ps(a);
    if (g->scale != 1.0f) f = _mm512_mul_ps(f, _mm512_set1_ps(g->scale));
#define CH16(v, p) (g->trans ? _mm512_set1_ps((p)[m]) : (v))
    if (g->alpha) f = _mm512_mul_ps(f, CH16(e->al, g->alpha));
    if (g->bias) f = _mm512_add_ps(f, CH16(e->bi, g->bias));
    if (g->bn == 1) f = _mm512_fmadd_ps(f, CH16(e->p[0], g->bp[0]), CH16(e->p[1], g->bp[1]));
    else if (g->bn == 2)
        f = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(f, CH16(e->p[0], g->bp[0])), CH16(e->p[1], g->bp[1])),
                                        CH16(e->p[2], g->bp[2])), CH16(e->p[3], g->bp[3]));
#undef CH16
    _mm512_mask_storeu_ps(g->out + bt * g->obs + m * g->ors + n, e->mk, f);
}

TILE512(4, 4)
TILE512(1, 4)
TILE512(4, 1)
TILE512(1, 1)

T512 static void run512(const gemm_args *g, ptrdiff_t batch) {
    const ptrdiff_t n_main = (g->Npad / 32) * 32, m_main = (g->M / 4) * 4;
    for (ptrdiff_t bt = 0; bt < batch; bt++) {
        for (ptrdiff_t n0 = 0; n0 < n_main && n0 < g->N; n0 += 32) {
            ptrdiff_t m0 = 0;
            for (; m0 < m_main; m0 += 4) tile512_4_4(g, bt, m0, n0);
            for (; m0 < g->M; m0++) tile512_1_4(g, bt, m0, n0);
        }
        for (ptrdiff_t n0 = n_main; n0 < g->Npad && n0 < g->N; n0 += 8) {
            ptrdiff_t m0 = 0;
            for (; m0 < m_main; m0 += 4) tile512_4_1(g, bt, m0, n0);
            for (; m0 < g->M; m0++) tile512_1_1(g, bt, m0, n0);
        }
    }
}

/* -------------------------------------------------------------------------------------------------- avx2 */

T256 static inline __m256i pc_bytes256(__m256i v, __m256i lut, __m256i low) {
    __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

/* 2 rows x 8 columns (two vectors of 4 words); mb, nb: the rows and columns that exist */
T256 static void tile256(const gemm_args *g, ptrdiff_t bt, ptrdiff_t m0, ptrdiff_t mb, ptrdiff_t n0, ptrdiff_t nb) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256i acc[2][2];
    for (int r = 0; r < 2; r++) acc[r][0] = acc[r][1] = zero;
    const uint32_t use = rows_mask(g, bt, m0, mb);
    const ptrdiff_t Kw = g->Kw, Np = g->Npad;
    for (int s = g->Pa + g->Pb - 2; s >= 0; s--) {
        for (int r = 0; r < 2; r++)
            for (int v = 0; v < 2; v++) acc[r][v] = _mm256_add_epi64(acc[r][v], acc[r][v]);
        for (int i = 0; i < g->Pa; i++) {
            int j = s - i;
            if (j < 0 || j >= g->Pb || !((use >> i) & 1u)) continue;
            const uint64_t *ar = g->a + i * g->a_ps + bt * g->a_bs + m0 * Kw;
            const uint64_t *bc = g->b + j * g->b_ps + bt * g->b_bs + n0;
            for (ptrdiff_t k0 = 0; k0 < Kw; k0 += 31) {
                ptrdiff_t k1 = k0 + 31 < Kw ? k0 + 31 : Kw;
                __m256i cnt[2][2] = {{zero, zero}, {zero, zero}};
                for (ptrdiff_t k = k0; k < k1; k++) {
                    __m256i w0 = _mm256_loadu_si256((const __m256i *)(bc + k * Np));
                    __m256i w1 = _mm256_loadu_si256((const __m256i *)(bc + k * Np + 4));
                    for (int r = 0; r < 2; r++) {
                        __m256i x = _mm256_set1_epi64x((long long)ar[(r < mb ? r : 0) * Kw + k]);
                        cnt[r][0] = _mm256_add_epi8(cnt[r][0], pc_bytes256(_mm256_and_si256(x, w0), lut, low));
                        cnt[r][1] = _mm256_add_epi8(cnt[r][1], pc_bytes256(_mm256_and_si256(x, w1), lut, low));
                    }
                }
                for (int r = 0; r < 2; r++)
                    for (int v = 0; v < 2; v++) acc[r][v] = _mm256_add_epi64(acc[r][v], _mm256_sad_epu8(cnt[r][v], zero));
            }
        }
    }
    int64_t lanes[2][8];
    for (int r = 0; r < 2; r++) {
        _mm256_storeu_si256((__m256i *)lanes[r], acc[r][0]);
        _mm256_storeu_si256((__m256i *)(lanes[r] + 4), acc[r][1]);
    }
    for (ptrdiff_t r = 0; r < mb; r++)
        for (ptrdiff_t c = 0; c < nb; c++) {
            ptrdiff_t m = m0 + r, n = n0 + c;
            g->out[bt * g->obs + m * g->ors + n] = bk_finish(g, lanes[r][c], row_sum(g, bt, m, n), m, n);
        }
}

T256 static void run256(const gemm_args *g, ptrdiff_t batch) {
    for (ptrdiff_t bt = 0; bt < batch; bt++)
        for (ptrdiff_t n0 = 0; n0 < g->N; n0 += 8)
            for (ptrdiff_t m0 = 0; m0 < g->M; m0 += 2)
                tile256(g, bt, m0, g->M - m0 < 2 ? g->M - m0 : 2, n0, g->N - n0 < 8 ? g->N - n0 : 8);
}
#endif

/* -------------------------------------------------------------------------------------------------- neon */
#if defined(BK_ARM)
/* 2 rows x 4 columns (two vectors of 2 words) */
static void tile_neon(const gemm_args *g, ptrdiff_t bt, ptrdiff_t m0, ptrdiff_t mb, ptrdiff_t n0, ptrdiff_t nb) {
    uint64x2_t acc[2][2];
    for (int r = 0; r < 2; r++) acc[r][0] = acc[r][1] = vdupq_n_u64(0);
    const uint32_t use = rows_mask(g, bt, m0, mb);
    const ptrdiff_t Kw = g->Kw, Np = g->Npad;
    for (int s = g->Pa + g->Pb - 2; s >= 0; s--) {
        for (int r = 0; r < 2; r++)
            for (int v = 0; v < 2; v++) acc[r][v] = vaddq_u64(acc[r][v], acc[r][v]);
        for (int i = 0; i < g->Pa; i++) {
            int j = s - i;
            if (j < 0 || j >= g->Pb || !((use >> i) & 1u)) continue;
            const uint64_t *ar = g->a + i * g->a_ps + bt * g->a_bs + m0 * Kw;
            const uint64_t *bc = g->b + j * g->b_ps + bt * g->b_bs + n0;
            for (ptrdiff_t k0 = 0; k0 < Kw; k0 += 31) {
                ptrdiff_t k1 = k0 + 31 < Kw ? k0 + 31 : Kw;
                uint8x16_t cnt[2][2];
                for (int r = 0; r < 2; r++) cnt[r][0] = cnt[r][1] = vdupq_n_u8(0);
                for (ptrdiff_t k = k0; k < k1; k++) {
                    uint64x2_t w0 = vld1q_u64(bc + k * Np), w1 = vld1q_u64(bc + k * Np + 2);
                    for (int r = 0; r < 2; r++) {
                        uint64x2_t x = vdupq_n_u64(ar[(r < mb ? r : 0) * Kw + k]);
                        cnt[r][0] = vaddq_u8(cnt[r][0], vcntq_u8(vreinterpretq_u8_u64(vandq_u64(x, w0))));
                        cnt[r][1] = vaddq_u8(cnt[r][1], vcntq_u8(vreinterpretq_u8_u64(vandq_u64(x, w1))));
                    }
                }
                for (int r = 0; r < 2; r++)
                    for (int v = 0; v < 2; v++)
                        acc[r][v] = vpadalq_u32(acc[r][v], vpaddlq_u16(vpaddlq_u8(cnt[r][v])));
            }
        }
    }
    uint64_t lanes[2][4];
    for (int r = 0; r < 2; r++) {
        vst1q_u64(lanes[r], acc[r][0]);
        vst1q_u64(lanes[r] + 2, acc[r][1]);
    }
    for (ptrdiff_t r = 0; r < mb; r++)
        for (ptrdiff_t c = 0; c < nb; c++) {
            ptrdiff_t m = m0 + r, n = n0 + c;
            g->out[bt * g->obs + m * g->ors + n] = bk_finish(g, (int64_t)lanes[r][c], row_sum(g, bt, m, n), m, n);
        }
}

static void run_neon(const gemm_args *g, ptrdiff_t batch) {
    for (ptrdiff_t bt = 0; bt < batch; bt++)
        for (ptrdiff_t n0 = 0; n0 < g->N; n0 += 4)
            for (ptrdiff_t m0 = 0; m0 < g->M; m0 += 2)
                tile_neon(g, bt, m0, g->M - m0 < 2 ? g->M - m0 : 2, n0, g->N - n0 < 4 ? g->N - n0 : 4);
}
#endif

void bk_gemm(const gemm_args *g, ptrdiff_t batch, int isa) {
    if (isa < 0 || !bk_isa_supported(isa)) isa = bk_best_isa();
#if defined(BK_X86)
    if (isa == BK_AVX512) { run512(g, batch); return; }
    if (isa == BK_AVX2) { run256(g, batch); return; }
#endif
#if defined(BK_ARM)
    if (isa == BK_NEON) { run_neon(g, batch); return; }
#endif
    run_scalar(g, batch);
}
