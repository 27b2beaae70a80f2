"""GANQ: the alternating fit (S-step, T-step), outliers, options, and the method end to end."""

import json

import pytest
import torch

import lowbit
from lowbit.calib import builtin
from lowbit.calib.runner import calibration_batches
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.formats import CodebookQ
from lowbit.methods import GANQ, GPTQ, RTN, config_for, quantize_weight
from lowbit.methods.ganq import damped_cholesky, fit, lookup, row_objective, s_step, t_step
from lowbit.recipes import EDGE
from test_gptq import _correlated_stats


def _layer(k=128, n=64, seed=1):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)), _correlated_stats(k=k)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_objective_never_increases_and_beats_gptq_and_rtn(bits):
    w, stats = _layer()
    h = stats.hessian / stats.tokens
    _, _, _, history = fit(w, h, GANQ(bits=bits))
    assert len(history) == 11
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert history[-1] < 0.8 * history[0]  # the iterations do real work over the k-means start
    qt = quantize_weight(w, stats, GANQ(bits=bits))
    chol = damped_cholesky(h, 0.01).float()
    final = float(row_objective(w - qt.dequantize(), chol).sum() / row_objective(w, chol).sum())
    assert final == pytest.approx(history[-1], rel=1e-2)  # the stored (fp16) codebooks keep the fit
    ours = stats.relative_error(w, qt.dequantize())
    gptq = min(stats.relative_error(w, quantize_weight(w, stats, GPTQ(bits=bits, group_size=-1, sym=sym))
                                    .dequantize()) for sym in (True, False))
    rtn = stats.relative_error(w, quantize_weight(w, None, RTN(bits=bits, group_size=-1)).dequantize())
    assert ours < 0.97 * gptq and ours < 0.6 * rtn


def test_t_step_is_least_squares():
    """Per row, min_t ‖(w − t S)L‖² is an ordinary least-squares problem: compare with lstsq, per row
    and per group (groups of 8 over 24 columns); an entry no weight uses keeps its old value."""
    g = torch.Generator().manual_seed(3)
    n, k, levels = 5, 24, 4
    x = torch.randn(400, k, generator=g) @ torch.randn(k, k, generator=g)
    chol = damped_cholesky(x.T @ x / 400, 0.01).float()
    w = torch.randn(n, k, generator=g)
    keep = torch.ones(n, k)
    for group in (k, 8):
        groups = k // group
        idx = torch.randint(0, levels, (n, k), generator=g)
        idx[0, :group] = torch.arange(group) % (levels - 1)  # row 0, group 0: the last entry unused
        old = torch.randn(n, groups, levels, generator=g)
        table = t_step(w, chol, idx, old, group, keep)
        for i in range(n):
            slot = idx[i] + torch.arange(k) // group * levels
            used = torch.unique(slot)
            s = torch.nn.functional.one_hot(slot, groups * levels).double()[:, used]  # [K, used slots]
            sol = torch.linalg.lstsq(chol.double().T @ s, chol.double().T @ w[i].double()).solution
            torch.testing.assert_close(table[i].reshape(-1)[used].double(), sol, rtol=1e-3, atol=1e-4)
        assert table[0, 0, levels - 1] == old[0, 0, levels - 1]


def test_s_step_matches_the_column_formula():
    """Lazy blocks (128 columns) give exactly the paper's back substitution, column by column."""
    w, stats = _layer(k=200, n=16)
    chol = damped_cholesky(stats.hessian / stats.tokens, 0.01).float()
    table = torch.sort(torch.randn(16, 1, 8, generator=torch.Generator().manual_seed(4)), -1).values
    keep = torch.ones_like(w)
    keep[3, 150] = 0  # a weight kept exactly: zero residual
    idx, res = s_step(w, chol, table, 200, keep)
    r = torch.zeros_like(w)
    for j in range(199, -1, -1):
        target = w[:, j] + (r[:, j + 1:] @ chol[j + 1:, j]) / chol[j, j]
        q = (target[:, None] - table[:, 0]).abs().argmin(1)
        assert torch.equal(idx[:, j], q)
        r[:, j] = (w[:, j] - table[:, 0].gather(1, q[:, None])[:, 0]) * keep[:, j]
    torch.testing.assert_close(res, r)
    torch.testing.assert_close(res, (w - lookup(table, idx, 200)) * keep)


