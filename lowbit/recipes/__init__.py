"""Recipes: which spec for which layer. Each ends in a Plan (layer name -> method config), which
`apply` carries out: a fixed scheme string or one config over every layer (`Plan.uniform`), the
automatic choice among methods (`Auto`, auto.py), a per-layer choice under a budget (`QuantX`,
quantx.py, from candidates.py, sensitivity.py, cost.py and solve.py), or a recipe file (recipe_file.py)."""

from .apply import apply, block_quantizer
from .auto import Auto, Choice, report, select, split_holdout
from .plan import EDGE, Plan, edge_names, spec_from_dict, targets
from .quantx import QuantX, Recipe
from .recipe_file import RecipeFile
from .scheme import fields as scheme_fields
from .scheme import parse as parse_scheme

__all__ = ["EDGE", "Auto", "Choice", "Plan", "QuantX", "Recipe", "RecipeFile", "apply", "edge_names", "block_quantizer", "parse_scheme", "report", "scheme_fields", "select",
           "spec_from_dict", "split_holdout", "targets"]
