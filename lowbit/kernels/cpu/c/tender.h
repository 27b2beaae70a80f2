/* Tender's integer matmul (formats/activation.py states the maths; this is its kernel): activations
   quantized per row with one scale s_0 and power-of-two steps per channel group, u8 weight codes times
   s8 activation codes in VNNI dot products (vpdpbusd), the groups combined by shifts in integers.

   Layout (kernels/cpu/tender.py builds it once per layer). Positions: per weight group j, its runs
   (one activation group g each, from the top group down), each padded to whole units: 4 positions
   (one byte per code) or 8 (codes of <= 4 bits: a unit's LB_TL rows x 4 bytes hold positions 8u..8u+3
   in the low nibbles and 8u+4..8u+7 in the high ones, half the bytes for decode to stream).
   Activations: a row's codes at their positions, padding 0.

   Per call: (1) per row, x'_p = x[xin_p] - b_p gathered once into a buffer, and TMax = max_p |x'_p| *
   2^(G-1-g_p) (per chunk of rows; static: the calibrated one); (2) q_p = rne(clamp((x[xin_p] - b_p) * (inv_0 * 2^-g_p))), inv_0 = top / TMax,
   s_0 = TMax / top, and per weight group the zero-point fold S'_j = sum_p q_p * 2^g_p; (3) per LB_TL-row
   tile and weight group: Horner over the runs, acc = (acc << (g_prev - g)) + sum q * code in int32
   while the bound of the sums allows it (tender.py proves it per run from the run's lengths and
   shifts: `narrow`), else flushed into int64 (acc64 += acc << base) at the segment's end; then
   acc_j = D_j - z * S'_j and y += fp32(acc_j) * (s_0 * sw_j) (+ the bias, first).

   Threads: rows of x split for (1)-(2) (one pass unless chunks span rows), tiles of rows for (3); one tile block of MR rows x NR tiles
   keeps its MR*NR accumulators in registers (always_inline with constant MR, NR: the loops unroll). */
#pragma once
#include <immintrin.h>
#include "tender_args.h"

#define LB_TMR 4
#define LB_TNR 4

#if defined(__AVX512VNNI__) && defined(__AVX512DQ__)
/* AVX-512 VNNI: 16-row tiles, vpdpbusd on u8 codes (8-bit ones too) */
#define LB_TL 16
typedef __m512i lb_tv;
#define TV_LOAD(p) _mm512_loadu_si512(p)
#define TV_AND(a, b) _mm512_and_si512(a, b)
#define TV_HIGH(v) _mm512_srli_epi16(v, 4)
#define TV_SET1(x) _mm512_set1_epi32(x)
#define TV_NIBBLE() _mm512_set1_epi8(0x0F)
#define TV_ZERO() _mm512_setzero_si512()
#define TV_SLL(a, c) _mm512_sll_epi32(a, c)
#define TV_DOT(acc, w, x) _mm512_dpbusd_epi32(acc, w, x)
#define TV_DOT8(acc, w, x) _mm512_dpbusd_epi32(acc, w, x)
/* acc64[0..16) += acc << base, in int64 */
static inline __attribute__((always_inline)) void lb_tv_flush(int64_t *acc64, lb_tv acc, __m128i base) {
    __m512i lo = _mm512_sll_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc)), base);
    __m512i hi = _mm512_sll_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc, 1)), base);
    _mm512_store_si512(acc64, _mm512_add_epi64(_mm512_load_si512(acc64), lo));
    _mm512_store_si512(acc64 + 8, _mm512_add_epi64(_mm512_load_si512(acc64 + 8), hi));
}

/* x' = x[xin] - b at every position (padding: x[0] - 0, its factors are 0); returns the row's TMax
   candidate max_p |x'_p| * 2^(G-1-g_p) */
static float lb_tender_gather(const lb_tender_args *a, const float *x, float *xt) {
    __m512 mx = _mm512_setzero_ps();
    for (int p = 0; p < a->kp; p += 16) {
        __m512 v = _mm512_sub_ps(_mm512_i32gather_ps(_mm512_loadu_si512(a->xin + p), x, 4), _mm512_loadu_ps(a->abias + p));
        _mm512_storeu_ps(xt + p, v);
        mx = _mm512_max_ps(mx, _mm512_mul_ps(_mm512_abs_ps(v), _mm512_loadu_ps(a->tfac + p)));
    }
    return _mm512_reduce_max_ps(mx);
}

