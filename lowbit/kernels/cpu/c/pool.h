/* The kernels' own thread pool, part of every generated kernel library (driver.h includes it).

   Why our own: torch wheels bundle libgomp; loading a second OpenMP runtime into the
   process would give two thread teams fighting over the same cores. A fixed set of pthreads, sized
   once (`lb_set_threads`, default: physical cores), is all a bandwidth-bound GEMV needs. Workers spin
   for 50 us after each job (a decode step calls hundreds of small kernels back to back, and a futex
   wake-up costs more than a 576x576 GEMV) and then sleep on a condition variable, so they leave the
   cores to torch between forward passes. The calling thread is worker 0. */
#pragma once
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#define LB_RELAX() __builtin_ia32_pause()
#else
#define LB_RELAX() ((void)0)
#endif
#define LB_MAX_THREADS 256

typedef void (*lb_task)(void *arg, int tid, int nthr);

static double lb_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static struct {
    int n, spin, quit;
    unsigned start_gen;  /* gen when the workers were created: what they have already seen */
    pthread_t th[LB_MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint gen;
    atomic_int pending;
    lb_task fn;
    void *arg;
} lb_pool = {1, 50, 0, 0, {0}, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void *lb_worker(void *p) {
    int id = (int)(intptr_t)p;
    unsigned seen = lb_pool.start_gen;
    for (;;) {
        unsigned g;
        double until = lb_now_us() + lb_pool.spin;
        for (int i = 1; (g = atomic_load_explicit(&lb_pool.gen, memory_order_acquire)) == seen; i++) {
            LB_RELAX();
            if (!(i & 255) && lb_now_us() > until) break;
        }
        if (g == seen) {
            pthread_mutex_lock(&lb_pool.mu);
            while ((g = atomic_load(&lb_pool.gen)) == seen) pthread_cond_wait(&lb_pool.cv, &lb_pool.mu);
            pthread_mutex_unlock(&lb_pool.mu);
        }
        seen = g;
        if (lb_pool.quit) return NULL;
        lb_pool.fn(lb_pool.arg, id, lb_pool.n);
        atomic_fetch_sub_explicit(&lb_pool.pending, 1, memory_order_release);
    }
}

static void lb_pool_signal(void) {
    pthread_mutex_lock(&lb_pool.mu);
    atomic_fetch_add_explicit(&lb_pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&lb_pool.cv);
    pthread_mutex_unlock(&lb_pool.mu);
}

static void lb_pool_stop(void) {
    if (lb_pool.n <= 1) return;
    lb_pool.quit = 1;
    lb_pool_signal();
    for (int i = 1; i < lb_pool.n; i++) pthread_join(lb_pool.th[i], NULL);
    lb_pool.quit = 0;
    lb_pool.n = 1;
}

/* A forked child has none of the workers: it runs everything on its one thread. */
static void lb_pool_forget(void) { lb_pool.n = 1; }

/* (Re)size the pool: n threads in all (the caller included); spin = µs a worker spins before sleeping. */
__attribute__((visibility("default"))) int lb_set_threads(int n, int spin) {
    static int forked_handler;
    if (!forked_handler) forked_handler = !pthread_atfork(NULL, NULL, lb_pool_forget);
    if (n < 1) n = 1;
    if (n > LB_MAX_THREADS) n = LB_MAX_THREADS;
    if (spin >= 0) lb_pool.spin = spin;
    if (n == lb_pool.n) return n;
    lb_pool_stop();
    lb_pool.start_gen = atomic_load(&lb_pool.gen);
    for (int i = 1; i < n; i++)
        if (pthread_create(&lb_pool.th[i], NULL, lb_worker, (void *)(intptr_t)i)) { n = i; break; }
    lb_pool.n = n;
    return n;
}

/* Run fn(arg, tid, n) on every thread of the pool and wait for all of them; inline when the
   job wants a single thread (small matrices: waking a worker would cost more than it saves). */
static void lb_pool_run(lb_task fn, void *arg, int want) {
    static pthread_mutex_t one_job = PTHREAD_MUTEX_INITIALIZER;  /* callers from several Python threads */
    if (lb_pool.n <= 1 || want <= 1) { fn(arg, 0, 1); return; }
    pthread_mutex_lock(&one_job);
    lb_pool.fn = fn;
    lb_pool.arg = arg;
    atomic_store(&lb_pool.pending, lb_pool.n - 1);
    lb_pool_signal();
    fn(arg, 0, lb_pool.n);
    while (atomic_load_explicit(&lb_pool.pending, memory_order_acquire) > 0) LB_RELAX();
    pthread_mutex_unlock(&one_job);
}

/* The pool for other native code in the process (the decode engine): one set of threads in all. */
__attribute__((visibility("default"))) void lb_parallel(lb_task fn, void *arg, int want) {
    lb_pool_run(fn, arg, want);
}
