/* Weight-only quantized matrix products and a decoding step's attention for CPU inference,
   called from Python through ctypes.

   y (M, N) = x (M, K) @ W^T, where W (N, K) is int8 with an optional fp16 scale per group of 32
   along K (Q8_0's layout: GGUF token tables) and an optional float scale per row (per-channel
   int8), or 4-bit with an fp16 scale and offset per group of 32 (w = q * scale + offset: GGUF's
   Q4_0/Q4_1/Q4_K values without re-rounding). The AVX-512 and plain-C builds keep activations
   in float32; the AVX2 build rounds them to int8 in groups of 32 (as llama.cpp's Q8_0
   activations) for integer dot products. A prompt's rows through int8 layers are rounded to
   int16 per row in both x86 builds (see tile_prompt). In every build each output is
   one row's own sum in a fixed order, so a row's result does not depend on how many other
   rows share the call (batch invariance).

   Decoding one token is a pass over every weight byte, so the loop reads each weight row once
   and uses it for up to MT rows of x at a time (a batch of sequences). Work is split over
   output columns with OpenMP; linked against the libgomp that PyTorch has already loaded (same
   soname), it shares PyTorch's thread pool and thread count.

   Three builds of the same source, chosen by kernels.py from the CPU's features: AVX-512
   (-march=native on a CPU that has it), AVX2 + FMA + F16C (-march=x86-64-v3: most laptops and
   many cloud VMs; also forced on an AVX-512 host to test it), and plain C (-DLMF_GENERIC,
   vectorised by the compiler through the `omp simd` hints). The tests build and check all three
   where the CPU can run them. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(LMF_GENERIC) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__F16C__)
#include <immintrin.h>
#define LMF_ISA 2
#elif !defined(LMF_GENERIC) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LMF_ISA 1
#else
#define LMF_ISA 0
#endif

#define GROUP 32
#define MT 8 /* rows of x per pass over a weight row */
#define PROMPT_ROWS 24 /* rows of a prompt per sweep over a matrix's outputs, at most */
#define PROMPT_L1 28672 /* bytes of int16 rows per sweep (an L1 data cache is 32-48 KB) */

static inline float half_to_float(uint16_t h) {
#if LMF_ISA > 0
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#if LMF_ISA > 0
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* One weight row's group g as 32 floats (times its scale, plus its offset), in vector registers:
   the int8 and 4-bit tiles below differ only in this step. The loops over rows of x unroll (mt
   is a literal at every call), so the accumulators stay in registers. (Several weight rows per
   pass were tried: slower, the compiler spills.) */
#if LMF_ISA == 2
#define LMF_TILE(NAME, ...)                                                                                      \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t K, const void *wv,          \
                                                           const uint16_t *gs, const uint16_t *go,              \
                                                           const float *rs, float *y, int64_t ldy, const int mt) { \
        __m512 acc[MT];                                                                                          \
        for (int m = 0; m < mt; m++) acc[m] = _mm512_setzero_ps();                                              \
        const int64_t G = K / GROUP;                                                                             \
        for (int64_t g = 0; g < G; g++) {                                                                        \
            __m512 w0, w1;                                                                                       \
            __VA_ARGS__                                                                                          \
            for (int m = 0; m < mt; m++) {                                                                       \
                acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + g * GROUP), acc[m]);                    \
                acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + g * GROUP + 16), acc[m]);               \
            }                                                                                                    \
        }                                                                                                        \
        for (int m = 0; m < mt; m++) y[m * ldy] = _mm512_reduce_add_ps(acc[m]) * (rs ? *rs : 1.0f);             \
    }
LMF_TILE(tile_q8, {
    const int8_t *w = (const int8_t *)wv + g * GROUP;
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))));
    if (gs) { /* the group's scale goes on the weights once, shared by every row of x */
        __m512 s = _mm512_set1_ps(_cvtsh_ss(gs[g]));
        w0 = _mm512_mul_ps(w0, s);
        w1 = _mm512_mul_ps(w1, s);
    }
})
/* 4-bit: the group's 16 possible weights (0..15 times the scale, plus the offset: the same one
   rounding as converting each value) in one register, looked up by each nibble (vpermps reads
   an index's low 4 bits, so the zero-extended bytes serve as the low nibbles' indices and the
   same shifted right by 4 as the high ones'): 5 vector operations per group instead of 9 */
LMF_TILE(tile_q4, {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)wv + g * 16)));
    const __m512 table = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_ps(_cvtsh_ss(gs[g])), _mm512_set1_ps(_cvtsh_ss(go[g])));
    w0 = _mm512_permutexvar_ps(b, table);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
})
#elif LMF_ISA == 1
/* AVX2 without AVX-512 has half the float throughput, and decoding through float products is
   then bound by arithmetic, not memory. So the activations are rounded to int8 in groups of 32
   (one float scale per group, as llama.cpp's Q8_0 activations), and each group's product is
   an integer dot product: maddubs (u8 x s8 pairs to int16) and madd (pairs to int32), then one
   float multiply-add with the two scales. Half the instructions of the float path per weight. */
