"""The Python API: one object for a model, `QuantizedModel`, that every verb takes and returns.

    q = lowbit.quantize("default", lowbit.GPTQ(bits=4, group_size=128))  # or "W4A16-g128", a Plan, lowbit.Auto()
    q.save("smollm2-w4")
    q = lowbit.load("smollm2-w4")                   # the same object: model, tokenizer, plan, source
    text, stats = q.generate("Once upon a time")
    q.evaluate(kld=True)                            # perplexity, and KL divergence from its source

`quantize` is three steps: the model (a source loaded by name, lazily when it is an HF directory), its
Plan (recipes/: one config over every layer, a scheme string, a Plan as given, or the automatic
choice), and `recipes.apply`. `quantize_to` (the `lowbit quantize` command) composes load, quantize,
save, then the accuracy check and a sample from the saved directory.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import calib as texts
from . import io, methods, recipes
from .errors import LowbitError
from .io.gguf_write import report_path as gguf_report_path
from .io.gguf_write import write_report
from .kernels import describe_table
from .eval import EvalResult, ModelSize, evaluate, model_size
from .eval.bench import Speed, bench
from .kernels.cpu import tune as tuning
from .methods import METHODS, MethodConfig
from .models import Loaded, default_gguf, fingerprint, load_any, load_reference, load_source
from .recipes import EDGE, Auto, Plan, QuantX, RecipeFile, edge_names
from .recipes import quantx as recipe_search
from .recipes import recipe_file, recipe_report
from .runtime import Chat, GenerationStats, SamplingParams, Session, generate

# every name `--method` accepts: the methods, and the automatic choice among them
CONFIGS: dict[str, type] = {**{name: m.CONFIG for name, m in METHODS.items()}, Auto.name: Auto, QuantX.name: QuantX}

# the quantization_config keys that are not the model's record (io's own, and format 1's)
_FORMAT_KEYS = ("quant_method", "format_version", "modules", "shared", "plan", "method", "source", "lm_head",
               "embeddings", "activations")


@dataclass
class QuantizedModel:
    """A model with what belongs to it: `plan` is None for a float model (a source loaded to be
    quantized or compared); `source` names the float model it came from ("default" or an absolute
    path; for KL divergence); `info` records the rest of how it was made (calibration, auto's report)."""
    model: nn.Module
    tokenizer: object | None = None
    plan: Plan | None = None
    source: str | None = None
    info: dict = field(default_factory=dict)
    checkpoint: io.BlockCheckpoint | None = field(default=None, repr=False)  # where finished blocks wait

    def _tokenizer(self):
        if self.tokenizer is None:
            raise LowbitError("this model has no tokenizer: pass one to lowbit.quantize(..., tokenizer=)")
        return self.tokenizer

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False, max_shard_size: int | str = "2GB",
             extra_files: dict[str, str] | None = None) -> Path:
        """Write the model, its tokenizer and its plan to a directory, atomically (blocks waiting in a
        checkpoint are streamed from their files)."""
        if self.plan is None:
            raise LowbitError("model has no quantized modules: run lowbit.quantize first")
        record = {"plan": self.plan.to_record(), "source": self.source, **self.info}
        stored = self.checkpoint.stored_in(self.model) if self.checkpoint is not None else None
        return io.save(self.model, out_dir, self.tokenizer, record, overwrite, max_shard_size, extra_files, stored)

    def export(self, path: str | os.PathLike, to: str = "gguf", overwrite: bool = False,
               report: bool = False) -> Path:
        """Write the model in another tool's format (EXPORT_FORMATS), atomically: "gguf" is one file
        llama.cpp runs (tokenizer and chat template from the source GGUF, else from the tokenizer);
        "compressed-tensors" a pack-quantized directory (vLLM, transformers + compressed-tensors);
        "gptq" a GPTQ checkpoint directory (one format over the quantized Linear layers). `report`
        (gguf): also write, beside the file (gguf_report_path), a table of each quantized layer's GGUF
        type and conversion error, since GGUF refits the layers its types do not hold."""
        if self.plan is None:
            raise LowbitError("model has no quantized modules: run lowbit.quantize first")
        if to not in EXPORT_FORMATS:
            raise LowbitError(f"cannot export to '{to}' (choose one of {', '.join(EXPORT_FORMATS)})")
        if report and to != "gguf":
            raise LowbitError(f"a conversion report is made for GGUF exports only, not '{to}'")
        self.reload()
        if to == "compressed-tensors":
            return io.write_compressed_tensors(self.model, path, self.tokenizer, overwrite)
        if to == "gptq":
            return io.write_gptq(self.model, path, self.tokenizer, overwrite)
        converted = [] if report else None
        out = io.write_gguf(self.model, path, self.tokenizer, _source_gguf(self.source), overwrite, report=converted)
        if report:
            write_report(out, converted)
        return out

    def reload(self) -> None:
        """Bring blocks waiting in the checkpoint back into memory, to run the model."""
        if self.checkpoint is not None:
            self.checkpoint.reload()

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
                 on_text=None, **options) -> tuple[str, GenerationStats]:
        """(generated text, GenerationStats), streamed to `on_text`; `options`: see runtime.generate."""
        return generate(self.model, self._tokenizer(), prompt, max_new_tokens, temperature, seed, on_text, **options)

    def session(self, **options) -> Session:
        """A decoding session (KV cache reused across calls) over the model; `options`: max_context,
        threads, engine, exact, kv_cache, and for serving parallel and prefix_cache (runtime/session.py)."""
        return Session.for_model(self.model, self._tokenizer(), **options)

    def chat(self, system: str | None = None, **session) -> Chat:
        return Chat(self.session(**session), system)

    def serve(self, name: str, host: str = "127.0.0.1", port: int = 8000, defaults: dict | None = None,
              max_queue: int = 64, max_body_bytes: int | None = None, **session) -> None:
        """The OpenAI-compatible HTTP server (runtime/server.py), until interrupted; `max_body_bytes`:
        the largest request body (default: runtime.server.MAX_BODY_BYTES)."""
        from .runtime import server  # FastAPI (~0.5 s of imports) for a server only

        server.serve(self.session(**session), name, host, port, defaults, max_queue,
                     max_body_bytes=server.MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes)

    def evaluate(self, text: str | os.PathLike | None = None, *, kld: bool = False, reference=None,
                 ctx: int = 512, stride: int | None = None, max_windows: int | None = None,
                 progress: bool = True, exact: bool = False, scoring: str = "lowbit") -> EvalResult:
        """Perplexity on the evaluation `text` (a file; default: the built-in held-out split); with
        `kld`, also the KL divergence from `reference` (default: the source, streamed block by block
        when it is an HF directory; what the scores need of it is cached for the next evaluation,
        which then never loads it: eval/source_cache.py).
        The model is scored as `generate`, `serve` and `bench` run it, on int8 activations (the numbers
        describe the model a user runs, and its GEMMs run 3-4x faster); `exact`: on fp32 activations
        (the weights' own error, as eval.evaluate scores by default). The reference is always exact.
        `scoring`: "lowbit" or "llama.cpp" (llama-perplexity's windows, eval/metrics.py)."""
        eval_text = texts.load("eval", text)
        key = None
        if kld and reference is None:
            if self.plan is None or self.source is None:
                raise LowbitError("--kld compares a quantized model with its source: this is not a lowbit "
                                  "model that records its source")
            source = self.source
            reference, key = (lambda: load_reference(source)), fingerprint(source)  # loaded if not cached
        return evaluate(self.model, self._tokenizer(), eval_text, ctx, stride, max_windows,
                        reference if kld else None, progress, source_key=key, exact=exact, scoring=scoring)

    def size(self) -> ModelSize:
        return model_size(self.model)

    def bench(self, threads: int | None = None, prompt_tokens: int = 512, gen_tokens: int = 128, runs: int = 3,
              exact: bool = False) -> Speed:
        """Prefill and decode tokens/s, % of the bandwidth roofline, peak memory (eval/bench.py)."""
        return bench(self.model, self._tokenizer(), threads, prompt_tokens, gen_tokens, runs, exact=exact)


