// TurboQuant KV-cache types: CPU backend kernels (from_float, vec_dot against F32 queries).
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

void quantize_row_turbo2_0(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);
void quantize_row_turbo3_0(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);
void quantize_row_turbo4_0(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);

// s = dot(x, y) with x a row of TurboQuant blocks and y an F32 row (the rotated query)
void ggml_vec_dot_turbo2_0_f32(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_turbo3_0_f32(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_turbo4_0_f32(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

struct ggml_compute_params;
// GGML_OP_TURBO_K_ROT: dst = H(x*a) - off or H(x/a) (ggml_turbo_k_rot, tq-offset.c)
void ggml_compute_forward_turbo_k_rot(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
