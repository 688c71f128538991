"""Loss-curve alignment: does a run (e.g. on an NPU) train like a reference run (e.g. on a GPU)?

Two curves are compared on the steps they share: mean relative error (relative to the
reference) and mean absolute error. The check passes when either is within its bound, the
criterion used to accept ported training recipes (MRE <= 0.05 or MAE <= 0.0002 by default).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Curve = dict[int, float]


@dataclass(frozen=True)
class Alignment:
    """The comparison of a candidate curve with a reference curve."""

    steps: int
    mre: float
    mae: float
    mre_max: float
    mae_max: float

    @property
    def passed(self) -> bool:
        return self.mre <= self.mre_max or self.mae <= self.mae_max


def read_curve_csv(path: Path, column: str = "loss") -> Curve:
    """{step: value} from a CSV with a `step` column (as the fine-tune stage writes)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "step" not in rows[0] or column not in rows[0]:
        raise ValueError(f"{path} needs the columns step and {column}")
    try:
        return {int(float(row["step"])): float(row[column]) for row in rows}
    except (TypeError, ValueError):
        raise ValueError(f"{path}: step and {column} must be numbers on every row") from None


def compare_curves(candidate: Curve, reference: Curve, *, mre_max: float = 0.05,
                   mae_max: float = 0.0002) -> Alignment:
    """Compare on the common steps; ValueError if the curves share none."""
    steps = sorted(set(candidate) & set(reference))
    if not steps:
        raise ValueError("the two loss curves share no step: are they from the same schedule?")
    a = np.array([candidate[s] for s in steps], dtype=np.float64)
    b = np.array([reference[s] for s in steps], dtype=np.float64)
    mre = float(np.mean(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
    mae = float(np.mean(np.abs(a - b)))
    return Alignment(len(steps), mre, mae, mre_max, mae_max)
