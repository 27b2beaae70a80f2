"""QuantX: a per-layer recipe under a budget, from measured sensitivity and this machine's cost.

    QuantX(target_bpw=3.5)          bits per weight over the decoder blocks' linear layers
    QuantX(target_size="60MB")      the whole model's bytes (head, embedding and float tensors included)
    QuantX(target_tps=300)          decode tokens/s on this machine, by the cost model (recipes/cost.py)

Steps: the candidates (recipes/candidates.py) of every linear layer inside the decoder blocks get a
predicted loss (recipes/sensitivity.py, one streamed pass of the block runner) and a cost (cost.py:
exact bytes, or decode seconds); the solver (solve.py) picks one candidate per item for the least
total predicted loss within the budget. An item is one layer, or, with `fuse`, the projections the
engine runs as one matmul (q/k/v, gate/up): one item whose options are either one UniformQ
candidate for all of them (fused: one weight stream) or any mix (separate matmuls), whichever the
budget favours. The head and the input embedding keep the formats given to `plan` (the command line:
8-bit, recipes.EDGE), counted in the size and speed budgets as fixed costs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..errors import LowbitError
from ..methods import MethodConfig
from ..models import LazyBlocks
from .candidates import fits, name, parse
from .cost import Machine, bits_per_weight, stored_bytes, this_machine
from .plan import Plan, edge_names
from .sensitivity import Sensitivity, block_linears, measure
from .solve import Option, frontier, least_cost, solve

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # runtime/engine.py's _fused groups
RESOLUTION = 4000  # frontier points kept per budget (solve.py): optimal to 1/4000 of the budget
_SIZE = re.compile(r"\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[KMG]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'60MB', '1.5GiB', '123456' -> bytes."""
    m = _SIZE.fullmatch(str(text))
    if m is None:
        raise LowbitError(f"size '{text}' is not a number of bytes with an optional unit (e.g. 60MB, 1.5GiB)")
    return int(float(m["n"]) * _UNITS[(m["unit"] or "B").lower()])


@dataclass(frozen=True)
class QuantX:
    """A per-layer recipe under exactly one budget (bits per weight, size or decode speed)."""
    target_bpw: float | None = field(default=None, metadata={"help": "bits per weight over the decoder "
                                                             "blocks' linear layers, e.g. 3.5"})
    target_size: str | None = field(default=None, metadata={"help": "whole model size, e.g. 60MB or 1.5GiB"})
    target_tps: float | None = field(default=None, metadata={"help": "decode tokens/s on this machine "
                                                             "(by the kernels' cost model)"})
    candidates: tuple[str, ...] = field(default=("default",), metadata={
        "help": "candidate specs per layer: sets (default, rtn, codebook, all) or METHOD:SCHEME tokens "
                "(gptq:W3-g64-asym, ganq:W3-lut-row)"})
    sensitivity_samples: int = field(default=32, metadata={"help": "calibration windows for the sensitivity pass"})
    fuse: bool = field(default=True, metadata={"help": "offer q/k/v and gate/up one shared format (one fused "
                                               "matmul) beside mixing", "off": "no-fuse"})
    name = "quantx"
    needs_calib = True

    def __post_init__(self):
        given = [t for t in ("target_bpw", "target_size", "target_tps") if getattr(self, t) is not None]
        if len(given) != 1:
            raise LowbitError("a recipe takes exactly one budget: --target-bpw, --target-size or --target-tps"
                              + (f" (got {', '.join(given)})" if given else ""))
        if self.target_bpw is not None and not self.target_bpw > 0:
            raise LowbitError(f"--target-bpw must be positive, got {self.target_bpw}")
        if self.target_tps is not None and not self.target_tps > 0:
            raise LowbitError(f"--target-tps must be positive, got {self.target_tps}")
        if self.target_size is not None:
            parse_size(self.target_size)
        if self.sensitivity_samples < 1:
            raise LowbitError(f"--sensitivity-samples must be at least 1, got {self.sensitivity_samples}")
        parse(self.candidates)

    @property
    def target(self) -> tuple[str, float]:
        """('bpw' | 'size' | 'tps', value)."""
        if self.target_bpw is not None:
            return "bpw", float(self.target_bpw)
        if self.target_size is not None:
            return "size", float(parse_size(self.target_size))
        return "tps", float(self.target_tps)


