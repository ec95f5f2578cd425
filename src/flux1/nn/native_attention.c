/* Attention, softmax(scale q k^T) v, its products from bf16 with fp32 sums in AMX tiles or in
 * AVX512-BF16 vectors, as flash attention computes it: for a group of up to 8 blocks of 32 query
 * rows, the keys a chunk of 1024 at a time (the chunk's k and v stay in the cache while every
 * block of the group uses them); per block, the chunk's scores q k^T into a buffer in the cache,
 * each row's exponentials exp(scale s - scale m) rounded to bf16 (ties to even) and summed as
 * rounded, m the row's largest score so far, then their product with v added to the block's
 * output, which (with the sums) is first scaled by exp(scale (m_before - m)) where m grew. Each
 * output row is finally divided by its sum: the probabilities are never written to memory.
 * Compiled for this CPU by nn/native.py: attention_kernels() says which products run here (the
 * tiles where the compiler targets AMX-BF16 and Linux grants them to the process); without
 * AVX512-BF16 nothing else is built.
 *
 * Operands, bf16 bits, each head's rows, keys and head_dim padded with zeros to multiples of 32
 * (made by pack_rows, pack_feature_pairs and pack_row_pairs from fp32 rows, q and k normed and
 * rotated on the way for FLUX): q [heads][rows][dim] row-major; k as AMX takes the right operand
 * of q k^T, pairs of a key's features side by side, 32 keys at a time: [heads][keys / 32][dim /
 * 2][32][2]; v likewise for p v, pairs of keys side by side, 32 features at a time: [heads][dim /
 * 32][keys / 2][32][2] (a block's tiles in one piece: loaded faster than rows apart by a whole
 * head's keys or features). out (fp32): head h = b * per_batch + i
 * at out + b * out_batch + i * out_head, its rows out_row apart; only the first `valid_rows` x
 * `valid_dim` are written, and only the first `valid_keys` keys are attended to. [first, last)
 * counts blocks of 32 rows over all heads in order: the share of one core. scale > 0; `tiles`:
 * the products in AMX tiles, else in vectors. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__BMI2__)
#include <immintrin.h>

#include "native_simd.h"

#define BLOCK 32  /* query rows, and the side of a product's block */
#define GROUP 8   /* query blocks sharing each chunk of keys */
#define CHUNK 1024 /* keys at a time */
#define ROW (CHUNK + 32) /* a block's rows of scores and probabilities apart: not a power of 2 */

/* out [32 x 32] (fp32, rows out_stride bytes apart) = a [32 x depth] @ b, plus out if `accumulate`;
 * a's rows a_stride bytes apart, b given as pairs of rows [depth / 2][32][2], its rows b_stride
 * bytes apart. By AVX512-BF16's dot products of pairs: 8 rows x 32 columns at a time, each pair
 * of a row broadcast against the 32 columns' pairs. */
