"""The command line's first impressions (issue 16, items 6 and 11): help without the package's import
cost or developer prose, and arguments that cannot work refused before any model loads."""

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
