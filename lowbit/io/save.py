"""Save a quantized model as a `save_pretrained`-style directory.

Layout: model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json past
`max_shard_size`), config.json whose `quantization_config` lists every quantized module's format,
tokenizer files and generation_config.json. config.json is written last and the directory appears
under its name only when complete (see atomic.py).

`quantization_config` holds what the caller records (the per-layer plan, the source, ...: a plain dict,
io does not interpret it) plus the format version and `modules` (each quantized module's QTensor meta,
all the loader needs to rebuild the weights); `activations` (only when some layer quantizes its input)
maps such a layer to its activation spec's meta, its tensors stored as `<module>.act_<name>`.

The safetensors files are written by a streaming writer (the same bytes as safetensors' save_file): a
decoder block whose tensors wait on disk (`stored`: name prefix -> file, from io.BlockCheckpoint; only
its module structure is in memory, on meta) is read from its file and written one block at a time, so
saving a model larger than memory needs no more than one block of it.
"""

import json
from functools import cache
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from ..errors import LowbitError
from .atomic import atomic_dir

# 3: a linear layer may hold its input permutation (<module>.in_perm: act-order imports), written only by
# files that have one, so older readers refuse those and read the rest; 2: the caller's record is a
# per-layer plan; 1 recorded one "method" for every module
FORMAT_VERSION = 3



def write_companions(tmp: Path, model, config: dict, tokenizer=None, extra_files: dict | None = None) -> None:
    """What a model directory holds beside its tensors: `extra_files` (name -> text), the tokenizer,
    the generation config and config.json (with its quantization_config)."""
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))

def quantized_modules(model: torch.nn.Module) -> dict[str, dict]:
    """name -> QTensor meta for every quantized module (anything holding a `qtensor`)."""
    return {name: dict(m.meta) for name, m in model.named_modules() if hasattr(m, "qtensor")}


def activation_specs(model: torch.nn.Module) -> dict[str, dict]:
    """name -> activation spec meta (formats/activation.py) of every layer that quantizes its input."""
    return {name: dict(m.act_meta) for name, m in model.named_modules() if hasattr(m, "act_meta")}


