// TurboQuant KV-cache types on CUDA: the device code that the ggml-cuda ops call (patch 0007 wires
// it in). Dequantization for GET_ROWS and the F32/F16/BF16 converters, the flash-attention vector
// kernel's K.Q dot product and V rows, which read the packed cache directly, and the host entry
// points of the encoder (SET_ROWS, CPY) in tq-cuda.cu. tq-quants.c is the specification: quantized
// bytes and dequantized values equal it (tqkv parity checks both).
#pragma once

#include "../ggml-cuda/common.cuh"
#include "../ggml-cuda/convert.cuh"

#include "tq-common.h"
#include "tq-codebooks.h"

// No __restrict__ on pointers into tensors: the kernels here start under programmatic dependent
// launch (Hopper and newer) before the kernel that writes their inputs has finished, and a const
// __restrict__ pointer lets nvcc read through the non-coherent path (LDG.CONSTANT), which need not
// see those writes after the wait. As upstream's kernels do, a kernel takes plain pointers and
// qualifies local copies with GGML_CUDA_RESTRICT, which is __restrict__ only where PDL is not
// compiled in (a kernel's parameter types must be the same in nvcc's host and device passes).

static constexpr __host__ __device__ bool tq_cuda_is_turbo(const ggml_type type) {
    return type == GGML_TYPE_TURBO2_0 || type == GGML_TYPE_TURBO3_0 || type == GGML_TYPE_TURBO4_0;
}

static constexpr __host__ __device__ int tq_cuda_bits(const ggml_type type) {
    return type == GGML_TYPE_TURBO2_0 ? 2 : type == GGML_TYPE_TURBO3_0 ? 3 : 4;
}

// The forms in blocks of 32 and 16 (head sizes 80, 96, 112; llama_kv_cache picks them): the encoder,
// CPY, GET_ROWS and the converters. Flash attention reads them through upstream's conversion of K
// and V to f16 (the MMA and tile kernels take head sizes 80-112; the vector kernel only 64-256).
#define TQ_CUDA_SMALL_FORMS(X) \
    X(TURBO2_0_B32) X(TURBO3_0_B32) X(TURBO4_0_B32) X(TURBO2_0_B16) X(TURBO3_0_B16) X(TURBO4_0_B16)
#define TQ_CUDA_CASE(T) case GGML_TYPE_##T:

static constexpr __host__ __device__ bool tq_cuda_is_small_form(const ggml_type type) {
    return type == GGML_TYPE_TURBO2_0_B32 || type == GGML_TYPE_TURBO3_0_B32 || type == GGML_TYPE_TURBO4_0_B32 ||
           type == GGML_TYPE_TURBO2_0_B16 || type == GGML_TYPE_TURBO3_0_B16 || type == GGML_TYPE_TURBO4_0_B16;
}

// any TurboQuant form (the kernels above that read blocks of 64 take tq_cuda_is_turbo only)
static constexpr __host__ __device__ bool tq_cuda_is_tq(const ggml_type type) {
    return tq_cuda_is_turbo(type) || tq_cuda_is_small_form(type);
}

static __constant__ float tq_cuda_centroids_2[4]  = TQ_CENTROIDS_2;
static __constant__ float tq_cuda_centroids_3[8]  = TQ_CENTROIDS_3;
static __constant__ float tq_cuda_centroids_4[16] = TQ_CENTROIDS_4;

template <int bits>
static __device__ __forceinline__ const float * tq_cuda_centroids() {
    return bits == 2 ? tq_cuda_centroids_2 : bits == 3 ? tq_cuda_centroids_3 : tq_cuda_centroids_4;
}

static __constant__ float tq_cuda_centroids32_2[4]  = TQ32_CENTROIDS_2;
static __constant__ float tq_cuda_centroids32_3[8]  = TQ32_CENTROIDS_3;
static __constant__ float tq_cuda_centroids32_4[16] = TQ32_CENTROIDS_4;
static __constant__ float tq_cuda_centroids16_2[4]  = TQ16_CENTROIDS_2;
static __constant__ float tq_cuda_centroids16_3[8]  = TQ16_CENTROIDS_3;
static __constant__ float tq_cuda_centroids16_4[16] = TQ16_CENTROIDS_4;

// one form of a type: its block, block size, bits and codebook
template <ggml_type type> struct tq_cuda_form;
#define TQ_CUDA_FORM(T, t, QK, BITS, CB)                                                    \
    template <> struct tq_cuda_form<GGML_TYPE_##T> {                                       \
        typedef block_##t block;                                                           \
        static constexpr int qk   = QK;                                                    \
        static constexpr int bits = BITS;                                                  \
        static __device__ __forceinline__ const float * centroids() { return CB; }         \
    };
