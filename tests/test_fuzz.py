"""Fuzzing (hypothesis) of every file reader and of the server's request bodies: whatever the bytes,
a reader answers with a one-line LowbitError (or accepts the file), the server with a 4xx JSON error
(or a completion): never a crash, an internal error or a 500. Small budgets: the suite stays fast."""

import json
import shutil
import struct
import urllib.error
import urllib.request

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lowbit  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.io import check_gguf, check_safetensors, load  # noqa: E402
from lowbit.runtime.server import Running, create_app  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def one_line(e: LowbitError) -> None:
    assert str(e) and "\n" not in str(e), repr(str(e))


def reads_or_refuses(read, *args) -> None:
    try:
        read(*args)
    except LowbitError as e:
        one_line(e)


# ---- safetensors headers ----------------------------------------------------------------------------
tensor_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I32", "U8", "BF16", "XX", ""]) | json_values,
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-8, 2**40), min_size=0, max_size=3) | json_values})
headers = st.dictionaries(st.text(max_size=6), tensor_entry | json_values, max_size=4) | json_values


@FUZZ
@given(header=headers, data=st.binary(max_size=64), lie=st.integers(-16, 16))
def test_safetensors_header(tmp_path, header, data, lie):
    raw = json.dumps(header).encode()
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", max(0, len(raw) + lie)) + raw + data)
    reads_or_refuses(check_safetensors, f)


@FUZZ
@given(blob=st.binary(max_size=200))
def test_safetensors_random_bytes(tmp_path, blob):
    f = tmp_path / "model.safetensors"
    f.write_bytes(blob)
    reads_or_refuses(check_safetensors, f)


# ---- GGUF -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@FUZZ
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6))
def test_gguf(tmp_path, gguf_bytes, cut, flips):
    data = bytearray(gguf_bytes[: cut % (len(gguf_bytes) + 1)] if cut < len(gguf_bytes) else gguf_bytes)
    for at, byte in flips:
        if data:
            data[at % len(data)] = byte
    f = tmp_path / "m.gguf"
    f.write_bytes(bytes(data))
    reads_or_refuses(check_gguf, f)


# ---- config.json and quantization_config of a quantized directory -----------------------------------
@pytest.fixture
def quantized_copy(tiny_quantized_dir, tmp_path):
    """A fresh copy of the tiny quantized directory and its config.json as loaded."""
    out = tmp_path / "q"
    shutil.copytree(tiny_quantized_dir, out)
    return out, json.loads((out / "config.json").read_text())


CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "max_position_embeddings", "model_type", "tie_word_embeddings",
               "rope_theta", "torch_dtype", "quantization_config"]
META_KEYS = ["kind", "bits", "group_size", "sym", "shape", "outliers"]
dims = st.integers(-3, 2**31) | st.sampled_from([0, 1, 32, 64, 128, 10**6]) | json_values


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), dims, min_size=1, max_size=3))
def test_config_json(quantized_copy, changes):
    out, config = quantized_copy
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    reads_or_refuses(load, out)


@FUZZ
@given(module=st.integers(0, 20), changes=st.dictionaries(st.sampled_from(META_KEYS), dims, min_size=1, max_size=3),
       top=st.dictionaries(st.sampled_from(["modules", "format_version", "quant_method", "plan"]), json_values,
                           max_size=1))
def test_quantization_config(quantized_copy, module, changes, top):
    out, config = quantized_copy
    qc = json.loads(json.dumps(config["quantization_config"]))
    name = sorted(qc["modules"])[module % len(qc["modules"])]
    qc["modules"][name] = {**qc["modules"][name], **changes}
    qc.update(top)
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    reads_or_refuses(load, out)


@FUZZ
@given(raw=st.binary(max_size=100) | st.text(max_size=100).map(str.encode))
def test_config_json_bytes(quantized_copy, raw):
    out, _ = quantized_copy
    (out / "config.json").write_bytes(raw)
    reads_or_refuses(load, out)


# ---- server request bodies --------------------------------------------------------------------------
REQUEST_KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                "top_k", "min_p", "seed", "stop", "stream", "stream_options", "n", "logprobs", "presence_penalty",
                "frequency_penalty", "repetition_penalty", "response_format", "logit_bias"]
request_values = st.sampled_from(["tiny-w4", "hi", [1, 2], [{"role": "user", "content": "hi"}], 1, 0, -1, 2**64,
                                  True, None, 0.5]) | json_values
bodies = st.dictionaries(st.sampled_from(REQUEST_KEYS), request_values, max_size=6).map(
    lambda b: {"model": "tiny-w4", "max_tokens": 2, **b})


@pytest.fixture
def server(tiny_quantized_dir):
    model = lowbit.load(tiny_quantized_dir)
    running = Running(create_app(model.session(max_context=128), "tiny-w4", max_body_bytes=65536))
    yield running
    running.stop()


def post(server, path: str, data: bytes) -> tuple[int, dict | str]:
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if body.startswith("{") else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@settings(FUZZ, max_examples=80)
@given(body=bodies, chat=st.booleans())
def test_request_bodies(server, body, chat):
    status, answer = post(server, "/chat/completions" if chat else "/completions", json.dumps(body).encode())
    assert status in (200, 400, 404, 413), (status, answer)
    if status != 200:
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    elif body.get("stream") is True:
        assert "[DONE]" in answer and "server_error" not in answer


@FUZZ
@given(raw=st.binary(max_size=300))
def test_request_raw_bytes(server, raw):
    status, answer = post(server, "/completions", raw)
    assert status in (400, 404, 413), (status, answer)
    assert answer["error"]["message"]
