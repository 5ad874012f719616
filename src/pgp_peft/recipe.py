"""Recipes: YAML files that describe one continual-learning run; loading, overrides and the checks
made before any work.

A recipe has five sections, each the fields of one dataclass (see `arguments.py`):

    model:    ModelArguments               base_model_name_or_path, revision, attn_implementation, ...
    adapter:  the method's config class    `method` picks it (l2p, dualprompt, clip, lora)
    data:     DataArguments                dataset, columns, splits, num_tasks, image_size, preprocessing
    training: ContinualTrainingArguments   `TrainingArguments` field names verbatim (num_train_epochs,
                                           per_device_train_batch_size, optim, lr_scheduler_type, ...)
                                           plus base_lr (lr = base_lr * batch / 256), first_task_*, online,
                                           compare_baseline, the speed options
    hub:      HubArguments                 push_to_hub, hub_model_id, private, strategy, token

A recipe file states what differs from the defaults. Any value can be overridden with
`section.key=value` (or a bare `key=value` when the key name is unique across sections); values are read
as YAML and typed by `HfArgumentParser` from the section's dataclass, in a file and on the command line.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml

from .arguments import (
    CONTROLLED_TRAINING_FIELDS,
    DEMO_DATASET,
    ContinualTrainingArguments,
    DataArguments,
    HubArguments,
    ModelArguments,
    dataclass_defaults,
    init_fields,
    parse_value,
    report_to_names,
    training_recipe_defaults,
)

SECTIONS = ("model", "adapter", "data", "training", "hub")
DEMO_NUM_CLASSES = 10  # the shipped Fashion-MNIST subset (data.load_demo_dataset)
RECIPES_DIR_ENV = "PGP_RECIPES_DIR"  # set by recipes/train_cl.py to its own folder

# Every recipe starts from these values; a recipe file only states what differs.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": dataclass_defaults(ModelArguments),
    "adapter": {"method": "l2p"},
    "data": dataclass_defaults(DataArguments),
    "training": training_recipe_defaults(),
    "hub": dataclass_defaults(HubArguments),
}
SECTION_ARGUMENTS = {
    "model": ModelArguments,
    "data": DataArguments,
    "training": ContinualTrainingArguments,
    "hub": HubArguments,
}
# Adapter config fields a recipe does not set in its adapter section: they come from another section.
ADAPTER_FIELDS_FROM_OTHER_SECTIONS = {
    "base_model_name_or_path": "model.base_model_name_or_path",
    "revision": "model.revision",
    "base_model_kwargs": "model.layer_norm_eps",
    "num_classes": "the dataset (data.dataset)",
    "num_tasks": "data.num_tasks",
    "class_names": "data.class_names",
    "preprocessing": "data.preprocessing",
}
# Training keys of pgp_peft 0.1.0 recipes, now the TrainingArguments names (named in the error).
RENAMED_TRAINING_KEYS = {
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "optimizer": "optim",
    "lr_scheduler": "lr_scheduler_type",
    "momentum": "optim_args",
}
RENAMED_VALUE_HINTS = {
    "optimizer": " (adam -> adamw_torch)",
    "momentum": " (e.g. training.optim_args=momentum=0.9)",
}


# ----------------------------------------------------------------------------- recipe files
def recipes_dir() -> Path | None:
    """The folder recipe names are looked up in: `$PGP_RECIPES_DIR` (recipes/train_cl.py sets it to its
    own folder). None when unset: then a recipe is given by the path of its YAML file."""
    env = os.environ.get(RECIPES_DIR_ENV)
    return Path(env) if env else None


def available_recipes(directory: Path | None = None) -> list[str]:
    directory = directory or recipes_dir()
    return sorted(path.stem for path in directory.glob("*.yaml")) if directory else []


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _recipe_path(name_or_path: str, directory: Path | None) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"recipe file {path}: no such file")
        return path
    directory = directory or recipes_dir()
    if directory is None:
        raise ValueError(
            f"recipe {name_or_path!r}: a recipe name needs the recipe folder; run recipes/train_cl.py (it sets "
            f"{RECIPES_DIR_ENV}), set {RECIPES_DIR_ENV}, or give the path of a .yaml file"
        )
    path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        names = available_recipes(directory)
        raise ValueError(f"unknown recipe {name_or_path!r}; available recipes: {', '.join(names)}")
    return path


def load_recipe(name_or_path: str, directory: Path | None = None) -> dict[str, Any]:
    """Read a recipe by name (from the recipe folder) or path, on top of `DEFAULTS`.

    Every key is checked against its section's dataclass (unknown keys name the closest valid one) and
    typed as `HfArgumentParser` types it; unknown names list the valid recipes."""
    path = _recipe_path(name_or_path, directory)
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"recipe {path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path}: expected sections {list(SECTIONS)}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS) - {"name", "description", "paper"})
    if unknown:
        raise ValueError(f"recipe {path}: unknown section(s) {unknown}; sections are {list(SECTIONS)}")
    recipe = {section: copy.deepcopy(DEFAULTS[section]) for section in SECTIONS}
    for section in SECTIONS:
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ValueError(f"recipe {path}: section {section!r} must be a mapping of key: value")
        # `method` first: it picks the config class that types the other adapter keys.
        for key, value in sorted(values.items(), key=lambda item: item[0] != "method"):
            set_recipe_value(recipe, f"{section}.{key}", value, context=f"recipe {path}")
    recipe["name"] = raw.get("name", path.stem)
    recipe["description"] = raw.get("description", "")
    recipe["paper"] = raw.get("paper", {})
    return recipe


# ----------------------------------------------------------------------------- keys and values
def _adapter_fields() -> list[str]:
    """Every registered method's config fields (a recipe may name a field of another method)."""
    from .config import config_class
    from .methods import available_methods

    names: dict[str, None] = {}
    for method in available_methods():
        names.update(dict.fromkeys(init_fields(config_class(method))))
    return list(names)


