"""`ContinualCallback`: a `transformers.TrainerCallback` that also hears about task boundaries.

`ContinualTrainer.train_continual` calls `on_task_end` of every `ContinualCallback` among the Trainer's
callbacks (registered with `callbacks=[...]` or `add_callback`, like any other), so per-task hooks (a
Hub push per task, a probe) live in the one callback mechanism the Trainer already has.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import TrainerCallback


class ContinualCallback(TrainerCallback):
    """A `TrainerCallback` that also hears about the task boundaries of `ContinualTrainer.train_continual`.

    Register it like any callback (`callbacks=[...]` or `trainer.add_callback`); the Trainer's own events
    (`on_step_end`, `on_log`, ...) reach it as usual, once per task's `train()`.
    """

    def on_task_end(self, args, state, control, *, trainer, task_id: int, result, **kwargs):
        """After task `task_id` was trained, its memory updated, every seen task evaluated and its checkpoint
        and results.json written; `result` is the run's `ContinualResult` so far."""


class TaskEndFunction(ContinualCallback):
    """A plain function as a task-end hook: calls `function(trainer, task_id, result)` (also what the
    deprecated `ContinualTrainer(task_end_callbacks=[fn])` wraps each function in)."""

    def __init__(self, function: Callable) -> None:
        self.function = function

    def on_task_end(self, args, state, control, *, trainer, task_id: int, result, **kwargs):
        self.function(trainer, task_id, result)
