// TurboQuant flash-attention decode on tensor cores: one query token, K and V both TurboQuant,
// head sizes 64, 128 and 256, the query heads of one KV head (up to 8) as the 8 columns of an
// m16n8k16 MMA.
// The float kernel in tq-fattn-gqa.cuh spends ~80 warp instructions per KV row (decode, 4 FMAs per
// value and head); here a row costs its decode and a few MMAs. Per warp and tile of 32 KV rows:
//   1. the packed rows arrive in shared memory by cp.async one tile ahead (tq-fattn-gqa.cuh); at
//      head size 64 a row (one block of 18, 26 or 34 bytes) is not whole words, and the fragments
//      are loaded from the cache in global memory instead;
//   2. S = K Q^T by MMA, A = K decoded straight into MMA fragments: a lookup in a table of f16
//      centroid pairs gives one fragment register; one accumulator per 64-value block, times the
//      block scales, in float;
//   3. online softmax in float, as upstream's kernels (FATTN_KQ_MAX_OFFSET);
//   4. P is written times V's block scales as f16, and O^T += V^T P by MMA, A = V^T decoded
//      straight into fragments (a pair of two rows' centroids per lookup; 2-bit V: two byte
//      permutes of its 4 centroids held in registers, no lookup);
// then the 4 warps combine through shared memory and the KV splits in tq_fattn_combine.
// A dot product does not depend on the order of its terms, so the fragments take the value
// dimensions in the order the packed rows hold them: for K, thread t of a group reads the 16
// consecutive indices 16t.. of each block (Q's B fragment follows the same order); for V, group g
// reads the 8 indices 8g.. of each block, and the output rows are put back in order at the end.
// Decoded values never pass through shared memory (an earlier version decoded into it and read
// them back by ldmatrix: shared-memory bound, Nsight Compute: L1 at 77%, 1868 instructions/tile).
// Numerics: Q, centroids and P in f16 (as upstream's f16 MMA kernel), products summed in float.
#pragma once

#include "tq-fattn-gqa.cuh"

// Blocks of 4 warps per SM that the register budget is set for. Head size 128: 4 (<= 128 registers
// per thread, no spills, nvcc -Xptxas -v); 5 blocks (96 registers, no spills) measured 4-7% slower
// at depth 8k-64k on the H100. Head size 256 holds twice the Q fragments and output accumulators:
// 3 blocks (168 registers, 8-16 bytes of spills; 2 blocks would take 240 registers and none), as
// many as its 58 KB of shared memory allow with tq3_0/tq2_0 (tq4_0/tq4_0's 84 KB allow 2).
static constexpr __host__ __device__ int tq_fattn_mma_minblocks(const int D) {
    return D <= 128 ? 4 : 3;
}

template <int D, ggml_type type_K, ggml_type type_V>
struct tq_fattn_mma_smem {
    typedef tq_fattn_gqa_stage<D, type_K, type_V> stg;
    static constexpr int nwarps  = TQ_FATTN_GQA_NTHREADS/WARP_SIZE;
    static constexpr int nblk    = D/QK_TQ;
    static constexpr int n_lut_K = 1 << 2*tq_cuda_bits(type_K);
    static constexpr int n_lut_V = tq_cuda_bits(type_V) == 2 ? 0 : 1 << 2*tq_cuda_bits(type_V); // 2-bit V: none (byte permutes)
    // rows of whole words are staged (4-byte cp.async); otherwise (head size 64) the warps read the cache
    static constexpr bool staged = stg::words;
    static constexpr int out_bytes = nwarps*8*D*4;                               // the warps' outputs, [nwarps][8][D] float
    // byte offsets; the staging buffers come first and hold the warps' outputs at the end
    static constexpr int off_P   = staged && stg::bytes > out_bytes ? stg::bytes : out_bytes; // [nwarps][nblk][8][32] half
    static constexpr int off_Q   = off_P + nwarps*nblk*8*WARP_SIZE*2;            // [8][D] half
    static constexpr int off_lut = off_Q + 8*D*2;                                // K then V pairs, half2
    static constexpr int off_ML  = off_lut + 4*(n_lut_K + n_lut_V);              // [2][nwarps][8] float
    static constexpr int bytes   = off_ML + 2*nwarps*8*4;
    static constexpr bool on     = D == 64 || D == 128 || D == 256;
};

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

