/* lb_args: one call of a generated kernel (lb_linear_*), filled by Python (kernels/cpu/uniform.py,
   codebook.py) or prefilled for the decode engine (runtime/engine.c), which then sets x, y and m.
   build.Args, the ctypes mirror, is parsed from this file: keep one `type name;` a line. */
#pragma once
#include <stdint.h>

typedef struct {
    /* the weights, every format: codes (indices) in the ISA's SIMD layout, layout.py */
    const uint32_t *qw;
    /* UniformQ: fp16 scales and u8 zero points per group (zp NULL: symmetric, every zero is zdef) */
    const uint16_t *sc;
    const uint8_t *zp;
    int zdef;
    /* CodebookQ: the tables [N, G, 2^b] as fp16, or as T16 records (codebook.t16); sparse outliers in
       CSR (orp NULL: none) */
    const uint16_t *lut;
    const int32_t *orp;
    const int32_t *ocol;
    const float *oval;
    /* the call: shapes, x [m, nblocks * 32], bias (or NULL), y [m, n] */
    int n;
    int nblocks;
    int groups;
    int bpg;
    int m;
    const float *x;
    const float *bias;
    float *y;
    /* tiles and threads (perf_model.plan) */
    int threads;
    int nb;
    int kc;
    /* the drivers' scratch, set per call (driver.h) */
    float *xsum;
    int8_t *xq;      /* int8 path: activations per 32-block (SIMD byte order), */
    float *xd;       /* and their scales */
    const float *xs; /* fp32 GEMV: x times 2^-(bit offset of its code), see _lane_field
                        (codebook GEMVs on T16 tables read xq as int16, see lb_x16) */
    int32_t *xi;     /* int8 GEMM: sum of each block's s8 activations; tile kernels: see lb_xq_tiles */
} lb_args;
