"""The KV cache type from the command line and Session to the engine: int8 rows with a scale each hold
(hd + 4) / (2 hd) of fp16's bytes, and generation, chat and serve accept --kv-cache."""

import pytest

import lowbit
from lowbit.cli import main


def test_int8_cache_holds_about_half_of_fp16(tiny_quantized_dir):
    model = lowbit.load(tiny_quantized_dir)
    half = model.session(max_context=64, kv_cache="fp16").decoder
    int8 = model.session(max_context=64, kv_cache="int8").decoder
    hd = model.model.config.head_dim
    assert int8.kv_bytes_per_slot * 2 * hd == half.kv_bytes_per_slot * (hd + 4)
    a = model.session(max_context=64, kv_cache="int8", exact=True)
    b = model.session(max_context=64, kv_cache="fp32", exact=True)
    ids = a.encode("The quick brown fox")
    assert len(a.generate(ids, 8).tokens) == len(b.generate(ids, 8).tokens) == 8


def test_generate_with_an_int8_cache_from_the_command_line(tiny_quantized_dir, capsys):
    assert main(["generate", str(tiny_quantized_dir), "Once upon", "--max-tokens", "4", "--kv-cache", "int8"]) == 0
    assert capsys.readouterr().out.startswith("Once upon")
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main(["generate", str(tiny_quantized_dir), "Once upon", "--kv-cache", "int4"])
