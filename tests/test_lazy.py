"""Lazy sources: a sharded safetensors model is quantized one decoder block at a time (blocks read just
before use, float weights gone after) and gives the same bytes as the eager path."""

import gc
import importlib
import weakref

import pytest
import torch
from torch import nn

import lowbit
from lowbit import api, cli
from lowbit.calib import runner
from lowbit.errors import LowbitError
from lowbit.eval import evaluate
from lowbit.io import Shards
from lowbit.models import StreamedSource, load_source
from lowbit.models.lazy import LazyBlocks

apply_module = importlib.import_module("lowbit.recipes.apply")  # the module, not the function it exports

OPTS = dict(calib_samples=4, calib_seq_len=48)


@pytest.fixture
def sharded(tiny_model_dir, tmp_path_factory):
    """Factory: a tiny model re-saved in bf16 as several safetensors shards (like a real checkpoint)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    def make(model_type="llama", **overrides):
        src = tiny_model_dir(model_type, **overrides)
        out = tmp_path_factory.mktemp(f"sharded-{model_type}")
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
            model.save_pretrained(out, max_shard_size="60KB")
        finally:
            hf_logging.enable_progress_bar()
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
        assert len(list(out.glob("model-*.safetensors"))) >= 3
        return out
    return make


def _eager(src, cfg, out, **opts):
    loaded = load_source(src)
    assert loaded.lazy is None
    api.quantize(loaded, cfg, progress=False, **opts).save(out)


def _same_dirs(a, b):
    for name in ("model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("method,model_type,tied", [("rtn", "llama", False), ("rtn", "llama", True),
                                                    ("rtn", "qwen2", False), ("gptq", "llama", True),
                                                    ("gptq", "gemma", False)])
def test_lazy_gives_the_eager_bytes(sharded, tmp_path, method, model_type, tied):
    src = sharded(model_type, num_hidden_layers=3, tie_word_embeddings=tied)
    cfg = lowbit.methods.config_for(method, bits=3, group_size=32)
    opts = OPTS if cfg.needs_calib else {}
    _eager(src, cfg, tmp_path / "eager", **opts)
    api.quantize_to(src, tmp_path / "lazy", cfg, check_windows=0, progress=False, **opts)
    _same_dirs(tmp_path / "eager", tmp_path / "lazy")
    if method == "rtn":  # the Python verb on a path is lazy too
        api.quantize(str(src), cfg, progress=False).save(tmp_path / "verb")
        _same_dirs(tmp_path / "eager", tmp_path / "verb")


def _block_state(block: nn.Module) -> str:
    tensors = list(block.state_dict().values())
    if all(t.is_meta for t in tensors):
        return "meta"
    if any(t.is_meta for t in tensors):
        return "partly meta"
    return "float" if any(isinstance(m, nn.Linear) for m in block.modules()) else "quantized"


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_one_float_block_at_a_time(sharded, tmp_path, monkeypatch, method):
    src = sharded("llama", num_hidden_layers=4)
    loaded = load_source(src, lazy=True)
    lazy, layers = loaded.lazy, loaded.lazy.layers
    assert [_block_state(b) for b in layers] == ["meta"] * 4
    assert lazy.block_bytes(0) == sum(p.numel() * 4 for p in layers[0].parameters())
    seen, weights, real_load = [], [], LazyBlocks.load

    def observe(self, i):  # the state of every block just before block i is read
        gc.collect()
        alive = [j for j, refs in enumerate(weights) if any(r() is not None for r in refs)]
        seen.append((i, set(self.loaded), [_block_state(b) for b in layers], alive))
        real_load(self, i)
        assert _block_state(layers[i]) == "float"
        weights.append([weakref.ref(m.weight) for m in layers[i].modules() if isinstance(m, nn.Linear)])
    monkeypatch.setattr(LazyBlocks, "load", observe)
    cfg = lowbit.methods.config_for(method, bits=4, group_size=32)
    q = api.quantize(loaded, cfg, progress=False, **(OPTS if cfg.needs_calib else {}))
    assert [i for i, _, _, _ in seen] == [0, 1, 2, 3]
    for i, loaded_before, states, alive in seen:
        assert loaded_before == set()  # the previous block was finished before this one was read
        assert states == ["quantized"] * i + ["meta"] * (4 - i)
        assert alive == []  # no float weight of an earlier block is still referenced anywhere
    assert [_block_state(b) for b in layers] == ["quantized"] * 4
    gc.collect()
    assert all(r() is None for refs in weights for r in refs)
    assert not any(t.is_meta for t in q.model.state_dict().values())  # the loader is done with it


def test_streamed_reference_matches_the_model_in_memory(sharded, tiny_tokenizer):
    """The check's reference for a lazy source (blocks streamed, each put back on meta) scores like
    the eager model, with windows of two lengths (the last one is shorter)."""
    src = sharded("llama", num_hidden_layers=3)
    eager = load_source(src).model
    text = lowbit.calib.builtin("eval")[:3000]
    streamed = StreamedSource(load_source(src, lazy=True).lazy)
    a = evaluate(eager, tiny_tokenizer, text, ctx=200, source=eager, progress=False)
    b = evaluate(eager, tiny_tokenizer, text, ctx=200, source=streamed, progress=False)
    assert a.windows > 2 and len({h.shape[1] for h in streamed.finals.values()}) == 2  # 200 and shorter
    assert b.source_ppl == pytest.approx(a.source_ppl, rel=1e-5) and b.kld == pytest.approx(0, abs=1e-6)
    assert all(_block_state(block) == "meta" for block in streamed.lazy.layers)


def test_lazy_check_step(sharded, tmp_path):
    """quantize_to's accuracy check on a lazy source: no in-memory copy, same numbers as the eager one."""
    src = sharded("llama", num_hidden_layers=2)
    cfg = lowbit.RTN(bits=3, group_size=32)
    r = api.quantize_to(src, tmp_path / "out", cfg, check_windows=2, progress=False)
    q = api.load(tmp_path / "out")
    ref = evaluate(q.model, q.tokenizer, lowbit.calib.builtin("eval"), max_windows=2,
                   source=load_source(src).model, progress=False, exact=False)  # the check's int8 path
    assert r.check.source_ppl == pytest.approx(ref.source_ppl, rel=1e-5)
    assert r.check.kld == pytest.approx(ref.kld, rel=1e-4) and r.check.kld > 0
    again = api.load(tmp_path / "out").evaluate(kld=True, max_windows=2, progress=False)  # `lowbit eval --kld`
    assert again.kld == pytest.approx(ref.kld, rel=1e-4)


