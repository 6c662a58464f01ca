/* im2col / col2im loops for one element type; included by cnn_im2col.h (no guard). */

/* cols (C*HH*WW, (ho1 - ho0) * W_out) = the columns of output rows ho0:ho1 of one
 * zero-padded image `padded` (C, Hp, Wp); every entry is written. */
CNN_CLONES static void CNN_FN(cnn_im2col_rows)(const CNN_T *restrict padded,
                                               CNN_T *restrict cols, ptrdiff_t C, ptrdiff_t Hp,
                                               ptrdiff_t Wp, ptrdiff_t HH, ptrdiff_t WW,
                                               ptrdiff_t stride, ptrdiff_t W_out, ptrdiff_t ho0,
                                               ptrdiff_t ho1) {
    CNN_T *restrict dst = cols;
    for (ptrdiff_t c = 0; c < C; c++) {
        for (ptrdiff_t i = 0; i < HH; i++) {
            for (ptrdiff_t j = 0; j < WW; j++) {
                for (ptrdiff_t ho = ho0; ho < ho1; ho++) {
                    const CNN_T *restrict src = padded + (c * Hp + ho * stride + i) * Wp + j;
                    if (stride == 1) {
                        memcpy(dst, src, sizeof(CNN_T) * (size_t)W_out);
                    } else {
                        CNN_SIMD
                        for (ptrdiff_t wo = 0; wo < W_out; wo++) dst[wo] = src[wo * stride];
                    }
                    dst += W_out;
                }
            }
        }
    }
}

/* dpadded (C, Hp, Wp) += the column gradient `cols` of output rows ho0:ho1, laid out as in
 * cnn_im2col_rows. */
CNN_CLONES static void CNN_FN(cnn_col2im_rows)(const CNN_T *restrict cols,
                                               CNN_T *restrict dpadded, ptrdiff_t C,
                                               ptrdiff_t Hp, ptrdiff_t Wp, ptrdiff_t HH,
                                               ptrdiff_t WW, ptrdiff_t stride, ptrdiff_t W_out,
                                               ptrdiff_t ho0, ptrdiff_t ho1) {
    const CNN_T *restrict src = cols;
    for (ptrdiff_t c = 0; c < C; c++) {
        for (ptrdiff_t i = 0; i < HH; i++) {
            for (ptrdiff_t j = 0; j < WW; j++) {
                for (ptrdiff_t ho = ho0; ho < ho1; ho++) {
                    CNN_T *restrict dst = dpadded + (c * Hp + ho * stride + i) * Wp + j;
                    if (stride == 1) {
                        CNN_SIMD
                        for (ptrdiff_t wo = 0; wo < W_out; wo++) dst[wo] += src[wo];
                    } else {
                        CNN_SIMD
                        for (ptrdiff_t wo = 0; wo < W_out; wo++) dst[wo * stride] += src[wo];
                    }
                    src += W_out;
                }
            }
        }
    }
}

/* rows (p1 - p0, C*HH*WW) with row stride ldr = the transposed columns ("im2row") of output
 * pixels p0:p1 (p = ho * W_out + wo) of one image x (C, H, W), not padded: entry
 * (c * HH + i) * WW + j of a row is x[c, ho * stride - pad + i, wo * stride - pad + j], or 0
 * where that falls in the padding; every entry is written. Each (c, i) is one run of WW
 * values, contiguous in both x and the row. */
CNN_CLONES static void CNN_FN(cnn_im2row)(const CNN_T *restrict x, CNN_T *restrict rows,
                                          ptrdiff_t ldr, ptrdiff_t C, ptrdiff_t H, ptrdiff_t W,
                                          ptrdiff_t HH, ptrdiff_t WW, ptrdiff_t stride,
                                          ptrdiff_t pad, ptrdiff_t W_out, ptrdiff_t p0,
                                          ptrdiff_t p1) {
    for (ptrdiff_t p = p0; p < p1; p++) {
        CNN_T *restrict dst = rows + (p - p0) * ldr;
        const ptrdiff_t hi0 = (p / W_out) * stride - pad, wi0 = (p % W_out) * stride - pad;
        /* filter columns [j_lo, j_hi) read the image, the others the padding */
        const ptrdiff_t j_lo = wi0 < 0 ? (-wi0 < WW ? -wi0 : WW) : 0;
        ptrdiff_t j_hi = W - wi0 < WW ? W - wi0 : WW;
        if (j_hi < j_lo) j_hi = j_lo;
        for (ptrdiff_t c = 0; c < C; c++) {
            for (ptrdiff_t i = 0; i < HH; i++, dst += WW) {
                const ptrdiff_t hi = hi0 + i;
                if (hi < 0 || hi >= H) {
                    for (ptrdiff_t j = 0; j < WW; j++) dst[j] = 0;
                    continue;
                }
                const CNN_T *restrict src = x + (c * H + hi) * W + wi0;
                for (ptrdiff_t j = 0; j < j_lo; j++) dst[j] = 0;
                for (ptrdiff_t j = j_lo; j < j_hi; j++) dst[j] = src[j];
                for (ptrdiff_t j = j_hi; j < WW; j++) dst[j] = 0;
            }
        }
    }
}
