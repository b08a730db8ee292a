// TurboQuant flash-attention decode on tensor cores: one query token, K and V both TurboQuant,
// head size 128, the query heads of one KV head (up to 8) as the 8 columns of an m16n8k16 MMA.
// The float kernel in tq-fattn-gqa.cuh spends ~80 warp instructions per KV row (decode, 4 FMAs per
// value and head); here a row costs its decode and a few MMAs. Per warp and tile of 32 KV rows:
//   1. the packed rows arrive in shared memory by cp.async one tile ahead (tq-fattn-gqa.cuh);
//   2. K is decoded to f16 centroids (no scale) in shared memory, two values per lookup in a table
//      of centroid pairs;
//   3. S = K Q^T by MMA (A = K rows by ldmatrix, B = Q in registers), one accumulator per 64-value
//      block, times the block scales, in float;
//   4. online softmax in float, as upstream's kernels (FATTN_KQ_MAX_OFFSET);
//   5. V is decoded into the same buffer, P is written times V's block scales as f16, and
//      O^T += V^T P by MMA (A = V^T by ldmatrix.trans);
// then the 4 warps combine through shared memory and the KV splits as upstream's.
// Numerics: Q, centroids and P in f16 (as upstream's f16 MMA kernel), products summed in float.
#pragma once

#include "tq-fattn-gqa.cuh"

#define TQ_FATTN_MMA_D 128

template <int D, ggml_type type_K, ggml_type type_V>
struct tq_fattn_mma_smem {
    typedef tq_fattn_gqa_stage<D, type_K, type_V> stg;
    static constexpr int nwarps  = TQ_FATTN_GQA_NTHREADS/WARP_SIZE;
    static constexpr int nblk    = D/QK_TQ;
    static constexpr int H_row   = D + 8; // halves per decoded row: ldmatrix's 8 rows fall in distinct banks
    static constexpr int n_lut_K = 1 << 2*tq_cuda_bits(type_K);
    static constexpr int n_lut_V = 1 << 2*tq_cuda_bits(type_V);
    // byte offsets; the staging buffers and decoded rows hold the warps' outputs at the end
    static constexpr int off_H   = stg::bytes;                                   // [nwarps][32][H_row] half
    static constexpr int off_P   = off_H + nwarps*WARP_SIZE*H_row*2;             // [nwarps][nblk][8][32] half
    static constexpr int off_d   = off_P + nwarps*nblk*8*WARP_SIZE*2;            // [nwarps][32][nblk] float
    static constexpr int off_Q   = off_d + nwarps*WARP_SIZE*nblk*4;              // [8][D] half
    static constexpr int off_lut = off_Q + 8*D*2;                                // K then V pairs, half2
    static constexpr int off_ML  = off_lut + 4*(n_lut_K + n_lut_V);              // [2][nwarps][8] float
    static constexpr int bytes   = off_ML + 2*nwarps*8*4;
    static constexpr bool on     = D == TQ_FATTN_MMA_D && stg::on && nwarps*8*D*4 <= off_P;
};

// four 8x8 b16 matrices from shared memory, transposed with trans (lanes 8i..8i+7 address matrix i)
template <bool trans>
static __device__ __forceinline__ void tq_ldmatrix_x4(uint32_t (&r)[4], const half * p) {
#ifdef TURING_MMA_AVAILABLE
    if constexpr (trans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
            : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"((unsigned) __cvta_generic_to_shared(p)));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
            : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"((unsigned) __cvta_generic_to_shared(p)));
    }
#else
    GGML_UNUSED_VARS(r, p);
    NO_DEVICE_CODE;
#endif // TURING_MMA_AVAILABLE
}

// c += A B: A 16x16 row-major (ldmatrix order), B 16x8 (b0: k = 2t, 2t+1, b1: k = 2t+8, 2t+9; n = g)
static __device__ __forceinline__ void tq_mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t b0, const uint32_t b1) {
#ifdef AMPERE_MMA_AVAILABLE
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    GGML_UNUSED_VARS(c, a, b0, b1);
    NO_DEVICE_CODE;
#endif // AMPERE_MMA_AVAILABLE
}

