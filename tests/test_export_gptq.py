"""GPTQ export and import, AWQ (GEMM) import, checked against reference unpackers written here from the
formats' specification (AutoGPTQ's word-by-word packing loops, its 3-bit straddling pattern, v1's
z − 1 zero points, AutoAWQ's 0 2 4 6 1 3 5 7 nibble order), independent of lowbit's packing.py."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import LowbitError
from lowbit.io.act_order import permutation
from lowbit.io.gptq import _format
from lowbit.recipes import targets


def _ref_unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's layout, read word by word: [R·b/32, C] int32 -> [R, C] values along the rows. For
    2/4/8 bits word w holds values 32/b·w + j at bits b·j; for 3 bits every 3 words hold 32 values,
    10 in the first (bits 0..29), value 10 across bits 30-31 and the next word's bit 0, 10 more from
    bit 1, value 21 across bit 31 and the third word's bits 0-1, and 10 more from bit 2."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    mask = 2**bits - 1
    rows = []
    if bits != 3:
        for r in range(w.shape[0]):
            rows += [(w[r] >> (bits * j)) & mask for j in range(32 // bits)]
        return torch.stack(rows)
    for r in range(0, w.shape[0], 3):
        a, b, c = w[r], w[r + 1], w[r + 2]
        rows += [(a >> (3 * j)) & 7 for j in range(10)]
        rows.append(((a >> 30) & 3) | ((b & 1) << 2))
        rows += [(b >> (3 * j + 1)) & 7 for j in range(10)]
        rows.append(((b >> 31) & 1) | ((c & 3) << 1))
        rows += [(c >> (3 * j + 2)) & 7 for j in range(10)]
    return torch.stack(rows)


def _ref_gptq_weight(t: dict, bits: int, v1: bool) -> torch.Tensor:
    """w[n, k] = scales[g, n] · (q[k, n] − z[g, n]), g = g_idx[k]; v1 stores z − 1."""
    q = _ref_unpack_rows(t["qweight"], bits)  # [K, N]
    z = _ref_unpack_rows(t["qzeros"].T.contiguous(), bits).T + (1 if v1 else 0)  # [G, N]
    g = t["g_idx"].long()
    return ((q - z[g]).float() * t["scales"].float()[g]).T


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (3, 64, False), (2, 32, False), (8, -1, True)])
def test_gptq_export_matches_the_reference_unpacking(tiny_model_dir, tmp_path, bits, group, sym):
    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.RTN(bits=bits, group_size=group, sym=sym),
                        progress=False)
    out = q.export(tmp_path / "gptq", to="gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", bits, group, sym, False)
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    state = load_file(out / "model.safetensors")
    names = targets(lowbit.load(tiny_model_dir("llama")).model)
    for name in names:
        t = {k: state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        want = q.model.get_submodule(name).qtensor.dequantize()
        assert torch.equal(_ref_gptq_weight(t, bits, qc["checkpoint_format"] == "gptq"), want), name
    back = lowbit.load(out)
    assert back.info["imported"] == f"gptq ({qc['checkpoint_format']})"
    for name in names:
        a, b = q.model.get_submodule(name).qtensor.tensors(), back.model.get_submodule(name).qtensor.tensors()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    x = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.inference_mode():
        assert torch.allclose(back.model(x).logits, q.model(x).logits, atol=1e-6, rtol=0)


def test_v1_cannot_store_zero_point_zero_so_v2_is_written(tiny_model_dir, tmp_path):
    """Asymmetric groups without a negative weight have z = 0, which v1's z − 1 cannot hold."""
    model = lowbit.load(tiny_model_dir("llama"))
    with torch.no_grad():
        model.model.model.layers[0].mlp.up_proj.weight[:, :32] = model.model.model.layers[0].mlp.up_proj.weight[:, :32].abs()
    q = lowbit.quantize(model, lowbit.RTN(bits=4, group_size=32, sym=False), progress=False)
    out = q.export(tmp_path / "gptq", to="gptq")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"
    raw = json.loads((out / "config.json").read_text())
    raw["quantization_config"]["checkpoint_format"] = "gptq"  # the same zeros read as v1: z − 1 = 0 ... and 15
    (out / "config.json").write_text(json.dumps(raw))
    (out / "quantize_config.json").unlink()
    state = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.qzeros"
    state[name] = torch.full_like(state[name], -1)  # all ones: v1's z − 1 for z = 16
    save_file(state, out / "model.safetensors")
    with pytest.raises(LowbitError, match="zero point 16"):
        lowbit.load(out)


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing, written from its loop: int32 column c holds outputs 8c + order[i] at nibble i."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = values.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            out[:, c] |= values[:, 8 * c + order[i]].to(torch.int64) << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_awq_gemm_import(tiny_model_dir, tmp_path):
    """An AWQ checkpoint built by AutoAWQ's packing from our asymmetric 4-bit g32 codes imports to the very
    same codes, scales and zero points (w = s·(q − z), no offset)."""
    src = tiny_model_dir("llama")
    q = lowbit.quantize(lowbit.load(src), lowbit.RTN(bits=4, group_size=32, sym=False), progress=False)
    state = load_file(src / "model.safetensors")
    for name in targets(lowbit.load(src).model):
        qt = q.model.get_submodule(name).qtensor
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = _awq_pack(qt.codes().T.contiguous())
        state[f"{name}.qzeros"] = _awq_pack(qt.zeros.T.contiguous())
        state[f"{name}.scales"] = qt.scales.T.contiguous()
    save_file(state, src / "model.safetensors")
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    (src / "config.json").write_text(json.dumps(raw))
    back = lowbit.load(src)
    assert back.info["imported"] == "awq (gemm)"
    for name in targets(lowbit.load(tiny_model_dir("llama")).model):
        a, b = q.model.get_submodule(name).qtensor.tensors(), back.model.get_submodule(name).qtensor.tensors()
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("change, needle", [
    (lambda qc, s: qc.update(bits=5), "lowbit imports bits 2, 3, 4, 8"),
    (lambda qc, s: s.update({"model.layers.0.self_attn.q_proj.g_idx": torch.arange(64, dtype=torch.int32) // 48}),
     "puts 48 columns in group 0, not 32"),
    (lambda qc, s: s.pop("model.layers.1.mlp.down_proj.scales"), "scales is missing"),
    (lambda qc, s: s.update({"model.layers.1.mlp.down_proj.qweight": s["model.layers.1.mlp.down_proj.qweight"][:4].contiguous()}),
     "qweight is"),
    (lambda qc, s: qc.update(checkpoint_format="marlin"), "formats gptq and gptq_v2"),
], ids=["bits-5", "g_idx", "missing", "short", "marlin"])
def test_damaged_gptq(tiny_model_dir, tmp_path, change, needle):
    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.RTN(bits=4, group_size=32), progress=False)
    out = q.export(tmp_path / "gptq", to="gptq")
    raw, state = json.loads((out / "config.json").read_text()), load_file(out / "model.safetensors")
    change(raw["quantization_config"], state)
    (out / "config.json").write_text(json.dumps(raw))
    save_file(state, out / "model.safetensors")
    with pytest.raises(LowbitError, match=needle):
        lowbit.load(out)


def test_gptq_refuses_mixed_formats(tiny_model_dir, tmp_path):
    from lowbit.recipes import Plan

    model = lowbit.load(tiny_model_dir("llama"))
    plan = Plan({n: lowbit.RTN(bits=8 if "mlp" in n else 4, group_size=32) for n in targets(model.model)})
    q = lowbit.quantize(model, plan, progress=False)
    with pytest.raises(LowbitError, match="this model has 2 formats"):
        q.export(tmp_path / "gptq", to="gptq")
    assert not (tmp_path / "gptq").exists()


_values = st.none() | st.booleans() | st.integers(-2, 300) | st.sampled_from(["gptq", "gptq_v2", "awq", "gemm", "GEMV",
                                                                              "marlin", ""])


@settings(max_examples=200, deadline=None)
@given(qc=st.dictionaries(st.sampled_from(["quant_method", "bits", "w_bit", "group_size", "q_group_size", "sym",
                                           "zero_point", "checkpoint_format", "version", "dynamic"]), _values,
                          max_size=8))
def test_fuzz_quantization_config(qc):
    qc.setdefault("quant_method", "gptq")
    try:
        method, bits, group, sym, fmt = _format(Path("x"), qc)
    except LowbitError as e:
        assert "\n" not in str(e)
        return
    assert method in ("gptq", "awq") and bits in (2, 3, 4, 8) and group in (32, 64, 128, -1) and isinstance(sym, bool)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), k=st.sampled_from([32, 64, 96, 100]), group=st.sampled_from([32, 64]))