TQ_CUDA_FORM(TURBO2_0,     turbo2_0,     QK_TQ,   2, tq_cuda_centroids_2)
TQ_CUDA_FORM(TURBO3_0,     turbo3_0,     QK_TQ,   3, tq_cuda_centroids_3)
TQ_CUDA_FORM(TURBO4_0,     turbo4_0,     QK_TQ,   4, tq_cuda_centroids_4)
TQ_CUDA_FORM(TURBO2_0_B32, turbo2_0_b32, QK_TQ32, 2, tq_cuda_centroids32_2)
TQ_CUDA_FORM(TURBO3_0_B32, turbo3_0_b32, QK_TQ32, 3, tq_cuda_centroids32_3)
TQ_CUDA_FORM(TURBO4_0_B32, turbo4_0_b32, QK_TQ32, 4, tq_cuda_centroids32_4)
TQ_CUDA_FORM(TURBO2_0_B16, turbo2_0_b16, QK_TQ16, 2, tq_cuda_centroids16_2)
TQ_CUDA_FORM(TURBO3_0_B16, turbo3_0_b16, QK_TQ16, 3, tq_cuda_centroids16_3)
TQ_CUDA_FORM(TURBO4_0_B16, turbo4_0_b16, QK_TQ16, 4, tq_cuda_centroids16_4)
#undef TQ_CUDA_FORM

// the blocks-of-64 form of a bit width
static constexpr __host__ __device__ ggml_type tq_cuda_type_of_bits(const int bits) {
    return bits == 2 ? GGML_TYPE_TURBO2_0 : bits == 3 ? GGML_TYPE_TURBO3_0 : GGML_TYPE_TURBO4_0;
}

// the block of the blocks-of-64 form of a bit width
template <int bits> struct tq_cuda_block {
    typedef typename tq_cuda_form<tq_cuda_type_of_bits(bits)>::block type;
};

// The 8 indices of group g (values 8g..8g+7) of a block: bits bytes at qs + bits*g. Blocks are
// 2-byte aligned (an fp16 scale, then an even number of index bytes), so 16-bit loads are: one for
// 2-bit, two for 4-bit, and for 3-bit the two aligned halfwords that hold the 3 bytes.
template <int bits>
static __device__ __forceinline__ uint32_t tq_cuda_load_group(const uint8_t * qs, const int g) {
    if constexpr (bits == 2) {
        return *(const uint16_t *) (qs + 2*g);
    } else if constexpr (bits == 4) {
        const uint16_t * p = (const uint16_t *) (qs + 4*g);
        return p[0] | ((uint32_t) p[1] << 16);
    } else {
        static_assert(bits == 3, "bad bits");
        const int       o = 3*g;
        const uint16_t * p = (const uint16_t *) (qs + (o & ~1));
        return (p[0] | ((uint32_t) p[1] << 16)) >> (8*(o & 1));
    }
}

// dequantize_kernel_t with qr == 1: values iqs and iqs + 1 of block ib (GET_ROWS, converters)
template <ggml_type type>
static __device__ __forceinline__ void dequantize_tq(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    using F = tq_cuda_form<type>;
    const typename F::block * x = (const typename F::block *) vx + ib;
    const float * cb = F::centroids();
    constexpr uint32_t mask = (1u << F::bits) - 1;

    const float    d = __half2float(x->d);
    const uint32_t w = tq_cuda_load_group<F::bits>(x->qs, iqs/8) >> (F::bits*(iqs%8));
    v.x = d * cb[ w             & mask];
    v.y = d * cb[(w >> F::bits) & mask];
}

template <int bits>
static __device__ __forceinline__ void dequantize_turbo(const void * vx, const int64_t ib, const int iqs, float2 & v) {
    dequantize_tq<tq_cuda_type_of_bits(bits)>(vx, ib, iqs, v);
}

// The contiguous F16/F32/BF16 converters (to_fp16_cuda and kin; the flash-attention prefill path
// converts the whole K and V cache to f16 for every ubatch): a thread per group of 8 values, the
// codebook in shared memory, one 16-byte store per thread for f16. The values of dequantize_tq.
template <ggml_type type, bool vec_store, typename dst_t>
static __global__ void k_tq_dequantize_cont(const void * vx_ptr, dst_t * y_ptr, const int64_t ngroups) {
    const void * GGML_CUDA_RESTRICT vx = vx_ptr;
    dst_t      * GGML_CUDA_RESTRICT y  = y_ptr;
    ggml_cuda_pdl_lc();
    using F = tq_cuda_form<type>;
    constexpr uint32_t mask = (1u << F::bits) - 1;
    __shared__ float cb[1 << F::bits];
    if (threadIdx.x < (1 << F::bits)) {
        cb[threadIdx.x] = F::centroids()[threadIdx.x];
    }
    __syncthreads();

    const int64_t i = (int64_t) blockIdx.x*blockDim.x + threadIdx.x;
    if (i >= ngroups) {
        return;
    }
    ggml_cuda_pdl_sync();
    const typename F::block * x = (const typename F::block *) vx + i/(F::qk/8);
    const float    d = __half2float(x->d);
    const uint32_t w = tq_cuda_load_group<F::bits>(x->qs, i % (F::qk/8));
    dst_t v[8];
#pragma unroll
    for (int l = 0; l < 8; ++l) {
        v[l] = ggml_cuda_cast<dst_t>(d * cb[(w >> (F::bits*l)) & mask]);
    }
    if constexpr (vec_store) {
#pragma unroll
        for (int j = 0; j < (int) sizeof(v)/16; ++j) {
            ((uint4 *) (y + 8*i))[j] = ((const uint4 *) v)[j];
        }
    } else {
#pragma unroll
        for (int l = 0; l < 8; ++l) {
            y[8*i + l] = v[l];
        }
    }
}

