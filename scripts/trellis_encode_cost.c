// What a bitshift-trellis encoder for 2-bit values costs on a CPU, next to tq2_0's own encoder.
//
// results/experiments.md section 7 measures the quality of a QTIP-style tail-biting trellis code
// (an L-bit state, 2 bits shifted in per value, 64-value blocks, 9 scale candidates) in Python;
// this program times the same search in C: per block, per scale candidate, a Viterbi pass over the
// block rotated by half a block with a free start, then a pass tied to the overlap the first chose
// (QTIP's two-pass tail-biting approximation), with backpointers and the traceback. The inner
// loop is the add-compare-select over 2^L states, 8 at a time (AVX2/FMA, one thread). tq2_0's
// encoder is ggml's (ggml_quantize_chunk, the scalar reference the CPU backend stores with).
//
// With TREE the patched llama.cpp (tqkv build) and BIN its tools (tqkv bin):
//     cc -O3 -mavx2 -mfma -mf16c -I TREE/ggml/include scripts/trellis_encode_cost.c
//        -L BIN -lggml-base -lm -Wl,-rpath,BIN -o /tmp/trellis_cost && /tmp/trellis_cost
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <immintrin.h>

#include "ggml.h"

#define QK 64
#define N_SCALES 9
#define TQ2_0_TYPE GGML_TYPE_TURBO2_0

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// standard normal by Box-Muller from a fixed LCG: the data only sets the search's branch-free work
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float gauss(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    const double u1 = ((rng >> 11) + 1.0) / 9007199254740993.0;
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    const double u2 = (rng >> 11) / 9007199254740992.0;
    return (float) (sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

typedef struct {
    int L, n;         // state bits, 2^L states
    float * code;     // reconstruction of each state (unit RMS)
    float * cost, * next;
    int32_t * back;   // [QK][n/4]: which of the 4 predecessors of each s >> 2 won
} trellis;

static void trellis_init(trellis * t, int L) {
    t->L = L; t->n = 1 << L;
    t->code  = malloc(sizeof(float) * t->n);
    t->cost  = malloc(sizeof(float) * t->n);
    t->next  = malloc(sizeof(float) * t->n);
    t->back  = malloc(sizeof(int32_t) * QK * t->n / 4);
    for (int s = 0; s < t->n; ++s) {
        t->code[s] = gauss();
    }
}

// One Viterbi pass over y[0..QK) (already divided by the scale). start < 0: any start state;
// else the path must start in `start`. Returns the least squared error; path[i] = state of value i.
static float viterbi(trellis * t, const float * y, int start, int * path) {
    const int n = t->n, q = n / 4, hi = t->L - 2;
    for (int s = 0; s < n; ++s) {
        const float e = y[0] - t->code[s];
        t->cost[s] = (start < 0 || s == start) ? e * e : INFINITY;
    }
    const __m256i expand_lo = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i two = _mm256_set1_epi32(2);
    for (int i = 1; i < QK; ++i) {
        int32_t * bk = t->back + (size_t) i * q;
        const __m256 yi = _mm256_set1_ps(y[i]);
        // predecessors of state s are (s >> 2) | h << (L-2): the min over h, once per s >> 2, for
        // 8 values of s >> 2 at once; then each min serves its 4 successors
        const float * c0 = t->cost, * c1 = c0 + q, * c2 = c1 + q, * c3 = c2 + q;
        for (int p = 0; p < q; p += 8) {
            __m256 m = _mm256_loadu_ps(c0 + p);
            __m256i w = _mm256_setzero_si256();
            const float * ch[3] = { c1, c2, c3 };
            for (int h = 0; h < 3; ++h) {
                const __m256 c = _mm256_loadu_ps(ch[h] + p);
                const __m256 lt = _mm256_cmp_ps(c, m, _CMP_LT_OQ);
                w = _mm256_blendv_epi8(w, _mm256_set1_epi32(h + 1), _mm256_castps_si256(lt));
                m = _mm256_min_ps(c, m);
            }
            _mm256_storeu_si256((__m256i *) (bk + p), w);
            __m256i idx = expand_lo;
            for (int j = 0; j < 4; ++j) {
                const int s0 = 4*p + 8*j;
                const __m256 e = _mm256_sub_ps(yi, _mm256_loadu_ps(t->code + s0));
                _mm256_storeu_ps(t->next + s0, _mm256_fmadd_ps(e, e, _mm256_permutevar8x32_ps(m, idx)));
                idx = _mm256_add_epi32(idx, two);
            }
        }
        float * tmp = t->cost; t->cost = t->next; t->next = tmp;
    }
    int s = 0;
    for (int k = 1; k < n; ++k) {
        s = t->cost[k] < t->cost[s] ? k : s;
    }
    const float best = t->cost[s];
    for (int i = QK - 1; i >= 0; --i) {
        path[i] = s;
        if (i > 0) {
            const int p = s >> 2;
            s = p | t->back[(size_t) i * q + p] << hi;
        }
    }
    return best;
}

// the same search in plain loops, to check the vector one: the least squared error only
static float viterbi_ref(const trellis * t, const float * y, int start) {
    const int n = t->n, hi = t->L - 2;
    float * c = malloc(sizeof(float) * n), * d = malloc(sizeof(float) * n);
    for (int s = 0; s < n; ++s) {
        c[s] = (start < 0 || s == start) ? (y[0] - t->code[s]) * (y[0] - t->code[s]) : INFINITY;
    }
    for (int i = 1; i < QK; ++i) {
        for (int s = 0; s < n; ++s) {
            float m = INFINITY;
            for (int h = 0; h < 4; ++h) {
                m = fminf(m, c[(s >> 2) | h << hi]);
            }
            d[s] = m + (y[i] - t->code[s]) * (y[i] - t->code[s]);
        }
        memcpy(c, d, sizeof(float) * n);
    }
    float best = INFINITY;
    for (int s = 0; s < n; ++s) best = fminf(best, c[s]);
    free(c); free(d);
    return best;
}

// the two-pass tail-biting search of one block for one scale
static float encode_block(trellis * t, const float * x, float scale, int * path) {
    float y[QK], r[QK];
    int rot[QK];
    for (int i = 0; i < QK; ++i) {
        y[i] = x[i] / scale;
        r[i] = y[(i + QK / 2) % QK];
    }
    viterbi(t, r, -1, rot);
    // the state the rotated pass went through at the block's start ties the second pass
    return viterbi(t, y, rot[QK / 2], path);
}

static double trellis_us_per_block(int L, const float * x, int n_blocks) {
    trellis t;
    trellis_init(&t, L);
    int path[QK];
    volatile float sink = 0;
    const double t0 = now();
    for (int b = 0; b < n_blocks; ++b) {
        const float * xb = x + (size_t) b * QK;
        float ss = 0;
        for (int i = 0; i < QK; ++i) ss += xb[i] * xb[i];
        const float rms = sqrtf(ss / QK);
        float best = INFINITY;
        for (int c = 0; c < N_SCALES; ++c) {
            const float e = encode_block(&t, xb, (0.80f + 0.05f * c) * rms, path);
            best = fminf(best, e);
        }
        sink += best + path[0];
    }
    const double dt = now() - t0;
    (void) sink;
    free(t.code); free(t.cost); free(t.next); free(t.back);
    return 1e6 * dt / n_blocks;
}

int main(void) {
    const int n_blocks = 4096;
    float * x = malloc(sizeof(float) * QK * n_blocks);
    for (int i = 0; i < QK * n_blocks; ++i) x[i] = gauss();

    void * q = malloc(ggml_row_size(TQ2_0_TYPE, QK) * n_blocks);
    ggml_quantize_init(TQ2_0_TYPE);
    double t0 = now();
    for (int rep = 0; rep < 20; ++rep) {
        ggml_quantize_chunk(TQ2_0_TYPE, x, q, 0, n_blocks, QK, NULL);
    }
    const double tq = 1e6 * (now() - t0) / (20.0 * n_blocks);
    // the vector search against the plain one, and its path's error against its cost
    {
        trellis t;
        trellis_init(&t, 8);
        int path[QK];
        double worst = 0;
        for (int b = 0; b < 16; ++b) {
            const float * y = x + b * QK;
            const float e = viterbi(&t, y, b % 2 ? -1 : 17, path), r = viterbi_ref(&t, y, b % 2 ? -1 : 17);
            float pe = 0;
            for (int i = 0; i < QK; ++i) {
                pe += (y[i] - t.code[path[i]]) * (y[i] - t.code[path[i]]);
                worst = i > 0 && (path[i] >> 2) != (path[i - 1] & ((t.n - 1) >> 2)) ? 1e9 : worst;
            }
            worst = fmax(worst, fmax(fabs(e - r), fabs(pe - e)) / r);
        }
        printf("check (16 blocks, L = 8): largest relative difference of the vector search to the plain one "
               "and of its path's error to its cost: %.1e\n\n", worst);
        free(t.code); free(t.cost); free(t.next); free(t.back);
    }
    printf("| encoder | us per 64-value block | vs tq2_0 |\n|---|---:|---:|\n");
    printf("| tq2_0 (%s, ggml_quantize_chunk) | %.3f | 1x |\n", ggml_type_name(TQ2_0_TYPE), tq);
    for (int L = 8; L <= 12; L += 2) {
        const int nb = L == 12 ? 64 : L == 10 ? 256 : 1024;
        const double us = trellis_us_per_block(L, x, nb);
        printf("| trellis L = %d, tail-biting, %d scales | %.1f | %.0fx |\n", L, N_SCALES, us, us / tq);
    }
    free(x); free(q);
    return 0;
}
