/* Winograd F(2x2, 3x3) transforms for cython_ext/conv.pyx (see the comment there).
 *
 * Written in C so that the loops over tiles carry `restrict` pointers and `omp simd` hints
 * and vectorise, built for AVX-512 and AVX2 besides the baseline (cnn_simd.h). cnn_winograd_impl.h holds the functions,
 * written once for the element type CNN_T and included here for float (_f) and double (_d).
 */
#ifndef CNN_WINOGRAD_H
#define CNN_WINOGRAD_H

#include "cnn_simd.h"

#define CNN_T float
#define CNN_FN(name) name##_f
#include "cnn_winograd_impl.h"
#undef CNN_T
#undef CNN_FN

#define CNN_T double
#define CNN_FN(name) name##_d
#include "cnn_winograd_impl.h"
#undef CNN_T
#undef CNN_FN

#endif
