// Host side of the TurboQuant GQA decode kernel (tq-fattn-gqa.cuh): which calls it takes, with how
// many query heads per thread block, and the nodes around it that it fuses.
#include "tq-fattn-gqa.cuh"
#include "../ggml-cuda/fattn.cuh"
#include "../ggml-cuda/fwht.cuh"
#include "../ggml-impl.h"

// tensor cores on Ampere and newer; GGML_TQ_CUDA_NO_MMA=1 keeps the float kernel (for comparisons)
static bool tq_fattn_use_mma() {
    static const bool off = [] { const char * e = getenv("GGML_TQ_CUDA_NO_MMA"); return e && atoi(e) != 0; }();
    return !off && ampere_mma_available(ggml_cuda_info().devices[ggml_cuda_get_device()].cc);
}

template <int D, ggml_type type_K, ggml_type type_V>
static void tq_fattn_gqa_D(ggml_backend_cuda_context & ctx, const ggml_tensor * dst, const int ncols2, const tq_fattn_call & call) {
    if constexpr (tq_fattn_mma_smem<D, type_K, type_V>::on) {
        if (tq_fattn_use_mma()) {
            switch (ncols2) {
                case 1: tq_flash_attn_ext_mma_case<D, 1, type_K, type_V>(ctx, dst, call); return;
                case 2: tq_flash_attn_ext_mma_case<D, 2, type_K, type_V>(ctx, dst, call); return;
                case 3: tq_flash_attn_ext_mma_case<D, 3, type_K, type_V>(ctx, dst, call); return;
                case 4: tq_flash_attn_ext_mma_case<D, 4, type_K, type_V>(ctx, dst, call); return;
                case 5: tq_flash_attn_ext_mma_case<D, 5, type_K, type_V>(ctx, dst, call); return;
                case 6: tq_flash_attn_ext_mma_case<D, 6, type_K, type_V>(ctx, dst, call); return;
                case 7: tq_flash_attn_ext_mma_case<D, 7, type_K, type_V>(ctx, dst, call); return;
                case 8: tq_flash_attn_ext_mma_case<D, 8, type_K, type_V>(ctx, dst, call); return;
            }
        }
    }
    switch (ncols2) {
        case 1: tq_flash_attn_ext_gqa_case<D, 1, type_K, type_V>(ctx, dst, call); return;
        case 2: tq_flash_attn_ext_gqa_case<D, 2, type_K, type_V>(ctx, dst, call); return;
        case 4:
            if constexpr (tq_fattn_gqa_fits(D, 4)) {
                tq_flash_attn_ext_gqa_case<D, 4, type_K, type_V>(ctx, dst, call);
                return;
            }
            break;
        case 8:
            if constexpr (tq_fattn_gqa_fits(D, 8)) {
                tq_flash_attn_ext_gqa_case<D, 8, type_K, type_V>(ctx, dst, call);
                return;
            }
            break;
    }
    GGML_ABORT("%s: no instance for D = %d, ncols2 = %d", __func__, D, ncols2);
}

template <ggml_type type_K, ggml_type type_V>
static void tq_fattn_gqa_pair(ggml_backend_cuda_context & ctx, const ggml_tensor * dst, const int D, const int ncols2,
                              const tq_fattn_call & call) {
    switch (D) {
        case  64: tq_fattn_gqa_D< 64, type_K, type_V>(ctx, dst, ncols2, call); break;
        case 128: tq_fattn_gqa_D<128, type_K, type_V>(ctx, dst, ncols2, call); break;
        case 256: tq_fattn_gqa_D<256, type_K, type_V>(ctx, dst, ncols2, call); break;
        default:  GGML_ABORT("%s: head size %d", __func__, D);
    }
}

