"""Quantized tensor kinds: one table, like ggml's quant types. A new format = one entry here."""

from ..errors import LowbitError
from .codebook import CODEBOOK_BITS, CodebookQ, check_codebook_spec
from .kquant import KQuant
from .qtensor import QTensor
from .uniform import BITS, GROUP_SIZES, UniformQ, check_spec

KINDS: dict[str, type[QTensor]] = {UniformQ.kind: UniformQ, CodebookQ.kind: CodebookQ, KQuant.kind: KQuant}


def from_tensors(meta: dict, tensors) -> QTensor:
    """Rebuild any stored QTensor from its config.json entry and its tensors."""
    return KINDS[meta["kind"]].from_tensors(meta, tensors)


def check(meta: dict, tensors) -> None:
    """A LowbitError unless `meta` (any JSON value) is a stored QTensor's entry and `tensors` (real,
    or on meta: shapes from a file's header) are its tensors (QTensor.check)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str) or meta["kind"] not in KINDS:
        kind = meta.get("kind") if isinstance(meta, dict) else meta
        raise LowbitError(f"has unknown format {kind!r} (known: {', '.join(KINDS)})")
    KINDS[meta["kind"]].check(meta, tensors)


def describe(meta: dict) -> str:
    """One short line for any stored QTensor's meta ("uniform 4b g32 sym", "codebook 3b row +outliers")."""
    return KINDS[meta["kind"]].describe(meta)


__all__ = ["BITS", "CODEBOOK_BITS", "CodebookQ", "check_codebook_spec", "GROUP_SIZES", "KINDS", "KQuant", "QTensor", "UniformQ", "check", "check_spec", "describe", "from_tensors"]
