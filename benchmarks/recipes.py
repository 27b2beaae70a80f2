"""QuantX recipes on the embedded SmolLM2-135M (issue 18): recipes vs our uniform schemes vs llama.cpp's types.

    python benchmarks/recipes.py [--targets 2.5 3 3.5 4 4.5] [--candidates default] [--samples 128]
        [--sensitivity-samples 32] [--sensitivity FILE] [--rows recipes uniform llamacpp] [--all-uniform]
        [--windows N] [--png recipes.png] [--reports DIR] [--save DIR] [--proxy] [--domains] [--tps N] [--quick]
    python benchmarks/recipes.py --merge LOG... [--targets ...] [--png recipes.png]

Main table: one sensitivity pass (`--sensitivity-samples` x 512, QuantX's default 32: timed, in wall and
CPU seconds, the search time; its peak RSS printed; with `--sensitivity FILE` read from FILE when it
exists, else written there, so runs split by `--rows` share it), then per target bpw the
recipe (GPTQ on the chosen formats, calibration `--samples` x 512 of the `--calib` split, pydoc unless
told), every uniform
GPTQ scheme of the candidate grid at no more bits per weight than the largest target (`--all-uniform`:
the 8-bit ones too), and llama.cpp's Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M and Q4_0 made by
its own quantizer from the same float weights (the shipped Q4_1, dequantized and requantized by
llama_model_quantize with allow_requantize; benchmarks/vs_llamacpp.py builds it); every model scored
by lowbit on the same held-out text (pydoc: in domain; prose: out of domain), its KLD against the
source, its bits per weight over the decoder blocks' linear layers (llama.cpp's from the GGUF's tensor
sizes) and decode tok/s (bench's tg64; llama.cpp's through llama-cpp-python; a recipe's also as the cost
model predicted it). Head and embedding: 8-bit (recipes.EDGE) for ours. Rows: "best uniform <= bpw" is
the lowest-ppl uniform scheme at the same or fewer bits. `--png` draws ppl against bpw, in and out of
domain (matplotlib: the test extra); `--reports DIR` writes each recipe's per-layer report there
(recipes/recipe_report.py: choice, predicted and measured loss, bpw, predicted decode time).
--proxy: Spearman rank correlation of the sensitivity proxy with the model-level KLD of quantizing one
layer alone, every layer x 3 RTN candidates. --domains: RTN/GPTQ/AWQ W4 g128 calibrated on pydoc and on
mixed, ppl in and out of domain. --tps N: a --target-tps recipe and its measured decode speed.
--quick: two targets, four RTN candidates (g64), 8 x 256 calibration, 2 windows (proves the script works).
`--rows` runs a part (each row is printed as one JSON line as it is done); `--merge` reads those lines
from the runs' logs and prints the tables (and the PNG) of all of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import resource
import time
from pathlib import Path

import torch

import lowbit
from common import start
from lowbit.calib import load as load_text
from lowbit.eval import evaluate, model_size
from lowbit.eval.bench import bench
from lowbit.eval.metrics import scorer
from lowbit.methods import METHODS, config_for
from lowbit.models import fingerprint, load_any
from lowbit.recipes import EDGE, Plan, QuantX, candidates, edge_names
from lowbit.recipes import recipe_report
from lowbit.recipes.apply import apply, replace
from lowbit.recipes.quantx import plan as recipe_plan
from lowbit.recipes.cost import bits_per_weight
from lowbit.recipes.sensitivity import Sensitivity, block_linears, measure, rank_correlation

LLAMA_TYPES = {"Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q4_0": 2}  # llama.h ftypes
BLOCK_TENSOR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def score(model, src, texts: dict[str, str], windows: int | None) -> dict:
    row = {}
    for domain, text in texts.items():
        r = evaluate(model, src.tokenizer, text, max_windows=windows, source=src.model, progress=False,
                     source_key=fingerprint(src.source))  # the source's states cached: scored once, not per row
        row[domain] = {"ppl": r.ppl, "kld": r.kld, "tokens": r.tokens}
    return row


def body_bpw(model) -> float:
    body = [s for s in model_size(model).layers if s.name.startswith("model.layers.")]
    return 8 * sum(s.nbytes for s in body) / sum(s.params for s in body)


def quantized(src, plan: Plan, a) -> tuple[lowbit.QuantizedModel, dict[str, float]]:
    """A copy of the source quantized by `plan` (calibration `a.samples` x `a.seq_len` of `a.calib`), and the
    block runner's measured loss per layer."""
    model = copy.deepcopy(src.model)
    measured = apply(model, plan, tokenizer=src.tokenizer, text=load_text("calib", a.calib), calib_samples=a.samples,
                     calib_seq_len=a.seq_len, progress=False)
    return lowbit.QuantizedModel(model, src.tokenizer, plan, "default"), measured