// query heads per thread block for the decode kernels, 0 where they do not take dst (upstream's
// vector kernel does)
static int tq_fattn_gqa_ncols2(const ggml_tensor * dst) {
    const ggml_tensor * Q = dst->src[0];
    const ggml_tensor * K = dst->src[1];
    const ggml_tensor * V = dst->src[2];

    const int D = Q->ne[0];
    if (!tq_cuda_is_turbo(K->type) || !tq_cuda_is_turbo(V->type) || Q->ne[1] != 1 ||
        K->ne[0] != D || V->ne[0] != D || (D != 64 && D != 128 && D != 256) || Q->ne[2] % K->ne[2] != 0) {
        return 0;
    }
    // the staged kernels (tq_fattn_gqa_stage) copy rows of whole words word by word: such rows must
    // start on a word (true of a llama.cpp cache; an odd view goes to the vector kernel)
    const size_t addr_bits = (uintptr_t) K->data | (uintptr_t) V->data | K->nb[1] | K->nb[2] | K->nb[3] |
                             V->nb[1] | V->nb[2] | V->nb[3];
    if (ggml_row_size(K->type, D) % 4 == 0 && ggml_row_size(V->type, D) % 4 == 0 && addr_bits % 4 != 0) {
        return 0;
    }

    // the most query heads per block that divide the group and that the kernel takes (tensor cores:
    // up to 8, the columns of its MMA, at any head size; float: powers of two that keep Q and the
    // sums in registers), fewer while the grid would not fill two waves of the GPU: with a short
    // cache each block has one or two tiles, and its latency, not the decode work, sets the time
    // (H100, Llama-8B shape, tq3_0/tq2_0 at 0 / 8192 tokens: 4 heads 265.8 / 237.6 t/s, 2 heads
    // 274.9 / 248.3, 1 head 283.7 / 241.0; at 32k and beyond 4 heads are fastest)
    const int gqa_ratio = Q->ne[2] / K->ne[2];
    const int nsm       = ggml_cuda_info().devices[ggml_cuda_get_device()].nsm;
    const int64_t ntiles_kv = (K->ne[1] + TQ_FATTN_GQA_NTHREADS - 1) / TQ_FATTN_GQA_NTHREADS;
    const int64_t nblocks_2waves = 2*TQ_FATTN_GQA_MINBLOCKS*nsm;
    const bool mma = tq_fattn_use_mma();
    for (int ncols2 = 8; ncols2 > 1; --ncols2) {
        const bool takes = mma || ((ncols2 & (ncols2 - 1)) == 0 && tq_fattn_gqa_fits(D, ncols2));
        if (gqa_ratio % ncols2 == 0 && takes && K->ne[2]*Q->ne[3]*(gqa_ratio/ncols2)*ntiles_kv >= nblocks_2waves) {
            return ncols2;
        }
    }
    return 1;
}

static void tq_fattn_gqa_run(ggml_backend_cuda_context & ctx, const ggml_tensor * dst, const int ncols2, const tq_fattn_call & call) {
    const ggml_tensor * K = dst->src[1];
    const ggml_tensor * V = dst->src[2];
#define TQ_FATTN_GQA_CASE(type_K_case, type_V_case)                                      \
    if (K->type == type_K_case && V->type == type_V_case) {                              \
        tq_fattn_gqa_pair<type_K_case, type_V_case>(ctx, dst, K->ne[0], ncols2, call);   \
        return;                                                                          \
    }
    TQ_FATTN_GQA_PAIRS(TQ_FATTN_GQA_CASE)
#undef TQ_FATTN_GQA_CASE
    GGML_ABORT("%s: no decode kernel for %s/%s", __func__, ggml_type_name(K->type), ggml_type_name(V->type));
}

// the call that reads FLASH_ATTN_EXT's own Q and writes its own output, nothing fused
static tq_fattn_call tq_fattn_call_of(const ggml_tensor * dst) {
    const ggml_tensor * Q = dst->src[0];
    tq_fattn_call call = {};
    call.Q    = (const char *) Q->data;
    call.nb01 = Q->nb[1];
    call.nb02 = Q->nb[2];
    call.nb03 = Q->nb[3];
    call.out  = (float *) dst->data;
    return call;
}

