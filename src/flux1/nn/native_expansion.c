/* Quantized weights expanded for the CPU's GEMMs in one pass: value = code * scale + offset per
 * group, in fp32 (the product and the sum each rounded, as NumPy's passes compute it: built with
 * -ffp-contract=off, no fused multiply-add), written as fp32 or rounded to the nearest bf16 (ties
 * to even, the bits of numpy_cpu.round_to_bf16). Compiled for this CPU by nn/native.py.
 *
 * expand_<bits>_<dtype>: the codes come in `units` of `unit_values` codes, unit u's at codes + u *
 * unit_stride (a row of MLX's packed codes), packed as MLX packs them: a little-endian bit stream,
 * 8 codes in `bits` bytes (two 4-bit codes a byte, the low one first); scales and offsets hold one
 * value per group of `group` values of the units laid end to end, and so does out (C-contiguous).
 * expand_<type>_<dtype>: GGUF blocks of that type straight to values, their scales decoded too.
 * With `stream`, out is written past the cache where the kernel writes with AVX-512 (MLX's codes
 * of every width, Q4_K's) and out's lines start: a whole weight, which the cache cannot hold, is
 * then written without each line being read first and without evicting what the cache holds; the
 * products' buffers of a row are written with stream 0, to be read at once. */
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float to_fp32(float x) { return x; }

#ifdef __AVX512BW__
#include <immintrin.h>

#include "native_simd.h"

/* The 16 values a group's 4-bit codes stand for (code * scale + offset for codes 0-15: a product
 * and a sum, each rounded, as the scalar code computes them), and for 16 bytes of two codes each
 * the codes in order as 32 16-bit lanes (byte j's low code in lane 2j, its high one in lane 2j +
 * 1): the group's values are looked up in the table, not computed a code at a time. */
static inline __m512 code_values(float scale, float offset) {
    const __m512i codes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(codes), _mm512_set1_ps(scale));
    return _mm512_add_ps(product, _mm512_set1_ps(offset));
}

/* to_bf16 of 16 floats. */
static inline __m256i bf16_halves(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

/* code_values rounded to bf16: the table 4-bit codes are looked up in. */
static inline __m512i bf16_table(float scale, float offset) {
    return _mm512_castsi256_si512(bf16_halves(code_values(scale, offset)));
}

static inline __m512i nibble_lanes(const uint8_t *c) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    const __m512i low = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
    return _mm512_or_si512(low, _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0xF0)), 12));
}

/* code * scale + offset of 16 8-bit codes. */
static inline __m512 byte_values(const uint8_t *c, __m512 scale, __m512 offset) {
    const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c)));
    return _mm512_add_ps(_mm512_mul_ps(codes, scale), offset);
}

static inline void store(void *o, __m512i v, int stream) {
    if (stream && ((uintptr_t)o & 63) == 0)
        _mm512_stream_si512(o, v);
    else
        _mm512_storeu_si512(o, v);
}
#endif

/* After a kernel's streamed stores: they reach memory before the kernel returns. */
static inline void streamed(int stream) {
#ifdef __AVX512BW__
    if (stream)
        _mm_sfence();
#endif
    (void)stream;
}

/* The values of `count` bytes of two 4-bit codes each (the low one first): o[2j], o[2j + 1] =
 * code * scale + offset of byte j's low and high code. */
static inline void to_fp32_pairs(const uint8_t *c, int64_t count, float scale, float offset, float *o,
                                 int stream) {
    int64_t j = 0;
#ifdef __AVX512BW__
    const __m512 table = code_values(scale, offset);
    for (; j + 16 <= count; j += 16) {
        const __m512i lanes = nibble_lanes(c + j);
        const __m512i first = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(lanes));
        const __m512i second = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(lanes, 1));
        store(o + 2 * j, _mm512_castps_si512(_mm512_permutexvar_ps(first, table)), stream);
        store(o + 2 * j + 16, _mm512_castps_si512(_mm512_permutexvar_ps(second, table)), stream);
    }
#endif
    for (; j < count; j++) {
        o[2 * j] = (float)(c[j] & 15) * scale + offset;
        o[2 * j + 1] = (float)(c[j] >> 4) * scale + offset;
    }
}

static inline void to_bf16_pairs(const uint8_t *c, int64_t count, float scale, float offset, uint16_t *o,
                                 int stream) {
    int64_t j = 0;
#ifdef __AVX512BW__
    const __m512i table = bf16_table(scale, offset);
    for (; j + 16 <= count; j += 16)
        store(o + 2 * j, _mm512_permutexvar_epi16(nibble_lanes(c + j), table), stream);
#endif
    for (; j < count; j++) {
        o[2 * j] = to_bf16((float)(c[j] & 15) * scale + offset);
        o[2 * j + 1] = to_bf16((float)(c[j] >> 4) * scale + offset);
    }
}

