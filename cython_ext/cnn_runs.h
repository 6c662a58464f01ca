/* Loops over one contiguous run of values for cython_ext/norm.pyx, accumulated in double.
 *
 * Written in C so that each loop carries `restrict` pointers and an `omp simd` hint (a
 * reduction may then use vector partial sums) and is built for AVX-512 and AVX2 besides the
 * baseline (cnn_simd.h): float -> double conversions and double arithmetic are 2 lanes wide
 * in the baseline SSE2 and 8 in AVX-512. Results depend only on the run, never on threads.
 * cnn_runs_impl.h holds the functions for the element type CNN_T; they are included here
 * for float (_f) and double (_d).
 */
#ifndef CNN_RUNS_H
#define CNN_RUNS_H

#include "cnn_simd.h"

#define CNN_T float
#define CNN_FN(name) name##_f
#include "cnn_runs_impl.h"
#undef CNN_T
#undef CNN_FN

#define CNN_T double
#define CNN_FN(name) name##_d
#include "cnn_runs_impl.h"
#undef CNN_T
#undef CNN_FN

#endif