bool ggml_cuda_tq_flash_attn_ext_gqa(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const int ncols2 = tq_fattn_gqa_ncols2(dst);
    if (ncols2 == 0) {
        return false;
    }
    tq_fattn_gqa_run(ctx, dst, ncols2, tq_fattn_call_of(dst));
    return true;
}

// Fusion around a decode call (ggml_cuda_try_fuse, patch 0015). build_attn leaves a TurboQuant
// query's TURBO_K_ROT to the attention (patch 0014), so the graph reads
//   TURBO_K_ROT(q), views (of q, and of the cache), FLASH_ATTN_EXT, RESHAPE, RESHAPE, MUL_MAT
// where the MUL_MAT is upstream's output rotation (llama_mul_mat_hadamard, run as fwht_cuda). The
// kernel then reads the unrotated query and transforms it as it loads Q (tq_fattn_load_q), and the
// combine step rotates the output (tq_fattn_combine): two kernels less per layer and token, the
// same values. Either end alone fuses too. GGML_TQ_CUDA_NO_FUSE=1 keeps the separate kernels.
struct tq_fattn_fusion {
    const ggml_tensor * q_rot; // or null
    const ggml_tensor * fa;
    ggml_tensor       * mm;    // or null
    int                 last;  // index of the last fused node, the output
};

static bool tq_fattn_is_view(const ggml_tensor * t) {
    return t->op == GGML_OP_VIEW || t->op == GGML_OP_PERMUTE || t->op == GGML_OP_RESHAPE || t->op == GGML_OP_TRANSPOSE;
}

// the query TURBO_K_ROT q_rot that fa reads as one row per head, no offset: Q(i, 0, h, 0) = q_rot(i, h, 0)
static bool tq_fattn_q_fusable(const ggml_tensor * q_rot, const ggml_tensor * fa) {
    const ggml_tensor * Q     = fa->src[0];
    const ggml_tensor * K     = fa->src[1];
    const ggml_tensor * k_off = q_rot->src[1];
    return (Q == q_rot || (Q->view_src == q_rot && Q->view_offs == 0)) && ggml_cuda_tq_supports_k_rot(q_rot) &&
        Q->nb[0] == sizeof(float) && Q->ne[0] == q_rot->ne[0] && Q->ne[1] == 1 && Q->ne[2] == q_rot->ne[1] && Q->ne[3] == 1 &&
        Q->nb[2] == q_rot->nb[1] && q_rot->ne[2] == 1 && q_rot->ne[3] == 1 &&
        (!k_off || (k_off->ne[0] == Q->ne[0] && k_off->ne[1] == K->ne[2]));
}

