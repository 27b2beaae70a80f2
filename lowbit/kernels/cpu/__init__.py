"""Generated CPU kernels (QIGen-style): Python writes C per bit width and ISA, compiles it once.

    isa.py        what this CPU runs (flags, caches, physical cores)
    layout.py     the SIMD bit layout of a 32-code block, repacked at load time
    perf_model.py tile sizes and thread count from cache sizes, vector width and threads
    tune.py       `lowbit tune`: times the model's constants on this machine, caches the winners
    pool.py       the kernels' own pthread pool (C), so no second OpenMP runtime is loaded
    codegen.py    the C source for one ISA
    build.py      compile + cache by hash + ctypes
    threads.py    the thread count ($LOWBIT_THREADS)
    uniform.py    UniformQ: prepare (repack) once per layer, then one C call per matmul
    codebook.py   CodebookQ: the same, with a table lookup for "scale × (q − zero)" and CSR outliers
"""

from .. import register
from . import codebook, uniform
from .threads import set_threads

register("uniform", "cpu", prepare=uniform.prepare)(uniform.linear)
register("codebook", "cpu", prepare=codebook.prepare)(codebook.linear)

__all__ = ["set_threads"]