@dataclass
class Recipe:
    plan: Plan  # every block linear's choice, and the head's and embedding's given formats
    rows: list[dict]  # per block linear: layer, choice, loss, bpw, bytes, seconds (predicted)
    summary: dict  # target, predicted bpw, bytes, loss, tokens/s, candidates, sensitivity tokens


def _fused_groups(names: list[str]) -> list[list[str]]:
    """Items: the layers of each fused group present whole (same parent module), the rest alone."""
    items, taken = [], set()
    for n in names:
        if n in taken:
            continue
        parent, _, leaf = n.rpartition(".")
        group = next((g for g in FUSED if leaf == g[0]), None)
        members = [f"{parent}.{m}" for m in group] if group else [n]
        if group and not all(m in names for m in members):
            members = [n]
        items.append(members)
        taken.update(members)
    return items


def _options(members: list[str], specs, sens: Sensitivity, cost_of, fused_cost, fuse: bool) -> list[Option]:
    """An item's Pareto options: separate matmuls with any mix, and (fusable) one shared UniformQ spec."""
    per_member = [[Option(cost_of(m, s), sens.loss[m][name(s)], {m: s}) for s in specs if name(s) in sens.loss[m]]
                  for m in members]
    if any(not options for options in per_member):
        raise LowbitError(f"no candidate fits {members[0]} ({sens.shapes[members[0]][1]} input features)")
    if len(members) == 1:
        return per_member[0]
    costs, losses, parents = frontier(per_member)
    mixes = []
    for point in range(len(costs)):
        choice, p = {}, point
        for (parent, option), options in zip(reversed(parents), reversed(per_member)):
            choice.update(options[int(option[p])].choice)
            p = int(parent[p])
        mixes.append(Option(float(costs[point]), float(losses[point]), choice))
    shared = [Option(fused_cost(members, s), sum(sens.loss[m][name(s)] for m in members), {m: s for m in members})
              for s in specs if fuse and s.name != "ganq" and all(name(s) in sens.loss[m] for m in members)]
    return mixes + shared


def _fixed(model: nn.Module, edges: dict[str, MethodConfig], machine: Machine | None,
           names: list[str]) -> tuple[int, float]:
    """Bytes and decode seconds outside the recipe's layers (`names`): the head and embedding in their
    formats (a tied pair with one spec stored once), every other float tensor as held."""
    modules = dict(model.named_modules())
    quantized = {id(modules[n].weight) for n in [*edges, *names]}
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in quantized)
    stored = {}
    for n, spec in edges.items():
        stored.setdefault((id(modules[n].weight), spec), stored_bytes(spec, tuple(modules[n].weight.shape)))
    nbytes += sum(stored.values())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seconds = 0.0
    if machine is not None and head is not None:
        head_name = edge_names(model)[0]
        head_bytes = stored_bytes(edges[head_name], tuple(head.weight.shape)) if head_name in edges \
            else head.weight.numel() * head.weight.element_size()
        seconds = machine.seconds(head_bytes, *head.weight.shape)
    return nbytes, seconds


def decode_seconds(model: nn.Module, layers: dict[str, MethodConfig],
                   machine: Machine) -> tuple[dict[str, float], float]:
    """The cost model's decode time of a plan (`layers`: name -> spec): each block linear's share (a fused
    group in one UniformQ format is one matmul, as the engine runs it, its time split by bytes) and the
    whole token's seconds (those, plus the head in its format, as `plan` counts them)."""
    names = [n for n in block_linears(model) if n in layers]
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    own = {n: stored_bytes(layers[n], shapes[n]) for n in names}
    seconds = {}
    for members in _fused_groups(names):
        formats = {(s.bits, s.group_size, s.sym) for s in (layers[m] for m in members) if s.name != "ganq"}
        if len(members) > 1 and len(formats) == 1 and all(layers[m].name != "ganq" for m in members):
            total = machine.seconds(sum(own[m] for m in members), sum(shapes[m][0] for m in members),
                                    shapes[members[0]][1])
            seconds.update({m: total * own[m] / sum(own[m] for m in members) for m in members})
        else:
            seconds.update({m: machine.seconds(own[m], *shapes[m]) for m in members})
    edges = {n: s for n, s in layers.items() if n in edge_names(model)}
    return seconds, sum(seconds.values()) + _fixed(model, edges, machine, names)[1]


