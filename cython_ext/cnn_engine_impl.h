/* The engine's ops for one dtype: included by cnn_engine.h with CNN_ENG_T (float or double),
 * CNN_ENG_S(name) (name_f or name_d) and CNN_ENG_FLOAT32 defined. */

#define T CNN_ENG_T
#define MR CNN_ENG_MR
#define NR CNN_ENG_NR
#define NB CNN_ENG_NB

/* Portable MR x NR tile: c[i][j] = sum_k a[k][i] * B[k][j], row k of B at b + k * NR, or at
 * b + off[k] (the direct path). */
static void CNN_ENG_S(cnn_eng_tile)(ptrdiff_t K, const T *a, const T *b, const ptrdiff_t *off,
                                    T *c) {
    T acc[MR][NR];
    memset(acc, 0, sizeof(acc));
    for (ptrdiff_t k = 0; k < K; k++) {
        const T *ak = a + k * MR, *bk = off ? b + off[k] : b + k * NR;
        for (int i = 0; i < MR; i++) {
            T v = ak[i];
            CNN_SIMD
            for (int j = 0; j < NR; j++) acc[i][j] += v * bk[j];
        }
    }
    memcpy(c, acc, sizeof(acc));
}

/* Packs filters (F, K) row-major into panels[panel][k][MR] (zero rows after F). */
static void CNN_ENG_S(cnn_eng_pack)(const T *w, ptrdiff_t F, ptrdiff_t K, T *packed) {
    ptrdiff_t panels = (F + MR - 1) / MR;
    for (ptrdiff_t p = 0; p < panels; p++) {
        T *dst = packed + p * K * MR;
        for (ptrdiff_t k = 0; k < K; k++) {
            for (int i = 0; i < MR; i++) {
                ptrdiff_t f = p * MR + i;
                dst[k * MR + i] = f < F ? w[f * K + k] : (T)0;
            }
        }
    }
}

/* Gathers columns [q0, q0 + NB) of the implicit im2col matrix into bp[tile][k][NR].
 *
 * A tile's columns are split into runs on one output row of one image; along a run the input
 * column advances by the stride, so each (c, i, jj) row of a run is a strided copy with zeros
 * only where the window hangs over the left or right edge (computed, not tested per value). */
static void CNN_ENG_S(cnn_eng_gather)(const long long *d, const T *x, ptrdiff_t Q, ptrdiff_t q0,
                                      T *bp, ptrdiff_t *obase, ptrdiff_t *direct) {
    ptrdiff_t C = d[E_C], H = d[E_H], W = d[E_W], HO = d[E_HO], WO = d[E_WO];
    ptrdiff_t KH = d[E_KH], KW = d[E_KW], s = d[E_STRIDE], pad = d[E_PAD], F = d[E_F];
    ptrdiff_t P = HO * WO, K = C * KH * KW;
    for (int t = 0; t < NB / NR; t++) {
        T *dst = bp + (ptrdiff_t)t * K * NR;
        ptrdiff_t qt = q0 + t * NR;
        for (int j = 0; j < NR; j++) {
            ptrdiff_t q = qt + j;
            obase[t * NR + j] = q < Q ? (q / P) * F * P + q % P : -1;
        }
        /* Direct: stride 1, the tile's NR columns on one output row, every window inside the
         * input. Row k of the tile is then NR consecutive input values: nothing to gather. */
        direct[t] = -1;
        if (s == 1 && qt + NR <= Q) {
            ptrdiff_t n = qt / P, p = qt % P, oh = p / WO, ow = p % WO;
            ptrdiff_t ih0 = oh - pad, iw0 = ow - pad;
            if (ow + NR <= WO && ih0 >= 0 && ih0 + KH <= H && iw0 >= 0 && iw0 + NR - 1 + KW <= W) {
                direct[t] = n * C * H * W + ih0 * W + iw0;
                continue;
            }
        }
        int j0 = 0;
        while (j0 < NR) {
            ptrdiff_t q = qt + j0;
            if (q >= Q) { /* columns past the end: zeros */
                for (ptrdiff_t k = 0; k < K; k++) {
                    for (int j = j0; j < NR; j++) dst[k * NR + j] = 0;
                }
                break;
            }
            ptrdiff_t n = q / P, p = q % P, oh = p / WO, ow = p % WO;
            int j1 = j0 + (int)(WO - ow); /* the run ends with the output row */
            if (j1 > NR) j1 = NR;
            if (qt + j1 > Q) j1 = (int)(Q - qt);
            ptrdiff_t len = j1 - j0, ih0 = oh * s - pad, iw0 = ow * s - pad;
            const T *xn = x + n * C * H * W;
            ptrdiff_t k = 0;
            for (ptrdiff_t c = 0; c < C; c++) {
                for (ptrdiff_t i = 0; i < KH; i++) {
                    ptrdiff_t ih = ih0 + i;
                    int inside = ih >= 0 && ih < H;
                    const T *xrow = inside ? xn + (c * H + ih) * W : xn;
                    for (ptrdiff_t jj = 0; jj < KW; jj++, k++) {
                        T *row = dst + k * NR + j0;
                        if (!inside) { /* a padding row */
                            for (ptrdiff_t r = 0; r < len; r++) row[r] = 0;
                            continue;
                        }
                        ptrdiff_t iw = iw0 + jj; /* input column of the run's first value */
                        ptrdiff_t lo = iw >= 0 ? 0 : (-iw + s - 1) / s;
                        ptrdiff_t hi = iw < W ? (W - 1 - iw) / s + 1 : 0;
                        if (hi > len) hi = len;
                        if (lo > hi) lo = hi;
                        ptrdiff_t r = 0;
                        for (; r < lo; r++) row[r] = 0;
                        if (s == 1) {
                            const T *src = xrow + iw;
                            for (; r < hi; r++) row[r] = src[r];
                        } else {
                            for (; r < hi; r++) row[r] = xrow[iw + r * s];
                        }
                        for (; r < len; r++) row[r] = 0;
                    }
                }
            }
            j0 = j1;
        }
    }
}