#define LMF_ITILE(NAME, ...)                                                                                     \
    static inline __attribute__((always_inline)) void NAME(const int8_t *qx, const float *dx, const float *sx,  \
                                                           int64_t K, const void *wv, const uint16_t *gs,       \
                                                           const uint16_t *go, const float *rs, float *y,       \
                                                           int64_t ldy, const int mt) {                         \
        __m256 acc[MT];                                                                                          \
        float off[MT];                                                                                           \
        const __m256i ones = _mm256_set1_epi16(1);                                                              \
        for (int m = 0; m < mt; m++) acc[m] = _mm256_setzero_ps(), off[m] = 0.0f;                               \
        const int64_t G = K / GROUP;                                                                             \
        for (int64_t g = 0; g < G; g++) {                                                                        \
            __VA_ARGS__                                                                                          \
        }                                                                                                        \
        for (int m = 0; m < mt; m++) y[m * ldy] = (hsum256(acc[m]) + off[m]) * (rs ? *rs : 1.0f);               \
    }
LMF_ITILE(tile_q8, {
    (void)go; (void)sx;
    const __m256i w = _mm256_loadu_si256((const __m256i *)((const int8_t *)wv + g * GROUP));
    const __m256i aw = _mm256_sign_epi8(w, w); /* |w|: maddubs wants one unsigned side */
    const float dw = gs ? _cvtsh_ss(gs[g]) : 1.0f;
    for (int m = 0; m < mt; m++) {
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(qx + m * K + g * GROUP));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xq, w)), ones);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * dx[m * G + g]), acc[m]);
    }
})
/* 4-bit: the per-group factors first, 8 groups at a time (each row's activation scale times the
   weight row's group scale; the offsets' term, each offset times its group's sum of x), so the
   inner loop holds the dot products and one broadcast from memory per row and group */
static inline __attribute__((always_inline)) void tile_q4(const int8_t *qx, const float *dx, const float *sx,
                                                          int64_t K, const void *wv, const uint16_t *gs,
                                                          const uint16_t *go, const float *rs, float *y, int64_t ldy,
                                                          const int mt) {
    const int64_t G = K / GROUP;
    float sc[MT * G]; /* (mt, G): dw * dx */
    __m256 acc[MT], offv[MT];
    for (int m = 0; m < mt; m++) acc[m] = _mm256_setzero_ps(), offv[m] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gs + g)));
        const __m256 ow = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(go + g)));
        for (int m = 0; m < mt; m++) {
            _mm256_storeu_ps(sc + m * G + g, _mm256_mul_ps(dw, _mm256_loadu_ps(dx + m * G + g)));
            offv[m] = _mm256_fmadd_ps(ow, _mm256_loadu_ps(sx + m * G + g), offv[m]);
        }
    }
    float off[MT];
    for (int m = 0; m < mt; m++) off[m] = hsum256(offv[m]);
    for (; g < G; g++) {
        const float dw = _cvtsh_ss(gs[g]), ow = _cvtsh_ss(go[g]);
        for (int m = 0; m < mt; m++) sc[m * G + g] = dw * dx[m * G + g], off[m] += ow * sx[m * G + g];
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (g = 0; g < G; g++) {
        const __m128i b = _mm_loadu_si128((const __m128i *)((const uint8_t *)wv + g * 16));
        const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));
        for (int m = 0; m < mt; m++) {
            const __m256i xq = _mm256_loadu_si256((const __m256i *)(qx + m * K + g * GROUP));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xq), ones); /* q4 is unsigned already */
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(sc + m * G + g), acc[m]);
        }
    }
    for (int m = 0; m < mt; m++) y[m * ldy] = (hsum256(acc[m]) + off[m]) * (rs ? *rs : 1.0f);
}
#endif

/* ---- a prompt's rows through int8 layers with a scale per output row (prefill) ------------
   Many rows share each weight, so the weights' conversion is paid once per mt rows and the
   arithmetic per product is what counts. Each row of x is rounded to int16 against its own
   absmax (15 bits relative to the row's largest value: finer than bf16's 8-bit mantissa for
   all but tiny entries beside an outlier, and far finer than int8 groups), the int8 weights are
   widened to int16, and pairs of products are summed into int32 lanes: AVX-512 VNNI's dpwssd,
   one instruction per 32 products (madd + add without VNNI); AVX2's madd + add, two per 16,
   against its int8-group tile's five per 32 (sign, maddubs, madd, convert, multiply-add). The
   lanes go to float every SPAN inputs: SPAN / 16 madds of at most 2 * 32767 * 127 each stay far
   inside int32. Only the int8 kind with row scales (the group-scaled kinds would need a scale
   per group inside the sums). A decoding step never comes here: its rows keep the build's own
   tiles, each row on its own. */
#if LMF_ISA > 0
#define LMF_PROMPT 1
#define SPAN 2048
#if LMF_ISA == 2
#define PVEC __m512i
#define PZERO() _mm512_setzero_si512()
#define PWIDEN(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define PLOAD(p) _mm512_loadu_si512((const void *)(p))
#ifdef __AVX512VNNI__
#define PDOT(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#else
#define PDOT(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#endif
#define PSUM(v) _mm512_reduce_add_ps(_mm512_cvtepi32_ps(v))
#define PSTEP 32
#else
#define PVEC __m256i
#define PZERO() _mm256_setzero_si256()
#define PWIDEN(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define PLOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define PDOT(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define PSUM(v) hsum256(_mm256_cvtepi32_ps(v))
#define PSTEP 16
#endif