static inline void product_vectors(const uint16_t *a, int64_t a_stride, const uint16_t *b, int64_t b_stride,
                                   int64_t depth, float *out, int64_t out_stride, int accumulate) {
    for (int64_t r = 0; r < BLOCK; r += 8) {
        __m512 sums[8][2];
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < 2; j++)
                sums[i][j] = accumulate ? _mm512_loadu_ps((const char *)out + (r + i) * out_stride + 64 * j)
                                        : _mm512_setzero_ps();
        for (int64_t p = 0; p < depth / 2; p++) {
            const char *pairs = (const char *)b + p * b_stride;
            const __m512bh low = (__m512bh)_mm512_loadu_si512(pairs), high = (__m512bh)_mm512_loadu_si512(pairs + 64);
            for (int i = 0; i < 8; i++) {
                const __m512bh pair = (__m512bh)_mm512_set1_epi32(*(const int32_t *)((const char *)a + (r + i) * a_stride + p * 4));
                sums[i][0] = _mm512_dpbf16_ps(sums[i][0], pair, low);
                sums[i][1] = _mm512_dpbf16_ps(sums[i][1], pair, high);
            }
        }
        for (int i = 0; i < 8; i++)
            for (int j = 0; j < 2; j++)
                _mm512_storeu_ps((char *)out + (r + i) * out_stride + 64 * j, sums[i][j]);
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
void configure_tiles(void); /* native_tiles.c */

/* product_vectors' block by AMX's tiles. */
static inline void product_tiles(const uint16_t *a, int64_t a_stride, const uint16_t *b, int64_t b_stride,
                                 int64_t depth, float *out, int64_t out_stride, int accumulate) {
    if (accumulate) {
        _tile_loadd(0, out, out_stride);
        _tile_loadd(1, out + 16, out_stride);
        _tile_loadd(2, (char *)out + 16 * out_stride, out_stride);
        _tile_loadd(3, (char *)out + 16 * out_stride + 64, out_stride);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t d = 0; d < depth; d += BLOCK) {
        _tile_loadd(4, a + d, a_stride);
        _tile_loadd(5, (const char *)(a + d) + 16 * a_stride, a_stride);
        const char *pairs = (const char *)b + d / 2 * b_stride;
        _tile_loadd(6, pairs, b_stride);
        _tile_loadd(7, pairs + 64, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, out_stride);
    _tile_stored(1, out + 16, out_stride);
    _tile_stored(2, (char *)out + 16 * out_stride, out_stride);
    _tile_stored(3, (char *)out + 16 * out_stride + 64, out_stride);
}
#endif

int attention_kernels(void) { return products_here(); }

static inline void product_block(int tiles, const uint16_t *a, int64_t a_stride, const uint16_t *b,
                                 int64_t b_stride, int64_t depth, float *out, int64_t out_stride, int accumulate) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles) {
        product_tiles(a, a_stride, b, b_stride, depth, out, out_stride, accumulate);
        return;
    }
#endif
    product_vectors(a, a_stride, b, b_stride, depth, out, out_stride, accumulate);
}

/* 2^x for x <= 0, clamped at -125 (below it 2^x is nothing beside the row's largest exponential, 1):
 * x = n + f, |f| <= 1/2, n rounded to the nearest integer by adding and subtracting 1.5 * 2^23 (the
 * sum's low bits are then n), 2^f by a polynomial of degree 4 fitted to it on [-1/2, 1/2] with the
 * least largest relative error and 1 at 0 (2.9e-6 evaluated in fp32, a thousandth of bf16's
 * rounding; 2^0 exactly 1: a row whose largest score stays scales nothing by 0.999...), times 2^n
 * by adding n to its exponent bits (n >= -125: a normal number). Integer additions and a shift,
 * where the rounding and scaling instructions queue on one port with the others. */
static inline __m512 exp2_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-125.0f));
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    const __m512 shifted = _mm512_add_ps(x, magic);
    const __m512 f = _mm512_sub_ps(x, _mm512_sub_ps(shifted, magic));
    __m512 p = _mm512_set1_ps(0.009582852993824177f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05590642474189936f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24024098612932793f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931241933916192f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_castps_si512(magic));
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(n, 23)));
}

static inline __mmask16 valid_lanes(int64_t at, int64_t valid) {
    return at + 16 <= valid ? 0xFFFF : at < valid ? (__mmask16)((1u << (valid - at)) - 1) : 0;
}

/* probabilities [keys] (bf16) = exp(scale s - scale m) over the first `valid` of a row's chunk of
 * scores (keys a multiple of 32), 0 past them, m the larger of *largest (the row's largest score
 * before the chunk) and the chunk's; *sum becomes *sum exp(scale (*largest - m)) plus their sum as
 * rounded, *largest m. Returns exp(scale (*largest - m)), the factor of what came before. */
