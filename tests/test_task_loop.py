"""The continual task loop: per-task hooks as `ContinualCallback`s and when the null-space memory grows
(reference L2P: collected at a task's start, used from the next task on)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

import tiny_cl  # noqa: E402

from pgp_peft.callbacks import ContinualCallback  # noqa: E402
from pgp_peft.checkpoints import CHECKPOINT_PREFIX, STATE_NAME  # noqa: E402
from pgp_peft.memory import update_memory  # noqa: E402
from pgp_peft.trainer import ContinualTrainer  # noqa: E402


class TaskEvents(ContinualCallback):
    """Records the order of task starts / ends, the adapter (with memory) at each task's training start,
    and the memory after each task."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.trainer = None
        self.adapter_at_train_begin: dict[int, dict[str, torch.Tensor]] = {}
        self.memory_at_task_end: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        task = self.trainer.current_task
        self.log.append(("train_begin", task))
        self.adapter_at_train_begin[task] = self.trainer.model.adapter_state_dict()

    def on_task_end(self, args, state, control, *, trainer, task_id, result, **kwargs):
        checkpoint = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{task_id}"
        written = json.loads((checkpoint / STATE_NAME).read_text())["task_id"]
        results = json.loads((Path(args.output_dir) / "results.json").read_text())
        self.log.append(("task_end", task_id, written, len(results["memory_ranks"])))
        assert np.isfinite(result.accuracy.values[task_id, task_id])
        self.memory_at_task_end[task_id] = {
            k: v.clone() for k, v in trainer.model.memory.saved_state().items()
        }


def test_on_task_end_reaches_continual_callbacks_after_the_checkpoint(tmp_path):
    """A `ContinualCallback` in `callbacks=` hears every task's end, after its checkpoint and results.json;
    the deprecated `task_end_callbacks=` still works (with a FutureWarning), through the same mechanism."""
    splits = tiny_cl.make_splits(num_tasks=2, train_per_class=4, test_per_class=2)
    model = tiny_cl.make_model("l2p", num_classes=4)
    log: list = []
    events = TaskEvents(log)
    with pytest.warns(FutureWarning, match="task_end_callbacks is deprecated"):
        trainer = ContinualTrainer(
            model,
            tiny_cl.training_args(str(tmp_path), num_train_epochs=1),
            splits=splits,
            train_transform=tiny_cl.build_transform(tiny_cl.IMAGE_SIZE),
            eval_transform=tiny_cl.build_transform(tiny_cl.IMAGE_SIZE),
            callbacks=[events],
            task_end_callbacks=[lambda tr, task_id, result: log.append(("function", task_id))],
        )
    events.trainer = trainer
    trainer.train_continual()
    assert log == [
        ("train_begin", 0),
        ("task_end", 0, 0, 1),
        ("function", 0),
        ("train_begin", 1),
        ("task_end", 1, 1, 2),
        ("function", 1),
    ]


def _memory_from(adapter: dict[str, torch.Tensor], trainer: ContinualTrainer, task_id: int) -> dict:
    """The memory that an update on `task_id`'s memory samples gives from the adapter state `adapter`."""
    model = tiny_cl.make_model("l2p", num_classes=4, projection_space="reference", memory_samples=32)
    model.load_adapter_state_dict(adapter)
    for task in range(task_id + 1):
        model.register_task_classes(task, trainer.splits.task_classes[task])
    update_memory(model, trainer._memory_batches(task_id), task_id)
    return model.memory.saved_state()


def test_reference_l2p_collects_at_the_task_start_and_uses_it_from_the_next_task(tmp_path):
    """Reference L2P (`memory_timing() == "start"`): the memory of task t is built from the adapter as it
    was before task t trained (the previous prompts), yet task t itself still trains with the old bases."""
    splits = tiny_cl.make_splits(num_tasks=2, train_per_class=16, test_per_class=2)
    model = tiny_cl.make_model("l2p", num_classes=4, projection_space="reference", memory_samples=32)
    assert model.method.memory_timing() == "start"
    events = TaskEvents([])
    trainer = tiny_cl.make_trainer(model, splits, str(tmp_path), callbacks=[events], num_train_epochs=1)
    events.trainer = trainer
    trainer.train_continual()

    begin, end = events.adapter_at_train_begin, events.memory_at_task_end
    assert not any(v.any() for k, v in begin[0].items() if k.startswith("memory.rank__")), "task 0: no bases"
    for key, value in end[0].items():  # task 1 trains with the bases of task 0, not its own
        assert torch.equal(begin[1][f"memory.{key}"], value), key
    for task in (0, 1):
        expected = _memory_from(begin[task], trainer, task)
        for key, value in end[task].items():
            assert torch.allclose(value, expected[key], atol=1e-6), (task, key)
    # Task 1's prompt term comes from the prompt pool: built from the trained prompts instead, it differs.
    trained = model.adapter_state_dict()
    trained.update({k: v for k, v in begin[1].items() if k.startswith("memory.")})
    late = _memory_from(trained, trainer, 1)
    assert any(not torch.allclose(value, late[key], atol=1e-6) for key, value in end[1].items())