/* o[j] = code j * scale + offset for `count` 8-bit codes. */
static inline void to_fp32_bytes(const uint8_t *c, int64_t count, float scale, float offset, float *o,
                                 int stream) {
    int64_t j = 0;
#ifdef __AVX512BW__
    const __m512 s = _mm512_set1_ps(scale), b = _mm512_set1_ps(offset);
    for (; j + 16 <= count; j += 16)
        store(o + j, _mm512_castps_si512(byte_values(c + j, s, b)), stream);
#endif
    for (; j < count; j++)
        o[j] = (float)c[j] * scale + offset;
}

static inline void to_bf16_bytes(const uint8_t *c, int64_t count, float scale, float offset, uint16_t *o,
                                 int stream) {
    int64_t j = 0;
#ifdef __AVX512BW__
    const __m512 s = _mm512_set1_ps(scale), b = _mm512_set1_ps(offset);
    for (; j + 32 <= count; j += 32) {
        const __m256i low = bf16_halves(byte_values(c + j, s, b)), high = bf16_halves(byte_values(c + j + 16, s, b));
        store(o + j, _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1), stream);
    }
#endif
    for (; j < count; j++)
        o[j] = to_bf16((float)c[j] * scale + offset);
}

#define EXPAND(name, type, convert, bits)                                                            \
    void name(const uint8_t *codes, int64_t units, int64_t unit_values, int64_t unit_stride,         \
              const float *scales, const float *offsets, int64_t group, type *out,                   \
              int stream) {                                                                          \
        const int64_t groups = unit_values / group;                                                  \
        for (int64_t u = 0; u < units; u++) {                                                        \
            for (int64_t g = 0; g < groups; g++) {                                                   \
                const int64_t at = u * groups + g;                                                   \
                const float scale = scales[at], offset = offsets[at];                                \
                const uint8_t *c = codes + u * unit_stride + g * group * bits / 8;                   \
                type *o = out + at * group;                                                          \
                if (bits == 8) {                                                                     \
                    convert##_bytes(c, group, scale, offset, o, stream);                                     \
                } else if (bits == 4) {                                                              \
                    convert##_pairs(c, group / 2, scale, offset, o, stream);                         \
                } else { /* unpacked to bytes first, then converted as in the 8-bit case */          \
                    uint8_t unpacked[group];                                                         \
                    for (int64_t j = 0; j < group; j += 8) {                                         \
                        uint64_t word = 0;                                                           \
                        memcpy(&word, c + j / 8 * bits, bits);                                       \
                        for (int k = 0; k < 8; k++)                                                  \
                            unpacked[j + k] = (word >> (k * bits)) & ((1u << bits) - 1);             \
                    }                                                                                \
                    convert##_bytes(unpacked, group, scale, offset, o, stream);                              \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        streamed(stream);                                                                            \
    }

/* out [count] (fp32) = the bf16 values in [count] (bits), exactly: each shifted into the high half,
 * written past the cache as the expansions write (a whole weight, widened for an fp32 GEMM). */
void widen_bf16(const uint16_t *in, int64_t count, float *out, int stream) {
    int64_t j = 0;
#ifdef __AVX512BW__
    for (; j + 16 <= count; j += 16) {
        const __m512i values = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(in + j)));
        store(out + j, _mm512_slli_epi32(values, 16), stream);
    }
#endif
    for (; j < count; j++) {
        const uint32_t bits = (uint32_t)in[j] << 16;
        memcpy(out + j, &bits, sizeof bits);
    }
    streamed(stream);
}

EXPAND(expand_3_fp32, float, to_fp32, 3)
EXPAND(expand_3_bf16, uint16_t, to_bf16, 3)
EXPAND(expand_4_fp32, float, to_fp32, 4)
EXPAND(expand_4_bf16, uint16_t, to_bf16, 4)
EXPAND(expand_5_fp32, float, to_fp32, 5)
EXPAND(expand_5_bf16, uint16_t, to_bf16, 5)
EXPAND(expand_6_fp32, float, to_fp32, 6)
EXPAND(expand_6_bf16, uint16_t, to_bf16, 6)
EXPAND(expand_8_fp32, float, to_fp32, 8)
EXPAND(expand_8_bf16, uint16_t, to_bf16, 8)

/* f16 bits to float, exactly (subnormals, infinities and NaNs included). */
static inline float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    float value;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else {
        value = (float)mantissa * 0x1p-24f; /* zero or subnormal: exact */
        memcpy(&bits, &value, sizeof bits);
        bits |= sign;
    }
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* A K-quant block's f16 d and dmin (at the start of Q4_K's and Q5_K's blocks, the end of Q2_K's). */
static inline void scale_and_min(const uint8_t *block, float *d, float *dmin) {
    uint16_t halves[2];
    memcpy(halves, block, sizeof halves);
    *d = from_f16(halves[0]);
    *dmin = from_f16(halves[1]);
}