def test_outliers_lower_the_error_and_are_counted():
    w, stats = _layer()
    w[2, 7], w[9, 100] = 9.0, -7.0  # two weights far outside their rows
    plain = quantize_weight(w, stats, GANQ(bits=3))
    star = quantize_weight(w, stats, GANQ(bits=3, outlier_ratio=0.01))
    assert isinstance(star, CodebookQ) and star.has_outliers and not plain.has_outliers
    assert star.outlier_values.numel() == round(0.01 * w.numel())
    dense = star.dequantize()
    assert abs(dense[2, 7] - 9.0) < 1e-2 and abs(dense[9, 100] + 7.0) < 1e-2  # kept (to fp16)
    assert stats.relative_error(w, dense) < 0.9 * stats.relative_error(w, plain.dequantize())
    nnz = star.outlier_values.numel()
    assert star.nbytes == plain.nbytes + 4 * (w.shape[0] + 1) + 6 * nnz
    assert star.bits_per_weight > plain.bits_per_weight
    assert GANQ(bits=3, outlier_ratio=0.005).scheme == "W3-lut-row-o0.5%"


def test_per_group_codebooks_and_dead_inputs():
    w, stats = _layer(k=96)
    stats.hessian[:, 11] = 0
    stats.hessian[11, :] = 0  # an input channel that is always zero
    row = quantize_weight(w, stats, GANQ(bits=2))
    grouped = quantize_weight(w, stats, GANQ(bits=2, group_size=32))
    assert row.codebook.shape == (64, 1, 4) and grouped.codebook.shape == (64, 3, 4)
    assert torch.isfinite(grouped.dequantize()).all()
    assert stats.relative_error(w, grouped.dequantize()) < stats.relative_error(w, row.dequantize())
    assert GANQ(bits=4, group_size=128).scheme == "W4-lut-g128"


@pytest.mark.parametrize("options,needle", [({"bits": 8}, "bits=8"), ({"bits": 5}, "bits=5"),
                                            ({"group_size": 100}, "group size 100"),
                                            ({"iters": -1}, "iters"), ({"outlier_ratio": 0.7}, "outlier ratio"),
                                            ({"init": "random"}, "init 'random'")])
def test_bad_options(options, needle):
    with pytest.raises(LowbitError, match=needle):
        GANQ(**options)
    with pytest.raises(LowbitError, match=needle):
        config_for("ganq", **options)


def test_ganq_end_to_end_on_a_tiny_llama(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Closer to the float model than RTN per row at the same bits; the head (outside the blocks)
    is rounded to nearest; save -> load reproduces the logits exactly."""
    path = tiny_model_dir("llama")
    ids = calibration_batches(tiny_tokenizer, builtin("eval"), 2, 48)[0]
    with torch.no_grad():
        ref = lowbit.load(path).model(ids).logits
        rtn = (lowbit.quantize(path, RTN(bits=3, group_size=-1), progress=False).model(ids).logits - ref).pow(2).mean()
        q = lowbit.quantize(path, GANQ(bits=3, iters=4), calib_samples=8, calib_seq_len=48, lm_head=True,
                            progress=False)
        assert (q.model(ids).logits - ref).pow(2).mean() < rtn
    kinds = {name: m.meta["kind"] for name, m in q.model.named_modules() if hasattr(m, "qtensor")}
    assert kinds.pop("lm_head") == "uniform" and set(kinds.values()) == {"codebook"}
    specs = dict(q.plan.layers)  # the head, outside the blocks, is rounded to nearest in the same bits
    assert specs.pop("lm_head") == RTN(bits=3, group_size=-1) and set(specs.values()) == {GANQ(bits=3, iters=4)}
    q.save(tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert loaded.plan == q.plan
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, q.model(ids).logits)
    text, stats = loaded.generate("Once upon a time", max_new_tokens=4)
    assert 1 <= stats.new_tokens <= 4 and isinstance(text, str)


def test_cli_quantizes_with_ganq(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--method", "ganq", "--bits", "3",
               "--iters", "2", "--outlier-ratio", "0.005", "--calib-samples", "4", "--calib-seq-len", "48",
               "--no-check"])
    assert rc == 0
    assert "W3-lut-row-o0.5%" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [entry["spec"] for entry in config["plan"]] == [GANQ(bits=3, iters=2, outlier_ratio=0.005).to_dict(),
                                                           EDGE.to_dict()]  # the command's 8-bit head and embedding
    model = lowbit.load(out).model
    layer = model.model.layers[0].mlp.down_proj
    assert layer.meta == {"kind": "codebook", "bits": 3, "group_size": -1, "shape": [64, 128], "outliers": True}


@pytest.mark.slow
def test_ganq_beats_rtn_on_smollm2():
    """SmolLM2-135M, 3 bits per row, few calibration windows, one iteration: lower perplexity than RTN."""
    from lowbit.calib import load as load_text
    from lowbit.eval import evaluate

    rtn = lowbit.quantize(None, RTN(bits=3, group_size=-1), progress=False)
    ganq = lowbit.quantize(None, GANQ(bits=3, iters=1), calib_samples=4, calib_seq_len=256, progress=False)
    ppl = {name: evaluate(q.model, q.tokenizer, load_text("eval"), ctx=256, max_windows=3, progress=False).ppl
           for name, q in (("rtn", rtn), ("ganq", ganq))}
    assert ppl["ganq"] < ppl["rtn"]