// the 2*nbytes/... packed indices at p (2-byte aligned) in one word, first index in the low bits
template <int nbytes>
static __device__ __forceinline__ uint64_t tq_fattn_mma_load_u16s(const uint8_t * p) {
    static_assert(nbytes % 2 == 0 && nbytes <= 8, "bad nbytes");
    uint64_t w = 0;
#pragma unroll
    for (int i = 0; i < nbytes/2; ++i) {
        w |= (uint64_t) ((const uint16_t *) p)[i] << 16*i;
    }
    return w;
}

// f16 centroid pair from a table lut of (1 << 2*bits) pairs: entry (i1 << bits) | i0 is (c[i0], c[i1])
template <int bits>
static __device__ __forceinline__ uint32_t tq_fattn_mma_pair(const uint32_t * lut, const uint32_t i0, const uint32_t i1) {
    return lut[i0 | (i1 << bits)];
}

// prmt.b32 as is: __byte_perm masks its selector (a LOP3 per call), which these selectors, nibbles
// below 8 in the low 16 bits, do not need
static __device__ __forceinline__ uint32_t tq_prmt(const uint32_t a, const uint32_t b, const uint32_t sel) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// 2-bit V without a table lookup: the f16 centroid pairs (c[a_p], c[b_p]) of two rows at positions
// p = 4h .. 4h + 3 of their 8-index groups wa, wb (16-bit words), the 4 centroids as f16 in T0, T1.
// A byte permute puts both rows' 4 indices in one word (a_p at bit 2p, b_p at 8 + 2p), two shifts
// and a mask per pair of positions spread them to bytes (a_p, b_p, a_p+1, b_p+1), a multiply-add
// turns each index k into the selector nibbles (2k, 2k + 1) of its f16 in T, and a byte permute
// per register picks them
static __device__ __forceinline__ void tq_fattn_mma_pairs2(const uint32_t wa, const uint32_t wb, const int h,
                                                           const uint32_t T0, const uint32_t T1, uint32_t * r) {
    const uint32_t x  = tq_prmt(wa, wb, h ? 0x2251u : 0x2240u);
    const uint32_t p0 = (x | (x << 14)) & 0x03030303u;        // a0, b0, a1, b1
    const uint32_t p1 = ((x >> 4) | (x << 10)) & 0x03030303u; // a2, b2, a3, b3
    const uint32_t s0 = p0*0x22u + 0x10101010u;
    const uint32_t s1 = p1*0x22u + 0x10101010u;
    r[0] = tq_prmt(T0, T1, s0);
    r[1] = tq_prmt(T0, T1, s0 >> 16);
    r[2] = tq_prmt(T0, T1, s1);
    r[3] = tq_prmt(T0, T1, s1 >> 16);
}

