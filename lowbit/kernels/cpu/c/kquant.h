/* ggml's K-quants (formats/kquant.py) multiplied as the GGUF file's own blocks: row r of a layer is
   its nsb = nblocks/8 super-blocks of 256 weights at qw + r·nsb·nbytes, read in place.

   Every type is first decoded, a super-block at a time in registers, to one form (kq_sb): 256
   unsigned codes c in natural order (four 64-byte vectors), and per group g of 16 weights an integer
   scale sc_g and minimum m_g with the fp16 d and dmin, so that
       w = d·sc_g·c − dmin·m_g           (Q2_K, Q4_K, Q5_K; Q4_K/Q5_K's groups of 32 repeat their pair)
       w = d·sc_g·(c − off)              (Q3_K off 4, Q6_K off 32)
   Codes never exceed 63, so u8·s8 pair sums fit int16 (maddubs) without saturating.

   int8 activations (the `q` entries, the decode engine's default): x rounded to s8 per 32-block as
   everywhere in lowbit (lb_xq_rows_task: xq, scale xd, sums xi), and here also xsum = xd·Σ x_q per
   16-block. Per super-block, with a_g = d·sc_g and b_g = dmin·m_g (symmetric: a_g·off):
       y += Σ_g a_g·xd_{g/2}·(Σ_{k∈g} c_k·xq_k) − Σ_g b_g·xsum_g
   The code sums are integer dots (VNNI vpdpbusd, else maddubs + madd; x86 only, as UniformQ's int8
   rows: the portable build runs the fp32 path), left in their
   lanes: lane l of a 64-code chunk t sums codes 4l..4l+3, group 4t + l/4, so the float step
   multiplies each lane by its group's factor (one permute) instead of reducing lanes first.
   Several tokens (prefill) share each decoded super-block: KQ_MT tokens per pass over a row.

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
static const kq_u8x16 KQ_PAIRS = {0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7};  /* group of 16 -> of 32 */

/* ---- decoders: one super-block -> kq_sb (byte layouts: io/kquants.py) ---- */

/* Q4_K {fp16 d, dmin; scales[12]; qs[128]}: the 6-bit scales and mins unpacked as ggml's
   get_scale_min_k4, with whole words (bytes 0-7 of u: scales, 8-15: mins). */
static inline void kq_scales_k4(const uint8_t *p, kq_sb *s) {
    uint32_t u[4]; memcpy(u, p, 12);
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
    uint32_t mins = u[1] & m1;
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
    u[2] = mins; u[0] &= m1;
    kq_u8x16 v; memcpy(&v, u, 16);
    s->sc = (kq_i8x16)__builtin_shuffle(v, KQ_PAIRS);
    s->m = __builtin_shuffle(v, KQ_PAIRS + 8);
}

static inline void kq_dec_q4k(const uint8_t *b, kq_sb *s) {
    s->d = kq_h2f(b); s->dmin = kq_h2f(b + 2);
    kq_scales_k4(b + 4, s);
    for (int t = 0; t < 4; t++) { kq_u8x32 v = kq_ld32(b + 16 + 32 * t); s->c[t] = kq_cat(v & 15, v >> 4); }
}

/* Q5_K {fp16 d, dmin; scales[12]; qh[32]; qs[128]}: Q4_K's nibbles, bit t of qh[i] the fifth bit of code 32t + i */
static inline void kq_dec_q5k(const uint8_t *b, kq_sb *s) {
    s->d = kq_h2f(b); s->dmin = kq_h2f(b + 2);
    kq_scales_k4(b + 4, s);
    kq_u8x32 qh = kq_ld32(b + 16);
    for (int t = 0; t < 4; t++) {
        kq_u8x32 v = kq_ld32(b + 48 + 32 * t);
        kq_u8x32 h0 = (qh >> (2 * t)) & 1, h1 = (qh >> (2 * t + 1)) & 1;
        s->c[t] = kq_cat((v & 15) | h0 << 4, (v >> 4) | h1 << 4);
    }
}

/* Q6_K {ql[128]; qh[64]; int8 scales[16]; fp16 d}: low nibbles of ql[64h + i] codes 128h + i, high
   ones 128h + 64 + i; bits 2s of qh[32h + i] the top two bits of code 128h + 32s + i. */
