"""Candidates: the specs (method + format) a recipe may give one linear layer.

A candidate is written METHOD:SCHEME, the scheme in the config's own short name:
    gptq:W3-g64-asym     UniformQ, 3 bits, groups of 64, zero points (any of W2/3/4/8 × g32/64/128/row)
    ganq:W3-lut-row      CodebookQ, 3-bit indices into one 8-entry table per row (or -lut-g128 per group)
    rtn:W4-g128-sym      round to nearest (no calibration)
or as the name of a set:
    default   GPTQ over UniformQ bits {2, 3, 4, 8} × groups {32, 64, 128, row}: asymmetric at 2 and 3 bits
              (all 2^b levels around the data; a symmetric grid wastes one of 4 or 8 levels), symmetric
              at 4 and 8 (llama.cpp's Q4_0/Q8_0 layout, the fastest kernels); 16 candidates
    rtn       the same grid, rounded to nearest: sensitivity in seconds instead of minutes
    codebook  GANQ CodebookQ {2, 3, 4} bits, one table per row (10 alternating iterations per layer: slow)
    all       default + codebook
Only layer-wise methods (rtn, gptq, ganq) mix: AWQ, TEQ and SignRound transform whole blocks with one
spec (recipes/apply.py), so a per-layer recipe cannot use them.
"""

from __future__ import annotations

import re

from ..errors import LowbitError
from ..formats import BITS, GROUP_SIZES
from ..methods import MethodConfig, config_for
from .scheme import fields

LAYERWISE = ("rtn", "gptq", "ganq")
_LUT = re.compile(r"W(?P<bits>\d+)-lut-(?:g(?P<group>\d+)|(?P<row>row))")


def _grid(method: str) -> tuple[str, ...]:
    groups = [("row" if g == -1 else f"g{g}") for g in GROUP_SIZES]
    return tuple(f"{method}:W{b}-{g}-{'asym' if b < 4 else 'sym'}" for b in BITS for g in groups)


SETS: dict[str, tuple[str, ...]] = {
    "default": _grid("gptq"),
    "rtn": _grid("rtn"),
    "codebook": tuple(f"ganq:W{b}-lut-row" for b in (2, 3, 4)),
}
SETS["all"] = SETS["default"] + SETS["codebook"]


def parse_one(token: str) -> MethodConfig:
    """One METHOD:SCHEME candidate as its method config."""
    method, sep, scheme = token.strip().partition(":")
    if not sep or method not in LAYERWISE:
        raise LowbitError(f"candidate '{token}' is not METHOD:SCHEME with a layer-wise method "
                          f"({', '.join(LAYERWISE)}), e.g. gptq:W3-g64-asym or ganq:W3-lut-row")
    lut = _LUT.fullmatch(scheme.strip())
    if (lut is not None) != (method == "ganq"):
        raise LowbitError(f"candidate '{token}': codebook formats (W<bits>-lut-row|g<group>) are made by ganq, "
                          "uniform ones (W<bits>-g<group>-sym|asym) by rtn or gptq")
    if lut:
        return config_for("ganq", bits=int(lut["bits"]), group_size=-1 if lut["row"] else int(lut["group"]))
    return config_for(method, **fields(scheme))


def parse(names: tuple[str, ...] | list[str]) -> tuple[MethodConfig, ...]:
    """Candidates from set names and METHOD:SCHEME tokens (each may also hold several, comma-separated),
    duplicates dropped, in the order given."""
    tokens = [t for name in names for t in str(name).split(",") if t.strip()]
    if not tokens:
        raise LowbitError(f"no candidates given (name a set: {', '.join(SETS)}, or METHOD:SCHEME tokens)")
    specs = [spec for t in tokens for spec in ([parse_one(s) for s in SETS[t.strip()]] if t.strip() in SETS
                                                else [parse_one(t)])]
    return tuple(dict.fromkeys(specs))


def name(spec: MethodConfig) -> str:
    """The METHOD:SCHEME token of a candidate (parse_one's inverse)."""
    return f"{spec.name}:{spec.scheme}"


def fits(spec: MethodConfig, in_features: int) -> bool:
    """Whether a candidate's groups fit a layer of `in_features` columns (a group no wider than the row)."""
    return spec.group_size <= in_features
