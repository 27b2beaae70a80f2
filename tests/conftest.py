"""Shared fixtures: a tiny tokenizer and tiny random causal LMs, so tests never load the real model."""

from pathlib import Path

import pytest
import torch

# Small enough to build in well under a second; shapes divide by the smallest group size (32).
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, max_position_embeddings=512)
TINY_TYPES = ("llama", "qwen2", "gemma")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (vocab ~300) trained on the built-in calibration text, with bos/eos set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.calib import builtin

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([builtin("calib")], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """Factory: `tiny_model_dir(model_type="llama", **config_overrides) -> Path` of a fresh directory
    holding a random-initialised tiny causal LM (model.safetensors, config.json) and the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    def make(model_type: str = "llama", **overrides) -> Path:
        kwargs = {**TINY, "vocab_size": len(tiny_tokenizer), "bos_token_id": tiny_tokenizer.bos_token_id,
                  "eos_token_id": tiny_tokenizer.eos_token_id, "pad_token_id": tiny_tokenizer.eos_token_id,
                  **overrides}
        config = AutoConfig.for_model(model_type, **kwargs)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        out = tmp_path_factory.mktemp(f"tiny-{model_type}")
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # keep "Writing model shards" out of the tests' captured stderr
        try:
            model.save_pretrained(out)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tiny_tokenizer.save_pretrained(out)
        return out

    return make


# A ChatML template for the tiny tokenizer (its markers are plain text there): lets chat paths run.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def tiny_quantized_dir(tiny_model_dir, tmp_path_factory):
    """A tiny llama quantized (RTN 4-bit g32) and saved by lowbit, its tokenizer with a chat template."""
    import lowbit

    loaded = lowbit.load(tiny_model_dir("llama"))
    loaded.tokenizer.chat_template = CHATML
    out = tmp_path_factory.mktemp("tiny-w4") / "tiny-w4"
    lowbit.quantize(loaded, lowbit.RTN(bits=4, group_size=32), progress=False).save(out)
    return out


@pytest.fixture
def thread_count():
    """Set the generated CPU kernels' thread count within a test; the old count comes back after."""
    from lowbit.kernels.cpu import threads

    before = threads.get()
    yield threads.set_threads
    threads.set_threads(before)


@pytest.fixture(scope="session")
def smollm_w4_dir(tmp_path_factory):
    """The real embedded model (SmolLM2-135M-Instruct) quantized as `lowbit quantize --scheme W4A16-g32`
    makes it (the head and embedding at the edge config) and saved, once per session: what the server's
    constrained-decoding and lm-eval client tests serve."""
    import lowbit
    from lowbit.api import EDGE

    out = tmp_path_factory.mktemp("smollm2-w4") / "smollm2-w4"
    lowbit.quantize(None, "W4A16-g32", lm_head=EDGE, embeddings=EDGE, progress=False).save(out)
    return out
