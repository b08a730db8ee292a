// TurboQuant GQA decode kernel (tq-fattn-gqa.cuh), K turbo3_0 / V turbo4_0: every head size and grouping.

#include "../tq-fattn-gqa.cuh"

TQ_FATTN_GQA_DECL_PAIR(, GGML_TYPE_TURBO3_0, GGML_TYPE_TURBO4_0)
