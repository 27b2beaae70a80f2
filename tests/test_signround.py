"""SignRound: zero iterations is RTN exactly; learning lowers the block output error."""

import torch

import lowbit
from lowbit.calib import builtin
from lowbit.calib.runner import calibration_batches
from lowbit.methods import RTN, SignRound


def _quantize(path, cfg, samples=8):
    return lowbit.quantize(path, cfg, calib_samples=samples, calib_seq_len=48, progress=False)


def test_zero_iterations_equals_rtn(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    for sym in (True, False):
        rtn = lowbit.quantize(path, RTN(bits=3, group_size=32, sym=sym), progress=False)
        sr = _quantize(path, SignRound(bits=3, group_size=32, sym=sym, iters=0))
        for (name, a), b in zip(rtn.state_dict().items(), sr.state_dict().values()):
            assert torch.equal(a, b), name


def test_signround_beats_rtn(tiny_model_dir, tiny_tokenizer, tmp_path):
    path = tiny_model_dir("llama")
    ids = calibration_batches(tiny_tokenizer, builtin("eval"), 2, 48)[0]
    with torch.no_grad():
        ref = lowbit.load(path)(ids).logits
        err = {}
        for cfg in (RTN(bits=2, group_size=32, sym=False), SignRound(bits=2, group_size=32, sym=False, iters=30)):
            q = _quantize(path, cfg)
            err[cfg.name] = (q(ids).logits - ref).pow(2).mean().item()
    assert err["signround"] < err["rtn"]
    lowbit.save(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(lowbit.load(tmp_path / "q")(ids).logits, q(ids).logits)
