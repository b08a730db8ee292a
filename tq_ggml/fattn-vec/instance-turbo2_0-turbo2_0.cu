// FlashAttention vector kernel, K turbo2_0 / V turbo2_0 (one of the pairs in TQ_FATTN_VEC_PAIRS, tq-cuda.cuh).

#include "../../ggml-cuda/fattn-vec.cuh"

DECL_FATTN_VEC_CASE( 64, GGML_TYPE_TURBO2_0, GGML_TYPE_TURBO2_0);
DECL_FATTN_VEC_CASE(128, GGML_TYPE_TURBO2_0, GGML_TYPE_TURBO2_0);
DECL_FATTN_VEC_CASE(256, GGML_TYPE_TURBO2_0, GGML_TYPE_TURBO2_0);
