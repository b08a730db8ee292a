// TurboQuant GQA decode kernels (tq-fattn-gqa.cuh, tq-fattn-mma.cuh), K turbo2_0 / V turbo4_0: every head size and grouping.

#include "../tq-fattn-gqa.cuh"

TQ_FATTN_GQA_DECL_PAIR(, GGML_TYPE_TURBO2_0, GGML_TYPE_TURBO4_0)
TQ_FATTN_MMA_DECL_PAIR(, GGML_TYPE_TURBO2_0, GGML_TYPE_TURBO4_0)
