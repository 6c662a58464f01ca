/* Max-pooling rows for cython_ext/pool.pyx, without data-dependent branches.
 *
 * A window's winner is its first maximum in row-major order, or its first NaN (pool.pyx).
 * Written as `if (v > best) ...` the scan is a branch per element that mispredicts about
 * half the time on real data, and a floating-point `t ? v : best` compiles to the same
 * branch: a 2x2 pool over 50x32x32x32 floats took 9.5 ms on one core. Here every choice is
 * a bit mask (the IEEE bits of the two candidates are blended with it, and the index moves
 * by `t * (at - best_at)`), so the loop over a row has no branches and vectorises: 0.65 ms.
 * cnn_pool_impl.h holds the functions for the element type CNN_T (with CNN_U, the unsigned
 * integer of the same size); they are included here for float (_f) and double (_d).
 */
#ifndef CNN_POOL_H
#define CNN_POOL_H

#include <stdint.h>

#include "cnn_simd.h"

#define CNN_T float
#define CNN_U uint32_t
#define CNN_FN(name) name##_f
#include "cnn_pool_impl.h"
#undef CNN_T
#undef CNN_U
#undef CNN_FN

#define CNN_T double
#define CNN_U uint64_t
#define CNN_FN(name) name##_d
#include "cnn_pool_impl.h"
#undef CNN_T
#undef CNN_U
#undef CNN_FN

#endif
