"""Recipes: which method and format for which layer (the automatic method choice for now)."""

from .auto import Auto, report, select, split_holdout

__all__ = ["Auto", "report", "select", "split_holdout"]
