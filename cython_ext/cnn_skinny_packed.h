/* Skinny float32 product on filters packed once: out[f, j] += sum_k W[f, k] * CT[j, k].
 *
 * The companion of cnn_skinny.h for filters that stay fixed over many calls (inference): W
 * (F, K) is packed once (layers.pack_filters) into a layout made for this kernel's read
 * order, so that each thread reads one sequential stream of it. On the 4096-filter row
 * (F = 4096, K = 25088, 36 columns) it ran 1.25-1.4x faster per call than the unpacked
 * kernel (paired, interleaved runs), at about the rate of numpy's 2048^3 GEMM measured
 * alongside; packing the 411 MB takes 0.1-0.2 s with 2 threads (mostly page faults of the
 * new array).
 *
 * Layout. Rows are grouped into panels of CNN_SKP_P = 32 (two zmm vectors along f; the last
 * panel is padded with zero rows), panels into groups of CNN_SKP_G = 16 (512 rows; the last
 * group may hold fewer). A group is stored chunk by chunk of CNN_SKP_KC values of k, and
 * within a chunk panel by panel, each panel's chunk k-major: [k][32]. Groups follow each
 * other. A thread takes whole groups, in order: its part of the packed array is read front
 * to back. (When W is one group, 512 rows or fewer, each thread takes a share of its
 * panels: runs of the stream.)
 *
 * Columns. The caller gives the columns k-major: the im2col matrix (K, J). A last block of
 * fewer than 12 columns is copied, chunk by chunk, into a small buffer padded with zeros.
 *
 * Tile. 32 rows x 12 columns: per k, two vector loads of W, 12 broadcasts of cols[k, j], 24
 * FMAs into vectors along f, so no horizontal sums. A thread walks a group as: for each
 * chunk, for each panel, for each block of 12 columns, one tile. The columns' chunk (256 x
 * J floats, 36 KB for 36 columns) stays in L1/L2 over the group's panels, the group's sums
 * (512 rows x J floats, 72 KB for 36 columns) in L2 over its chunks. A tile starts its sums from zero
 * and adds them to the group's sums at its end: each output is a sum of K / 256 chunk sums,
 * about 3x less rounding error than one running sum over K.
 *
 * Prefetch. Only the first column block of a panel's chunk reads W from memory; the others
 * find it in L1. Left to the hardware prefetcher, the memory idles while they run and the
 * next first block stalls: without software prefetch this kernel was 6-30 % slower than the
 * unpacked one. So every k step of every column block prefetches (into L2) its share of the
 * next panel's chunk, the next 32 KB of the stream, spread evenly over the whole chunk.
 *
 * The AVX-512 tile is compiled with a target attribute and chosen at run time by the caller
 * (cnn_skinny_fast_f); the portable tile gives the same sums up to rounding.
 */
#ifndef CNN_SKINNY_PACKED_H
#define CNN_SKINNY_PACKED_H

#include <stddef.h>
#include <string.h>

#include "cnn_simd.h"
#include "cnn_skinny.h" /* CNN_SK_AVX512, cnn_skinny_fast_f */

#define CNN_SKP_P 32   /* rows per panel: two zmm vectors of floats */
#define CNN_SKP_NR 12  /* columns per tile */
#define CNN_SKP_KC 256 /* values of k per chunk */
#define CNN_SKP_G 16   /* panels per group: the unit of work of a thread */

/* ---- layout ---------------------------------------------------------------------------- */

static inline ptrdiff_t cnn_skp_panels(ptrdiff_t F) { return (F + CNN_SKP_P - 1) / CNN_SKP_P; }

static inline ptrdiff_t cnn_skp_groups(ptrdiff_t F) {
    return (cnn_skp_panels(F) + CNN_SKP_G - 1) / CNN_SKP_G;
}

/* Floats of the packed W: every panel full, padding rows included. */
static inline size_t cnn_skp_packed_size(ptrdiff_t F, ptrdiff_t K) {
    return (size_t)cnn_skp_panels(F) * CNN_SKP_P * (size_t)K;
}

