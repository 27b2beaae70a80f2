/* ggml's K-quants (formats/kquant.py) multiplied as the GGUF file's own blocks: row r of a layer is
   its nsb = nblocks/8 super-blocks of 256 weights at qw + r·nsb·nbytes, read in place.

   Every type is first decoded, a super-block at a time in registers, to one form (kq_sb): 256
   unsigned codes c in natural order (four 64-byte vectors), and per group g of 16 weights an integer
   scale sc_g and minimum m_g with the fp16 d and dmin, so that
       w = d·sc_g·c − dmin·m_g           (Q2_K, Q4_K, Q5_K; Q4_K/Q5_K's groups of 32 repeat their pair)
       w = d·sc_g·(c − off)              (Q3_K off 4, Q6_K off 32)
   Codes never exceed 63, so u8·s8 pair sums fit int16 (maddubs) without saturating.

   int8 activations (the `q` entries, the decode engine's default): x rounded to s8 per 256 as
   llama.cpp's q8_K (scale amax/127, and the sums of each 16: bsums), so that per super-block
       y += d·dx·Σ_g sc_g·Σ_{k∈g} c_k·x_k − dx·Σ_g f_g·S_g,  f_g = dmin·m_g (affine) or d·off·sc_g
   with every sum over g an integer (maddubs pairs, madd/vpdpwssd by the int16 group scale): one
   float step per super-block, llama.cpp's arithmetic. (x per 32, as UniformQ's int8 rows round it,
   would need a float step per 32 codes: measured 1.7x slower per byte on Zen 4.) Several tokens
   (prefill) share each decoded super-block: KQ_MT tokens per pass over a row.

   fp32 activations (the exact path): a super-block decoded to fp32 weights, w = a_g·(c − off) − b_g
   as the reference computes it; one token: a dot with x; several: tiles of rows dequantized into
   the fp32 GEMM of driver.h (lb_gemm_tile). */
#pragma once

#define KQ_MT 4  /* tokens sharing one decoded super-block */

typedef uint8_t kq_u8x64 __attribute__((vector_size(64)));
typedef uint8_t kq_u8x32 __attribute__((vector_size(32)));
typedef uint8_t kq_u8x16 __attribute__((vector_size(16)));
typedef int8_t kq_i8x16 __attribute__((vector_size(16)));

typedef struct {
    kq_u8x64 c[4];  /* codes 64t .. 64t + 63 */
    kq_i8x16 sc;    /* per group of 16 */
    kq_u8x16 m;     /* per group of 16 (affine types) */
    float d, dmin;
} kq_sb;

typedef void (*kq_decoder)(const uint8_t *, kq_sb *);

static inline float kq_h2f(const uint8_t *p) {
    uint16_t h; memcpy(&h, p, 2);
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    return lb_h2f(h);
#endif
}

static inline kq_u8x32 kq_ld32(const uint8_t *p) { kq_u8x32 v; memcpy(&v, p, 32); return v; }
static inline kq_u8x64 kq_ld64(const uint8_t *p) { kq_u8x64 v; memcpy(&v, p, 64); return v; }
static inline kq_u8x64 kq_cat(kq_u8x32 lo, kq_u8x32 hi) {  /* in registers (a union would go through memory) */
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                   21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41,
                                   42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63);
}

/* ---- decoders: one super-block -> kq_sb (byte layouts: io/kquants.py) ---- */

/* 32 bytes p -> 64 codes: (p[i] >> s0) & mask, then (p[i] >> s1) & mask. AVX-512: the 32 bytes broadcast
   to both halves, each half shifted by its own count (64-bit lanes: the mask drops what crosses a byte). */
static inline kq_u8x64 kq_split(const uint8_t *p, int s0, int s1, int mask) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
    v = _mm512_srlv_epi64(v, _mm512_setr_epi64(s0, s0, s0, s0, s1, s1, s1, s1));
    return (kq_u8x64)_mm512_and_si512(v, _mm512_set1_epi8((char)mask));
#else
    kq_u8x32 v = kq_ld32(p);
    return kq_cat((v >> s0) & (uint8_t)mask, (v >> s1) & (uint8_t)mask);
#endif
}

