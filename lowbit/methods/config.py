"""Config objects: one typed dataclass per method, like torchao's `Int4WeightOnlyConfig`.

Every method shares the target format fields (bits, group size, symmetry) and adds its own knobs.
Each field's `metadata["help"]` is its one-line description (the CLI's options are made from them;
`metadata["off"]` names a boolean's negative flag).
"""

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from ..formats import check_spec


@dataclass(frozen=True)
class MethodConfig:
    bits: int = field(default=4, metadata={"help": "bits per weight"})
    group_size: int = field(default=128, metadata={"help": "weights per scale: 32, 64, 128, or -1 for whole rows"})
    sym: bool = field(default=True, metadata={"help": "symmetric grid (asym: a zero point per group)", "off": "asym"})
    name: ClassVar[str]
    needs_calib: ClassVar[bool] = False
    fp_targets: ClassVar[bool] = False  # block-output methods: train to the float model's own outputs

    def __post_init__(self):
        check_spec(self.bits, self.group_size)

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}

    @property
    def scheme(self) -> str:
        """Short human name, e.g. 'W4-g128-sym'."""
        group = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits}-{group}-{'sym' if self.sym else 'asym'}"