/* Offset in floats of panel p's chunk that starts at k0 (a multiple of CNN_SKP_KC). */
static inline size_t cnn_skp_offset(ptrdiff_t F, ptrdiff_t K, ptrdiff_t p, ptrdiff_t k0) {
    const ptrdiff_t np = cnn_skp_panels(F), g = p / CNN_SKP_G, pg = p - g * CNN_SKP_G;
    const ptrdiff_t ng = (np - g * CNN_SKP_G < CNN_SKP_G) ? np - g * CNN_SKP_G : CNN_SKP_G;
    const ptrdiff_t kn = (K - k0 < CNN_SKP_KC) ? K - k0 : CNN_SKP_KC;
    return ((size_t)g * CNN_SKP_G * (size_t)K + (size_t)k0 * (size_t)ng + (size_t)pg * kn) *
           CNN_SKP_P;
}

/* Packs the panels [p0, p1) of W (F, K), row-major, into Wp (cnn_skp_packed_size floats).
 * Threads may pack disjoint ranges of panels at the same time. Blocks of 32 rows x 16
 * values of k are read along k (contiguous) and written along f (contiguous). */
CNN_CLONES static void cnn_skp_pack_f(const float *W, ptrdiff_t F, ptrdiff_t K, float *Wp,
                                      ptrdiff_t p0, ptrdiff_t p1) {
    for (ptrdiff_t p = p0; p < p1; p++) {
        const ptrdiff_t f0 = p * CNN_SKP_P;
        const int rows = (F - f0 < CNN_SKP_P) ? (int)(F - f0) : CNN_SKP_P;
        for (ptrdiff_t k0 = 0; k0 < K; k0 += CNN_SKP_KC) {
            const ptrdiff_t kn = (K - k0 < CNN_SKP_KC) ? K - k0 : CNN_SKP_KC;
            float *dst = Wp + cnn_skp_offset(F, K, p, k0);
            for (ptrdiff_t kb = 0; kb < kn; kb += 16) {
                const int kw = (kn - kb < 16) ? (int)(kn - kb) : 16;
                float blk[16][CNN_SKP_P]; /* [k][row] */
                for (int r = 0; r < CNN_SKP_P; r++) {
                    if (r < rows) {
                        const float *src = W + (f0 + r) * K + k0 + kb;
                        for (int k = 0; k < kw; k++) blk[k][r] = src[k];
                    } else {
                        for (int k = 0; k < kw; k++) blk[k][r] = 0.0f;
                    }
                }
                memcpy(dst + kb * CNN_SKP_P, blk, sizeof(float) * CNN_SKP_P * (size_t)kw);
            }
        }
    }
}

/* ---- tiles ------------------------------------------------------------------------------- */

/* The AVX-512 tile: acc[j][0:32] += sum_{k < kn} w[k][0:32] * c[k * ldc + j], j < 12.
 * w: the panel's chunk (64-byte aligned); c: the columns at the chunk's first k and the
 * block's first column; acc (64-byte aligned). Step k prefetches the line(s) at pf + k * pfstep (npf = 1 or
 * 2 lines a step; npf = 0: none). */
