// TurboQuant_mse reference quantization (arXiv 2504.19874, Algorithm 1) for rotated KV rows.
#define GGML_COMMON_IMPL_C
#include "ggml-common.h"

#include "tq-quants.h"
#include "tq-codebooks.h"
#include "ggml-impl.h"

#include <assert.h>
#include <math.h>
#include <string.h>

static_assert(TQ_CODEBOOK_DIM == QK_TQ && TQ32_CODEBOOK_DIM == QK_TQ32 && TQ16_CODEBOOK_DIM == QK_TQ16,
              "codebooks must be solved for the block dimension");

// largest finite fp16: a larger finite scale is clamped to it; NaN and inf (from NaN/inf inputs)
// are stored as they are, so ggml_validate_row_data flags the row
#define TQ_D_MAX 65504.0f

static inline void tq_store_group(uint8_t * p, uint32_t w, int bits) {
    for (int j = 0; j < bits; ++j) {
        p[j] = (uint8_t) (w >> (8*j));
    }
}

// Indices of one block for the scale s: value i gets #(x_i > boundary_j*s). Products, not a
// division by s: a product is exactly rounded on every backend, a fast-math division is not.
static inline void tq_block_indices(const float * GGML_RESTRICT x, int qk, float s, int bits, const float * boundaries,
                                    uint8_t * GGML_RESTRICT idx) {
    const int nb = (1 << bits) - 1;

    float thr[15];
    for (int j = 0; j < nb; ++j) {
        thr[j] = boundaries[j] * s;
    }
    for (int i = 0; i < qk; ++i) {
        uint8_t k = 0;
        for (int j = 0; j < nb; ++j) {
            k += x[i] > thr[j];
        }
        idx[i] = k;
    }
}

// One block. The paper encodes with the block norm (d = ||x||). The codebook is solved for the
// average block, so the encoder tries TQ_SCALE_STEPS scales (28..52)/40 * ||x|| (the paper's is
// one of them) for the decision boundaries and keeps the index set whose least-squares scale
// d = <x,c>/<c,c> leaves the smallest error ||x||^2 - <x,c>^2/<c,c>; d is stored. A later
// candidate must beat the best by a relative TQ_SCALE_TIE, far above the rounding of the float64
// sums, so exact ties (a constant block gains the same at every scale) resolve to the first one
// on every backend. The decoder is the paper's: y_i = d * centroid[idx_i].
static inline void tq_quantize_block(const float * GGML_RESTRICT x, int qk, ggml_half * d, uint8_t * GGML_RESTRICT qs,
                              int bits, const float * boundaries, const float * centroids) {
    double sumsq = 0.0;
    for (int i = 0; i < qk; ++i) {
        sumsq += (double) x[i] * (double) x[i];
    }
    const float norm = (float) sqrt(sumsq);

    uint8_t idx[QK_TQ];  // qk <= QK_TQ
    uint8_t best[QK_TQ];
    float   scale = norm;

    if (!(norm > 0.0f && isfinite(norm))) {
        // zero, inf and NaN norms: the paper's encoding (inf/NaN are kept for row validation)
        tq_block_indices(x, qk, norm, bits, boundaries, best);
    } else {
        double best_gain = -1.0;
        for (int s = 0; s < TQ_SCALE_STEPS; ++s) {
            tq_block_indices(x, qk, norm * ((float) (TQ_SCALE_MIN + s) / TQ_SCALE_DIV), bits, boundaries, idx);
            double xc = 0.0;
            double cc = 0.0;
            for (int i = 0; i < qk; ++i) {
                const double c = centroids[idx[i]];
                xc += (double) x[i] * c;
                cc += c * c;
            }
            const double gain = xc*xc/cc;
            if (gain > best_gain*(1.0 + TQ_SCALE_TIE)) {
                best_gain = gain;
                scale     = (float) (xc/cc);
                memcpy(best, idx, qk);
            }
        }
    }

    for (int g = 0; g < qk/8; ++g) {
        uint32_t w = 0;
        for (int l = 0; l < 8; ++l) {
            w |= (uint32_t) best[8*g + l] << (bits*l);
        }
        tq_store_group(qs + bits*g, w, bits);
    }

    *d = GGML_FP32_TO_FP16(scale > TQ_D_MAX && !isinf(scale) ? TQ_D_MAX : scale);
}