def _section_keys(section: str) -> list[str]:
    if section == "adapter":
        return [key for key in _adapter_fields() if key not in ADAPTER_FIELDS_FROM_OTHER_SECTIONS]
    keys = list(init_fields(SECTION_ARGUMENTS[section]))
    if section == "training":
        keys = [key for key in keys if key not in CONTROLLED_TRAINING_FIELDS]
    return keys


def valid_keys() -> list[str]:
    """Every `section.key` a recipe or an override may set."""
    return [f"{section}.{key}" for section in SECTIONS for key in _section_keys(section)]


def resolve_key(key: str) -> str:
    """`section.key` for a full or a unique bare key; `ValueError` naming the closest valid key otherwise."""
    key = key.strip().lstrip("-").replace("-", "_")
    valid = valid_keys()
    if "." not in key:
        matches = [k for k in valid if k.split(".", 1)[1] == key]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ValueError(f"override key {key!r} is ambiguous: use one of {matches}")
    if key in valid:
        return key
    section, _, name = key.rpartition(".")
    # (a bare key that is valid in some section was resolved above)
    if section in ("adapter", "") and name in ADAPTER_FIELDS_FROM_OTHER_SECTIONS:
        raise ValueError(
            f"adapter.{name}: set from {ADAPTER_FIELDS_FROM_OTHER_SECTIONS[name]}, not in the adapter section"
        )
    if section in ("training", "") and name in CONTROLLED_TRAINING_FIELDS:
        raise ValueError(
            f"training.{name}: set by the continual trainer, not by a recipe; {CONTROLLED_TRAINING_FIELDS[name]}"
        )
    if section in ("training", "") and name in RENAMED_TRAINING_KEYS:
        new = RENAMED_TRAINING_KEYS[name]
        raise ValueError(
            f"unknown key {key!r}: training.{name} is now training.{new} (the TrainingArguments name)"
            f"{RENAMED_VALUE_HINTS.get(name, '')}; see README 'Train a paper configuration'"
        )
    close = difflib.get_close_matches(key, valid, n=1) or difflib.get_close_matches(
        key, [k.split(".", 1)[1] for k in valid], n=1
    )
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown key {key!r}{hint}")


def field_owner(recipe: dict[str, Any], section: str, name: str) -> type:
    """The dataclass that types `section.name`: the section's, or for the adapter the recipe method's config
    class (a field of another method, which a 0.1.0 recipe may name, is typed by that method's class; the
    config drops it when loaded)."""
    if section != "adapter":
        return SECTION_ARGUMENTS[section]
    from .config import config_class
    from .methods import available_methods

    method = recipe["adapter"].get("method", "l2p")
    if method in available_methods() and name in init_fields(config_class(method)):
        return config_class(method)
    return next(config_class(m) for m in available_methods() if name in init_fields(config_class(m)))


