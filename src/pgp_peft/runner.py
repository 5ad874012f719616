"""Recipes: YAML files that describe one continual-learning run, and the code that runs them.

`recipes/train_cl.py` is a thin entry point over `main()`. A recipe has five sections:

    model:    base_model_name_or_path, revision, attn_implementation, layer_norm_eps
    adapter:  PromptGradientProjectionConfig fields (`method` picks the preset)
    data:     dataset (Hub id, local directory or `pgp_peft:fashion_mnist_demo`), columns, splits,
              num_tasks, image_size, preprocessing (`reference` | `processor`), size limits
    training: epochs, batch_size, base_lr (lr = base_lr * batch_size / 256), optimizer, schedule,
              seed, compare_baseline (also run without projection and compare), ...
    hub:      push_to_hub, hub_model_id, private, strategy (`end` | `every_task`)

Any value can be overridden on the command line with `section.key=value` (or a bare `key=value`
when the key name is unique across sections).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from .backbones import load_backbone, resolve_builtin
from .callbacks import ContinualCallback
from .run_folder import BASELINE_DIR, prepare_output_dir

logger = logging.getLogger("pgp_peft")

SECTIONS = ("model", "adapter", "data", "training", "hub")
DEMO_DATASET = "pgp_peft:fashion_mnist_demo"
DEMO_NUM_CLASSES = 10  # the shipped Fashion-MNIST subset (data.load_demo_dataset)

# Every recipe starts from these values; a recipe file only states what differs.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "base_model_name_or_path": "google/vit-base-patch16-224-in21k",
        "revision": None,
        "attn_implementation": None,
        "layer_norm_eps": None,
    },
    "adapter": {"method": "l2p"},
    "data": {
        "dataset": DEMO_DATASET,
        "train_split": "train",
        "test_split": "test",
        "image_column": "image",
        "label_column": "label",
        "holdout_fraction": None,
        "holdout_seed": 0,
        "num_tasks": 5,
        "classes_per_task": None,
        "class_order_seed": None,
        "image_size": 224,
        "preprocessing": "reference",
        "augment": False,
        "max_train_per_task": None,
        "max_test_per_task": None,
        "class_names": None,
    },
    "training": {
        "epochs": 5,
        "batch_size": 16,
        "eval_batch_size": 64,
        "base_lr": 0.03,
        "optimizer": "adam",
        "momentum": 0.9,
        "weight_decay": 0.0,
        "lr_scheduler": "constant",
        "max_grad_norm": 1.0,
        "seed": 42,
        "online": False,
        "bf16": None,  # None: bf16 autocast when a CUDA device with bf16 is used, fp32 otherwise
        "first_task_base_lr": None,
        "first_task_weight_decay": None,
        "logging_steps": 20,
        "dataloader_num_workers": 0,
        "use_cpu": False,
        "report_to": "none",
        # Also run the same recipe without projection into <output_dir>/baseline and compare.
        "compare_baseline": False,
        # Deterministic kernels (TrainingArguments.full_determinism): bitwise GPU repeats, slower.
        "full_determinism": False,
        # torch intra-op CPU threads (null: torch's default). Tiny models run fastest on 1.
        "torch_threads": None,
        # speed options of ContinualTrainer (README "Performance notes")
        "eval_query_cache": True,
        "train_query_cache": None,  # None: when the training transform is not augmented
        "decode_cache": True,
        "compile_backbone": False,
    },
    "hub": {"push_to_hub": False, "hub_model_id": None, "private": None, "strategy": "end", "token": None},
}


# ----------------------------------------------------------------------------- recipes
def recipes_dir() -> Path:
    """The recipe folder: $PGP_RECIPES_DIR, else `recipes/` of the source checkout."""
    env = os.environ.get("PGP_RECIPES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "recipes"


def available_recipes(directory: Path | None = None) -> list[str]:
    directory = directory or recipes_dir()
    return sorted(path.stem for path in directory.glob("*.yaml"))


def _merge(base: dict, update: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def load_recipe(name_or_path: str, directory: Path | None = None) -> dict[str, Any]:
    """Read a recipe by name (from the recipe folder) or path; unknown names list the valid ones."""
    directory = directory or recipes_dir()
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = directory / f"{name_or_path}.yaml"
    if not path.exists():
        names = available_recipes(directory)
        raise ValueError(f"unknown recipe {name_or_path!r}; available recipes: {', '.join(names)}")
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle) or {}
    unknown = sorted(set(raw) - set(SECTIONS) - {"name", "description", "paper"})
    if unknown:
        raise ValueError(f"recipe {path}: unknown section(s) {unknown}; sections are {list(SECTIONS)}")
    recipe = {section: _merge(DEFAULTS[section], raw.get(section, {}), section) for section in SECTIONS}
    recipe["name"] = raw.get("name", path.stem)
    recipe["description"] = raw.get("description", "")
    recipe["paper"] = raw.get("paper", {})
    return recipe


def _adapter_fields() -> dict[str, Any]:
    """Every registered method's config fields by name (the first method declaring a name wins)."""
    from .config import config_class
    from .methods import available_methods

    fields: dict[str, Any] = {}
    for method in available_methods():
        for name, field in config_class(method).__dataclass_fields__.items():
            fields.setdefault(name, field)
    return fields


