// TurboQuant KV-cache types: CPU kernels. The scalar loops are the portable path; the AVX2 path
// encodes 8 values per compare, decodes 8 indices with one variable shift and looks the centroids
// up in registers (_mm256_permutevar8x32_ps is an 8-entry float table; 16 entries take two and a
// blend).
#define GGML_COMMON_IMPL_C
#include "ggml-common.h"

#include "ggml-cpu-impl.h"
#include "simd-mappings.h"

#include "ggml-tq/tq-quants.h"
#include "ggml-tq/tq-codebooks.h"
#include "ggml-tq/tq-cpu.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TQ_AVX2 1
#endif

#if defined(TQ_AVX2)
// the 8 indices of group g (bits bytes at qs + bits*g), one per lane
static inline __m256i tq_indices8(const uint8_t * qs, int g, int bits, __m256i shifts, __m256i mask) {
    const __m256i w = _mm256_set1_epi32((int) tq_load_group(qs + bits*g, bits));
    return _mm256_and_si256(_mm256_srlv_epi32(w, shifts), mask);
}

// the centroids of 8 indices from a table in registers (tlo: entries 0-7; thi: 8-15, 4-bit only)
static inline __m256 tq_lookup8(__m256i idx, __m256 tlo, __m256 thi, int bits) {
    __m256 c = _mm256_permutevar8x32_ps(tlo, idx);
    if (bits == 4) {
        // bit 3 of the index moved to the sign bit selects the upper half of the table
        const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
        c = _mm256_blendv_ps(c, _mm256_permutevar8x32_ps(thi, idx), sel);
    }
    return c;
}

