"""The QTensor contract: the one thing methods produce, io stores and kernels consume.

A QTensor is a quantized 2-D weight [out_features, in_features]. Every kind (uniform affine,
codebook, ...) provides the same five things, so callers never branch on the kind:
  - `dequantize()`  the reference float weight (kernels are checked against it);
  - `tensors()`     the named tensors that are stored (safetensors names get the module prefix);
  - `meta()`        a JSON-able description (kind + parameters) for config.json;
  - `from_tensors(meta, tensors)`  the inverse of the two above;
  - `bits_per_weight` / `nbytes`  the honest storage cost, scales and zeros included;
  - `describe(meta)`  one short human line for a stored meta ("uniform 4b g32 sym"), as `lowbit inspect` prints.
"""

from __future__ import annotations

from typing import ClassVar

import torch


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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])
