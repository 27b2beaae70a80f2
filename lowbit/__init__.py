"""lowbit: quantize Hugging Face causal LMs to 2-8 bits and run them on the hardware you have.

    import lowbit
    q = lowbit.quantize("default", lowbit.RTN(bits=4, group_size=128))
    lowbit.save(q, "smollm2-w4")
    m = lowbit.load("smollm2-w4")
"""

from .api import evaluate_model, load, quantize, quantize_to, save
from .runtime import generate
from .errors import LowbitError
from .formats import QTensor, UniformQ
from .methods import AWQ, GANQ, GPTQ, RTN, TEQ, MethodConfig, SignRound
from .recipes import Auto

__all__ = ["AWQ", "Auto", "GANQ", "GPTQ", "RTN", "SignRound", "TEQ", "LowbitError", "MethodConfig", "QTensor", "UniformQ", "evaluate_model", "generate", "load",
           "quantize", "quantize_to", "save"]