def set_recipe_value(recipe: dict[str, Any], key: str, value: Any, context: str | None = None) -> None:
    """Set `section.key` (or a unique bare key) to `value` (already read as YAML), typed and checked.

    `context` prefixes errors (`recipe path/x.yaml`); without it they read `override section.key: ...`."""
    try:
        full_key = resolve_key(key)
    except ValueError as error:
        raise ValueError(f"{context}: {error}" if context else str(error)) from None
    section, name = full_key.split(".", 1)
    where = f"{context}: {full_key}" if context else f"override {full_key}"
    recipe[section][name] = parse_value(field_owner(recipe, section, name), name, value, where)


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` (or unique bare `key=value`) overrides; values are read as YAML and typed.

    Unknown keys raise `ValueError` naming the closest valid key; a value of the wrong type raises
    `ValueError` naming the key and what it expects."""
    recipe = copy.deepcopy(recipe)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        full_key = resolve_key(key)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"override {full_key}: cannot parse value {text!r}: {error}") from error
        set_recipe_value(recipe, full_key, value)
    return recipe


# ----------------------------------------------------------------------------- checks before any work
def validate_recipe(recipe: dict[str, Any]) -> None:
    """Check what can be checked from the recipe alone; raise `ValueError` naming the key and the fix.

    Runs before data, backbone or output folder are touched: step counts, batch sizes, learning
    rates, optimizer, schedule, the `TrainingArguments` themselves, method and adapter fields, task
    split (when the class count is known without loading the data) and the hub settings.
    """
    training, data, model = recipe["training"], recipe["data"], recipe["model"]
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        _positive_int(training, "training", name)
    _positive_number(training, "training", "num_train_epochs")
    _positive_number(training, "training", "base_lr", optional=True)
    _positive_number(training, "training", "learning_rate", optional=True)
    _positive_number(training, "training", "first_task_base_lr", optional=True)
    for name in ("weight_decay", "max_grad_norm", "first_task_weight_decay"):
        _non_negative_number(training, "training", name)
    if training.get("base_lr") is None and training.get("learning_rate") is None:
        raise ValueError("training.base_lr or training.learning_rate: one of them must be set")
    if training.get("base_lr") is not None and training.get("learning_rate") is not None:
        raise ValueError(
            "training.learning_rate and training.base_lr are both set; learning_rate is derived from base_lr "
            "(base_lr * per_device_train_batch_size / 256): set training.base_lr=null to give learning_rate directly"
        )
    _check_choice(training, "optim", _optimizer_names(), "optimizer")
    _check_choice(training, "lr_scheduler_type", _scheduler_names(), "schedule")
    _positive_int(training, "training", "torch_threads", optional=True)
    report_to_names(training["report_to"])
    if training.get("train_query_cache") and data.get("augment"):
        raise ValueError(
            "training.train_query_cache=true needs data.augment=false: a random crop changes an image's "
            "query every epoch; leave training.train_query_cache unset (null)"
        )
    try:  # TrainingArguments' own checks (and the base_lr / learning_rate rule)
        build_training_arguments(recipe, output_dir="outputs/validation")
    except (TypeError, ValueError) as error:
        message = " ".join(str(error).split())
        raise ValueError(message if message.startswith("training.") else f"training: {message}") from None
    _positive_number(model, "model", "layer_norm_eps", optional=True)
    _positive_int(data, "data", "num_tasks")
    _positive_int(data, "data", "classes_per_task", optional=True)
    _positive_int(data, "data", "image_size")
    _positive_int(data, "data", "max_train_per_task", optional=True)
    _positive_int(data, "data", "max_test_per_task", optional=True)
    fraction = data.get("holdout_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"data.holdout_fraction: must lie in (0, 1) or be null, got {fraction!r}")
    try:  # the method and every adapter field, with the class count still unknown
        build_adapter_config(recipe, None, data.get("class_names"))
    except (TypeError, ValueError) as error:
        raise ValueError(str(error).replace("PromptGradientProjectionConfig.", "adapter.")) from None
    _check_task_split(data)
    check_hub_settings(recipe["hub"])


def backbone_kwargs(model_section: dict[str, Any]) -> dict[str, Any]:
    """The backbone config overrides the model section sets (`layer_norm_eps`)."""
    if model_section.get("layer_norm_eps") is None:
        return {}
    return {"layer_norm_eps": float(model_section["layer_norm_eps"])}


def build_adapter_config(recipe: dict[str, Any], num_classes: int | None, class_names: list[str] | None):
    """The recipe's adapter section as the method's config, completed from the data and model sections."""
    from .config import PromptGradientProjectionConfig
    from .methods import available_methods

    values = dict(recipe["adapter"])
    method = values.setdefault("method", "l2p")
    if method not in available_methods():
        raise ValueError(f"adapter.method: unknown method {method!r}; expected one of {available_methods()}")
    values.setdefault("num_classes", num_classes)
    values.setdefault("class_names", class_names)
    values.setdefault("preprocessing", recipe["data"]["preprocessing"])
    values.setdefault("num_tasks", recipe["data"]["num_tasks"])
    values["base_model_name_or_path"] = recipe["model"]["base_model_name_or_path"]
    values["base_model_kwargs"] = backbone_kwargs(recipe["model"])
    values["revision"] = recipe["model"]["revision"]
    # from_dict: a recipe written for 0.1.0 may name fields its method does not use (dropped there).
    return PromptGradientProjectionConfig.from_dict(values)


def build_training_arguments(recipe: dict[str, Any], output_dir: str) -> ContinualTrainingArguments:
    """The recipe's training section as `ContinualTrainingArguments` (via `HfArgumentParser.parse_dict`).
    Online recipes train one pass per task."""
    from transformers import HfArgumentParser

    values = {**recipe["training"], "output_dir": output_dir}
    if values.get("online"):
        values["num_train_epochs"] = 1
    (args,) = HfArgumentParser(ContinualTrainingArguments).parse_dict(values)
    return args


def _positive_int(section: dict, where: str, name: str, optional: bool = False) -> None:
    value = section.get(name)
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}.{name}: must be a positive integer, got {value!r}; e.g. {where}.{name}=1")


def _positive_number(section: dict, where: str, name: str, optional: bool = False) -> None:
    value = section.get(name)
    if optional and value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{where}.{name}: must be a finite number > 0, got {value!r}")


def _non_negative_number(section: dict, where: str, name: str) -> None:
    value = section.get(name)
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{where}.{name}: must be a finite number >= 0, got {value!r}")


def _optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [member.value for member in OptimizerNames]


def _scheduler_names() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [member.value for member in SchedulerType]


def _check_choice(training: dict[str, Any], name: str, choices: list[str], what: str) -> None:
    value = training.get(name)
    if value in choices:
        return
    close = ["adamw_torch"] if value == "adam" else difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {choices}"
    raise ValueError(f"training.{name}: unknown {what} {value!r}{hint}")


def known_num_classes(data: dict[str, Any]) -> int | None:
    """The dataset's class count when it is known without loading it: the demo, or a local
    `imagefolder` (one sub-folder per class in its train split folder). None otherwise."""
    if data["dataset"] == DEMO_DATASET:
        return DEMO_NUM_CLASSES
    train_dir = Path(str(data["dataset"])) / str(data["train_split"])
    if data.get("holdout_fraction") is None and train_dir.is_dir():
        classes = [p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return len(classes) or None
    return None


def _check_task_split(data: dict[str, Any]) -> None:
    num_classes = known_num_classes(data)
    if num_classes is None:
        return
    tasks, per_task = data["num_tasks"], data.get("classes_per_task")
    if per_task is not None:
        if tasks * per_task > num_classes:
            raise ValueError(
                f"data.num_tasks={tasks} x data.classes_per_task={per_task} needs {tasks * per_task} classes, "
                f"but {data['dataset']} has {num_classes}"
            )
    elif num_classes % tasks:
        divisors = [n for n in range(1, num_classes + 1) if num_classes % n == 0]
        raise ValueError(
            f"data.num_tasks={tasks} does not divide the {num_classes} classes of {data['dataset']}; use one of "
            f"{divisors}, or set data.classes_per_task={max(num_classes // tasks, 1)}"
        )


def check_hub_settings(hub: dict[str, Any]) -> None:
    """The hub section alone (no network): a known strategy, and a repo id when pushing."""
    if hub["strategy"] not in ("end", "every_task"):
        raise ValueError(f"hub.strategy: expected 'end' or 'every_task', got {hub['strategy']!r}")
    if hub["push_to_hub"] and not hub["hub_model_id"]:
        raise ValueError("hub.hub_model_id: required with push_to_hub (e.g. your-name/l2p-pgp-cifar100)")
