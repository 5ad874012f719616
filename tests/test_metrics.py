"""Tests for pgp_peft.metrics on hand-made accuracy matrices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pgp_peft.metrics import (
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    format_comparison,
    format_matrix,
    matrix_to_markdown,
    plasticity,
    plot_accuracy_curves,
    plot_accuracy_matrix,
    summarize,
    write_results_json,
)

NAN = math.nan

# Task accuracies only drop: both forgetting definitions agree.
DROPPING = np.array(
    [
        [90.0, 80.0, 70.0],
        [NAN, 85.0, 75.0],
        [NAN, NAN, 95.0],
    ]
)

# Task 0 ends above its earlier max (a negative drop); task 1 drops by 20.
IMPROVING = np.array(
    [
        [80.0, 60.0, 90.0],
        [NAN, 70.0, 50.0],
        [NAN, NAN, 50.0],
    ]
)


def test_average_accuracy_per_step() -> None:
    assert average_accuracy(DROPPING) == pytest.approx((70 + 75 + 95) / 3)
    assert average_accuracy(DROPPING, after_task=1) == pytest.approx((80 + 85) / 2)
    assert average_accuracy(DROPPING, after_task=0) == pytest.approx(90.0)


def test_forgetting_definitions_agree_when_accuracy_only_drops() -> None:
    # i=0: max(90, 80) - 70 = 20; i=1: 85 - 75 = 10.
    assert forgetting(DROPPING, definition="paper") == pytest.approx(15.0)
    assert forgetting(DROPPING, definition="reference") == pytest.approx(15.0)
    assert forgetting(DROPPING, after_task=1) == pytest.approx(10.0)


def test_forgetting_definitions_differ_when_a_task_improves() -> None:
    # paper: i=0: max(80, 60) - 90 = -10; i=1: 70 - 50 = 20 -> 5.
    assert forgetting(IMPROVING, definition="paper") == pytest.approx(5.0)
    # reference: i=0: max(80, 60, 90) - 90 = 0 (clipped); i=1: 20 -> 10.
    assert forgetting(IMPROVING, definition="reference") == pytest.approx(10.0)


def test_forgetting_rejects_unknown_definition() -> None:
    with pytest.raises(ValueError, match="definition"):
        forgetting(DROPPING, definition="other")  # type: ignore[arg-type]


def test_backward_transfer() -> None:
    assert backward_transfer(DROPPING) == pytest.approx(((70 - 90) + (75 - 85)) / 2)
    assert backward_transfer(IMPROVING) == pytest.approx(((90 - 80) + (50 - 70)) / 2)


def test_single_task_has_no_forgetting() -> None:
    single = np.array([[88.0]])
    assert average_accuracy(single) == pytest.approx(88.0)
    assert forgetting(single) == 0.0
    assert forgetting(single, definition="reference") == 0.0
    assert backward_transfer(single) == 0.0
    # The first column of a longer run behaves the same.
    assert forgetting(DROPPING, after_task=0) == 0.0


def test_partial_matrix_uses_latest_trained_task() -> None:
    matrix = AccuracyMatrix(4)
    matrix.record(0, 0, 90.0)
    matrix.record(1, 0, 80.0)
    matrix.record(1, 1, 70.0)
    assert average_accuracy(matrix) == pytest.approx(75.0)
    assert forgetting(matrix) == pytest.approx(10.0)
    assert np.isnan(matrix.values[2:, :]).all()


def test_missing_seen_task_is_an_error() -> None:
    values = DROPPING.copy()
    values[1, 2] = NAN
    with pytest.raises(ValueError, match=r"tasks \[1\] were not evaluated"):
        average_accuracy(values)
    with pytest.raises(ValueError, match="empty"):
        average_accuracy(np.full((2, 2), NAN))


def test_record_validates_input() -> None:
    matrix = AccuracyMatrix(3)
    with pytest.raises(ValueError, match="not seen yet"):
        matrix.record(0, 1, 50.0)
    with pytest.raises(ValueError, match="percentage"):
        matrix.record(0, 0, 1.5e2)
    with pytest.raises(ValueError, match="outside"):
        matrix.record(3, 0, 50.0)
    with pytest.raises(ValueError, match="square"):
        average_accuracy(np.zeros((2, 3)))


def test_to_dict_round_trip_is_json_and_keeps_nan() -> None:
    matrix = AccuracyMatrix(3)
    for (i, t), v in np.ndenumerate(IMPROVING):
        if not np.isnan(v):
            matrix.record(t, i, v)
    data = json.loads(json.dumps(matrix.to_dict(), allow_nan=False))
    assert data["values"][2][0] is None
    restored = AccuracyMatrix.from_dict(data)
    np.testing.assert_array_equal(restored.values, IMPROVING)
    assert restored.values is not restored.values  # a copy each time


def test_summarize_and_tables() -> None:
    summary = summarize(IMPROVING)
    assert summary["tasks_completed"] == 3
    assert summary["average_accuracy"] == pytest.approx(190 / 3)
    assert summary["forgetting_paper"] == pytest.approx(5.0)
    assert summary["forgetting_reference"] == pytest.approx(10.0)
    assert summary["backward_transfer"] == pytest.approx(-5.0)
    assert summary["final_accuracies"] == [90.0, 50.0, 50.0]
    assert summary["average_accuracy_per_task"] == pytest.approx([80.0, 65.0, 190 / 3])
    assert summary["accuracy_matrix"][1][0] is None
    json.dumps(summary, allow_nan=False)

    text = format_matrix(IMPROVING)
    assert text.splitlines()[0].split() == ["task", "after", "0", "after", "1", "after", "2"]
    assert "-" in text.splitlines()[3] and "90.00" in text
    markdown = matrix_to_markdown(IMPROVING)
    assert len(markdown.splitlines()) == 2 + 3
    assert markdown.splitlines()[2] == "| 0 | 80.00 | 60.00 | 90.00 |"


def test_plasticity_and_side_by_side_comparison() -> None:
    assert plasticity(DROPPING) == pytest.approx((90 + 85 + 95) / 3)
    assert plasticity(IMPROVING) == pytest.approx((80 + 70 + 50) / 3)
    runs = {"L2P-PGP": summarize(DROPPING), "L2P (no PGP)": summarize(IMPROVING)}
    lines = format_comparison(runs).splitlines()
    assert lines[0].split() == ["L2P-PGP", "L2P", "(no", "PGP)"]
    rows = {line[:50].strip(): line[50:].split() for line in lines[1:]}
    assert rows["average accuracy, class-IL (higher is better)"] == ["80.00", "63.33"]
    assert rows["forgetting, paper definition (lower is better)"] == ["15.00", "5.00"]
    assert rows["forgetting, reference code (lower is better)"] == ["15.00", "10.00"]
    assert rows["task 0 accuracy at the end"] == ["70.00", "90.00"]
    assert not any("task-IL" in line for line in lines)  # only when every summary has it


def test_write_results_json_is_strict_and_atomic(tmp_path) -> None:
    path = tmp_path / "run" / "results.json"
    write_results_json(
        path, {"acc": np.float32(0.5), "nan": NAN, "arr": np.array([1, 2]), "m": AccuracyMatrix(1)}
    )
    data = json.loads(path.read_text())
    assert data == {
        "acc": 0.5,
        "nan": None,
        "arr": [1, 2],
        "m": {"num_tasks": 1, "unit": "percent", "values": [[None]]},
    }
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp file left


def test_plots_write_png_files(tmp_path) -> None:
    for plot in (plot_accuracy_matrix, plot_accuracy_curves):
        path = tmp_path / f"{plot.__name__}.png"
        assert plot(IMPROVING, path) == path
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "plot_accuracy_curves.png",
        "plot_accuracy_matrix.png",
    ]


# ------------------------------------------------------------------ the packaged `evaluate` metric
@pytest.fixture(scope="module")
def evaluate_metric():
    """Loaded with `evaluate.load(<folder>)` while every socket connection fails (offline)."""
    import socket

    import evaluate

    from pgp_peft.metrics import CONTINUAL_LEARNING_METRIC

    def refuse(*args, **kwargs):
        raise OSError("network access during evaluate.load")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        return evaluate.load(str(CONTINUAL_LEARNING_METRIC), keep_in_memory=True)


PARTIAL = np.array([[90.0, 80.0, NAN], [NAN, 85.0, NAN], [NAN, NAN, NAN]])  # run stopped after task 1
GAP = np.array([[90.0, NAN, 60.0], [NAN, 70.0, 65.0], [NAN, NAN, 80.0]])  # task 0 not measured after task 1


@pytest.mark.parametrize(
    "matrix, after_task",
    [
        (DROPPING, None),
        (IMPROVING, None),
        (IMPROVING, 1),
        (np.array([[88.0]]), None),
        (PARTIAL, None),
        (GAP, None),
    ],
)
def test_evaluate_metric_equals_summarize(evaluate_metric, matrix, after_task) -> None:
    as_lists = [
        [None if math.isnan(v) else float(v) for v in row] for row in matrix
    ]  # None and NaN both work
    for given in (matrix.tolist(), as_lists):
        assert evaluate_metric.compute(accuracy_matrix=given, after_task=after_task) == summarize(
            matrix, after_task
        )
    scores = evaluate_metric.compute(accuracy_matrix=IMPROVING.tolist())
    assert scores["forgetting_paper"] == pytest.approx(5.0) and scores[
        "forgetting_reference"
    ] == pytest.approx(10.0)


def test_evaluate_metric_rejects_bad_matrices(evaluate_metric) -> None:
    with pytest.raises(ValueError, match="square"):
        evaluate_metric.compute(accuracy_matrix=[[90.0, 80.0], [70.0]])
    with pytest.raises(ValueError, match="not evaluated after training task 1"):
        evaluate_metric.compute(accuracy_matrix=[[90.0, NAN], [NAN, 70.0]])


def test_evaluate_metric_ships_with_a_card() -> None:
    from pgp_peft.metrics import CONTINUAL_LEARNING_METRIC

    card = (CONTINUAL_LEARNING_METRIC / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "forgetting_reference" in card
    assert (CONTINUAL_LEARNING_METRIC / f"{CONTINUAL_LEARNING_METRIC.name}.py").is_file()
