"""Every calibrated method on a tiny model: closer to the float model than RTN in the same format,
and save -> load reproduces it exactly."""

import pytest
import torch

import lowbit
from lowbit.calib import builtin, default_corpus
from lowbit.calib.runner import calibration_batches
from lowbit.methods import AWQ, GPTQ, RTN, SignRound

CASES = [
    ("llama", GPTQ(bits=3, group_size=32)),
    ("gemma", GPTQ(bits=3, group_size=32, act_order=True)),
    ("llama", AWQ(bits=3, group_size=32)),
    ("qwen2", SignRound(bits=2, group_size=32, sym=False, iters=30)),
]


@pytest.mark.parametrize("model_type,cfg", CASES, ids=[f"{t}-{c.name}" for t, c in CASES])
def test_calibrated_method_beats_rtn(tiny_model_dir, tiny_tokenizer, tmp_path, model_type, cfg):
    path = tiny_model_dir(model_type)
    ids = calibration_batches(tiny_tokenizer, builtin("eval"), 2, 48)[0]
    rtn_cfg = RTN(bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym)
    with torch.no_grad():
        ref = lowbit.load(path).model(ids).logits
        rtn_err = (lowbit.quantize(path, rtn_cfg, progress=False).model(ids).logits - ref).pow(2).mean()
        q = lowbit.quantize(path, cfg, calib_samples=8, calib_seq_len=48, progress=False)
        assert (q.model(ids).logits - ref).pow(2).mean() < rtn_err
    q.save(tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert loaded.plan == q.plan and set(loaded.plan.layers.values()) == {cfg}
    assert loaded.info["calibration"] == {"samples": 8, "seq_len": 48, "text": default_corpus("calib")}  # mixed or pydoc
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, q.model(ids).logits)
