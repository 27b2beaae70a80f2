/* llama.cpp's CPU matmul, alone: y = ggml_mul_mat(W, x) for one quantized weight, timed as ggml runs it.

   Built and run by benchmarks/peers/ggml_matmul.py against the ggml of the llama-cpp-python scratch venv
   (never part of lowbit). W (N×K, random fp32) is quantized with ggml_quantize_chunk and placed, as
   llama.cpp's model loader does by default, in the first CPU "extra" buffer type that takes the op
   (CPU_REPACK: interleaved Q4_0/Q4_K for AVX2), else in the plain CPU buffer. The weight buffer is
   madvised to transparent huge pages before it is written. x (K×M fp32) is quantized by the op itself
   (to Q8_0 / Q8_K), as in a real model, and counts in the time.

   usage: ggml_matmul N K TYPE THREADS COLD_BYTES M [M ...]     TYPE: q4_0 | q4_K | q8_0
   Prints one JSON line. For every M: hot_ms (the same W every call: it stays in cache when it fits) and,
   when COLD_BYTES > 0 and M == 1, cold_ms (rotating through enough copies of W to total > COLD_BYTES
   and at least 2, so every call reads W from DRAM). Each time is the median over 5 runs of the per-call
   time of enough calls to last 0.3 s. rel_err: y of the first 64 rows against the fp32 W·x (a check that
   the graph computes the product). A type whose block does not divide K prints {"error": ...}. */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