/* rows [0, mt) of the prepared x (xs: rows of K int16, sx: their scales) against one weight row */
static inline __attribute__((always_inline)) void tile_prompt(const int16_t *xs, const float *sx, int64_t K,
                                                              const int8_t *w, const float *rs, float *y,
                                                              int64_t ldy, const int mt) {
    float tot[MT];
    for (int m = 0; m < mt; m++) tot[m] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += SPAN) {
        const int64_t k1 = K - k0 < SPAN ? K : k0 + SPAN;
        PVEC acc[MT];
        for (int m = 0; m < mt; m++) acc[m] = PZERO();
        for (int64_t k = k0; k < k1; k += PSTEP) { /* K is a multiple of 32 */
            const PVEC wv = PWIDEN(w + k);
            for (int m = 0; m < mt; m++) acc[m] = PDOT(acc[m], wv, PLOAD(xs + m * K + k));
        }
        for (int m = 0; m < mt; m++) tot[m] += PSUM(acc[m]);
    }
    for (int m = 0; m < mt; m++) y[m * ldy] = tot[m] * sx[m] * *rs;
}

#define PROMPT_ARGS(m_) xs, sx, K, w, rs, y, ldy, m_
static void prompt_rows(const int16_t *xs, const float *sx, int64_t mt, int64_t K, const int8_t *w, const float *rs,
                        float *y, int64_t ldy) {
    switch (mt) {
    case 1: tile_prompt(PROMPT_ARGS(1)); break;
    case 2: tile_prompt(PROMPT_ARGS(2)); break;
    case 3: tile_prompt(PROMPT_ARGS(3)); break;
    case 4: tile_prompt(PROMPT_ARGS(4)); break;
    case 5: tile_prompt(PROMPT_ARGS(5)); break;
    case 6: tile_prompt(PROMPT_ARGS(6)); break;
    case 7: tile_prompt(PROMPT_ARGS(7)); break;
    default: tile_prompt(PROMPT_ARGS(8)); break;
    }
}

/* one row of x (K floats) -> int16 values xs and their scale sx (absmax / 32767) */
static void prompt_row(const float *x, int64_t K, int16_t *xs, float *sx) {
    float amax = 0.0f;
#pragma omp simd reduction(max : amax)
    for (int64_t k = 0; k < K; k++) amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
    const float d = amax / 32767.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
#pragma omp simd
    for (int64_t k = 0; k < K; k++) {
        const float v = nearbyintf(x[k] * inv);
        xs[k] = (int16_t)(v > 32767.0f ? 32767.0f : v < -32767.0f ? -32767.0f : v);
    }
    *sx = d;
}
#endif

/* x (M, K) rounded to int8 in groups of 32: q (M, K), scale d and d * sum(q) s per group (M, K / 32) */
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *d, float *s) {
    const int64_t G = K / GROUP;
    for (int64_t r = 0; r < M * G; r++) {
        const float *xg = x + r * GROUP;
        float amax = 0.0f;
#pragma omp simd reduction(max : amax)
        for (int k = 0; k < GROUP; k++) amax = fabsf(xg[k]) > amax ? fabsf(xg[k]) : amax;
        const float dg = amax / 127.0f, inv = dg > 0.0f ? 1.0f / dg : 0.0f;
        int sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int k = 0; k < GROUP; k++) {
            const int v = (int)nearbyintf(xg[k] * inv);
            q[r * GROUP + k] = (int8_t)v;
            sum += v;
        }
        d[r] = dg;
        s[r] = dg * (float)sum;
    }
}

/* Activations as the tiles want them: float rows, and for the integer build the same rows
   rounded to int8 groups (see quantize_rows); pointers already at the tile's first row */
typedef struct {
    const float *x;
    const int8_t *q;
    const float *d, *s;
} lmf_rows;

#if LMF_ISA == 1
#define TILE_ARGS(m_) a.q, a.d, a.s, K, w, gs, go, rs, y, ldy, m_
#elif LMF_ISA == 2
#define TILE_ARGS(m_) a.x, K, w, gs, go, rs, y, ldy, m_
#endif
#if LMF_ISA > 0
#define LMF_ROWS(NAME, TILE)                                                                                     \
    static void NAME(lmf_rows a, int64_t mt, int64_t K, const void *w, const uint16_t *gs, const uint16_t *go,  \
                     const float *rs, float *y, int64_t ldy) {                                                   \
        switch (mt) {                                                                                            \
        case 1: TILE(TILE_ARGS(1)); break;                                                                       \
        case 2: TILE(TILE_ARGS(2)); break;                                                                       \
        case 3: TILE(TILE_ARGS(3)); break;                                                                       \
        case 4: TILE(TILE_ARGS(4)); break;                                                                       \
        case 5: TILE(TILE_ARGS(5)); break;                                                                       \
        case 6: TILE(TILE_ARGS(6)); break;                                                                       \
        case 7: TILE(TILE_ARGS(7)); break;                                                                       \
        default: TILE(TILE_ARGS(8)); break;                                                                      \
        }                                                                                                        \
    }
