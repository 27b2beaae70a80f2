"""The decoder blocks of a transformers causal LM, and running them one at a time.

`decoder_layers` finds the blocks; `capture_inputs` runs the model once with every block replaced by
a recorder, keeping block 0's input hidden states per sample and each block's keyword arguments (masks,
rotary embeddings: they differ between sliding and full attention blocks); `run_block` runs one block
over those inputs; `finish_forward` turns a last block's output into the model's logits (the model's own
final norm, head and logit transforms, whatever the architecture). The block runner of calibration (calib/runner.py) and the lazy and streamed models
(models/lazy.py) are both built on these three.
"""

import torch
from torch import nn

from ..errors import LowbitError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LowbitError(f"calibrated methods need a decoder-only transformers model with `.layers`; "
                          f"{type(model).__name__} has none")
    return layers


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
    """Block 0's input hidden states per sample, and each block's keyword arguments (same for every
    sample: same length, no padding)."""
    layers = decoder_layers(model)
    inputs, kwargs = [], [None] * len(layers)
    originals = [layer.forward for layer in layers]

    def recorder(i):
        def forward(hidden_states, *args, **kw):
            if i == 0:
                inputs.append(hidden_states.detach())
            if kwargs[i] is None:
                kwargs[i] = {k: v for k, v in kw.items() if k not in ("past_key_values", "use_cache")}
            if i == len(layers) - 1:
                raise _Stop  # the rest of the model (final norm, head) is not needed
            return hidden_states
        return forward

    decoder = model.get_decoder()
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for ids in batches:
            try:
                decoder(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for layer, forward in zip(layers, originals):
            layer.forward = forward
    return inputs, kwargs


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outs = []
    for x in inputs:
        out = block(x, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def finish_forward(model: nn.Module, ids: torch.Tensor, final: torch.Tensor):
    """The model's output (`.logits`) for window `ids` [1, T] given its last block's output `final`: the
    model runs with every block passing its input through and the last one returning `final`."""
    layers = decoder_layers(model)
    originals = [layer.forward for layer in layers]
    try:
        for layer in layers[:-1]:
            layer.forward = lambda hidden_states, *a, **kw: hidden_states
        layers[-1].forward = lambda hidden_states, *a, **kw: final
        return model(ids, use_cache=False)
    finally:
        for layer, forward in zip(layers, originals):
            layer.forward = forward