/* Bias, fused ReLU and the store of one MR x NR tile into NCHW. */
static inline void CNN_ENG_S(cnn_eng_store)(const T *tile, const T *bias, ptrdiff_t f0,
                                            ptrdiff_t F, ptrdiff_t P, const ptrdiff_t *obase,
                                            int relu, T *out, int first, int last) {
    int rows = F - f0 < MR ? (int)(F - f0) : MR;
    int contiguous = obase[0] >= 0 && obase[NR - 1] == obase[0] + NR - 1;
    if (!(first && last)) { /* one chunk of k of several: partial sums into out */
        for (int i = 0; i < rows; i++) {
            T b = last ? bias[f0 + i] : (T)0;
            const T *src = tile + i * NR;
            for (int j = 0; j < NR; j++) {
                if (obase[j] < 0) continue;
                T *o = out + obase[j] + (f0 + i) * P;
                T v = src[j] + b + (first ? (T)0 : *o);
                *o = (last && relu && v < 0) ? (T)0 : v;
            }
        }
        return;
    }
    for (int i = 0; i < rows; i++) {
        T b = bias[f0 + i];
        const T *src = tile + i * NR;
        if (contiguous) {
            T *dst = out + obase[0] + (f0 + i) * P;
            if (relu) {
                CNN_SIMD
                for (int j = 0; j < NR; j++) {
                    T v = src[j] + b;
                    dst[j] = v < 0 ? (T)0 : v;
                }
            } else {
                CNN_SIMD
                for (int j = 0; j < NR; j++) dst[j] = src[j] + b;
            }
        } else {
            for (int j = 0; j < NR; j++) {
                if (obase[j] < 0) continue;
                T v = src[j] + b;
                if (relu && v < 0) v = 0;
                out[obase[j] + (f0 + i) * P] = v;
            }
        }
    }
}

/* sum_k a[k] * b[k] */
CNN_CLONES static T CNN_ENG_S(cnn_eng_dot)(const T *a, const T *b, ptrdiff_t K) {
    T acc = 0;
    CNN_SIMD_SUM(acc)
    for (ptrdiff_t k = 0; k < K; k++) acc += a[k] * b[k];
    return acc;
}

/* A GEMM op whose window covers the whole input (an affine layer, or a converted one at its
 * training size): each image is one column, x + n * K, and out[n, f] = W[f] . x_n + b[f],
 * from the unpacked filters (F, K), threads splitting the output channels. */
