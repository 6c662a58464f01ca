/* The engine's ops for one dtype: included by cnn_engine.h with CNN_ENG_T (float or double),
 * CNN_ENG_S(name) (name_f or name_d) and CNN_ENG_FLOAT32 defined. Activations are NHWC (see
 * cnn_engine.h). */

#define T CNN_ENG_T
#define MR CNN_ENG_MR
#define NR CNN_ENG_NR
#define TB CNN_ENG_TB

/* Portable tile: the sums of the AVX2 tiles for m pixels and a panel of NR channels (the
 * first fw of them stored), in plain C. */
static void CNN_ENG_S(cnn_eng_tile)(int m, ptrdiff_t npos, const ptrdiff_t *off,
                                    ptrdiff_t c0, ptrdiff_t cn, const T *w, const T *const *b,
                                    T *const *o, int fw, int load, const T *bias, int relu) {
    T acc[MR][NR];
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < NR; j++) acc[i][j] = load && j < fw ? o[i][j] : (T)0;
    }
    for (ptrdiff_t p = 0; p < npos; p++) {
        ptrdiff_t d = off[p] + c0;
        for (ptrdiff_t c = 0; c < cn; c++, w += NR) {
            for (int i = 0; i < m; i++) {
                T v = b[i][d + c];
                CNN_SIMD
                for (int j = 0; j < NR; j++) acc[i][j] += v * w[j];
            }
        }
    }
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < fw; j++) {
            T v = acc[i][j] + (bias ? bias[j] : (T)0);
            o[i][j] = (relu && v < 0) ? (T)0 : v;
        }
    }
}

/* One tile of m pixels: the AVX2 code for float32 when the CPU has it (one pixel, or all the
 * tile's rows, a short tile's extra rows repeating its last pixel into rows nobody reads),
 * else the portable one. */
static inline void CNN_ENG_S(cnn_eng_tile_any)(int avx2, int m, ptrdiff_t npos,
                                               const ptrdiff_t *off, ptrdiff_t c0, ptrdiff_t cn,
                                               const T *w, const T *const *b, T *const *o,
                                               int fw, int load, const T *bias, int relu) {
#if CNN_ENG_FLOAT32 && CNN_ENG_X86
    if (avx2) {
        if (m == 1) {
            cnn_eng_tile1_avx2(npos, off, c0, cn, w, b, o, fw, load, bias, relu);
        } else {
            cnn_eng_tile6_avx2(npos, off, c0, cn, w, b, o, fw, load, bias, relu);
        }
        return;
    }
#endif
    (void)avx2;
    CNN_ENG_S(cnn_eng_tile)(m, npos, off, c0, cn, w, b, o, fw, load, bias, relu);
}

/* The tiles this dtype's convs run: the CPU's best under the cap (float64: portable). */
static inline int CNN_ENG_S(cnn_eng_tiles_isa)(void) {
#if CNN_ENG_FLOAT32
    return cnn_eng_isa();
#else
    return CNN_ENG_PORTABLE;
#endif
}

/* Values of k in a chunk at most: the AVX-512 tile reads two panels' chunks at once, so its
 * chunks are half as long (the same bytes in L1). */
static inline ptrdiff_t CNN_ENG_S(cnn_eng_kc)(int isa) {
    return isa == CNN_ENG_AVX512 ? CNN_ENG_KC / 2 : CNN_ENG_KC;
}

/* The calling thread's slot of a scratch buffer of slots of `slot` values (a thread's number
 * is below the slots: ops cap their threads at E_SLOTS). */
static inline T *CNN_ENG_S(cnn_eng_my_slot)(T *scratch, ptrdiff_t slot) {
#ifdef _OPENMP
    return scratch + omp_get_thread_num() * slot;
#else
    (void)slot;
    return scratch;
#endif
}

/* dst[j] = max(dst[j], u[j]) for j < n, a NaN winning (CNN_ENG_MAX): every max pool's
 * step, fused or not. */
static inline __attribute__((always_inline)) void CNN_ENG_S(cnn_eng_max_into)(
    T *restrict dst, const T *restrict u, ptrdiff_t n) {
    CNN_SIMD
    for (ptrdiff_t j = 0; j < n; j++) dst[j] = CNN_ENG_MAX(dst[j], u[j]);
}

/* Copies N images (C, H, W) into a zero-bordered NHWC buffer of Hp x Wp pixels, the image
 * at (pad, pad): from NHWC (nchw == 0) or NCHW (nchw == 1). */
static void CNN_ENG_S(cnn_eng_pad)(const long long *d, const T *x, T *dst, ptrdiff_t N,
                                   ptrdiff_t Hp, ptrdiff_t Wp, int nchw) {
    ptrdiff_t C = d[E_C], H = d[E_H], W = d[E_W], pad = d[E_PAD], rows = N * Hp;
    int threads = cnn_eng_threads(rows * Wp * C * 4);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t r = 0; r < rows; r++) {
        ptrdiff_t n = r / Hp, h = r % Hp - pad;
        T *row = dst + r * Wp * C;
        if (h < 0 || h >= H) {
            memset(row, 0, sizeof(T) * Wp * C);
            continue;
        }
        memset(row, 0, sizeof(T) * pad * C);
        memset(row + (pad + W) * C, 0, sizeof(T) * (Wp - pad - W) * C);
        T *in = row + pad * C;
        if (!nchw) {
            memcpy(in, x + (n * H + h) * W * C, sizeof(T) * W * C);
        } else {
            const T *src = x + n * C * H * W + h * W;
            for (ptrdiff_t w = 0; w < W; w++) {
                for (ptrdiff_t c = 0; c < C; c++) in[w * C + c] = src[c * H * W + w];
            }
        }
    }
}

/* The zero border of opad pixels (the next conv's padding) around N images of Ho x Wo
 * pixels of F channels, written by a conv (E_OPAD). */
