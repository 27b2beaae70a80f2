"""ActQ: how a linear layer's input is quantized at run time (the activation spec), and its oracle.

A weight QTensor says how W is stored; an ActQ says how x is rounded before x·Wᵀ. Every method maps
the layer's input x (fp32 rows [T, K]) to x' (the stored channel order, see below), then rounds

    q = clamp(rne(x' · inv), −2^(b−1), 2^(b−1) − 1)         x̂ = q · s  (inv = top / range, s = range / top)

with rne = round half to even (torch.round; the CPUs' default vcvtps2dq), every step in fp32, and
inv = 0 (so q = 0) where the range is 0; top = qmax = 2^(b−1) − 1 (Tender: below). What differs is the
range each scale covers:

  per-token    one scale per row:              inv = qmax / max_k |x'_k|,  s = max_k |x'_k| / qmax
  per-block32  one per row and 32 channels:    the same over each block of 32 (llama.cpp's Q8_0 activations)
  per-tensor   one static scale:               max = the calibrated max |x| over all channels (`maxima`)
  smoothquant  per-token, after SmoothQuant's channel scales were folded into the preceding norm and W
  hadamard     per-token on x' = x·H (H orthonormal, formats/hadamard.py; W's columns rotated alike)
  tender       channel decomposition (Tender, ISCA 2024), below.

Tender. Calibration fixed, per channel: a bias b = (max + min)/2, the maximum m = max |x − b|, and a
group g ∈ [0, G) (the smallest g with m ≤ TMax / 2^(G−1−g), TMax = max m); the channels are permuted
(`perm`: stored channel j is input channel perm[j]) so that each weight group's channels are runs of
one group each (methods/tender.py orders them by weight group, then group: every weight group keeps
its column set); W's columns are permuted the same way, and b·Ŵᵀ is added to the layer's bias, so
x·Ŵᵀ = (x − b)·Ŵᵀ + b·Ŵᵀ.
At run time x' = x[..., perm] − bias; the rows are cut into chunks of `chunk` rows (0: one calibrated
TMax for every row), and per chunk

    TMax = max over the chunk's rows and channels k of |x'_k| · 2^(G−1−g_k)   (chunk = 0: max(maxima))
    inv_0 = (qmax · 2^(G−1)) / TMax               s_0 = TMax / (qmax · 2^(G−1))     (fp32 divisions)
    channel of group g:  inv_g = inv_0 · 2^−g,  s_g = s_0 · 2^g      (exact: powers of two)

so group G−1 spans [−TMax, TMax] and each group below spans half the one above. TMax is the smallest
range that holds every channel of the chunk inside its own group's range (the plain max |x'| when the
top group holds it): nothing is clipped, and a quiet chunk narrows every group together. (The plain
max would clip a lower group's channel whenever the top group is quiet; the reference avoids that by
calibrating TMax and the groups per chunk position, which needs a different channel order per chunk.)
The chunk trades adaptivity for fewer scales: chunk = 1 is one TMax per row, as per-token rounding
has one scale per row; with 256 one rare row sets every group's range for 255 others (SmolLM2's
down_proj inputs: relative output error 0.029 per row, 0.058 per 256 rows, 0.030 per-token). The
static TMax (chunk = 0) clips whatever exceeds the calibration, as the reference does. The integer matmul
(`tender_accumulators`) then needs no rescaling between groups: with integer weights w (codes minus
zero point) and per-(row, weight group) scales sw,

    P_g[t, n, j] = Σ_{k in group g, k in weight group j} q[t, k] · w[n, k]          (integers)
    acc[t, n, j] = Σ_g 2^g · P_g = Horner from the top group: acc = 2·acc + P_g, g = G−1 … 0
    y[t, n] = Σ_j fp32(acc[t, n, j]) · fp32(s_0[t] · sw[n, j])  (+ bias; fp32, the j-sum in any order)

one float multiply per output and weight group (per output for whole-row weights): a kernel must
match acc exactly and y to fp32 rounding. The other methods are checked the same way, one block per
activation scale and weight group (per-block32: per 32 channels). Bounds for the
kernels: |q| ≤ 2^(b−1), |w| ≤ 2^(wb−1) (sym; asym codes minus zero ≤ 2^wb − 1), so
|P_g| ≤ K_g · 2^(b−1) · 2^(wb−1) and |acc| ≤ 2^(G−1) · 2^(b−1) · 2^(wb−1) · K_j (K_j: columns of weight
group j): int32 holds it while that product is below 2^31 (G = 8, b = wb = 8: K_j ≤ 2^9), int64 beyond.

The float path the universal decoder runs (`fake_quantize`, then x̂·Ŵᵀ) is the same maths in fp32;
`linear_integer` is the exact oracle for the integer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import LowbitError
from .hadamard import hadamard
from .qtensor import MAX_DIM, check_int

ACT_BITS = (4, 8)
METHODS = ("tender", "per-token", "per-tensor", "per-block32", "smoothquant", "hadamard")
MAX_GROUPS = 16
BLOCK = 32
MAX_CHUNK = 1 << 20


def check_act_spec(bits: int, method: str, groups: int, chunk: int) -> None:
    """A LowbitError for an activation spec that does not exist."""
    if bits not in ACT_BITS:
        raise LowbitError(f"activation bits {bits} are not supported (choose 4 or 8; 16 keeps float activations)")
    if method not in METHODS:
        raise LowbitError(f"activation method '{method}' is unknown (choose one of {', '.join(METHODS)})")
    if not isinstance(groups, int) or not 1 <= groups <= MAX_GROUPS:
        raise LowbitError(f"Tender groups G = {groups} is out of range (1 to {MAX_GROUPS})")
    if not isinstance(chunk, int) or not 0 <= chunk <= MAX_CHUNK:
        raise LowbitError(f"Tender chunk {chunk} is out of range (0 = calibrated TMax, or 1 to {MAX_CHUNK} rows)")


def _int(meta: dict, name: str, lo: int, hi: int) -> int:
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise LowbitError(f"activation {name} {value!r} is not an integer in [{lo}, {hi}]")
    return value


@dataclass
class ActQ:
    method: str
    bits: int
    in_features: int
    groups: int = 1  # Tender's G
    chunk: int = 1  # Tender: rows per run-time TMax (0: the calibrated TMax)
    bias: torch.Tensor | None = None  # fp32 [K], stored order (tender)
    perm: torch.Tensor | None = None  # int32 [K]: stored channel j is input channel perm[j] (tender)
    group: torch.Tensor | None = None  # uint8 [K]: group of stored channel j (tender)
    maxima: torch.Tensor | None = None  # fp32 [K]: calibrated max |x'| per stored channel (tender, per-tensor)

    def __post_init__(self):
        check_act_spec(self.bits, self.method, self.groups, self.chunk)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    # -- storage -------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"method": self.method, "bits": self.bits, "in_features": self.in_features,
                "groups": self.groups, "chunk": self.chunk}

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"bias": self.bias, "perm": self.perm, "group": self.group, "maxima": self.maxima}
        return {n: t for n, t in named.items() if t is not None}

    @staticmethod
    def layout(meta) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of the tensors a stored activation meta needs, after checking its fields."""
        if not isinstance(meta, dict):
            raise LowbitError(f"activation spec {meta!r} is not an object")
        extra = sorted(set(meta) - {"method", "bits", "in_features", "groups", "chunk"})
        if extra:
            raise LowbitError(f"activation spec has unknown field '{extra[0]}'")
        if meta.get("method") not in METHODS:
            raise LowbitError(f"activation method {meta.get('method')!r} is unknown (known: {', '.join(METHODS)})")
        check_int(meta, "bits", ACT_BITS)
        k = _int(meta, "in_features", 1, MAX_DIM)
        _int(meta, "groups", 1, MAX_GROUPS)
        _int(meta, "chunk", 0, MAX_CHUNK)
        vector = ((k,), torch.float32)
        if meta["method"] == "tender":
            return {"bias": vector, "perm": ((k,), torch.int32), "group": ((k,), torch.uint8), "maxima": vector}
        return {"maxima": vector} if meta["method"] == "per-tensor" else {}

    @classmethod
    def check(cls, meta, tensors: dict[str, torch.Tensor], in_features: int | None = None) -> None:
        """A LowbitError unless `tensors` (real, or on meta) are what `meta` describes for a layer with
        `in_features` inputs; real ones must be finite, `perm` a permutation, `group` in [0, G)."""
        expected = cls.layout(meta)
        if in_features is not None and meta["in_features"] != in_features:
            raise LowbitError(f"activation spec is for {meta['in_features']} input features, the weights have {in_features}")
        if set(tensors) != set(expected):
            odd = sorted(set(tensors) ^ set(expected))[0]
            raise LowbitError(f"activation tensor '{odd}' is {'missing' if odd in expected else 'unexpected'}")
        for name, (shape, dtype) in expected.items():
            t = tensors[name]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise LowbitError(f"activation tensor '{name}' is {str(t.dtype)[6:]} {'×'.join(map(str, t.shape))}, "
                                  f"expected {str(dtype)[6:]} {'×'.join(map(str, shape))}")
        if any(t.is_meta for t in tensors.values()):
            return
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LowbitError(f"activation tensor '{name}' holds NaN or Inf")
        if "maxima" in tensors and bool((tensors["maxima"] < 0).any()):
            raise LowbitError("activation maxima are negative")
        if "perm" in tensors:
            k = meta["in_features"]
            if not torch.equal(torch.sort(tensors["perm"].long()).values, torch.arange(k)):
                raise LowbitError("activation 'perm' is not a permutation of the input channels")
            if int(tensors["group"].max()) >= meta["groups"]:
                raise LowbitError(f"activation 'group' is not in [0, {meta['groups']})")

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> ActQ:
        return cls(meta["method"], meta["bits"], meta["in_features"], meta["groups"], meta["chunk"],
                   tensors.get("bias"), tensors.get("perm"), tensors.get("group"), tensors.get("maxima"))

    @staticmethod
    def describe(meta: dict) -> str:
        """'A8 tender G8 c256', 'A8 per-token', ... (one short line, for inspect)."""
        if meta["method"] == "tender":
            chunk = "static" if meta["chunk"] == 0 else f"c{meta['chunk']}"
            return f"A{meta['bits']} tender G{meta['groups']} {chunk}"
        return f"A{meta['bits']} {meta['method']}"

    # -- run time ------------------------------------------------------------------------------
    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """x (any leading dims, K channels) -> x' [T, K] fp32 in the stored channel order."""
        x = x.reshape(-1, x.shape[-1]).float()
        if self.method == "tender":
            return torch.index_select(x, 1, self.perm).sub_(self.bias)
        if self.method == "hadamard":
            return x @ hadamard(self.in_features).to(x.device)
        return x

    def steps(self) -> torch.Tensor:
        """2^g of each stored channel [K] fp32 (Tender: its group's scale over s_0, exact), 1 for the rest."""
        return torch.exp2(self.group.float()) if self.method == "tender" else torch.ones(())

    def ranges(self, xt: torch.Tensor) -> torch.Tensor:
        """The max |x'| each scale covers, broadcastable to [T, K]: [T, 1] per row (tender: its TMax),
        [T, K] per 32-block, [1, 1] per tensor."""
        t, k = xt.shape
        if self.method in ("per-token", "smoothquant", "hadamard"):
            return _abs_max(xt)[:, None]
        if self.method == "per-block32":
            blocks = F.pad(xt.abs(), (0, -k % BLOCK)).view(t, -1, BLOCK).amax(-1)
            return blocks.repeat_interleave(BLOCK, 1)[:, :k]
        if self.method == "per-tensor":
            return self.maxima.max().view(1, 1)
        return self.tmax(xt)[:, None]

    def tmax(self, xt: torch.Tensor) -> torch.Tensor:
        """Tender's TMax of each row [T]: per chunk of rows, the smallest that holds every channel in its
        group's range (max_k |x'_k| · 2^(G−1−g_k): each group's max |x'| times its power of two, exact);
        chunk = 0: the calibrated one."""
        t = xt.shape[0]
        if self.chunk == 0:
            return self.maxima.max().expand(t)
        per_row = (xt.abs() * (2.0 ** (self.groups - 1) / self.steps())).amax(1)
        per_chunk = F.pad(per_row, (0, -t % self.chunk)).view(-1, self.chunk).amax(1)
        return per_chunk.repeat_interleave(self.chunk)[:t]

    def _rounded(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q as fp32 integers [T, K], the scales broadcastable to [T, K]). Tender's group g:
        inv_0 · 2^−g and s_0 · 2^g, exact (powers of two)."""
        r = self.ranges(xt)
        top = float(self.qmax * 2 ** (self.groups - 1)) if self.method == "tender" else float(self.qmax)
        inv = torch.where(r > 0, top / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r))
        steps = self.steps()
        q = xt * (inv / steps)
        return q.round_().clamp_(-self.qmax - 1, self.qmax), r / top * steps

    def codes(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, s): the integer codes of x' [T, K] (int32) and the scales [T, K] (fp32)."""
        q, s = self._rounded(xt)
        return q.to(torch.int32), s.expand_as(q)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ [T, K] in the stored order: what the layer's weights (stored in that order) multiply."""
        q, s = self._rounded(self.transform(x))
        return q.mul_(s)


