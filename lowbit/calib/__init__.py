"""Calibration: text sources and (later) the block-by-block runner."""

from .text import builtin, load, read_file

__all__ = ["builtin", "load", "read_file"]