static float exponentials(const float *scores, int64_t keys, int64_t valid, float scale, float *largest, float *sum,
                          uint16_t *probabilities) {
    __m512 chunk = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= valid; j += 16)
        chunk = _mm512_max_ps(chunk, _mm512_loadu_ps(scores + j));
    if (j < valid)
        chunk = _mm512_max_ps(chunk, _mm512_mask_loadu_ps(chunk, valid_lanes(j, valid), scores + j));
    const float chunk_largest = _mm512_reduce_max_ps(chunk), m = chunk_largest > *largest ? chunk_largest : *largest;
    const float factor = scale * 1.44269504088896341f; /* e^(scale s) = 2^(scale log2(e) s) */
    const float before = _mm512_cvtss_f32(exp2_nonpositive(_mm512_set1_ps(factor * (*largest - m))));
    const __m512 shift = _mm512_set1_ps(factor * m), by = _mm512_set1_ps(factor);
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);
    __m512 total = _mm512_setzero_ps();
    for (j = 0; j < keys; j += 32) {
        __m512 low = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(scores + j), by, shift));
        __m512 high = exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(scores + j + 16), by, shift));
        if (j + 32 > valid) { /* keys past the valid ones: zeros */
            low = _mm512_maskz_mov_ps(valid_lanes(j, valid), low);
            high = _mm512_maskz_mov_ps(valid_lanes(j + 16, valid), high);
        }
        const __m512bh rounded = _mm512_cvtne2ps_pbh(high, low);
        _mm512_storeu_si512(probabilities + j, (__m512i)rounded);
        total = _mm512_dpbf16_ps(total, rounded, ones);
    }
    *sum = *sum * before + _mm512_reduce_add_ps(total);
    *largest = m;
    return before;
}

/* out [n] (bf16) = x [valid] rounded to the nearest bf16 (ties to even), then zeros. */
static void round_row(const float *x, int64_t valid, int64_t n, uint16_t *out) {
    for (int64_t j = 0; j < n; j += 16) {
        const __m512 values = _mm512_maskz_loadu_ps(valid_lanes(j, valid), x + j);
        _mm256_storeu_si256((__m256i *)(out + j), (__m256i)_mm512_cvtneps_pbh(values));
    }
}

/* Rows [begin, end) of each head's operand for attend_bf16: row r of head h = b * per_batch + i
 * from x + b * batch + i * head + (r - begin) * row (fp32, `features` of them, zeros after). Where
 * `scale` is given, RMS-normed first (eps), times scale, and rotated as RoPE rotates them: the
 * features' pairs (2j, 2j + 1) as complex numbers times cos + i sin, cos and sin [B][rows][features
 * / 2] (batch `rope_batch` apart, 0 for one for all), as nn/cpu_rope_attention.py computes it. */
struct source {
    const float *x;
    int64_t per_batch, batch, head, row, features, begin, end;
    const float *scale, *cos, *sin;
    int64_t rope_batch;
    float eps;
};