// decode one warp's 32 rows (packed, row stride row_bytes) to f16 centroids H [32][H_row] and
// their block scales d [32][nblk]; lane i takes groups of 8 values i, i + 32, ...
template <int bits, int D, int H_row>
static __device__ __forceinline__ void tq_fattn_mma_decode(
        half * __restrict__ H, float * __restrict__ d, const char * __restrict__ rows, const uint32_t * __restrict__ lut, const int lane) {
    typedef typename tq_cuda_block<bits>::type block_t;
    constexpr int row_bytes = D/QK_TQ * (int) sizeof(block_t);
    constexpr int ngrp      = D/8;
    constexpr uint32_t pair = (1u << 2*bits) - 1;
#pragma unroll
    for (int i0 = 0; i0 < WARP_SIZE*ngrp; i0 += WARP_SIZE) {
        const int i  = i0 + lane;
        const int r  = i / ngrp;
        const int gi = i % ngrp;
        const block_t * b = (const block_t *) (rows + r*row_bytes) + gi/8;
        const uint32_t  w = tq_cuda_load_group<bits>(b->qs, gi % 8);
        uint4 out;
        out.x = lut[ w              & pair];
        out.y = lut[(w >> (2*bits)) & pair];
        out.z = lut[(w >> (4*bits)) & pair];
        out.w = lut[(w >> (6*bits)) & pair];
        *(uint4 *) (H + r*H_row + 8*gi) = out;
    }
#pragma unroll
    for (int i0 = 0; i0 < WARP_SIZE*(D/QK_TQ); i0 += WARP_SIZE) {
        const int i = i0 + lane;
        d[i] = __half2float(((const block_t *) (rows + (i/(D/QK_TQ))*row_bytes))[i % (D/QK_TQ)].d);
    }
}

