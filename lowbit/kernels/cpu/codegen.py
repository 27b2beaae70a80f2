"""Python writes the C: one source per ISA holding GEMV and GEMM for every bit width of UniformQ and
CodebookQ.

Only what varies per format, bits and ISA is generated (QIGen's point); the fixed C lives in real files
in c/ (C_DIR) that the source #includes: driver.h (the drivers every entry point calls: bands of rows
per thread, x's per-group sums and int8/int16 forms, GEMM tiles, outliers), pool.h (the thread pool),
args.h (lb_args) and one header of helpers per ISA (`OPS[isa]["header"]`). `entries(isa)` lists the
entry points the source exports, and is what the kernel table (kernels/table.py) is made of.

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
UniformQ's rows are interleaved in tiles of L (layout.interleave), and its GEMVs keep the L rows of
a tile in the L lanes (`_rows_frame`): one vector load holds a word of every row, the mask and
shift that extract a lane group's codes serve all L rows, and no sum runs across lanes. On int8
activations (x86) the sums are u8 × s8 integer dot products (maddubs or VNNI; 8-bit codes in signed
form, see dot8s): a decode step's tokens (one, or one per sequence of a batch: `_tileq`) meet each
block's codes unpacked to bytes in registers once for all of them, 4 codes a lane (`_byte_codes`);
prefill's many tokens go through a GEMM over tiles unpacked to bytes in memory (`_unpackq`). Every
GEMV prefetches ahead in software: a decode step streams its weights from DRAM, and a tile is one
sequential run.

CodebookQ's indices are packed like UniformQ's codes, so both share the unpacking and the loops; only
the dequantization differs: "s·(q − z)" becomes "T[q]", a lookup in the row's (or group's) table held
in registers, never a branch (`lut{bits}` in `OPS`: a permute of 4, 8 or 16 fp32 entries; AVX2's
4-bit tables are int16 byte planes looked up 32 codes at a time: `table16`, `_gemv_t16`).
Its sparse outliers are one CSR pass per thread band after the dense part (`lb_outliers`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ...formats import CODEBOOK_BITS
from ...formats.kquant import BY_BITS as KQUANT_BITS
from .layout import plane_bits, pre_shifts
from .perf_model import GEMMQ_KBLOCKS, GEMMQ_TILE, GEMV_ROWS, MICRO_TILE, TILE_TOKENS, TOKEN_TILE, VECTOR_LANES

BITS = (2, 3, 4, 8)
C_DIR = Path(__file__).with_name("c")  # the fixed C: driver.h, pool.h, args.h, one header of helpers per ISA

_COMMON = {
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
             "header": "avx2.h"},
    "avx512": {**_COMMON, "p": "mm512", "w": "512", "vf": "__m512", "vi": "__m512i",
               "hsum": "_mm512_reduce_add_ps({a})",
               "bcast2": "_mm512_set1_epi64((long long)lb_ld64({a}))",
               "bcast4": "_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)({a})))",
               "bcast8": "_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)({a})))",
               "header": "avx512.h"},
    # Portable C: GCC/Clang vector extensions, which lower to scalar code (or whatever SIMD the
    # target's baseline has), so this runs on any CPU these compilers target.
    "scalar": {"header": "scalar.h", "vf": "lb_vf", "vi": "lb_vi", "h2f": "lb_h2f({a})",
               "band": "(({a}) & ({b}))", "bor": "(({a}) | ({b}))", "srli": "(({a}) >> {b})",
               "slli": "(({a}) << {b})", "srlv": "(({a}) >> ({b}))", "seti": "((lb_vi){{0}} + (uint32_t)({a}))",
               "setf": "((lb_vf){{0}} + (float)({a}))", "zero": "((lb_vf){{0}})",
               "load": "lb_load({a})", "store": "lb_store({a}, {b})",
               "cvt": "__builtin_convertvector({a}, lb_vf)", "fma": "(({a}) * ({b}) + ({c}))", "add": "(({a}) + ({b}))",
               "setr": "((lb_vi){{{a}}})", "hsum": "lb_hsum({a})",
               "bcast1": "lb_bcast({a}, 1)", "bcast2": "lb_bcast({a}, 2)", "bcast4": "lb_bcast({a}, 4)",
               "bcast8": "lb_bcast({a}, 8)"},
}
# Interleaved tiles (layout.interleave): gather{n} is bcast{n} for n words `b` apart.
_SETR = lambda n: ", ".join(f"(int)({{a}})[{j} * {{b}}]" for j in range(n))  # noqa: E731
_GATHER2 = "((long long)((uint64_t)({a})[0] | (uint64_t)({a})[{b}] << 32))"
OPS["avx2"].update(gather2=f"_mm256_set1_epi64x{_GATHER2}",
                   gather4=f"_mm256_broadcastsi128_si256(_mm_setr_epi32({_SETR(4)}))",
                   gather8=f"_mm256_setr_epi32({_SETR(8)})")
OPS["avx512"].update(gather2=f"_mm512_set1_epi64{_GATHER2}",
                     gather4=f"_mm512_broadcast_i32x4(_mm_setr_epi32({_SETR(4)}))",
                     gather8=f"_mm512_broadcast_i64x4(_mm256_setr_epi32({_SETR(8)}))")
OPS["scalar"].update({f"gather{n}": f"lb_gather({{a}}, {n}, {{b}})" for n in (2, 4, 8)})
# dot8: u8 codes · s8 x summed per 32-bit lane. maddubs adds pairs in int16, which saturates for 8-bit
# codes (255·127·2 > 32767), so dot8s takes signed codes w = q − 128 and multiplies |w| (u8, ≤ 128) by x
# with w's sign (|x| ≤ 127): pairs stay ≤ 32512. VNNI sums in int32 and needs no such trick.
OPS["avx2"].update(loadi="_mm256_loadu_si256((const __m256i *)({a}))",
                   dot8="_mm256_madd_epi16(_mm256_maddubs_epi16({a}, {b}), _mm256_set1_epi16(1))",
                   dot8s="lb_dot8s256({a}, {b})")
OPS["avx512"].update(loadi="_mm512_loadu_si512((const void *)({a}))",
                     dot8="_mm512_madd_epi16(_mm512_maddubs_epi16({a}, {b}), _mm512_set1_epi16(1))",
                     dot8s="lb_dot8s512({a}, {b})")
# Codebook lookups: lutload{b} puts a table of 2^b fp16 entries into registers as t, lut{b} looks
# the codes of an int vector up in it. Only the low bits of each lane are read, so codes need no mask
# (2- and 3-bit tables are repeated to fill the 4-, 8- or 16-entry permute). AVX2 keeps 4-bit tables
# as T16 instead (int16 entries in two byte planes and a scale, `t16load`): its GEMV looks 32 codes up
# with two vpshufb and multiplies them by int16 activations (pmaddwd), as cheap per weight as the
# uniform dequantization; entries and activations keep 15 bits, finer than the fp16 table itself.
_CVT_H = "_mm_loadu_si128((const __m128i *)({a}))"
OPS["avx2"].update(
    lutload2="__m256 {t} = _mm256_cvtph_ps(_mm_set1_epi64x((long long)lb_ld64((const uint32_t *)({a}))));",
    lut2="_mm256_permutevar_ps({t}, {a})",
    lutload3=f"__m256 {{t}} = _mm256_cvtph_ps({_CVT_H});",
    lut3="_mm256_permutevar8x32_ps({t}, {a})",
    lut4="_mm256_blendv_ps(_mm256_permutevar8x32_ps({t}0, {a}), _mm256_permutevar8x32_ps({t}1, {a}), "
         "_mm256_castsi256_ps(_mm256_slli_epi32({a}, 28)))",
    # 4-bit tables in T16 form (see lb_planes16); the GEMM's fp32 table is built from the same values
    lutload4="__m256 {t}0, {t}1; lb_table16((const uint8_t *)({a}), &{t}0, &{t}1);",
    t16load="__m256i {t}l, {t}h; float {t}s; lb_planes16((const uint8_t *)({a}), &{t}l, &{t}h, &{t}s);")
_PERMX = "_mm512_permutexvar_ps({a}, {t})"
OPS["avx512"].update(
    lutload2="__m512 {t} = _mm512_cvtph_ps(_mm256_set1_epi64x((long long)lb_ld64((const uint32_t *)({a}))));",
    lutload3=f"__m512 {{t}} = _mm512_cvtph_ps(_mm256_broadcastsi128_si256({_CVT_H}));",
    lutload4="__m512 {t} = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)({a})));",
    lut2=_PERMX, lut3=_PERMX, lut4=_PERMX)
for _b in CODEBOOK_BITS:
    OPS["scalar"][f"lutload{_b}"] = f"float {{t}}[16]; for (int j = 0; j < 16; j++) {{t}}[j] = lb_h2f(({{a}})[j % {1 << _b}]);"
    OPS["scalar"][f"lut{_b}"] = f"lb_lut({{t}}, {{a}}, {(1 << _b) - 1})"
# A tile's per-group values for its L rows (ldh: L fp16 scales, ldz: L u8 zero points as floats).
OPS["avx2"].update(ldh="_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)({a})))",
                   ldz="_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)({a}))))",
                   mul="_mm256_mul_ps({a}, {b})", sub="_mm256_sub_ps({a}, {b})")
OPS["avx512"].update(ldh="_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)({a})))",
                     ldz="_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)({a}))))",
                     mul="_mm512_mul_ps({a}, {b})", sub="_mm512_sub_ps({a}, {b})")
# The int8 tile kernels and GEMM without VNNI (_tileq, _gemmq_micro): int16 pair products summed over a block,
# then to int32; the zero point's share (madd: (z, 0)·(−Σ x_q, 0) per lane).
OPS["avx2"].update(maddubs="_mm256_maddubs_epi16({a}, {b})", add16="_mm256_add_epi16({a}, {b})",
                   add32="_mm256_add_epi32({a}, {b})", madd1="_mm256_madd_epi16({a}, _mm256_set1_epi16(1))",
                   sub32="_mm256_sub_epi32({a}, {b})", madd="_mm256_madd_epi16({a}, {b})", mullo="_mm256_mullo_epi32({a}, {b})",
                   ldzi="_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)({a})))")
OPS["avx512"].update(maddubs="_mm512_maddubs_epi16({a}, {b})", add16="_mm512_add_epi16({a}, {b})",
                     add32="_mm512_add_epi32({a}, {b})", madd1="_mm512_madd_epi16({a}, _mm512_set1_epi16(1))",
                     sub32="_mm512_sub_epi32({a}, {b})", madd="_mm512_madd_epi16({a}, {b})", mullo="_mm512_mullo_epi32({a}, {b})",
                     ldzi="_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)({a})))")
OPS["avx2"]["storei"] = "_mm256_storeu_si256((__m256i *)({a}), {b})"
OPS["avx512"]["storei"] = "_mm512_storeu_si512((void *)({a}), {b})"
OPS["scalar"].update(ldh="lb_ldh({a})", ldz="lb_ldz({a})", mul="(({a}) * ({b}))", sub="(({a}) - ({b}))",
                     loadi="lb_loadi({a})")
_DPBUSD = "_mm512_dpbusd_epi32(_mm512_setzero_si512(), {a}, {b})"
OPS["avx512vnni"] = {**OPS["avx512"], "dot8": _DPBUSD, "dot8s": _DPBUSD,
                     "dpbusd": "_mm512_dpbusd_epi32({c}, {a}, {b})"}
INT8_BITS = (2, 3, 4, 8)
FLOAT16 = "float16"  # the kernel table's kind for unquantized layers (fp16 weights), see _float16
T16_WORDS = 18  # uint16 words of one T16 table: 16 low bytes, 16 high bytes, an fp32 scale
SIGNED_DOT = 128  # the offset dot8s takes off 8-bit codes (VNNI's dpbusd doesn't: see _int8_dot)
FLAGS = {"avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c"],
         "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c"],
         "avx2": ["-mavx2", "-mfma", "-mf16c"], "scalar": ["-Wno-psabi"]}


class _Emit:
    """Expands `OPS` templates for one ISA: e.fma(a, b, c) -> the C expression."""

    def __init__(self, isa: str, interleaved: bool = False):
        self.isa, self.ops, self.lanes = isa, OPS[isa], VECTOR_LANES[isa]
        self.rows = self.lanes if interleaved else 1  # rows per tile (layout.interleave); 1: row after row

    def words(self, n: int, ptr: str) -> str:
        """The n words of one row's block from `ptr` on, broadcast (bcast{n}); `rows` apart when interleaved."""
        return getattr(self, f"bcast{n}")(ptr) if self.rows == 1 or n == 1 else getattr(self, f"gather{n}")(ptr, self.rows)

    def row_codes(self, row: str, bits: int) -> str:
        """C pointer to word 0 of `row`'s codes (word j of block blk: + (blk·bits + j)·rows)."""
        if self.rows == 1:
            return f"a->qw + (size_t)({row}) * a->nblocks * {bits}"
        return f"a->qw + (size_t)(({row}) / {self.rows}) * {self.rows} * a->nblocks * {bits} + ({row}) % {self.rows}"

    def scale_index(self, row: str, group: str) -> str:
        """Index of `row`'s scale (zero point) of `group` in a->sc (a->zp)."""
        if self.rows == 1:
            return f"(size_t)({row}) * a->groups + ({group})"
        return f"((size_t)(({row}) / {self.rows}) * a->groups + ({group})) * {self.rows} + ({row}) % {self.rows}"

    def __getattr__(self, op: str):
        tpl = self.ops[op]
        return lambda *args, **kw: tpl.format(p=self.ops.get("p"), w=self.ops.get("w"),
                                              **dict(zip("abc", args)), **kw)