static inline float tq_hsum_ps(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

#if defined(TQ_AVX2)
// The reference encoder (tq-quants.c) with the indices of 8 values per compare and the sums of its
// scale search in 4 float64 lanes. Only the order of those float64 sums differs; the search keeps
// a later candidate only if it gains more than a relative TQ_SCALE_TIE, far above that rounding, so
// the bytes are the reference's (checked against it by the parity tests). Blocks of zero or
// non-finite norm, and scales past fp16's range, go to the reference itself.
static inline double tq_hsum_pd(__m256d v) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

static void tq_quantize_row(const float * GGML_RESTRICT x, uint8_t * GGML_RESTRICT y, int64_t k, int qk, int bits,
                            const float * boundaries, const float * centroids,
                            void (*ref)(const float * GGML_RESTRICT, uint8_t * GGML_RESTRICT, int64_t)) {
    const int    nb         = (1 << bits) - 1;
    const size_t block_size = sizeof(ggml_half) + qk*bits/8;
    const __m256 tlo = bits == 2 ? _mm256_castps128_ps256(_mm_loadu_ps(centroids)) : _mm256_loadu_ps(centroids);
    const __m256 thi = bits == 4 ? _mm256_loadu_ps(centroids + 8) : tlo;

    for (int64_t ib = 0; ib < k/qk; ++ib) {
        const float * xb = x + ib*qk;
        uint8_t     * yb = y + ib*block_size;
        double sumsq = 0.0;
        for (int i = 0; i < qk; ++i) {
            sumsq += (double) xb[i] * (double) xb[i];
        }
        const float norm = (float) sqrt(sumsq);
        if (!(norm > 0.0f && isfinite(norm))) {
            ref(xb, yb, qk);
            continue;
        }
        __m256  xv[QK_TQ/8]; // qk <= QK_TQ
        __m256d xd[QK_TQ/4];
        for (int g = 0; g < qk/8; ++g) {
            xv[g]       = _mm256_loadu_ps(xb + 8*g);
            xd[2*g]     = _mm256_cvtps_pd(_mm256_castps256_ps128(xv[g]));
            xd[2*g + 1] = _mm256_cvtps_pd(_mm256_extractf128_ps(xv[g], 1));
        }
        int32_t best[QK_TQ];
        double  best_gain = -1.0;
        float   scale     = norm;
        for (int s = 0; s < TQ_SCALE_STEPS; ++s) {
            const float sc = norm * ((float) (TQ_SCALE_MIN + s) / TQ_SCALE_DIV);
            __m256 thr[15];
            for (int j = 0; j < nb; ++j) {
                thr[j] = _mm256_set1_ps(boundaries[j] * sc);
            }
            __m256d xc0 = _mm256_setzero_pd(), xc1 = _mm256_setzero_pd();
            __m256d cc0 = _mm256_setzero_pd(), cc1 = _mm256_setzero_pd();
            __m256i idx[QK_TQ/8];
            for (int g = 0; g < qk/8; ++g) {
                __m256i n = _mm256_setzero_si256();
                for (int j = 0; j < nb; ++j) {
                    n = _mm256_sub_epi32(n, _mm256_castps_si256(_mm256_cmp_ps(xv[g], thr[j], _CMP_GT_OQ)));
                }
                idx[g] = n;
                const __m256 c = tq_lookup8(n, tlo, thi, bits);
                const __m256d clo = _mm256_cvtps_pd(_mm256_castps256_ps128(c));
                const __m256d chi = _mm256_cvtps_pd(_mm256_extractf128_ps(c, 1));
                xc0 = _mm256_fmadd_pd(xd[2*g], clo, xc0);
                xc1 = _mm256_fmadd_pd(xd[2*g + 1], chi, xc1);
                cc0 = _mm256_fmadd_pd(clo, clo, cc0);
                cc1 = _mm256_fmadd_pd(chi, chi, cc1);
            }
            const double xc = tq_hsum_pd(_mm256_add_pd(xc0, xc1));
            const double cc = tq_hsum_pd(_mm256_add_pd(cc0, cc1));
            const double gain = xc*xc/cc;
            if (gain > best_gain*(1.0 + TQ_SCALE_TIE)) {
                best_gain = gain;
                scale     = (float) (xc/cc);
                for (int g = 0; g < qk/8; ++g) {
                    _mm256_storeu_si256((__m256i *) (best + 8*g), idx[g]);
                }
            }
        }
        if (!(scale <= 65504.0f)) {
            ref(xb, yb, qk);
            continue;
        }
        const ggml_half d = GGML_FP32_TO_FP16(scale);
        memcpy(yb, &d, sizeof(d));
        uint8_t * qs = yb + sizeof(ggml_half);
        for (int g = 0; g < qk/8; ++g) {
            uint32_t w = 0;
            for (int l = 0; l < 8; ++l) {
                w |= (uint32_t) best[8*g + l] << (bits*l);
            }
            for (int j = 0; j < bits; ++j) {
                qs[bits*g + j] = (uint8_t) (w >> (8*j));
            }
        }
    }
}

// NAME: turboB_0, turboB_0_b32 or turboB_0_b16 (block QK, codebooks CB: tq, tq32 or tq16)
#define TQ_DEFINE_QUANTIZE_ROW(NAME, QK, BITS, CB)                                                         \
static void tq_quantize_ref_##NAME(const float * GGML_RESTRICT x, uint8_t * GGML_RESTRICT y, int64_t k) {  \
    quantize_row_##NAME##_ref(x, (block_##NAME *) y, k);                                                   \
}                                                                                                          \
void quantize_row_##NAME(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {               \
    tq_quantize_row(x, (uint8_t *) y, k, QK, BITS, CB##_boundaries_##BITS, CB##_centroids_##BITS, tq_quantize_ref_##NAME); \
}
#else
#define TQ_DEFINE_QUANTIZE_ROW(NAME, QK, BITS, CB)                                                         \
void quantize_row_##NAME(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {               \
    quantize_row_##NAME##_ref(x, (block_##NAME *) y, k);                                                   \
}
#endif

TQ_DEFINE_QUANTIZE_ROW(turbo2_0,     QK_TQ,   2, tq)
TQ_DEFINE_QUANTIZE_ROW(turbo3_0,     QK_TQ,   3, tq)
TQ_DEFINE_QUANTIZE_ROW(turbo4_0,     QK_TQ,   4, tq)
TQ_DEFINE_QUANTIZE_ROW(turbo2_0_b32, QK_TQ32, 2, tq32)
TQ_DEFINE_QUANTIZE_ROW(turbo3_0_b32, QK_TQ32, 3, tq32)
TQ_DEFINE_QUANTIZE_ROW(turbo4_0_b32, QK_TQ32, 4, tq32)
TQ_DEFINE_QUANTIZE_ROW(turbo2_0_b16, QK_TQ16, 2, tq16)
TQ_DEFINE_QUANTIZE_ROW(turbo3_0_b16, QK_TQ16, 3, tq16)
TQ_DEFINE_QUANTIZE_ROW(turbo4_0_b16, QK_TQ16, 4, tq16)

