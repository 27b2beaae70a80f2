"""Recipes as files: human-editable YAML that becomes a Plan for a given model.

    lowbit_recipe: 1
    source: default                    # what it was made for (informative)
    target: {bpw: 3.5}                 # informative too, like `predicted`
    groups:                            # optional: regex -> spec, the first full match wins
      - match: 'model\\.layers\\.\\d+\\.mlp\\.down_proj'
        spec: gptq:W4-g64-sym
    layers:                            # optional: layer -> spec; a named layer wins over the groups
      model.layers.0.self_attn.q_proj: gptq:W4-g128-sym   # predicted loss 1.2e-05, 4.139 bpw
      lm_head: rtn:W8-g32-sym

A spec is a METHOD:SCHEME token (recipes/candidates.py: gptq:W3-g64-asym, ganq:W3-lut-row, any
method's config by `{method: gptq, bits: 3, group_size: 64, sym: false, damp: 0.01}` as a mapping),
the layers it covers are quantized that way; layers neither named nor matched stay in float (like
llm-compressor's config_groups with `targets`). `write` emits one line per layer, with its predicted
loss and bits per weight as comments, so the file reads as the report of the choice; `read` keeps each
layer's `# predicted loss X` for the report of the run that applies it (recipe_report.py; a note left
beside a hand-edited spec predicts the spec it was written for).

Refused before any work, as one line: YAML that does not parse, a missing or wrong `lowbit_recipe`,
unknown keys, a spec that is not one (`read`); a layer the model does not have, a regex that
matches none of its layers (`Recipe.plan`); the Plan's own checks (a group wider than a layer's
rows, methods that cannot mix) run in recipes/apply.py before calibration starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from torch import nn

from ..atomic_file import atomic_write_text
from ..errors import LowbitError
from ..methods import MethodConfig
from .candidates import name, parse_one
from .plan import Plan, spec_from_dict, targets

VERSION = 1
_NOTE = re.compile(r"^\s+(?P<layer>[^\s:#]+):[^#\n]*#\s*predicted loss "
                   r"(?P<loss>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))", re.MULTILINE)
KEYS = {"lowbit_recipe", "source", "target", "predicted", "candidates", "sensitivity_tokens", "groups", "layers"}  # informative: source .. tokens


@dataclass(frozen=True)
class RecipeFile:
    """A read recipe: per-layer specs and regex groups, not yet bound to a model."""
    layers: dict[str, MethodConfig]
    groups: tuple[tuple[str, MethodConfig], ...]
    path: str
    predicted: dict[str, float] = field(default_factory=dict)  # layer -> the loss its note predicts

    @property
    def needs_calib(self) -> bool:
        return any(s.needs_calib for s in [*self.layers.values(), *(s for _, s in self.groups)])

    def to_record(self) -> dict:
        """What the file says, as JSON (a resumable run is keyed by it)."""
        return {"layers": {n: s.to_dict() for n, s in self.layers.items()},
                "groups": [[rx, s.to_dict()] for rx, s in self.groups]}

    def plan(self, model: nn.Module) -> Plan:
        """The Plan for `model`; a LowbitError naming a layer it lacks or a group that matches nothing."""
        names = targets(model, lm_head=True, embeddings=True)
        missing = [n for n in self.layers if n not in names]
        if missing:
            raise LowbitError(f"recipe {self.path} names {missing[0]}, which the model does not have "
                              "(or is not a linear layer or the input embedding)")
        layers = {}
        for n in names:
            spec = self.layers.get(n) or next((s for rx, s in self.groups if re.fullmatch(rx, n)), None)
            if spec is not None:
                layers[n] = spec
        for rx, _ in self.groups:
            if not any(re.fullmatch(rx, n) for n in names):
                raise LowbitError(f"recipe {self.path}: group '{rx}' matches none of the model's layers")
        if not layers:
            raise LowbitError(f"recipe {self.path} quantizes no layer")
        return Plan(layers)


def _spec(value, where: str) -> MethodConfig:
    if isinstance(value, str):
        try:
            return parse_one(value)
        except LowbitError as e:
            raise LowbitError(f"{where}: {e}") from None
    if isinstance(value, dict) and isinstance(value.get("method"), str):
        try:
            return spec_from_dict(value)
        except (LowbitError, TypeError) as e:
            raise LowbitError(f"{where}: {e}") from None
    raise LowbitError(f"{where}: a spec is METHOD:SCHEME (gptq:W4-g128-sym) or a mapping with a 'method'")


def parse(text: str, path: str = "<text>") -> RecipeFile:
    """A recipe from its YAML text; every problem a one-line LowbitError (YAML's messages and a
    file's own names may hold line breaks: whitespace is collapsed)."""
    try:
        return _parse(text, path)
    except LowbitError as e:
        raise LowbitError(" ".join(str(e).split())) from None


def _parse(text: str, path: str) -> RecipeFile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise LowbitError(f"recipe {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict) or data.get("lowbit_recipe") != VERSION:
        raise LowbitError(f"recipe {path} is not a lowbit recipe (it must be a mapping with 'lowbit_recipe: {VERSION}')")
    unknown = sorted(set(map(str, data)) - KEYS)
    if unknown:
        raise LowbitError(f"recipe {path} has unknown key '{unknown[0]}' (known: {', '.join(sorted(KEYS))})")
    layers, groups = data.get("layers") or {}, data.get("groups") or []
    if not isinstance(layers, dict) or not all(isinstance(k, str) for k in layers):
        raise LowbitError(f"recipe {path}: 'layers' must map layer names to specs")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and set(g) == {"match", "spec"}
                                               and isinstance(g["match"], str) for g in groups):
        raise LowbitError(f"recipe {path}: 'groups' must be a list of {{match: REGEX, spec: SPEC}}")
    for g in groups:
        try:
            re.compile(g["match"])
        except re.error as e:
            raise LowbitError(f"recipe {path}: group '{g['match']}' is not a regular expression ({e})") from None
    notes = {m["layer"]: float(m["loss"]) for m in _NOTE.finditer(text) if m["layer"] in layers}
    return RecipeFile({n: _spec(v, f"recipe {path}, layer {n}") for n, v in layers.items()},
                      tuple((g["match"], _spec(g["spec"], f"recipe {path}, group '{g['match']}'")) for g in groups),
                      path, notes)


def read(path: str | Path) -> RecipeFile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LowbitError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(f"cannot read recipe {path}: {e}") from None
    return parse(text, str(path))


def _token(spec: MethodConfig) -> str:
    """A spec as written: its METHOD:SCHEME token when that says all of it, else a flow mapping."""
    try:
        if parse_one(name(spec)) == spec:
            return name(spec)
    except LowbitError:
        pass
    return _flow(spec.to_dict())


def _flow(value) -> str:
    """A value as one line of YAML flow style (a one-item list's item: scalars stay bare)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6, sort_keys=False).strip()[1:-1]


def render(plan: Plan, header: dict, notes: dict[str, str] | None = None) -> str:
    """The YAML text of a plan: `header` (source, target, predicted, candidates), one line per layer
    with its `notes` as a comment."""
    notes = notes or {}
    lines = ["# lowbit recipe: one spec per layer (METHOD:SCHEME, or a mapping of a method's config).",
             "# Edit freely; 'groups' (a list of {match: REGEX, spec: SPEC}) can cover many layers at once.",
             f"lowbit_recipe: {VERSION}"]
    lines += [f"{k}: {_flow(v)}" for k, v in header.items()]
    lines.append("layers:")
    width = max(len(n) for n in plan.layers)
    for n, spec in plan.layers.items():
        note = f"  # {notes[n]}" if n in notes else ""
        lines.append(f"  {n + ':':<{width + 1}} {_token(spec)}{note}")
    return "\n".join(lines) + "\n"


def write(path: str | Path, plan: Plan, header: dict, notes: dict[str, str] | None = None) -> Path:
    """Write the recipe atomically (a reader sees the old file or the new one)."""
    atomic_write_text(path, render(plan, header, notes))
    return Path(path)