def shared_modules(model: torch.nn.Module) -> dict[str, str]:
    """name -> the earlier quantized module whose tensors it holds (a tied head quantized once with its
    embedding, recipes/apply.py): its tensors are stored once, under the earlier name."""
    owners, shared = {}, {}
    for name, m in model.named_modules():
        if hasattr(m, "qtensor"):
            key = tuple((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                        for t in m.buffers(recurse=False) if t.numel() and not t.is_meta)
            if key and key in owners:
                shared[name] = owners[key]
            owners.setdefault(key, name)
    return shared


def quantization_config(model: torch.nn.Module, record: dict | None = None) -> dict:
    shared, acts = shared_modules(model), activation_specs(model)
    permuted = any(getattr(m, "in_perm", None) is not None for m in model.modules())
    return {"quant_method": "lowbit", "format_version": FORMAT_VERSION if permuted else 2, **(record or {}),
            "modules": quantized_modules(model), **({"activations": acts} if acts else {}),
            **({"shared": shared} if shared else {})}


def _tensors_to_store(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (the loader re-ties them from config.json); tensors of
    stored blocks are on meta (each one distinct: meta tensors have no storage to compare). Input
    permutations are each layer's own, stored even when layers share one."""
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and not t.is_meta and key in seen and not name.endswith(".in_perm"):
            continue
        seen.add(key)
        state[name] = t.detach().contiguous()
    return state


@cache
def _dtype_rank(dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, tuple[int, str]]:
    """dtype -> (position, safetensors name): the order in which safetensors lays out dtypes, asked
    of safetensors itself (one tiny tensor per dtype), so the header below matches its own."""
    blob = serialize({str(i): torch.zeros(1, dtype=d) for i, d in enumerate(dtypes)})
    header = json.loads(blob[8: 8 + int.from_bytes(blob[:8], "little")])
    order = sorted(range(len(dtypes)), key=lambda i: header[str(i)]["data_offsets"][0])
    return {dtypes[i]: (rank, header[str(i)]["dtype"]) for rank, i in enumerate(order)}


def _layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """safetensors' header for `tensors` (only dtypes and shapes are read: meta tensors do) and the
    offset of each tensor's bytes in the file."""
    rank = _dtype_rank(tuple(sorted({t.dtype for t in tensors.values()}, key=str)))
    entries, offsets, at = {"__metadata__": metadata}, {}, 0
    for name in sorted(tensors, key=lambda n: (rank[tensors[n].dtype][0], n)):
        t = tensors[name]
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": rank[t.dtype][1], "shape": list(t.shape), "data_offsets": [at, at + size]}
        offsets[name], at = at, at + size
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    return len(header).to_bytes(8, "little") + header, {n: start + o for n, o in offsets.items()}


def _write_tensors(state: dict[str, torch.Tensor], files: dict[str, list[str]], tmp: Path,
                   stored: dict[str, Path]) -> None:
    """Write `state` as the safetensors files `files` (filename -> names); tensors on meta are read
    from their block's file, one block at a time, and written at their offsets."""
    groups = [("", None, [n for n, t in state.items() if not t.is_meta])]
    groups += [(prefix, file, [n for n in state if n.startswith(prefix)]) for prefix, file in stored.items()]
    if sum(len(names) for _, _, names in groups) != len(state):
        left = [n for n, t in state.items() if t.is_meta and not any(n.startswith(p) for p in stored)]
        raise RuntimeError(f"tensors on meta with no stored block: {', '.join(left[:3])}")
    where, handles = {}, []
    try:
        for filename, names in files.items():
            header, offsets = _layout({n: state[n] for n in names}, {"format": "pt"})
            handles.append(open(tmp / filename, "wb"))
            handles[-1].write(header)
            where.update({n: (handles[-1], offsets[n]) for n in names})
        for prefix, file, names in groups:
            tensors = state if file is None else load_file(file)
            for n in names:
                f, offset = where[n]
                f.seek(offset)
                f.write(tensors[n[len(prefix):]].reshape(-1).view(torch.uint8).numpy())
            del tensors
    finally:
        for f in handles:
            f.close()


def write_model_dir(model: torch.nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False,
                    max_shard_size: int | str = "2GB", quantization: dict | None = None,
                    extra_files: dict[str, str] | None = None, stored: dict[str, Path] | None = None) -> Path:
    """Weights, config.json (with `quantization` as its quantization_config, if given), tokenizer and
    generation config of a transformers model, written atomically; `stored` blocks are read from their
    files."""
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise LowbitError("save needs a transformers model (with a config); "
                          "for a plain nn.Module use its state_dict()")
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    state = _tensors_to_store(model)
    # Sizes from shapes alone (meta): stored blocks are not in memory; a view's whole storage is not saved.
    split = split_torch_state_dict_into_shards({n: t.to("meta") for n, t in state.items()},
                                               max_shard_size=max_shard_size)
    with atomic_dir(out_dir, overwrite) as tmp:
        _write_tensors(state, split.filename_to_tensors, tmp, stored or {})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        write_companions(tmp, model, config, tokenizer, extra_files)
    return Path(out_dir)


def save(model: torch.nn.Module, out_dir: str | Path, tokenizer=None, record: dict | None = None,
         overwrite: bool = False, max_shard_size: int | str = "2GB", extra_files: dict[str, str] | None = None,
         stored: dict[str, Path] | None = None) -> Path:
    """Write `model` (quantized by lowbit.quantize) to `out_dir` atomically, `record` (JSON-able: how it
    was quantized) in its quantization_config."""
    quantization = quantization_config(model, record)
    if not quantization["modules"]:
        raise LowbitError("model has no quantized modules: run lowbit.quantize first")
    return write_model_dir(model, out_dir, tokenizer, overwrite, max_shard_size, quantization, extra_files, stored)
