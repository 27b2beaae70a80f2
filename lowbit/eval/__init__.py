"""Accuracy and cost: perplexity, KL divergence against the source model, size and bits per weight."""

from .metrics import SCORINGS, EvalResult, evaluate, windows
from .size import LayerSize, ModelSize, model_size

__all__ = ["SCORINGS", "EvalResult", "LayerSize", "ModelSize", "evaluate", "model_size", "windows"]
