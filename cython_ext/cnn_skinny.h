/* Skinny float32 product for cython_ext/conv.pyx: out[f, j] += sum_k W[f, k] * CT[j, k].
 *
 * For convolutions with few output columns (output pixels of the whole batch, e.g. 36) and a
 * large filter matrix W (F, K), such as a 7x7 conv over 512 channels into 4096 filters: a
 * BLAS GEMM packs W, which is read from memory once anyway, and tiles poorly for so few
 * columns. Here both operands are read along k, where they are contiguous: W (F, K) as given
 * and CT (J, K), the transposed column matrix (small). Nothing is packed.
 *
 * K is split into chunks of kc values (CT[:, chunk] stays in L2); within a chunk, a block of
 * CNN_SK_MR rows of W (in L1) is multiplied by every block of CNN_SK_NR columns with a
 * CNN_SK_MR x CNN_SK_NR tile of vector accumulators along k (AVX-512: 24 zmm registers, 10
 * loads per 24 FMAs); their horizontal sums are added into out at the end of the chunk.
 * Each call handles the rows [f0, f1) (one OpenMP thread's share): no reduction across
 * threads. Column j of the product goes to out[f * ldo + col_off[j]], so a batch's columns
 * land straight in NCHW.
 *
 * The caller aligns CT like W (same address mod 64 bytes): with K a multiple of 16, the
 * chunks then start where both operands' vector loads are aligned (split loads cost ~10 %).
 * The AVX-512 tile is compiled with a target attribute and chosen at run time
 * (cnn_skinny_fast_f); elsewhere a portable tile (CNN_CLONES) gives the same result up to
 * rounding. float64 does not use this kernel.
 */
#ifndef CNN_SKINNY_H
#define CNN_SKINNY_H

#include <stddef.h>

#include "cnn_simd.h"

#define CNN_SK_MR 4 /* rows of W per tile */
#define CNN_SK_NR 6 /* columns (rows of CT) per tile */

#if defined(__GNUC__) && defined(__x86_64__)
#define CNN_SK_AVX512 1
#include <immintrin.h>

/* The horizontal sums of 8 vectors, as one vector [sum(v0), ..., sum(v7)]. */
__attribute__((target("avx512f"), always_inline)) static inline __m256 cnn_skinny_hsum8(
    __m512 v0, __m512 v1, __m512 v2, __m512 v3, __m512 v4, __m512 v5, __m512 v6, __m512 v7) {
#define CNN_SK_HALF(v) \
    _mm256_add_ps(_mm512_castps512_ps256(v), \
                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
    const __m256 h01 = _mm256_hadd_ps(CNN_SK_HALF(v0), CNN_SK_HALF(v1));
    const __m256 h23 = _mm256_hadd_ps(CNN_SK_HALF(v2), CNN_SK_HALF(v3));
    const __m256 h45 = _mm256_hadd_ps(CNN_SK_HALF(v4), CNN_SK_HALF(v5));
    const __m256 h67 = _mm256_hadd_ps(CNN_SK_HALF(v6), CNN_SK_HALF(v7));
#undef CNN_SK_HALF
    /* g0 = [v0 v1 v2 v3 | v0 v1 v2 v3] partial sums of the low and high 128-bit lanes */
    const __m256 g0 = _mm256_hadd_ps(h01, h23), g1 = _mm256_hadd_ps(h45, h67);
    return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20),
                         _mm256_permute2f128_ps(g0, g1, 0x31));
}

/* One step of the 4 x 6 tile at offset k: 4 vectors of W, then each of the 6 vectors of CT
 * times all 4. LOAD(p) loads 16 floats at p (plain or masked). */
