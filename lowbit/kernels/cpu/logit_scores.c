/* Per-row scores of a window's logits for evaluation (logit_scores.py, eval/metrics.py).

   Row r of the model's logits zm (and of the source's, zs), target t = target[r]:
     out[3r]     = −log softmax(zm)[t]                       the model's log-loss
     out[3r + 1] = −log softmax(zs)[t]                       the source's (zs given)
     out[3r + 2] = Σ_v p_v (log p_v − log q_v),  p = softmax(zs), q = softmax(zm)   KL(source ‖ model)
   with log softmax(z)_v = (z_v − max z) − log Σ_u exp(z_u − max z), as torch's log_softmax computes
   it. Three passes per row (the maxima; the two sums of exponentials; the KL dot), the two rows
   (2 × 192 KiB at a 49152-token vocabulary) staying in L2 between them, so the logits are read from
   memory once and no log-softmax ever is written: in torch the same is two log-softmaxes and a KL,
   ~300 MB of fresh tensors a 512-token window, and their page faults.

   exp is Cephes' expf (x = n ln2 + r in two parts, degree-6 polynomial in r, ~1 ulp like torch's
   own), written as plain float arithmetic so that the compiler vectorizes it for the ISA's flags.
   Sums run in float lanes over 256 columns at a time, added into double lanes: closer to the exact
   sums than torch's float reductions, so results differ from torch's in the last float digits only.
   NaN anywhere in a row gives NaN scores (the caller refuses non-finite results). Rows are split
   across the kernels' pool (lb_parallel of the kernel library, c/pool.h).

   Source records (lb_logprob_records, what eval/source_cache.py keeps on disk so that a warm
   evaluation never runs the source's head): per row, its log-probabilities as uint16 codes, as
   llama-perplexity's --kl-divergence-base stores them but without its 16-nat cut: with the floor
   f = max(min z, max z − RANGE), code 0 is a logit below f (p taken as 0: at most V·e^−RANGE of mass)
   and code k ≥ 1 the log-probability lo + (k − 1)·step, lo = (f − max) − log Σ, step = (max − f)/65534
   (half a step ≤ RANGE/131068 = 2.4e-4 nats of rounding). Beside the codes four exact doubles:
   lo, step, the target's log-loss and Σ p log p = T/S − log S, S = Σ e^(z−max), T = Σ e^(z−max)(z−max)
   (summed in one pass). KL from a record (lb_logit_scores with codes): Σ p log p exactly, minus the
   cross term Σ p̃ log q over the dequantized p̃ renormalized (Σ p̃ = 1): Σ p̃ (zm − mm) / Σ p̃ − lm.
   A rounding error δ_v ∈ [−h, h] (h = step/2) of each log p moves the cross term by
   Σ p_v (δ_v − δ̄) (log q_v − c) for any c: at most ~2h · E_p|log q − E_p log q| a row, and being
   unbiased rounding noise, ~h·(Σ p² (log q − ·)²)^½ / √rows on the mean (~1e-6 at SmolLM2's 16.8k). */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef void (*lb_task)(void *arg, int tid, int nthr);
typedef void (*lb_par)(lb_task fn, void *arg, int want);

#define LANES 16
#define CHUNK 256 /* columns summed in float before the double lanes take them */
#define RANGE 32.0f /* nats below a row's maximum logit that a record codes (see above) */
#define TOP 65534.0f /* the largest code, less one */