LMF_ROWS(rows_q8, tile_q8)
LMF_ROWS(rows_q4, tile_q4)
#else
/* plain C: each group's 32 products summed as a vector (omp simd), then scaled */
static void rows_q8(lmf_rows a, int64_t mt, int64_t K, const void *wv, const uint16_t *gs, const uint16_t *go,
                    const float *rs, float *y, int64_t ldy) {
    (void)go;
    const int8_t *w = (const int8_t *)wv;
    const int64_t G = K / GROUP;
    for (int64_t m = 0; m < mt; m++) {
        const float *xm = a.x + m * K;
        float acc = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            float t = 0.0f;
#pragma omp simd reduction(+ : t)
            for (int k = 0; k < GROUP; k++) t += xm[g * GROUP + k] * (float)w[g * GROUP + k];
            acc += gs ? t * half_to_float(gs[g]) : t;
        }
        y[m * ldy] = acc * (rs ? *rs : 1.0f);
    }
}

static void rows_q4(lmf_rows a, int64_t mt, int64_t K, const void *wv, const uint16_t *gs, const uint16_t *go,
                    const float *rs, float *y, int64_t ldy) {
    const uint8_t *w = (const uint8_t *)wv;
    const int64_t G = K / GROUP;
    for (int64_t m = 0; m < mt; m++) {
        const float *xm = a.x + m * K;
        float acc = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *b = w + g * 16;
            const float *xg = xm + g * GROUP;
            float t = 0.0f, sx = 0.0f;
#pragma omp simd reduction(+ : t, sx)
            for (int k = 0; k < 16; k++) {
                t += xg[k] * (float)(b[k] & 15) + xg[k + 16] * (float)(b[k] >> 4);
                sx += xg[k] + xg[k + 16];
            }
            acc += t * half_to_float(gs[g]) + sx * half_to_float(go[g]);
        }
        y[m * ldy] = acc * (rs ? *rs : 1.0f);
    }
}
#endif

/* whether this build multiplies int8-rounded activations (the caller then quantizes x first) */
#define LMF_INT_ACT (LMF_ISA == 1)

static inline lmf_rows rows_at(const float *x, const int8_t *q, const float *d, const float *s, int64_t m,
                               int64_t K) {
    lmf_rows r = {x + m * K, q ? q + m * K : 0, d ? d + m * (K / GROUP) : 0, s ? s + m * (K / GROUP) : 0};
    return r;
}

/* quantized copies of x for a standalone matmul call (NULL pointers when the build needs none);
   returns 0, or -1 when out of memory */
static int quantized_copy(const float *x, int64_t M, int64_t K, int8_t **q, float **d, float **s) {
    *q = 0, *d = 0, *s = 0;
    if (!LMF_INT_ACT) return 0;
    const int64_t G = K / GROUP;
    char *buf = (char *)malloc((size_t)(M * K + 2 * M * G * (int64_t)sizeof(float)));
    if (!buf) return -1;
    *d = (float *)buf, *s = *d + M * G, *q = (int8_t *)(*s + M * G);
    quantize_rows(x, M, K, *q, *d, *s);
    return 0;
}

/* x: (M, K) float32; w: (N, K) int8; gs: (N, K / 32) fp16 bits or NULL; rs: (N,) float32 or NULL;
   y: (M, N) float32. K must be a multiple of 32. Returns 0, -1 for a K it cannot take, -2 when
   out of memory. */
int lmf_q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *w, const uint16_t *gs, const float *rs,
                  int64_t N, float *y) {
    if (K % GROUP) return -1;
    const int64_t G = K / GROUP;
    int8_t *q;
    float *d, *s;
    if (quantized_copy(x, M, K, &q, &d, &s)) return -2;
#pragma omp parallel for schedule(static) if (N * K >= 65536)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += MT) {
            int64_t mt = M - m < MT ? M - m : MT;
            rows_q8(rows_at(x, q, d, s, m, K), mt, K, w + n * K, gs ? gs + n * G : 0, 0, rs ? rs + n : 0,
                    y + m * N + n, N);
        }
    }
    free(d);
    return 0;
}

/* The same with 4-bit weights: w (N, K / 2) bytes, group g of row n in bytes [16 g, 16 g + 16)
   holding its values 0..15 in the low nibbles and 16..31 in the high ones; gs, go: (N, K / 32)
   fp16 scales and offsets (w = q * scale + offset). */
int lmf_q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *gs, const uint16_t *go,
                  int64_t N, float *y) {
    if (K % GROUP) return -1;
    const int64_t G = K / GROUP;
    int8_t *q;
    float *d, *s;
    if (quantized_copy(x, M, K, &q, &d, &s)) return -2;
#pragma omp parallel for schedule(static) if (N * K >= 65536)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += MT) {
            int64_t mt = M - m < MT ? M - m : MT;
            rows_q4(rows_at(x, q, d, s, m, K), mt, K, w + n * (K / 2), gs + n * G, go + n * G, 0, y + m * N + n, N);
        }
    }
    free(d);
    return 0;
}

/* out (N, K) float32 = the matrix 4-bit weights stand for (w = q * scale + offset; layout as in
   lmf_q4_matmul). For a prompt's many rows on a CPU without bf16 arithmetic: a float32 matmul
   (PyTorch's BLAS) over this copy, made per call, beats an int4 kernel there, and its float32
   activations lose nothing. Returns -1 when K is not a multiple of 32. */