def with_edges(src, plan_layers: dict) -> Plan:
    return Plan({**plan_layers, **{n: EDGE for n in edge_names(src.model) if n is not None}})


def decode_tps(q) -> float:
    return bench(q.model, q.tokenizer, prompt_tokens=64, gen_tokens=64, runs=1, roofline=False).decode_tps


def llama_rows(src, texts, windows) -> list[dict]:
    """llama.cpp's types from the shipped Q4_1 (requantized by its own quantizer), scored by lowbit."""
    import gguf

    import vs_llamacpp as peers

    python = peers.build()
    from lowbit.models import default_gguf
    rows, tokens = [], src.tokenizer(load_text("eval"))["input_ids"][:200]
    for name, ftype in LLAMA_TYPES.items():
        path = peers.PEERS / f"SmolLM2-135M-Instruct.{name}.gguf"
        if not path.is_file():
            peers.peer(python, {"op": "quantize", "src": str(default_gguf()), "dst": str(path), "ftype": ftype})
        tensors = [t for t in gguf.GGUFReader(path).tensors if BLOCK_TENSOR.fullmatch(t.name)]
        bpw = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
        speed = peers.peer(python, {"op": "bench", "path": str(path), "threads": torch.get_num_threads(), "pp": [64],
                                    "tg": 64, "runs": 1, "tokens": tokens})
        model = load_any(path).model
        rows.append({"model": f"llama.cpp {name}", "bpw": bpw, "file_bytes": path.stat().st_size,
                     "decode_tps": speed["tg64"], **score(model, src, texts, windows)})
        print("ROW", json.dumps(rows[-1]), flush=True)
    return rows


def proxy_table(src, a) -> None:
    """Proxy vs single-layer KLD over every block linear x 3 RTN candidates."""
    specs = candidates.parse(["rtn:W2-g64-asym", "rtn:W3-g128-asym", "rtn:W4-row-sym"])
    names = block_linears(src.model)
    sens = measure(src.model, src.tokenizer, load_text("calib"), specs, names, a.samples, a.seq_len, progress=False)
    ids = torch.tensor(src.tokenizer(load_text("eval"))["input_ids"][:512 * (a.windows or 2)]).view(-1, 512)
    reference = [scorer(src.model, 512)(w) for w in ids]
    predicted, measured = [], []
    with torch.no_grad():
        for name in names:
            layer = src.model.get_submodule(name)
            for spec in specs:
                replace(src.model, name, layer, METHODS[spec.name].quantize(layer.weight, None, spec))
                run = scorer(src.model, 512)
                kld = sum(float((r.exp() * (r - run(w))).sum(-1).mean()) for r, w in zip(reference, ids)) / len(ids)
                predicted.append(sens.loss[name][candidates.name(spec)])
                measured.append(kld)
                print(json.dumps({"layer": name, "candidate": candidates.name(spec), "proxy": predicted[-1],
                                  "kld": kld}), flush=True)
            src.model.set_submodule(name, layer)
    print(f"Spearman rank correlation, proxy vs single-layer KLD, {len(predicted)} pairs: "
          f"{rank_correlation(predicted, measured):.3f}")


