/* Quantized weights expanded for the CPU's GEMMs in one pass: value = code * scale + offset per
 * group, in fp32 (the product and the sum each rounded, as NumPy's passes compute it: built with
 * -ffp-contract=off, no fused multiply-add), written as fp32 or rounded to the nearest bf16 (ties
 * to even, the bits of numpy_cpu.round_to_bf16). Compiled for this CPU by nn/native.py.
 *
 * The codes come in `units` of `unit_values` codes, unit u's at codes + u * unit_stride (a row of
 * MLX's packed codes, or the code bytes of a GGUF block); scales and offsets hold one value per
 * group of `group` values of the units laid end to end, and so does out (C-contiguous). Nibbles:
 * two 4-bit codes a byte, the low one first (MLX's packing). */
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float to_fp32(float x) { return x; }

#define EXPAND(name, type, convert, nibbles)                                                        \
    void name(const uint8_t *codes, int64_t units, int64_t unit_values, int64_t unit_stride,        \
              const float *scales, const float *offsets, int64_t group, type *out) {                \
        const int64_t groups = unit_values / group;                                                  \
        for (int64_t u = 0; u < units; u++) {                                                        \
            for (int64_t g = 0; g < groups; g++) {                                                   \
                const int64_t at = u * groups + g;                                                   \
                const float scale = scales[at], offset = offsets[at];                                \
                type *o = out + at * group;                                                          \
                if (nibbles) {                                                                       \
                    const uint8_t *c = codes + u * unit_stride + g * group / 2;                      \
                    for (int64_t j = 0; j < group / 2; j++) {                                        \
                        o[2 * j] = convert((float)(c[j] & 15) * scale + offset);                     \
                        o[2 * j + 1] = convert((float)(c[j] >> 4) * scale + offset);                 \
                    }                                                                                \
                } else {                                                                             \
                    const uint8_t *c = codes + u * unit_stride + g * group;                          \
                    for (int64_t j = 0; j < group; j++)                                              \
                        o[j] = convert((float)c[j] * scale + offset);                                \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

EXPAND(expand_bytes_fp32, float, to_fp32, 0)
EXPAND(expand_bytes_bf16, uint16_t, to_bf16, 0)
EXPAND(expand_nibbles_fp32, float, to_fp32, 1)
EXPAND(expand_nibbles_bf16, uint16_t, to_bf16, 1)