static inline void kq_dec_q6k(const uint8_t *b, kq_sb *s) {
    for (int h = 0; h < 2; h++) {
        kq_u8x64 l = kq_ld64(b + 64 * h);
        kq_u8x32 q = kq_ld32(b + 128 + 32 * h);
        s->c[2 * h] = (l & 15) | (kq_cat(q, q >> 2) & 3) << 4;
        s->c[2 * h + 1] = (l >> 4) | (kq_cat(q >> 4, q >> 6) & 3) << 4;
    }
    memcpy(&s->sc, b + 192, 16);
    s->m = (kq_u8x16){0};
    s->d = kq_h2f(b + 208); s->dmin = 0;
}

/* The 2-bit fields of Q2_K and Q3_K: byte 32h + i holds code 128h + 32s + i at bits 2s. */
static inline kq_u8x64 kq_two_bit(const uint8_t *qs, int t) {
    kq_u8x32 q = kq_ld32(qs + 32 * (t / 2));
    int s = 4 * (t % 2);
    return kq_cat((q >> s) & 3, (q >> (s + 2)) & 3);
}

/* Q3_K {hmask[32]; qs[64]; scales[12]; fp16 d}: code = 2 bits | hmask bit << 2 (bit b of hmask[i]:
   code 32b + i); sixteen 6-bit scales, low nibbles in bytes 0-7 (j, j+8), top bits at 2s of byte 8 + j%4. */
static inline void kq_dec_q3k(const uint8_t *b, kq_sb *s) {
    kq_u8x32 hm = kq_ld32(b);
    for (int t = 0; t < 4; t++)
        s->c[t] = kq_two_bit(b + 32, t) | kq_cat((hm >> (2 * t)) & 1, (hm >> (2 * t + 1)) & 1) << 2;
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

/* y[m0 + t][row] for t < mt tokens (mt <= KQ_MT): one pass over the row's super-blocks. */
static inline __attribute__((always_inline)) void kq_row_q(const lb_args *a, int row, int m0, int mt,
                                                           kq_decoder dec, int nbytes, int affine, int off) {
    int nsb = a->nblocks / 8;
    const uint8_t *blk = (const uint8_t *)a->qw + (size_t)row * nsb * nbytes;
    size_t ldq = (size_t)a->nblocks * 32, ldd = a->nblocks, lds = (size_t)a->nblocks * 2;
    float out[KQ_MT];
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i pairs = _mm512_cvtepu8_epi32((__m128i)KQ_PAIRS);
    __m512i lane[4];
    for (int t = 0; t < 4; t++) lane[t] = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(16 * t), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)), 2);
    __m512 acc[KQ_MT][2], accb[KQ_MT];  /* two chains a token: an FMA's latency is not a chunk's work */
    for (int t = 0; t < mt; t++) acc[t][0] = acc[t][1] = accb[t] = _mm512_setzero_ps();
    for (int sb = 0; sb < nsb; sb++, blk += nbytes) {
        LB_PREFETCH(blk + LB_PF_BYTES);
        kq_sb s; dec(blk, &s);
        __m512 f = _mm512_mul_ps(_mm512_set1_ps(s.d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32((__m128i)s.sc)));
        __m512 b = affine ? _mm512_mul_ps(_mm512_set1_ps(s.dmin), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)s.m)))
                          : _mm512_mul_ps(f, _mm512_set1_ps((float)off));
        for (int t = 0; t < mt; t++) {
            const int8_t *xq = a->xq + (m0 + t) * ldq + (size_t)sb * 256;
            __m512 dx = _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(_mm256_loadu_ps(a->xd + (m0 + t) * ldd + (size_t)sb * 8)));
            __m512 fx = _mm512_mul_ps(f, dx);
            accb[t] = _mm512_fmadd_ps(b, _mm512_loadu_ps(a->xsum + (m0 + t) * lds + (size_t)sb * 16), accb[t]);
            for (int c = 0; c < 4; c++) {
                __m512i x = _mm512_loadu_si512((const void *)(xq + 64 * c));
#ifdef __AVX512VNNI__
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), (__m512i)s.c[c], x);
#else
                __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)s.c[c], x), _mm512_set1_epi16(1));
