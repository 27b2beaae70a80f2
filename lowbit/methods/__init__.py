"""PTQ methods: one file each, one signature `quantize(W, stats, spec) -> QTensor`.

`stats` carries what calibration measured for the layer (None for methods that need none).
"""

from . import rtn
from .config import MethodConfig
from ..errors import LowbitError
from .rtn import RTN

METHODS = {RTN.name: (RTN, rtn.quantize)}


def config_for(name: str, **kwargs) -> MethodConfig:
    """Build a method's config from its name (the CLI's --method)."""
    if name not in METHODS:
        raise LowbitError(f"unknown method '{name}' (choose one of {', '.join(METHODS)})")
    return METHODS[name][0](**kwargs)


def quantize_weight(w, stats, spec: MethodConfig):
    return METHODS[spec.name][1](w, stats, spec)


__all__ = ["METHODS", "MethodConfig", "RTN", "config_for", "quantize_weight"]
