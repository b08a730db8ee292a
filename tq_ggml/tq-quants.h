// TurboQuant KV-cache types: scalar reference quantize/dequantize (ggml-base).
// These are the specification the CPU fast paths, the CUDA kernels and the Python reference
// must agree with.
#pragma once

#define GGML_COMMON_DECL_C
#include "ggml-common.h"
#include "ggml.h"

#include "tq-common.h"

#ifdef __cplusplus
extern "C" {
#endif

// GGML_API: the CPU backend, a separate library, calls these.
GGML_API void quantize_row_turbo2_0_ref(const float * GGML_RESTRICT x, block_turbo2_0 * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_turbo3_0_ref(const float * GGML_RESTRICT x, block_turbo3_0 * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_turbo4_0_ref(const float * GGML_RESTRICT x, block_turbo4_0 * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_turbo2_0_b32_ref(const float * GGML_RESTRICT x, block_turbo2_0_b32 * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_turbo3_0_b32_ref(const float * GGML_RESTRICT x, block_turbo3_0_b32 * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_turbo4_0_b32_ref(const float * GGML_RESTRICT x, block_turbo4_0_b32 * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_turbo2_0_b16_ref(const float * GGML_RESTRICT x, block_turbo2_0_b16 * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_turbo3_0_b16_ref(const float * GGML_RESTRICT x, block_turbo3_0_b16 * GGML_RESTRICT y, int64_t k);
GGML_API void quantize_row_turbo4_0_b16_ref(const float * GGML_RESTRICT x, block_turbo4_0_b16 * GGML_RESTRICT y, int64_t k);

GGML_API void dequantize_row_turbo2_0(const block_turbo2_0 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_turbo3_0(const block_turbo3_0 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_turbo4_0(const block_turbo4_0 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_turbo2_0_b32(const block_turbo2_0_b32 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_turbo3_0_b32(const block_turbo3_0_b32 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_turbo4_0_b32(const block_turbo4_0_b32 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_turbo2_0_b16(const block_turbo2_0_b16 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_turbo3_0_b16(const block_turbo3_0_b16 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
GGML_API void dequantize_row_turbo4_0_b16(const block_turbo4_0_b16 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);

GGML_API size_t quantize_turbo2_0(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_turbo3_0(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_turbo4_0(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_turbo2_0_b32(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_turbo3_0_b32(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_turbo4_0_b32(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_turbo2_0_b16(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_turbo3_0_b16(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);
GGML_API size_t quantize_turbo4_0_b16(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, int64_t n_per_row, const float * imatrix);

#ifdef __cplusplus
}
#endif