EXPORT_FORMATS = ("gguf", "compressed-tensors", "gptq")


def _source_gguf(source: str | None) -> Path | None:
    """The GGUF file a model came from (its tokenizer and names go into an exported GGUF), if any."""
    if source == "default":
        return default_gguf()
    return Path(source) if source and source.endswith(".gguf") and Path(source).is_file() else None


def export(model: QuantizedModel | str | os.PathLike, path: str | os.PathLike, to: str = "gguf",
           overwrite: bool = False, report: bool = False) -> Path:
    """`lowbit export`: a quantized model (or its directory) written in another tool's format (with
    `report`, GGUF's conversion report beside it: QuantizedModel.export)."""
    return (model if isinstance(model, QuantizedModel) else load(model)).export(path, to, overwrite, report)


def config_for(name: str, scheme: str | None = None, **kwargs) -> MethodConfig | Auto:
    """A method's or recipe's config from its name (every method in lowbit.methods, and "auto"), its
    format from a `scheme` string ("W4A16-g128") or from `kwargs` (bits, group_size, sym)."""
    if scheme is not None:
        fields = recipes.scheme_fields(scheme)
        given = sorted(({"bits", "group_size", "sym"} | set(fields)) & set(kwargs))
        if given:
            raise LowbitError(f"the scheme sets {', '.join(sorted(fields))}: drop {', '.join(given)} or the scheme")
        kwargs.update(fields)
    return methods.config_for(name, {Auto.name: Auto, QuantX.name: QuantX}, **kwargs)