int lmf_q4_dequant(const uint8_t *w, const uint16_t *gs, const uint16_t *go, int64_t N, int64_t K, float *out) {
    if (K % GROUP) return -1;
    const int64_t G = K / GROUP;
#pragma omp parallel for schedule(static) if (N * K >= 65536)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *b = w + n * (K / 2) + g * 16;
            const float sc = half_to_float(gs[n * G + g]), of = half_to_float(go[n * G + g]);
            float *y = out + n * K + g * GROUP;
#pragma omp simd
            for (int i = 0; i < 16; i++) {
                y[i] = (float)(b[i] & 15) * sc + of;
                y[i + 16] = (float)(b[i] >> 4) * sc + of;
            }
        }
    }
    return 0;
}

/* y (rows, dim) = x / sqrt(mean(x^2) + eps) * w, row by row (RMSNorm). One call instead of the
   handful of small operations PyTorch runs for it: a decoding step normalises a single row
   about a hundred times (Gemma 3: six norms per layer), where per-call cost is everything. */
void lmf_rms_norm(const float *x, int64_t rows, int64_t dim, const float *w, float eps, float *y) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) yr[i] = xr[i] * inv * w[i];
    }
}

/* e^x for x <= 0 (softmax after subtracting the maximum), to about 2e-7 relative down to -87
   (below, e^-87: nothing a softmax sum notices): x = n ln2 + r
   with |r| <= ln2 / 2, e^r by its Taylor series to r^7, 2^n written into the exponent bits.
   Plain arithmetic, so the compiler vectorises the loop that calls it (libm's expf is one
   value per call: most of a decoding step's attention time at a few hundred keys). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x; /* e^-87 is about the smallest normal float */
    const float n = nearbyintf(x * 1.44269504f); /* (roundf has no vector form: a libm call per value) */
    const float r = x - n * 0.693145752f - n * 1.42860677e-6f; /* ln2 in two parts, for precision */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* e^x for any x, clamped to [-87, 88] (float's range): exp_nonpositive's series holds up there
   too (2^n for n <= 127 is still a normal float). For the gated MLPs' SiLU and tanh, vectorised
   with their loop: libm's expf and tanhf, one value per call, cost a prompt of 200 rows about a
   fifth of Gemma 3's step. */
static inline float exp_any(float x) { return exp_nonpositive(x > 88.0f ? 88.0f : x); }

/* SiLU and tanh-approximated GELU (GeGLU) through exp_any */
static inline float silu(float a) { return a / (1.0f + exp_any(-a)); }
static inline float gelu_tanh(float a) {
    const float z = 0.7978845608f * (a + 0.044715f * a * a * a);
    return a / (1.0f + exp_any(-2.0f * z)); /* 0.5 a (1 + tanh z) = a / (1 + e^(-2z)) */
}

/* x rotated by RoPE into y: pairs (x[i], x[i + hd/2]) turn by the position's angles; c and s are
   full-width tables, s signed (-sin in the first half), as rope_rotation builds them in gpt.py */
static inline void rotate(const float *x, const float *c, const float *s, int64_t hd, float *y) {
    const int64_t h2 = hd / 2;
#pragma omp simd
    for (int64_t i = 0; i < h2; i++) {
        y[i] = x[i] * c[i] + x[i + h2] * s[i];
        y[i + h2] = x[i + h2] * c[i + h2] + x[i] * s[i + h2];
    }
}

/* A new key (rotated when cb is given) and value into their cache rows */
static inline void store_kv(const float *kn, const float *vn, const float *cb, const float *sb, int64_t hd, float *kd,
                            float *vd) {
    if (cb) rotate(kn, cb, sb, hd, kd);
    else memcpy(kd, kn, sizeof(float) * (size_t)hd);
    memcpy(vd, vn, sizeof(float) * (size_t)hd);
}

/* Attention of one row b and one key/value head kvh of a decoding step (see lmf_attn_decode);
   kn NULL: the row's key and value are in the cache already (written by the caller).
   Returns 0, or -1 when out of memory. */
static int attend_one(const float *q, int64_t qs, const float *kn, int64_t ks, const float *vn, int64_t vs,
                      const float *cb, const float *sb, float *k, float *v, int64_t nh, int64_t nkv,
                      int64_t max_len, int64_t hd, int64_t window, int64_t b, int64_t kvh, int64_t slot,
                      int64_t p, float scale, float *out) {
    const int64_t group = nh / nkv, end = p + 1;
    const int64_t first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
    const int64_t n = end - first;
    float *kb = k + (slot * nkv + kvh) * max_len * hd, *vb = v + (slot * nkv + kvh) * max_len * hd;
    if (kn) store_kv(kn + b * ks + kvh * hd, vn + b * vs + kvh * hd, cb, sb, hd, kb + p * hd, vb + p * hd);
    float stack[4096];
    const int64_t need = group * (hd + n + 1); /* rotated queries, scores (group, n), max per head */
    float *qg = need <= 4096 ? stack : (float *)malloc(sizeof(float) * (size_t)need);
    if (!qg) return -1;
    float *sc = qg + group * hd, *mx = sc + group * n;
    for (int64_t g = 0; g < group; g++) {
        const float *qh = q + b * qs + (kvh * group + g) * hd;
        if (cb) rotate(qh, cb, sb, hd, qg + g * hd);
        else memcpy(qg + g * hd, qh, sizeof(float) * (size_t)hd);
        mx[g] = -INFINITY;
    }
    /* keys four at a time: four independent sums per loop (one would be a chain of dependent
       multiply-adds, bound by their latency) */
    for (int64_t j = 0; j < n; j += 4) {
        const int64_t r = n - j < 4 ? n - j : 4;
        const float *k0 = kb + (first + j) * hd, *k1 = k0 + (r > 1) * hd, *k2 = k0 + (r > 2) * 2 * hd,
                    *k3 = k0 + (r > 3) * 3 * hd; /* past the end: repeat the first (unused) */
        for (int64_t g = 0; g < group; g++) {
            const float *qh = qg + g * hd;
            float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int64_t i = 0; i < hd; i++) {
                d0 += qh[i] * k0[i];
                d1 += qh[i] * k1[i];
                d2 += qh[i] * k2[i];
                d3 += qh[i] * k3[i];
            }
            const float d[4] = {d0 * scale, d1 * scale, d2 * scale, d3 * scale};
            for (int64_t t = 0; t < r; t++) {
                sc[g * n + j + t] = d[t];
                mx[g] = d[t] > mx[g] ? d[t] : mx[g];
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *sg = sc + g * n, m = mx[g], t = 0.0f;
#pragma omp simd reduction(+ : t)
        for (int64_t j = 0; j < n; j++) {
            sg[j] = exp_nonpositive(sg[j] - m);
            t += sg[j];
        }
        const float inv = 1.0f / t;
        for (int64_t j = 0; j < n; j++) sg[j] *= inv;
    }
    float *og = out + (b * nh + kvh * group) * hd;
    for (int64_t i = 0; i < group * hd; i++) og[i] = 0.0f;
    for (int64_t j = 0; j < n; j += 4) { /* values four at a time too: a quarter of the stores */
        const int64_t r = n - j < 4 ? n - j : 4;
        const float *v0 = vb + (first + j) * hd, *v1 = v0 + (r > 1) * hd, *v2 = v0 + (r > 2) * 2 * hd,
                    *v3 = v0 + (r > 3) * 3 * hd;
        for (int64_t g = 0; g < group; g++) {
            const float *pg = sc + g * n + j;
            const float p0 = pg[0], p1 = r > 1 ? pg[1] : 0.0f, p2 = r > 2 ? pg[2] : 0.0f, p3 = r > 3 ? pg[3] : 0.0f;
            float *o = og + g * hd;
#pragma omp simd
            for (int64_t i = 0; i < hd; i++) o[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i];
        }
    }
    if (qg != stack) free(qg);
    return 0;
}

/* A decoding step's attention: one new token per row, grouped-query, over the KV cache.
   q: B rows (at q + b * qs) of nh heads side by side; kn, vn: the new keys and values, B rows of
   nkv heads (at kn + b * ks, vn + b * vs); cos, sin: RoPE tables of hd floats at cos + b * cs
   (cs = 0: one for all rows), or NULL for no rotation. Row b's sequence lives in cache slot
   slot[b] of k, v (S, nkv, max_len, hd) and has pos[b] tokens before this one: the rotated key
   and the value are written at position pos[b], then the row attends to positions
   [max(0, pos[b] - window + 1), pos[b]] (window 0: from the start): out (B, nh, hd).
   In PyTorch this is a dozen small operations and a fused attention call that spends ~70 us
   on setup for this much work (4 heads x 300 keys). Returns 0, or -1 when out of memory. */
int lmf_attn_decode(const float *q, int64_t qs, const float *kn, int64_t ks, const float *vn, int64_t vs,
                     const float *cos, const float *sin, int64_t cs, float *k, float *v, int64_t B, int64_t nh,
                     int64_t nkv, int64_t max_len, int64_t hd, int64_t window, const int64_t *slot,
                     const int64_t *pos, float scale, float *out) {
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) work += pos[b] + 1;
    int failed = 0;
    /* one task per key/value head: the query heads that share it go together, so each key and
       value row is read once per step rather than once per head */
#pragma omp parallel for schedule(static) if (B * nkv > 1 && nh * work >= 4096)
    for (int64_t bk = 0; bk < B * nkv; bk++) {
        const int64_t b = bk / nkv;
        if (attend_one(q, qs, kn, ks, vn, vs, cos ? cos + b * cs : 0, sin ? sin + b * cs : 0, k, v, nh, nkv, max_len,
                       hd, window, b, bk % nkv, slot[b], pos[b], scale, out)) {
#pragma omp atomic write
            failed = 1;
        }
    }
    return failed ? -1 : 0;
}

/* ---- a whole decoding step through a decoder's layers, in one call ----------------------
   What PyTorch runs as about fifteen operator calls per layer (each with its own dispatch and,
   for the kernels above, its own ctypes call and thread fork) runs here in one parallel region
   per step: the threads split each matrix product's outputs, and wait for each other only
   where the next operation needs the previous one's result. */

typedef struct {
    int64_t kind; /* 0 float32 (n, k); 1 int8 with float row scales s; 2 4-bit groups, fp16 scales s
                     and offsets o; 3 int8 with fp16 group scales s */
    int64_t n, k;
    const void *w, *s, *o;
    const float *bias; /* (n,) or NULL */
} lmf_linear;

typedef struct {
    const float *attn_norm, *mlp_norm, *q_norm, *k_norm, *attn_out_norm, *mlp_out_norm; /* NULL: absent */
    lmf_linear qkv, o, gate, up, down; /* gate.w NULL: a plain GELU MLP */
    const float *cos, *sin; /* half-width RoPE tables (rope_len, hd / 2), or NULL */
    int64_t rope_len, window; /* window 0: global attention */
} lmf_layer;

typedef struct {
    int64_t n_layer, C, nh, nkv, hd, hidden, mlp; /* mlp: 0 SwiGLU, 1 GeGLU (tanh GELU), 2 GELU */
    float eps, scale;
    const lmf_layer *layers;
} lmf_model;

/* y (M rows, ldy apart) = x (M, L->k) @ W^T + bias, the outputs split over the calling
   parallel region's threads (orphaned `omp for`s: each ends with a barrier). qbuf: room for the
   int8 copy of x when the build multiplies int8 activations. */
static void linear_in_region(const lmf_linear *L, const float *x, int64_t M, float *y, int64_t ldy, char *qbuf,
                             int prefill) {
    const int64_t N = L->n, K = L->k, G = K / GROUP;
    int8_t *q = 0;
    float *d = 0, *s = 0;
#ifdef LMF_PROMPT
    if (prefill && L->kind == 1) { /* qbuf: M rows of K int16, then M scales */
        int16_t *xs = (int16_t *)qbuf;
        float *sx = (float *)(xs + M * K);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) prompt_row(x + m * K, K, xs + m * K, sx + m);
        /* blocks of whole tiles whose int16 rows fit PROMPT_L1 (at most PROMPT_ROWS), each
           swept over every output, so that the block stays in the L1 cache while the weights
           stream past (one pass over all rows per output fell out of it beyond about 24 rows
           of 576 inputs) */
        int64_t rows = (PROMPT_L1 / (2 * K)) / MT * MT; /* whole tiles whose int16 rows fit the budget */
        rows = rows < MT ? MT : rows > PROMPT_ROWS ? PROMPT_ROWS : rows;
        for (int64_t m0 = 0; m0 < M; m0 += rows) {
            const int64_t m1 = M - m0 < rows ? M : m0 + rows;
#pragma omp for schedule(static) nowait
            for (int64_t n = 0; n < N; n++) {
                /* the block's rows in tiles of even size (19 rows: 7 + 6 + 6, not 8 + 8 + 3: a tile
                   of few rows waits on its few chains of dependent sums) */
                const int64_t tiles = (m1 - m0 + MT - 1) / MT;
                for (int64_t t = 0, m = m0; t < tiles; t++) {
                    const int64_t mt = (m1 - m0) / tiles + (t < (m1 - m0) % tiles);
                    float *ym = y + m * ldy + n;
                    prompt_rows(xs + m * K, sx + m, mt, K, (const int8_t *)L->w + n * K, (const float *)L->s + n, ym,
                                ldy);
                    if (L->bias)
                        for (int64_t r = 0; r < mt; r++) ym[r * ldy] += L->bias[n];
                    m += mt;
                }
            }
        }
#pragma omp barrier
        return;
    }
#else
    (void)prefill;
#endif
    if (LMF_INT_ACT && L->kind != 0) {
        d = (float *)qbuf, s = d + M * G, q = (int8_t *)(s + M * G);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_rows(x + m * K, 1, K, q + m * K, d + m * G, s + m * G);
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += MT) {
            const int64_t mt = M - m < MT ? M - m : MT;
            const lmf_rows a = rows_at(x, q, d, s, m, K);
            const float *xm = x + m * K;
            float *ym = y + m * ldy + n;
            switch (L->kind) {
            case 1: rows_q8(a, mt, K, (const int8_t *)L->w + n * K, 0, 0, (const float *)L->s + n, ym, ldy); break;
            case 2:
                rows_q4(a, mt, K, (const uint8_t *)L->w + n * (K / 2), (const uint16_t *)L->s + n * G,
                        (const uint16_t *)L->o + n * G, 0, ym, ldy);
                break;
            case 3: rows_q8(a, mt, K, (const int8_t *)L->w + n * K, (const uint16_t *)L->s + n * G, 0, 0, ym, ldy); break;
            default:
                for (int64_t r = 0; r < mt; r++) {
                    const float *wr = (const float *)L->w + n * K, *xr = xm + r * K;
                    float t = 0.0f;
#pragma omp simd reduction(+ : t)
                    for (int64_t k = 0; k < K; k++) t += xr[k] * wr[k];
                    ym[r * ldy] = t;
                }
            }
            if (L->bias)
                for (int64_t r = 0; r < mt; r++) ym[r * ldy] += L->bias[n];
        }
    }
}

