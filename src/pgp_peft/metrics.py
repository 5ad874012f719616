"""Continual-learning metrics: the accuracy matrix, average accuracy, forgetting, BWT, plots.

Conventions (docs/ALGORITHM.md §5):

- ``A[i, t]`` is the accuracy in percent (0..100) on task ``i``'s test set after training
  task ``t``; ``NaN`` where it was not measured (always for ``i > t``: task not yet seen).
- ``after_task=None`` means "the latest trained task": the last column holding a value, so the
  functions work on a matrix that is still being filled during a run.
- With a single task there is nothing to forget: forgetting and BWT are ``0.0`` (not ``NaN``,
  so results stay JSON-able and averages over runs stay defined).

Pure numpy; matplotlib is imported lazily inside the plotting functions (no pyplot state).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .fileio import atomic_write

__all__ = [
    "AccuracyMatrix",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "CONTINUAL_LEARNING_METRIC",
    "format_matrix",
    "load_continual_learning_metric",
    "matrix_to_markdown",
    "plot_accuracy_curves",
    "plot_accuracy_matrix",
    "summarize",
    "write_results_json",
]


class AccuracyMatrix:
    """``A[i, t]`` = accuracy (percent, 0..100) on task ``i`` after training task ``t``; NaN if unseen."""

    def __init__(self, num_tasks: int) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self._values = np.full((num_tasks, num_tasks), np.nan, dtype=np.float64)

    def record(self, task_trained: int, task_evaluated: int, accuracy: float) -> None:
        """Store the accuracy on ``task_evaluated`` measured after training ``task_trained``."""
        for name, task in (("task_trained", task_trained), ("task_evaluated", task_evaluated)):
            if not 0 <= task < self.num_tasks:
                raise ValueError(f"{name}={task} is outside [0, {self.num_tasks})")
        if task_evaluated > task_trained:
            # Class-IL has no classes of future tasks in the head yet: the value would be meaningless.
            raise ValueError(f"task {task_evaluated} is not seen yet after training task {task_trained}")
        accuracy = float(accuracy)
        if not 0.0 <= accuracy <= 100.0:
            raise ValueError(f"accuracy must be a percentage in [0, 100], got {accuracy}")
        self._values[task_evaluated, task_trained] = accuracy

    @property
    def values(self) -> np.ndarray:
        """A copy of the matrix, shape (T, T), float64, NaN where not measured."""
        return self._values.copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN -> None) for checkpoints and results.json."""
        return {
            "num_tasks": self.num_tasks,
            "unit": "percent",
            "values": [[None if math.isnan(v) else float(v) for v in row] for row in self._values],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyMatrix:
        """Inverse of :meth:`to_dict` (None -> NaN)."""
        matrix = cls(int(data["num_tasks"]))
        values = np.array([[np.nan if v is None else float(v) for v in row] for row in data["values"]])
        if values.shape != (matrix.num_tasks, matrix.num_tasks):
            raise ValueError(f"values has shape {values.shape}, expected {(matrix.num_tasks,) * 2}")
        matrix._values = values
        return matrix

    def __repr__(self) -> str:
        return f"AccuracyMatrix(num_tasks={self.num_tasks})\n{format_matrix(self._values)}"


def _as_array(matrix: AccuracyMatrix | np.ndarray) -> np.ndarray:
    """Return the (T, T) float array behind ``matrix``."""
    values = matrix.values if isinstance(matrix, AccuracyMatrix) else np.asarray(matrix, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"an accuracy matrix must be square (T, T), got shape {values.shape}")
    return values


def _resolve_task(values: np.ndarray, after_task: int | None) -> int:
    """The column to score: ``after_task`` or the last column holding any value."""
    if after_task is None:
        filled = np.flatnonzero(~np.all(np.isnan(values), axis=0))
        if filled.size == 0:
            raise ValueError("the accuracy matrix is empty: no task has been evaluated yet")
        return int(filled[-1])
    if not 0 <= after_task < values.shape[1]:
        raise ValueError(f"after_task={after_task} is outside [0, {values.shape[1]})")
    return after_task


def _final_column(values: np.ndarray, t: int) -> np.ndarray:
    """``A[0..t, t]``, shape (t+1,); raises if a seen task was not evaluated after task t."""
    column = values[: t + 1, t]
    missing = np.flatnonzero(np.isnan(column))
    if missing.size:
        raise ValueError(f"tasks {missing.tolist()} were not evaluated after training task {t}")
    return column


def average_accuracy(matrix: AccuracyMatrix | np.ndarray, after_task: int | None = None) -> float:
    """``(1/(t+1)) * sum_{i<=t} A[i, t]``: mean accuracy over the tasks seen after task ``t``."""
    values = _as_array(matrix)
    t = _resolve_task(values, after_task)
    return float(np.mean(_final_column(values, t)))


def forgetting(
    matrix: AccuracyMatrix | np.ndarray,
    after_task: int | None = None,
    definition: Literal["paper", "reference"] = "paper",
) -> float:
    """Average forgetting after task ``t`` (``T`` below) over the tasks ``i < T``.

    - ``"paper"``: ``(1/(T-1)) sum_{i<T} (max_{j in [i, T-1]} A[i, j] - A[i, T])``; a term can be
      negative when a task improved (backward transfer).
    - ``"reference"`` (the authors' code): the max runs over ``j in [i, T]`` including ``T``, so
      every term is clipped at 0.

    Columns not measured (NaN) between ``i`` and ``T-1`` are skipped. One task seen -> ``0.0``.
    """
    if definition not in ("paper", "reference"):
        raise ValueError(f"definition must be 'paper' or 'reference', got {definition!r}")
    values = _as_array(matrix)
    t = _resolve_task(values, after_task)
    final = _final_column(values, t)
    if t == 0:
        return 0.0
    drops = []
    for i in range(t):
        last = t + 1 if definition == "reference" else t
        history = values[i, i:last]
        history = history[~np.isnan(history)]
        if history.size == 0:
            raise ValueError(f"task {i} has no accuracy recorded between tasks {i} and {last - 1}")
        drops.append(float(np.max(history)) - float(final[i]))
    return float(np.mean(drops))


def backward_transfer(matrix: AccuracyMatrix | np.ndarray, after_task: int | None = None) -> float:
    """BWT after task ``T``: ``(1/(T-1)) sum_{i<T} (A[i, T] - A[i, i])``; one task seen -> ``0.0``."""
    values = _as_array(matrix)
    t = _resolve_task(values, after_task)
    final = _final_column(values, t)
    if t == 0:
        return 0.0
    diagonal = np.diagonal(values)[:t]
    missing = np.flatnonzero(np.isnan(diagonal))
    if missing.size:
        raise ValueError(f"tasks {missing.tolist()} were not evaluated right after their own training")
    return float(np.mean(final[:t] - diagonal))


def summarize(matrix: AccuracyMatrix | np.ndarray, after_task: int | None = None) -> dict[str, Any]:
    """All headline numbers after task ``t`` as a JSON-able dict (accuracies in percent)."""
    values = _as_array(matrix)
    t = _resolve_task(values, after_task)
    # Average accuracy after every task that was fully evaluated (the "incremental" curve).
    curve = [
        average_accuracy(values, k) if not np.isnan(values[: k + 1, k]).any() else None for k in range(t + 1)
    ]
    measured = [c for c in curve if c is not None]
    return {
        "num_tasks": int(values.shape[0]),
        "tasks_completed": t + 1,
        "average_accuracy": average_accuracy(values, t),
        "forgetting_paper": forgetting(values, t, "paper"),
        "forgetting_reference": forgetting(values, t, "reference"),
        "backward_transfer": backward_transfer(values, t),
        "final_accuracies": [float(a) for a in _final_column(values, t)],
        "average_accuracy_per_task": curve,
        "average_incremental_accuracy": float(np.mean(measured)) if measured else None,
        "accuracy_matrix": _jsonable(values),
    }


# The `evaluate` metric shipped with the package: `summarize` behind evaluate's interface, loadable with
# `evaluate.load(str(CONTINUAL_LEARNING_METRIC))` by anyone with an accuracy matrix.
CONTINUAL_LEARNING_METRIC = Path(__file__).parent / "metric_scripts" / "continual_learning"


@functools.cache
def load_continual_learning_metric() -> Any:
    """The packaged continual-learning `evaluate.Metric` (loaded once per process, offline, in memory).

    `metric.compute(accuracy_matrix=A)` with A (T, T) returns :func:`summarize`'s dict."""
    import evaluate

    return evaluate.load(str(CONTINUAL_LEARNING_METRIC), keep_in_memory=True)


def _table_rows(values: np.ndarray) -> tuple[list[str], list[list[str]]]:
    """Header and body cells shared by the text and Markdown tables."""
    header = ["task"] + [f"after {t}" for t in range(values.shape[1])]
    body = [[f"{i}"] + ["-" if np.isnan(v) else f"{v:.2f}" for v in row] for i, row in enumerate(values)]
    return header, body


def format_matrix(matrix: AccuracyMatrix | np.ndarray) -> str:
    """Plain-text table: rows = evaluated task, columns = after training task; '-' = not measured."""
    header, body = _table_rows(_as_array(matrix))
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *body]]
    return "\n".join(lines)


