/* Compiler hints shared by the C helpers of the kernels (cnn_runs.h, cnn_im2col.h,
 * cnn_winograd.h).
 *
 * CNN_CLONES: on x86-64 with GCC and glibc (for ifunc), compile a function for AVX-512 and
 * AVX2 besides the baseline and pick the best version for the running CPU when the module
 * loads (target_clones); the rest of the build keeps the baseline flags, so the modules
 * still load on any x86-64 CPU.
 * CNN_SIMD / CNN_SIMD_SUM(vars): `omp simd` on the next loop (with a `+` reduction over
 * vars, which lets the compiler keep vector partial sums); nothing without OpenMP.
 */
#ifndef CNN_SIMD_H
#define CNN_SIMD_H

#include <stddef.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define CNN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CNN_CLONES
#endif

#define CNN_PRAGMA(text) _Pragma(#text)
#if defined(_OPENMP)
#define CNN_SIMD CNN_PRAGMA(omp simd)
#define CNN_SIMD_SUM(...) CNN_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define CNN_SIMD
#define CNN_SIMD_SUM(...)
#endif

#endif
