/* The inference engine's C side (cython_ext/engine.pyx): a compiled list of layer descriptors
 * run by one C loop, with no Python between layers.
 *
 * Layout. Activations between ops are channels-last (NHWC: the C values of one pixel are
 * contiguous), so a pixel's output channels are one vector store and a pool or a norm runs
 * along contiguous channels. The plan's input is NCHW, as the caller gives it: the first op
 * that needs it converts (a conv while it copies its input, see below; otherwise a transpose
 * op at the start), and a converted network's map is transposed back to NCHW at the end.
 *
 * A plan (cnnserve/engine) holds, per op, one row of CNN_ENG_FIELDS integers (the fields
 * below), one eps, offsets into one parameter array of the plan's dtype and into one int64
 * array of window offsets. Ops:
 *
 * - CONV: a convolution, or an affine layer seen as a conv whose window is its whole input,
 *   with batch norm already folded into its weights and bias and ReLU fused into the
 *   epilogue. It is a direct ("indirect-GEMM") convolution: no im2col buffer. A register tile
 *   is MR = 6 output pixels (anywhere: across rows and images) x NR = 16 output channels
 *   (1 x 16 for a lone pixel; a 12 x 8 tile for layers of at most 8 channels was tried and
 *   ran slower: its 12 broadcasts per k and partial stores cost more than the idle lanes);
 *   for each of the window's positions (kh, kw) and each input channel c it broadcasts the 6
 *   pixels' input values, base[i] + off[kh, kw] + c, and multiplies them by 16 filter values
 *   packed at compile time as panel[k][16], k = (kh, kw, c). A padded input is first copied
 *   into a zero-bordered buffer (and a first layer's NCHW input to NHWC while at it), so the
 *   tile never tests a bound. Long windows are split in chunks of about CNN_ENG_KC values of
 *   k, the panel's chunk staying in L1 while a block of tiles passes; partial sums go through
 *   the output. Threads take (block of tiles, range of panels) items: many blocks go one
 *   block a thread, few (batch 1, affine layers) split the panels between threads. A max
 *   pool of k x k at stride k after a conv is fused (E_POOL): the conv runs a few pool rows
 *   at a time into a per-thread slot and pools them into its output, so the unpooled
 *   output never goes through memory. A conv followed by a padded conv writes its output
 *   with the zero border the next one needs (E_OPAD), so that one copies nothing.
 * - ROWCONV: a conv of one input channel at stride 1 whose output rows are at least
 *   CNN_ENG_RX wide (a first layer on grey images), vectorised along the output rows: 16
 *   pixels x 6 channels a tile (see cnn_eng_rowconv).
 * - WINO: a 3x3 stride-1 conv of enough input and output channels (the plan decides:
 *   WINO_MIN_CHANNELS), as Winograd F(2x2, 3x3) (see cnn_eng_wino): 2.25 times fewer
 *   multiplications. A 2 x 2 max pool at stride 2 is fused (a max over each 2 x 2 block of
 *   outputs), and it writes and reads zero borders in place as CONV does.
 * - MAXPOOL / AVGPOOL: no padding, any window and stride, vectors along channels; a NaN in a
 *   window wins, as in the layer kernels.
 * - SCALE: per-channel y = x * a[c] + b[c] (a batch norm that could not be folded).
 * - CNORM: each pixel normalised over its C channels (layer norm on vectors, a converted
 *   network's channel layer norm), then gamma[c], beta[c].
 * - GNORM: group norm, statistics per (image, group) over C/G channels and all positions.
 * - RELU: a ReLU with nothing before it to fuse into.
 * - TRANSPOSE: NCHW to NHWC (E_F = 0) or back (E_F = 1), the plan's first or last op.
 * Every op has a RELU flag (fused ReLU on its output). Statistics of the norms are in double.
 *
 * The float32 tiles have AVX2/FMA versions, an AVX-512 one for pairs of panels (CONV: 6
 * pixels x 32 channels) and portable ones, chosen at run time by what the CPU has (target
 * attributes); cnn_eng_set_cap caps the choice (AVX2, or portable) so that tests cover each
 * path on one machine. float64 always uses the portable tiles.
 */