def _valid_keys(recipe: dict[str, Any]) -> list[str]:
    keys = [f"{section}.{key}" for section in SECTIONS for key in recipe[section]]
    keys += [f"adapter.{f}" for f in _adapter_fields() if f"adapter.{f}" not in keys]
    return keys


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` (or unique bare `key=value`) overrides; values are parsed as YAML.

    Unknown keys raise `ValueError` naming the closest valid key; a value of the wrong type raises
    `ValueError` naming the key.
    """
    recipe = copy.deepcopy(recipe)
    valid = _valid_keys(recipe)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if "." not in key:
            matches = [k for k in valid if k.split(".", 1)[1] == key]
            if len(matches) == 1:
                key = matches[0]
            elif len(matches) > 1:
                raise ValueError(f"override key {key!r} is ambiguous: use one of {matches}")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1) or difflib.get_close_matches(
                key, [k.split(".", 1)[1] for k in valid], n=1
            )
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown override key {key!r}{hint}")
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"override {key}: cannot parse value {text!r}: {error}") from error
        current = recipe[section].get(name)
        recipe[section][name] = _check_type(key, _type_example(section, name, current), value)
    return recipe


# Keys whose default is None: an example of the type they take, so their overrides are type-checked too.
_TYPE_EXAMPLES: dict[str, Any] = {
    "model.layer_norm_eps": 1e-6,
    "data.holdout_fraction": 0.2,
    "data.classes_per_task": 1,
    "data.class_order_seed": 0,
    "data.max_train_per_task": 1,
    "data.max_test_per_task": 1,
    "data.class_names": [],
    "training.first_task_base_lr": 0.1,
    "training.first_task_weight_decay": 0.1,
    "training.bf16": False,
    "training.train_query_cache": False,
    "training.torch_threads": 1,
    "hub.private": False,
}


def _type_example(section: str, name: str, current: Any) -> Any:
    """The value an override of `section.name` is type-checked against (None: any type)."""
    if current is not None:
        return current
    if f"{section}.{name}" in _TYPE_EXAMPLES:
        return _TYPE_EXAMPLES[f"{section}.{name}"]
    if section == "adapter":  # a config field the recipe does not set: its dataclass default
        import dataclasses

        field = _adapter_fields().get(name)
        if field is not None and field.default is not dataclasses.MISSING:
            return field.default
        if field is not None and field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
    return None


def _check_type(key: str, current: Any, value: Any) -> Any:
    if current is None or value is None:
        return value
    if isinstance(current, float) and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-3` (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"override {key}: expected true/false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"override {key}: expected an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"override {key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(current, str) and not isinstance(value, str):
        return str(value)
    if isinstance(current, list) and not isinstance(value, list):
        raise ValueError(f"override {key}: expected a list like [0, 1], got {value!r}")
    return value


# ----------------------------------------------------------------------------- building blocks
def build_backbone_model(model_section: dict[str, Any]):
    """Load the frozen backbone named by the recipe (Hub id, local folder or built-in)."""
    return load_backbone(
        model_section["base_model_name_or_path"],
        model_section.get("revision"),
        _backbone_kwargs(model_section),
    )


def _backbone_kwargs(model_section: dict[str, Any]) -> dict[str, Any]:
    if model_section.get("layer_norm_eps") is None:
        return {}
    return {"layer_norm_eps": float(model_section["layer_norm_eps"])}


def build_datasets(
    data: dict[str, Any],
    model_section: dict[str, Any] | None = None,
    output_dir: str | os.PathLike | None = None,
):
    """(splits, train_transform, eval_transform) for the recipe's data section.

    `preprocessing: processor` uses the backbone checkpoint's own image processor (resize + its
    normalisation); `reference` resizes to [0, 1] without normalisation, as the paper's code."""
    from .data import (
        build_transform,
        load_demo_dataset,
        load_image_dataset,
        make_class_incremental_splits,
        verify_image_files,
    )

    if data["dataset"] == DEMO_DATASET:
        train, test = load_demo_dataset()
        image_column, label_column = "image", "label"
    else:
        train, test = load_image_dataset(
            data["dataset"],
            train_split=data["train_split"],
            test_split=data["test_split"],
            image_column=data["image_column"],
            label_column=data["label_column"],
            holdout_fraction=data["holdout_fraction"],
            holdout_seed=data["holdout_seed"],
            # ImageNet-R's single split is cut 80/20 here: keep the index manifest with the run.
            manifest_path=Path(output_dir) / "holdout_manifest.json"
            if output_dir and data["holdout_fraction"]
            else None,
        )
        image_column, label_column = data["image_column"], data["label_column"]
        # Before any training: a broken file is reported by path, not a row id half way through a run.
        verify_image_files(train, image_column, "the train split")
        verify_image_files(test, image_column, "the test split")
    splits = make_class_incremental_splits(
        train,
        test,
        num_tasks=data["num_tasks"],
        image_column=image_column,
        label_column=label_column,
        class_order_seed=data["class_order_seed"],
        classes_per_task=data["classes_per_task"],
        dataset_id=data["dataset"],
    )
    if data["max_train_per_task"] or data["max_test_per_task"]:
        splits = _limit_splits(splits, data["max_train_per_task"], data["max_test_per_task"], seed=0)
    if data.get("class_names"):
        splits.class_names = list(data["class_names"])
    size = data["image_size"]
    processor_kwargs: dict[str, Any] = {"mode": data["preprocessing"]}
    if data["preprocessing"] == "processor":
        from transformers import AutoImageProcessor

        name = resolve_builtin((model_section or {}).get("base_model_name_or_path"))
        try:
            processor_kwargs["image_processor"] = AutoImageProcessor.from_pretrained(
                name, revision=(model_section or {}).get("revision"), trust_remote_code=False
            )
        except OSError as error:
            raise OSError(
                f"data.preprocessing=processor: no image processor for {name!r} ({error}); "
                "use data.preprocessing=reference or a local checkpoint folder with preprocessor_config.json"
            ) from error
    train_transform = build_transform(
        size, image_column=image_column, train=True, augment=data["augment"], **processor_kwargs
    )
    eval_transform = build_transform(size, image_column=image_column, **processor_kwargs)
    return splits, train_transform, eval_transform


def _limit_splits(splits, max_train: int | None, max_test: int | None, seed: int):
    """Keep a seeded, class-balanced-enough subset of each task (for quick runs and tests)."""
    import numpy as np

    def cut(datasets_, limit):
        if not limit:
            return datasets_
        out = []
        for ds in datasets_:
            if len(ds) > limit:
                rng = np.random.default_rng(seed)
                ds = ds.select(sorted(rng.permutation(len(ds))[:limit].tolist()))
            out.append(ds)
        return out

    splits.train = cut(splits.train, max_train)
    splits.test = cut(splits.test, max_test)
    return splits


def build_adapter_config(recipe: dict[str, Any], num_classes: int, class_names: list[str] | None):
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
    values["base_model_kwargs"] = _backbone_kwargs(recipe["model"])
    values["revision"] = recipe["model"]["revision"]
    # from_dict: a recipe written for 0.1.0 may name fields its method does not use (dropped there).
    return PromptGradientProjectionConfig.from_dict(values)


def build_training_arguments(recipe: dict[str, Any], output_dir: str):
    import torch
    from transformers import TrainingArguments

    training = recipe["training"]
    lr = training["base_lr"] * training["batch_size"] / 256
    optim = {"adam": "adamw_torch", "sgd": "sgd"}.get(training["optimizer"])
    if optim is None:
        raise ValueError(f"training.optimizer: expected adam or sgd, got {training['optimizer']!r}")
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=training["batch_size"],
        per_device_eval_batch_size=training["eval_batch_size"],
        num_train_epochs=1 if training["online"] else training["epochs"],
        learning_rate=lr,
        weight_decay=training["weight_decay"],
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim=optim,
        optim_args=f"momentum={training['momentum']}" if optim == "sgd" else None,
        lr_scheduler_type=training["lr_scheduler"],
        max_grad_norm=training["max_grad_norm"],
        seed=training["seed"],
        full_determinism=training["full_determinism"],
        bf16=use_bf16(training),
        logging_steps=training["logging_steps"],
        save_strategy="no",
        report_to=_report_to(training["report_to"]),
        remove_unused_columns=False,
        dataloader_num_workers=training["dataloader_num_workers"],
        dataloader_pin_memory=torch.cuda.is_available() and not training["use_cpu"],
        use_cpu=training["use_cpu"],
        disable_tqdm=False,
    )


