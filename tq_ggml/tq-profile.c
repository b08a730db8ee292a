// TurboQuant calibration profile: the key mean and key channel scale of each attention layer of a
// model, measured once by `tqkv calibrate` (python/tqkv/profile.py) and loaded by the llama KV cache
// (patch 0016); optionally a bit allocation, the cache type of each layer's K and V (patch 0020). The profile is a GGUF file; it names the model it was measured on by a fingerprint
// of the model file, so that a profile cannot be applied to another model by mistake.
#include "ggml.h"
#include "gguf.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#define tq_fseek _fseeki64
#define tq_ftell _ftelli64
#else
#define tq_fseek fseeko
#define tq_ftell ftello
#endif

#define TQ_PROFILE_VERSION 1

// The fingerprint hashes (FNV-1a, 64 bits) the file size, the first 64 KiB (GGUF header and
// metadata) and 64 chunks of 4 KiB spread evenly over the file (the weights): cheap enough to run
// at every context creation, and any other model or quantization differs in it.
#define TQ_FP_HEAD    65536
#define TQ_FP_CHUNK   4096
#define TQ_FP_SAMPLES 64

static uint64_t tq_fnv1a(uint64_t h, const uint8_t * p, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

uint64_t ggml_turbo_model_fingerprint(const char * path) {
    FILE * f = fopen(path, "rb");
    if (!f) {
        return 0;
    }
    uint64_t h = 0xcbf29ce484222325ULL;
    uint8_t * buf = malloc(TQ_FP_HEAD);
    bool ok = buf && tq_fseek(f, 0, SEEK_END) == 0;
    const int64_t size = ok ? (int64_t) tq_ftell(f) : -1;
    ok = ok && size >= 0;
    if (ok) {
        uint8_t le[8];
        for (int i = 0; i < 8; ++i) {
            le[i] = (uint8_t) ((uint64_t) size >> (8*i));
        }
        h = tq_fnv1a(h, le, sizeof(le));
        const size_t n_head = size < TQ_FP_HEAD ? (size_t) size : TQ_FP_HEAD;
        ok = tq_fseek(f, 0, SEEK_SET) == 0 && fread(buf, 1, n_head, f) == n_head;
        h = tq_fnv1a(h, buf, n_head);
    }
    for (int i = 0; ok && size > TQ_FP_HEAD && i < TQ_FP_SAMPLES; ++i) {
        const int64_t off = (int64_t) ((uint64_t) (size - TQ_FP_CHUNK) * (uint64_t) i / (TQ_FP_SAMPLES - 1));
        ok = tq_fseek(f, off, SEEK_SET) == 0 && fread(buf, 1, TQ_FP_CHUNK, f) == TQ_FP_CHUNK;
        h = tq_fnv1a(h, buf, TQ_FP_CHUNK);
    }
    free(buf);
    fclose(f);
    return ok ? h : 0;
}

struct ggml_turbo_profile {
    struct gguf_context * gguf;
    struct ggml_context * ctx;  // the tensors' data
};

static void tq_err(char * err, size_t n, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
}

static bool tq_has(const struct gguf_context * g, const char * key, enum gguf_type type) {
    const int64_t id = gguf_find_key(g, key);
    return id >= 0 && gguf_get_kv_type(g, id) == type;
}

// the bit allocation's arrays: one cache type name per layer of the model, K and V
static const char * tq_alloc_keys[2] = { "tqkv.alloc.k_types", "tqkv.alloc.v_types" };

// the types an allocation may assign; "" for a layer without a KV cache
static enum ggml_type tq_alloc_type(const char * name) {
    if (strcmp(name, "f16") == 0) {
        return GGML_TYPE_F16;
    }
    if (strcmp(name, "q8_0") == 0) {
        return GGML_TYPE_Q8_0;
    }
    return ggml_turbo_type_from_name(name);
}

static bool tq_alloc_check(const struct gguf_context * g, char * err, size_t err_size) {
    const bool have[2] = { gguf_find_key(g, tq_alloc_keys[0]) >= 0, gguf_find_key(g, tq_alloc_keys[1]) >= 0 };
    if (!have[0] && !have[1]) {
        return true;
    }
    const uint32_t n_layer = gguf_get_val_u32(g, gguf_find_key(g, "tqkv.model.n_layer"));
    for (int kv = 0; kv < 2; ++kv) {
        const int64_t id = gguf_find_key(g, tq_alloc_keys[kv]);
        if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, id) != GGUF_TYPE_STRING ||
                gguf_get_arr_n(g, id) != n_layer) {
            tq_err(err, err_size, "the bit allocation needs %s as an array of %u type names", tq_alloc_keys[kv], n_layer);
            return false;
        }
        for (uint32_t il = 0; il < n_layer; ++il) {
            const char * name = gguf_get_arr_str(g, id, il);
            if (name[0] != '\0' && tq_alloc_type(name) == GGML_TYPE_COUNT) {
                tq_err(err, err_size, "%s[%u] is \"%.32s\": a bit allocation assigns f16, q8_0, tq2_0, tq3_0 or tq4_0",
                       tq_alloc_keys[kv], il, name);
                return false;
            }
        }
    }
    return true;
}

