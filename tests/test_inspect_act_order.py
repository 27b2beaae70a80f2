"""`lowbit inspect` marks the layers that carry an input permutation (an act-order GPTQ import) in their
format column: their groups are not contiguous in the input, which decides how they export."""

import re

from lowbit.cli import main
from test_gptq_act_order import _checkpoint


def _formats(out: str) -> dict[str, str]:
    """inspect's rows of quantized modules: name -> format column (what stands before the shape)."""
    rows = (re.match(r"(\S+)\s+(uniform.*?)\s+\d+x\d+\s", line) for line in out.splitlines())
    return {m[1]: m[2] for m in rows if m}


def test_inspect_marks_act_order_layers(tiny_model_dir, tmp_path, tiny_quantized_dir, capsys):
    assert main(["inspect", str(_checkpoint(tiny_model_dir, tmp_path, 4, 32, "gptq"))]) == 0
    formats = _formats(capsys.readouterr().out)
    assert formats["model.layers.1.mlp.down_proj"] == "uniform 4b g32 asym act-order"
    assert len(formats) == 14 and all(f.endswith(" act-order") for f in formats.values())
    assert main(["inspect", str(tiny_quantized_dir)]) == 0
    formats = _formats(capsys.readouterr().out)
    assert formats and not any("act-order" in f for f in formats.values())