template <ggml_type type, typename dst_t>
static void tq_cuda_dequantize_cont_form(const void * vx, dst_t * y, const int64_t k, cudaStream_t stream) {
    GGML_ASSERT(k % tq_cuda_form<type>::qk == 0);
    const int64_t ngroups = k/8;
    constexpr int nthreads = 256;
    const dim3 grid_dims((ngroups + nthreads - 1)/nthreads, 1, 1);
    if (ngroups == 0) {
        return;
    }
    const ggml_cuda_kernel_launch_params lp(grid_dims, dim3(nthreads, 1, 1), 0, stream);
    if ((uintptr_t) y % 16 == 0) {
        ggml_cuda_kernel_launch(k_tq_dequantize_cont<type, true, dst_t>, lp, vx, y, ngroups);
    } else {
        ggml_cuda_kernel_launch(k_tq_dequantize_cont<type, false, dst_t>, lp, vx, y, ngroups);
    }
}

template <int bits, typename dst_t>
static void tq_cuda_dequantize_cont(const void * vx, dst_t * y, const int64_t k, cudaStream_t stream) {
    tq_cuda_dequantize_cont_form<tq_cuda_type_of_bits(bits), dst_t>(vx, y, k, stream);
}

// converter cases of the smaller forms (convert.cu): contiguous, and strided (dequantize_block_cuda)
#define TQ_CUDA_CONT_CASE(T) case GGML_TYPE_##T: return tq_cuda_dequantize_cont_form<GGML_TYPE_##T>;
#define TQ_CUDA_NC_CASE(T)   \
    case GGML_TYPE_##T: return dequantize_block_cuda<tq_cuda_form<GGML_TYPE_##T>::qk, 1, dequantize_tq<GGML_TYPE_##T>>;

// Flash attention. The vector kernel gives each of nthreads = 8 threads one group of 8 values per
// 64-value block (the f16 layout: Q sits in registers as float2, scaled). The codebooks go to
// shared memory once per thread block: a lookup there is conflict-free (<= 16 words in distinct
// banks), while __constant__ would serialize divergent indices.
static __shared__ float tq_fattn_cb_K[16];
static __shared__ float tq_fattn_cb_V[16];

template <ggml_type type_K, ggml_type type_V>
static __device__ __forceinline__ void tq_fattn_load_codebooks() {
    if constexpr (tq_cuda_is_turbo(type_K) || tq_cuda_is_turbo(type_V)) {
        const int tid = threadIdx.y*WARP_SIZE + threadIdx.x;
        if constexpr (tq_cuda_is_turbo(type_K)) {
            if (tid < (1 << tq_cuda_bits(type_K))) {
                tq_fattn_cb_K[tid] = tq_cuda_centroids<tq_cuda_bits(type_K)>()[tid];
            }
        }
        if constexpr (tq_cuda_is_turbo(type_V)) {
            if (tid < (1 << tq_cuda_bits(type_V))) {
                tq_fattn_cb_V[tid] = tq_cuda_centroids<tq_cuda_bits(type_V)>()[tid];
            }
        }
        __syncthreads();
    }
}

template <int bits, int D, int nthreads>
static __device__ __forceinline__ float vec_dot_fattn_vec_KQ_turbo(
    const char * GGML_CUDA_RESTRICT K_c, const void * GGML_CUDA_RESTRICT Q_v, const int * GGML_CUDA_RESTRICT Q_q8,
    const void * GGML_CUDA_RESTRICT Q_ds_v) {
    static_assert(nthreads*8 == QK_TQ && D % QK_TQ == 0, "one thread per group of 8 values");
    GGML_UNUSED(Q_q8);
    GGML_UNUSED(Q_ds_v);

    const typename tq_cuda_block<bits>::type * K = (const typename tq_cuda_block<bits>::type *) K_c;
    const float2 * Q = (const float2 *) Q_v;
    constexpr uint32_t mask = (1u << bits) - 1;
    const int g = threadIdx.x % nthreads;

    float sum = 0.0f;
#pragma unroll
    for (int ib = 0; ib < D/QK_TQ; ++ib) {
        const uint32_t w = tq_cuda_load_group<bits>(K[ib].qs, g);
        float s = 0.0f;
#pragma unroll
        for (int l = 0; l < 8; l += 2) {
            const float2 q = Q[ib*4 + l/2];
            s += q.x * tq_fattn_cb_K[(w >> (bits*l))       & mask];
            s += q.y * tq_fattn_cb_K[(w >> (bits*(l + 1))) & mask];
        }
        sum += __half2float(K[ib].d) * s;
    }
    return sum;
}

