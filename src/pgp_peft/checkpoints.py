"""Per-task checkpoints of a continual run: the format of `checkpoint-task-<t>/`.

After task t the trainer writes `<output_dir>/checkpoint-task-<t>/`, atomically (staged, then renamed):

* the adapter as `PGPModel.save_pretrained` writes it (`config.json` + `model.safetensors`; never the
  frozen backbone; the null-space memory is part of the adapter state);
* `continual_state.json`: the task reached, the task count, both accuracy matrices so far, the memory
  ranks per task, the split manifest, the seed and the run fingerprint (`run_folder.run_fingerprint`).

A resume loads the newest one after checking that it belongs to the same split and the same run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text, replace_dir, staging_dir
from .metrics import AccuracyMatrix
from .run_folder import fingerprint_differences

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-task-"
STATE_NAME = "continual_state.json"


@dataclass
class TaskCheckpoint:
    """What a per-task checkpoint restores besides the adapter tensors."""

    task_id: int
    accuracy: AccuracyMatrix
    task_il_accuracy: AccuracyMatrix
    memory_ranks: list[dict[str, int]]


def checkpoint_dir(output_dir: str | Path, task_id: int) -> Path:
    """`<output_dir>/checkpoint-task-<task_id>`."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{task_id}"


def save_task_checkpoint(
    model,
    output_dir: str | Path,
    *,
    task_id: int,
    num_tasks: int,
    accuracy: AccuracyMatrix,
    task_il_accuracy: AccuracyMatrix,
    memory_ranks: list[dict[str, int]],
    manifest: dict[str, Any],
    seed: int,
    fingerprint: dict[str, Any],
) -> Path:
    """Atomically write `checkpoint-task-<task_id>` (adapter + continual state); returns its path."""
    final = checkpoint_dir(output_dir, task_id)
    staging = staging_dir(final)
    try:
        model.save_pretrained(staging)
        state = {
            "task_id": task_id,
            "num_tasks": num_tasks,
            "accuracy": accuracy.to_dict(),
            "task_il_accuracy": task_il_accuracy.to_dict(),
            "memory_ranks": memory_ranks,
            "manifest": manifest,
            "seed": seed,
            "fingerprint": fingerprint,
        }
        atomic_write_text(staging / STATE_NAME, json.dumps(state, indent=2) + "\n")
        replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete `checkpoint-task-<t>` with the highest t in `output_dir` (None if there is none)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / STATE_NAME).exists():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def load_task_checkpoint(
    model,
    path: str | Path,
    *,
    num_tasks: int,
    manifest: dict[str, Any],
    fingerprint: dict[str, Any],
) -> TaskCheckpoint:
    """Check that the checkpoint at `path` belongs to this run (task count, split, fingerprint), load its
    adapter tensors into `model` and return its continual state."""
    from safetensors.torch import load_file

    path = Path(path)
    with open(path / STATE_NAME, encoding="utf-8") as handle:
        state = json.load(handle)
    if state["num_tasks"] != num_tasks:
        raise ValueError(f"checkpoint {path} is for {state['num_tasks']} tasks, this run has {num_tasks}")
    saved = state.get("manifest", {})
    for key in ("class_order", "task_classes", "dataset"):
        if key in saved and saved[key] != manifest[key]:
            raise ValueError(
                f"checkpoint {path} was written for another split ({key}: {saved[key]} vs {manifest[key]}); "
                "resume with the same data, class order and task count, or use another output_dir"
            )
    saved_fingerprint = state.get("fingerprint")
    if saved_fingerprint is None:
        logger.warning(
            "checkpoint %s has no run fingerprint (older pgp_peft): only the split is checked", path
        )
    elif saved_fingerprint.get("pgp_peft_version") != fingerprint.get("pgp_peft_version"):
        raise ValueError(
            f"checkpoint {path} was written by pgp_peft {saved_fingerprint.get('pgp_peft_version')}, this is "
            f"{fingerprint.get('pgp_peft_version')}: resume it with that version, or start a new run with "
            "--overwrite_output_dir or another --output_dir"
        )
    else:
        differences = fingerprint_differences(saved_fingerprint, fingerprint)
        if differences:
            raise ValueError(
                f"checkpoint {path} belongs to another run; differing settings: {'; '.join(differences[:8])}"
                f"{' ...' if len(differences) > 8 else ''}. Resume with the same settings, or start a new run "
                "with --overwrite_output_dir or another --output_dir"
            )
    device = next(model.parameters()).device
    model.load_adapter_state_dict(load_file(str(path / "model.safetensors"), device=str(device)), str(path))
    return TaskCheckpoint(
        task_id=int(state["task_id"]),
        accuracy=AccuracyMatrix.from_dict(state["accuracy"]),
        task_il_accuracy=AccuracyMatrix.from_dict(state["task_il_accuracy"]),
        memory_ranks=state.get("memory_ranks", []),
    )
