"""Drop-in replacements for nn.Linear / nn.Embedding that hold a QTensor.

The QTensor's tensors are registered as buffers, so `state_dict()` is exactly what io/ stores
(`<module>.qweight`, `<module>.scales`, ...), `.to(device)` moves them, and any HF model keeps working.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .formats import QTensor, from_tensors


class _QuantModule(nn.Module):
    def __init__(self, qt: QTensor):
        super().__init__()
        self.meta = qt.meta()
        self._names = list(qt.tensors())
        for name, t in qt.tensors().items():
            self.register_buffer(name, t)

    @property
    def qtensor(self) -> QTensor:
        return from_tensors(self.meta, {n: getattr(self, n) for n in self._names})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.meta.items())


class QuantLinear(_QuantModule):
    def __init__(self, qt: QTensor, bias: torch.Tensor | None = None):
        super().__init__(qt)
        self.out_features, self.in_features = qt.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._prepared, self._prepared_key = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel's own layout of the weights is built once (kernels.prepare) and kept here; it is
        # rebuilt when the buffers move or are reloaded, or the kernel choice changes.
        key = (x.device.type, kernels.generation())
        if self._prepared_key != key:
            self._prepared, self._prepared_key = kernels.prepare(self.qtensor, x.device.type), key
        return self._prepared(x, self.bias)

    def _apply(self, fn, *args, **kwargs):
        self._prepared_key = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepared_key = None
        return super()._load_from_state_dict(*args, **kwargs)


class QuantEmbedding(_QuantModule):
    """Embedding table stored quantized; rows are looked up in the dequantized table (reference path)."""

    def __init__(self, qt: QTensor, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(qt)
        self.num_embeddings, self.embedding_dim = qt.shape
        self.padding_idx, self.dtype = padding_idx, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qtensor.dequantize(self.dtype), self.padding_idx)