/* Q4_K/Q5_K's twelve bytes of eight 6-bit scales and mins (ggml's get_scale_min_k4: j < 4 the low 6
   bits of byte j, j + 4; j >= 4 a nibble of byte j + 4 and the top two bits of byte j − 4, j) straight
   into the per-16 form (each pair repeated): byte shuffles, no scalar code. p: the 12 bytes and 4 more. */
static inline void kq_scales_k4(const uint8_t *p, kq_sb *s) {
    static const kq_u8x16 SC = {0, 0, 1, 1, 2, 2, 3, 3, 8, 8, 9, 9, 10, 10, 11, 11};
    static const kq_u8x16 SC_TOP = {16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 1, 1, 2, 2, 3, 3};  /* 16: zero */
    static const kq_u8x16 M = {4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11};
    static const kq_u8x16 M_TOP = {16, 16, 16, 16, 16, 16, 16, 16, 4, 4, 5, 5, 6, 6, 7, 7};
    static const kq_u8x16 LOW = {63, 63, 63, 63, 63, 63, 63, 63, 15, 15, 15, 15, 15, 15, 15, 15};
    static const kq_u8x16 FIRST = {63, 63, 63, 63, 63, 63, 63, 63, 0, 0, 0, 0, 0, 0, 0, 0};
    kq_u8x16 v, zero = {0};
    memcpy(&v, p, 16);
    kq_u8x16 sc = __builtin_shuffle(v, SC), m = __builtin_shuffle(v, M);
    s->sc = (kq_i8x16)((sc & LOW) | ((__builtin_shuffle(v, zero, SC_TOP) >> 2) & 48));
    s->m = (m & FIRST) | ((m >> 4) & (LOW & ~FIRST)) | ((__builtin_shuffle(v, zero, M_TOP) >> 2) & 48);
}

/* Q4_K {fp16 d, dmin; scales[12]; qs[128]}: byte 32t + i holds code 64t + i low, 64t + 32 + i high */
static inline void kq_dec_q4k(const uint8_t *b, kq_sb *s) {
    s->d = kq_h2f(b); s->dmin = kq_h2f(b + 2);
    kq_scales_k4(b + 4, s);
    for (int t = 0; t < 4; t++) s->c[t] = kq_split(b + 16 + 32 * t, 0, 4, 15);
}

/* Q5_K {fp16 d, dmin; scales[12]; qh[32]; qs[128]}: Q4_K's nibbles, bit t of qh[i] the fifth bit of code 32t + i */
static inline void kq_dec_q5k(const uint8_t *b, kq_sb *s) {
    s->d = kq_h2f(b); s->dmin = kq_h2f(b + 2);
    kq_scales_k4(b + 4, s);
    for (int t = 0; t < 4; t++) s->c[t] = kq_split(b + 48 + 32 * t, 0, 4, 15) | kq_split(b + 16, 2 * t, 2 * t + 1, 1) << 4;
}

/* Q6_K {ql[128]; qh[64]; int8 scales[16]; fp16 d}: low nibbles of ql[64h + i] codes 128h + i, high
   ones 128h + 64 + i; bits 2s of qh[32h + i] the top two bits of code 128h + 32s + i. */
static inline void kq_dec_q6k(const uint8_t *b, kq_sb *s) {
    for (int h = 0; h < 2; h++) {
        kq_u8x64 l = kq_ld64(b + 64 * h);
        s->c[2 * h] = (l & 15) | kq_split(b + 128 + 32 * h, 0, 2, 3) << 4;
        s->c[2 * h + 1] = (l >> 4) | kq_split(b + 128 + 32 * h, 4, 6, 3) << 4;
    }
    memcpy(&s->sc, b + 192, 16);
    s->m = (kq_u8x16){0};
    s->d = kq_h2f(b + 208); s->dmin = 0;
}

/* The 2-bit fields of Q2_K and Q3_K: byte 32h + i holds code 128h + 32s + i at bits 2s. */
static inline kq_u8x64 kq_two_bit(const uint8_t *qs, int t) {
    return kq_split(qs + 32 * (t / 2), 4 * (t % 2), 4 * (t % 2) + 2, 3);
}

