/* AVX-512 helpers of more than one kernel file (native_expansion.c, native_attention.c). */
#ifndef NATIVE_SIMD_H
#define NATIVE_SIMD_H
#if defined(__AVX512F__)
#include <immintrin.h>

int tiles_granted(void); /* native_tiles.c */

/* What tile_kernels() and attention_kernels() answer where the compiler targets AVX512-BF16, bit by
 * bit (nn/native.py's _running): 1, the products in vectors; 2, in AMX tiles too, where Linux
 * granted them. */
static inline int products_here(void) { return 1 | (tiles_granted() ? 2 : 0); }

/* r[i] = lane i of every r[j] (a 16 x 16 transpose of 32-bit lanes): pairs, then quadruples, then
 * 128-bit quarters, then halves interleaved. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 8; i++) {
        const int a = i / 4 * 8 + i % 4;
        t[a] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0x88);
        t[a + 4] = _mm512_shuffle_i32x4(r[a], r[a + 4], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    }
}
#endif
#endif