static void CNN_ENG_S(cnn_eng_border)(T *out, ptrdiff_t N, ptrdiff_t F, ptrdiff_t Ho,
                                      ptrdiff_t Wo, ptrdiff_t opad) {
    if (!opad) return;
    ptrdiff_t Ht = Ho + 2 * opad, Wt = Wo + 2 * opad;
    for (ptrdiff_t n = 0; n < N; n++) {
        T *img = out + n * Ht * Wt * F;
        memset(img, 0, sizeof(T) * opad * Wt * F);
        memset(img + (opad + Ho) * Wt * F, 0, sizeof(T) * opad * Wt * F);
        for (ptrdiff_t h = opad; h < opad + Ho; h++) {
            memset(img + h * Wt * F, 0, sizeof(T) * opad * F);
            memset(img + (h * Wt + opad + Wo) * F, 0, sizeof(T) * opad * F);
        }
    }
}

/* A CONV op's constants, shared by its ranges of tiles. */
typedef struct {
    const T *in, *wp, *bias;
    const ptrdiff_t *off;
    ptrdiff_t C, F, HO, WO, s, Hp, Wp, npos, K, P, per, cstep;
    int relu, isa, avx2;
} CNN_ENG_S(cnn_eng_conv_t);

/* Tiles t0 .. t0 + nt - 1 of the pixels qa .. qend - 1 (tile t: pixels qa + t * MR on, at
 * most MR of them), panels p0 .. p1 - 1; pixel q = (n, oh, ow)'s channels go to
 * obase + (q - qoff) * F, or with a border of opad pixels (the next conv's padding) to
 * obase + ((n * (HO + 2 opad) + oh + opad) * (WO + 2 opad) + ow + opad) * F. */
static void CNN_ENG_S(cnn_eng_conv_tiles)(const CNN_ENG_S(cnn_eng_conv_t) *c, ptrdiff_t qa,
                                          ptrdiff_t qend, ptrdiff_t t0, ptrdiff_t nt,
                                          ptrdiff_t p0, ptrdiff_t p1, T *obase, ptrdiff_t qoff,
                                          ptrdiff_t opad) {
    ptrdiff_t C = c->C, F = c->F, HO = c->HO, WO = c->WO, s = c->s, Hp = c->Hp, Wp = c->Wp;
    ptrdiff_t K = c->K, P = c->P, npos = c->npos, per = c->per, cstep = c->cstep;
    const T *in = c->in, *wp = c->wp, *bias = c->bias;
    const ptrdiff_t *off = c->off;
    int relu = c->relu, isa = c->isa, avx2 = c->avx2;
    const T *base[CNN_ENG_TB_WIDE][MR];
    T *o[CNN_ENG_TB_WIDE][MR];
    T *px[CNN_ENG_TB_WIDE][MR];       /* each pixel's output channels */
    int rows[CNN_ENG_TB_WIDE];        /* the tile's number of pixels */
    T spare[MR][2 * NR];              /* rows nobody reads (as wide as a pair of panels) */
    (void)isa;
    /* the pixels' windows, walking (n, oh, ow) from the first tile's first pixel (no division
     * per pixel: with a short window they would cost more than the tile) */
    ptrdiff_t q = qa + t0 * MR, n = q / P, oh = (q % P) / WO, ow = q % WO;
    ptrdiff_t Wt = WO + 2 * opad; /* the output's row, its border included */
    T *dst = opad ? obase + ((n * (HO + 2 * opad) + oh + opad) * Wt + ow + opad) * F
                  : obase + (q - qoff) * F;
    for (ptrdiff_t t = 0; t < nt; t++) {
        ptrdiff_t q0 = qa + (t0 + t) * MR, m = qend - q0 < MR ? qend - q0 : MR;
        rows[t] = (int)m;
        for (ptrdiff_t i = 0; i < m; i++, dst += F) {
            base[t][i] = in + ((n * Hp + oh * s) * Wp + ow * s) * C;
            px[t][i] = dst;
            if (++ow == WO) { /* past the border: the right one and the next row's left */
                ow = 0;
                dst += 2 * opad * F;
                if (++oh == HO) oh = 0, n++, dst += 2 * opad * Wt * F;
            }
        }
        for (ptrdiff_t i = m; i < MR; i++) base[t][i] = base[t][m - 1];
    }
    if (c->npos == 1) {
        /* a 1x1 conv reads each pixel once, often from memory (a large map), and its tiles'
         * six short streams outrun the hardware prefetcher: the next range's input (its
         * pixels follow this one's) asked for while this one runs. 1x1 128 -> 16 over
         * 510 x 510 on one core: 41 -> 55 GFLOP/s (about 100 when the map is in cache) */
        const char *lo = (const char *)(base[0][0] + off[0]);
        const char *hi = (const char *)(base[nt - 1][MR - 1] + off[0] + C);
        if (hi - lo < (1 << 16)) {
            for (const char *a = hi; a < hi + (hi - lo); a += 64) __builtin_prefetch(a);
        }
    }
    /* panels one at a time, or two (the AVX-512 tile) while the range has two left */
    for (ptrdiff_t pn = p0, step; pn < p1; pn += step) {
        int pair = isa == CNN_ENG_AVX512 && pn + 1 < p1;
        step = pair ? 2 : 1;
        ptrdiff_t f0 = pn * NR, width = step * NR;
        int fw = F - f0 < width ? (int)(F - f0) : (int)width;
        for (ptrdiff_t t = 0; t < nt; t++) {
            for (int i = 0; i < MR; i++) {
                o[t][i] = i < rows[t] ? px[t][i] + f0 : spare[i];
            }
        }
        const T *wpanel = wp + pn * K * NR;
        for (ptrdiff_t pos = 0; pos < npos; pos += per) {
            ptrdiff_t np = npos - pos < per ? npos - pos : per;
            for (ptrdiff_t c0 = 0; c0 < C; c0 += cstep) {
                ptrdiff_t cn = C - c0 < cstep ? C - c0 : cstep;
                int load = pos > 0 || c0 > 0, last = pos + np == npos && c0 + cn == C;
                const T *w = wpanel + (pos * C + c0) * NR;
                const T *bs = last ? bias + f0 : NULL;
                for (ptrdiff_t t = 0; t < nt; t++) {
#if CNN_ENG_FLOAT32 && CNN_ENG_X86
                    if (pair && rows[t] > 1) {
                        cnn_eng_tile6x32_avx512(np, off + pos, c0, cn, w, K * NR, base[t], o[t],
                                                fw, load, bs, last && relu);
                        continue;
                    }
#endif
                    CNN_ENG_S(cnn_eng_tile_any)(avx2, rows[t], np, off + pos, c0, cn, w, base[t],
                                                o[t], fw < NR ? fw : NR, load, bs,
                                                last && relu);
                    if (pair) { /* a lone pixel: the second panel on its own */
                        T *o2[MR];
                        for (int i = 0; i < MR; i++) o2[i] = o[t][i] + NR;
                        CNN_ENG_S(cnn_eng_tile_any)(avx2, rows[t], np, off + pos, c0, cn,
                                                    w + K * NR, base[t], o2, fw - NR, load,
                                                    bs ? bs + NR : NULL, last && relu);
                    }
                }
            }
        }
    }
}