/* Q3_K {hmask[32]; qs[64]; scales[12]; fp16 d}: code = 2 bits | hmask bit << 2 (bit b of hmask[i]:
   code 32b + i); sixteen 6-bit scales, low nibbles in bytes 0-7 (j, j+8), top bits at 2s of byte 8 + j%4. */
static inline void kq_dec_q3k(const uint8_t *b, kq_sb *s) {
    for (int t = 0; t < 4; t++) s->c[t] = kq_two_bit(b + 32, t) | kq_split(b, 2 * t, 2 * t + 1, 1) << 2;
    const uint8_t *p = b + 96;
    for (int j = 0; j < 16; j++)
        s->sc[j] = (int8_t)((((j < 8 ? p[j] : p[j - 8] >> 4) & 15) | ((p[8 + j % 4] >> (2 * (j / 4))) & 3) << 4) - 32);
    s->m = (kq_u8x16){0};
    s->d = kq_h2f(b + 108); s->dmin = 0;
}

/* Q2_K {scales[16] (sc low nibble, m high); qs[64]; fp16 d, dmin} */
static inline void kq_dec_q2k(const uint8_t *b, kq_sb *s) {
    kq_u8x16 v; memcpy(&v, b, 16);
    s->sc = (kq_i8x16)(v & 15); s->m = v >> 4;
    for (int t = 0; t < 4; t++) s->c[t] = kq_two_bit(b + 16, t);
    s->d = kq_h2f(b + 80); s->dmin = kq_h2f(b + 82);
}

/* ---- int8 activations (x86: the ISAs with an integer dot) ---- */
#if defined(__AVX2__)

static inline float kq_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 256 floats -> s8 q = round-half-even(x / d), d = amax/127 (0 for a zero block), and the sums of q
   over each 16 (bsums): llama.cpp's q8_K, the activations its K-quant dots take. 16 at a time in
   vectors (cvtps rounds half to even, as the reference's torch.round). */
static void kq_quant256(const float *x, int8_t *q, float *d, int16_t *bsums) {
#ifdef __AVX512F__
    __m512 mx = _mm512_setzero_ps();
    for (int i = 0; i < 256; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    float amax = _mm512_reduce_max_ps(mx);
#else
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < 256; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#endif
    *d = amax / 127.0f;
    float inv = *d > 0 ? 1.0f / *d : 0.0f;
    for (int g = 0; g < 16; g++) {
#ifdef __AVX512F__
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * g), _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(q + 16 * g), _mm512_cvtepi32_epi8(v));
        bsums[g] = (int16_t)_mm512_reduce_add_epi32(v);
#else
        __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16 * g), _mm256_set1_ps(inv)));
        __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16 * g + 8), _mm256_set1_ps(inv)));
        __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);  /* 16 int16 in order */
        _mm_storeu_si128((__m128i *)(q + 16 * g), _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
        __m256i s8 = _mm256_add_epi32(lo, hi);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        bsums[g] = (int16_t)_mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
#endif
    }
}

/* Σ_k c_k·x_k per group of 16 times its scale, over a super-block: codes c (u8, <= 63) times x (s8)
   in int16 pairs (maddubs: at most 2·63·127, no saturation), times the group's int16 scale summed
   in int32 (madd, or VNNI's vpdpwssd), in 16 (AVX-512) or 8 (AVX2) int32 lanes; then (kq_fma) those
   lanes in float times a scale into a float accumulator, reduced once a row (kq_sum). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
typedef __m512 kq_accf;
static const uint16_t KQ_SCALE_LANES[4][32] = {  /* chunk t: 128-bit lane L holds pairs of group 4t + L */
#define KQ_L(t) {4*t, 4*t, 4*t, 4*t, 4*t, 4*t, 4*t, 4*t, 4*t+1, 4*t+1, 4*t+1, 4*t+1, 4*t+1, 4*t+1, 4*t+1, 4*t+1, \
                 4*t+2, 4*t+2, 4*t+2, 4*t+2, 4*t+2, 4*t+2, 4*t+2, 4*t+2, 4*t+3, 4*t+3, 4*t+3, 4*t+3, 4*t+3, 4*t+3, 4*t+3, 4*t+3}
    KQ_L(0), KQ_L(1), KQ_L(2), KQ_L(3)
