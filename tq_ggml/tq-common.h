// TurboQuant KV-cache block formats (arXiv 2504.19874, Algorithm 1: TurboQuant_mse).
//
// A block holds QK_TQ consecutive values of an already rotated K or V row (llama.cpp applies a
// Hadamard rotation to Q/K/V whenever the cache type is quantized: README, "Rotation"), a scale d
// and one Lloyd-Max codebook index per value. The codebooks (tq-codebooks.h) are solved for the
// coordinate law of a random unit vector in R^QK_TQ, so value i is rebuilt as d * centroid[index_i].
// The paper's d is the block's L2 norm; the encoder (tq-quants.c) searches the decision scale
// around it and stores the least-squares d for the chosen indices (same decoder, lower error).
//
// Indices form a little-endian bit stream: index i occupies bits [b*i, b*i + b) of qs. Eight
// consecutive indices thus sit in exactly b bytes: 3-bit indices are packed densely, and SIMD or
// CUDA code decodes 8 values from one small load.
//
// Include after ggml-common.h (ggml_half must be declared).
#pragma once

#define QK_TQ 64
// the smaller blocks of the tqN_0_b32 and tqN_0_b16 forms: the same format over 32 or 16 values, for
// head sizes that are not a multiple of 64 (96: 32; 80, 112: 16); the fp16 scale then costs 0.5 or
// 1 bit per value, not 0.25
#define QK_TQ32 32
#define QK_TQ16 16

// encoder scale search: boundaries scaled by (TQ_SCALE_MIN + s)/TQ_SCALE_DIV * ||x||, s < TQ_SCALE_STEPS
#define TQ_SCALE_MIN   28
#define TQ_SCALE_STEPS 25
#define TQ_SCALE_DIV   40.0f
#define TQ_SCALE_TIE   1e-9

typedef struct {
    ggml_half d;              // block scale
    uint8_t qs[QK_TQ * 2 / 8]; // 2-bit indices
} block_turbo2_0;
static_assert(sizeof(block_turbo2_0) == sizeof(ggml_half) + QK_TQ * 2 / 8, "wrong turbo2_0 block size/padding");

typedef struct {
    ggml_half d;              // block scale
    uint8_t qs[QK_TQ * 3 / 8]; // 3-bit indices
} block_turbo3_0;
static_assert(sizeof(block_turbo3_0) == sizeof(ggml_half) + QK_TQ * 3 / 8, "wrong turbo3_0 block size/padding");

typedef struct {
    ggml_half d;              // block scale
    uint8_t qs[QK_TQ * 4 / 8]; // 4-bit indices
} block_turbo4_0;
static_assert(sizeof(block_turbo4_0) == sizeof(ggml_half) + QK_TQ * 4 / 8, "wrong turbo4_0 block size/padding");

typedef struct {
    ggml_half d;
    uint8_t qs[QK_TQ32 * 2 / 8];
} block_turbo2_0_b32;
static_assert(sizeof(block_turbo2_0_b32) == sizeof(ggml_half) + QK_TQ32 * 2 / 8, "wrong turbo2_0_b32 block size/padding");

typedef struct {
    ggml_half d;
    uint8_t qs[QK_TQ32 * 3 / 8];
} block_turbo3_0_b32;
static_assert(sizeof(block_turbo3_0_b32) == sizeof(ggml_half) + QK_TQ32 * 3 / 8, "wrong turbo3_0_b32 block size/padding");

typedef struct {
    ggml_half d;
    uint8_t qs[QK_TQ32 * 4 / 8];
} block_turbo4_0_b32;
static_assert(sizeof(block_turbo4_0_b32) == sizeof(ggml_half) + QK_TQ32 * 4 / 8, "wrong turbo4_0_b32 block size/padding");

typedef struct {
    ggml_half d;
    uint8_t qs[QK_TQ16 * 2 / 8];
} block_turbo2_0_b16;
static_assert(sizeof(block_turbo2_0_b16) == sizeof(ggml_half) + QK_TQ16 * 2 / 8, "wrong turbo2_0_b16 block size/padding");

typedef struct {
    ggml_half d;
    uint8_t qs[QK_TQ16 * 3 / 8];
} block_turbo3_0_b16;
static_assert(sizeof(block_turbo3_0_b16) == sizeof(ggml_half) + QK_TQ16 * 3 / 8, "wrong turbo3_0_b16 block size/padding");

typedef struct {
    ggml_half d;
    uint8_t qs[QK_TQ16 * 4 / 8];
} block_turbo4_0_b16;
static_assert(sizeof(block_turbo4_0_b16) == sizeof(ggml_half) + QK_TQ16 * 4 / 8, "wrong turbo4_0_b16 block size/padding");

// the 8 indices of group g (bits bytes at qs + bits*g), assembled in a register: a memcpy into a
// stack word would stall on store forwarding before a SIMD broadcast
static inline uint32_t tq_load_group(const uint8_t * p, int bits) {
    uint32_t w = 0;
    for (int j = 0; j < bits; ++j) {
        w |= (uint32_t) p[j] << (8*j);
    }
    return w;
}
