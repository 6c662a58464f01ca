/* Winograd F(2x2, 3x3) transforms for cython_ext/conv.pyx (see the comment there).
 *
 * Written in C so that the loops over tiles carry `restrict` pointers and `omp simd` hints
 * and vectorise; on x86-64 with GCC each function is also compiled for AVX-512 and AVX2 and
 * the best one for the running CPU is picked at load time (target_clones), while the rest of
 * the build keeps the compiler's baseline flags. cnn_winograd_impl.h holds the functions,
 * written once for the element type CNN_T and included here for float (_f) and double (_d).
 */
#ifndef CNN_WINOGRAD_H
#define CNN_WINOGRAD_H

#include <stddef.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CNN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CNN_CLONES
#endif

#if defined(_OPENMP)
#define CNN_SIMD _Pragma("omp simd")
#else
#define CNN_SIMD
#endif

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
