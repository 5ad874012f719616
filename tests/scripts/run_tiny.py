"""A tiny 3-task DualPrompt-PGP `train_continual` run in its own process (for the kill-and-resume test).

    python run_tiny.py OUTDIR [--resume]

With `PGP_KILL_AT=TASK:STEP` the process SIGKILLs itself right after optimizer step STEP of task TASK
(no cleanup, no atexit: as an OOM killer would). On completion it writes OUTDIR/final.json with
the class-IL and task-IL accuracy matrices and the tasks this process trained.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_cl  # noqa: E402

from pgp_peft.callbacks import TaskEndFunction  # noqa: E402


class KillAt(TrainerCallback):
    """SIGKILL this process after optimizer step `step` (1-based global_step) of task `task`."""

    def __init__(self, task: int, step: int) -> None:
        self.task, self.step, self.trainer = task, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.current_task == self.task and state.global_step == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def main(out_dir: str, resume: bool) -> None:
    torch.set_num_threads(1)
    splits = tiny_cl.make_splits(num_tasks=3, train_per_class=12, test_per_class=5)
    model = tiny_cl.make_model("dualprompt", num_classes=6)
    callbacks = []
    kill_at = os.environ.get("PGP_KILL_AT")
    if kill_at:
        task, step = (int(v) for v in kill_at.split(":"))
        callbacks.append(KillAt(task, step))
    trainer = tiny_cl.make_trainer(
        model,
        splits,
        out_dir,
        callbacks=callbacks,
        optim="adamw_torch",
        learning_rate=0.01,
        weight_decay=0.0,
        num_train_epochs=3,  # 3 optimizer steps per epoch
    )
    for callback in callbacks:
        callback.trainer = trainer
    trained: list[int] = []
    trainer.add_callback(TaskEndFunction(lambda tr, task_id, result: trained.append(task_id)))
    result = trainer.train_continual(resume_from_checkpoint=True if resume else None)
    payload = {
        "accuracy": result.accuracy.to_dict(),
        "task_il_accuracy": result.task_il_accuracy.to_dict(),
        "memory_ranks": result.memory_ranks,
        "trained_tasks": trained,
    }
    (Path(out_dir) / "final.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], "--resume" in sys.argv[2:])