#undef KQ_L
};
static inline kq_accf kq_fma(const kq_sb *s, __m256i sc16, const int8_t *x, float scale, kq_accf acc) {
    __m512i dot[4], wide = _mm512_castsi256_si512(sc16);
    for (int t = 0; t < 4; t++) {  /* four independent sums, added as a tree: short dependency chains */
        __m512i scv = _mm512_permutexvar_epi16(_mm512_loadu_si512((const void *)KQ_SCALE_LANES[t]), wide);
        __m512i p = _mm512_maddubs_epi16((__m512i)s->c[t], _mm512_loadu_si512((const void *)(x + 64 * t)));
        dot[t] = _mm512_madd_epi16(p, scv);
    }
    __m512i sum = _mm512_add_epi32(_mm512_add_epi32(dot[0], dot[1]), _mm512_add_epi32(dot[2], dot[3]));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(scale), acc);
}
static inline kq_accf kq_zero(void) { return _mm512_setzero_ps(); }
static inline float kq_sum(kq_accf v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256 kq_accf;
static inline kq_accf kq_fma(const kq_sb *s, __m256i sc16, const int8_t *x, float scale, kq_accf acc) {
    __m256i dot = _mm256_setzero_si256();
    union { kq_u8x64 v[4]; __m256i h[8]; } codes;
    memcpy(codes.v, s->c, sizeof codes.v);
    int16_t sc[16]; memcpy(sc, &sc16, 32);
    for (int c = 0; c < 8; c++) {  /* 128-bit half L of chunk c: pairs of group 2c + L */
        __m256i scv = _mm256_setr_m128i(_mm_set1_epi16(sc[2 * c]), _mm_set1_epi16(sc[2 * c + 1]));
        __m256i p = _mm256_maddubs_epi16(codes.h[c], _mm256_loadu_si256((const __m256i *)(x + 32 * c)));
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(p, scv));
    }
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc);
}
static inline kq_accf kq_zero(void) { return _mm256_setzero_ps(); }
static inline float kq_sum(kq_accf v) { return kq_hsum256(v); }
#endif

/* y[m0 + t][row] for t < mt tokens (mt <= KQ_MT): one pass over the row's super-blocks, each decoded
   once for the mt tokens. Per super-block and token, with dx its x scale and S_g the bsums:
       y += d·dx·Σ_g sc_g·(Σ c·x_q) − dx·(affine ? dmin·Σ_g m_g·S_g : d·off·Σ_g sc_g·S_g)
   the sums over g exact in int32, then one FMA each into float lanes. */
static inline __attribute__((always_inline)) void kq_row_q(const lb_args *a, int row, int m0, int mt,
                                                           kq_decoder dec, int nbytes, int affine, int off) {
    int nsb = a->nblocks / 8;
    const uint8_t *blk = (const uint8_t *)a->qw + (size_t)row * nsb * nbytes;
    const int16_t *bsums = (const int16_t *)a->xi;
    kq_accf acc[KQ_MT];
    __m256 accb[KQ_MT];
    for (int t = 0; t < mt; t++) acc[t] = kq_zero(), accb[t] = _mm256_setzero_ps();
    for (int sb = 0; sb < nsb; sb++, blk += nbytes) {
        LB_PREFETCH(blk + LB_PF_BYTES);
        kq_sb s; dec(blk, &s);
        __m256i sc16 = _mm256_cvtepi8_epi16((__m128i)s.sc);
        __m256i fold = affine ? _mm256_cvtepu8_epi16((__m128i)s.m) : _mm256_mullo_epi16(sc16, _mm256_set1_epi16((short)off));
        float dfold = affine ? s.dmin : s.d;
        for (int t = 0; t < mt; t++) {
            size_t at = (size_t)(m0 + t) * nsb + sb;
            float dx = a->xd[at];
            acc[t] = kq_fma(&s, sc16, a->xq + 256 * at, s.d * dx, acc[t]);
            __m256i b = _mm256_madd_epi16(fold, _mm256_loadu_si256((const __m256i *)(bsums + 16 * at)));
            accb[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), _mm256_set1_ps(dfold * dx), accb[t]);
        }
    }
    for (int t = 0; t < mt; t++)
        a->y[(size_t)(m0 + t) * a->n + row] = kq_sum(acc[t]) - kq_hsum256(accb[t]) + (a->bias ? a->bias[row] : 0.0f);
}

