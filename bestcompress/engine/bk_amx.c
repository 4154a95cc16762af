/* The int8 matrix-unit product (x86 AMX) for inputs of several bit planes (the residual stream of spike sums).
 *
 * Popcount work grows with the bit planes of the input (P popcounts per weight word); a matrix unit multiplies
 * 8-bit integers at the same cost for any P <= 8. Where the CPU and OS offer AMX-INT8, a linear layer whose input
 * is q * 2^lsb with q in [0, 255] computes sum_k q[m, k] * w+[k, n] with TDPBUSD (u8 x s8 -> exact int32 sums),
 * then the same epilogue as the popcount kernels: 2 * acc - rowsum, times 2^lsb, alpha, bias, folded BatchNorm,
 * in bk_finish's order. The weights stay one bit each in RAM; each call expands them into 0/1 bytes in the tile
 * layout (VNNI: 4 consecutive k of one column per dword) in thread-local scratch, with VPSHUFBITQMB + PEXT.
 */
#include "bk.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11
#define BK_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bk_amx.h"

static int amx_state = -1; /* -1 unknown, 0 no, 1 yes */

int bk_amx_available(void) {
    if (amx_state >= 0) return amx_state;
    unsigned a, b, c, d;
    int ok = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 24) & 1u) && ((d >> 25) & 1u)) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bitalg") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("fma");
        /* the kernel must grant this process the tile state (Linux >= 5.16: ARCH_REQ_XCOMP_PERM, XTILEDATA) */
        if (ok) ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }
    amx_state = ok;
    return ok;
}

typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tilecfg;

/* weight words (bit t of word (kc, n) = w+[64 kc + t, n], at b[kc * ks + n * ns], columns n < nvalid; columns
 * [Kw][Npad]: ks = Npad, ns = 1; rows [N][Kw]: ks = 1, ns = Kw) -> tiles [nblk][Kw][16 rows][64 bytes] of the
 * column blocks nb0.., row j of a tile = for each of its 16 columns the bytes w+[64 kc + 4 j + 0..3, n] */
TAMX void bk_amx_expand(const uint64_t *b, ptrdiff_t ks, ptrdiff_t ns, ptrdiff_t nvalid, ptrdiff_t Kw, ptrdiff_t nb0,
                        ptrdiff_t nblk, uint8_t *wt) {
    const __m512i ones = _mm512_set1_epi8(1);
    const __m512i base = _mm512_set1_epi64(0x0706050403020100LL);
    const uint64_t even = 0x0F0F0F0F0F0F0F0FULL, odd = 0xF0F0F0F0F0F0F0F0ULL;
    for (ptrdiff_t nb = nb0; nb < nb0 + nblk; nb++)
        for (ptrdiff_t kc = 0; kc < Kw; kc++) {
            const uint64_t *src = b + kc * ks + nb * 16 * ns;
            ptrdiff_t left = nvalid - nb * 16;
            __m512i lo, hi;
            if (ns == 1) {
                __mmask8 lo_k = left >= 8 ? 0xff : (left > 0 ? (__mmask8)((1u << left) - 1u) : 0);
                __mmask8 hi_k = left >= 16 ? 0xff : (left > 8 ? (__mmask8)((1u << (left - 8)) - 1u) : 0);
                lo = _mm512_maskz_loadu_epi64(lo_k, src);
                hi = _mm512_maskz_loadu_epi64(hi_k, src + 8);
            } else {
                uint64_t w[16] __attribute__((aligned(64)));
                for (ptrdiff_t t = 0; t < 16; t++) w[t] = t < left ? src[t * ns] : 0;
                lo = _mm512_load_si512((const void *)w);
                hi = _mm512_load_si512((const void *)(w + 8));
            }
            uint8_t *tile = wt + ((nb - nb0) * Kw + kc) * 1024;
            for (int j = 0; j < 16; j += 2) {
                __m512i ctl = _mm512_add_epi8(base, _mm512_set1_epi8((char)(4 * j)));
                uint64_t rl = _mm512_bitshuffle_epi64_mask(lo, ctl), rh = _mm512_bitshuffle_epi64_mask(hi, ctl);
                uint64_t m0 = _pext_u64(rl, even) | (_pext_u64(rh, even) << 32);
                uint64_t m1 = _pext_u64(rl, odd) | (_pext_u64(rh, odd) << 32);
                _mm512_storeu_si512((void *)(tile + 64 * j), _mm512_maskz_mov_epi8(m0, ones));
                _mm512_storeu_si512((void *)(tile + 64 * (j + 1)), _mm512_maskz_mov_epi8(m1, ones));
            }
        }
}

/* eight tiles of 16 rows x 64 bytes (0-3: sums, 4-5: activations, 6-7: weights) */
static const tilecfg tiles8 = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