template <int D, int ncols2, ggml_type type_K, ggml_type type_V>
__launch_bounds__(TQ_FATTN_GQA_NTHREADS, tq_fattn_mma_minblocks(D))
static __global__ void tq_flash_attn_ext_mma(
        TQ_FATTN_KERNEL_PARAMS) {
    TQ_FATTN_KERNEL_PTRS
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
    typedef typename tq_cuda_block<bits_K>::type block_K;
    typedef typename tq_cuda_block<bits_V>::type block_V;
    constexpr uint32_t pair_K = (1u << 2*bits_K) - 1;
    constexpr uint32_t mask_V = (1u << bits_V) - 1;
    constexpr bool     staged = sm::staged;
    // row strides of the K and V rows a warp reads: its tile in shared memory, or the cache
    const int64_t rs_K = staged ? stg::row_K : nb11;
    const int64_t rs_V = staged ? stg::row_V : nb21;

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
    half  * P_w    = (half  *) (smem + sm::off_P) + warp*nblk*8*WARP_SIZE;

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

    // 2-bit V: its 4 centroids as f16, (c0, c1) and (c2, c3), for tq_fattn_mma_pairs2
    uint32_t T_V[2] = {0, 0};
    if constexpr (bits_V == 2) {
        const float * cb = tq_cuda_centroids<2>();
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const half2 p = make_half2(__float2half(cb[2*i]), __float2half(cb[2*i + 1]));
            T_V[i] = *(const uint32_t *) &p;
        }
    }

    ggml_cuda_pdl_sync();

    // the first tile's copy goes out first, so that it is in flight while Q is loaded
    const int k_VKQ_max = KV_max ? KV_max[sequence*gridDim.x + blockIdx.x] : ne11;
    const int k_step    = gridDim.y*nthreads;
    if (staged && blockIdx.y*nthreads < k_VKQ_max) {
        const int64_t r = blockIdx.y*nthreads + warp*WARP_SIZE;
        tq_fattn_gqa_stage_tile<stg>(tile_w, K + r*nb11, V + r*nb21, nb11, nb21, lane);
        tq_cp_async_commit();
    }

    // scaled Q as f16 [8][D], heads past ncols2 zero; in float first over the P buffers, which the
    // loop writes only after Q_h is read
    {
        static_assert(sm::off_Q - sm::off_P >= ncols2*D*(int) sizeof(float), "Q does not fit the P buffers");
        float * Q_f = (float *) (smem + sm::off_P);
        tq_fattn_load_q<D, ncols2>(Q_f, Q, nb02, scale, fuse, head0, ne02, tid);
        for (int i = tid; i < 8*D; i += nthreads) {
            Q_h[i] = __float2half(i < ncols2*D ? Q_f[i] : 0.0f);
        }
        __syncthreads();
    }

    // B = Q^T: k = value index, n = head, in K's fragment order: k-step ks of block ib takes values
    // ib*QK_TQ + 16t' + 4ks + {0, 1 | 2, 3} at k = 2t' + {0, 1 | 8, 9}
    uint32_t B_Q[D/16][2];
#pragma unroll
    for (int ib = 0; ib < nblk; ++ib) {
#pragma unroll
        for (int ks = 0; ks < QK_TQ/16; ++ks) {
            B_Q[ib*(QK_TQ/16) + ks][0] = *(const uint32_t *) (Q_h + g*D + ib*QK_TQ + 16*t + 4*ks);
            B_Q[ib*(QK_TQ/16) + ks][1] = *(const uint32_t *) (Q_h + g*D + ib*QK_TQ + 16*t + 4*ks + 2);
        }
    }

    // O^T: rows = values, columns = heads 2t, 2t+1; in V's fragment order, row g (g + 8) of m-tile
    // mt is value (mt/4)*QK_TQ + 8g + 2*(mt%4) (+ 1)
    float O[D/16][4];