/* Thread tid's band of rows, every token, KQ_MT tokens per pass (tokens in chunks that stay in cache). */
static inline __attribute__((always_inline)) void kq_task_q(void *p, int tid, kq_decoder dec, int nbytes, int affine, int off) {
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, 1, &lo, &hi);
    enum { CHUNK = 64 };
    for (int m0 = 0; m0 < a->m; m0 += CHUNK) {
        int m1 = a->m - m0 < CHUNK ? a->m : m0 + CHUNK;
        for (int row = lo; row < hi; row++) {
            int m = m0;
            for (; m + KQ_MT <= m1; m += KQ_MT) kq_row_q(a, row, m, KQ_MT, dec, nbytes, affine, off);
            for (; m < m1; m++) kq_row_q(a, row, m, 1, dec, nbytes, affine, off);
        }
    }
}

/* Each token's x -> q8_K per 256 (xq, its scale xd, bsums in xi as int16); then `task`. */
static void kq_xq_task(void *p, int tid, int nthr) {
    lb_args *a = p;
    int per = (a->m + nthr - 1) / nthr, lo = tid * per, hi = lo + per < a->m ? lo + per : a->m;
    size_t nsb = a->nblocks / 8;
    for (size_t at = (size_t)lo * nsb; at < (size_t)hi * nsb; at++)
        kq_quant256(a->x + 256 * at, a->xq + 256 * at, a->xd + at, (int16_t *)a->xi + 16 * at);
}

static void kq_linear_q(lb_args *a, lb_task task) {
    if (a->threads > lb_pool.n) a->threads = lb_pool.n;
    size_t sbs = (size_t)a->m * (a->nblocks / 8);
    a->xq = (int8_t *)lb_alloc(sbs * 64);
    a->xd = lb_alloc(sbs);
    a->xi = (int32_t *)lb_alloc(sbs * 8);
    lb_pool_run(kq_xq_task, a, a->m < a->threads ? a->m : a->threads);
    lb_pool_run(task, a, a->threads);
    free(a->xq); free(a->xd); free(a->xi);
}

#define KQ_INT8(bits) __attribute__((unused)) static void kq_q_task_b##bits(void *p, int tid, int nthr) { (void)nthr; kq_task_q(p, tid, KQ_ARGS_B##bits); } \
    LB_EXPORT void lb_kquant_q_b##bits(lb_args *a) { kq_linear_q(a, KQ_TASK_B##bits); }
#else
#define KQ_INT8(bits)
#endif

/* Q4_K and Q5_K in tiles of 16 rows (AVX-512 VNNI): the rows in the 16 lanes, as llama.cpp's repacked
   q4_K_8x8 and UniformQ's kernels keep them, so one super-block step serves 16 rows: a code vector
   holds 4 bytes of each row (8 codes: quad 2p in the low nibbles, quad 2p + 1 in the high ones, p <
   32), each meets x's quad broadcast (vpdpbusd), a group of 32 gets its 16 rows' scales in one
   multiply. Per super-block of a tile (built by kernels/cpu/kquant.py's `tiles`), read front to back
   as one stream (scales between the codes cost Q6_K 2.5x in DRAM reads): scales [8 groups][16 rows],
   mins [8][16] (u8), d [16], dmin [16] (fp16); then per group g the codes' nibbles [4 s][16 rows][4]
   (p = 4g + s) and, Q5_K, their fifth bits [16 rows][4]: byte i's bit 2s the one of code 8p + i, bit
   2s + 1 that of code 8p + 4 + i, set into bit 4 of the code by one shift and one ternary-logic op.
   Per row it is 16 vector instructions a super-block (Q4_K) where the row-at-a-time kernel takes ~60. */
#if defined(__AVX512VNNI__)
static inline __m512i kq_bit4(__m512i h, int from) {  /* bit `from` of each byte moved to bit 4 (other bits: any) */
    return from < 4 ? _mm512_slli_epi16(h, 4 - from) : from > 4 ? _mm512_srli_epi16(h, from - 4) : h;
}

