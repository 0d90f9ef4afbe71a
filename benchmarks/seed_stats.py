"""Seed statistics shared by the experiments' summaries: mean ± standard error over seeds and the paired
difference of two arms (paired by seed) with its 2-SE verdict.

(Kept here rather than in `benchmarks.harness`, which other work edits concurrently.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .harness import mean_and_se


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """`mean`, `se` (sample standard deviation / sqrt(n)) and `n` of `values`."""
    mean, se = mean_and_se(values)
    return {"mean": mean, "se": se, "n": len(values)}


def paired_difference(treated: Mapping[int, float], control: Mapping[int, float]) -> dict[str, Any]:
    """`treated[seed] − control[seed]` over the seeds both have: the per-seed `differences`, their `mean` and `se`,
    and `beyond_2se` (|mean| > 2 SE, with SE > 0).

    Raises:
        ValueError: the two share no seed.
    """
    seeds = sorted(set(treated) & set(control))
    if not seeds:
        raise ValueError(f"no common seed between {sorted(treated)} and {sorted(control)}")
    differences = [treated[seed] - control[seed] for seed in seeds]
    mean, se = mean_and_se(differences)
    return {"seeds": seeds, "differences": differences, "mean": mean, "se": se,
            "beyond_2se": bool(se > 0 and abs(mean) > 2 * se)}


def plus_minus(stat: Mapping[str, float], digits: int = 4, signed: bool = False) -> str:
    """`mean ± se` of a `mean_se` / `paired_difference` record, `digits` decimals (`signed`: a leading + or −)."""
    sign = "+" if signed else ""
    return f"{stat['mean']:{sign}.{digits}f} ± {stat['se']:.{digits}f}"