// ne = 8 values starting at i0 (a group): the V row layout of the f16 case
template <int bits, typename T, int ne>
static __device__ __forceinline__ void dequantize_V_turbo(const void * GGML_CUDA_RESTRICT vx, void * GGML_CUDA_RESTRICT dst,
                                                          const int64_t i0) {
    static_assert(ne == 8, "one group of 8 values per call");
    const typename tq_cuda_block<bits>::type * x = (const typename tq_cuda_block<bits>::type *) vx + i0/QK_TQ;
    constexpr uint32_t mask = (1u << bits) - 1;

    const uint32_t w = tq_cuda_load_group<bits>(x->qs, (i0 % QK_TQ)/8);
    const float    d = __half2float(x->d);
#pragma unroll
    for (int l = 0; l < ne; ++l) {
        const float y = d * tq_fattn_cb_V[(w >> (bits*l)) & mask];
        if constexpr (std::is_same_v<T, half>) {
            ((half *) dst)[l] = __float2half(y);
        } else {
            static_assert(std::is_same_v<T, float>, "bad type");
            ((float *) dst)[l] = y;
        }
    }
}

// Every K/V pair of {f16, q8_0, tq2_0, tq3_0, tq4_0} that holds a TurboQuant type has a vector
// kernel instance (tq-fattn-vec-*.cu); X(type_K, type_V) with the GGML_TYPE_ suffixes.
#define TQ_FATTN_VEC_PAIRS_K(X, K) X(K, F16) X(K, Q8_0) X(K, TURBO2_0) X(K, TURBO3_0) X(K, TURBO4_0)
#define TQ_FATTN_VEC_PAIRS(X)                                                      \
    TQ_FATTN_VEC_PAIRS_K(X, TURBO2_0) TQ_FATTN_VEC_PAIRS_K(X, TURBO3_0) TQ_FATTN_VEC_PAIRS_K(X, TURBO4_0) \
    X(F16, TURBO2_0) X(F16, TURBO3_0) X(F16, TURBO4_0)                             \
    X(Q8_0, TURBO2_0) X(Q8_0, TURBO3_0) X(Q8_0, TURBO4_0)

// host entry points (tq-cuda.cu)
struct ggml_backend_cuda_context;
void ggml_cuda_tq_set_rows(ggml_backend_cuda_context & ctx, const ggml_tensor * src0, const ggml_tensor * src1, ggml_tensor * dst);
void ggml_cuda_tq_cpy(ggml_backend_cuda_context & ctx, const ggml_tensor * src0, ggml_tensor * src1);
bool ggml_cuda_tq_supports_cpy(ggml_type src, ggml_type dst);
// GGML_OP_TURBO_K_ROT: H(x*a) - off or H(x/a) (ggml_turbo_k_rot)
void ggml_cuda_tq_k_rot(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
bool ggml_cuda_tq_supports_k_rot(const ggml_tensor * op);
// TURBO_K_ROT -> VIEW -> SET_ROWS into a TurboQuant type as one kernel (ggml_cuda_try_fuse);
// GGML_TQ_CUDA_NO_FUSE=1 keeps the two kernels, for comparison
bool ggml_cuda_tq_can_fuse_k_rot_set_rows(const ggml_tensor * k_rot, const ggml_tensor * view, const ggml_tensor * set_rows);
void ggml_cuda_tq_k_rot_set_rows(ggml_backend_cuda_context & ctx, const ggml_tensor * k_rot, ggml_tensor * set_rows);
// FLASH_ATTN_EXT decode with K and V both TurboQuant (tq-fattn-gqa.cu); false: not taken, use the vector kernel
bool ggml_cuda_tq_flash_attn_ext_gqa(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
// ... fused with the query's TURBO_K_ROT before it and the output's Hadamard MUL_MAT after it
// (ggml_cuda_try_fuse): the index of the last node fused from node i (-1: none), and the call
int  ggml_cuda_tq_fattn_fusion(const ggml_cgraph * cgraph, int i);
void ggml_cuda_tq_fattn_fused(ggml_backend_cuda_context & ctx, const ggml_cgraph * cgraph, int i);