def domains(src, texts, a) -> None:
    """RTN/GPTQ/AWQ W4 g128 calibrated on pydoc and on mixed: ppl in and out of domain."""
    print("| method | calibration | pydoc ppl | pydoc KLD | prose ppl | prose KLD |\n|---|---|---|---|---|---|")
    for calib in ("pydoc", "mixed"):
        for method in ("rtn", "gptq", "awq"):
            if method == "rtn" and calib == "mixed":
                continue
            spec = config_for(method, bits=4, group_size=128)
            q = lowbit.quantize(copy.deepcopy(src.model), spec, tokenizer=src.tokenizer,
                                calib_text=load_text("calib", calib), calib_samples=a.samples, calib_seq_len=a.seq_len,
                                progress=False)
            r = score(q.model, src, texts, a.windows)
            print(f"| {method} | {calib} | {r['pydoc']['ppl']:.4f} | {r['pydoc']['kld']:.5f} | "
                  f"{r['prose']['ppl']:.4f} | {r['prose']['kld']:.5f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 4.5])
    ap.add_argument("--candidates", nargs="+", default=["default"])
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (GPTQ)")
    ap.add_argument("--sensitivity-samples", type=int, default=QuantX.sensitivity_samples,
                    help="calibration windows of the sensitivity pass (QuantX's default)")
    ap.add_argument("--sensitivity", help="read the sensitivity pass from this JSON file, or write it there")
    ap.add_argument("--rows", nargs="+", default=["recipes", "uniform", "llamacpp"],
                    choices=["recipes", "uniform", "llamacpp"])
    ap.add_argument("--all-uniform", action="store_true", help="also the uniform schemes above the largest target")
    ap.add_argument("--merge", nargs="+", help="only the tables (and --png) of these runs' logs")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", default="pydoc", choices=["pydoc", "prose", "mixed"],
                    help="calibration corpus of the main table (sensitivity and GPTQ)")
    ap.add_argument("--windows", type=int, help="evaluation windows per corpus (default: all)")
    ap.add_argument("--png", help="draw ppl against bpw here (matplotlib)")
    ap.add_argument("--reports", help="write each recipe's per-layer report (markdown) into this directory")
    ap.add_argument("--proxy", action="store_true", help="only the proxy-vs-KLD table")
    ap.add_argument("--domains", action="store_true", help="only the in/out-of-domain method table")
    ap.add_argument("--tps", type=float, help="also a --target-tps recipe, its decode speed measured")
    ap.add_argument("--save", help="save every recipe and uniform model into this directory (to re-bench it later)")
    ap.add_argument("--quick", action="store_true", help="a short run that proves the script works")
    a = ap.parse_args()
    if a.quick:
        a.targets, a.samples, a.sensitivity_samples, a.seq_len, a.windows = [3.0, 4.0], 8, 8, 256, a.windows or 2
        a.candidates = ["rtn:W2-g64-asym", "rtn:W3-g64-asym", "rtn:W4-g64-sym", "rtn:W8-g64-sym"]
    if a.merge:
        return merge(a.merge, a)
    src, _ = start(f"candidates {' '.join(a.candidates)}; calibration {a.calib} {a.samples} x {a.seq_len}; "
                   f"windows {a.windows or 'all'}")
    texts = {"pydoc": load_text("eval", "pydoc"), "prose": load_text("eval", "prose")}
    if a.proxy:
        return proxy_table(src, a)
    if a.domains:
        return domains(src, texts, a)

    specs = candidates.parse(a.candidates)
    sens, search_s = sensitivity(src, specs, a) if "recipes" in a.rows else (None, None)
    edges = {n: EDGE for n in edge_names(src.model) if n is not None}
    rows = []
    budgets = [QuantX(target_bpw=t, candidates=tuple(a.candidates)) for t in a.targets]
    budgets += [QuantX(target_tps=a.tps, candidates=tuple(a.candidates))] if a.tps else []
    for qx in budgets if "recipes" in a.rows else []:
        t = time.perf_counter()
        recipe = recipe_plan(src.model, qx, src.tokenizer, "", edges, a.seq_len, False, sens=sens)
        solve_s = time.perf_counter() - t
        q, measured = quantized(src, recipe.plan, a)
        predicted = recipe_report.predict(src.model, recipe.plan, {r["layer"]: r["loss"] for r in recipe.rows})
        rows.append({"model": f"recipe {json.dumps(recipe.summary['target'])}", "bpw": body_bpw(q.model),
                     "predicted": {**recipe.summary["predicted"], "tokens_per_s": predicted["tokens_per_s"]},
                     "choices": _count(r["choice"] for r in recipe.rows),
                     "solve_s": solve_s, "decode_tps": decode_tps(q), **score(q.model, src, texts, a.windows)})
        _save(q, a, qx.target)
        if a.reports:
            report = recipe_report.measured(predicted, measured)
            recipe_report.write(Path(a.reports) / f"recipe-{qx.target[0]}-{qx.target[1]:g}.md",
                                {**recipe.summary, "report": report}, rows[-1]["decode_tps"])
        print("ROW", json.dumps(rows[-1]), flush=True)
    shapes = [tuple(src.model.get_submodule(n).weight.shape) for n in block_linears(src.model)]
    uniform = [s for s in specs if s.name != "ganq" and (a.all_uniform or _bpw(s, shapes) <= max(a.targets) + 1e-9)]
    for spec in uniform if "uniform" in a.rows else []:
        q, _ = quantized(src, with_edges(src, Plan.over(src.model, spec, block_linears(src.model)).layers), a)
        _save(q, a, candidates.name(spec))
        rows.append({"model": f"uniform {candidates.name(spec)}", "bpw": body_bpw(q.model),
                     "decode_tps": decode_tps(q), **score(q.model, src, texts, a.windows)})
        print("ROW", json.dumps(rows[-1]), flush=True)
    if "llamacpp" in a.rows:
        rows += llama_rows(src, texts, a.windows)
    report(rows, a.targets if "recipes" in a.rows else [], search_s)
    if a.png:
        draw(rows, a.png)