def _report_to(value: Any) -> list[str]:
    """`training.report_to` -> `TrainingArguments.report_to`: "none", "all", an integration name, a
    comma-separated string of names (the CLI form, e.g. `training.report_to=tensorboard,wandb`) or a list."""
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


def use_bf16(training: dict[str, Any]) -> bool:
    """`training.bf16`, or when unset (None): bf16 autocast on a CUDA device that supports it. The adapter's
    parameters, gradients and the projection stay float32 either way."""
    import torch

    if training["bf16"] is not None:
        return bool(training["bf16"])
    return not training["use_cpu"] and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def trainer_speed_options(recipe: dict[str, Any]) -> dict[str, Any]:
    """The `ContinualTrainer` speed options a recipe sets (query caches, decode cache, compiled backbone)."""
    training = recipe["training"]
    keys = ("eval_query_cache", "train_query_cache", "decode_cache", "compile_backbone")
    return {key: training[key] for key in keys}


def first_task_arguments(recipe: dict[str, Any]) -> dict[str, Any]:
    training = recipe["training"]
    out: dict[str, Any] = {}
    if training.get("first_task_base_lr") is not None:
        out["learning_rate"] = training["first_task_base_lr"] * training["batch_size"] / 256
    if training.get("first_task_weight_decay") is not None:
        out["weight_decay"] = training["first_task_weight_decay"]
    return out