// dot of one block's centroids with qk floats of y (the caller multiplies by the block scale d)
static inline float tq_block_dot(const uint8_t * GGML_RESTRICT qs, const float * GGML_RESTRICT y,
                                 int qk, int bits, const float * centroids) {
#if defined(TQ_AVX2)
    const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    const __m256i mask   = _mm256_set1_epi32((1 << bits) - 1);
    // centroid tables in registers; permutevar8x32 reads only the low 3 bits of an index, so the
    // 4-entry table may leave the upper lanes undefined and the 16-entry one takes two registers
    const __m256 tlo = bits == 2 ? _mm256_castps128_ps256(_mm_loadu_ps(centroids)) : _mm256_loadu_ps(centroids);
    const __m256 thi = bits == 4 ? _mm256_loadu_ps(centroids + 8) : tlo;

    __m256 acc = _mm256_setzero_ps();
    for (int g = 0; g < qk/8; ++g) {
        const __m256 c = tq_lookup8(tq_indices8(qs, g, bits, shifts, mask), tlo, thi, bits);
        acc = _mm256_fmadd_ps(c, _mm256_loadu_ps(y + 8*g), acc);
    }
    return tq_hsum_ps(acc);
#else
    const uint32_t mask = (1u << bits) - 1;
    float sum = 0.0f;
    for (int g = 0; g < qk/8; ++g) {
        const uint32_t w = tq_load_group(qs + bits*g, bits);
        for (int l = 0; l < 8; ++l) {
            sum += centroids[(w >> (bits*l)) & mask] * y[8*g + l];
        }
    }
    return sum;
#endif
}

#define TQ_DEFINE_VEC_DOT(NAME, QK, BITS, CB)                                                              \
void ggml_vec_dot_##NAME##_f32(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,   \
                               size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {             \
    assert(n % QK == 0);                                                                                   \
    assert(nrc == 1);                                                                                      \
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);                                   \
    const block_##NAME * GGML_RESTRICT x = (const block_##NAME *) vx;                                      \
    const float * GGML_RESTRICT y = (const float *) vy;                                                    \
    float sum = 0.0f;                                                                                      \
    for (int i = 0; i < n/QK; ++i) {                                                                       \
        sum += GGML_CPU_FP16_TO_FP32(x[i].d) * tq_block_dot(x[i].qs, y + i*QK, QK, BITS, CB##_centroids_##BITS); \
    }                                                                                                      \
    *s = sum;                                                                                              \
}

TQ_DEFINE_VEC_DOT(turbo2_0,     QK_TQ,   2, tq)
TQ_DEFINE_VEC_DOT(turbo3_0,     QK_TQ,   3, tq)
TQ_DEFINE_VEC_DOT(turbo4_0,     QK_TQ,   4, tq)
TQ_DEFINE_VEC_DOT(turbo2_0_b32, QK_TQ32, 2, tq32)
TQ_DEFINE_VEC_DOT(turbo3_0_b32, QK_TQ32, 3, tq32)
TQ_DEFINE_VEC_DOT(turbo4_0_b32, QK_TQ32, 4, tq32)
TQ_DEFINE_VEC_DOT(turbo2_0_b16, QK_TQ16, 2, tq16)
TQ_DEFINE_VEC_DOT(turbo3_0_b16, QK_TQ16, 3, tq16)
TQ_DEFINE_VEC_DOT(turbo4_0_b16, QK_TQ16, 4, tq16)

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

// --- flash attention with TurboQuant K and V ---
//
// Upstream's CPU path runs each query row through the whole cache on its own, decoding every K and
// V row it reads (K inside vec_dot, V through to_float) once per query row. Here the query rows that
// read one KV head (its query heads, and for a prompt a tile of positions) go through the cache
// together: each K and V row is decoded once per tile into floats, TQ_FA_KV positions at a time;
// each query row takes its dot products four positions per pass over the query, runs the online
// softmax one position at a time, and then updates its accumulator once per block, holding it in
// registers. Per element that update performs the same operations in the same order as one
// position at a time, so the result does not depend on the block size, bit for bit. Per row the
// arithmetic is upstream's (online softmax in position order, the same scale, softcap, mask, ALiBi
// slope and sinks), so the two paths agree to rounding. A decode step (one position) also splits
// the KV range over the threads and combines the partial results as upstream's f16 path does.

