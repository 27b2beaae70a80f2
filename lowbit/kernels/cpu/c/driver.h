/* The fixed part of every generated kernel library: the C around the per-format, per-bits, per-ISA
   kernels that codegen.py writes. The generated source defines LB_LANES, MICRO_MR and MICRO_NR, includes
   this file, then defines the micro-kernels' table MICRO and the kernels, whose entry points call the
   drivers below (lb_linear, lb_linear_q) with their thread tasks. */
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define LB_EXPORT __attribute__((visibility("default")))

#ifndef LB_PF_BYTES
#define LB_PF_BYTES 8192
#endif
#define LB_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 0)

static inline uint32_t lb_ld32(const uint32_t *p) { return *p; }
static inline uint64_t lb_ld64(const uint32_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

#include "pool.h"
#include "args.h"


/* Thread `tid`'s contiguous band of output rows, in multiples of `align` rows. */
static void lb_band(const lb_args *a, int tid, int align, int *lo, int *hi) {
    int units = (a->n + align - 1) / align, per = (units + a->threads - 1) / a->threads;
    *lo = tid * per * align; *hi = (tid + 1) * per * align;
    if (*lo > a->n) *lo = a->n;
    if (*hi > a->n) *hi = a->n;
    if (tid >= a->threads) *lo = *hi = a->n;
}

static float *lb_alloc(size_t floats) {
    void *p = NULL;
    if (posix_memalign(&p, 64, floats * sizeof(float) + 64)) abort();
    return p;
}

typedef void (*lb_micro)(const float *, int, const float *, int, int, float *, int);

/* A tile GEMV's results: the tile's rows that exist (the last tile may be partly padding), plus bias. */
static void lb_store_rows(const lb_args *a, int row, const float *out) {
    for (int l = 0; l < LB_LANES && row + l < a->n; l++) a->y[row + l] = out[l] + (a->bias ? a->bias[row + l] : 0.0f);
}

/* MICRO[mr - 1][nr - 1]: the mr x nr micro-kernel (defined by the generated source) */
static const lb_micro MICRO[MICRO_MR][MICRO_NR];

/* One dequantized tile (rows × nkb blocks, row stride kc) times every token, MR × NR at a time. */
static void lb_gemm_tile(const lb_args *a, const float *buf, int nt, int rows, int kb, int nkb) {
    int ldx = a->nblocks * 32, kk = nkb * 32;
    for (int m = 0; m < a->m; m += MICRO_MR) {
        int mr = a->m - m < MICRO_MR ? a->m - m : MICRO_MR;
        for (int r = 0; r < rows; r += MICRO_NR) {
            int nr = rows - r < MICRO_NR ? rows - r : MICRO_NR;
            MICRO[mr - 1][nr - 1](a->x + (size_t)m * ldx + (size_t)kb * 32, ldx, buf + (size_t)r * a->kc,
                                  a->kc, kk, a->y + (size_t)m * a->n + nt + r, a->n);
        }
    }
}

/* Codebook kernels: rows [lo, hi) of y += S·x for every token, S the sparse outliers (CSR). For
   several tokens x is transposed, 64 tokens at a time, so each entry meets 8 tokens' x as one
   contiguous vector. */
typedef float lb_f8 __attribute__((vector_size(32)));

__attribute__((unused)) static void lb_outliers(const lb_args *a, int lo, int hi) {
    if (!a->orp || lo >= hi) return;
    int ldx = a->nblocks * 32;
    if (a->m == 1) {
        for (int r = lo; r < hi; r++) {
            float s = 0;
            for (int p = a->orp[r]; p < a->orp[r + 1]; p++) s += a->oval[p] * a->x[a->ocol[p]];
            a->y[r] += s;
        }
        return;
    }
    enum { CHUNK = 64 };  /* tokens per transposed chunk (a multiple of 8) */
    float *xt = lb_alloc((size_t)ldx * CHUNK);
    for (int m0 = 0; m0 < a->m; m0 += CHUNK) {
        int mc = a->m - m0 < CHUNK ? a->m - m0 : CHUNK, w = (mc + 7) & ~7;  /* xt rows: w tokens, 0-padded */
        for (int m = 0; m < w; m++)
            for (int k = 0; k < ldx; k++) xt[(size_t)k * w + m] = m < mc ? a->x[(size_t)(m0 + m) * ldx + k] : 0.0f;
        for (int r = lo; r < hi; r++)
            for (int m8 = 0; m8 < mc; m8 += 8) {  /* 8 tokens in a register, two chains of entries */
                lb_f8 s0 = {0}, s1 = {0}, x0, x1;
                int p = a->orp[r], end = a->orp[r + 1];
                for (; p + 1 < end; p += 2) {
                    memcpy(&x0, xt + (size_t)a->ocol[p] * w + m8, sizeof x0);
                    memcpy(&x1, xt + (size_t)a->ocol[p + 1] * w + m8, sizeof x1);
                    s0 += a->oval[p] * x0; s1 += a->oval[p + 1] * x1;
                }
                if (p < end) { memcpy(&x0, xt + (size_t)a->ocol[p] * w + m8, sizeof x0); s0 += a->oval[p] * x0; }
                s0 += s1;
                for (int j = 0; j < 8 && m8 + j < mc; j++) a->y[(size_t)(m0 + m8 + j) * a->n + r] += s0[j];
            }
    }
    free(xt);
}

/* x as int16 per 32-block for the T16 GEMV: scale amax/2^14, element i of a block holds code
   order[i] (T16_XORDER); into a->xq (as int16) and a->xd. */
static void lb_x16(lb_args *a, const uint8_t *order) {
    int16_t *xq = (int16_t *)lb_alloc((size_t)a->nblocks * 16);
    float *xd = lb_alloc(a->nblocks);
    for (int blk = 0; blk < a->nblocks; blk++) {
        const float *x = a->x + (size_t)blk * 32;
        float amax = 0;
        for (int c = 0; c < 32; c++) amax = fabsf(x[c]) > amax ? fabsf(x[c]) : amax;
        float d = amax / 16384.0f, inv = d > 0 ? 1.0f / d : 0.0f;
        for (int i = 0; i < 32; i++) xq[(size_t)blk * 32 + i] = (int16_t)nearbyintf(x[order[i]] * inv);
        xd[blk] = d;
    }
    a->xq = (int8_t *)xq; a->xd = xd;
}

/* The GEMV reads x scaled per position in its block (xscale, see _lane_field), as int16 in
   x16order (see lb_x16), or as it is (both NULL). */
static void lb_linear(lb_args *a, lb_task gemv, lb_task gemm, const float *xscale, const uint8_t *x16order) {
    if (a->threads > lb_pool.n) a->threads = lb_pool.n;
    if (a->m == 1) {  /* per-group sums of x, for the zero-point fold */
        float xs[a->groups], *scaled = NULL;
        if (xscale) {
            scaled = lb_alloc((size_t)a->nblocks * 32);
            for (int k = 0; k < a->nblocks * 32; k++) scaled[k] = a->x[k] * xscale[k % 32];
        }
        if (x16order) lb_x16(a, x16order);
        a->xs = scaled ? scaled : a->x;
        for (int g = 0; g < a->groups; g++) {
            int k0 = g * a->bpg * 32, k1 = (g + 1) * a->bpg * 32;
            if (k1 > a->nblocks * 32) k1 = a->nblocks * 32;
            float s = 0; for (int k = k0; k < k1; k++) s += a->x[k];
            xs[g] = s;
        }
        a->xsum = xs;
        lb_pool_run(gemv, a, a->threads);
        free(scaled);
        if (x16order) { free(a->xq); free(a->xd); }
        return;
    }
    for (int m = 0; m < a->m; m++)
        for (int n = 0; n < a->n; n++) a->y[(size_t)m * a->n + n] = a->bias ? a->bias[n] : 0.0f;
    lb_pool_run(gemm, a, a->threads);
}

/* The DRAM yardstick (eval/bench.bandwidth): `threads` threads each sum a contiguous share of a
   buffer in four chains of 64-bit loads, a plain sequential read with no arithmetic to wait for. */
typedef struct { const uint64_t *p; size_t words; int threads; uint64_t sums[64]; } lb_readjob;

static void lb_read_task(void *arg, int tid, int nthr) {
    lb_readjob *j = arg;
    if (tid >= j->threads) return;
    size_t per = j->words / j->threads / 4 * 4, lo = (size_t)tid * per;
    size_t hi = tid == j->threads - 1 ? j->words / 4 * 4 : lo + per;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = lo; i < hi; i += 4) { s0 += j->p[i]; s1 += j->p[i + 1]; s2 += j->p[i + 2]; s3 += j->p[i + 3]; }
    j->sums[tid] = s0 ^ s1 ^ s2 ^ s3;
    (void)nthr;
}

