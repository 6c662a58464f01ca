/* Thread count for one parallel kernel call.
 *
 * A parallel region costs a few microseconds to start and, on a busy machine, a waiting
 * thread can lose a whole scheduler slice at each barrier. Calls whose work (in inner-loop
 * element operations) is below CNN_PARALLEL_MIN_WORK therefore run on one thread.
 */
#ifndef CNN_THREADS_H
#define CNN_THREADS_H

#include <stddef.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define CNN_PARALLEL_MIN_WORK 32768

static inline int cnn_threads_for(Py_ssize_t work) {
#ifdef _OPENMP
    if (work >= CNN_PARALLEL_MIN_WORK) {
        return omp_get_max_threads();
    }
#endif
    (void)work;
    return 1;
}

#endif
