"""PTQ methods: one file each, one signature `quantize(W, stats, spec) -> QTensor`.

`stats` carries what calibration measured for the layer (None for methods that need none).
"""

from . import gptq, rtn
from .config import MethodConfig
from ..errors import LowbitError
from .gptq import GPTQ
from .rtn import RTN

METHODS = {RTN.name: (RTN, rtn.quantize), GPTQ.name: (GPTQ, gptq.quantize)}


def config_for(name: str, **kwargs) -> MethodConfig:
    """Build a method's config from its name (the CLI's --method)."""
    if name not in METHODS:
        raise LowbitError(f"unknown method '{name}' (choose one of {', '.join(METHODS)})")
    cls = METHODS[name][0]
    unknown = set(kwargs) - set(cls.__dataclass_fields__)
    if unknown:
        raise LowbitError(f"method '{name}' has no option {', '.join(sorted(unknown))}")
    return cls(**kwargs)


def quantize_weight(w, stats, spec: MethodConfig):
    return METHODS[spec.name][1](w, stats, spec)


__all__ = ["GPTQ", "METHODS", "MethodConfig", "RTN", "config_for", "quantize_weight"]
