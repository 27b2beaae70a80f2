"""Python writes the C: one source per ISA holding GEMV and GEMM for every bit width of UniformQ.

The generator knows three things and emits straight-line C from them:
  - the ISA's vector operations (`OPS`: one table of C templates per ISA, like ggml's type table);
  - the SIMD layout of a 32-code block for a vector of L lanes (see `layout.py`), which makes
    unpacking a broadcast, one variable shift, then a shift and a mask per L codes;
  - the register tiles the performance model chose (MR × NR micro-kernels, GEMV rows per pass).
Group size, sym/asym and shapes stay run-time arguments: the inner loops are per 32-code block, so a
ragged last group (576 columns at g128) or a whole-row group costs nothing extra.

Maths (per output row, per group g with scale s and zero z, codes q, activations x):
    y = Σ_g s_g · (Σ_{k∈g} q_k x_k  −  z_g · Σ_{k∈g} x_k)
so GEMV accumulates raw codes × x per group, scales once per group, and subtracts the zero point
through per-group sums of x (computed once per call). GEMM dequantizes (q − z)·s, exactly as the
reference does, into an fp32 tile and runs a register-blocked dot-product micro-kernel over it.
The int8 GEMV (2–4 bits, x86) does the same sums as u8 × s8 integer dot products per 32-block.
"""

from __future__ import annotations

import functools

from .layout import plane_bits, pre_shifts
from .perf_model import GEMV_ROWS, MICRO_TILE, VECTOR_LANES
from .pool import POOL_C

BITS = (2, 3, 4, 8)

_COMMON = {
    "include": "#include <immintrin.h>",
    "h2f": "_cvtsh_ss({a})",
    "band": "_{p}_and_si{w}({a}, {b})",
    "bor": "_{p}_or_si{w}({a}, {b})",
    "srli": "_{p}_srli_epi32({a}, {b})",
    "slli": "_{p}_slli_epi32({a}, {b})",
    "srlv": "_{p}_srlv_epi32({a}, {b})",
    "seti": "_{p}_set1_epi32({a})",
    "setf": "_{p}_set1_ps({a})",
    "zero": "_{p}_setzero_ps()",
    "load": "_{p}_loadu_ps({a})",
    "store": "_{p}_storeu_ps({a}, {b})",
    "cvt": "_{p}_cvtepi32_ps({a})",
    "fma": "_{p}_fmadd_ps({a}, {b}, {c})",
    "add": "_{p}_add_ps({a}, {b})",
    "setr": "_{p}_setr_epi32({a})",
    "bcast1": "_{p}_set1_epi32((int)lb_ld32({a}))",
}
OPS = {
    "avx2": {**_COMMON, "p": "mm256", "w": "256", "vf": "__m256", "vi": "__m256i",
             "hsum": "lb_hsum256({a})",
             "bcast2": "_mm256_set1_epi64x((long long)lb_ld64({a}))",
             "bcast4": "_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)({a})))",
             "bcast8": "_mm256_loadu_si256((const __m256i *)({a}))",
             "helpers": """
static inline float lb_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}"""},
    "avx512": {**_COMMON, "p": "mm512", "w": "512", "vf": "__m512", "vi": "__m512i",
               "hsum": "_mm512_reduce_add_ps({a})",
               "bcast2": "_mm512_set1_epi64((long long)lb_ld64({a}))",
               "bcast4": "_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)({a})))",
               "bcast8": "_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)({a})))",
               "helpers": ""},
    # Portable C: GCC/Clang vector extensions, which lower to scalar code (or whatever SIMD the
    # target's baseline has), so this runs on any CPU these compilers target.
    "scalar": {"include": "", "vf": "lb_vf", "vi": "lb_vi", "h2f": "lb_h2f({a})",
               "band": "(({a}) & ({b}))", "bor": "(({a}) | ({b}))", "srli": "(({a}) >> {b})",
               "slli": "(({a}) << {b})", "srlv": "(({a}) >> ({b}))", "seti": "((lb_vi){{0}} + (uint32_t)({a}))",
               "setf": "((lb_vf){{0}} + (float)({a}))", "zero": "((lb_vf){{0}})",
               "load": "lb_load({a})", "store": "lb_store({a}, {b})",
               "cvt": "__builtin_convertvector({a}, lb_vf)", "fma": "(({a}) * ({b}) + ({c}))", "add": "(({a}) + ({b}))",
               "setr": "((lb_vi){{{a}}})", "hsum": "lb_hsum({a})",
               "bcast1": "lb_bcast({a}, 1)", "bcast2": "lb_bcast({a}, 2)", "bcast4": "lb_bcast({a}, 4)",
               "bcast8": "lb_bcast({a}, 8)",
               "helpers": """
typedef float lb_vf __attribute__((vector_size(4 * LB_LANES)));
typedef uint32_t lb_vi __attribute__((vector_size(4 * LB_LANES)));
static inline lb_vf lb_load(const float *p) { lb_vf v; memcpy(&v, p, sizeof v); return v; }
static inline void lb_store(float *p, lb_vf v) { memcpy(p, &v, sizeof v); }
static inline lb_vi lb_bcast(const uint32_t *p, int words) {
    lb_vi v; for (int l = 0; l < LB_LANES; l++) v[l] = p[l % words]; return v;
}
static inline float lb_hsum(lb_vf v) { float s = 0; for (int l = 0; l < LB_LANES; l++) s += v[l]; return s; }
static inline float lb_h2f(uint16_t h) {  /* IEEE half -> float, subnormals included */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 31) bits = sign | 0x7f800000u | (m << 13);
    else if (e) bits = sign | ((e + 112) << 23) | (m << 13);
    else { float f = (float)m * (1.0f / 16777216.0f); memcpy(&bits, &f, 4); bits |= sign; }
    float out; memcpy(&out, &bits, 4); return out;
}"""},
}
OPS["avx2"].update(loadi="_mm256_loadu_si256((const __m256i *)({a}))",
                   dot8="_mm256_madd_epi16(_mm256_maddubs_epi16({a}, {b}), _mm256_set1_epi16(1))")
