"""Recipes: which spec for which layer. Each ends in a Plan (layer name -> method config), which
`apply` carries out: a fixed scheme string or one config over every layer (`Plan.uniform`), or the
automatic choice among methods (`Auto`, auto.py)."""

from .apply import apply, block_quantizer
from .auto import Auto, Choice, report, select, split_holdout
from .plan import EDGE, Plan, spec_from_dict, targets
from .scheme import fields as scheme_fields
from .scheme import parse as parse_scheme

__all__ = ["EDGE", "Auto", "Choice", "Plan", "apply", "block_quantizer", "parse_scheme", "report", "scheme_fields", "select",
           "spec_from_dict", "split_holdout", "targets"]
