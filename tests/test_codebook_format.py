"""CodebookQ: dequantize against a direct lookup, sparse outliers, honest size, save/load in a model."""

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats import CodebookQ
from lowbit.formats.packing import packed_words
from lowbit.nn import QuantLinear


def _random(n, k, bits, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    idx = torch.randint(0, 2**bits, (n, k), generator=g)
    codebook = torch.randn(n, groups, 2**bits, generator=g).half().float()
    return idx, codebook


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,k", [(-1, 75), (32, 80), (64, 128)])
def test_dequantize_is_a_table_lookup(bits, group_size, k):
    idx, codebook = _random(7, k, bits, group_size)
    qt = CodebookQ.from_indices(idx, codebook, bits, group_size)
    g = k if group_size == -1 else group_size
    expected = torch.tensor([[codebook[i, j // g, idx[i, j]].item() for j in range(k)] for i in range(7)])
    assert torch.equal(qt.indices().long(), idx)
    assert torch.equal(qt.dequantize(), expected)
    assert not qt.has_outliers and set(qt.tensors()) == {"qweight", "codebook"}
    words, entries = 7 * packed_words(k, bits) * 4, 7 * codebook.shape[1] * 2**bits * 2
    assert qt.nbytes == words + entries
    assert qt.bits_per_weight == pytest.approx(8 * (words + entries) / (7 * k))


def test_outliers_are_added_and_counted():
    idx, codebook = _random(6, 64, 3, -1, seed=1)
    extra = torch.zeros(6, 64)
    extra[0, 5], extra[0, 63], extra[3, 0], extra[5, 17] = 2.5, -1.0, 0.125, 7.0  # row 1, 2, 4: none
    qt = CodebookQ.from_indices(idx, codebook, 3, -1, outliers=extra)
    dense = CodebookQ.from_indices(idx, codebook, 3, -1)
    assert qt.has_outliers
    assert qt.outlier_rowptr.tolist() == [0, 2, 2, 2, 3, 3, 4]
    assert qt.outlier_cols.tolist() == [5, 63, 0, 17]
    assert torch.equal(qt.outliers_dense(), extra)
    assert torch.equal(qt.dequantize(), dense.dequantize() + extra)
    assert qt.nbytes == dense.nbytes + 7 * 4 + 4 * 4 + 4 * 2  # rowptr int32, cols int32, values fp16
    assert qt.meta()["outliers"] and not dense.meta()["outliers"]


def test_bad_codebooks_are_refused():
    idx, codebook = _random(4, 64, 3, -1)
    with pytest.raises(LowbitError, match="bits=8"):
        CodebookQ.from_indices(idx, codebook, 8, -1)
    with pytest.raises(LowbitError, match="group size 100"):
        CodebookQ.from_indices(idx, codebook, 3, 100)
    with pytest.raises(LowbitError, match="does not match"):
        CodebookQ.from_indices(idx, codebook, 3, 32)  # 2 groups of 32 need a [4, 2, 8] codebook


def test_save_load_round_trip_in_a_model(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Every linear of a tiny llama replaced by a random codebook weight (some with outliers):
    save -> load gives the same tensors, the same meta and the same logits."""
    model = lowbit.load(tiny_model_dir("llama")).model
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and m is not model.get_output_embeddings()]
    plan = {}
    for n, (name, m) in enumerate(linears):
        bits, group = (2, 3, 4)[n % 3], (-1, 32)[n % 2]
        plan[name] = lowbit.GANQ(bits=bits, group_size=group)
        idx, codebook = _random(m.out_features, m.in_features, bits, group, seed=n)
        extra = torch.zeros(m.out_features, m.in_features)
        if n % 4 == 0:
            extra[n % m.out_features, 3] = 0.5
        model.set_submodule(name, QuantLinear(CodebookQ.from_indices(idx, codebook, bits, group, outliers=extra)))
    ids = tiny_tokenizer("the quick brown fox jumps", return_tensors="pt")["input_ids"]
    lowbit.QuantizedModel(model, tiny_tokenizer, lowbit.Plan(plan)).save(tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert loaded.plan == lowbit.Plan(plan)
    for name, _ in linears:
        a, b = model.get_submodule(name), loaded.model.get_submodule(name)
        assert a.meta == b.meta
        assert all(torch.equal(a.qtensor.tensors()[t], b.qtensor.tensors()[t]) for t in a.qtensor.tensors())
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