enum { MAX_M = 8, REPS = 5 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median seconds per call over REPS runs, each run cycling through the graphs in order. */
static double timeit(ggml_backend_t be, struct ggml_cgraph **g, int n) {
    for (int i = 0; i < n; i++) ggml_backend_graph_compute(be, g[i]);
    double t0 = now();
    for (int i = 0; i < n; i++) ggml_backend_graph_compute(be, g[i]);
    double once = (now() - t0) / n;
    long calls = (long)(0.3 / (once > 1e-7 ? once : 1e-7));
    calls = calls < n ? n : (calls + n - 1) / n * n;
    double runs[REPS];
    for (int r = 0; r < REPS; r++) {
        t0 = now();
        for (long c = 0; c < calls; c++) ggml_backend_graph_compute(be, g[c % n]);
        runs[r] = (now() - t0) / calls;
    }
    qsort(runs, REPS, sizeof runs[0], cmp);
    return runs[REPS / 2];
}

/* kB of the mapping holding p that sit in transparent huge pages (/proc/self/smaps), -1 if unknown. */
static long huge_kb(const void *p) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return -1;
    char line[512];
    int inside = 0;
    long kb = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) inside = (uintptr_t)p >= lo && (uintptr_t)p < hi;  /* a mapping */
        else if (inside && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
    }
    fclose(f);
    return kb;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s N K q4_0|q4_K|q8_0 THREADS COLD_BYTES M [M ...]\n", argv[0]);
        return 2;
    }
    int64_t n = atoll(argv[1]), k = atoll(argv[2]);
    const char *tname = argv[3];
    int threads = atoi(argv[4]);
    double cold_bytes = atof(argv[5]);
    int nm = argc - 6 < MAX_M ? argc - 6 : MAX_M, ms[MAX_M];
    for (int i = 0; i < nm; i++) ms[i] = atoi(argv[6 + i]);
    enum ggml_type type = !strcmp(tname, "q4_0") ? GGML_TYPE_Q4_0 : !strcmp(tname, "q4_K") ? GGML_TYPE_Q4_K
                        : !strcmp(tname, "q8_0") ? GGML_TYPE_Q8_0 : GGML_TYPE_COUNT;
    if (type == GGML_TYPE_COUNT) {
        fprintf(stderr, "unknown type %s\n", tname);
        return 2;
    }
    if (k % ggml_blck_size(type)) {
        printf("{\"error\": \"K=%lld is not a multiple of %s's block of %lld\"}\n", (long long)k, tname,
               (long long)ggml_blck_size(type));
        return 0;
    }

    /* the weight, quantized once by ggml */
    size_t wbytes = ggml_row_size(type, k) * n;
    float *src = malloc(sizeof(float) * n * k);
    void *q = malloc(wbytes);
    uint64_t s = 0x9E3779B97F4A7C15ull;
    float amp = sqrtf(3.0f / k);
    for (int64_t i = 0; i < n * k; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        src[i] = amp * ((float)(s >> 40) / (float)(1 << 23) - 1.0f);
    }
    ggml_quantize_chunk(type, src, q, 0, n, k, NULL);

    int copies = cold_bytes > 0 ? (int)(cold_bytes / wbytes) + 1 : 1;
    if (cold_bytes > 0 && copies < 2) copies = 2;

    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, threads);
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
    struct ggml_threadpool *tp = ggml_threadpool_new(&tpp);
    ggml_backend_cpu_set_threadpool(be, tp);
    ggml_backend_dev_t dev = ggml_backend_get_device(be);

    int ngraph = copies * nm;
    struct ggml_init_params pw = {ggml_tensor_overhead() * copies + 1024, NULL, true};
    struct ggml_init_params pc = {ggml_tensor_overhead() * (nm + ngraph) + ggml_graph_overhead() * ngraph + 4096,
                                  NULL, true};
    struct ggml_context *cw = ggml_init(pw), *cc = ggml_init(pc);
    struct ggml_tensor *w[copies], *x[MAX_M];
    struct ggml_cgraph *g[MAX_M][copies];
    for (int c = 0; c < copies; c++) w[c] = ggml_new_tensor_2d(cw, type, k, n);
    for (int i = 0; i < nm; i++) {
        x[i] = ggml_new_tensor_2d(cc, GGML_TYPE_F32, k, ms[i]);
        for (int c = 0; c < copies; c++) {
            g[i][c] = ggml_new_graph(cc);
            ggml_build_forward_expand(g[i][c], ggml_mul_mat(cc, w[c], x[i]));
        }
    }

    /* the buffer type llama.cpp would pick: the first extra one whose supports_op takes this matmul */
    ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(dev);
    ggml_backend_dev_get_extra_bufts_t extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    struct ggml_tensor *op = ggml_graph_node(g[0][0], -1);
    for (ggml_backend_buffer_type_t *b = extra ? extra(dev) : NULL; b && *b; b++) {
        ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(*b, 0);
        w[0]->buffer = dummy;
        int ok = ggml_backend_dev_supports_op(dev, op);
        w[0]->buffer = NULL;
        ggml_backend_buffer_free(dummy);
        if (ok) { buft = *b; break; }
    }

    ggml_backend_buffer_t bw = ggml_backend_alloc_ctx_tensors_from_buft(cw, buft);
    ggml_backend_buffer_set_usage(bw, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    uintptr_t base = (uintptr_t)ggml_backend_buffer_get_base(bw), page = 4096;
    uintptr_t lo = (base + page - 1) & ~(page - 1), hi = (base + ggml_backend_buffer_get_size(bw)) & ~(page - 1);
    int thp = hi > lo && madvise((void *)lo, hi - lo, MADV_HUGEPAGE) == 0;
    for (int c = 0; c < copies; c++) ggml_backend_tensor_set(w[c], q, 0, wbytes);
    free(q);
    ggml_backend_buffer_t bc = ggml_backend_alloc_ctx_tensors(cc, be);
    float *x0 = NULL;  /* the first token of the first M, kept for the check */
    for (int i = 0; i < nm; i++) {
        size_t nx = (size_t)k * ms[i];
        float *xv = malloc(sizeof(float) * nx);
        for (size_t j = 0; j < nx; j++) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; xv[j] = (float)(s >> 40) / (1 << 23) - 1; }
        ggml_backend_tensor_set(x[i], xv, 0, sizeof(float) * nx);
        if (i) free(xv); else x0 = xv;
    }

    /* check: the first rows of y for token 0 against the fp32 W·x (quantization error only: ~1e-2) */
    ggml_backend_graph_compute(be, g[0][0]);
    int rows = n < 64 ? (int)n : 64;
    float y0[64];
    ggml_backend_tensor_get(ggml_graph_node(g[0][0], -1), y0, 0, sizeof(float) * rows);
    double err = 0, ref = 0;
    for (int r = 0; r < rows; r++) {
        double d = 0;
        for (int64_t j = 0; j < k; j++) d += (double)src[r * k + j] * x0[j];
        err += (y0[r] - d) * (y0[r] - d); ref += d * d;
    }
    free(src); free(x0);

    printf("{\"type\": \"%s\", \"n\": %lld, \"k\": %lld, \"threads\": %d, \"buffer\": \"%s\", \"weight_bytes\": %zu, "
           "\"copies\": %d, \"thp_madvise\": %s, \"huge_kb\": %ld, \"rel_err\": %.2g, \"runs\": [", tname, (long long)n,
           (long long)k, threads, ggml_backend_buft_name(buft), wbytes, copies, thp ? "true" : "false",
           huge_kb((void *)lo), sqrt(err / (ref > 0 ? ref : 1)));
    for (int i = 0; i < nm; i++) {
        printf("%s{\"m\": %d, \"hot_ms\": %.6f", i ? ", " : "", ms[i], 1e3 * timeit(be, g[i], 1));
        if (copies > 1 && ms[i] == 1) printf(", \"cold_ms\": %.6f", 1e3 * timeit(be, g[i], copies));
        printf("}");
        fflush(stdout);
    }
    printf("]}\n");
    ggml_backend_buffer_free(bc);
    ggml_backend_buffer_free(bw);
    ggml_free(cc);
    ggml_free(cw);
    ggml_backend_free(be);
    ggml_threadpool_free(tp);
    return 0;
}
