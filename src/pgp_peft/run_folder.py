"""One owner per output folder: a lock file, no mixing of two runs, cleanup after a kill, the resume fingerprint.

A training run writes its adapter, results and `checkpoint-task-*` folders into one output folder.
`prepare_output_dir` makes that folder safe to write:

* a lock file (`.pgp_peft.lock`, JSON with the owner's pid, host and start time) is created with
  `O_CREAT | O_EXCL`, so a second run into the same folder fails with `RunFolderError` naming the owner.
  A lock left by a dead process on this host is reported (a warning naming its pid) and replaced; a lock
  from another host cannot be checked and is refused with the command to remove it;
* hidden staging folders and temporary files that a kill during an atomic write left behind
  (see `fileio.staging_dir` / `fileio.atomic_write`) are removed, and reported;
* a folder that holds another run is refused unless the caller resumes it or asks to overwrite it
  (then the old run's files are removed first, so none of its later checkpoints survive).

`run_fingerprint` flattens everything that defines a run into `{"section.key": value}`; the trainer
stores it in every checkpoint and `fingerprint_differences` names what changed on `--resume`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import socket
from enum import Enum
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from . import __version__
from .arguments import field_default
from .fileio import STAGING_PREFIX

logger = logging.getLogger(__name__)

LOCK_NAME = ".pgp_peft.lock"
# Files a run writes at the top of its output folder (adapter, card, results, plots, split manifest).
RUN_FILES = (
    "config.json",
    "model.safetensors",
    "README.md",
    "results.json",
    "accuracy_matrix.png",
    "accuracy_curves.png",
    "holdout_manifest.json",
)
CHECKPOINT_DIR = re.compile(r"checkpoint-task-\d+")
# The run without projection that `training.compare_baseline` writes next to the PGP run.
BASELINE_DIR = "baseline"
# Recipe keys that do not change what a run computes (where it logs, how it pushes, how many loader
# workers): a resume may change them.
FINGERPRINT_IGNORED = ("name", "description", "paper", "hub", "training.logging_steps")
FINGERPRINT_IGNORED += ("training.dataloader_num_workers", "training.use_cpu", "training.report_to")
# The caches give the same numbers bit for bit (tested), so a resume may switch them.
FINGERPRINT_IGNORED += ("training.eval_query_cache", "training.train_query_cache", "training.decode_cache")
# The baseline of `training.compare_baseline` is a run of its own (its checkpoints carry its own fingerprint).
FINGERPRINT_IGNORED += ("training.compare_baseline",)
# `tempfile.mkdtemp` / `mkstemp` names: prefix + 8 characters of this alphabet.


_HELD: set[Path] = set()  # lock files this process holds


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (locked, holds another run, not writable, ...)."""


# ----------------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def read_lock(path: str | os.PathLike) -> dict[str, Any] | None:
    """The owner recorded in a lock file, or None if it is unreadable (e.g. cut short by a kill)."""
    try:
        owner = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


