"""`ContinualTrainer`: a `transformers.Trainer` that trains a task sequence with prompt gradient projection.

Per task t: register the task's classes, start the task (DualPrompt's shared-pool copy), build a
fresh optimizer and schedule, train with the class mask and the pull constraint while the
projection callback projects every gradient (after unscaling and clipping, before the step), update
the null-space memory at the boundary (`memory.TaskMemorySchedule`), evaluate every seen task
(class-IL and task-IL), write an atomic per-task checkpoint (`checkpoints.py`: adapter tensors +
continual state; never the backbone) and results.json, and call `on_task_end` of every
`ContinualCallback` among the Trainer's callbacks.

Each task is seeded with `args.seed + t`, so a run resumed from the checkpoint of task t-1 replays
task t exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import set_seed

from .callbacks import ContinualCallback, TaskEndFunction
from .cards import card_kwargs_from_results
from .checkpoints import (
    CHECKPOINT_PREFIX,
    STATE_NAME,
    TaskCheckpoint,
    latest_checkpoint,
    load_task_checkpoint,
    save_task_checkpoint,
)
from .data import (
    ROW_ID,
    BatchTransform,
    ContinualSplits,
    DecodedImageCache,
    RowIdTransform,
    collate,
    memory_subset,
    with_image_transform,
)
from .memory import NonFiniteMemoryError, TaskMemorySchedule, update_memory
from .metrics import (
    AccuracyMatrix,
    load_continual_learning_metric,
    plot_accuracy_curves,
    plot_accuracy_matrix,
    write_results_json,
)
from .model import PGPModel
from .query_cache import QueryCache
from .run_folder import TRAINING_ARGUMENT_NAMES, run_fingerprint, training_arguments_fingerprint

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "STATE_NAME",
    "ContinualCallback",
    "ContinualResult",
    "ContinualTrainer",
    "ProjectionCallback",
    "TrainingDivergedError",
]


class TrainingDivergedError(FloatingPointError):
    """Training produced non-finite values (loss, parameters or memory Gram matrices)."""


def _without_secrets(recipe: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recipe as results.json and the model card show it: a Hub token given in it is never written."""
    if recipe is None or not (recipe.get("hub") or {}).get("token"):
        return recipe
    return {**recipe, "hub": {**recipe["hub"], "token": "<redacted>"}}


def continual_scores(matrix: AccuracyMatrix) -> dict[str, Any]:
    """The packaged `evaluate` continual-learning metric on `matrix` (see `metrics.summarize`)."""
    return load_continual_learning_metric().compute(accuracy_matrix=matrix.values.tolist())


def task_log_record(result: ContinualResult, task_id: int) -> dict[str, float]:
    """The flat record logged after task `task_id`: each seen task's class-IL accuracy, the average
    accuracy (class-IL, task-IL), both forgetting definitions, BWT and every protected space's memory
    rank. Keys start with `eval_`, which the integrations file under `eval/`."""
    summary = result.summary
    record = {f"eval_accuracy_task_{i}": float(a) for i, a in enumerate(summary["final_accuracies"])}
    record.update(
        eval_average_accuracy=summary["average_accuracy"],
        eval_forgetting_paper=summary["forgetting_paper"],
        eval_forgetting_reference=summary["forgetting_reference"],
        eval_backward_transfer=summary["backward_transfer"],
        eval_task_il_average_accuracy=summary["task_il"]["average_accuracy"],
    )
    ranks = result.memory_ranks[task_id] if task_id < len(result.memory_ranks) else {}
    record.update({f"eval_memory_rank_{name}": int(rank) for name, rank in ranks.items()})
    return record