static inline void tq_dequantize_block(ggml_half d16, const uint8_t * GGML_RESTRICT qs, float * GGML_RESTRICT y,
                                int qk, int bits, const float * centroids) {
    const float d = GGML_FP16_TO_FP32(d16);
    const uint32_t mask = (1u << bits) - 1;

    for (int g = 0; g < qk/8; ++g) {
        const uint32_t w = tq_load_group(qs + bits*g, bits);
        for (int l = 0; l < 8; ++l) {
            y[8*g + l] = d * centroids[(w >> (bits*l)) & mask];
        }
    }
}

// NAME: turboB_0 (blocks of QK_TQ, codebooks tq_*), turboB_0_b32 (QK_TQ32, tq32_*) or turboB_0_b16 (QK_TQ16, tq16_*)
#define TQ_DEFINE_ROW_FUNCS(NAME, TYPE, QK, BITS, CB)                                                      \
void quantize_row_##NAME##_ref(const float * GGML_RESTRICT x, block_##NAME * GGML_RESTRICT y, int64_t k) { \
    assert(k % QK == 0);                                                                                   \
    for (int64_t i = 0; i < k/QK; ++i) {                                                                   \
        tq_quantize_block(x + i*QK, QK, &y[i].d, y[i].qs, BITS, CB##_boundaries_##BITS, CB##_centroids_##BITS); \
    }                                                                                                      \
}                                                                                                          \
void dequantize_row_##NAME(const block_##NAME * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {     \
    assert(k % QK == 0);                                                                                   \
    for (int64_t i = 0; i < k/QK; ++i) {                                                                   \
        tq_dequantize_block(x[i].d, x[i].qs, y + i*QK, QK, BITS, CB##_centroids_##BITS);                   \
    }                                                                                                      \
}                                                                                                          \
size_t quantize_##NAME(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows,           \
                       int64_t n_per_row, const float * imatrix) {                                         \
    GGML_UNUSED(imatrix); /* data-oblivious: the codebook does not depend on the data */                   \
    const size_t row_size = ggml_row_size(TYPE, n_per_row);                                                \
    for (int64_t r = 0; r < nrows; ++r) {                                                                  \
        quantize_row_##NAME##_ref(src + r*n_per_row, (block_##NAME *) ((char *) dst + r*row_size), n_per_row); \
    }                                                                                                      \
    return nrows*row_size;                                                                                 \
}

TQ_DEFINE_ROW_FUNCS(turbo2_0,     GGML_TYPE_TURBO2_0,     QK_TQ,   2, tq)
TQ_DEFINE_ROW_FUNCS(turbo3_0,     GGML_TYPE_TURBO3_0,     QK_TQ,   3, tq)
TQ_DEFINE_ROW_FUNCS(turbo4_0,     GGML_TYPE_TURBO4_0,     QK_TQ,   4, tq)
TQ_DEFINE_ROW_FUNCS(turbo2_0_b32, GGML_TYPE_TURBO2_0_B32, QK_TQ32, 2, tq32)
TQ_DEFINE_ROW_FUNCS(turbo3_0_b32, GGML_TYPE_TURBO3_0_B32, QK_TQ32, 3, tq32)
TQ_DEFINE_ROW_FUNCS(turbo4_0_b32, GGML_TYPE_TURBO4_0_B32, QK_TQ32, 4, tq32)
TQ_DEFINE_ROW_FUNCS(turbo2_0_b16, GGML_TYPE_TURBO2_0_B16, QK_TQ16, 2, tq16)
TQ_DEFINE_ROW_FUNCS(turbo3_0_b16, GGML_TYPE_TURBO3_0_B16, QK_TQ16, 3, tq16)
TQ_DEFINE_ROW_FUNCS(turbo4_0_b16, GGML_TYPE_TURBO4_0_B16, QK_TQ16, 4, tq16)

