"""Load a directory written by save.py into a transformers model with QuantLinear modules (or, for the
native engine only, a shell of one built without transformers: io/shell.py, io/tokenizer_file.py).

Nothing is trusted before it is checked: quantization_config's every field (formats.check), the
config's dimensions and every shape against the safetensors headers (only headers are read, the model
is built on meta), then the tensors' values (NaN or Inf in any of them, codes out of range). A damaged
directory is a one-line LowbitError naming the module or tensor, never garbage output or an internal
error deep in a kernel.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import LowbitError
from ..formats import check, from_tensors
from ..formats.activation import ActQ
from ..nn import ActQuantLinear, QuantEmbedding, QuantLinear, embedding_scale
from . import shell as engine_shell
from . import tokenizer_file
from .check import checked_shards
from .save import FORMAT_VERSION

ACT_PREFIX = "act_"  # an activation spec's tensors: <module>.act_<name>
IN_PERM = "in_perm"  # a linear layer's input permutation (nn.QuantLinear.in_perm, io/act_order.py)


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise LowbitError(f"{path} is not a model directory (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise LowbitError(f"{path / 'config.json'} is not valid JSON") from None
    if not isinstance(config, dict):
        raise LowbitError(f"{path / 'config.json'} is not a JSON object: the file is damaged")
    return config


def skeleton(config: dict, where) -> torch.nn.Module:
    """The causal LM that config.json (`config`, without its quantization_config) describes, built on
    meta (no memory); transformers validates the config its own way: any of its errors means a damaged
    config.json."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = dict(config)
    try:
        config = AutoConfig.for_model(config.pop("model_type", None), **config)
        with init_empty_weights(include_buffers=False), no_init_weights():  # meta: initializing it costs ~1 s
            return AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    except Exception as e:
        raise LowbitError(f"{where}: config.json describes no model lowbit can build ({_first_line(e)})") from None


def is_lowbit_dir(path: str | Path) -> bool:
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    qc = read_config(path).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "lowbit"


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a possibly sharded checkpoint (its index's, or model.safetensors)."""
    index = path / "model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise LowbitError(f"{index} is not a valid safetensors index") from None
    return [path / str(name) for name in names]


def _module_tensors(name: str, state: dict[str, torch.Tensor], pop: bool = False) -> dict[str, torch.Tensor]:
    """The QTensor's own tensors of module `name` in `state` (its bias, input permutation and activation
    tensors aside)."""
    prefix = name + "."
    keys = [k for k in state if k.startswith(prefix) and "." not in k[len(prefix):]
            and k[len(prefix):] not in ("bias", IN_PERM) and not k[len(prefix):].startswith(ACT_PREFIX)]
    return {k[len(prefix):]: state.pop(k) if pop else state[k] for k in keys}


def _act_tensors(name: str, state: dict[str, torch.Tensor], pop: bool = False) -> dict[str, torch.Tensor]:
    """The activation spec's tensors of module `name` in `state` (`<name>.act_<tensor>`), by tensor name."""
    prefix = name + "." + ACT_PREFIX
    keys = [k for k in state if k.startswith(prefix) and "." not in k[len(prefix):]]
    return {k[len(prefix):]: state.pop(k) if pop else state[k] for k in keys}


def _checked_act(where, name: str, meta, tensors: dict[str, torch.Tensor], qt_meta: dict) -> None:
    try:
        ActQ.check(meta, tensors, qt_meta["shape"][1])
    except LowbitError as e:
        raise LowbitError(f"{where}: module {name}: {e} (a damaged file: quantize it again)") from None


def _in_perm(where, name: str, perm: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """A linear layer's stored input permutation, checked: int32 [k] holding each of 0 … k−1 once."""
    if perm is not None and (perm.dtype != torch.int32 or tuple(perm.shape) != (k,) or
                             not torch.equal(perm.sort().values, torch.arange(k, dtype=torch.int32))):
        raise LowbitError(f"{where}: module {name}'s {IN_PERM} is not a permutation of its {k} input columns "
                          "(a damaged file: quantize it again)")
    return perm


def _checked(where, name: str, meta, tensors: dict[str, torch.Tensor]) -> None:
    try:
        check(meta, tensors)
    except LowbitError as e:
        raise LowbitError(f"{where}: module {name} {e} (a damaged file: quantize it again)") from None


def assign_state(model: torch.nn.Module, state: dict, path) -> None:
    """Put `state` into a model built on the meta device, tie its weights, and refuse a file with tensors
    the model lacks or one that leaves any parameter without weights (one line each)."""
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise LowbitError(f"{path} holds tensors the model does not have: {', '.join(unexpected[:3])}")
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise LowbitError(f"{path} is incomplete: no weights for {', '.join(empty[:3])}")


def install_quantized(model: torch.nn.Module, modules: dict[str, dict], state: dict[str, torch.Tensor],
                      dtype: torch.dtype, where, shared: dict[str, str] | None = None,
                      activations: dict[str, dict] | None = None) -> None:
    """Replace each listed module of `model` by its quantized form, taking (popping) its tensors
    from `state`, after checking them (shapes, and the values of real ones); a `shared` module
    (name -> owner) holds its owner's QTensor, the same tensors; a module in `activations` quantizes
    its input by that spec (ActQuantLinear)."""
    shared, activations = shared or {}, activations or {}
    qts = {}
    for name in sorted(modules, key=lambda n: n in shared):  # owners first
        meta = modules[name]
        if name in shared:
            qt = qts[shared[name]]
        else:
            tensors = _module_tensors(name, state, pop=True)
            _checked(where, name, meta, tensors)
            qt = qts[name] = from_tensors(meta, tensors)
        old = model.get_submodule(name)
        if isinstance(old, torch.nn.Embedding):
            new = QuantEmbedding(qt, old.padding_idx, dtype, embedding_scale(old))
        elif name in activations:
            act_tensors = _act_tensors(name, state, pop=True)
            _checked_act(where, name, activations[name], act_tensors, meta)
            new = ActQuantLinear(qt, ActQ.from_tensors(activations[name], act_tensors), state.pop(name + ".bias", None))
        else:
            perm = _in_perm(where, name, state.pop(f"{name}.{IN_PERM}", None), qt.shape[1])
            new = QuantLinear(qt, state.pop(name + ".bias", None), perm)
        model.set_submodule(name, new)


def _check_structure(model: torch.nn.Module, modules: dict, header: dict[str, torch.Tensor], where,
                     shared: dict[str, str], activations: dict[str, dict]) -> None:
    """Every quantized module is a linear or embedding layer of the model with the recorded shape and
    its tensors (or, shared, its owner's) in the header, its activation spec's too; every other tensor
    of the header has the model's shape for it."""
    for name, meta in modules.items():
        _checked(where, name, meta, _module_tensors(shared.get(name, name), header))
        if name in activations:
            _checked_act(where, name, activations[name], _act_tensors(name, header), meta)
        elif _act_tensors(name, header):
            raise LowbitError(f"{where}: module {name} holds activation tensors but quantization_config gives it no "
                              "activation spec (a damaged file: quantize it again)")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"{where}: quantization_config lists module {name}, which the model does not have") from None
        if not isinstance(old, (torch.nn.Linear, torch.nn.Embedding)) or list(old.weight.shape) != meta["shape"]:
            raise LowbitError(f"{where}: module {name} is recorded as {meta['shape']}, the model's is "
                              f"{list(getattr(old, 'weight', torch.empty(0)).shape)}: config.json and the weights disagree")
    params = dict(model.named_parameters())
    for name, t in header.items():
        if name in params and params[name].shape != t.shape:
            raise LowbitError(f"{where}: {name} is {list(t.shape)} in the weights, {list(params[name].shape)} by "
                              f"config.json: config.json and the weights disagree")


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2])[:200] or type(e).__name__


