// TurboQuant key offset: graph builders the llama KV cache calls (patch 0006).
//
// Keys share a large common component. TurboQuant scales each block by its norm, so that
// component eats the codebook's resolution. The cache therefore stores k - c, with one vector c
// per layer (per KV head and channel) frozen for the life of the cache: a query's logits
// q.(k_i - c) = q.k_i - q.c all move by the same amount, and softmax attention is unchanged.
// c is the mean of the first ubatch the cache stores; any fixed c is exact, the mean just makes
// the stored differences small.
#include "ggml.h"

// k_cur [n_embd_head, n_head_kv, n_tokens], k_off F32 [n_embd_head, n_head_kv]
struct ggml_tensor * ggml_turbo_k_offset_sub(struct ggml_context * ctx, struct ggml_tensor * k_cur,
                                             struct ggml_tensor * k_off, bool init) {
    GGML_ASSERT(k_off->type == GGML_TYPE_F32 && k_off->ne[0] == k_cur->ne[0] && k_off->ne[1] == k_cur->ne[1]);

    struct ggml_tensor * off = k_off;
    if (init) {
        // mean over the tokens: ggml_mean reduces rows, so put the tokens in dim 0
        struct ggml_tensor * kt = ggml_cont(ctx, ggml_permute(ctx, k_cur, 1, 2, 0, 3)); // [n_tokens, n_embd_head, n_head_kv]
        struct ggml_tensor * mu = ggml_mean(ctx, kt);                                 // [1, n_embd_head, n_head_kv]
        off = ggml_cpy(ctx, ggml_reshape_2d(ctx, mu, k_off->ne[0], k_off->ne[1]), k_off);
    }
    return ggml_sub(ctx, k_cur, ggml_reshape_3d(ctx, off, off->ne[0], off->ne[1], 1));
}

// cur: F32 view [n, n_head_kv, n_cells] of stored keys (the first n channels of each head)
struct ggml_tensor * ggml_turbo_k_offset_add(struct ggml_context * ctx, struct ggml_tensor * cur,
                                             struct ggml_tensor * k_off, int64_t ch0, bool add) {
    struct ggml_tensor * off = ggml_view_3d(ctx, k_off, cur->ne[0], k_off->ne[1], 1,
                                            k_off->nb[1], k_off->nb[1]*k_off->ne[1], ch0*ggml_element_size(k_off));
    return add ? ggml_add(ctx, cur, off) : ggml_sub(ctx, cur, off);
}