/* q for 16 positions from p: x' * inv_g (inv_g exact), clamped (integer bounds: the same before or
   after rounding), rounded half to even */
static inline void lb_tender_codes(const lb_tender_args *a, const float *xt, float inv0, int p, int8_t *q) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xt + p), _mm512_mul_ps(_mm512_set1_ps(inv0), _mm512_loadu_ps(a->ginv + p)));
    v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps((float)a->qmin)), _mm512_set1_ps((float)a->qmax));
    _mm_storeu_si128((__m128i *)(q + p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
}

/* S' = sum over positions [p0, p1) of q_p * 2^g_p (each lane's sum below 2^27: int32, then int64) */
static int64_t lb_tender_fold(const lb_tender_args *a, const int8_t *q, int p0, int p1) {
    int64_t s = 0;
    for (int p = p0; p < p1; p += 16) {
        __mmask16 mk = p1 - p >= 16 ? 0xFFFF : (__mmask16)((1u << (p1 - p)) - 1);
        __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, q + p));
        s += _mm512_reduce_add_epi32(_mm512_sllv_epi32(v, _mm512_maskz_loadu_epi32(mk, a->gsh + p)));
    }
    return s;
}
#else
/* AVX2 (and AVX-512 without VNNI): 8-row tiles; u8 x s8 through maddubs + madd. Nibble codes (<= 15)
   cannot saturate maddubs' int16 pairs (2 * 15 * 128); 8-bit codes are stored signed (c - 128, the
   zero points alike) and multiplied in sign form, |pair| <= 2 * 128 * 127 with activations kept in
   [-127, 127] (tender.py sets qmin) — the form codegen's dot8s uses. */
#define LB_TL 8
typedef __m256i lb_tv;
#define TV_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define TV_AND(a, b) _mm256_and_si256(a, b)
#define TV_HIGH(v) _mm256_srli_epi16(v, 4)
#define TV_SET1(x) _mm256_set1_epi32(x)
#define TV_NIBBLE() _mm256_set1_epi8(0x0F)
#define TV_ZERO() _mm256_setzero_si256()
#define TV_SLL(a, c) _mm256_sll_epi32(a, c)
#define TV_DOT(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)))
#define TV_DOT8(acc, w, x) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1)))
static inline __attribute__((always_inline)) void lb_tv_flush(int64_t *acc64, lb_tv acc, __m128i base) {
    __m256i lo = _mm256_sll_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc)), base);
    __m256i hi = _mm256_sll_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc, 1)), base);
    _mm256_store_si256((__m256i *)acc64, _mm256_add_epi64(_mm256_load_si256((const __m256i *)acc64), lo));
    _mm256_store_si256((__m256i *)(acc64 + 4), _mm256_add_epi64(_mm256_load_si256((const __m256i *)(acc64 + 4)), hi));
}

static float lb_tender_gather(const lb_tender_args *a, const float *x, float *xt) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int p = 0; p < a->kp; p += 8) {
        __m256 v = _mm256_sub_ps(_mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)(a->xin + p)), 4),
                                 _mm256_loadu_ps(a->abias + p));
        _mm256_storeu_ps(xt + p, v);
        mx = _mm256_max_ps(mx, _mm256_mul_ps(_mm256_andnot_ps(sign, v), _mm256_loadu_ps(a->tfac + p)));
    }
    float m[8], r = 0;
    _mm256_storeu_ps(m, mx);
    for (int i = 0; i < 8; i++) r = m[i] > r ? m[i] : r;
    return r;
}

static inline void lb_tender_codes(const lb_tender_args *a, const float *xt, float inv0, int p, int8_t *q) {
    for (int h = p; h < p + 16; h += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xt + h), _mm256_mul_ps(_mm256_set1_ps(inv0), _mm256_loadu_ps(a->ginv + h)));
        v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps((float)a->qmin)), _mm256_set1_ps((float)a->qmax));
        int32_t c[8];
        _mm256_storeu_si256((__m256i *)c, _mm256_cvtps_epi32(v));
        for (int i = 0; i < 8; i++) q[h + i] = (int8_t)c[i];
    }
}

static int64_t lb_tender_fold(const lb_tender_args *a, const int8_t *q, int p0, int p1) {
    int64_t s = 0;
    for (int p = p0; p < p1; p++) s += (int64_t)q[p] << a->gsh[p];
    return s;
}
#endif