static inline __attribute__((always_inline)) void kq_tiles_affine(void *p, int tid, int fifth) {
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, 16, &lo, &hi);
    int nsb = a->nblocks / 8, gstride = 256 + 64 * fifth, bytes = 320 + 8 * gstride;
    const int16_t *bsums = (const int16_t *)a->xi;
    const __m512i nib = _mm512_set1_epi8(15), b4 = _mm512_set1_epi8(16);
    for (int row = lo; row < hi; row += 16) {
        const uint8_t *tile = (const uint8_t *)a->qw + (size_t)(row / 16) * nsb * bytes;
        for (int m = 0; m < a->m; m++) {
            const int8_t *xq = a->xq + (size_t)m * nsb * 256;
            __m512 acc = _mm512_setzero_ps();
            const uint8_t *t = tile;
            for (int sb = 0; sb < nsb; sb++, t += bytes, xq += 256) {
                LB_PREFETCH(t + LB_PF_BYTES);
                size_t at = (size_t)m * nsb + sb;
                const int16_t *bs = bsums + 16 * at;
                __m512i main = _mm512_setzero_si512(), mins = _mm512_setzero_si512();
                for (int g = 0; g < 8; g++) {
                    const uint8_t *u = t + 320 + gstride * g;
                    __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
                    __m512i h = fifth ? _mm512_loadu_si512((const void *)(u + 256)) : nib;
                    for (int s4 = 0; s4 < 4; s4++) {
                        int q = 4 * g + s4;
                        __m512i v = _mm512_loadu_si512((const void *)(u + 64 * s4));
                        __m512i c0 = _mm512_and_si512(v, nib), c1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                        if (fifth) {  /* c | (h' & 16) */
                            c0 = _mm512_ternarylogic_epi32(c0, kq_bit4(h, 2 * s4), b4, 0xF8);
                            c1 = _mm512_ternarylogic_epi32(c1, kq_bit4(h, 2 * s4 + 1), b4, 0xF8);
                        }
                        int32_t x0, x1; memcpy(&x0, xq + 8 * q, 4); memcpy(&x1, xq + 8 * q + 4, 4);
                        d0 = _mm512_dpbusd_epi32(d0, c0, _mm512_set1_epi32(x0));
                        d1 = _mm512_dpbusd_epi32(d1, c1, _mm512_set1_epi32(x1));
                    }
                    __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(t + 16 * g)));
                    __m512i mn = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(t + 128 + 16 * g)));
                    main = _mm512_add_epi32(main, _mm512_mullo_epi32(_mm512_add_epi32(d0, d1), sc));
                    mins = _mm512_add_epi32(mins, _mm512_mullo_epi32(mn, _mm512_set1_epi32(bs[2 * g] + bs[2 * g + 1])));
                }
                __m512 dx = _mm512_set1_ps(a->xd[at]);
                __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t + 256)));
                __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t + 288)));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(main), _mm512_mul_ps(d, dx), acc);
                acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mins), _mm512_mul_ps(dmin, dx), acc);
            }
            float out[16];
            _mm512_storeu_ps(out, acc);
            for (int l = 0; l < 16 && row + l < a->n; l++)
                a->y[(size_t)m * a->n + row + l] = out[l] + (a->bias ? a->bias[row + l] : 0.0f);
        }
    }
}
static void kq_tiles_task_b4(void *p, int tid, int nthr) { (void)nthr; kq_tiles_affine(p, tid, 0); }
static void kq_tiles_task_b5(void *p, int tid, int nthr) { (void)nthr; kq_tiles_affine(p, tid, 1); }
#define KQ_TASK_B5 kq_tiles_task_b5
#define KQ_TASK_B4 kq_tiles_task_b4

/* Q6_K the same way, its tile read front to back as one stream: per super-block, int8 scales [16 groups]
   [16 rows]; then per pair j of groups (codes 32j .. 32j + 31) the low nibbles [4 q][16 rows][4] as Q4_K's
   and the top two bits [A, B][16 rows][4], byte i of A holding, at bits 2f, those of code 8(4j + f) + i
   (B: + 4); d [16] last. The offset 32 is taken off each group's sum (32·Σ x_q) before its scale. */