/* (constant data: the compiler cannot see that LDTILECFG reads a local's stores and may drop them) */
TAMX void bk_amx_tiles(void) { _tile_loadconfig(&tiles8); }

/* the outputs of a 32 x 32 block (rows m0.., columns n0..) from its int32 sums: bk_finish's operations in its
 * order, 16 lanes at a time, the channel parameters loaded once per block */
TAMX static void epilogue(const gemm_args *g, ptrdiff_t m0, ptrdiff_t n0, const int32_t *cbuf) {
    /* the parameters in locals: the stores through out could alias *g, which would reload every field per row */
    const __m512 sc = _mm512_set1_ps(g->scale), one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    const ptrdiff_t N = g->N, ors = g->ors, mend = g->M - m0 < 32 ? g->M - m0 : 32;
    const int bn = g->bn, has_alpha = g->alpha != NULL, has_bias = g->bias != NULL;
    const int64_t *rowsum = g->rowsum + m0;
    float *out = g->out + m0 * ors;
    for (int h = 0; h < 2; h++) {
        ptrdiff_t n = n0 + 16 * h;
        if (n >= N) return;
        __mmask16 mk = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1u);
        const __m512 al = has_alpha ? _mm512_maskz_loadu_ps(mk, g->alpha + n) : one;
        const __m512 bi = has_bias ? _mm512_maskz_loadu_ps(mk, g->bias + n) : zero;
        __m512 p[4];
        for (int t = 0; t < 4; t++) p[t] = g->bp[t] ? _mm512_maskz_loadu_ps(mk, g->bp[t] + n) : zero;
        for (ptrdiff_t r = 0; r < mend; r++) {
            __m512i a = _mm512_load_si512((const void *)(cbuf + r * 32 + 16 * h));
            __m512i rs = _mm512_set1_epi32((int)rowsum[r]);
            __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(a, a), rs)), sc);
            if (has_alpha) f = _mm512_mul_ps(f, al);
            if (has_bias) f = _mm512_add_ps(f, bi);
            if (bn == 1) f = _mm512_fmadd_ps(f, p[0], p[1]);
            else if (bn == 2) f = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(f, p[0]), p[1]), p[2]), p[3]);
            _mm512_mask_storeu_ps(out + r * ors + n, mk, f);
        }
    }
}

/* q: [Mpad][kpad] bytes, Mpad = M rounded up to 32 (rows past M are zero), kpad = 64 * Kw. Column blocks of 32
 * outer, so each block's weights are expanded once into 2 * Kw KB that stay in L1 while every row block uses
 * them (no layer-sized byte copy of the weights). */
TAMX int bk_amx_linear(const gemm_args *g, const uint8_t *q, ptrdiff_t kpad) {
    if (!bk_amx_available()) return -1;
    const ptrdiff_t Kw = g->Kw, nblk = (g->N + 31) / 32 * 2, mpad = (g->M + 31) / 32 * 32;
    uint8_t *wt = bk_scratch(3, (size_t)(2 * Kw * 1024));
    if (!wt) return -1;
    bk_amx_tiles();
    /* two sum buffers: the epilogue of the previous block runs on the vector units while the matrix unit
     * multiplies the next one (the tile stores wait for it only after that) */
    int32_t cbuf[2][32 * 32] __attribute__((aligned(64)));
    ptrdiff_t pm = -1, pn = 0;
    int slot = 0;
    for (ptrdiff_t nb = 0; nb < nblk; nb += 2) {
        bk_amx_expand(g->b, g->Npad, 1, g->Npad, Kw, nb, 2, wt);
        const uint8_t *b0 = wt, *b1 = wt + Kw * 1024;
        for (ptrdiff_t m0 = 0; m0 < mpad; m0 += 32) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            const uint8_t *a0 = q + m0 * kpad, *a1 = q + (m0 + 16) * kpad;
            for (ptrdiff_t kc = 0; kc < Kw; kc++) {
                bk_amx_step(a0 + 64 * kc, a1 + 64 * kc, kpad, b0 + 1024 * kc, b1 + 1024 * kc);
            }
            if (pm >= 0) epilogue(g, pm, pn, cbuf[slot ^ 1]);
            int32_t *c = cbuf[slot];
            _tile_stored(0, c, 128);
            _tile_stored(1, c + 16, 128);
            _tile_stored(2, c + 16 * 32, 128);
            _tile_stored(3, c + 16 * 32 + 16, 128);
            pm = m0; pn = nb * 16; slot ^= 1;
        }
    }
    if (pm >= 0) epilogue(g, pm, pn, cbuf[slot ^ 1]);
    _tile_release();
    return 0;
}

#else
int bk_amx_available(void) { return 0; }
int bk_amx_linear(const gemm_args *g, const uint8_t *q, ptrdiff_t kpad) { (void)g; (void)q; (void)kpad; return -1; }
#endif