# ----------------------------------------------------------------------------- running
def run_recipe(
    recipe: dict[str, Any],
    output_dir: str,
    *,
    resume: bool = False,
    backbone=None,
    tokenizer=None,
):
    """Run a recipe end to end; returns (model, result). Saves the adapter, results.json and plots.

    Seeds `training.seed` first, so the initialisation is reproducible. With
    `training.compare_baseline` (and PGP on), the same recipe first runs without projection into
    `<output_dir>/baseline`; results.json records it under `baseline` and both summaries are printed
    side by side."""
    from transformers import set_seed

    from .metrics import format_matrix
    from .model import get_pgp_model
    from .trainer import ContinualTrainer

    _check_hub(recipe["hub"])  # before any training: a bad hub setting must not cost a run
    baseline = None
    if recipe["training"]["compare_baseline"] and recipe["adapter"].get("use_pgp", True):
        # First, so the PGP run's results.json (and every Hub push of it) already carries it. The
        # baseline wraps a copy of the given backbone (wrapping installs hooks on a backbone).
        baseline = run_baseline(
            recipe,
            output_dir,
            resume=resume,
            backbone=copy.deepcopy(backbone) if backbone is not None else None,
            tokenizer=tokenizer,
        )
    # Seed before anything random is built (prompts, keys, head): the same recipe and seed give the
    # same accuracy matrix, and a resumed run the same as an uninterrupted one.
    set_seed(recipe["training"]["seed"])
    if recipe["training"]["torch_threads"]:
        import torch

        torch.set_num_threads(int(recipe["training"]["torch_threads"]))
    splits, train_transform, eval_transform = build_datasets(recipe["data"], recipe["model"], output_dir)
    config = build_adapter_config(recipe, splits.num_classes, splits.class_names)
    if backbone is None:
        backbone = build_backbone_model(recipe["model"])
    model = get_pgp_model(
        backbone, config, attn_implementation=recipe["model"]["attn_implementation"], tokenizer=tokenizer
    )
    args = build_training_arguments(recipe, output_dir)
    trainer = ContinualTrainer(
        model,
        args,
        splits=splits,
        train_transform=train_transform,
        eval_transform=eval_transform,  # memory samples: the trainer's default (training transform in reference mode)
        first_task_args=first_task_arguments(recipe),
        online=recipe["training"]["online"],
        callbacks=_hub_callbacks(recipe),
        recipe=recipe,
        **trainer_speed_options(recipe),
    )
    if baseline is not None:
        trainer.extra_results["baseline"] = baseline_payload(baseline)
    result = trainer.train_continual(resume_from_checkpoint=resume or None)
    if trainer.is_world_process_zero():
        model.save_pretrained(output_dir, model_card_kwargs=trainer.model_card_kwargs(result))
        print(
            f"\n== {recipe['name']}: class-incremental accuracy matrix (rows: task evaluated, columns: after task)"
        )
        print(format_matrix(result.accuracy.values))
        summary = result.summary
        print(
            f"average accuracy {summary['average_accuracy']:.2f} | forgetting (paper) "
            f"{summary['forgetting_paper']:.2f} | forgetting (reference code) {summary['forgetting_reference']:.2f}"
            f" | task-IL average accuracy {summary['task_il']['average_accuracy']:.2f}"
        )
        print(f"saved adapter, results.json and plots to {output_dir}")
        if recipe["hub"]["push_to_hub"] and recipe["hub"]["strategy"] == "end":
            _push(
                model, recipe, trainer, result, f"pgp_peft: {recipe['name']} after {splits.num_tasks} tasks"
            )
        if baseline is not None:
            print_comparison(recipe, config.method, result, baseline, output_dir)
    return model, result