def _save(q, a, name) -> None:
    if a.save:
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", str(name)).strip("-")
        q.save(Path(a.save) / slug, overwrite=True)


def _count(tokens) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


def _bpw(spec, shapes) -> float:
    """A uniform scheme's bits per weight over the decoder blocks' linear layers."""
    return sum(bits_per_weight(spec, s) * s[0] * s[1] for s in shapes) / sum(s[0] * s[1] for s in shapes)


def sensitivity(src, specs, a) -> tuple[Sensitivity, float | None]:
    """The sensitivity pass (timed: wall and this process's CPU seconds), or the one stored in
    `a.sensitivity` (its time unknown here: None)."""
    path = Path(a.sensitivity) if a.sensitivity else None
    if path is not None and path.is_file():
        d = json.loads(path.read_text())
        print(f"sensitivity pass read from {path} ({d['seconds']:.0f} s when measured)", flush=True)
        return Sensitivity({n: tuple(s) for n, s in d["shapes"].items()}, d["loss"], d["tokens"],
                           d.get("propagation", {})), d["seconds"]
    t0, c0 = time.perf_counter(), time.process_time()
    sens = measure(src.model, src.tokenizer, load_text("calib", a.calib), specs, block_linears(src.model),
                   a.sensitivity_samples, a.seq_len)
    search_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    print(f"sensitivity pass: {search_s:.0f} s wall, {cpu_s:.0f} CPU-s, {len(specs)} candidates x {len(sens.loss)} "
          f"layers, {a.sensitivity_samples} x {a.seq_len} tokens, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**sens.to_dict(), "seconds": search_s, "cpu_s": cpu_s}))
        tmp.replace(path)
    return sens, search_s


def merge(logs: list[str], a) -> None:
    """The tables (and PNG) of the rows printed by earlier runs (lines 'ROW {json}')."""
    rows = []
    for log in logs:
        for line in Path(log).read_text().splitlines():
            body = line[4:] if line.startswith("ROW ") else None
            if body:
                rows.append(json.loads(body))
    targets = [t for t in a.targets if any(r["model"] == f"recipe {json.dumps({'bpw': t})}" for r in rows)]
    report(rows, targets, None)
    if a.png:
        draw(rows, a.png)


def report(rows: list[dict], targets: list[float], search_s: float | None) -> None:
    if search_s is not None:
        print(f"\nsearch (sensitivity) {search_s:.0f} s\n")
    print("| model | bpw (blocks) | pydoc ppl | pydoc KLD | prose ppl | prose KLD | decode tok/s (predicted) |"
          "\n|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["bpw"]):
        predicted = f" ({r['predicted']['tokens_per_s']:.0f})" if "predicted" in r else ""
        print(f"| {r['model']} | {r['bpw']:.3f} | {r['pydoc']['ppl']:.4f} | {r['pydoc']['kld']:.5f} | "
              f"{r['prose']['ppl']:.4f} | {r['prose']['kld']:.5f} | {r['decode_tps']:.0f}{predicted} |")
    print("\n| target | recipe ppl | best uniform <= bpw | its ppl | best llama.cpp <= bpw | its ppl |\n"
          "|---|---|---|---|---|---|")
    for target in targets:
        mine = next(r for r in rows if r["model"] == f"recipe {json.dumps({'bpw': target})}")

        def best(prefix):
            fit = [r for r in rows if r["model"].startswith(prefix) and r["bpw"] <= mine["bpw"] + 1e-9]
            return min(fit, key=lambda r: r["pydoc"]["ppl"]) if fit else None
        cells = [f"{b['model']} | {b['pydoc']['ppl']:.4f}" if b else "— | —" for b in (best("uniform"), best("llama"))]
        print(f"| {target} | {mine['pydoc']['ppl']:.4f} | " + " | ".join(cells) + " |")


def draw(rows: list[dict], path: str) -> list[list[str]]:
    """ppl against bpw, one panel per corpus (pydoc: in domain, prose: out of domain): the recipes'
    frontier as a line, every uniform scheme and llama.cpp type as points; the legend labels per panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, domain in zip(axes, ("pydoc", "prose")):
        for prefix, style in (("recipe", "o-"), ("uniform", "s"), ("llama.cpp", "^")):
            pts = sorted((r["bpw"], r[domain]["ppl"]) for r in rows if r["model"].startswith(prefix))
            if pts:
                ax.plot(*zip(*pts), style, label=prefix)
        ax.set_xlabel("bits per weight (decoder blocks' linear layers)")
        ax.set_ylabel(f"perplexity ({domain} held-out, ctx 512)")
        ax.set_title("in domain" if domain == "pydoc" else "out of domain")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]


if __name__ == "__main__":
    main()
