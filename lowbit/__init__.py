"""lowbit: quantize Hugging Face causal LMs to 2-8 bits and run them on the hardware you have.

    import lowbit
    q = lowbit.quantize("default", lowbit.GPTQ(bits=4, group_size=128))   # a QuantizedModel
    q.save("smollm2-w4")
    q = lowbit.load("smollm2-w4")
    text, stats = q.generate("Once upon a time")

The names below are imported on first use (PEP 562): `import lowbit` alone, and the `lowbit` command
before it has parsed its arguments, do not pay for importing torch and transformers.
"""

import importlib

from .errors import LowbitError

_HOME = {"QuantizedModel": "api", "export": "api", "load": "api", "quantize": "api", "quantize_to": "api",
         "read_recipe": "api", "recipe": "api",
         "QTensor": "formats", "UniformQ": "formats", "Auto": "recipes", "Plan": "recipes", "QuantX": "recipes",
         **dict.fromkeys(["AWQ", "GANQ", "GPTQ", "RTN", "TEQ", "MethodConfig", "SignRound"], "methods")}

__all__ = sorted([*_HOME, "LowbitError"])


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value