#define TQ_FA_ROWS 64 // query rows per tile: GGML_FA_TILE_Q, which the work buffer is sized for
#define TQ_FA_KV   16 // positions decoded together, whose weights reach each accumulator in one pass

// a TurboQuant type's block format; NULL for any other type
struct tq_fmt {
    int bits, qk;
    const float * centroids;
    void (*dequantize)(const void * GGML_RESTRICT, float * GGML_RESTRICT, int64_t);
};

#define TQ_DEQUANTIZE(NAME) \
static void tq_dequantize_##NAME(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t n) { \
    dequantize_row_##NAME((const block_##NAME *) x, y, n); \
}
TQ_DEQUANTIZE(turbo2_0)
TQ_DEQUANTIZE(turbo3_0)
TQ_DEQUANTIZE(turbo4_0)
TQ_DEQUANTIZE(turbo2_0_b32)
TQ_DEQUANTIZE(turbo3_0_b32)
TQ_DEQUANTIZE(turbo4_0_b32)
TQ_DEQUANTIZE(turbo2_0_b16)
TQ_DEQUANTIZE(turbo3_0_b16)
TQ_DEQUANTIZE(turbo4_0_b16)

static const struct tq_fmt * tq_fmt_of(enum ggml_type t) {
    static const struct tq_fmt fmts[] = {
        { 2, QK_TQ,   tq_centroids_2,   tq_dequantize_turbo2_0     },
        { 3, QK_TQ,   tq_centroids_3,   tq_dequantize_turbo3_0     },
        { 4, QK_TQ,   tq_centroids_4,   tq_dequantize_turbo4_0     },
        { 2, QK_TQ32, tq32_centroids_2, tq_dequantize_turbo2_0_b32 },
        { 3, QK_TQ32, tq32_centroids_3, tq_dequantize_turbo3_0_b32 },
        { 4, QK_TQ32, tq32_centroids_4, tq_dequantize_turbo4_0_b32 },
        { 2, QK_TQ16, tq16_centroids_2, tq_dequantize_turbo2_0_b16 },
        { 3, QK_TQ16, tq16_centroids_3, tq_dequantize_turbo3_0_b16 },
        { 4, QK_TQ16, tq16_centroids_4, tq_dequantize_turbo4_0_b16 },
    };
    switch (t) {
        case GGML_TYPE_TURBO2_0:     return &fmts[0];
        case GGML_TYPE_TURBO3_0:     return &fmts[1];
        case GGML_TYPE_TURBO4_0:     return &fmts[2];
        case GGML_TYPE_TURBO2_0_B32: return &fmts[3];
        case GGML_TYPE_TURBO3_0_B32: return &fmts[4];
        case GGML_TYPE_TURBO4_0_B32: return &fmts[5];
        case GGML_TYPE_TURBO2_0_B16: return &fmts[6];
        case GGML_TYPE_TURBO3_0_B16: return &fmts[7];
        case GGML_TYPE_TURBO4_0_B16: return &fmts[8];
        default:                     return NULL;
    }
}

// n values of a row of blocks -> floats (d * centroid): the type's dequantize_row, whose scalar
// loop is the portable path
static void tq_decode_row(const uint8_t * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t n, const struct tq_fmt * f) {
#if defined(TQ_AVX2)
    const int bits = f->bits, qk = f->qk;
    const float * centroids = f->centroids;
    const size_t block_size = sizeof(ggml_half) + qk*bits/8;
    const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    const __m256i mask   = _mm256_set1_epi32((1 << bits) - 1);
    const __m256 tlo = bits == 2 ? _mm256_castps128_ps256(_mm_loadu_ps(centroids)) : _mm256_loadu_ps(centroids);
    const __m256 thi = bits == 4 ? _mm256_loadu_ps(centroids + 8) : tlo;
    for (int64_t ib = 0; ib < n/qk; ++ib) {
        const uint8_t * b = x + ib*block_size;
        ggml_half dh;
        memcpy(&dh, b, sizeof(dh));
        const __m256 vd = _mm256_set1_ps(GGML_CPU_FP16_TO_FP32(dh));
        for (int g = 0; g < qk/8; ++g) {
            const __m256 c = tq_lookup8(tq_indices8(b + sizeof(ggml_half), g, bits, shifts, mask), tlo, thi, bits);
            _mm256_storeu_ps(y + ib*qk + 8*g, _mm256_mul_ps(vd, c));
        }
    }
#else
    f->dequantize(x, y, n);
#endif
}

