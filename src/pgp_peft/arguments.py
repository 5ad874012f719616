"""The arguments of a continual run as dataclasses, parsed with `transformers.HfArgumentParser`.

The shape of transformers' `examples/pytorch/*/run_*.py`: one dataclass per recipe section.

    model:    `ModelArguments` (the frozen backbone)
    adapter:  the method's config class (`PromptGradientProjectionConfig` and its per-method subclasses)
    data:     `DataArguments` (dataset, columns, splits, task split, preprocessing)
    training: `ContinualTrainingArguments`, a `TrainingArguments` subclass: every `TrainingArguments` field
              by its own name, plus the few PGP keys (`base_lr`, the first-task overrides, `online`, ...)
    hub:      `HubArguments` (where the adapter is pushed)

`ScriptArguments` holds the command's own flags (`--recipe`, `--output_dir`, `--resume`, ...).
`parse_section_values` type-checks a section's values (from a YAML file or `section.key=value`
overrides) against its dataclass with `HfArgumentParser`, so a file and the command line accept the same
values and a wrong type is refused naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Union

from transformers import HfArgumentParser, TrainingArguments

logger = logging.getLogger(__name__)

DEMO_DATASET = "pgp_peft:fashion_mnist_demo"
# lr = base_lr * per_device_train_batch_size / 256: the learning-rate rule of the authors' code (L2P,
# DualPrompt and PGP configs: `args.lr * batch_size / 256`, with `unscale_lr` on, i.e. the per-device batch).
LR_REFERENCE_BATCH = 256
DEFAULT_BASE_LR = 0.03  # the L2P / DualPrompt / PGP default base learning rate


@dataclass
class ModelArguments:
    """The frozen backbone the adapter attaches to."""

    base_model_name_or_path: str = field(
        default="google/vit-base-patch16-224-in21k",
        metadata={
            "help": "Hub id, local folder, or a built-in backbone (`pgp_peft:vit-tiny-patch4-32-cifar10`)"
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the backbone"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa (default) or eager; prompts work with both"}
    )
    layer_norm_eps: float | None = field(
        default=None, metadata={"help": "the backbone's LayerNorm epsilon (timm's ViT: 1e-6)"}
    )


@dataclass
class DataArguments:
    """Which dataset, how it is cut into tasks, and how images are preprocessed."""

    dataset: str = field(
        default=DEMO_DATASET,
        metadata={"help": "Hub dataset id, local `imagefolder` directory, or the shipped demo subset"},
    )
    train_split: str = "train"
    test_split: str | None = field(
        default="test", metadata={"help": "null: hold out `holdout_fraction` of the train split"}
    )
    image_column: str = "image"
    label_column: str = "label"
    holdout_fraction: float | None = None
    holdout_seed: int = 0
    num_tasks: int = 5
    classes_per_task: int | None = field(default=None, metadata={"help": "null: num_classes / num_tasks"})
    class_order_seed: int | None = field(default=None, metadata={"help": "null: classes in label order"})
    image_size: int = 224
    preprocessing: Literal["reference", "processor"] = field(
        default="reference",
        metadata={
            "help": "reference: resize to [0, 1] as the authors' code; processor: the checkpoint's own"
        },
    )
    augment: bool = field(default=False, metadata={"help": "random resized crop + flip for training"})
    max_train_per_task: int | None = None
    max_test_per_task: int | None = None
    class_names: list[str] | None = None


@dataclass
class HubArguments:
    """Where the trained adapter is pushed (the recipe's `hub` section)."""

    push_to_hub: bool = False
    hub_model_id: str | None = None
    private: bool | None = None
    strategy: Literal["end", "every_task"] = field(
        default="end", metadata={"help": "end: one commit; every_task: a commit after each task"}
    )
    token: str | None = None


# TrainingArguments fields the continual trainer decides itself; a recipe naming one is refused, with why.
_NO_EFFECT = "no effect in a continual run (every seen task is evaluated after each task; see README)"
_PER_TASK_CHECKPOINTS = "the continual trainer checkpoints after every task (checkpoint-task-<t>)"
CONTROLLED_TRAINING_FIELDS: dict[str, str] = {
    "output_dir": "pass --output_dir",
    "overwrite_output_dir": "pass --overwrite_output_dir",
    "resume_from_checkpoint": "pass --resume",
    "push_to_hub": "use hub.push_to_hub (or --push_to_hub)",
    "hub_model_id": "use hub.hub_model_id (or --hub_model_id)",
    "hub_strategy": "use hub.strategy (or --hub_strategy)",
    "hub_token": "use hub.token",
    "hub_private_repo": "use hub.private (or --hub_private)",
    "hub_always_push": "pgp_peft pushes with hub.strategy (end or every_task)",
    "hub_revision": "pgp_peft pushes to the repo's main branch",
    "save_strategy": _PER_TASK_CHECKPOINTS,
    "save_steps": _PER_TASK_CHECKPOINTS,
    "save_total_limit": _PER_TASK_CHECKPOINTS,
    "save_only_model": _PER_TASK_CHECKPOINTS,
    "save_on_each_node": _PER_TASK_CHECKPOINTS,
    "restore_callback_states_from_checkpoint": _PER_TASK_CHECKPOINTS,
    "remove_unused_columns": "the trainer needs the task id and row id columns",
    "label_names": "the labels are the dataset's label column (data.label_column)",
    **dict.fromkeys(
        [
            "eval_strategy",
            "eval_steps",
            "eval_delay",
            "eval_on_start",
            "eval_do_concat_batches",
            "eval_use_gather_object",
            "eval_accumulation_steps",
            "prediction_loss_only",
            "include_for_metrics",
            "batch_eval_metrics",
            "load_best_model_at_end",
            "metric_for_best_model",
            "greater_is_better",
            "do_train",
            "do_eval",
            "do_predict",
        ],
        _NO_EFFECT,
    ),
}


@dataclass
class ContinualTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the defaults of the paper's protocol, and the PGP-specific keys.

    The learning rate follows the authors' rule `learning_rate = base_lr * per_device_train_batch_size / 256`
    when `base_lr` is set (the default 0.03 when neither is given); with only `learning_rate` it is used as
    given. Both given: `base_lr` decides with a warning (a recipe setting both is refused). `bf16` left unset (None)
    means bf16 autocast on a CUDA device that supports it and fp32 otherwise; the adapter's parameters, its
    gradients and the projection stay float32 either way.
    """

    # --- TrainingArguments fields whose default differs here (the L2P / DualPrompt protocol)
    num_train_epochs: float = field(default=5.0, metadata={"help": "epochs per task"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "batch size per device"})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "evaluation batch size per device"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "derived from base_lr; set base_lr to null to give it directly"}
    )
    optim: str = field(
        default="adamw_torch",
        metadata={
            "help": "adamw_torch (Adam when weight_decay is 0, as the paper), sgd, ... (OptimizerNames)"
        },
    )
    lr_scheduler_type: str = field(default="constant", metadata={"help": "a transformers SchedulerType"})
    logging_steps: float = 20
    report_to: None | str | list[str] = field(
        default="none",
        metadata={"help": "none, all, an integration name, a comma-separated string or a list of names"},
    )
    save_strategy: str = field(default="no", metadata={"help": "fixed: the trainer checkpoints per task"})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "fixed: task ids travel with the batch"}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "null: bf16 autocast on a CUDA device with bf16 support"}
    )
    dataloader_pin_memory: bool | None = field(
        default=None, metadata={"help": "null: pinned memory when a CUDA device is used"}
    )

    # --- PGP-specific keys
    base_lr: float | None = field(
        default=None,
        metadata={
            "help": "learning_rate = base_lr * per_device_train_batch_size / 256 (default 0.03 when "
            "learning_rate is not given either)"
        },
    )
    first_task_base_lr: float | None = field(
        default=None, metadata={"help": "base_lr of the first task only (CLIP-PGP)"}
    )
    first_task_weight_decay: float | None = field(
        default=None, metadata={"help": "weight_decay of the first task only (CLIP-PGP)"}
    )
    online: bool = field(default=False, metadata={"help": "online class-IL: one pass over each task"})
    compare_baseline: bool = field(
        default=False,
        metadata={
            "help": "also run the same recipe without projection into <output_dir>/baseline and compare"
        },
    )
    torch_threads: int | None = field(
        default=None, metadata={"help": "torch intra-op CPU threads (null: torch's default)"}
    )
    eval_query_cache: bool = field(
        default=True, metadata={"help": "compute a test image's query once per run"}
    )
    train_query_cache: bool | None = field(
        default=None,
        metadata={"help": "reuse training queries after the first epoch (null: when unaugmented)"},
    )
    decode_cache: bool = field(default=True, metadata={"help": "decode each image once per run"})
    compile_backbone: bool = field(default=False, metadata={"help": "torch.compile the frozen backbone"})

    def __post_init__(self) -> None:
        self.report_to = report_to_names(self.report_to)
        if self.base_lr is None and self.learning_rate is None:
            self.base_lr = DEFAULT_BASE_LR
        if self.base_lr is not None:
            derived = self.base_lr * self.per_device_train_batch_size / LR_REFERENCE_BATCH
            # base_lr decides, so a copy with another batch size (dataclasses.replace) gets its own rate.
            if self.learning_rate is not None and self.learning_rate != derived:
                logger.warning(
                    "learning_rate=%g is replaced by base_lr * per_device_train_batch_size / 256 = %g; set "
                    "base_lr=None to give learning_rate directly",
                    self.learning_rate,
                    derived,
                )
            self.learning_rate = derived
        if self.bf16 is None:
            self.bf16 = default_bf16(self.use_cpu)
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = cuda_used(self.use_cpu)
        if self.optim == "sgd" and self.optim_args is None:
            self.optim_args = "momentum=0.9"  # the authors' timm SGD; torch's default would be 0
        super().__post_init__()

    def first_task_arguments(self) -> dict[str, Any]:
        """The fields that differ on the first task (`first_task_base_lr`, `first_task_weight_decay`)."""
        out: dict[str, Any] = {}
        if self.first_task_base_lr is not None:
            out["learning_rate"] = (
                self.first_task_base_lr * self.per_device_train_batch_size / LR_REFERENCE_BATCH
            )
        if self.first_task_weight_decay is not None:
            out["weight_decay"] = self.first_task_weight_decay
        return out


def report_to_names(value: Any) -> list[str]:
    """`report_to` as `TrainingArguments` takes it: "none", "all", an integration name, a comma-separated
    string of names (the command-line form, `training.report_to=tensorboard,wandb`) or a list."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"training.report_to: expected a name or a list of names, got {value!r}")
    names = [name.strip() for name in names if name.strip()]
    known = ["none", "all", *INTEGRATION_TO_CALLBACK]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"training.report_to: unknown tracker(s) {unknown}; expected names from {known}")
    return [] if names in ([], ["none"]) else names