class OutputFolderLock:
    """Exclusive ownership of an output folder for one process (a context manager)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_NAME
        self.owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self.held = False

    def acquire(self) -> OutputFolderLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            except PermissionError as error:
                raise RunFolderError(
                    f"output_dir {self.path.parent} is read-only ({error.strerror}); choose a writable --output_dir"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.owner, handle)
            self.held = True
            _HELD.add(self.path.resolve())
            return self
        raise RunFolderError(f"{self.path}: could not take the lock (another run keeps taking it)")

    def _handle_existing(self) -> None:
        owner = read_lock(self.path)
        here = socket.gethostname()
        if owner is None:
            description = "an unreadable lock"
        else:
            description = f"pid {owner['pid']} on host {owner.get('host')} (started {owner.get('started')})"
        # Our own pid on a lock this process does not hold: a previous process with the same pid (e.g. in a
        # restarted container) left it.
        ours = owner is not None and owner["pid"] == os.getpid()
        dead = owner is not None and (
            (ours and self.path.resolve() not in _HELD) or (not ours and not _pid_alive(owner["pid"]))
        )
        if owner is not None and owner.get("host") == here and dead:
            logger.warning(
                "output_dir %s: stale lock of %s, which is no longer running; taking over",
                self.path.parent,
                description,
            )
            self.path.unlink(missing_ok=True)
            return
        if owner is not None and owner.get("host") == here:
            raise RunFolderError(
                f"output_dir {self.path.parent} is in use by another run ({description}); wait for it to finish "
                f"or choose another --output_dir (if pid {owner['pid']} is no pgp_peft run, delete {self.path})"
            )
        raise RunFolderError(
            f"output_dir {self.path.parent} is locked by {description}, which cannot be checked from this host; "
            f"if that run is no longer running, delete {self.path}"
        )

    def release(self) -> None:
        if self.held:
            owner = read_lock(self.path)
            if owner is not None and owner.get("pid") == self.owner["pid"]:
                self.path.unlink(missing_ok=True)
            _HELD.discard(self.path.resolve())
            self.held = False

    def __enter__(self) -> OutputFolderLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------- folder contents
def leftover_staging(output_dir: str | os.PathLike) -> list[Path]:
    """Staging folders / temporary files of atomic writes (`fileio.STAGING_PREFIX`) that a kill left in
    `output_dir`, in its `baseline/` run, or beside the folder (where `save_pretrained(output_dir)` stages)."""
    root = Path(output_dir)
    found: list[Path] = []
    for folder in (root, root / BASELINE_DIR):
        if folder.is_dir():
            found += [path for path in folder.iterdir() if path.name.startswith(STAGING_PREFIX)]
    if root.parent.is_dir():
        mine = f"{STAGING_PREFIX}{root.name}."
        found += [path for path in root.parent.iterdir() if path.name.startswith(mine)]
    return sorted(found)


def run_files(output_dir: str | os.PathLike) -> list[Path]:
    """The files and checkpoint folders of a previous run in `output_dir`."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(
        path
        for path in root.iterdir()
        if path.name in RUN_FILES
        or (path.is_dir() and (CHECKPOINT_DIR.fullmatch(path.name) or path.name == BASELINE_DIR))
    )


def _holds_run(files: list[Path]) -> bool:
    names = {path.name for path in files}
    # A README.md or a config.json alone may be the user's; results, weights or checkpoints are a run's,
    # and so is a `baseline/` run (`training.compare_baseline` writes it before the PGP run starts).
    if names & {"results.json", "model.safetensors"} or any(CHECKPOINT_DIR.fullmatch(n) for n in names):
        return True
    baseline = [path for path in files if path.name == BASELINE_DIR]
    return bool(baseline) and _holds_run(run_files(baseline[0]))


