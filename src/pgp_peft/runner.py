"""Running a recipe end to end, and the `recipes/train_cl.py` command.

`run_recipe` builds the datasets, backbone, adapter and `ContinualTrainingArguments` a recipe describes
(see `recipe.py` for the recipe format) and trains the task sequence; `main` is the command: its own flags
are `ScriptArguments` parsed by `transformers.HfArgumentParser`, everything else is a recipe override.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from .arguments import DEMO_DATASET, ContinualTrainingArguments, ScriptArguments, is_bool_field, is_list_field
from .backbones import load_backbone, resolve_builtin
from .callbacks import ContinualCallback
from .recipe import (
    RECIPES_DIR_ENV,
    apply_overrides,
    available_recipes,
    backbone_kwargs,
    build_adapter_config,
    build_training_arguments,
    check_hub_settings,
    field_owner,
    load_recipe,
    recipes_dir,
    resolve_key,
    set_recipe_value,
    validate_recipe,
)
from .run_folder import BASELINE_DIR, prepare_output_dir

logger = logging.getLogger("pgp_peft")


# ----------------------------------------------------------------------------- building blocks
def build_backbone_model(model_section: dict[str, Any]):
    """Load the frozen backbone named by the recipe (Hub id, local folder or built-in)."""
    return load_backbone(
        model_section["base_model_name_or_path"],
        model_section.get("revision"),
        backbone_kwargs(model_section),
    )


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


def trainer_speed_options(args: ContinualTrainingArguments) -> dict[str, Any]:
    """The `ContinualTrainer` speed options the arguments set (query caches, decode cache, compiled backbone)."""
    keys = ("eval_query_cache", "train_query_cache", "decode_cache", "compile_backbone")
    return {key: getattr(args, key) for key in keys}


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

    check_hub_settings(recipe["hub"])  # before any training: a bad hub setting must not cost a run
    args = build_training_arguments(recipe, output_dir)
    baseline = None
    if args.compare_baseline and recipe["adapter"].get("use_pgp", True):
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
    set_seed(args.seed)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    splits, train_transform, eval_transform = build_datasets(recipe["data"], recipe["model"], output_dir)
    config = build_adapter_config(recipe, splits.num_classes, splits.class_names)
    if backbone is None:
        backbone = build_backbone_model(recipe["model"])
    model = get_pgp_model(
        backbone, config, attn_implementation=recipe["model"]["attn_implementation"], tokenizer=tokenizer
    )
    trainer = ContinualTrainer(
        model,
        args,
        splits=splits,
        train_transform=train_transform,
        eval_transform=eval_transform,  # memory samples: the trainer's default (training transform in reference mode)
        first_task_args=args.first_task_arguments(),
        online=args.online,
        callbacks=_hub_callbacks(recipe),
        recipe=recipe,
        **trainer_speed_options(args),
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


def _push(model, recipe, trainer, result, message: str) -> None:
    hub = recipe["hub"]
    check_hub_settings(hub)
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


class UsageError(ValueError):
    """A command-line mistake (printed as one `error: ...` line, exit code 2)."""


class _ScriptParser(HfArgumentParser):
    """`HfArgumentParser` over `ScriptArguments` whose mistakes raise `UsageError` (one line, exit 2)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


@dataclass
class SpacedOverride:
    """`--key value [value ...]` on the command line: a recipe override in `HfArgumentParser`'s form, its
    words typed as `HfArgumentParser` types them (a lone `null` is None; no words: a boolean flag)."""

    flag: str
    words: list[str]


def script_parser() -> HfArgumentParser:
    # allow_abbrev=False: `--r 4` (LoRA's rank) must not be read as an abbreviation of --recipe / --resume.
    return _ScriptParser(
        ScriptArguments,
        allow_abbrev=False,
        description="Continual learning with Prompt Gradient Projection (L2P / DualPrompt / CLIP / LoRA).",
        epilog="Recipe overrides, in any order among the flags: section.key=value (training.num_train_epochs=1), "
        "a unique bare key=value (pool_size=20), --key=value or --key value (--num_train_epochs 1). "
        "The command's flags apply after the overrides. TrainingArguments' own `debug` is set as "
        "training.debug=... (--debug is this command's).",
    )


_BOOL_WORDS = {"true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"}


def _script_options() -> dict[str, bool]:
    """Every spelling of the command's own flags -> whether it takes a value (booleans take one optionally)."""
    options = {"-h": False, "--help": False}
    for item in fields(ScriptArguments):
        takes_value = not is_bool_field(ScriptArguments, item.name)
        for spelling in {item.name, item.name.replace("_", "-")}:
            options[f"--{spelling}"] = takes_value
    return options


def _is_override(token: str) -> bool:
    """`section.key=value` / `key=value` naming a recipe key (not, say, the value `momentum=0.9`)."""
    if "=" not in token or token.startswith("-"):
        return False
    try:
        resolve_key(token.split("=", 1)[0])
    except ValueError:
        return False
    return True


