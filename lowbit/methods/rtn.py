"""Round-to-nearest: no calibration data; optionally an MSE-optimal clipping range per group."""

from dataclasses import dataclass, field

import torch

from ..formats import UniformQ
from .config import MethodConfig


@dataclass(frozen=True)
class RTN(MethodConfig):
    mse_clip: bool = field(default=False, metadata={"help": "search the clipping range per group (least squared error)"})
    name = "rtn"


CONFIG = RTN


def quantize(w: torch.Tensor, stats, spec: RTN) -> UniformQ:
    return UniformQ.from_float(w, spec.bits, spec.group_size, spec.sym, mse_clip=spec.mse_clip)
