"""compressed-tensors `pack-quantized` checkpoints (vLLM, transformers with the compressed-tensors
package, llm-compressor) written from and read into UniformQ, exactly both ways.

The format (read from compressed_tensors.compressors.pack_quantized): each quantized Linear `M` holds
  M.weight_packed       int32 [N, ceil(K·b/32)]   32 consecutive b-bit values in b words, value i at
                                                  bits [i·b, (i+1)·b) of the block's stream: our
                                                  packing.py (we pad a row to whole blocks, they cut
                                                  the unused words off)
  M.weight_scale        [N, G] in the model's dtype, G = K / group (group) or 1 (channel)
  M.weight_zero_point   int32 [ceil(N·b/32), G]   asymmetric only, packed the same way along N
  M.weight_shape        int64 [2]
Values are stored as codes c = q + 2^(b−1) of signed q, and w = (q − zp)·scale. UniformQ sym,
w = (c − 2^(b−1))·s, is zp = 0 and scale = s; UniformQ asym, w = (c − z)·s, is zp = z − 2^(b−1), whose
packed code is z itself. So the bytes are ours, given scales that fp16 holds exactly (ours are fp16;
an imported scale that is not is refused rather than rounded).

config.json's quantization_config has one config group per distinct (bits, group, sym), its modules
named as targets (mixed precision), and `ignore` for the Linear layers left in float. Quantized
embeddings and output heads are written as float (their exact dequantized weights): the format's
consumers run quantized Linear layers inside the decoder blocks. Group sizes must divide the rows
(compressed-tensors has no ragged last group). Act-order: `actorder: weight` (or `static`) changed
only the order GPTQ visited the columns, the layout is the plain one; `actorder: group` (`dynamic`,
which compressed-tensors dropped in 2026-08; older llm-compressor files on the Hub have it) stores
M.weight_g_idx int32 [K], the group of each column as GPTQ's g_idx, imported as act_order.py does for
GPTQ. An act-order layer is not exported here (the current format has no g_idx): `--to gptq` keeps it.
"""

import json
import re
from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats import BITS, GROUP_SIZES, UniformQ
from ..formats.packing import pack, packed_words, unpack
from .act_order import permutation
from .foreign import finish, float_linears, float_state, packed_layers, quant_method, read_dir, write_dir

METHOD, FORMAT = "compressed-tensors", "pack-quantized"
EXPORTABLE = "UniformQ Linear layers of 2, 3, 4 or 8 bits, groups that divide the rows or whole rows"


def is_compressed_tensors_dir(path: str | Path) -> bool:
    return quant_method(path) == METHOD