def _load_planes(e: _Emit, bits: int, src: str, name: str) -> list[str]:
    """C statements that broadcast each bit plane of the block at `src` to {name}p{plane}, lane l
    shifted right by its pre-shift (see layout.py)."""
    stmts = []
    for plane, (pb, word) in enumerate(plane_bits(bits)):
        load = e.words(pb, f"{src} + {word * e.rows}")
        shifts = pre_shifts(pb, e.lanes)
        if any(shifts):
            load = e.srlv(load, e.setr(", ".join(map(str, shifts))))
        stmts.append(f"{e.ops['vi']} {name}p{plane} = {load};")
    return stmts


def _unpack_block(e: _Emit, bits: int, src: str, name: str, mask: bool = True) -> tuple[list[str], list[str]]:
    """C statements that prepare the block at `src`, and one int-vector expression per field (field f:
    codes f·L .. f·L + L − 1); with mask=False a code keeps the higher fields above it (lookups read
    only the low bits). 3-bit planes are merged once per block (_unpack_bytes), not once per field."""
    lanes, top = e.lanes, 32 // e.lanes - 1
    if bits == 3:
        stmts, merged = _unpack_bytes(e, 3, src, name)
        stmts.append(f"{e.ops['vi']} {name} = {merged};")
        v = name
    else:
        stmts, v = _load_planes(e, bits, src, name), f"{name}p0"
    fields = []
    for f in range(top + 1):
        shifted = e.srli(v, lanes * f) if f else v
        clean = f == top and (bits == 3 or lanes * f + bits == 32)  # nothing left above the code
        fields.append(shifted if clean or not mask else e.band(shifted, e.seti((1 << bits) - 1)))
    return stmts, fields


