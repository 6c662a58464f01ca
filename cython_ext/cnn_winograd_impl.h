/* F(2x2, 3x3) transforms for one element type; included by cnn_winograd.h (no guard). */

/* V[:, c, t0 + ti*tw + tj] = B^T d B for the 4x4 patch of every tile of one image
 * x (C, H, W); planes of V are vs apart and rows Tb apart. `padded` holds one zero-padded
 * (2*th + 2) x (2*tw + 2) plane. */
CNN_CLONES static void CNN_FN(cnn_wino_input)(
    const CNN_T *restrict x, CNN_T *restrict padded, CNN_T *restrict V, ptrdiff_t C,
    ptrdiff_t H, ptrdiff_t W, ptrdiff_t pad, ptrdiff_t th, ptrdiff_t tw, ptrdiff_t Tb,
    ptrdiff_t t0, ptrdiff_t vs) {
    const ptrdiff_t Hp = 2 * th + 2, Wp = 2 * tw + 2;
    for (ptrdiff_t c = 0; c < C; c++) {
        memset(padded, 0, sizeof(CNN_T) * (size_t)(Hp * Wp));
        for (ptrdiff_t h = 0; h < H; h++) {
            ptrdiff_t w_len = W < Wp - pad ? W : Wp - pad;
            if (h + pad < Hp && w_len > 0) {
                memcpy(padded + (h + pad) * Wp + pad, x + (c * H + h) * W,
                       sizeof(CNN_T) * (size_t)w_len);
            }
        }
        for (ptrdiff_t ti = 0; ti < th; ti++) {
            const CNN_T *restrict p0 = padded + 2 * ti * Wp;
            const CNN_T *restrict p1 = p0 + Wp;
            const CNN_T *restrict p2 = p1 + Wp;
            const CNN_T *restrict p3 = p2 + Wp;
            CNN_T *restrict v = V + c * Tb + t0 + ti * tw;
            CNN_SIMD
            for (ptrdiff_t tj = 0; tj < tw; tj++) {
                const ptrdiff_t s = 2 * tj;
                /* d B along each row: (d0 - d2, d1 + d2, d2 - d1, d1 - d3) */
                CNN_T a0 = p0[s] - p0[s + 2], a1 = p0[s + 1] + p0[s + 2];
                CNN_T a2 = p0[s + 2] - p0[s + 1], a3 = p0[s + 1] - p0[s + 3];
                CNN_T b0 = p1[s] - p1[s + 2], b1 = p1[s + 1] + p1[s + 2];
                CNN_T b2 = p1[s + 2] - p1[s + 1], b3 = p1[s + 1] - p1[s + 3];
                CNN_T c0 = p2[s] - p2[s + 2], c1 = p2[s + 1] + p2[s + 2];
                CNN_T c2 = p2[s + 2] - p2[s + 1], c3 = p2[s + 1] - p2[s + 3];
                CNN_T d0 = p3[s] - p3[s + 2], d1 = p3[s + 1] + p3[s + 2];
                CNN_T d2 = p3[s + 2] - p3[s + 1], d3 = p3[s + 1] - p3[s + 3];
                /* B^T down the columns: rows (a - c, b + c, c - b, b - d) */
                v[0 * vs + tj] = a0 - c0;
                v[1 * vs + tj] = a1 - c1;
                v[2 * vs + tj] = a2 - c2;
                v[3 * vs + tj] = a3 - c3;
                v[4 * vs + tj] = b0 + c0;
                v[5 * vs + tj] = b1 + c1;
                v[6 * vs + tj] = b2 + c2;
                v[7 * vs + tj] = b3 + c3;
                v[8 * vs + tj] = c0 - b0;
                v[9 * vs + tj] = c1 - b1;
                v[10 * vs + tj] = c2 - b2;
                v[11 * vs + tj] = c3 - b3;
                v[12 * vs + tj] = b0 - d0;
                v[13 * vs + tj] = b1 - d1;
                v[14 * vs + tj] = b2 - d2;
                v[15 * vs + tj] = b3 - d3;
            }
        }
    }
}

/* out (F, H_out, W_out) = A^T M A + b for the tiles of one image; M's planes are ms apart
 * and its rows Tb apart. Cells past the edge of an odd-sized output are dropped. */
