"""The Python API: one verb (`quantize`) with a config object, plus `save` and `load`."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import calib as texts
from . import recipes
from . import io
from . import methods
from .errors import LowbitError
from .eval import EvalResult, ModelSize, evaluate, model_size
from .calib.runner import calibration_batches, quantize_blocks
from .methods import METHODS, RTN, MethodConfig, quantize_weight
from .models import check_finite, load_any, load_reference, load_source
from .recipes import Auto
from .nn import QuantEmbedding, QuantLinear
from .runtime import GenerationStats, generate


def _targets(model: nn.Module, lm_head: bool, embeddings: bool) -> list[tuple[str, nn.Module]]:
    """The modules to quantize: every nn.Linear (the output head only if asked), the input embedding if asked."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (lm_head or m is not head):
            out.append((name, m))
        elif embeddings and isinstance(m, nn.Embedding) and m is embed:
            out.append((name, m))
    return out


def _check_fits(name: str, weight: torch.Tensor, config: MethodConfig) -> None:
    cols = weight.shape[1]
    if config.group_size > cols:
        raise LowbitError(f"group size {config.group_size} does not fit layer {name} with "
                          f"{cols} input features (use a smaller group or -1 for whole rows)")


def _replace(model: nn.Module, name: str, module: nn.Module, qt) -> None:
    if isinstance(module, nn.Embedding):
        model.set_submodule(name, QuantEmbedding(qt, module.padding_idx, module.weight.dtype))
    else:
        model.set_submodule(name, QuantLinear(qt, module.bias))


def _block_quantizer(config: MethodConfig, targets: set[int]):
    """Quantizes the targeted linears of one block with the method, layer by layer or as a block."""
    method = METHODS[config.name]

    def run(block, inputs, kwargs, fp_outputs, stats):
        mine = {name: m for name, m in block.named_modules() if id(m) in targets}
        if hasattr(method, "quantize_block"):
            qts = method.quantize_block(block, mine, stats, config, inputs=inputs, kwargs=kwargs,
                                        fp_outputs=fp_outputs)
        else:
            qts = {name: method.quantize(m.weight.detach(), stats[name], config) for name, m in mine.items()}
        errors = {}
        for name, qt in qts.items():
            errors[name] = stats[name].relative_error(mine[name].weight.detach(), qt.dequantize())
            _replace(block, name, mine[name], qt)
        return errors
    return run


def config_for(name: str, **kwargs) -> MethodConfig:
    """A method's or recipe's config from its name: every method in lowbit.methods, and "auto"."""
    return methods.config_for(name, {"auto": Auto}, **kwargs)


def _rtn_like(config: MethodConfig) -> RTN:
    return RTN(bits=config.bits, group_size=config.group_size, sym=config.sym)