def _words(count: int, bits: int) -> int:
    return -(-count * bits // 32)


def _scheme(qt: UniformQ) -> dict:
    return {"num_bits": qt.bits, "type": "int", "symmetric": qt.sym, "dynamic": False,
            "strategy": "channel" if qt.group_size == -1 else "group",
            "group_size": None if qt.group_size == -1 else qt.group_size}


def _packed(name: str, qt, perm: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if not isinstance(qt, UniformQ) or (qt.group_size != -1 and qt.shape[1] % qt.group_size):
        what = qt.describe(qt.meta()) + (f" of width {qt.shape[1]}" if isinstance(qt, UniformQ) else "")
        raise LowbitError(f"layer {name} is {what}: compressed-tensors export writes {EXPORTABLE}")
    if perm is not None:
        raise LowbitError(f"layer {name} is act-order (its groups scattered over the input): compressed-tensors "
                          "no longer stores g_idx; export it with --to gptq (or gguf)")
    n, k = qt.shape
    out = {"weight_packed": qt.qweight[:, :_words(k, qt.bits)], "weight_scale": qt.scales.to(dtype),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not qt.sym:
        out["weight_zero_point"] = pack(qt.zeros.T, qt.bits)[:, :_words(n, qt.bits)].T
    return out


def write_compressed_tensors(model: torch.nn.Module, out: str | Path, tokenizer=None,
                             overwrite: bool = False) -> Path:
    """Write `model` (transformers, lowbit-quantized) as a compressed-tensors pack-quantized directory."""
    dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else torch.float32
    layers = packed_layers(model)
    if not layers:
        raise LowbitError(f"model has no quantized Linear layers: compressed-tensors export writes {EXPORTABLE}")
    packed = {n: _packed(n, m.qtensor, m.in_perm, dtype) for n, m in layers.items()}  # refuses what it cannot hold
    groups = {}
    for name, module in layers.items():
        groups.setdefault(json.dumps(_scheme(module.qtensor), sort_keys=True), []).append(name)
    quantization = {
        "quant_method": METHOD, "format": FORMAT, "quantization_status": "compressed", "kv_cache_scheme": None,
        "config_groups": {f"group_{i}": {"targets": names, "weights": json.loads(scheme), "input_activations": None,
                                         "output_activations": None, "format": FORMAT}
                          for i, (scheme, names) in enumerate(groups.items())},
        "ignore": float_linears(model)}
    return write_dir(model, out, float_state(model, packed), quantization, tokenizer, overwrite)


def _matches(name: str, targets) -> bool:
    return any(t == name or t == "Linear" or (t.startswith("re:") and re.match(t[3:], name)) for t in targets)


ACTORDER = {None: False, "weight": False, "static": False, "group": True, "dynamic": True}  # -> stores g_idx


def _checked_scheme(path: Path, group: str, spec) -> tuple[int, int, bool, bool]:
    """(bits, our group size, sym, whether g_idx is stored) of a config group's weights, or a one-line
    refusal naming why."""
    w = spec.get("weights") if isinstance(spec, dict) else None
    if not isinstance(w, dict):
        raise LowbitError(f"{path}: config group {group} has no weights scheme")
    bits, strategy, gs = w.get("num_bits"), w.get("strategy"), w.get("group_size")
    group_size = -1 if strategy == "channel" else gs if strategy == "group" else None
    actorder = w.get("actorder")
    if w.get("type") != "int" or w.get("dynamic") or spec.get("input_activations") or \
            not isinstance(actorder, (str, type(None))) or actorder not in ACTORDER or \
            bits not in BITS or group_size not in GROUP_SIZES or not isinstance(w.get("symmetric"), bool):
        raise LowbitError(f"{path}: config group {group} is {json.dumps(w)[:160]}: lowbit imports int weights of "
                          f"{', '.join(map(str, BITS))} bits, groups of 32/64/128 or channel, static, "
                          "act-order weight or group")
    return bits, group_size, w["symmetric"], ACTORDER[actorder] and group_size != -1


def _uniform(path: Path, name: str, t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
             act_order: bool) -> tuple[UniformQ, torch.Tensor | None]:
    """A module's packed tensors as UniformQ (an act-order one's columns in group order) and its input
    permutation (None: in order), every shape checked."""
    try:
        n, k = (int(v) for v in t["weight_shape"].tolist())
        groups = 1 if group_size == -1 else k // group_size
        want = {"weight_packed": ((n, _words(k, bits)), torch.int32), "weight_shape": ((2,), torch.int64),
                "weight_scale": ((n, groups), None)}
        if not sym:
            want["weight_zero_point"] = ((_words(n, bits), groups), torch.int32)
        if act_order:
            want["weight_g_idx"] = ((k,), torch.int32)
        extra = sorted(set(t) - set(want))
        bad = next((f"{k_} is missing" for k_ in want if k_ not in t), None) or \
            (f"has unexpected tensor {extra[0]}" if extra else None) or \
            next((f"{k_} is {list(t[k_].shape)} {t[k_].dtype}" for k_, (s, d) in want.items()
                  if tuple(t[k_].shape) != s or (d is not None and t[k_].dtype != d)), None)
        if bad is None and group_size != -1 and k % group_size:
            bad = f"width {k} is not a multiple of the group size {group_size}"
    except (KeyError, ValueError, TypeError, RuntimeError):
        bad = "weight_shape is not two integers"
    if bad:
        raise LowbitError(f"{path}: module {name}: {bad} (not a pack-quantized {bits}-bit checkpoint, or damaged)")
    scales = t["weight_scale"].to(torch.float16)
    if not torch.equal(scales.to(t["weight_scale"].dtype), t["weight_scale"]):
        raise LowbitError(f"{path}: module {name} has scales fp16 cannot hold exactly (lowbit's are fp16)")
    qweight = torch.nn.functional.pad(t["weight_packed"], (0, packed_words(k, bits) - _words(k, bits)))
    perm = permutation(path, name, t["weight_g_idx"], k, group_size) if act_order else None
    if perm is not None:
        qweight = pack(unpack(qweight, bits, k)[:, perm.long()], bits)
    zeros = None if sym else unpack(t["weight_zero_point"].T.contiguous(), bits, n).T.contiguous()
    return UniformQ(qweight, scales, zeros, bits, group_size, (n, k)), perm


def load_compressed_tensors(path: str | Path):
    """(model, tokenizer, lowbit quantization_config) from a compressed-tensors pack-quantized
    directory: its quantized Linear layers as UniformQ holding the file's own codes (an act-order
    layer's columns in group order, with its input permutation)."""
    path = Path(path)
    qc, model, state = read_dir(path)
    if qc.get("format") != FORMAT:
        raise LowbitError(f"{path}: compressed-tensors format {qc.get('format')!r}: lowbit imports {FORMAT!r}")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise LowbitError(f"{path}: quantization_config has no config_groups")
    schemes = {g: (_checked_scheme(path, g, spec), spec.get("targets") or []) for g, spec in groups.items()}
    ignore = [t for t in qc.get("ignore") or [] if isinstance(t, str) and t != "Linear"]
    qts, perms = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or _matches(name, ignore) or f"{name}.weight_packed" not in state:
            continue
        found = next((scheme for scheme, targets in schemes.values() if _matches(name, targets)), None)
        if found is None:
            raise LowbitError(f"{path}: module {name} is packed but no config group targets it")
        tensors = {k[len(name) + 1:]: state.pop(k) for k in list(state) if k.startswith(f"{name}.weight_")}
        qts[name], perm = _uniform(path, name, tensors, *found)
        if perm is not None:
            perms[name] = perm
    return finish(path, model, qts, state, METHOD, perms)