def _how(how) -> MethodConfig | Plan | Auto | QuantX | RecipeFile:
    """What `quantize` accepts: a method config, a Plan, lowbit.Auto, lowbit.QuantX (a recipe under a
    budget), a read recipe file (`read_recipe`), or a scheme string (RTN)."""
    if isinstance(how, str):
        return recipes.parse_scheme(how)
    if not isinstance(how, (MethodConfig, Plan, Auto, QuantX, RecipeFile)):
        raise LowbitError(f"quantize takes a method config such as lowbit.RTN(bits=4), a Plan, lowbit.Auto() "
                          f"or a scheme string such as 'W4A16-g128', got {how!r}")
    return how


def _start(model_or_source, tokenizer, lazy: bool) -> Loaded:
    """The float model to quantize, whatever form it was given in."""
    if isinstance(model_or_source, Loaded):
        start = model_or_source
    elif isinstance(model_or_source, QuantizedModel):
        if model_or_source.plan is not None:
            raise LowbitError("the model is quantized already: quantize its source")
        start = Loaded(model_or_source.model, model_or_source.tokenizer, model_or_source.source)
    elif isinstance(model_or_source, nn.Module):
        start = Loaded(model_or_source, None, None)
    else:
        start = load_source(model_or_source, lazy=lazy)
    if tokenizer is not None:
        start.tokenizer = tokenizer
    return start


