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