/* Sub-block s (0-7) of a Q4_K/Q5_K block's 12 bytes of 6-bit scales and mins (ggml's
 * get_scale_min_k4). */
static inline void scale_min_k4(const uint8_t *q, int s, int *scale, int *min) {
    *scale = s < 4 ? q[s] & 63 : (q[s + 4] & 15) | ((q[s - 4] >> 6) << 4);
    *min = s < 4 ? q[s + 4] & 63 : (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
}

/* GGUF Q4_K blocks as flux1 holds them (gguf/blocks.py's Q4_K_PAIRED: 144 bytes, the f16 d and dmin,
 * 12 bytes of 6-bit sub-block scales and mins, 128 bytes of MLX-ordered nibbles): each sub-block of
 * 32 values is code * (d * scale) + -(dmin * min), as gguf/blocks.py's _k_affine. q4_k_affine writes
 * the scale and offset of each sub-block of `count` blocks (`stride` bytes apart), 8 a block. */
void q4_k_affine(const uint8_t *blocks, int64_t count, int64_t stride, float *scales, float *offsets) {
    for (int64_t b = 0; b < count; b++) {
        const uint8_t *block = blocks + b * stride;
        float d, dmin;
        scale_and_min(block, &d, &dmin);
        for (int s = 0; s < 8; s++) {
            int scale_bits, min_bits;
            scale_min_k4(block + 4, s, &scale_bits, &min_bits);
            scales[b * 8 + s] = (float)scale_bits * d;
            offsets[b * 8 + s] = -((float)min_bits * dmin);
        }
    }
}

#define EXPAND_Q4_K(name, type, convert)                                                             \
    void name(const uint8_t *blocks, int64_t count, int64_t stride, type *out, int stream) {         \
        for (int64_t b = 0; b < count; b++) {                                                        \
            float scales[8], offsets[8];                                                             \
            q4_k_affine(blocks + b * stride, 1, stride, scales, offsets);                            \
            for (int s = 0; s < 8; s++)                                                              \
                convert##_pairs(blocks + b * stride + 16 + s * 16, 16, scales[s], offsets[s],        \
                                out + b * 256 + s * 32, stream);                                     \
        }                                                                                            \
        streamed(stream);                                                                            \
    }

EXPAND_Q4_K(expand_q4_k_fp32, float, to_fp32)
EXPAND_Q4_K(expand_q4_k_bf16, uint16_t, to_bf16)

/* GGUF's blocks of 32 values, as in the file: the f16 d (Q4_1, Q5_1: then the f16 m), Q5's 4 bytes
 * of fifth bits, then 16 bytes of nibbles (value j low, value j + 16 high), or Q8_0's 32 int8.
 * Each value is code * d + offset as gguf/blocks.py decodes it: the code unsigned (Q8_0's q + 128)
 * and the offset m, or -d times the middle code (8, 16, 128). */