#ifndef CNN_ENGINE_H
#define CNN_ENGINE_H

#include <math.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

#include "cnn_simd.h"
#include "cnn_threads.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define CNN_ENG_X86 1
#else
#define CNN_ENG_X86 0
#endif

#define CNN_ENG_MR 6  /* output pixels per tile */
#define CNN_ENG_NR 16 /* output channels per tile and per packed panel */
#define CNN_ENG_TB 8  /* tiles per block (a panel's chunk is reused by each) ... */
#define CNN_ENG_TB_WIDE 32 /* ... or this many, when the filters are large (few pixels) */
#define CNN_ENG_WIDE_BYTES (1 << 24) /* filters of more bytes than this: wide blocks */
#ifndef CNN_ENG_KC
#define CNN_ENG_KC 384 /* values of k per chunk at most: a panel's chunk stays in L1 */
#endif

#define CNN_ENG_RB 6  /* ROWCONV: output channels per block (cnn_eng_rowconv) */
#define CNN_ENG_RX 16 /* ROWCONV: output pixels of a row per tile */
#define CNN_ENG_WINO_SKEW 16 /* values between a Winograd band's points (see cnn_eng_wino) */

enum {
    CNN_ENG_CONV = 0,
    CNN_ENG_MAXPOOL = 1,
    CNN_ENG_AVGPOOL = 2,
    CNN_ENG_SCALE = 3,
    CNN_ENG_CNORM = 4,
    CNN_ENG_GNORM = 5,
    CNN_ENG_RELU = 6,
    CNN_ENG_TRANSPOSE = 7,
    CNN_ENG_WINO = 8,
    CNN_ENG_ROWCONV = 9,
};

/* Fields of one op's descriptor row. Input (C, H, W) per image, output (F, HO, WO). */
enum {
    E_KIND, E_C, E_H, E_W, E_F, E_HO, E_WO, E_KH, E_KW, E_STRIDE, E_PAD, E_RELU,
    E_W_OFS,   /* CONV: packed filters */
    E_A_OFS,   /* bias (CONV), scale or gamma (SCALE, norms) */
    E_B_OFS,   /* shift or beta (SCALE, norms) */
    E_GROUPS,  /* GNORM: groups; CONV with E_POOL: pool rows per item; WINO: tiles per
                * band at most */
    E_OFF_OFS, /* CONV: KH * KW window offsets in the (padded) NHWC input, in the int64 array */
    E_COPY,    /* CONV, WINO: 0 reads its input as it is; 1 copies it padded (NHWC); 2 the
                * same from the plan's NCHW input */
    E_SLOTS,   /* WINO, CONV with E_POOL: slots of the scratch buffer (threads at most) */
    E_POOL,    /* CONV, WINO: 0, or a max pool of E_POOL x E_POOL at stride E_POOL fused (E_HO
                * and E_WO are then the pooled output's); WINO fuses 2 x 2 pools only */
    E_OPAD,    /* CONV, WINO: 0, or writes its output with a zero border of E_OPAD pixels, the
                * next conv's padding (that conv then reads it in place: E_COPY 0) */
    CNN_ENG_FIELDS
};

/* Below this many inner-loop operations (about 1 us of one core's FMAs) an op runs on one
 * thread: a parallel region's start and barrier cost a microsecond or two with the threads
 * still spinning from the op before (GOMP_SPINCOUNT, cnnserve/_ext), tens when they must be
 * woken, and on a busy machine a waiting thread can lose a whole scheduler slice. 2**17 to
 * 2**18 ran the batch-1 cases fastest; 2**20 left a 3-channel first layer on one core. */
#define CNN_ENG_PARALLEL_MIN_WORK (1 << 17)

static inline int cnn_eng_threads(ptrdiff_t work) {
    return work >= CNN_ENG_PARALLEL_MIN_WORK ? cnn_threads_for(work) : 1;
}

