// TurboQuant flash-attention decode: one query token, K and V both TurboQuant. The ncols2 query
// heads that share a KV head run in one thread block, so every packed K and V row is loaded and
// decoded once per KV head instead of once per query head (upstream's vector kernel handles one
// query head per block: with GQA 4 it decodes each row 4 times, and decoding, not memory, limits
// it). Layout as the vector kernel's f16 case: 128 threads, a tile of 128 KV rows per step; for
// K.Q, 8 threads per row with thread g taking group g (values 8g..8g+7) of every 64-value block,
// Q of all ncols2 heads in shared memory; for V, the same 8-thread split per row, each warp
// accumulating its own 32 rows in registers. The warps combine in shared memory, the KV splits in
// tq_fattn_combine (upstream's arithmetic, plus a fused output rotation).
// Numerics: float throughout (scores, weights, accumulators); decoded values are d * centroid as in
// tq-quants.c, the products only rounded in another order.
#pragma once

#include "../ggml-cuda/fattn-common.cuh"
#include "tq-cuda.cuh"

#define TQ_FATTN_GQA_NTHREADS 128
// 3 blocks per SM: at most 168 registers. The largest variants spill a few words, and still decode
// 4% faster at 64k tokens (H200, Llama-8B shape) than with 2 blocks of up to 255 registers; 4 blocks
// (128 registers, K rows one at a time so that they fit) are 10% slower at 32k and 64k (H100).
#define TQ_FATTN_GQA_MINBLOCKS 3

// ncols2 * D <= 512 keeps Q and the V accumulators in registers (64 floats each per thread)
static constexpr __host__ __device__ bool tq_fattn_gqa_fits(const int D, const int ncols2) {
    return ncols2 * D <= 512;
}

// Staging. Each warp reads only its own 32 rows of a tile, K and V, so it can copy them to shared
// memory itself (cp.async, 4-byte words) one tile ahead and decode from there: the loads of the next
// tile are in flight while this one computes, and 4-byte copies replace the decoder's 2-byte global
// loads. Needs rows of whole words (D >= 128; a 64-value block is 18, 26 or 34 bytes) and two tiles
// of both that fit in TQ_FATTN_GQA_STAGE_MAX bytes (with the rest, under the 48 KiB of static shared
// memory, at 3 blocks per SM); other shapes read global memory directly.
#define TQ_FATTN_GQA_STAGE_MAX 36864

template <int D, ggml_type type_K, ggml_type type_V>
struct tq_fattn_gqa_stage {
    static constexpr int row_K  = D/QK_TQ * (int) sizeof(typename tq_cuda_block<tq_cuda_bits(type_K)>::type);
    static constexpr int row_V  = D/QK_TQ * (int) sizeof(typename tq_cuda_block<tq_cuda_bits(type_V)>::type);
    static constexpr int warp_bytes = WARP_SIZE*(row_K + row_V); // one warp's 32 K and V rows
    static constexpr int bytes  = 2 * (TQ_FATTN_GQA_NTHREADS/WARP_SIZE) * warp_bytes;
    static constexpr bool words = row_K % 4 == 0 && row_V % 4 == 0; // rows of whole words: 4-byte copies
    static constexpr bool on    = words && bytes <= TQ_FATTN_GQA_STAGE_MAX;
};

static __device__ __forceinline__ void tq_cp_async_4(void * dst, const void * src) {
#ifdef CP_ASYNC_AVAILABLE
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" : : "r"((unsigned) __cvta_generic_to_shared(dst)), "l"(src));
#else
    GGML_UNUSED_VARS(dst, src);
    NO_DEVICE_CODE;
#endif // CP_ASYNC_AVAILABLE
}

static __device__ __forceinline__ void tq_cp_async_commit() {
#ifdef CP_ASYNC_AVAILABLE
    asm volatile("cp.async.commit_group;");
#endif // CP_ASYNC_AVAILABLE
}

// wait until at most n of this thread's copy groups are pending
template <int n>
static __device__ __forceinline__ void tq_cp_async_wait() {
#ifdef CP_ASYNC_AVAILABLE
    asm volatile("cp.async.wait_group %0;" : : "n"(n));
#endif // CP_ASYNC_AVAILABLE
}

// copy one warp's 32 rows of row_bytes (a multiple of 4) from global src (row stride nb) to dense
// dst. Words go in chunks of up to 16 per row: a chunk of n words takes p = bit_ceil(n) lanes per
// row and 32/p rows per copy, so every address is a fixed per-lane pointer plus a constant step and
// an instruction covers a few whole row segments (an earlier loop over lane + 32i split each word
// index into row and word by a division: 25 instructions per 4-byte copy, 30% of the kernel's).
template <int row_bytes>
static __device__ __forceinline__ void tq_fattn_gqa_stage_rows(char * dst, const char * src, const int64_t nb, const int lane) {
    constexpr int nw    = row_bytes/4;
    constexpr int chunk = 16;
#pragma unroll
    for (int w0 = 0; w0 < nw; w0 += chunk) {
        const int     n    = nw - w0 < chunk ? nw - w0 : chunk; // words of this chunk (compile time once unrolled)
        const int     p    = n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : 16;
        const int     rows = WARP_SIZE/p;
        const int     w    = w0 + lane % p;
        const int     r    = lane / p;
        if (lane % p < n) {
            const char * s = src + r*nb + 4*w;
            char       * d = dst + r*row_bytes + 4*w;
#pragma unroll
            for (int r0 = 0; r0 < WARP_SIZE; r0 += rows) {
                tq_cp_async_4(d + r0*row_bytes, s + r0*nb);
            }
        }
    }
}

