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
 * CNN_SK_MR x CNN_SK_NR tile of vector accumulators along k; their horizontal sums are added
 * into out at the end of the chunk. The tile is 6 x 4 (AVX-512: 24 zmm accumulators, 10
 * loads per 24 FMAs): the whole chunk of CT is read from L2 once per block of rows, so 6 rows
 * per block need a third less L2 traffic than 4 x 6 did (the kernel alone 4-15 % faster on
 * the 4096-filter bench row, interleaved runs). 8 x 3 (half the L2 traffic, 11 loads per
 * 24 FMAs) measured the same as 6 x 4.
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

#ifndef CNN_SK_MR
#define CNN_SK_MR 6 /* rows of W per tile */
#endif
#ifndef CNN_SK_NR
#define CNN_SK_NR 4 /* columns (rows of CT) per tile */
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define CNN_SK_AVX512 1
#include <immintrin.h>

#if CNN_SK_MR * CNN_SK_NR % 8 != 0
#error "the tile's sums are reduced 8 at a time: CNN_SK_MR * CNN_SK_NR must be a multiple of 8"
#endif

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

/* One step of the tile at offset k: the CNN_SK_NR vectors of CT, then each of the CNN_SK_MR
 * vectors of W times all of them. LOAD(p) loads 16 floats at p (plain or masked). */
#define CNN_SK_STEP(LOAD, k)                                                             \
    {                                                                                    \
        __m512 v[CNN_SK_NR];                                                             \
        _Pragma("GCC unroll 8") for (int j = 0; j < CNN_SK_NR; j++)                      \
            v[j] = LOAD(cp[j] + (k));                                                    \
        _Pragma("GCC unroll 8") for (int i = 0; i < CNN_SK_MR; i++) {                   \
            __m512 w = LOAD(ap[i] + (k));                                                \
            CNN_SK_IN_REGISTER(w);                                                       \
            _Pragma("GCC unroll 8") for (int j = 0; j < CNN_SK_NR; j++)                  \
                acc[i][j] = _mm512_fmadd_ps(w, v[j], acc[i][j]);                         \
        }                                                                                \
    }
/* Keeps v in a register: otherwise GCC may fold each load of W into every FMA that uses it
 * (CNN_SK_NR loads of the same vector instead of one). */
#define CNN_SK_IN_REGISTER(v) __asm__("" : "+v"(v))
#define CNN_SK_LOAD(p) _mm512_loadu_ps(p)
#define CNN_SK_LOAD_MASKED(p) _mm512_maskz_loadu_ps(m, p)

/* s[i][j] = sum_{k < kc} a[i][k] * c[j][k] for a CNN_SK_MR x CNN_SK_NR tile; a[i], c[j]
 * point at the chunk.
 * The first `head` (< 16) values are taken masked, so that when a[i] + head is on a 64-byte
 * boundary every later vector load of W (and of CT, aligned alike by the caller) is aligned:
 * a load across two cache lines costs about twice as much.
 * With prefetch, also fetch pf[i][:kc] (the next block of rows of W, still in memory) into
 * L2: each row segment is only kc values long, too short for the hardware prefetcher. */
__attribute__((target("avx512f"), always_inline)) static inline void cnn_skinny_tile_avx512_body(
    const float *const *a, const float *const *c, ptrdiff_t kc, float s[CNN_SK_MR][CNN_SK_NR],
    const float *const *pf, const int npf, const int head) {
    const float *ap[CNN_SK_MR], *cp[CNN_SK_NR];
    __m512 acc[CNN_SK_MR][CNN_SK_NR];
    _Pragma("GCC unroll 8") for (int i = 0; i < CNN_SK_MR; i++) ap[i] = a[i];
    _Pragma("GCC unroll 8") for (int j = 0; j < CNN_SK_NR; j++) cp[j] = c[j];
    _Pragma("GCC unroll 8") for (int i = 0; i < CNN_SK_MR; i++)
        _Pragma("GCC unroll 8") for (int j = 0; j < CNN_SK_NR; j++)
            acc[i][j] = _mm512_setzero_ps();
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
    /* the sums, row-major into s, 8 at a time */
    const __m512 *flat = &acc[0][0];
    float *out = &s[0][0];
    _Pragma("GCC unroll 8") for (int g = 0; g < CNN_SK_MR * CNN_SK_NR / 8; g++)
        _mm256_storeu_ps(out + 8 * g, cnn_skinny_hsum8(flat[8 * g], flat[8 * g + 1],
                                                       flat[8 * g + 2], flat[8 * g + 3],
                                                       flat[8 * g + 4], flat[8 * g + 5],
                                                       flat[8 * g + 6], flat[8 * g + 7]));
}
#undef CNN_SK_STEP
#undef CNN_SK_LOAD
#undef CNN_SK_LOAD_MASKED
#undef CNN_SK_IN_REGISTER

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