static inline float tq_dot_f32(const float * GGML_RESTRICT a, const float * GGML_RESTRICT b, int64_t n) {
#if defined(TQ_AVX2)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i),     _mm256_loadu_ps(b + i),     acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    return tq_hsum_ps(_mm256_add_ps(acc0, acc1));
#else
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        s += a[i]*b[i];
    }
    return s;
#endif
}

// s[j] = <a, b[j]> for j < m, each exactly as tq_dot_f32 computes it: four rows share each load of a
static void tq_dot_rows(const float * GGML_RESTRICT a, const float * const * b, int64_t n, int m, float * GGML_RESTRICT s) {
    int j = 0;
#if defined(TQ_AVX2)
    for (; j + 4 <= m; j += 4) {
        const float * b0 = b[j], * b1 = b[j + 1], * b2 = b[j + 2], * b3 = b[j + 3];
        __m256 e0 = _mm256_setzero_ps(), e1 = _mm256_setzero_ps(), e2 = _mm256_setzero_ps(), e3 = _mm256_setzero_ps();
        __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps(), o2 = _mm256_setzero_ps(), o3 = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            const __m256 ae = _mm256_loadu_ps(a + i), ao = _mm256_loadu_ps(a + i + 8);
            e0 = _mm256_fmadd_ps(ae, _mm256_loadu_ps(b0 + i), e0);
            o0 = _mm256_fmadd_ps(ao, _mm256_loadu_ps(b0 + i + 8), o0);
            e1 = _mm256_fmadd_ps(ae, _mm256_loadu_ps(b1 + i), e1);
            o1 = _mm256_fmadd_ps(ao, _mm256_loadu_ps(b1 + i + 8), o1);
            e2 = _mm256_fmadd_ps(ae, _mm256_loadu_ps(b2 + i), e2);
            o2 = _mm256_fmadd_ps(ao, _mm256_loadu_ps(b2 + i + 8), o2);
            e3 = _mm256_fmadd_ps(ae, _mm256_loadu_ps(b3 + i), e3);
            o3 = _mm256_fmadd_ps(ao, _mm256_loadu_ps(b3 + i + 8), o3);
        }
        s[j]     = tq_hsum_ps(_mm256_add_ps(e0, o0));
        s[j + 1] = tq_hsum_ps(_mm256_add_ps(e1, o1));
        s[j + 2] = tq_hsum_ps(_mm256_add_ps(e2, o2));
        s[j + 3] = tq_hsum_ps(_mm256_add_ps(e3, o3));
    }
#endif
    for (; j < m; ++j) {
        s[j] = tq_dot_f32(a, b[j], n);
    }
}

// y = y*ms[j] + v[j]*vs[j] for j = 0, 1, .. m-1 in turn (ms[j] == 1: no multiply), with y held in
// registers across the m positions; per element the same operations in the same order as one
// position at a time
static void tq_scale_mad_rows(float * GGML_RESTRICT y, const float * const * v, int64_t n, int m,
                              const float * GGML_RESTRICT ms, const float * GGML_RESTRICT vs) {
#if defined(TQ_AVX2)
    for (int64_t i = 0; i < n; i += 8) {
        __m256 yi = _mm256_loadu_ps(y + i);
        for (int j = 0; j < m; ++j) {
            if (ms[j] != 1.0f) {
                yi = _mm256_mul_ps(yi, _mm256_set1_ps(ms[j]));
            }
            yi = _mm256_fmadd_ps(_mm256_loadu_ps(v[j] + i), _mm256_set1_ps(vs[j]), yi);
        }
        _mm256_storeu_ps(y + i, yi);
    }
#else
    for (int64_t i = 0; i < n; ++i) {
        float yi = y[i];
        for (int j = 0; j < m; ++j) {
            yi = (ms[j] == 1.0f ? yi : yi*ms[j]) + v[j][i]*vs[j];
        }
        y[i] = yi;
    }
#endif
}

