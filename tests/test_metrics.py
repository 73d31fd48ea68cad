"""Metric functions against a hand-computed accuracy matrix."""
import math

import numpy as np
import pytest

from benchmark.metrics import (
    AccuracyMatrix,
    area_under_curve,
    backward_transfer,
    control_change,
    control_curve,
    forgetting,
    summarize,
    target_curve,
    target_improvement,
)


@pytest.fixture
def matrix():
    # sessions 0..3; columns: target, ctrl_a, ctrl_b
    values = np.array([
        [0.20, 0.80, 0.60],
        [0.40, 0.70, 0.60],
        [0.50, 0.75, 0.50],
        [0.60, 0.60, 0.55],
    ])
    groups = np.array([  # R[t, i]: target accuracy on session i's classes after session t
        [0.1, 0.2, 0.3],
        [0.6, 0.2, 0.3],
        [0.5, 0.7, 0.3],
        [0.4, 0.6, 0.8],
    ])
    seen = np.array([np.nan, 0.6, 0.6, 0.6])
    return AccuracyMatrix("t", ["t", "a", "b"], values, seen, groups)


def test_target_improvement_and_curve(matrix):
    assert target_improvement(matrix) == pytest.approx(0.40)
    assert target_curve(matrix) == pytest.approx([0.0, 0.2, 0.3, 0.4])


def test_control_change_and_curve(matrix):
    # a: 0.6-0.8 = -0.2 ; b: 0.55-0.6 = -0.05 ; mean -0.125
    assert control_change(matrix) == pytest.approx(-0.125)
    assert control_curve(matrix) == pytest.approx([0.0, -0.05, -0.075, -0.125])


def test_area_under_curve_is_trapezoid_over_sessions(matrix):
    # target curve 0, .2, .3, .4 -> trapezoid = (0+.2)/2 + (.2+.3)/2 + (.3+.4)/2 = .7 ; / T=3
    assert area_under_curve(target_curve(matrix)) == pytest.approx(0.7 / 3)
    assert math.isnan(area_under_curve(np.array([0.5])))


def test_forgetting_is_max_earlier_minus_final(matrix):
    assert forgetting(matrix, "a") == pytest.approx(0.80 - 0.60)
    assert forgetting(matrix, "b") == pytest.approx(0.60 - 0.55)
    assert forgetting(matrix, "t") == pytest.approx(0.50 - 0.60)  # negative: it only improved


def test_backward_transfer_on_session_groups(matrix):
    # (R[3,1]-R[1,1] + R[3,2]-R[2,2]) / 2 = ((0.4-0.6) + (0.6-0.7)) / 2
    assert backward_transfer(matrix) == pytest.approx(-0.15)


def test_no_controls_gives_nan_and_csv_round_trip(matrix):
    alone = AccuracyMatrix("t", ["t"], matrix.values[:, :1], matrix.seen, matrix.groups)
    assert math.isnan(control_change(alone))
    again = AccuracyMatrix.from_csv(matrix.to_csv(), "t")
    assert again.datasets == ["t", "a", "b"]
    np.testing.assert_allclose(again.values, matrix.values)
    np.testing.assert_allclose(again.groups, matrix.groups)
    np.testing.assert_allclose(again.seen, matrix.seen)


def test_partial_matrix_uses_last_evaluated_session(matrix):
    matrix.values[3] = np.nan
    matrix.groups[3] = np.nan
    assert matrix.last == 2
    assert target_improvement(matrix) == pytest.approx(0.30)
    summary = summarize(matrix)
    assert summary["sessions"] == 2 and summary["control_change"] == pytest.approx(-0.075)
    assert summary["target_curve"] == pytest.approx([0.0, 0.2, 0.3])