// Cache-type names. ggml's own "tq1_0"/"tq2_0" are ternary weight types; as KV-cache types the
// tqN_0 names select TurboQuant (ternary weights were never valid cache types).
enum ggml_type ggml_turbo_type_from_name(const char * name) {
    static const struct { const char * name; enum ggml_type type; } names[] = {
        { "tq2_0",    GGML_TYPE_TURBO2_0 }, { "tq3_0",    GGML_TYPE_TURBO3_0 }, { "tq4_0",    GGML_TYPE_TURBO4_0 },
        { "turbo2_0", GGML_TYPE_TURBO2_0 }, { "turbo3_0", GGML_TYPE_TURBO3_0 }, { "turbo4_0", GGML_TYPE_TURBO4_0 },
        { "tq2_0_b32", GGML_TYPE_TURBO2_0_B32 }, { "tq3_0_b32", GGML_TYPE_TURBO3_0_B32 }, { "tq4_0_b32", GGML_TYPE_TURBO4_0_B32 },
        { "turbo2_0_b32", GGML_TYPE_TURBO2_0_B32 }, { "turbo3_0_b32", GGML_TYPE_TURBO3_0_B32 },
        { "turbo4_0_b32", GGML_TYPE_TURBO4_0_B32 },
        { "tq2_0_b16", GGML_TYPE_TURBO2_0_B16 }, { "tq3_0_b16", GGML_TYPE_TURBO3_0_B16 }, { "tq4_0_b16", GGML_TYPE_TURBO4_0_B16 },
        { "turbo2_0_b16", GGML_TYPE_TURBO2_0_B16 }, { "turbo3_0_b16", GGML_TYPE_TURBO3_0_B16 },
        { "turbo4_0_b16", GGML_TYPE_TURBO4_0_B16 },
    };
    for (size_t i = 0; i < sizeof(names)/sizeof(names[0]); ++i) {
        if (strcmp(name, names[i].name) == 0) {
            return names[i].type;
        }
    }
    return GGML_TYPE_COUNT;
}

const char * ggml_turbo_type_desc(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_TURBO2_0: return "TurboQuant tq2_0 (2-bit Lloyd-Max, 2.25 bits/value)";
        case GGML_TYPE_TURBO3_0: return "TurboQuant tq3_0 (3-bit Lloyd-Max, 3.25 bits/value)";
        case GGML_TYPE_TURBO4_0: return "TurboQuant tq4_0 (4-bit Lloyd-Max, 4.25 bits/value)";
        case GGML_TYPE_TURBO2_0_B32: return "TurboQuant tq2_0 in blocks of 32 (2-bit Lloyd-Max, 2.5 bits/value)";
        case GGML_TYPE_TURBO3_0_B32: return "TurboQuant tq3_0 in blocks of 32 (3-bit Lloyd-Max, 3.5 bits/value)";
        case GGML_TYPE_TURBO4_0_B32: return "TurboQuant tq4_0 in blocks of 32 (4-bit Lloyd-Max, 4.5 bits/value)";
        case GGML_TYPE_TURBO2_0_B16: return "TurboQuant tq2_0 in blocks of 16 (2-bit Lloyd-Max, 3 bits/value)";
        case GGML_TYPE_TURBO3_0_B16: return "TurboQuant tq3_0 in blocks of 16 (3-bit Lloyd-Max, 4 bits/value)";
        case GGML_TYPE_TURBO4_0_B16: return "TurboQuant tq4_0 in blocks of 16 (4-bit Lloyd-Max, 5 bits/value)";
        default:                 return NULL;
    }
}

enum ggml_type ggml_turbo_type_for_head(enum ggml_type type, int64_t n) {
    // per type, its forms from the largest block down
    static const enum ggml_type forms[][3] = {
        { GGML_TYPE_TURBO2_0, GGML_TYPE_TURBO2_0_B32, GGML_TYPE_TURBO2_0_B16 },
        { GGML_TYPE_TURBO3_0, GGML_TYPE_TURBO3_0_B32, GGML_TYPE_TURBO3_0_B16 },
        { GGML_TYPE_TURBO4_0, GGML_TYPE_TURBO4_0_B32, GGML_TYPE_TURBO4_0_B16 },
    };
    if (n <= 0) {
        return GGML_TYPE_COUNT;
    }
    for (size_t i = 0; i < sizeof(forms)/sizeof(forms[0]); ++i) {
        if (type != forms[i][0] && type != forms[i][1] && type != forms[i][2]) {
            continue;
        }
        // a form asked for by name keeps its block where that divides the head; else the largest
        // block that does
        if (n % ggml_blck_size(type) == 0) {
            return type;
        }
        for (int j = 0; j < 3; ++j) {
            if (n % ggml_blck_size(forms[i][j]) == 0) {
                return forms[i][j];
            }
        }
        return GGML_TYPE_COUNT;
    }
    return GGML_TYPE_COUNT;
}
