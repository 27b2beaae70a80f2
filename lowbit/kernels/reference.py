"""The oracle: dequantize with the format's own reference, then an ordinary float matmul.

Every faster kernel is tested against this one; it works for every QTensor kind on every device.
"""

import torch
import torch.nn.functional as F

from ..formats import QTensor


def linear(x: torch.Tensor, qt: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, qt.dequantize(x.dtype).to(x.device), bias)