#define CNN_SK_COL(LOAD, j, k)                     \
    v = LOAD(c##j + (k));                          \
    s0##j = _mm512_fmadd_ps(w0, v, s0##j);         \
    s1##j = _mm512_fmadd_ps(w1, v, s1##j);         \
    s2##j = _mm512_fmadd_ps(w2, v, s2##j);         \
    s3##j = _mm512_fmadd_ps(w3, v, s3##j);
#define CNN_SK_STEP(LOAD, k)                                                    \
    {                                                                          \
        const __m512 w0 = LOAD(a0 + (k)), w1 = LOAD(a1 + (k));                 \
        const __m512 w2 = LOAD(a2 + (k)), w3 = LOAD(a3 + (k));                 \
        __m512 v;                                                              \
        CNN_SK_COL(LOAD, 0, k)                                                 \
        CNN_SK_COL(LOAD, 1, k)                                                 \
        CNN_SK_COL(LOAD, 2, k)                                                 \
        CNN_SK_COL(LOAD, 3, k)                                                 \
        CNN_SK_COL(LOAD, 4, k)                                                 \
        CNN_SK_COL(LOAD, 5, k)                                                 \
    }
#define CNN_SK_LOAD(p) _mm512_loadu_ps(p)
#define CNN_SK_LOAD_MASKED(p) _mm512_maskz_loadu_ps(m, p)

/* s[i][j] = sum_{k < kc} a[i][k] * c[j][k] for a 4 x 6 tile; a[i], c[j] point at the chunk.
 * The first `head` (< 16) values are taken masked, so that when a[i] + head is on a 64-byte
 * boundary every later vector load of W (and of CT, aligned alike by the caller) is aligned:
 * a load across two cache lines costs about twice as much.
 * With prefetch, also fetch pf[i][:kc] (the next block of rows of W, still in memory) into
 * L2: each row segment is only kc values long, too short for the hardware prefetcher. */
__attribute__((target("avx512f"), always_inline)) static inline void cnn_skinny_tile_avx512_body(
    const float *const *a, const float *const *c, ptrdiff_t kc, float s[CNN_SK_MR][CNN_SK_NR],
    const float *const *pf, const int npf, const int head) {
    const float *restrict a0 = a[0], *restrict a1 = a[1], *restrict a2 = a[2],
                          *restrict a3 = a[3];
    const float *restrict c0 = c[0], *restrict c1 = c[1], *restrict c2 = c[2],
                          *restrict c3 = c[3], *restrict c4 = c[4], *restrict c5 = c[5];
    __m512 s00 = _mm512_setzero_ps(), s01 = s00, s02 = s00, s03 = s00, s04 = s00, s05 = s00;
    __m512 s10 = s00, s11 = s00, s12 = s00, s13 = s00, s14 = s00, s15 = s00;
    __m512 s20 = s00, s21 = s00, s22 = s00, s23 = s00, s24 = s00, s25 = s00;
    __m512 s30 = s00, s31 = s00, s32 = s00, s33 = s00, s34 = s00, s35 = s00;
    ptrdiff_t k = 0;
    if (head > 0 && head < kc) { /* the values before the first aligned vector, masked */
        const __mmask16 m = (__mmask16)((1u << head) - 1u);
        CNN_SK_STEP(CNN_SK_LOAD_MASKED, 0)
        k = head;
    }
    for (; k + 16 <= kc; k += 16) {
        for (int i = 0; i < npf; i++) _mm_prefetch((const char *)(pf[i] + k), _MM_HINT_T1);
        CNN_SK_STEP(CNN_SK_LOAD, k)
    }
    if (k < kc) { /* the last values, masked */
        const __mmask16 m = (__mmask16)((1u << (kc - k)) - 1u);
        CNN_SK_STEP(CNN_SK_LOAD_MASKED, k)
    }
    /* the 24 sums, row-major into s, 8 at a time */
    float *restrict out = &s[0][0];
    _mm256_storeu_ps(out, cnn_skinny_hsum8(s00, s01, s02, s03, s04, s05, s10, s11));
    _mm256_storeu_ps(out + 8, cnn_skinny_hsum8(s12, s13, s14, s15, s20, s21, s22, s23));
    _mm256_storeu_ps(out + 16, cnn_skinny_hsum8(s24, s25, s30, s31, s32, s33, s34, s35));
}
#undef CNN_SK_COL
#undef CNN_SK_STEP
#undef CNN_SK_LOAD
#undef CNN_SK_LOAD_MASKED

__attribute__((target("avx512f"))) static void cnn_skinny_tile_avx512(
    const float *const *a, const float *const *c, ptrdiff_t kc, float s[CNN_SK_MR][CNN_SK_NR],
    int head) {
    cnn_skinny_tile_avx512_body(a, c, kc, s, a, 0, head);
}

__attribute__((target("avx512f"))) static void cnn_skinny_tile_avx512_pf(
    const float *const *a, const float *const *c, ptrdiff_t kc, float s[CNN_SK_MR][CNN_SK_NR],
    const float *const *pf, int npf, int head) {
    cnn_skinny_tile_avx512_body(a, c, kc, s, pf, npf, head);
}
#else
#define CNN_SK_AVX512 0
#endif

/* Portable tile, same contract as cnn_skinny_tile_avx512: 16 partial sums per entry. */
CNN_CLONES static void cnn_skinny_tile_generic(const float *const *a, const float *const *c,
                                               ptrdiff_t kc, float s[CNN_SK_MR][CNN_SK_NR]) {
    for (int i = 0; i < CNN_SK_MR; i++) {
        const float *restrict ai = a[i];
        for (int j = 0; j < CNN_SK_NR; j++) {
            const float *restrict cj = c[j];
            float acc = 0.0f;
            CNN_SIMD_SUM(acc)
            for (ptrdiff_t k = 0; k < kc; k++) acc += ai[k] * cj[k];
            s[i][j] = acc;
        }
    }
}

/* 1 when the AVX-512 tile runs on this CPU (the case the kernel is chosen for). */
static int cnn_skinny_fast_f(void) {
#if CNN_SK_AVX512
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
    return 0;
#endif
}

/* out[f * ldo + col_off[j]] += sum_k W[f * K + k] * CT[j * K + k] for f in [f0, f1), j < J.
 *
 * W (F, K) and CT (J, K) are row-major; kc (values of k per chunk) > 0; use_avx512 selects
 * the tile (only pass 1 when cnn_skinny_fast_f() is 1). Rows and columns past the last full
 * tile repeat the last valid pointer and their sums are dropped.
 */
static void cnn_skinny_rows_f(const float *W, const float *CT, float *out, ptrdiff_t K,
                              ptrdiff_t J, const ptrdiff_t *col_off, ptrdiff_t ldo, ptrdiff_t f0,
                              ptrdiff_t f1, ptrdiff_t kc, int use_avx512) {
    const float *a[CNN_SK_MR];
    const float *pf[CNN_SK_MR];
    const float *c[CNN_SK_NR];
    float s[CNN_SK_MR][CNN_SK_NR];
    const ptrdiff_t nb = (J + CNN_SK_NR - 1) / CNN_SK_NR; /* blocks of columns */
    /* When K is a multiple of 16, every row of W starts at the same offset from a 64-byte
     * boundary: the first chunk takes the `head` values before it, every later chunk starts
     * on it (see cnn_skinny_tile_avx512_body). */
    const int head = (K % 16 == 0) ? (int)((64 - ((size_t)W & 63)) & 63) / 4 : 0;
    for (ptrdiff_t k0 = 0, kn; k0 < K; k0 += kn) {
        kn = (k0 == 0) ? kc + head : kc;
        if (K - k0 < kn) kn = K - k0;
        const int hd = (k0 == 0) ? head : 0;
        for (ptrdiff_t f = f0; f < f1; f += CNN_SK_MR) {
            const int mr = (f1 - f < CNN_SK_MR) ? (int)(f1 - f) : CNN_SK_MR;
            for (int i = 0; i < CNN_SK_MR; i++) a[i] = W + (f + (i < mr ? i : mr - 1)) * K + k0;
            /* the next block of rows (this thread's first block of the next chunk at the end) */
            const ptrdiff_t fn = f + CNN_SK_MR < f1 ? f + CNN_SK_MR : f0;
            const ptrdiff_t kp = f + CNN_SK_MR < f1 ? k0 : k0 + kn;
            const ptrdiff_t kpn = K - kp < kn ? (K - kp > 0 ? K - kp : 0) : kn;
            for (int i = 0; i < CNN_SK_MR; i++)
                pf[i] = W + (fn + i < f1 ? fn + i : f1 - 1) * K + (kpn > 0 ? kp : k0);
            for (ptrdiff_t j0 = 0; j0 < J; j0 += CNN_SK_NR) {
                const int nr = (J - j0 < CNN_SK_NR) ? (int)(J - j0) : CNN_SK_NR;
                for (int j = 0; j < CNN_SK_NR; j++)
                    c[j] = CT + (j0 + (j < nr ? j : nr - 1)) * K + k0;
#if CNN_SK_AVX512
                /* column block t prefetches rows t, t + nb, ... of the next block of rows */
                const ptrdiff_t t = j0 / CNN_SK_NR;
                int npf = 0;
                const float *pft[CNN_SK_MR];
                if (kpn == kn)
                    for (ptrdiff_t r = t; r < CNN_SK_MR; r += nb) pft[npf++] = pf[r];
                if (use_avx512 && npf > 0)
                    cnn_skinny_tile_avx512_pf(a, c, kn, s, pft, npf, hd);
                else if (use_avx512)
                    cnn_skinny_tile_avx512(a, c, kn, s, hd);
                else
                    cnn_skinny_tile_generic(a, c, kn, s);
#else
                (void)use_avx512;
                cnn_skinny_tile_generic(a, c, kn, s);
#endif
                for (int i = 0; i < mr; i++) {
                    float *o = out + (f + i) * ldo;
                    for (int j = 0; j < nr; j++) o[col_off[j0 + j]] += s[i][j];
                }
            }
        }
    }
}

#endif
