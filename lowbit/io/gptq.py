"""GPTQ checkpoints (AutoGPTQ / GPTQModel, `checkpoint_format` gptq and gptq_v2) written from and read
into UniformQ, and AWQ checkpoints (AutoAWQ, GEMM packing) read into UniformQ: the codes, scales and
zero points as stored, no float round trip.

GPTQ (transposed: K input columns, N outputs, G groups) holds for each quantized Linear `M`
  M.qweight  int32 [K·b/32, N]   along K, 32 values in b words as one little-endian bit stream, value
                                 i at bits [i·b, (i+1)·b) (AutoGPTQ's 3-bit packing straddles words
                                 exactly so): our packing.py of the transposed weight
  M.qzeros   int32 [G, N·b/32]   along N, the same stream; gptq (v1) stores z − 1, gptq_v2 stores z
  M.scales   fp16 [G, N]
  M.g_idx    int32 [K]           the group of each input column
and w[n, k] = scales[g_idx[k], n] · (q[k, n] − z[g_idx[k], n]): UniformQ with (N, K) transposed. v1's
z − 1 cannot store z = 0 (asymmetric groups with no negative weight): the export writes v2 when any
zero point is 0, v1 otherwise; a v1 file whose z − 1 is all ones (z = 2^b) is refused on import.
Act-order (`desc_act`, a g_idx that is not k // group): the layer is the UniformQ over its columns
permuted so that each group is contiguous, plus that input permutation (act_order.py,
nn.QuantLinear.in_perm); the export writes such a layer back as act-order (desc_act, its g_idx), the
same file. (lowbit's own GPTQ act-order keeps groups in place, so its layers need no permutation.)

AWQ GEMM (4-bit only) holds qweight int32 [K, N/8] and qzeros int32 [G, N/8] packed along N with the
nibble order 0 2 4 6 1 3 5 7 (AutoAWQ's AWQ_ORDER: nibble i holds output 8c + order[i]), scales fp16
[G, N], w = s·(q − z).
"""

import json
from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats import BITS, GROUP_SIZES, UniformQ
from ..formats.packing import pack, packed_words, unpack
from .act_order import g_idx, permutation, unpermute
from .foreign import finish, float_state, packed_layers, quant_method, read_dir, write_dir

EXPORTABLE = "UniformQ Linear layers of one bits/group/grid (2, 3, 4 or 8 bits) whose width b·K is a multiple of 32"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def is_gptq_dir(path: str | Path) -> bool:
    return quant_method(path) in ("gptq", "awq")


def _to_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] codes -> [rows, cols·b/32] int32: the bit stream along cols, cut to whole words."""
    return pack(codes, bits)[:, :codes.shape[1] * bits // 32]


def _from_words(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of `_to_words`: [rows, cols·b/32] int32 -> [rows, cols] uint8 codes."""
    full = torch.nn.functional.pad(words, (0, packed_words(cols, bits) - words.shape[1]))
    return unpack(full, bits, cols)


def _gptq_tensors(name: str, qt, perm: torch.Tensor | None, v2: bool) -> dict[str, torch.Tensor]:
    if not isinstance(qt, UniformQ) or qt.shape[1] * qt.bits % 32 or qt.shape[0] * qt.bits % 32:
        raise LowbitError(f"layer {name} is {qt.describe(qt.meta())} {list(qt.shape)}: GPTQ export writes {EXPORTABLE}")
    n, k = qt.shape
    zeros = torch.full_like(qt.scales, 2 ** (qt.bits - 1), dtype=torch.uint8) if qt.sym else qt.zeros
    stored = zeros if v2 else (zeros.to(torch.int16) - 1) % 2**qt.bits
    group = k if qt.group_size == -1 else qt.group_size
    return {"qweight": _to_words(unpermute(qt.codes(), perm), qt.bits).T.contiguous(),
            "qzeros": _to_words(stored.T.contiguous().to(torch.uint8), qt.bits),
            "scales": qt.scales.T.contiguous(), "g_idx": g_idx(perm, k, group)}


