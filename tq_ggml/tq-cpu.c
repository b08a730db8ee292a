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

// GGML_OP_TURBO_K_ROT (tq-offset.c): the same arithmetic in the same order as the unfused graph
// (x*a or x/a, then upstream's CPU transform: times 1/sqrt(nrot), butterflies of growing span, then
// minus the offset), so fused and unfused CPU graphs agree
void ggml_compute_forward_turbo_k_rot(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const struct ggml_tensor * x     = dst->src[0];
    const struct ggml_tensor * k_off = dst->src[1];
    const int32_t nrot = ggml_get_op_params_i32(dst, 0);
    const int32_t mode = ggml_get_op_params_i32(dst, 1);

    const int64_t n     = x->ne[0];
    const int64_t ne1   = x->ne[1];
    const int64_t nrows = ne1*x->ne[2]*x->ne[3];
    const int64_t group = k_off ? ne1/k_off->ne[1] : 1; // query heads per KV head
    const float * off   = k_off ? (const float *) k_off->data : NULL; // NULL: mode 0
    const float * a     = k_off ? off + n*k_off->ne[1] : NULL;
    const float   scale = nrot > 0 ? 1.0f/sqrtf((float) nrot) : 1.0f;

    const int64_t per_thread = (nrows + params->nth - 1)/params->nth;
    const int64_t r0 = params->ith*per_thread;
    const int64_t r1 = MIN(r0 + per_thread, nrows);
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t i1 = r % ne1, i2 = (r/ne1) % x->ne[2], i3 = r/(ne1*x->ne[2]);
        const float * xr = (const float *) ((const char *) x->data + i1*x->nb[1] + i2*x->nb[2] + i3*x->nb[3]);
        float       * y  = (float *) ((char *) dst->data + i1*dst->nb[1] + i2*dst->nb[2] + i3*dst->nb[3]);
        const int64_t h  = i1/group;

        for (int64_t i = 0; i < n; ++i) {
            const float v = mode & GGML_TURBO_K_ROT_SCALE ? xr[i]*a[h*n + i] :
                            mode & GGML_TURBO_K_ROT_INV_SCALE ? xr[i]/a[h*n + i] : xr[i];
            y[i] = v*scale;
        }
        for (int64_t c = 0; nrot > 0 && c < n; c += nrot) {
            for (int64_t len = 1; len < nrot; len <<= 1) {
                for (int64_t i = c; i < c + nrot; i += 2*len) {
                    for (int64_t j = i; j < i + len; ++j) {
                        const float u = y[j], v = y[j + len];
                        y[j]       = u + v;
                        y[j + len] = u - v;
                    }
                }
            }
        }
        if (mode & GGML_TURBO_K_ROT_OFFSET) {
            for (int64_t i = 0; i < n; ++i) {
                y[i] -= off[h*n + i];
            }
        }
    }
}