static inline float exp_le0(float x) { /* e^x for x <= 0 (NaN stays NaN) */
    x = x < -87.0f ? -87.0f : x;          /* below: < 2e-38, nothing next to the row's maximum's 1 */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static float row_max(const float *z, int v) {
    float m[LANES];
    for (int j = 0; j < LANES; j++) m[j] = -INFINITY;
    int i = 0;
    for (; i + LANES <= v; i += LANES)
        for (int j = 0; j < LANES; j++) m[j] = z[i + j] > m[j] ? z[i + j] : m[j];
    float out = -INFINITY;
    for (int j = 0; j < LANES; j++) out = m[j] > out ? m[j] : out;
    for (; i < v; i++) out = z[i] > out ? z[i] : out;
    return out;
}

/* log Σ_v exp(z_v − max) */
static float log_sum_exp(const float *z, int v, float max) {
    double total[LANES] = {0};
    int i = 0;
    for (; i + LANES <= v;) {
        float part[LANES] = {0};
        for (int end = i + CHUNK < v ? i + CHUNK : v; i + LANES <= end; i += LANES)
            for (int j = 0; j < LANES; j++) part[j] += exp_le0(z[i + j] - max);
        for (int j = 0; j < LANES; j++) total[j] += part[j];
    }
    double sum = 0;
    for (int j = 0; j < LANES; j++) sum += total[j];
    for (; i < v; i++) sum += exp_le0(z[i] - max);
    return logf((float)sum);
}

/* Σ_v p_v (log p_v − log q_v), log p_v = (zs_v − ms) − ls, log q_v = (zm_v − mm) − lm */
static double kl_row(const float *zm, const float *zs, int v, float mm, float lm, float ms, float ls) {
    double total[LANES] = {0};
    int i = 0;
    for (; i + LANES <= v;) {
        float part[LANES] = {0};
        for (int end = i + CHUNK < v ? i + CHUNK : v; i + LANES <= end; i += LANES)
            for (int j = 0; j < LANES; j++) {
                float lp = (zs[i + j] - ms) - ls, lq = (zm[i + j] - mm) - lm;
                part[j] += exp_le0(lp) * (lp - lq);
            }
        for (int j = 0; j < LANES; j++) total[j] += part[j];
    }
    double sum = 0;
    for (int j = 0; j < LANES; j++) sum += total[j];
    for (; i < v; i++) {
        float lp = (zs[i] - ms) - ls, lq = (zm[i] - mm) - lm;
        sum += exp_le0(lp) * (lp - lq);
    }
    return sum;
}

static float row_min(const float *z, int v) {
    float m[LANES];
    for (int j = 0; j < LANES; j++) m[j] = INFINITY;
    int i = 0;
    for (; i + LANES <= v; i += LANES)
        for (int j = 0; j < LANES; j++) m[j] = z[i + j] < m[j] ? z[i + j] : m[j];
    float out = INFINITY;
    for (int j = 0; j < LANES; j++) out = m[j] < out ? m[j] : out;
    for (; i < v; i++) out = z[i] < out ? z[i] : out;
    return out;
}

/* S = Σ exp(z_v − max) (summed as log_sum_exp sums it) and T = Σ exp(z_v − max)(z_v − max) */
static void sum_exp_and_moment(const float *z, int v, float max, double *S, double *T) {
    double s[LANES] = {0}, t[LANES] = {0};
    int i = 0;
    for (; i + LANES <= v;) {
        float ps[LANES] = {0}, pt[LANES] = {0};
        for (int end = i + CHUNK < v ? i + CHUNK : v; i + LANES <= end; i += LANES)
            for (int j = 0; j < LANES; j++) {
                float x = z[i + j] - max, e = exp_le0(x);
                ps[j] += e;
                pt[j] += e * x;
            }
        for (int j = 0; j < LANES; j++) s[j] += ps[j], t[j] += pt[j];
    }
    double ss = 0, tt = 0;
    for (int j = 0; j < LANES; j++) ss += s[j], tt += t[j];
    for (; i < v; i++) {
        float x = z[i] - max, e = exp_le0(x);
        ss += e;
        tt += (double)e * x;
    }
    *S = ss, *T = tt;
}

/* Σ p̃_v (zm_v − mm) / Σ p̃_v over a record's dequantized p̃ (see the top) */
static double cross_row(const float *zm, const uint16_t *code, int v, float mm, float lo, float step) {
    double num[LANES] = {0}, den[LANES] = {0};
    int i = 0;
    for (; i + LANES <= v;) {
        float pn[LANES] = {0}, pd[LANES] = {0};
        for (int end = i + CHUNK < v ? i + CHUNK : v; i + LANES <= end; i += LANES)
            for (int j = 0; j < LANES; j++) {
                float k = (float)code[i + j], x = fmaf(k - 1.0f, step, lo), e = exp_le0(x < 0.0f ? x : 0.0f);
                float p = k > 0.0f ? e : 0.0f;
                pn[j] += p * (zm[i + j] - mm);
                pd[j] += p;
            }
        for (int j = 0; j < LANES; j++) num[j] += pn[j], den[j] += pd[j];
    }
    double n = 0, d = 0;
    for (int j = 0; j < LANES; j++) n += num[j], d += den[j];
    for (; i < v; i++) {
        float k = (float)code[i], x = fmaf(k - 1.0f, step, lo), p = k > 0.0f ? exp_le0(x < 0.0f ? x : 0.0f) : 0.0f;
        n += (double)p * (zm[i] - mm);
        d += p;
    }
    return n / d;
}

typedef struct {
    const float *zm, *zs; /* [rows, stride] each (zs may be NULL: the model's log-loss only) */
    const uint16_t *code; /* or the source's records: codes [rows, vocab] and meta [rows, 4] */
    const double *meta;
    const int64_t *target;
    double *out;          /* [rows, 3] */
    long stride_m, stride_s;
    int rows, vocab;
} job;

static void rows_task(void *arg, int tid, int nthr) {
    const job *J = arg;
    int per = (J->rows + nthr - 1) / nthr, r0 = tid * per, r1 = r0 + per < J->rows ? r0 + per : J->rows;
    for (int r = r0; r < r1; r++) {
        const float *zm = J->zm + r * J->stride_m;
        int64_t t = J->target[r];
        float mm = row_max(zm, J->vocab), lm = log_sum_exp(zm, J->vocab, mm);
        double *o = J->out + 3 * (long)r;
        o[0] = -(double)((zm[t] - mm) - lm);
        if (J->code) {
            const double *m = J->meta + 4 * (long)r;
            o[1] = m[2];
            o[2] = m[3] - (cross_row(zm, J->code + (long)r * J->vocab, J->vocab, mm, (float)m[0], (float)m[1]) - lm);
            continue;
        }
        if (!J->zs) continue;
        const float *zs = J->zs + r * J->stride_s;
        float ms = row_max(zs, J->vocab), ls = log_sum_exp(zs, J->vocab, ms);
        o[1] = -(double)((zs[t] - ms) - ls);
        o[2] = kl_row(zm, zs, J->vocab, mm, lm, ms, ls);
    }
}

__attribute__((visibility("default"))) void lb_logit_scores(const float *zm, long stride_m, const float *zs,
                                                            long stride_s, const uint16_t *code, const double *meta,
                                                            const int64_t *target, int rows, int vocab, double *out,
                                                            void *par, int threads) {
    job J = {zm, zs, code, meta, target, out, stride_m, stride_s, rows, vocab};
    if (par && threads > 1 && rows > 1)
        ((lb_par)par)(rows_task, &J, threads < rows ? threads : rows);
    else
        rows_task(&J, 0, 1);
}

static void records_task(void *arg, int tid, int nthr) {
    const job *J = arg;
    int per = (J->rows + nthr - 1) / nthr, r0 = tid * per, r1 = r0 + per < J->rows ? r0 + per : J->rows;
    for (int r = r0; r < r1; r++) {
        const float *z = J->zs + r * J->stride_s;
        uint16_t *code = (uint16_t *)J->code + (long)r * J->vocab;
        double *m = (double *)J->meta + 4 * (long)r, S, T;
        float max = row_max(z, J->vocab), min = row_min(z, J->vocab);
        sum_exp_and_moment(z, J->vocab, max, &S, &T);
        float ls = logf((float)S), floor = min > max - RANGE ? min : max - RANGE;
        float step = (max - floor) / TOP, inv = step > 0 ? 1.0f / step : 0.0f;
        for (int i = 0; i < J->vocab; i++) {
            float k = (z[i] - floor) * inv + 1.5f; /* 1 + round((z − floor) / step) */
            code[i] = z[i] >= floor ? (uint16_t)(k < TOP + 1.0f ? k : TOP + 1.0f) : 0;
        }
        m[0] = (double)((floor - max) - ls);
        m[1] = step;
        m[2] = -(double)((z[J->target[r]] - max) - ls);
        m[3] = T / S - log(S);
    }
}

/* The source's records of `rows` rows of logits zs (see the top): codes [rows, vocab], meta [rows, 4]. */
__attribute__((visibility("default"))) void lb_logprob_records(const float *zs, long stride, const int64_t *target,
                                                               int rows, int vocab, uint16_t *code, double *meta,
                                                               void *par, int threads) {
    job J = {NULL, zs, code, meta, target, NULL, 0, stride, rows, vocab};
    if (par && threads > 1 && rows > 1)
        ((lb_par)par)(records_task, &J, threads < rows ? threads : rows);
    else
        records_task(&J, 0, 1);
}
