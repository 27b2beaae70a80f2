"""Source models: HF directories, GGUF files, the embedded default."""

from .default import default_gguf
from .lazy import LazyBlocks, StreamedSource, check_finite
from .source import Loaded, fingerprint, load_any, load_reference, load_source

__all__ = ["LazyBlocks", "Loaded", "StreamedSource", "check_finite", "default_gguf", "fingerprint", "load_any", "load_reference", "load_source"]
