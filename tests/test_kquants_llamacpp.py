"""K-quant exports run in llama.cpp (issue 19): the embedded SmolLM2 at W3 g128 and W2 g64 (RTN, 8-bit
head and embedding) exported to GGUF (down_proj in Q3_K / Q2_K, the 576-input layers in Q4_0 as
llama.cpp falls back) generates text in llama-completion and scores in llama-perplexity close to
lowbit's own score of the model it exported (the same chunks, llama-perplexity's scoring:
benchmarks/interop.py). Needs llama.cpp's tools (benchmarks/peers/build_llamacpp.sh); skipped without."""

import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as GGML
from gguf import GGUFReader

import lowbit
from lowbit.recipes import EDGE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from interop import eval_chunks, our_ppl  # noqa: E402
from vs_llamacpp import llama_perplexity, tool  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    tool("llama-perplexity") is None or tool("llama-completion") is None,
    reason="llama.cpp's tools are not built (bash benchmarks/peers/build_llamacpp.sh)")]


@pytest.mark.parametrize("bits, group, kquant, bar", [(3, 128, GGML.Q3_K, 0.03), (2, 64, GGML.Q2_K, None)])
def test_llama_cpp_runs_the_k_quant_export(tmp_path, bits, group, kquant, bar):
    """W2 g64 RTN is a broken model (lowbit ppl ~35,000 on these chunks, llama.cpp ~60,000: at that
    level any difference in arithmetic is amplified), so its perplexities are printed, not compared."""
    q = lowbit.quantize(lowbit.load("default"), lowbit.RTN(bits=bits, group_size=group), lm_head=EDGE,
                        embeddings=EDGE, progress=False)
    path = q.export(tmp_path / f"w{bits}.gguf")
    types = {t.name: t.tensor_type for t in GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == kquant and types["blk.0.attn_q.weight"] == GGML.Q4_0
    prompt = "The capital of France is"
    r = subprocess.run([tool("llama-completion"), "-m", path, "-p", prompt, "-n", "16", "--temp", "0", "-no-cnv",
                        "-t", "2"], capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert prompt in r.stdout and r.stdout.split(prompt, 1)[1].strip()
    text, chunks = eval_chunks(q.tokenizer, 512, 4)
    corpus = tmp_path / "eval.txt"
    corpus.write_text(text)
    ours, theirs = our_ppl(q.model, chunks), llama_perplexity(path, corpus, 512, len(chunks), 2)
    print(f"W{bits} g{group}: lowbit {ours:.4f}, llama-perplexity {theirs:.4f} ({100 * (theirs / ours - 1):+.2f}%)")
    assert bar is None or abs(theirs / ours - 1) < bar