static void lb_tender_quant_row(const lb_tender_args *a, int t) {
    const float *xt = a->xt + (size_t)t * a->kp, T = a->tm[t];
    int8_t *q = a->xq + (size_t)t * a->kp;
    float inv0 = T > 0 ? a->top / T : 0.0f;
    a->s0[t] = T / a->top;
    for (int p = 0; p < a->kp; p += 16) lb_tender_codes(a, xt, inv0, p, q);
    for (int j = 0; j < a->groups; j++) a->zs[(size_t)t * a->groups + j] = lb_tender_fold(a, q, a->jpos[j], a->jpos[j + 1]);
}

static void lb_tender_rows(const lb_tender_args *a, int tid, int *lo, int *hi) {
    int per = (a->m + a->threads - 1) / a->threads;
    *lo = tid < a->threads ? tid * per : a->m;
    *hi = *lo + per < a->m ? *lo + per : a->m;
}

/* (1) row t's x' into xt and its TMax candidate; with one TMax per row (or the static one), (2) too */
static void lb_tender_gather_row(lb_tender_args *a, int t) {
    float T = lb_tender_gather(a, a->x + (size_t)t * a->k, a->xt + (size_t)t * a->kp);
    a->tm[t] = a->chunk ? T : a->tstatic;
    if (a->chunk <= 1) lb_tender_quant_row(a, t);
}

static void lb_tender_gather_task(void *p, int tid, int nthr) {
    lb_tender_args *a = p;
    int lo, hi;
    lb_tender_rows(a, tid, &lo, &hi);
    for (int t = lo; t < hi; t++) lb_tender_gather_row(a, t);
    (void)nthr;
}

static void lb_tender_quant_task(void *p, int tid, int nthr) {
    lb_tender_args *a = p;
    int lo, hi;
    lb_tender_rows(a, tid, &lo, &hi);
    for (int t = lo; t < hi; t++) lb_tender_quant_row(a, t);
    (void)nthr;
}

/* y[t, rows of the tile] += fp32(acc - z * S') * (s_0[t] * sw_j), acc in int32 (narrow: the vector
   path) or int64 (acc64: lane by lane, once per weight group and tile) */
static inline __attribute__((always_inline)) void lb_tender_out(const lb_tender_args *a, int t, int tile, int j,
                                                                lb_tv acc, const int64_t *acc64) {
    size_t at = ((size_t)tile * a->groups + j) * LB_TL;
    int64_t S = a->zs[(size_t)t * a->groups + j];
    float s0 = a->s0[t], *y = a->y + (size_t)t * a->n + (size_t)tile * LB_TL;
    int rows = a->n - tile * LB_TL < LB_TL ? a->n - tile * LB_TL : LB_TL;
#if LB_TL == 16
    __mmask16 mk = (__mmask16)((1u << rows) - 1);
    if (acc64) {  /* 16 lanes of int64: two halves of 8, z * S in int64, converted to fp32 (AVX-512 DQ) */
        __m512i z = a->zw ? _mm512_loadu_si512(a->zw + at) : _mm512_set1_epi32(a->zdef), s = _mm512_set1_epi64(S);
        __m512i lo = _mm512_sub_epi64(_mm512_load_si512(acc64), _mm512_mullo_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(z)), s));
        __m512i hi = _mm512_sub_epi64(_mm512_load_si512(acc64 + 8), _mm512_mullo_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(z, 1)), s));
        __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(lo)), _mm512_cvtepi64_ps(hi), 1);
        __m512 sc = _mm512_mul_ps(_mm512_set1_ps(s0), _mm512_loadu_ps(a->sw + at));
        _mm512_mask_storeu_ps(y, mk, _mm512_fmadd_ps(f, sc, _mm512_maskz_loadu_ps(mk, y)));
        return;
    }
    __m512i z = a->zw ? _mm512_loadu_si512(a->zw + at) : _mm512_set1_epi32(a->zdef);
    __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_mullo_epi32(z, _mm512_set1_epi32((int32_t)S))));
    __m512 sc = _mm512_mul_ps(_mm512_set1_ps(s0), _mm512_loadu_ps(a->sw + at));
    _mm512_mask_storeu_ps(y, mk, _mm512_fmadd_ps(f, sc, _mm512_maskz_loadu_ps(mk, y)));
