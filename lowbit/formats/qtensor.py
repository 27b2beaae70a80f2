"""The QTensor contract: the one thing methods produce, io stores and kernels consume.

A QTensor is a quantized 2-D weight [out_features, in_features]. Every kind (uniform affine,
codebook, ...) provides the same five things, so callers never branch on the kind:
  - `dequantize()`  the reference float weight (kernels are checked against it);
  - `tensors()`     the named tensors that are stored (safetensors names get the module prefix);
  - `meta()`        a JSON-able description (kind + parameters) for config.json;
  - `from_tensors(meta, tensors)`  the inverse of the two above;
  - `bits_per_weight` / `nbytes`  the honest storage cost, scales and zeros included;
  - `describe(meta)`  one short human line for a stored meta ("uniform 4b g32 sym"), as `lowbit inspect` prints;
  - `layout(meta)`   the tensors a stored meta needs (shape, dtype), after checking every field of it,
                     so `check(meta, tensors)` refuses a damaged file before anything runs on it (shapes
                     from a file's header alone, as meta tensors, or real tensors: then NaN, Inf and
                     codes out of range are refused too; a NaN scale would decode to garbage silently).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import LowbitError

MAX_DIM = 1 << 24  # no weight of any model has a side this long; a larger one is a damaged file


def check_shape(meta: dict) -> tuple[int, int]:
    """The [out, in] shape a stored meta records, checked."""
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and
            all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in shape)):
        raise LowbitError(f"shape {shape!r} is not two positive integers")
    return shape[0], shape[1]


def check_int(meta: dict, name: str, allowed: tuple[int, ...]) -> int:
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
        raise LowbitError(f"{name} {value!r} is not one of {', '.join(map(str, allowed))}")
    return value


class QTensor:
    kind: ClassVar[str]
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def meta(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> QTensor:
        raise NotImplementedError

    @staticmethod
    def describe(meta: dict) -> str:
        raise NotImplementedError

    @classmethod
    def layout(cls, meta: dict) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype, bool]]:
        """name -> (shape, None when it varies; dtype; required) of the stored tensors of `meta`,
        after checking its fields (a LowbitError naming the bad one)."""
        raise NotImplementedError

    @classmethod
    def check_values(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Kind-specific checks of real tensors (codes and indices in range)."""

    @classmethod
    def check(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """A LowbitError (naming the problem, not the module: the caller knows it) unless `tensors`
        are what `meta` describes; real tensors must also be finite and in range."""
        expected = cls.layout(meta)
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise LowbitError(f"holds unexpected tensor '{extra[0]}'")
        for name, (shape, dtype, required) in expected.items():
            t = tensors.get(name)
            if t is None:
                if required:
                    raise LowbitError(f"lacks tensor '{name}'")
                continue
            if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
                want = "×".join(map(str, shape)) if shape is not None else "any shape"
                raise LowbitError(f"tensor '{name}' is {str(t.dtype)[6:]} {'×'.join(map(str, t.shape))}, "
                                  f"expected {str(dtype)[6:]} {want}")
        if any(t.is_meta for t in tensors.values()):
            return
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LowbitError(f"'{name}' holds NaN or Inf")
        cls.check_values(meta, tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])
