"""Running quantized models: QuantLinear inside any HF model, decoders, generation, chat, serving."""

from .generate import GenerationStats, generate
from .hf_decoder import HFDecoder, decoder_for, use_threads
from .sampling import Sampler, SamplingParams
from .session import Chat, Completion, Session

__all__ = ["Chat", "Completion", "GenerationStats", "HFDecoder", "Sampler",
           "SamplingParams", "Session", "decoder_for", "generate", "use_threads"]
