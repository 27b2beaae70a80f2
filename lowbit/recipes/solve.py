"""The solver: one option per item, least total loss, total cost within a budget (multiple-choice knapsack).

Items are what is chosen as a unit (a layer, or projections the engine fuses); each offers options
(cost, loss, choice). Exact dynamic programming over Pareto frontiers: after item i the frontier holds,
for every reachable total cost, the least total loss of items 0..i (a point dominated by one that costs
no more and loses no more is dropped). Merging the next item adds every option to every point (numpy,
|frontier| × |options| at a time) and prunes again. The answer is the frontier's last point within the
budget, traced back through the stored parents.

`resolution` > 0 keeps one point per cost bucket of that width (the least loss in it): the frontier
then holds at most budget / resolution points, so a 200-item model solves in a second; a point's cost
stays exact (buckets only drop points), so the budget is never exceeded, and the answer is optimal
among the points kept. resolution 0 is exact (the tests check it against brute force).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LowbitError


@dataclass(frozen=True)
class Option:
    cost: float
    loss: float
    choice: object  # what taking it means (the caller's: layer -> spec)


def _prune(cost: np.ndarray, loss: np.ndarray, resolution: float) -> np.ndarray:
    """Indices of the Pareto points (ascending cost, strictly falling loss), one per cost bucket."""
    order = np.lexsort((loss, cost))
    cost, loss = cost[order], loss[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], loss[:-1]]))
    keep = loss < best_before
    if resolution > 0:
        bucket = np.floor(cost / resolution)
        kept = np.flatnonzero(keep)
        # the last kept point of each bucket has the least loss in it (losses fall along the frontier)
        last = np.concatenate([bucket[kept][1:] != bucket[kept][:-1], [True]])
        keep = np.zeros_like(keep)
        keep[kept[last]] = True
    return order[keep]


def frontier(items: list[list[Option]], limit: float = np.inf, resolution: float = 0.0):
    """(costs, losses, parents): the frontier after each item (points over `limit` dropped); parents[i]
    holds, per point, (index into the frontier before item i, option index)."""
    cost, loss, parents = np.zeros(1), np.zeros(1), []
    for options in items:
        oc = np.array([o.cost for o in options], dtype=np.float64)
        ol = np.array([o.loss for o in options], dtype=np.float64)
        c, l = (cost[:, None] + oc[None, :]).ravel(), (loss[:, None] + ol[None, :]).ravel()
        within = np.flatnonzero(c <= limit)
        keep = within[_prune(c[within], l[within], resolution)]
        parents.append((keep // len(options), keep % len(options)))
        cost, loss = c[keep], l[keep]
    return cost, loss, parents


def least_cost(items: list[list[Option]]) -> float:
    return sum(min(o.cost for o in options) for options in items)


def solve(items: list[list[Option]], budget: float, resolution: float = 0.0) -> list[Option]:
    """The option of each item, least total loss with total cost ≤ budget. A LowbitError when even the
    cheapest options cost more (the caller names the smallest reachable budget: `least_cost`)."""
    if any(not options for options in items):
        raise LowbitError("an item has no options: no candidate fits it")
    if least_cost(items) > budget * (1 + 1e-12):
        raise LowbitError(f"the budget {budget:g} is below the least reachable cost {least_cost(items):g}")
    cost, loss, parents = frontier(items, budget * (1 + 1e-12), resolution)
    point = int(np.argmin(loss))
    chosen = []
    for (parent, option), options in zip(reversed(parents), reversed(items)):
        chosen.append(options[int(option[point])])
        point = int(parent[point])
    return chosen[::-1]