CNN_CLONES static void CNN_FN(cnn_wino_output)(
    const CNN_T *restrict M, CNN_T *restrict out, const CNN_T *restrict b, ptrdiff_t F,
    ptrdiff_t H_out, ptrdiff_t W_out, ptrdiff_t th, ptrdiff_t tw, ptrdiff_t Tb, ptrdiff_t t0,
    ptrdiff_t ms) {
    for (ptrdiff_t f = 0; f < F; f++) {
        const CNN_T bias = b[f];
        CNN_T *restrict o = out + f * H_out * W_out;
        for (ptrdiff_t ti = 0; ti < th; ti++) {
            const ptrdiff_t ho = 2 * ti;
            const CNN_T *restrict m = M + f * Tb + t0 + ti * tw;
            const int two_rows = ho + 1 < H_out;
            CNN_T *restrict o0 = o + ho * W_out;
            CNN_T *restrict o1 = o0 + W_out;
            const ptrdiff_t full = W_out / 2; /* tiles with both output columns */
            if (two_rows) {
                CNN_SIMD
                for (ptrdiff_t tj = 0; tj < full; tj++) {
                    CNN_T s00 = m[0 * ms + tj] + m[4 * ms + tj] + m[8 * ms + tj];
                    CNN_T s01 = m[1 * ms + tj] + m[5 * ms + tj] + m[9 * ms + tj];
                    CNN_T s02 = m[2 * ms + tj] + m[6 * ms + tj] + m[10 * ms + tj];
                    CNN_T s03 = m[3 * ms + tj] + m[7 * ms + tj] + m[11 * ms + tj];
                    CNN_T s10 = m[4 * ms + tj] - m[8 * ms + tj] - m[12 * ms + tj];
                    CNN_T s11 = m[5 * ms + tj] - m[9 * ms + tj] - m[13 * ms + tj];
                    CNN_T s12 = m[6 * ms + tj] - m[10 * ms + tj] - m[14 * ms + tj];
                    CNN_T s13 = m[7 * ms + tj] - m[11 * ms + tj] - m[15 * ms + tj];
                    o0[2 * tj] = s00 + s01 + s02 + bias;
                    o0[2 * tj + 1] = s01 - s02 - s03 + bias;
                    o1[2 * tj] = s10 + s11 + s12 + bias;
                    o1[2 * tj + 1] = s11 - s12 - s13 + bias;
                }
            }
            for (ptrdiff_t tj = two_rows ? full : 0; tj < tw; tj++) {
                const ptrdiff_t wo = 2 * tj;
                CNN_T s00 = m[0 * ms + tj] + m[4 * ms + tj] + m[8 * ms + tj];
                CNN_T s01 = m[1 * ms + tj] + m[5 * ms + tj] + m[9 * ms + tj];
                CNN_T s02 = m[2 * ms + tj] + m[6 * ms + tj] + m[10 * ms + tj];
                CNN_T s03 = m[3 * ms + tj] + m[7 * ms + tj] + m[11 * ms + tj];
                CNN_T s10 = m[4 * ms + tj] - m[8 * ms + tj] - m[12 * ms + tj];
                CNN_T s11 = m[5 * ms + tj] - m[9 * ms + tj] - m[13 * ms + tj];
                CNN_T s12 = m[6 * ms + tj] - m[10 * ms + tj] - m[14 * ms + tj];
                CNN_T s13 = m[7 * ms + tj] - m[11 * ms + tj] - m[15 * ms + tj];
                o0[wo] = s00 + s01 + s02 + bias;
                if (wo + 1 < W_out) o0[wo + 1] = s01 - s02 - s03 + bias;
                if (two_rows) {
                    o1[wo] = s10 + s11 + s12 + bias;
                    if (wo + 1 < W_out) o1[wo + 1] = s11 - s12 - s13 + bias;
                }
            }
        }
    }
}

/* dM = A dY A^T for the tiles of one image's dout (F, H_out, W_out); planes ms apart, rows
 * Tb apart. `edge` is a scratch row of 2*tw + 2 values: cells past the edge of an odd-sized
 * output count as 0. */
CNN_CLONES static void CNN_FN(cnn_wino_dout)(
    const CNN_T *restrict dout, CNN_T *restrict dM, CNN_T *restrict edge, ptrdiff_t F,
    ptrdiff_t H_out, ptrdiff_t W_out, ptrdiff_t th, ptrdiff_t tw, ptrdiff_t Tb, ptrdiff_t t0,
    ptrdiff_t ms) {
    CNN_T *restrict zero = edge + 2 * tw + 2; /* 2*tw + 2 zeros */
    for (ptrdiff_t k = 0; k < 2 * tw + 2; k++) zero[k] = 0;
    for (ptrdiff_t f = 0; f < F; f++) {
        for (ptrdiff_t ti = 0; ti < th; ti++) {
            const ptrdiff_t ho = 2 * ti;
            const CNN_T *d0 = dout + (f * H_out + ho) * W_out;
            const CNN_T *d1 = ho + 1 < H_out ? d0 + W_out : zero;
            if (W_out % 2) { /* odd width: pad both rows to 2*tw values */
                CNN_T *restrict e = edge;
                for (ptrdiff_t k = 0; k < W_out; k++) e[k] = d0[k];
                e[W_out] = 0;
                CNN_T *restrict e1 = edge + 2 * tw + 2 + 2 * tw + 2;
                for (ptrdiff_t k = 0; k < W_out; k++) e1[k] = d1[k];
                e1[W_out] = 0;
                d0 = e;
                d1 = e1;
            }
            CNN_T *restrict m = dM + f * Tb + t0 + ti * tw;
            CNN_SIMD
            for (ptrdiff_t tj = 0; tj < tw; tj++) {
                const CNN_T y00 = d0[2 * tj], y01 = d0[2 * tj + 1];
                const CNN_T y10 = d1[2 * tj], y11 = d1[2 * tj + 1];
                /* A down the columns: (y0, y0 + y1, y0 - y1, -y1); then along the rows */
                const CNN_T r10 = y00 + y10, r11 = y01 + y11;
                const CNN_T r20 = y00 - y10, r21 = y01 - y11;
                m[0 * ms + tj] = y00;
                m[1 * ms + tj] = y00 + y01;
                m[2 * ms + tj] = y00 - y01;
                m[3 * ms + tj] = -y01;
                m[4 * ms + tj] = r10;
                m[5 * ms + tj] = r10 + r11;
                m[6 * ms + tj] = r10 - r11;
                m[7 * ms + tj] = -r11;
                m[8 * ms + tj] = r20;
                m[9 * ms + tj] = r20 + r21;
                m[10 * ms + tj] = r20 - r21;
                m[11 * ms + tj] = -r21;
                m[12 * ms + tj] = -y10;
                m[13 * ms + tj] = -y10 - y11;
                m[14 * ms + tj] = y11 - y10;
                m[15 * ms + tj] = y11;
            }
        }
    }
}

