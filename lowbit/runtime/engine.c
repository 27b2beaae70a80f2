/* The decode engine's C: one call runs the whole decoder for a chunk of tokens (see engine.py).
   
   Plain C with GCC/Clang vector extensions (8 floats), so the compiler emits AVX2/FMA/F16C code with
   the kernels' flags and portable code elsewhere. What it does not know is how a quantized linear is
   stored: each one is a kernel address from the generated library plus a prefilled `lb_args` (its
   weights, tiles, threads), and the engine only fills in x, y and m, so every format the kernel
   library supports runs here unchanged. Weights the engine reads itself (an unquantized head) are
   fp16 or bf16. Parallel work (attention over heads, fp GEMV over rows) runs on the kernel library's
   own thread pool (`lb_parallel`), so the process keeps one set of threads.
   
   Batched steps: the KV cache holds `slots` sequences ([slot][layer][kv head][max_ctx][hd], mapped
   lazily). One step takes segments {slot, pos0, n, want}: n tokens of one sequence at positions
   pos0.., several sequences side by side (decode: n = 1 each; a prefill chunk: n > 1). Every linear
   runs once over all the step's tokens (m rows: one pass over the weights for the whole batch), while
   RoPE, the KV writes and attention use each token's own slot and position. Rows within float
   rounding of running each sequence alone: a row's dot products do not depend on the other rows.

   Layer semantics, all taken from the HF model by engine.py: norms IN (before attention), ATTN_OUT
   (Gemma's sandwich norm after attention, optional), FFN_IN (before the MLP), FFN_OUT (optional), QN/KN
   (per-head QK-norm, optional); fused qkv / gate_up projections write one [m, q|k|v] row per token. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define EX __attribute__((visibility("default")))
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8u __attribute__((vector_size(16)));

#include "args.h"  /* lb_args: one call of a generated kernel (kernels/cpu/c) */
#include "tender_args.h"  /* lb_tender_args: a W·A· layer's integer kernel (kernels/cpu/c/tender.h) */
typedef void (*lb_kernel)(lb_args *);
typedef void (*lb_tender_kernel)(lb_tender_args *);
typedef void (*lb_task)(void *arg, int tid, int nthr);
typedef void (*lb_par)(lb_task fn, void *arg, int want);

enum { Q, K, V, O, GATE, UP, DOWN, NLIN };            /* fused: Q = qkv, GATE = gate_up; K/V/UP unused */
enum { IN, ATTN_OUT, FFN_IN, FFN_OUT, QN, KN, NNORM };
enum { ACT_SILU, ACT_GELU_TANH, ACT_GELU };
enum { DT_F32, DT_F16, DT_BF16, DT_I8 };  /* DT_I8: KV cache only, a scale per (token, kv head) */
enum { P_NORM, P_QKV, P_ROPE, P_ATTN, P_O, P_GATEUP, P_ACT, P_DOWN, P_HEAD, NPROF };
#define PREFILL_MIN_TOKENS 4  /* chunks from this size run the blocked prefill attention */
#define MIN_PAR_WORK (1 << 18)  /* multiply-adds below which waking the pool costs more than it saves */
#define MIN_PAR_ATTENTION (1 << 15)  /* decode attention follows the q/k/v linear, whose pool threads still spin: cheap to wake */
#define MIN_PAR_ROWS 4  /* steps of this many tokens split RoPE + KV writes and the gated activation by rows */