def cuda_used(use_cpu: bool) -> bool:
    """Whether the run will train on a CUDA device."""
    import torch

    return not use_cpu and torch.cuda.is_available()


def default_bf16(use_cpu: bool) -> bool:
    """bf16 autocast when a CUDA device with bf16 support will be used."""
    import torch

    return cuda_used(use_cpu) and torch.cuda.is_bf16_supported()


@dataclass
class ScriptArguments:
    """The flags of `recipes/train_cl.py` (every other setting is a recipe key: `section.key=value`)."""

    recipe: str = field(default="demo", metadata={"help": "recipe name (see --list) or path to a YAML file"})
    output_dir: str | None = field(default=None, metadata={"help": "default: outputs/<recipe>"})
    no_pgp: bool = field(default=False, metadata={"help": "the baseline: no gradient projection"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest per-task checkpoint"})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "replace the run already in --output_dir (its files are removed first)"},
    )
    # None: the recipe decides. `nargs="?"`: `--push_to_hub` alone means true, as for the other flags.
    push_to_hub: bool | None = field(
        default=None, metadata={"help": "overrides hub.push_to_hub", "nargs": "?", "const": True}
    )
    hub_model_id: str | None = None
    hub_private: bool | None = field(
        default=None, metadata={"help": "overrides hub.private", "nargs": "?", "const": True}
    )
    hub_strategy: Literal["end", "every_task"] | None = field(
        default=None, metadata={"help": "push once, or a commit per task"}
    )
    list: bool = field(default=False, metadata={"help": "list the recipes and exit"})
    debug: bool = field(default=False, metadata={"help": "show the full traceback of an error"})


def training_recipe_defaults() -> dict[str, Any]:
    """The defaults a recipe's training section starts from: the fields `ContinualTrainingArguments`
    declares itself (every other `TrainingArguments` field may be given and keeps its own default)."""
    own = set(ContinualTrainingArguments.__annotations__) - set(CONTROLLED_TRAINING_FIELDS)
    defaults = {f.name: f.default for f in dataclasses.fields(ContinualTrainingArguments) if f.name in own}
    return {**defaults, "base_lr": DEFAULT_BASE_LR}  # a recipe states base_lr (null: learning_rate instead)


def field_default(item: dataclasses.Field) -> Any:
    """A dataclass field's default (a fresh one from its factory); None when it has none."""
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None if item.default is dataclasses.MISSING else item.default


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """`{field: default}` of a dataclass whose fields all have defaults."""
    return {item.name: field_default(item) for item in dataclasses.fields(cls)}


def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The dataclass fields a constructor takes, by name."""
    return {item.name: item for item in dataclasses.fields(cls) if item.init}


# ----------------------------------------------------------------------------- typed values
class _SectionParser(HfArgumentParser):
    """An `HfArgumentParser` that raises instead of exiting (it checks values, it is not the command line)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(message)


@functools.cache
def _parser(cls: type) -> _SectionParser:
    return _SectionParser(cls, add_help=False)


def _resolved_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _non_none(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [arg for arg in typing.get_args(tp) if arg is not type(None)]
    return [tp]


def _expected(tp: Any) -> str:
    """What a value of type `tp` looks like, for an error message."""
    options = _non_none(tp)
    if len(options) != 1:
        return "a value of type " + " or ".join(getattr(o, "__name__", str(o)) for o in options)
    (tp,) = options
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true/false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if origin is list:
        return "a list like [0, 1]"
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return f"one of {[member.value for member in tp]}"
    return "a string"


def _tokens(value: Any) -> list[str]:
    """A YAML value as the command-line words `HfArgumentParser` reads."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, list):
        return [_tokens(item)[0] if not isinstance(item, (list, dict)) else str(item) for item in value]
    return [str(value)]


def parse_value(cls: type, name: str, value: Any, where: str) -> Any:
    """`value` (from YAML) as field `name` of dataclass `cls` holds it, typed by `HfArgumentParser`.

    `where` names the key in errors (`override training.num_train_epochs`). None is kept as is; a field
    whose type is a union of several types (e.g. `report_to`) is left to the dataclass to check."""
    tp = _resolved_type(cls, name)
    if value is None:
        if type(None) in typing.get_args(tp) or field_default(init_fields(cls)[name]) is None:
            return None
        raise ValueError(f"{where}: expected {_expected(tp)}, got null")
    options = _non_none(tp)
    if len(options) != 1 or typing.get_origin(options[0]) is dict:
        return value
    is_list = typing.get_origin(options[0]) is list
    if is_list != isinstance(value, list) or isinstance(value, dict):
        raise ValueError(f"{where}: expected {_expected(tp)}, got {value!r}")
    if is_list and not value:
        return []
    if options[0] is float and isinstance(value, str):
        value = value.strip()  # YAML 1.1 reads `1e-3` (no dot) as a string: argparse's float() takes it
    try:
        # `--name=value`: a scalar such as -1e-3 would otherwise be read as a flag
        words = [f"--{name}", *_tokens(value)] if is_list else [f"--{name}={_tokens(value)[0]}"]
        namespace, unparsed = _parser(cls).parse_known_args(words)
    except ValueError:
        raise ValueError(f"{where}: expected {_expected(tp)}, got {value!r}") from None
    if unparsed:
        raise ValueError(f"{where}: expected {_expected(tp)}, got {value!r}")
    parsed = getattr(namespace, name)
    return parsed.value if isinstance(parsed, Enum) else parsed


def is_list_field(cls: type, name: str) -> bool:
    return any(typing.get_origin(option) is list for option in _non_none(_resolved_type(cls, name)))


def is_bool_field(cls: type, name: str) -> bool:
    return _non_none(_resolved_type(cls, name)) == [bool]