/* CONV: see cnn_engine.h. x is the op's input as it is; padded the scratch for its copy;
 * scratch (a fused max pool) E_SLOTS slots of E_GROUPS pool rows of conv output each. */
static void CNN_ENG_S(cnn_eng_conv)(const long long *d, const T *params, const long long *offs,
                                    const T *x, T *out, ptrdiff_t N, T *padded, T *scratch) {
    ptrdiff_t pool = d[E_POOL], C = d[E_C], F = d[E_F], s = d[E_STRIDE];
    ptrdiff_t HO = pool ? d[E_HO] * pool : d[E_HO], WO = pool ? d[E_WO] * pool : d[E_WO];
    ptrdiff_t Hp = d[E_H] + 2 * d[E_PAD], Wp = d[E_W] + 2 * d[E_PAD];
    ptrdiff_t npos = d[E_KH] * d[E_KW], K = npos * C, P = HO * WO, Q = N * P;
    ptrdiff_t panels = (F + NR - 1) / NR, tiles = (Q + MR - 1) / MR;
    ptrdiff_t tb = (ptrdiff_t)sizeof(T) * K * NR * panels > CNN_ENG_WIDE_BYTES ? CNN_ENG_TB_WIDE
                                                                              : TB;
    ptrdiff_t blocks = (tiles + tb - 1) / tb;
    const T *in = x;
    if (d[E_COPY]) {
        CNN_ENG_S(cnn_eng_pad)(d, x, padded, N, Hp, Wp, d[E_COPY] == 2);
        in = padded;
    }
    ptrdiff_t opad = d[E_OPAD];
    CNN_ENG_S(cnn_eng_border)(out, N, F, d[E_HO], d[E_WO], opad);
    CNN_ENG_S(cnn_eng_conv_t) c;
    c.in = in;
    c.wp = params + d[E_W_OFS];
    c.bias = params + d[E_A_OFS];
    c.off = (const ptrdiff_t *)(offs + d[E_OFF_OFS]);
    c.C = C, c.F = F, c.HO = HO, c.WO = WO, c.s = s, c.Hp = Hp, c.Wp = Wp;
    c.npos = npos, c.K = K, c.P = P, c.relu = (int)d[E_RELU];
    c.isa = CNN_ENG_S(cnn_eng_tiles_isa)();
    c.avx2 = c.isa >= CNN_ENG_AVX2;
    /* chunks of k of at most kc values, as even as whole positions allow (C < kc), or one
     * position's channels in even parts */
    ptrdiff_t kc = CNN_ENG_S(cnn_eng_kc)(c.isa);
    c.per = npos, c.cstep = C;
    if (K > kc) {
        if (C >= kc) {
            c.per = 1;
            ptrdiff_t parts = (C + kc - 1) / kc;
            c.cstep = (C + parts - 1) / parts;
        } else {
            ptrdiff_t parts = (npos + kc / C - 1) / (kc / C);
            c.per = (npos + parts - 1) / parts;
        }
    }
    int threads = cnn_eng_threads(Q * F * K);
    if (pool) {
        /* a max pool of pool x pool at stride pool fused: each item a few pool rows, their
         * pool x WO-pixel rows of conv output computed into the thread's slot (in cache),
         * then pooled into out: the conv's output never goes through memory */
        ptrdiff_t HOp = d[E_HO], WOp = d[E_WO], prows = N * HOp, rowpx = pool * WO;
        /* pool rows per item: E_GROUPS (enough for a block of tiles), fewer when that
         * leaves a thread idle; each thread's slot holds E_GROUPS rows */
        ptrdiff_t g = d[E_GROUPS];
        if (prows < g * 2 * threads) g = prows / (2 * threads) > 1 ? prows / (2 * threads) : 1;
        ptrdiff_t items = (prows + g - 1) / g, slot = (d[E_GROUPS] * rowpx * F + 15) / 16 * 16;
        if (items < threads) threads = (int)items;
        if (threads > d[E_SLOTS]) threads = (int)d[E_SLOTS];
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            T *mine = CNN_ENG_S(cnn_eng_my_slot)(scratch, slot);
#pragma omp for schedule(static)
            for (ptrdiff_t item = 0; item < items; item++) {
                /* pool rows r0 .. r1 - 1 (of all the images, in order): conv rows r0 * pool
                 * on, the pixels qa .. qb - 1 */
                ptrdiff_t r0 = item * g, r1 = r0 + g < prows ? r0 + g : prows;
                ptrdiff_t qa = r0 * rowpx, qb = r1 * rowpx, ptiles = (qb - qa + MR - 1) / MR;
                for (ptrdiff_t t0 = 0; t0 < ptiles; t0 += tb) {
                    ptrdiff_t nt = ptiles - t0 < tb ? ptiles - t0 : tb;
                    CNN_ENG_S(cnn_eng_conv_tiles)(&c, qa, qb, t0, nt, 0, panels, mine, qa, 0);
                }
                for (ptrdiff_t r = r0; r < r1; r++) {
                    const T *row = mine + (r - r0) * rowpx * F;
                    ptrdiff_t rn = r / HOp, rh = r % HOp;
                    T *dst = out + ((rn * (HOp + 2 * opad) + rh + opad) * (WOp + 2 * opad) + opad) * F;
                    for (ptrdiff_t wp = 0; wp < WOp; wp++, dst += F) {
                        const T *src = row + wp * pool * F;
                        memcpy(dst, src, sizeof(T) * F);
                        for (ptrdiff_t i = 0; i < pool; i++) {
                            for (ptrdiff_t j = i == 0; j < pool; j++) {
                                CNN_ENG_S(cnn_eng_max_into)(dst, src + (i * WO + j) * F, F);
                            }
                        }
                    }
                }
            }
        }
        return;
    }
    ptrdiff_t fsplit = cnn_eng_split(blocks, panels, threads);
    ptrdiff_t items = blocks * fsplit;
    if (items < threads) threads = (int)items;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t item = 0; item < items; item++) {
        ptrdiff_t blk = item / fsplit, part = item % fsplit;
        ptrdiff_t p0 = panels * part / fsplit, p1 = panels * (part + 1) / fsplit;
        ptrdiff_t t0 = blk * tb, nt = t0 + tb < tiles ? tb : tiles - t0;
        CNN_ENG_S(cnn_eng_conv_tiles)(&c, 0, Q, t0, nt, p0, p1, out, 0, opad);
    }
}