OPS["avx512"].update(loadi="_mm512_loadu_si512((const void *)({a}))",
                     dot8="_mm512_madd_epi16(_mm512_maddubs_epi16({a}, {b}), _mm512_set1_epi16(1))")
OPS["avx512vnni"] = {**OPS["avx512"], "dot8": "_mm512_dpbusd_epi32(_mm512_setzero_si512(), {a}, {b})"}
INT8_BITS = (2, 3, 4)  # u8 × s8 pairs stay below int16 saturation (maddubs) only up to 4-bit codes
FLAGS = {"avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"],
         "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"],
         "avx2": ["-mavx2", "-mfma", "-mf16c"], "scalar": ["-Wno-psabi"]}


class _Emit:
    """Expands `OPS` templates for one ISA: e.fma(a, b, c) -> the C expression."""

    def __init__(self, isa: str):
        self.ops, self.lanes = OPS[isa], VECTOR_LANES[isa]

    def __getattr__(self, op: str):
        tpl = self.ops[op]
        return lambda *args, **kw: tpl.format(p=self.ops.get("p"), w=self.ops.get("w"),
                                              **dict(zip("abc", args)), **kw)


def _unpack_block(e: _Emit, bits: int, src: str, name: str) -> tuple[list[str], list[str]]:
    """C statements that prepare the block at `src`, and one int-vector expression per field."""
    lanes, stmts, fields = e.lanes, [], []
    for plane, (pb, word) in enumerate(plane_bits(bits)):
        v = f"{name}p{plane}"
        load = getattr(e, f"bcast{pb}")(f"{src} + {word}")
        shifts = pre_shifts(pb, lanes)
        if any(shifts):
            load = e.srlv(load, e.setr(", ".join(map(str, shifts))))
        stmts.append(f"{e.ops['vi']} {v} = {load};")
    for f in range(32 // lanes):
        parts = []
        for plane, (pb, _) in enumerate(plane_bits(bits)):
            v, shift = f"{name}p{plane}", lanes * f
            if plane == 0:
                shifted = e.srli(v, shift) if shift else v
                parts.append(shifted if shift + pb == 32 and pb == lanes else e.band(shifted, e.seti((1 << pb) - 1)))
            else:  # 3-bit: the high bit, moved to bit 2
                shifted = e.srli(v, shift - 2) if shift >= 2 else e.slli(v, 2 - shift)
                parts.append(e.band(shifted, e.seti(4)))
        fields.append(parts[0] if len(parts) == 1 else e.bor(*parts))
    return stmts, fields


def _in_place_shifts(bits: int, lanes: int) -> list[list[int]]:
    """[field][lane] bit offset at which _fields_in_place leaves each code (2, 4, 8 bits)."""
    top = 32 // lanes - 1
    return [[(0 if f == top else lanes * f) + s for s in pre_shifts(bits, lanes)] for f in range(top + 1)]


def _fields_in_place(e: _Emit, bits: int, src: str, name: str) -> tuple[list[str], list[str]]:
    """Like _unpack_block, but each code is only masked where it lies: cvt gives q·2^offset exactly,
    and the GEMV scales x by 2^-offset once per call (XSCALE), which saves the shifts (one AND per
    field instead of variable shift + shift + AND). The top field is shifted down so bit 31 stays
    clear (cvt is signed)."""
    lanes, top = e.lanes, 32 // e.lanes - 1
    stmts = [f"{e.ops['vi']} {name} = {getattr(e, f'bcast{bits}')(src)};"]
    fields = []
    for f, offsets in enumerate(_in_place_shifts(bits, lanes)):
        v = e.srli(name, lanes * f) if f == top else name
        masks = ", ".join(f"(int){((1 << bits) - 1) << o:#x}u" for o in offsets)
        fields.append(v if f == top and bits == lanes else e.band(v, e.setr(masks)))
    return stmts, fields


def _xscale(bits: int, lanes: int) -> str:
    offsets = _in_place_shifts(bits, lanes)
    values = ", ".join(f"0x1p-{offsets[c // lanes][c % lanes]}f" for c in range(32))
    return f"static const float XSCALE_B{bits}[32] = {{{values}}};\n"


def _unpack_bytes(e: _Emit, bits: int, src: str, name: str) -> tuple[list[str], str]:
    """All 32 codes of a block as u8 in one vector: byte 4·l + f·L/8 of it holds code f·L + l."""
    stmts, _ = _unpack_block(e, bits, src, name)
    lanes, parts = e.lanes, []
    for plane, (pb, _) in enumerate(plane_bits(bits)):
        fields = range(32 // lanes)
        if plane == 0:
            mask = sum(((1 << pb) - 1) << (lanes * f) for f in fields)
            parts.append(e.band(f"{name}p0", e.seti(f"(int){mask:#x}u")))
        else:  # 3-bit: the high bit of each code moves to bit 2 of its byte
            mask = sum(4 << (lanes * f) for f in fields)
            parts.append(e.band(e.slli(f"{name}p1", 2), e.seti(f"(int){mask:#x}u")))
    return stmts, parts[0] if len(parts) == 1 else e.bor(*parts)


def _gemv_int8(e: _Emit, bits: int, rows: int) -> str:
    """GEMV on int8 activations (one scale per 32-block): u8 codes · s8 x summed in int32 per block."""
    vf, vi = e.ops["vf"], e.ops["vi"]
    blocks = [_unpack_bytes(e, bits, f"q{r} + (size_t)blk * {bits}", f"u{r}") for r in range(rows)]
    body = [s for stmts, _ in blocks for s in stmts]
    body.append(f"{vi} xq = {e.loadi(f'a->xq + (size_t)blk * {4 * e.lanes}')}; {vf} dx = {e.setf('a->xd[blk]')};")
    body += [f"g{r}0 = {e.fma(e.cvt(e.dot8(codes, 'xq')), 'dx', f'g{r}0')};" for r, (_, codes) in enumerate(blocks)]
    return _gemv_frame(e, bits, rows, "gemvq", body, 1)


def _gemv(e: _Emit, bits: int, rows: int) -> str:
    """GEMV on fp32 activations: codes × x per group (two accumulators per row to hide FMA latency)."""
    vf, lanes = e.ops["vf"], e.lanes
    unpack = _unpack_block if bits == 3 else _fields_in_place
    blocks = [unpack(e, bits, f"q{r} + (size_t)blk * {bits}", f"u{r}") for r in range(rows)]
    body = [s for stmts, _ in blocks for s in stmts]
    for f in range(32 // lanes):  # one activation vector live at a time, shared by all rows
        body.append(f"{{ {vf} xf = {e.load(f'a->xs + (size_t)blk * 32 + {f * lanes}')}; "
                    + " ".join(f"g{r}{f % 2} = {e.fma(e.cvt(fields[f]), 'xf', f'g{r}{f % 2}')};"
                               for r, (_, fields) in enumerate(blocks)) + " }")
    return _gemv_frame(e, bits, rows, "gemv", body, 2)


def _gemv_frame(e: _Emit, bits: int, rows: int, name: str, body: list[str], accs: int) -> str:
    """The loop over groups and blocks around `body`, which adds row r's block into g{r}0..g{r}{accs-1};
    per group: one scale FMA and the zero-point fold through the group's sum of activations."""
    vf, rr = e.ops["vf"], range(rows)
    gsum = lambda r: functools.reduce(e.add, [f"g{r}{j}" for j in range(accs)])  # noqa: E731
    return f"""
static void {name}_b{bits}_r{rows}(const lb_args *a, int row) {{
    size_t stride = (size_t)a->nblocks * {bits};
    {' '.join(f'const uint32_t *q{r} = a->qw + (size_t)(row + {r}) * stride;' for r in rr)}
    {' '.join(f'{vf} acc{r} = {e.zero()}; float corr{r} = 0;' for r in rr)}
    for (int g = 0; g < a->groups; g++) {{
        int b0 = g * a->bpg, b1 = b0 + a->bpg < a->nblocks ? b0 + a->bpg : a->nblocks;
        {' '.join(f'{vf} g{r}{j} = {e.zero()};' for r in rr for j in range(accs))}
        for (int blk = b0; blk < b1; blk++) {{
            {(chr(10) + ' ' * 12).join(body)}
        }}
        {' '.join(f'{{ size_t i = (size_t)(row + {r}) * a->groups + g; float s = {e.h2f("a->sc[i]")};'
                  f' float z = a->zp ? (float)a->zp[i] : (float)a->zdef;'
                  f' acc{r} = {e.fma(gsum(r), e.setf("s"), f"acc{r}")}; corr{r} += s * z * a->xsum[g]; }}'
                  for r in rr)}
    }}
    {' '.join(f'a->y[row + {r}] = {e.hsum(f"acc{r}")} - corr{r} + (a->bias ? a->bias[row + {r}] : 0.0f);'
              for r in rr)}
}}
"""


def _dequant(e: _Emit, bits: int) -> str:
    """Blocks [kb, kb + nkb) of one row to fp32 (q - z)·s, exactly the reference's values."""
    stmts, fields = _unpack_block(e, bits, f"q + (size_t)blk * {bits}", "u")
    lanes = e.lanes
    stores = [e.store(f"out + (size_t)(blk - kb) * 32 + {f * lanes}", e.fma(e.cvt(c), "vs", "vz"))
              for f, c in enumerate(fields)]
    nl = "\n        "
    return f"""
static void dequant_b{bits}(const lb_args *a, int row, int kb, int nkb, float *out) {{
    const uint32_t *q = a->qw + (size_t)row * a->nblocks * {bits};
    for (int blk = kb; blk < kb + nkb; blk++) {{
        size_t i = (size_t)row * a->groups + blk / a->bpg;
        float s = {e.h2f("a->sc[i]")}, z = a->zp ? (float)a->zp[i] : (float)a->zdef;
        {e.ops['vf']} vs = {e.setf("s")}, vz = {e.setf("-z * s")};
        {nl.join(stmts)}
        {(';' + nl).join(stores)};
    }}
}}
"""


def _micro(e: _Emit, mr: int, nr: int) -> str:
    """y[m, n] += x[m, :kc] · w[n, :kc] for an mr × nr tile: mr·nr accumulators, each x/w loaded once."""
    vf = e.ops["vf"]
    acc = " ".join(f"{vf} c{m}_{n} = {e.zero()};" for m in range(mr) for n in range(nr))
    loads = " ".join(f"{vf} w{n} = {e.load(f'w + (size_t){n} * ldw + k')};" for n in range(nr))
    fmas = " ".join(f"{{ {vf} xm = {e.load(f'x + (size_t){m} * ldx + k')}; "
                    + " ".join(f"c{m}_{n} = {e.fma('xm', f'w{n}', f'c{m}_{n}')};" for n in range(nr)) + " }"
                    for m in range(mr))
    out = " ".join(f"y[(size_t){m} * ldy + {n}] += {e.hsum(f'c{m}_{n}')};" for m in range(mr) for n in range(nr))
    return f"""
static void micro_{mr}x{nr}(const float *x, int ldx, const float *w, int ldw, int kc, float *y, int ldy) {{
    {acc}
    for (int k = 0; k < kc; k += {e.lanes}) {{ {loads} {fmas} }}
    {out}
}}
"""


def _gemv_task(name: str, bits: int) -> str:
    return f"""
static void {name}_task_b{bits}(void *p, int tid, int nthr) {{
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, {GEMV_ROWS}, &lo, &hi);
    int row = lo;
    for (; row + {GEMV_ROWS} <= hi; row += {GEMV_ROWS}) {name}_b{bits}_r{GEMV_ROWS}(a, row);
    for (; row < hi; row++) {name}_b{bits}_r1(a, row);
    (void)nthr;
}}
"""


def _per_bits_int8(bits: int) -> str:
    return _gemv_task("gemvq", bits) + f"""
LB_EXPORT void lb_linear_q_b{bits}(lb_args *a) {{ lb_linear_q(a, gemvq_task_b{bits}); }}
"""


def _per_bits(bits: int) -> str:
    """The thread tasks and the exported entry point for one bit width."""
    return f"""
{_gemv_task("gemv", bits)}

static void gemm_task_b{bits}(void *p, int tid, int nthr) {{
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, MICRO_NR, &lo, &hi);
    if (lo >= hi) return;
    float *buf = lb_alloc((size_t)a->nb * a->kc);
    for (int nt = lo; nt < hi; nt += a->nb) {{
        int rows = hi - nt < a->nb ? hi - nt : a->nb;
        for (int kb = 0; kb < a->nblocks; kb += a->kc / 32) {{
            int nkb = a->nblocks - kb < a->kc / 32 ? a->nblocks - kb : a->kc / 32;
            for (int r = 0; r < rows; r++) dequant_b{bits}(a, nt + r, kb, nkb, buf + (size_t)r * a->kc);
            lb_gemm_tile(a, buf, nt, rows, kb, nkb);
        }}
    }}
    free(buf);
    (void)nthr;
}}

LB_EXPORT void lb_linear_b{bits}(lb_args *a) {{
    lb_linear(a, gemv_task_b{bits}, gemm_task_b{bits}, {f"XSCALE_B{bits}" if bits != 3 else "NULL"});
}}
"""


_LOADS = """
static inline uint32_t lb_ld32(const uint32_t *p) { return *p; }
static inline uint64_t lb_ld64(const uint32_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
"""

_DRIVER = """
typedef struct {
    const uint32_t *qw; const uint16_t *sc; const uint8_t *zp; int zdef;
    int n, nblocks, groups, bpg, m;
    const float *x; const float *bias; float *y;
    int threads, nb, kc;
    float *xsum;
    int8_t *xq; float *xd;  /* int8 path: activations per 32-block (SIMD byte order) and their scales */
    const float *xs;        /* fp32 GEMV: x times 2^-(bit offset of its code), see _fields_in_place */
} lb_args;

/* Thread `tid`'s contiguous band of output rows, in multiples of `align` rows. */
static void lb_band(const lb_args *a, int tid, int align, int *lo, int *hi) {
    int units = (a->n + align - 1) / align, per = (units + a->threads - 1) / a->threads;
    *lo = tid * per * align; *hi = (tid + 1) * per * align;
    if (*lo > a->n) *lo = a->n;
    if (*hi > a->n) *hi = a->n;
    if (tid >= a->threads) *lo = *hi = a->n;
}

static float *lb_alloc(size_t floats) {
    void *p = NULL;
    if (posix_memalign(&p, 64, floats * sizeof(float) + 64)) abort();
    return p;
}

typedef void (*lb_micro)(const float *, int, const float *, int, int, float *, int);
"""

_DRIVER_TAIL = """
/* One dequantized tile (rows × nkb blocks, row stride kc) times every token, MR × NR at a time. */
static void lb_gemm_tile(const lb_args *a, const float *buf, int nt, int rows, int kb, int nkb) {
    int ldx = a->nblocks * 32, kk = nkb * 32;
    for (int m = 0; m < a->m; m += MICRO_MR) {
        int mr = a->m - m < MICRO_MR ? a->m - m : MICRO_MR;
        for (int r = 0; r < rows; r += MICRO_NR) {
            int nr = rows - r < MICRO_NR ? rows - r : MICRO_NR;
            MICRO[mr - 1][nr - 1](a->x + (size_t)m * ldx + (size_t)kb * 32, ldx, buf + (size_t)r * a->kc,
                                  a->kc, kk, a->y + (size_t)m * a->n + nt + r, a->n);
        }
    }
}

static void lb_linear(lb_args *a, lb_task gemv, lb_task gemm, const float *xscale) {
    if (a->threads > lb_pool.n) a->threads = lb_pool.n;
    if (a->m == 1) {  /* per-group sums of x, for the zero-point fold */
        float xs[a->groups], *scaled = NULL;
        if (xscale) {
            scaled = lb_alloc((size_t)a->nblocks * 32);
            for (int k = 0; k < a->nblocks * 32; k++) scaled[k] = a->x[k] * xscale[k % 32];
        }
        a->xs = scaled ? scaled : a->x;
        for (int g = 0; g < a->groups; g++) {
            int k0 = g * a->bpg * 32, k1 = (g + 1) * a->bpg * 32;
            if (k1 > a->nblocks * 32) k1 = a->nblocks * 32;
            float s = 0; for (int k = k0; k < k1; k++) s += a->x[k];
            xs[g] = s;
        }
        a->xsum = xs;
        lb_pool_run(gemv, a, a->threads);
        free(scaled);
        return;
    }
    for (int m = 0; m < a->m; m++)
        for (int n = 0; n < a->n; n++) a->y[(size_t)m * a->n + n] = a->bias ? a->bias[n] : 0.0f;
    lb_pool_run(gemm, a, a->threads);
}

/* int8 GEMV: x -> s8 per 32-block with scale amax/127 (round half to even), each code f·L + l at
   byte 4·l + f·L/8 to meet the SIMD layout; xsum[g] = Σ over the group's blocks of scale · Σ x_q. */
__attribute__((unused)) static void lb_linear_q(lb_args *a, lb_task gemvq) {
    if (a->threads > lb_pool.n) a->threads = lb_pool.n;
    int bb = 4 * LB_LANES;
    int8_t *xq = calloc((size_t)a->nblocks * bb, 1);
    float *xd = malloc(sizeof(float) * a->nblocks), *xs = calloc(a->groups, sizeof(float));
    if (!xq || !xd || !xs) abort();
    for (int blk = 0; blk < a->nblocks; blk++) {
        const float *x = a->x + (size_t)blk * 32;
        float amax = 0;
        for (int c = 0; c < 32; c++) amax = fabsf(x[c]) > amax ? fabsf(x[c]) : amax;
        float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
        int isum = 0;
        for (int c = 0; c < 32; c++) {
            int v = (int)nearbyintf(x[c] * inv);
            xq[(size_t)blk * bb + 4 * (c % LB_LANES) + (c / LB_LANES) * (LB_LANES / 8)] = (int8_t)v;
            isum += v;
        }
        xd[blk] = d;
        xs[blk / a->bpg] += d * (float)isum;
    }
    a->xq = xq; a->xd = xd; a->xsum = xs;
    lb_pool_run(gemvq, a, a->threads);
    free(xq); free(xd); free(xs);
}
"""


def generate(isa: str) -> str:
    """The complete C source for `isa`."""
    e = _Emit(isa)
    mr, nr = MICRO_TILE[isa]
    micro = "".join(_micro(e, m, n) for m in range(1, mr + 1) for n in range(1, nr + 1))
    table = ", ".join("{" + ", ".join(f"micro_{m}x{n}" for n in range(1, nr + 1)) + "}" for m in range(1, mr + 1))
    kernels = "".join(_xscale(b, e.lanes) for b in BITS if b != 3)
    kernels += "".join(_gemv(e, b, GEMV_ROWS) + _gemv(e, b, 1) + _dequant(e, b) for b in BITS)
    int8 = [b for b in INT8_BITS if "dot8" in e.ops]
    kernels += "".join(_gemv_int8(e, b, GEMV_ROWS) + _gemv_int8(e, b, 1) + _per_bits_int8(b) for b in int8)
    return "\n".join([
        f"/* Generated by lowbit.kernels.cpu.codegen for {isa}; do not edit. */",
        "#include <math.h>\n#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>", e.ops["include"],
        "#define LB_EXPORT __attribute__((visibility(\"default\")))",
        f"#define MICRO_MR {mr}\n#define MICRO_NR {nr}\n#define LB_LANES {e.lanes}", _LOADS, e.ops["helpers"],
        POOL_C, _DRIVER, micro, f"static const lb_micro MICRO[{mr}][{nr}] = {{{table}}};",
        _DRIVER_TAIL, kernels, "".join(_per_bits(b) for b in BITS),
        f"LB_EXPORT int lb_lanes(void) {{ return {e.lanes}; }}",
    ])