def _in_place_shifts(bits: int, lanes: int) -> list[list[int]]:
    """[field][lane] bit offset at which _lane_field leaves each code (the fp32 GEMV's XSCALE)."""
    top = 32 // lanes - 1
    if bits == 3:  # _unpack_bytes' merged planes: the variable shift has aligned the lanes already
        return [[lanes * f] * lanes for f in range(top + 1)]
    return [[(0 if f == top else lanes * f) + s for s in pre_shifts(bits, lanes)] for f in range(top + 1)]


def _xscale(bits: int, lanes: int) -> str:
    offsets = _in_place_shifts(bits, lanes)
    values = ", ".join(f"0x1p-{offsets[c // lanes][c % lanes]}f" for c in range(32))
    return f"static const float XSCALE_B{bits}[32] = {{{values}}};\n"


def _unpack_bytes(e: _Emit, bits: int, src: str, name: str) -> tuple[list[str], str]:
    """All 32 codes of a block as u8 in one vector: byte 4·l + f·L/8 of it holds code f·L + l."""
    stmts = _load_planes(e, bits, src, name)
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


def _int8_dot(e: _Emit, bits: int):
    """The dot8 template for `bits`-bit codes and the offset it takes off the codes (see dot8s)."""
    signed = bits == 8 and e.ops["dot8s"] != e.ops["dot8"]
    return (e.dot8s, SIGNED_DOT) if signed else (e.dot8, 0)


def table16(isa: str, bits: int) -> bool:
    """Whether `isa` keeps `bits`-bit codebook tables in T16 form (codebook.py packs them so)."""
    return bits == 4 and "t16load" in OPS[isa]