/* WINO: a 3x3 stride-1 conv as Winograd F(2x2, 3x3): each 2x2 block of outputs from a 4x4
 * block of input, V = B^T d B per channel, then for each of the 16 points xi a product
 * M[xi] = V[xi] U[xi] (tiles x C by C x F, the filters transformed at compile time,
 * U = G g G^T, and packed as the direct tiles read them), then Y = A^T M A, bias and ReLU:
 * 16 C F multiplications for 4 outputs instead of 36 C F. Each thread takes whole bands of
 * tiles and runs the three steps on them in its own slot (V and M of a band, at most E_GROUPS
 * tiles, in cache), so no thread waits for another. A 2 x 2 max pool at stride 2 after it
 * (E_POOL) is a max over each block of outputs. The input is read as it is when it already
 * has the zero border and whole 4 x 4 blocks (E_COPY 0), else copied padded. */
typedef struct {
    const T *in, *U, *bias;
    T *out;
    ptrdiff_t C, F, Fp, panels, th, tw, Hp, Wp, cstep, pool, HOy, WOy, opad;
    int relu, isa, avx2;
} CNN_ENG_S(cnn_eng_wino_t);

/* V = B^T d B for the band's tiles ta .. ta + nt - 1 (tile t = (n, ty, tx)): point xi of
 * tile t at V + xi * vs + (t - ta) * C. */
static void CNN_ENG_S(cnn_eng_wino_in)(const CNN_ENG_S(cnn_eng_wino_t) *w, ptrdiff_t ta,
                                       ptrdiff_t nt, T *V, ptrdiff_t vs) {
    ptrdiff_t C = w->C, th = w->th, tw = w->tw, Hp = w->Hp, Wp = w->Wp;
    for (ptrdiff_t t = 0; t < nt; t++) {
        ptrdiff_t tt = ta + t, n = tt / (th * tw), ty = (tt / tw) % th, tx = tt % tw;
        const T *r0 = w->in + ((n * Hp + 2 * ty) * Wp + 2 * tx) * C;
        const T *r1 = r0 + Wp * C, *r2 = r1 + Wp * C, *r3 = r2 + Wp * C;
        T *v = V + t * C;
        /* named values, not arrays: the loop over channels vectorises */
#define CNN_ENG_BT_COL(j)                                                                 \
    T u0##j = r0[j * C + c] - r2[j * C + c], u1##j = r1[j * C + c] + r2[j * C + c];       \
    T u2##j = r2[j * C + c] - r1[j * C + c], u3##j = r1[j * C + c] - r3[j * C + c]
#define CNN_ENG_BT_ROW(i)                                                                 \
    v[(i * 4 + 0) * vs + c] = u##i##0 - u##i##2;                                          \
    v[(i * 4 + 1) * vs + c] = u##i##1 + u##i##2;                                          \
    v[(i * 4 + 2) * vs + c] = u##i##2 - u##i##1;                                          \
    v[(i * 4 + 3) * vs + c] = u##i##1 - u##i##3
        CNN_SIMD
        for (ptrdiff_t c = 0; c < C; c++) {
            CNN_ENG_BT_COL(0);
            CNN_ENG_BT_COL(1);
            CNN_ENG_BT_COL(2);
            CNN_ENG_BT_COL(3);
            CNN_ENG_BT_ROW(0);
            CNN_ENG_BT_ROW(1);
            CNN_ENG_BT_ROW(2);
            CNN_ENG_BT_ROW(3);
        }
#undef CNN_ENG_BT_COL
#undef CNN_ENG_BT_ROW
    }
}

/* M[xi] = V[xi] U[xi] for the band's nt tiles, all Fp columns (U's padding columns are
 * zero): the direct conv's tiles with one position, MR tiles' rows at a time, pairs of
 * panels on the AVX-512 path. */
static void CNN_ENG_S(cnn_eng_wino_mul)(const CNN_ENG_S(cnn_eng_wino_t) *w, ptrdiff_t nt,
                                        const T *V, ptrdiff_t vs, T *M, ptrdiff_t ms) {
    static const ptrdiff_t zero_off[1] = {0};
    ptrdiff_t C = w->C, Fp = w->Fp, panels = w->panels, cstep = w->cstep;
    ptrdiff_t groups = (nt + MR - 1) / MR;
    T spare[MR][2 * NR]; /* rows nobody reads */
    for (ptrdiff_t xi = 0; xi < 16; xi++) {
        const T *Vx = V + xi * vs, *Ux = w->U + xi * panels * C * NR;
        T *Mx = M + xi * ms;
        for (ptrdiff_t pn = 0, step; pn < panels; pn += step) {
            int pair = w->isa == CNN_ENG_AVX512 && pn + 1 < panels;
            step = pair ? 2 : 1;
            const T *wpanel = Ux + pn * C * NR;
            for (ptrdiff_t c0 = 0; c0 < C; c0 += cstep) {
                ptrdiff_t cn = C - c0 < cstep ? C - c0 : cstep;
                int load = c0 > 0;
                for (ptrdiff_t g = 0; g < groups; g++) {
                    ptrdiff_t q0 = g * MR;
                    int rows = nt - q0 < MR ? (int)(nt - q0) : MR;
                    const T *b[MR];
                    T *o[MR];
                    for (int i = 0; i < MR; i++) {
                        b[i] = Vx + (q0 + (i < rows ? i : rows - 1)) * C;
                        o[i] = i < rows ? Mx + (q0 + i) * Fp + pn * NR : spare[i];
                    }
#if CNN_ENG_FLOAT32 && CNN_ENG_X86
                    if (pair && rows > 1) {
                        cnn_eng_tile6x32_avx512(1, zero_off, c0, cn, wpanel + c0 * NR, C * NR,
                                                b, o, 2 * NR, load, NULL, 0);
                        continue;
                    }
#endif
                    CNN_ENG_S(cnn_eng_tile_any)(w->avx2, rows, 1, zero_off, c0, cn,
                                                wpanel + c0 * NR, b, o, NR, load, NULL, 0);
                    if (pair) { /* a lone tile: the second panel on its own */
                        for (int i = 0; i < MR; i++) o[i] += NR;
                        CNN_ENG_S(cnn_eng_tile_any)(w->avx2, rows, 1, zero_off, c0, cn,
                                                    wpanel + (C + c0) * NR, b, o, NR, load,
                                                    NULL, 0);
                    }
                }
            }
        }
    }
}