def plasticity(matrix: AccuracyMatrix | np.ndarray) -> float:
    """Mean accuracy on each task right after learning it (the diagonal, measured entries only)."""
    diagonal = np.diag(_as_array(matrix))
    diagonal = diagonal[~np.isnan(diagonal)]
    return float(diagonal.mean()) if diagonal.size else math.nan


def format_comparison(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text side-by-side of `summarize` outputs ({column label: summary}), one metric a row,
    with the direction that is better."""
    rows = [
        ("average accuracy, class-IL (higher is better)", lambda s: s["average_accuracy"]),
        ("forgetting, paper definition (lower is better)", lambda s: s["forgetting_paper"]),
        ("forgetting, reference code (lower is better)", lambda s: s["forgetting_reference"]),
        ("accuracy right after learning a task (plasticity)", lambda s: plasticity(s["accuracy_matrix"])),
        ("task 0 accuracy at the end", lambda s: s["final_accuracies"][0]),
    ]
    if all("task_il" in summary for summary in runs.values()):
        rows.append(("average accuracy, task-IL", lambda s: s["task_il"]["average_accuracy"]))
    labels = list(runs)
    first = max(len(name) for name, _ in rows)
    widths = [max(len(label), 6) for label in labels]
    lines = ["  ".join([" " * first, *(label.rjust(w) for label, w in zip(labels, widths))])]
    for name, value in rows:
        cells = [f"{value(runs[label]):.2f}".rjust(w) for label, w in zip(labels, widths)]
        lines.append("  ".join([name.ljust(first), *cells]))
    return "\n".join(lines)


def matrix_to_markdown(matrix: AccuracyMatrix | np.ndarray) -> str:
    """GitHub-flavoured Markdown table of the matrix (same layout as :func:`format_matrix`)."""
    header, body = _table_rows(_as_array(matrix))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, AccuracyMatrix):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_results_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented strict JSON (NaN -> null), atomically. Returns the path."""
    text = json.dumps(_jsonable(payload), indent=2, sort_keys=False, allow_nan=False) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    return atomic_write(path, write)


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A standalone matplotlib Figure and Axes (imported lazily). No pyplot: the global backend
    and pyplot's figure registry (e.g. a notebook's) stay untouched, and nothing needs closing."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save a figure as PNG (Agg renderer) atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_accuracy_matrix(
    matrix: AccuracyMatrix | np.ndarray, path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Heat map of ``A`` (rows = evaluated task, columns = after task) with values, as PNG."""
    values = _as_array(matrix)
    size = max(3.0, 0.6 * values.shape[0] + 1.5)
    fig, ax = _figure(size + 1.0, size)
    image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=100.0, cmap="viridis")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    for (i, t), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(
                t, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 60 else "black"
            )
    ax.set_xlabel("after training task")
    ax.set_ylabel("evaluated task")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    ax.set_title(title or "Accuracy matrix")
    return _save_figure(fig, path)


def plot_accuracy_curves(
    matrix: AccuracyMatrix | np.ndarray, path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """One line per task (its accuracy as later tasks are trained) + the average accuracy, as PNG."""
    values = _as_array(matrix)
    fig, ax = _figure(6.0, 4.0)
    steps = np.arange(values.shape[1])
    for i in range(values.shape[0]):
        if not np.isnan(values[i]).all():
            ax.plot(steps[i:], values[i, i:], marker="o", linewidth=1.0, alpha=0.7, label=f"task {i}")
    averages = [
        np.nan if np.isnan(values[: t + 1, t]).any() else float(np.mean(values[: t + 1, t])) for t in steps
    ]
    ax.plot(steps, averages, color="black", linewidth=2.5, marker="s", label="average")
    ax.set_xlabel("after training task")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0.0, 100.0)
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if values.shape[0] > 6 else 1)
    ax.set_title(title or "Accuracy per task")
    return _save_figure(fig, path)
