/* The inference engine's C side (cython_ext/engine.pyx): a compiled list of layer descriptors
 * run by one C loop, with no Python between layers.
 *
 * A plan (cnnserve/engine) holds, per op, one row of CNN_ENG_FIELDS integers (the fields
 * below), one eps, and offsets into one parameter array of the plan's dtype. Ops:
 *
 * - GEMM: a convolution, or an affine layer seen as a 1x1 conv on a (D, 1, 1) volume, with
 *   batch norm already folded into its weights and bias, and ReLU fused into the epilogue.
 *   Filters are packed once (at compile time) into panels of CNN_ENG_MR rows, k-major:
 *   packed[panel][k][MR], zero rows padding the last panel. The columns of the product are
 *   the output pixels of the whole batch (image-major): a block of CNN_ENG_NB of them is
 *   gathered straight from the input (an implicit im2col of that block only: no whole-image
 *   column buffer) into a per-thread scratch, bp[tile][k][NR], and multiplied by every panel
 *   with an MR x NR register tile. Threads take (column block, panel range) items: many
 *   blocks (large images, large batches) go one block a thread; few blocks (batch 1, small
 *   images, affine layers) split the panels, i.e. the output channels, between threads.
 * - MAXPOOL / AVGPOOL: no padding, any window and stride, parallel over (n, c) planes; a NaN
 *   in a window wins, as in the layer kernels.
 * - SCALE: per-channel y = x * a[c] + b[c] (a batch norm that could not be folded).
 * - CNORM: each position normalised over its C channels (layer norm on vectors, a converted
 *   network's channel layer norm), then gamma[c], beta[c].
 * - GNORM: group norm, statistics per (image, group) over C/G channels and all positions.
 * - RELU: a ReLU with nothing before it to fuse into.
 * Every op has a RELU flag (fused ReLU on its output). Statistics of the norms are in double.
 *
 * The float32 GEMM tile has an AVX2/FMA version (target attribute, chosen at run time when the
 * CPU has it) and a portable one; cnn_eng_set_portable(1) forces the portable tile so tests
 * cover both. float64 always uses the portable tile.
 */
#ifndef CNN_ENGINE_H
#define CNN_ENGINE_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "cnn_simd.h"
#include "cnn_threads.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define CNN_ENG_X86 1
#else
#define CNN_ENG_X86 0
#endif

#define CNN_ENG_MR 6   /* rows (output channels) per panel and tile */
#define CNN_ENG_NR 16  /* columns (output pixels) per tile */
#define CNN_ENG_NB 64  /* columns per gathered block (a multiple of NR) */
#ifndef CNN_ENG_KC
#define CNN_ENG_KC 512 /* values of k per chunk of a tile (larger K: partial sums in out) */
#endif

enum {
    CNN_ENG_GEMM = 0,
    CNN_ENG_MAXPOOL = 1,
    CNN_ENG_AVGPOOL = 2,
    CNN_ENG_SCALE = 3,
    CNN_ENG_CNORM = 4,
    CNN_ENG_GNORM = 5,
    CNN_ENG_RELU = 6,
};

/* Fields of one op's descriptor row. Input (C, H, W) per image, output (F, HO, WO). */
enum {
    E_KIND, E_C, E_H, E_W, E_F, E_HO, E_WO, E_KH, E_KW, E_STRIDE, E_PAD, E_RELU,
    E_W_OFS,  /* packed filters (GEMM) */
    E_A_OFS,  /* bias (GEMM), scale or gamma (SCALE, norms) */
    E_B_OFS,  /* shift or beta (SCALE, norms) */
    E_GROUPS, /* GNORM */
    E_V_OFS,  /* GEMM: the unpacked filters (F, K) for the one-column-per-image path, or -1 */
    CNN_ENG_FIELDS
};

/* Below this many inner-loop operations an op runs on one thread: a parallel region's start
 * and barrier cost microseconds, and on a busy machine a waiting thread can lose a whole
 * scheduler slice (milliseconds), far more than such an op takes. */
#define CNN_ENG_PARALLEL_MIN_WORK (1 << 20)

/* Fewer output columns than this in a batch: a GEMM op whose window covers its input runs as
 * dot products on the unpacked filters (the tile would compute mostly padding). */
