"""The command line's first impressions (issue 16, items 6 and 11): help without the package's import
cost or developer prose, and arguments that cannot work refused before any model loads."""

import os
import socket
import subprocess
import sys
import time

import pytest

from lowbit import api, cli


def test_help_is_fast_and_for_users():
    code = "import sys, time; t = time.perf_counter(); from lowbit import cli\n" \
           "try: cli.main(['--help'])\nexcept SystemExit: pass\n" \
           "print('torch' in sys.modules, time.perf_counter() - t, file=sys.stderr)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    torch_loaded, seconds = r.stderr.split()
    assert torch_loaded == "False"  # the help never imports the heavy package
    assert float(seconds) < 1.0
    assert "No logic of its own" not in r.stdout and "lowbit quantize -o OUT" in r.stdout


def test_quantize_help_still_lists_method_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    out = capsys.readouterr().out
    assert "--group-size" in out and "--method" in out


@pytest.fixture
def no_load(monkeypatch):
    def load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(api, "load", load)


@pytest.mark.parametrize("argv, says", [
    (["generate", "m", "hi", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["generate", "m", "hi", "--temperature", "-1"], "temperature must be"),
    (["generate", "m", ""], "prompt is empty"),
    (["generate", "m", "hi", "--top-p", "0"], "top_p must be"),
    (["chat", "m", "--max-tokens", "-3"], "--max-tokens must be at least 1"),
    (["serve", "m", "--temperature", "-1"], "temperature must be"),
    (["generate", "m", "hi", "--threads", "0"], "--threads must be at least 1"),
    (["serve", "m", "--max-body-mb", "0"], "--max-body-mb must be at least 1"),
])
def test_bad_generation_arguments_refused_before_loading(no_load, capsys, argv, says):
    t = time.perf_counter()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert time.perf_counter() - t < 1.0


def test_serve_refuses_a_busy_port_before_loading(no_load, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli.main(["serve", "m", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


def test_quantize_rounds_head_and_embedding_to_8_bits_and_prints_engine_speed(tiny_model_dir, tmp_path, capsys):
    """The command's default (issue 16, items 8 and 10): the embedding and the head at 8 bits (EDGE),
    `inspect` lists every tensor, float ones too, and the printed speed is bench's steady state."""
    src = tiny_model_dir("llama", tie_word_embeddings=True, max_position_embeddings=1024)
    assert cli.main(["quantize", str(src), "-o", str(tmp_path / "q"), "--group-size", "32",
                     "--check-windows", "1"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "(pp512)" in out and "(tg64)" in out
    q = api.load(tmp_path / "q")
    specs = {name: q.plan.layers[name] for name in ("lm_head", "model.embed_tokens")}
    assert all(s.bits == 8 and s.group_size == 32 for s in specs.values())
    assert q.plan.layers["model.layers.0.mlp.down_proj"].bits == 4
    assert cli.main(["inspect", str(tmp_path / "q")]) == 0
    listing = capsys.readouterr().out
    assert "model.norm.weight" in listing and "float32" in listing and "lm_head" in listing
    assert "whole model" in listing

    assert cli.main(["quantize", str(src), "-o", str(tmp_path / "f"), "--group-size", "32",
                     "--float-embeddings", "--no-check"]) == 0
    plan = api.load(tmp_path / "f").plan.layers
    assert "lm_head" not in plan and "model.embed_tokens" not in plan


def test_output_cut_short_by_the_reader_is_not_an_error(monkeypatch, capsys):
    """`lowbit inspect --kernels | head -1`: the reader has left (its end of the pipe is closed, so every
    write fails with EPIPE); lowbit stops quietly with exit 0 instead of an internal error."""
    read, write = os.pipe()
    os.close(read)
    with capsys.disabled(), os.fdopen(write, "w", buffering=1) as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert cli.main(["inspect", "--kernels"]) == 0