/* A monotonic clock in seconds, for the per-op times of a profiled run. */
static inline double cnn_eng_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The float32 tiles' instruction sets, best last; cnn_eng_cap caps the one used (tests force
 * each). */
enum { CNN_ENG_PORTABLE = 0, CNN_ENG_AVX2 = 1, CNN_ENG_AVX512 = 2 };

static int cnn_eng_cap = CNN_ENG_AVX512;

static inline void cnn_eng_set_cap(int cap) {
    cnn_eng_cap = cap < CNN_ENG_PORTABLE ? CNN_ENG_PORTABLE
                  : cap > CNN_ENG_AVX512 ? CNN_ENG_AVX512 : cap;
}

/* The best tiles this CPU runs: CNN_ENG_AVX512 (AVX-512F, beside the AVX2 ones),
 * CNN_ENG_AVX2 (AVX2 and FMA) or CNN_ENG_PORTABLE. */
static inline int cnn_eng_best_isa(void) {
#if CNN_ENG_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        return __builtin_cpu_supports("avx512f") ? CNN_ENG_AVX512 : CNN_ENG_AVX2;
    }
#endif
    return CNN_ENG_PORTABLE;
}

/* The tiles float32 ops run: the best the CPU has, under the cap. */
static inline int cnn_eng_isa(void) {
    int have = cnn_eng_best_isa();
    return have < cnn_eng_cap ? have : cnn_eng_cap;
}

/* The number of panel ranges per block of tiles, for the thread count. */
static inline ptrdiff_t cnn_eng_split(ptrdiff_t blocks, ptrdiff_t panels, int threads) {
    ptrdiff_t s = 1;
    if (threads > 1 && blocks < 2 * threads) {
        s = (2 * threads + blocks - 1) / blocks;
        if (s > panels) s = panels;
    }
    return s < 1 ? 1 : s;
}

#if CNN_ENG_X86
/* max(v, u), a NaN winning (u > v, or u NaN: a NaN, once in, stays, since no u is above
 * it; v NaN: u > v is false): the max pools' rule, as in the layer kernels. */
#define CNN_ENG_MAX(v, u) ((u) > (v) || (u) != (u) ? (u) : (v))

/* The first n (< 8) lanes of a vector from and to memory, through the stack: AMD's masked
 * moves (vmaskmovps) are microcoded and far slower than a few scalar moves. */
__attribute__((target("avx2"))) static inline __m256 cnn_eng_load_part(const float *p, int n) {
    float t[8] = {0};
    for (int j = 0; j < n && j < 8; j++) t[j] = p[j]; /* n < 8: the bound tells GCC so */
    return _mm256_loadu_ps(t);
}

__attribute__((target("avx2"))) static inline void cnn_eng_store_part(float *p, int n,
                                                                      __m256 v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    for (int j = 0; j < n && j < 8; j++) p[j] = t[j];
}

/* A row of a tile (one pixel's channels) in and out: whole vectors, or the first fw channels
 * (a last panel of fewer than NR channels) in part. Bias and ReLU on the way out (a NaN
 * stays NaN: max(0, v) returns v when v is NaN). */
#define CNN_ENG_LOAD(r, v, at)                                                            \
    v = fw >= (at) + 8 ? _mm256_loadu_ps(o[r] + (at)) : cnn_eng_load_part(o[r] + (at), fw - (at))
#define CNN_ENG_STORE(r, v, at, bv)                                                       \
    do {                                                                                  \
        if (bias) v = _mm256_add_ps(v, bv);                                               \
        if (relu) v = _mm256_max_ps(_mm256_setzero_ps(), v);                              \
        if (fw >= (at) + 8) {                                                             \
            _mm256_storeu_ps(o[r] + (at), v);                                             \
        } else if (fw > (at)) {                                                           \
            cnn_eng_store_part(o[r] + (at), fw - (at), v);                                \
        }                                                                                 \
    } while (0)