#if CNN_SK_AVX512
#define CNN_SKP_IN_REGISTER(v) __asm__("" : "+v"(v))
__attribute__((target("avx512f"), always_inline)) static inline void cnn_skp_tile_body(
    const float *restrict w, const float *restrict c, ptrdiff_t ldc, ptrdiff_t kn,
    float *restrict acc, const char *pf, ptrdiff_t pfstep, const int npf) {
    __m512 a[CNN_SKP_NR][2];
    _Pragma("GCC unroll 12") for (int j = 0; j < CNN_SKP_NR; j++) {
        a[j][0] = _mm512_setzero_ps();
        a[j][1] = _mm512_setzero_ps();
    }
    _Pragma("GCC unroll 2") for (ptrdiff_t k = 0; k < kn; k++) {
        if (npf > 0) _mm_prefetch(pf + k * pfstep, _MM_HINT_T1);
        if (npf > 1) _mm_prefetch(pf + k * pfstep + 64, _MM_HINT_T1);
        /* in registers: otherwise GCC folds the loads into each of the 12 FMAs */
        __m512 x0 = _mm512_load_ps(w + k * CNN_SKP_P), x1 = _mm512_load_ps(w + k * CNN_SKP_P + 16);
        CNN_SKP_IN_REGISTER(x0);
        CNN_SKP_IN_REGISTER(x1);
        const float *ck = c + k * ldc;
        _Pragma("GCC unroll 12") for (int j = 0; j < CNN_SKP_NR; j++) {
            const __m512 b = _mm512_set1_ps(ck[j]);
            a[j][0] = _mm512_fmadd_ps(x0, b, a[j][0]);
            a[j][1] = _mm512_fmadd_ps(x1, b, a[j][1]);
        }
    }
    _Pragma("GCC unroll 12") for (int j = 0; j < CNN_SKP_NR; j++) {
        float *o = acc + j * CNN_SKP_P;
        _mm512_store_ps(o, _mm512_add_ps(_mm512_load_ps(o), a[j][0]));
        _mm512_store_ps(o + 16, _mm512_add_ps(_mm512_load_ps(o + 16), a[j][1]));
    }
}
#undef CNN_SKP_IN_REGISTER

__attribute__((target("avx512f"))) static void cnn_skp_tile_avx512(
    const float *w, const float *c, ptrdiff_t ldc, ptrdiff_t kn, float *acc, const char *pf,
    ptrdiff_t pfstep) {
    cnn_skp_tile_body(w, c, ldc, kn, acc, pf, pfstep, 1);
}
__attribute__((target("avx512f"))) static void cnn_skp_tile_avx512_pf2(
    const float *w, const float *c, ptrdiff_t ldc, ptrdiff_t kn, float *acc, const char *pf,
    ptrdiff_t pfstep) {
    cnn_skp_tile_body(w, c, ldc, kn, acc, pf, pfstep, 2);
}
#endif

/* The portable tile, same contract without the prefetch. */
CNN_CLONES static void cnn_skp_tile_generic(const float *w, const float *c, ptrdiff_t ldc,
                                            ptrdiff_t kn, float *acc) {
    float a[CNN_SKP_NR][CNN_SKP_P];
    memset(a, 0, sizeof(a));
    for (ptrdiff_t k = 0; k < kn; k++) {
        const float *restrict wk = w + k * CNN_SKP_P;
        for (int j = 0; j < CNN_SKP_NR; j++) {
            const float b = c[k * ldc + j];
            CNN_SIMD
            for (int i = 0; i < CNN_SKP_P; i++) a[j][i] += wk[i] * b;
        }
    }
    for (int j = 0; j < CNN_SKP_NR; j++)
        for (int i = 0; i < CNN_SKP_P; i++) acc[j * CNN_SKP_P + i] += a[j][i];
}

/* ---- one thread's groups ----------------------------------------------------------------- */

/* The panels [q0, q1) of each group of [g0, g1) of Wp (packed by cnn_skp_pack_f), against
 * the columns cols (K, J), row-major (the im2col matrix):
 * out[f * ldo + col_off[j]] += sum_k W[f, k] * cols[k * J + j] for their rows f < F, j < J.
 * A thread takes whole groups (q0 = 0, q1 = CNN_SKP_G), or a share of the panels of a
 * single group.
 * acc: scratch of CNN_SKP_G * ceil(J / 12) * 12 * CNN_SKP_P floats, 64-byte aligned, as is
 * Wp; tail: scratch of CNN_SKP_KC * CNN_SKP_NR floats. use_avx512 selects the tile (only pass
 * 1 when cnn_skinny_fast_f() is 1).
 */
