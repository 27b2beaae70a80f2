"""A quantized token embedding keeps the scale of the embedding it replaces (Gemma multiplies its rows
by √hidden): the universal path, a saved and reloaded model, and the native engine all apply it."""

import torch

import lowbit
from lowbit import api
from lowbit.nn import QuantEmbedding
from lowbit.recipes import EDGE
from lowbit.runtime.engine import load_decoder


def test_quantized_gemma_embedding_keeps_its_scale(tiny_model_dir, tmp_path):
    src = tiny_model_dir("gemma")
    ref = lowbit.load(src).model
    scale = float(ref.get_input_embeddings().embed_scale)
    assert scale == ref.config.hidden_size ** 0.5
    q = lowbit.quantize(lowbit.load(src), lowbit.RTN(bits=8, group_size=32), embeddings=EDGE, progress=False)
    q.save(tmp_path / "q")
    ids = torch.randint(0, ref.config.vocab_size, (1, 24))
    with torch.no_grad():
        want = ref(ids).logits[0]
        for model in (q.model, api.load(tmp_path / "q").model):
            embed = model.get_input_embeddings()
            assert isinstance(embed, QuantEmbedding) and embed.embed_scale == scale
            got = model(ids).logits[0]
            # 8-bit weights and embedding: close to the float model; without the scale, nowhere near
            assert (got - want).abs().max() < 0.05 * want.abs().max()
            engine = load_decoder(model, max_context=64, kv_dtype=torch.float32)
            last = model.get_output_embeddings()(engine.states(ids[0])).float()[-1]
            torch.testing.assert_close(last, got[-1].float(), rtol=1e-3, atol=1e-3 * got.abs().max().item())