#define KQ_TILE6_BYTES 3360
static void kq_tiles_task_b6(void *p, int tid, int nthr) {
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, 16, &lo, &hi);
    int nsb = a->nblocks / 8;
    const int16_t *bsums = (const int16_t *)a->xi;
    const __m512i nib = _mm512_set1_epi8(15), top = _mm512_set1_epi8(0x30);
    for (int row = lo; row < hi; row += 16) {
        const uint8_t *tile = (const uint8_t *)a->qw + (size_t)(row / 16) * nsb * KQ_TILE6_BYTES;
        for (int m = 0; m < a->m; m++) {
            const int8_t *xq = a->xq + (size_t)m * nsb * 256;
            __m512 acc = _mm512_setzero_ps();
            const uint8_t *t = tile;
            for (int sb = 0; sb < nsb; sb++, t += KQ_TILE6_BYTES, xq += 256) {
                LB_PREFETCH(t + LB_PF_BYTES);
                size_t at = (size_t)m * nsb + sb;
                const int16_t *bs = bsums + 16 * at;
                __m512i main = _mm512_setzero_si512();
                for (int j = 0; j < 8; j++) {
                    const uint8_t *u = t + 256 + 384 * j;
                    __m512i ha = _mm512_loadu_si512((const void *)(u + 256));
                    __m512i hb = _mm512_loadu_si512((const void *)(u + 320));
                    __m512i dg[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
                    for (int f = 0; f < 4; f++) {
                        int q = 4 * j + f;
                        __m512i v = _mm512_loadu_si512((const void *)(u + 64 * f));
                        __m512i sa = f == 0 ? _mm512_slli_epi16(ha, 4) : f == 1 ? _mm512_slli_epi16(ha, 2) : f == 2 ? ha : _mm512_srli_epi16(ha, 2);
                        __m512i sbv = f == 0 ? _mm512_slli_epi16(hb, 4) : f == 1 ? _mm512_slli_epi16(hb, 2) : f == 2 ? hb : _mm512_srli_epi16(hb, 2);
                        __m512i ca = _mm512_or_si512(_mm512_and_si512(v, nib), _mm512_and_si512(sa, top));
                        __m512i cb = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), nib), _mm512_and_si512(sbv, top));
                        int32_t x0, x1; memcpy(&x0, xq + 8 * q, 4); memcpy(&x1, xq + 8 * q + 4, 4);
                        dg[f / 2] = _mm512_dpbusd_epi32(dg[f / 2], ca, _mm512_set1_epi32(x0));
                        dg[f / 2] = _mm512_dpbusd_epi32(dg[f / 2], cb, _mm512_set1_epi32(x1));
                    }
                    for (int h = 0; h < 2; h++) {
                        int g = 2 * j + h;
                        __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(t + 16 * g)));
                        main = _mm512_add_epi32(main, _mm512_mullo_epi32(_mm512_sub_epi32(dg[h], _mm512_set1_epi32(32 * bs[g])), sc));
                    }
                }
                __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t + 3328)));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(main), _mm512_mul_ps(d, _mm512_set1_ps(a->xd[at])), acc);
            }
            float out[16];
            _mm512_storeu_ps(out, acc);
            for (int l = 0; l < 16 && row + l < a->n; l++)
                a->y[(size_t)m * a->n + row + l] = out[l] + (a->bias ? a->bias[row + l] : 0.0f);
        }
    }
    (void)nthr;
}
#define KQ_TASK_B6 kq_tiles_task_b6
LB_EXPORT int lb_kquant_tiled(int bits) { return bits >= 4; }  /* which int8 entries read tiles (kquant.py) */
#else
LB_EXPORT int lb_kquant_tiled(int bits) { (void)bits; return 0; }
#endif
#define KQ_TASK_B2 kq_q_task_b2
#define KQ_TASK_B3 kq_q_task_b3
#ifndef KQ_TASK_B4
#define KQ_TASK_B4 kq_q_task_b4
#endif
#ifndef KQ_TASK_B5
#define KQ_TASK_B5 kq_q_task_b5
#endif
#ifndef KQ_TASK_B6
#define KQ_TASK_B6 kq_q_task_b6
#endif

/* ---- fp32 activations ---- */