/* out [dim] (bf16) = row r of head h of the source. */
static void source_row(const struct source *s, int64_t h, int64_t r, int64_t dim, uint16_t *out) {
    const int64_t b = h / s->per_batch;
    const float *x = s->x + b * s->batch + h % s->per_batch * s->head + (r - s->begin) * s->row;
    if (s->scale == NULL) {
        round_row(x, s->features, dim, out);
        return;
    }
    __m512 squares = _mm512_setzero_ps();
    for (int64_t j = 0; j < s->features; j += 16) {
        const __m512 values = _mm512_maskz_loadu_ps(valid_lanes(j, s->features), x + j);
        squares = _mm512_add_ps(squares, _mm512_mul_ps(values, values));
    }
    const float mean_square = _mm512_reduce_add_ps(squares) / s->features + s->eps;
    const __m512 inverse = _mm512_set1_ps(1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(mean_square))));
    const float *cos = s->cos + b * s->rope_batch + r * (s->features / 2), *sin = s->sin + (cos - s->cos);
    const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    for (int64_t j = 0; j < dim; j += 16) { /* 8 pairs (a, b) -> (a cos - b sin, b cos + a sin) */
        const __mmask16 valid = valid_lanes(j, s->features);
        const __mmask8 pairs = (__mmask8)_pext_u32(valid, 0x5555);
        const __m512 c = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_maskz_loadu_ps(pairs, cos + j / 2)));
        const __m512 t = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_maskz_loadu_ps(pairs, sin + j / 2)));
        const __m512 signed_sin = _mm512_mask_sub_ps(t, 0x5555, _mm512_setzero_ps(), t);
        __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, x + j), _mm512_maskz_loadu_ps(valid, s->scale + j));
        y = _mm512_mul_ps(y, inverse);
        const __m512 rotated = _mm512_add_ps(_mm512_mul_ps(y, c), _mm512_mul_ps(_mm512_permute_ps(y, 0xB1), signed_sin));
        _mm256_storeu_si256((__m256i *)(out + j), (__m256i)_mm512_cvtneps_pbh(rotated));
    }
}

/* out [dim] (bf16) = row r of head h from the source that has it, or zeros (padding). */
static void operand_row(const struct source *sources, int64_t count, int64_t h, int64_t r, int64_t dim,
                        uint16_t *out) {
    for (int64_t i = 0; i < count; i++)
        if (sources[i].begin <= r && r < sources[i].end) {
            source_row(sources + i, h, r, dim, out);
            return;
        }
    memset(out, 0, dim * sizeof(uint16_t));
}

/* Rows [first, last) (multiples of 32) of each of the `heads` of an operand of attend_bf16 from
 * `count` sources (rows no source has are zeros) into out [heads][rows][dim] (multiples of 32), laid
 * out as attend_bf16 takes them: as they are (q), with each row's pairs of features side by side
 * (k), or with each pair of rows' values side by side (v). A token's heads lie side by side in the
 * projections, so its rows are read for all heads in turn: rows a whole token apart, each on a page
 * of its own, are read once, not once per head. */
#define PACK(name, step, ...)                                                                          \
    void name(const struct source *sources, int64_t count, int64_t heads, int64_t rows, int64_t dim,     \
              uint16_t *out, int64_t first, int64_t last) {                                               \
        uint16_t *block = aligned_alloc(64, step * dim * sizeof(uint16_t)); /* `step` rows */             \
        for (int64_t r = first; r < last; r += step)                                                      \
            for (int64_t h = 0; h < heads; h++) {                                                         \
                uint16_t *packed = out + h * rows * dim;                                                  \
                for (int64_t j = 0; j < step; j++)                                                        \
                    operand_row(sources, count, h, r + j, dim, block + j * dim);                          \
                __VA_ARGS__                                                                               \
            }                                                                                             \
        free(block);                                                                                      \
    }

PACK(pack_rows, 1, memcpy(packed + r * dim, block, dim * sizeof(uint16_t));)

PACK(pack_feature_pairs, 16, { /* the 16 rows' pairs transposed, 16 pairs at a time */
    uint32_t *pairs = (uint32_t *)packed + r / 32 * (dim / 2 * 32) + r % 32;
    for (int64_t p = 0; p < dim / 2; p += 16) {
        __m512i lanes[16];
        for (int64_t j = 0; j < 16; j++)
            lanes[j] = _mm512_load_si512((const uint32_t *)block + j * dim / 2 + p);
        transpose16(lanes);
        for (int64_t j = 0; j < 16; j++)
            _mm512_storeu_si512(pairs + (p + j) * 32, lanes[j]);
    }
})

/* 16-bit lanes of two vectors (0-31 of one, 32-63 of the other) alternately: 0, 32, 1, 33, ... */
static const uint16_t INTERLEAVED[64] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                         8,  40, 9,  41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47,
                                         16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                         24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

