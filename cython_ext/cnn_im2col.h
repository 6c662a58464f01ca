/* Column (im2col) loops of the fused convolution kernels in cython_ext/conv.pyx, on one
 * zero-padded image, and the transposed columns (im2row) of the skinny path, built for
 * AVX-512 and AVX2 besides the baseline (cnn_simd.h): the strided copies of a stride-2..4
 * convolution become vector shuffles instead of one load per value. cnn_im2col_impl.h holds
 * the functions for the element type CNN_T; they are included here for float (_f) and
 * double (_d).
 */
#ifndef CNN_IM2COL_H
#define CNN_IM2COL_H

#include "cnn_simd.h"

#define CNN_T float
#define CNN_FN(name) name##_f
#include "cnn_im2col_impl.h"
#undef CNN_T
#undef CNN_FN

#define CNN_T double
#define CNN_FN(name) name##_d
#include "cnn_im2col_impl.h"
#undef CNN_T
#undef CNN_FN

#endif
