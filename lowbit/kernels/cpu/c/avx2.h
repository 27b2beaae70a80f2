/* Helpers of the AVX2 (+FMA, F16C): what codegen.OPS' templates for this ISA call. */
#pragma once
#include <immintrin.h>
static inline float lb_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline __m256i lb_dot8s256(__m256i q, __m256i x) {
    __m256i w = _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}
/* A 4-bit table as the AVX2 kernels keep it (T16, 36 bytes, see codebook.py): the low bytes of its
   16 int16 entries, their high bytes, then an fp32 scale; entry j = (int16)(lo[j] | hi[j] << 8) * s. */
static inline void lb_planes16(const uint8_t *p, __m256i *lo, __m256i *hi, float *s) {
    *lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    *hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + 16)));
    memcpy(s, p + 32, 4);
}

static inline void lb_table16(const uint8_t *p, __m256 *t0, __m256 *t1) {
    __m128i lo = _mm_loadu_si128((const __m128i *)p), hi = _mm_loadu_si128((const __m128i *)(p + 16));
    float s; memcpy(&s, p + 32, 4);
    __m256 vs = _mm256_set1_ps(s);
    *t0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_unpacklo_epi8(lo, hi))), vs);
    *t1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_unpackhi_epi8(lo, hi))), vs);
}
static int lb_quant32(const float *x, int8_t *q, float *d) {
    __m256 v[4], m = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; i++) { v[i] = _mm256_loadu_ps(x + 8 * i); m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i])); }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    *d = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))) / 127.0f;
    __m256 inv = _mm256_set1_ps(*d > 0 ? 1.0f / *d : 0.0f);
    __m256i r[4], s = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) { r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)); s = _mm256_add_epi32(s, r[i]); }
    /* packs interleave the 128-bit halves; the permute puts the 32 bytes back in order */
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
}
static __attribute__((unused)) int lb_quant32t(const float *x, int8_t *q, float *d) {
    float t[32];
    lb_order32(x, t);
    return lb_quant32(t, q, d);
}
