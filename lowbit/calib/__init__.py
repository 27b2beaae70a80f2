"""Calibration: text sources and (later) the block-by-block runner."""

from .text import builtin, default_corpus, load, read_file

__all__ = ["builtin", "default_corpus", "load", "read_file"]
