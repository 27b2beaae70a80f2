/* lb_tender_args: one call of the Tender integer kernel (tender.h), filled by kernels/cpu/tender.py
   (the layer, once) and per call (x, y, m). build.TenderArgs, the ctypes mirror, is parsed from this
   file: keep one `type name;` a line. "Positions" are the kernel's padded channel order: per weight
   group j, its activation groups from the top one down, each run padded to whole units (4 channels
   of bytes, or 8 of nibble pairs). */
#pragma once
#include <stdint.h>

typedef struct {
    /* weights: codes [tiles][units][LB_TL rows: 16 or 8][4 bytes] (nibble: low = positions 8u..8u+3, high = 8u+4..8u+7),
       scales [tiles][J][LB_TL] fp32, zero points [tiles][J][LB_TL] (NULL: every zero is zdef) */
    const uint8_t *qw;
    const float *sw;
    const int32_t *zw;
    int zdef;
    int nibble;
    /* runs [R][5]: first unit, units, shift before (Horner), end (0, 1: flush to int64, 2: narrow end), base;
       jrun [J + 1]: each weight group's first run; narrow [J]: its sums stay in int32 */
    const int32_t *runs;
    const int32_t *jrun;
    const int32_t *narrow;
    /* per position: input channel, bias, 2^(G-1-g) (0: padding), 2^-g (0: padding), g */
    const int32_t *xin;
    const float *abias;
    const float *tfac;
    const float *ginv;
    const int32_t *gsh;
    /* per weight group: its first position, and the end of the last ([J + 1]) */
    const int32_t *jpos;
    /* shapes: outputs, inputs, positions, weight groups, tiles of LB_TL rows */
    int n;
    int k;
    int kp;
    int groups;
    int tiles;
    /* activations: rows per TMax (0: tstatic), qmax · 2^(G-1), the calibrated TMax, the code range */
    int chunk;
    float top;
    float tstatic;
    int qmin;
    int qmax;
    /* the call: x [m, k], bias (or NULL), y [m, n] */
    int m;
    const float *x;
    const float *bias;
    float *y;
    int threads;
    /* scratch, set per call: codes [m][kp], x' [m][kp], s_0 [m], TMax [m], z-fold sums [m][J] */
    int8_t *xq;
    float *xt;
    float *s0;
    float *tm;
    int64_t *zs;
} lb_tender_args;