// copy one warp's 32 K rows (from K_row, stride nb11) and 32 V rows (from V_row) to dst, K first
template <typename stg>
static __device__ __forceinline__ void tq_fattn_gqa_stage_tile(char * dst, const char * K_row, const char * V_row,
        const int64_t nb11, const int64_t nb21, const int lane) {
    tq_fattn_gqa_stage_rows<stg::row_K>(dst,                        K_row, nb11, lane);
    tq_fattn_gqa_stage_rows<stg::row_V>(dst + WARP_SIZE*stg::row_K, V_row, nb21, lane);
}

// blockIdx.z = (sequence*ne12 + kv_head)*ntiles_z + z: the block's query heads are head0 .. head0 + ncols2 - 1
struct tq_fattn_gqa_block {
    int sequence;
    int kv_head;
    int head0;
};

template <int ncols2>
static __device__ __forceinline__ tq_fattn_gqa_block tq_fattn_gqa_block_of(const int ne02, const int ne12) {
    const int gqa_ratio = ne02 / ne12;
    const int ntiles_z  = gqa_ratio / ncols2;
    const int sequence  = blockIdx.z / (ne12*ntiles_z);
    const int kv_head   = (blockIdx.z / ntiles_z) % ne12;
    const int head0     = kv_head*gqa_ratio + (blockIdx.z % ntiles_z)*ncols2;
    return {sequence, kv_head, head0};
}

// What a decode kernel takes over from the nodes around its FLASH_ATTN_EXT (ggml_cuda_try_fuse,
// tq-fattn-gqa.cu): the query's TURBO_K_ROT, so that Q holds that op's input, the unrotated rows;
// and, for the output's Hadamard rotation, partial results even with one KV split, which
// tq_fattn_combine then rotates.
struct tq_fattn_fuse {
    const float * q_k_off;  // the TURBO_K_ROT's k_off (slice 0 offset, slice 1 scale a), or null
    int   q_k_off_heads;    // its KV heads
    int   q_nrot;           // its rotation size, 0: none
    int   q_mode;           // its GGML_TURBO_K_ROT_* bits
    float q_rscale;         // 1/sqrt(q_nrot) as the op's host code computes it, or 1
    bool  q;                // Q is the TURBO_K_ROT's input
    bool  partials;         // write partial results and their (max, sum) for every split
};

// The butterflies of upstream's fwht_cuda (and of k_tq_k_rot) over x[0, n) in shared memory, each
// run of nrot values by itself: h = 1, 2, 4, ... < nrot, pairs (u + w, u - w). The block
// synchronizes before each step and after the last.
static __device__ __forceinline__ void tq_fattn_hadamard_sh(float * x, const int n, const int nrot, const int tid, const int nthreads) {
    for (int h = 1; h < nrot; h *= 2) {
        __syncthreads();
        for (int p = tid; p < n/2; p += nthreads) {
            const int   i = 2*p - (p & (h - 1)); // the p-th index with bit h clear
            const float u = x[i];
            const float w = x[i + h];
            x[i]     = u + w;
            x[i + h] = u - w;
        }
    }
    __syncthreads();
}

// Q_sh[j*D + i] = scale * value i of the block's query head j. With fuse.q, Q holds a TURBO_K_ROT's
// input and the op runs here with the float operations of k_tq_k_rot (tq-cuda.cu) in its order:
// the scale, the factor 1/sqrt(nrot), the butterflies of h = 1, 2, 4, ... as pairs (a + b, a - b),
// then the offset. The same values as the separate op, so fusing changes no result.
template <int D, int ncols2>
static __device__ __forceinline__ void tq_fattn_load_q(float * GGML_CUDA_RESTRICT Q_sh, const char * GGML_CUDA_RESTRICT Q, const int nb02,
        const float scale, const tq_fattn_fuse & fuse, const int head0, const int ne02, const int tid) {
    constexpr int nthreads = TQ_FATTN_GQA_NTHREADS;
    if (!fuse.q) {
        for (int i = tid; i < ncols2*D/4; i += nthreads) {
            const int j = i / (D/4);
            float4 q = *(const float4 *) ((const float *) (Q + j*nb02) + 4*(i % (D/4)));
            q.x *= scale; q.y *= scale; q.z *= scale; q.w *= scale;
            *(float4 *) (Q_sh + 4*i) = q;
        }
        __syncthreads();
        return;
    }
    // k_off rows of the block's KV head: all ncols2 heads share it (ncols2 divides the group)
    const int     kh  = head0 / (ne02/fuse.q_k_off_heads);
    const float * off = fuse.q_k_off ? fuse.q_k_off + kh*D : nullptr;
    const float * a   = fuse.q_k_off ? off + fuse.q_k_off_heads*D : nullptr;
    // every load before the first store, so that they are in flight together
    constexpr int nper = (ncols2*D + nthreads - 1)/nthreads;
    float v[nper];
#pragma unroll
    for (int k = 0; k < nper; ++k) {
        const int i = k*nthreads + tid;
        if (i < ncols2*D) {
            const float x = ((const float *) (Q + (i/D)*nb02))[i % D];
            v[k] = fuse.q_mode & GGML_TURBO_K_ROT_SCALE ? x*a[i % D] : fuse.q_mode & GGML_TURBO_K_ROT_INV_SCALE ? x/a[i % D] : x;
        }
    }
#pragma unroll
    for (int k = 0; k < nper; ++k) {
        const int i = k*nthreads + tid;
        if (i < ncols2*D) {
            Q_sh[i] = v[k]*fuse.q_rscale;
        }
    }
    tq_fattn_hadamard_sh(Q_sh, ncols2*D, fuse.q_nrot, tid, nthreads);
    for (int i = tid; i < ncols2*D; i += nthreads) {
        const float y = fuse.q_mode & GGML_TURBO_K_ROT_OFFSET ? Q_sh[i] - off[i % D] : Q_sh[i];
        Q_sh[i] = scale*y;
    }
    __syncthreads();
}