def quantize(model_or_source, how, calib: str | os.PathLike | None = None, *,
             lm_head: bool | MethodConfig = False, embeddings: bool | MethodConfig = False,
             calib_samples: int = 128, calib_seq_len: int = 512, tokenizer=None,
             calib_text: str | None = None, progress: bool = True, checkpoint=None) -> QuantizedModel:
    """Quantize a model in place by `how`; the QuantizedModel holding it.

    `model_or_source`: a source for `lowbit.models` (HF directory, .gguf file, None/'default' for the
    embedded model), a float QuantizedModel (`lowbit.load` of a source) or models.Loaded, or any
    nn.Module holding nn.Linear layers (then `tokenizer` is None unless given). `how`: a method
    config (`lowbit.GPTQ(bits=4, group_size=128)`: every linear layer; `lm_head` and `embeddings`
    add the output head and the input embedding in the same format (True) or in a config of their
    own (`lowbit.recipes.EDGE`, 8-bit RTN g32: what the `lowbit quantize` command does by default);
    here they stay in float unless asked), a scheme
    string ("W4A16-g128": RTN), a `Plan` (its layers, each with its own spec), or `lowbit.Auto(...)`
    (tries methods, keeps the best; recipes/auto.py), `lowbit.QuantX(target_bpw=3.5)` (a per-layer recipe
    under a budget, recipes/quantx.py) or a recipe file (`read_recipe`). Calibrated methods need a transformers decoder
    and its tokenizer; they run block by block on `calib_samples` windows of `calib_seq_len` tokens
    of `calib` (a .txt/.jsonl file; default: the built-in calibration split; or the text itself as
    `calib_text`). A `checkpoint` (io.BlockCheckpoint) makes a calibrated run resumable block by
    block; with it, finished blocks (of a calibrated run, or any run on a lazy model) wait in its
    files, not in memory: `.save` streams them, `.reload()` brings them back to run the model.
    """
    how = _how(how)
    search = isinstance(how, (Auto, QuantX))  # the searches run the whole model: they need it in memory
    if calib is None and calib_text is None and how.needs_calib:
        calib = texts.default_corpus("calib")  # saved by name: which built-in text (mixed or pydoc) ran
    text = calib_text if calib_text is not None else texts.load("calib", calib) if calib is not None else None
    start = _start(model_or_source, tokenizer, lazy=not search)
    calibration = {"samples": calib_samples, "seq_len": calib_seq_len, "text": str(calib) if calib else "builtin"}
    if isinstance(how, Auto):
        choice = recipes.select(start.model, how, start.tokenizer, text, progress, lm_head=lm_head,
                                embeddings=embeddings, calib_samples=calib_samples, calib_seq_len=calib_seq_len)
        info = {"calibration": calibration} if choice.plan.needs_calib else {}
        return QuantizedModel(choice.model, start.tokenizer, choice.plan, start.source, {**info, "auto": choice.report})
    made, predicted = {}, None  # a recipe's record, and its per-layer predicted losses (recipes/recipe_report.py)
    if isinstance(how, QuantX):
        found = recipe_search.plan(start.model, how, start.tokenizer, text, _edges(start.model, lm_head, embeddings),
                                   calib_seq_len, progress)
        plan, made, predicted = found.plan, {"recipe": found.summary}, {r["layer"]: r["loss"] for r in found.rows}
    elif isinstance(how, RecipeFile):
        plan, made, predicted = how.plan(start.model), {"recipe": {"file": how.path}}, how.predicted
    else:
        plan = how if isinstance(how, Plan) else Plan.uniform(start.model, how, lm_head, embeddings)
    report = recipe_report.predict(start.model, plan, predicted) if predicted is not None else None
    measured = recipes.apply(start.model, plan, tokenizer=start.tokenizer, text=text, calib_samples=calib_samples,
                             calib_seq_len=calib_seq_len, lazy=start.lazy, checkpoint=checkpoint, progress=progress)
    if report is not None:
        made["recipe"]["report"] = recipe_report.measured(report, measured)
    info = {"calibration": calibration} if plan.needs_calib else {}
    return QuantizedModel(start.model, start.tokenizer, plan, start.source, {**info, **made}, checkpoint)


def _edges(model: nn.Module, lm_head, embeddings) -> dict[str, MethodConfig]:
    """A recipe's fixed specs for the output head and the input embedding (name -> config)."""
    if lm_head is True or embeddings is True:
        raise LowbitError("a recipe gives the head and the embedding formats of their own: pass configs "
                          "(lowbit.recipes.EDGE) or leave them in float, not True")
    return {n: c for n, c in zip(edge_names(model), (lm_head, embeddings)) if n is not None and isinstance(c, MethodConfig)}


def read_recipe(path: str | os.PathLike) -> RecipeFile:
    """A recipe file (recipes/recipe_file.py), checked; `quantize` takes it as `how`."""
    return recipe_file.read(path)