/* The 6 x 16 AVX2 tile: o[i][j] (+)= sum over positions p < npos and channels c < cn of
 * b[i][off[p] + c0 + c] * w[(p * cn + c) * 16 + j] (w already at the chunk's start, its rows
 * consecutive), for j < fw, then bias and ReLU when given. load: add to what o holds. */
__attribute__((target("avx2,fma"))) static void cnn_eng_tile6_avx2(
    ptrdiff_t npos, const ptrdiff_t *off, ptrdiff_t c0, ptrdiff_t cn, const float *w,
    const float *const *b, float *const *o, int fw, int load, const float *bias, int relu) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    if (load) {
        CNN_ENG_LOAD(0, c00, 0); CNN_ENG_LOAD(0, c01, 8);
        CNN_ENG_LOAD(1, c10, 0); CNN_ENG_LOAD(1, c11, 8);
        CNN_ENG_LOAD(2, c20, 0); CNN_ENG_LOAD(2, c21, 8);
        CNN_ENG_LOAD(3, c30, 0); CNN_ENG_LOAD(3, c31, 8);
        CNN_ENG_LOAD(4, c40, 0); CNN_ENG_LOAD(4, c41, 8);
        CNN_ENG_LOAD(5, c50, 0); CNN_ENG_LOAD(5, c51, 8);
    } else {
        c00 = c01 = c10 = c11 = c20 = c21 = _mm256_setzero_ps();
        c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
    }
    const float *b0 = b[0] + c0, *b1 = b[1] + c0, *b2 = b[2] + c0;
    const float *b3 = b[3] + c0, *b4 = b[4] + c0, *b5 = b[5] + c0;
    for (ptrdiff_t p = 0; p < npos; p++) {
        ptrdiff_t d = off[p];
        for (ptrdiff_t c = d; c < d + cn; c++, w += 16) {
            __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8), v;
            v = _mm256_broadcast_ss(b0 + c);
            c00 = _mm256_fmadd_ps(v, w0, c00);
            c01 = _mm256_fmadd_ps(v, w1, c01);
            v = _mm256_broadcast_ss(b1 + c);
            c10 = _mm256_fmadd_ps(v, w0, c10);
            c11 = _mm256_fmadd_ps(v, w1, c11);
            v = _mm256_broadcast_ss(b2 + c);
            c20 = _mm256_fmadd_ps(v, w0, c20);
            c21 = _mm256_fmadd_ps(v, w1, c21);
            v = _mm256_broadcast_ss(b3 + c);
            c30 = _mm256_fmadd_ps(v, w0, c30);
            c31 = _mm256_fmadd_ps(v, w1, c31);
            v = _mm256_broadcast_ss(b4 + c);
            c40 = _mm256_fmadd_ps(v, w0, c40);
            c41 = _mm256_fmadd_ps(v, w1, c41);
            v = _mm256_broadcast_ss(b5 + c);
            c50 = _mm256_fmadd_ps(v, w0, c50);
            c51 = _mm256_fmadd_ps(v, w1, c51);
        }
    }
    __m256 bias0 = _mm256_setzero_ps(), bias1 = bias0;
    if (bias) {
        bias0 = _mm256_loadu_ps(bias);
        bias1 = _mm256_loadu_ps(bias + 8);
    }
    CNN_ENG_STORE(0, c00, 0, bias0); CNN_ENG_STORE(0, c01, 8, bias1);
    CNN_ENG_STORE(1, c10, 0, bias0); CNN_ENG_STORE(1, c11, 8, bias1);
    CNN_ENG_STORE(2, c20, 0, bias0); CNN_ENG_STORE(2, c21, 8, bias1);
    CNN_ENG_STORE(3, c30, 0, bias0); CNN_ENG_STORE(3, c31, 8, bias1);
    CNN_ENG_STORE(4, c40, 0, bias0); CNN_ENG_STORE(4, c41, 8, bias1);
    CNN_ENG_STORE(5, c50, 0, bias0); CNN_ENG_STORE(5, c51, 8, bias1);
}