def _abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each row [T] from its min and max (two reductions: faster than |x|'s, and than aminmax)."""
    return torch.maximum(x.amin(1).abs_(), x.amax(1).abs_())


def integer_weights(qt) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A UniformQ's integer weights (codes minus zero point, int64 [N, K]), scales (fp32 [N, J]) and
    columns per weight group."""
    n, k = qt.shape
    g = k if qt.group_size == -1 else qt.group_size
    zero = torch.full_like(qt.scales, 2 ** (qt.bits - 1), dtype=torch.int64) if qt.zeros is None else qt.zeros.long()
    w = qt.codes().long() - zero.repeat_interleave(g, 1)[:, :k]
    return w, qt.scales.float(), g


def group_partials(q: torch.Tensor, group: torch.Tensor, groups: int, w: torch.Tensor, g: int) -> torch.Tensor:
    """P[G, T, N, J]: the integer partial sums of each activation group (`group` [K] in [0, `groups`))
    per block of `g` columns (exact: float64 holds these integers, all below 2^53)."""
    t, k = q.shape
    n, j = w.shape[0], -(-k // g)
    qp = F.pad(q.double(), (0, j * g - k)).view(t, j, g)
    wp = F.pad(w.double(), (0, j * g - k)).view(n, j, g)
    member = F.pad(group.long(), (0, j * g - k), value=-1).view(j, g)
    return torch.stack([torch.einsum("tjg,njg->tnj", qp * (member == i), wp) for i in range(groups)])


def horner(partials: torch.Tensor) -> torch.Tensor:
    """Σ_g 2^g · P_g combined by shifts from the top group (acc = 2·acc + P_g), in int64."""
    acc = torch.zeros(partials.shape[1:], dtype=torch.int64)
    for p in partials.flip(0):
        acc = 2 * acc + p.long()
    return acc


def tender_accumulators(x: torch.Tensor, act: ActQ, qt) -> tuple[torch.Tensor, torch.Tensor]:
    """(acc int64 [T, N, J], s_0 fp32 [T]): the integer Horner sums of a Tender layer's matmul (J weight
    groups) and each row's base scale, for input rows x and the layer's UniformQ weights (stored order)."""
    xt = act.transform(x)
    q, _ = act.codes(xt)
    w, _, g = integer_weights(qt)
    return horner(group_partials(q, act.group, act.groups, w, g)), act.tmax(xt) / float(act.qmax * 2 ** (act.groups - 1))


def linear_integer(x: torch.Tensor, act: ActQ, qt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The integer oracle of an activation-quantized layer [T, N] (module docstring): integer sums per
    block of one activation scale and one weight scale (Tender: per weight group, its groups combined
    by shifts; per-block32: per 32 channels; the rest: per weight group), then one fp32 multiply by
    the product of the two scales per block, summed in fp32 in column order, plus the bias."""
    w, sw, g = integer_weights(qt)
    if act.method == "tender":
        acc, s0 = tender_accumulators(x, act, qt)
        y = (acc.float() * (s0[:, None, None] * sw[None])).sum(-1)
        return y if bias is None else y + bias
    xt = act.transform(x)
    q, s = act.codes(xt)
    block = BLOCK if act.method == "per-block32" else g  # weight groups are multiples of 32 (or a whole row)
    acc = horner(group_partials(q, torch.zeros(xt.shape[1]), 1, w, block))
    w_scale = sw.repeat_interleave(g, 1)[:, :xt.shape[1]][:, ::block]
    y = (acc.float() * (s[:, ::block][:, None, :] * w_scale[None])).sum(-1)
    return y if bias is None else y + bias