def _modules(qc: dict, where) -> dict[str, dict]:
    modules = qc.get("modules")
    if not isinstance(modules, dict) or not modules or not all(isinstance(n, str) and n for n in modules):
        raise LowbitError(f"{where}: quantization_config has no valid 'modules' (the quantized layers): the "
                          f"config.json is damaged, quantize the model again")
    return modules


def _shared(qc: dict, modules: dict[str, dict], where) -> dict[str, str]:
    """quantization_config's "shared" (module -> the module whose tensors it holds), checked: both
    quantized, the same format, and the owner not itself shared."""
    shared = qc.get("shared", {})
    if not isinstance(shared, dict) or not all(
            isinstance(n, str) and isinstance(o, str) and n in modules and o in modules and o not in shared
            and n != o and modules[n] == modules[o] for n, o in shared.items()):
        raise LowbitError(f"{where}: quantization_config's 'shared' is damaged (each entry must name two quantized "
                          "modules of the same format): quantize the model again")
    return shared


def _activations(qc: dict, modules: dict[str, dict], shared: dict[str, str], where) -> dict[str, dict]:
    """quantization_config's "activations" (module -> activation spec), checked: each a quantized,
    unshared module."""
    acts = qc.get("activations", {})
    if not isinstance(acts, dict) or not all(isinstance(n, str) and n in modules and n not in shared
                                             and n not in shared.values() for n in acts):
        raise LowbitError(f"{where}: quantization_config's 'activations' is damaged (each entry must name a quantized "
                          "linear layer): quantize the model again")
    return acts


def load(path: str | Path, shell: bool = False):
    """(model, tokenizer, quantization_config) from a lowbit directory; the model is in eval mode and
    generates. `shell`: for the native engine only (evaluation): where io/shell.py builds the model
    (a plain Llama), its shell without transformers, and where io/tokenizer_file.py reads the
    tokenizer, that one (else transformers' model and tokenizer, as without it); a shell's forward
    loads the transformers model on first use."""
    path = Path(path)
    raw = read_config(path)
    qc = raw.pop("quantization_config", None) or {}
    if not isinstance(qc, dict) or qc.get("quant_method") != "lowbit":
        raise LowbitError(f"{path} is not a lowbit-quantized model (quantization_config missing)")
    version = qc.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise LowbitError(f"{path}: quantization_config has format_version {json.dumps(version)}, not an integer")
    if version > FORMAT_VERSION:
        raise LowbitError(f"{path} was written by a newer lowbit (format {version})")
    modules = _modules(qc, path)
    shared = _shared(qc, modules, path)
    activations = _activations(qc, modules, shared, path)
    files, header = checked_shards(path, raw, _weight_files(path))
    shell = shell and engine_shell.fits(raw, set(modules), set(header))
    model = engine_shell.build(raw, lambda: load(path)[0]) if shell else skeleton(raw, path)
    _check_structure(model, modules, header, path, shared, activations)
    del header
    state = {}
    for f in files:
        state.update(load_file(f))
    install_quantized(model, modules, state, model.config.dtype or torch.float32, path, shared, activations)
    bad = next((n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise LowbitError(f"{path}: {bad} holds NaN or Inf (a damaged file: quantize it again)")
    assign_state(model, state, path)
    model.eval()
    tokenizer = (tokenizer_file.read(path) if shell else None) or _tokenizer(path)
    if not shell and (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    return model, tokenizer, qc


def _tokenizer(path: Path):
    """transformers' tokenizer of the directory (None without a tokenizer_config.json)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