/* One pixel x 16 channels (batch 1 affine layers and other single columns): the same sums
 * with four independent accumulator pairs, so the FMA latency does not serialise them. */
__attribute__((target("avx2,fma"))) static void cnn_eng_tile1_avx2(
    ptrdiff_t npos, const ptrdiff_t *off, ptrdiff_t c0, ptrdiff_t cn, const float *w,
    const float *const *b, float *const *o, int fw, int load, const float *bias, int relu) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0;
    __m256 a7 = a0;
    if (load) {
        CNN_ENG_LOAD(0, a0, 0);
        CNN_ENG_LOAD(0, a1, 8);
    }
    for (ptrdiff_t p = 0; p < npos; p++) {
        const float *b0 = b[0] + off[p] + c0;
        ptrdiff_t c = 0;
        for (; c + 4 <= cn; c += 4, w += 64) {
            __m256 v0 = _mm256_broadcast_ss(b0 + c), v1 = _mm256_broadcast_ss(b0 + c + 1);
            __m256 v2 = _mm256_broadcast_ss(b0 + c + 2), v3 = _mm256_broadcast_ss(b0 + c + 3);
            a0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(w), a0);
            a1 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(w + 8), a1);
            a2 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(w + 16), a2);
            a3 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(w + 24), a3);
            a4 = _mm256_fmadd_ps(v2, _mm256_loadu_ps(w + 32), a4);
            a5 = _mm256_fmadd_ps(v2, _mm256_loadu_ps(w + 40), a5);
            a6 = _mm256_fmadd_ps(v3, _mm256_loadu_ps(w + 48), a6);
            a7 = _mm256_fmadd_ps(v3, _mm256_loadu_ps(w + 56), a7);
        }
        for (; c < cn; c++, w += 16) {
            __m256 v = _mm256_broadcast_ss(b0 + c);
            a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w), a0);
            a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + 8), a1);
        }
    }
    __m256 lo = _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a4, a6));
    __m256 hi = _mm256_add_ps(_mm256_add_ps(a1, a3), _mm256_add_ps(a5, a7));
    __m256 bias0 = _mm256_setzero_ps(), bias1 = bias0;
    if (bias) {
        bias0 = _mm256_loadu_ps(bias);
        bias1 = _mm256_loadu_ps(bias + 8);
    }
    CNN_ENG_STORE(0, lo, 0, bias0); CNN_ENG_STORE(0, hi, 8, bias1);
}
#undef CNN_ENG_LOAD
#undef CNN_ENG_STORE

/* The 6 x 32 AVX-512 tile: two panels at once (w and w + wstep, the next panel's chunk), the
 * sums of two 6 x 16 tiles in 12 zmm accumulators, each broadcast feeding two FMAs of 16
 * lanes; fw (17 to 32) channels stored, the second panel's through a mask. Zen 4 runs a zmm
 * FMA as two halves, so the gain over AVX2 is not more FLOPs per cycle but half the loads and
 * loop work per FMA. */
