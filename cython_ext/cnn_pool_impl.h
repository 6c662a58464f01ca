/* Max-pooling rows for one element type; included by cnn_pool.h (no guard). */

/* 1 if v takes over from best in a row-major scan: larger, or the first NaN. */
static inline int CNN_FN(cnn_wins)(CNN_T v, CNN_T best) {
    return (v > best) | ((v != v) & (best == best));
}

/* mask ? a : b on the bits of a and b, with mask all ones or all zeros. */
static inline CNN_T CNN_FN(cnn_blend)(CNN_U mask, CNN_T a, CNN_T b) {
    CNN_U ua, ub, r;
    CNN_T out;
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    r = (ua & mask) | (ub & ~mask);
    memcpy(&out, &r, sizeof out);
    return out;
}

/* One output row of a 2x2 stride-2 max pool. r0 and r1 are the two input rows (r1 = r0 + W),
 * base is the flat index of r0[0] in its plane. The row-major scan of a window `a b / c d`
 * keeps the same winner as a tournament that keeps the earlier side on ties: a against b,
 * c against d, then the top winner against the bottom one (every top element comes first). */
CNN_CLONES static void CNN_FN(cnn_max_pool_row_2x2)(const CNN_T *restrict r0,
                                                    const CNN_T *restrict r1,
                                                    CNN_T *restrict out,
                                                    ptrdiff_t *restrict arg, ptrdiff_t base,
                                                    ptrdiff_t W, ptrdiff_t W_out) {
    CNN_SIMD
    for (ptrdiff_t wo = 0; wo < W_out; wo++) {
        const CNN_T a = r0[2 * wo], b = r0[2 * wo + 1], c = r1[2 * wo], d = r1[2 * wo + 1];
        const int tb = CNN_FN(cnn_wins)(b, a), td = CNN_FN(cnn_wins)(d, c);
        const CNN_T top = CNN_FN(cnn_blend)((CNN_U)0 - (CNN_U)tb, b, a);
        const CNN_T bottom = CNN_FN(cnn_blend)((CNN_U)0 - (CNN_U)td, d, c);
        const int tt = CNN_FN(cnn_wins)(bottom, top);
        out[wo] = CNN_FN(cnn_blend)((CNN_U)0 - (CNN_U)tt, bottom, top);
        arg[wo] = base + 2 * wo + tb + tt * (W + td - tb);
    }
}

/* The gradient of one output row of a 2x2 stride-2 max pool that tiles its input: writes
 * both input rows r0 and r1 (r1 = r0 + W) whole, the window's gradient at its argmax (arg,
 * flat in the plane; base is the flat index of r0[0]) and 0 at its three other pixels. An
 * argmax outside its window (a damaged cache) only leaves that window's pixels at 0. */
CNN_CLONES static void CNN_FN(cnn_max_pool_backward_row_2x2)(const CNN_T *restrict dout,
                                                             const ptrdiff_t *restrict arg,
                                                             CNN_T *restrict r0,
                                                             CNN_T *restrict r1, ptrdiff_t base,
                                                             ptrdiff_t W, ptrdiff_t W_out) {
    const CNN_T zero = 0;
    CNN_SIMD
    for (ptrdiff_t wo = 0; wo < W_out; wo++) {
        const ptrdiff_t k = arg[wo] - base - 2 * wo;  /* 0, 1, W or W + 1 */
        const CNN_T g = dout[wo];
        r0[2 * wo] = CNN_FN(cnn_blend)((CNN_U)0 - (CNN_U)(k == 0), g, zero);
        r0[2 * wo + 1] = CNN_FN(cnn_blend)((CNN_U)0 - (CNN_U)(k == 1), g, zero);
        r1[2 * wo] = CNN_FN(cnn_blend)((CNN_U)0 - (CNN_U)(k == W), g, zero);
        r1[2 * wo + 1] = CNN_FN(cnn_blend)((CNN_U)0 - (CNN_U)(k == W + 1), g, zero);
    }
}

/* One output row of a 3x3 max pool at any stride: cnn_max_pool_row with the window size
 * known to the compiler, which unrolls the scan (3x faster than with run-time bounds). */
CNN_CLONES static void CNN_FN(cnn_max_pool_row_3x3)(const CNN_T *restrict x, ptrdiff_t W,
                                                    ptrdiff_t row0, ptrdiff_t stride,
                                                    CNN_T *restrict out,
                                                    ptrdiff_t *restrict arg, ptrdiff_t W_out) {
    CNN_SIMD
    for (ptrdiff_t wo = 0; wo < W_out; wo++) {
        const ptrdiff_t first = row0 * W + wo * stride;
        CNN_T best = x[first];
        ptrdiff_t best_at = first;
        for (ptrdiff_t i = 0; i < 3; i++) {
            for (ptrdiff_t j = 0; j < 3; j++) {
                const ptrdiff_t at = first + i * W + j;
                const CNN_T v = x[at];
                const int t = CNN_FN(cnn_wins)(v, best);
                best = CNN_FN(cnn_blend)((CNN_U)0 - (CNN_U)t, v, best);
                best_at += t * (at - best_at);
            }
        }
        out[wo] = best;
        arg[wo] = best_at;
    }
}

/* One output row of a max pool with any window and stride: x is the plane (row stride W),
 * row0 the first input row of the windows. The scan visits each window in row-major order
 * and keeps the first winner, as the loop in pool.pyx does, but with selects. */
CNN_CLONES static void CNN_FN(cnn_max_pool_row)(const CNN_T *restrict x, ptrdiff_t W,
                                                ptrdiff_t row0, ptrdiff_t pool_height,
                                                ptrdiff_t pool_width, ptrdiff_t stride,
                                                CNN_T *restrict out, ptrdiff_t *restrict arg,
                                                ptrdiff_t W_out) {
    CNN_SIMD
    for (ptrdiff_t wo = 0; wo < W_out; wo++) {
        const ptrdiff_t first = row0 * W + wo * stride;
        CNN_T best = x[first];
        ptrdiff_t best_at = first;
        for (ptrdiff_t i = 0; i < pool_height; i++) {
            for (ptrdiff_t j = 0; j < pool_width; j++) {
                const ptrdiff_t at = first + i * W + j;
                const CNN_T v = x[at];
                const int t = CNN_FN(cnn_wins)(v, best);  /* 0 for the first element */
                best = CNN_FN(cnn_blend)((CNN_U)0 - (CNN_U)t, v, best);
                best_at += t * (at - best_at);
            }
        }
        out[wo] = best;
        arg[wo] = best_at;
    }
}