/* Y = A^T M A for the band's tiles ta .. ta + nt - 1, bias and ReLU, into the output (with
 * its border of opad pixels); with a fused pool, the max of each 2 x 2 block instead (a NaN
 * winning: the pool's own rule). */
static void CNN_ENG_S(cnn_eng_wino_out)(const CNN_ENG_S(cnn_eng_wino_t) *w, ptrdiff_t ta,
                                        ptrdiff_t nt, const T *M, ptrdiff_t ms) {
    ptrdiff_t F = w->F, Fp = w->Fp, th = w->th, tw = w->tw, HOy = w->HOy, WOy = w->WOy;
    ptrdiff_t opad = w->opad, Wt = WOy + 2 * opad;
    const T *bias = w->bias;
    int relu = w->relu;
    for (ptrdiff_t t = 0; t < nt; t++) {
        ptrdiff_t tt = ta + t, n = tt / (th * tw), ty = (tt / tw) % th, tx = tt % tw;
        const T *m = M + t * Fp;
        ptrdiff_t oy = w->pool ? ty : 2 * ty, ox = w->pool ? tx : 2 * tx;
        int h2 = !w->pool && oy + 1 < HOy, w2 = !w->pool && ox + 1 < WOy;
        T *dst = w->out + ((n * (HOy + 2 * opad) + oy + opad) * Wt + ox + opad) * F;
/* the block's four outputs y00 .. y11 of channel f: A^T M A, bias, ReLU */
#define CNN_ENG_AT_COL(j)                                                                 \
    T m0##j = m[j * ms + f], m1##j = m[(4 + j) * ms + f];                                 \
    T m2##j = m[(8 + j) * ms + f], m3##j = m[(12 + j) * ms + f];                          \
    T a0##j = m0##j + m1##j + m2##j, a1##j = m1##j - m2##j - m3##j
#define CNN_ENG_AT_OUT(i, name0, name1)                                                   \
    T name0 = a##i##0 + a##i##1 + a##i##2 + bias[f];                                      \
    T name1 = a##i##1 - a##i##2 - a##i##3 + bias[f];                                      \
    if (relu) {                                                                           \
        name0 = name0 < 0 ? (T)0 : name0;                                                 \
        name1 = name1 < 0 ? (T)0 : name1;                                                 \
    }
#define CNN_ENG_AT_BLOCK                                                                  \
    CNN_ENG_AT_COL(0);                                                                    \
    CNN_ENG_AT_COL(1);                                                                    \
    CNN_ENG_AT_COL(2);                                                                    \
    CNN_ENG_AT_COL(3);                                                                    \
    CNN_ENG_AT_OUT(0, y00, y01);                                                          \
    CNN_ENG_AT_OUT(1, y10, y11)
        if (w->pool) {
            CNN_SIMD
            for (ptrdiff_t f = 0; f < F; f++) {
                CNN_ENG_AT_BLOCK;
                dst[f] = CNN_ENG_MAX(CNN_ENG_MAX(y00, y01), CNN_ENG_MAX(y10, y11));
            }
        } else if (h2 && w2) { /* a whole block: no tests in the loop, which then vectorises */
            CNN_SIMD
            for (ptrdiff_t f = 0; f < F; f++) {
                CNN_ENG_AT_BLOCK;
                dst[f] = y00;
                dst[F + f] = y01;
                dst[Wt * F + f] = y10;
                dst[(Wt + 1) * F + f] = y11;
            }
        } else { /* the last row or column of an odd output: the block's other half dropped */
            for (ptrdiff_t f = 0; f < F; f++) {
                CNN_ENG_AT_BLOCK;
                dst[f] = y00;
                if (w2) dst[F + f] = y01;
                if (h2) dst[Wt * F + f] = y10;
                (void)y11;
            }
        }
#undef CNN_ENG_AT_COL
#undef CNN_ENG_AT_OUT
#undef CNN_ENG_AT_BLOCK
    }
}

/* WINO (see above): x the op's input, padded the scratch for its padded copy, wino the
 * threads' slots (E_SLOTS of them, each 16 x (E_GROUPS x (C + Fp) + 2 SKEW) values: the plan
 * sizes it with the same formula). */