def prepare_output_dir(
    output_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False
) -> OutputFolderLock:
    """Create/check `output_dir`, take its lock, clean leftovers of a kill and refuse to mix two runs.

    Returns the held `OutputFolderLock` (release it, or use it as a context manager). Raises
    `RunFolderError` naming the folder and the fix.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite_output_dir contradict each other: pass one of them")
    root = Path(output_dir)
    if root.exists() and not root.is_dir():
        raise RunFolderError(f"output_dir {root} is a file, not a folder; choose another --output_dir")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(
            f"output_dir {root} cannot be created ({error.strerror}); choose a writable --output_dir"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunFolderError(f"output_dir {root} is read-only; choose a writable --output_dir")
    lock = OutputFolderLock(root).acquire()
    try:
        leftovers = leftover_staging(root)
        for path in leftovers:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if leftovers:
            logger.warning(
                "output_dir %s: removed %d staging item(s) left by an interrupted write: %s",
                root,
                len(leftovers),
                [path.name for path in leftovers],
            )
        previous = run_files(root)
        if previous and _holds_run(previous) and not resume:
            if not overwrite:
                shown = ", ".join(path.name for path in previous[:6]) + (", ..." if len(previous) > 6 else "")
                raise RunFolderError(
                    f"output_dir {root} holds another run ({shown}); pass --resume to continue it, "
                    "--overwrite_output_dir to replace it, or choose another --output_dir"
                )
            for path in previous:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            logger.warning("output_dir %s: --overwrite_output_dir removed the previous run's files", root)
    except BaseException:
        lock.release()
        raise
    return lock


# ----------------------------------------------------------------------------- the resume fingerprint
def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = value


def _ignored(key: str) -> bool:
    return any(key == f"recipe.{name}" or key.startswith(f"recipe.{name}.") for name in FINGERPRINT_IGNORED)


# TrainingArguments fields that define the optimisation of a run: always in the fingerprint (resolved).
FINGERPRINT_ARGUMENTS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "optim",
    "optim_args",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "lr_scheduler_type",
    "warmup_steps",
    "max_grad_norm",
    "bf16",
    "fp16",
)
# TrainingArguments fields that cannot change a run's numbers (where it writes and logs, how fast data
# loads, pushes) or that the continual trainer owns: never in the fingerprint. Every other field is in it
# when its resolved value differs from its default (so a spelled-out default, or a field a newer
# transformers adds, is no difference).
FINGERPRINT_IGNORED_ARGUMENTS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "run_name",
        "project",
        "report_to",
        "disable_tqdm",
        "debug",
        "skip_memory_metrics",
        "local_rank",
        "use_cpu",
        "ddp_timeout",
        "torch_empty_cache_steps",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "push_to_hub",
        "remove_unused_columns",
        "label_names",
        "load_best_model_at_end",
        "metric_for_best_model",
        "greater_is_better",
        "prediction_loss_only",
        "include_for_metrics",
        "batch_eval_metrics",
        "include_num_input_tokens_seen",
        "restore_callback_states_from_checkpoint",
        "enable_jit_checkpoint",
        "do_train",
        "do_eval",
        "do_predict",
    }
)
_IGNORED_ARGUMENT_PREFIXES = ("logging_", "log_", "hub_", "save_", "eval_", "trackio_")
TRAINING_ARGUMENT_NAMES = frozenset(item.name for item in dataclasses.fields(TrainingArguments))


def _json_value(value: Any) -> Any:
    if isinstance(value, Enum):
        value = value.value
    elif hasattr(value, "to_dict"):  # AcceleratorConfig
        value = value.to_dict()
    return json.loads(json.dumps(value, default=str))


def training_arguments_fingerprint(args: TrainingArguments) -> dict[str, Any]:
    """The `TrainingArguments` part of the fingerprint: `FINGERPRINT_ARGUMENTS` always, every other field
    whose resolved value differs from its default, none of `FINGERPRINT_IGNORED_ARGUMENTS` (JSON values)."""
    defaults = {item.name: item for item in dataclasses.fields(type(args)) if item.init}
    out = {name: _json_value(getattr(args, name, None)) for name in FINGERPRINT_ARGUMENTS}
    for name in sorted(TRAINING_ARGUMENT_NAMES & set(defaults)):
        if (
            name in out
            or name in FINGERPRINT_IGNORED_ARGUMENTS
            or name.startswith(_IGNORED_ARGUMENT_PREFIXES)
        ):
            continue
        value = _json_value(getattr(args, name, None))
        if value != _json_value(field_default(defaults[name])):
            out[name] = value
    return out


def run_fingerprint(
    *,
    adapter_config: dict[str, Any],
    training: dict[str, Any],
    manifest: dict[str, Any],
    seed: int,
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that defines a run, flattened to `{"recipe.training.num_train_epochs": 5.0, "seed": 42, ...}` (JSON values).

    `recipe`: the recipe after overrides (its hub section and logging knobs are left out);
    `adapter_config`: the adapter config's dict; `training`: the optimisation settings;
    `manifest`: the data split's manifest (dataset, class order, task sizes).
    """
    flat: dict[str, Any] = {}
    if recipe is not None:
        _flatten("recipe", recipe, flat)
    _flatten("adapter", adapter_config, flat)
    _flatten("training", training, flat)
    _flatten("data", manifest, flat)
    flat["seed"] = seed
    flat["pgp_peft_version"] = __version__
    flat = {key: value for key, value in flat.items() if not _ignored(key)}
    return json.loads(json.dumps(flat, default=str))


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: saved -> current` for every key whose value differs (or exists on one side only)."""

    def short(value: Any) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    missing = object()
    out = []
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key, missing), current.get(key, missing)
        if before != after:
            left = "(absent)" if before is missing else short(before)
            right = "(absent)" if after is missing else short(after)
            out.append(f"{key}: {left} -> {right}")
    return out