// sum[j] = the share of thread g (values 8g..8g+7 of each block) of K_row . Q_j, Q (scaled) in
// shared memory: the 8 threads of a row read 8 different float4 pairs, the row groups of a warp
// the same ones (broadcast)
template <int bits, int D, int ncols2>
static __device__ __forceinline__ void tq_fattn_gqa_dot_KQ(
        const char * GGML_CUDA_RESTRICT K_row, const float (* GGML_CUDA_RESTRICT Q)[D], const int g, float (&sum)[ncols2]) {
    typedef typename tq_cuda_block<bits>::type block_t;
    constexpr uint32_t mask = (1u << bits) - 1;
    const block_t * K = (const block_t *) K_row;

#pragma unroll
    for (int j = 0; j < ncols2; ++j) {
        sum[j] = 0.0f;
    }
#pragma unroll
    for (int ib = 0; ib < D/QK_TQ; ++ib) {
        const uint32_t w = tq_cuda_load_group<bits>(K[ib].qs, g);
        const float    d = __half2float(K[ib].d);
        float c[8];
#pragma unroll
        for (int l = 0; l < 8; ++l) {
            c[l] = tq_fattn_cb_K[(w >> (bits*l)) & mask];
        }
#pragma unroll
        for (int j = 0; j < ncols2; ++j) {
            const float4 a = *(const float4 *) (Q[j] + ib*QK_TQ + 8*g);
            const float4 b = *(const float4 *) (Q[j] + ib*QK_TQ + 8*g + 4);
            float s = 0.0f;
            s += a.x*c[0]; s += a.y*c[1]; s += a.z*c[2]; s += a.w*c[3];
            s += b.x*c[4]; s += b.y*c[5]; s += b.z*c[6]; s += b.w*c[7];
            sum[j] += d * s;
        }
    }
}

// The decode kernels' shared signature (upstream's fattn_kernel_t): tensor pointers come in plain and
// are qualified as local copies (see tq-cuda.cuh on GGML_CUDA_RESTRICT)
#define TQ_FATTN_KERNEL_PARAMS                                                          \
        const char * Q_ptr,                                                             \
        const char * K_ptr,                                                             \
        const char * V_ptr,                                                             \
        const char * mask_ptr,                                                          \
        const char * sinks_ptr,                                                         \
        const int  * KV_max_ptr,                                                        \
        float      * dst_ptr,                                                           \
        float2     * dst_meta_ptr,                                                      \
        const float scale,                                                              \
        const float max_bias,                                                           \
        const float m0,                                                                 \
        const float m1,                                                                 \
        const uint32_t n_head_log2,                                                     \
        const float logit_softcap,                                                      \
        const int32_t ne00, const uint3   ne01, const int32_t ne02, const int32_t ne03, \
                            const int32_t nb01, const int32_t nb02, const int32_t nb03, \
        const int32_t ne10, const int32_t ne11, const int32_t ne12, const int32_t ne13, \
                            const int32_t nb11, const int32_t nb12, const int64_t nb13, \
                            const int32_t nb21, const int32_t nb22, const int64_t nb23, \
                            const int32_t ne31, const int32_t ne32, const int32_t ne33, \
                            const int32_t nb31, const int32_t nb32, const int64_t nb33, \
        const tq_fattn_fuse fuse
#define TQ_FATTN_KERNEL_PTRS                                 \
    const char * GGML_CUDA_RESTRICT Q        = Q_ptr;        \
    const char * GGML_CUDA_RESTRICT K        = K_ptr;        \
    const char * GGML_CUDA_RESTRICT V        = V_ptr;        \
    const char * GGML_CUDA_RESTRICT mask     = mask_ptr;     \
    const char * GGML_CUDA_RESTRICT sinks    = sinks_ptr;    \
    const int  * GGML_CUDA_RESTRICT KV_max   = KV_max_ptr;   \
    float      * GGML_CUDA_RESTRICT dst      = dst_ptr;      \
    float2     * GGML_CUDA_RESTRICT dst_meta = dst_meta_ptr;
#define TQ_FATTN_KERNEL_UNUSED                                           \
    GGML_UNUSED_VARS(Q, K, V, mask, sinks, KV_max, dst, dst_meta, scale, \
        max_bias, m0, m1, n_head_log2, logit_softcap,                    \
        ne00, ne01, ne02, ne03,                                          \
              nb01, nb02, nb03,                                          \
        ne10, ne11, ne12, ne13,                                          \
              nb11, nb12, nb13,                                          \
              nb21, nb22, nb23,                                          \
              ne31, ne32, ne33,                                          \
              nb31, nb32, nb33, fuse);

