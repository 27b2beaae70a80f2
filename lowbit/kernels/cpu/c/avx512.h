/* Helpers of the AVX-512 F/BW/VL (+FMA, F16C; VNNI builds use it too): what codegen.OPS' templates for this ISA call. */
#pragma once
#include <immintrin.h>
static inline __m512i lb_dot8s512(__m512i q, __m512i x) {
    __m512i w = _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
    __mmask64 neg = _mm512_movepi8_mask(w);
    return _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(w), _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x)),
                             _mm512_set1_epi16(1));
}
