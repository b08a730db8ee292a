// TurboQuant KV-cache types on CUDA: the encoder (SET_ROWS and CPY into the types) and CPY out of
// them. A warp (or, for a few blocks, a thread block) encodes one 64-value block, lane l holding
// values 2l and 2l+1, with the scale search of tq-quants.c: float thresholds from correctly
// rounded products (__fmul_rn/__fdiv_rn, as this file is built with fast math), float64 sums, the
// same tie rule. The warp path sums in the CPU's order; the thread-block path (decode) sums by a
// butterfly, whose rounding the tie rule's 1e-9 relative margin dwarfs: the bytes match the CPU's.
#include "tq-cuda.cuh"

static __constant__ float tq_cuda_boundaries_2[3]  = TQ_BOUNDARIES_2;
static __constant__ float tq_cuda_boundaries_3[7]  = TQ_BOUNDARIES_3;
static __constant__ float tq_cuda_boundaries_4[15] = TQ_BOUNDARIES_4;
static __constant__ float tq_cuda_boundaries32_2[3]  = TQ32_BOUNDARIES_2;
static __constant__ float tq_cuda_boundaries32_3[7]  = TQ32_BOUNDARIES_3;
static __constant__ float tq_cuda_boundaries32_4[15] = TQ32_BOUNDARIES_4;
static __constant__ float tq_cuda_boundaries16_2[3]  = TQ16_BOUNDARIES_2;
static __constant__ float tq_cuda_boundaries16_3[7]  = TQ16_BOUNDARIES_3;
static __constant__ float tq_cuda_boundaries16_4[15] = TQ16_BOUNDARIES_4;

#define TQ_D_MAX 65504.0f
#define TQ_CUDA_WARPS_PER_BLOCK 4   // prompts: one warp per TQ block, 4 per thread block
#define TQ_CUDA_ENC_PARALLEL_MAX 256 // up to this many TQ blocks, a thread block per TQ block

template <int bits>
static __device__ __forceinline__ const float * tq_cuda_boundaries() {
    return bits == 2 ? tq_cuda_boundaries_2 : bits == 3 ? tq_cuda_boundaries_3 : tq_cuda_boundaries_4;
}

template <ggml_type type>
static __device__ __forceinline__ const float * tq_cuda_form_boundaries() {
    constexpr int qk = tq_cuda_form<type>::qk, bits = tq_cuda_form<type>::bits;
    if constexpr (qk == QK_TQ) {
        return tq_cuda_boundaries<bits>();
    } else if constexpr (qk == QK_TQ32) {
        return bits == 2 ? tq_cuda_boundaries32_2 : bits == 3 ? tq_cuda_boundaries32_3 : tq_cuda_boundaries32_4;
    } else {
        static_assert(qk == QK_TQ16, "bad block size");
        return bits == 2 ? tq_cuda_boundaries16_2 : bits == 3 ? tq_cuda_boundaries16_3 : tq_cuda_boundaries16_4;
    }
}

static __device__ __forceinline__ double tq_cuda_warp_sum(double v) {
#pragma unroll
    for (int offset = WARP_SIZE/2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xFFFFFFFF, v, offset, WARP_SIZE);
    }
    return v; // a butterfly: every lane holds the same bits
}

// candidate s of the scale search: norm * (TQ_SCALE_MIN + s) / TQ_SCALE_DIV, rounded as the CPU does
static __device__ __forceinline__ float tq_cuda_candidate_scale(const float norm, const int s) {
    return __fmul_rn(norm, __fdiv_rn((float) (TQ_SCALE_MIN + s), TQ_SCALE_DIV));
}

// #(x > boundary_j * s), as tq_block_indices
template <int bits>
static __device__ __forceinline__ int tq_cuda_index(const float x, const float s, const float * bnd) {
    int k = 0;
#pragma unroll
    for (int j = 0; j < (1 << bits) - 1; ++j) {
        k += x > __fmul_rn(bnd[j], s);
    }
    return k;
}

template <int bits>
static __device__ __forceinline__ int tq_cuda_index(const float x, const float s) {
    return tq_cuda_index<bits>(x, s, tq_cuda_boundaries<bits>());
}