def quantize(model_or_source: nn.Module | str | os.PathLike | None, config: MethodConfig,
             calib: str | os.PathLike | None = None, *, lm_head: bool = False,
             embeddings: bool = False, calib_samples: int = 128, calib_seq_len: int = 512,
             tokenizer=None, calib_text: str | None = None, progress: bool = True,
             checkpoint=None) -> nn.Module:
    """Quantize every linear layer of a torch module (or of a source loaded by name) in place.

    `model_or_source`: any nn.Module holding nn.Linear layers, or a source for `lowbit.models`
    (HF directory, .gguf file, None/'default' for the embedded model). `lm_head` and `embeddings`
    also quantize the output head and the input embedding (off by default: they are accuracy-critical).
    Calibrated methods (GPTQ, ...) need a transformers decoder model and its tokenizer; they run
    block by block on `calib_samples` windows of `calib_seq_len` tokens of `calib` (a .txt/.jsonl
    file; default: the built-in calibration split; or the text itself as `calib_text`). Layers outside
    the decoder blocks (a quantized head or embedding) are rounded to nearest in the same format.
    `lowbit.Auto(...)` tries several methods and keeps the best (see recipes/auto.py). A
    `checkpoint` (io.BlockCheckpoint) makes a calibrated run resumable block by block; with it, the
    finished blocks (of a calibrated run, or any run on a lazy model) wait in its files, not in
    memory: write the result with `save`, or `io.reload` it to run it.
    """
    if not isinstance(config, MethodConfig):
        raise LowbitError(f"config must be a method config such as lowbit.RTN(bits=4), got {config!r}")
    text = calib_text if calib_text is not None else \
        texts.load("calib", calib) if calib is not None or config.needs_calib else None
    if isinstance(model_or_source, nn.Module):
        model, source = model_or_source, None
    else:
        loaded = load_source(model_or_source, lazy=not isinstance(config, Auto))
        model, source = loaded.model, loaded.source
        model.lowbit_tokenizer = loaded.tokenizer
    if isinstance(config, Auto):
        q = recipes.select(model, config, tokenizer or getattr(model, "lowbit_tokenizer", None), text,
                           quantize, progress, lm_head=lm_head, embeddings=embeddings,
                           calib_samples=calib_samples, calib_seq_len=calib_seq_len)
        q.lowbit_info["source"] = source
        return q
    targets = _targets(model, lm_head, embeddings)
    if not targets:
        raise LowbitError("the model has no nn.Linear layers to quantize")
    check_finite(model)  # a lazy model's files were checked as it was loaded
    for name, m in targets:
        _check_fits(name, m.weight, config)
    # From here on modules are named, not held: a replaced layer's float weights must be freed at once.
    layer_ids, names = {id(m) for _, m in targets}, [name for name, _ in targets]
    del targets
    if config.needs_calib:
        tokenizer = tokenizer or getattr(model, "lowbit_tokenizer", None)
        if tokenizer is None:
            raise LowbitError(f"{config.name} needs calibration text: pass the model's tokenizer")
        batches = calibration_batches(tokenizer, text, calib_samples, calib_seq_len)
        quantize_blocks(model, batches, _block_quantizer(config, layer_ids), progress, checkpoint, config.fp_targets)
        names = [n for n in names if isinstance(model.get_submodule(n), (nn.Linear, nn.Embedding))]
        config_rest = _rtn_like(config)
    else:
        config_rest = config
    lazy = getattr(model, "lowbit_lazy", None)
    if lazy is not None and checkpoint is not None:
        lazy.on_finish = checkpoint.keep  # each rounded block goes to disk and leaves memory
    for name in tqdm(names, desc=f"quantizing {config_rest.name} {config.scheme}", unit="layer",
                     disable=not progress or not names):
        if lazy is not None:
            lazy.need(name)  # rounding block by block: one float block in memory at a time
        m = model.get_submodule(name)
        with torch.no_grad():
            _replace(model, name, m, quantize_weight(m.weight.detach(), None, config_rest))
        del m
    if lazy is not None:
        lazy.close()
    if (lm_head or embeddings) and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # head and embedding are now stored separately
    model.lowbit_info = {"method": config.to_dict(), "source": source,
                         "lm_head": lm_head, "embeddings": embeddings}
    if config.needs_calib:
        model.lowbit_info["calibration"] = {"samples": calib_samples, "seq_len": calib_seq_len,
                                            "text": str(calib) if calib else "builtin"}
    return model


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         max_shard_size: int | str = "2GB"):
    """Write a quantized transformers model (and its tokenizer) to a directory, atomically."""
    return io.save(model, out_dir, tokenizer or getattr(model, "lowbit_tokenizer", None),
                   overwrite=overwrite, max_shard_size=max_shard_size)


def load(path: str | os.PathLike) -> nn.Module:
    """A quantized model from `save`'s directory (tokenizer at `.lowbit_tokenizer`), or any source."""
    loaded = load_any(path)
    loaded.model.lowbit_tokenizer = loaded.tokenizer
    return loaded.model