def recipe(source, qx: QuantX, out: str | os.PathLike | None = None, calib: str | os.PathLike | None = None, *,
           lm_head: bool | MethodConfig = False, embeddings: bool | MethodConfig = False, calib_seq_len: int = 512,
           progress: bool = True) -> recipe_search.Recipe:
    """The per-layer recipe for `source` under `qx`'s budget (recipes/quantx.py), written to `out` as
    YAML when given; the model is not changed. `lm_head`/`embeddings`: their own configs (the
    command line's EDGE) or False (float), counted in size and speed budgets."""
    text = texts.load("calib", calib)
    start = _start(source, None, lazy=True)  # the search reads one block at a time: memory bounded as GPTQ's
    found = recipe_search.plan(start.model, qx, start.tokenizer, text, _edges(start.model, lm_head, embeddings),
                               calib_seq_len, progress, lazy=start.lazy)
    if out is not None:
        notes = {r["layer"]: f"predicted loss {r['loss']:.3g}, {r['bpw']:.3f} bpw" for r in found.rows}
        recipe_file.write(out, found.plan, {"source": start.source, **found.summary}, notes)
    return found


def load(path: str | os.PathLike | None, shell: bool = False) -> QuantizedModel:
    """A quantized directory (its plan rebuilt from config.json, old directories included), or any
    source (a float model: plan None). `shell`: to evaluate only: a lowbit directory of a plain Llama
    is built without transformers (io/shell.py; ~2 s less), enough for the native engine."""
    loaded = load_any(path, shell=shell)
    qc = loaded.quantization
    if qc is None:
        return QuantizedModel(loaded.model, loaded.tokenizer, None, loaded.source)
    info = {k: v for k, v in qc.items() if k not in _FORMAT_KEYS}
    return QuantizedModel(loaded.model, loaded.tokenizer, Plan.from_config(qc, loaded.model), qc.get("source"), info)


def kernel_table() -> list[dict]:
    """Every row of the kernel table (kernels/table.py) and whether this machine runs it."""
    return describe_table()


def tune(threads: int | None = None, quick: bool = False, show: bool = False, reset: bool = False) -> str:
    """`lowbit tune`: time the CPU kernels' tile and thread choices and cache the best (or show or
    forget the cached ones); what to print."""
    if reset:
        removed, path = tuning.reset(threads)
        return f"removed {path}" if removed else f"nothing cached at {path}"
    return tuning.show(threads) if show else tuning.render(*tuning.run(threads, quick=quick))


SAMPLE_PROMPT = "Once upon a time"


@dataclass
class QuantizeReport:
    out: Path
    size: ModelSize
    disk_bytes: int
    plan: str = ""  # the plan's summary, e.g. "gptq W4-g128-sym"
    auto_report: str | None = None
    check: EvalResult | None = None
    sample: str | None = None
    speed: Speed | None = None  # the saved model's steady-state prefill and decode (bench's measurement)
    source_note: str | None = None  # what the source is, when that explains the numbers
    recipe_report: Path | None = None  # a recipe's per-layer report (recipes/recipe_report.py)


# The embedded default was published as a Q4_1 GGUF (4-bit, group 32, asymmetric with a float minimum):
# its float weights already lie on that grid, which lowbit's 4-bit grids (integer zero point) do not
# hold, so 4 bits rounds them a second time (measured: W4 g32 +23% perplexity, sym or asym; W8 +0.3%).
DEFAULT_SOURCE_NOTE = ("the source is SmolLM2-135M-Instruct as published: a Q4_1 GGUF (4-bit g32) dequantized "
                       "to float, so 4 bits here rounds weights already rounded to 4 bits: expect about +23% "
                       "perplexity at W4 g32 against it (W8: +0.3%); see README, Quickstart")


def _progress(out: Path, how, start: Loaded, calib, calib_text: str | None,
              options: dict) -> io.BlockCheckpoint | None:
    """The per-block progress directory beside the output (`.OUT.progress`): a calibrated run resumes
    from it; a lazy run parks its finished blocks there (not resumable). None for the search, which
    quantizes copies in memory. Keyed by everything that shapes the blocks (config, source, calibration
    file and text, options): another configuration never reuses them."""
    if isinstance(how, (Auto, QuantX)) or not (how.needs_calib or start.lazy is not None):
        return None
    key = how.to_record() if isinstance(how, (Plan, RecipeFile)) else how.to_dict()
    text = hashlib.sha256(calib_text.encode()).hexdigest() if calib_text is not None else None
    return io.BlockCheckpoint.beside(out, {"config": key, "source": start.source, "calib": str(calib),
                                           "calib_text": text, **options})