void ggml_turbo_profile_free(struct ggml_turbo_profile * p) {
    if (p) {
        gguf_free(p->gguf);
        ggml_free(p->ctx);
        free(p);
    }
}

struct ggml_turbo_profile * ggml_turbo_profile_load(const char * path, char * err, size_t err_size) {
    struct ggml_context * ctx = NULL;
    struct gguf_init_params params = { /*.no_alloc =*/ false, /*.ctx =*/ &ctx };
    struct gguf_context * g = gguf_init_from_file(path, params);
    if (!g) {
        FILE * f = fopen(path, "rb");
        tq_err(err, err_size, f ? "not a readable GGUF file (corrupt or truncated)" : "cannot open the file");
        if (f) {
            fclose(f);
        }
        return NULL;
    }
    struct ggml_turbo_profile * p = calloc(1, sizeof(*p));
    p->gguf = g;
    p->ctx  = ctx;

    static const char * str_keys[] = { "tqkv.model.fingerprint", "tqkv.model.architecture" };
    if (!tq_has(g, "tqkv.profile.version", GGUF_TYPE_UINT32)) {
        tq_err(err, err_size, "not a TurboQuant calibration profile (no tqkv.profile.version; make one with `tqkv calibrate`)");
        goto fail;
    }
    const uint32_t version = gguf_get_val_u32(g, gguf_find_key(g, "tqkv.profile.version"));
    if (version != TQ_PROFILE_VERSION) {
        tq_err(err, err_size, "profile version %u, this build reads version %d (recalibrate with `tqkv calibrate`)",
               version, TQ_PROFILE_VERSION);
        goto fail;
    }
    for (size_t i = 0; i < sizeof(str_keys)/sizeof(str_keys[0]); ++i) {
        if (!tq_has(g, str_keys[i], GGUF_TYPE_STRING)) {
            tq_err(err, err_size, "the profile has no %s", str_keys[i]);
            goto fail;
        }
    }
    if (!tq_has(g, "tqkv.model.n_layer", GGUF_TYPE_UINT32)) {
        tq_err(err, err_size, "the profile has no tqkv.model.n_layer");
        goto fail;
    }
    if (!tq_alloc_check(g, err, err_size)) {
        goto fail;
    }
    for (int64_t i = 0; i < gguf_get_n_tensors(g); ++i) {
        const struct ggml_tensor * t = ggml_get_tensor(ctx, gguf_get_tensor_name(g, i));
        if (t->type != GGML_TYPE_F32 || ggml_n_dims(t) > 2) {
            tq_err(err, err_size, "tensor %s is not a 2-D F32 tensor", t->name);
            goto fail;
        }
        const float * x = (const float *) t->data;
        const bool scale = strstr(t->name, "k_scale") != NULL;
        for (int64_t j = 0; j < ggml_nelements(t); ++j) {
            if (!isfinite(x[j]) || (scale && !(x[j] > 0.0f))) {
                tq_err(err, err_size, "tensor %s holds %s value %g", t->name, scale ? "a non-positive or non-finite" : "a non-finite", (double) x[j]);
                goto fail;
            }
        }
    }
    return p;
fail:
    ggml_turbo_profile_free(p);
    return NULL;
}

const char * ggml_turbo_profile_str(const struct ggml_turbo_profile * p, const char * key) {
    const int64_t id = gguf_find_key(p->gguf, key);
    return id >= 0 && gguf_get_kv_type(p->gguf, id) == GGUF_TYPE_STRING ? gguf_get_val_str(p->gguf, id) : "";
}