static void CNN_ENG_S(cnn_eng_gemv)(const long long *d, const T *params, const T *x, T *out,
                                    ptrdiff_t N) {
    ptrdiff_t F = d[E_F], K = d[E_C] * d[E_KH] * d[E_KW];
    const T *w = params + d[E_V_OFS], *bias = params + d[E_A_OFS];
    int relu = (int)d[E_RELU];
    int threads = cnn_eng_threads(N * F * K);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t f = 0; f < F; f++) {
        for (ptrdiff_t n = 0; n < N; n++) {
            T v = CNN_ENG_S(cnn_eng_dot)(w + f * K, x + n * K, K) + bias[f];
            out[n * F + f] = (relu && v < 0) ? (T)0 : v;
        }
    }
}

static void CNN_ENG_S(cnn_eng_gemm)(const long long *d, const T *params, const T *x, T *out,
                                    ptrdiff_t N, T *scratch, ptrdiff_t scratch_per_thread) {
    ptrdiff_t F = d[E_F], P = d[E_HO] * d[E_WO], K = d[E_C] * d[E_KH] * d[E_KW];
    ptrdiff_t Q = N * P, blocks = (Q + NB - 1) / NB, panels = (F + MR - 1) / MR;
    if (d[E_V_OFS] >= 0 && (Q < CNN_ENG_GEMV_COLS || d[E_W_OFS] < 0)) {
        CNN_ENG_S(cnn_eng_gemv)(d, params, x, out, N);
        return;
    }
    const T *wp = params + d[E_W_OFS], *bias = params + d[E_A_OFS];
    int relu = (int)d[E_RELU];
    int threads = cnn_eng_threads(Q * F * K);
    ptrdiff_t fsplit;
    cnn_eng_split(blocks, panels, threads, &fsplit);
    ptrdiff_t items = blocks * fsplit;
    if (items < threads) threads = (int)items;
#if CNN_ENG_FLOAT32
    int avx2 = cnn_eng_uses_avx2();
#endif
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        T *bp = scratch + tid * scratch_per_thread;
        T tile[MR * NR];
        ptrdiff_t obase[NB], direct[NB / NR];
        ptrdiff_t *off = (ptrdiff_t *)(bp + K * NB); /* row k of a direct tile: + off[k] */
        for (ptrdiff_t c = 0, k = 0; c < d[E_C]; c++) {
            for (ptrdiff_t i = 0; i < d[E_KH]; i++) {
                for (ptrdiff_t jj = 0; jj < d[E_KW]; jj++, k++) off[k] = (c * d[E_H] + i) * d[E_W] + jj;
            }
        }
        ptrdiff_t last_block = -1;
#pragma omp for schedule(static)
        for (ptrdiff_t item = 0; item < items; item++) {
            ptrdiff_t blk = item / fsplit, part = item % fsplit;
            ptrdiff_t p0 = panels * part / fsplit, p1 = panels * (part + 1) / fsplit;
            if (blk != last_block) {
                CNN_ENG_S(cnn_eng_gather)(d, x, Q, blk * NB, bp, obase, direct);
                last_block = blk;
            }
            ptrdiff_t tiles = (Q - blk * NB + NR - 1) / NR;
            if (tiles > NB / NR) tiles = NB / NR;
            /* A tile's columns (K x NR) stay in L1 while every panel of filters streams by. */
            /* Chunks of KC values of k: a chunk of the tile's columns (KC x NR) stays in L1
             * while the panels' chunks stream by; partial sums go to out between chunks. */
            for (ptrdiff_t t = 0; t < tiles; t++) {
                int is_direct = direct[t] >= 0;
                for (ptrdiff_t k0 = 0; k0 < K; k0 += CNN_ENG_KC) {
                    ptrdiff_t kc = K - k0 < CNN_ENG_KC ? K - k0 : CNN_ENG_KC;
                    const T *b = is_direct ? x + direct[t] : bp + t * K * NR + k0 * NR;
                    const ptrdiff_t *o = is_direct ? off + k0 : NULL;
                    for (ptrdiff_t pn = p0; pn < p1; pn++) {
                        const T *a = wp + pn * K * MR + k0 * MR;
#if CNN_ENG_FLOAT32
                        if (avx2) {
                            cnn_eng_tile_avx2(kc, (const float *)a, (const float *)b, o,
                                              (float *)tile);
                        } else {
                            CNN_ENG_S(cnn_eng_tile)(kc, a, b, o, tile);
                        }
#else
                        CNN_ENG_S(cnn_eng_tile)(kc, a, b, o, tile);
#endif
                        CNN_ENG_S(cnn_eng_store)(tile, bias, pn * MR, F, P, obase + t * NR, relu,
                                                 out, k0 == 0, k0 + kc == K);
                    }
                }
            }
        }
    }
}