def check(q: QuantizedModel, reference=None, windows: int | None = None, progress: bool = True) -> EvalResult:
    """Perplexity and KLD of `q` against its source (`reference`, or the source read again) on the
    held-out text: `windows` of 512 tokens (None = all)."""
    return q.evaluate(kld=True, reference=reference, max_windows=windows, progress=progress)


def sample(out: str | os.PathLike) -> tuple[str, Speed]:
    """A short generation from the saved directory, reloaded as a user would, and its steady-state
    speed: bench's prefill of 512 tokens and decode of 64, after a warm-up (a 4-token prompt's
    timing says nothing about the engine)."""
    q = load(out)
    text, _ = q.generate(SAMPLE_PROMPT, max_new_tokens=32)
    return text, bench(q.model, q._tokenizer(), prompt_tokens=512, gen_tokens=64, runs=1, roofline=False)


def quantize_to(source, out: str | os.PathLike, how, calib: str | os.PathLike | None = None,
                **options) -> QuantizeReport:
    """Load, `quantize` (`options` go to it), save; then (check_windows != 0) `check` against the
    source (None = every window) and `sample` the saved model. Calibrated methods keep per-block
    progress in `.OUT.progress` beside the output: the same call after a crash resumes from the last
    finished block. The run holds OUT's lock throughout: a second run into the same OUT fails at once."""
    with io.output_lock(out):
        return _quantize_to(source, out, how, calib, **options)


def _quantize_to(source, out: str | os.PathLike, how, calib: str | os.PathLike | None = None, *,
                 overwrite: bool = False, check_windows: int | None = 0, progress: bool = True,
                 **options) -> QuantizeReport:
    out = Path(out)
    io.check_destination(out.absolute(), overwrite)  # fail before any expensive work
    how = _how(how)
    text = texts.load("calib", calib) if calib is not None else None  # bad text fails before loading
    start = _start(source, None, lazy=not isinstance(how, (Auto, QuantX)))
    # The check's reference: a copy of an eager (small) source; a lazy source is read again from its
    # shards at check time, one block at a time (StreamedSource), so the check stays bounded too.
    reference = copy.deepcopy(start.model) if check_windows != 0 and start.lazy is None else None
    checkpoint = _progress(out, how, start, calib, text, options)
    try:
        q = quantize(start, how, calib, calib_text=text, progress=progress, checkpoint=checkpoint, **options)
        auto = {"auto_report.md": recipes.report(q.info["auto"])} if "auto" in q.info else {}
        recipe = q.info.get("recipe")
        reports = {**auto, **({"recipe_report.md": recipe_report.render(recipe)} if recipe else {})}
        q.save(out, overwrite=overwrite, extra_files=reports)
    except BaseException as e:
        if checkpoint is not None and not how.needs_calib:  # only a calibrated run can resume
            checkpoint.clear()
        if isinstance(e, LowbitError) and checkpoint is not None and checkpoint.resumable() \
                and str(checkpoint.path) not in str(e):
            raise LowbitError(f"{e}; the {checkpoint.resumable()} finished blocks are kept in {checkpoint.path}: "
                              f"the same command resumes from them") from None
        raise
    if checkpoint is not None:
        if check_windows != 0:
            q.reload()  # the check runs the quantized model: its blocks come back from disk
        checkpoint.clear()
        q.checkpoint = None
    report = QuantizeReport(out, q.size(), io.dir_size(out), q.plan.summary(), auto.get("auto_report.md"),
                            source_note=DEFAULT_SOURCE_NOTE if start.source == "default" else None)
    if check_windows != 0:
        report.check = check(q, reference, check_windows, progress)
        del reference, q, start  # the saved model is reloaded below: one copy at a time
        report.sample, report.speed = sample(out)
    if recipe:  # written with the model; again once the check has measured the saved model's decode speed
        path = out / "recipe_report.md"
        report.recipe_report = recipe_report.write(path, recipe, report.speed.decode_tps) if report.speed else path
    return report