template <int D, int ncols2, ggml_type type_K, ggml_type type_V>
__launch_bounds__(TQ_FATTN_GQA_NTHREADS, TQ_FATTN_GQA_MINBLOCKS)
static __global__ void tq_flash_attn_ext_mma(
        const char * __restrict__ Q,
        const char * __restrict__ K,
        const char * __restrict__ V,
        const char * __restrict__ mask,
        const char * __restrict__ sinks,
        const int  * __restrict__ KV_max,
        float      * __restrict__ dst,
        float2     * __restrict__ dst_meta,
        const float scale,
        const float max_bias,
        const float m0,
        const float m1,
        const uint32_t n_head_log2,
        const float logit_softcap,
        const int32_t ne00, const uint3   ne01, const int32_t ne02, const int32_t ne03,
                            const int32_t nb01, const int32_t nb02, const int32_t nb03,
        const int32_t ne10, const int32_t ne11, const int32_t ne12, const int32_t ne13,
                            const int32_t nb11, const int32_t nb12, const int64_t nb13,
                            const int32_t nb21, const int32_t nb22, const int64_t nb23,
                            const int32_t ne31, const int32_t ne32, const int32_t ne33,
                            const int32_t nb31, const int32_t nb32, const int64_t nb33) {
    ggml_cuda_pdl_lc();
#if defined(FLASH_ATTN_AVAILABLE) && defined(AMPERE_MMA_AVAILABLE) && defined(CP_ASYNC_AVAILABLE)
    typedef tq_fattn_mma_smem<D, type_K, type_V> sm;
    typedef typename sm::stg stg;
    static_assert(sm::on && ncols2 <= 8, "bad D/ncols2");
    constexpr int bits_K   = tq_cuda_bits(type_K);
    constexpr int bits_V   = tq_cuda_bits(type_V);
    constexpr int nthreads = TQ_FATTN_GQA_NTHREADS;
    constexpr int nwarps   = sm::nwarps;
    constexpr int nblk     = sm::nblk;
    constexpr int H_row    = sm::H_row;

    extern __shared__ __align__(16) char smem[];
    half     * Q_h   = (half     *) (smem + sm::off_Q);
    uint32_t * lut_K = (uint32_t *) (smem + sm::off_lut);
    uint32_t * lut_V = lut_K + sm::n_lut_K;
    float    * M_sh  = (float    *) (smem + sm::off_ML);  // [nwarps][8]
    float    * L_sh  = M_sh + nwarps*8;                     // [nwarps][8]

    const int lane = threadIdx.x;
    const int warp = threadIdx.y;
    const int tid  = warp*WARP_SIZE + lane;
    const int g    = lane / 4; // MMA group: row of A and C, column of B
    const int t    = lane % 4; // thread in group: columns 2t, 2t+1 of C

    char  * tile_w = smem + warp*stg::warp_bytes;
    half  * H_w    = (half  *) (smem + sm::off_H) + warp*WARP_SIZE*H_row;
    half  * P_w    = (half  *) (smem + sm::off_P) + warp*nblk*8*WARP_SIZE;
    float * d_w    = (float *) (smem + sm::off_d) + warp*WARP_SIZE*nblk;

    const tq_fattn_gqa_block blk = tq_fattn_gqa_block_of<ncols2>(ne02, ne12);
    const int sequence = blk.sequence;
    const int kv_head  = blk.kv_head;
    const int head0    = blk.head0;

    Q += nb03*sequence + nb02*head0;
    K += nb13*sequence + nb12*kv_head;
    V += nb23*sequence + nb22*kv_head;
    const half * maskh = mask ? (const half *) (mask + nb33*(sequence % ne33)) : nullptr;

    // the C columns of this thread are heads 2t and 2t + 1 (padding past ncols2: slope 1, so that a
    // masked row stays -inf there too)
    float slope[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        slope[c] = 2*t + c < ncols2 ? get_alibi_slope(max_bias, head0 + 2*t + c, n_head_log2, m0, m1) : 1.0f;
    }

    // centroid pairs: entry (i1 << bits) | i0 is (c[i0], c[i1]), the order of two packed values
    {
        const float * cb_K = tq_cuda_centroids<bits_K>();
        const float * cb_V = tq_cuda_centroids<bits_V>();
        for (int i = tid; i < sm::n_lut_K; i += nthreads) {
            const half2 p = make_half2(__float2half(cb_K[i & ((1 << bits_K) - 1)]), __float2half(cb_K[i >> bits_K]));
            lut_K[i] = *(const uint32_t *) &p;
        }
        for (int i = tid; i < sm::n_lut_V; i += nthreads) {
            const half2 p = make_half2(__float2half(cb_V[i & ((1 << bits_V) - 1)]), __float2half(cb_V[i >> bits_V]));
            lut_V[i] = *(const uint32_t *) &p;
        }
    }

    ggml_cuda_pdl_sync();

    // scaled Q as f16 [8][D], heads past ncols2 zero
    for (int i = tid; i < 8*D; i += nthreads) {
        const int j = i / D;
        Q_h[i] = __float2half(j < ncols2 ? scale*((const float *) (Q + j*nb02))[i % D] : 0.0f);
    }
    __syncthreads();

    // B = Q^T: k = value index, n = head
    uint32_t B_Q[D/16][2];
#pragma unroll
    for (int ks = 0; ks < D/16; ++ks) {
        B_Q[ks][0] = *(const uint32_t *) (Q_h + g*D + 16*ks + 2*t);
        B_Q[ks][1] = *(const uint32_t *) (Q_h + g*D + 16*ks + 2*t + 8);
    }

    float O[D/16][4]; // O^T: rows = values 16*mt + g (+8), columns = heads 2t, 2t+1
#pragma unroll
    for (int mt = 0; mt < D/16; ++mt) {
        O[mt][0] = O[mt][1] = O[mt][2] = O[mt][3] = 0.0f;
    }
    float KQ_max[2] = {-FLT_MAX/2.0f, -FLT_MAX/2.0f};
    float KQ_sum[2] = {0.0f, 0.0f}; // this thread's rows only; summed over the group at the end

    const int k_VKQ_max = KV_max ? KV_max[sequence*gridDim.x + blockIdx.x] : ne11;
    const int k_step    = gridDim.y*nthreads;
    if (blockIdx.y*nthreads < k_VKQ_max) {
        const int64_t r = blockIdx.y*nthreads + warp*WARP_SIZE;
        tq_fattn_gqa_stage_tile<stg>(tile_w, K + r*nb11, V + r*nb21, nb11, nb21, lane);
        tq_cp_async_commit();
    }
    for (int k0 = blockIdx.y*nthreads, s = 0; k0 < k_VKQ_max; k0 += k_step, s ^= 1) {
        const int kw = k0 + warp*WARP_SIZE; // this warp's first row
        if (k0 + k_step < k_VKQ_max) {
            char * next = tile_w + (s ^ 1)*(stg::bytes/2);
            tq_fattn_gqa_stage_tile<stg>(next, K + (int64_t) (kw + k_step)*nb11, V + (int64_t) (kw + k_step)*nb21, nb11, nb21, lane);
        }
        tq_cp_async_commit();
        tq_cp_async_wait<1>();
        __syncwarp();
        const char * K_w = tile_w + s*(stg::bytes/2);
        const char * V_w = K_w + WARP_SIZE*stg::row_K;

        tq_fattn_mma_decode<bits_K, D, H_row>(H_w, d_w, K_w, lut_K, lane);
        __syncwarp();

        // S = K Q^T for rows 16*mt + g (+8), heads 2t, 2t + 1
        float S[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            S[mt][0] = S[mt][1] = S[mt][2] = S[mt][3] = 0.0f;
#pragma unroll
            for (int ib = 0; ib < nblk; ++ib) {
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int ks = 0; ks < QK_TQ/16; ++ks) {
                    uint32_t A[4];
                    tq_ldmatrix_x4<false>(A, H_w + (16*mt + (lane & 15))*H_row + ib*QK_TQ + 16*ks + 8*(lane >> 4));
                    tq_mma_16816(acc, A, B_Q[ib*(QK_TQ/16) + ks][0], B_Q[ib*(QK_TQ/16) + ks][1]);
                }
                const float d0 = d_w[(16*mt + g    )*nblk + ib];
                const float d1 = d_w[(16*mt + g + 8)*nblk + ib];
                S[mt][0] += d0*acc[0]; S[mt][1] += d0*acc[1];
                S[mt][2] += d1*acc[2]; S[mt][3] += d1*acc[3];
            }
        }

        float KQ_max_new[2] = {KQ_max[0], KQ_max[1]};
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int k = kw + 16*mt + g + 8*(e/2);
                float x = S[mt][e];
                if (logit_softcap != 0.0f) {
                    x = logit_softcap*tanhf(x);
                }
                x += maskh ? slope[e % 2]*__half2float(maskh[k]) : 0.0f;
                S[mt][e] = x;
                KQ_max_new[e % 2] = fmaxf(KQ_max_new[e % 2], x + FATTN_KQ_MAX_OFFSET);
            }
        }
        float KQ_max_scale[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
#pragma unroll
            for (int offset = 4; offset < WARP_SIZE; offset <<= 1) {
                KQ_max_new[c] = fmaxf(KQ_max_new[c], __shfl_xor_sync(0xFFFFFFFF, KQ_max_new[c], offset, WARP_SIZE));
            }
            KQ_max_scale[c] = expf(KQ_max[c] - KQ_max_new[c]);
            KQ_max[c] = KQ_max_new[c];
            KQ_sum[c] *= KQ_max_scale[c];
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                S[mt][e] = expf(S[mt][e] - KQ_max[e % 2]);
                KQ_sum[e % 2] += S[mt][e];
            }
        }
