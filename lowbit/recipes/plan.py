"""A Plan: which spec for which layer. Every recipe ends in one; `lowbit.quantize` applies it.

    Plan.layers = {module name: method config}   e.g. {"model.layers.0.mlp.down_proj": GPTQ(bits=4, ...)}

A spec is a method config (methods/): the method, the target format (bits, group size, symmetry) and
the method's own knobs, so layers of one model may differ in method, bits and group. A layer the plan
does not name stays in float.

`uniform` is the plan of one config over a model: every linear layer (the output head and the input
embedding only if asked), with one rule: calibrated methods run inside the decoder blocks only, so a
head or embedding gets round-to-nearest in the same format (RTN with the config's bits, group, sym).

EDGE is what the command line gives the head and the embedding unless told otherwise: 8-bit RTN,
group 32, symmetric: llama.cpp's Q8_0, the type of the token embedding in SmolLM2's own Q4_1 GGUF.
Left in float they are most of a small model's bytes (SmolLM2-135M: 28 of its 135 M weights, tied,
113 MB in fp32 against ~60 MB for the 4-bit body), and they tolerate 8 bits with a KLD cost far
below the body's 4-bit error (BENCHMARKS.md); 4 bits there costs visibly more.

Stored in a model directory's quantization_config as a list of {"spec": config dict, "layers": [names]},
one entry per distinct spec in first-use order (compact, readable, and `from_record` rebuilds the same
Plan). Directories of format 1 recorded one "method" for every module: `from_config` reads both.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import LowbitError
from ..methods import RTN, MethodConfig, config_for
from ..models.blocks import decoder_layers


EDGE = RTN(bits=8, group_size=32, sym=True)


@dataclass(frozen=True)
class Plan:
    layers: dict[str, MethodConfig]  # applied in the model's module order, whatever the order here

    @classmethod
    def uniform(cls, model: nn.Module, spec: MethodConfig, lm_head: bool | MethodConfig = False,
                embeddings: bool | MethodConfig = False) -> Plan:
        """`spec` for every linear layer of `model` (see the module docstring); the output head and
        the input embedding stay in float (False), take `spec`'s format (True), or a config of their
        own (EDGE: what the command line gives them)."""
        plan = cls.over(model, spec, targets(model, lm_head is True, embeddings is True))
        own = {name: cfg for name, cfg in zip(edge_names(model), (lm_head, embeddings))
               if name is not None and isinstance(cfg, MethodConfig)}
        return cls({**plan.layers, **own})

    @classmethod
    def over(cls, model: nn.Module, spec: MethodConfig, names: list[str]) -> Plan:
        """`spec` for the named layers; those outside the decoder blocks rounded to nearest if `spec`
        is calibrated."""
        if not names:
            raise LowbitError("the model has no nn.Linear layers to quantize")
        if not spec.needs_calib:
            return cls({name: spec for name in names})
        prefix = block_prefix(model)
        rtn = RTN(bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
        return cls({name: spec if name.startswith(prefix) else rtn for name in names})

    @property
    def specs(self) -> list[MethodConfig]:
        """The distinct specs, in first-use order."""
        return list(dict.fromkeys(self.layers.values()))

    @property
    def needs_calib(self) -> bool:
        return any(spec.needs_calib for spec in self.specs)

    def summary(self) -> str:
        """'gptq W4-g128-sym' for one spec; with several, each with its layer count."""
        specs = self.specs
        if len(specs) == 1:
            return f"{specs[0].name} {specs[0].scheme}"
        counts = [sum(s == spec for s in self.layers.values()) for spec in specs]
        return ", ".join(f"{s.name} {s.scheme} ×{n}" for s, n in zip(specs, counts))

    def to_record(self) -> list[dict]:
        return [{"spec": spec.to_dict(), "layers": [n for n, s in self.layers.items() if s == spec]}
                for spec in self.specs]

    @classmethod
    def from_record(cls, record: list[dict]) -> Plan:
        entries = [(spec_from_dict(entry["spec"]), entry["layers"]) for entry in record]
        return cls({name: spec for spec, names in entries for name in names})

    @classmethod
    def from_config(cls, quantization: dict, model: nn.Module) -> Plan:
        """The plan a lowbit directory's quantization_config records: format 2's per-layer "plan",
        or format 1's one "method" over its "modules" (with the calibrated-method rule of `over`)."""
        if "plan" in quantization:
            return cls.from_record(quantization["plan"])
        if "method" not in quantization:
            raise LowbitError("quantization_config records neither a plan nor a method")
        return cls.over(model, spec_from_dict(quantization["method"]), list(quantization["modules"]))


def spec_from_dict(d: dict) -> MethodConfig:
    """The inverse of MethodConfig.to_dict."""
    d = dict(d)
    return config_for(d.pop("method"), **d)


def targets(model: nn.Module, lm_head: bool = False, embeddings: bool = False) -> list[str]:
    """The modules to quantize: every nn.Linear (the output head only if asked), the input embedding if asked."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return [name for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) and (lm_head or m is not head))
            or (embeddings and isinstance(m, nn.Embedding) and m is embed)]


def edge_names(model: nn.Module) -> tuple[str | None, str | None]:
    """The names of the output head and of the input embedding (None where the model has none)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = {id(m): name for name, m in model.named_modules()}
    return names.get(id(head)), names.get(id(embed))


def block_prefix(model: nn.Module) -> str:
    """'model.layers.': the name prefix of every module inside a decoder block."""
    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers) + "."
