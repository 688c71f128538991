"""Loss alignment: identical curves pass, known offsets give known errors."""

from __future__ import annotations

import pytest

from bit_core.align import compare_curves, read_curve_csv

REF = {s: 2.0 / s for s in range(1, 101)}


def test_identical_curves_pass():
    result = compare_curves(dict(REF), REF)
    assert result.mre == 0 and result.mae == 0 and result.passed and result.steps == 100


def test_known_relative_error():
    result = compare_curves({s: v * 1.10 for s, v in REF.items()}, REF)
    assert result.mre == pytest.approx(0.10) and not result.passed
    assert result.mae == pytest.approx(0.10 * sum(REF.values()) / 100)


def test_known_absolute_error_passes_on_mae():
    result = compare_curves({s: v + 0.0001 for s, v in REF.items()}, REF, mre_max=1e-9)
    assert result.mae == pytest.approx(0.0001) and result.passed


def test_only_common_steps_count():
    candidate = {s: REF[s] for s in range(1, 101, 2)} | {1000: 99.0}
    assert compare_curves(candidate, REF).steps == 50


def test_disjoint_curves_are_an_error():
    with pytest.raises(ValueError, match="share no step"):
        compare_curves({1: 1.0}, {2: 1.0})


def test_read_csv(tmp_path):
    path = tmp_path / "loss.csv"
    path.write_text("step,loss,lr,images_per_s\n1,2.5,0.0,10\n2,2.0,0.1,11\n")
    assert read_curve_csv(path) == {1: 2.5, 2: 2.0}
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="step and loss"):
        read_curve_csv(tmp_path / "bad.csv")
