"""Running quantized models: QuantLinear inside any HF model, and generation."""

from .generate import GenerationStats, generate
from .quant_linear import QuantEmbedding, QuantLinear

__all__ = ["GenerationStats", "QuantEmbedding", "QuantLinear", "generate"]