static void CNN_ENG_S(cnn_eng_pool)(const long long *d, const T *x, T *out, ptrdiff_t N) {
    ptrdiff_t C = d[E_C], H = d[E_H], W = d[E_W], HO = d[E_HO], WO = d[E_WO];
    ptrdiff_t KH = d[E_KH], KW = d[E_KW], s = d[E_STRIDE];
    int is_max = d[E_KIND] == CNN_ENG_MAXPOOL, relu = (int)d[E_RELU];
    ptrdiff_t planes = N * C;
    int threads = cnn_eng_threads(planes * HO * WO * KH * KW);
    T inv = (T)(1.0 / (double)(KH * KW));
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t pl = 0; pl < planes; pl++) {
        const T *src = x + pl * H * W;
        T *dst = out + pl * HO * WO;
        for (ptrdiff_t ho = 0; ho < HO; ho++) {
            for (ptrdiff_t wo = 0; wo < WO; wo++) {
                const T *win = src + ho * s * W + wo * s;
                T v;
                if (is_max) { /* branch-free max (random data mispredicts a branch half the
                               * time); a NaN, rare, is found on a second look */
                    v = win[0];
                    int nan = 0;
                    for (ptrdiff_t i = 0; i < KH; i++) {
                        for (ptrdiff_t j = 0; j < KW; j++) {
                            T u = win[i * W + j];
                            v = u > v ? u : v;
                            nan |= u != u;
                        }
                    }
                    if (nan) {
                        for (ptrdiff_t i = 0; i < KH * KW; i++) {
                            T u = win[(i / KW) * W + i % KW];
                            if (u != u) {
                                v = u;
                                break;
                            }
                        }
                    }
                } else {
                    T acc = 0;
                    for (ptrdiff_t i = 0; i < KH; i++) {
                        for (ptrdiff_t j = 0; j < KW; j++) acc += win[i * W + j];
                    }
                    v = acc * inv;
                }
                if (relu && v < 0) v = 0;
                dst[ho * WO + wo] = v;
            }
        }
    }
}

/* SCALE and RELU: per channel x * a[c] + b[c] (RELU: a = 1, b = 0 with no parameters). */
static void CNN_ENG_S(cnn_eng_scale)(const long long *d, const T *params, const T *x, T *out,
                                     ptrdiff_t N) {
    ptrdiff_t C = d[E_C], HW = d[E_H] * d[E_W], planes = N * C;
    int relu = (int)d[E_RELU], plain = d[E_KIND] == CNN_ENG_RELU;
    const T *a = params + d[E_A_OFS], *b = params + d[E_B_OFS];
    int threads = cnn_eng_threads(planes * HW);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t pl = 0; pl < planes; pl++) {
        ptrdiff_t c = pl % C;
        T sa = plain ? (T)1 : a[c], sb = plain ? (T)0 : b[c];
        const T *src = x + pl * HW;
        T *dst = out + pl * HW;
        CNN_SIMD
        for (ptrdiff_t i = 0; i < HW; i++) {
            T v = src[i] * sa + sb;
            dst[i] = (relu && v < 0) ? (T)0 : v;
        }
    }
}

