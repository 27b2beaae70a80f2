/* Helpers of the the portable build: GCC/Clang vector extensions of LB_LANES lanes, which lower to scalar code
   (or whatever SIMD the target's baseline has): what codegen.OPS' templates for this ISA call. */
#pragma once
typedef float lb_vf __attribute__((vector_size(4 * LB_LANES)));
typedef uint32_t lb_vi __attribute__((vector_size(4 * LB_LANES)));
static inline lb_vf lb_load(const float *p) { lb_vf v; memcpy(&v, p, sizeof v); return v; }
static inline void lb_store(float *p, lb_vf v) { memcpy(p, &v, sizeof v); }
static inline lb_vi lb_bcast(const uint32_t *p, int words) {
    lb_vi v; for (int l = 0; l < LB_LANES; l++) v[l] = p[l % words]; return v;
}
static inline float lb_hsum(lb_vf v) { float s = 0; for (int l = 0; l < LB_LANES; l++) s += v[l]; return s; }
static inline float lb_h2f(uint16_t h) {  /* IEEE half -> float, subnormals included */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 31) bits = sign | 0x7f800000u | (m << 13);
    else if (e) bits = sign | ((e + 112) << 23) | (m << 13);
    else { float f = (float)m * (1.0f / 16777216.0f); memcpy(&bits, &f, 4); bits |= sign; }
    float out; memcpy(&out, &bits, 4); return out;
}
static inline lb_vi lb_gather(const uint32_t *p, int words, int stride) {
    lb_vi v; for (int l = 0; l < LB_LANES; l++) v[l] = p[(l % words) * stride]; return v;
}
static inline lb_vf lb_lut(const float *t, lb_vi i, uint32_t mask) {
    lb_vf v; for (int l = 0; l < LB_LANES; l++) v[l] = t[i[l] & mask]; return v;
}
static inline lb_vi lb_loadi(const uint32_t *p) { lb_vi v; memcpy(&v, p, sizeof v); return v; }
static inline lb_vf lb_ldh(const uint16_t *p) { lb_vf v; for (int l = 0; l < LB_LANES; l++) v[l] = lb_h2f(p[l]); return v; }
static inline lb_vf lb_ldz(const uint8_t *p) { lb_vf v; for (int l = 0; l < LB_LANES; l++) v[l] = p[l]; return v; }
static __attribute__((unused)) int lb_quant32(const float *x, int8_t *q, float *d) {
    float amax = 0;
    for (int c = 0; c < 32; c++) amax = fabsf(x[c]) > amax ? fabsf(x[c]) : amax;
    *d = amax / 127.0f;
    float inv = *d > 0 ? 1.0f / *d : 0.0f;
    int s = 0;
    for (int c = 0; c < 32; c++) { int v = (int)nearbyintf(x[c] * inv); q[c] = (int8_t)v; s += v; }
    return s;
}
static __attribute__((unused)) int lb_quant32t(const float *x, int8_t *q, float *d) {
    float t[32];
    lb_order32(x, t);
    return lb_quant32(t, q, d);
}
