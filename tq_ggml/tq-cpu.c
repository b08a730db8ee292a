// TurboQuant KV-cache types: CPU kernels. The scalar loops are the portable path; the AVX2 path
// decodes 8 indices with one variable shift and looks the centroids up in registers
// (_mm256_permutevar8x32_ps is an 8-entry float table; 16 entries take two and a blend).
#define GGML_COMMON_IMPL_C
#include "ggml-common.h"

#include "ggml-cpu-impl.h"
#include "simd-mappings.h"

#include "ggml-tq/tq-quants.h"
#include "ggml-tq/tq-codebooks.h"
#include "ggml-tq/tq-cpu.h"

#include <assert.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TQ_AVX2 1
#endif

void quantize_row_turbo2_0(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_turbo2_0_ref(x, (block_turbo2_0 *) y, k);
}

void quantize_row_turbo3_0(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_turbo3_0_ref(x, (block_turbo3_0 *) y, k);
}

void quantize_row_turbo4_0(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_turbo4_0_ref(x, (block_turbo4_0 *) y, k);
}

// dot of one block's centroids with 64 floats of y (the caller multiplies by the block scale d)
static inline float tq_block_dot(const uint8_t * GGML_RESTRICT qs, const float * GGML_RESTRICT y,
                                 int bits, const float * centroids) {
#if defined(TQ_AVX2)
    const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    const __m256i mask   = _mm256_set1_epi32((1 << bits) - 1);
    // centroid tables in registers; permutevar8x32 reads only the low 3 bits of an index, so the
    // 4-entry table may leave the upper lanes undefined and the 16-entry one takes two registers
    const __m256 tlo = bits == 2 ? _mm256_castps128_ps256(_mm_loadu_ps(centroids)) : _mm256_loadu_ps(centroids);
    const __m256 thi = bits == 4 ? _mm256_loadu_ps(centroids + 8) : tlo;

    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < QK_TQ/8; ++g) {
        const __m256i w   = _mm256_set1_epi32((int) tq_load_group(qs + bits*g, bits));
        const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(w, shifts), mask);
        __m256 c = _mm256_permutevar8x32_ps(tlo, idx);
        if (bits == 4) {
            // bit 3 of the index moved to the sign bit selects the upper half of the table
            const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
            c = _mm256_blendv_ps(c, _mm256_permutevar8x32_ps(thi, idx), sel);
        }
        acc = _mm256_fmadd_ps(c, _mm256_loadu_ps(y + 8*g), acc);
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
#else
    const uint32_t mask = (1u << bits) - 1;
    float sum = 0.0f;
    for (int g = 0; g < QK_TQ/8; ++g) {
        const uint32_t w = tq_load_group(qs + bits*g, bits);
        for (int l = 0; l < 8; ++l) {
            sum += centroids[(w >> (bits*l)) & mask] * y[8*g + l];
        }
    }
    return sum;
#endif
}

#define TQ_DEFINE_VEC_DOT(BITS)                                                                            \
void ggml_vec_dot_turbo##BITS##_0_f32(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, \
                                      size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {      \
    assert(n % QK_TQ == 0);                                                                                \
    assert(nrc == 1);                                                                                      \
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);                                   \
    const block_turbo##BITS##_0 * GGML_RESTRICT x = (const block_turbo##BITS##_0 *) vx;                    \
    const float * GGML_RESTRICT y = (const float *) vy;                                                    \
    float sum = 0.0f;                                                                                      \
    for (int i = 0; i < n/QK_TQ; ++i) {                                                                    \
        sum += GGML_CPU_FP16_TO_FP32(x[i].d) * tq_block_dot(x[i].qs, y + i*QK_TQ, BITS, tq_centroids_##BITS); \
    }                                                                                                      \
    *s = sum;                                                                                              \
}

TQ_DEFINE_VEC_DOT(2)
TQ_DEFINE_VEC_DOT(3)
TQ_DEFINE_VEC_DOT(4)
