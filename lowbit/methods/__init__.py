"""PTQ methods: one file each. A method module defines `CONFIG` (its config dataclass) and either
`quantize(W, stats, spec) -> QTensor` (layer by layer) or `quantize_block(block, targets, stats, spec,
inputs=, kwargs=, fp_outputs=) -> {name: QTensor}` (methods that transform or optimise a whole block).

`stats` carries what calibration measured at each layer's input (None for methods that need none).
"""

from types import ModuleType

from ..errors import LowbitError
from . import awq, ganq, gptq, rtn, signround, teq
from .awq import AWQ
from .config import MethodConfig
from .ganq import GANQ
from .gptq import GPTQ
from .rtn import RTN
from .signround import SignRound
from .teq import TEQ

METHODS: dict[str, ModuleType] = {m.CONFIG.name: m for m in (rtn, gptq, awq, teq, signround, ganq)}


def config_for(name: str, configs: dict[str, type] | None = None, **kwargs) -> MethodConfig:
    """Build a method's config from its name (the CLI's --method); `configs` adds names beyond the
    methods (the api adds recipes such as "auto")."""
    table = {**{n: m.CONFIG for n, m in METHODS.items()}, **(configs or {})}
    if name not in table:
        raise LowbitError(f"unknown method '{name}' (choose one of {', '.join(table)})")
    cls = table[name]
    unknown = set(kwargs) - set(cls.__dataclass_fields__)
    if unknown:
        raise LowbitError(f"method '{name}' has no option {', '.join(sorted(unknown))}")
    return cls(**kwargs)


def quantize_weight(w, stats, spec: MethodConfig):
    return METHODS[spec.name].quantize(w, stats, spec)


__all__ = ["AWQ", "GANQ", "GPTQ", "METHODS", "MethodConfig", "RTN", "SignRound", "TEQ", "config_for", "quantize_weight"]