// fp32 -> fp16 bits as the CPU's F16C conversion: NaN keeps its sign and the top of its payload
static __device__ __forceinline__ uint16_t tq_cuda_fp16_bits(const float f) {
    if (isnan(f)) {
        const uint32_t u = __float_as_uint(f);
        return (uint16_t) (((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF));
    }
    return __half_as_ushort(__float2half_rn(f));
}

// The candidate the CPU's rule picks (tq-quants.c: in order, a new best must beat the last by a
// factor 1 + TQ_SCALE_TIE), lane s holding candidate s's gain g (other lanes: anything). The rule's
// choice lies within that factor of the largest gain: a best only grows, and the maximum, if not
// taken, lost to a best within that factor. So a maximum with no other candidate within twice the
// factor is the choice (a warp maximum and a ballot); the rare near-ties take the rule's own scan
// (25 dependent steps). -1: none taken (NaN gains), where the CPU keeps candidate 0's indices and
// the norm as scale.
static __device__ __forceinline__ int tq_cuda_pick_candidate(const double g, const int lane) {
    const bool cand = lane < TQ_SCALE_STEPS;
    double gmax = cand ? g : -1.0;
#pragma unroll
    for (int offset = WARP_SIZE/2; offset > 0; offset >>= 1) {
        gmax = fmax(gmax, __shfl_xor_sync(0xFFFFFFFF, gmax, offset, WARP_SIZE));
    }
    const uint32_t near = __ballot_sync(0xFFFFFFFF, cand && g >= gmax*(1.0 - 2*TQ_SCALE_TIE));
    if (__popc(near) == 1) {
        return __ffs(near) - 1;
    }
    double best_gain = -1.0;
    int    best      = -1;
    for (int s = 0; s < TQ_SCALE_STEPS; ++s) {
        const double gs = __shfl_sync(0xFFFFFFFF, g, s, WARP_SIZE);
        if (gs > best_gain*(1.0 + TQ_SCALE_TIE)) {
            best_gain = gs;
            best      = s;
        }
    }
    return best;
}

// Lane s's candidate scale s over a block of n values in the CPU's loop order, value i from value(i)
// (a shuffle; the same in every lane): <x,c> and <c,c> of its cells c. Thresholds and centroids sit
// in registers, and the centroid is picked by selects along the ascending thresholds.
template <int bits, int n, typename value_t>
static __device__ __forceinline__ void tq_cuda_candidate_sums(const float norm, const int lane, const float * bnd,
                                                              const float * cbk, const value_t value, double & xc,
                                                              double & cc) {
    const float sc = tq_cuda_candidate_scale(norm, lane < TQ_SCALE_STEPS ? lane : 0);
    float thr[(1 << bits) - 1];
    float cen[1 << bits];
#pragma unroll
    for (int j = 0; j < (1 << bits) - 1; ++j) {
        thr[j] = __fmul_rn(bnd[j], sc);
    }
#pragma unroll
    for (int j = 0; j < (1 << bits); ++j) {
        cen[j] = cbk[j];
    }
    xc = 0.0;
    cc = 0.0;
#pragma unroll 8
    for (int i = 0; i < n; ++i) {
        const float v = value(i);
        float c = cen[0];
#pragma unroll
        for (int j = 0; j < (1 << bits) - 1; ++j) {
            c = v > thr[j] ? cen[j + 1] : c;
        }
        xc += (double) v*c;
        cc += (double) c*c;
    }
}

// A block's store: the words w of each group of L lanes (their indices shifted into place) are OR-ed
// across the group, the group's first lane writes its bits bytes (groups < ngroups), lane 0 the scale
template <int bits, int L, typename block_t>
static __device__ __forceinline__ void tq_cuda_store_block(uint32_t w, const int lane, const int ngroups, const float scale,
                                                           block_t * y) {
#pragma unroll
    for (int o = 1; o < L; o *= 2) {
        w |= __shfl_xor_sync(0xFFFFFFFF, w, o, WARP_SIZE);
    }
    if (lane % L == 0 && lane/L < ngroups) {
        uint8_t * p = y->qs + bits*(lane/L);
#pragma unroll
        for (int j = 0; j < bits; ++j) {
            p[j] = (uint8_t) (w >> (8*j));
        }
    }
    if (lane == 0) {
        const float d = scale > TQ_D_MAX && !isinf(scale) ? TQ_D_MAX : scale;
        y->d = __ushort_as_half(tq_cuda_fp16_bits(d));
    }
}

// The scale search of one block, lane l of a warp holding values 2l and 2l+1, in one of two shapes:
// nwarps == 1: lane s of the warp tries candidate s over the block's 64 values in the CPU's order
// (prompts: many blocks, throughput); nwarps == TQ_SCALE_STEPS: the warps of a thread block share
// one block, warp s trying candidate s with warp sums (decode: a few blocks per layer, latency
// counts). Both pick with the CPU's rule: the same bytes.
template <int bits, int nwarps>
static __device__ void tq_cuda_quantize_block(const float x0, const float x1, typename tq_cuda_block<bits>::type * y) {
    static_assert(nwarps == 1 || nwarps == TQ_SCALE_STEPS, "one warp per block, or one per candidate");
    const int lane = threadIdx.x;
    const int warp = nwarps == 1 ? 0 : threadIdx.y;

    const double sumsq = tq_cuda_warp_sum((double) x0*x0 + (double) x1*x1);
    const float  norm  = (float) sqrt(sumsq); // the same bits in every warp: the branch below is uniform

    int   k0;
    int   k1;
    float scale = norm;
    if (!(norm > 0.0f && isfinite(norm))) {
        // zero, inf and NaN norms: the paper's encoding (inf/NaN are kept for row validation)
        k0 = tq_cuda_index<bits>(x0, norm);
        k1 = tq_cuda_index<bits>(x1, norm);
        // the CPU's float64 sum carries the block's first NaN (sign and payload) into d
        const uint32_t nan_lanes = __ballot_sync(0xFFFFFFFF, isnan(x0) || isnan(x1));
        if (nan_lanes) {
            const float mine = isnan(x0) ? x0 : x1;
            scale = __shfl_sync(0xFFFFFFFF, mine, __ffs(nan_lanes) - 1, WARP_SIZE);
        }
    } else {
        // candidate s: gain <x,c>^2/<c,c> of its cells c and least-squares scale <x,c>/<c,c>;
        // products of two floats are exact in float64, so only the order of sums could differ from
        // the CPU (the tie factor is far above that rounding)
        int    best;
        double xc_best;
        double cc_best;
        if constexpr (nwarps == 1) {
            // the CPU's loop order: value pairs arrive by shuffles
            double xc;
            double cc;
            tq_cuda_candidate_sums<bits, QK_TQ>(norm, lane, tq_cuda_boundaries<bits>(), tq_cuda_centroids<bits>(),
                [&](const int i) { return __shfl_sync(0xFFFFFFFF, i % 2 ? x1 : x0, i/2, WARP_SIZE); }, xc, cc);
            best    = tq_cuda_pick_candidate(xc*xc/cc, lane);
            xc_best = __shfl_sync(0xFFFFFFFF, xc, best < 0 ? 0 : best, WARP_SIZE);
            cc_best = __shfl_sync(0xFFFFFFFF, cc, best < 0 ? 0 : best, WARP_SIZE);
        } else {
            // the codebook across the lanes: a lookup is one shuffle
            const float cb_lane = tq_cuda_centroids<bits>()[lane % (1 << bits)];
            const float sc = tq_cuda_candidate_scale(norm, warp);
            const double c0 = __shfl_sync(0xFFFFFFFF, cb_lane, tq_cuda_index<bits>(x0, sc), WARP_SIZE);
            const double c1 = __shfl_sync(0xFFFFFFFF, cb_lane, tq_cuda_index<bits>(x1, sc), WARP_SIZE);
            const double xc = tq_cuda_warp_sum((double) x0*c0 + (double) x1*c1);
            const double cc = tq_cuda_warp_sum(c0*c0 + c1*c1);
            __shared__ double cand_gain[TQ_SCALE_STEPS];
            __shared__ double cand_xc[TQ_SCALE_STEPS];
            __shared__ double cand_cc[TQ_SCALE_STEPS];
            if (lane == 0) {
                cand_gain[warp] = xc*xc/cc;
                cand_xc[warp]   = xc;
                cand_cc[warp]   = cc;
            }
            __syncthreads();
            if (warp != 0) {
                return;
            }
            best    = tq_cuda_pick_candidate(lane < TQ_SCALE_STEPS ? cand_gain[lane] : -1.0, lane);
            xc_best = cand_xc[best < 0 ? 0 : best];
            cc_best = cand_cc[best < 0 ? 0 : best];
        }
        if (best >= 0) {
            scale = (float) (xc_best/cc_best);
        } else {
            best = 0;
        }
        const float sc = tq_cuda_candidate_scale(norm, best);
        k0 = tq_cuda_index<bits>(x0, sc);
        k1 = tq_cuda_index<bits>(x1, sc);
    }
    if (warp != 0) {
        return;
    }

    // group g (values 8g..8g+7) is lanes 4g..4g+3
    tq_cuda_store_block<bits, 4>((uint32_t) (k0 | (k1 << bits)) << (2*bits*(lane % 4)), lane, QK_TQ/8, scale, y);
}

// The forms in blocks of 32 and 16: a warp per block, lane i < qk holding value i (the others 0).
// Every lane sums the squares in the CPU's order, lane s tries candidate s over the block in the
// CPU's order (values by shuffles), and the CPU's rule picks: the bytes of tq-quants.c.
template <ggml_type type>
static __device__ void tq_cuda_quantize_form(const float x, typename tq_cuda_form<type>::block * y) {
    using F = tq_cuda_form<type>;
    constexpr int qk   = F::qk;
    constexpr int bits = F::bits;
    static_assert(qk <= WARP_SIZE && qk % 8 == 0, "a warp per block");
    const int     lane = threadIdx.x;
    const float * bnd  = tq_cuda_form_boundaries<type>();

    double sumsq = 0.0;
#pragma unroll
    for (int i = 0; i < qk; ++i) {
        const float v = __shfl_sync(0xFFFFFFFF, x, i, WARP_SIZE);
        sumsq += (double) v*v;
    }
    const float norm = (float) sqrt(sumsq);

    float scale = norm;
    float s_idx = norm; // the scale the indices are taken at
    if (!(norm > 0.0f && isfinite(norm))) {
        // zero, inf and NaN norms: the paper's encoding; the CPU's sum carries the first NaN into d
        const uint32_t nan_lanes = __ballot_sync(0xFFFFFFFF, lane < qk && isnan(x));
        if (nan_lanes) {
            scale = __shfl_sync(0xFFFFFFFF, x, __ffs(nan_lanes) - 1, WARP_SIZE);
        }
    } else {
        double xc;
        double cc;
        tq_cuda_candidate_sums<bits, qk>(norm, lane, bnd, F::centroids(),
            [&](const int i) { return __shfl_sync(0xFFFFFFFF, x, i, WARP_SIZE); }, xc, cc);
        int best = tq_cuda_pick_candidate(xc*xc/cc, lane);
        const double xc_best = __shfl_sync(0xFFFFFFFF, xc, best < 0 ? 0 : best, WARP_SIZE);
        const double cc_best = __shfl_sync(0xFFFFFFFF, cc, best < 0 ? 0 : best, WARP_SIZE);
        if (best >= 0) {
            scale = (float) (xc_best/cc_best);
        } else {
            best = 0;
        }
        s_idx = tq_cuda_candidate_scale(norm, best);
    }

    // group g (values 8g..8g+7) is lanes 8g..8g+7
    tq_cuda_store_block<bits, 8>((uint32_t) tq_cuda_index<bits>(x, s_idx, bnd) << (bits*(lane % 8)), lane, qk/8, scale, y);
}

template <typename src_t>
static __device__ __forceinline__ float tq_cuda_to_float(const src_t v) {
    return ggml_cuda_cast<float>(v);
}

// SET_ROWS: dst row src1[i01, i02 % ne11, i03 % ne12] of plane (i02, i03) gets src0 row (i01, i02, i03).
// Block ib of the source rows: its first value and its destination block.
template <typename src_t, typename idx_t>
static __device__ __forceinline__ const src_t * tq_set_rows_block(
        const src_t * GGML_CUDA_RESTRICT src0, const idx_t * GGML_CUDA_RESTRICT src1, char * GGML_CUDA_RESTRICT dst, const int64_t ib,
        const int qk, const size_t block_size, const int64_t nb_row, const int64_t ne01, const int64_t ne02,
        const int64_t ne11, const int64_t ne12, const int64_t s01, const int64_t s02, const int64_t s03,
        const int64_t s10, const int64_t s11, const int64_t s12, const size_t nb1, const size_t nb2, const size_t nb3,
        char ** y) {
    const int64_t ib0 = ib % nb_row;
    int64_t       r   = ib / nb_row;
    const int64_t i01 = r % ne01; r /= ne01;
    const int64_t i02 = r % ne02;
    const int64_t i03 = r / ne02;

    ggml_cuda_pdl_sync();
    const int64_t dst_row = src1[i01*s10 + (i02 % ne11)*s11 + (i03 % ne12)*s12];
    *y = dst + dst_row*nb1 + i02*nb2 + i03*nb3 + ib0*block_size;
    return src0 + i01*s01 + i02*s02 + i03*s03 + ib0*qk;
}

#define TQ_SET_ROWS_PARAMS                                                                   \
        const src_t * src0, const idx_t * src1, char * dst,                                  \
        const int64_t nblocks, const int64_t nb_row, const int64_t ne01, const int64_t ne02, \
        const int64_t ne11, const int64_t ne12,                                              \
        const int64_t s01, const int64_t s02, const int64_t s03,                             \
        const int64_t s10, const int64_t s11, const int64_t s12,                             \
        const size_t nb1, const size_t nb2, const size_t nb3
#define TQ_SET_ROWS_ARGS(QK, BLOCK) \
        src0, src1, dst, ib, QK, sizeof(BLOCK), nb_row, ne01, ne02, ne11, ne12, s01, s02, s03, s10, s11, s12, nb1, nb2, nb3

template <int bits, int nwarps, typename src_t, typename idx_t>
static __global__ void k_tq_set_rows(TQ_SET_ROWS_PARAMS) {
    typedef typename tq_cuda_block<bits>::type block;
    ggml_cuda_pdl_lc();
    const int64_t ib = nwarps == 1 ? (int64_t) blockIdx.x*TQ_CUDA_WARPS_PER_BLOCK + threadIdx.y : blockIdx.x;
    if (ib >= nblocks) {
        return; // the whole warp
    }
    char * y;
    const src_t * x = tq_set_rows_block(TQ_SET_ROWS_ARGS(QK_TQ, block), &y) + 2*threadIdx.x;
    tq_cuda_quantize_block<bits, nwarps>(tq_cuda_to_float(x[0]), tq_cuda_to_float(x[1]), (block *) y);
}

template <ggml_type type, typename src_t, typename idx_t>
static __global__ void k_tq_form_set_rows(TQ_SET_ROWS_PARAMS) {
    using F = tq_cuda_form<type>;
    ggml_cuda_pdl_lc();
    const int64_t ib = (int64_t) blockIdx.x*TQ_CUDA_WARPS_PER_BLOCK + threadIdx.y;
    if (ib >= nblocks) {
        return; // the whole warp
    }
    char * y;
    const src_t * x = tq_set_rows_block(TQ_SET_ROWS_ARGS(F::qk, typename F::block), &y);
    tq_cuda_quantize_form<type>(threadIdx.x < F::qk ? tq_cuda_to_float(x[threadIdx.x]) : 0.0f, (typename F::block *) y);
}

template <ggml_type type, typename src_t, typename idx_t>
static void tq_set_rows_launch(const ggml_tensor * src0, const ggml_tensor * src1, ggml_tensor * dst, cudaStream_t stream) {
    GGML_TENSOR_BINARY_OP_LOCALS
    constexpr int qk = tq_cuda_form<type>::qk;
    GGML_ASSERT(ne00 % qk == 0);
    const int64_t nb_row  = ne00/qk;
    const int64_t nblocks = nb_row*ne01*ne02*ne03;
    if (nblocks == 0) {
        return;
    }
    const auto launch = [&](auto kernel, const dim3 grid_dims, const dim3 block_dims) {
        ggml_cuda_kernel_launch(kernel, ggml_cuda_kernel_launch_params(grid_dims, block_dims, 0, stream),
            (const src_t *) src0->data, (const idx_t *) src1->data, (char *) dst->data,
            nblocks, nb_row, ne01, ne02, ne11, ne12,
            nb01/sizeof(src_t), nb02/sizeof(src_t), nb03/sizeof(src_t),
            nb10/sizeof(idx_t), nb11/sizeof(idx_t), nb12/sizeof(idx_t),
            nb1, nb2, nb3);
    };
    GGML_ASSERT(nblocks/TQ_CUDA_WARPS_PER_BLOCK < INT_MAX);
    const dim3 grid_warps((nblocks + TQ_CUDA_WARPS_PER_BLOCK - 1)/TQ_CUDA_WARPS_PER_BLOCK, 1, 1);
    const dim3 block_warps(WARP_SIZE, TQ_CUDA_WARPS_PER_BLOCK, 1);
    if constexpr (qk != QK_TQ) {
        launch(k_tq_form_set_rows<type, src_t, idx_t>, grid_warps, block_warps);
    } else if (nblocks <= TQ_CUDA_ENC_PARALLEL_MAX) {
        launch(k_tq_set_rows<tq_cuda_form<type>::bits, TQ_SCALE_STEPS, src_t, idx_t>, dim3(nblocks, 1, 1),
               dim3(WARP_SIZE, TQ_SCALE_STEPS, 1));
    } else {
        launch(k_tq_set_rows<tq_cuda_form<type>::bits, 1, src_t, idx_t>, grid_warps, block_warps);
    }
    CUDA_CHECK(cudaGetLastError());
}

template <ggml_type type>
static void tq_set_rows_type(const ggml_tensor * src0, const ggml_tensor * src1, ggml_tensor * dst, cudaStream_t stream) {
    const bool i64 = src1->type == GGML_TYPE_I64;
    if (src0->type == GGML_TYPE_F32) {
        i64 ? tq_set_rows_launch<type, float, int64_t>(src0, src1, dst, stream)
            : tq_set_rows_launch<type, float, int32_t>(src0, src1, dst, stream);
    } else {
        i64 ? tq_set_rows_launch<type, half, int64_t>(src0, src1, dst, stream)
            : tq_set_rows_launch<type, half, int32_t>(src0, src1, dst, stream);
    }
}

#define TQ_CUDA_ALL_FORMS(X) X(TURBO2_0) X(TURBO3_0) X(TURBO4_0) TQ_CUDA_SMALL_FORMS(X)

void ggml_cuda_tq_set_rows(ggml_backend_cuda_context & ctx, const ggml_tensor * src0, const ggml_tensor * src1, ggml_tensor * dst) {
    GGML_ASSERT(src0->type == GGML_TYPE_F32 || src0->type == GGML_TYPE_F16);
    GGML_ASSERT(src1->type == GGML_TYPE_I64 || src1->type == GGML_TYPE_I32);
    cudaStream_t stream = ctx.stream();
    switch (dst->type) {
#define TQ_SET_ROWS_CASE(T) case GGML_TYPE_##T: tq_set_rows_type<GGML_TYPE_##T>(src0, src1, dst, stream); break;
        TQ_CUDA_ALL_FORMS(TQ_SET_ROWS_CASE)
#undef TQ_SET_ROWS_CASE
        default: GGML_ABORT("%s: not a TurboQuant type: %s", __func__, ggml_type_name(dst->type));
    }
}

// CPY in the logical element order of ggml_cpy: element e of src0 goes to element e of src1.
struct tq_cpy_shape {
    int64_t ne0, ne1, ne2;      // ne[3] follows from the element count
    int64_t nb0, nb1, nb2, nb3; // bytes; for a TQ tensor nb0 is the block size
};

static __device__ __forceinline__ int64_t tq_cuda_offset(const tq_cpy_shape & s, const int64_t e, const int qk) {
    const int64_t i3 = e/(s.ne0*s.ne1*s.ne2);
    const int64_t i2 = (e - i3*s.ne0*s.ne1*s.ne2)/(s.ne0*s.ne1);
    const int64_t i1 = (e - i3*s.ne0*s.ne1*s.ne2 - i2*s.ne0*s.ne1)/s.ne0;
    const int64_t i0 = e - i3*s.ne0*s.ne1*s.ne2 - i2*s.ne0*s.ne1 - i1*s.ne0;
    return i0/qk*s.nb0 + i1*s.nb1 + i2*s.nb2 + i3*s.nb3; // qk 1: not blocked
}

// float -> TQ: one warp or thread block (nwarps) per destination block (its 64 elements may be
// strided in the source)
template <int bits, int nwarps, typename src_t>
static __global__ void k_tq_cpy_to(const char * cx_ptr, char * cdst_ptr, const int64_t nblocks,
                                   const tq_cpy_shape src, const tq_cpy_shape dst) {
    const char * GGML_CUDA_RESTRICT cx   = cx_ptr;
    char       * GGML_CUDA_RESTRICT cdst = cdst_ptr;
    ggml_cuda_pdl_lc();
    const int64_t ib = nwarps == 1 ? (int64_t) blockIdx.x*TQ_CUDA_WARPS_PER_BLOCK + threadIdx.y : blockIdx.x;
    if (ib >= nblocks) {
        return;
    }
    const int64_t e = ib*QK_TQ + 2*threadIdx.x;
    ggml_cuda_pdl_sync();
    const float x0 = tq_cuda_to_float(*(const src_t *) (cx + tq_cuda_offset(src, e,     1)));
    const float x1 = tq_cuda_to_float(*(const src_t *) (cx + tq_cuda_offset(src, e + 1, 1)));
    tq_cuda_quantize_block<bits, nwarps>(x0, x1,
        (typename tq_cuda_block<bits>::type *) (cdst + tq_cuda_offset(dst, ib*QK_TQ, QK_TQ)));
}

// ... into a form in blocks of 32 or 16: a warp per block
template <ggml_type type, typename src_t>
static __global__ void k_tq_form_cpy_to(const char * cx_ptr, char * cdst_ptr, const int64_t nblocks,
                                        const tq_cpy_shape src, const tq_cpy_shape dst) {
    const char * GGML_CUDA_RESTRICT cx   = cx_ptr;
    char       * GGML_CUDA_RESTRICT cdst = cdst_ptr;
    using F = tq_cuda_form<type>;
    ggml_cuda_pdl_lc();
    const int64_t ib = (int64_t) blockIdx.x*TQ_CUDA_WARPS_PER_BLOCK + threadIdx.y;
    if (ib >= nblocks) {
        return;
    }
    ggml_cuda_pdl_sync();
    const float x = threadIdx.x < F::qk ? tq_cuda_to_float(*(const src_t *) (cx + tq_cuda_offset(src, ib*F::qk + threadIdx.x, 1))) : 0.0f;
    tq_cuda_quantize_form<type>(x, (typename F::block *) (cdst + tq_cuda_offset(dst, ib*F::qk, F::qk)));
}

// TQ -> float: one thread per pair of values
template <ggml_type type, typename dst_t>
static __global__ void k_tq_cpy_from(const char * cx_ptr, char * cdst_ptr, const int64_t ne,
                                     const tq_cpy_shape src, const tq_cpy_shape dst) {
    const char * GGML_CUDA_RESTRICT cx   = cx_ptr;
    char       * GGML_CUDA_RESTRICT cdst = cdst_ptr;
    constexpr int qk = tq_cuda_form<type>::qk;
    ggml_cuda_pdl_lc();
    const int64_t e = 2*((int64_t) blockIdx.x*blockDim.x + threadIdx.x);
    if (e >= ne) {
        return;
    }
    ggml_cuda_pdl_sync();
    float2 v;
    dequantize_tq<type>(cx + tq_cuda_offset(src, e, qk), 0, e % qk, v);
    *(dst_t *) (cdst + tq_cuda_offset(dst, e,     1)) = ggml_cuda_cast<dst_t>(v.x);
    *(dst_t *) (cdst + tq_cuda_offset(dst, e + 1, 1)) = ggml_cuda_cast<dst_t>(v.y);
}

bool ggml_cuda_tq_supports_cpy(const ggml_type src, const ggml_type dst) {
    const bool from_float = src == GGML_TYPE_F32 || src == GGML_TYPE_F16;
    const bool to_float   = dst == GGML_TYPE_F32 || dst == GGML_TYPE_F16;
    return (from_float && tq_cuda_is_tq(dst)) || (tq_cuda_is_tq(src) && to_float);
}

template <ggml_type type>
static void tq_cpy_type(const ggml_tensor * src0, ggml_tensor * src1, const tq_cpy_shape & s, const tq_cpy_shape & d,
                        cudaStream_t stream) {
    using F = tq_cuda_form<type>;
    const int64_t ne = ggml_nelements(src0);
    if (tq_cuda_is_tq(src1->type)) {
        const int64_t nblocks = ne/F::qk;
        const auto launch = [&](auto kernel_f32, auto kernel_f16, const dim3 grid_dims, const dim3 block_dims) {
            const ggml_cuda_kernel_launch_params lp(grid_dims, block_dims, 0, stream);
            if (src0->type == GGML_TYPE_F32) {
                ggml_cuda_kernel_launch(kernel_f32, lp, (const char *) src0->data, (char *) src1->data, nblocks, s, d);
            } else {
                ggml_cuda_kernel_launch(kernel_f16, lp, (const char *) src0->data, (char *) src1->data, nblocks, s, d);
            }
        };
        GGML_ASSERT(nblocks/TQ_CUDA_WARPS_PER_BLOCK < INT_MAX);
        const dim3 grid_warps((nblocks + TQ_CUDA_WARPS_PER_BLOCK - 1)/TQ_CUDA_WARPS_PER_BLOCK, 1, 1);
        const dim3 block_warps(WARP_SIZE, TQ_CUDA_WARPS_PER_BLOCK, 1);
        if constexpr (F::qk != QK_TQ) {
            launch(k_tq_form_cpy_to<type, float>, k_tq_form_cpy_to<type, half>, grid_warps, block_warps);
        } else if (nblocks <= TQ_CUDA_ENC_PARALLEL_MAX) {
            launch(k_tq_cpy_to<F::bits, TQ_SCALE_STEPS, float>, k_tq_cpy_to<F::bits, TQ_SCALE_STEPS, half>,
                   dim3(nblocks, 1, 1), dim3(WARP_SIZE, TQ_SCALE_STEPS, 1));
        } else {
            launch(k_tq_cpy_to<F::bits, 1, float>, k_tq_cpy_to<F::bits, 1, half>, grid_warps, block_warps);
        }
    } else {
        const int64_t npairs = ne/2;
        const int     nthr   = 256;
        const ggml_cuda_kernel_launch_params lp(dim3((npairs + nthr - 1)/nthr, 1, 1), dim3(nthr, 1, 1), 0, stream);
        if (src1->type == GGML_TYPE_F32) {
            ggml_cuda_kernel_launch(k_tq_cpy_from<type, float>, lp, (const char *) src0->data, (char *) src1->data, ne, s, d);
        } else {
            ggml_cuda_kernel_launch(k_tq_cpy_from<type, half>, lp, (const char *) src0->data, (char *) src1->data, ne, s, d);
        }
    }
    CUDA_CHECK(cudaGetLastError());
}

void ggml_cuda_tq_cpy(ggml_backend_cuda_context & ctx, const ggml_tensor * src0, ggml_tensor * src1) {
    GGML_ASSERT(ggml_cuda_tq_supports_cpy(src0->type, src1->type));
    GGML_ASSERT(ggml_nelements(src0) == ggml_nelements(src1));
    const ggml_tensor * tq = tq_cuda_is_tq(src0->type) ? src0 : src1;
    GGML_ASSERT(tq->ne[0] % ggml_blck_size(tq->type) == 0);
    if (ggml_nelements(src0) == 0) {
        return;
    }
    const tq_cpy_shape s = { src0->ne[0], src0->ne[1], src0->ne[2], (int64_t) src0->nb[0], (int64_t) src0->nb[1], (int64_t) src0->nb[2], (int64_t) src0->nb[3] };
    const tq_cpy_shape d = { src1->ne[0], src1->ne[1], src1->ne[2], (int64_t) src1->nb[0], (int64_t) src1->nb[1], (int64_t) src1->nb[2], (int64_t) src1->nb[3] };
    cudaStream_t stream = ctx.stream();
    switch (tq->type) {
#define TQ_CPY_CASE(T) case GGML_TYPE_##T: tq_cpy_type<GGML_TYPE_##T>(src0, src1, s, d, stream); break;
        TQ_CUDA_ALL_FORMS(TQ_CPY_CASE)
#undef TQ_CPY_CASE
        default: GGML_ABORT("fatal error");
    }
}

// GGML_OP_TURBO_K_ROT (ggml_turbo_k_rot, tq-offset.c) on one run of N values of a row, L lanes per
// run (a warp, or half of one for N = 16), lane holding values j*L + lane % L: the scale and the
// transform (upstream's fwht_cuda butterflies: lane bits by shuffles, then register bits); the
// offset is left to the caller
static constexpr __device__ int tq_k_rot_lanes(const int N) {
    return N < WARP_SIZE ? N : WARP_SIZE;
}

template <int N, bool rotate>
static __device__ __forceinline__ void tq_cuda_k_rot_run(const float * xr, const float * a, const int mode, const float scale,
                                                         const int lane, float (&reg)[N/tq_k_rot_lanes(N)]) {
    constexpr int L  = tq_k_rot_lanes(N);
    constexpr int el = N/L;
#pragma unroll
    for (int j = 0; j < el; ++j) {
        const int i = j*L + lane % L;
        const float v = mode & GGML_TURBO_K_ROT_SCALE ? xr[i]*a[i] : mode & GGML_TURBO_K_ROT_INV_SCALE ? xr[i]/a[i] : xr[i];
        reg[j] = v*scale;
    }
    if constexpr (rotate) {
#pragma unroll
        for (int h = 1; h < L; h *= 2) {
#pragma unroll
            for (int j = 0; j < el; ++j) {
                const float u = reg[j];
                const float v = __shfl_xor_sync(0xFFFFFFFF, u, h, WARP_SIZE);
                reg[j] = (lane & h) == 0 ? u + v : v - u;
            }
        }
#pragma unroll
        for (int s = 1; s < el; s *= 2) {
#pragma unroll
            for (int j = 0; j < el; j += 2*s) {
#pragma unroll
                for (int k = 0; k < s; ++k) {
                    const float u = reg[j + k], v = reg[j + k + s];
                    reg[j + k]     = u + v;
                    reg[j + k + s] = u - v;
                }
            }
        }
    }
}

// one warp per run of N values of a row (two runs for N = 16)
template <int N, bool rotate>
static __global__ void k_tq_k_rot(const char * x_ptr, const float * k_off_ptr, float * dst_ptr,
        const int64_t nchunks, const int64_t n, const int64_t n_head_kv, const int64_t group, const int64_t ne1, const int64_t ne2,
        const int64_t nb1, const int64_t nb2, const int64_t nb3, const int mode, const float scale) {
    const char  * GGML_CUDA_RESTRICT x     = x_ptr;
    const float * GGML_CUDA_RESTRICT k_off = k_off_ptr;
    float       * GGML_CUDA_RESTRICT dst   = dst_ptr;
    ggml_cuda_pdl_lc();
    constexpr int L  = tq_k_rot_lanes(N);
    constexpr int el = N/L;
    const int     lane = threadIdx.x;
    const int64_t id0  = ((int64_t) blockIdx.x*blockDim.y + threadIdx.y)*(WARP_SIZE/L);
    if (id0 >= nchunks) {
        return; // the whole warp
    }
    const bool    store = id0 + lane/L < nchunks; // the other half-warp's run may lie past the end
    const int64_t id    = store ? id0 + lane/L : id0;
    const int64_t c    = (id % (n/N))*N;
    const int64_t r    = id / (n/N);
    const int64_t i1   = r % ne1;
    const float * xr   = (const float *) (x + i1*nb1 + ((r/ne1) % ne2)*nb2 + (r/(ne1*ne2))*nb3) + c;
    const float * off  = k_off ? k_off + (i1/group)*n + c : nullptr; // nullptr: mode 0

    ggml_cuda_pdl_sync();
    float reg[el];
    tq_cuda_k_rot_run<N, rotate>(xr, off ? off + n*n_head_kv : nullptr, mode, scale, lane, reg);
    float * y = dst + r*n + c;
#pragma unroll
    for (int j = 0; j < el && store; ++j) {
        const int i = j*L + lane % L;
        y[i] = mode & GGML_TURBO_K_ROT_OFFSET ? reg[j] - off[i] : reg[j];
    }
}

bool ggml_cuda_tq_supports_k_rot(const ggml_tensor * op) {
    const int nrot = ggml_get_op_params_i32(op, 0);
    return op->src[0]->type == GGML_TYPE_F32 && op->src[0]->nb[0] == sizeof(float) && ggml_is_contiguous(op) &&
        op->src[0]->ne[0] % 16 == 0 && (nrot == 0 || (nrot >= 16 && nrot <= 512));
}

void ggml_cuda_tq_k_rot(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * x     = dst->src[0];
    const ggml_tensor * k_off = dst->src[1];
    GGML_ASSERT(ggml_cuda_tq_supports_k_rot(dst));
    const int nrot = ggml_get_op_params_i32(dst, 0);
    const int mode = ggml_get_op_params_i32(dst, 1);
    const int64_t n = x->ne[0];
    const int N = nrot > 0 ? nrot : n % WARP_SIZE == 0 ? WARP_SIZE : 16;
    const int64_t nchunks = ggml_nrows(x)*(n/N);
    if (nchunks == 0) {
        return;
    }
    constexpr int rows_per_block = 4;
    const int64_t runs_per_block = rows_per_block*(N < WARP_SIZE ? WARP_SIZE/N : 1);
    const dim3 grid_dims((nchunks + runs_per_block - 1)/runs_per_block, 1, 1);
    const dim3 block_dims(WARP_SIZE, rows_per_block, 1);
    const float scale = nrot > 0 ? 1.0f/sqrtf((float) nrot) : 1.0f;
    const auto launch = [&](auto kernel) {
        const int64_t n_head_kv = k_off ? k_off->ne[1] : x->ne[1];
        ggml_cuda_kernel_launch(kernel, ggml_cuda_kernel_launch_params(grid_dims, block_dims, 0, ctx.stream()),
            (const char *) x->data, k_off ? (const float *) k_off->data : nullptr,
            (float *) dst->data, nchunks, n, n_head_kv, x->ne[1]/n_head_kv, x->ne[1], x->ne[2], x->nb[1], x->nb[2], x->nb[3], mode, scale);
    };
    switch (nrot) {
        case   0: N == 16 ? launch(k_tq_k_rot<16, false>) : launch(k_tq_k_rot<32, false>); break;
        case  16: launch(k_tq_k_rot< 16, true>);  break;
        case  32: launch(k_tq_k_rot< 32, true>);  break;
        case  64: launch(k_tq_k_rot< 64, true>);  break;
        case 128: launch(k_tq_k_rot<128, true>);  break;
        case 256: launch(k_tq_k_rot<256, true>);  break;
        case 512: launch(k_tq_k_rot<512, true>);  break;
        default: GGML_ABORT("%s: rotation size %d", __func__, nrot);
    }
    CUDA_CHECK(cudaGetLastError());
}

// TURBO_K_ROT -> VIEW -> SET_ROWS into a TurboQuant cache (build_attn's keys once the offset and
// scale are frozen, its values always) as one kernel: each encoder warp transforms the run of N
// values that holds its 64-value block (the run's other blocks repeat the transform: a few
// shuffles) and takes its pair from it, so the rotated rows never go through global memory. The
// same float operations in the same order as the two kernels: the same bytes.
template <int bits, int nwarps, int N, bool rotate>
static __global__ void k_tq_k_rot_set_rows(
        const char * x_ptr, const float * k_off_ptr, const int64_t * idx_ptr, char * dst_ptr,
        const int64_t nblocks, const int64_t n, const int64_t n_head, const int64_t n_head_kv,
        const int64_t nbx1, const int64_t nbx2, const int64_t s10, const size_t nb1, const int mode, const float scale) {
    const char    * GGML_CUDA_RESTRICT x     = x_ptr;
    const float   * GGML_CUDA_RESTRICT k_off = k_off_ptr;
    const int64_t * GGML_CUDA_RESTRICT idx   = idx_ptr;
    char          * GGML_CUDA_RESTRICT dst   = dst_ptr;
    static_assert(N % QK_TQ == 0, "a 64-value block within one run");
    ggml_cuda_pdl_lc();
    constexpr int el = N/WARP_SIZE;
    const int64_t ib = nwarps == 1 ? (int64_t) blockIdx.x*TQ_CUDA_WARPS_PER_BLOCK + threadIdx.y : blockIdx.x;
    if (ib >= nblocks) {
        return; // the whole warp
    }
    const int     lane   = threadIdx.x;
    const int64_t nb_row = n*n_head/QK_TQ;
    const int64_t tok    = ib / nb_row;
    const int64_t ib0    = ib % nb_row;
    const int64_t h      = ib0*QK_TQ / n;        // head
    const int64_t c      = ib0*QK_TQ % n / N * N; // run start in the head
    const int     q      = ib0*QK_TQ % n % N / QK_TQ;
    const float * xr     = (const float *) (x + h*nbx1 + tok*nbx2) + c;
    const float * off    = k_off ? k_off + (h/(n_head/n_head_kv))*n + c : nullptr; // nullptr: mode 0

    ggml_cuda_pdl_sync();
    const int64_t dst_row = idx[tok*s10];
    float reg[el];
    tq_cuda_k_rot_run<N, rotate>(xr, off ? off + n*n_head_kv : nullptr, mode, scale, lane, reg);

    // values i = 64q + 2*lane (+ 1) of the run: register i/32 = 2q + lane/16 of lane i % 32. Bring
    // registers 2q, 2q + 1 to 0, 1 by halving moves (a select on q's bits): picking reg[2q] directly
    // makes the compiler index the array in local memory
#pragma unroll
    for (int w = el/2; w >= 2; w /= 2) {
        const bool up = q & (w/2);
#pragma unroll
        for (int j = 0; j < w; ++j) {
            reg[j] = up ? reg[j + w] : reg[j];
        }
    }
    const float lo = reg[0];
    const float hi = reg[1];
    const float lo0 = __shfl_sync(0xFFFFFFFF, lo, (2*lane)     % WARP_SIZE, WARP_SIZE);
    const float hi0 = __shfl_sync(0xFFFFFFFF, hi, (2*lane)     % WARP_SIZE, WARP_SIZE);
    const float lo1 = __shfl_sync(0xFFFFFFFF, lo, (2*lane + 1) % WARP_SIZE, WARP_SIZE);
    const float hi1 = __shfl_sync(0xFFFFFFFF, hi, (2*lane + 1) % WARP_SIZE, WARP_SIZE);
    const int   i   = QK_TQ*q + 2*lane;
    float x0 = lane < WARP_SIZE/2 ? lo0 : hi0;
    float x1 = lane < WARP_SIZE/2 ? lo1 : hi1;
    if (mode & GGML_TURBO_K_ROT_OFFSET) {
        x0 = x0 - off[i];
        x1 = x1 - off[i + 1];
    }
    tq_cuda_quantize_block<bits, nwarps>(x0, x1, (typename tq_cuda_block<bits>::type *) (dst + dst_row*nb1) + ib0);
}

bool ggml_cuda_tq_can_fuse_k_rot_set_rows(const ggml_tensor * k_rot, const ggml_tensor * view, const ggml_tensor * set_rows) {
    static const bool off = getenv("GGML_TQ_CUDA_NO_FUSE") != nullptr && atoi(getenv("GGML_TQ_CUDA_NO_FUSE")) != 0;
    if (off || k_rot->op != GGML_OP_TURBO_K_ROT || view->op != GGML_OP_VIEW || set_rows->op != GGML_OP_SET_ROWS ||
        view->src[0] != k_rot || set_rows->src[0] != view || !tq_cuda_is_turbo(set_rows->type) ||
        !ggml_cuda_tq_supports_k_rot(k_rot)) {
        return false;
    }
    const int nrot = ggml_get_op_params_i32(k_rot, 0);
    const ggml_tensor * idx = set_rows->src[1];
    return (nrot == 0 || nrot >= QK_TQ) && k_rot->ne[0] % QK_TQ == 0 && k_rot->ne[3] == 1 &&
        view->view_offs == 0 && ggml_is_contiguous(view) && view->ne[0] == k_rot->ne[0]*k_rot->ne[1] &&
        view->ne[1] == k_rot->ne[2] && view->ne[2] == 1 && view->ne[3] == 1 &&
        set_rows->ne[0] == view->ne[0] && set_rows->ne[2] == 1 && set_rows->ne[3] == 1 &&
        idx->type == GGML_TYPE_I64 && idx->ne[0] == view->ne[1] && idx->ne[1] == 1 && idx->ne[2] == 1;
}

template <int bits>
static void tq_k_rot_set_rows_bits(const ggml_tensor * k_rot, ggml_tensor * set_rows, cudaStream_t stream) {
    const ggml_tensor * x     = k_rot->src[0];
    const ggml_tensor * k_off = k_rot->src[1];
    const ggml_tensor * idx   = set_rows->src[1];
    const int nrot = ggml_get_op_params_i32(k_rot, 0);
    const int mode = ggml_get_op_params_i32(k_rot, 1);
    const int64_t n = x->ne[0], n_head = x->ne[1];
    const int64_t nblocks = n*n_head/QK_TQ*x->ne[2];
    if (nblocks == 0) {
        return;
    }
    const float scale = nrot > 0 ? 1.0f/sqrtf((float) nrot) : 1.0f;
    const auto launch_n = [&](auto kernel_parallel, auto kernel_warp) {
        const auto args = [&](auto kernel, const dim3 grid_dims, const dim3 block_dims) {
            ggml_cuda_kernel_launch(kernel, ggml_cuda_kernel_launch_params(grid_dims, block_dims, 0, stream),
                (const char *) x->data, k_off ? (const float *) k_off->data : nullptr,
                (const int64_t *) idx->data, (char *) set_rows->data, nblocks, n, n_head, k_off ? k_off->ne[1] : n_head,
                x->nb[1], x->nb[2], idx->nb[0]/sizeof(int64_t), set_rows->nb[1], mode, scale);
        };
        if (nblocks <= TQ_CUDA_ENC_PARALLEL_MAX) {
            args(kernel_parallel, dim3(nblocks, 1, 1), dim3(WARP_SIZE, TQ_SCALE_STEPS, 1));
        } else {
            GGML_ASSERT(nblocks/TQ_CUDA_WARPS_PER_BLOCK < INT_MAX);
            args(kernel_warp, dim3((nblocks + TQ_CUDA_WARPS_PER_BLOCK - 1)/TQ_CUDA_WARPS_PER_BLOCK, 1, 1),
                 dim3(WARP_SIZE, TQ_CUDA_WARPS_PER_BLOCK, 1));
        }
    };
#define TQ_K_ROT_SET_ROWS(N, rot) launch_n(k_tq_k_rot_set_rows<bits, TQ_SCALE_STEPS, N, rot>, k_tq_k_rot_set_rows<bits, 1, N, rot>)
    switch (nrot) {
        case   0: TQ_K_ROT_SET_ROWS( 64, false); break;
        case  64: TQ_K_ROT_SET_ROWS( 64, true);  break;
        case 128: TQ_K_ROT_SET_ROWS(128, true);  break;
        case 256: TQ_K_ROT_SET_ROWS(256, true);  break;
        case 512: TQ_K_ROT_SET_ROWS(512, true);  break;
        default: GGML_ABORT("%s: rotation size %d", __func__, nrot);
    }
#undef TQ_K_ROT_SET_ROWS
    CUDA_CHECK(cudaGetLastError());
}

void ggml_cuda_tq_k_rot_set_rows(ggml_backend_cuda_context & ctx, const ggml_tensor * k_rot, ggml_tensor * set_rows) {
    cudaStream_t stream = ctx.stream();
    switch (set_rows->type) {
        case GGML_TYPE_TURBO2_0: tq_k_rot_set_rows_bits<2>(k_rot, set_rows, stream); break;
        case GGML_TYPE_TURBO3_0: tq_k_rot_set_rows_bits<3>(k_rot, set_rows, stream); break;
        case GGML_TYPE_TURBO4_0: tq_k_rot_set_rows_bits<4>(k_rot, set_rows, stream); break;
        default: GGML_ABORT("%s: not a TurboQuant type: %s", __func__, ggml_type_name(set_rows->type));
    }
}