__attribute__((target("avx512f"))) static void cnn_eng_tile6x32_avx512(
    ptrdiff_t npos, const ptrdiff_t *off, ptrdiff_t c0, ptrdiff_t cn, const float *w,
    ptrdiff_t wstep, const float *const *b, float *const *o, int fw, int load,
    const float *bias, int relu) {
    __mmask16 m1 = (__mmask16)(fw >= 32 ? 0xFFFFu : (1u << (fw - 16)) - 1u);
    __m512 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
#define CNN_ENG_LOAD2(r, lo, hi)                                                          \
    lo = _mm512_loadu_ps(o[r]);                                                           \
    hi = _mm512_maskz_loadu_ps(m1, o[r] + 16)
    if (load) {
        CNN_ENG_LOAD2(0, c00, c01); CNN_ENG_LOAD2(1, c10, c11); CNN_ENG_LOAD2(2, c20, c21);
        CNN_ENG_LOAD2(3, c30, c31); CNN_ENG_LOAD2(4, c40, c41); CNN_ENG_LOAD2(5, c50, c51);
    } else {
        c00 = c01 = c10 = c11 = c20 = c21 = _mm512_setzero_ps();
        c30 = c31 = c40 = c41 = c50 = c51 = _mm512_setzero_ps();
    }
#undef CNN_ENG_LOAD2
    const float *b0 = b[0] + c0, *b1 = b[1] + c0, *b2 = b[2] + c0;
    const float *b3 = b[3] + c0, *b4 = b[4] + c0, *b5 = b[5] + c0;
    for (ptrdiff_t p = 0; p < npos; p++) {
        ptrdiff_t d = off[p];
        for (ptrdiff_t c = d; c < d + cn; c++, w += 16) {
            __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + wstep), v;
#define CNN_ENG_ROW2(bi, lo, hi)                                                          \
    v = _mm512_set1_ps(bi[c]);                                                            \
    lo = _mm512_fmadd_ps(v, w0, lo);                                                      \
    hi = _mm512_fmadd_ps(v, w1, hi)
            CNN_ENG_ROW2(b0, c00, c01);
            CNN_ENG_ROW2(b1, c10, c11);
            CNN_ENG_ROW2(b2, c20, c21);
            CNN_ENG_ROW2(b3, c30, c31);
            CNN_ENG_ROW2(b4, c40, c41);
            CNN_ENG_ROW2(b5, c50, c51);
#undef CNN_ENG_ROW2
        }
    }
    __m512 bias0 = _mm512_setzero_ps(), bias1 = bias0, z = bias0;
    if (bias) { /* a pair's biases: whole panels, padded with zeros (cnnserve/engine) */
        bias0 = _mm512_loadu_ps(bias);
        bias1 = _mm512_loadu_ps(bias + 16);
    }
#define CNN_ENG_STORE2(r, lo, hi)                                                         \
    do {                                                                                  \
        lo = _mm512_add_ps(lo, bias0);                                                    \
        hi = _mm512_add_ps(hi, bias1);                                                    \
        if (relu) lo = _mm512_max_ps(z, lo), hi = _mm512_max_ps(z, hi);                   \
        _mm512_storeu_ps(o[r], lo);                                                       \
        _mm512_mask_storeu_ps(o[r] + 16, m1, hi);                                         \
    } while (0)
    CNN_ENG_STORE2(0, c00, c01); CNN_ENG_STORE2(1, c10, c11); CNN_ENG_STORE2(2, c20, c21);
    CNN_ENG_STORE2(3, c30, c31); CNN_ENG_STORE2(4, c40, c41); CNN_ENG_STORE2(5, c50, c51);
#undef CNN_ENG_STORE2
}

/* ROWCONV's tile: 16 consecutive output pixels of a row x 6 channels. img is the window's
 * top-left input value of the first pixel (one channel: the 16 pixels' values at a position
 * are 16 consecutive floats), w the block's filters [KH * KW][6]. Stores the first fb
 * channels of each pixel at o + i * F, bias added and ReLU applied. */
