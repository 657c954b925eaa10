/* Weight-only int8 matrix products for CPU decoding, called from Python through ctypes.

   y (M, N) = x (M, K) @ W^T, where W (N, K) is int8 with an optional fp16 scale per group of 32
   along K (Q8_0's layout: GGUF token tables) and an optional float scale per row (per-channel
   int8). Activations stay float32: nothing is rounded but the weights themselves.

   Decoding one token is a pass over every weight byte, so the loop reads each weight row once
   and uses it for up to MT rows of x at a time (a batch of sequences). Work is split over output columns with
   OpenMP; linked against the libgomp that PyTorch has already loaded (same soname), it shares
   PyTorch's thread pool and thread count.

   Built by lmforge/models/kernels.py with -O3 -march=native. An AVX-512 path and a plain C path
   (for every other CPU, vectorised by the compiler) compute the same sums; the tests build and
   check both. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__F16C__) && !defined(LMF_GENERIC)
#include <immintrin.h>
#define LMF_AVX512 1
#endif

#define GROUP 32
#define MT 8 /* rows of x per pass over a weight row */

static inline float half_to_float(uint16_t h) {
#ifdef LMF_AVX512
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

#ifdef LMF_AVX512
/* mt rows of x against one weight row; mt is a literal at every call, so the loop over rows
   unrolls and the accumulators stay in registers. (Several weight rows per pass were tried:
   slower, the compiler spills.) */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t K, const int8_t *w,
                                                       const uint16_t *gs, const float *rs, float *y,
                                                       int64_t ldy, const int mt) {
    __m512 acc[MT];
    for (int m = 0; m < mt; m++) acc[m] = _mm512_setzero_ps();
    const int64_t G = K / GROUP;
    for (int64_t g = 0; g < G; g++) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + g * GROUP))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + g * GROUP + 16))));
        if (gs) { /* the group's scale goes on the weights once, shared by every row of x */
            __m512 s = _mm512_set1_ps(_cvtsh_ss(gs[g]));
            w0 = _mm512_mul_ps(w0, s);
            w1 = _mm512_mul_ps(w1, s);
        }
        for (int m = 0; m < mt; m++) {
            acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + g * GROUP), acc[m]);
            acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + g * GROUP + 16), acc[m]);
        }
    }
    for (int m = 0; m < mt; m++) y[m * ldy] = _mm512_reduce_add_ps(acc[m]) * (rs ? *rs : 1.0f);
}

static void rows(const float *x, int64_t mt, int64_t K, const int8_t *w, const uint16_t *gs, const float *rs,
                 float *y, int64_t ldy) {
#define CASE(M_) case M_: tile(x, K, w, gs, rs, y, ldy, M_); break;
    switch (mt) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) }
#undef CASE
}
#else
static void rows(const float *x, int64_t mt, int64_t K, const int8_t *w, const uint16_t *gs, const float *rs,
                 float *y, int64_t ldy) {
    const int64_t G = K / GROUP;
    for (int64_t m = 0; m < mt; m++) {
        const float *xm = x + m * K;
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
#endif

/* x: (M, K) float32; w: (N, K) int8; gs: (N, K / 32) fp16 bits or NULL; rs: (N,) float32 or NULL;
   y: (M, N) float32. K must be a multiple of 32. Returns 0, or -1 for a K it cannot take. */
int lmf_q8_matmul(const float *x, int64_t M, int64_t K, const int8_t *w, const uint16_t *gs, const float *rs,
                  int64_t N, float *y) {
    if (K % GROUP) return -1;
    const int64_t G = K / GROUP;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < M; m += MT) {
            int64_t mt = M - m < MT ? M - m : MT;
            rows(x + m * K, mt, K, w + n * K, gs ? gs + n * G : 0, rs ? rs + n : 0, y + m * N + n, N);
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

/* Attention for one new query per row (a decoding step) over the KV cache, grouped-query.
   q: (B, nh, hd); k, v: the cache (B, nkv, max_len, hd); keys [first, end) are visible, where
   first is max(start, pad[b]) (the sliding window and the row's left padding); out: (B, nh, hd).
   PyTorch's fused attention spends ~70 us a call on setup for this much work (4 heads x 300
   keys); here it is a few microseconds. */
void lmf_attn_decode(const float *q, const float *k, const float *v, int64_t B, int64_t nh, int64_t nkv,
                     int64_t max_len, int64_t hd, int64_t start, int64_t end, const int64_t *pad, float scale,
                     float *out) {
    const int64_t group = nh / nkv;
#pragma omp parallel for schedule(static) if (B * nh * (end - start) >= 4096)
    for (int64_t bh = 0; bh < B * nh; bh++) {
        const int64_t b = bh / nh, h = bh % nh, kvh = h / group;
        const int64_t first = pad && pad[b] > start ? pad[b] : start;
        const float *qh = q + bh * hd;
        const float *kb = k + (b * nkv + kvh) * max_len * hd, *vb = v + (b * nkv + kvh) * max_len * hd;
        float *o = out + bh * hd;
        float stack_scores[1024];
        float *sc = end - first <= 1024 ? stack_scores : (float *)malloc(sizeof(float) * (size_t)(end - first));
        float mx = -INFINITY;
        for (int64_t j = first; j < end; j++) {
            const float *kj = kb + j * hd;
            float d = 0.0f;
#pragma omp simd reduction(+ : d)
            for (int64_t i = 0; i < hd; i++) d += qh[i] * kj[i];
            d *= scale;
            sc[j - first] = d;
            mx = d > mx ? d : mx;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < end - first; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
        }
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t j = first; j < end; j++) {
            const float p = sc[j - first] / sum, *vj = vb + j * hd;
#pragma omp simd
            for (int64_t i = 0; i < hd; i++) o[i] += p * vj[i];
        }
        if (sc != stack_scores) free(sc);
    }
}

/* 1 when built with the AVX-512 path (reported by `lmforge` diagnostics and the tests) */
int lmf_q8_avx512(void) {
#ifdef LMF_AVX512
    return 1;
#else
    return 0;
#endif
}
