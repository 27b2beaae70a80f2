"""Triton kernels for CUDA GPUs (UniformQ and CodebookQ): the kernel table's "triton" rows.

One pair of Triton kernels serves every bits of both kinds (BITS is a constexpr), so the rows are the
formats' bit widths. triton_linear.py imports triton itself only on the first launch, so `import
lowbit` stays fast and works on machines without triton or a GPU (those run the other kernels or the
reference); the rows count as available only where triton is installed.
"""

from importlib.util import find_spec

from ...formats import BITS, CODEBOOK_BITS
from ..cpu.codegen import Entry
from . import triton_linear

ISA = "triton"
AVAILABLE = find_spec("triton") is not None
ENTRIES = tuple(Entry(kind, b, "float", "triton_linear._gemv/_gemm")
                for kind, bits in (("uniform", BITS), ("codebook", CODEBOOK_BITS)) for b in bits)
prepare = triton_linear.prepare
