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