#pragma unroll
    for (int mt = 0; mt < D/16; ++mt) {
        O[mt][0] = O[mt][1] = O[mt][2] = O[mt][3] = 0.0f;
    }
    float KQ_max[2] = {-FLT_MAX/2.0f, -FLT_MAX/2.0f};
    float KQ_sum[2] = {0.0f, 0.0f}; // this thread's rows only; summed over the group at the end

    for (int k0 = blockIdx.y*nthreads, s = 0; k0 < k_VKQ_max; k0 += k_step, s ^= 1) {
        const int kw = k0 + warp*WARP_SIZE; // this warp's first row
        const char * K_w = K + (int64_t) kw*nb11;
        const char * V_w = V + (int64_t) kw*nb21;
        if constexpr (staged) {
            if (k0 + k_step < k_VKQ_max) {
                char * next = tile_w + (s ^ 1)*(stg::bytes/2);
                tq_fattn_gqa_stage_tile<stg>(next, K + (int64_t) (kw + k_step)*nb11, V + (int64_t) (kw + k_step)*nb21, nb11, nb21, lane);
            }
            tq_cp_async_commit();
            tq_cp_async_wait<1>();
            __syncwarp();
            K_w = tile_w + s*(stg::bytes/2);
            V_w = K_w + WARP_SIZE*stg::row_K;
        }

        // the loads that the softmax and P need, issued now so that they land during the K part: the
        // mask and V's block scales of this thread's rows g + 8*rr (the compiler would keep them
        // behind the shared-memory stores of P, which it cannot tell apart from them)
        float mk[4];
        float d_V[nblk][4];
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
            mk[rr] = maskh ? __half2float(maskh[kw + g + 8*rr]) : 0.0f;
#pragma unroll
            for (int ib = 0; ib < nblk; ++ib) {
                d_V[ib][rr] = __half2float(((const block_V *) (V_w + (g + 8*rr)*rs_V))[ib].d);
            }
        }

        // S = K Q^T for rows 16*mt + g (+8), heads 2t, 2t + 1; A from thread t's 16 indices of each
        // block of rows 16*mt + g and + 8
        float S[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            S[mt][0] = S[mt][1] = S[mt][2] = S[mt][3] = 0.0f;
#pragma unroll
            for (int ib = 0; ib < nblk; ++ib) {
                const block_K * b0 = (const block_K *) (K_w + (16*mt + g    )*rs_K) + ib;
                const block_K * b1 = (const block_K *) (K_w + (16*mt + g + 8)*rs_K) + ib;
                const uint64_t  w0 = tq_fattn_mma_load_u16s<2*bits_K>(b0->qs + 2*bits_K*t);
                const uint64_t  w1 = tq_fattn_mma_load_u16s<2*bits_K>(b1->qs + 2*bits_K*t);
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int ks = 0; ks < QK_TQ/16; ++ks) {
                    uint32_t A[4];
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int s0 = bits_K*(4*ks + 2*h); // indices 4ks + 2h, 4ks + 2h + 1
                        A[2*h    ] = lut_K[(uint32_t) (w0 >> s0) & pair_K];
                        A[2*h + 1] = lut_K[(uint32_t) (w1 >> s0) & pair_K];
                    }
                    tq_mma_16816(acc, A, B_Q[ib*(QK_TQ/16) + ks][0], B_Q[ib*(QK_TQ/16) + ks][1]);
                }
                const float d0 = __half2float(b0->d);
                const float d1 = __half2float(b1->d);
                S[mt][0] += d0*acc[0]; S[mt][1] += d0*acc[1];
                S[mt][2] += d1*acc[2]; S[mt][3] += d1*acc[3];
            }
        }

        float KQ_max_new[2] = {KQ_max[0], KQ_max[1]};
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = S[mt][e];
                if (logit_softcap != 0.0f) {
                    x = logit_softcap*tanhf(x);
                }
                x += maskh ? slope[e % 2]*mk[2*mt + e/2] : 0.0f;
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
        // past the first tiles the maximum rarely moves: skip the rescale while no head's did
        if (__any_sync(0xFFFFFFFF, KQ_max_scale[0] != 1.0f || KQ_max_scale[1] != 1.0f)) {
#pragma unroll
            for (int mt = 0; mt < D/16; ++mt) {
                O[mt][0] *= KQ_max_scale[0]; O[mt][1] *= KQ_max_scale[1];
                O[mt][2] *= KQ_max_scale[0]; O[mt][3] *= KQ_max_scale[1];
            }
        }

        // P [nblk][head][row] as f16, times V's block scale of the row
#pragma unroll
        for (int ib = 0; ib < nblk; ++ib) {
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = 16*mt + g + 8*(e/2);
                    P_w[(ib*8 + 2*t + e % 2)*WARP_SIZE + r] = __float2half(S[mt][e]*d_V[ib][2*mt + e/2]);
                }
            }
        }
        __syncwarp();

        // O^T += V^T P over the rows 16kc..16kc+15: A = V^T, rows 2t, 2t+1 (and + 8) paired in each
        // register, values 8g.. of each block (group g)