def _gemv_lut(e: _Emit, bits: int, rows: int) -> str:
    """Codebook GEMV on fp32 activations: the codes' table values × x per group (two accumulators
    per row to hide FMA latency)."""
    vf, lanes = e.ops["vf"], e.lanes
    if "t16load" in e.ops and bits == 4:
        return _gemv_t16(e, rows)
    blocks = [_unpack_block(e, bits, f"q{r} + (size_t)blk * {bits}", f"u{r}", mask=False) for r in range(rows)]
    body = [s for stmts, _ in blocks for s in stmts]
    for f in range(32 // lanes):  # one activation vector live at a time, shared by all rows
        body.append(f"{{ {vf} xf = {e.load(f'a->xs + (size_t)blk * 32 + {f * lanes}')}; "
                    + " ".join(f"g{r}{f % 2} = {e.fma(getattr(e, f'lut{bits}')(fields[f], t=f't{r}'), 'xf', f'g{r}{f % 2}')};"
                               for r, (_, fields) in enumerate(blocks)) + " }")
    return _gemv_frame(e, bits, rows, "gemvlut", body, 2, f"lutload{bits}")


def _gemv_t16(e: _Emit, rows: int) -> str:
    """4-bit T16 codebook GEMV (AVX2): a block's 32 codes as bytes pick their entries' low and high
    bytes (two vpshufb), interleaved into int16 and multiplied by the block's int16 activations
    (pmaddwd; |entry|, |x| <= 2^14 so the int32 sums cannot overflow), in T16_XORDER order."""
    vf, vi = e.ops["vf"], e.ops["vi"]
    blocks = [_unpack_bytes(e, 4, f"q{r} + (size_t)blk * 4", f"u{r}") for r in range(rows)]
    body = [s for stmts, _ in blocks for s in stmts]
    body.append(f"const int16_t *xb = (const int16_t *)a->xq + (size_t)blk * 32; {vi} x0 = {e.loadi('xb')}, "
                f"x1 = {e.loadi('xb + 16')}; {vf} dx = {e.setf('a->xd[blk]')};")
    body += [f"{{ {vi} lo = _mm256_shuffle_epi8(t{r}l, {codes}), hi = _mm256_shuffle_epi8(t{r}h, {codes}); "
             f"{vi} d = _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(lo, hi), x0), "
             f"_mm256_madd_epi16(_mm256_unpackhi_epi8(lo, hi), x1)); "
             f"g{r}0 = {e.fma(e.cvt('d'), 'dx', f'g{r}0')}; }}"
             for r, (_, codes) in enumerate(blocks)]
    return _gemv_frame(e, 4, rows, "gemvlut", body, 1, "t16load")


def _t16_xorder(lanes: int) -> str:
    """The code each int16 activation of a block meets in _gemv_t16: unpacklo/hi_epi8 give bytes
    0-7 and 16-23 (x0), 8-15 and 24-31 (x1) of the _unpack_bytes vector."""
    def code(byte: int) -> int:  # _unpack_bytes: byte 4·l + f·L/8 holds code f·L + l
        return (byte % 4) // (lanes // 8) * lanes + byte // 4
    order = [code(8 * j + e % 8 + 16 * (e // 8)) for j in range(2) for e in range(16)]
    return f"static const uint8_t T16_XORDER[32] = {{{', '.join(map(str, order))}}};\n"


def _prefetch_next_tile(bits: int, rows: int) -> str:
    """Software prefetch of the next tile of `rows` rows while this one is read: the tile is one
    contiguous run of rows·stride words, so block blk touches its share at blk·rows·bits words.
    Short rows (576 codes: 9 cache lines at 8 bits) are too short for the hardware's stream
    prefetchers to ramp up on, and a decode GEMV reads its weights from DRAM, not cache."""
    if rows == 1:
        return ""
    lines = -(-rows * bits * 4 // 64)
    return " ".join(f"LB_PREFETCH(q0 + pf + (size_t)blk * {rows * bits} + {16 * j});" for j in range(lines))


def _gemv_frame(e: _Emit, bits: int, rows: int, name: str, body: list[str], accs: int, table: str) -> str:
    """The loop over groups and blocks around `body`, which adds row r's block into g{r}0..g{r}{accs-1}
    of a codebook GEMV (`table`: the OPS template that loads row r's table of the group as t{r}); per
    group a plain sum (times the table's scale for T16)."""
    vf, rr = e.ops["vf"], range(rows)
    gsum = lambda r: functools.reduce(e.add, [f"g{r}{j}" for j in range(accs)])  # noqa: E731
    stride = T16_WORDS if table == "t16load" else 1 << bits
    start = " ".join(getattr(e, table)(f"a->lut + ((size_t)(row + {r}) * a->groups + g) * {stride}", t=f"t{r}")
                     for r in rr)
    fold = " ".join(f"acc{r} = {e.fma(gsum(r), e.setf(f't{r}s'), f'acc{r}')};" if table == "t16load"
                    else f"acc{r} = {e.add(gsum(r), f'acc{r}')};" for r in rr)
    return f"""
static void {name}_b{bits}_r{rows}(const lb_args *a, int row) {{
    size_t stride = (size_t)a->nblocks * {bits}, tile = {rows} * stride;
    size_t pf = tile * (1 + LB_PF_BYTES / (4 * tile));  /* whole tiles, at least LB_PF_BYTES ahead */
    {' '.join(f'const uint32_t *q{r} = a->qw + (size_t)(row + {r}) * stride;' for r in rr)}
    {' '.join(f'{vf} acc{r} = {e.zero()};' for r in rr)}
    for (int g = 0; g < a->groups; g++) {{
        int b0 = g * a->bpg, b1 = b0 + a->bpg < a->nblocks ? b0 + a->bpg : a->nblocks;
        {' '.join(f'{vf} g{r}{j} = {e.zero()};' for r in rr for j in range(accs))} {start}
        for (int blk = b0; blk < b1; blk++) {{
            {_prefetch_next_tile(bits, rows)}
            {(chr(10) + ' ' * 12).join(body)}
        }}
        {fold}
    }}
    {' '.join(f'a->y[row + {r}] = {e.hsum(f"acc{r}")} + (a->bias ? a->bias[row + {r}] : 0.0f);' for r in rr)}
}}
"""


def _dequant(e: _Emit, bits: int, lut: bool = False) -> str:
    """Blocks [kb, kb + nkb) of one row to fp32 (q - z)·s, or T[q] with lut: the reference's values."""
    stmts, fields = _unpack_block(e, bits, f"q + (size_t)blk * {bits * e.rows}", "u", mask=not lut)
    lanes = e.lanes
    if lut:
        stride = T16_WORDS if "t16load" in e.ops and bits == 4 else 1 << bits
        setup = getattr(e, f"lutload{bits}")(f"a->lut + i * {stride}", t="t")
        values = [getattr(e, f"lut{bits}")(c, t="t") for c in fields]
    else:
        setup = (f"float s = {e.h2f('a->sc[i]')}, z = a->zp ? (float)a->zp[i] : (float)a->zdef; "
                 f"{e.ops['vf']} vs = {e.setf('s')}, vz = {e.setf('-z * s')};")
        values = [e.fma(e.cvt(c), "vs", "vz") for c in fields]
    stores = [e.store(f"out + (size_t)(blk - kb) * 32 + {f * lanes}", v) for f, v in enumerate(values)]
    nl = "\n        "
    return f"""
static void dequant{'lut' * lut}_b{bits}(const lb_args *a, int row, int kb, int nkb, float *out) {{
    const uint32_t *q = {e.row_codes("row", bits)};
    for (int blk = kb; blk < kb + nkb; blk++) {{
        size_t i = {e.scale_index("row", "blk / a->bpg")};
        {setup}
        {nl.join(stmts)}
        {(';' + nl).join(stores)};
    }}
}}
"""


def _lane_codes(e: _Emit, bits: int, lane: int) -> str:
    """Lane group `lane` of a tile block (words in w0, w1, ...), for every row at once: codes f·L + lane
    (every field f) at bit L·f of each lane, as u8 with L = 8 (byte f), u8 and a zero byte with L = 16."""
    lanes, fields = e.lanes, range(32 // e.lanes)

    def plane(word: str, pb: int, shift: int, to: int = 0) -> str:
        v = word if shift == to else e.srli(word, shift - to) if shift > to else e.slli(word, to - shift)
        mask = sum(((1 << pb) - 1) << (lanes * f + to) for f in fields)
        return v if mask == 0xFFFFFFFF else e.band(v, e.seti(f"(int){mask:#x}u"))
    if bits == 3:  # the 2-bit plane (words 0-1) and the high bits (word 2) moved to bit 2
        return e.bor(plane(f"w{lane % 2}", 2, pre_shifts(2, lanes)[lane]), plane("w2", 1, lane, 2))
    return plane(f"w{lane % bits}", bits, pre_shifts(bits, lanes)[lane])


def _lane_field(e: _Emit, bits: int, lane: int, f: int) -> str:
    """Code f·L + lane of every row, as an int whose cvt is the code times 2^offset (_in_place_shifts:
    the GEMV reads x scaled by 2^-offset, XSCALE), so a field costs one AND (the top one a shift too)."""
    lanes, top = e.lanes, 32 // e.lanes - 1
    offset = _in_place_shifts(bits, lanes)[f][lane]
    if bits == 3:
        return e.band(f"m{lane}", e.seti(f"(int){7 << offset:#x}u"))
    word = f"w{lane % bits}"
    if f == top:
        v = e.srli(word, lanes * top)
        return v if bits == lanes else e.band(v, e.seti(f"(int){((1 << bits) - 1) << offset:#x}u"))
    return e.band(word, e.seti(f"(int){((1 << bits) - 1) << offset:#x}u"))


def _tile_block(e: _Emit, bits: int) -> list[str]:
    """C statements that load block blk of the tile at q: its `bits` words of L rows into w0, w1, ...,
    and a prefetch LB_PF_BYTES ahead (the tile and the next ones are one sequential run)."""
    vi, lanes = e.ops["vi"], e.lanes
    lines = -(-bits * lanes * 4 // 64)
    return [f"const uint32_t *qb = q + (size_t)blk * {bits * lanes};",
            " ".join(f"LB_PREFETCH(qb + LB_PF_BYTES / 4 + {16 * j});" for j in range(lines)),
            " ".join(f"{vi} w{j} = {e.loadi(f'qb + {j * lanes}')};" for j in range(bits))]


def _rows_frame(e: _Emit, bits: int, per_block: list[str], accs: int) -> str:
    """A GEMV over one interleaved tile (layout.interleave): rows [row, row + L) in the L lanes, so each
    block's words are `bits` vector loads and nothing is summed across lanes. `per_block` adds block blk
    (words in w0, w1, ...) into the group's `accs` accumulators acc0, acc1, ... Per group: one
    scale FMA and the zero-point fold through the group's sum of x."""
    vf, lanes = e.ops["vf"], e.lanes
    nl = "\n            "
    return f"""
static void gemvr_b{bits}(const lb_args *a, int row) {{
    const uint32_t *q = a->qw + (size_t)row * a->nblocks * {bits};  /* row: a tile's first */
    const uint16_t *sc = a->sc + (size_t)row * a->groups;
    const uint8_t *zp = a->zp ? a->zp + (size_t)row * a->groups : NULL;
    {vf} res = {e.zero()}, cz = {e.zero()}, vz = {e.setf("(float)a->zdef")};
    float out[{lanes}];
    for (int g = 0; g < a->groups; g++) {{
        int b0 = g * a->bpg, b1 = b0 + a->bpg < a->nblocks ? b0 + a->bpg : a->nblocks;
        {vf} {", ".join(f"acc{j} = {e.zero()}" for j in range(accs))};
        for (int blk = b0; blk < b1; blk++) {{
            {nl.join(_tile_block(e, bits) + per_block)}
        }}
        {vf} s = {e.ldh(f"sc + (size_t)g * {lanes}")};
        {vf} z = zp ? {e.ldz(f"zp + (size_t)g * {lanes}")} : vz;
        res = {e.fma("s", functools.reduce(e.add, [f"acc{j}" for j in range(accs)]), "res")};
        cz = {e.fma(e.mul("s", "z"), e.setf("a->xsum[g]"), "cz")};
    }}
    {e.store("out", e.sub("res", "cz"))};
    lb_store_rows(a, row, out);
}}
"""


def _gemv_rows(e: _Emit, bits: int) -> str:
    """GEMV on fp32 activations over a tile: code f·L + l of the L rows meets x[f·L + l] (broadcast,
    scaled by 2^-offset) in accumulator l, so L FMA chains run side by side."""
    lanes, vi = e.lanes, e.ops["vi"]
    body = ["const float *x = a->xs + (size_t)blk * 32;"]
    for lane in range(lanes):
        merged = f"{vi} m{lane} = {_lane_codes(e, 3, lane)}; " if bits == 3 else ""
        body.append("{ " + merged + " ".join(
            f"acc{lane} = {e.fma(e.cvt(_lane_field(e, bits, lane, f)), e.setf(f'x[{f * lanes + lane}]'), f'acc{lane}')};"
            for f in range(32 // lanes)) + " }")
    return _rows_frame(e, bits, body, lanes)


def _byte_codes(e: _Emit, bits: int, i: int) -> str:
    """Codes 8·by + i of the tile block's L rows (words in w0, w1, ...) as u8 in byte by (0..3) of each
    lane. In a plane of pb bits (layout.py) word j holds code pb·p + j at bit pb·p, so byte by of
    (w_j >> pb·k) & (2^pb − 1 per byte) is code 8·by + pb·k + j: one shift and one AND per vector
    (8-bit codes: none), and the 8 vectors i = pb·k + j hold the block's 32 codes. 3-bit: the 2-bit
    plane's vector OR the 1-bit plane's bit c (word 2 holds code c at bit c) moved to bit 2 of its byte."""
    def plane(word: str, pb: int, shift: int, to: int = 0) -> str:
        v = word if shift == to else e.srli(word, shift - to) if shift > to else e.slli(word, to - shift)
        mask = sum(((1 << pb) - 1) << (8 * by + to) for by in range(4))
        return v if mask == 0xFFFFFFFF else e.band(v, e.seti(f"(int){mask:#x}u"))
    if bits == 3:
        return e.bor(plane(f"w{i % 2}", 2, 2 * (i // 2)), plane("w2", 1, i, 2))
    return plane(f"w{i % bits}", bits, bits * (i // bits))


def _tileq(e: _Emit, bits: int, tokens: int) -> str:
    """The int8 kernel over one interleaved tile (L rows in the L lanes) for `tokens` tokens (m0 ..): each
    block's 32 codes of the L rows are taken out of their words once into 8 byte vectors (_byte_codes,
    a shift and an AND each) and meet every token's x, 4 activations to a dpbusd (x in the matching
    order, block-major: see lb_xq_task), so the weights are read and unpacked once for all tokens and
    the dots fill every byte lane. Per token and block d starts at the zero point's share, (z − offset)
    ·(−Σ x_q): symmetric weights read it ready-made (xz), asymmetric ones take one pmaddwd (the int16
    halves of a lane are (z, 0) and (−Σ x_q, 0)); then 8 dots in two chains (VNNI: half the latency
    to wait on, the add is cheap), and d's float value meets x's scale; per group, the weights' scale.
    The integer sums are exact (|Σ| ≤ 32·255·128 + 255·4064 < 2^31)."""
    vf, vi, lanes = e.ops["vf"], e.ops["vi"], e.lanes
    dot, offset = _int8_dot(e, bits)
    T = range(tokens)
    xw = lambda t, i: e.seti(f"xb[{8 * t + i}]")  # noqa: E731

    def token(t: int, start: str) -> str:
        if "dpbusd" in e.ops:
            dots = [f"{vi} d = {start}, d2 = {e.dpbusd('c4', xw(t, 4), e.seti('0'))};"]
            dots += [f"d = {e.dpbusd(f'c{i}', xw(t, i), 'd')};" for i in range(4)]
            dots += [f"d2 = {e.dpbusd(f'c{i}', xw(t, i), 'd2')};" for i in range(5, 8)]
            dots.append(f"d = {e.add32('d', 'd2')};")
        elif bits == 8:
            dots = [f"{vi} d = {start};"] + [f"d = {e.add32('d', dot(f'c{i}', xw(t, i)))};" for i in range(8)]
        else:  # u8 × s8 pairs summed in int16 over the block (|Σ| ≤ 8·2·15·127 < 2^15), then to int32
            dots = [f"{vi} h = {e.maddubs('c0', xw(t, 0))};"]
            dots += [f"h = {e.add16('h', e.maddubs(f'c{i}', xw(t, i)))};" for i in range(1, 8)]
            dots.append(f"{vi} d = {e.add32(start, e.madd1('h'))};")
        return f"{{ {' '.join(dots)} acc{t} = {e.fma(e.cvt('d'), e.setf(f'xd[{t}]'), f'acc{t}')}; }}"

    def groups(start, z: str) -> str:
        nl = "\n                "
        block = _tile_block(e, bits) + [
            "const int32_t *xb = (const int32_t *)a->xq + ((size_t)blk * a->m + m0) * 8, *xz = a->xi + (size_t)blk * a->m + m0;",
            "const float *xd = a->xd + (size_t)blk * a->m + m0;"]
        block += [f"{vi} c{i} = {_byte_codes(e, bits, i)};" for i in range(8)] + [token(t, start(t)) for t in T]
        return f"""for (int g = 0; g < a->groups; g++) {{
            int b1 = (g + 1) * a->bpg < a->nblocks ? (g + 1) * a->bpg : a->nblocks;
            {z}{" ".join(f"{vf} acc{t} = {e.zero()};" for t in T)}
            for (int blk = g * a->bpg; blk < b1; blk++) {{
                {nl.join(block)}
            }}
            {vf} s = {e.ldh(f"sc + (size_t)g * {lanes}")};
            {" ".join(f"res{t} = {e.fma('s', f'acc{t}', f'res{t}')};" for t in T)}
        }}"""
    zp = f"{vi} z = {e.sub32(e.ldzi(f'zp + (size_t)g * {lanes}'), e.seti(str(offset)))}; "
    return f"""
static void tileq{tokens}_b{bits}(const lb_args *a, int row, int m0) {{
    const uint32_t *q = a->qw + (size_t)row * a->nblocks * {bits};  /* row: a tile's first */
    const uint16_t *sc = a->sc + (size_t)row * a->groups;
    const uint8_t *zp = a->zp ? a->zp + (size_t)row * a->groups : NULL;
    {" ".join(f"{vf} res{t} = {e.zero()};" for t in T)}
    float out[{lanes}];
    if (zp) {{
        {groups(lambda t: e.madd("z", e.seti(f"xz[{t}]")), zp)}
    }} else {{
        {groups(lambda t: e.seti(f"xz[{t}]"), "")}
    }}
    {" ".join(f"{e.store('out', f'res{t}')}; lb_store_token(a, m0 + {t}, row, out);" for t in T)}
}}
"""


def _tileq_task(e: _Emit, bits: int) -> str:
    """Thread tid's band of tiles, each against every token, TOKEN_TILE tokens at a time (the tokens split
    evenly: 9 = 5 + 4, not 8 + 1): the tile's codes stay in L1 for the later token groups."""
    most = TOKEN_TILE[e.isa]
    table = ", ".join(f"tileq{t}_b{bits}" for t in range(1, most + 1))
    return "".join(_tileq(e, bits, t) for t in range(1, most + 1)) + f"""
static void (*const TILEQ_B{bits}[{most}])(const lb_args *, int, int) = {{{table}}};

static void tileq_task_b{bits}(void *p, int tid, int nthr) {{
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, LB_LANES, &lo, &hi);
    for (int row = lo; row < hi; row += LB_LANES)
        for (int m = 0; m < a->m;) {{
            int left = a->m - m, parts = (left + {most - 1}) / {most}, t = (left + parts - 1) / parts;
            TILEQ_B{bits}[t - 1](a, row, m);
            m += t;
        }}
    (void)nthr;
}}
"""


def _unpackq(e: _Emit, bits: int) -> str:
    """One interleaved tile's blocks [kb, kb + nkb) as u8 codes for the int8 GEMM: vector 8·b + j holds,
    in lane l, codes 4j .. 4j + 3 of block kb + b of the tile's row l, in natural order, so one s8 word
    of x (4 consecutive activations, broadcast) meets them in one dpbusd. Code c = f·L + l' sits in
    lane group l' (_lane_codes) at byte f·L/8; each of a quad's 4 bytes is masked out of its lane
    group and shifted to its place."""
    vi, lanes = e.ops["vi"], e.lanes
    groups = [f"{vi} c{l} = {_lane_codes(e, bits, l)};" for l in range(lanes)]
    quads = []
    for j in range(8):
        parts = []
        for i in range(4):
            c = 4 * j + i
            src, at = c % lanes, (c // lanes) * (lanes // 8)  # lane group, byte within its lane
            v = e.band(f"c{src}", e.seti(f"(int){0xFF << 8 * at:#x}u"))
            parts.append(v if at == i else e.slli(v, 8 * (i - at)) if i > at else e.srli(v, 8 * (at - i)))
        quads.append(e.storei(f"out + (size_t)(blk - kb) * 8 + {j}", functools.reduce(e.bor, parts)) + ";")
    nl = "\n        "
    return f"""
static void unpackq_b{bits}(const lb_args *a, int row, int kb, int nkb, {vi} *out) {{
    const uint32_t *q = a->qw + (size_t)row * a->nblocks * {bits};  /* row: a tile's first */
    for (int blk = kb; blk < kb + nkb; blk++) {{
        {nl.join(_tile_block(e, bits) + groups + quads)}
    }}
}}
"""


def _gemmq_micro(e: _Emit, bits: int, mr: int, nr: int) -> str:
    """y[m0 .. m0 + mr, tiles row .. row + nr·L] += x_q · codes over the unpacked chunk w (nr tiles,
    `stride` vectors apart, _unpackq): per block, mr·nr int32 dot accumulators start at the zero
    point's share −(z − offset)·Σ x_q and take 8 dpbusd (or dot8 + add) each; then one float FMA per
    accumulator applies the block's scale product s_row · d_x. The integer sums are exact
    (|Σ| ≤ 32·255·128 < 2^31)."""
    vf, vi, lanes = e.ops["vf"], e.ops["vi"], e.lanes
    dot, offset = _int8_dot(e, bits)
    mac = (lambda d, w, x: e.dpbusd(w, x, d)) if "dpbusd" in e.ops else (lambda d, w, x: e.add32(d, dot(w, x)))
    M, N = range(mr), range(nr)
    tile = lambda n: f"((size_t)(row / {lanes} + {n}) * a->groups + g) * {lanes}"  # noqa: E731
    xblk = lambda m: f"(size_t)(m0 + {m}) * a->nblocks + blk"  # noqa: E731
    body = [
        f"const {vi} *wb = w + (size_t)(blk - kb) * 8;",
        "int g = blk / a->bpg;",
        # symmetric: every zero is zdef, so the start is −zdef·Σx; asymmetric: (zp − offset)·(−Σx) per row
        " ".join(f"{vi} nx{m} = {e.seti(f'(zp ? -1 : -zdef) * a->xi[{xblk(m)}]')};" for m in M),
        "if (zp) { " + " ".join(f"{vi} z{n} = {e.sub32(e.ldzi(f'zp + {tile(n)}'), 'voff')}; "
                                + " ".join(f"d{m}_{n} = {e.mullo(f'z{n}', f'nx{m}')};" for m in M) for n in N)
        + " } else { " + " ".join(f"d{m}_{n} = nx{m};" for m in M for n in N) + " }",
    ]
    for j in range(8):
        body.append("{ " + " ".join(f"{vi} w{n} = wb[{n} * stride + {j}];" for n in N) + " "
                    + " ".join(f"{{ {vi} xb = {e.seti(f'x{m}[blk * 8 + {j}]')}; "
                               + " ".join(f"d{m}_{n} = {mac(f'd{m}_{n}', f'w{n}', 'xb')};" for n in N) + " }"
                               for m in M) + " }")
    body.append(" ".join(f"{vf} s{n} = {e.ldh(f'a->sc + {tile(n)}')};" for n in N))
    body += [f"{{ {vf} dx = {e.setf(f'a->xd[{xblk(m)}]')}; "
             + " ".join(f"c{m}_{n} = {e.fma(e.cvt(f'd{m}_{n}'), e.mul(f's{n}', 'dx'), f'c{m}_{n}')};" for n in N)
             + " }" for m in M]
    nl = "\n        "
    return f"""
static void gemmq_b{bits}_{mr}x{nr}(const lb_args *a, const {vi} *w, int stride, int kb, int nkb, int m0, int row) {{
    int first = kb == 0;
    float out[{lanes}];
    const uint8_t *zp = a->zp;
    int zdef = a->zdef - {offset};
    {vi} voff = {e.seti(str(offset))};
    {" ".join(f"const int32_t *x{m} = (const int32_t *)(a->xq + (size_t)(m0 + {m}) * a->nblocks * 32);" for m in M)}
    {" ".join(f"{vf} c{m}_{n} = {e.zero()};" for m in M for n in N)}
    {" ".join(f"{vi} d{m}_{n};" for m in M for n in N)}
    for (int blk = kb; blk < kb + nkb; blk++) {{
        {nl.join(body)}
    }}
    {" ".join(f"{e.store('out', f'c{m}_{n}')}; lb_addq(a, m0 + {m}, row + {n * lanes}, out, first);" for m in M for n in N)}
    (void)voff;
}}
"""


def _gemmq_task(e: _Emit, bits: int) -> str:
    """Thread tid's band of tiles, NR tiles (GEMMQ_TILE) at a time: chunks of at most GEMMQ_KBLOCKS
    blocks (of equal size) of them unpacked to u8 once (_unpackq), then every token, MR at a time,
    against the chunk."""
    mr, nr = GEMMQ_TILE[e.isa]
    vi, lanes = e.ops["vi"], e.lanes
    table = ", ".join("{" + ", ".join(f"gemmq_b{bits}_{m}x{n}" for n in range(1, nr + 1)) + "}" for m in range(1, mr + 1))
    return "".join(_gemmq_micro(e, bits, m, n) for m in range(1, mr + 1) for n in range(1, nr + 1)) + f"""
typedef void (*gemmq_micro_b{bits})(const lb_args *, const {vi} *, int, int, int, int, int);
static const gemmq_micro_b{bits} GEMMQ_B{bits}[{mr}][{nr}] = {{{table}}};

static void gemmq_task_b{bits}(void *p, int tid, int nthr) {{
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, LB_LANES, &lo, &hi);
    if (lo >= hi) return;
    {vi} *buf = ({vi} *)lb_alloc((size_t){nr} * {GEMMQ_KBLOCKS} * 8 * sizeof({vi}) / sizeof(float));
    int chunks = (a->nblocks + {GEMMQ_KBLOCKS - 1}) / {GEMMQ_KBLOCKS}, kbs = (a->nblocks + chunks - 1) / chunks;
    for (int row = lo; row < hi; row += {nr * lanes}) {{
        int tiles = (hi - row + {lanes - 1}) / {lanes}, nr = tiles < {nr} ? tiles : {nr};
        for (int kb = 0; kb < a->nblocks; kb += kbs) {{
            int nkb = a->nblocks - kb < kbs ? a->nblocks - kb : kbs;
            for (int t = 0; t < nr; t++) unpackq_b{bits}(a, row + t * {lanes}, kb, nkb, buf + (size_t)t * nkb * 8);
            for (int m = 0; m < a->m; m += {mr}) {{
                int mr = a->m - m < {mr} ? a->m - m : {mr};
                GEMMQ_B{bits}[mr - 1][nr - 1](a, buf, nkb * 8, kb, nkb, m, row);
            }}
        }}
    }}
    free(buf);
    (void)nthr;
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


def _gemv_task(name: str, bits: int, after: str = "", tiles: bool = False) -> str:
    """Thread tid's band of rows: one interleaved tile of LB_LANES rows at a time (`tiles`, the
    UniformQ kernels), else GEMV_ROWS rows at a time then one by one."""
    if tiles:
        align, loops = "LB_LANES", f"for (; row < hi; row += LB_LANES) {name}r_b{bits}(a, row);"
    else:
        align = str(GEMV_ROWS)
        loops = (f"for (; row + {GEMV_ROWS} <= hi; row += {GEMV_ROWS}) {name}_b{bits}_r{GEMV_ROWS}(a, row); "
                 f"for (; row < hi; row++) {name}_b{bits}_r1(a, row);")
    return f"""
static void {name}_task_b{bits}(void *p, int tid, int nthr) {{
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, {align}, &lo, &hi);
    int row = lo;
    {loops}
    {after}
    (void)nthr;
}}
"""


def _per_bits_int8(entry: Entry, offset: int) -> str:
    bits = entry.bits
    return f"""
LB_EXPORT void {entry.symbol}(lb_args *a) {{ lb_linear_q(a, tileq_task_b{bits}, gemmq_task_b{bits}, {offset}); }}
"""


def _float16(e: _Emit) -> str:
    """Unquantized layers: fp16 weights, row-major [N, nblocks·32] (zero-padded columns), on fp32
    activations. The GEMV converts GEMV_ROWS rows at a time as it reads them (two accumulators a row);
    the GEMM's "dequantization" is the conversion of a row chunk to fp32, then the fp32 micro-kernels."""
    vf, lanes = e.ops["vf"], e.lanes

    def gemv(rows: int) -> str:
        rr = range(rows)
        fmas = " ".join(f"g{r}{j} = {e.fma(e.ldh(f'w{r} + k + {j * lanes}'), f'x{j}', f'g{r}{j}')};" for r in rr for j in (0, 1))
        return f"""
static void gemvf16_b16_r{rows}(const lb_args *a, int row) {{
    {' '.join(f'const uint16_t *w{r} = (const uint16_t *)a->qw + (size_t)(row + {r}) * a->nblocks * 32;' for r in rr)}
    {' '.join(f'{vf} g{r}0 = {e.zero()}, g{r}1 = {e.zero()};' for r in rr)}
    for (int k = 0; k < a->nblocks * 32; k += {2 * lanes}) {{
        {vf} x0 = {e.load('a->x + k')}, x1 = {e.load(f'a->x + k + {lanes}')};
        {fmas}
    }}
    {' '.join(f'a->y[row + {r}] = {e.hsum(e.add(f"g{r}0", f"g{r}1"))} + (a->bias ? a->bias[row + {r}] : 0.0f);' for r in rr)}
}}
"""
    return gemv(GEMV_ROWS) + gemv(1) + f"""
static void dequantf16_b16(const lb_args *a, int row, int kb, int nkb, float *out) {{
    const uint16_t *w = (const uint16_t *)a->qw + (size_t)row * a->nblocks * 32 + (size_t)kb * 32;
    for (int k = 0; k < nkb * 32; k += {lanes}) {e.store('out + k', e.ldh('w + k'))};
}}
"""


def _int8_peak(e: _Emit) -> str:
    """The core's int8 multiply-add peak on this ISA, the yardstick of the int8 GEMM (benchmarks):
    12 independent chains of the GEMM's own instruction (dpbusd, or maddubs + madd + add), 4·L
    multiply-adds each per step. Returns a value of the sums, so the loop is not optimised away."""
    vi = e.ops["vi"]
    dot, _ = _int8_dot(e, 4)
    # each chain's own sum is its next u8 operand, so nothing is loop-invariant (a constant dot would be hoisted)
    mac = (lambda d: e.dpbusd(d, "x", d)) if "dpbusd" in e.ops else (lambda d: e.add32(d, dot(d, "x")))
    chains = range(12)
    return f"""
LB_EXPORT long long lb_int8_peak(long long steps) {{  /* multiply-adds done: steps · 12 · 4 · LB_LANES */
    {vi} x = {e.seti("(int)(steps & 1) + 0x01020300")};
    {" ".join(f"{vi} a{c} = {e.seti(str(c))};" for c in chains)}
    for (long long i = 0; i < steps; i++) {{ {" ".join(f"a{c} = {mac(f'a{c}')};" for c in chains)} }}
    int32_t out[LB_LANES];
    {e.storei("out", functools.reduce(e.add32, [f"a{c}" for c in chains]))};
    return out[0];
}}
"""


def _per_bits(entry: Entry) -> str:
    """The thread tasks and the exported entry point of a UniformQ, CodebookQ or float16 entry on fp32
    (or T16's int16) activations (codebook: each thread adds its own band of rows' outliers)."""
    bits, lut, t16 = entry.bits, entry.kind == "codebook", entry.activations == "int16-T16"
    kind, after = ("lut", "lb_outliers(a, lo, hi);") if lut else ("f16", "") if entry.kind == FLOAT16 else ("", "")
    xform = ("NULL, T16_XORDER" if t16 else "NULL, NULL") if lut or kind else f"XSCALE_B{bits}, NULL"
    return f"""
{_gemv_task(f"gemv{kind}", bits, after, tiles=not (lut or kind))}

static void gemm{kind}_task_b{bits}(void *p, int tid, int nthr) {{
    const lb_args *a = p;
    int lo, hi; lb_band(a, tid, MICRO_NR, &lo, &hi);
    if (lo >= hi) return;
    float *buf = lb_alloc((size_t)a->nb * a->kc);
    for (int nt = lo; nt < hi; nt += a->nb) {{
        int rows = hi - nt < a->nb ? hi - nt : a->nb;
        for (int kb = 0; kb < a->nblocks; kb += a->kc / 32) {{
            int nkb = a->nblocks - kb < a->kc / 32 ? a->nblocks - kb : a->kc / 32;
            for (int r = 0; r < rows; r++) dequant{kind}_b{bits}(a, nt + r, kb, nkb, buf + (size_t)r * a->kc);
            lb_gemm_tile(a, buf, nt, rows, kb, nkb);
        }}
    }}
    free(buf);
    {after}
    (void)nthr;
}}

LB_EXPORT void {entry.symbol}(lb_args *a) {{
    lb_linear(a, gemv{kind}_task_b{bits}, gemm{kind}_task_b{bits}, {xform});
}}
"""


@dataclass(frozen=True)
class Entry:
    """One exported kernel of a generated library (kernels/table.py makes it a row of the kernel table)."""
    kind: str  # the QTensor kind it multiplies
    bits: int
    activations: str  # what its GEMV and GEMM multiply the codes with, see ACTIVATIONS
    symbol: str  # the C entry point, void symbol(lb_args *)


ACTIVATIONS = {
    "fp32": "fp32 activations",
    "int8": "x rounded to s8 per 32-block (scale amax/127), u8 x s8 integer dots (maddubs, VNNI)",
    "int16-T16": "x rounded to int16 per 32-block (scale amax/2^14) against T16 tables (vpshufb, pmaddwd)",
    "tender": "x quantized by its ActQ (Tender: per-row scale, power-of-two channel groups combined by shifts; "
              "G = 1: per-token, per-tensor), u8 codes x s8 in vpdpbusd (c/tender.h, kernels/cpu/tender.py)",
}
TENDER_SYMBOL = "lb_tender_linear"  # one entry point for every bit width: void lb_tender_linear(lb_tender_args *)
TENDER_ISAS = ("avx512vnni", "avx512", "avx2")  # c/tender.h: vpdpbusd on the first, maddubs on the others


@functools.lru_cache(maxsize=None)
def entries(isa: str) -> tuple[Entry, ...]:
    """Every kernel the library for `isa` exports, in the order `generate` writes them: UniformQ on fp32
    activations (BITS), on int8 (INT8_BITS, where the ISA has an integer dot), CodebookQ (CODEBOOK_BITS,
    on int16 activations where its tables are T16), unquantized fp16 weights (FLOAT16), and UniformQ under
    an activation spec (c/tender.h, TENDER_ISAS; its own args, never `select`ed), and GGUF's K-quants
    (KQuant, hand-written in c/kquant.h, on fp32 activations and, where the ISA has an integer dot, int8:
    there x is rounded per 256 as llama.cpp's q8_K, not per 32)."""
    return (tuple(Entry("uniform", b, "fp32", f"lb_linear_b{b}") for b in BITS)
            + tuple(Entry("uniform", b, "int8", f"lb_linear_q_b{b}") for b in INT8_BITS if "dot8" in OPS[isa])
            + tuple(Entry("codebook", b, "int16-T16" if table16(isa, b) else "fp32", f"lb_linear_lut_b{b}")
                    for b in CODEBOOK_BITS)
            + (Entry(FLOAT16, 16, "fp32", "lb_linear_f16"),)
            + tuple(Entry("uniform", b, "tender", TENDER_SYMBOL) for b in BITS if isa in TENDER_ISAS)
            + tuple(Entry("kquant", b, act, f"lb_kquant{'_q' if act == 'int8' else ''}_b{b}")
                    for b in KQUANT_BITS for act in ("fp32", "int8") if act == "fp32" or "dot8" in OPS[isa]))


def entry(isa: str, kind: str, bits: int, activations: str) -> Entry | None:
    """The entry point of `isa`'s library for (kind, bits, activations), or None where there is none."""
    return next((x for x in entries(isa) if (x.kind, x.bits, x.activations) == (kind, bits, activations)), None)


def _kernel(e: _Emit, tiled: _Emit, entry: Entry) -> str:
    """The C of one entry point and of what only it uses."""
    b = entry.bits
    if entry.activations == "int8":
        return (_tileq_task(tiled, b) + _unpackq(tiled, b) + _gemmq_task(tiled, b)
                + _per_bits_int8(entry, _int8_dot(tiled, b)[1]))
    if entry.kind == FLOAT16:
        return _float16(e) + _per_bits(entry)
    if entry.kind == "uniform":
        return _xscale(b, e.lanes) + _gemv_rows(tiled, b) + _dequant(tiled, b) + _per_bits(entry)
    return _gemv_lut(e, b, GEMV_ROWS) + _gemv_lut(e, b, 1) + _dequant(e, b, True) + _per_bits(entry)


def generate(isa: str) -> str:
    """The C source for `isa` that varies per format, bits and ISA: the micro-kernels and every entry
    point of `entries(isa)`. The fixed C (drivers, thread pool, lb_args, the ISA's helpers) is
    #included from C_DIR."""
    e, tiled = _Emit(isa), _Emit(isa, interleaved=True)
    mr, nr = MICRO_TILE[isa]
    micro = "".join(_micro(e, m, n) for m in range(1, mr + 1) for n in range(1, nr + 1))
    table = ", ".join("{" + ", ".join(f"micro_{m}x{n}" for n in range(1, nr + 1)) + "}" for m in range(1, mr + 1))
    ents = entries(isa)
    t16 = _t16_xorder(e.lanes) if any(x.activations == "int16-T16" for x in ents) else ""
    return "\n".join([
        f"/* Generated by lowbit.kernels.cpu.codegen for {isa}; do not edit. */",
        f"#define MICRO_MR {mr}\n#define MICRO_NR {nr}\n#define LB_LANES {e.lanes}\n#define LB_TILE_TOKENS {TILE_TOKENS}",
        '#include "driver.h"', f'#include "{e.ops["header"]}"',
        micro, f"static const lb_micro MICRO[{mr}][{nr}] = {{{table}}};", t16,
        "".join(_kernel(e, tiled, x) for x in ents if x.activations != "tender" and x.kind != "kquant"),
        _int8_peak(e) if "dot8" in e.ops else "",
        '#include "tender.h"' if isa in TENDER_ISAS else "",
        '#include "kquant.h"',
        f"LB_EXPORT int lb_lanes(void) {{ return {e.lanes}; }}",
    ])