struct tq_fa {
    const struct ggml_tensor * q, * k, * v, * mask, * sinks, * dst;
    int64_t DK, DV, rk2, rk3, n_kv;
    const struct tq_fmt * fk, * fv;
    float scale, softcap, max_bias, m0, m1;
    uint32_t n_head_log2;
};

// rows [iq1 0..nt) x the rk2 query heads of KV head ik2, over KV positions [c0, c1). partials:
// NULL writes dst; else each row's M, S and accumulator go to partials + row*stride
static void tq_fa_tile(const struct tq_fa * a, int64_t iq3, int64_t ik2, int64_t t0, int64_t nt,
                       int64_t c0, int64_t c1, float * scratch, float * partials, int64_t stride) {
    const int64_t R = nt*a->rk2, DK = a->DK, DV = a->DV;
    float * acc = scratch;            // [R][DV]
    float * M   = acc + R*DV;         // [R]
    float * S   = M + R;              // [R]
    float * sl  = S + R;              // [R] ALiBi slope
    float * K32 = sl + R;             // [TQ_FA_KV][DK] a block's decoded rows
    float * V32 = K32 + TQ_FA_KV*DK;  // [TQ_FA_KV][DV]
    const float       * qr[TQ_FA_ROWS];
    const ggml_fp16_t * mr[TQ_FA_ROWS];

    const int64_t ik3 = iq3/a->rk3;
    for (int64_t r = 0; r < R; ++r) {
        const int64_t iq1 = t0 + r/a->rk2, iq2 = ik2*a->rk2 + r % a->rk2;
        qr[r] = (const float *) ((const char *) a->q->data + iq1*a->q->nb[1] + iq2*a->q->nb[2] + iq3*a->q->nb[3]);
        mr[r] = a->mask ? (const ggml_fp16_t *) ((const char *) a->mask->data + iq1*a->mask->nb[1] +
                (iq2 % a->mask->ne[2])*a->mask->nb[2] + (iq3 % a->mask->ne[3])*a->mask->nb[3]) : NULL;
        sl[r] = a->max_bias > 0.0f ? (uint32_t) iq2 < a->n_head_log2 ? powf(a->m0, iq2 + 1)
                                   : powf(a->m1, 2*(iq2 - a->n_head_log2) + 1) : 1.0f;
        M[r] = -INFINITY;
        S[r] = 0.0f;
        memset(acc + r*DV, 0, DV*sizeof(float));
    }

    const char * kbase = (const char *) a->k->data + ik2*a->k->nb[2] + ik3*a->k->nb[3];
    const char * vbase = (const char *) a->v->data + ik2*a->v->nb[2] + ik3*a->v->nb[3];
    for (int64_t ic0 = c0; ic0 < c1; ic0 += TQ_FA_KV) {
        // decode the block's positions that some row does not mask
        const int m = (int) MIN(TQ_FA_KV, c1 - ic0);
        int64_t pos[TQ_FA_KV];
        int n_live = 0;
        for (int j = 0; j < m; ++j) {
            const int64_t ic = ic0 + j;
            int64_t r = 0;
            while (r < R && mr[r] && sl[r]*GGML_CPU_FP16_TO_FP32(mr[r][ic]) == -INFINITY) {
                ++r;
            }
            if (r == R) {
                continue;
            }
            tq_decode_row((const uint8_t *) (kbase + ic*a->k->nb[1]), K32 + n_live*DK, DK, a->fk);
            tq_decode_row((const uint8_t *) (vbase + ic*a->v->nb[1]), V32 + n_live*DV, DV, a->fv);
            pos[n_live++] = ic;
        }
        for (int64_t r = 0; r < R; ++r) {
            // this row's unmasked positions, in position order
            const float * kr[TQ_FA_KV], * vr[TQ_FA_KV];
            float sc[TQ_FA_KV], s[TQ_FA_KV], ms[TQ_FA_KV], vs[TQ_FA_KV];
            int n = 0;
            for (int j = 0; j < n_live; ++j) {
                sc[n] = mr[r] ? sl[r]*GGML_CPU_FP16_TO_FP32(mr[r][pos[j]]) : 0.0f;
                if (sc[n] != -INFINITY) {
                    kr[n] = K32 + j*DK;
                    vr[n] = V32 + j*DV;
                    ++n;
                }
            }
            if (n == 0) {
                continue;
            }
            tq_dot_rows(qr[r], kr, DK, n, s);
            // online softmax one position at a time, then the accumulator once for the block
            for (int j = 0; j < n; ++j) {
                float x = s[j]*a->scale;
                if (a->softcap != 0.0f) {
                    x = a->softcap*tanhf(x);
                }
                x += sc[j];
                ms[j] = 1.0f;
                vs[j] = 1.0f;
                if (x > M[r]) {
                    ms[j] = expf(M[r] - x);
                    M[r] = x;
                } else {
                    vs[j] = expf(x - M[r]);
                }
                S[r] = S[r]*ms[j] + vs[j];
            }
            tq_scale_mad_rows(acc + r*DV, vr, DV, n, ms, vs);
        }
    }

    const struct ggml_tensor * dst = a->dst;
    for (int64_t r = 0; r < R; ++r) {
        const int64_t iq1 = t0 + r/a->rk2, iq2 = ik2*a->rk2 + r % a->rk2;
        float * y = acc + r*DV;
        if (a->sinks && c0 == 0) {
            const float s = ((const float *) a->sinks->data)[iq2];
            float ms = 1.0f, vs = 1.0f;
            if (s > M[r]) {
                ms = expf(M[r] - s);
                M[r] = s;
                for (int64_t d = 0; d < DV; ++d) {
                    y[d] *= ms;
                }
            } else {
                vs = expf(s - M[r]);
            }
            S[r] = S[r]*ms + vs;
        }
        if (partials) {
            float * p = partials + r*stride;
            p[0] = M[r];
            p[1] = S[r];
            memcpy(p + 2, y, DV*sizeof(float));
            continue;
        }
        const float S_inv = S[r] == 0.0f ? 0.0f : 1.0f/S[r];
        for (int64_t d = 0; d < DV; ++d) {
            y[d] *= S_inv;
        }
        // permute(0, 2, 1, 3), as upstream
        memcpy((char *) dst->data + (iq3*dst->ne[2]*dst->ne[1] + iq2 + iq1*dst->ne[1])*dst->nb[1], y, dst->nb[1]);
    }
}