def test_fuzz_g_idx(data, k, group):
    """Any int32 g_idx: the act-order permutation (groups contiguous, of `group` columns, the last one
    what remains) or a one-line refusal; GPTQ's own act-order g_idx always imports."""
    groups = -(-k // group)
    natural = (torch.arange(k) // group).to(torch.int32)
    if data.draw(st.booleans()):  # as GPTQ writes it: visited column i at order[i], group i // group
        order = torch.tensor(data.draw(st.permutations(range(k))))
        g = torch.empty(k, dtype=torch.int32)
        g[order] = natural
    else:
        g = torch.tensor(data.draw(st.lists(st.integers(-1, groups), min_size=k, max_size=k)), dtype=torch.int32)
    try:
        perm = permutation("x", "m", g, k, group)
    except LowbitError as e:
        valid = int(g.min()) >= 0 and int(g.max()) < groups and \
            torch.equal(torch.bincount(g.long(), minlength=groups), torch.bincount(natural.long(), minlength=groups))
        assert "\n" not in str(e) and not valid
        return
    if perm is None:
        assert torch.equal(g, natural)
    else:
        assert perm.dtype == torch.int32 and torch.equal(perm.sort().values, torch.arange(k, dtype=torch.int32))
        assert torch.equal(g[perm.long()], natural)


def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path):
    import pickle

    sentinel = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.RTN(bits=4, group_size=32), progress=False)
    out = q.export(tmp_path / "gptq", to="gptq")
    (out / "model.safetensors").unlink()
    (out / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(LowbitError, match="pickled files are never loaded"):
        lowbit.load(out)
    assert not sentinel.exists()


def test_activation_quantized_layers_are_refused(tiny_model_dir, tmp_path):
    q = lowbit.quantize(lowbit.load(tiny_model_dir("llama")), "W8A8-g32", progress=False,
                        calib_text="def f(x):\n    return x\n" * 40, calib_samples=2, calib_seq_len=32)
    for to, out in (("gguf", tmp_path / "m.gguf"), ("gptq", tmp_path / "gptq"), ("compressed-tensors", tmp_path / "ct")):
        with pytest.raises(LowbitError, match="quantizes its activations too: exports write weight-only layers"):
            q.export(out, to=to)
        assert not out.exists()
