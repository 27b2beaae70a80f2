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
        for (name, a), b in zip(rtn.model.state_dict().items(), sr.model.state_dict().values()):
            assert torch.equal(a, b), name


def test_sym_range_factors_pick_the_larger_narrowed_end():
    """Sym with both factors (SignRound): the end that stays larger after narrowing maps to code 0,
    RTN's end on a tie (factors 1), so narrowing one end can hand the scale to the other."""
    from lowbit.formats.uniform import group_params
    wg = torch.tensor([[[-4.0, 1.0, 3.0]]])  # |min| 4 > max 3: RTN's scale is -4 / -4 = 1
    one = torch.ones(1, 1)
    scale, _ = group_params(wg, 3, True, one, one)
    assert scale.item() == 1.0
    scale, _ = group_params(wg, 3, True, one, torch.full((1, 1), 0.5))  # min narrowed to -2 < max 3
    assert scale.item() == -0.75  # code 0 holds +3
    scale, _ = group_params(wg, 3, True, torch.full((1, 1), 0.5), one)  # max narrowed: min still wins
    assert scale.item() == 1.0
