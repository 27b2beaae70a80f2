"""UniformQ and CodebookQ matmuls in Triton: codes are dequantized in registers, never in memory.

Both formats share the kernels; only how a code becomes a weight differs (scale × (q − z), or a
look-up in the row's or group's codebook):
  _gemv  batch 1..8 (decode): a program owns BN output rows (one or a few per GPU thread) and walks
         its share of K in tiles of NBLK 32-code blocks; codes are cut out of each word with shifts and
         fp32 FMAs accumulate; UniformQ sums (q − z)·x per block and scales once per block, with
         q − z from the float bit trick (q | 0x4B000000 reads as 2^23 + q: no int→float convert).
  _gemm  batch > 8: dequantizes a [BK, BN] tile in registers and calls tl.dot (UniformQ: on the
         exact integers q − z, scaled per group afterwards).
Both split K over several programs (decode is latency-bound: many small programs keep more loads
in flight); the partial sums meet in y by atomic adds (y is zeroed first). CodebookQ's sparse
outliers are added in the same kernels' epilogue (a loop over each row's CSR entries).

Layout (`prepare`, once per layer): words, scales and zero points transposed to [words, N] and
[groups, N] so that a warp reads 32 neighbouring rows' words in one coalesced access while the
activation it needs is the same for all of them (the GPTQ layout). 2/4/8-bit words keep their codes;
3-bit blocks become two words of the codes' low 2 bits and one of their high bits (same size), so no
code straddles a word.
"""

from __future__ import annotations

import functools

import torch

from ...formats import CodebookQ, UniformQ
from ...formats.packing import pack, unpack

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_BATCH = 8
_KERNELS: list[str] = []  # the functions marked @_jit below
tl = None  # triton.language, once _triton() has run: the kernels' `tl`


def _jit(fn):
    """Mark `fn` a Triton kernel: `_triton()` makes it one (triton.jit) on the first launch."""
    _KERNELS.append(fn.__name__)
    return fn


@functools.lru_cache(maxsize=None)
def _triton():
    """Import triton (seconds, and absent on most CPU machines) and jit the kernels, once, on the first
    launch: the kernels are plain functions of this module until then, and Triton reads their source and
    resolves `tl` and each other here, in the module's globals."""
    import triton
    import triton.language

    globals()["tl"] = triton.language
    globals().update({name: triton.jit(globals()[name]) for name in _KERNELS})
    return triton


@_jit
def _outliers(acc, x_ptr, rp_ptr, oc_ptr, ov_ptr, ms, mmask, rows, rmask, K):
    """acc[m, n] += Σ_e S[n, col_e] · x[m, col_e] over row n's CSR entries (GANQ★'s sparse part)."""
    start = tl.load(rp_ptr + rows, mask=rmask, other=0)
    count = tl.load(rp_ptr + rows + 1, mask=rmask, other=0) - start
    for e in range(tl.max(count, 0)):
        em = e < count
        col = tl.load(oc_ptr + start + e, mask=em, other=0)
        val = tl.load(ov_ptr + start + e, mask=em, other=0).to(tl.float32)
        xv = tl.load(x_ptr + ms[:, None] * K + col[None, :], mask=mmask[:, None] & em[None, :], other=0)
        acc += val[None, :] * xv.to(tl.float32)
    return acc


@_jit
def _epilogue(acc, x_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr, ms, rows, M, N, K,
              HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT):
    """Outliers and bias (added by the first K split only), then store, or add when K is split."""
    mmask = ms < M
    rmask = rows < N
    if tl.program_id(1) == 0:
        if HAS_OUTLIERS:
            acc = _outliers(acc, x_ptr, rp_ptr, oc_ptr, ov_ptr, ms, mmask, rows, rmask, K)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=rmask, other=0).to(tl.float32)[None, :]
    yp = y_ptr + ms[:, None] * N + rows[None, :]
    ym = mmask[:, None] & rmask[None, :]
    if SPLIT == 1:
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ym)
    else:
        tl.atomic_add(yp, acc.to(y_ptr.dtype.element_ty), mask=ym, sem="relaxed")