HOW_TO_READ_COMPARISON = """\
How to read it: both runs saw the same images in the same order, starting from the same prompts, keys
and head (same seed); the only difference is the gradient projection. Forgetting is how far each
earlier task's class-IL accuracy fell, by the end, from its best (paper: best before the last task;
reference code: clipped at 0). PGP works when its forgetting is lower; the price is some plasticity
(accuracy on a task right after learning it). One seed moves these numbers by a few points: compare
several seeds (training.seed) before trusting a small difference."""

# Printed after the comparison when the run uses the tiny backbone shipped with the package.
TINY_BACKBONE = "pgp_peft:vit-tiny-patch4-32-cifar10"
HOW_TO_READ_TINY = """\
Absolute class-IL accuracy is low on this tiny backbone (its frozen CIFAR-10 features barely tell
apart classes of different tasks; task-IL, where the true task is given, shows what each task
learned): only the comparison means something (benchmarks/README.md: 3 seeds, two data sets)."""


def run_baseline(recipe, output_dir, *, resume, backbone=None, tokenizer=None):
    """Run `recipe` without projection into `<output_dir>/baseline` (same seed: same data,
    initialisation and batch order as the PGP run); returns its `ContinualResult`."""
    baseline = copy.deepcopy(recipe)
    baseline["adapter"]["use_pgp"] = False
    baseline["training"]["compare_baseline"] = False
    baseline["hub"]["push_to_hub"] = False
    baseline["name"] = f"{recipe['name']} without projection (baseline)"
    _, result = run_recipe(
        baseline,
        os.path.join(output_dir, BASELINE_DIR),
        resume=resume,
        backbone=backbone,
        tokenizer=tokenizer,
    )
    return result


