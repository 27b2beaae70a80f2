"""A calibrated run killed mid-way resumes from its last finished block and writes the same bytes."""

import pytest

import lowbit
from lowbit import api
from lowbit.calib import runner


@pytest.mark.parametrize("method", ["gptq", "awq", "signround"])
def test_resume_after_crash_gives_identical_bytes(tiny_model_dir, tmp_path, monkeypatch, method):
    src = tiny_model_dir("llama", num_hidden_layers=3)
    cfg = lowbit.methods.config_for(method, bits=3, group_size=32, **({"iters": 4} if method == "signround" else {}))
    passes = 3 if cfg.fp_targets else 2  # per block: float, (the float stream,) then quantized
    opts = dict(calib_samples=4, calib_seq_len=48, check_windows=0, progress=False)
    api.quantize_to(src, tmp_path / "clean", cfg, **opts)

    real_run_block, calls = runner.run_block, []

    def crash_in_third_block(block, inputs, kwargs):
        calls.append(1)
        if len(calls) == 2 * passes + 1:  # block 2's float pass
            raise KeyboardInterrupt
        return real_run_block(block, inputs, kwargs)

    monkeypatch.setattr(runner, "run_block", crash_in_third_block)
    with pytest.raises(KeyboardInterrupt):
        api.quantize_to(src, tmp_path / "out", cfg, **opts)
    assert not (tmp_path / "out").exists()
    progress = tmp_path / ".out.progress"
    assert (progress / "block_1.safetensors").is_file() and not (progress / "block_2.safetensors").exists()

    monkeypatch.setattr(runner, "run_block", lambda *a: (calls.append(1), real_run_block(*a))[1])
    calls.clear()
    api.quantize_to(src, tmp_path / "out", cfg, **opts)
    assert len(calls) == passes  # only the last block ran
    assert not progress.exists()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "clean" / "model.safetensors").read_bytes()
