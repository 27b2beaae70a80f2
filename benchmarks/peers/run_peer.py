"""Runs one reference implementation in its own environment (never lowbit's): auto-round (SignRound),
llm-compressor (GPTQ, AWQ), Intel Neural Compressor (TEQ). Called by benchmarks/reference_methods.py (and
fair_methods.py) with the peer venv's python.

Reads the float model (HF dir) and the calibration windows (safetensors `input_ids` [n, seq]), quantizes
with the given bits/group/sym, and writes the quantize-dequantized weight of every quantized linear to a
safetensors file, plus the wall time, so the caller evaluates both sides with the same code.
"""

import argparse
import json
import time

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def weights_spec(bits, group, sym):
    return {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group}


def llmcompressor(model, ids, a):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():  # AWQ pins cached activations for H2D copies: none on a CPU machine
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    groups = {"group_0": {"targets": ["Linear"], "weights": weights_spec(a.bits, a.group_size, a.sym)}}
    if a.method == "gptq":
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128,
                               actorder=None, bypass_divisibility_checks=True)]
    else:  # its observers still need the group to divide the columns (g128 fails on SmolLM2's 576)
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"],
                                                      bypass_divisibility_checks=True)]
    float_keys = set(model.state_dict())  # llm-compressor adds scales and zero points beside them
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    # AWQ folds its scales into the norms and linears before them: every float tensor comes back
    out = {k: v.detach().float().clone() for k, v in model.state_dict().items() if k in float_keys}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale"):
            from compressed_tensors.quantization.lifecycle.forward import fake_quantize
            args = m.quantization_scheme.weights
            zp = getattr(m, "weight_zero_point", None)
            out[name + ".weight"] = fake_quantize(m.weight.data, m.weight_scale.data, zp.data if zp is not None
                                                  else None, args).float().contiguous()
    return out


def autoround(model, tok, ids, a):
    from auto_round import AutoRound

    ar = AutoRound(model, tok, bits=a.bits, group_size=a.group_size, sym=a.sym, iters=a.iters,
                   nsamples=ids.shape[0], seqlen=ids.shape[1], batch_size=8,
                   dataset=[ids[i:i + 1] for i in range(ids.shape[0])], device_map="cpu")
    model, _ = ar.quantize()
    return {n + ".weight": m.weight.data.float().contiguous() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def inc(model, ids, a):
    """INC 3.x TEQ: prepare (its scales on the norms/linears named below, every linear fake-quantized),
    a training run, convert. INC 3.x leaves the training loop to the caller; this one is its 2.x
    TEQuantizer.train: the alphas alone, Adam (betas 0.9, 0.9), linear schedule with 5% warm-up, the
    language-model loss on the calibration windows (batches of 8, in order, cycled), `--iters` steps.
    INC 3.10's TEQ convert calls `quant_tensor(w, num_bits=...)`, whose `**kwargs` swallow `num_bits`
    (its parameter is `bits`): every layer is rounded to 4 bits whatever the config, and packed as the
    configured width (garbage below 4 bits). The call is corrected here; training is unaffected."""
    import neural_compressor.torch.algorithms.weight_only.teq as inc_teq
    from neural_compressor.torch.quantization import TEQConfig, convert, prepare
    from transformers import get_scheduler

    rounding = inc_teq.quant_tensor
    inc_teq.quant_tensor = lambda w, num_bits=4, **kw: rounding(w, bits=num_bits, **kw)

    absorb = {}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        absorb[p + "input_layernorm"] = [p + f"self_attn.{n}_proj" for n in "qkv"]
        if layer.self_attn.v_proj.out_features == layer.self_attn.o_proj.in_features:  # not under GQA
            absorb[p + "self_attn.v_proj"] = [p + "self_attn.o_proj"]
        absorb[p + "post_attention_layernorm"] = [p + "mlp.gate_proj", p + "mlp.up_proj"]
        absorb[p + "mlp.up_proj"] = [p + "mlp.down_proj"]
    cfg = TEQConfig(bits=a.bits, use_sym=a.sym, group_size=a.group_size, absorb_to_layer=absorb, folding=True)
    cfg.set_local("lm_head", TEQConfig(dtype="fp32"))
    float_keys = set(model.state_dict())
    model = prepare(model, cfg, example_inputs=ids[:1])
    alphas = list(model._prepare_trained_alphas.values())
    opt = torch.optim.Adam(alphas, lr=1e-3, betas=(0.9, 0.9), weight_decay=0)
    sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=int(a.iters * 0.05), num_training_steps=a.iters)
    model.train()
    batches = ids.split(8)
    for step in range(a.iters):
        x = batches[step % len(batches)]
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    model.eval()
    model = convert(model)
    out = {k: v.detach().float().clone() for k, v in model.state_dict().items() if k in float_keys}
    for name, m in model.named_modules():
        if hasattr(m, "recover"):  # INCWeightOnlyLinear: packed codes, scales and zero points
            out[name + ".weight"] = m.recover().float().contiguous()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("impl", choices=["llmcompressor", "autoround", "inc"])
    ap.add_argument("method", choices=["gptq", "awq", "signround", "teq"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--iters", type=int, default=200, help="SignRound iterations, TEQ training steps")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = load_file(a.calib)["input_ids"]
    t = time.perf_counter()
    run = {"autoround": lambda: autoround(model, tok, ids, a), "llmcompressor": lambda: llmcompressor(model, ids, a),
           "inc": lambda: inc(model, ids, a)}[a.impl]
    weights = run()
    took = time.perf_counter() - t
    save_file(weights, a.out, metadata={"seconds": json.dumps(took)})


if __name__ == "__main__":
    main()