LB_EXPORT uint64_t lb_read(const void *p, size_t bytes, int threads) {
    if (threads > lb_pool.n) threads = lb_pool.n;
    if (threads > 64) threads = 64;
    if (threads < 1) threads = 1;
    lb_readjob j = {p, bytes / 8, threads, {0}};
    lb_pool_run(lb_read_task, &j, threads);
    uint64_t s = 0;
    for (int t = 0; t < threads; t++) s ^= j.sums[t];
    return s;
}

/* 32 floats -> s8 q = round-half-even(x / d), d = amax/127 (0 for a zero block) into *d; returns Σ q.
   Each ISA's header defines it (vector code: this is per activation, not per weight). */
static int lb_quant32(const float *x, int8_t *q, float *d);

/* int8 GEMM: x -> s8 per 32-block in natural order (xq [m][nblocks·32]), scale amax/127 (round half
   to even: the same numbers as the tile kernels'), xi = Σ x_q per block; thread tid takes a share of tokens. */
static void lb_xq_rows_task(void *p, int tid, int nthr) {
    lb_args *a = p;
    int per = (a->m + nthr - 1) / nthr, lo = tid * per, hi = lo + per < a->m ? lo + per : a->m;
    size_t ld = (size_t)a->nblocks * 32;
    for (int m = lo; m < hi; m++)
        for (int blk = 0; blk < a->nblocks; blk++) {
            size_t b = (size_t)m * a->nblocks + blk;
            a->xi[b] = lb_quant32(a->x + m * ld + (size_t)blk * 32, a->xq + m * ld + (size_t)blk * 32, a->xd + b);
        }
}