def test_lazy_resume_reads_only_unfinished_blocks(sharded, tmp_path, monkeypatch):
    src = sharded("llama", num_hidden_layers=3)
    cfg = lowbit.GPTQ(bits=3, group_size=32)
    opts = dict(check_windows=0, progress=False, **OPTS)
    api.quantize_to(src, tmp_path / "clean", cfg, **opts)

    real_run_block, calls = runner.run_block, []

    def crash_in_third_block(block, inputs, kwargs):
        calls.append(1)
        if len(calls) == 5:  # block 2's float pass
            raise KeyboardInterrupt
        return real_run_block(block, inputs, kwargs)
    monkeypatch.setattr(runner, "run_block", crash_in_third_block)
    with pytest.raises(KeyboardInterrupt):
        api.quantize_to(src, tmp_path / "out", cfg, **opts)
    monkeypatch.setattr(runner, "run_block", real_run_block)

    reads, real_read = [], Shards.read
    monkeypatch.setattr(Shards, "read", lambda self, names, dtype: (reads.extend(names),
                                                                     real_read(self, names, dtype))[1])
    api.quantize_to(src, tmp_path / "out", cfg, **opts)
    blocks_read = {n.split(".")[2] for n in reads if n.startswith("model.layers.")}
    assert blocks_read == {"2"}  # blocks 0 and 1 came from the progress directory
    _same_dirs(tmp_path / "clean", tmp_path / "out")