/* Full-width RoPE tables for position p (see rotate) from the half-width ones */
static inline void rope_row(const float *cos, const float *sin, int64_t p, int64_t hd, float *cf, float *sf) {
    const int64_t h2 = hd / 2;
    const float *c = cos + p * h2, *sn = sin + p * h2;
    for (int64_t i = 0; i < h2; i++) {
        cf[i] = cf[i + h2] = c[i];
        sf[i] = -sn[i];
        sf[i + h2] = sn[i];
    }
}

static void rms_row(const float *x, int64_t dim, const float *w, float eps, float *y) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
#pragma omp simd
    for (int64_t i = 0; i < dim; i++) y[i] = x[i] * inv * w[i];
}

/* x (B, C): the residual stream of B rows, one token each, updated in place through every layer.
   Row b's sequence is in slot slot[b] of the caches k, v (n_layer, S, nkv, max_len, hd) with
   pos[b] tokens before this one. Rows may share a slot at consecutive positions: a short
   prompt's tokens then go through as one sequence's rows, each seeing those before it
   (prefill 1: int8 layers take the int16 prompt tile; a decoding step passes 0, so a row's
   result never depends on the other rows of its step). work: scratch of
   B * (2 C + qkv.n + nh hd + 2 hidden + kmax) floats, kmax the widest input of any linear
   (room for its int8 or int16 copy).
   Returns 0, or -1 when out of memory. */