static void CNN_ENG_S(cnn_eng_wino)(const long long *d, const T *params, const T *x, T *out,
                                    ptrdiff_t N, T *padded, T *wino) {
    CNN_ENG_S(cnn_eng_wino_t) w;
    ptrdiff_t C = d[E_C], F = d[E_F], pool = d[E_POOL];
    /* the conv's rows and columns computed: all of them, or those the pool reads (a 2 x 2
     * pool: a block of outputs each) */
    ptrdiff_t HO = pool ? pool * d[E_HO] : d[E_HO], WO = pool ? pool * d[E_WO] : d[E_WO];
    ptrdiff_t th = (HO + 1) / 2, tw = (WO + 1) / 2, tiles = N * th * tw;
    ptrdiff_t Hp = d[E_H] + 2 * d[E_PAD], Wp = d[E_W] + 2 * d[E_PAD];
    if (Hp < 2 * th + 2) Hp = 2 * th + 2; /* a copy then, with whole blocks (the plan sizes
                                           * `padded` and decides E_COPY by the same rule) */
    if (Wp < 2 * tw + 2) Wp = 2 * tw + 2;
    w.in = x;
    if (d[E_COPY]) {
        CNN_ENG_S(cnn_eng_pad)(d, x, padded, N, Hp, Wp, d[E_COPY] == 2);
        w.in = padded;
    }
    w.U = params + d[E_W_OFS], w.bias = params + d[E_A_OFS], w.out = out;
    w.C = C, w.F = F, w.panels = (F + NR - 1) / NR, w.Fp = w.panels * NR;
    w.th = th, w.tw = tw, w.Hp = Hp, w.Wp = Wp, w.pool = pool;
    w.HOy = d[E_HO], w.WOy = d[E_WO], w.opad = d[E_OPAD], w.relu = (int)d[E_RELU];
    CNN_ENG_S(cnn_eng_border)(out, N, F, w.HOy, w.WOy, w.opad);
    w.isa = CNN_ENG_S(cnn_eng_tiles_isa)();
    w.avx2 = w.isa >= CNN_ENG_AVX2;
    ptrdiff_t kc = CNN_ENG_S(cnn_eng_kc)(w.isa);
    ptrdiff_t parts = (C + kc - 1) / kc;
    w.cstep = (C + parts - 1) / parts;
    /* bands of at most E_GROUPS tiles, as many as a multiple of the threads (each thread the
     * same share), a thread at most per MR tiles */
    ptrdiff_t band = d[E_GROUPS], slots = d[E_SLOTS];
    int threads = cnn_eng_threads(tiles * 16 * C * F);
    if (threads > slots) threads = (int)slots;
    if (threads > (tiles + MR - 1) / MR) threads = (int)((tiles + MR - 1) / MR);
    if (threads < 1) threads = 1;
    ptrdiff_t bands = (tiles + band - 1) / band;
    bands = (bands + threads - 1) / threads * threads;
    ptrdiff_t bt = (tiles + bands - 1) / bands;
    bands = (tiles + bt - 1) / bt;
    ptrdiff_t vmax = band * C + CNN_ENG_WINO_SKEW, mmax = band * w.Fp + CNN_ENG_WINO_SKEW;
    ptrdiff_t slot = 16 * (vmax + mmax);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        T *V = CNN_ENG_S(cnn_eng_my_slot)(wino, slot), *M = V + 16 * vmax;
#pragma omp for schedule(static)
        for (ptrdiff_t b = 0; b < bands; b++) {
            ptrdiff_t ta = b * bt, nt = tiles - ta < bt ? tiles - ta : bt;
            /* one point xi's tiles to the next: SKEW values more than they take, since a
             * power of two apart the 16 streams would fall in the same cache sets */
            ptrdiff_t vs = nt * C + CNN_ENG_WINO_SKEW, ms = nt * w.Fp + CNN_ENG_WINO_SKEW;
            CNN_ENG_S(cnn_eng_wino_in)(&w, ta, nt, V, vs);
            CNN_ENG_S(cnn_eng_wino_mul)(&w, nt, V, vs, M, ms);
            CNN_ENG_S(cnn_eng_wino_out)(&w, ta, nt, M, ms);
        }
    }
}

/* ROWCONV's portable tile: the sums of cnn_eng_rowtile_avx2 for the first m pixels. */
static void CNN_ENG_S(cnn_eng_rowtile)(const T *img, ptrdiff_t Wp, ptrdiff_t KH, ptrdiff_t KW,
                                       const T *w, const T *bias, int relu, T *o, ptrdiff_t F,
                                       int fb, int m) {
    T acc[CNN_ENG_RB][CNN_ENG_RX] = {{0}};
    for (ptrdiff_t i = 0; i < KH; i++) {
        for (ptrdiff_t j = 0; j < KW; j++, w += CNN_ENG_RB) {
            const T *x = img + i * Wp + j;
            for (int f = 0; f < CNN_ENG_RB; f++) {
                T wf = w[f];
                CNN_SIMD
                for (int p = 0; p < m; p++) acc[f][p] += x[p] * wf;
            }
        }
    }
    for (int p = 0; p < m; p++, o += F) {
        for (int f = 0; f < fb; f++) {
            T v = acc[f][p] + bias[f];
            o[f] = (relu && v < 0) ? (T)0 : v;
        }
    }
}

/* ROWCONV: a conv of one input channel at stride 1 (a first layer on grey images), vectorised
 * along output rows instead of channels: at each window position, 16 output pixels' inputs
 * are 16 consecutive values, multiplied by 6 channels' filter values (packed at compile time
 * as [F / 6 blocks][KH * KW][6]). The channels-in-lanes tiles of CONV would broadcast one
 * value per pixel and position, and leave lanes idle when F is small (LeNet's 6 filters). */