static inline v8 ld8(const float *p) { v8 v; memcpy(&v, p, 32); return v; }
static inline void st8(float *p, v8 v) { memcpy(p, &v, 32); }
static inline v8 bc8(float x) { return (v8){x, x, x, x, x, x, x, x}; }  /* one vbroadcastss */
#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif
#ifdef __F16C__  /* GCC scalarizes vector conversions from _Float16: use the F16C instruction */
static inline v8 ldh8(const _Float16 *p) { return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#else
static inline v8 ldh8(const _Float16 *p) { v8 v; for (int i = 0; i < 8; i++) v[i] = (float)p[i]; return v; }
#endif
/* int8 and bf16 to fp32: GCC's generic conversions of these vector types are scalarized (the int8
   cache's decode attention ran at half the fp16 cache's speed through them), so AVX2 uses intrinsics. */
#ifdef __AVX2__
static inline v8 ldc8(const int8_t *p) { return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline v8 ldb8(const uint16_t *p) {
    return (v8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
}
#else
static inline v8 ldc8(const int8_t *p) {
    typedef int8_t v8c __attribute__((vector_size(8)));
    v8c c; memcpy(&c, p, 8);
    return __builtin_convertvector(__builtin_convertvector(c, v8i), v8);
}
static inline v8 ldb8(const uint16_t *p) { v8u h; memcpy(&h, p, 16); return (v8)(__builtin_convertvector(h, v8i) << 16); }
#endif
static inline float hsum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
/* out[i] = hsum8(a_i), four at once (AVX: two rounds of pairwise adds and one of halves) */
static inline void hsum8x4(v8 a0, v8 a1, v8 a2, v8 a3, float *out) {
#ifdef __AVX__
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a0, (__m256)a1), _mm256_hadd_ps((__m256)a2, (__m256)a3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
#else
    out[0] = hsum8(a0); out[1] = hsum8(a1); out[2] = hsum8(a2); out[3] = hsum8(a3);
#endif
}
static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {  /* round to nearest even */
    uint32_t u; memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static double now_s(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static inline v8 vmin8(v8 a, v8 b) { v8i m = a < b; return (v8)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline v8 vmax8(v8 a, v8 b) { v8i m = a > b; return (v8)(((v8i)a & m) | ((v8i)b & ~m)); }

/* exp for 8 lanes: Cephes' expf (x = n ln2 + r, degree-6 polynomial), ~1 ulp on [-87, 88]. */
static inline v8 exp8(v8 x) {
    const v8 hi = {88.3f, 88.3f, 88.3f, 88.3f, 88.3f, 88.3f, 88.3f, 88.3f};
    x = vmin8(vmax8(x, -hi), hi);
    v8 t = x * 1.44269504088896341f + 12582912.0f;  /* round to nearest through the float mantissa */
    v8 n = t - 12582912.0f;
    v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = r * 1.9875691500E-4f + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f; p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f; p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8)e;
}

static inline float dot(const float *a, const float *b, int n) {
    v8 s0 = {0}, s1 = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16) { s0 += ld8(a + i) * ld8(b + i); s1 += ld8(a + i + 8) * ld8(b + i + 8); }
    for (; i + 8 <= n; i += 8) s0 += ld8(a + i) * ld8(b + i);
    float s = hsum8(s0 + s1);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

typedef struct {
    int n, k, kp;                   /* outputs, inputs, inputs padded to the kernel's row stride */
    lb_kernel gemv_fn, gemm_fn;     /* quantized kernels (NULL: fp weights below) */
    lb_args gemv, gemm;             /* their argument templates for 1 and for many tokens */
    const void *w; int wdt;         /* fp weights [n][k], DT_F16 or DT_BF16 */
    const float *bias;
    const int32_t *perm;            /* quantized only: the kernel's input is x[perm] (act-order columns), or NULL */
    lb_tender_kernel tender_fn;     /* activations quantized too (W·A·): this kernel instead, x as it is */
    lb_tender_args tender;          /* its argument template */
} eng_lin;

typedef struct {
    eng_lin lin[NLIN];
    const float *norm[NNORM]; float eps[NNORM];
    int fused_qkv, fused_gate_up, window, rope;
    float scale, softcap;
} eng_layer;

typedef struct {
    int layers, hidden, heads, kvh, hd, inter, vocab, max_ctx, half, act, kvdt, chunk, threads, max_threads, slots;
    int gemm_rows;                  /* fewer rows than this run the one-token kernel per row (see eng_set_gemm_rows) */
    float embed_scale, final_cap;
    const float *embed;
    eng_lin head; const float *final_norm; float final_eps;
    const float *cos[2], *sin[2];   /* [max_ctx][half] per RoPE table (Gemma 3: local and global) */
    char *kc, *vc; size_t kv_bytes; /* [slot][layer][kv head][max_ctx][hd] */
    float *ksc, *vsc; size_t sc_bytes; /* int8 cache: [slot][layer][kv head][max_ctx] scales (absmax / 127) */
    int *tslot, *tpos, *small;      /* per token of the step: its slot, its position; decode-attention rows */
    float *kv32; size_t kv32_bytes; /* prefill: one layer's K panels, then fp16/bf16 V as fp32 (kv_widen) */
    eng_layer *L;
    lb_par par;
    int profile; double prof[NPROF];
    float *x, *t, *qkv, *att, *o, *gu, *pad, *scores; size_t scores_per_thread;
} eng;

/* ---------- fp GEMV/GEMM over fp16 or bf16 weights, 4 rows at a time, rows split over threads ---------- */
typedef struct { const eng_lin *L; const float *x; int m; float *y; } fp_job;

#define FP_TASK(NAME, T, LD8, LD1)                                                                  \
static void NAME(void *p, int tid, int nthr) {                                                      \
    const fp_job *J = p; const eng_lin *L = J->L; const T *w = L->w; int n = L->n, k = L->k;        \
    int per = ((n + 3) / 4 + nthr - 1) / nthr * 4, lo = tid * per, hi = lo + per < n ? lo + per : n; \
    for (int r = lo; r < hi; r += 4) {                                                              \
        const T *w0 = w + (size_t)r * k, *w1 = w0 + (r + 1 < hi ? k : 0),                           \
                *w2 = w0 + (r + 2 < hi ? 2 * (size_t)k : 0), *w3 = w0 + (r + 3 < hi ? 3 * (size_t)k : 0); \
        for (int i = 0; i < J->m; i++) {                                                            \
            const float *x = J->x + (size_t)i * k;                                                  \
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                              \
            int c = 0;                                                                              \
            for (; c + 8 <= k; c += 8) {                                                            \
                v8 xv = ld8(x + c);                                                                 \
                a0 += xv * LD8(w0 + c); a1 += xv * LD8(w1 + c); a2 += xv * LD8(w2 + c); a3 += xv * LD8(w3 + c); \
            }                                                                                       \
            float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};                              \
            for (; c < k; c++) { s[0] += x[c] * LD1(w0[c]); s[1] += x[c] * LD1(w1[c]);              \
                                 s[2] += x[c] * LD1(w2[c]); s[3] += x[c] * LD1(w3[c]); }            \
            for (int j = 0; j < 4 && r + j < hi; j++)                                               \
                J->y[(size_t)i * n + r + j] = s[j] + (L->bias ? L->bias[r + j] : 0.0f);             \
        }                                                                                           \
    }                                                                                               \
}
#define H1(v) ((float)(v))
FP_TASK(fp_task_f16, _Float16, ldh8, H1)
FP_TASK(fp_task_bf16, uint16_t, ldb8, bf2f)

/* y[m][n] = x[m][k] · W^T + bias (x[m][perm] · W^T with a perm); x rows have stride k (copied to stride
   kp, gathered by perm, for the quantized kernels). */
static void linear(eng *E, const eng_lin *L, const float *x, int m, float *y) {
    if (L->tender_fn) {  /* it quantizes x itself (permuted, centred: its positions), one call for any m */
        lb_tender_args a = L->tender;
        a.m = m; a.x = x; a.y = y; a.threads = E->threads;
        L->tender_fn(&a);
        return;
    }
    if (L->gemv_fn) {
        if (L->kp != L->k || L->perm) {
            for (int i = 0; i < m; i++) {
                const float *src = x + (size_t)i * L->k;
                float *dst = E->pad + (size_t)i * L->kp;
                if (L->perm) for (int j = 0; j < L->k; j++) dst[j] = src[L->perm[j]];
                else memcpy(dst, src, sizeof(float) * L->k);
                memset(dst + L->k, 0, sizeof(float) * (L->kp - L->k));
            }
            x = E->pad;
        }
        if (m < E->gemm_rows) {  /* row by row through the one-token kernel */
            for (int i = 0; i < m; i++) {
                lb_args a = L->gemv;
                a.m = 1; a.x = (void *)(x + (size_t)i * L->kp); a.y = y + (size_t)i * L->n;
                L->gemv_fn(&a);
            }
            return;
        }
        lb_args a = L->gemm;
        a.m = m; a.x = (void *)x; a.y = y;
        L->gemm_fn(&a);
        return;
    }
    fp_job J = {L, x, m, y};
    long work = (long)L->n * L->k * m;
    E->par(L->wdt == DT_BF16 ? fp_task_bf16 : fp_task_f16, &J, work >= MIN_PAR_WORK ? E->threads : 1);
}

/* ---------- elementwise ---------- */
static void rmsnorm(const float *x, const float *w, float eps, int n, float *y) {
    v8 acc = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8) { v8 v = ld8(x + i); acc += v * v; }
    float ss = hsum8(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / n + eps);
    for (i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

static void rope(float *v, const float *c, const float *s, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
    }
}

/* out[i] = act(g[i]) * u[i] for n values (n padded to 8 through a small tail buffer) */
static inline v8 act8(int act, v8 x) {
    if (act == ACT_SILU) return x / (1.0f + exp8(-x));
    if (act == ACT_GELU_TANH) {
        v8 z = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + (1.0f - 2.0f / (exp8(2.0f * z) + 1.0f)));
    }
    for (int j = 0; j < 8; j++) x[j] = 0.5f * x[j] * (1.0f + erff(x[j] * 0.70710678118654752f));
    return x;
}

static void gated(int act, const float *g, const float *u, int n, float *out) {
    int i = 0;
    for (; i + 8 <= n; i += 8) st8(out + i, act8(act, ld8(g + i)) * ld8(u + i));
    if (i < n) {  /* the tail through a zero-padded block */
        float gb[8] = {0}, ub[8] = {0}, ob[8];
        memcpy(gb, g + i, sizeof(float) * (n - i)); memcpy(ub, u + i, sizeof(float) * (n - i));
        st8(ob, act8(act, ld8(gb)) * ld8(ub));
        memcpy(out + i, ob, sizeof(float) * (n - i));
    }
}

/* ---------- attention over the KV cache ---------- */
typedef struct { eng *E; int layer, m; const int *rows; const float *q; int ldq; float *out; } att_job;

#define KTILE 16  /* keys per Q·K^T tile */
#ifdef __AVX512F__
#define PV_HEADS 4  /* query heads per P·V pass: 4 x 4 accumulators + 4 V vectors fit 32 registers */
#else
#define PV_HEADS 2  /* 16 registers: 2 x 4 accumulators + 4 V vectors */
#endif

/* P·V for heads [h0, h0 + HN) over dims [d0, d0 + 32): each cached V row's 32 dims are converted once
   and meet the HN heads' probabilities (rows of sc, max_ctx apart) in HN x 4 register accumulators. */
#define PV_BLOCK(HN, T, LD8) do {                                                                   \
    v8 a_[HN][4];                                                                                   \
    for (int h = 0; h < HN; h++) a_[h][0] = a_[h][1] = a_[h][2] = a_[h][3] = (v8){0};               \
    const T *vr = vb + (size_t)lo * hd + d0;                                                        \
    for (int t = 0; t < len; t++, vr += hd) {                                                       \
        v8 w0 = LD8(vr), w1 = LD8(vr + 8), w2 = LD8(vr + 16), w3 = LD8(vr + 24);                    \
        for (int h = 0; h < HN; h++) {                                                              \
            v8 p = bc8(sc[(size_t)(h0 + h) * E->max_ctx + t]);                                      \
            a_[h][0] += p * w0; a_[h][1] += p * w1; a_[h][2] += p * w2; a_[h][3] += p * w3;         \
        }                                                                                           \
    }                                                                                               \
    for (int h = 0; h < HN; h++) {                                                                  \
        float *o = out + (size_t)(h0 + h) * hd + d0; v8 iv = bc8(1.0f / sum[h0 + h]);               \
        st8(o, a_[h][0] * iv); st8(o + 8, a_[h][1] * iv); st8(o + 16, a_[h][2] * iv); st8(o + 24, a_[h][3] * iv); \
    }                                                                                               \
} while (0)

/* One token's `nh` query heads (one KV group: they share every K and V row, converted to fp32 once)
   at position p against cached positions [lo, p]; sc holds nh rows of max_ctx scores. An int8 cache's
   row scales (ks, vs) multiply the scores and the probabilities, not the rows: one product per key. */
#define ATTEND(NAME, T, LD8, LD1, COPY)                                                             \
static void NAME(const eng *E, const eng_layer *Y, const T *kb, const T *vb, const float *ks,       \
                 const float *vs, int p, const float *q, int nh, float *out, float *sc) {           \
    int hd = E->hd, lo = Y->window > 0 && p - Y->window + 1 > 0 ? p - Y->window + 1 : 0, len = p - lo + 1; \
    float tile[KTILE * hd], sum[nh];                                                                \
    for (int t0 = 0; t0 < len; t0 += KTILE) {  /* Q·K^T: KTILE keys converted once, 4 dots at a time */ \
        int nt = len - t0 < KTILE ? len - t0 : KTILE;                                               \
        const T *kr = kb + (size_t)(lo + t0) * hd;                                                  \
        const float *kt = tile;  /* fp32 keys are read in place, others converted once per tile */ \
        if (COPY) {                                                                                 \
            int c = 0;                                                                              \
            for (; c + 8 <= nt * hd; c += 8) st8(tile + c, LD8(kr + c));                            \
            for (; c < nt * hd; c++) tile[c] = LD1(kr[c]);                                          \
        } else kt = (const float *)kr;                                                              \
        for (int h = 0; h < nh; h++) {                                                              \
            const float *qh = q + (size_t)h * hd; float *sh = sc + (size_t)h * E->max_ctx + t0;     \
            int j = 0;                                                                              \
            for (; hd % 8 == 0 && j + 4 <= nt; j += 4) {                                            \
                const float *k0 = kt + (size_t)j * hd;                                              \
                v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                          \
                for (int d = 0; d < hd; d += 8) {                                                   \
                    v8 x = ld8(qh + d);                                                             \
                    a0 += x * ld8(k0 + d); a1 += x * ld8(k0 + hd + d);                              \
                    a2 += x * ld8(k0 + 2 * hd + d); a3 += x * ld8(k0 + 3 * hd + d);                 \
                }                                                                                   \
                hsum8x4(a0, a1, a2, a3, sh + j);                                                    \
            }                                                                                       \
            for (; j < nt; j++) sh[j] = dot(qh, kt + (size_t)j * hd, hd);                           \
        }                                                                                           \
    }                                                                                               \
    for (int h = 0; h < nh; h++) {  /* scale, soft-cap, softmax (normalised after P·V) */           \
        float *sh = sc + (size_t)h * E->max_ctx, mx = -INFINITY; int t = 0;                         \
        if (Y->softcap > 0)                                                                         \
            for (; t < len; t++) {                                                                  \
                float v = tanhf(sh[t] * Y->scale * (ks ? ks[lo + t] : 1.0f) / Y->softcap) * Y->softcap; \
                sh[t] = v; mx = v > mx ? v : mx;                                                    \
            }                                                                                       \
        else {                                                                                      \
            v8 vm = bc8(-INFINITY), s8 = bc8(Y->scale);                                             \
            for (; t + 8 <= len; t += 8) {                                                          \
                v8 v = ld8(sh + t) * s8;                                                            \
                if (ks) v *= ld8(ks + lo + t);                                                      \
                st8(sh + t, v); vm = vmax8(vm, v);                                                  \
            }                                                                                       \
            for (int i = 0; i < 8; i++) mx = vm[i] > mx ? vm[i] : mx;                               \
            for (; t < len; t++) {                                                                  \
                float v = sh[t] * Y->scale * (ks ? ks[lo + t] : 1.0f);                              \
                sh[t] = v; mx = v > mx ? v : mx;                                                    \
            }                                                                                       \
        }                                                                                           \
        v8 acc = {0}; float tail = 0;                                                               \
        for (t = 0; t + 8 <= len; t += 8) {  /* int8 V: each row's scale goes into its probability */ \
            v8 e = exp8(ld8(sh + t) - mx); acc += e;                                                \
            st8(sh + t, vs ? e * ld8(vs + lo + t) : e);                                             \
        }                                                                                           \
        for (; t < len; t++) { float e = expf(sh[t] - mx); tail += e; sh[t] = vs ? e * vs[lo + t] : e; } \
        sum[h] = hsum8(acc) + tail;                                                                 \
    }                                                                                               \
    int d0 = 0;                                                                                     \
    for (; d0 + 32 <= hd; d0 += 32)                                                                 \
        for (int h0 = 0; h0 < nh; h0 += PV_HEADS)                                                   \
            switch (nh - h0 < PV_HEADS ? nh - h0 : PV_HEADS) {                                      \
            case 1: PV_BLOCK(1, T, LD8); break;                                                     \
            case 2: PV_BLOCK(2, T, LD8); break;                                                     \
            case 3: PV_BLOCK(3, T, LD8); break;                                                     \
            default: PV_BLOCK(PV_HEADS, T, LD8); break;                                             \
            }                                                                                       \
    for (int h = 0; h < nh; h++)  /* dims past the last multiple of 32 */                           \
        for (int d = d0; d < hd; d++) {                                                             \
            const float *sh = sc + (size_t)h * E->max_ctx; float a = 0;                             \
            for (int t = 0; t < len; t++) a += sh[t] * LD1(vb[(size_t)(lo + t) * hd + d]);          \
            out[(size_t)h * hd + d] = a / sum[h];                                                   \
        }                                                                                           \
}
#define F1(v) (v)
ATTEND(attend_f32, float, ld8, F1, 0)
ATTEND(attend_f16, _Float16, ldh8, H1, 1)
ATTEND(attend_bf16, uint16_t, ldb8, bf2f, 1)
#define C1(v) ((float)(v))
ATTEND(attend_i8, int8_t, ldc8, C1, 1)

static size_t kv_elt(int dt) { return dt == DT_F32 ? 4 : dt == DT_I8 ? 1 : 2; }

/* element offset of (slot, layer, kv head g, position 0) in a K or V cache */
static size_t kv_off(const eng *E, int slot, int layer, int g) {
    return (((size_t)slot * E->layers + layer) * E->kvh + g) * E->max_ctx * E->hd;
}

/* Item `it` of a decode attention job (token it / kvh, KV group it % kvh): prefetch its cached K and V
   rows into L2. A sequence's cache (a few MB over the layers) is read from DRAM every step in runs of a
   few KB per (layer, KV group), too short for the hardware prefetchers to ramp up on and cut at every
   4 KiB page: the thread asks for the next item's rows while it computes this one's (their first
   KV_PREFETCH bytes each: a long context's runs are long enough for the hardware, and L2 keeps this
   item's rows). */
#define KV_PREFETCH (32 << 10)
static void att_prefetch(const att_job *J, int it) {
    const eng *E = J->E; const eng_layer *Y = &E->L[J->layer];
    int i = J->rows[it / E->kvh], p = E->tpos[i], lo = Y->window > 0 && p - Y->window + 1 > 0 ? p - Y->window + 1 : 0;
    size_t elt = kv_elt(E->kvdt), off = (kv_off(E, E->tslot[i], J->layer, it % E->kvh) + (size_t)lo * E->hd) * elt;
    size_t bytes = (size_t)(p - lo + 1) * E->hd * elt;
    if (bytes > KV_PREFETCH) bytes = KV_PREFETCH;
    for (size_t b = 0; b < bytes; b += 64) { __builtin_prefetch(E->kc + off + b, 0, 2); __builtin_prefetch(E->vc + off + b, 0, 2); }
}

static void att_task(void *p, int tid, int nthr) {
    const att_job *J = p; const eng *E = J->E; const eng_layer *Y = &E->L[J->layer];
    int nt = nthr < E->max_threads ? nthr : E->max_threads;  /* one scores block per thread */
    if (tid >= nt) return;
    int items = J->m * E->kvh, hd = E->hd, grp = E->heads / E->kvh;
    float *sc = E->scores + (size_t)tid * E->scores_per_thread;
    if (tid < items) att_prefetch(J, tid);
    for (int it = tid; it < items; it += nt) {  /* interleaved: later tokens attend to more positions */
        if (it + nt < items) att_prefetch(J, it + nt);
        int i = J->rows[it / E->kvh], g = it % E->kvh;
        size_t off = kv_off(E, E->tslot[i], J->layer, g) * kv_elt(E->kvdt);
        const float *q = J->q + (size_t)i * J->ldq + (size_t)g * grp * hd;
        float *out = J->out + ((size_t)i * E->heads + (size_t)g * grp) * hd;
        int p = E->tpos[i];
        const char *kb = E->kc + off, *vb = E->vc + off;
        if (E->kvdt == DT_F32) attend_f32(E, Y, (const float *)kb, (const float *)vb, NULL, NULL, p, q, grp, out, sc);
        else if (E->kvdt == DT_F16) attend_f16(E, Y, (const _Float16 *)kb, (const _Float16 *)vb, NULL, NULL, p, q, grp, out, sc);
        else if (E->kvdt == DT_BF16) attend_bf16(E, Y, (const uint16_t *)kb, (const uint16_t *)vb, NULL, NULL, p, q, grp, out, sc);
        else {
            size_t row = kv_off(E, E->tslot[i], J->layer, g) / hd;
            attend_i8(E, Y, (const int8_t *)kb, (const int8_t *)vb, E->ksc + row, E->vsc + row, p, q, grp, out, sc);
        }
    }
}

/* ---------- prefill attention: blocks of queries against K panels ----------
   A prefill of m tokens reads every cached K and V row m times, so the layer's rows [0, n) are first
   widened once into kv32: K as panels of KP keys ([t / KP][hd][KP], fp32: KP scores are two vectors
   and need no horizontal sums), V as fp32 rows (fp16/bf16 caches only; fp32 V is read in place).
   A work item is QB tokens × the GQA group's heads (R query rows sharing every K and V row) against
   one KV group: scores in 6-row × 16-key register tiles, softmax per row (its own causal and window
   range), then P·V in 3-row × 32-dim tiles. Items go to threads from a shared counter, longest first. */
#define KP 16
#define SROWS 6   /* query rows per scores tile */
#define VROWS 3   /* query rows per P·V tile */

static int pf_tokens(int grp) { return grp >= 12 ? 1 : 12 / grp; }
static int pf_rows(int grp) { int r = pf_tokens(grp) * grp; return (r + SROWS - 1) / SROWS * SROWS; }
static int ctx_pad(int n) { return (n + KP - 1) / KP * KP; }

/* cnt cached values (whole rows) from element `off` of a K or V cache (`base`, E->kvdt; `scales`:
   its int8 row scales) to fp32 in dst */
static void kv_to_f32(const eng *E, const char *base, const float *scales, size_t off, size_t cnt, float *dst) {
    size_t c = 0;
    if (E->kvdt == DT_F32) memcpy(dst, (const float *)base + off, sizeof(float) * cnt);
    else if (E->kvdt == DT_I8) {
        const int8_t *src = (const int8_t *)base + off;
        for (; c < cnt; c += E->hd) {
            float s = scales[(off + c) / E->hd];
            for (int d = 0; d < E->hd; d++) dst[c + d] = src[c + d] * s;
        }
    }
    else if (E->kvdt == DT_F16) {
        const _Float16 *src = (const _Float16 *)base + off;
        for (; c + 8 <= cnt; c += 8) st8(dst + c, ldh8(src + c));
        for (; c < cnt; c++) dst[c] = H1(src[c]);
    } else {
        const uint16_t *src = (const uint16_t *)base + off;
        for (; c < cnt; c++) dst[c] = bf2f(src[c]);
    }
}

static void kv_widen(const eng *E, int slot, int layer, int n) {
    int hd = E->hd;
    size_t row = (size_t)E->max_ctx * hd, pan = (size_t)ctx_pad(E->max_ctx) * hd;
    float k[hd];
    for (int g = 0; g < E->kvh; g++) {
        size_t off = kv_off(E, slot, layer, g);
        float *kp = E->kv32 + (size_t)g * pan;
        for (int t = 0; t < ctx_pad(n); t++) {  /* the last panel's missing keys are 0 */
            if (t < n) kv_to_f32(E, E->kc, E->ksc, off + (size_t)t * hd, hd, k);
            else memset(k, 0, sizeof k);
            for (int d = 0; d < hd; d++) kp[((size_t)(t / KP) * hd + d) * KP + t % KP] = k[d];
        }
        if (E->kvdt != DT_F32) kv_to_f32(E, E->vc, E->vsc, off, (size_t)n * hd, E->kv32 + (size_t)E->kvh * pan + (size_t)g * row);
    }
}

typedef struct { eng *E; int layer, slot, m, pos0, nqb; const float *q; int ldq; float *out; int next; } pf_job;

/* sc[r][0, KP * npan) = Q rows r (qb: [R][hd], R a multiple of SROWS) · K panels [0, npan) */
static void pf_scores(const float *qb, int R, const float *kp, int hd, int npan, float *sc, int lds) {
    for (int pn = 0; pn < npan; pn++) {
        const float *k = kp + (size_t)pn * hd * KP;
        for (int r0 = 0; r0 < R; r0 += SROWS) {
            v8 a[SROWS][2] = {{{0}}};
            const float *q = qb + (size_t)r0 * hd;
            for (int d = 0; d < hd; d++) {
                v8 k0 = ld8(k + d * KP), k1 = ld8(k + d * KP + 8);
#pragma GCC unroll 6
                for (int r = 0; r < SROWS; r++) { v8 b = bc8(q[(size_t)r * hd + d]); a[r][0] += b * k0; a[r][1] += b * k1; }
            }
            for (int r = 0; r < SROWS; r++) {
                st8(sc + (size_t)(r0 + r) * lds + pn * KP, a[r][0]); st8(sc + (size_t)(r0 + r) * lds + pn * KP + 8, a[r][1]);
            }
        }
    }
}

/* Row s[0, n): scale, soft-cap, softmax over [a, b) in place, zero elsewhere; returns 1 / sum. */
static float pf_softmax(const eng_layer *Y, float *s, int a, int b, int n) {
    int t;
    if (Y->softcap > 0) for (t = a; t < b; t++) s[t] = tanhf(s[t] * Y->scale / Y->softcap) * Y->softcap;
    else for (t = a; t < b; t++) s[t] *= Y->scale;
    v8 m8 = bc8(-INFINITY);
    for (t = a; t + 8 <= b; t += 8) m8 = vmax8(m8, ld8(s + t));
    float mx = -INFINITY;
    for (int j = 0; j < 8; j++) mx = m8[j] > mx ? m8[j] : mx;
    for (; t < b; t++) mx = s[t] > mx ? s[t] : mx;
    memset(s, 0, sizeof(float) * a);
    memset(s + b, 0, sizeof(float) * (n - b));
    v8 sum8 = {0};
    for (t = a; t + 8 <= b; t += 8) { v8 e = exp8(ld8(s + t) - mx); st8(s + t, e); sum8 += e; }
    float sum = hsum8(sum8);
    for (; t < b; t++) { s[t] = expf(s[t] - mx); sum += s[t]; }
    return 1.0f / sum;
}

/* o[r] = inv[r] · Σ_t s[r][t] v[t] for VROWS rows over t in [a, b); v rows of hd floats. */
static void pf_pv(const float *s, int lds, const float *inv, const float *v, int hd, int a, int b, float *o[VROWS]) {
    const float *s0 = s, *s1 = s + lds, *s2 = s + 2 * (size_t)lds;
    int d0 = 0;
    for (; d0 + 32 <= hd; d0 += 32) {
        v8 c[VROWS][4] = {{{0}}};
        for (int t = a; t < b; t++) {
            const float *vr = v + (size_t)t * hd + d0;
            v8 w0 = ld8(vr), w1 = ld8(vr + 8), w2 = ld8(vr + 16), w3 = ld8(vr + 24);
            v8 p0 = bc8(s0[t]), p1 = bc8(s1[t]), p2 = bc8(s2[t]);
            c[0][0] += p0 * w0; c[0][1] += p0 * w1; c[0][2] += p0 * w2; c[0][3] += p0 * w3;
            c[1][0] += p1 * w0; c[1][1] += p1 * w1; c[1][2] += p1 * w2; c[1][3] += p1 * w3;
            c[2][0] += p2 * w0; c[2][1] += p2 * w1; c[2][2] += p2 * w2; c[2][3] += p2 * w3;
        }
        for (int r = 0; r < VROWS; r++)
            if (o[r]) for (int j = 0; j < 4; j++) st8(o[r] + d0 + 8 * j, c[r][j] * inv[r]);
    }
    for (; d0 + 8 <= hd; d0 += 8) {
        v8 c[VROWS] = {{0}};
        for (int t = a; t < b; t++) {
            v8 w = ld8(v + (size_t)t * hd + d0), p0 = bc8(s0[t]), p1 = bc8(s1[t]), p2 = bc8(s2[t]);
            c[0] += p0 * w; c[1] += p1 * w; c[2] += p2 * w;
        }
        for (int r = 0; r < VROWS; r++) if (o[r]) st8(o[r] + d0, c[r] * inv[r]);
    }
    for (; d0 < hd; d0++)
        for (int r = 0; r < VROWS; r++) {
            float c = 0;
            for (int t = a; t < b; t++) c += s[(size_t)r * lds + t] * v[(size_t)t * hd + d0];
            if (o[r]) o[r][d0] = c * inv[r];
        }
}

static void pf_task(void *p, int tid, int nthr) {
    pf_job *J = p; const eng *E = J->E; const eng_layer *Y = &E->L[J->layer];
    if (tid >= E->max_threads) return;
    int hd = E->hd, grp = E->heads / E->kvh, qt = pf_tokens(grp), R = pf_rows(grp), n = J->pos0 + J->m;
    int lds = ctx_pad(n);
    size_t pan = (size_t)ctx_pad(E->max_ctx) * hd;
    float *qb = E->scores + (size_t)tid * E->scores_per_thread, *sc = qb + (size_t)R * hd, inv[R];
    int lo[R], hi[R];
    for (;;) {
        int it = __atomic_fetch_add(&J->next, 1, __ATOMIC_RELAXED);
        if (it >= J->nqb * E->kvh) return;
        int b = J->nqb - 1 - it / E->kvh, g = it % E->kvh, i0 = b * qt, nq = J->m - i0 < qt ? J->m - i0 : qt;
        int rows = nq * grp, last = J->pos0 + i0 + nq - 1;
        int first = Y->window > 0 && J->pos0 + i0 - Y->window + 1 > 0 ? J->pos0 + i0 - Y->window + 1 : 0;
        int t0 = first / KP * KP;  /* the block's keys: [t0, last] */
        memset(qb, 0, sizeof(float) * R * hd);
        for (int r = 0; r < rows; r++)
            memcpy(qb + (size_t)r * hd, J->q + (size_t)(i0 + r / grp) * J->ldq + (size_t)(g * grp + r % grp) * hd, sizeof(float) * hd);
        int npan = (last - t0) / KP + 1;
        pf_scores(qb, R, E->kv32 + (size_t)g * pan + (size_t)t0 * hd, hd, npan, sc, lds);
        for (int r = 0; r < R; r++) {
            int pos = J->pos0 + i0 + r / grp, a = Y->window > 0 && pos - Y->window + 1 > 0 ? pos - Y->window + 1 : 0;
            lo[r] = a - t0; hi[r] = r < rows ? pos + 1 - t0 : lo[r];
            inv[r] = r < rows ? pf_softmax(Y, sc + (size_t)r * lds, lo[r], hi[r], npan * KP) : 0;
        }
        const float *v = E->kvdt == DT_F32
            ? (const float *)E->vc + kv_off(E, J->slot, J->layer, g)
            : E->kv32 + (size_t)E->kvh * pan + (size_t)g * E->max_ctx * hd;
        for (int r0 = 0; r0 < rows; r0 += VROWS) {
            float *o[VROWS];
            int a = lo[r0], e = hi[r0];
            for (int r = r0; r < r0 + VROWS; r++) {
                o[r - r0] = r < rows ? J->out + ((size_t)(i0 + r / grp) * E->heads + (size_t)g * grp + r % grp) * hd : NULL;
                if (r < rows) { a = lo[r] < a ? lo[r] : a; e = hi[r] > e ? hi[r] : e; }
            }
            pf_pv(sc + (size_t)r0 * lds, lds, inv + r0, v + (size_t)t0 * hd, hd, a, e, o);
        }
    }
}

/* segs: nseg x {slot, pos0, n, want}, their tokens in order as the step's rows. Short segments (decode
   tokens) attend together in one parallel pass; each longer one (a prefill chunk) runs the blocked path. */
static void attention(eng *E, int l, const int *segs, int nseg, const float *q, int ldq) {
    int nsmall = 0, row = 0;
    long work = 0;
    for (int s = 0; s < nseg; row += segs[4 * s + 2], s++) {
        int pos0 = segs[4 * s + 1], n = segs[4 * s + 2];
        if (n >= PREFILL_MIN_TOKENS) continue;
        for (int i = 0; i < n; i++) E->small[nsmall++] = row + i;
        work += (long)n * E->heads * (pos0 + n) * E->hd;
    }
    if (nsmall) {
        att_job J = {E, l, nsmall, E->small, q, ldq, E->att};
        E->par(att_task, &J, work >= MIN_PAR_ATTENTION ? E->threads : 1);
    }
    row = 0;
    for (int s = 0; s < nseg; row += segs[4 * s + 2], s++) {
        int slot = segs[4 * s], pos0 = segs[4 * s + 1], m = segs[4 * s + 2];
        if (m < PREFILL_MIN_TOKENS) continue;
        kv_widen(E, slot, l, pos0 + m);
        int qt = pf_tokens(E->heads / E->kvh);
        pf_job J = {E, l, slot, m, pos0, (m + qt - 1) / qt, q + (size_t)row * ldq, ldq,
                    E->att + (size_t)row * E->heads * E->hd, 0};
        work = (long)m * E->heads * (pos0 + m) * E->hd;
        E->par(pf_task, &J, work >= MIN_PAR_WORK ? E->threads : 1);
    }
}

static void kv_store(const eng *E, char *base, float *scales, int slot, int layer, int g, int pos, const float *v) {
    size_t idx = kv_off(E, slot, layer, g) + (size_t)pos * E->hd;
    if (E->kvdt == DT_F32) memcpy((float *)base + idx, v, sizeof(float) * E->hd);
    else if (E->kvdt == DT_I8) {  /* symmetric, one scale per row: absmax / 127 */
        float amax = 0;
        for (int d = 0; d < E->hd; d++) amax = fabsf(v[d]) > amax ? fabsf(v[d]) : amax;
        float s = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0;
        scales[idx / E->hd] = s;
        for (int d = 0; d < E->hd; d++) ((int8_t *)base)[idx + d] = (int8_t)lrintf(v[d] * inv);
    }
    else if (E->kvdt == DT_F16) {
        int d = 0;
#ifdef __F16C__
        for (; d + 8 <= E->hd; d += 8)
            _mm_storeu_si128((__m128i *)((_Float16 *)base + idx + d), _mm256_cvtps_ph(_mm256_loadu_ps(v + d), 0));
#endif
        for (; d < E->hd; d++) ((_Float16 *)base)[idx + d] = (_Float16)v[d];
    }
    else for (int d = 0; d < E->hd; d++) ((uint16_t *)base)[idx + d] = f2bf(v[d]);
}

/* ---------- the model ---------- */
#define TIC double t0_ = E->profile ? now_s() : 0
#define TOC(slot) do { if (E->profile) { double t1_ = now_s(); E->prof[slot] += t1_ - t0_; t0_ = t1_; } } while (0)

static void norm_rows(const eng_layer *Y, int slot, float *x, int m, int n, float *y) {
    for (int i = 0; i < m; i++) rmsnorm(x + (size_t)i * n, Y->norm[slot], Y->eps[slot], n, y + (size_t)i * n);
}

/* Per-token work between the linears, split over the pool by tokens (each_row) from MIN_PAR_ROWS on: a
   decode batch's rows are independent (own position, own KV slot), and on one core this work (~6% of
   an 8-row step's CPU time) would leave the other idle. */
typedef struct rows_job rows_job;
struct rows_job { eng *E; int l, m; float *q, *k, *v; int ldq, ldk; void (*row)(const rows_job *, int); };

static void rows_task(void *p, int tid, int nthr) {
    const rows_job *J = p;
    int per = (J->m + nthr - 1) / nthr, hi = (tid + 1) * per < J->m ? (tid + 1) * per : J->m;
    for (int i = tid * per; i < hi; i++) J->row(J, i);
}

static void each_row(rows_job J, void (*row)(const rows_job *, int)) {
    J.row = row;
    J.E->par(rows_task, &J, J.m >= MIN_PAR_ROWS ? J.E->threads : 1);
}

/* Token i: QK-norm and RoPE of its query and key heads, its K and V into its slot at its position. */
static void rope_kv_row(const rows_job *J, int i) {
    const eng *E = J->E; const eng_layer *Y = &E->L[J->l];
    int hd = E->hd, p = E->tpos[i];
    const float *cs = E->cos[Y->rope] + (size_t)p * E->half, *sn = E->sin[Y->rope] + (size_t)p * E->half;
    for (int h = 0; h < E->heads; h++) {
        float *qh = J->q + (size_t)i * J->ldq + (size_t)h * hd;
        if (Y->norm[QN]) rmsnorm(qh, Y->norm[QN], Y->eps[QN], hd, qh);
        rope(qh, cs, sn, E->half);
    }
    for (int g = 0; g < E->kvh; g++) {
        float *kh = J->k + (size_t)i * J->ldk + (size_t)g * hd;
        if (Y->norm[KN]) rmsnorm(kh, Y->norm[KN], Y->eps[KN], hd, kh);
        rope(kh, cs, sn, E->half);
        kv_store(E, E->kc, E->ksc, E->tslot[i], J->l, g, p, kh);
        kv_store(E, E->vc, E->vsc, E->tslot[i], J->l, g, p, J->v + (size_t)i * J->ldk + (size_t)g * hd);
    }
}

/* Token i's gated activation: gate row q + i·ldq, up row k + i·ldk, into E->t. */
static void gated_row(const rows_job *J, int i) {
    gated(J->E->act, J->q + (size_t)i * J->ldq, J->k + (size_t)i * J->ldk, J->E->inter, J->E->t + (size_t)i * J->E->inter);
}

static void layer_forward(eng *E, int l, int m, const int *segs, int nseg) {
    eng_layer *Y = &E->L[l];
    int H = E->hidden, hd = E->hd, nq = E->heads * hd, nk = E->kvh * hd, I = E->inter;
    TIC;
    norm_rows(Y, IN, E->x, m, H, E->t);
    TOC(P_NORM);
    float *q, *k, *v; int ldq, ldk;
    if (Y->fused_qkv) {
        linear(E, &Y->lin[Q], E->t, m, E->qkv);
        q = E->qkv; k = q + nq; v = k + nk; ldq = ldk = nq + 2 * nk;
    } else {
        q = E->qkv; k = q + (size_t)m * nq; v = k + (size_t)m * nk; ldq = nq; ldk = nk;
        linear(E, &Y->lin[Q], E->t, m, q);
        linear(E, &Y->lin[K], E->t, m, k);
        linear(E, &Y->lin[V], E->t, m, v);
    }
    TOC(P_QKV);
    each_row((rows_job){E, l, m, q, k, v, ldq, ldk, NULL}, rope_kv_row);
    TOC(P_ROPE);
    attention(E, l, segs, nseg, q, ldq);
    TOC(P_ATTN);
    linear(E, &Y->lin[O], E->att, m, E->o);
    if (Y->norm[ATTN_OUT]) norm_rows(Y, ATTN_OUT, E->o, m, H, E->o);
    for (size_t i = 0; i < (size_t)m * H; i++) E->x[i] += E->o[i];
    TOC(P_O);
    norm_rows(Y, FFN_IN, E->x, m, H, E->t);
    TOC(P_NORM);
    float *g, *u; int ldg;
    if (Y->fused_gate_up) {
        linear(E, &Y->lin[GATE], E->t, m, E->gu);
        g = E->gu; u = g + I; ldg = 2 * I;
    } else {
        g = E->gu; u = g + (size_t)m * I; ldg = I;
        linear(E, &Y->lin[GATE], E->t, m, g);
        linear(E, &Y->lin[UP], E->t, m, u);
    }
    TOC(P_GATEUP);
    each_row((rows_job){E, l, m, g, u, NULL, ldg, ldg, NULL}, gated_row);
    TOC(P_ACT);
    linear(E, &Y->lin[DOWN], E->t, m, E->o);
    if (Y->norm[FFN_OUT]) norm_rows(Y, FFN_OUT, E->o, m, H, E->o);
    for (size_t i = 0; i < (size_t)m * H; i++) E->x[i] += E->o[i];
    TOC(P_DOWN);
}

/* One step over segs (nseg x {slot, pos0, n, want}; their tokens `ids` in order, m in all, m <= chunk).
   logits: a row per segment with want 1 (its last token) and per token of a segment with want 2, in
   segment order; states: every token's final-normed hidden state [m][hidden] (when not NULL). */
static void step(eng *E, const int32_t *ids, const int *segs, int nseg, float *logits, float *states) {
    int H = E->hidden, m = 0;
    for (int s = 0; s < nseg; s++)
        for (int j = 0; j < segs[4 * s + 2]; j++, m++) {
            E->tslot[m] = segs[4 * s]; E->tpos[m] = segs[4 * s + 1] + j;
            const float *row = E->embed + (size_t)ids[m] * H;
            for (int c = 0; c < H; c++) E->x[(size_t)m * H + c] = row[c] * E->embed_scale;
        }
    for (int l = 0; l < E->layers; l++) layer_forward(E, l, m, segs, nseg);
    if (states)
        for (int i = 0; i < m; i++) rmsnorm(E->x + (size_t)i * H, E->final_norm, E->final_eps, H, states + (size_t)i * H);
    if (!logits) return;
    TIC;
    int rows = 0, row = 0;
    for (int s = 0; s < nseg; row += segs[4 * s + 2], s++) {
        int n = segs[4 * s + 2], want = segs[4 * s + 3];
        for (int i = want == 2 ? 0 : want == 1 ? n - 1 : n; i < n; i++, rows++)
            rmsnorm(E->x + (size_t)(row + i) * H, E->final_norm, E->final_eps, H, E->t + (size_t)rows * H);
    }
    if (rows) linear(E, &E->head, E->t, rows, logits);
    if (E->final_cap > 0)
        for (size_t j = 0; j < (size_t)rows * E->vocab; j++) logits[j] = tanhf(logits[j] / E->final_cap) * E->final_cap;
    TOC(P_HEAD);
}

/* Append n tokens to slot 0 at positions pos0.. (the caller checked pos0 + n <= max_ctx); logits of
   the last (when `logits` is not NULL), and every position's final-normed hidden state [n][hidden]
   (when `states` is not NULL: evaluation applies the output head to all of them itself). */
EX void eng_forward(eng *E, const int32_t *ids, int n, int pos0, float *logits, float *states) {
    for (int c0 = 0; c0 < n; c0 += E->chunk) {
        int m = n - c0 < E->chunk ? n - c0 : E->chunk, last = c0 + m == n && logits;
        int seg[4] = {0, pos0 + c0, m, last};
        step(E, ids + c0, seg, 1, last ? logits : NULL, states ? states + (size_t)c0 * E->hidden : NULL);
    }
}

/* One batched step (see step); returns 0, or -1 (nothing run) for segments out of range. */
EX int eng_step(eng *E, const int32_t *ids, const int *segs, int nseg, float *logits) {
    int m = 0;
    for (int s = 0; s < nseg; s++) {
        int slot = segs[4 * s], pos0 = segs[4 * s + 1], n = segs[4 * s + 2], want = segs[4 * s + 3];
        if (slot < 0 || slot >= E->slots || pos0 < 0 || n < 1 || pos0 + n > E->max_ctx || want < 0 || want > 2) return -1;
        for (int t = 0; t < n; t++) if (ids[m + t] < 0 || ids[m + t] >= E->vocab) return -1;
        m += n;
    }
    if (nseg < 1 || m > E->chunk) return -1;
    step(E, ids, segs, nseg, logits, NULL);
    return 0;
}

/* Copy positions [0, n) of slot src's keys and values into slot dst (a shared prefix, n > 1 choices). */
EX void eng_copy(eng *E, int src, int dst, int n) {
    size_t bytes = (size_t)n * E->hd * kv_elt(E->kvdt);
    for (int l = 0; l < E->layers; l++)
        for (int g = 0; g < E->kvh; g++) {
            size_t from = kv_off(E, src, l, g) * kv_elt(E->kvdt), to = kv_off(E, dst, l, g) * kv_elt(E->kvdt);
            memcpy(E->kc + to, E->kc + from, bytes);
            memcpy(E->vc + to, E->vc + from, bytes);
            if (E->kvdt == DT_I8) {
                size_t a = kv_off(E, src, l, g) / E->hd, b = kv_off(E, dst, l, g) / E->hd;
                memcpy(E->ksc + b, E->ksc + a, sizeof(float) * n);
                memcpy(E->vsc + b, E->vsc + a, sizeof(float) * n);
            }
        }
}

/* ---------- building ---------- */
/* Anonymous memory, zero until written. `huge`: in transparent huge pages (weights, read whole at ~2x
   the bandwidth of 4 KiB pages). Not huge: the KV cache, written a few positions at a time in regions of
   max_ctx positions per (slot, layer, kv head): a 2 MiB page would be faulted in whole by a region's
   first token, so short requests on many slots would hold the whole cache (8 slots of SmolLM2 at 8k
   context: 720 MiB for 40 tokens each). In 4 KiB pages the cache's memory follows the tokens held. */
static void *map_anon(size_t bytes, int huge) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#if defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
    madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#endif
    return p;
}

EX void *eng_arena(size_t bytes) { return map_anon(bytes, 1); }
EX void eng_arena_free(void *p, size_t bytes) { if (p) munmap(p, bytes); }

EX void eng_free(eng *E) {
    if (!E) return;
    if (E->kc) munmap(E->kc, E->kv_bytes);
    if (E->vc) munmap(E->vc, E->kv_bytes);
    if (E->ksc) munmap(E->ksc, E->sc_bytes);
    if (E->vsc) munmap(E->vsc, E->sc_bytes);
    if (E->kv32) munmap(E->kv32, E->kv32_bytes);
    free(E->L); free(E->x); free(E->t); free(E->qkv); free(E->att); free(E->o); free(E->gu); free(E->pad);
    free(E->scores); free(E->tslot); free(E->tpos); free(E->small); free(E);
}

EX eng *eng_new(int layers, int hidden, int heads, int kvh, int hd, int inter, int vocab, int max_ctx,
                int half, int act, int kvdt, int chunk, int max_kp, int max_threads, int slots, float embed_scale,
                float final_cap, const float *embed, void *par) {
    eng *E = calloc(1, sizeof(eng));
    if (!E) return NULL;
    *E = (eng){.layers = layers, .hidden = hidden, .heads = heads, .kvh = kvh, .hd = hd, .inter = inter,
               .vocab = vocab, .max_ctx = max_ctx, .half = half, .act = act, .kvdt = kvdt, .chunk = chunk,
               .threads = 1, .max_threads = max_threads, .slots = slots, .gemm_rows = 2, .embed_scale = embed_scale, .final_cap = final_cap, .embed = embed, .par = (lb_par)par};
    E->L = calloc(layers, sizeof(eng_layer));
    E->kv_bytes = (size_t)slots * layers * kvh * max_ctx * hd * kv_elt(kvdt);
    E->kc = map_anon(E->kv_bytes, 0); E->vc = map_anon(E->kv_bytes, 0);
    if (kvdt == DT_I8) {
        E->sc_bytes = sizeof(float) * slots * layers * kvh * max_ctx;
        E->ksc = map_anon(E->sc_bytes, 0); E->vsc = map_anon(E->sc_bytes, 0);
        if (!E->ksc || !E->vsc) { eng_free(E); return NULL; }
    }
    E->kv32_bytes = sizeof(float) * kvh * hd * ((size_t)ctx_pad(max_ctx) + (kvdt == DT_F32 ? 0 : max_ctx));
    E->kv32 = map_anon(E->kv32_bytes, 1);  /* one sequence's prefill panels, reused */
    size_t nq = (size_t)heads * hd, nk = (size_t)kvh * hd, big = hidden > inter ? hidden : inter;
    E->x = malloc(sizeof(float) * chunk * hidden);
    E->t = malloc(sizeof(float) * chunk * (big > nq ? big : nq));
    E->qkv = malloc(sizeof(float) * chunk * (nq + 2 * nk));
    E->att = malloc(sizeof(float) * chunk * nq);
    E->o = malloc(sizeof(float) * chunk * hidden);
    E->gu = malloc(sizeof(float) * chunk * 2 * inter);
    E->pad = malloc(sizeof(float) * chunk * max_kp);
    E->scores_per_thread = (size_t)pf_rows(heads / kvh) * (hd + ctx_pad(max_ctx));  /* >= grp x max_ctx */
    E->scores = malloc(sizeof(float) * max_threads * E->scores_per_thread);
    E->tslot = malloc(sizeof(int) * chunk); E->tpos = malloc(sizeof(int) * chunk); E->small = malloc(sizeof(int) * chunk);
    if (!E->tslot || !E->tpos || !E->small || !E->L || !E->kc || !E->vc || !E->kv32 || !E->x || !E->t || !E->qkv || !E->att || !E->o || !E->gu || !E->pad || !E->scores) {
        eng_free(E);
        return NULL;
    }
    return E;
}

/* layer -1 = the output head (slot ignored); perm: see eng_lin */
EX void eng_set_linear(eng *E, int layer, int slot, int n, int k, int kp, void *gemv_fn, const lb_args *gemv,
                       void *gemm_fn, const lb_args *gemm, const void *w, int wdt, const float *bias,
                       const int32_t *perm) {
    eng_lin *L = layer < 0 ? &E->head : &E->L[layer].lin[slot];
    *L = (eng_lin){.n = n, .k = k, .kp = kp, .gemv_fn = (lb_kernel)gemv_fn, .gemm_fn = (lb_kernel)gemm_fn,
                   .w = w, .wdt = wdt, .bias = bias, .perm = perm};
    if (gemv) L->gemv = *gemv;
    if (gemm) L->gemm = *gemm;
}

/* A W·A· linear: its integer kernel and prefilled args (x, y, m and threads set per call). */
EX void eng_set_tender(eng *E, int layer, int slot, int n, int k, void *fn, const lb_tender_args *args) {
    eng_lin *L = &E->L[layer].lin[slot];
    *L = (eng_lin){.n = n, .k = k, .kp = k, .tender_fn = (lb_tender_kernel)fn, .tender = *args};
}

/* layer -1 = the final norm */
EX void eng_set_norm(eng *E, int layer, int slot, const float *w, float eps) {
    if (layer < 0) { E->final_norm = w; E->final_eps = eps; return; }
    E->L[layer].norm[slot] = w; E->L[layer].eps[slot] = eps;
}

EX void eng_set_layer(eng *E, int layer, int fused_qkv, int fused_gate_up, int window, int rope, float scale,
                      float softcap) {
    eng_layer *Y = &E->L[layer];
    Y->fused_qkv = fused_qkv; Y->fused_gate_up = fused_gate_up; Y->window = window; Y->rope = rope;
    Y->scale = scale; Y->softcap = softcap;
}

EX void eng_set_rope(eng *E, int table, const float *cos, const float *sin) { E->cos[table] = cos; E->sin[table] = sin; }
EX void eng_set_threads(eng *E, int n) { E->threads = n; }
/* Steps of fewer than `rows` tokens run quantized linears one row at a time through the one-token
   kernel (its exact numerics, and faster than a GEMM built for prefill at a few rows); from `rows` on,
   one GEMM call reads the weights once for all rows. */
EX void eng_set_gemm_rows(eng *E, int rows) { E->gemm_rows = rows > 2 ? rows : 2; }

/* on: start counting (zeroed); out: seconds per op so far (NPROF values) */
EX int eng_profile(eng *E, int on, double *out) {
    if (out) memcpy(out, E->prof, sizeof E->prof);
    if (on >= 0) { E->profile = on; memset(E->prof, 0, sizeof E->prof); }
    return NPROF;
}
