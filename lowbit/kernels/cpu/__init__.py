"""Generated CPU kernels (QIGen-style): Python writes the C that varies per format, bits and ISA,
#includes the fixed C of c/, compiles it once.

    isa.py        what this CPU runs (flags, caches, physical cores)
    layout.py     the SIMD bit layout of a 32-code block, repacked at load time
    perf_model.py tile sizes and thread count from cache sizes, vector width and threads
    tune.py       `lowbit tune`: times the model's constants on this machine, caches the winners
    codegen.py    the C for one ISA, and its entry points (the kernel table's CPU rows)
    c/            the fixed C: driver.h (the drivers around the kernels), pool.h (the kernels' own
                  pthread pool, so no second OpenMP runtime is loaded), args.h (lb_args, one call's
                  arguments, with one block per format), avx2.h / avx512.h / scalar.h (ISA helpers)
    build.py      compile + cache by hash + ctypes (build.Args is parsed from c/args.h)
    threads.py    the thread count ($LOWBIT_THREADS)
    uniform.py    UniformQ: prepare (repack) once per layer, then one C call per matmul
    codebook.py   CodebookQ: the same, with a table lookup for "scale × (q − zero)" and CSR outliers
    float16.py    unquantized fp16 weights through the same GEMV/GEMM drivers (the engine's float layers)
    tender.py     W·A· layers (Tender and its baselines): the integer kernel of c/tender.h
    kquant.py     GGUF K-quant blocks as stored (c/kquant.h), fp32 or q8_K activations
    logit_scores  eval's per-row log-loss and KL over a window's logits, one native pass (.py + .c)
"""

from .threads import set_threads

__all__ = ["set_threads"]