template <int D, int ncols2, ggml_type type_K, ggml_type type_V>
__launch_bounds__(TQ_FATTN_GQA_NTHREADS, TQ_FATTN_GQA_MINBLOCKS)
static __global__ void tq_flash_attn_ext_gqa(
        TQ_FATTN_KERNEL_PARAMS) {
    TQ_FATTN_KERNEL_PTRS
    ggml_cuda_pdl_lc();
#ifdef FLASH_ATTN_AVAILABLE
    static_assert(tq_cuda_is_turbo(type_K) && tq_cuda_is_turbo(type_V), "TurboQuant K and V only");
    static_assert(D % QK_TQ == 0 && tq_fattn_gqa_fits(D, ncols2), "bad D/ncols2");
    constexpr int bits_K   = tq_cuda_bits(type_K);
    constexpr int bits_V   = tq_cuda_bits(type_V);
    constexpr int nthreads = TQ_FATTN_GQA_NTHREADS;
    constexpr int nwarps   = nthreads / WARP_SIZE;
    constexpr int nthr_row = QK_TQ / 8;              // threads per K or V row
    constexpr int nrows_w  = WARP_SIZE / nthr_row;   // rows a warp handles at once
    constexpr int nblk     = D / QK_TQ;
    constexpr uint32_t mask_V = (1u << bits_V) - 1;
    typedef typename tq_cuda_block<bits_V>::type block_V;

    tq_fattn_load_codebooks<type_K, type_V>();

    const int lane = threadIdx.x;
    const int warp = threadIdx.y;
    const int tid  = warp*WARP_SIZE + lane;
    const int g    = lane % nthr_row;

    const tq_fattn_gqa_block blk = tq_fattn_gqa_block_of<ncols2>(ne02, ne12);
    const int sequence = blk.sequence;
    const int kv_head  = blk.kv_head;
    const int head0    = blk.head0;

    Q += nb03*sequence + nb02*head0;
    K += nb13*sequence + nb12*kv_head;
    V += nb23*sequence + nb22*kv_head;
    const half * maskh = mask ? (const half *) (mask + nb33*(sequence % ne33)) : nullptr;

    float slope[ncols2];
#pragma unroll
    for (int j = 0; j < ncols2; ++j) {
        slope[j] = get_alibi_slope(max_bias, head0 + j, n_head_log2, m0, m1);
    }

    ggml_cuda_pdl_sync();

    // scaled Q of the block's heads, in shared memory (registers hold the V sums)
    __shared__ __align__(16) float Q_sh[ncols2][D];
    tq_fattn_load_q<D, ncols2>(&Q_sh[0][0], Q, nb02, scale, fuse, head0, ne02, tid);

    float VKQ[ncols2][nblk*8]; // thread g: values ib*64 + 8g + l
    float KQ_max[ncols2];
    float KQ_sum[ncols2];
#pragma unroll
    for (int j = 0; j < ncols2; ++j) {
        KQ_max[j] = -FLT_MAX/2.0f;
        KQ_sum[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < nblk*8; ++i) {
            VKQ[j][i] = 0.0f;
        }
    }

    __shared__ float KQ[ncols2][nthreads];

    // staging buffers: [stage][warp] -> 32 K rows then 32 V rows
    typedef tq_fattn_gqa_stage<D, type_K, type_V> stg;
    // the host checked that K and V are word-aligned
#ifdef CP_ASYNC_AVAILABLE
    constexpr bool staged = stg::on;
#else
    constexpr bool staged = false;
#endif // CP_ASYNC_AVAILABLE
    // after the loop the staging buffers hold the warps' partial outputs (VKQ_parts)
    constexpr int parts_bytes = nwarps*nrows_w*D*(int) sizeof(float);
    __shared__ __align__(16) char tile[staged ? (stg::bytes > parts_bytes ? stg::bytes : parts_bytes) : 16];
    const int64_t row_nb_K = staged ? stg::row_K : nb11;
    const int64_t row_nb_V = staged ? stg::row_V : nb21;
    char * tile_w = tile + warp*stg::warp_bytes;

    const int k_VKQ_max = KV_max ? KV_max[sequence*gridDim.x + blockIdx.x] : ne11;
    const int k_step    = gridDim.y*nthreads;
    if (staged && blockIdx.y*nthreads < k_VKQ_max) {
        const int64_t r = blockIdx.y*nthreads + warp*WARP_SIZE;
        tq_fattn_gqa_stage_tile<stg>(tile_w, K + r*nb11, V + r*nb21, nb11, nb21, lane);
        tq_cp_async_commit();
    }
    for (int k0 = blockIdx.y*nthreads, s = 0; k0 < k_VKQ_max; k0 += k_step, s ^= 1) {
        // this warp's 32 K and V rows: the staged copy of stage s, or global memory
        const char * K_w = K + (int64_t) (k0 + warp*WARP_SIZE)*nb11;
        const char * V_w = V + (int64_t) (k0 + warp*WARP_SIZE)*nb21;
        if constexpr (staged) {
            if (k0 + k_step < k_VKQ_max) {
                char * next = tile_w + (s ^ 1)*(stg::bytes/2);
                tq_fattn_gqa_stage_tile<stg>(next, K_w + (int64_t) k_step*nb11, V_w + (int64_t) k_step*nb21, nb11, nb21, lane);
            }
            tq_cp_async_commit(); // possibly empty: the wait below always leaves the newest group
            tq_cp_async_wait<1>();
            __syncwarp();
            K_w = tile_w + s*(stg::bytes/2);
            V_w = K_w + WARP_SIZE*stg::row_K;
        }

        // K.Q: the 8-thread group at lane & ~7 computes the rows warp*32 + (lane & ~7) + r; lane keeps row r == g
        float KQ_reg[ncols2];
        float KQ_max_new[ncols2];
#pragma unroll
        for (int j = 0; j < ncols2; ++j) {
            KQ_reg[j]     = 0.0f;
            KQ_max_new[j] = KQ_max[j];
        }
#pragma unroll
        for (int r = 0; r < nthr_row; ++r) {
            const int i = (lane & ~(nthr_row - 1)) + r;
            const int k = k0 + warp*WARP_SIZE + i;
            float sum[ncols2];
            tq_fattn_gqa_dot_KQ<bits_K, D, ncols2>(K_w + i*row_nb_K, Q_sh, g, sum);
            const float m = maskh ? __half2float(maskh[k]) : 0.0f;
#pragma unroll
            for (int j = 0; j < ncols2; ++j) {
                sum[j] = warp_reduce_sum<nthr_row>(sum[j]);
                if (logit_softcap != 0.0f) {
                    sum[j] = logit_softcap*tanhf(sum[j]);
                }
                sum[j] += slope[j]*m;
                KQ_max_new[j] = fmaxf(KQ_max_new[j], sum[j] + FATTN_KQ_MAX_OFFSET);
                if (g == r) {
                    KQ_reg[j] = sum[j];
                }
            }
        }

#pragma unroll
        for (int j = 0; j < ncols2; ++j) {
#pragma unroll
            for (int offset = nthr_row; offset < WARP_SIZE; offset <<= 1) {
                KQ_max_new[j] = fmaxf(KQ_max_new[j], __shfl_xor_sync(0xFFFFFFFF, KQ_max_new[j], offset, WARP_SIZE));
            }
            const float KQ_max_scale = expf(KQ_max[j] - KQ_max_new[j]);
            KQ_max[j] = KQ_max_new[j];

            KQ_reg[j] = expf(KQ_reg[j] - KQ_max[j]);
            KQ_sum[j] = KQ_sum[j]*KQ_max_scale + KQ_reg[j];
            KQ[j][tid] = KQ_reg[j];
#pragma unroll
            for (int i = 0; i < nblk*8; ++i) {
                VKQ[j][i] *= KQ_max_scale;
            }
        }

        __syncwarp();

        // V: the warp's own 32 rows, nrows_w at a time; 8 threads per row
#pragma unroll
        for (int r0 = 0; r0 < WARP_SIZE; r0 += nrows_w) {
            const int i_KQ = warp*WARP_SIZE + r0 + lane/nthr_row;
            const block_V * V_row = (const block_V *) (V_w + (r0 + lane/nthr_row)*row_nb_V);
            float w[ncols2];
#pragma unroll
            for (int j = 0; j < ncols2; ++j) {
                w[j] = KQ[j][i_KQ];
            }
#pragma unroll
            for (int ib = 0; ib < nblk; ++ib) {
                const uint32_t q = tq_cuda_load_group<bits_V>(V_row[ib].qs, g);
                const float    d = __half2float(V_row[ib].d);
                float wd[ncols2];
#pragma unroll
                for (int j = 0; j < ncols2; ++j) {
                    wd[j] = w[j]*d;
                }
#pragma unroll
                for (int l = 0; l < 8; ++l) {
                    const float c = tq_fattn_cb_V[(q >> (bits_V*l)) & mask_V];
#pragma unroll
                    for (int j = 0; j < ncols2; ++j) {
                        VKQ[j][ib*8 + l] += c*wd[j];
                    }
                }
            }
        }

        __syncwarp();
    }

    if (sinks && blockIdx.y == 0) {
        // every warp rescales to the sink; its weight is counted once (thread 0)
#pragma unroll
        for (int j = 0; j < ncols2; ++j) {
            const float sink        = ((const float *) sinks)[head0 + j];
            const float kqmax_new_j = fmaxf(sink, KQ_max[j]);
            const float s           = expf(KQ_max[j] - kqmax_new_j);
            KQ_max[j] = kqmax_new_j;
            KQ_sum[j] = KQ_sum[j]*s + (tid == 0 ? expf(sink - KQ_max[j]) : 0.0f);
#pragma unroll
            for (int i = 0; i < nblk*8; ++i) {
                VKQ[j][i] *= s;
            }
        }
    }

    // combine the warps (and the row slots within a warp), one head at a time
    const bool partials = gridDim.y != 1 || fuse.partials;
    __shared__ float KQ_max_shared[ncols2][WARP_SIZE];
    __shared__ float KQ_sum_shared[ncols2][WARP_SIZE];
    __shared__ float VKQ_parts_own[staged ? 1 : nwarps*nrows_w][D];
    float (* VKQ_parts)[D] = staged ? (float (*)[D]) tile : VKQ_parts_own;
    tq_cp_async_wait<0>(); // nothing is left in flight into the buffers (the last group is empty)
#pragma unroll
    for (int j = 0; j < ncols2; ++j) {
        if (warp == 0) {
            KQ_max_shared[j][lane] = -FLT_MAX/2.0f;
            KQ_sum_shared[j][lane] = 0.0f;
        }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < ncols2; ++j) {
        if (lane == 0) {
            KQ_max_shared[j][warp] = KQ_max[j];
        }
    }
    __syncthreads();

#pragma unroll
    for (int j = 0; j < ncols2; ++j) {
        const float kqmax       = warp_reduce_max(KQ_max_shared[j][lane]);
        const float kqmax_scale = expf(KQ_max[j] - kqmax);

        float * part = VKQ_parts[warp*nrows_w + lane/nthr_row];
#pragma unroll
        for (int ib = 0; ib < nblk; ++ib) {
            float4 a;
            float4 b;
            a.x = VKQ[j][ib*8 + 0]*kqmax_scale; a.y = VKQ[j][ib*8 + 1]*kqmax_scale;
            a.z = VKQ[j][ib*8 + 2]*kqmax_scale; a.w = VKQ[j][ib*8 + 3]*kqmax_scale;
            b.x = VKQ[j][ib*8 + 4]*kqmax_scale; b.y = VKQ[j][ib*8 + 5]*kqmax_scale;
            b.z = VKQ[j][ib*8 + 6]*kqmax_scale; b.w = VKQ[j][ib*8 + 7]*kqmax_scale;
            *(float4 *) (part + ib*QK_TQ + 8*g)     = a;
            *(float4 *) (part + ib*QK_TQ + 8*g + 4) = b;
        }
        const float sum_w = warp_reduce_sum(KQ_sum[j]*kqmax_scale);
        if (lane == 0) {
            KQ_sum_shared[j][warp] = sum_w;
        }
        __syncthreads();

        const float kqsum = warp_reduce_sum(KQ_sum_shared[j][lane]);
        const int64_t row = ((int64_t) (sequence*int(ne01.z))*ne02 + head0 + j)*gridDim.y + blockIdx.y;
#pragma unroll
        for (int i0 = 0; i0 < D; i0 += nthreads) {
            const int i = i0 + tid;
            if (i0 + nthreads <= D || i < D) {
                float v = 0.0f;
#pragma unroll
                for (int s = 0; s < nwarps*nrows_w; ++s) {
                    v += VKQ_parts[s][i];
                }
                dst[row*D + i] = partials ? v : v/kqsum;
            }
        }
        if (partials && tid == 0) {
            dst_meta[row] = make_float2(kqmax, kqsum);
        }
        __syncthreads();
    }
#else
    TQ_FATTN_KERNEL_UNUSED
    NO_DEVICE_CODE;
#endif // FLASH_ATTN_AVAILABLE
}

