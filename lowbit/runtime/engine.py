"""The native decode engine (issue #5): the whole decoder runs in C, one call per token or prompt.

At ~5 ms per token, Python cannot dispatch the ~15 ops × 30 layers of a decode step, so
`load_decoder(model)` reads the structure of a supported HF model (Llama/Mistral, Qwen2/3, Gemma
1/2/3, Phi-3) from its own modules and config — projections (fused or not) and their biases, which
norms sit where and what they compute (probed numerically: w·x̂ or (1+w)·x̂), QK-norm, the MLP's
activation (probed), RoPE tables computed by the model's own rotary module (so every scaling type HF
implements comes out the same), attention scaling, sliding windows, soft-capping, embedding scale —
and hands it to the C in engine.c. Quantized linears keep their packed format and run the
generated kernels (a layer with an input permutation, act-order: nn.QuantLinear.in_perm, gathers
its input first, once for q/k/v or gate/up sharing it; a W·A· layer, nn.ActQuantLinear, runs Tender's
integer kernel, kernels/cpu/tender.py, which quantizes its input itself); fp linears (the tied head of SmolLM2) are
kept in fp16 (bf16 if out of fp16 range). Every weight the engine streams per token is copied once into one transparent-huge-page
mapping (≈2× the effective bandwidth of 4 KiB pages on the development VM).

Batched decoding: with `slots=B` the KV cache holds B sequences, and `Engine.step` advances any of
them together (each at its own position; a prefill chunk of one beside the decode tokens of the
others): the quantized linears run once over all the step's tokens, so B decode tokens read the
weights once instead of B times, the reason a bandwidth-bound CPU serves many users at little more
than the cost of one. `forward`/`truncate` (the single-sequence Decoder) use slot 0.

Other architectures raise LowbitError, and the caller runs the model through the universal path
(QuantLinear inside the HF model).
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import os
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .. import kernels
from ..kernels import switches
from ..errors import LowbitError
from ..formats import KQuant, UniformQ
from ..kernels.cpu import build, codegen
from ..kernels.cpu import float16 as cpu_float16
from ..kernels.cpu import isa as isa_mod
from ..kernels.cpu import tender as cpu_tender
from ..kernels.cpu import threads as cpu_threads
from ..nn import ActQuantLinear, QuantEmbedding, QuantLinear

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
_KV_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "int8": torch.int8}
KV_CACHE_TYPES = ("fp16", "bf16", "fp32", "int8")
Q, K, V, O, GATE, UP, DOWN = range(7)
IN, ATTN_OUT, FFN_IN, FFN_OUT, QN, KN = range(6)
DT_F16, DT_BF16 = 1, 2
SCRATCH_BYTES = 64 << 20  # per-chunk activation buffers: the prefill chunk is sized to fit this
MAX_CHUNK = 512
SOURCE = Path(__file__).with_name("engine.c")
MAX_DEFAULT_SLOTS = 32  # 16 decoding together (past that, a few cores gain no throughput) + 16 parked prefixes
# Steps of fewer tokens than this run quantized linears row by row through the one-token GEMV, by
# whether activations are int8. On int8 one call takes every token of a step from 2 on (up to 32 the
# tile kernels, codegen._tileq: each block's codes unpacked once for all the rows, 1.3x one row's time
# for 2 rows, 4x for 8 on SmolLM2's W4 shapes); the fp32 GEMM (dequantized tiles, built for prefill) costs
# ~2.5 GEMVs at 2 rows and wins from ~4 (2 threads, shared machine: 145 ms for 2 rows vs 110 row by
# row; 159 vs 218 at 4; 190 vs 417 at 8).
GEMM_FROM_ROWS = {True: 2, False: 4}
KV_MEMORY_SHARE = 0.5  # by default the KV slots take at most this share of the memory available now
PROFILE_OPS = ("norm", "qkv", "rope+kv", "attention", "o_proj", "gate_up", "act", "down", "head")  # engine.c's P_*


@functools.lru_cache(maxsize=None)
def _library(isa: str) -> ctypes.CDLL:
    flags = [*codegen.FLAGS[isa], *([] if "-Wno-psabi" in codegen.FLAGS[isa] else ["-Wno-psabi"])]
    lib = ctypes.CDLL(str(build.compile_source(SOURCE, flags, f"lowbit-engine-{isa}", (codegen.C_DIR,))))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    sig = {"eng_new": ([i] * 15 + [f, f, p, p], p), "eng_step": ([p, p, p, i, p], i), "eng_copy": ([p, i, i, i], None), "eng_free": ([p], None), "eng_arena": ([ctypes.c_size_t], p),
           "eng_arena_free": ([p, ctypes.c_size_t], None), "eng_forward": ([p, p, i, i, p, p], None),
           "eng_set_linear": ([p, i, i, i, i, i, p, p, p, p, p, i, p, p], None),
           "eng_set_norm": ([p, i, i, p, f], None), "eng_set_layer": ([p, i, i, i, i, i, f, f], None),
           "eng_set_rope": ([p, i, p, p], None), "eng_set_threads": ([p, i], None),
           "eng_set_gemm_rows": ([p, i], None), "eng_profile": ([p, i, p], i),
           "eng_set_tender": ([p, i, i, i, i, p, p], None)}
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _kv_dtype(kv_dtype) -> torch.dtype:
    dt = _KV_NAMES.get(kv_dtype, kv_dtype) if isinstance(kv_dtype, str) else kv_dtype
    if dt not in KV_DTYPES:
        raise LowbitError(f"kv_dtype {kv_dtype!r} is not supported (choose {', '.join(KV_CACHE_TYPES)})")
    return dt


def _norm(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """(effective fp32 weight, eps) of an RMSNorm: w·x̂ (Llama) or (1+w)·x̂ (Gemma), found by probing."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    w = getattr(norm, "weight", None)
    if eps is None or w is None:
        raise LowbitError(f"{type(norm).__name__} is not an RMSNorm the native engine knows")
    w = w.detach().float()
    probe = torch.randn(3, w.numel(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = norm(probe.to(norm.weight.dtype)).float()
    xhat = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + eps)
    tol = 1e-4 if norm.weight.dtype == torch.float32 else 2e-2  # a bf16/fp16 model rounds its output
    for cand in (w, 1.0 + w):
        if torch.allclose(out, xhat * cand, rtol=tol, atol=tol / 10):
            return cand.contiguous(), float(eps)
    raise LowbitError(f"{type(norm).__name__} computes something other than an RMSNorm; "
                      "run this model through the universal path")


def _activation(act: nn.Module) -> int:
    """0 silu, 1 tanh-approximated gelu, 2 exact gelu: whichever the module computes (probed)."""
    x = torch.linspace(-8, 8, 161)
    with torch.no_grad():
        y = act(x)
    refs = [nn.functional.silu(x), nn.functional.gelu(x, approximate="tanh"), nn.functional.gelu(x)]
    for code, ref in enumerate(refs):
        if torch.allclose(y, ref, rtol=1e-5, atol=1e-5):
            return code
    raise LowbitError(f"MLP activation {type(act).__name__} has no native version; use the universal path")


class _Linear:
    """One projection as the C sees it: a packed kernel (quantized, or fp16 weights through the
    generated float16 kernel), Tender's integer kernel (an ActQuantLinear: it quantizes its input
    itself), or bf16 rows (fp weights beyond fp16's range) for the engine's own loop."""

    def __init__(self, module: nn.Module, name: str, round_bits: int | None = None):
        self.bias = None if module.bias is None else module.bias.detach().float().contiguous()
        self.tender = None
        if isinstance(module, ActQuantLinear):  # W·A·: the integer kernel quantizes the input itself
            self.tender = cpu_tender.prepare(module.qtensor, module.act)
            if self.tender is None:
                raise LowbitError(f"{name}: its activations ({module.act.describe(module.act_meta)}) have no native "
                                  "kernel here (the engine runs Tender, per-token, smoothquant and per-tensor "
                                  "activations on AVX-512 VNNI CPUs); use the universal path")
            self.packed, self.perm, (self.n, self.k) = None, None, module.qtensor.shape
            self.kp, self.weights = self.k, [(self.tender, "qw")]
            return
        qt = module.qtensor if isinstance(module, QuantLinear) else None
        self.perm = None if qt is None or module.in_perm is None else module.in_perm.to(torch.int32).contiguous()
        if qt is None and round_bits is not None and isinstance(module, nn.Linear):
            # round to nearest, symmetric, group 32: what `lowbit quantize --method rtn` gives this head
            qt = UniformQ.from_float(module.weight.detach().float(), round_bits, 32, sym=True)
        if qt is not None:
            self.packed = kernels.prepare(qt, "cpu")
            if not hasattr(self.packed, "native"):
                raise LowbitError(f"{name}: {qt.kind} layers have no native CPU kernel here "
                                  "(is a C compiler installed?); use the universal path")
            self.n, self.k = qt.shape
            self.kp = self.packed.nblocks * 32
            self.weights = [(self.packed, a) for a in self.packed.WEIGHTS if getattr(self.packed, a) is not None]
        elif isinstance(module, nn.Linear):
            w = module.weight.detach()
            self.packed, (self.n, self.k) = None, w.shape
            self.wdt = DT_F16 if w.abs().max() < 60000 else DT_BF16
            if self.wdt == DT_F16:  # the generated fp16 kernels: a tiled GEMM for prompts, as quantized layers
                self.packed = cpu_float16.prepare(w)
            if self.packed is not None:
                self.kp = self.packed.nblocks * 32
                self.weights = [(self.packed, "qweight")]
                return
            self.kp = self.k
            self.w = w.to(torch.float16 if self.wdt == DT_F16 else torch.bfloat16).contiguous()
            self.weights = [(self, "w")]
        else:
            raise LowbitError(f"{name} is a {type(module).__name__}, not a linear layer the engine runs")

    def install(self, lib, handle, layer: int, slot: int, int8: bool | None) -> None:
        bias = None if self.bias is None else self.bias.data_ptr()
        if self.tender is not None:
            fn, args = self.tender.native(self.bias)
            lib.eng_set_tender(handle, layer, slot, self.n, self.k, fn, ctypes.byref(args))
            return
        if self.packed is None:
            lib.eng_set_linear(handle, layer, slot, self.n, self.k, self.kp, None, None, None, None,
                               self.w.data_ptr(), self.wdt, bias, None)
            return
        fn1, a1 = self.packed.native(1, self.bias, int8)
        fnm, am = self.packed.native(2, self.bias, int8)
        lib.eng_set_linear(handle, layer, slot, self.n, self.k, self.kp, fn1, ctypes.byref(a1), fnm,
                           ctypes.byref(am), None, 0, bias, None if self.perm is None else self.perm.data_ptr())


class _Arena:
    """One huge-page mapping holding every weight streamed per token, in the order the engine reads them."""

    def __init__(self, lib, owners: list[tuple[object, str]]):
        offsets, total = [], 0
        for obj, attr in owners:
            total = -(-total // 64) * 64
            offsets.append(total)
            total += getattr(obj, attr).nbytes
        self.lib, self.bytes = lib, max(total, 64)
        self.ptr = lib.eng_arena(self.bytes)
        if not self.ptr:
            raise LowbitError(f"could not map {self.bytes / 2**20:.0f} MiB for the engine's weights (out of memory?)")
        whole = torch.frombuffer((ctypes.c_uint8 * self.bytes).from_address(self.ptr), dtype=torch.uint8)
        for (obj, attr), off in zip(owners, offsets):
            t = getattr(obj, attr)
            setattr(obj, attr, whole[off:off + t.nbytes].view(t.dtype).view(t.shape).copy_(t))


def _fused(modules: list[nn.Module]) -> QuantLinear | ActQuantLinear | None:
    """One layer for projections that read the same input (q/k/v, gate/up), their rows stacked in
    order, when all are UniformQ of one layout, or all KQuant of one GGUF type: per token one kernel
    call, one activation quantization (KQuant: x's q8_K rounding, the same for every such layer) and
    one longer weight stream instead of several (row results are unchanged); an input permutation
    (act-order, nn.QuantLinear.in_perm) they share is gathered once. W·A· layers (ActQuantLinear) fuse
    when their activation quantizers are equal too (Tender fits one per layer: q/k/v's can differ in
    centring, a choice made per layer from its own output error). None when they can't be fused."""
    acts = [m.act if isinstance(m, ActQuantLinear) else None for m in modules]
    if any(a is not None for a in acts) and not all(a is not None and _same_act(a, acts[0]) for a in acts):
        return None
    qts = [m.qtensor if isinstance(m, (QuantLinear, ActQuantLinear)) else None for m in modules]
    perms = [getattr(m, "in_perm", None) for m in modules]
    if any(p is None for p in perms) != all(p is None for p in perms) or \
            (perms[0] is not None and not all(torch.equal(p, perms[0]) for p in perms)):
        return None
    if not all(isinstance(q, (UniformQ, KQuant)) for q in qts):
        return None
    first, rows = qts[0], sum(q.shape[0] for q in qts)
    if all(isinstance(q, UniformQ) for q in qts):
        if len({(q.bits, q.group_size, q.shape[1], q.zeros is None) for q in qts}) != 1:
            return None
        zeros = None if first.zeros is None else torch.cat([q.zeros for q in qts])
        qt = UniformQ(torch.cat([q.qweight for q in qts]), torch.cat([q.scales for q in qts]), zeros, first.bits,
                      first.group_size, (rows, first.shape[1]))
    elif all(isinstance(q, KQuant) for q in qts):
        if len({(q.qtype, q.shape[1]) for q in qts}) != 1:
            return None
        qt = KQuant(torch.cat([q.blocks for q in qts]), first.qtype, (rows, first.shape[1]))
    else:
        return None  # UniformQ beside KQuant
    biases = [m.bias for m in modules]
    bias = None if all(b is None for b in biases) else \
        torch.cat([torch.zeros(q.shape[0]) if b is None else b.detach().float() for b, q in zip(biases, qts)])
    return ActQuantLinear(qt, acts[0], bias) if acts[0] is not None else QuantLinear(qt, bias, perms[0])


def _same_act(a, b) -> bool:
    """Whether two activation quantizers (formats/activation.ActQ) quantize every input alike."""
    ta, tb = a.tensors(), b.tensors()
    return a.meta() == b.meta() and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

def _rope_tables(model, layer_types: list[str], max_ctx: int, head_dim: int) -> tuple[list, dict]:
    """cos/sin [max_ctx, rot/2] per RoPE variant, from the model's own rotary module, and which
    table each layer type uses. Length-dependent types (dynamic, longrope) switch at the original
    context length, as HF does for a sequence of that length."""
    rot = model.model.rotary_emb
    typed = "layer_type" in inspect.signature(rot.forward).parameters
    kinds = sorted(set(layer_types)) if typed else [None]
    tables = []
    for kind in kinds:
        rope_type = rot.rope_type[kind] if typed else getattr(rot, "rope_type", "default")
        params = model.config.rope_parameters[kind] if typed else getattr(model.config, "rope_parameters", None) or {}
        split = max_ctx
        if rope_type in ("dynamic", "longrope"):
            split = min(max_ctx, int(params.get("original_max_position_embeddings")
                                     or getattr(rot, "original_max_seq_len", max_ctx)))
        parts = []
        with torch.no_grad():
            for lo, hi in ((0, split), (split, max_ctx)):
                if hi > lo:
                    pos = torch.arange(hi)[None]
                    cos, sin = rot(torch.zeros(1, hi, head_dim), pos, *([kind] if typed else []))
                    parts.append((cos[0, lo:hi].float(), sin[0, lo:hi].float()))
        cos, sin = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        half = cos.shape[-1] // 2
        if not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
            raise LowbitError("this model's rotary embedding is not the rotate-half kind the engine runs")
        tables.append((cos[:, :half].contiguous(), sin[:, :half].contiguous()))
    return tables, {kind: i for i, kind in enumerate(kinds)}


class Segment(NamedTuple):
    """Tokens of one sequence in a batched step: `ids` at positions pos0.. of KV slot `slot`; `want`
    0: no logits, 1: the last token's, 2: every token's (prompt log-probabilities)."""
    slot: int
    pos0: int
    ids: list[int]
    want: int = 1


class Engine:
    """A Decoder (runtime/decoder.py) running natively: slot 0 through forward/truncate, all `slots`
    sequences through `step`. Build it with load_decoder."""

    def __init__(self, lib, handle, keep: list, vocab: int, hidden: int, max_context: int, arena: _Arena,
                 slots: int, chunk: int, kv_bytes_per_slot: int):
        self._lib, self._h, self._keep, self._arena = lib, handle, keep, arena
        self.vocab_size, self.hidden, self.max_context, self.position = vocab, hidden, max_context, 0
        self.slots, self.max_step_tokens, self.kv_bytes_per_slot = slots, chunk, kv_bytes_per_slot
        self.bytes_per_token = arena.bytes  # every weight a decode step streams lives in the arena
        self._lock = threading.Lock()  # the C call releases the GIL; one sequence, one step at a time
        weakref.finalize(self, _release, lib, handle, arena.ptr, arena.bytes)

    def forward(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        return self._run(ids, states=False)

    def states(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Append `ids` like `forward`, but return every position's hidden state after the final norm
        [n, hidden] (not the last one's logits): the output head's input, for scoring every position."""
        return self._run(ids, states=True)

    def _run(self, ids, states: bool) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int32).reshape(-1).contiguous()
        n = ids.numel()
        if n == 0:
            raise LowbitError("forward() needs at least one token id")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise LowbitError(f"token ids must lie in [0, {self.vocab_size})")
        out = torch.empty((n, self.hidden) if states else self.vocab_size, dtype=torch.float32)
        with self._lock:
            if self.position + n > self.max_context:
                raise LowbitError(f"{self.position} cached + {n} new tokens exceed the engine's context of "
                                  f"{self.max_context} (truncate() first, or load_decoder(max_context=...))")
            self._lib.eng_forward(self._h, ids.data_ptr(), n, self.position, None if states else out.data_ptr(),
                                  out.data_ptr() if states else None)
            self.position += n
        return out

    def step(self, segments: list[Segment]) -> torch.Tensor:
        """Run the segments (distinct slots, at most max_step_tokens tokens in all) as one step;
        float32 logits [rows, vocab]: a row per segment with want 1, one per token with want 2, in order."""
        if not segments or len({s.slot for s in segments}) != len(segments):
            raise LowbitError("a step needs at least one segment and one segment per slot")
        ids = [int(t) for s in segments for t in s.ids]
        if len(ids) > self.max_step_tokens:
            raise LowbitError(f"a step takes at most {self.max_step_tokens} tokens, got {len(ids)}")
        flat = torch.tensor([v for s in segments for v in (s.slot, s.pos0, len(s.ids), s.want)], dtype=torch.int32)
        rows = sum(len(s.ids) if s.want == 2 else s.want == 1 for s in segments)
        out = torch.empty(rows, self.vocab_size, dtype=torch.float32)
        tokens = torch.tensor(ids, dtype=torch.int32)
        with self._lock:
            rc = self._lib.eng_step(self._h, tokens.data_ptr(), flat.data_ptr(), len(segments), out.data_ptr())
        if rc != 0:
            raise LowbitError(f"a step's segments are out of range (slots {self.slots}, context {self.max_context}, "
                              f"vocabulary {self.vocab_size}): {[(s.slot, s.pos0, len(s.ids)) for s in segments]}")
        return out

    def copy(self, src: int, dst: int, n: int) -> None:
        """Give slot `dst` the first `n` cached positions of slot `src` (a prefix computed once)."""
        if not (0 <= src < self.slots and 0 <= dst < self.slots and 0 <= n <= self.max_context):
            raise LowbitError(f"cannot copy {n} positions from slot {src} to {dst} ({self.slots} slots)")
        with self._lock:
            self._lib.eng_copy(self._h, src, dst, n)

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.position:
            raise LowbitError(f"cannot truncate to {n} positions: the cache holds {self.position}")
        self.position = n

    def profile(self, on: bool | None = None) -> dict[str, float]:
        """Seconds spent per op since profiling was switched on; `on` switches it (and zeroes it)."""
        out = (ctypes.c_double * len(PROFILE_OPS))()
        self._lib.eng_profile(self._h, -1 if on is None else int(on), out)
        return dict(zip(PROFILE_OPS, out))


def _release(lib, handle, ptr, nbytes):
    lib.eng_free(handle)
    lib.eng_arena_free(ptr, nbytes)


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (Linux's MemAvailable; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def slots_for_memory(kv_bytes_per_slot: int) -> int:
    """How many KV slots of this size the machine holds by default: KV_MEMORY_SHARE of the memory
    available now, at least 1, at most MAX_DEFAULT_SLOTS."""
    return max(1, min(MAX_DEFAULT_SLOTS, int(available_memory() * KV_MEMORY_SHARE) // max(kv_bytes_per_slot, 1)))


def _check_supported(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise LowbitError(f"the native engine does not run {model_type or type(model).__name__} models "
                          f"(it runs {', '.join(SUPPORTED)}); use the universal path")
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb") \
            or getattr(model, "lm_head", None) is None:
        raise LowbitError(f"{type(model).__name__} does not have the decoder layout the engine expects")


def load_decoder(model: nn.Module, max_context: int | None = None, threads: int | None = None,
                 kv_dtype: torch.dtype | str = torch.float16, head_bits: int | None = None,
                 int8_activations: bool | None = None, slots: int | None = 1) -> Engine:
    """The native engine for a supported HF causal LM whose linears are QuantLinear or nn.Linear.

    `max_context`: positions the KV cache holds (default: the model's, at most 4096); the cache is
    mapped lazily, so unused positions cost no memory. `threads`: threads of the kernels' pool
    (process-wide, fixed for this engine; default $LOWBIT_THREADS or the physical cores).
    `kv_dtype`: fp32, fp16 (default), bf16 or int8 cache (int8: a symmetric scale per token and KV
    head, half of fp16's memory). `head_bits`: round an unquantized lm_head to that many bits (round to nearest, symmetric, group 32: UniformQ.from_float) instead of keeping it in fp16; 8 is llama.cpp's choice for Q4_0
    files (Q8_0 output) and halves the bytes read per token on small models like SmolLM2, at a
    small cost in fidelity. `int8_activations`: decode GEMVs and prefill GEMMs on activations rounded
    to int8 per 32-block, as llama.cpp (Q8_0) and Intel's runtime do (None: the process-wide setting
    of kernels/switches.py, off by default; exact fp32 activations when off). `slots`: sequences the
    KV cache holds for batched steps (`Engine.step`; None: what memory allows, slots_for_memory). Raises LowbitError for
    anything it cannot run.
    """
    _check_supported(model)
    config, base = model.config, model.model
    isa = isa_mod.selected()
    klib = build.load(isa)
    if klib is None:
        raise LowbitError("the native engine needs the generated CPU kernels (install a C compiler)")
    cpu_threads.apply(klib)
    if threads is not None:
        cpu_threads.set_threads(threads)
    nthreads = cpu_threads.get()
    try:
        lib = _library(isa)
    except (RuntimeError, OSError) as e:
        raise LowbitError(f"could not build the native engine: {e}") from e
    kv = _kv_dtype(kv_dtype)
    layers = list(base.layers)
    attn0 = layers[0].self_attn
    hd, heads, kvh = attn0.head_dim, config.num_attention_heads, config.num_key_value_heads
    max_ctx = int(max_context or min(getattr(config, "max_position_embeddings", 4096) or 4096, 4096))
    if max_ctx < 1:
        raise LowbitError(f"max_context must be positive, got {max_context}")
    row_bytes = hd * kv.itemsize + (4 if kv == torch.int8 else 0)  # int8 rows carry an fp32 scale
    kv_bytes = 2 * len(layers) * kvh * max_ctx * row_bytes  # one slot's K and V
    slots = slots_for_memory(kv_bytes) if slots is None else slots
    if slots < 1:
        raise LowbitError(f"slots must be at least 1, got {slots}")

    embed_mod = model.get_input_embeddings()
    if isinstance(embed_mod, QuantEmbedding):
        embed = embed_mod.qtensor.dequantize(torch.float32).contiguous()
    elif isinstance(embed_mod, nn.Embedding):
        embed = embed_mod.weight.detach().float().contiguous()
    else:
        raise LowbitError(f"input embedding {type(embed_mod).__name__} is not one the engine reads")
    embed_scale = float(getattr(embed_mod, "embed_scale", 1.0))
    vocab, hidden = embed.shape

    lins, per_layer = [], []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "qkv_proj"):
            projs = {Q: attn.qkv_proj}
        else:
            qkv = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
            projs = {Q: qkv} if qkv is not None else {Q: attn.q_proj, K: attn.k_proj, V: attn.v_proj}
        projs[O] = attn.o_proj
        if hasattr(mlp, "gate_up_proj"):
            projs[GATE] = mlp.gate_up_proj
        else:
            gate_up = _fused([mlp.gate_proj, mlp.up_proj])
            projs.update({GATE: gate_up} if gate_up is not None else {GATE: mlp.gate_proj, UP: mlp.up_proj})
        projs[DOWN] = mlp.down_proj
        built = {s: _Linear(m, f"layer {i} slot {s}") for s, m in projs.items()}
        lins += list(built.values())
        per_layer.append(built)
    head = _Linear(model.lm_head, "lm_head", head_bits)
    inter = per_layer[0][DOWN].k
    if head.k != hidden or head.n != vocab:
        raise LowbitError(f"lm_head is {head.n}×{head.k}, the embedding {vocab}×{hidden}: not a plain decoder")
    arena = _Arena(lib, [w for lin in lins + [head] for w in lin.weights])

    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * len(layers)
    tables, table_of = _rope_tables(model, layer_types, max_ctx, hd)
    half = tables[0][0].shape[1]
    max_kp = max(lin.kp for lin in lins + [head])
    per_token = 4 * (2 * hidden + max(hidden, inter, heads * hd) + (heads + 2 * kvh) * hd + heads * hd
                     + 2 * inter + max_kp)
    chunk = max(1, min(MAX_CHUNK, SCRATCH_BYTES // per_token))
    mlp0 = layers[0].mlp
    act = _activation(getattr(mlp0, "act_fn", None) or mlp0.activation_fn)
    final_cap = getattr(config, "final_logit_softcapping", None) or 0.0
    par = ctypes.cast(klib.lb_parallel, ctypes.c_void_p).value
    h = lib.eng_new(len(layers), hidden, heads, kvh, hd, inter, head.n, max_ctx, half, act, KV_DTYPES[kv],
                    chunk, max_kp, max(nthreads, 1), slots, embed_scale, float(final_cap), embed.data_ptr(), par)
    if not h:
        raise LowbitError("could not allocate the engine's KV cache and buffers (out of memory? lower max_context)")
    keep = [embed, tables, lins, head, arena]
    try:
        lib.eng_set_threads(h, nthreads)
        lib.eng_set_gemm_rows(h, GEMM_FROM_ROWS[switches.int8_activations() if int8_activations is None
                                                   else bool(int8_activations)])
        for t, (cos, sin) in enumerate(tables):
            lib.eng_set_rope(h, t, cos.data_ptr(), sin.data_ptr())
        for i, (layer, built) in enumerate(zip(layers, per_layer)):
            for slot, lin in built.items():
                lin.install(lib, h, i, slot, int8_activations)
            norms = {IN: layer.input_layernorm}
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3: sandwich norms around both blocks
                norms.update({ATTN_OUT: layer.post_attention_layernorm, FFN_IN: layer.pre_feedforward_layernorm,
                              FFN_OUT: layer.post_feedforward_layernorm})
            else:
                norms[FFN_IN] = layer.post_attention_layernorm
            for slot, name in ((QN, "q_norm"), (KN, "k_norm")):
                if getattr(layer.self_attn, name, None) is not None:
                    norms[slot] = getattr(layer.self_attn, name)
            for slot, mod in norms.items():
                w, eps = _norm(mod)
                keep.append(w)
                lib.eng_set_norm(h, i, slot, w.data_ptr(), eps)
            attn = layer.self_attn
            window = getattr(attn, "sliding_window", None) if hasattr(attn, "sliding_window") \
                else getattr(config, "sliding_window", None)
            softcap = getattr(attn, "attn_logit_softcapping", None) or 0.0
            lib.eng_set_layer(h, i, int(Q in built and K not in built), int(UP not in built), int(window or 0),
                              table_of.get(layer_types[i] if len(table_of) > 1 else None, 0),
                              float(attn.scaling), float(softcap))
        head.install(lib, h, -1, 0, int8_activations)
        w, eps = _norm(base.norm)
        keep.append(w)
        lib.eng_set_norm(h, -1, 0, w.data_ptr(), eps)
    except BaseException:
        _release(lib, h, arena.ptr, arena.bytes)
        raise
    return Engine(lib, h, keep, head.n, hidden, max_ctx, arena, slots, chunk, kv_bytes)
