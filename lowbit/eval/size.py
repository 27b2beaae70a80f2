"""What a quantized model costs in memory: bytes and bits per weight, per layer and in total."""

from dataclasses import dataclass

from torch import nn

from ..formats import describe
from ..formats.activation import ActQ
from ..kernels import kernel_for


@dataclass
class LayerSize:
    name: str
    meta: dict
    params: int  # weights represented
    nbytes: int  # bytes stored for them (codes, scales, zeros)
    kernel: str  # the kernel-table row its matmuls run on this CPU (kernels.kernel_for), or "reference"
    shares: str | None = None  # the layer whose tensors it holds (a tied head quantized once): counted once
    act: dict | None = None  # its activation spec's meta, when it quantizes its input too (formats/activation.py)
    act_order: bool = False  # its input is permuted (nn.QuantLinear.in_perm: an act-order GPTQ import)

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / self.params

    @property
    def format(self) -> str:
        """The stored format in a few words ("uniform 4b g32 sym", "uniform 4b g32 asym act-order",
        "uniform 8b g128 sym A8 tender G8 c256"); act-order: its groups are not contiguous runs of the
        input, so GGUF refits it and compressed-tensors refuses it."""
        return (describe(self.meta) + (" act-order" if self.act_order else "")
                + ("" if self.act is None else " " + ActQ.describe(self.act)))


@dataclass
class FloatTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32"
    nbytes: int


@dataclass
class ModelSize:
    layers: list[LayerSize]
    floats: list[FloatTensor]  # every tensor left in float (norms, biases, an unquantized head), tied ones once
    total_bytes: int  # every tensor the model holds (float ones included), tied ones once
    total_params: int  # weights represented, quantized or not

    @property
    def quantized_bpw(self) -> float:
        """Bits per weight over the quantized layers only (a shared layer's weights counted once)."""
        own = [s for s in self.layers if s.shares is None]
        params = sum(s.params for s in own)
        return 8 * sum(s.nbytes for s in own) / params if params else 0.0

    @property
    def model_bpw(self) -> float:
        return 8 * self.total_bytes / self.total_params


def model_size(model: nn.Module) -> ModelSize:
    layers, owners = [], {}
    for name, m in model.named_modules():
        if hasattr(m, "qtensor"):
            qt = m.qtensor
            kernel = kernel_for(qt) if hasattr(m, "in_features") else "lookup (dequantized rows)"  # an embedding
            key = tuple(t.data_ptr() for t in m.buffers(recurse=False))
            layers.append(LayerSize(name, dict(m.meta), qt.shape[0] * qt.shape[1], qt.nbytes, kernel, owners.get(key),
                                    getattr(m, "act_meta", None), getattr(m, "in_perm", None) is not None))
            owners.setdefault(key, name)
    params = list(model.parameters())  # shared (tied) parameters appear once
    floats = [FloatTensor(name, tuple(p.shape), str(p.dtype).removeprefix("torch."), p.numel() * p.element_size())
              for name, p in model.named_parameters()]
    return ModelSize(layers, floats,
                     sum(p.numel() * p.element_size() for p in params) + sum(s.nbytes for s in layers if s.shares is None),
                     sum(p.numel() for p in params) + sum(s.params for s in layers if s.shares is None))
