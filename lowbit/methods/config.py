"""Config objects: one typed dataclass per method, like torchao's `Int4WeightOnlyConfig`.

Every method shares the target format fields (bits, group size, symmetry) and adds its own knobs.
Each field's `metadata["help"]` is its one-line description (the CLI's options are made from them;
`metadata["off"]` names a boolean's negative flag).

The `act_*` fields say how the layers' inputs are quantized at run time (formats/activation.py), on
top of any weight method: 16 bits keeps them in float; 8 or 4 with a method (Tender, or a baseline)
makes a W·A· model, fitted from calibration activations (methods/tender.py).
"""

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from ..formats import check_spec
from ..formats.activation import METHODS as ACT_METHODS
from ..formats.activation import check_act_spec


ACT_FIELDS = ("act_bits", "act_method", "act_groups", "act_chunk")  # MethodConfig's activation fields


@dataclass(frozen=True)
class MethodConfig:
    bits: int = field(default=4, metadata={"help": "bits per weight"})
    group_size: int = field(default=128, metadata={"help": "weights per scale: 32, 64, 128, or -1 for whole rows"})
    sym: bool = field(default=True, metadata={"help": "symmetric grid (asym: a zero point per group)", "off": "asym"})
    act_bits: int = field(default=16, metadata={"help": "activation bits: 8 or 4 (quantized at run time), 16 = float"})
    act_method: str = field(default="tender", metadata={"help": "activation quantizer: " + ", ".join(ACT_METHODS)})
    act_groups: int = field(default=8, metadata={"help": "Tender's channel groups G (1-16), scales 2x apart"})
    act_chunk: int = field(default=1, metadata={"help": "Tender: rows per run-time TMax (1: per row; 0: calibrated TMax)"})
    name: ClassVar[str]
    fp_targets: ClassVar[bool] = False  # block-output methods: train to the float model's own outputs

    def __post_init__(self):
        check_spec(self.bits, self.group_size)
        if self.act_bits != 16:
            check_act_spec(self.act_bits, self.act_method, self.act_groups, self.act_chunk)

    @property
    def quantizes_acts(self) -> bool:
        return self.act_bits != 16

    @property
    def needs_calib(self) -> bool:
        """Calibrated weight methods say so themselves (a class attribute True); activations are fitted
        on the block runner's statistics whatever the weight method."""
        return self.quantizes_acts

    def to_dict(self) -> dict:
        """The config as a record; float activations leave the act_* fields out (records as before them)."""
        d = asdict(self)
        if not self.quantizes_acts:
            d = {k: v for k, v in d.items() if k not in ACT_FIELDS}  # not GPTQ's act_order
        return {"method": self.name, **d}

    @property
    def scheme(self) -> str:
        """Short human name, e.g. 'W4-g128-sym'."""
        group = "row" if self.group_size == -1 else f"g{self.group_size}"
        if not self.quantizes_acts:
            return f"W{self.bits}-{group}-{'sym' if self.sym else 'asym'}"
        tender = f"-G{self.act_groups}" + ("-static" if self.act_chunk == 0 else f"-c{self.act_chunk}") \
            if self.act_method == "tender" else ""
        return f"W{self.bits}A{self.act_bits}-{self.act_method}-{group}-{'sym' if self.sym else 'asym'}{tender}"