def test_truncated_shard_is_one_line_and_leaves_nothing(sharded, tmp_path, capsys):
    src = sharded("llama", num_hidden_layers=3)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(LowbitError, match="truncated") as e:
        api.quantize_to(src, work / "out", lowbit.GPTQ(bits=4, group_size=32), progress=False, **OPTS)
    assert "\n" not in str(e.value) and shard.name in str(e.value)
    assert cli.main(["quantize", str(src), "-o", str(work / "out"), "--method", "rtn", "--no-check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error:") and "\n" not in err
    assert list(work.iterdir()) == []


def test_shard_changed_after_the_check_is_a_lowbit_error(sharded, tmp_path):
    """A shard damaged while blocks are being read (after the up-front check): a one-line error, no output."""
    src = sharded("llama", num_hidden_layers=3)
    loaded = load_source(src, lazy=True)
    for shard in src.glob("model-*.safetensors"):
        shard.write_bytes(b"")
    with pytest.raises(LowbitError, match="cannot read"):
        api.quantize(loaded, lowbit.RTN(bits=4, group_size=32), progress=False)


def test_nan_in_a_late_block_fails_before_any_work(sharded, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = sharded("llama", num_hidden_layers=3)
    name = "model.layers.2.mlp.up_proj.weight"
    shard = next(f for f in src.glob("model-*.safetensors") if name in load_file(f))
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    assert cli.main(["quantize", str(src), "-o", str(tmp_path / "out"), "--group-size", "32"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.layers.2.mlp.up_proj.weight contain NaN" in err  # no progress bar first
    assert not (tmp_path / "out").exists()


def test_streaming_writer_lays_out_the_bytes_of_save_file(tmp_path):
    """io/save.py writes safetensors itself (tensor by tensor, at their offsets): the same bytes as
    safetensors' own save_file, for every dtype we store, scalars and empty tensors."""
    from safetensors.torch import save_file

    from lowbit.io.save import _write_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"b.w": torch.randn(3, 5, generator=g).bfloat16(), "a": torch.randn(2, 2, generator=g),
               "codes": torch.randint(-2**31, 2**31 - 1, (7,), dtype=torch.int32, generator=g),
               "empty": torch.zeros(0, 4, dtype=torch.float16), "s": torch.tensor(3.0),
               "u": torch.arange(9, dtype=torch.uint8), "mask": torch.tensor([True, False]),
               "i8": torch.tensor([-1, 2], dtype=torch.int8), "d": torch.randn(3, dtype=torch.float64, generator=g),
               "l": torch.tensor([7]), "h": torch.tensor([5, -3], dtype=torch.int16)}
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    _write_tensors(tensors, {"ours.safetensors": list(tensors)}, tmp_path, {})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_finished_blocks_leave_memory(sharded, tmp_path, monkeypatch, method):
    """With a checkpoint, each finished block is written there and dropped: when block i is read, every
    earlier block is on meta and none of its quantized tensors is referenced anywhere. Saved from those
    files (sharded here), the model has the eager path's bytes; reloaded, it computes the same logits."""
    from lowbit.io import BlockCheckpoint

    src = sharded("llama", num_hidden_layers=4)
    cfg = lowbit.methods.config_for(method, bits=3, group_size=32)
    opts = OPTS if cfg.needs_calib else {}
    eager = load_source(src)
    qe = api.quantize(eager, cfg, progress=False, **opts)
    qe.save(tmp_path / "eager", max_shard_size="20KB")

    loaded = load_source(src, lazy=True)
    layers = loaded.lazy.layers
    seen, kept, real_load, real_keep = [], [], LazyBlocks.load, BlockCheckpoint.keep

    def observe(self, i):
        gc.collect()
        alive = [j for j, refs in enumerate(kept) if any(r() is not None for r in refs)]
        seen.append(([_block_state(b) for b in layers], alive))
        real_load(self, i)

    def keep(self, i, block):
        kept.append([weakref.ref(t) for t in block.buffers()])  # the quantized block's QTensor tensors
        real_keep(self, i, block)
    monkeypatch.setattr(LazyBlocks, "load", observe)
    monkeypatch.setattr(BlockCheckpoint, "keep", keep)
    q = api.quantize(loaded, cfg, progress=False, checkpoint=BlockCheckpoint(tmp_path / "progress", {}), **opts)
    assert len(seen) == 4 and all(states == ["meta"] * 4 and alive == [] for states, alive in seen)
    assert [_block_state(b) for b in layers] == ["meta"] * 4 and len(kept) == 4 and all(kept)
    gc.collect()
    assert all(r() is None for refs in kept for r in refs)

    q.save(tmp_path / "stored", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "eager").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) >= 3
    assert files == sorted(p.name for p in (tmp_path / "stored").iterdir())
    for name in files:
        assert (tmp_path / "eager" / name).read_bytes() == (tmp_path / "stored" / name).read_bytes(), name
    q.reload()
    assert [_block_state(b) for b in layers] == ["quantized"] * 4
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(q.model(ids).logits, qe.model(ids).logits)


def test_failed_lazy_rtn_leaves_no_progress(sharded, tmp_path, monkeypatch):
    """A lazy RTN run parks finished blocks beside the output; it cannot resume, so a failure removes them."""
    src = sharded("llama", num_hidden_layers=3)
    real, calls = apply_module.quantize_weight, []

    def fail_in_block_1(*args):
        calls.append(1)
        if len(calls) == 10:  # 7 linears per block: block 0 is stored by now
            assert (tmp_path / ".out.progress" / "block_0.safetensors").is_file()
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(apply_module, "quantize_weight", fail_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        api.quantize_to(src, tmp_path / "out", lowbit.RTN(bits=4, group_size=32), progress=False)
    assert list(tmp_path.iterdir()) == []