class ProjectionCallback(TrainerCallback):
    """Projects protected gradients before every optimizer step (and, with `project_update`, the update).

    `on_pre_optimizer_step` runs after the DDP all-reduce, the fp16 unscale and gradient clipping, and
    before `optimizer.step()`: the paper's order (clip -> project -> step).
    """

    def __init__(self, model: PGPModel) -> None:
        self.model = model
        self._snapshots: list[torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.model.project_gradients_()
        if (
            self.model.config.project_update
            and self.model.config.use_pgp
            and not self.model.memory.is_empty()
        ):
            self._snapshots = self.model.snapshot_protected()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._snapshots is not None:
            self.model.project_updates_(self._snapshots)
            self._snapshots = None


@dataclass
class TaskCollator:
    """Stacks a batch and adds the current task id (the model's prompt and class masks need it)."""

    task_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(examples)
        batch["task_id"] = torch.full((batch["labels"].shape[0],), self.task_id, dtype=torch.long)
        return batch


@dataclass
class ContinualResult:
    """What a continual run produced: class-IL and task-IL accuracy matrices and their summaries."""

    accuracy: AccuracyMatrix
    task_il_accuracy: AccuracyMatrix
    summary: dict[str, Any] = field(default_factory=dict)
    memory_ranks: list[dict[str, int]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase: train, memory, evaluation
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # this process's CPU time per phase


class ContinualTrainer(Trainer):
    """Trains `model` over the tasks of `splits`, one `Trainer.train()` per task.

    Args:
        model: a `PGPModel`.
        args: `TrainingArguments` (output_dir holds per-task checkpoints and results; use
            `remove_unused_columns=False` with lazily transformed datasets).
        splits: the class-incremental splits (`data.make_class_incremental_splits`).
        train_transform / eval_transform: batched transforms for `Dataset.with_transform`.
        memory_transform: transform for the memory samples (default: train_transform in
            `projection_space="reference"`, as the reference draws them from its training loader;
            eval_transform in feature mode).
        first_task_args: TrainingArguments fields that differ on the first task (CLIP: lr, weight decay).
        online: one pass over each task's stream (online class-IL).
        task_end_callbacks: deprecated; pass a `ContinualCallback` (its `on_task_end`) in `callbacks=`.
        recipe: the recipe dict, recorded in results.json and the model card.
        eval_query_cache: compute each test image's frozen query once per run and reuse it in every
            later evaluation (needs a deterministic eval transform, as evaluation always is).
        train_query_cache: the same for training images, from the second epoch on; None (default) =
            on when the training transform is a `BatchTransform` without augmentation.
        decode_cache: decode each image once per run and keep the uint8 pixels (`DecodedImageCache`,
            up to 1 GiB per split; only with `BatchTransform`s); the transform still runs every time.
        compile_backbone: `torch.compile` the frozen transformer (`PGPModel.compile_backbone`); off by
            default: every new batch shape compiles first, which a short run does not win back
            (benchmarks/README.md §5).
    """

    def __init__(
        self,
        model: PGPModel,
        args: TrainingArguments,
        *,
        splits: ContinualSplits | None = None,
        train_transform: Callable | None = None,
        eval_transform: Callable | None = None,
        memory_transform: Callable | None = None,
        first_task_args: dict[str, Any] | None = None,
        online: bool = False,
        task_end_callbacks: list[Callable] | None = None,
        recipe: dict[str, Any] | None = None,
        eval_query_cache: bool = True,
        train_query_cache: bool | None = None,
        decode_cache: bool = True,
        compile_backbone: bool = False,
        **kwargs: Any,
    ) -> None:
        if getattr(args, "remove_unused_columns", False):
            args.remove_unused_columns = False  # lazily decoded columns would be dropped otherwise
        if args.save_strategy != "no":
            # global_step restarts every task, so checkpoint-<step> folders of different tasks would
            # collide; the per-task checkpoints written by train_continual are the resumable ones.
            logger.warning(
                "save_strategy=%r ignored: ContinualTrainer writes checkpoint-task-<t>", args.save_strategy
            )
            args.save_strategy = "no"
        self._check_distributed_support(args)
        super().__init__(model=model, args=args, data_collator=TaskCollator(0), **kwargs)
        # `accelerate launch` (config file / --use_fsdp / --use_deepspeed) can enable sharding without
        # any TrainingArguments field: the Trainer's flags cover both routes.
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            which = "FSDP" if self.is_fsdp_enabled else "DeepSpeed"
            raise ValueError(
                f"PGP projection needs whole gradients: the accelerate configuration enables {which}, which "
                "shards them and is not supported"
            )
        self.splits = splits
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        if memory_transform is None:
            reference = model.config.projection_space == "reference"
            memory_transform = (
                train_transform if reference and train_transform is not None else eval_transform
            )
        self.memory_transform = memory_transform
        self.first_task_args = dict(first_task_args or {})
        self.online = online
        if task_end_callbacks:
            warnings.warn(
                "task_end_callbacks is deprecated: pass a ContinualCallback subclass (its on_task_end) in "
                "callbacks= or trainer.add_callback",
                FutureWarning,
                stacklevel=2,
            )
            for function in task_end_callbacks:
                self.add_callback(TaskEndFunction(function))
        self.recipe = recipe
        # Extra top-level entries of results.json (the runner's no-PGP baseline, for instance).
        self.extra_results: dict[str, Any] = {}
        self.current_task = 0
        self.projection_callback = ProjectionCallback(model)
        self.add_callback(self.projection_callback)
        self._later_task_args = {key: getattr(args, key) for key in self.first_task_args}
        # Taken now: the per-task configuration changes these fields while the run goes on.
        self._run_arguments = training_arguments_fingerprint(args)
        # Loaded now (cached per process): `evaluate` writes its modules cache, which must not first fail
        # after a task of training (e.g. a read-only home).
        load_continual_learning_metric()
        self.eval_query_cache = eval_query_cache
        augmented = isinstance(train_transform, BatchTransform) and train_transform.augment
        if train_query_cache is None:
            train_query_cache = isinstance(train_transform, BatchTransform) and not augmented
        elif train_query_cache and augmented:
            raise ValueError(
                "train_query_cache=True needs an unaugmented training transform: a random crop changes an "
                "image's query every epoch; leave train_query_cache unset (None) or turn augmentation off"
            )
        self.train_query_cache = train_query_cache
        self.decode_cache = decode_cache
        if compile_backbone:
            model.compile_backbone()
        self.query_cache = QueryCache(model.hidden_size, device=self.args.device)
        self._decoded = {"train": DecodedImageCache(), "test": DecodedImageCache()}

    @staticmethod
    def _check_distributed_support(args: TrainingArguments) -> None:
        """Refuse settings that would silently break the projection or the continual protocol."""
        if getattr(args, "fsdp", None) or (getattr(args, "fsdp_config", None) or {}).get("fsdp_version"):
            raise ValueError("PGP projection needs whole gradients: FSDP shards them and is not supported")
        if getattr(args, "deepspeed", None):
            raise ValueError(
                "PGP projection needs whole gradients: DeepSpeed ZeRO shards them and is not supported"
            )
        if args.n_gpu > 1:
            raise ValueError(
                f"{args.n_gpu} GPUs in one process would use nn.DataParallel, whose replicas do not see the "
                "prompt-insertion hook: launch one process per GPU instead "
                "(`accelerate launch recipes/train_cl.py ...` or `torchrun --nproc_per_node N ...`)"
            )
        if getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False):
            raise ValueError(
                "gradient_checkpointing=True is not supported: the backbone is frozen and PGPModel is not a "
                "PreTrainedModel; turn it off (activation memory is that of the prompted forward only)"
            )
        if args.label_smoothing_factor:
            raise ValueError(
                "label_smoothing_factor must be 0: the class mask sets other tasks' logits to -inf, and "
                "smoothing onto them gives an infinite loss (the paper uses plain cross-entropy)"
            )

    # ------------------------------------------------------------------ Trainer hooks
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self._training_inputs(inputs)
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        finite = torch.isfinite(loss.detach()).all()
        if self.accelerator.num_processes > 1:
            # Every rank must stop together, or the others hang in the next all-reduce.
            finite = self.accelerator.reduce(finite.float().reshape(1), reduction="sum").item() == (
                self.accelerator.num_processes
            )
        if not finite:
            self._raise_diverged(f"non-finite loss ({loss.item()})")
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ divergence
    def _raise_diverged(self, what: str) -> None:
        """Stop with a `TrainingDivergedError` naming task, step, the setting to lower and the intact checkpoint."""
        latest = self.latest_checkpoint()
        intact = (
            f"the last intact checkpoint is {latest} (continue from it with --resume)"
            if latest is not None
            else f"no task had finished, so {self.args.output_dir} holds no checkpoint of this run"
        )
        raise TrainingDivergedError(
            f"training diverged in task {self.current_task} at step {self.state.global_step}: {what}. Lower the "
            f"learning rate (recipe: training.base_lr; now lr={self.args.learning_rate:g}) or "
            f"training.max_grad_norm (now {self.args.max_grad_norm}); {intact}"
        )

    def check_finite_parameters(self) -> None:
        """Raise `TrainingDivergedError` if any adapter parameter holds NaN/inf (one check per task)."""
        bad = [
            name
            for name, parameter in self.model.named_parameters()
            if not name.startswith("backbone.") and not bool(torch.isfinite(parameter.detach()).all())
        ]
        if bad:
            self._raise_diverged(f"non-finite values in parameter(s) {bad[:8]}")

    def train(self, *args: Any, **kwargs: Any):
        """`Trainer.train` for the current task, with the objects that exist before it frozen for the
        garbage collector (`gc.freeze`): every `train()` starts with accelerate's `free_memory()`,
        whose full `gc.collect()` would otherwise walk every Python object of the process (about
        0.3 s per task with transformers, datasets and matplotlib loaded; benchmarks/README.md §5).
        Objects created during training are collected as usual; the frozen ones are unfrozen after."""
        if gc.get_freeze_count():  # the caller manages frozen objects already: leave them alone
            return super().train(*args, **kwargs)
        gc.freeze()
        try:
            return super().train(*args, **kwargs)
        finally:
            gc.unfreeze()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # global_step restarts every task: tag every record with the task it belongs to.
        logs = {**logs, "task": self.current_task}
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer checkpoints hold the adapter only, never the frozen backbone."""
        if self.args.should_save:
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir or self.args.output_dir)

    def _training_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The model's inputs for a training batch: `row_id` becomes the cached frozen `query` (when
        `train_query_cache`), and the task id the int it is (every batch comes from the current task;
        an int keeps the prompt-mask check on the host instead of reading a device tensor every step)."""
        inputs = dict(inputs)
        row_ids = inputs.pop(ROW_ID, None)
        if isinstance(inputs.get("task_id"), torch.Tensor):
            inputs["task_id"] = self.current_task
        if row_ids is not None and self.train_query_cache and self._uses_query:
            inputs["query"] = self._cached_query("train", row_ids, inputs["pixel_values"])
        return inputs

    @property
    def _uses_query(self) -> bool:
        """Whether the method selects prompts by a frozen query (L2P, DualPrompt; not CLIP)."""
        return self.model.method.uses_query

    def _cached_query(self, split: str, row_ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
        # Compute a query as the uncached path would: in training inside the Trainer's autocast-wrapped
        # forward, in evaluation (which runs without autocast) in the backbone's own precision.
        precision = self.accelerator.autocast() if split == "train" else contextlib.nullcontext()
        with precision:
            return self.query_cache.get_or_compute(split, row_ids, pixel_values, self.model.backbone.query)

    # ------------------------------------------------------------------ data helpers
    def _transformed(self, dataset, transform, split: str | None = None):
        """Lazy decoding inside the transform, so a corrupt image is reported with its row id. With
        `split` ("train" / "test") each row also carries its `row_id` (for the query cache) and, with
        `decode_cache`, images are decoded once per run."""
        if transform is None:
            return dataset
        if split is not None and ROW_ID in dataset.column_names:
            decoded = None
            # DataLoader workers are not persistent here: a cache filled in a worker dies with its epoch.
            if (
                self.decode_cache
                and self.args.dataloader_num_workers == 0
                and isinstance(transform, BatchTransform)
            ):
                decoded = self._decoded[split]
            transform = RowIdTransform(transform, self.splits.image_column, decoded)
        return with_image_transform(dataset, transform, self.splits.image_column)

    @property
    def _pin_memory(self) -> bool:
        return bool(self.args.dataloader_pin_memory) and self.args.device.type == "cuda"

    def _eval_loader(self, dataset) -> DataLoader:
        loader = DataLoader(
            self._transformed(dataset, self.eval_transform, "test"),
            batch_size=self.args.per_device_eval_batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self._pin_memory,
        )
        return self.accelerator.prepare(loader)

    def _memory_batches(self, task_id: int):
        """This process's shard of the task's memory samples: a seeded random subset of the task's
        training rows (the rows are grouped by class, so the first rows would miss classes)."""
        dataset = memory_subset(
            self.splits.train[task_id], self.model.config.memory_samples, self.args.seed + task_id
        )
        reference = self.model.config.projection_space == "reference"
        if self.accelerator.num_processes > 1 and not reference:
            dataset = dataset.shard(
                self.accelerator.num_processes, self.accelerator.process_index, contiguous=True
            )
        return DataLoader(
            self._transformed(dataset, self.memory_transform, "train"),
            batch_size=self.args.per_device_eval_batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self._pin_memory,
        )

    # ------------------------------------------------------------------ memory
    def _sync_memory(self) -> None:
        """Make every rank hold rank 0's bases bit for bit."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            for buffer in self.model.memory.buffers():
                buffer.copy_(broadcast(buffer.clone()))

    def update_memory(self, task_id: int) -> dict[str, int]:
        if not self.model.config.use_pgp:
            return {}
        reduce_fn = None
        if self.accelerator.num_processes > 1:
            reduce_fn = lambda tensor: self.accelerator.reduce(tensor, reduction="sum")  # noqa: E731
        query_lookup = None
        if (
            self.train_query_cache
            and self.memory_transform == self.train_transform
            and self.accelerator.mixed_precision == "no"  # memory runs in fp32; cached queries would not be
        ):
            # L2P's key space needs the frozen queries of the memory rows: training stored them.
            query_lookup = lambda rows: self.query_cache.lookup("train", rows)  # noqa: E731
        try:
            updates = update_memory(
                self.model,
                self._memory_batches(task_id),
                task_id,
                reduce_fn=reduce_fn,
                query_lookup=query_lookup,
            )
        except NonFiniteMemoryError as error:
            self._raise_diverged(str(error))
        except torch.linalg.LinAlgError as error:  # finite but astronomically large values
            self._raise_diverged(f"the memory update's eigendecomposition failed ({error})")
        self._sync_memory()
        ranks = self.model.memory.ranks()
        if self.is_world_process_zero():
            logger.info(
                "task %d: memory updated, ranks %s, captured energy %s",
                task_id,
                ranks,
                {name: round(update.captured, 4) for name, update in updates.items()},
            )
        return ranks

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def evaluate_task(self, task_id: int) -> tuple[float, float]:
        """(class-IL accuracy, task-IL accuracy) in percent on task `task_id`'s test set."""
        model = self.model
        was_training = model.training
        model.eval()
        correct_cil = correct_til = total = 0
        task_mask = model.class_task == task_id
        seen_mask = model.class_task >= 0
        for batch in self._eval_loader(self.splits.test[task_id]):
            query = None
            if self.eval_query_cache and self._uses_query and ROW_ID in batch:
                query = self._cached_query("test", batch[ROW_ID], batch["pixel_values"])
            logits = model(batch["pixel_values"], class_mask="all", query=query).logits
            labels = batch["labels"].to(logits.device)
            cil = logits.masked_fill(~seen_mask.to(logits.device), float("-inf")).argmax(-1)
            til = logits.masked_fill(~task_mask.to(logits.device), float("-inf")).argmax(-1)
            cil, til, labels = self.accelerator.gather_for_metrics((cil, til, labels))
            correct_cil += int((cil == labels).sum())
            correct_til += int((til == labels).sum())
            total += int(labels.numel())
        model.train(was_training)
        if total == 0:
            return math.nan, math.nan
        return 100.0 * correct_cil / total, 100.0 * correct_til / total

    # ------------------------------------------------------------------ checkpoints
    def save_task_checkpoint(self, task_id: int, result: ContinualResult) -> None:
        """Atomically write `checkpoint-task-{t}` (see `checkpoints.py`; main process only)."""
        if not self.args.should_save:
            return
        save_task_checkpoint(
            self.model,
            self.args.output_dir,
            task_id=task_id,
            num_tasks=self.splits.num_tasks,
            accuracy=result.accuracy,
            task_il_accuracy=result.task_il_accuracy,
            memory_ranks=result.memory_ranks,
            manifest=self.splits.to_manifest(),
            seed=self.args.seed,
            fingerprint=self.run_fingerprint(),
        )

    def run_fingerprint(self) -> dict[str, Any]:
        """What defines this run (see `run_folder.run_fingerprint`): a resume must match it exactly."""
        recipe = self.recipe
        if recipe is not None and isinstance(recipe.get("training"), dict):
            # TrainingArguments' own keys are fingerprinted resolved (`_run_arguments`); the PGP keys as given.
            pgp_keys = {k: v for k, v in recipe["training"].items() if k not in TRAINING_ARGUMENT_NAMES}
            recipe = {**recipe, "training": pgp_keys}
        return run_fingerprint(
            recipe=recipe,
            adapter_config=self.model.config.to_dict(),
            training={**self._run_arguments, "first_task": self.first_task_args, "online": self.online},
            manifest=self.splits.to_manifest(),
            seed=self.args.seed,
        )

    def latest_checkpoint(self) -> Path | None:
        """The newest complete `checkpoint-task-<t>` in output_dir, or None."""
        return latest_checkpoint(self.args.output_dir)

    def _resume(self, resume_from_checkpoint: bool | str) -> tuple[int, ContinualResult | None]:
        """Load the checkpoint (True: the latest in output_dir) into the model; returns the first task to
        train and the restored result (None when there is no checkpoint)."""
        path = self.latest_checkpoint() if resume_from_checkpoint is True else Path(resume_from_checkpoint)
        if path is None:
            logger.warning("no checkpoint found in %s: starting from the first task", self.args.output_dir)
            return 0, None
        checkpoint: TaskCheckpoint = load_task_checkpoint(
            self.model,
            path,
            num_tasks=self.splits.num_tasks,
            manifest=self.splits.to_manifest(),
            fingerprint=self.run_fingerprint(),
        )
        start = checkpoint.task_id + 1
        for task_id in range(start):
            self.model.register_task_classes(task_id, self.splits.task_classes[task_id])
        logger.info("resumed from %s: continuing with task %d", path, start)
        result = ContinualResult(
            accuracy=checkpoint.accuracy,
            task_il_accuracy=checkpoint.task_il_accuracy,
            memory_ranks=checkpoint.memory_ranks,
        )
        return start, result

    # ------------------------------------------------------------------ the loop
    def _configure_task(self, task_id: int) -> None:
        values = self.first_task_args if task_id == 0 else self._later_task_args
        for key, value in values.items():
            setattr(self.args, key, value)
        if self.online:
            self.args.num_train_epochs = 1
            self.args.max_steps = -1
        # A fresh optimizer and schedule per task (as the paper).
        self.optimizer = None
        self.lr_scheduler = None
        self.data_collator = TaskCollator(task_id)
        self.train_dataset = self._transformed(self.splits.train[task_id], self.train_transform, "train")
        # Which parameters train can change per task (CLIP's text contexts): let the Trainer wrap the
        # model anew, so a DDP wrapper registers the current task's trainable parameters.
        self.model_wrapped = self.model

    def train_continual(
        self, splits: ContinualSplits | None = None, resume_from_checkpoint: bool | str | None = None
    ) -> ContinualResult:
        """Train every task of `splits` in order; returns the accuracy matrices and their summary.

        `resume_from_checkpoint`: True (latest `checkpoint-task-*` in output_dir) or a path; the run
        continues with the task after the checkpoint's.
        """
        self._prepare_splits(splits)
        num_tasks = self.splits.num_tasks
        result = ContinualResult(AccuracyMatrix(num_tasks), AccuracyMatrix(num_tasks))
        start = 0
        if resume_from_checkpoint:
            start, restored = self._resume(resume_from_checkpoint)
            result = restored or result

        def timed_memory_update(task_id: int) -> None:
            with self._phase(result, "memory"):
                self.update_memory(task_id)

        memory_schedule = TaskMemorySchedule(self.model, timed_memory_update)
        for task_id in range(start, num_tasks):
            self.current_task = task_id
            set_seed(self.args.seed + task_id)
            self.model.register_task_classes(task_id, self.splits.task_classes[task_id])
            self.model.begin_task(task_id)
            memory_schedule.before_training(task_id)  # reference L2P collects here, staged

            self._configure_task(task_id)
            logger.info("task %d/%d: %d training samples", task_id + 1, num_tasks, len(self.train_dataset))
            with self._phase(result, "train"):
                self.train()
            self.check_finite_parameters()  # before the memory update: its eigh would fail on NaN

            memory_schedule.after_training(task_id)
            result.memory_ranks.append(self.model.memory.ranks())

            with self._phase(result, "evaluation"):
                self._evaluate_seen_tasks(task_id, result)
            self._log_task_resources(task_id, result)
            self._summarize(result)

            self.save_task_checkpoint(task_id, result)
            self.write_results(result, plots=task_id == num_tasks - 1 or self._plots_read_each_task)
            self.log_task_metrics(task_id, result)
            self._call_task_end(task_id, result)
        if start >= num_tasks:
            self._summarize(result)
        return result

    def _prepare_splits(self, splits: ContinualSplits | None) -> None:
        """Take `splits` (new splits reset the per-run caches) and check them against the model's head."""
        if splits is not None:
            self.splits = splits
            self.query_cache.clear()  # row ids refer to the previous splits' rows
            self._decoded = {"train": DecodedImageCache(), "test": DecodedImageCache()}
        if self.splits is None:
            raise ValueError("train_continual needs splits (data.make_class_incremental_splits)")
        for task_id, classes in enumerate(self.splits.task_classes):
            if max(classes) >= self.model.num_classes:
                raise ValueError(
                    f"task {task_id} uses class id {max(classes)} but the model head has {self.model.num_classes} classes"
                )
        if self.model.config.class_names is None and len(self.splits.class_names) == self.model.num_classes:
            self.model.config.class_names = list(self.splits.class_names)  # so predict() returns names

    def _evaluate_seen_tasks(self, task_id: int, result: ContinualResult) -> None:
        """Row `task_id` of both accuracy matrices: every task seen so far."""
        for evaluated in range(task_id + 1):
            cil, til = self.evaluate_task(evaluated)
            result.accuracy.record(task_id, evaluated, cil)
            result.task_il_accuracy.record(task_id, evaluated, til)

    @staticmethod
    def _summarize(result: ContinualResult) -> None:
        result.summary = continual_scores(result.accuracy)
        result.summary["task_il"] = continual_scores(result.task_il_accuracy)

    def _log_task_resources(self, task_id: int, result: ContinualResult) -> None:
        if self.is_world_process_zero():
            logger.info(
                "task %d: seconds per phase so far %s; query cache %.1f MiB (%d hits, %d computed), "
                "decoded images %.1f MiB",
                task_id,
                {name: round(value, 2) for name, value in result.seconds.items()},
                self.query_cache.nbytes / 2**20,
                self.query_cache.hits,
                self.query_cache.misses,
                sum(cache.nbytes for cache in self._decoded.values()) / 2**20,
            )

    def _call_task_end(self, task_id: int, result: ContinualResult) -> None:
        """`on_task_end` of every `ContinualCallback` registered with the Trainer, in registration order."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ContinualCallback):
                callback.on_task_end(
                    self.args, self.state, self.control, trainer=self, task_id=task_id, result=result
                )

    def log_task_metrics(self, task_id: int, result: ContinualResult) -> None:
        """Send the continual metrics after task `task_id` to the loggers and trackers (`report_to`).

        One `Trainer.log` record (`task_log_record`), so every integration callback receives it through
        `on_log`. Integrations step by `state.global_step`, which restarts every task; for this record it
        is the number of tasks learned (`task_id + 1`), so the continual curves are stepped by task. With
        TensorBoard the accuracy-matrix heat map goes along as an image at the same step.
        """
        steps = self.state.global_step
        self.state.global_step = task_id + 1
        try:
            self.log(task_log_record(result, task_id))
            image = Path(self.args.output_dir) / "accuracy_matrix.png"
            for callback in self.callback_handler.callbacks:
                writer = getattr(callback, "tb_writer", None)
                if isinstance(callback, TensorBoardCallback) and writer is not None and image.is_file():
                    with Image.open(image) as png:
                        pixels = np.asarray(png.convert("RGB"))
                    writer.add_image("eval/accuracy_matrix", pixels, task_id + 1, dataformats="HWC")
                    writer.flush()
        finally:
            self.state.global_step = steps

    @staticmethod
    @contextlib.contextmanager
    def _phase(result: ContinualResult, name: str):
        """Add the wall time of the block to `result.seconds[name]`, this process's CPU time (all its
        threads; not DataLoader worker processes) to `result.cpu_seconds[name]`."""
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            result.seconds[name] = result.seconds.get(name, 0.0) + time.perf_counter() - started
            result.cpu_seconds[name] = result.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_started

    def results_payload(self, result: ContinualResult) -> dict[str, Any]:
        """Everything results.json records about the run."""
        return {
            "summary": result.summary,
            "setting": "online class-IL" if self.online else "class-IL",
            "accuracy_matrix": result.accuracy.to_dict(),
            "task_il_accuracy_matrix": result.task_il_accuracy.to_dict(),
            "memory_ranks": result.memory_ranks,
            "manifest": self.splits.to_manifest(),
            "config": self.model.config.to_dict(),
            "recipe": _without_secrets(self.recipe),
            **self.extra_results,
        }

    def model_card_kwargs(self, result: ContinualResult) -> dict[str, Any]:
        """What the model card needs to describe this run (see `cards.build_model_card`)."""
        return card_kwargs_from_results(self.results_payload(result))

    @property
    def _plots_read_each_task(self) -> bool:
        """Whether something reads the plots after every task: TensorBoard logs the heat map, and a
        `ContinualCallback` may publish the run folder (the runner's per-task Hub push). Otherwise
        `train_continual` renders them once, after the last task (results.json is written every task)."""
        return any(
            isinstance(callback, (ContinualCallback, TensorBoardCallback))
            for callback in self.callback_handler.callbacks
        )

    def write_results(self, result: ContinualResult, plots: bool = True) -> None:
        """results.json and (with `plots`) the accuracy-matrix heatmap and per-task curves in output_dir
        (main process only)."""
        if not self.args.should_save:
            return
        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_results_json(out / "results.json", self.results_payload(result))
        if not plots:
            return
        plot_accuracy_matrix(result.accuracy.values, out / "accuracy_matrix.png")
        plot_accuracy_curves(result.accuracy.values, out / "accuracy_curves.png")