static void CNN_ENG_S(cnn_eng_rowconv)(const long long *d, const T *params, const T *x, T *out,
                                       ptrdiff_t N, T *padded) {
    ptrdiff_t F = d[E_F], HO = d[E_HO], WO = d[E_WO], KH = d[E_KH], KW = d[E_KW];
    ptrdiff_t Hp = d[E_H] + 2 * d[E_PAD], Wp = d[E_W] + 2 * d[E_PAD], rows = N * HO;
    ptrdiff_t blocks = (F + CNN_ENG_RB - 1) / CNN_ENG_RB, span = KH * KW * CNN_ENG_RB;
    const T *in = x;
    if (d[E_COPY]) {
        CNN_ENG_S(cnn_eng_pad)(d, x, padded, N, Hp, Wp, 0);
        in = padded;
    }
    const T *wp = params + d[E_W_OFS], *bias = params + d[E_A_OFS];
    int relu = (int)d[E_RELU];
    int threads = cnn_eng_threads(rows * WO * F * KH * KW);
#if CNN_ENG_FLOAT32
    int avx2 = cnn_eng_isa() >= CNN_ENG_AVX2;
#endif
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t r = 0; r < rows; r++) {
        const T *img = in + (r / HO * Hp + r % HO) * Wp;
        T *orow = out + r * WO * F;
        for (ptrdiff_t at = 0; at < WO; at += CNN_ENG_RX) {
            /* a row's last tile ends at its end, overlapping the one before (the pixels both
             * hold get the same values twice) rather than run short */
            ptrdiff_t ow = at + CNN_ENG_RX <= WO || WO < CNN_ENG_RX ? at : WO - CNN_ENG_RX;
            int m = WO - ow < CNN_ENG_RX ? (int)(WO - ow) : CNN_ENG_RX;
            for (ptrdiff_t b = 0; b < blocks; b++) {
                ptrdiff_t f0 = b * CNN_ENG_RB;
                int fb = F - f0 < CNN_ENG_RB ? (int)(F - f0) : CNN_ENG_RB;
                const T *w = wp + b * span;
                T *o = orow + ow * F + f0;
#if CNN_ENG_FLOAT32 && CNN_ENG_X86
                if (avx2 && m == CNN_ENG_RX) {
                    cnn_eng_rowtile_avx2(img + ow, Wp, KH, KW, w, bias + f0, relu, o, F, fb);
                    continue;
                }
#endif
                CNN_ENG_S(cnn_eng_rowtile)(img + ow, Wp, KH, KW, w, bias + f0, relu, o, F, fb, m);
            }
        }
    }
}

/* One output row of a pool of few channels (C < CNN_ENG_POOL_ROW_C): the window's positions
 * outermost, each pass running along the whole row (WO x C values), so that the loops are
 * long even when a pixel's C are not; C a constant where the caller can make it one. */
static inline __attribute__((always_inline)) void CNN_ENG_S(cnn_eng_pool_row)(
    const T *win, T *dst, ptrdiff_t C, ptrdiff_t W, ptrdiff_t WO, ptrdiff_t KH, ptrdiff_t KW,
    ptrdiff_t s, int is_max, int relu, T inv) {
    for (ptrdiff_t wo = 0; wo < WO; wo++) {
        for (ptrdiff_t c = 0; c < C; c++) dst[wo * C + c] = win[wo * s * C + c];
    }
    for (ptrdiff_t i = 0; i < KH; i++) {
        for (ptrdiff_t j = i == 0; j < KW; j++) {
            const T *u = win + (i * W + j) * C;
            for (ptrdiff_t wo = 0; wo < WO; wo++) {
                const T *restrict uu = u + wo * s * C;
                T *restrict o = dst + wo * C;
                if (is_max) {
                    CNN_ENG_S(cnn_eng_max_into)(o, uu, C);
                } else {
                    CNN_SIMD
                    for (ptrdiff_t c = 0; c < C; c++) o[c] += uu[c];
                }
            }
        }
    }
    if (!is_max || relu) {
        for (ptrdiff_t k = 0; k < WO * C; k++) {
            T v = is_max ? dst[k] : dst[k] * inv;
            dst[k] = (relu && v < 0) ? (T)0 : v;
        }
    }
}

#define CNN_ENG_POOL_ROW_C 16

static void CNN_ENG_S(cnn_eng_pool)(const long long *d, const T *x, T *out, ptrdiff_t N) {
    ptrdiff_t C = d[E_C], H = d[E_H], W = d[E_W], HO = d[E_HO], WO = d[E_WO];
    ptrdiff_t KH = d[E_KH], KW = d[E_KW], s = d[E_STRIDE];
    int is_max = d[E_KIND] == CNN_ENG_MAXPOOL, relu = (int)d[E_RELU];
    ptrdiff_t rows = N * HO;
    int threads = cnn_eng_threads(rows * WO * C * KH * KW);
    T inv = (T)(1.0 / (double)(KH * KW));
    if (C < CNN_ENG_POOL_ROW_C) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (ptrdiff_t r = 0; r < rows; r++) {
            ptrdiff_t n = r / HO, ho = r % HO;
            const T *win = x + (n * H + ho * s) * W * C;
            T *dst = out + r * WO * C;
#define CNN_ENG_POOL_ROW(CC)                                                              \
    CNN_ENG_S(cnn_eng_pool_row)(win, dst, CC, W, WO, KH, KW, s, is_max, relu, inv)
            switch (C) { /* the usual few channels as constants: unrolled inner loops */
            case 1: CNN_ENG_POOL_ROW(1); break;
            case 2: CNN_ENG_POOL_ROW(2); break;
            case 3: CNN_ENG_POOL_ROW(3); break;
            case 4: CNN_ENG_POOL_ROW(4); break;
            case 6: CNN_ENG_POOL_ROW(6); break;
            case 8: CNN_ENG_POOL_ROW(8); break;
            default: CNN_ENG_POOL_ROW(C); break;
            }
#undef CNN_ENG_POOL_ROW
        }
        return;
    }
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t r = 0; r < rows; r++) {
        ptrdiff_t n = r / HO, ho = r % HO;
        for (ptrdiff_t wo = 0; wo < WO; wo++) {
            const T *win = x + ((n * H + ho * s) * W + wo * s) * C;
            T *dst = out + (r * WO + wo) * C;
            if (is_max) {
                memcpy(dst, win, sizeof(T) * C);
                for (ptrdiff_t i = 0; i < KH; i++) {
                    for (ptrdiff_t j = 0; j < KW; j++) {
                        CNN_ENG_S(cnn_eng_max_into)(dst, win + (i * W + j) * C, C);
                    }
                }
            } else {
                memset(dst, 0, sizeof(T) * C);
                for (ptrdiff_t i = 0; i < KH; i++) {
                    for (ptrdiff_t j = 0; j < KW; j++) {
                        const T *u = win + (i * W + j) * C;
                        CNN_SIMD
                        for (ptrdiff_t c = 0; c < C; c++) dst[c] += u[c];
                    }
                }
                CNN_SIMD
                for (ptrdiff_t c = 0; c < C; c++) dst[c] *= inv;
            }
            if (relu) {
                for (ptrdiff_t c = 0; c < C; c++) dst[c] = dst[c] < 0 ? (T)0 : dst[c];
            }
        }
    }
}

