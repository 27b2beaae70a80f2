/* Tender's integer matmul (formats/activation.py states the maths; this is its kernel): activations
   quantized per row with one scale s_0 and power-of-two steps per channel group, u8 weight codes times
   s8 activation codes in VNNI dot products (vpdpbusd), the groups combined by shifts in integers.

   Layout (kernels/cpu/tender.py builds it once per layer). Positions: per weight group j, its runs
   (one activation group g each, from the top group down), each padded to whole units: 4 positions
   (one byte per code) or 8 (codes of <= 4 bits: a unit's 16 rows x 4 bytes hold positions 8u..8u+3
   in the low nibbles and 8u+4..8u+7 in the high ones, half the bytes for decode to stream).
   Activations: a row's codes at their positions, padding 0.

   Per call: (1) per row, TMax = max_p |x[xin_p] - b_p| * 2^(G-1-g_p) (per chunk of rows; static: the
   calibrated one); (2) q_p = rne(clamp((x[xin_p] - b_p) * (inv_0 * 2^-g_p))), inv_0 = top / TMax,
   s_0 = TMax / top, and per weight group the zero-point fold S'_j = sum_p q_p * 2^g_p; (3) per 16-row
   tile and weight group: Horner over the runs, acc = (acc << (g_prev - g)) + sum q * code in int32
   while the bound of the sums allows it (tender.py proves it per run from the run's lengths and
   shifts: `narrow`), else flushed into int64 (acc64 += acc << base) at the segment's end; then
   acc_j = D_j - z * S'_j and y += fp32(acc_j) * (s_0 * sw_j) (+ the bias, first).

   Threads: rows of x split for (1)-(2), 16-row tiles for (3); one tile block of MR rows x NR tiles
   keeps its MR*NR accumulators in registers (always_inline with constant MR, NR: the loops unroll). */
#pragma once
#include <immintrin.h>
#include "tender_args.h"

#define LB_TMR 4
#define LB_TNR 4

static float lb_tender_rowmax(const lb_tender_args *a, const float *x) {
    __m512 mx = _mm512_setzero_ps();
    for (int p = 0; p < a->kp; p += 16) {
        __m512 v = _mm512_sub_ps(_mm512_i32gather_ps(_mm512_loadu_si512(a->xin + p), x, 4), _mm512_loadu_ps(a->abias + p));
        mx = _mm512_max_ps(mx, _mm512_mul_ps(_mm512_abs_ps(v), _mm512_loadu_ps(a->tfac + p)));
    }
    return _mm512_reduce_max_ps(mx);
}