/* Super-block `sb` of `row` as 256 fp32 weights: a_g·(c − off) − b_g, the reference's arithmetic. */
static inline __attribute__((always_inline)) void kq_dequant(const lb_args *a, int row, int sb, float *w,
                                                             kq_decoder dec, int nbytes, int affine, int off) {
    kq_sb s;
    dec((const uint8_t *)a->qw + ((size_t)row * (a->nblocks / 8) + sb) * nbytes, &s);
    uint8_t codes[256]; memcpy(codes, s.c, 256);
    for (int g = 0; g < 16; g++) {
        float ag = s.d * (float)s.sc[g], bg = affine ? s.dmin * (float)s.m[g] : 0.0f;
        for (int i = 0; i < 16; i++) w[16 * g + i] = ag * (float)(codes[16 * g + i] - off) - bg;
    }
}

static inline __attribute__((always_inline)) void kq_gemv_task(void *p, int tid, kq_decoder dec, int nbytes, int affine, int off) {
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, 1, &lo, &hi);
    float w[256];
    for (int row = lo; row < hi; row++) {
        float acc[16] = {0};
        for (int sb = 0; sb < a->nblocks / 8; sb++) {
            kq_dequant(a, row, sb, w, dec, nbytes, affine, off);
            const float *x = a->x + (size_t)sb * 256;
            for (int k = 0; k < 256; k += 16)
                for (int l = 0; l < 16; l++) acc[l] += w[k + l] * x[k + l];
        }
        float s = 0;
        for (int l = 0; l < 16; l++) s += acc[l];
        a->y[row] = s + (a->bias ? a->bias[row] : 0.0f);
    }
}

/* Tiles of nb rows × whole super-blocks (kc rounded down to a multiple of 256) into lb_gemm_tile. */
static inline __attribute__((always_inline)) void kq_gemm_task(void *p, int tid, kq_decoder dec, int nbytes, int affine, int off) {
    lb_args b = *(const lb_args *)p;
    b.kc = b.kc < 256 ? 256 : b.kc / 256 * 256;
    int lo, hi; lb_band(&b, tid, MICRO_NR, &lo, &hi);
    if (lo >= hi) return;
    float *buf = lb_alloc((size_t)b.nb * b.kc);
    for (int nt = lo; nt < hi; nt += b.nb) {
        int rows = hi - nt < b.nb ? hi - nt : b.nb;
        for (int kb = 0; kb < b.nblocks; kb += b.kc / 32) {
            int nkb = b.nblocks - kb < b.kc / 32 ? b.nblocks - kb : b.kc / 32;
            for (int r = 0; r < rows; r++)
                for (int sb = 0; sb < nkb / 8; sb++) kq_dequant(&b, nt + r, kb / 8 + sb, buf + (size_t)r * b.kc + 256 * sb, dec, nbytes, affine, off);
            lb_gemm_tile(&b, buf, nt, rows, kb, nkb);
        }
    }
    free(buf);
}

/* The entry points of one type: lb_kquant_b<bits> (fp32) and lb_kquant_q_b<bits> (int8). */
#define KQ_ENTRIES(bits)                                                                                          \
    static void kq_gemv_task_b##bits(void *p, int tid, int nthr) { (void)nthr; kq_gemv_task(p, tid, KQ_ARGS_B##bits); } \
    static void kq_gemm_task_b##bits(void *p, int tid, int nthr) { (void)nthr; kq_gemm_task(p, tid, KQ_ARGS_B##bits); } \
    LB_EXPORT void lb_kquant_b##bits(lb_args *a) { lb_linear(a, kq_gemv_task_b##bits, kq_gemm_task_b##bits, NULL, NULL); } \
    KQ_INT8(bits)

/* decoder, bytes per super-block, affine, offset */
#define KQ_ARGS_B2 kq_dec_q2k, 84, 1, 0
#define KQ_ARGS_B3 kq_dec_q3k, 110, 0, 4
#define KQ_ARGS_B4 kq_dec_q4k, 144, 1, 0
#define KQ_ARGS_B5 kq_dec_q5k, 176, 1, 0
#define KQ_ARGS_B6 kq_dec_q6k, 210, 0, 32
KQ_ENTRIES(2)
KQ_ENTRIES(3)
KQ_ENTRIES(4)
KQ_ENTRIES(5)
KQ_ENTRIES(6)
