"""The CLI (`recipes/train_cl.py`, i.e. `pgp_peft.runner.main`), SIGKILLed mid-run.

    python cli_kill.py TASK:STEP [train_cl.py arguments ...]

The trainer of the PGP run (with `compare_baseline`, after its baseline has finished) kills its
process right after optimizer step STEP (1-based) of task TASK: no cleanup, no atexit, as an OOM
killer would. Nothing else differs from the CLI (in
particular nobody seeds by hand), so `--resume` afterwards must end where an uninterrupted run ends.
"""

from __future__ import annotations

import os
import signal
import sys

from transformers import TrainerCallback

from pgp_peft import runner
from pgp_peft.trainer import ContinualTrainer


class KillAt(TrainerCallback):
    def __init__(self, trainer: ContinualTrainer, task: int, step: int) -> None:
        self.trainer, self.task, self.step = trainer, task, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.current_task == self.task and state.global_step == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    task, step = (int(value) for value in sys.argv[1].split(":"))
    original_init = ContinualTrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.model.config.use_pgp:
            self.add_callback(KillAt(self, task, step))

    ContinualTrainer.__init__ = init
    return runner.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
