/* Thread count for one parallel kernel call; included by every kernel module.
 *
 * A parallel region costs a few microseconds to start and, on a busy machine, a waiting
 * thread can lose a whole scheduler slice at each barrier. Calls whose work (in inner-loop
 * element operations) is below CNN_PARALLEL_MIN_WORK therefore run on one thread.
 *
 * GNU libgomp is not fork-safe: in a child forked after the parent ran a parallel region with
 * several threads, the next such region waits forever for threads that do not exist there.
 * Each module records whether it ran one (cnn_parallel_used); cnnserve/_ext/__init__.py
 * checks every module before a fork and, in the child, makes all of them single-threaded
 * (cnn_single_threaded). The flags are per module (each extension is its own shared object),
 * which is why the decision is taken in Python, across modules.
 */
#ifndef CNN_THREADS_H
#define CNN_THREADS_H

#include <stddef.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define CNN_PARALLEL_MIN_WORK 32768

static int cnn_parallel_used = 0;
static int cnn_single_threaded = 0;

/* 1 once a kernel of this module has run a parallel region with several threads. */
static inline int cnn_parallel_was_used(void) { return cnn_parallel_used; }

/* Make every kernel of this module run on the calling thread (flag 1), or not (0). */
static inline void cnn_set_single_threaded(int flag) { cnn_single_threaded = flag ? 1 : 0; }

/* 1 if the kernels were compiled with OpenMP, else 0. */
static inline int cnn_openmp_enabled(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Threads that a call with this much work would run on (a query: changes nothing). */
static inline int cnn_thread_count(ptrdiff_t work) {
#ifdef _OPENMP
    if (work >= CNN_PARALLEL_MIN_WORK && !cnn_single_threaded) {
        return omp_get_max_threads();
    }
#endif
    (void)work;
    return 1;
}

/* Threads for a kernel call about to run, recording when it uses more than one. */
static inline int cnn_threads_for(ptrdiff_t work) {
    int threads = cnn_thread_count(work);
    if (threads > 1) {
        cnn_parallel_used = 1;
    }
    return threads;
}

/* The thread count a caller computed earlier (from Python, with threads_for) for a kernel
 * call about to run: at least 1, 1 in a single-threaded module, and recorded when above 1,
 * as by cnn_threads_for. */
static inline int cnn_threads_given(int threads) {
    if (threads < 1 || cnn_single_threaded) {
        threads = 1;
    }
    if (threads > 1) {
        cnn_parallel_used = 1;
    }
    return threads;
}

#endif
