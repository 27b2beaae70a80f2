"""Source models: HF directories, GGUF files, the embedded default."""

from .default import default_gguf
from .source import Loaded, load_any, load_source

__all__ = ["Loaded", "default_gguf", "load_any", "load_source"]