#endif
                acc[t][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(lane[c], fx), acc[t][c & 1]);
            }
        }
    }
    for (int t = 0; t < mt; t++) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])) - _mm512_reduce_add_ps(accb[t]);
#elif defined(__AVX2__)
    __m256 acc[KQ_MT][2], accb[KQ_MT];
    for (int t = 0; t < mt; t++) acc[t][0] = acc[t][1] = accb[t] = _mm256_setzero_ps();
    __m256i lane[4];  /* 32-code chunk u of a half: groups 2u, 2u + 1 */
    for (int u = 0; u < 4; u++) lane[u] = _mm256_setr_epi32(2 * u, 2 * u, 2 * u, 2 * u, 2 * u + 1, 2 * u + 1, 2 * u + 1, 2 * u + 1);
    for (int sb = 0; sb < nsb; sb++, blk += nbytes) {
        LB_PREFETCH(blk + LB_PF_BYTES);
        kq_sb s; dec(blk, &s);
        __m256 f[2], b[2];
        for (int h = 0; h < 2; h++) {
            __m128i sc = h ? _mm_srli_si128((__m128i)s.sc, 8) : (__m128i)s.sc;
            f[h] = _mm256_mul_ps(_mm256_set1_ps(s.d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
            __m128i m = h ? _mm_srli_si128((__m128i)s.m, 8) : (__m128i)s.m;
            b[h] = affine ? _mm256_mul_ps(_mm256_set1_ps(s.dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m)))
                          : _mm256_mul_ps(f[h], _mm256_set1_ps((float)off));
        }
        union { kq_u8x64 v[4]; __m256i h[8]; } codes;
        memcpy(codes.v, s.c, sizeof codes.v);
        for (int t = 0; t < mt; t++) {
            const int8_t *xq = a->xq + (m0 + t) * ldq + (size_t)sb * 256;
            const float *xd = a->xd + (m0 + t) * ldd + (size_t)sb * 8, *xs = a->xsum + (m0 + t) * lds + (size_t)sb * 16;
            accb[t] = _mm256_fmadd_ps(b[0], _mm256_loadu_ps(xs), _mm256_fmadd_ps(b[1], _mm256_loadu_ps(xs + 8), accb[t]));
            for (int c = 0; c < 8; c++) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * c));
                __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes.h[c], x), _mm256_set1_epi16(1));
                __m256 fx = _mm256_mul_ps(_mm256_permutevar8x32_ps(f[c / 4], lane[c % 4]), _mm256_set1_ps(xd[c]));
                acc[t][c & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), fx, acc[t][c & 1]);
            }
        }
    }
    for (int t = 0; t < mt; t++) out[t] = lb_hsum256(_mm256_add_ps(acc[t][0], acc[t][1])) - lb_hsum256(accb[t]);
#endif
    for (int t = 0; t < mt; t++) a->y[(size_t)(m0 + t) * a->n + row] = out[t] + (a->bias ? a->bias[row] : 0.0f);
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

/* x -> s8 per 32-block (xq, xd, xi: lb_xq_rows_task) and xsum = xd·Σ x_q per 16-block; then `task`. */
static void kq_linear_q(lb_args *a, lb_task task) {
    if (a->threads > lb_pool.n) a->threads = lb_pool.n;
    size_t blocks = (size_t)a->m * a->nblocks;
    a->xq = (int8_t *)lb_alloc(blocks * 8);
    a->xd = lb_alloc(blocks);
    a->xi = (int32_t *)lb_alloc(blocks);
    a->xsum = lb_alloc(blocks * 2);
    lb_pool_run(lb_xq_rows_task, a, a->threads);
    for (size_t h = 0; h < blocks * 2; h++) {
        int s = 0;
        for (int i = 0; i < 16; i++) s += a->xq[16 * h + i];
        a->xsum[h] = a->xd[h / 2] * (float)s;
    }
    lb_pool_run(task, a, a->threads);
    free(a->xq); free(a->xd); free(a->xi); free(a->xsum);
}

#define KQ_INT8(bits) static void kq_q_task_b##bits(void *p, int tid, int nthr) { (void)nthr; kq_task_q(p, tid, KQ_ARGS_B##bits); } \
    LB_EXPORT void lb_kquant_q_b##bits(lb_args *a) { kq_linear_q(a, kq_q_task_b##bits); }
#else
#define KQ_INT8(bits)
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
