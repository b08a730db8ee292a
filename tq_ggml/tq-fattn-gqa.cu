// Host side of the TurboQuant GQA decode kernel (tq-fattn-gqa.cuh): which calls it takes and with
// how many query heads per thread block.
#include "tq-fattn-gqa.cuh"

// GGML_TQ_CUDA_NO_MMA=1 keeps head size 128 on the float kernel (for comparisons)
static bool tq_fattn_use_mma(const int D) {
    static const bool off = [] { const char * e = getenv("GGML_TQ_CUDA_NO_MMA"); return e && atoi(e) != 0; }();
    return D == TQ_FATTN_MMA_D && !off && ampere_mma_available(ggml_cuda_info().devices[ggml_cuda_get_device()].cc);
}

template <int D, ggml_type type_K, ggml_type type_V>
static void tq_fattn_gqa_D(ggml_backend_cuda_context & ctx, ggml_tensor * dst, const int ncols2) {
    if constexpr (D == TQ_FATTN_MMA_D) {
        if (tq_fattn_use_mma(D)) {
            switch (ncols2) {
                case 1: tq_flash_attn_ext_mma_case<D, 1, type_K, type_V>(ctx, dst); return;
                case 2: tq_flash_attn_ext_mma_case<D, 2, type_K, type_V>(ctx, dst); return;
                case 4: tq_flash_attn_ext_mma_case<D, 4, type_K, type_V>(ctx, dst); return;
                case 8: tq_flash_attn_ext_mma_case<D, 8, type_K, type_V>(ctx, dst); return;
            }
        }
    }
    switch (ncols2) {
        case 1: tq_flash_attn_ext_gqa_case<D, 1, type_K, type_V>(ctx, dst); return;
        case 2: tq_flash_attn_ext_gqa_case<D, 2, type_K, type_V>(ctx, dst); return;
        case 4:
            if constexpr (tq_fattn_gqa_fits(D, 4)) {
                tq_flash_attn_ext_gqa_case<D, 4, type_K, type_V>(ctx, dst);
                return;
            }
            break;
        case 8:
            if constexpr (tq_fattn_gqa_fits(D, 8)) {
                tq_flash_attn_ext_gqa_case<D, 8, type_K, type_V>(ctx, dst);
                return;
            }
            break;
    }
    GGML_ABORT("%s: no instance for D = %d, ncols2 = %d", __func__, D, ncols2);
}

template <ggml_type type_K, ggml_type type_V>
static void tq_fattn_gqa_pair(ggml_backend_cuda_context & ctx, ggml_tensor * dst, const int D, const int ncols2) {
    switch (D) {
        case  64: tq_fattn_gqa_D< 64, type_K, type_V>(ctx, dst, ncols2); break;
        case 128: tq_fattn_gqa_D<128, type_K, type_V>(ctx, dst, ncols2); break;
        case 256: tq_fattn_gqa_D<256, type_K, type_V>(ctx, dst, ncols2); break;
        default:  GGML_ABORT("%s: head size %d", __func__, D);
    }
}

bool ggml_cuda_tq_flash_attn_ext_gqa(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * Q = dst->src[0];
    const ggml_tensor * K = dst->src[1];
    const ggml_tensor * V = dst->src[2];

    const int D = Q->ne[0];
    if (!tq_cuda_is_turbo(K->type) || !tq_cuda_is_turbo(V->type) || Q->ne[1] != 1 ||
        K->ne[0] != D || V->ne[0] != D || (D != 64 && D != 128 && D != 256) || Q->ne[2] % K->ne[2] != 0) {
        return false; // upstream's vector kernel (one query head per block) takes it
    }
    // the staged kernels (tq_fattn_gqa_stage) copy rows of whole words word by word: such rows must
    // start on a word (true of a llama.cpp cache; an odd view goes to the vector kernel)
    const size_t addr_bits = (uintptr_t) K->data | (uintptr_t) V->data | K->nb[1] | K->nb[2] | K->nb[3] |
                             V->nb[1] | V->nb[2] | V->nb[3];
    if (ggml_row_size(K->type, D) % 4 == 0 && ggml_row_size(V->type, D) % 4 == 0 && addr_bits % 4 != 0) {
        return false;
    }

    // the most query heads per block that divide the group and keep Q and the sums in registers,
    // fewer while the grid would not fill two waves of the GPU: with a short cache each block has
    // one or two tiles, and its latency, not the decode work, sets the time (H100, Llama-8B shape,
    // tq3_0/tq2_0 at 0 / 8192 tokens: 4 heads 265.8 / 237.6 t/s, 2 heads 274.9 / 248.3, 1 head
    // 283.7 / 241.0; at 32k and beyond 4 heads are fastest)
    const int gqa_ratio = Q->ne[2] / K->ne[2];
    const int nsm       = ggml_cuda_info().devices[ggml_cuda_get_device()].nsm;
    const int64_t ntiles_kv = (K->ne[1] + TQ_FATTN_GQA_NTHREADS - 1) / TQ_FATTN_GQA_NTHREADS;
    const int64_t nblocks_2waves = 2*TQ_FATTN_GQA_MINBLOCKS*nsm;
    int ncols2 = 8;
    // the tensor-core kernel takes up to 8 heads (the columns of its MMA) at any head size it has
    const bool mma = tq_fattn_use_mma(D);
    while (ncols2 > 1 && (gqa_ratio % ncols2 != 0 || !(mma || tq_fattn_gqa_fits(D, ncols2)) ||
                          K->ne[2]*Q->ne[3]*(gqa_ratio/ncols2)*ntiles_kv < nblocks_2waves)) {
        ncols2 /= 2;
    }

#define TQ_FATTN_GQA_CASE(type_K_case, type_V_case)                                \
    if (K->type == type_K_case && V->type == type_V_case) {                        \
        tq_fattn_gqa_pair<type_K_case, type_V_case>(ctx, dst, D, ncols2);          \
        return true;                                                               \
    }
    TQ_FATTN_GQA_PAIRS(TQ_FATTN_GQA_CASE)
#undef TQ_FATTN_GQA_CASE

    return false;
}
