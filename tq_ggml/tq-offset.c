// TurboQuant key offset: graph builders the llama KV cache calls (patch 0006).
//
// Keys share a large common component. TurboQuant scales each block by its norm, so that
// component eats the codebook's resolution. The cache therefore stores k - c, with one vector c
// per layer (per KV head and channel) frozen for the life of the cache: a query's logits
// q.(k_i - c) = q.k_i - q.c all move by the same amount, and softmax attention is unchanged.
// c is the keys' mean measured by `tqkv calibrate` (tq-profile.c); any fixed c is exact, the mean
// just makes the stored differences small.
#include "ggml.h"
#include "../ggml-impl.h"

// k_cur [n_embd_head, n_head_kv, n_tokens], k_off F32 [n_embd_head, n_head_kv]
struct ggml_tensor * ggml_turbo_k_offset_sub(struct ggml_context * ctx, struct ggml_tensor * k_cur,
                                             struct ggml_tensor * k_off) {
    GGML_ASSERT(k_off->type == GGML_TYPE_F32 && k_off->ne[0] == k_cur->ne[0] && k_off->ne[1] == k_cur->ne[1]);
    return ggml_sub(ctx, k_cur, ggml_reshape_3d(ctx, k_off, k_off->ne[0], k_off->ne[1], 1));
}

// cur: F32 view [n, n_head_kv, n_cells] of stored keys (the first n channels of each head)
struct ggml_tensor * ggml_turbo_k_offset_add(struct ggml_context * ctx, struct ggml_tensor * cur,
                                             struct ggml_tensor * k_off, int64_t ch0, bool add) {
    struct ggml_tensor * off = ggml_view_3d(ctx, k_off, cur->ne[0], k_off->ne[1], 1,
                                            k_off->nb[1], k_off->nb[1]*k_off->ne[1], ch0*ggml_element_size(k_off));
    return add ? ggml_add(ctx, cur, off) : ggml_sub(ctx, cur, off);
}

// TurboQuant key channel scale (patch 0009). The cache stores H(a*k) and queries become H(q/a), with
// one positive vector a per layer (per KV head and channel) from the calibration profile: q.k is
// unchanged for any a. The rotated key's quantization error is spread evenly over the channels, so a
// logit's error has variance ~ sum_i E[q_i^2]/a_i^2 * sum_i a_i^2 E[k_i^2] (k around its offset),
// which a_i^4 = E[q_i^2] / E[k_i^2] minimises (Cauchy-Schwarz); `tqkv calibrate` stores the
// tempered a_i^8 = E[q_i^2] / E[k_i^2] (python/tqkv/profile.py says why).

// x [n, n_head, n_tokens] with n_head a multiple of a's heads, a [n, n_head_kv] (may be a view):
// x*a, or x/a when inverse, each head h scaled by a's head h / (n_head / n_head_kv)
struct ggml_tensor * ggml_turbo_k_scale(struct ggml_context * ctx, struct ggml_tensor * x,
                                        struct ggml_tensor * a, bool inverse) {
    const int64_t n = x->ne[0], n_head = x->ne[1], n_head_kv = a->ne[1];
    GGML_ASSERT(a->type == GGML_TYPE_F32 && a->ne[0] == n && n_head % n_head_kv == 0);

    struct ggml_tensor * x4 = ggml_reshape_4d(ctx, ggml_is_contiguous(x) ? x : ggml_cont(ctx, x),
                                              n, n_head / n_head_kv, n_head_kv, x->ne[2]*x->ne[3]);
    struct ggml_tensor * a4 = ggml_view_4d(ctx, a, n, 1, n_head_kv, 1, a->nb[1], a->nb[1], a->nb[1]*n_head_kv, 0);
    struct ggml_tensor * y  = inverse ? ggml_div(ctx, x4, a4) : ggml_mul(ctx, x4, a4);
    return ggml_reshape_4d(ctx, y, x->ne[0], x->ne[1], x->ne[2], x->ne[3]);
}

// Steady state of the three steps above (scale, upstream's Hadamard rotation, offset) in one op:
// dst = H(x*a) - off (keys) or H(x/a) (queries), H the normalised Sylvester-Hadamard transform of
// each run of nrot values (upstream's rotation, llama_mul_mat_hadamard), a and off the slices 1 and
// 0 of k_off. One kernel instead of up to five per tensor and layer (CUDA section of the README).
// Mode 0 with k_off NULL is the rotation alone (values: the store into a TurboQuant V cache).
struct ggml_tensor * ggml_turbo_k_rot(struct ggml_context * ctx, struct ggml_tensor * x,
                                      struct ggml_tensor * k_off, int nrot, int mode) {
    const int64_t n = x->ne[0];
    GGML_ASSERT(x->type == GGML_TYPE_F32 && x->nb[0] == sizeof(float));
    GGML_ASSERT((mode & ~7) == 0 && (mode & 3) != 3);
    GGML_ASSERT(k_off || mode == 0);
    GGML_ASSERT(!k_off || (k_off->type == GGML_TYPE_F32 && ggml_is_contiguous(k_off)));
    GGML_ASSERT(!k_off || (k_off->ne[0] == n && x->ne[1] % k_off->ne[1] == 0 && k_off->ne[2] == 2));
    GGML_ASSERT(nrot == 0 || (nrot >= 16 && (nrot & (nrot - 1)) == 0 && n % nrot == 0));

    struct ggml_tensor * result = ggml_new_tensor(ctx, GGML_TYPE_F32, GGML_MAX_DIMS, x->ne);
    const int32_t params[2] = { nrot, mode };
    ggml_set_op_params(result, params, sizeof(params));
    result->op     = GGML_OP_TURBO_K_ROT;
    result->src[0] = x;
    result->src[1] = k_off;
    return result;
}