// The KV splits' partial results of one output row (as upstream's flash_attn_combine_results),
// then, with nrot > 0, the output's Hadamard rotation of each run of nrot values: upstream's
// fwht_cuda operations in its order (the factor rscale first, butterflies of h = 1, 2, 4, ...),
// so a fused rotation gives the values of the separate MUL_MAT.
template <int D>
__launch_bounds__(D, 1)
static __global__ void tq_fattn_combine(const float * parts_ptr, const float2 * meta_ptr, float * dst_ptr,
                                        const int nparts, const int nrot, const float rscale) {
    const float  * GGML_CUDA_RESTRICT parts = parts_ptr;
    const float2 * GGML_CUDA_RESTRICT meta  = meta_ptr;
    float        * GGML_CUDA_RESTRICT dst   = dst_ptr;
    ggml_cuda_pdl_lc();
    extern __shared__ float2 tq_fattn_combine_sh[];
    float2 * m   = tq_fattn_combine_sh;    // [nparts]: (max, sum) of each split
    float  * row = (float *) (m + nparts); // [D]
    const int     tid = threadIdx.x;
    const int64_t j   = ((int64_t) blockIdx.z*gridDim.x + blockIdx.x)*gridDim.y + blockIdx.y; // the kernels' row order
    parts += j*nparts*D;
    meta  += j*nparts;

    ggml_cuda_pdl_sync();
    for (int l = tid; l < nparts; l += D) {
        m[l] = meta[l];
    }
    __syncthreads();

    float kqmax = m[0].x;
    for (int l = 1; l < nparts; ++l) {
        kqmax = fmaxf(kqmax, m[l].x);
    }
    float num = 0.0f;
    float den = 0.0f;
    for (int l = 0; l < nparts; ++l) {
        const float s = expf(m[l].x - kqmax);
        num += s*parts[l*D + tid];
        den += s*m[l].y;
    }
    float y = num/den;
    if (nrot > 0) {
        row[tid] = y*rscale;
        tq_fattn_hadamard_sh(row, D, nrot, tid, D);
        y = row[tid];
    }
    dst[j*D + tid] = y;
}