#pragma unroll
        for (int kc = 0; kc < 2; ++kc) {
#pragma unroll
            for (int ib = 0; ib < nblk; ++ib) {
                uint32_t w[4]; // rows 16kc + 2t, + 1, + 8, + 9
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const block_V * b = (const block_V *) (V_w + (16*kc + 2*t + (i & 1) + 8*(i >> 1))*rs_V) + ib;
                    w[i] = tq_cuda_load_group<bits_V>(b->qs, g);
                }
                const uint32_t b0 = *(const uint32_t *) (P_w + (ib*8 + g)*WARP_SIZE + 16*kc + 2*t);
                const uint32_t b1 = *(const uint32_t *) (P_w + (ib*8 + g)*WARP_SIZE + 16*kc + 2*t + 8);
                if constexpr (bits_V == 2) {
                    // position p of rows (2t, 2t + 1) in lo[p], of rows (2t + 8, 2t + 9) in hi[p]
                    uint32_t lo[8], hi[8];
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        tq_fattn_mma_pairs2(w[0], w[1], h, T_V[0], T_V[1], lo + 4*h);
                        tq_fattn_mma_pairs2(w[2], w[3], h, T_V[0], T_V[1], hi + 4*h);
                    }
#pragma unroll
                    for (int m = 0; m < QK_TQ/16; ++m) {
                        const uint32_t A[4] = {lo[2*m], lo[2*m + 1], hi[2*m], hi[2*m + 1]};
                        tq_mma_16816(O[ib*(QK_TQ/16) + m], A, b0, b1);
                    }
                } else {
#pragma unroll
                    for (int m = 0; m < QK_TQ/16; ++m) {
                        const int s0 = bits_V*2*m, s1 = s0 + bits_V; // values 8g + 2m (row g of the m-tile), + 1 (row g + 8)
                        uint32_t A[4];
                        A[0] = tq_fattn_mma_pair<bits_V>(lut_V, (w[0] >> s0) & mask_V, (w[1] >> s0) & mask_V);
                        A[1] = tq_fattn_mma_pair<bits_V>(lut_V, (w[0] >> s1) & mask_V, (w[1] >> s1) & mask_V);
                        A[2] = tq_fattn_mma_pair<bits_V>(lut_V, (w[2] >> s0) & mask_V, (w[3] >> s0) & mask_V);
                        A[3] = tq_fattn_mma_pair<bits_V>(lut_V, (w[2] >> s1) & mask_V, (w[3] >> s1) & mask_V);
                        tq_mma_16816(O[ib*(QK_TQ/16) + m], A, b0, b1);
                    }
                }
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

    float * O_sh = (float *) smem; // [nwarps][8][D], over the staging buffers
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
            const int i = (mt/(QK_TQ/16))*QK_TQ + 8*g + 2*(mt % (QK_TQ/16)); // back to value order
            O_sh[(warp*8 + 2*t + c)*D + i    ] = O[mt][c    ]*sc;
            O_sh[(warp*8 + 2*t + c)*D + i + 1] = O[mt][c + 2]*sc;
        }
    }
    __syncthreads();

    const bool partials = gridDim.y != 1 || fuse.partials;
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
        dst[row*D + i % D] = partials ? v : v/kqsum;
        if (partials && i % D == 0) {
            dst_meta[row] = make_float2(kqmax, kqsum);
        }
    }
#else
    TQ_FATTN_KERNEL_UNUSED
    NO_DEVICE_CODE;
#endif // defined(FLASH_ATTN_AVAILABLE) && defined(AMPERE_MMA_AVAILABLE) && defined(CP_ASYNC_AVAILABLE)
}

template <int D, int ncols2, ggml_type type_K, ggml_type type_V>
void tq_flash_attn_ext_mma_case(ggml_backend_cuda_context & ctx, const ggml_tensor * dst, const tq_fattn_call & call) {
    typedef tq_fattn_mma_smem<D, type_K, type_V> sm;
    static_assert(sm::on && ncols2 <= 8, "bad D/ncols2");
    const auto kernel = tq_flash_attn_ext_mma<D, ncols2, type_K, type_V>;
    CUDA_SET_SHARED_MEMORY_LIMIT(kernel, sm::bytes);
    tq_fattn_launch<D, ncols2>(ctx, dst, kernel, sm::bytes, call);
}