#pragma unroll
        for (int mt = 0; mt < D/16; ++mt) {
            O[mt][0] *= KQ_max_scale[0]; O[mt][1] *= KQ_max_scale[1];
            O[mt][2] *= KQ_max_scale[0]; O[mt][3] *= KQ_max_scale[1];
        }

        __syncwarp(); // K's decoded rows are read: V goes into the same buffer
        tq_fattn_mma_decode<bits_V, D, H_row>(H_w, d_w, V_w, lut_V, lane);
        __syncwarp();

        // P [nblk][head][row] as f16, times V's block scale of the row
#pragma unroll
        for (int ib = 0; ib < nblk; ++ib) {
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = 16*mt + g + 8*(e/2);
                    P_w[(ib*8 + 2*t + e % 2)*WARP_SIZE + r] = __float2half(S[mt][e]*d_w[r*nblk + ib]);
                }
            }
        }
        __syncwarp();

        // O^T += V^T P: A = V^T (values x rows) by ldmatrix.trans of the row-major decoded V
#pragma unroll
        for (int kc = 0; kc < 2; ++kc) {
#pragma unroll
            for (int mt = 0; mt < D/16; ++mt) {
                const int ib = mt / (QK_TQ/16);
                const uint32_t b0 = *(const uint32_t *) (P_w + (ib*8 + g)*WARP_SIZE + 16*kc + 2*t);
                const uint32_t b1 = *(const uint32_t *) (P_w + (ib*8 + g)*WARP_SIZE + 16*kc + 2*t + 8);
                uint32_t A[4];
                tq_ldmatrix_x4<true>(A, H_w + (16*kc + (lane & 7) + 8*(lane >> 4))*H_row + 16*mt + 8*((lane >> 3) & 1));
                tq_mma_16816(O[mt], A, b0, b1);
            }
        }
        __syncwarp();
    }

    if (sinks && blockIdx.y == 0) {
        // every warp rescales to the sink; its weight is counted once (warp 0, group 0)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            if (2*t + c < ncols2) {
                const float sink        = ((const float *) sinks)[head0 + 2*t + c];
                const float kqmax_new_c = fmaxf(sink, KQ_max[c]);
                const float sc          = expf(KQ_max[c] - kqmax_new_c);
                KQ_max[c] = kqmax_new_c;
                KQ_sum[c] = KQ_sum[c]*sc + (warp == 0 && g == 0 ? expf(sink - KQ_max[c]) : 0.0f);
#pragma unroll
                for (int mt = 0; mt < D/16; ++mt) {
                    O[mt][c] *= sc; O[mt][c + 2] *= sc;
                }
            }
        }
    }

    // combine the warps: the group's row sums, then each warp's O scaled to the block maximum
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
        for (int offset = 4; offset < WARP_SIZE; offset <<= 1) {
            KQ_sum[c] += __shfl_xor_sync(0xFFFFFFFF, KQ_sum[c], offset, WARP_SIZE);
        }
    }
    tq_cp_async_wait<0>();
    if (g == 0) {
        M_sh[warp*8 + 2*t] = KQ_max[0]; M_sh[warp*8 + 2*t + 1] = KQ_max[1];
        L_sh[warp*8 + 2*t] = KQ_sum[0]; L_sh[warp*8 + 2*t + 1] = KQ_sum[1];
    }
    __syncthreads();

    float * O_sh = (float *) smem; // [nwarps][8][D], over the staging buffers and decoded rows
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        float kqmax = -FLT_MAX/2.0f;
#pragma unroll
        for (int w = 0; w < nwarps; ++w) {
            kqmax = fmaxf(kqmax, M_sh[w*8 + 2*t + c]);
        }
        const float sc = expf(KQ_max[c] - kqmax);
