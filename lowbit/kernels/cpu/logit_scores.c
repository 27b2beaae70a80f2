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
   across the kernels' pool (lb_parallel of the kernel library, c/pool.h). */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef void (*lb_task)(void *arg, int tid, int nthr);
typedef void (*lb_par)(lb_task fn, void *arg, int want);

#define LANES 16
#define CHUNK 256 /* columns summed in float before the double lanes take them */

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

typedef struct {
    const float *zm, *zs; /* [rows, stride] each (zs may be NULL: the model's log-loss only) */
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
        if (!J->zs) continue;
        const float *zs = J->zs + r * J->stride_s;
        float ms = row_max(zs, J->vocab), ls = log_sum_exp(zs, J->vocab, ms);
        o[1] = -(double)((zs[t] - ms) - ls);
        o[2] = kl_row(zm, zs, J->vocab, mm, lm, ms, ls);
    }
}

__attribute__((visibility("default"))) void lb_logit_scores(const float *zm, long stride_m, const float *zs,
                                                            long stride_s, const int64_t *target, int rows,
                                                            int vocab, double *out, void *par, int threads) {
    job J = {zm, zs, target, out, stride_m, stride_s, rows, vocab};
    if (par && threads > 1 && rows > 1)
        ((lb_par)par)(rows_task, &J, threads < rows ? threads : rows);
    else
        rows_task(&J, 0, 1);
}
