/* A caching allocator for NumPy arrays (NEP 49 memory handler), used by memory.pyx.
 *
 * A training step allocates the same large arrays every time (activations, gradients, the
 * optimizer's new state) and frees them at the end of the step. glibc hands blocks of
 * several MiB back to the kernel when they are freed, so every step page-faults its arrays
 * in again: about 1 ms per 6 MiB array, a fifth of a small network's step. This handler
 * keeps freed blocks of 1 MiB or more (up to cnn_cache_limit bytes in all, the oldest
 * giving way to the newest) and hands them out again for allocations of exactly that size. Smaller blocks, calloc (fresh zero
 * pages are free) and realloc go straight to the C library. The handler is installed only
 * in the context of cnnserve's training code (memory.pyx); an array keeps the handler it was
 * allocated with, so whoever frees it later frees it here.
 */
#ifndef CNN_MEMORY_H
#define CNN_MEMORY_H

#include <Python.h>
#include <numpy/ndarraytypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define CNN_CACHE_MIN_BLOCK ((size_t)1 << 20)
#define CNN_CACHE_SLOTS 128

typedef struct {
    void *ptr;
    size_t size;
} cnn_cached_block;

static cnn_cached_block cnn_cache[CNN_CACHE_SLOTS];
static size_t cnn_cache_count = 0, cnn_cache_bytes = 0;
static size_t cnn_cache_limit = (size_t)256 << 20;
static unsigned long long cnn_cache_hits = 0, cnn_cache_misses = 0;
static pthread_mutex_t cnn_cache_lock = PTHREAD_MUTEX_INITIALIZER;

static void *cnn_cache_take(size_t size) {
    void *p = NULL;
    pthread_mutex_lock(&cnn_cache_lock);
    for (size_t i = cnn_cache_count; i-- > 0;) {
        if (cnn_cache[i].size == size) {
            p = cnn_cache[i].ptr;
            cnn_cache[i] = cnn_cache[--cnn_cache_count];
            cnn_cache_bytes -= size;
            break;
        }
    }
    if (p != NULL) cnn_cache_hits++; else cnn_cache_misses++;
    pthread_mutex_unlock(&cnn_cache_lock);
    return p;
}

static void *cnn_mem_malloc(void *ctx, size_t size) {
    (void)ctx;
    if (size >= CNN_CACHE_MIN_BLOCK) {
        void *p = cnn_cache_take(size);
        if (p != NULL) return p;
        p = malloc(size);
#ifdef MADV_HUGEPAGE
        /* as NumPy's own allocator does for large arrays: fewer TLB misses */
        if (p != NULL && size >= ((size_t)1 << 22)) {
            const size_t page = 4096;
            char *start = (char *)(((size_t)p + page - 1) & ~(page - 1));
            char *end = (char *)p + size;
            if (end > start) madvise(start, (size_t)(end - start) & ~(page - 1), MADV_HUGEPAGE);
        }
#endif
        return p;
    }
    return malloc(size ? size : 1);
}

static void *cnn_mem_calloc(void *ctx, size_t nelem, size_t elsize) {
    (void)ctx;
    return calloc(nelem ? nelem : 1, elsize ? elsize : 1);
}

static void *cnn_mem_realloc(void *ctx, void *ptr, size_t new_size) {
    (void)ctx;
    return realloc(ptr, new_size ? new_size : 1);
}

/* Keep a freed block for reuse. When the cache is full, older blocks make room: the block
 * just freed is the likeliest to be needed again (the next step allocates the same sizes),
 * so a change of sizes (a validation pass, a larger batch) turns the cache over instead of
 * leaving it full of sizes nobody asks for. */
static void cnn_mem_free(void *ctx, void *ptr, size_t size) {
    (void)ctx;
    if (ptr != NULL && size >= CNN_CACHE_MIN_BLOCK && size <= cnn_cache_limit) {
        void *evicted[CNN_CACHE_SLOTS];
        size_t n_evicted = 0;
        pthread_mutex_lock(&cnn_cache_lock);
        while (cnn_cache_count > 0 && (cnn_cache_count == CNN_CACHE_SLOTS ||
                                       cnn_cache_bytes + size > cnn_cache_limit)) {
            evicted[n_evicted++] = cnn_cache[0].ptr;
            cnn_cache_bytes -= cnn_cache[0].size;
            cnn_cache[0] = cnn_cache[--cnn_cache_count];
        }
        cnn_cache[cnn_cache_count].ptr = ptr;
        cnn_cache[cnn_cache_count].size = size;
        cnn_cache_count++;
        cnn_cache_bytes += size;
        pthread_mutex_unlock(&cnn_cache_lock);
        for (size_t i = 0; i < n_evicted; i++) free(evicted[i]);  /* outside the lock */
        return;
    }
    free(ptr);
}

/* Free every cached block; returns the bytes released. */
static size_t cnn_cache_release(void) {
    size_t released;
    pthread_mutex_lock(&cnn_cache_lock);
    released = cnn_cache_bytes;
    for (size_t i = 0; i < cnn_cache_count; i++) free(cnn_cache[i].ptr);
    cnn_cache_count = 0;
    cnn_cache_bytes = 0;
    pthread_mutex_unlock(&cnn_cache_lock);
    return released;
}

/* In a child after fork() the lock may have been held by a thread that does not exist
 * there: start with a fresh lock (the cached blocks are the child's copies, still valid). */
static void cnn_cache_after_fork_in_child(void) {
    pthread_mutex_init(&cnn_cache_lock, NULL);
}

static PyDataMem_Handler cnn_mem_handler = {
    "cnnserve_array_cache",
    1,
    {NULL, cnn_mem_malloc, cnn_mem_calloc, cnn_mem_realloc, cnn_mem_free},
};

#endif