#define EXPAND_LEGACY(name, type, convert, code_bits, with_min)                                      \
    void name(const uint8_t *blocks, int64_t count, int64_t stride, type *out, int stream) {         \
        for (int64_t b = 0; b < count; b++) {                                                        \
            const uint8_t *block = blocks + b * stride;                                              \
            uint16_t halves[2];                                                                      \
            memcpy(halves, block, sizeof halves);                                                    \
            const float d = from_f16(halves[0]);                                                     \
            const float offset = with_min ? from_f16(halves[1]) : -(float)(1 << (code_bits - 1)) * d;\
            const uint8_t *q = block + (with_min ? 4 : 2) + (code_bits == 5 ? 4 : 0);                \
            type *o = out + b * 32;                                                                  \
            if (code_bits == 8) {                                                                    \
                for (int j = 0; j < 32; j++)                                                         \
                    o[j] = convert((float)(uint8_t)(q[j] ^ 0x80) * d + offset);                      \
            } else {                                                                                 \
                uint32_t fifth = 0;                                                                  \
                if (code_bits == 5)                                                                  \
                    memcpy(&fifth, q - 4, sizeof fifth);                                             \
                for (int j = 0; j < 16; j++) {                                                       \
                    const unsigned low = (q[j] & 15) | (((fifth >> j) & 1) << 4);                    \
                    const unsigned high = (q[j] >> 4) | (((fifth >> (j + 16)) & 1) << 4);            \
                    o[j] = convert((float)low * d + offset);                                         \
                    o[j + 16] = convert((float)high * d + offset);                                   \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

EXPAND_LEGACY(expand_q4_0_fp32, float, to_fp32, 4, 0)
EXPAND_LEGACY(expand_q4_0_bf16, uint16_t, to_bf16, 4, 0)
EXPAND_LEGACY(expand_q4_1_fp32, float, to_fp32, 4, 1)
EXPAND_LEGACY(expand_q4_1_bf16, uint16_t, to_bf16, 4, 1)
EXPAND_LEGACY(expand_q5_0_fp32, float, to_fp32, 5, 0)
EXPAND_LEGACY(expand_q5_0_bf16, uint16_t, to_bf16, 5, 0)
EXPAND_LEGACY(expand_q5_1_fp32, float, to_fp32, 5, 1)
EXPAND_LEGACY(expand_q5_1_bf16, uint16_t, to_bf16, 5, 1)
EXPAND_LEGACY(expand_q8_0_fp32, float, to_fp32, 8, 0)
EXPAND_LEGACY(expand_q8_0_bf16, uint16_t, to_bf16, 8, 0)

/* GGUF Q5_K blocks as in the file (176 bytes: f16 d and dmin, 12 bytes of scales and mins, 32 bytes
 * of fifth bits, 128 of nibbles): each run of 64 values is 32 low nibbles then 32 high ones, their
 * fifth bits bits 2r and 2r + 1 of the 32 bytes; value = code * (d * scale) - dmin * min. */
#define EXPAND_Q5_K(name, type, convert)                                                             \
    void name(const uint8_t *blocks, int64_t count, int64_t stride, type *out, int stream) {         \
        for (int64_t b = 0; b < count; b++) {                                                        \
            const uint8_t *block = blocks + b * stride, *q = block + 4, *qh = block + 16;            \
            float d, dmin;                                                                           \
            scale_and_min(block, &d, &dmin);                                                         \
            for (int r = 0; r < 4; r++) {                                                            \
                const uint8_t *ql = block + 48 + 32 * r;                                             \
                for (int half = 0; half < 2; half++) {                                               \
                    int scale_bits, min_bits;                                                        \
                    scale_min_k4(q, 2 * r + half, &scale_bits, &min_bits);                           \
                    const float scale = (float)scale_bits * d, offset = -((float)min_bits * dmin);   \
                    type *o = out + b * 256 + 64 * r + 32 * half;                                    \
                    for (int l = 0; l < 32; l++) {                                                   \
                        const unsigned code = ((ql[l] >> (4 * half)) & 15) |                         \
                                              (((qh[l] >> (2 * r + half)) & 1) << 4);                \
                        o[l] = convert((float)code * scale + offset);                                \
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

/* GGUF Q6_K blocks as in the file (210 bytes: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16
 * int8 scales, the f16 d): value = (code - 32) * (d * scale), as gguf-py computes it. */
#define EXPAND_Q6_K(name, type, convert)                                                             \
    void name(const uint8_t *blocks, int64_t count, int64_t stride, type *out, int stream) {         \
        for (int64_t b = 0; b < count; b++) {                                                        \
            const uint8_t *block = blocks + b * stride;                                              \
            const int8_t *scales = (const int8_t *)(block + 192);                                    \
            uint16_t half;                                                                           \
            memcpy(&half, block + 208, sizeof half);                                                 \
            const float d = from_f16(half);                                                          \
            for (int n = 0; n < 2; n++) {                                                            \
                const uint8_t *ql = block + 64 * n, *qh = block + 128 + 32 * n;                      \
                type *o = out + b * 256 + 128 * n;                                                   \
                for (int part = 0; part < 4; part++) {                                               \
                    const uint8_t *low = ql + 32 * (part & 1);                                       \
                    const int low_shift = 4 * (part >> 1), high_shift = 2 * part;                    \
                    for (int sub = 0; sub < 2; sub++) {                                              \
                        const float scale = d * (float)scales[8 * n + sub + 2 * part];               \
                        for (int l = 16 * sub; l < 16 * sub + 16; l++) {                             \
                            const int code = ((low[l] >> low_shift) & 15) |                          \
                                             (((qh[l] >> high_shift) & 3) << 4);                     \
                            o[32 * part + l] = convert((float)(code - 32) * scale);                  \
                        }                                                                            \
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

EXPAND_Q5_K(expand_q5_k_fp32, float, to_fp32)
EXPAND_Q5_K(expand_q5_k_bf16, uint16_t, to_bf16)
EXPAND_Q6_K(expand_q6_k_fp32, float, to_fp32)
EXPAND_Q6_K(expand_q6_k_bf16, uint16_t, to_bf16)

/* GGUF Q2_K blocks as in the file (84 bytes: 16 bytes of 4-bit scale | 4-bit min, 64 bytes of 2-bit
 * codes, the f16 d and dmin): each half of 128 values is 4 runs of 32 (codes at bits 2j of its 32
 * bytes), each run two sub-blocks of 16; value = code * (d * scale) - dmin * min. */
#define EXPAND_Q2_K(name, type, convert)                                                             \
    void name(const uint8_t *blocks, int64_t count, int64_t stride, type *out, int stream) {         \
        for (int64_t b = 0; b < count; b++) {                                                        \
            const uint8_t *block = blocks + b * stride;                                              \
            float d, dmin;                                                                           \
            scale_and_min(block + 80, &d, &dmin);                                                    \
            for (int sub = 0; sub < 16; sub++) {                                                     \
                const float scale = (float)(block[sub] & 15) * d;                                    \
                const float offset = -((float)(block[sub] >> 4) * dmin);                             \
                const uint8_t *q = block + 16 + 32 * (sub / 8) + 16 * (sub & 1);                     \
                const int shift = 2 * ((sub / 2) & 3);                                               \
                type *o = out + b * 256 + 16 * sub;                                                  \
                for (int l = 0; l < 16; l++)                                                         \
                    o[l] = convert((float)((q[l] >> shift) & 3) * scale + offset);                   \
            }                                                                                        \
        }                                                                                            \
    }

EXPAND_Q2_K(expand_q2_k_fp32, float, to_fp32)
EXPAND_Q2_K(expand_q2_k_bf16, uint16_t, to_bf16)

/* GGUF Q3_K blocks as in the file (110 bytes: 32 bytes of high bits, 64 of 2-bit codes, 12 of 6-bit
 * sub-block scales, the f16 d): value v's code is bits 2j of byte 32 * (v / 128) + v % 32 (j = v %
 * 128 / 32), less 4 where its high bit (bit v / 32 of byte v % 32) is clear; value = code * (d *
 * (scale - 32)), as gguf-py computes it. */
#define EXPAND_Q3_K(name, type, convert)                                                             \
    void name(const uint8_t *blocks, int64_t count, int64_t stride, type *out, int stream) {         \
        for (int64_t b = 0; b < count; b++) {                                                        \
            const uint8_t *block = blocks + b * stride, *high = block, *low = block + 32;            \
            const uint8_t *scales = block + 96;                                                      \
            uint16_t half;                                                                           \
            memcpy(&half, block + 108, sizeof half);                                                 \
            const float d = from_f16(half);                                                          \
            for (int sub = 0; sub < 16; sub++) {                                                     \
                const int scale_low = sub < 8 ? scales[sub] & 15 : scales[sub - 8] >> 4;             \
                const int scale_high = (scales[8 + sub % 4] >> (2 * (sub / 4))) & 3;                 \
                const float scale = d * (float)((scale_low | (scale_high << 4)) - 32);               \
                const int v0 = 16 * sub, shift = 2 * (v0 % 128 / 32), bit = v0 / 32;                 \
                const uint8_t *q = low + 32 * (v0 / 128) + v0 % 32, *h = high + v0 % 32;             \
                type *o = out + b * 256 + v0;                                                        \
                for (int l = 0; l < 16; l++) {                                                       \
                    const int code = ((q[l] >> shift) & 3) - (((h[l] >> bit) & 1) ? 0 : 4);          \
                    o[l] = convert((float)code * scale);                                             \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

EXPAND_Q3_K(expand_q3_k_fp32, float, to_fp32)
EXPAND_Q3_K(expand_q3_k_bf16, uint16_t, to_bf16)

/* Products of a few rows x [rows, cols] (fp32) with a quantized weight straight from its codes: y[r *
 * y_stride + n] (+)= x[r] . w[n] for weight rows first <= n < last, each expanded to fp32 by its
 * format's kernel into a buffer the cache holds, then multiplied by every row of x. Expanding the
 * whole weight first writes it out and reads it back: for a product of a row or a few, moving
 * those bytes is most of the work. */
static void dots(const float *w, const float *x, int64_t rows, int64_t cols, float *y, int64_t y_stride,
                 int accumulate) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * cols;
        float sums[16] = {0}, total = accumulate ? y[r * y_stride] : 0.0f;
        int64_t j = 0;
        for (; j + 16 <= cols; j += 16)
            for (int l = 0; l < 16; l++)
                sums[l] += row[j + l] * w[j + l];
        for (; j < cols; j++)
            total += row[j] * w[j];
        for (int l = 0; l < 16; l++)
            total += sums[l];
        y[r * y_stride] = total;
    }
}

typedef void (*affine_kernel)(const uint8_t *, int64_t, int64_t, int64_t, const float *, const float *,
                              int64_t, float *, int);
typedef void (*block_kernel)(const uint8_t *, int64_t, int64_t, float *, int);

/* MLX's codes (rows of code_stride bytes; scales and offsets [weight rows, cols / group]) through
 * `expand`, one of expand_<bits>_fp32. */
void affine_products(affine_kernel expand, const uint8_t *codes, int64_t code_stride, const float *scales,
                     const float *offsets, int64_t group, const float *x, int64_t rows, int64_t cols,
                     float *y, int64_t y_stride, int accumulate, int64_t first, int64_t last) {
    float w[cols];
    for (int64_t n = first; n < last; n++) {
        const int64_t at = n * (cols / group);
        expand(codes + n * code_stride, 1, cols, code_stride, scales + at, offsets + at, group, w, 0);
        dots(w, x, rows, cols, y + n, y_stride, accumulate);
    }
}

/* GGUF blocks (weight rows of row_stride bytes, `blocks` blocks of block_stride bytes each) through
 * `expand`, one of expand_<type>_fp32. */
void block_products(block_kernel expand, const uint8_t *weight, int64_t row_stride, int64_t blocks,
                    int64_t block_stride, const float *x, int64_t rows, int64_t cols, float *y,
                    int64_t y_stride, int accumulate, int64_t first, int64_t last) {
    float w[cols];
    for (int64_t n = first; n < last; n++) {
        expand(weight + n * row_stride, blocks, block_stride, w, 0);
        dots(w, x, rows, cols, y + n, y_stride, accumulate);
    }
}

/* A GEMM of bf16 products with fp32 sums, in AMX tiles or in AVX512-BF16 vectors: y [M, n] (+= with
 * `accumulate`, else + bias [n] where not NULL: the sums start from it) = x @ W^T for W's rows first
 * <= n < last (multiples of 32), W a struct tile_weight (bf16 rows, or MLX's or Q4_K's 4-bit codes),
 * x [M, K] packed by pack_tile_rows. K is taken TILE_DEPTH columns at a time, and for each such slice
 * of x (kept in the cache while it is used) W a block of TILE_ROWS rows at a time: laid out as AMX
 * takes its right operand (tile_block; codes expanded to bf16 on the way by expand_4_bf16's
 * arithmetic), then multiplied with every 32 rows of x, kept in y between slices of K: bf16 products
 * summed in fp32, 32 of K at a time in order (by the tiles; the vectors sum pairs of K in order). Codes
 * never leave the cache expanded. 128 rows a block: x, too big for L2, is read once per block (half
 * as often as with 64), and the block (768 KB at full depth) stays in L2 beside the 32 rows of x at
 * hand. tile_kernels() says which products run here: the vectors where the compiler targets
 * AVX512-BF16, the tiles where it targets AMX-BF16 and Linux granted them. */
#define TILE_ROWS 128
#define TILE_DEPTH 3072
void configure_tiles(void); /* native_tiles.c */

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
int tile_kernels(void) { return products_here(); }

/* A weight for tile_products: rows of `stride` bytes at data, bf16 values (scales NULL) or 4-bit
 * codes with scales and offsets [rows, groups] (fp32, or bf16 where `bf16_scales`: read as they are
 * stored, not converted per call), each for `group` values of a row: MLX's packed codes, or with
 * `q4_k` Q4_K_PAIRED blocks (their scales decoded by q4_k_affine, group 32). */
struct tile_weight {
    const uint8_t *data;
    int64_t stride;
    const void *scales, *offsets;
    int64_t groups, group, q4_k, bf16_scales;
};

/* Scale or offset `at` of a tile_weight's. */
static inline float tile_scale(const struct tile_weight *w, const void *values, int64_t at) {
    if (!w->bf16_scales)
        return ((const float *)values)[at];
    const uint32_t bits = (uint32_t)((const uint16_t *)values)[at] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* The 16 bytes of row n's 4-bit codes for columns k..k + 31 (k a multiple of 32). */
static inline const uint8_t *tile_codes(const struct tile_weight *w, int64_t n, int64_t k) {
    const uint8_t *row = w->data + n * w->stride;
    return w->q4_k ? row + k / 256 * 144 + 16 + k % 256 / 32 * 16 : row + k / 2;
}

/* W's rows n..n + 15, columns k0..k0 + depth, as AMX's right operand: a 1 KB tile per 32 columns, its
 * row p the 16 rows' values 2p and 2p + 1 of those 32, side by side. */
static void tile_block(const struct tile_weight *w, int64_t n, int64_t k0, int64_t depth, uint32_t *out) {
    __m512i tables[16], r[16];
    for (int64_t d = 0; d < depth; d += 32) {
        const int64_t k = k0 + d;
        if (w->scales == NULL) {
            for (int i = 0; i < 16; i++)
                r[i] = _mm512_loadu_si512(w->data + (n + i) * w->stride + k * 2);
        } else {
            if (d == 0 || k % w->group == 0)
                for (int i = 0; i < 16; i++) {
                    const int64_t at = (n + i) * w->groups + k / w->group;
                    tables[i] = bf16_table(tile_scale(w, w->scales, at), tile_scale(w, w->offsets, at));
                }
            for (int i = 0; i < 16; i++)
                r[i] = _mm512_permutexvar_epi16(nibble_lanes(tile_codes(w, n + i, k)), tables[i]);
        }
        transpose16(r);
        for (int p = 0; p < 16; p++)
            _mm512_store_si512(out + d / 32 * 256 + p * 16, r[p]);
    }
}

/* sums [32 x 32] (fp32, rows stride floats apart) = 32 rows of x, from its tiles a (the next 16 rows
 * `panel` values on), times W's 32 rows' tiles b, over steps x 32 columns; added to sums where
 * `load`, else to `bias` (W's 32 rows' biases, each row of sums starting from them) or to zeros. In
 * vectors: 8 rows x 32 columns at a time, each pair of a row's values broadcast against the pairs of
 * W's 32 rows (a tile row of b each 16). */
static inline void product_in_vectors(const uint16_t *a, int64_t panel, const uint32_t *b, int64_t steps,
                                      float *sums, int64_t stride, int load, const float *bias) {
    for (int64_t r0 = 0; r0 < 32; r0 += 8) {
        const uint16_t *rows = a + r0 / 16 * panel + r0 % 16 * 32;
        __m512 s[8][2];
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < 2; j++)
                s[i][j] = load ? _mm512_loadu_ps(sums + (r0 + i) * stride + 16 * j)
                          : bias != NULL ? _mm512_loadu_ps(bias + 16 * j)
                                         : _mm512_setzero_ps();
        for (int64_t d = 0; d < steps; d++)
            for (int p = 0; p < 16; p++) {
                const __m512bh low = (__m512bh)_mm512_load_si512(b + d * 256 + p * 16);
                const __m512bh high = (__m512bh)_mm512_load_si512(b + (steps + d) * 256 + p * 16);
                for (int i = 0; i < 8; i++) {
                    const __m512bh pair = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(rows + d * 512 + i * 32 + 2 * p));
                    s[i][0] = _mm512_dpbf16_ps(s[i][0], pair, low);
                    s[i][1] = _mm512_dpbf16_ps(s[i][1], pair, high);
                }
            }
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < 2; j++)
                _mm512_storeu_ps(sums + (r0 + i) * stride + 16 * j, s[i][j]);
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* product_in_vectors' block by AMX's tiles. */
static inline void product_in_tiles(const uint16_t *a, int64_t panel, const uint32_t *b, int64_t steps, float *sums,
                                int64_t stride, int load, const float *bias) {
    if (load) {
        _tile_loadd(0, sums, stride * 4);
        _tile_loadd(1, sums + 16, stride * 4);
        _tile_loadd(2, sums + 16 * stride, stride * 4);
        _tile_loadd(3, sums + 16 * stride + 16, stride * 4);
    } else if (bias != NULL) { /* a stride of 0: the same 16 biases in every row */
        _tile_loadd(0, bias, 0);
        _tile_loadd(1, bias + 16, 0);
        _tile_loadd(2, bias, 0);
        _tile_loadd(3, bias + 16, 0);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t d = 0; d < steps; d++) {
        _tile_loadd(4, a + d * 512, 64);
        _tile_loadd(5, a + panel + d * 512, 64);
        _tile_loadd(6, b + d * 256, 64);
        _tile_loadd(7, b + (steps + d) * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, sums, stride * 4);
    _tile_stored(1, sums + 16, stride * 4);
    _tile_stored(2, sums + 16 * stride, stride * 4);
    _tile_stored(3, sums + 16 * stride + 16, stride * 4);
}

#endif

static inline void tile_product(int tiles, const uint16_t *a, int64_t panel, const uint32_t *b, int64_t steps,
                                float *sums, int64_t stride, int load, const float *bias) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles) {
        product_in_tiles(a, panel, b, steps, sums, stride, load, bias);
        return;
    }
#endif
    product_in_vectors(a, panel, b, steps, sums, stride, load, bias);
}

void tile_products(const struct tile_weight *w, const uint16_t *x, int64_t rows, int64_t cols, float *y,
                   int64_t y_stride, int accumulate, const float *bias, int64_t first, int64_t last, int tiles) {
    uint32_t *block = aligned_alloc(64, TILE_ROWS * TILE_DEPTH * sizeof(uint16_t));
    float tail[32 * 32]; /* the last rows' sums, where fewer than 32 are left */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles)
        configure_tiles();
#endif
    for (int64_t k0 = 0; k0 < cols; k0 += TILE_DEPTH) {
        const int64_t depth = cols - k0 < TILE_DEPTH ? cols - k0 : TILE_DEPTH, steps = depth / 32;
        const int load = accumulate || k0 > 0;
        for (int64_t n0 = first; n0 < last; n0 += TILE_ROWS) {
            const int64_t count = last - n0 < TILE_ROWS ? last - n0 : TILE_ROWS;
            for (int64_t s = 0; s < count; s += 16)
                tile_block(w, n0 + s, k0, depth, block + s * depth / 2);
            for (int64_t m = 0; m < rows; m += 32) {
                const uint16_t *a = x + m * cols + k0 * 16; /* x's panels: 16 rows x cols each */
                const int64_t valid = rows - m < 32 ? rows - m : 32;
                for (int64_t s = 0; s < count; s += 32) {
                    float *sums = y + m * y_stride + n0 + s;
                    const float *biases = bias == NULL ? NULL : bias + n0 + s;
                    if (valid == 32) {
                        tile_product(tiles, a, 16 * cols, block + s * depth / 2, steps, sums, y_stride, load, biases);
                        continue;
                    }
                    for (int64_t r = 0; r < 32; r++)
                        for (int64_t j = 0; j < 32; j++)
                            tail[r * 32 + j] = load && r < valid ? sums[r * y_stride + j] : biases ? biases[j] : 0.0f;
                    tile_product(tiles, a, 16 * cols, block + s * depth / 2, steps, tail, 32, 1, NULL);
                    for (int64_t r = 0; r < valid; r++)
                        memcpy(sums + r * y_stride, tail + r * 32, 32 * sizeof(float));
                }
            }
        }
    }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles)
        _tile_release();
#endif
    free(block);
}

/* Panels [first, last) of x [rows, cols] (bf16 bits, or with `fp32` fp32 values rounded to the
 * nearest bf16 as they are packed, ties to even; its rows x_stride values apart) into out, x's part
 * of the packed rows tile_products takes, x being columns k0..k0 + cols of them (all `width` wide):
 * 16 rows a panel, each 32 columns of a panel a 1 KB tile (its 16 rows of 64 bytes in turn); rows
 * past `rows` zeros. */
void pack_tile_rows(const void *x, int64_t x_stride, int fp32, int64_t rows, int64_t cols, int64_t k0,
                    int64_t width, uint16_t *out, int64_t first, int64_t last) {
    for (int64_t p = first; p < last; p++)
        for (int64_t d = 0; d < cols; d += 32) {
            uint16_t *tile = out + p * 16 * width + (k0 + d) * 16;
            for (int64_t r = 0; r < 16; r++) {
                const int64_t row = p * 16 + r;
                if (row >= rows) {
                    memset(tile + r * 32, 0, 64);
                } else if (fp32) {
                    const float *values = (const float *)x + row * x_stride + d;
                    _mm256_storeu_si256((__m256i *)(tile + r * 32), bf16_halves(_mm512_loadu_ps(values)));
                    _mm256_storeu_si256((__m256i *)(tile + r * 32 + 16), bf16_halves(_mm512_loadu_ps(values + 16)));
                } else {
                    memcpy(tile + r * 32, (const uint16_t *)x + row * x_stride + d, 64);
                }
            }
        }
}
#else
int tile_kernels(void) { return 0; }
#endif