#define CNN_ENG_GEMV_COLS 8

static inline int cnn_eng_threads(ptrdiff_t work) {
    return work >= CNN_ENG_PARALLEL_MIN_WORK ? cnn_threads_for(work) : 1;
}

static int cnn_eng_portable = 0;

static inline void cnn_eng_set_portable(int flag) { cnn_eng_portable = flag ? 1 : 0; }

/* 1 if the float32 GEMM tile runs the AVX2/FMA code on this CPU (and it is not switched off). */
static inline int cnn_eng_uses_avx2(void) {
#if CNN_ENG_X86
    return !cnn_eng_portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Columns per thread item and the number of panel ranges per block, for the thread count. */
static inline void cnn_eng_split(ptrdiff_t blocks, ptrdiff_t panels, int threads,
                                 ptrdiff_t *fsplit) {
    ptrdiff_t s = 1;
    if (threads > 1 && blocks < 2 * threads) {
        s = (2 * threads + blocks - 1) / blocks;
        if (s > panels) s = panels;
    }
    *fsplit = s < 1 ? 1 : s;
}

#if CNN_ENG_X86
/* The 6 x 16 AVX2 tile: c[i][j] = sum_k a[k][i] * B[k][j], where row k of B is
 * b + k * NR (gathered columns, off == NULL) or b + off[k] (straight from the input: the
 * direct path for interior tiles of stride-1 convolutions). */
__attribute__((target("avx2,fma"))) static void cnn_eng_tile_avx2(ptrdiff_t K, const float *a,
                                                                  const float *b,
                                                                  const ptrdiff_t *off,
                                                                  float *c) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (ptrdiff_t k = 0; k < K; k++) {
        const float *bk = off ? b + off[k] : b + k * 16;
        __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
        const float *ak = a + k * 6;
        __m256 v;
        v = _mm256_broadcast_ss(ak + 0);
        c00 = _mm256_fmadd_ps(v, b0, c00);
        c01 = _mm256_fmadd_ps(v, b1, c01);
        v = _mm256_broadcast_ss(ak + 1);
        c10 = _mm256_fmadd_ps(v, b0, c10);
        c11 = _mm256_fmadd_ps(v, b1, c11);
        v = _mm256_broadcast_ss(ak + 2);
        c20 = _mm256_fmadd_ps(v, b0, c20);
        c21 = _mm256_fmadd_ps(v, b1, c21);
        v = _mm256_broadcast_ss(ak + 3);
        c30 = _mm256_fmadd_ps(v, b0, c30);
        c31 = _mm256_fmadd_ps(v, b1, c31);
        v = _mm256_broadcast_ss(ak + 4);
        c40 = _mm256_fmadd_ps(v, b0, c40);
        c41 = _mm256_fmadd_ps(v, b1, c41);
        v = _mm256_broadcast_ss(ak + 5);
        c50 = _mm256_fmadd_ps(v, b0, c50);
        c51 = _mm256_fmadd_ps(v, b1, c51);
    }
    _mm256_storeu_ps(c + 0, c00);
    _mm256_storeu_ps(c + 8, c01);
    _mm256_storeu_ps(c + 16, c10);
    _mm256_storeu_ps(c + 24, c11);
    _mm256_storeu_ps(c + 32, c20);
    _mm256_storeu_ps(c + 40, c21);
    _mm256_storeu_ps(c + 48, c30);
    _mm256_storeu_ps(c + 56, c31);
    _mm256_storeu_ps(c + 64, c40);
    _mm256_storeu_ps(c + 72, c41);
    _mm256_storeu_ps(c + 80, c50);
    _mm256_storeu_ps(c + 88, c51);
}
#endif

#define CNN_ENG_T float
#define CNN_ENG_S(name) name##_f
#define CNN_ENG_FLOAT32 1
#include "cnn_engine_impl.h"
#undef CNN_ENG_T
#undef CNN_ENG_S
#undef CNN_ENG_FLOAT32

#define CNN_ENG_T double
#define CNN_ENG_S(name) name##_d
#define CNN_ENG_FLOAT32 0
#include "cnn_engine_impl.h"
#undef CNN_ENG_T
#undef CNN_ENG_S
#undef CNN_ENG_FLOAT32

#endif
