// FlashAttention vector kernel, K turbo4_0 / V f16 (one of the pairs in TQ_FATTN_VEC_PAIRS, tq-cuda.cuh).

#include "../../ggml-cuda/fattn-vec.cuh"

DECL_FATTN_VEC_CASE( 64, GGML_TYPE_TURBO4_0, GGML_TYPE_F16);
DECL_FATTN_VEC_CASE(128, GGML_TYPE_TURBO4_0, GGML_TYPE_F16);
DECL_FATTN_VEC_CASE(256, GGML_TYPE_TURBO4_0, GGML_TYPE_F16);
