"""`lowbit export --to gguf --report`: each quantized layer's GGUF type and conversion error, printed and
written beside the file; exact layers say so, refit ones carry their error."""

import pytest

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError

EDGE = lowbit.RTN(bits=8, group_size=32, sym=False)  # 8-bit asymmetric: no GGUF type holds it, refit in Q8_0


@pytest.fixture
def mixed_dir(tiny_model_dir, tmp_path):
    """A tiny llama, W4 g32 sym (Q4_0, exact) with an 8-bit asymmetric head and embedding (refit)."""
    out = tmp_path / "mixed"
    lowbit.quantize(lowbit.load(tiny_model_dir("llama")), lowbit.RTN(bits=4, group_size=32), lm_head=EDGE,
                    embeddings=EDGE, progress=False).save(out)
    return out


def _rows(table: str) -> dict[str, list[str]]:
    lines = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| model.")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in lines}


def test_cli_report_marks_exact_and_refit_layers(mixed_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(mixed_dir), "--to", "gguf", "-o", str(out), "--report"]) == 0
    printed = capsys.readouterr().out
    written = (tmp_path / "m.gguf.report.md").read_text()
    assert written in printed and out.is_file()
    rows = _rows(written)
    assert rows["model.layers.0.mlp.down_proj"][1:] == ["Q4_0", "exact"]
    fmt, qtype, err = rows["model.embed_tokens"]
    assert qtype == "Q8_0" and 0 < float(err) < 1e-3 and "8b" in fmt
    assert len(rows) == 1 + 7 * 2  # the embedding (the head is tied to it), 7 linears in each of 2 blocks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.report.md", "mixed"]


def test_without_report_nothing_beside_and_other_formats_refuse(mixed_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(mixed_dir), "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"exported {out} (gguf)\n"
    assert not (tmp_path / "m.gguf.report.md").exists()
    with pytest.raises(LowbitError, match="GGUF exports only"):
        lowbit.export(mixed_dir, tmp_path / "ct", to="compressed-tensors", report=True)
    assert not (tmp_path / "ct").exists()
    path = lowbit.export(mixed_dir, tmp_path / "api.gguf", report=True)
    assert "| model.embed_tokens |" in (tmp_path / "api.gguf.report.md").read_text() and path.is_file()
