// FlashAttention vector kernel, K f16 / V turbo4_0 (one of the pairs in TQ_FATTN_VEC_PAIRS, tq-cuda.cuh).

#include "../../ggml-cuda/fattn-vec.cuh"

DECL_FATTN_VEC_CASE( 64, GGML_TYPE_F16, GGML_TYPE_TURBO4_0);
DECL_FATTN_VEC_CASE(128, GGML_TYPE_F16, GGML_TYPE_TURBO4_0);
DECL_FATTN_VEC_CASE(256, GGML_TYPE_F16, GGML_TYPE_TURBO4_0);
