"""Drop-in replacements for nn.Linear / nn.Embedding that hold a QTensor.

The QTensor's tensors are registered as buffers, so `state_dict()` is exactly what io/ stores
(`<module>.qweight`, `<module>.scales`, ...), `.to(device)` moves them, and any HF model keeps working.
ActQuantLinear also quantizes its input at run time (an ActQ, formats/activation.py: W·A· models).
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .formats import QTensor, from_tensors
from .formats.activation import ActQ


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


class _LinearBase(_QuantModule):
    """A QTensor as a linear layer's weights, with the kernel's prepared layout kept here."""

    def __init__(self, qt: QTensor, bias: torch.Tensor | None = None):
        super().__init__(qt)
        self.out_features, self.in_features = qt.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._prepared, self._prepared_key = None, None

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        # The kernel's own layout of the weights is built once (kernels.prepare) and kept here; it is
        # rebuilt when the buffers move or are reloaded, or the kernel choice changes.
        key = (x.device.type, kernels.generation())
        if self._prepared_key != key:
            self._prepared, self._prepared_key = self._bind(x.device.type), key
        return self._prepared(x, self.bias)

    def _bind(self, device: str) -> kernels.Bound:
        return kernels.prepare(self.qtensor, device)

    def _apply(self, fn, *args, **kwargs):
        self._prepared_key = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._prepared_key = None
        return super()._load_from_state_dict(*args, **kwargs)


class QuantLinear(_LinearBase):
    """A linear layer on a QTensor. `in_perm` (optional, int32 [in_features], a permutation): the
    weights' columns are stored in that order, the layer computes x[..., in_perm]·Wᵀ (+ bias) — a GPTQ
    act-order checkpoint's scattered groups made contiguous (io/gptq.py), so every kernel runs it as
    is. A buffer: saved and loaded with the model."""

    def __init__(self, qt: QTensor, bias: torch.Tensor | None = None, in_perm: torch.Tensor | None = None):
        super().__init__(qt, bias)
        self.register_buffer("in_perm", None if in_perm is None else in_perm.to(torch.int32).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x if self.in_perm is None else x.index_select(-1, self.in_perm))


class ActQuantLinear(_LinearBase):
    """A linear layer whose input is quantized too (W·A·, formats/activation.py): the integer kernel
    (kernels.prepare_act: Tender's, on VNNI CPUs) or x → x̂ (the ActQ's fake quantization, in the
    weights' stored channel order) through the weight kernel, plus the (folded) bias. A class of its
    own, not a QuantLinear: whatever runs QuantLinear's weights alone must not take it for one (the
    native engine runs it through the same integer kernel, runtime/engine.py). The ActQ's tensors are
    buffers `act_<name>`; `act_meta` its stored meta."""

    def __init__(self, qt: QTensor, act: ActQ, bias: torch.Tensor | None = None):
        super().__init__(qt, bias)
        self.act_meta = act.meta()
        self._act_names = list(act.tensors())
        for name, t in act.tensors().items():
            self.register_buffer("act_" + name, t)

    @property
    def act(self) -> ActQ:
        return ActQ.from_tensors(self.act_meta, {n: getattr(self, "act_" + n) for n in self._act_names})

    def _bind(self, device: str) -> kernels.Bound:
        return kernels.prepare_act(self.qtensor, self.act, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", act=" + ActQ.describe(self.act_meta)


class QuantEmbedding(_QuantModule):
    """Embedding table stored quantized; rows are looked up in the dequantized table (reference path)
    and multiplied by `embed_scale`, the scale of the embedding it replaces (Gemma's √hidden: see
    `embedding_scale`), as the engine multiplies them."""

    def __init__(self, qt: QTensor, padding_idx: int | None = None, dtype: torch.dtype = torch.float32,
                 embed_scale: float = 1.0):
        super().__init__(qt)
        self.num_embeddings, self.embedding_dim = qt.shape
        self.padding_idx, self.dtype, self.embed_scale = padding_idx, dtype, embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qtensor.dequantize(self.dtype), self.padding_idx)
        return rows if self.embed_scale == 1.0 else rows * torch.tensor(self.embed_scale, dtype=self.dtype)


def embedding_scale(module: nn.Module) -> float:
    """The factor an embedding module multiplies its rows by (transformers' scaled word embeddings,
    Gemma: √hidden, kept as `embed_scale`), 1.0 for a plain nn.Embedding."""
    return float(getattr(module, "embed_scale", 1.0))
