"""lowbit: quantize Hugging Face causal LMs to 2-8 bits and run them on the hardware you have.

    import lowbit
    q = lowbit.quantize("default", lowbit.GPTQ(bits=4, group_size=128))   # a QuantizedModel
    q.save("smollm2-w4")
    q = lowbit.load("smollm2-w4")
    text, stats = q.generate("Once upon a time")
"""

from .api import QuantizedModel, load, quantize, quantize_to
from .errors import LowbitError
from .formats import QTensor, UniformQ
from .methods import AWQ, GANQ, GPTQ, RTN, TEQ, MethodConfig, SignRound
from .recipes import Auto, Plan

__all__ = ["AWQ", "Auto", "GANQ", "GPTQ", "RTN", "SignRound", "TEQ", "LowbitError", "MethodConfig", "Plan",
           "QTensor", "QuantizedModel", "UniformQ", "load", "quantize", "quantize_to"]