/* CNORM: every (n, position) normalised over its C channels. */
static void CNN_ENG_S(cnn_eng_cnorm)(const long long *d, const T *params, double eps,
                                     const T *x, T *out, ptrdiff_t N) {
    ptrdiff_t C = d[E_C], HW = d[E_H] * d[E_W], rows = N * HW;
    int relu = (int)d[E_RELU];
    const T *g = params + d[E_A_OFS], *b = params + d[E_B_OFS];
    int threads = cnn_eng_threads(rows * C * 3);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t r = 0; r < rows; r++) {
        ptrdiff_t n = r / HW, p = r % HW;
        const T *src = x + n * C * HW + p;
        T *dst = out + n * C * HW + p;
        double sum = 0, sq = 0;
        for (ptrdiff_t c = 0; c < C; c++) sum += src[c * HW];
        double mean = sum / (double)C;
        for (ptrdiff_t c = 0; c < C; c++) {
            double dv = src[c * HW] - mean;
            sq += dv * dv;
        }
        double inv = 1.0 / sqrt(sq / (double)C + eps);
        for (ptrdiff_t c = 0; c < C; c++) {
            T v = (T)((src[c * HW] - mean) * inv) * g[c] + b[c];
            dst[c * HW] = (relu && v < 0) ? (T)0 : v;
        }
    }
}

/* GNORM: statistics per (n, group) over C / G channels and every position. */
static void CNN_ENG_S(cnn_eng_gnorm)(const long long *d, const T *params, double eps,
                                     const T *x, T *out, ptrdiff_t N) {
    ptrdiff_t C = d[E_C], HW = d[E_H] * d[E_W], G = d[E_GROUPS], CG = C / G;
    int relu = (int)d[E_RELU];
    const T *g = params + d[E_A_OFS], *b = params + d[E_B_OFS];
    ptrdiff_t units = N * G, count = CG * HW;
    int threads = cnn_eng_threads(units * count * 3);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t u = 0; u < units; u++) {
        const T *src = x + u * count;
        T *dst = out + u * count;
        double sum = 0, sq = 0;
        for (ptrdiff_t i = 0; i < count; i++) sum += src[i];
        double mean = sum / (double)count;
        for (ptrdiff_t i = 0; i < count; i++) {
            double dv = src[i] - mean;
            sq += dv * dv;
        }
        double inv = 1.0 / sqrt(sq / (double)count + eps);
        ptrdiff_t c0 = (u % G) * CG;
        for (ptrdiff_t c = 0; c < CG; c++) {
            T gc = g[c0 + c], bc = b[c0 + c];
            for (ptrdiff_t i = 0; i < HW; i++) {
                T v = (T)((src[c * HW + i] - mean) * inv) * gc + bc;
                dst[c * HW + i] = (relu && v < 0) ? (T)0 : v;
            }
        }
    }
}

/* The whole forward: ops in order over batches of at most max_batch images. buf0 and buf1
 * hold the intermediate activations (op k writes buffer out_buf[k]: 0 or 1; the last op writes
 * out), scratch the gathered columns (scratch_per_thread values a thread). */
static void CNN_ENG_S(cnn_eng_run)(const long long *desc, const double *eps, int nops,
                                   const T *params, const T *x, T *out, ptrdiff_t N,
                                   ptrdiff_t max_batch, ptrdiff_t in_size, ptrdiff_t out_size,
                                   T *buf0, T *buf1, T *scratch, ptrdiff_t scratch_per_thread) {
    for (ptrdiff_t n0 = 0; n0 < N; n0 += max_batch) {
        ptrdiff_t nb = N - n0 < max_batch ? N - n0 : max_batch;
        const T *src = x + n0 * in_size;
        for (int k = 0; k < nops; k++) {
            const long long *d = desc + (ptrdiff_t)k * CNN_ENG_FIELDS;
            T *dst = k == nops - 1 ? out + n0 * out_size : ((k & 1) ? buf1 : buf0);
            switch (d[E_KIND]) {
            case CNN_ENG_GEMM:
                CNN_ENG_S(cnn_eng_gemm)(d, params, src, dst, nb, scratch, scratch_per_thread);
                break;
            case CNN_ENG_MAXPOOL:
            case CNN_ENG_AVGPOOL:
                CNN_ENG_S(cnn_eng_pool)(d, src, dst, nb);
                break;
            case CNN_ENG_SCALE:
            case CNN_ENG_RELU:
                CNN_ENG_S(cnn_eng_scale)(d, params, src, dst, nb);
                break;
            case CNN_ENG_CNORM:
                CNN_ENG_S(cnn_eng_cnorm)(d, params, eps[k], src, dst, nb);
                break;
            case CNN_ENG_GNORM:
                CNN_ENG_S(cnn_eng_gnorm)(d, params, eps[k], src, dst, nb);
                break;
            }
            src = dst;
        }
    }
}

#undef T
#undef MR
#undef NR
#undef NB