#pragma unroll
        for (int mt = 0; mt < D/16; ++mt) {
            O_sh[(warp*8 + 2*t + c)*D + 16*mt + g    ] = O[mt][c    ]*sc;
            O_sh[(warp*8 + 2*t + c)*D + 16*mt + g + 8] = O[mt][c + 2]*sc;
        }
    }
    __syncthreads();

    for (int i = tid; i < ncols2*D; i += nthreads) {
        const int j = i / D;
        float kqmax = -FLT_MAX/2.0f;
#pragma unroll
        for (int w = 0; w < nwarps; ++w) {
            kqmax = fmaxf(kqmax, M_sh[w*8 + j]);
        }
        float kqsum = 0.0f;
        float v     = 0.0f;
#pragma unroll
        for (int w = 0; w < nwarps; ++w) {
            kqsum += L_sh[w*8 + j]*expf(M_sh[w*8 + j] - kqmax);
            v     += O_sh[(w*8 + j)*D + i % D];
        }
        const int64_t row = ((int64_t) (sequence*int(ne01.z))*ne02 + head0 + j)*gridDim.y + blockIdx.y;
        dst[row*D + i % D] = gridDim.y == 1 ? v/kqsum : v;
        if (gridDim.y != 1 && i % D == 0) {
            dst_meta[row] = make_float2(kqmax, kqsum);
        }
    }
#else
    GGML_UNUSED_VARS(Q, K, V, mask, sinks, KV_max, dst, dst_meta, scale,
        max_bias, m0, m1, n_head_log2, logit_softcap,
        ne00, ne01, ne02, ne03,
              nb01, nb02, nb03,
        ne10, ne11, ne12, ne13,
              nb11, nb12, nb13,
              nb21, nb22, nb23,
              ne31, ne32, ne33,
              nb31, nb32, nb33);
    NO_DEVICE_CODE;
#endif // defined(FLASH_ATTN_AVAILABLE) && defined(AMPERE_MMA_AVAILABLE) && defined(CP_ASYNC_AVAILABLE)
}

template <int D, int ncols2, ggml_type type_K, ggml_type type_V>
void tq_flash_attn_ext_mma_case(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    typedef tq_fattn_mma_smem<D, type_K, type_V> sm;
    static_assert(sm::on && ncols2 <= 8, "bad D/ncols2");
    constexpr int nwarps = TQ_FATTN_GQA_NTHREADS / WARP_SIZE;
    fattn_kernel_t kernel = tq_flash_attn_ext_mma<D, ncols2, type_K, type_V>;
    CUDA_SET_SHARED_MEMORY_LIMIT(kernel, sm::bytes);
    launch_fattn<D, 1, ncols2>(ctx, dst, kernel, nwarps, sm::bytes, TQ_FATTN_GQA_NTHREADS, false, false, false, false);
}