PACK(pack_row_pairs, 2, { /* 32 features of the two rows interleaved at a time: 16 in each half */
    const __m512i low = _mm512_loadu_si512(INTERLEAVED), high = _mm512_loadu_si512(INTERLEAVED + 32);
    for (int64_t c = 0; c < dim; c += 32) {
        const __m512i first = _mm512_load_si512(block + c), second = _mm512_load_si512(block + dim + c);
        uint16_t *pairs = packed + c / 32 * rows * 32 + r / 2 * 64;
        _mm512_storeu_si512(pairs, _mm512_permutex2var_epi16(first, low, second));
        _mm512_storeu_si512(pairs + 32, _mm512_permutex2var_epi16(first, high, second));
    }
})

void attend_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t rows, int64_t keys, int64_t dim,
                 int64_t valid_rows, int64_t valid_keys, int64_t valid_dim, float scale, int64_t per_batch,
                 float *out, int64_t out_batch, int64_t out_head, int64_t out_row, int64_t first, int64_t last,
                 int tiles) {
    float *scores = aligned_alloc(64, BLOCK * ROW * sizeof(float));
    uint16_t *probabilities = aligned_alloc(64, BLOCK * ROW * sizeof(uint16_t));
    float *values = aligned_alloc(64, GROUP * BLOCK * dim * sizeof(float));
    float largest[GROUP * BLOCK], sums[GROUP * BLOCK];
    const int64_t blocks = rows / BLOCK;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles)
        configure_tiles();
#endif
    for (int64_t at = first; at < last;) {
        const int64_t head = at / blocks, row = at % blocks * BLOCK;
        int64_t count = last - at < GROUP ? last - at : GROUP; /* blocks of this head in the group */
        count = blocks - at % blocks < count ? blocks - at % blocks : count;
        const uint16_t *k_head = k + head * keys * dim, *v_head = v + head * keys * dim;
        for (int64_t r = 0; r < count * BLOCK; r++) {
            largest[r] = -INFINITY;
            sums[r] = 0.0f;
        }
        for (int64_t key = 0; key < keys; key += CHUNK) {
            const int64_t width = keys - key < CHUNK ? keys - key : CHUNK;
            const int64_t valid = valid_keys - key < width ? valid_keys - key : width;
            for (int64_t b = 0; b < count; b++) {
                const uint16_t *q_block = q + (head * rows + row + b * BLOCK) * dim;
                float *values_block = values + b * BLOCK * dim;
                for (int64_t j = 0; j < width; j += BLOCK)
                    product_block(tiles, q_block, dim * 2, k_head + (key + j) * dim, BLOCK * 4, dim, scores + j, ROW * 4, 0);
                for (int64_t r = 0; r < BLOCK; r++) {
                    const int64_t at_row = b * BLOCK + r;
                    const float before = exponentials(scores + r * ROW, width, valid, scale, largest + at_row,
                                                      sums + at_row, probabilities + r * ROW);
                    if (key)
                        for (int64_t c = 0; c < dim; c++)
                            values_block[r * dim + c] *= before;
                }
                for (int64_t column = 0; column < dim; column += BLOCK)
                    product_block(tiles, probabilities, ROW * 2, v_head + column * keys + key * BLOCK, BLOCK * 4, width,
                                  values_block + column, dim * 4, key > 0);
            }
        }
        float *o = out + head / per_batch * out_batch + head % per_batch * out_head + row * out_row;
        for (int64_t r = 0; r < count * BLOCK && row + r < valid_rows; r++)
            for (int64_t c = 0; c < valid_dim; c++)
                o[r * out_row + c] = values[r * dim + c] / sums[r];
        at += count;
    }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (tiles)
        _tile_release();
#endif
    free(scores);
    free(probabilities);
    free(values);
}

#else
int attention_kernels(void) { return 0; }
#endif