int lmf_decode_layers(const lmf_model *m, int64_t B, float *x, float *k, float *v, int64_t S, int64_t max_len,
                      const int64_t *slot, const int64_t *pos, float *work, int64_t prefill) {
    const int64_t C = m->C, nh = m->nh, nkv = m->nkv, hd = m->hd, F = m->hidden;
    const int64_t NQ = (nh + 2 * nkv) * hd;
    float *xn = work, *qkv = xn + B * C, *att = qkv + B * NQ, *h = att + B * nh * hd, *g = h + B * C, *u = g + B * F;
    char *qbuf = (char *)(u + B * F);
    const int64_t layer_size = S * nkv * max_len * hd;
    int failed = 0;
#pragma omp parallel
    for (int64_t l = 0; l < m->n_layer; l++) {
        const lmf_layer *L = m->layers + l;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) rms_row(x + b * C, C, L->attn_norm, m->eps, xn + b * C);
        linear_in_region(&L->qkv, xn, B, qkv, NQ, qbuf, (int)prefill);
        if (L->q_norm) { /* one RMSNorm over each head of q and of k */
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * (nh + nkv); bh++) {
                const int64_t b = bh / (nh + nkv), hh = bh % (nh + nkv);
                float *t = qkv + b * NQ + hh * hd;
                rms_row(t, hd, hh < nh ? L->q_norm : L->k_norm, m->eps, t);
            }
        }
        /* every row's key and value go into the cache before any row attends: rows of one
           sequence (a prompt's positions) see each other's */