static void lb_tender_quant_row(const lb_tender_args *a, int t) {
    const float *x = a->x + (size_t)t * a->k, T = a->tm[t];
    int8_t *q = a->xq + (size_t)t * a->kp;
    __m512 inv0 = _mm512_set1_ps(T > 0 ? a->top / T : 0.0f);
    __m512 lo = _mm512_set1_ps((float)a->qmin), hi = _mm512_set1_ps((float)a->qmax);
    a->s0[t] = T / a->top;
    for (int p = 0; p < a->kp; p += 16) {
        __m512 v = _mm512_sub_ps(_mm512_i32gather_ps(_mm512_loadu_si512(a->xin + p), x, 4), _mm512_loadu_ps(a->abias + p));
        v = _mm512_mul_ps(v, _mm512_mul_ps(inv0, _mm512_loadu_ps(a->ginv + p)));  /* x' * inv_g, inv_g exact */
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);  /* integer bounds: clamping before rounding is the same */
        _mm_storeu_si128((__m128i *)(q + p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    for (int j = 0; j < a->groups; j++) {
        int64_t s = 0;
        for (int p = a->jpos[j]; p < a->jpos[j + 1]; p++) s += (int64_t)q[p] << a->gsh[p];
        a->zs[(size_t)t * a->groups + j] = s;
    }
}

static void lb_tender_rows(const lb_tender_args *a, int tid, int *lo, int *hi) {
    int per = (a->m + a->threads - 1) / a->threads;
    *lo = tid < a->threads ? tid * per : a->m;
    *hi = *lo + per < a->m ? *lo + per : a->m;
}

static void lb_tender_rowmax_task(void *p, int tid, int nthr) {
    lb_tender_args *a = p;
    int lo, hi;
    lb_tender_rows(a, tid, &lo, &hi);
    for (int t = lo; t < hi; t++) a->tm[t] = lb_tender_rowmax(a, a->x + (size_t)t * a->k);
    (void)nthr;
}

static void lb_tender_quant_task(void *p, int tid, int nthr) {
    lb_tender_args *a = p;
    int lo, hi;
    lb_tender_rows(a, tid, &lo, &hi);
    for (int t = lo; t < hi; t++) lb_tender_quant_row(a, t);
    (void)nthr;
}

/* MR rows of x times NR tiles of 16 weight rows, every weight group (module comment, step 3). */
static inline __attribute__((always_inline)) void lb_tender_tile(const lb_tender_args *a, int t0, int tile0,
                                                                 const int MR, const int NR, const int NIB) {
    const size_t tb = (size_t)a->kp * (NIB ? 8 : 16);  /* code bytes per tile */
    const int ldq = a->kp / 4;
    const int32_t *xq = (const int32_t *)a->xq + (size_t)t0 * ldq;
    const uint8_t *qw = a->qw + (size_t)tile0 * tb;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < a->groups; j++) {
        __m512i acc[LB_TMR][LB_TNR];  /* sized by constants, not MR x NR: a VLA would never live in registers */
        int64_t acc64[LB_TMR][LB_TNR][16] __attribute__((aligned(64)));
        const int narrow = a->narrow[j];
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < NR; c++) acc[r][c] = _mm512_setzero_si512();
        if (!narrow)
            for (int r = 0; r < MR; r++)
                for (int c = 0; c < NR; c++) memset(acc64[r][c], 0, sizeof acc64[r][c]);
        for (int run = a->jrun[j]; run < a->jrun[j + 1]; run++) {
            const int32_t *R = a->runs + 5 * run;
            if (R[2]) {
                __m128i c = _mm_cvtsi32_si128(R[2]);
                for (int r = 0; r < MR; r++)
                    for (int s = 0; s < NR; s++) acc[r][s] = _mm512_sll_epi32(acc[r][s], c);
            }
            for (int u = R[0]; u < R[0] + R[1]; u++) {
                __m512i v[LB_TNR];
                for (int c = 0; c < NR; c++) v[c] = _mm512_loadu_si512(qw + c * tb + (size_t)u * 64);
                if (NIB) {
                    for (int c = 0; c < NR; c++) {
                        __m512i w = _mm512_and_si512(v[c], m4);
                        for (int r = 0; r < MR; r++)
                            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], w, _mm512_set1_epi32(xq[(size_t)r * ldq + 2 * u]));
                    }
                    for (int c = 0; c < NR; c++) {
                        __m512i w = _mm512_and_si512(_mm512_srli_epi16(v[c], 4), m4);
                        for (int r = 0; r < MR; r++)
                            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], w, _mm512_set1_epi32(xq[(size_t)r * ldq + 2 * u + 1]));
                    }
                } else {
                    for (int c = 0; c < NR; c++)
                        for (int r = 0; r < MR; r++)
                            acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], v[c], _mm512_set1_epi32(xq[(size_t)r * ldq + u]));
                }
            }
            if (R[3] == 1) {  /* the segment's end: into int64, shifted by its lowest group */
                __m128i c = _mm_cvtsi32_si128(R[4]);
                for (int r = 0; r < MR; r++)
                    for (int s = 0; s < NR; s++) {
                        __m512i lo = _mm512_sll_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[r][s])), c);
                        __m512i hi = _mm512_sll_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[r][s], 1)), c);
                        _mm512_store_si512(acc64[r][s], _mm512_add_epi64(_mm512_load_si512(acc64[r][s]), lo));
                        _mm512_store_si512(acc64[r][s] + 8, _mm512_add_epi64(_mm512_load_si512(acc64[r][s] + 8), hi));
                        acc[r][s] = _mm512_setzero_si512();
                    }
            } else if (R[3] == 2 && R[4]) {  /* a narrow group's end: the lowest group's shift */
                __m128i c = _mm_cvtsi32_si128(R[4]);
                for (int r = 0; r < MR; r++)
                    for (int s = 0; s < NR; s++) acc[r][s] = _mm512_sll_epi32(acc[r][s], c);
            }
        }
        for (int c = 0; c < NR; c++) {  /* y += fp32(D - z * S') * (s_0 * sw) for the rows that exist */
            int row0 = (tile0 + c) * 16, rows = a->n - row0 < 16 ? a->n - row0 : 16;
            __mmask16 mk = (__mmask16)((1u << rows) - 1);
            size_t at = ((size_t)(tile0 + c) * a->groups + j) * 16;
            __m512 sw = _mm512_loadu_ps(a->sw + at);
            __m512i z = a->zw ? _mm512_loadu_si512(a->zw + at) : _mm512_set1_epi32(a->zdef);
            for (int r = 0; r < MR; r++) {
                int t = t0 + r;
                int64_t S = a->zs[(size_t)t * a->groups + j];
                __m512 f;
                if (narrow) {
                    f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], _mm512_mullo_epi32(z, _mm512_set1_epi32((int)S))));
                } else {
                    __m512i s = _mm512_set1_epi64(S);
                    __m512i lo = _mm512_sub_epi64(_mm512_load_si512(acc64[r][c]),
                                                  _mm512_mullo_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(z)), s));
                    __m512i hi = _mm512_sub_epi64(_mm512_load_si512(acc64[r][c] + 8),
                                                  _mm512_mullo_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(z, 1)), s));
                    f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(lo)), _mm512_cvtepi64_ps(hi), 1);
                }
                float *y = a->y + (size_t)t * a->n + row0;
                __m512 sc = _mm512_mul_ps(_mm512_set1_ps(a->s0[t]), sw);
                _mm512_mask_storeu_ps(y, mk, _mm512_fmadd_ps(f, sc, _mm512_maskz_loadu_ps(mk, y)));
            }
        }
    }
}

