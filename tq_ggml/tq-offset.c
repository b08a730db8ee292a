// TurboQuant key offset: graph builders the llama KV cache calls (patch 0006).
//
// Keys share a large common component. TurboQuant scales each block by its norm, so that
// component eats the codebook's resolution. The cache therefore stores k - c, with one vector c
// per layer (per KV head and channel) frozen for the life of the cache: a query's logits
// q.(k_i - c) = q.k_i - q.c all move by the same amount, and softmax attention is unchanged.
// c is the mean of the first ubatch the cache stores; any fixed c is exact, the mean just makes
// the stored differences small.
#include "ggml.h"
#include "../ggml-impl.h"

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

// TurboQuant key channel scale (patch 0009). The cache stores H(a*k) and queries become H(q/a), with
// one positive vector a per layer (per KV head and channel) frozen like the offset: q.k is unchanged
// for any a. The rotated key's quantization error is spread evenly over the channels, so a logit's
// error has variance ~ sum_i E[q_i^2]/a_i^2 * sum_i a_i^2 E[k_i^2] (k around its offset), which
// a_i^4 = E[q_i^2] / E[k_i^2] minimises (Cauchy-Schwarz). The moments come from one ubatch and the
// model ignores where attention is sharp, so the cache uses the tempered a_i^8 = E[q_i^2] / E[k_i^2]:
// in `tqkv ppl` (ctx 2048, tq3_0/tq3_0) exponents 1/16..3/16 all beat no scale on both test models,
// 1/4 loses on SmolLM2 (README, "Key channel scale"). Both moments are smoothed by TQ_K_SCALE_EPS of
// their channel mean so that a constant channel keeps a finite scale, and a is normalised to unit
// RMS per head. A first ubatch under TQ_K_SCALE_MIN_TOKENS tokens is too short to measure: it
// stores a = 1, the plain cache (measured on a 40-token chat prompt, the scale derailed SmolLM2's
// greedy tq3_0/tq2_0 answer that the plain cache gets right; every gain above used 512 tokens).
#define TQ_K_SCALE_EPS        0.01f
#define TQ_K_SCALE_MIN_TOKENS 512

// per-channel mean of x^2 over dim 0: x [n, n_embd_head, h] -> [n_embd_head, h], smoothed
static struct ggml_tensor * tq_smoothed_moment(struct ggml_context * ctx, struct ggml_tensor * x) {
    struct ggml_tensor * m  = ggml_mean(ctx, ggml_sqr(ctx, x));              // [1, n_embd_head, h]
    m = ggml_reshape_2d(ctx, m, x->ne[1], x->ne[2]);                        // [n_embd_head, h]
    struct ggml_tensor * mm = ggml_mean(ctx, m);                             // [1, h]
    return ggml_add(ctx, m, ggml_scale_bias(ctx, mm, TQ_K_SCALE_EPS, 1e-30f));
}

// q_cur [n_embd_head, n_head, n_tokens], k_cur [n_embd_head, n_head_kv, n_tokens] (both before the
// rotation), k_scl F32 [n_embd_head, n_head_kv]: measures a on this ubatch, stores it in k_scl and
// returns the stored tensor (use it, not k_scl, so that readers follow the store)
struct ggml_tensor * ggml_turbo_k_scale_init(struct ggml_context * ctx, struct ggml_tensor * q_cur,
                                             struct ggml_tensor * k_cur, struct ggml_tensor * k_scl) {
    const int64_t d = k_cur->ne[0], n_head_kv = k_cur->ne[1], n_tokens = k_cur->ne[2];
    GGML_ASSERT(k_scl->type == GGML_TYPE_F32 && k_scl->ne[0] == d && k_scl->ne[1] == n_head_kv);
    GGML_ASSERT(q_cur->ne[0] == d && q_cur->ne[1] % n_head_kv == 0 && q_cur->ne[2] == n_tokens);

    if (n_tokens < TQ_K_SCALE_MIN_TOKENS) {
        return ggml_cpy(ctx, ggml_scale_bias(ctx, k_scl, 0.0f, 1.0f), k_scl);
    }
    const int64_t g = q_cur->ne[1] / n_head_kv;

    // keys around their mean: tokens in dim 0
    struct ggml_tensor * kt = ggml_cont(ctx, ggml_permute(ctx, k_cur, 1, 2, 0, 3)); // [n_tokens, d, n_head_kv]
    kt = ggml_sub(ctx, kt, ggml_mean(ctx, kt));
    struct ggml_tensor * k2 = tq_smoothed_moment(ctx, kt);                           // [d, n_head_kv]

    // queries: tokens and the g query heads of a KV head in dim 0
    struct ggml_tensor * q4 = ggml_reshape_4d(ctx, ggml_cont(ctx, q_cur), d, g, n_head_kv, n_tokens);
    struct ggml_tensor * qt = ggml_cont(ctx, ggml_permute(ctx, q4, 2, 0, 3, 1));     // [g, n_tokens, d, n_head_kv]
    qt = ggml_reshape_3d(ctx, qt, g*n_tokens, d, n_head_kv);
    struct ggml_tensor * q2 = tq_smoothed_moment(ctx, qt);                           // [d, n_head_kv]

    // a = (q2/k2)^(1/8): the tempered optimum (see above)
    struct ggml_tensor * a = ggml_sqrt(ctx, ggml_sqrt(ctx, ggml_sqrt(ctx, ggml_div(ctx, q2, k2))));
    struct ggml_tensor * rms = ggml_sqrt(ctx, ggml_mean(ctx, ggml_sqr(ctx, a)));     // [1, n_head_kv]
    a = ggml_div(ctx, a, rms);
    return ggml_cpy(ctx, a, k_scl);
}

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
    GGML_ASSERT(nrot == 0 || (nrot >= 32 && (nrot & (nrot - 1)) == 0 && n % nrot == 0));

    struct ggml_tensor * result = ggml_new_tensor(ctx, GGML_TYPE_F32, GGML_MAX_DIMS, x->ne);
    const int32_t params[2] = { nrot, mode };
    ggml_set_op_params(result, params, sizeof(params));
    result->op     = GGML_OP_TURBO_K_ROT;
    result->src[0] = x;
    result->src[1] = k_off;
    return result;
}