def baseline_payload(result) -> dict[str, Any]:
    """The `baseline` entry of the PGP run's results.json."""
    return {
        "output_dir": BASELINE_DIR,
        "summary": result.summary,
        "accuracy_matrix": result.accuracy.to_dict(),
        "task_il_accuracy_matrix": result.task_il_accuracy.to_dict(),
    }


def print_comparison(recipe, method: str, result, baseline, output_dir: str) -> None:
    """Both runs' summaries side by side, and how to read them."""
    from .methods import get_method
    from .metrics import format_comparison

    name = get_method(method).method_cls.card.name
    print(f"\n== What PGP bought in this run ({recipe['name']}, after {result.accuracy.num_tasks} tasks)")
    print(format_comparison({f"{name}-PGP": result.summary, f"{name} (no PGP)": baseline.summary}))
    print(HOW_TO_READ_COMPARISON)
    if recipe["model"]["base_model_name_or_path"] == TINY_BACKBONE:
        print(HOW_TO_READ_TINY)
    print(f"baseline adapter and results: {os.path.join(output_dir, BASELINE_DIR)}")


def _check_hub(hub: dict[str, Any]) -> None:
    if hub["strategy"] not in ("end", "every_task"):
        raise ValueError(f"hub.strategy: expected 'end' or 'every_task', got {hub['strategy']!r}")
    if hub["push_to_hub"] and not hub["hub_model_id"]:
        raise ValueError("hub.hub_model_id: required with push_to_hub (e.g. your-name/l2p-pgp-cifar100)")


def _push(model, recipe, trainer, result, message: str) -> None:
    hub = recipe["hub"]
    _check_hub(hub)
    model.push_to_hub(
        hub["hub_model_id"],
        private=hub["private"],
        token=hub["token"],
        commit_message=message,
        output_dir=trainer.args.output_dir,
        model_card_kwargs=trainer.model_card_kwargs(result),
    )


class HubPushCallback(ContinualCallback):
    """Pushes the adapter, results and card to the Hub after every task (`hub.strategy: every_task`)."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        self.recipe = recipe

    def on_task_end(self, args, state, control, *, trainer, task_id: int, result, **kwargs):
        if trainer.is_world_process_zero():
            message = f"pgp_peft: {self.recipe['name']} after task {task_id + 1}"
            _push(trainer.model, self.recipe, trainer, result, message)


def _hub_callbacks(recipe: dict[str, Any]) -> list[ContinualCallback]:
    if not (recipe["hub"]["push_to_hub"] and recipe["hub"]["strategy"] == "every_task"):
        return []
    return [HubPushCallback(recipe)]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Flags and `section.key=value` overrides, in any order (argparse's intermixed parsing)."""
    parser = argparse.ArgumentParser(
        description="Continual learning with Prompt Gradient Projection (L2P / DualPrompt / CLIP / LoRA).",
        epilog="Overrides: section.key=value, e.g. training.epochs=1 adapter.pool_size=20",
    )
    parser.add_argument("--recipe", default="demo", help="recipe name (see --list) or path to a YAML file")
    parser.add_argument("--output_dir", default=None, help="default: outputs/<recipe>")
    parser.add_argument(
        "--no-pgp", dest="no_pgp", action="store_true", help="the baseline: no gradient projection"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest per-task checkpoint")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="replace the run already in --output_dir (its files are removed first)",
    )
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None)
    parser.add_argument("--hub_private", action="store_true")
    parser.add_argument(
        "--hub_strategy", choices=("end", "every_task"), default=None, help="push once, or a commit per task"
    )
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_known_intermixed_args(argv)


