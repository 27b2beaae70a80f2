"""GPTQ act-order (`desc_act`: a g_idx that is not k // group) imported as an ordinary UniformQ over the
permuted columns plus the layer's input permutation (nn.QuantLinear.in_perm): the weights are the
GPTQ formula on the file's own tensors, the universal path and the native engine give the same
logits, and saving (lowbit or GPTQ) writes the same layers back.

The act-order checkpoints are built here the way GPTQ writes them: columns visited in a random order
(the stand-in for decreasing diag(H)), a group closed every `group` visited columns, each column
stored at its original place with its group in g_idx."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.gptq import _from_words, _to_words
from lowbit.runtime.engine import load_decoder
from test_engine import TINY, check_agreement, quantized
from test_export_gptq import _ref_gptq_weight

QUANTIZED = ("qweight", "qzeros", "scales", "g_idx")


def _permute_inputs(model, seed: int = 3) -> None:
    """Random input permutations: layer 0's q/k/v and gate/up share one each (fused by the engine),
    layer 1's differ (run one by one); o and down have their own."""
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj), (attn.o_proj,), (mlp.down_proj,)):
            shared = torch.randperm(group[0].in_features, generator=g)
            for m in group:
                m.in_perm = (shared if i == 0 else torch.randperm(m.in_features, generator=g)).to(torch.int32)


def test_engine_gathers_permuted_inputs_like_the_universal_path():
    model = quantized("llama-bias")  # head_dim 48: o_proj's input is a 32-wide block and a tail
    plain = load_decoder(model, max_context=64)
    _permute_inputs(model)
    ids = torch.randint(0, TINY["vocab_size"], (14,), generator=torch.Generator().manual_seed(1))
    eng, want = check_agreement(model, ids, prompt=10)
    assert (plain.forward(ids) - want[-1]).abs().max() > 0.1  # the permutations change the model


def _act_order(out, bits: int, group: int, fmt: str, seed: int = 0) -> None:
    """Turn GPTQ directory `out` (in order) into an act-order checkpoint of checkpoint format `fmt`:
    each module's columns visited in a random order (shared by q/k/v and by gate/up, as their common
    input gives them one diag(H)), visited column i stored at column order[i] with group i // group."""
    state = load_file(out / "model.safetensors")
    gen, orders = torch.Generator().manual_seed(seed), {}
    raw = json.loads((out / "config.json").read_text())
    qc = raw["quantization_config"]
    for key in [k for k in state if k.endswith(".g_idx")]:
        name = key[:-len(".g_idx")]
        k = state[key].numel()
        shared = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        order = orders.setdefault(shared, torch.randperm(k, generator=gen))
        codes = _from_words(state[f"{name}.qweight"].T.contiguous(), bits, k)  # [N, K], column i: group i // group
        moved = torch.empty_like(codes)
        moved[:, order] = codes
        state[f"{name}.qweight"] = _to_words(moved, bits).T.contiguous()
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // group).to(torch.int32)
        state[key] = g_idx
        if fmt != qc["checkpoint_format"]:  # v1 stores z − 1, v2 z
            n = state[f"{name}.scales"].shape[1]
            z = _from_words(state[f"{name}.qzeros"], bits, n).to(torch.int16) + (1 if fmt == "gptq_v2" else -1)
            assert bool((z >= 0).all() and (z < 2**bits).all())
            state[f"{name}.qzeros"] = _to_words(z.to(torch.uint8), bits)
    qc.update(desc_act=True, checkpoint_format=fmt)
    (out / "config.json").write_text(json.dumps(raw))
    (out / "quantize_config.json").write_text(json.dumps(qc))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def _checkpoint(tiny_model_dir, tmp_path, bits: int, group: int, fmt: str):
    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.RTN(bits=bits, group_size=group, sym=False),
                        progress=False)
    out = q.export(tmp_path / "gptq", to="gptq")
    _act_order(out, bits, group, fmt)
    return out


