"""quantize -> save -> load reproduces the in-memory model exactly, for several architectures."""

import errno
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.nn import QuantEmbedding, QuantLinear
from tests.conftest import TINY_TYPES

SAVE_MODULE = importlib.import_module("lowbit.io.save")  # the module, not the function it exports


def _logits(q, ids):
    with torch.inference_mode():
        return q.model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 290, (2, 23), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", TINY_TYPES)
@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (3, 64, False), (2, -1, True), (8, 32, False)])
def test_save_load_reproduces_logits(tiny_model_dir, tmp_path, ids, model_type, bits, group, sym):
    spec, path = lowbit.RTN(bits=bits, group_size=group, sym=sym), tiny_model_dir(model_type)
    q = lowbit.quantize(path, spec, progress=False)
    linears = [m for m in q.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 7 and not isinstance(q.model.get_output_embeddings(), QuantLinear)
    expected = _logits(q, ids)
    q.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowbit" and config["plan"] == [
        {"spec": spec.to_dict(), "layers": [n for n, m in q.model.named_modules() if isinstance(m, QuantLinear)]}]
    assert config["modules"]["model.layers.0.self_attn.q_proj"] == {
        "kind": "uniform", "bits": bits, "group_size": group, "sym": sym, "shape": [64, 64]}
    loaded = lowbit.load(tmp_path / "out")
    assert torch.equal(_logits(loaded, ids), expected)
    assert loaded.plan == q.plan and loaded.source == q.source == str(path.absolute())
    out = loaded.model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 26)


def test_quantization_changes_the_model_by_the_expected_amount(tiny_model_dir, ids):
    path = tiny_model_dir("llama")
    source = _logits(lowbit.load(path), ids)
    err = {b: (_logits(lowbit.quantize(path, lowbit.RTN(bits=b, group_size=32), progress=False), ids)
               - source).pow(2).mean().item() for b in (2, 4, 8)}
    assert 0 < err[8] < err[4] < err[2]


def test_sharded_save(tiny_model_dir, tmp_path, ids):
    q = lowbit.quantize(tiny_model_dir("qwen2"), lowbit.RTN(bits=4, group_size=32), progress=False)
    q.save(tmp_path / "out", max_shard_size="20KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(_logits(lowbit.load(tmp_path / "out"), ids), _logits(q, ids))


def test_lm_head_and_embeddings_optional(tiny_model_dir, tmp_path, ids):
    q = lowbit.quantize(tiny_model_dir("llama"), lowbit.RTN(bits=8, group_size=32), lm_head=True,
                        embeddings=True, progress=False)
    assert isinstance(q.model.get_output_embeddings(), QuantLinear)
    assert isinstance(q.model.get_input_embeddings(), QuantEmbedding)
    q.save(tmp_path / "out")
    loaded = lowbit.load(tmp_path / "out")
    assert isinstance(loaded.model.get_input_embeddings(), QuantEmbedding)
    assert loaded.plan == q.plan
    assert torch.equal(_logits(loaded, ids), _logits(q, ids))


def test_any_module_with_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 5))
    x = torch.randn(3, 64)
    before = model(x)
    q = lowbit.quantize(model, lowbit.RTN(bits=8, group_size=32), progress=False)
    assert q.model is model and isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert q.tokenizer is None and q.source is None and list(q.plan.layers) == ["0", "2"]
    torch.testing.assert_close(model(x), before, atol=0.05, rtol=0.05)
    with pytest.raises(LowbitError, match="transformers model"):
        q.save("unused")


def test_full_disk_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    q = lowbit.quantize(tiny_model_dir("llama"), lowbit.RTN(bits=4, group_size=32), progress=False)
    q.save(tmp_path / "old")
    before = sorted(p.name for p in (tmp_path / "old").iterdir())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SAVE_MODULE, "_write_tensors", full)
    with pytest.raises(LowbitError, match="disk full"):
        q.save(tmp_path / "new")
    with pytest.raises(LowbitError, match="disk full"):
        q.save(tmp_path / "old", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no new dir, no partial dirs
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == before
    lowbit.load(tmp_path / "old")


def test_interrupted_save_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    q = lowbit.quantize(tiny_model_dir("llama"), lowbit.RTN(bits=4, group_size=32), progress=False)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SAVE_MODULE, "_write_tensors", killed)
    with pytest.raises(KeyboardInterrupt):
        q.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("head_spec", [None, lowbit.RTN(bits=4, group_size=32)])
def test_tied_head_and_embedding_are_quantized_and_stored_once(tiny_model_dir, tmp_path, ids, head_spec):
    """A tied head and embedding with one spec share one QTensor, stored once (as llama.cpp stores a tied
    output), and come back shared; with different specs each is its own."""
    spec = lowbit.RTN(bits=8, group_size=32)
    q = lowbit.quantize(tiny_model_dir("llama", tie_word_embeddings=True), spec, progress=False,
                        lm_head=head_spec or True, embeddings=True)
    head, embed = q.model.get_output_embeddings(), q.model.get_input_embeddings()
    assert (head.qweight.data_ptr() == embed.qweight.data_ptr()) == (head_spec is None)
    q.save(tmp_path / "out")
    stored = load_file(tmp_path / "out" / "model.safetensors")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    if head_spec is None:
        assert not any(k.startswith("lm_head.") for k in stored) and qc["shared"] == {"lm_head": "model.embed_tokens"}
    else:
        assert "lm_head.qweight" in stored and "shared" not in qc
    loaded = lowbit.load(tmp_path / "out")
    head, embed = loaded.model.get_output_embeddings(), loaded.model.get_input_embeddings()
    assert (head.qweight.data_ptr() == embed.qweight.data_ptr()) == (head_spec is None)
    assert loaded.plan == q.plan and torch.equal(_logits(loaded, ids), _logits(q, ids))
    size = loaded.size()
    assert size.total_bytes <= sum(t.numel() * t.element_size() for t in stored.values())


@pytest.mark.parametrize("shared", [{"lm_head": "model.nope"}, {"lm_head": "model.layers.0.mlp.up_proj"}, ["lm_head"],
                                    {"model.embed_tokens": "lm_head", "lm_head": "model.embed_tokens"}])
def test_damaged_shared_entry_is_one_line_error(tiny_model_dir, tmp_path, shared):
    q = lowbit.quantize(tiny_model_dir("llama", tie_word_embeddings=True), lowbit.RTN(bits=8, group_size=32),
                        progress=False, lm_head=True, embeddings=True)
    q.save(tmp_path / "out")
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["shared"] = shared
    config_path.write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="'shared' is damaged"):
        lowbit.load(tmp_path / "out")