def evaluate_model(spec: str | os.PathLike | None, kld: bool = False, text: str | os.PathLike | None = None,
                   ctx: int = 512, stride: int | None = None, max_windows: int | None = None,
                   progress: bool = True) -> EvalResult:
    """Perplexity of a quantized directory or any source on the evaluation text; with `kld`, also the
    KL divergence from the source model the quantized one records."""
    eval_text = texts.load("eval", text)
    loaded = load_any(spec)
    source = None
    if kld:
        origin = getattr(loaded.model, "lowbit_info", {}).get("source") if loaded.quantized else None
        if origin is None:
            raise LowbitError("--kld compares a quantized model with its source: "
                              f"{spec or 'default'} is not a lowbit model that records its source")
        source = load_reference(origin)  # an HF directory is streamed block by block: bounded memory
    return evaluate(loaded.model, loaded.tokenizer, eval_text, ctx, stride, max_windows, source, progress)


SAMPLE_PROMPT = "Once upon a time"


@dataclass
class QuantizeReport:
    out: Path
    size: ModelSize
    disk_bytes: int
    method: str = ""
    auto_report: str | None = None
    check: EvalResult | None = None
    sample: str | None = None
    generation: GenerationStats | None = None


def quantize_to(source: str | os.PathLike | None, out: str | os.PathLike, config: MethodConfig,
                calib: str | os.PathLike | None = None, *, overwrite: bool = False,
                check_windows: int | None = 0, progress: bool = True, **options) -> QuantizeReport:
    """Load, quantize (`options` go to `quantize`), save; then (check_windows != 0) measure perplexity
    and KLD against the source on the held-out text (None = every window) and time a short generation
    from the saved model. Calibrated methods keep per-block progress in `.OUT.progress` beside the
    output: the same call after a crash resumes from the last finished block."""
    io.check_destination(Path(out).absolute(), overwrite)  # fail before any expensive work
    text = texts.load("calib", calib) if calib is not None else None  # bad text fails before loading
    loaded = load_source(source, lazy=not isinstance(config, Auto))
    # The check's reference: a copy of an eager (small) source; a lazy source is read again from its
    # shards at check time, one block at a time (StreamedSource), so the check stays bounded too.
    lazy = hasattr(loaded.model, "lowbit_lazy")
    reference = copy.deepcopy(loaded.model) if check_windows != 0 and not lazy else None
    checkpoint = None
    resumable = config.needs_calib and not isinstance(config, Auto)
    if resumable or lazy:  # a lazy RTN run parks its finished blocks there too (not resumable)
        checkpoint = io.BlockCheckpoint.beside(out, {"config": config.to_dict(), "source": loaded.source,
                                                     "calib": str(calib), **options})
    try:
        model = quantize(loaded.model, config, calib, tokenizer=loaded.tokenizer, calib_text=text,
                         progress=progress, checkpoint=checkpoint, **options)
        model.lowbit_info["source"] = loaded.source
        extra = {"auto_report.md": recipes.report(model.lowbit_info["auto"])} if "auto" in model.lowbit_info else {}
        io.save(model, out, loaded.tokenizer, overwrite=overwrite, extra_files=extra)  # stored blocks streamed
    except BaseException:
        if checkpoint is not None and not resumable:
            checkpoint.clear()
        raise
    if checkpoint is not None:
        if check_windows != 0:
            io.reload(model)  # the check runs the quantized model: its blocks come back from disk
        checkpoint.clear()
    report = QuantizeReport(Path(out), model_size(model), io.dir_size(out), model.lowbit_info["method"]["method"],
                            extra.get("auto_report.md"))
    if check_windows != 0:
        if lazy:
            reference = load_reference(loaded.source)
        report.check = evaluate(model, loaded.tokenizer, texts.load("eval"), max_windows=check_windows,
                                source=reference, progress=progress)
        del reference, model, loaded.model  # the saved model is reloaded below: one copy at a time
        saved = load(out)
        report.sample, report.generation = generate(saved, saved.lowbit_tokenizer, SAMPLE_PROMPT,
                                                    max_new_tokens=32)
    return report