// Host side of one decode call: where Q is read and the output written (FLASH_ATTN_EXT's own
// tensors, or those of the nodes fused around it) and what the kernel fuses
struct tq_fattn_call {
    const char * Q;
    size_t       nb01, nb02, nb03;
    float      * out;
    int          out_nrot; // > 0: the output's Hadamard rotation, in tq_fattn_combine
    tq_fattn_fuse fuse;
};

// The launch of a decode kernel with upstream's launch_fattn choices for one query token: the mask
// scan for several sequences, KV splits from the occupancy and the wave efficiency. Ours, not
// launch_fattn, so that the partial results can end in tq_fattn_combine with the output rotation.
template <int D, int ncols2, typename kernel_t>
static void tq_fattn_launch(ggml_backend_cuda_context & ctx, const ggml_tensor * dst, kernel_t kernel, const size_t nbytes_shared,
                            tq_fattn_call call) {
    constexpr int nthreads = TQ_FATTN_GQA_NTHREADS;
    const ggml_tensor * Q     = dst->src[0];
    const ggml_tensor * K     = dst->src[1];
    const ggml_tensor * V     = dst->src[2];
    const ggml_tensor * mask  = dst->src[3];
    const ggml_tensor * sinks = dst->src[4];
    GGML_ASSERT(Q->ne[1] == 1 && Q->ne[2] % (K->ne[2]*ncols2) == 0);

    ggml_cuda_pool & pool   = ctx.pool();
    cudaStream_t     stream = ctx.stream();
    const int        nsm    = ggml_cuda_info().devices[ggml_cuda_get_device()].nsm;

    ggml_cuda_pool_alloc<int>    KV_max(pool);
    ggml_cuda_pool_alloc<float>  parts(pool);
    ggml_cuda_pool_alloc<float2> meta(pool);

    if (mask && K->ne[1] % FATTN_KQ_STRIDE == 0 && Q->ne[3] > 1) {
        // sequences of different lengths: each stops at its last unmasked tile
        KV_max.alloc(Q->ne[3]);
        const ggml_cuda_kernel_launch_params lp(dim3(1, Q->ne[3], 1), dim3(FATTN_KQ_STRIDE/2, 1, 1), 0, stream);
        ggml_cuda_kernel_launch(flash_attn_mask_to_KV_max<1>, lp, (const half2 *) mask->data, KV_max.ptr,
            (int) (K->ne[1]/FATTN_KQ_STRIDE), (int64_t) (mask->nb[1]/sizeof(half2)), (int64_t) (mask->nb[3]/sizeof(half2)));
        CUDA_CHECK(cudaGetLastError());
    }

    int max_blocks_per_sm = 1;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&max_blocks_per_sm, kernel, nthreads, nbytes_shared));
    GGML_ASSERT(max_blocks_per_sm > 0);
    const int ntiles_KV  = (int) ((K->ne[1] + nthreads - 1)/nthreads);
    const int ntiles_dst = (int) (Q->ne[2]/ncols2*Q->ne[3]);
    const int per_wave   = nsm*max_blocks_per_sm;
    int nsplit = std::max(1, std::min(max_blocks_per_sm, ntiles_KV));
    // the most even waves: more splits while they raise the share of busy SMs, up to one wave past 95%
    int best_eff = 0, best_waves = 0;
    for (int p = nsplit; p <= ntiles_KV; ++p) {
        const int nblocks = ntiles_dst*p;
        const int nwaves  = (nblocks + per_wave - 1)/per_wave;
        const int eff     = 100*nblocks/(nwaves*per_wave);
        if (best_eff >= 95 && nwaves > best_waves) {
            break;
        }
        if (eff > best_eff) {
            best_eff   = eff;
            best_waves = nwaves;
            nsplit     = p;
        }
    }

    const bool partials = nsplit > 1 || call.out_nrot > 0;
    if (partials) {
        parts.alloc(nsplit*ggml_nelements(dst));
        meta.alloc(nsplit*ggml_nrows(dst));
    }
    call.fuse.partials = partials;

    float scale = 1.0f, max_bias = 0.0f, logit_softcap = 0.0f;
    memcpy(&scale,         (const float *) dst->op_params + 0, sizeof(float));
    memcpy(&max_bias,      (const float *) dst->op_params + 1, sizeof(float));
    memcpy(&logit_softcap, (const float *) dst->op_params + 2, sizeof(float));
    if (logit_softcap != 0.0f) {
        scale /= logit_softcap;
    }
    const uint32_t n_head_log2 = 1u << uint32_t(floorf(log2f(float(Q->ne[2]))));
    const float m0 = powf(2.0f, -(max_bias       )/n_head_log2);
    const float m1 = powf(2.0f, -(max_bias/2.0f)/n_head_log2);

    const ggml_cuda_kernel_launch_params lp(dim3(1, nsplit, ntiles_dst), dim3(WARP_SIZE, nthreads/WARP_SIZE, 1), nbytes_shared, stream);
    ggml_cuda_kernel_launch(kernel, lp,
        call.Q, (const char *) K->data, (const char *) V->data,
        mask ? (const char *) mask->data : nullptr, sinks ? (const char *) sinks->data : nullptr,
        (const int *) KV_max.ptr, partials ? parts.ptr : call.out, meta.ptr,
        scale, max_bias, m0, m1, n_head_log2, logit_softcap,
        (int32_t) Q->ne[0], init_fastdiv_values(Q->ne[1]), (int32_t) Q->ne[2], (int32_t) Q->ne[3],
        (int32_t) call.nb01, (int32_t) call.nb02, (int32_t) call.nb03,
        (int32_t) K->ne[0], (int32_t) K->ne[1], (int32_t) K->ne[2], (int32_t) K->ne[3],
        (int32_t) K->nb[1], (int32_t) K->nb[2], (int64_t) K->nb[3],
        (int32_t) V->nb[1], (int32_t) V->nb[2], (int64_t) V->nb[3],
        mask ? (int32_t) mask->ne[1] : 0, mask ? (int32_t) mask->ne[2] : 0, mask ? (int32_t) mask->ne[3] : 0,
        mask ? (int32_t) mask->nb[1] : 0, mask ? (int32_t) mask->nb[2] : 0, mask ? (int64_t) mask->nb[3] : 0,
        call.fuse);
    CUDA_CHECK(cudaGetLastError());

    if (partials) {
        const float rscale = call.out_nrot > 0 ? 1.0f/sqrtf((float) call.out_nrot) : 1.0f; // as ggml_cuda_op_fwht
        const ggml_cuda_kernel_launch_params lpc(dim3(Q->ne[1], Q->ne[2], Q->ne[3]), dim3(D, 1, 1),
                                                 nsplit*sizeof(float2) + D*sizeof(float), stream);
        ggml_cuda_kernel_launch(tq_fattn_combine<D>, lpc, (const float *) parts.ptr, (const float2 *) meta.ptr, call.out,
                                nsplit, call.out_nrot, rscale);
        CUDA_CHECK(cudaGetLastError());
    }
}

