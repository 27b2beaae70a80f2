"""Faults during a quantize: a second writer into the same output, progress of another configuration
or with files gone, a kill -9 during the save, a full disk (RLIMIT_FSIZE: no root needed)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import lowbit
from lowbit import api
from lowbit.calib import runner
from lowbit.errors import LowbitError
from lowbit.io.lock import lock_path

OPTS = dict(calib_samples=4, calib_seq_len=48, check_windows=0, progress=False)


def gptq(bits: int):
    return lowbit.methods.config_for("gptq", bits=bits, group_size=32)


def child(code: str, **kw) -> subprocess.Popen:
    """A Python process running `code` (lowbit imported); its output is captured."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def crash_in_block(monkeypatch, n: int) -> None:
    """The next quantize_to raises KeyboardInterrupt in block n (GPTQ: 2 passes per block)."""
    real, calls = runner.run_block, []

    def run_block(*a):
        calls.append(1)
        if len(calls) == 2 * n + 1:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(runner, "run_block", run_block)


def test_second_writer_into_one_output_fails_at_once(tiny_model_dir, tmp_path):
    src, out = tiny_model_dir("llama", num_hidden_layers=3), tmp_path / "out"
    first = child(f"""
        import time
        from lowbit import api, methods
        from lowbit.calib import runner
        real = runner.run_block
        runner.run_block = lambda *a: (time.sleep(0.4), real(*a))[1]  # slow enough to be caught mid-way
        api.quantize_to({str(src)!r}, {str(out)!r}, methods.config_for("gptq", bits=3, group_size=32),
                        calib_samples=4, calib_seq_len=48, check_windows=0, progress=False)
        print("first done")
    """)
    lock = lock_path(out)
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0]
        time.sleep(0.05)
    t = time.time()
    with pytest.raises(LowbitError, match=f"is being written by another lowbit run \\(pid {first.pid}\\)") as e:
        api.quantize_to(src, out, gptq(4), **OPTS)
    assert time.time() - t < 10 and "\n" not in str(e.value)  # at once, before loading anything
    assert first.wait(300) == 0 and "first done" in first.communicate()[0]
    assert not lock.exists() and not (tmp_path / ".out.progress").exists()
    q = lowbit.load(out)
    assert {s.bits for s in q.plan.specs} == {3}  # the first run's model, untouched by the second
    api.quantize_to(src, out, gptq(4), overwrite=True, **OPTS)  # the lock is free again
    assert {s.bits for s in lowbit.load(out).plan.specs} == {4}


def test_progress_of_another_configuration_is_not_reused(tiny_model_dir, tmp_path, monkeypatch, capfd):
    src = tiny_model_dir("llama", num_hidden_layers=3)
    api.quantize_to(src, tmp_path / "clean", gptq(4), **OPTS)
    crash_in_block(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        api.quantize_to(src, tmp_path / "out", gptq(3), **OPTS)
    assert (tmp_path / ".out.progress" / "block_1.safetensors").is_file()
    monkeypatch.undo()
    capfd.readouterr()
    api.quantize_to(src, tmp_path / "out", gptq(4), **OPTS)
    assert "made with another configuration" in capfd.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "clean" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("damage", ["delete", "truncate", "state"])
def test_progress_with_files_gone_starts_over(tiny_model_dir, tmp_path, monkeypatch, capfd, damage):
    src = tiny_model_dir("llama", num_hidden_layers=3)
    api.quantize_to(src, tmp_path / "clean", gptq(3), **OPTS)
    crash_in_block(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        api.quantize_to(src, tmp_path / "out", gptq(3), **OPTS)
    monkeypatch.undo()
    progress = tmp_path / ".out.progress"
    if damage == "delete":
        (progress / "block_0.safetensors").unlink()
    elif damage == "truncate":
        (progress / "block_1.safetensors").write_bytes((progress / "block_1.safetensors").read_bytes()[:100])
    else:
        (progress / "state.json").write_text('{"key": 1, "done": 30}')
    capfd.readouterr()
    api.quantize_to(src, tmp_path / "out", gptq(3), **OPTS)
    err = capfd.readouterr().err
    assert "discarding the progress" in err and "starting over" in err
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "clean" / "model.safetensors").read_bytes()


def test_kill_during_save_leaves_a_partial_the_next_run_removes(tiny_model_dir, tmp_path):
    src, out = tiny_model_dir("llama"), tmp_path / "out"
    killed = child(f"""
        import os, signal
        from lowbit import api
        from lowbit.io import atomic
        atomic._finish_tree = lambda tmp: os.kill(os.getpid(), signal.SIGKILL)  # dies with the files written
        api.quantize_to({str(src)!r}, {str(out)!r}, "W4A16-g32", check_windows=0, progress=False)
    """)
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    partials = list(tmp_path.glob(".out.partial-*"))
    assert len(partials) == 1 and (partials[0] / "model.safetensors").is_file()
    assert partials[0].name.startswith(f".out.partial-{killed.pid}-")
    alive = tmp_path / f".out.partial-{os.getpid()}-x"  # a running process's: never touched
    alive.mkdir()
    api.quantize_to(src, out, "W4A16-g32", check_windows=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [alive.name]


FULL_DISK = """
    import resource, signal, sys
    from lowbit import api, methods
    from lowbit.errors import LowbitError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    try:
        api.quantize_to({src!r}, {out!r}, methods.config_for("gptq", bits=4, group_size=32),
                        calib_samples=4, calib_seq_len=48, check_windows=0, progress=False)
    except LowbitError as e:
        print("ERROR", e)
        sys.exit(1)
"""


@pytest.mark.parametrize("limit, kept", [(40_000, "nothing is kept"), (200_000, "blocks are kept")])
def test_disk_full_during_a_calibrated_method(tiny_model_dir, tmp_path, limit, kept):
    """40 kB: the first block's inputs (49 kB) do not fit; 200 kB: the progress fits, the model file does not."""
    src, out = tiny_model_dir("llama", num_hidden_layers=3), tmp_path / "out"
    run = child(FULL_DISK.format(limit=limit, src=str(src), out=str(out)))
    output = run.communicate(timeout=300)[0]
    assert run.returncode == 1, output
    line = next(line for line in output.splitlines() if line.startswith("ERROR"))
    assert "disk full while writing" in line and kept in line, output
    assert "Traceback" not in output and "SafetensorError" not in output
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    if kept == "blocks are kept":
        assert str(tmp_path / ".out.progress") in line
        done = api.quantize_to(src, out, gptq(4), **OPTS)  # the space is back: it resumes and finishes
        assert done.out == out and not (tmp_path / ".out.progress").exists()