static void cnn_skp_rows_f(const float *Wp, const float *cols, float *out, ptrdiff_t ldo,
                           const ptrdiff_t *col_off, ptrdiff_t F, ptrdiff_t K, ptrdiff_t J,
                           ptrdiff_t g0, ptrdiff_t g1, ptrdiff_t q0, ptrdiff_t q1, float *acc,
                           float *tail, int use_avx512) {
    const ptrdiff_t np = cnn_skp_panels(F);
    const ptrdiff_t nb = (J + CNN_SKP_NR - 1) / CNN_SKP_NR; /* blocks of columns */
    const ptrdiff_t nfull = J / CNN_SKP_NR, rest = J - nfull * CNN_SKP_NR;
    const ptrdiff_t lda = nb * CNN_SKP_NR; /* a panel's sums: [j < lda][row] */
    /* Bytes of the next panel's chunk each k step prefetches: the nb column blocks' kn steps
     * cover all of its kn * 128 bytes, with one line a step (two when nb = 1). */
    const ptrdiff_t pfstep = (CNN_SKP_P * 4 + nb - 1) / nb;
#if !CNN_SK_AVX512
    (void)use_avx512;
    (void)pfstep;
#endif
    for (ptrdiff_t g = g0; g < g1; g++) {
        const ptrdiff_t ng = (np - g * CNN_SKP_G < CNN_SKP_G) ? np - g * CNN_SKP_G : CNN_SKP_G;
        const ptrdiff_t p1 = q1 < ng ? q1 : ng; /* this thread's panels: [q0, p1) */
        if (q0 >= p1) continue;
        memset(acc, 0, sizeof(float) * (size_t)(ng * lda * CNN_SKP_P));
        const float *group = Wp + (size_t)g * CNN_SKP_G * (size_t)K * CNN_SKP_P;
        for (ptrdiff_t k0 = 0; k0 < K; k0 += CNN_SKP_KC) {
            const ptrdiff_t kn = (K - k0 < CNN_SKP_KC) ? K - k0 : CNN_SKP_KC;
            if (rest > 0) /* the last, partial block of columns, padded with zeros: [k][12] */
                for (ptrdiff_t k = 0; k < kn; k++)
                    for (int j = 0; j < CNN_SKP_NR; j++)
                        tail[k * CNN_SKP_NR + j] =
                            (j < rest) ? cols[(k0 + k) * J + nfull * CNN_SKP_NR + j] : 0.0f;
            /* the chunk's panels [q0, p1): one run of the stream */
            const float *wp = group + (size_t)k0 * ng * CNN_SKP_P + (size_t)q0 * kn * CNN_SKP_P;
            for (ptrdiff_t pg = q0; pg < p1; pg++, wp += kn * CNN_SKP_P) {
                float *ap = acc + pg * lda * CNN_SKP_P;
                /* the next kn * 128 bytes of the stream: past its end, prefetch is harmless */
                const char *pf = (const char *)(wp + kn * CNN_SKP_P);
                for (ptrdiff_t b = 0; b < nb; b++, pf += kn * pfstep) {
                    const int full = b < nfull;
                    const float *c = full ? cols + k0 * J + b * CNN_SKP_NR : tail;
                    const ptrdiff_t ldc = full ? J : CNN_SKP_NR;
                    float *ab = ap + b * CNN_SKP_NR * CNN_SKP_P;
#if CNN_SK_AVX512
                    if (use_avx512 && pfstep > 64)
                        cnn_skp_tile_avx512_pf2(wp, c, ldc, kn, ab, pf, pfstep);
                    else if (use_avx512)
                        cnn_skp_tile_avx512(wp, c, ldc, kn, ab, pf, pfstep);
                    else
                        cnn_skp_tile_generic(wp, c, ldc, kn, ab);
#else
                    cnn_skp_tile_generic(wp, c, ldc, kn, ab);
#endif
                }
            }
        }
        /* the group's sums, [panel][j][row], into out */
        for (ptrdiff_t pg = q0; pg < p1; pg++) {
            const ptrdiff_t f0 = (g * CNN_SKP_G + pg) * CNN_SKP_P;
            const int rows = (F - f0 < CNN_SKP_P) ? (int)(F - f0) : CNN_SKP_P;
            const float *ap = acc + pg * lda * CNN_SKP_P;
            for (int i = 0; i < rows; i++) {
                float *o = out + (f0 + i) * ldo;
                for (ptrdiff_t j = 0; j < J; j++) o[col_off[j]] += ap[j * CNN_SKP_P + i];
            }
        }
    }
}

#endif