// the fusion starting at node i (a TURBO_K_ROT or a FLASH_ATTN_EXT), false: none
static bool tq_fattn_fusion_at(const ggml_cgraph * cgraph, const int i, tq_fattn_fusion & f) {
    static const bool off = getenv("GGML_TQ_CUDA_NO_FUSE") != nullptr && atoi(getenv("GGML_TQ_CUDA_NO_FUSE")) != 0;
    constexpr int nmax = 16;
    int     idx[nmax];
    ggml_op ops[nmax];
    int     n = 0;
    f = {};
    if (off) {
        return false;
    }

    int j = i;
    if (cgraph->nodes[i]->op == GGML_OP_TURBO_K_ROT) {
        const ggml_tensor * q_rot = cgraph->nodes[i];
        idx[n] = i; ops[n++] = q_rot->op;
        for (j = i + 1; j < cgraph->n_nodes && tq_fattn_is_view(cgraph->nodes[j]); ++j) {
            if (cgraph->nodes[j]->view_src == q_rot) {
                if (n == nmax - 5) {
                    return false;
                }
                idx[n] = j; ops[n++] = cgraph->nodes[j]->op;
            }
        }
        if (j == cgraph->n_nodes || cgraph->nodes[j]->op != GGML_OP_FLASH_ATTN_EXT ||
            !tq_fattn_q_fusable(q_rot, cgraph->nodes[j])) {
            return false;
        }
        f.q_rot = q_rot;
    }
    const ggml_tensor * fa = cgraph->nodes[j];
    if (fa->op != GGML_OP_FLASH_ATTN_EXT || tq_fattn_gqa_ncols2(fa) == 0 ||
        !ggml_cuda_flash_attn_ext_is_vec(ggml_cuda_get_device(), fa)) {
        return false;
    }
    f.fa = fa;
    idx[n] = j; ops[n++] = fa->op;
    f.last = j;

    if (j + 3 < cgraph->n_nodes) {
        const ggml_tensor * r1 = cgraph->nodes[j + 1];
        const ggml_tensor * r2 = cgraph->nodes[j + 2];
        ggml_tensor       * mm = cgraph->nodes[j + 3];
        if (r1->op == GGML_OP_RESHAPE && r1->src[0] == fa && r2->op == GGML_OP_RESHAPE && r2->src[0] == r1 &&
            mm->op == GGML_OP_MUL_MAT && mm->src[1] == r2 && ggml_cuda_op_mul_mat_use_fwht(mm)) {
            const int64_t nrot = mm->src[0]->ne[0];
            if (nrot >= 64 && nrot <= fa->src[0]->ne[0] && fa->src[0]->ne[0] % nrot == 0) {
                const int n0 = n;
                for (int k = 1; k <= 3; ++k) {
                    idx[n] = j + k; ops[n++] = cgraph->nodes[j + k]->op;
                }
                if (ggml_can_fuse_subgraph_ext(cgraph, idx, n, ops, &idx[n - 1], 1)) {
                    f.mm   = mm;
                    f.last = j + 3;
                    return true;
                }
                n = n0;
            }
        }
    }
    return f.q_rot && ggml_can_fuse_subgraph_ext(cgraph, idx, n, ops, &idx[n - 1], 1);
}

int ggml_cuda_tq_fattn_fusion(const ggml_cgraph * cgraph, const int i) {
    tq_fattn_fusion f;
    return tq_fattn_fusion_at(cgraph, i, f) ? f.last : -1;
}

void ggml_cuda_tq_fattn_fused(ggml_backend_cuda_context & ctx, const ggml_cgraph * cgraph, const int i) {
    tq_fattn_fusion f;
    GGML_ASSERT(tq_fattn_fusion_at(cgraph, i, f));
    tq_fattn_call call = tq_fattn_call_of(f.fa);
    if (f.q_rot) {
        const ggml_tensor * x     = f.q_rot->src[0];
        const ggml_tensor * k_off = f.q_rot->src[1];
        const int nrot = ggml_get_op_params_i32(f.q_rot, 0);
        call.Q    = (const char *) x->data;
        call.nb01 = x->nb[2];
        call.nb02 = x->nb[1];
        call.nb03 = x->nb[3];
        call.fuse.q             = true;
        call.fuse.q_k_off       = k_off ? (const float *) k_off->data : nullptr;
        call.fuse.q_k_off_heads = k_off ? (int) k_off->ne[1] : (int) f.fa->src[1]->ne[2];
        call.fuse.q_nrot        = nrot;
        call.fuse.q_mode        = ggml_get_op_params_i32(f.q_rot, 1);
        call.fuse.q_rscale      = nrot > 0 ? 1.0f/sqrtf((float) nrot) : 1.0f; // as ggml_cuda_tq_k_rot
    }
    if (f.mm) {
        call.out      = (float *) f.mm->data;
        call.out_nrot = (int) f.mm->src[0]->ne[0];
    }
    tq_fattn_gqa_run(ctx, f.fa, tq_fattn_gqa_ncols2(f.fa), call);
}