def write_gptq(model: torch.nn.Module, out: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write `model` (transformers, lowbit-quantized, one format over its quantized Linear layers) as a
    GPTQ checkpoint directory (quantize_config.json too, for AutoGPTQ)."""
    layers = packed_layers(model)
    other = next((n for n, m in layers.items() if m.meta["kind"] != UniformQ.kind), None)
    if other is not None:
        raise LowbitError(f"layer {other} is {layers[other].qtensor.describe(layers[other].meta)}: "
                          f"GPTQ export writes {EXPORTABLE}")
    formats = {(m.meta["kind"], m.meta.get("bits"), m.meta.get("group_size"), m.meta.get("sym")) for m in layers.values()}
    if len(formats) != 1:
        raise LowbitError(f"GPTQ export writes {EXPORTABLE}: this model has "
                          f"{len(formats) or 'no'} formats (compressed-tensors holds mixed precision)")
    v2 = any(not m.qtensor.sym and bool((m.qtensor.zeros == 0).any()) for m in layers.values())
    packed = {n: _gptq_tensors(n, m.qtensor, m.in_perm, v2) for n, m in layers.items()}
    _, bits, group_size, sym = formats.pop()
    desc_act = any(m.in_perm is not None for m in layers.values())
    quantization = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
                    "static_groups": False, "true_sequential": True, "lm_head": False, "damp_percent": 0.01,
                    "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    return write_dir(model, out, float_state(model, packed), quantization, tokenizer, overwrite,
                     {"quantize_config.json": json.dumps(quantization, indent=2)})


def _format(path: Path, qc: dict) -> tuple[str, int, int, bool, str]:
    """(method, bits, group size, sym, checkpoint format) of a GPTQ/AWQ quantization_config, checked."""
    method = qc.get("quant_method")
    if method not in ("gptq", "awq"):
        raise LowbitError(f"{path}: quant_method {method!r} is neither gptq nor awq")
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    group = -1 if group in (-1, None) and method == "gptq" else group
    sym = qc.get("sym", True) if method == "gptq" else not qc.get("zero_point", True)
    fmt = qc.get("checkpoint_format", "gptq") if method == "gptq" else str(qc.get("version", "gemm")).lower()
    if method == "gptq" and (bits not in BITS or group not in GROUP_SIZES or fmt not in ("gptq", "gptq_v2")
                             or not isinstance(sym, bool)):
        raise LowbitError(f"{path}: GPTQ bits={bits!r} group_size={group!r} checkpoint_format={fmt!r}: lowbit "
                          f"imports bits {', '.join(map(str, BITS))}, groups 32/64/128/-1, formats gptq and gptq_v2")
    if method == "awq" and (bits != 4 or group not in GROUP_SIZES[:3] or fmt != "gemm" or sym):
        raise LowbitError(f"{path}: AWQ bits={bits!r} group_size={group!r} version={fmt!r} zero_point={not sym}: "
                          "lowbit imports 4-bit GEMM checkpoints with zero points, groups 32/64/128")
    if qc.get("dynamic"):
        raise LowbitError(f"{path}: GPTQ 'dynamic' per-module overrides are not imported yet")
    return method, bits, group, sym, fmt


def _expect(path: Path, name: str, t: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> None:
    extra = sorted(set(t) - set(shapes) - {"bias"})
    bad = next((f"{k} is missing" for k in shapes if k not in t), None) or \
        (f"has unexpected tensor {extra[0]}" if extra else None) or \
        next((f"{k} is {list(t[k].shape)} {str(t[k].dtype)[6:]}, expected {list(s)} {str(d)[6:]}"
              for k, (s, d) in shapes.items() if tuple(t[k].shape) != s or t[k].dtype != d), None)
    if bad:
        raise LowbitError(f"{path}: module {name} {bad} (a damaged checkpoint, or not this format)")


def _gptq_layer(path: Path, name: str, t: dict, n: int, k: int, bits: int, group: int, sym: bool,
                v2: bool) -> tuple[UniformQ, torch.Tensor | None]:
    """The module's UniformQ (columns in group order) and its input permutation (None: in order)."""
    g = k if group == -1 else group
    groups = -(-k // g)
    _expect(path, name, t, {"qweight": ((k * bits // 32, n), torch.int32), "qzeros": ((groups, n * bits // 32), torch.int32),
                            "scales": ((groups, n), torch.float16), "g_idx": ((k,), torch.int32)})
    perm = permutation(path, name, t["g_idx"], k, g)
    zeros = _from_words(t["qzeros"], bits, n).T.contiguous()
    if not v2:
        zeros = zeros.to(torch.int16) + 1
        if bool((zeros >= 2**bits).any()):
            raise LowbitError(f"{path}: module {name} stores zero point {2**bits} (v1's z − 1 of all ones), "
                              f"outside the {bits}-bit range lowbit holds")
        zeros = zeros.to(torch.uint8)
    if sym and not bool((zeros == 2 ** (bits - 1)).all()):
        raise LowbitError(f"{path}: module {name} is recorded symmetric but its zero points are not {2 ** (bits - 1)}")
    codes = _from_words(t["qweight"].T.contiguous(), bits, k)
    codes = codes if perm is None else codes[:, perm.long()]
    return UniformQ(pack(codes, bits), t["scales"].T.contiguous(), None if sym else zeros, bits, group, (n, k)), perm


def _awq_layer(path: Path, name: str, t: dict, n: int, k: int, group: int) -> UniformQ:
    groups = k // group
    _expect(path, name, t, {"qweight": ((k, n // 8), torch.int32), "qzeros": ((groups, n // 8), torch.int32),
                            "scales": ((groups, n), torch.float16)})
    order = torch.tensor(AWQ_ORDER)

    def nibbles(words: torch.Tensor) -> torch.Tensor:  # [rows, N/8] -> [rows, N] in output order
        raw = _from_words(words, 4, words.shape[1] * 8).view(words.shape[0], -1, 8)
        out = torch.empty_like(raw)
        out[..., order] = raw
        return out.reshape(words.shape[0], -1)

    return UniformQ(pack(nibbles(t["qweight"]).T.contiguous(), 4), t["scales"].T.contiguous(),
                    nibbles(t["qzeros"]).T.contiguous(), 4, group, (n, k))


def load_gptq(path: str | Path):
    """(model, tokenizer, lowbit quantization_config) from a GPTQ or AWQ (GEMM) checkpoint directory:
    its quantized Linear layers as UniformQ holding the file's codes, scales and zero points (an
    act-order layer's columns in group order, with its input permutation)."""
    path = Path(path)
    qc, model, state = read_dir(path)
    method, bits, group, sym, fmt = _format(path, qc)
    qts, perms = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or f"{name}.qweight" not in state:
            continue
        t = {k[len(name) + 1:]: state.pop(k) for k in list(state)
             if k.startswith(name + ".") and k[len(name) + 1:] in ("qweight", "qzeros", "scales", "g_idx")}
        n, k = module.weight.shape
        if method == "awq" and (n % 8 or k % group):
            raise LowbitError(f"{path}: module {name} is {n}×{k}: AWQ GEMM packs outputs by 8 and whole groups")
        if method == "gptq" and (k * bits % 32 or n * bits % 32):
            raise LowbitError(f"{path}: module {name} is {n}×{k}: GPTQ packs {bits}-bit values in whole int32 words")
        if method == "awq":
            qts[name] = _awq_layer(path, name, t, n, k, group)
            continue
        qts[name], perm = _gptq_layer(path, name, t, n, k, bits, group, sym, fmt == "gptq_v2")
        if perm is not None:
            perms[name] = perm
    return finish(path, model, qts, state, f"{method} ({fmt})", perms)