template <int D, int ncols2, ggml_type type_K, ggml_type type_V>
void tq_flash_attn_ext_gqa_case(ggml_backend_cuda_context & ctx, const ggml_tensor * dst, const tq_fattn_call & call) {
    static_assert(tq_fattn_gqa_fits(D, ncols2), "bad D/ncols2");
    tq_fattn_launch<D, ncols2>(ctx, dst, tq_flash_attn_ext_gqa<D, ncols2, type_K, type_V>, 0, call);
}

// all head sizes and head groupings of one K/V pair (instances in fattn-gqa/, one file per pair)
#define TQ_FATTN_GQA_DECL_PAIR(PREFIX, type_K, type_V)                                                              \
    PREFIX template void tq_flash_attn_ext_gqa_case< 64, 1, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_gqa_case< 64, 2, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_gqa_case< 64, 4, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_gqa_case< 64, 8, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_gqa_case<128, 1, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_gqa_case<128, 2, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_gqa_case<128, 4, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_gqa_case<256, 1, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_gqa_case<256, 2, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &);

// the tensor-core variant (tq-fattn-mma.cuh) of one K/V pair: every head size, and any group of
// 1 to 8 heads per block (the columns of its MMA; SmolLM2 has groups of 3, Qwen2.5 of 6 and 7)
#define TQ_FATTN_MMA_DECL_D(PREFIX, D, type_K, type_V)                                                              \
    PREFIX template void tq_flash_attn_ext_mma_case<D, 1, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_mma_case<D, 2, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_mma_case<D, 3, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_mma_case<D, 4, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_mma_case<D, 5, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_mma_case<D, 6, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_mma_case<D, 7, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &); \
    PREFIX template void tq_flash_attn_ext_mma_case<D, 8, type_K, type_V>(ggml_backend_cuda_context &, const ggml_tensor *, const tq_fattn_call &);