@_jit
def _gemv(x_ptr, qw_ptr, s_ptr, z_ptr, cb_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr,
          M, N, K, NB, G, GS, SPLIT,
          BITS: tl.constexpr, CODEBOOK: tl.constexpr, HAS_ZERO: tl.constexpr,
          HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
          MB: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr):
    P: tl.constexpr = 2 if BITS == 3 else BITS  # width of the codes (or low planes) in a word
    CPW: tl.constexpr = 32 // P  # codes per word
    MASK: tl.constexpr = (1 << P) - 1
    L: tl.constexpr = 1 << BITS
    # tiles are 3-D [batch, rows, blocks] from the start, so no layout conversion is needed
    rows = tl.program_id(0) * BN + tl.arange(0, BN)[None, :, None]
    rmask = rows < N
    ms = tl.arange(0, MB)[:, None, None]
    mmask = ms < M
    acc = tl.zeros([MB, BN, NBLK], tl.float32)
    chunk = tl.cdiv(tl.cdiv(NB, SPLIT), NBLK) * NBLK  # blocks per K split
    start = tl.program_id(1) * chunk
    end = tl.minimum(start + chunk, NB)
    for b0 in range(start, end, NBLK):
        blk = b0 + tl.arange(0, NBLK)[None, None, :]
        bmask = rmask & (blk < end)
        wp = qw_ptr + blk * BITS * N + rows  # [1, BN, NBLK]: each block's first word, rows contiguous
        gp = (blk * 32 // GS) * N + rows
        if CODEBOOK:
            part = acc
        else:
            part = tl.zeros([MB, BN, NBLK], tl.float32)
            if HAS_ZERO:
                zf = tl.load(z_ptr + gp, mask=bmask, other=0).to(tl.float32)
            else:
                zf = tl.zeros([1, BN, NBLK], tl.float32) + (1 << (BITS - 1))
            zf += 8388608.0  # 2^23
        if BITS == 3:
            hi = tl.load(wp + 2 * N, mask=bmask, other=0)
        for wi in tl.static_range(32 // CPW):
            word = tl.load(wp + wi * N, mask=bmask, other=0)
            for i in tl.static_range(CPW):
                j = wi * CPW + i
                q = (word >> (i * P)) & MASK
                if BITS == 3:
                    q |= ((hi >> j) & 1) << 2
                k = blk * 32 + j
                xj = tl.load(x_ptr + ms * K + k, mask=mmask & (k < K), other=0).to(tl.float32)
                if CODEBOOK:
                    v = tl.load(cb_ptr + (rows * G + blk * 32 // GS) * L + q, mask=bmask, other=0)
                    v = v.to(tl.float32)
                else:
                    v = (q | 0x4B000000).to(tl.float32, bitcast=True) - zf
                part += v * xj
        if CODEBOOK:
            acc = part
        else:
            acc += part * tl.load(s_ptr + gp, mask=bmask, other=0).to(tl.float32)
    _epilogue(tl.sum(acc, axis=2), x_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr, tl.arange(0, MB),
              tl.program_id(0) * BN + tl.arange(0, BN), M, N, K, HAS_OUTLIERS, HAS_BIAS, SPLIT)


@_jit
def _gemm(x_ptr, qw_ptr, s_ptr, z_ptr, cb_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr,
          M, N, K, NB, G, GS, SPLIT,
          BITS: tl.constexpr, CODEBOOK: tl.constexpr, HAS_ZERO: tl.constexpr,
          HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """BK divides the group size (or there is one group per row): a K tile has one scale per row."""
    P: tl.constexpr = 2 if BITS == 3 else BITS
    CPW: tl.constexpr = 32 // P
    L: tl.constexpr = 1 << BITS
    pid_m = tl.program_id(0) % tl.cdiv(M, BM)
    pid_n = tl.program_id(0) // tl.cdiv(M, BM)
    ms = pid_m * BM + tl.arange(0, BM)
    rows = pid_n * BN + tl.arange(0, BN)
    rmask = rows < N
    kp = NB * 32  # K rounded up to whole blocks
    chunk = tl.cdiv(tl.cdiv(kp, SPLIT), BK) * BK
    start = tl.program_id(1) * chunk
    end = tl.minimum(start + chunk, kp)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(start, end, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + ms[:, None] * K + ks[None, :], mask=(ms < M)[:, None] & (ks < K)[None, :], other=0)
        kk = ks[:, None]
        wmask = (kk < end) & rmask[None, :]
        wp = qw_ptr + (kk // 32 * BITS) * N + rows[None, :]  # [BK, BN]
        q = (tl.load(wp + (kk % 32 // CPW) * N, mask=wmask, other=0) >> (kk % CPW * P)) & ((1 << P) - 1)
        if BITS == 3:
            q |= ((tl.load(wp + 2 * N, mask=wmask, other=0) >> (kk % 32)) & 1) << 2
        if CODEBOOK:
            w = tl.load(cb_ptr + (rows[None, :] * G + kk // GS) * L + q, mask=wmask, other=0)
            if IEEE:
                acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        else:
            gp = k0 // GS * N + rows
            if HAS_ZERO:
                z = tl.load(z_ptr + gp, mask=rmask, other=0).to(tl.float32)[None, :]
            else:
                z = 1 << (BITS - 1)
            qz = (q.to(tl.float32) - z).to(x.dtype)  # integers in [-255, 255]: exact in fp16 and bf16
            if IEEE:
                part = tl.dot(x, qz, input_precision="ieee")
            else:
                part = tl.dot(x, qz)
            acc += part * tl.load(s_ptr + gp, mask=rmask, other=0).to(tl.float32)[None, :]
    _epilogue(acc, x_ptr, rp_ptr, oc_ptr, ov_ptr, b_ptr, y_ptr, ms, rows, M, N, K, HAS_OUTLIERS, HAS_BIAS,
              SPLIT)


def gpu_words(qweight: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The kernels' word layout, [words, N]: transposed; for 3 bits each block's three words first
    become [low 2 bits of codes 0-15, of codes 16-31, high bits of codes 0-31] (same size)."""
    if bits == 3:
        codes = unpack(qweight.cpu(), 3, cols)
        n, nb = codes.shape[0], qweight.shape[1] // 3
        lo, hi = pack(codes & 3, 2).view(n, nb, 2), pack(codes >> 2, 1).view(n, nb, 1)
        qweight = torch.cat([lo, hi], dim=2).view(n, -1).to(qweight.device)
    return qweight.t().contiguous()


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split(tiles: int, k_steps: int, per_sm: int, sms: int) -> int:
    """Split K until the grid holds about `per_sm` programs per SM, keeping ≥ 4 K steps per program
    and at most 16 splits (the range measured)."""
    return max(1, min(-(-per_sm * sms // tiles), k_steps // 4, 16))


def gemv_config(m: int, n: int, nb: int, codebook: bool, sms: int) -> dict:
    """Rows per program, 32-code blocks per K step and warps for the decode kernel: the fastest of the
    layouts timed at batch 1 on an H100 (benchmarks/gpu_kernels.py --candidates). UniformQ: several
    rows per thread (one activation load serves them all); CodebookQ: one row per thread, which keeps
    the table look-ups in the words' register layout (no shared-memory round trip per code). Decode
    is latency-bound at these sizes: K is split so that every SM holds several programs."""
    if codebook:
        bn, nblk, warps = 32, 1, 1
    else:
        bn, nblk, warps = (128, 2, 1) if m <= 2 else (128, 1, 2)
    return {"BN": bn, "NBLK": nblk, "SPLIT": _split(-(-n // bn), -(-nb // nblk), 64, sms), "num_warps": warps}


def gemm_config(m: int, n: int, nb: int, group: int, grouped: bool, sms: int) -> dict:
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn, bk = 64, min(64, group) if grouped else 64
    tiles = -(-m // bm) * -(-n // bn)
    return {"BM": bm, "BN": bn, "BK": bk, "SPLIT": _split(tiles, -(-nb * 32 // bk), 2, sms),
            "num_warps": 8 if bm == 64 else 4, "num_stages": 3}


class TritonLinear:
    """A UniformQ or CodebookQ in the kernels' layout on one CUDA device, callable as (x, bias) -> y."""

    def __init__(self, qt: UniformQ | CodebookQ, device: torch.device | str | None = None):
        dev = torch.device(device) if device is not None else \
            qt.qweight.device if qt.qweight.is_cuda else torch.device("cuda")
        self.n, self.k = qt.shape
        self.bits = qt.bits
        self.group = qt.group_size if qt.group_size != -1 else self.k
        self.codebook = isinstance(qt, CodebookQ)
        self.qweight = gpu_words(qt.qweight, qt.bits, self.k).to(dev)
        self.blocks = self.qweight.shape[0] // self.bits
        self.sms = _sms(dev)
        none = self.qweight  # stands in for absent tensors (never read: their constexpr flag is off)
        self.zeros = self.outliers = None
        if self.codebook:
            self.scales = none
            self.table = qt.codebook.to(dev, torch.float16).contiguous()
            self.groups = self.table.shape[1]
            if qt.has_outliers:
                self.outliers = (qt.outlier_rowptr.to(dev, torch.int32), qt.outlier_cols.to(dev, torch.int32),
                                 qt.outlier_values.to(dev, torch.float16))
        else:
            self.table = none
            self.scales = qt.scales.to(dev, torch.float16).t().contiguous()
            self.groups = self.scales.shape[0]
            if qt.zeros is not None:
                self.zeros = qt.zeros.to(dev, torch.uint8).t().contiguous()
        self.none = none

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, **config) -> torch.Tensor:
        if x.dtype not in _DTYPES:
            x = x.float()
        x2 = x.reshape(-1, self.k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        m = x2.shape[0]
        gemv = m <= GEMV_MAX_BATCH
        if gemv:
            config = {**gemv_config(m, self.n, self.blocks, self.codebook, self.sms), **config}
        else:
            config = {**gemm_config(m, self.n, self.blocks, self.group, self.groups > 1, self.sms), **config}
        split = config.pop("SPLIT")
        y = (torch.zeros if split > 1 else torch.empty)(m, self.n, dtype=x.dtype, device=x.device)
        if m:
            triton = _triton()
            rp, oc, ov = self.outliers or (self.none,) * 3
            args = (x2, self.qweight, self.scales, self.none if self.zeros is None else self.zeros, self.table,
                    rp, oc, ov, self.none if bias is None else bias, y, m, self.n, self.k, self.blocks,
                    self.groups, self.group, split)
            flags = {"BITS": self.bits, "CODEBOOK": self.codebook, "HAS_ZERO": self.zeros is not None,
                     "HAS_OUTLIERS": self.outliers is not None, "HAS_BIAS": bias is not None}
            if gemv:
                grid = (triton.cdiv(self.n, config["BN"]), split)
                _gemv[grid](*args, **flags, MB=triton.next_power_of_2(m), **config)
            else:
                grid = (triton.cdiv(m, config["BM"]) * triton.cdiv(self.n, config["BN"]), split)
                _gemm[grid](*args, **flags, IEEE=x.dtype == torch.float32, **config)
        return y.view(*x.shape[:-1], self.n)


def prepare(qt: UniformQ | CodebookQ, isa: str = "triton") -> TritonLinear:
    """The layer on the current CUDA device (the kernel table's prepare step; one layout for every GPU)."""
    return TritonLinear(qt)


def linear(x: torch.Tensor, qt: UniformQ | CodebookQ, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One-off call (re-lays out the weights every time): for callers that keep no prepared layer."""
    return TritonLinear(qt, x.device)(x, bias)
