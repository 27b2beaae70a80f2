"""The kernel table and registry, and the reference kernel checked against F.linear on dequantized weights."""

import ctypes

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import kernels
from lowbit.cli import main
from lowbit.formats import BITS, CODEBOOK_BITS, GROUP_SIZES, KINDS, CodebookQ, KQuant, UniformQ
from lowbit.formats.kquant import BY_BITS as KQUANT_TYPES
from lowbit.kernels import describe_table, kernel_for, reference, table
from lowbit.kernels.cpu import build, codegen
from lowbit.kernels.cpu import isa as isa_mod
from lowbit.kernels.cpu.isa import ISA_FLAGS


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("n,k,batch", [(17, 100, (1,)), (64, 129, (3, 5)), (1, 32, (2,))])
def test_reference_matches_f_linear(bits, group_size, sym, n, k, batch):
    g = torch.Generator().manual_seed(bits + n + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(*batch, k, generator=g)
    bias = torch.randn(n, generator=g)
    qt = UniformQ.from_float(w, bits, group_size, sym)
    expected = F.linear(x, qt.dequantize(), bias)
    got = reference.linear(x, qt, bias)
    assert got.shape == (*batch, n)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(reference.linear(x.bfloat16(), qt),
                               F.linear(x.bfloat16(), qt.dequantize(torch.bfloat16)))
    # whatever kernel the registry picks agrees with the oracle up to fp32 summation order
    torch.testing.assert_close(kernels.linear(x, qt, bias), expected, rtol=1e-4, atol=1e-4 * k ** 0.5)


# (kind, bit widths its format allows): every one needs a native CPU row on every ISA, unless listed in
# REFERENCE_ONLY (none today), so a format or bit width the generator forgot fails here.
FORMAT_BITS = {"uniform": BITS, "codebook": CODEBOOK_BITS, "kquant": tuple(KQUANT_TYPES)}
REFERENCE_ONLY: set[tuple[str, int]] = set()


def _random(kind: str, bits: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return UniformQ.from_float(torch.randn(n, k, generator=g), bits, 64, bits % 2 == 1)
    if kind == "kquant":  # llama.cpp's fit of random weights (our packer), k a multiple of 256
        from lowbit.io.kquants import quantize
        from gguf import GGMLQuantizationType
        blocks, _ = quantize(torch.randn(n, k, generator=g), GGMLQuantizationType[KQUANT_TYPES[bits]])
        return KQuant(torch.from_numpy(blocks), KQUANT_TYPES[bits], (n, k))
    return CodebookQ.from_indices(torch.randint(0, 2**bits, (n, k), generator=g),
                                  torch.randn(n, -(-k // 64), 2**bits, generator=g), bits, 64)


def test_table_rows_come_from_the_generator_and_cover_every_format():
    assert set(FORMAT_BITS) == set(KINDS)
    names = [r.name for r in table.ROWS]
    assert len(names) == len(set(names))
    for isa in ISA_FLAGS:
        got = {(r.kind, r.bits) for r in table.ROWS if r.isa == isa and r.activations != "int8"}
        assert got == {(kind, b) for kind, bits in FORMAT_BITS.items() for b in bits} - REFERENCE_ONLY \
            | {(codegen.FLOAT16, 16)}, isa  # and unquantized fp16 weights (the engine's float layers)
        assert [r.symbol for r in table.ROWS if r.isa == isa] == [e.symbol for e in codegen.entries(isa)]
    # int8 rows exactly where the ISA has an integer dot product
    assert {r.isa for r in table.ROWS if r.activations == "int8"} == {"avx512vnni", "avx512", "avx2"}
    described = kernels.describe_table()
    assert len(described) == len(table.ROWS)
    assert set(described[0]) == {"kind", "bits", "isa", "activations", "symbol", "device", "available"}
    assert any(d["available"] for d in described) == (build.compiler() is not None)


@pytest.mark.skipif(build.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("kind", FORMAT_BITS)
def test_registry_dispatches_to_the_row_the_table_names(kind, thread_count):
    """A real QTensor of every allowed bit width goes to the row kernel_for names (its symbol is the C
    function the prepared layer calls), and that native result matches the reference on odd shapes."""
    isa = isa_mod.selected()
    lib = build.load(isa)
    for bits in FORMAT_BITS[kind]:
        n, k = 37 + bits, 75 + 16 * bits  # odd rows, K neither a multiple of 32 nor of the group
        k = k if kind != "kquant" else 256 * (1 + bits % 2)  # (K-quant rows: whole 256-weight super-blocks)
        qt = _random(kind, bits, n, k, seed=bits)
        row = table.select(qt, "cpu")
        assert row.isa == isa and row.activations != "int8" and row.available()
        assert kernels.kernel_for(qt) == row.name
        bound = kernels.prepare(qt, "cpu")
        assert ctypes.cast(bound.fn, ctypes.c_void_p).value == ctypes.cast(getattr(lib, row.symbol), ctypes.c_void_p).value
        for m in (1, 5):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            expected = reference.linear(x, qt)
            torch.testing.assert_close(bound(x), expected, rtol=1e-4, atol=1e-5 * k ** 0.5 * expected.abs().max().item())
            torch.testing.assert_close(kernels.linear(x, qt), bound(x), rtol=0, atol=0)


def test_switches_choose_the_row():
    qt = _random("uniform", 4, 8, 64, seed=0)
    kernels.set_int8_activations(True)
    try:
        int8 = "int8" in {r.activations for r in table.rows("uniform", 4, isa_mod.selected())}
        assert kernels.kernel_for(qt).endswith("-int8") == (int8 and build.compiler() is not None)
    finally:
        kernels.set_int8_activations(False)
    generation = kernels.generation()
    kernels.use_reference()
    try:
        assert kernels.kernel_for(qt) == "reference"
        assert kernels.generation() != generation
        x = torch.randn(2, 64)
        torch.testing.assert_close(kernels.linear(x, qt), reference.linear(x, qt), rtol=0, atol=0)
    finally:
        kernels.use_reference(False)
    assert kernels.kernel_for(qt, "no-such-device") == "reference"


def test_cli_inspect_kernels_prints_the_table(capsys):
    """`lowbit inspect --kernels` prints one line per table row, saying which ones run here."""
    assert main(["inspect", "--kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = describe_table()
    assert len(lines) == 1 + len(rows)
    for line, row in zip(lines[1:], rows):
        assert line.split() == [row["kind"], str(row["bits"]), row["isa"], row["activations"], row["symbol"],
                                row["device"], "yes" if row["available"] else "no"]


def test_cli_inspect_names_each_layers_kernel(tiny_quantized_dir, capsys):
    """`lowbit inspect MODEL` names, per layer, the table row its matmuls run (what kernel_for says)."""
    q = lowbit.load(tiny_quantized_dir)
    expected = {name: kernel_for(m.qtensor) for name, m in q.model.named_modules() if hasattr(m, "qtensor")}
    assert main(["inspect", str(tiny_quantized_dir)]) == 0
    shown = {line.split()[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert {name: shown[name] for name in expected} == expected and any(k != "reference" for k in expected.values())
    assert {k for name, k in shown.items() if name not in expected} == {"float"}  # the float tensors