#define TQ_FATTN_MMA_DECL_PAIR(PREFIX, type_K, type_V) \
    TQ_FATTN_MMA_DECL_D(PREFIX, 64, type_K, type_V) TQ_FATTN_MMA_DECL_D(PREFIX, 128, type_K, type_V) TQ_FATTN_MMA_DECL_D(PREFIX, 256, type_K, type_V)

#define TQ_FATTN_GQA_PAIRS(X)                                                                     \
    X(GGML_TYPE_TURBO2_0, GGML_TYPE_TURBO2_0) X(GGML_TYPE_TURBO2_0, GGML_TYPE_TURBO3_0) X(GGML_TYPE_TURBO2_0, GGML_TYPE_TURBO4_0) \
    X(GGML_TYPE_TURBO3_0, GGML_TYPE_TURBO2_0) X(GGML_TYPE_TURBO3_0, GGML_TYPE_TURBO3_0) X(GGML_TYPE_TURBO3_0, GGML_TYPE_TURBO4_0) \
    X(GGML_TYPE_TURBO4_0, GGML_TYPE_TURBO2_0) X(GGML_TYPE_TURBO4_0, GGML_TYPE_TURBO3_0) X(GGML_TYPE_TURBO4_0, GGML_TYPE_TURBO4_0)

#define TQ_FATTN_GQA_EXTERN(type_K, type_V) TQ_FATTN_GQA_DECL_PAIR(extern, type_K, type_V)
TQ_FATTN_GQA_PAIRS(TQ_FATTN_GQA_EXTERN)
#undef TQ_FATTN_GQA_EXTERN

#include "tq-fattn-mma.cuh"

#define TQ_FATTN_MMA_EXTERN(type_K, type_V) TQ_FATTN_MMA_DECL_PAIR(extern, type_K, type_V)
TQ_FATTN_GQA_PAIRS(TQ_FATTN_MMA_EXTERN)
#undef TQ_FATTN_MMA_EXTERN
