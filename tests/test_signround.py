"""SignRound: zero iterations is RTN exactly; learning lowers the block output error."""

import torch

import lowbit
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