class UsageError(ValueError):
    """A command-line mistake (printed as one `error: ...` line, exit code 2)."""


def _recipe_from_args(args: argparse.Namespace, unknown: list[str]) -> dict[str, Any]:
    overrides = list(args.overrides)
    # argparse leaves everything after an unknown `--key=value` unparsed: any `key=value` left is an override.
    for item in unknown:
        if "=" in item and not (item.startswith("-") and not item.startswith("--")):
            overrides.append(item.removeprefix("--"))
        else:
            raise UsageError(f"unrecognised argument {item!r} (see --help)")
    recipe = apply_overrides(load_recipe(args.recipe), overrides)
    if args.no_pgp:
        recipe["adapter"]["use_pgp"] = False
    if args.push_to_hub:
        recipe["hub"]["push_to_hub"] = True
    if args.hub_model_id:
        recipe["hub"]["hub_model_id"] = args.hub_model_id
    if args.hub_private:
        recipe["hub"]["private"] = True
    if args.hub_strategy:
        recipe["hub"]["strategy"] = args.hub_strategy
    return recipe


def _is_main_process() -> bool:
    """Rank 0 of a `torchrun` / `accelerate launch` job (or a plain run): it alone owns the output folder."""
    return int(os.environ.get("RANK", "0")) == 0


def _error_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, OSError, FloatingPointError, TypeError)):
        message = f"{type(error).__name__}: {message} (run with --debug for the traceback)"
    return f"error: {message}"


def main(argv: list[str] | None = None) -> int:
    """The `train_cl.py` command. Any error is printed as one `error: ...` line with exit code 2
    (`--debug` raises it with its traceback instead)."""
    args, unknown = parse_args(argv)
    if args.list:
        for name in available_recipes():
            print(name)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = False
    try:
        recipe = _recipe_from_args(args, unknown)
        validate_recipe(recipe)  # before any data, backbone or folder is touched
        if recipe["hub"]["push_to_hub"] and _is_main_process():
            check_hub_access(recipe["hub"])
        output_dir = args.output_dir or os.path.join(
            "outputs", recipe["name"] + ("_baseline" if args.no_pgp else "")
        )
        lock = None
        if _is_main_process():
            lock = prepare_output_dir(output_dir, resume=args.resume, overwrite=args.overwrite_output_dir)
        try:
            started = True
            run_recipe(recipe, output_dir, resume=args.resume)
        finally:
            if lock is not None:
                lock.release()
    except KeyboardInterrupt:
        raise
    except Exception as error:
        if args.debug:
            raise
        # Once training started, a progress bar may hold the current line: the error starts a new one.
        print(("\n" if started else "") + _error_line(error), file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------- checks before any work
_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)