bool ggml_compute_forward_flash_attn_ext_turbo(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    const struct ggml_tensor * q = dst->src[0], * k = dst->src[1], * v = dst->src[2];
    struct tq_fa a = {
        .q = q, .k = k, .v = v, .mask = dst->src[3], .sinks = dst->src[4], .dst = dst,
        .DK = k->ne[0], .DV = v->ne[0], .n_kv = k->ne[1],
        .fk = tq_fmt_of(k->type), .fv = tq_fmt_of(v->type),
    };
    if (params->use_ref || !a.fk || !a.fv || q->type != GGML_TYPE_F32 ||
        (a.mask && a.mask->type != GGML_TYPE_F16) || k->ne[2] != v->ne[2] || k->ne[3] != v->ne[3] ||
        q->ne[2] % k->ne[2] != 0 || q->ne[3] % k->ne[3] != 0 || a.DK % 16 != 0 || a.DV % 16 != 0 ||
        q->nb[0] != sizeof(float) || dst->nb[0] != sizeof(float)) {
        return false;
    }
    a.rk2 = q->ne[2]/k->ne[2];
    a.rk3 = q->ne[3]/k->ne[3];
    if (a.rk2 > TQ_FA_ROWS) {
        return false;
    }
    memcpy(&a.scale,    (const float *) dst->op_params + 0, sizeof(float));
    memcpy(&a.max_bias, (const float *) dst->op_params + 1, sizeof(float));
    memcpy(&a.softcap,  (const float *) dst->op_params + 2, sizeof(float));
    if (a.softcap != 0.0f) {
        a.scale /= a.softcap;
    }
    a.n_head_log2 = 1u << (uint32_t) floor(log2((double) q->ne[2]));
    a.m0 = powf(2.0f, -(a.max_bias       )/a.n_head_log2);
    a.m1 = powf(2.0f, -(a.max_bias / 2.0f)/a.n_head_log2);

    const int ith = params->ith, nth = params->nth;
    const int64_t N = q->ne[1], n_kvh = k->ne[2]*q->ne[3];   // KV heads, over the batch dim too
    const int64_t nt = N == 1 ? 1 : MAX(1, TQ_FA_ROWS/a.rk2); // positions per tile
    const int64_t R = nt*a.rk2;
    const size_t  per_thread = (size_t) (R*(a.DV + 3) + TQ_FA_KV*(a.DK + a.DV) + 16);
    // a decode step splits the cache over the threads when its KV heads alone would not keep
    // them busy; chunks of at least 256 positions
    const int64_t n_chunks = N == 1 && n_kvh < 2*nth ? MAX(1, MIN(nth, a.n_kv/256)) : 1;
    const int64_t stride = 2 + a.DV;
    const size_t  need = (nth*per_thread + (n_chunks > 1 ? n_kvh*R*n_chunks*stride : 0))*sizeof(float);
    if (need > params->wsize) {
        return false;
    }
    float * scratch  = (float *) params->wdata + ith*per_thread;
    float * partials = (float *) params->wdata + nth*per_thread;

    if (n_chunks == 1) {
        // tiles (KV head x positions) handed out as threads come free: later positions of a
        // causal prompt see more of the cache
        const int64_t n_pos_tiles = (N + nt - 1)/nt, n_tiles = n_kvh*n_pos_tiles;
        if (ith == 0) {
            ggml_threadpool_chunk_set(params->threadpool, nth);
        }
        ggml_barrier(params->threadpool);
        for (int64_t t = ith; t < n_tiles; t = ggml_threadpool_chunk_add(params->threadpool, 1)) {
            const int64_t h = t % n_kvh, pt = t / n_kvh;
            const int64_t t0 = pt*nt;
            tq_fa_tile(&a, h / k->ne[2], h % k->ne[2], t0, MIN(nt, N - t0), 0, a.n_kv, scratch, NULL, 0);
        }
        return true;
    }

    // decode, split: unit u = (KV head, chunk); partials of row r of head h, chunk c at
    // partials + ((h*R + r)*n_chunks + c)*stride
    const int64_t chunk = (a.n_kv + n_chunks - 1)/n_chunks;
    for (int64_t u = ith; u < n_kvh*n_chunks; u += nth) {
        const int64_t h = u / n_chunks, c = u % n_chunks;
        const int64_t c0 = c*chunk, c1 = MIN(c0 + chunk, a.n_kv);
        tq_fa_tile(&a, h / k->ne[2], h % k->ne[2], 0, 1, c0, MAX(c0, c1), scratch,
                   partials + (h*R*n_chunks + c)*stride, n_chunks*stride);
    }
    ggml_barrier(params->threadpool);
    for (int64_t row = ith; row < n_kvh*R; row += nth) {
        const int64_t h = row / R, r = row % R;
        const int64_t iq3 = h / k->ne[2], iq2 = (h % k->ne[2])*a.rk2 + r;
        float * y = scratch;
        float M = -INFINITY, S = 0.0f;
        memset(y, 0, a.DV*sizeof(float));
        for (int64_t c = 0; c < n_chunks; ++c) {
            const float * p = partials + (row*n_chunks + c)*stride;
            if (p[1] == 0.0f) {
                continue;
            }
            const float Mn = fmaxf(M, p[0]), so = expf(M - Mn), sn = expf(p[0] - Mn);
            for (int64_t d = 0; d < a.DV; ++d) {
                y[d] = y[d]*so + p[2 + d]*sn;
            }
            S = S*so + p[1]*sn;
            M = Mn;
        }
        const float S_inv = S == 0.0f ? 0.0f : 1.0f/S;
        for (int64_t d = 0; d < a.DV; ++d) {
            y[d] *= S_inv;
        }
        memcpy((char *) dst->data + (iq3*dst->ne[2]*dst->ne[1] + iq2)*dst->nb[1], y, dst->nb[1]);
    }
    return true;
}
