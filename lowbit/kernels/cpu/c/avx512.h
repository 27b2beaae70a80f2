/* Helpers of the AVX-512 F/BW/VL (+FMA, F16C; VNNI builds use it too): what codegen.OPS' templates for this ISA call. */
#pragma once
#include <immintrin.h>
static inline __m512i lb_dot8s512(__m512i q, __m512i x) {
    __m512i w = _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
    __mmask64 neg = _mm512_movepi8_mask(w);
    return _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(w), _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x)),
                             _mm512_set1_epi16(1));
}
static int lb_quant32(const float *x, int8_t *q, float *d) {
    __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    *d = amax / 127.0f;
    __m512 inv = _mm512_set1_ps(*d > 0 ? 1.0f / *d : 0.0f);
    __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(qb));
    return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
}
static int lb_quant32t(const float *x, int8_t *q, float *d) {  /* lb_order32 as two permutes */
    const __m512i lo = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
    __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    float t[32];
    _mm512_storeu_ps(t, _mm512_permutex2var_ps(a, lo, b));
    _mm512_storeu_ps(t + 16, _mm512_permutex2var_ps(a, _mm512_add_epi32(lo, _mm512_set1_epi32(4)), b));
    return lb_quant32(t, q, d);
}