__attribute__((target("avx2,fma"))) static void cnn_eng_rowtile_avx2(
    const float *img, ptrdiff_t Wp, ptrdiff_t KH, ptrdiff_t KW, const float *w,
    const float *bias, int relu, float *o, ptrdiff_t F, int fb) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (ptrdiff_t i = 0; i < KH; i++) {
        const float *row = img + i * Wp;
        for (ptrdiff_t j = 0; j < KW; j++, w += CNN_ENG_RB) {
            __m256 x0 = _mm256_loadu_ps(row + j), x1 = _mm256_loadu_ps(row + j + 8);
            __m256 v = _mm256_broadcast_ss(w);
            a00 = _mm256_fmadd_ps(x0, v, a00);
            a01 = _mm256_fmadd_ps(x1, v, a01);
            v = _mm256_broadcast_ss(w + 1);
            a10 = _mm256_fmadd_ps(x0, v, a10);
            a11 = _mm256_fmadd_ps(x1, v, a11);
            v = _mm256_broadcast_ss(w + 2);
            a20 = _mm256_fmadd_ps(x0, v, a20);
            a21 = _mm256_fmadd_ps(x1, v, a21);
            v = _mm256_broadcast_ss(w + 3);
            a30 = _mm256_fmadd_ps(x0, v, a30);
            a31 = _mm256_fmadd_ps(x1, v, a31);
            v = _mm256_broadcast_ss(w + 4);
            a40 = _mm256_fmadd_ps(x0, v, a40);
            a41 = _mm256_fmadd_ps(x1, v, a41);
            v = _mm256_broadcast_ss(w + 5);
            a50 = _mm256_fmadd_ps(x0, v, a50);
            a51 = _mm256_fmadd_ps(x1, v, a51);
        }
    }
    if (fb == CNN_ENG_RB) { /* bias and ReLU in lanes, then 8 x 8 transposes (rows 6, 7 zero) */
        __m256 z = _mm256_setzero_ps();
#define CNN_ENG_RB_EPI(f, lo, hi)                                                         \
    do {                                                                                  \
        __m256 bv = _mm256_broadcast_ss(bias + (f));                                      \
        lo = _mm256_add_ps(lo, bv);                                                       \
        hi = _mm256_add_ps(hi, bv);                                                       \
        if (relu) lo = _mm256_max_ps(lo, z), hi = _mm256_max_ps(hi, z);                   \
    } while (0)
        CNN_ENG_RB_EPI(0, a00, a01);
        CNN_ENG_RB_EPI(1, a10, a11);
        CNN_ENG_RB_EPI(2, a20, a21);
        CNN_ENG_RB_EPI(3, a30, a31);
        CNN_ENG_RB_EPI(4, a40, a41);
        CNN_ENG_RB_EPI(5, a50, a51);
#undef CNN_ENG_RB_EPI
        for (int h = 0; h < 2; h++, o += 8 * F) {
            __m256 r0 = h ? a01 : a00, r1 = h ? a11 : a10, r2 = h ? a21 : a20;
            __m256 r3 = h ? a31 : a30, r4 = h ? a41 : a40, r5 = h ? a51 : a50;
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
            __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 s4 = _mm256_shuffle_ps(t4, z, 0x44), s5 = _mm256_shuffle_ps(t4, z, 0xEE);
            __m256 s6 = _mm256_shuffle_ps(t5, z, 0x44), s7 = _mm256_shuffle_ps(t5, z, 0xEE);
            __m256 px[8] = {
                _mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
                _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
                _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
                _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31),
            };
            for (int p = 0; p < 8; p++) { /* a pixel's 6 channels: 4 + 2 values */
                _mm_storeu_ps(o + p * F, _mm256_castps256_ps128(px[p]));
                _mm_storel_pi((__m64 *)(o + p * F + 4), _mm256_extractf128_ps(px[p], 1));
            }
        }
        return;
    }
    float t[CNN_ENG_RB][CNN_ENG_RX];
    _mm256_storeu_ps(t[0], a00); _mm256_storeu_ps(t[0] + 8, a01);
    _mm256_storeu_ps(t[1], a10); _mm256_storeu_ps(t[1] + 8, a11);
    _mm256_storeu_ps(t[2], a20); _mm256_storeu_ps(t[2] + 8, a21);
    _mm256_storeu_ps(t[3], a30); _mm256_storeu_ps(t[3] + 8, a31);
    _mm256_storeu_ps(t[4], a40); _mm256_storeu_ps(t[4] + 8, a41);
    _mm256_storeu_ps(t[5], a50); _mm256_storeu_ps(t[5] + 8, a51);
    for (int p = 0; p < CNN_ENG_RX; p++, o += F) {
        for (int f = 0; f < fb; f++) {
            float v = t[f][p] + bias[f];
            o[f] = (relu && v < 0) ? 0.0f : v;
        }
    }
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