def _flag_kind(flag: str) -> str:
    """ "list", "bool" or "scalar" for a recipe-key flag (`--e_prompt_layers`); "scalar" if it names none
    (the override check then names the closest key)."""
    try:
        section, name = resolve_key(flag).split(".", 1)
    except ValueError:
        return "scalar"
    owner = field_owner({"adapter": {}}, section, name)
    if is_list_field(owner, name):
        return "list"
    return "bool" if is_bool_field(owner, name) else "scalar"


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, list[str | SpacedOverride]]:
    """The command's flags (`ScriptArguments`, parsed by `HfArgumentParser`) and the recipe overrides, in
    command-line order; both may come in any order.

    Overrides: `section.key=value`, `key=value`, `--section.key=value`, `--key=value`, `--key value [value
    ...]`, and every word after `--`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options = _script_options()
    flags: list[str] = []
    overrides: list[str | SpacedOverride] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        name = token.split("=", 1)[0]
        if token == "--":
            overrides.extend(argv[index:])
            break
        if name in options:
            flags.append(token)
            next_word = argv[index] if index < len(argv) else None
            if "=" not in token and next_word is not None:
                # A value-taking flag takes the next word; a boolean flag only an explicit true/false.
                if options[name] or next_word.lower() in _BOOL_WORDS:
                    flags.append(next_word)
                    index += 1
            continue
        if token.startswith("--"):
            if "=" in token:
                overrides.append(token[2:])
                continue
            kind = _flag_kind(token)
            words: list[str] = []
            while index < len(argv) and not argv[index].startswith("--") and argv[index] not in options:
                word = argv[index]
                # A list takes words up to the next flag or override; a scalar takes one word, a boolean
                # only an explicit true/false (`--use_cpu` alone is true).
                if kind == "list" and _is_override(word):
                    break
                if kind == "bool" and word.lower() not in _BOOL_WORDS:
                    break
                words.append(word)
                index += 1
                if kind != "list":
                    break
            overrides.append(SpacedOverride(token, words))
            continue
        if "=" in token:
            overrides.append(token)  # an unknown key is named by the override check (did you mean ...)
            continue
        raise UsageError(f"unrecognised argument {token!r} (see --help)")
    (script_args,) = script_parser().parse_args_into_dataclasses(args=flags)
    return script_args, overrides


def _apply_spaced_override(recipe: dict[str, Any], override: SpacedOverride) -> None:
    """`--key v [v ...]` into the recipe, typed from the words as `HfArgumentParser` types them."""
    try:
        key = resolve_key(override.flag)
    except ValueError as error:  # names the closest recipe key, or the new name of a renamed one
        raise UsageError(f"unrecognised argument {override.flag!r}: {error} (see --help)") from None
    section, name = key.split(".", 1)
    owner = field_owner(recipe, section, name)
    words = override.words
    if is_list_field(owner, name):
        value: Any = None if words == ["null"] else list(words)
    elif not words and is_bool_field(owner, name):
        value = True  # `--use_cpu`: a bare boolean flag, as HfArgumentParser reads it
    elif len(words) != 1:
        raise UsageError(f"{override.flag}: expected one value, got {len(words)} (see --help)")
    else:
        value = None if words[0] == "null" else words[0]
    set_recipe_value(recipe, key, value)


def recipe_from_args(args: ScriptArguments, overrides: list[str | SpacedOverride]) -> dict[str, Any]:
    """The recipe `--recipe` names, with the overrides (in command-line order) and the flags that set recipe
    keys applied."""
    recipe = load_recipe(args.recipe)
    for item in overrides:
        if isinstance(item, SpacedOverride):
            _apply_spaced_override(recipe, item)
        else:
            recipe = apply_overrides(recipe, [item.removeprefix("--")])
    if args.no_pgp:
        recipe["adapter"]["use_pgp"] = False
    if args.push_to_hub is not None:  # `--push_to_hub false` turns a recipe's push off
        recipe["hub"]["push_to_hub"] = args.push_to_hub
    if args.hub_model_id:
        recipe["hub"]["hub_model_id"] = args.hub_model_id
    if args.hub_private is not None:
        recipe["hub"]["private"] = args.hub_private
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
    try:
        args, overrides = parse_args(argv)
    except UsageError as error:
        print(_error_line(error), file=sys.stderr)
        return 2
    if args.list:
        if recipes_dir() is None:
            print(
                f"error: --list needs the recipe folder: run recipes/train_cl.py, or set {RECIPES_DIR_ENV}",
                file=sys.stderr,
            )
            return 2
        for name in available_recipes():
            print(name)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = False
    try:
        recipe = recipe_from_args(args, overrides)
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


# ----------------------------------------------------------------------------- checks with the network
def check_hub_access(hub: dict[str, Any]) -> None:
    """With push_to_hub: the repo id is well formed and the token is accepted by the Hub (`whoami`),
    before any training. Raises `ValueError` naming the setting and the fix."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    check_hub_settings(hub)
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