bool ggml_turbo_profile_check(const struct ggml_turbo_profile * p, const char * model_path, const char * arch,
                              uint32_t n_layer, char * err, size_t err_size) {
    char have[17];
    snprintf(have, sizeof(have), "%016" PRIx64, ggml_turbo_model_fingerprint(model_path));
    const char * want = ggml_turbo_profile_str(p, "tqkv.model.fingerprint");
    const uint32_t p_layer = gguf_get_val_u32(p->gguf, gguf_find_key(p->gguf, "tqkv.model.n_layer"));
    if (strcmp(want, have) == 0 && strcmp(arch, ggml_turbo_profile_str(p, "tqkv.model.architecture")) == 0 && p_layer == n_layer) {
        return true;
    }
    tq_err(err, err_size, "was made for another model (%s, %s, %u layers, fingerprint %s), not %s (%s, %u layers, "
           "fingerprint %s); run `tqkv calibrate %s`", ggml_turbo_profile_str(p, "tqkv.model.file"),
           ggml_turbo_profile_str(p, "tqkv.model.architecture"), p_layer, want, model_path, arch, n_layer, have, model_path);
    return false;
}

bool ggml_turbo_profile_k_off(const struct ggml_turbo_profile * p, int il, int64_t d, int64_t n_head_kv, bool scale,
                              const float * hadamard, int64_t nrot, float * out, char * err, size_t err_size) {
    const int64_t n = d*n_head_kv;
    for (int64_t i = 0; i < n; ++i) {
        out[i]     = 0.0f;
        out[n + i] = 1.0f;
    }
    if (!p) {
        return true;
    }
    char name[2][GGML_MAX_NAME];
    snprintf(name[0], sizeof(name[0]), "blk.%d.k_mean", il);
    snprintf(name[1], sizeof(name[1]), "blk.%d.k_scale", il);
    const struct ggml_tensor * t[2];
    for (int i = 0; i < 2; ++i) {
        t[i] = ggml_get_tensor(p->ctx, name[i]);
        if (!t[i]) {
            tq_err(err, err_size, "the profile has no %s", name[i]);
            return false;
        }
        if (t[i]->ne[0] != d || t[i]->ne[1] != n_head_kv) {
            tq_err(err, err_size, "%s is [%" PRId64 ", %" PRId64 "], the model's layer %d has head size %" PRId64
                   " and %" PRId64 " KV heads", name[i], t[i]->ne[0], t[i]->ne[1], il, d, n_head_kv);
            return false;
        }
    }
    const float * mean = (const float *) t[0]->data;
    const float * a    = (const float *) t[1]->data;
    // slice 1: a; slice 0: the keys' mean as the cache stores keys, H(a*mean) in runs of nrot
    for (int64_t i = 0; i < n; ++i) {
        out[n + i] = scale ? a[i] : 1.0f;
        out[i]     = out[n + i]*mean[i];
    }
    if (nrot > 0) {
        float * x = malloc(nrot*sizeof(float));
        for (int64_t r = 0; r < n; r += nrot) {
            memcpy(x, out + r, nrot*sizeof(float));
            for (int64_t i = 0; i < nrot; ++i) {
                double acc = 0.0;
                for (int64_t j = 0; j < nrot; ++j) {
                    acc += (double) hadamard[i*nrot + j]*(double) x[j];
                }
                out[r + i] = (float) acc;
            }
        }
        free(x);
    }
    return true;
}

bool ggml_turbo_profile_has_alloc(const struct ggml_turbo_profile * p) {
    return p && gguf_find_key(p->gguf, tq_alloc_keys[0]) >= 0;
}

enum ggml_type ggml_turbo_profile_layer_type(const struct ggml_turbo_profile * p, int il, bool v) {
    if (!ggml_turbo_profile_has_alloc(p) || il < 0) {
        return GGML_TYPE_COUNT;
    }
    const int64_t id = gguf_find_key(p->gguf, tq_alloc_keys[v]);
    if ((size_t) il >= gguf_get_arr_n(p->gguf, id)) {
        return GGML_TYPE_COUNT;
    }
    const char * name = gguf_get_arr_str(p->gguf, id, il);
    return name[0] ? tq_alloc_type(name) : GGML_TYPE_COUNT;
}