def _modules(state: dict) -> list[str]:
    return [k[:-len(".g_idx")] for k in state if k.endswith(".g_idx")]


def _weights(module) -> torch.Tensor:
    """A QuantLinear's weights in input order: column in_perm[i] of x meets stored column i."""
    w = module.qtensor.dequantize()
    if module.in_perm is None:
        return w
    out = torch.empty_like(w)
    out[:, module.in_perm.long()] = w
    return out


@pytest.mark.parametrize("bits,group,fmt", [(4, 32, "gptq"), (3, 32, "gptq_v2"), (2, 32, "gptq")])
def test_act_order_import_is_the_gptq_formula_and_runs_on_the_engine(tiny_model_dir, tmp_path, bits, group, fmt):
    out = _checkpoint(tiny_model_dir, tmp_path, bits, group, fmt)
    state = load_file(out / "model.safetensors")
    q = lowbit.load(out)
    assert q.info["imported"] == f"gptq ({fmt}) act-order"
    names = _modules(state)
    assert len(names) == 14
    for name in names:
        module = q.model.get_submodule(name)
        assert module.in_perm is not None, name
        t = {k: state[f"{name}.{k}"] for k in QUANTIZED}
        assert torch.equal(_weights(module), _ref_gptq_weight(t, bits, fmt == "gptq")), name
    ids = torch.tensor([1, 5, 9, 33, 2, 40, 7, 100, 3, 11, 60, 4])
    eng, want = check_agreement(q.model, ids, prompt=8)
    eng.truncate(0)
    with torch.inference_mode():
        q.model.get_submodule(names[0]).in_perm = None  # the permutation matters
        assert (q.model(ids[None]).logits[0, -1] - want[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("bits,group,fmt", [(4, 32, "gptq_v2"), (3, 32, "gptq")])
def test_act_order_saves_as_lowbit_and_exports_as_gptq_exactly(tiny_model_dir, tmp_path, bits, group, fmt):
    out = _checkpoint(tiny_model_dir, tmp_path, bits, group, fmt)
    q = lowbit.load(out)
    q.save(tmp_path / "lowbit")
    assert json.loads((tmp_path / "lowbit" / "config.json").read_text())["quantization_config"]["format_version"] == 3
    back = lowbit.load(tmp_path / "lowbit")
    first = load_file(out / "model.safetensors")
    for name in _modules(first):
        a, b = q.model.get_submodule(name), back.model.get_submodule(name)
        assert torch.equal(a.in_perm, b.in_perm) and a.in_perm.dtype == torch.int32, name
        assert all(torch.equal(x, y) for x, y in zip(a.qtensor.tensors().values(), b.qtensor.tensors().values())), name
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.inference_mode():
        assert torch.equal(back.model(ids).logits, q.model(ids).logits)
    again = back.export(tmp_path / "again", to="gptq")
    qc = json.loads((again / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True
    second = load_file(again / "model.safetensors")
    same = ("qweight", "scales", "g_idx") + (("qzeros",) if qc["checkpoint_format"] == fmt else ())
    for name in _modules(first):
        for k in same:
            assert torch.equal(first[f"{name}.{k}"], second[f"{name}.{k}"]), f"{name}.{k}"
    twice = lowbit.load(again)
    with torch.inference_mode():
        assert torch.equal(twice.model(ids).logits, q.model(ids).logits)


K = 64  # q_proj's input width in the tiny model


@pytest.mark.parametrize("g_idx, needle", [
    (torch.cat([torch.tensor([1], dtype=torch.int32), torch.arange(1, K, dtype=torch.int32) // 32]),
     "puts 31 columns in group 0, not 32"),
    (torch.cat([torch.tensor([2], dtype=torch.int32), torch.arange(1, K, dtype=torch.int32) // 32]), r"outside \[0, 2\)"),
    (torch.arange(K + 1, dtype=torch.int32) // 32, r"g_idx is \[65\] int32, expected \[64\]"),
    (torch.arange(K, dtype=torch.int64) // 32, "g_idx is"),
], ids=["unequal-groups", "out-of-range", "length", "dtype"])
def test_bad_g_idx_is_one_line(tiny_model_dir, tmp_path, g_idx, needle):
    out = _checkpoint(tiny_model_dir, tmp_path, 4, 32, "gptq")
    state = load_file(out / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.g_idx"] = g_idx
    save_file(state, out / "model.safetensors")
    with pytest.raises(LowbitError, match=needle) as e:
        lowbit.load(out)
    assert "\n" not in str(e.value) and "q_proj" in str(e.value)


def test_act_order_exports_to_gguf_in_input_order_and_not_to_compressed_tensors(tiny_model_dir, tmp_path):
    """GGUF blocks are contiguous groups of the input: an act-order layer is fitted in input order
    (close to its weights, not to its stored column order); compressed-tensors no longer stores g_idx."""
    from gguf import GGUFReader, quants

    q = lowbit.load(_checkpoint(tiny_model_dir, tmp_path, 4, 32, "gptq"))
    with pytest.raises(LowbitError, match="act-order.*--to gptq") as e:
        q.export(tmp_path / "ct", to="compressed-tensors")
    assert "\n" not in str(e.value) and not (tmp_path / "ct").exists()
    path = q.export(tmp_path / "m.gguf")
    down = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_down.weight")
    got = torch.from_numpy(quants.dequantize(down.data, down.tensor_type))
    module = q.model.get_submodule("model.layers.1.mlp.down_proj")
    want, stored = _weights(module), module.qtensor.dequantize()

    def rel(w):
        return float((got - w).square().sum() / w.square().sum())

    assert rel(want) < 1e-2 < rel(stored)


def test_compressed_tensors_group_act_order_imports_as_its_formula(tiny_model_dir, tmp_path):
    """An (older llm-compressor) `actorder: group` file: codes in input order, weight_g_idx the group of
    each column; unpacked by compressed-tensors' own helpers for the reference."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.RTN(bits=4, group_size=32, sym=False),
                        progress=False)
    out = q.export(tmp_path / "ct", to="compressed-tensors")
    state, raw = load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())
    gen, refs = torch.Generator().manual_seed(0), {}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key[:-len(".weight_packed")]
        n, k = state[f"{name}.weight_shape"].tolist()
        codes = helpers.unpack_from_int32(state[key], 4, torch.Size([n, k]))  # signed q, column i in group i // 32
        order = torch.randperm(k, generator=gen)
        moved = torch.empty_like(codes)
        moved[:, order] = codes
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // 32).to(torch.int32)
        state[key], state[f"{name}.weight_g_idx"] = helpers.pack_to_int32(moved, 4), g_idx
        zp = helpers.unpack_from_int32(state[f"{name}.weight_zero_point"], 4, torch.Size([n, k // 32]), packed_dim=0)
        scale = state[f"{name}.weight_scale"].float()
        refs[name] = (moved - zp[:, g_idx.long()]).float() * scale[:, g_idx.long()]
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (out / "config.json").write_text(json.dumps(raw))
    back = lowbit.load(out)
    assert back.info["imported"] == "compressed-tensors act-order" and len(refs) == 14
    for name, ref in refs.items():
        assert torch.equal(_weights(back.model.get_submodule(name)), ref), name
    ids = torch.tensor([1, 5, 9, 33, 2, 40, 7, 100, 3, 11])
    check_agreement(back.model, ids, prompt=6)


def test_damaged_in_perm_is_one_line(tiny_model_dir, tmp_path):
    q = lowbit.load(_checkpoint(tiny_model_dir, tmp_path, 4, 32, "gptq"))
    out = q.save(tmp_path / "lowbit")
    state = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.in_perm"
    state[name] = torch.zeros_like(state[name])
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="down_proj's in_perm is not a permutation of its 128 input columns") as e:
        lowbit.load(out)
    assert "\n" not in str(e.value)