#else
    if (acc64) {
        for (int l = 0; l < rows; l++) {
            int64_t z = a->zw ? a->zw[at + l] : a->zdef;
            y[l] += (float)(acc64[l] - z * S) * (s0 * a->sw[at + l]);
        }
        return;
    }
    __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i z = a->zw ? _mm256_loadu_si256((const __m256i *)(a->zw + at)) : _mm256_set1_epi32(a->zdef);
    __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc, _mm256_mullo_epi32(z, _mm256_set1_epi32((int32_t)S))));
    __m256 sc = _mm256_mul_ps(_mm256_set1_ps(s0), _mm256_loadu_ps(a->sw + at));
    _mm256_maskstore_ps(y, mk, _mm256_fmadd_ps(f, sc, _mm256_maskload_ps(y, mk)));
#endif
}

/* MR rows of x times NR tiles of LB_TL weight rows, every weight group (module comment, step 3).
   The NR tiles are one contiguous run read at NR places; while unit u of each is read, the same share
   of the next NR tiles is prefetched: a decode step reads its weights from DRAM, and rows of a few
   hundred codes are too short for the hardware's stream prefetchers (codegen's GEMVs do the same). */
static inline __attribute__((always_inline)) void lb_tender_tile(const lb_tender_args *a, int t0, int tile0,
                                                                 const int MR, const int NR, const int NIB) {
    const size_t ub = LB_TL * 4, tb = (size_t)a->kp * (NIB ? LB_TL / 2 : LB_TL);  /* bytes per unit, per tile */
    const int ldq = a->kp / 4;
    const int32_t *xq = (const int32_t *)a->xq + (size_t)t0 * ldq;
    const uint8_t *qw = a->qw + (size_t)tile0 * tb;
    const lb_tv m4 = TV_NIBBLE();
    for (int j = 0; j < a->groups; j++) {
        lb_tv acc[LB_TMR][LB_TNR];  /* sized by constants, not MR x NR: a VLA would never live in registers */
        int64_t acc64[LB_TMR][LB_TNR][LB_TL] __attribute__((aligned(64)));
        const int narrow = a->narrow[j];
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < NR; c++) acc[r][c] = TV_ZERO();
        if (!narrow)
            for (int r = 0; r < MR; r++)
                for (int c = 0; c < NR; c++) memset(acc64[r][c], 0, sizeof acc64[r][c]);
        for (int run = a->jrun[j]; run < a->jrun[j + 1]; run++) {
            const int32_t *R = a->runs + 5 * run;
            if (R[2]) {
                __m128i c = _mm_cvtsi32_si128(R[2]);
                for (int r = 0; r < MR; r++)
                    for (int s = 0; s < NR; s++) acc[r][s] = TV_SLL(acc[r][s], c);
            }
            for (int u = R[0]; u < R[0] + R[1]; u++) {
                lb_tv v[LB_TNR];
                for (int c = 0; c < NR; c++) LB_PREFETCH(qw + NR * tb + ((size_t)u * NR + c) * ub);
                for (int c = 0; c < NR; c++) v[c] = TV_LOAD(qw + c * tb + (size_t)u * ub);
                if (NIB) {
                    for (int c = 0; c < NR; c++) {
                        lb_tv w = TV_AND(v[c], m4);
                        for (int r = 0; r < MR; r++) acc[r][c] = TV_DOT(acc[r][c], w, TV_SET1(xq[(size_t)r * ldq + 2 * u]));
                    }
                    for (int c = 0; c < NR; c++) {
                        lb_tv w = TV_AND(TV_HIGH(v[c]), m4);
                        for (int r = 0; r < MR; r++) acc[r][c] = TV_DOT(acc[r][c], w, TV_SET1(xq[(size_t)r * ldq + 2 * u + 1]));
                    }
                } else {
                    for (int c = 0; c < NR; c++)
                        for (int r = 0; r < MR; r++) acc[r][c] = TV_DOT8(acc[r][c], v[c], TV_SET1(xq[(size_t)r * ldq + u]));
                }
            }
            if (R[3] == 1) {  /* the segment's end: into int64, shifted by its lowest group */
                __m128i c = _mm_cvtsi32_si128(R[4]);
                for (int r = 0; r < MR; r++)
                    for (int s = 0; s < NR; s++) {
                        lb_tv_flush(acc64[r][s], acc[r][s], c);
                        acc[r][s] = TV_ZERO();
                    }
            } else if (R[3] == 2 && R[4]) {  /* a narrow group's end: the lowest group's shift */
                __m128i c = _mm_cvtsi32_si128(R[4]);
                for (int r = 0; r < MR; r++)
                    for (int s = 0; s < NR; s++) acc[r][s] = TV_SLL(acc[r][s], c);
            }
        }
        for (int c = 0; c < NR; c++)
            for (int r = 0; r < MR; r++) lb_tender_out(a, t0 + r, tile0 + c, j, acc[r][c], narrow ? NULL : acc64[r][c]);
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

/* Thread tid's band of tiles (whole blocks of LB_TNR), every row of x, LB_TMR rows at a time. One row
   (decode) takes its tiles one at a time: with nothing to reuse across tiles, one sequential stream of
   weights (and its prefetch one tile ahead) beats LB_TNR streams read side by side (perf, in the engine:
   the W4A8 kernel's time 2.45 -> 2.05 head-GEMVs). */
static void lb_tender_gemm_task(void *p, int tid, int nthr) {
    const lb_tender_args *a = p;
    const int tnr = a->m == 1 ? 1 : LB_TNR;
    int blocks = (a->tiles + LB_TNR - 1) / LB_TNR, per = (blocks + a->threads - 1) / a->threads * LB_TNR;
    int lo = tid < a->threads ? tid * per : a->tiles, hi = lo + per < a->tiles ? lo + per : a->tiles;
    for (int t0 = lo; t0 < hi; t0 += tnr) {
        int nr = hi - t0 < tnr ? hi - t0 : tnr;
        int r0 = t0 * LB_TL, r1 = (t0 + nr) * LB_TL < a->n ? (t0 + nr) * LB_TL : a->n;
        for (int t = 0; t < a->m; t++)  /* the tiles' outputs start at the bias, in the thread that adds to them */
            for (int r = r0; r < r1; r++) a->y[(size_t)t * a->n + r] = a->bias ? a->bias[r] : 0.0f;
        for (int m = 0; m < a->m; m += LB_TMR)
            LB_TENDER[a->nibble][(a->m - m < LB_TMR ? a->m - m : LB_TMR) - 1][nr - 1](a, m, t0);
    }
    (void)nthr;
}

LB_EXPORT int lb_tender_lanes(void) { return LB_TL; }

/* The calling thread's scratch, grown to the largest call it has made and kept: a decode step calls
   this kernel hundreds of times, and a malloc/free per call (with page faults for the big ones) costs
   more than a small GEMV. Bounded by the largest prefill chunk (m * kp * 5 bytes and per-row values). */
static __thread struct { char *p; size_t bytes; } lb_tender_scratch;

static char *lb_tender_space(size_t bytes) {
    if (bytes > lb_tender_scratch.bytes) {
        free(lb_tender_scratch.p);
        if (posix_memalign((void **)&lb_tender_scratch.p, 64, bytes)) abort();
        lb_tender_scratch.bytes = bytes;
    }
    return lb_tender_scratch.p;
}

LB_EXPORT void lb_tender_linear(lb_tender_args *a) {
    if (a->threads > lb_pool.n) a->threads = lb_pool.n;
    if (a->threads < 1) a->threads = 1;
    size_t m = (size_t)a->m, codes = (m * a->kp + 63) / 64 * 64, rows = (m * sizeof(float) + 63) / 64 * 64;
    char *p = lb_tender_space(codes + 4 * m * a->kp + 2 * rows + sizeof(int64_t) * m * a->groups);
    a->xq = (int8_t *)p;
    a->xt = (float *)(p + codes);
    a->s0 = (float *)(p + codes + 4 * m * a->kp);
    a->tm = (float *)((char *)a->s0 + rows);
    a->zs = (int64_t *)((char *)a->tm + rows);
    if (a->m < a->threads) {  /* fewer rows than threads (decode): no wake-up for one row's work */
        for (int t = 0; t < a->m; t++) lb_tender_gather_row(a, t);
    } else {
        lb_pool_run(lb_tender_gather_task, a, a->threads);
    }
    if (a->chunk > 1) {  /* one TMax per chunk of rows, then the codes */
        for (int t0 = 0; t0 < a->m; t0 += a->chunk) {
            int t1 = t0 + a->chunk < a->m ? t0 + a->chunk : a->m;
            float T = 0;
            for (int t = t0; t < t1; t++) T = a->tm[t] > T ? a->tm[t] : T;
            for (int t = t0; t < t1; t++) a->tm[t] = T;
        }
        lb_pool_run(lb_tender_quant_task, a, a->threads);
    }
    lb_pool_run(lb_tender_gemm_task, a, a->threads);
}