def validate_recipe(recipe: dict[str, Any]) -> None:
    """Check what can be checked from the recipe alone; raise `ValueError` naming the key and the fix.

    Runs before data, backbone or output folder are touched: step counts, batch sizes, learning
    rates, optimizer, schedule, method and adapter fields, task split (when the class count is known
    without loading the data) and the hub settings.
    """
    training, data, model = recipe["training"], recipe["data"], recipe["model"]

    def positive_int(section: dict, where: str, name: str, optional: bool = False) -> None:
        value = section.get(name)
        if optional and value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"{where}.{name}: must be a positive integer, got {value!r}; e.g. {where}.{name}=1"
            )

    def positive_number(section: dict, where: str, name: str, optional: bool = False) -> None:
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

    for name in ("epochs", "batch_size", "eval_batch_size"):
        positive_int(training, "training", name)
    positive_number(training, "training", "base_lr")
    positive_number(training, "training", "first_task_base_lr", optional=True)
    for name in ("weight_decay", "momentum", "max_grad_norm"):
        value = training.get(name)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"training.{name}: must be a finite number >= 0, got {value!r}")
    if training["optimizer"] not in ("adam", "sgd"):
        raise ValueError(f"training.optimizer: expected adam or sgd, got {training['optimizer']!r}")
    if training["lr_scheduler"] not in _SCHEDULERS:
        close = difflib.get_close_matches(str(training["lr_scheduler"]), _SCHEDULERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; expected one of {list(_SCHEDULERS)}"
        raise ValueError(f"training.lr_scheduler: unknown schedule {training['lr_scheduler']!r}{hint}")
    positive_int(training, "training", "torch_threads", optional=True)
    _report_to(training["report_to"])
    if training.get("train_query_cache") and data.get("augment"):
        raise ValueError(
            "training.train_query_cache=true needs data.augment=false: a random crop changes an image's "
            "query every epoch; leave training.train_query_cache unset (null)"
        )
    positive_number(model, "model", "layer_norm_eps", optional=True)
    positive_int(data, "data", "num_tasks")
    positive_int(data, "data", "classes_per_task", optional=True)
    positive_int(data, "data", "image_size")
    positive_int(data, "data", "max_train_per_task", optional=True)
    positive_int(data, "data", "max_test_per_task", optional=True)
    fraction = data.get("holdout_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
        raise ValueError(f"data.holdout_fraction: must lie in (0, 1) or be null, got {fraction!r}")
    try:  # the method and every adapter field, with the class count still unknown
        build_adapter_config(recipe, None, data.get("class_names"))
    except (TypeError, ValueError) as error:
        raise ValueError(str(error).replace("PromptGradientProjectionConfig.", "adapter.")) from None
    _check_task_split(data)
    _check_hub(recipe["hub"])


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


def check_hub_access(hub: dict[str, Any]) -> None:
    """With push_to_hub: the repo id is well formed and the token is accepted by the Hub (`whoami`),
    before any training. Raises `ValueError` naming the setting and the fix."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    _check_hub(hub)
    try:
        validate_repo_id(hub["hub_model_id"])
    except HFValidationError as error:
        raise ValueError(
            f"hub.hub_model_id: {hub['hub_model_id']!r} is not a valid repo id ({error})"
        ) from None
    token = hub.get("token") or get_token()
    if token is None:
        raise ValueError(
            "push_to_hub: no Hugging Face token found; log in with `hf auth login`, set HF_TOKEN, or set hub.token"
        )
    try:
        user = HfApi(token=token).whoami()
    except Exception as error:  # 401, no network, DNS: all mean the push would fail after training
        raise ValueError(
            f"push_to_hub: the Hub did not accept the token ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "log in again with `hf auth login` or fix HF_TOKEN, or drop --push_to_hub"
        ) from None
    namespace = hub["hub_model_id"].split("/")[0] if "/" in hub["hub_model_id"] else None
    allowed = {user.get("name")} | {org.get("name") for org in user.get("orgs", []) if isinstance(org, dict)}
    if namespace is not None and namespace not in allowed:
        logger.warning(
            "hub.hub_model_id %s: namespace %r is neither your user name nor one of your organisations %s",
            hub["hub_model_id"],
            namespace,
            sorted(n for n in allowed if n),
        )


if __name__ == "__main__":
    sys.exit(main())