typedef void (*lb_tender_fn)(const lb_tender_args *, int, int);
#define LB_TENDER_FN(N, MR, NR) \
    static void lb_tender_##N##_##MR##x##NR(const lb_tender_args *a, int t0, int tile0) { lb_tender_tile(a, t0, tile0, MR, NR, N); }
#define LB_TENDER_ROW(N, MR) LB_TENDER_FN(N, MR, 1) LB_TENDER_FN(N, MR, 2) LB_TENDER_FN(N, MR, 3) LB_TENDER_FN(N, MR, 4)
#define LB_TENDER_ALL(N) LB_TENDER_ROW(N, 1) LB_TENDER_ROW(N, 2) LB_TENDER_ROW(N, 3) LB_TENDER_ROW(N, 4)
LB_TENDER_ALL(0)
LB_TENDER_ALL(1)
#define LB_TENDER_T(N, MR) {lb_tender_##N##_##MR##x1, lb_tender_##N##_##MR##x2, lb_tender_##N##_##MR##x3, lb_tender_##N##_##MR##x4}
static const lb_tender_fn LB_TENDER[2][LB_TMR][LB_TNR] = {
    {LB_TENDER_T(0, 1), LB_TENDER_T(0, 2), LB_TENDER_T(0, 3), LB_TENDER_T(0, 4)},
    {LB_TENDER_T(1, 1), LB_TENDER_T(1, 2), LB_TENDER_T(1, 3), LB_TENDER_T(1, 4)}};

/* Thread tid's band of tiles (whole blocks of LB_TNR), every row of x, LB_TMR rows at a time. */
static void lb_tender_gemm_task(void *p, int tid, int nthr) {
    const lb_tender_args *a = p;
    int blocks = (a->tiles + LB_TNR - 1) / LB_TNR, per = (blocks + a->threads - 1) / a->threads * LB_TNR;
    int lo = tid < a->threads ? tid * per : a->tiles, hi = lo + per < a->tiles ? lo + per : a->tiles;
    for (int t0 = lo; t0 < hi; t0 += LB_TNR) {
        int nr = hi - t0 < LB_TNR ? hi - t0 : LB_TNR;
        for (int m = 0; m < a->m; m += LB_TMR)
            LB_TENDER[a->nibble][(a->m - m < LB_TMR ? a->m - m : LB_TMR) - 1][nr - 1](a, m, t0);
    }
    (void)nthr;
}

LB_EXPORT void lb_tender_linear(lb_tender_args *a) {
    if (a->threads > lb_pool.n) a->threads = lb_pool.n;
    if (a->threads < 1) a->threads = 1;
    a->xq = (int8_t *)lb_alloc((size_t)a->m * a->kp / 4);
    a->s0 = lb_alloc(a->m);
    a->tm = lb_alloc(a->m);
    a->zs = malloc(sizeof(int64_t) * a->m * a->groups);
    if (!a->zs) abort();
    if (a->chunk) {
        lb_pool_run(lb_tender_rowmax_task, a, a->threads);
        for (int t0 = 0; t0 < a->m; t0 += a->chunk) {  /* one TMax per chunk of rows */
            int t1 = t0 + a->chunk < a->m ? t0 + a->chunk : a->m;
            float T = 0;
            for (int t = t0; t < t1; t++) T = a->tm[t] > T ? a->tm[t] : T;
            for (int t = t0; t < t1; t++) a->tm[t] = T;
        }
    } else {
        for (int t = 0; t < a->m; t++) a->tm[t] = a->tstatic;
    }
    lb_pool_run(lb_tender_quant_task, a, a->threads);
    for (int t = 0; t < a->m; t++)
        for (int r = 0; r < a->n; r++) a->y[(size_t)t * a->n + r] = a->bias ? a->bias[r] : 0.0f;
    lb_pool_run(lb_tender_gemm_task, a, a->threads);
    free(a->xq); free(a->s0); free(a->tm); free(a->zs);
}