/* int8 GEMM: y[m, row .. row + L) = out + bias for the first chunk of columns, += out after it, for
   the rows that exist (the last tile may be padding). Written once, never read before: a big output
   (the head: m × vocab) costs one pass over memory. */
static inline void lb_addq(const lb_args *a, int m, int row, const float *out, int first) {
    float *y = a->y + (size_t)m * a->n + row;
    int rows = a->n - row < LB_LANES ? a->n - row : LB_LANES;
    if (first) {
        for (int l = 0; l < rows; l++) y[l] = out[l] + (a->bias ? a->bias[row + l] : 0.0f);
    } else if (rows == LB_LANES) {
        for (int l = 0; l < LB_LANES; l++) y[l] += out[l];
    } else {
        for (int l = 0; l < rows; l++) y[l] += out[l];
    }
}

/* A tile kernel's results for token m: the tile's rows that exist, plus bias. */
static inline void lb_store_token(const lb_args *a, int m, int row, const float *out) {
    float *y = a->y + (size_t)m * a->n;
    for (int l = 0; l < LB_LANES && row + l < a->n; l++) y[row + l] = out[l] + (a->bias ? a->bias[row + l] : 0.0f);
}

/* The tile kernels' order of a block's 32 activations (codegen._byte_codes): x[8·by + i] at 4·i + by. */
static inline void lb_order32(const float *x, float *out) {
    for (int i = 0; i < 8; i++)
        for (int by = 0; by < 4; by++) out[4 * i + by] = x[8 * by + i];
}

/* lb_quant32 of the block in lb_order32's order (the same scale, rounding and sum). Each ISA's header
   defines it. */
static int lb_quant32t(const float *x, int8_t *q, float *d);

/* The tile kernels' x, block-major (token m's block blk at b = blk·m_all + m): s8 in lb_order32's order
   (lb_quant32t), its scale xd[b], and in xi[b] the zero point's share of its dots: symmetric weights (zp
   NULL) (zdef − offset)·(−Σ x_q), asymmetric ones −Σ x_q as the low int16 (high half 0: pmaddwd meets
   it with each row's zero point). `offset`: see codegen.SIGNED_DOT. Thread tid takes a share of tokens:
   from LB_XQ_SPLIT tokens on, a batch's x is quantized on every thread (one core would otherwise do it
   while the others wait, ~10% of an 8-row call at K = 1536). */
#define LB_XQ_SPLIT 4
typedef struct { lb_args *a; int offset; } lb_xq_job;

static void lb_xq_tiles_task(void *p, int tid, int nthr) {
    const lb_xq_job *j = p;
    lb_args *a = j->a;
    int per = (a->m + nthr - 1) / nthr, hi = (tid + 1) * per < a->m ? (tid + 1) * per : a->m;
    for (int m = tid * per; m < hi; m++)
        for (int blk = 0; blk < a->nblocks; blk++) {
            size_t b = (size_t)blk * a->m + m;
            int sum = lb_quant32t(a->x + ((size_t)m * a->nblocks + blk) * 32, a->xq + b * 32, a->xd + b);
            a->xi[b] = a->zp ? (int32_t)(uint16_t)-sum : (a->zdef - j->offset) * -sum;
        }
}

/* The int8 path: up to LB_TILE_TOKENS tokens (decode steps, a few sequences' worth) through the tile
   kernels (codegen._tileq: each block's codes unpacked in registers once for all the tokens), more
   (prefill) through the GEMM, which unpacks a chunk of tiles to bytes once for every token (x in natural
   order, lb_xq_rows_task): from ~64 tokens the tile kernels' passes over x, once per tile, cost more. */
__attribute__((unused)) static void lb_linear_q(lb_args *a, lb_task tileq, lb_task gemmq, int offset) {
    if (a->threads > lb_pool.n) a->threads = lb_pool.n;
    size_t blocks = (size_t)a->m * a->nblocks;
    a->xq = (int8_t *)lb_alloc(blocks * 8);
    a->xd = lb_alloc(blocks);
    a->xi = (int32_t *)lb_alloc(blocks);
    if (a->m <= LB_TILE_TOKENS) {
        lb_xq_job j = {a, offset};
        lb_pool_run(lb_xq_tiles_task, &j, a->m >= LB_XQ_SPLIT ? a->threads : 1);
        lb_pool_run(tileq, a, a->threads);
    } else {
        lb_pool_run(lb_xq_rows_task, a, a->threads);
        lb_pool_run(gemmq, a, a->threads);
    }
    free(a->xq); free(a->xd); free(a->xi);
}
