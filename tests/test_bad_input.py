"""Bad input: every case exits non-zero with one line naming the problem, no traceback (unless --debug),
and leaves nothing behind. Tiny random models only (see conftest.py); nothing here loads the real model."""

import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.calib import load as load_text
from lowbit.cli import main
from lowbit.eval import evaluate
from lowbit.errors import LowbitError

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


# ---------------------------------------------------------------------------------------------- helpers

def run(capsys, *args) -> tuple[int, str, str]:
    """main(args) in-process; (exit code, stdout, stderr) of that call only."""
    capsys.readouterr()  # drop anything fixtures printed
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, out: str, err: str, *needles: str) -> str:
    """Exit 1, stderr exactly one line `lowbit: error: ...` containing every needle, no traceback."""
    assert rc == 1, f"exit code {rc}; stderr: {err!r}"
    assert "Traceback" not in out and "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr is not one line: {err!r}"
    line = err.rstrip("\n")
    assert line.startswith("lowbit: error: ") and line[len("lowbit: error: "):].strip(), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def leftovers(out: Path) -> list[str]:
    """Temporary siblings an interrupted or failed atomic write would leave beside `out`."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.partial-", f".{out.name}.old-")))


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert leftovers(out) == []


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def quantize_fails(capsys, tmp_path, source, *extra, needles=()) -> str:
    """`lowbit quantize SOURCE -o OUT ...` must fail with one line containing `needles`, writing nothing.
    (--check-windows 1 keeps the accuracy check on but bounds its cost should a case wrongly succeed.)"""
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "quantize", source, "-o", out, "--check-windows", "1", *extra)
    line = assert_one_line_error(rc, stdout, err, *needles)
    assert_no_output(out)
    return line


@pytest.fixture
def tiny(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def edit_config(model_dir: Path, **changes) -> None:
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg))


def small_gguf(path: Path) -> Path:
    """A small but well-formed GGUF file (two f32 tensors)."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 64)).astype(np.float32))
    w.add_tensor("output.weight", rng.standard_normal((64, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------- source path

@pytest.mark.parametrize("command", ["quantize", "eval", "inspect", "generate"])
def test_missing_source(capsys, tmp_path, command):
    missing = tmp_path / "no-such-model"
    if command == "quantize":
        quantize_fails(capsys, tmp_path, missing, needles=("not found", str(missing)))
        return
    args = [command, missing] + (["hello"] if command == "generate" else [])
    assert_one_line_error(*run(capsys, *args), "not found", str(missing))


def test_directory_without_config(capsys, tmp_path):
    src = tmp_path / "empty-model"
    src.mkdir()
    (src / "README.md").write_text("not a model\n")
    quantize_fails(capsys, tmp_path, src, needles=(str(src), "config.json"))


def test_text_file_as_source(capsys, tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("hello\n")
    quantize_fails(capsys, tmp_path, src, needles=(str(src), "not a model"))


def test_config_is_not_json(capsys, tmp_path, tiny):
    (tiny / "config.json").write_text("{ not json")
    quantize_fails(capsys, tmp_path, tiny, needles=("config.json", "not valid JSON"))


# ------------------------------------------------------------------------------------- architecture

def test_unknown_architecture(capsys, tmp_path, tiny):
    edit_config(tiny, model_type="foo_bar")
    quantize_fails(capsys, tmp_path, tiny, needles=("unknown architecture", "foo_bar"))


def test_config_without_model_type(capsys, tmp_path, tiny):
    edit_config(tiny, model_type=None)
    quantize_fails(capsys, tmp_path, tiny, needles=("model_type", "architecture"))


def test_non_causal_architecture(capsys, tmp_path, tiny):
    # t5 is a known transformers architecture but has no causal-LM head (bert does: BertLMHeadModel).
    edit_config(tiny, model_type="t5")
    quantize_fails(capsys, tmp_path, tiny, needles=("architecture", "t5", "not a causal language model"))


# -------------------------------------------------------------------------------- bits / group size

@pytest.mark.parametrize("flags, needles", [
    (["--bits", "5"], ("bits=5", "not supported")),
    (["--bits", "1"], ("bits=1", "not supported")),
    (["--group-size", "100"], ("group size 100", "not supported")),
    (["--group-size", "0"], ("group size 0", "not supported")),
])
def test_unsupported_bits_or_group(capsys, tmp_path, tiny, flags, needles):
    quantize_fails(capsys, tmp_path, tiny, *flags, needles=needles)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma"])
def test_group_larger_than_layer(capsys, tmp_path, tiny_model_dir, model_type):
    # The tiny models' attention projections have 64 input features: a 128-column group cannot fit.
    tiny = tiny_model_dir(model_type)
    line = quantize_fails(capsys, tmp_path, tiny, "--group-size", "128", needles=("group size 128", "64"))
    assert "q_proj" in line or "k_proj" in line or "v_proj" in line or "gate_proj" in line, line


# ---------------------------------------------------------------------------------------- NaN / Inf

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights(capsys, tmp_path, tiny, bad):
    f = tiny / "model.safetensors"
    state = load_file(f)
    state[Q_PROJ][3, 5] = bad
    save_file(state, f, metadata={"format": "pt"})
    line = quantize_fails(capsys, tmp_path, tiny, "--group-size", "32", needles=(Q_PROJ,))
    assert "NaN" in line and "Inf" in line, line


# ------------------------------------------------------------------------------- damaged safetensors

def test_truncated_safetensors(capsys, tmp_path, tiny):
    f = tiny / "model.safetensors"
    truncate(f)
    quantize_fails(capsys, tmp_path, tiny, "--group-size", "32", needles=(str(f), "truncated"))


def _header(table: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(table).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("content", [
    random.Random(0).randbytes(4096),                   # random bytes: absurd header length
    (16).to_bytes(8, "little") + b"\xff" * 16 + b"x" * 64,  # plausible length, header not JSON
    (2).to_bytes(8, "little") + b"[]",                   # JSON, but not a table
    b"\x01\x02",                                         # shorter than the length prefix
    _header({"w": {"dtype": "F32"}}),                    # entry without data_offsets
    _header({"w": 1}),                                   # entry that is not a table
    _header({"w": {"dtype": "XX", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),  # unknown dtype
], ids=["random", "header-not-json", "header-not-table", "tiny", "entry-without-offsets", "entry-not-table",
        "unknown-dtype"])
def test_foreign_safetensors(capsys, tmp_path, tiny, content):
    f = tiny / "model.safetensors"
    f.write_bytes(content)
    quantize_fails(capsys, tmp_path, tiny, "--group-size", "32", needles=(str(f),))


def test_safetensors_of_another_model(capsys, tmp_path, tiny):
    """A well-formed safetensors file holding none of the model's tensors must not become a random model."""
    save_file({"encoder.weight": torch.zeros(4, 4)}, tiny / "model.safetensors", metadata={"format": "pt"})
    quantize_fails(capsys, tmp_path, tiny, "--group-size", "32", needles=(str(tiny),))


def test_safetensors_missing_a_tensor(capsys, tmp_path, tiny):
    f = tiny / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, f, metadata={"format": "pt"})
    quantize_fails(capsys, tmp_path, tiny, "--group-size", "32", needles=(str(tiny), "down_proj"))


def test_pickle_only_checkpoint_is_refused_unopened(capsys, tmp_path, tiny):
    """A pytorch_model.bin is never unpickled: unpickling this one would create `sentinel`."""
    sentinel = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    (tiny / "model.safetensors").unlink()
    (tiny / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    quantize_fails(capsys, tmp_path, tiny, "--group-size", "32", needles=(str(tiny), ".safetensors"))
    assert not sentinel.exists(), "pytorch_model.bin was unpickled"


# -------------------------------------------------------------------------------------- damaged GGUF

def test_truncated_gguf(capsys, tmp_path):
    f = small_gguf(tmp_path / "small.gguf")
    truncate(f)
    quantize_fails(capsys, tmp_path, f, needles=(str(f), "truncated"))


def test_truncated_real_gguf(capsys, tmp_path):
    """The first 10 MB of the embedded default model: a well-formed header whose tensors run past the end."""
    from lowbit.models import default_gguf

    try:
        real = default_gguf()
    except LowbitError as e:
        pytest.skip(str(e))
    f = tmp_path / "smollm2-cut.gguf"
    with open(real, "rb") as src, open(f, "wb") as dst:
        dst.write(src.read(10 * 2**20))
    quantize_fails(capsys, tmp_path, f, needles=(str(f), "truncated"))


@pytest.mark.parametrize("content, needle", [
    (random.Random(1).randbytes(4096), "not a GGUF file"),     # no magic
    (b"GGUF" + random.Random(2).randbytes(4096), "not a valid GGUF file"),  # magic, then garbage
    (b"GG", "not a GGUF file"),
    (b"", "not a GGUF file"),
], ids=["random", "magic-then-garbage", "short", "empty"])
def test_foreign_gguf(capsys, tmp_path, content, needle):
    f = tmp_path / "model.gguf"
    f.write_bytes(content)
    quantize_fails(capsys, tmp_path, f, needles=(str(f), needle))


# ------------------------------------------------------------------------------------ empty text

@pytest.mark.parametrize("name, content", [
    ("empty.txt", ""),
    ("blank.txt", "  \n\n\t \n"),
    ("blank.jsonl", "\n\n   \n\n"),
    ("empty-texts.jsonl", '{"text": ""}\n{"text": "  "}\n""\n'),
])
def test_empty_calibration_text(capsys, tmp_path, tiny, name, content):
    calib = tmp_path / name
    calib.write_text(content)
    quantize_fails(capsys, tmp_path, tiny, "--group-size", "32", "--calib", calib,
                   needles=("calibration text is empty", str(calib)))


def test_missing_calibration_file(capsys, tmp_path, tiny):
    calib = tmp_path / "nope.txt"
    quantize_fails(capsys, tmp_path, tiny, "--group-size", "32", "--calib", calib,
                   needles=("not found", str(calib)))


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("blank.jsonl", "\n \n\n")])
def test_empty_evaluation_text(capsys, tmp_path, tiny, name, content):
    text = tmp_path / name
    text.write_text(content)
    assert_one_line_error(*run(capsys, "eval", tiny, "--text", text), "evaluation text is empty", str(text))


# ------------------------------------------------------------------------------ damaged quantized dir

@pytest.fixture
def quantized(capsys, tmp_path, tiny) -> Path:
    q = tmp_path / "tiny-w4"
    rc, _, err = run(capsys, "quantize", tiny, "-o", q, "--group-size", "32", "--no-check")
    assert rc == 0, err
    return q


@pytest.mark.parametrize("command", ["eval", "inspect", "generate"])
def test_truncated_quantized_dir(capsys, quantized, command):
    f = quantized / "model.safetensors"
    truncate(f)
    args = [command, quantized] + (["hello", "--max-new-tokens", "2"] if command == "generate" else []) \
        + (["--max-windows", "1"] if command == "eval" else [])
    assert_one_line_error(*run(capsys, *args), str(f), "truncated")


@pytest.mark.parametrize("content", [
    random.Random(3).randbytes(4096),
    _header({"w": {"dtype": "XX", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
], ids=["random", "unknown-dtype"])
def test_foreign_safetensors_in_quantized_dir(capsys, quantized, content):
    f = quantized / "model.safetensors"
    f.write_bytes(content)
    assert_one_line_error(*run(capsys, "eval", quantized, "--max-windows", "1"), str(f))


Q_PROJ_MODULE = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("tensor", ["scales", "qweight-neighbour"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_non_finite_values_in_quantized_dir(capsys, quantized, tensor, bad, command):
    """fp16 NaN/Inf in one layer's scales (or in a float tensor beside the quantized ones) is refused
    on load, naming it, instead of generating garbage with exit 0."""
    f = quantized / "model.safetensors"
    state = load_file(f)
    name = f"{Q_PROJ_MODULE}.scales" if tensor == "scales" else "model.layers.0.input_layernorm.weight"
    state[name].view(-1)[3] = bad
    save_file(state, f, metadata={"format": "pt"})
    args = [command, quantized] + (["hello", "--max-new-tokens", "2"] if command == "generate" else [])
    assert_one_line_error(*run(capsys, *args), Q_PROJ_MODULE if tensor == "scales" else name, "NaN or Inf")


def _edit_quantization(model_dir: Path, edit) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    edit(cfg, cfg["quantization_config"], cfg["quantization_config"]["modules"].get(Q_PROJ_MODULE))
    (model_dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, needles", [
    (lambda c, qc, m: m.update(bits=7), ["module " + Q_PROJ_MODULE, "bits 7"]),
    (lambda c, qc, m: m.update(group_size=0), ["module " + Q_PROJ_MODULE, "group_size 0"]),
    (lambda c, qc, m: m.update(bits="4"), ["module " + Q_PROJ_MODULE, "bits '4'"]),
    (lambda c, qc, m: m.update(sym="yes"), ["module " + Q_PROJ_MODULE, "sym"]),
    (lambda c, qc, m: m.update(kind="lattice"), ["module " + Q_PROJ_MODULE, "unknown format"]),
    (lambda c, qc, m: m.update(shape=[64, 96]), ["module " + Q_PROJ_MODULE, "qweight"]),
    (lambda c, qc, m: m.update(shape=[64]), ["module " + Q_PROJ_MODULE, "shape"]),
    (lambda c, qc, m: qc.pop("modules"), ["'modules'"]),
    (lambda c, qc, m: qc.update(modules=[1, 2]), ["'modules'"]),
    (lambda c, qc, m: qc.update(format_version="2"), ["format_version"]),
    (lambda c, qc, m: qc["modules"].update({"model.nothing": m}), ["model.nothing"]),
    (lambda c, qc, m: c.update(num_hidden_layers=1000000), ["num_hidden_layers = 1000000"]),
    (lambda c, qc, m: c.update(hidden_size=1e9), ["hidden_size = 1000000000.0"]),
    (lambda c, qc, m: c.update(hidden_size=-64), ["hidden_size = -64"]),
    (lambda c, qc, m: c.update(hidden_size=128, head_dim=32), ["config.json and the weights disagree"]),
    (lambda c, qc, m: c.update(intermediate_size=256), ["config.json", "disagree"]),
    (lambda c, qc, m: c.update(vocab_size=4), ["config.json and the weights disagree"]),
], ids=["bits-7", "group-0", "bits-str", "sym-str", "kind", "shape-cols", "shape-1d", "no-modules", "modules-list",
        "version-str", "module-not-in-model", "layers-1e6", "hidden-1e9", "hidden-negative", "hidden-other",
        "intermediate-other", "vocab-other"])
@pytest.mark.parametrize("command", ["inspect", "generate"])
def test_damaged_quantization_config(capsys, quantized, edit, needles, command):
    """Every field of quantization_config and every dimension is checked (against the safetensors
    header) before anything is built: one line, never an internal error or a runaway allocation."""
    _edit_quantization(quantized, edit)
    args = [command, quantized] + (["hello", "--max-new-tokens", "2"] if command == "generate" else [])
    assert_one_line_error(*run(capsys, *args), str(quantized), *needles)


# ----------------------------------------------------------------------------------- output directory

def test_output_not_empty(capsys, tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious\n")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(out)

    rc, stdout, err = run(capsys, "quantize", tiny, "-o", out, "--group-size", "32", "--no-check")
    assert_one_line_error(rc, stdout, err, str(out), "not empty", "--overwrite")
    assert snapshot(out) == before
    assert leftovers(out) == []

    rc, stdout, err = run(capsys, "quantize", tiny, "-o", out, "--group-size", "32", "--no-check", "--overwrite")
    assert rc == 0, err
    assert "saved" in stdout
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "keep.txt").exists() and not (out / "sub").exists()
    assert leftovers(out) == []


def test_output_is_a_file(capsys, tmp_path, tiny):
    out = tmp_path / "out"
    out.write_text("a file\n")
    rc, stdout, err = run(capsys, "quantize", tiny, "-o", out, "--group-size", "32", "--no-check")
    assert_one_line_error(rc, stdout, err, str(out), "not a directory")
    assert out.read_text() == "a file\n"
    assert leftovers(out) == []


def test_empty_output_directory_is_fine(capsys, tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run(capsys, "quantize", tiny, "-o", out, "--group-size", "32", "--no-check")
    assert rc == 0, err
    assert (out / "config.json").is_file()
    assert leftovers(out) == []


# ------------------------------------------------------------------------ real entry point, --debug

def lowbit_subprocess(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])


def test_entry_point_one_line_error(tmp_path):
    missing, out = tmp_path / "nonexistent", tmp_path / "out"
    p = lowbit_subprocess("quantize", missing, "-o", out)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("lowbit: error: "), p.stderr
    assert str(missing) in p.stderr and "Traceback" not in p.stderr + p.stdout
    assert_no_output(out)


def test_debug_shows_traceback(tmp_path):
    missing, out = tmp_path / "nonexistent", tmp_path / "out"
    p = lowbit_subprocess("quantize", "--debug", missing, "-o", out)
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "LowbitError" in p.stderr and str(missing) in p.stderr
    assert_no_output(out)


def test_debug_before_subcommand_also_raises(tmp_path):
    """`lowbit --debug quantize ...` (the top-level parser advertises --debug) must behave the same."""
    with pytest.raises(LowbitError, match="not found"):
        main(["--debug", "quantize", str(tmp_path / "nonexistent"), "-o", str(tmp_path / "out")])


@pytest.mark.parametrize("engine", [True, False])
def test_eval_never_reports_a_non_finite_result(tiny, engine):
    """Weights that pass every load check but overflow at run time (a final-norm weight of 1e38: the
    logits are ±Inf, their log-softmax NaN) make evaluation fail with one line, not print NaN with exit 0."""
    q = lowbit.load(tiny)
    with torch.no_grad():
        q.model.get_decoder().norm.weight.fill_(1e38)
    text = load_text("eval")[:4000]
    with pytest.raises(LowbitError, match="not finite"):
        evaluate(q.model, q.tokenizer, text, ctx=64, max_windows=2, progress=False, engine=engine)
    source = lowbit.load(tiny)
    with pytest.raises(LowbitError, match="not finite|KL divergence"):
        evaluate(source.model, source.tokenizer, text, ctx=64, max_windows=2, source=q.model, progress=False,
                 engine=engine)
