/* Weight-only int8 matrix products for CPU decoding, called from Python through ctypes.

   y (M, N) = x (M, K) @ W^T, where W (N, K) is int8 with an optional fp16 scale per group of 32
   along K (Q8_0's layout: GGUF token tables) and an optional float scale per row (per-channel
   int8). Activations stay float32: nothing is rounded but the weights themselves.

   Decoding one token is a pass over every weight byte, so the loop reads each weight row once
   and uses it for up to MT rows of x at a time (a batch of sequences). Work is split over
   output columns with OpenMP; linked against the libgomp that PyTorch has already loaded (same soname), it shares
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

/* e^x for x <= 0 (softmax after subtracting the maximum), to about 2e-7 relative down to -87
   (below, e^-87: nothing a softmax sum notices): x = n ln2 + r
   with |r| <= ln2 / 2, e^r by its Taylor series to r^7, 2^n written into the exponent bits.
   Plain arithmetic, so the compiler vectorises the loop that calls it (libm's expf is one
   value per call: most of a decoding step's attention time at a few hundred keys). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x; /* e^-87 is about the smallest normal float */
    const float n = __builtin_roundf(x * 1.44269504f);
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

/* A decoding step's attention: one new token per row, grouped-query, over the KV cache.
   q: B rows (at q + b * qs) of nh heads side by side; kn, vn: the new keys and values, B rows of
   nkv heads (at kn + b * ks, vn + b * vs); cos, sin: RoPE tables of hd floats at cos + b * cs
   (cs = 0: one for all rows), or NULL for no rotation. The rotated key and the value are written
   into the cache k, v (B, nkv, max_len, hd) at slot pos; each row then attends to slots
   [max(start, pad[b]), pos] (the sliding window and its left padding): out (B, nh, hd).
   In PyTorch this is a dozen small operations and a fused attention call that spends ~70 us
   on setup for this much work (4 heads x 300 keys). Returns 0, or -1 when out of memory. */
int lmf_attn_decode(const float *q, int64_t qs, const float *kn, int64_t ks, const float *vn, int64_t vs,
                     const float *cos, const float *sin, int64_t cs, float *k, float *v, int64_t B, int64_t nh,
                     int64_t nkv, int64_t max_len, int64_t hd, int64_t start, int64_t pos, const int64_t *pad,
                     float scale, float *out) {
    const int64_t group = nh / nkv, end = pos + 1;
    int failed = 0;
    /* one task per key/value head: the query heads that share it go together, so each key and
       value row is read once per step rather than once per head */
#pragma omp parallel for schedule(static) if (B * nkv > 1 && B * nh * (end - start) >= 4096)
    for (int64_t bk = 0; bk < B * nkv; bk++) {
        const int64_t b = bk / nkv, kvh = bk % nkv;
        int64_t first = pad && pad[b] > start ? pad[b] : start;
        first = first > pos ? pos : first; /* a row all padding still sees its own token */
        const int64_t n = end - first;
        const float *cb = cos ? cos + b * cs : 0, *sb = sin ? sin + b * cs : 0;
        float *kb = k + bk * max_len * hd, *vb = v + bk * max_len * hd;
        if (cos) rotate(kn + b * ks + kvh * hd, cb, sb, hd, kb + pos * hd);
        else memcpy(kb + pos * hd, kn + b * ks + kvh * hd, sizeof(float) * (size_t)hd);
        memcpy(vb + pos * hd, vn + b * vs + kvh * hd, sizeof(float) * (size_t)hd);
        float stack[4096];
        const int64_t need = group * (hd + n + 1); /* rotated queries, scores (group, n), max per head */
        float *qg = need <= 4096 ? stack : (float *)malloc(sizeof(float) * (size_t)need);
        if (!qg) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        float *sc = qg + group * hd, *mx = sc + group * n;
        for (int64_t g = 0; g < group; g++) {
            const float *qh = q + b * qs + (kvh * group + g) * hd;
            if (cos) rotate(qh, cb, sb, hd, qg + g * hd);
            else memcpy(qg + g * hd, qh, sizeof(float) * (size_t)hd);
            mx[g] = -INFINITY;
        }
        /* keys four at a time: four independent sums per loop (one would be a chain of
           dependent multiply-adds, bound by their latency) */
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
    }
    return failed ? -1 : 0;
}

/* 1 when built with the AVX-512 path (the tests check which build they have) */
int lmf_q8_avx512(void) {
#ifdef LMF_AVX512
    return 1;
#else
    return 0;
#endif
}
