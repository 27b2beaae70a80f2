"""Triton kernels for CUDA GPUs (UniformQ and CodebookQ), registered only where triton is installed.

Triton itself is imported on the first CUDA matmul, so `import lowbit` stays fast and works on
machines without triton or a GPU (those run the other kernels or the reference).
"""

import importlib.util

from .. import register


def _prepare(qt):
    from . import triton_linear
    return triton_linear.prepare(qt)


def _linear(x, qt, bias=None):
    from . import triton_linear
    return triton_linear.linear(x, qt, bias)


if importlib.util.find_spec("triton") is not None:
    for _kind in ("uniform", "codebook"):
        register(_kind, "cuda", prepare=_prepare)(_linear)