#pragma omp for schedule(static)
        for (int64_t bk = 0; bk < B * nkv; bk++) {
            const int64_t b = bk / nkv, kvh = bk % nkv, at = ((slot[b] * nkv + kvh) * max_len + pos[b]) * hd;
            float cf[1024], sf[1024];
            if (L->cos) rope_row(L->cos, L->sin, pos[b], hd, cf, sf);
            store_kv(qkv + b * NQ + (nh + kvh) * hd, qkv + b * NQ + (nh + nkv + kvh) * hd, L->cos ? cf : 0,
                     L->cos ? sf : 0, hd, k + l * layer_size + at, v + l * layer_size + at);
        }
#pragma omp for schedule(static)
        for (int64_t bk = 0; bk < B * nkv; bk++) {
            const int64_t b = bk / nkv;
            float cf[1024], sf[1024]; /* this row's full-width tables (hd <= 1024: checked by the caller) */
            if (L->cos) rope_row(L->cos, L->sin, pos[b], hd, cf, sf);
            /* (attend_one takes the first row and the stride: row b is NQ floats further on) */
            if (attend_one(qkv, NQ, 0, NQ, 0, NQ, L->cos ? cf : 0, L->cos ? sf : 0,
                           k + l * layer_size, v + l * layer_size, nh, nkv, max_len, hd, L->window, b, bk % nkv,
                           slot[b], pos[b], m->scale, att)) {
#pragma omp atomic write
                failed = 1;
            }
        }
        linear_in_region(&L->o, att, B, h, C, qbuf, (int)prefill);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            if (L->attn_out_norm) rms_row(h + b * C, C, L->attn_out_norm, m->eps, h + b * C);
            for (int64_t i = 0; i < C; i++) x[b * C + i] += h[b * C + i];
            rms_row(x + b * C, C, L->mlp_norm, m->eps, xn + b * C);
        }
        if (m->mlp == 2) {
            linear_in_region(&L->up, xn, B, g, F, qbuf, (int)prefill);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < B * F; i++) g[i] = 0.5f * g[i] * (1.0f + erff(g[i] * 0.70710678f));
        } else {
            linear_in_region(&L->gate, xn, B, g, F, qbuf, (int)prefill);
            linear_in_region(&L->up, xn, B, u, F, qbuf, (int)prefill);
            if (m->mlp == 0) {
#pragma omp for simd schedule(static)
                for (int64_t i = 0; i < B * F; i++) g[i] = silu(g[i]) * u[i];
            } else {
#pragma omp for simd schedule(static)
                for (int64_t i = 0; i < B * F; i++) g[i] = gelu_tanh(g[i]) * u[i];
            }
        }
        linear_in_region(&L->down, g, B, h, C, qbuf, (int)prefill);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            if (L->mlp_out_norm) rms_row(h + b * C, C, L->mlp_out_norm, m->eps, h + b * C);
            for (int64_t i = 0; i < C; i++) x[b * C + i] += h[b * C + i];
        }
    }
    return failed ? -1 : 0;
}

/* Which build this is: 2 AVX-512, 1 AVX2 + FMA + F16C, 0 plain C (the tests check it) */
int lmf_isa(void) { return LMF_ISA; }

/* Whether a prompt's rows through int8 layers take the int16 tile (1) or the build's own (0) */
int lmf_prompt_tile(void) {
#ifdef LMF_PROMPT
    return 1;
#else
    return 0;
#endif
}