/* SCALE and RELU: per channel x * a[c] + b[c] (RELU: a = 1, b = 0 with no parameters). */
static void CNN_ENG_S(cnn_eng_scale)(const long long *d, const T *params, const T *x, T *out,
                                     ptrdiff_t N) {
    ptrdiff_t C = d[E_C], pixels = N * d[E_H] * d[E_W];
    int relu = (int)d[E_RELU], plain = d[E_KIND] == CNN_ENG_RELU;
    const T *a = params + d[E_A_OFS], *b = params + d[E_B_OFS];
    int threads = cnn_eng_threads(pixels * C);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t px = 0; px < pixels; px++) {
        const T *src = x + px * C;
        T *dst = out + px * C;
        for (ptrdiff_t c = 0; c < C; c++) {
            T v = plain ? src[c] : src[c] * a[c] + b[c];
            dst[c] = (relu && v < 0) ? (T)0 : v;
        }
    }
}

/* CNORM: every (n, position) normalised over its C channels. */
static void CNN_ENG_S(cnn_eng_cnorm)(const long long *d, const T *params, double eps,
                                     const T *x, T *out, ptrdiff_t N) {
    ptrdiff_t C = d[E_C], pixels = N * d[E_H] * d[E_W];
    int relu = (int)d[E_RELU];
    const T *g = params + d[E_A_OFS], *b = params + d[E_B_OFS];
    int threads = cnn_eng_threads(pixels * C * 3);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t px = 0; px < pixels; px++) {
        const T *src = x + px * C;
        T *dst = out + px * C;
        double sum = 0, sq = 0;
        for (ptrdiff_t c = 0; c < C; c++) sum += src[c];
        double mean = sum / (double)C;
        for (ptrdiff_t c = 0; c < C; c++) {
            double dv = src[c] - mean;
            sq += dv * dv;
        }
        double inv = 1.0 / sqrt(sq / (double)C + eps);
        for (ptrdiff_t c = 0; c < C; c++) {
            T v = (T)((src[c] - mean) * inv) * g[c] + b[c];
            dst[c] = (relu && v < 0) ? (T)0 : v;
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
        ptrdiff_t n = u / G, c0 = (u % G) * CG;
        const T *src = x + n * HW * C + c0;
        T *dst = out + n * HW * C + c0;
        double sum = 0, sq = 0;
        for (ptrdiff_t p = 0; p < HW; p++) {
            for (ptrdiff_t c = 0; c < CG; c++) sum += src[p * C + c];
        }
        double mean = sum / (double)count;
        for (ptrdiff_t p = 0; p < HW; p++) {
            for (ptrdiff_t c = 0; c < CG; c++) {
                double dv = src[p * C + c] - mean;
                sq += dv * dv;
            }
        }
        double inv = 1.0 / sqrt(sq / (double)count + eps);
        for (ptrdiff_t p = 0; p < HW; p++) {
            for (ptrdiff_t c = 0; c < CG; c++) {
                T v = (T)((src[p * C + c] - mean) * inv) * g[c0 + c] + b[c0 + c];
                dst[p * C + c] = (relu && v < 0) ? (T)0 : v;
            }
        }
    }
}

/* TRANSPOSE: (N, C, HW) to (N, HW, C) (E_F == 0) or back (E_F == 1). */
static void CNN_ENG_S(cnn_eng_transpose)(const long long *d, const T *x, T *out, ptrdiff_t N) {
    ptrdiff_t C = d[E_C], HW = d[E_H] * d[E_W];
    int back = d[E_F] != 0;
    int threads = cnn_eng_threads(N * C * HW * 4);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (ptrdiff_t n = 0; n < N; n++) {
        const T *src = x + n * C * HW;
        T *dst = out + n * C * HW;
        for (ptrdiff_t c = 0; c < C; c++) {
            if (back) {
                for (ptrdiff_t p = 0; p < HW; p++) dst[c * HW + p] = src[p * C + c];
            } else {
                for (ptrdiff_t p = 0; p < HW; p++) dst[p * C + c] = src[c * HW + p];
            }
        }
    }
}

/* The whole forward: ops in order over batches of at most max_batch images. buf0 and buf1
 * hold the intermediate activations (op k writes buffer k & 1; the last op writes out),
 * padded the convs' padded copies of their inputs, wino the Winograd convs' bands. times
 * (NULL, or nops values): each op's seconds are added to its value (Plan.profile). */
static void CNN_ENG_S(cnn_eng_run)(const long long *desc, const double *eps, int nops,
                                   const T *params, const long long *offs, const T *x, T *out,
                                   ptrdiff_t N, ptrdiff_t max_batch, ptrdiff_t in_size,
                                   ptrdiff_t out_size, T *buf0, T *buf1, T *padded,
                                   T *wino, double *times) {
    for (ptrdiff_t n0 = 0; n0 < N; n0 += max_batch) {
        ptrdiff_t nb = N - n0 < max_batch ? N - n0 : max_batch;
        const T *src = x + n0 * in_size;
        for (int k = 0; k < nops; k++) {
            const long long *d = desc + (ptrdiff_t)k * CNN_ENG_FIELDS;
            T *dst = k == nops - 1 ? out + n0 * out_size : ((k & 1) ? buf1 : buf0);
            double start = times ? cnn_eng_seconds() : 0.0;
            switch (d[E_KIND]) {
            case CNN_ENG_CONV:
                CNN_ENG_S(cnn_eng_conv)(d, params, offs, src, dst, nb, padded, wino);
                break;
            case CNN_ENG_ROWCONV:
                CNN_ENG_S(cnn_eng_rowconv)(d, params, src, dst, nb, padded);
                break;
            case CNN_ENG_WINO:
                CNN_ENG_S(cnn_eng_wino)(d, params, src, dst, nb, padded, wino);
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
            case CNN_ENG_TRANSPOSE:
                CNN_ENG_S(cnn_eng_transpose)(d, src, dst, nb);
                break;
            }
            if (times) times[k] += cnn_eng_seconds() - start;
            src = dst;
        }
    }
}

#undef T
#undef MR
#undef NR
#undef TB