/* dx (C, H, W) = sum over tiles of B dV B^T on the tiles' 4x4 patches (padding dropped);
 * dx is overwritten. `padded` holds one (2*th + 2) x (2*tw + 2) plane followed by a scratch
 * of 16 * tw values. */
CNN_CLONES static void CNN_FN(cnn_wino_dinput)(
    const CNN_T *restrict dV, CNN_T *restrict padded, CNN_T *restrict dx, ptrdiff_t C,
    ptrdiff_t H, ptrdiff_t W, ptrdiff_t pad, ptrdiff_t th, ptrdiff_t tw, ptrdiff_t Tb,
    ptrdiff_t t0, ptrdiff_t vs) {
    const ptrdiff_t Hp = 2 * th + 2, Wp = 2 * tw + 2;
    CNN_T *restrict g = padded + Hp * Wp; /* g[(4*r + s) * tw + tj]: patch cell (r, s) */
    for (ptrdiff_t c = 0; c < C; c++) {
        memset(padded, 0, sizeof(CNN_T) * (size_t)(Hp * Wp));
        for (ptrdiff_t ti = 0; ti < th; ti++) {
            const CNN_T *restrict v = dV + c * Tb + t0 + ti * tw;
            CNN_SIMD
            for (ptrdiff_t tj = 0; tj < tw; tj++) {
                CNN_T u[16];
                /* B down the columns of dV: (v0, v1 - v2 + v3, v1 + v2 - v0, -v3) */
                for (int k = 0; k < 4; k++) {
                    const CNN_T e0 = v[k * vs + tj], e1 = v[(4 + k) * vs + tj];
                    const CNN_T e2 = v[(8 + k) * vs + tj], e3 = v[(12 + k) * vs + tj];
                    u[k] = e0;
                    u[4 + k] = e1 - e2 + e3;
                    u[8 + k] = e1 + e2 - e0;
                    u[12 + k] = -e3;
                }
                /* and along the rows */
                for (int r = 0; r < 4; r++) {
                    const CNN_T g0 = u[4 * r], g1 = u[4 * r + 1];
                    const CNN_T g2 = u[4 * r + 2], g3 = u[4 * r + 3];
                    g[(4 * r + 0) * tw + tj] = g0;
                    g[(4 * r + 1) * tw + tj] = g1 - g2 + g3;
                    g[(4 * r + 2) * tw + tj] = g1 + g2 - g0;
                    g[(4 * r + 3) * tw + tj] = -g3;
                }
            }
            /* Patches of neighbouring tiles overlap by two columns: column 2*tj + s of a
             * row gets cell s of tile tj and cell s + 2 of tile tj - 1. */
            for (int r = 0; r < 4; r++) {
                CNN_T *restrict row = padded + (2 * ti + r) * Wp;
                const CNN_T *restrict g0 = g + (4 * r + 0) * tw;
                const CNN_T *restrict g1 = g + (4 * r + 1) * tw;
                const CNN_T *restrict g2 = g + (4 * r + 2) * tw;
                const CNN_T *restrict g3 = g + (4 * r + 3) * tw;
                row[0] += g0[0];
                row[1] += g1[0];
                CNN_SIMD
                for (ptrdiff_t tj = 1; tj < tw; tj++) {
                    row[2 * tj] += g0[tj] + g2[tj - 1];
                    row[2 * tj + 1] += g1[tj] + g3[tj - 1];
                }
                row[2 * tw] += g2[tw - 1];
                row[2 * tw + 1] += g3[tw - 1];
            }
        }
        for (ptrdiff_t h = 0; h < H; h++) {
            memcpy(dx + (c * H + h) * W, padded + (h + pad) * Wp + pad,
                   sizeof(CNN_T) * (size_t)W);
        }
    }
}
