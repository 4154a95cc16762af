/* What the two AMX files (bk_amx.c: linear layers, bk_amx_conv.c: convolutions) share: the target attribute and the
 * inner step of a 32 x 32 output block. Include only inside their `#if` for GCC >= 11 on x86-64 Linux. */
#ifndef BK_AMX_H
#define BK_AMX_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

#define TAMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl,avx512bitalg,bmi2,fma")))

/* One 64-byte chunk of K for the 32 x 32 block held in tiles 0..3: input rows from a0 and a1 (16 rows each,
 * `stride` bytes apart), the two 16-column weight tiles b0 and b1 (16 rows of 64 bytes); tiles 4..7 are scratch. */
TAMX static inline __attribute__((always_inline)) void bk_amx_step(const uint8_t *a0, const uint8_t *a1,
                                                                   size_t stride, const uint8_t *b0,
                                                                   const uint8_t *b1) {
    _tile_loadd(4, a0, stride);
    _tile_loadd(5, a1, stride);
    _tile_loadd(6, b0, 64);
    _tile_loadd(7, b1, 64);
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
}

#endif
