/* Thread count for one parallel kernel call.
 *
 * A parallel region costs a few microseconds to start and, on a busy machine, a waiting
 * thread can lose a whole scheduler slice at each barrier. Calls whose work (in inner-loop
 * element operations) is below CNN_PARALLEL_MIN_WORK therefore run on one thread.
 *
 * GNU libgomp is not fork-safe: in a child forked after a parallel region (multiprocessing's
 * default start method on Linux, servers that fork workers after loading a model), the next
 * parallel region waits forever for threads that do not exist there. A fork handler marks
 * the child, and every kernel call in it runs on one thread.
 */
#ifndef CNN_THREADS_H
#define CNN_THREADS_H

#include <stddef.h>
#include <pthread.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define CNN_PARALLEL_MIN_WORK 32768

static int cnn_forked_child = 0;

static void cnn_mark_forked_child(void) { cnn_forked_child = 1; }

__attribute__((constructor)) static void cnn_register_fork_handler(void) {
    pthread_atfork(NULL, NULL, cnn_mark_forked_child);
}

/* 1 if the kernels were compiled with OpenMP, else 0. */
static inline int cnn_openmp_enabled(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Threads that a call of this much work uses (1 below the threshold or in a forked child). */
static inline int cnn_threads_for(Py_ssize_t work) {
#ifdef _OPENMP
    if (work >= CNN_PARALLEL_MIN_WORK && !cnn_forked_child) {
        return omp_get_max_threads();
    }
#endif
    (void)work;
    return 1;
}

#endif