def plan(model: nn.Module, qx: QuantX, tokenizer, text: str, edges: dict[str, MethodConfig] | None = None,
         calib_seq_len: int = 512, progress: bool = True, machine: Machine | None = None,
         sens: Sensitivity | None = None, lazy: LazyBlocks | None = None) -> Recipe:
    """The recipe for `model` under `qx`'s budget; `edges`: the head's and embedding's own specs (name ->
    config), `text` the calibration text for the sensitivity pass, `machine` the cost model's (default:
    this one, measured, for a speed budget); `sens`: a sensitivity measured before (with the same
    candidates and text: one pass serves every budget); `lazy`: the loader of a model whose blocks are
    on meta (read one at a time by the sensitivity pass, and left there)."""
    edges = dict(edges or {})
    specs = parse(qx.candidates)
    names = block_linears(model)
    kind, value = qx.target
    machine = machine or (this_machine() if kind == "tps" else None)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    unfit = [n for n in names if not any(fits(s, shapes[n][1]) for s in specs)]
    if unfit:
        raise LowbitError(f"no candidate fits {unfit[0]} ({shapes[unfit[0]][1]} input features): add a row-wise one")
    fixed_bytes, fixed_seconds = _fixed(model, edges, machine, names)
    if kind == "tps":
        cost_of = lambda n, s: machine.seconds(stored_bytes(s, shapes[n]), *shapes[n])
        fused_cost = lambda ms, s: machine.seconds(sum(stored_bytes(s, shapes[m]) for m in ms),
                                                   sum(shapes[m][0] for m in ms), shapes[ms[0]][1])
        budget = 1 / value - fixed_seconds
    else:
        cost_of = lambda n, s: 8 * stored_bytes(s, shapes[n])
        fused_cost = lambda ms, s: sum(cost_of(m, s) for m in ms)
        budget = value * sum(r * c for r, c in shapes.values()) if kind == "bpw" else 8 * (value - fixed_bytes)
    sens = sens or measure(model, tokenizer, text, specs, names, qx.sensitivity_samples, calib_seq_len, progress,
                          lazy)
    items = [_options(members, specs, sens, cost_of, fused_cost, qx.fuse) for members in _fused_groups(names)]
    least = least_cost(items)
    if least > budget:
        raise LowbitError(f"the budget is out of reach with these candidates: the closest reachable is "
                          f"{_reachable(kind, least, shapes, fixed_bytes, fixed_seconds)}")
    chosen = solve(items, budget, resolution=budget / RESOLUTION)
    choice = {m: s for option in chosen for m, s in option.choice.items()}
    ordered = {n: choice[n] for n in names}
    # loss: the layer's own output error (what the block runner measures as it applies the recipe, the
    # report's comparison); weighted: times its propagation to the block output and its block's
    # amplification to the model's output (nats of KLD), what the solver minimised
    rows = [{"layer": n, "choice": name(s), "loss": sens.raw(n, name(s)), "propagation": sens.propagation.get(n, 1.0),
             "amplification": sens.amplification.get(n, 1.0), "weighted": sens.loss[n][name(s)],
             "bpw": bits_per_weight(s, shapes[n]), "bytes": stored_bytes(s, shapes[n])} for n, s in ordered.items()]
    body = sum(r["bytes"] for r in rows)
    seconds = sum(o.cost for o in chosen) + fixed_seconds if kind == "tps" else None
    summary = {"target": {kind: qx.target_size if kind == "size" else value}, "candidates": [name(s) for s in specs],
               "predicted": {"bpw": 8 * body / sum(r * c for r, c in shapes.values()), "bytes": body + fixed_bytes,
                             "loss": sum(r["weighted"] for r in rows)},
               "sensitivity_tokens": sens.tokens}
    if seconds:
        summary["predicted"]["tokens_per_s"] = 1 / seconds
    return Recipe(Plan({**ordered, **edges}), rows, summary)


def _reachable(kind: str, least: float, shapes: dict, fixed_bytes: int, fixed_seconds: float) -> str:
    """The least reachable cost in the budget's own units."""
    if kind == "bpw":
        return f"--target-bpw {least / sum(r * c for r, c in shapes.values()):.3f}"
    if kind == "size":
        return f"--target-size {int(least / 8 + fixed_bytes):,} bytes"
    return f"--target-tps {1 / (least + fixed_seconds):.1f}"
