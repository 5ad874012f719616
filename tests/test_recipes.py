"""Every recipe in recipes/*.yaml runs, on tiny stand-ins, through the same code as `train_cl.py`.

The recipes name ViT-B/CLIP checkpoints and Hub datasets that are not reachable here, so each is pointed
(with ordinary `section.key=value` overrides) at a tiny ViT / tiny CLIP and a 20-class imagefolder
written by `tiny_assets.py`, for one short epoch. Everything the paper fixes (method, pool sizes, prompt
lengths and layers, head, pull coefficient, optimizer, schedule, learning rate rule, task count) is left
as the recipe states it and checked to reach the adapter config and the TrainingArguments.

Cost, measured on the shared 2-core machine: a full run is ~0.5-1.5 s per task, so every recipe gets
datasets + config + model + TrainingArguments + a first-task training step, and a representative subset
(the demo, L2P, DualPrompt on ImageNet-R's single-split layout, CLIP, an online and a 20-task recipe)
runs end to end through `run_recipe`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from tiny_assets import CLASS_NAMES, IMAGE_SIZE, class_image, torch_threads

from pgp_peft import PGPModel
from pgp_peft.arguments import ContinualTrainingArguments
from pgp_peft.model import get_pgp_model
from pgp_peft.recipe import (
    apply_overrides,
    available_recipes,
    build_adapter_config,
    build_training_arguments,
    load_recipe,
    recipes_dir,
    validate_recipe,
)
from pgp_peft.runner import build_backbone_model, build_datasets, main, run_recipe

L2P = ["l2p_cifar100_10", "l2p_cifar100_20", "l2p_cub200", "l2p_imr", "l2p_tinyimagenet"]
DUALPROMPT = [
    "dualprompt_cifar100_10",
    "dualprompt_cifar100_20",
    "dualprompt_cub200",
    "dualprompt_imr",
    "dualprompt_tinyimagenet",
]
ONLINE = [
    f"{method}_{data}_online"
    for method in ("l2p", "dualprompt")
    for data in ("cifar100_10", "cifar100_20", "tinyimagenet")
]
LORA = ["lora_cifar100_10", "lora_cifar100_20", "lora_demo", "lora_imr"]
ALL_RECIPES = sorted([*L2P, *DUALPROMPT, *ONLINE, *LORA, "clip_cifar100_10", "demo"])
# End to end through run_recipe: one of each kind (the rest get the one-step test below).
FULL_PIPELINE = [
    "demo",
    "l2p_cifar100_10",
    "dualprompt_imr",
    "clip_cifar100_10",
    "l2p_tinyimagenet_online",
    "dualprompt_cifar100_20",
    "lora_demo",
]
# Overridden to fit the stand-ins; every other recipe value must survive.
OVERRIDDEN = {
    "model": {"base_model_name_or_path"},
    "data": {
        "dataset",
        "image_column",
        "label_column",
        "train_split",
        "test_split",
        "holdout_fraction",
        "image_size",
        "max_train_per_task",
        "max_test_per_task",
    },
    "training": {
        "num_train_epochs",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "use_cpu",
        "logging_steps",
    },
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with torch_threads(1):
        yield


def raw_yaml(name: str) -> dict[str, Any]:
    """The recipe file as written (not through load_recipe), to compare against."""
    with open(recipes_dir() / f"{name}.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def tiny_recipe(name: str, assets, *extra: str) -> dict[str, Any]:
    recipe = load_recipe(name)
    return apply_overrides(recipe, [*assets.overrides(recipe), *extra])


def is_clip(name: str) -> bool:
    return raw_yaml(name)["adapter"]["method"] == "clip"


def pixels(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


def assert_recipe_values_survive(name: str, recipe: dict[str, Any]) -> None:
    """Everything the YAML states and the tiny overrides do not touch is unchanged in the recipe dict."""
    raw = raw_yaml(name)
    for section in ("model", "adapter", "data", "training", "hub"):
        for key, value in (raw.get(section) or {}).items():
            if key in OVERRIDDEN.get(section, set()):
                continue
            assert recipe[section][key] == value, f"{name}: {section}.{key} changed"


def assert_config_matches_yaml(name: str, config: dict[str, Any]) -> None:
    """The adapter's paper-facing values (every adapter key of the YAML) reach the saved config."""
    for key, value in raw_yaml(name)["adapter"].items():
        assert config[key] == value, f"{name}: adapter.{key} = {config[key]!r}, the recipe says {value!r}"


# ----------------------------------------------------------------------------- the recipe list
def test_all_recipes_are_available():
    names = available_recipes()
    assert names == ALL_RECIPES
    assert len(names) == 22
    for name in names:
        raw = raw_yaml(name)
        assert raw["name"] == name
        recipe = load_recipe(name)
        assert recipe["name"] == name and recipe["description"]
        family = {"clip": "clip", "demo": "l2p"}.get(name.split("_")[0], name.split("_")[0])
        assert recipe["adapter"]["method"] == family
        assert recipe["training"]["online"] is (name in ONLINE)
        assert recipe["data"]["num_tasks"] in (5, 10, 20)
        assert len(CLASS_NAMES) % recipe["data"]["num_tasks"] == 0  # the stand-in data fits every recipe


# ----------------------------------------------------------------------------- every recipe: build + one step
@pytest.mark.parametrize("name", ALL_RECIPES)
def test_recipe_builds_and_trains_a_step(name, assets, tmp_path, fast_plots):
    """Datasets, adapter config, backbone, model and TrainingArguments from the recipe; one training step."""
    from pgp_peft.trainer import ContinualTrainer

    raw = raw_yaml(name)
    recipe = tiny_recipe(name, assets)
    assert_recipe_values_survive(name, recipe)

    splits, train_transform, eval_transform = build_datasets(recipe["data"], recipe["model"])
    num_tasks = raw["data"]["num_tasks"]
    assert splits.num_tasks == num_tasks and splits.num_classes == len(CLASS_NAMES)
    assert splits.class_names == CLASS_NAMES
    assert all(len(classes) == len(CLASS_NAMES) // num_tasks for classes in splits.task_classes)
    assert eval_transform.mode == raw["data"]["preprocessing"]
    assert train_transform.augment is bool(raw["data"].get("augment", False))
    if eval_transform.mode == "processor":  # the checkpoint's own image processor (here 16 px)
        batch = eval_transform({"image": [class_image(0, 0)]})
        assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)

    config = build_adapter_config(recipe, splits.num_classes, splits.class_names)
    assert_config_matches_yaml(name, config.to_dict())
    assert config.base_model_name_or_path == str(assets.clip if is_clip(name) else assets.vit)
    if config.method == "clip":
        assert config.class_names == CLASS_NAMES

    backbone = build_backbone_model(recipe["model"])
    if "layer_norm_eps" in raw["model"]:
        eps = (
            backbone.config.vision_config.layer_norm_eps if is_clip(name) else backbone.config.layer_norm_eps
        )
        assert eps == raw["model"]["layer_norm_eps"]
    model = get_pgp_model(backbone, config, attn_implementation=recipe["model"]["attn_implementation"])

    training = raw["training"]
    args = build_training_arguments(recipe, str(tmp_path))
    assert args.learning_rate == pytest.approx(training["base_lr"] * 4 / 256)
    assert args.optim.value == training["optim"]
    assert args.lr_scheduler_type.value == training["lr_scheduler_type"]
    assert args.max_grad_norm == training["max_grad_norm"]
    assert args.weight_decay == training.get("weight_decay", 0.0)
    assert args.num_train_epochs == 1  # tiny run; online recipes are one pass anyway
    assert args.remove_unused_columns is False and args.use_cpu is True
    first = args.first_task_arguments()
    if "first_task_base_lr" in training:
        assert first["learning_rate"] == pytest.approx(training["first_task_base_lr"] * 4 / 256)
    if "first_task_weight_decay" in training:
        assert first["weight_decay"] == training["first_task_weight_decay"]

    args.max_steps = 1
    trainer = ContinualTrainer(
        model,
        args,
        splits=splits,
        train_transform=train_transform,
        eval_transform=eval_transform,
        first_task_args=first,
        online=recipe["training"]["online"],
        recipe=recipe,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    first_task = dataclasses.replace(
        splits, train=splits.train[:1], test=splits.test[:1], task_classes=splits.task_classes[:1]
    )
    result = trainer.train_continual(first_task)

    assert trainer.state.global_step >= 1
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    # A 20-task recipe on the 20-class stand-in has one class per task: cross-entropy over the task's
    # class mask is then exactly 0, and LoRA (no pull-constraint term) gets no gradient at all.
    if raw["adapter"]["method"] != "lora" or len(splits.task_classes[0]) > 1:
        assert changed, f"{name}: no trainable parameter changed in one step"
    # the backbone stays frozen (LoRA's A/B matrices are injected into its modules by peft)
    assert not any(n.startswith("backbone.") and ".lora_" not in n for n in before), (
        "the backbone must stay frozen"
    )
    groups = trainer.optimizer.param_groups
    assert groups[0]["initial_lr"] == pytest.approx(first.get("learning_rate", args.learning_rate))
    assert max(g["weight_decay"] for g in groups) == pytest.approx(
        first.get("weight_decay", training.get("weight_decay", 0.0))
    )
    if training["optim"] == "sgd":  # TrainingArguments' optim_args reach torch's SGD
        assert f"momentum={groups[0]['momentum']}" == training["optim_args"]
    assert result.accuracy.values.shape == (1, 1)
    assert model.memory.is_empty() is (not raw["adapter"]["use_pgp"])  # bases after the first task


# ----------------------------------------------------------------------------- representative: end to end
@pytest.mark.parametrize("name", FULL_PIPELINE)
def test_recipe_runs_end_to_end(name, assets, tmp_path, fast_plots):
    raw = raw_yaml(name)
    num_tasks = raw["data"]["num_tasks"]
    recipe = tiny_recipe(name, assets)
    out = tmp_path / "run"
    model, result = run_recipe(recipe, str(out))

    # results.json: an accuracy matrix of num_tasks x num_tasks (row = task, column = after task)
    results = json.loads((out / "results.json").read_text())
    matrix = results["accuracy_matrix"]["values"]
    assert len(matrix) == num_tasks and all(len(row) == num_tasks for row in matrix)
    for i, row in enumerate(matrix):
        assert all(value is None for value in row[:i]), "a task cannot be evaluated before it is trained"
        assert all(value is not None and 0.0 <= value <= 100.0 for value in row[i:])
    assert result.accuracy.values.shape == (num_tasks, num_tasks)
    assert results["manifest"]["num_tasks"] == num_tasks
    assert results["manifest"]["class_names"] == CLASS_NAMES
    assert len(results["memory_ranks"]) == num_tasks
    for plot in ("accuracy_matrix.png", "accuracy_curves.png"):
        assert (out / plot).is_file()
    assert (out / f"checkpoint-task-{num_tasks - 1}" / "continual_state.json").is_file()

    # the adapter: config.json (pgp_peft), weights, model card; never the backbone
    saved = json.loads((out / "config.json").read_text())
    assert saved["library_name"] == "pgp_peft"
    assert_config_matches_yaml(name, saved)
    assert saved["num_classes"] == len(CLASS_NAMES) and saved["class_names"] == CLASS_NAMES
    assert saved["base_model_name_or_path"] == str(assets.clip if is_clip(name) else assets.vit)
    assert (out / "model.safetensors").stat().st_size > 0
    from safetensors.torch import load_file

    assert not any(key.startswith("backbone.") for key in load_file(str(out / "model.safetensors")))
    card = (out / "README.md").read_text()
    assert "library_name: pgp_peft" in card
    assert f"| task | {' | '.join(f'after {t}' for t in range(num_tasks))} |" in card

    # reload on a fresh copy of the backbone, built as the recipe builds it (layer_norm_eps included):
    # identical logits and identical bases
    loaded = PGPModel.from_pretrained(out, base_model=build_backbone_model(recipe["model"]))
    assert type(loaded) is type(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixels()).logits, model(pixels()).logits)
    assert loaded.memory.ranks() == model.memory.ranks() == results["memory_ranks"][-1]
    assert loaded.num_tasks_seen == num_tasks


def test_adapter_reloads_with_the_recipes_layer_norm_eps(assets, tmp_path):
    recipe = tiny_recipe("l2p_cifar100_10", assets)
    assert recipe["model"]["layer_norm_eps"] == 1e-6
    backbone = build_backbone_model(recipe["model"])
    assert backbone.config.layer_norm_eps == 1e-6
    config = build_adapter_config(recipe, len(CLASS_NAMES), CLASS_NAMES)
    torch.manual_seed(0)
    model = get_pgp_model(backbone, config).eval()
    model.register_task_classes(0, range(len(CLASS_NAMES)))
    model.save_pretrained(tmp_path / "adapter")

    loaded = PGPModel.from_pretrained(tmp_path / "adapter")  # backbone from the recorded base model
    assert loaded.backbone.model.config.layer_norm_eps == 1e-6
    with torch.no_grad():
        assert torch.equal(loaded(pixels()).logits, model(pixels()).logits)


# ----------------------------------------------------------------------------- the CLI on the real demo
def test_demo_recipe_runs_through_the_cli(tmp_path, capsys, restore_logging):
    """`python recipes/train_cl.py` path: the shipped Fashion-MNIST subset and shipped tiny backbone."""
    out = tmp_path / "demo"
    code = main(
        [
            "--recipe",
            "demo",
            "--output_dir",
            str(out),
            "data.max_train_per_task=40",
            "data.max_test_per_task=20",
            "training.num_train_epochs=1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "== demo: class-incremental accuracy matrix" in printed
    assert "after 0  after 1  after 2  after 3  after 4" in printed
    assert "average accuracy" in printed and "forgetting (paper)" in printed
    assert f"saved adapter, results.json and plots to {out}" in printed
    # The same run without projection, side by side, with how to read it.
    assert "== demo without projection (baseline): class-incremental accuracy matrix" in printed
    assert "== What PGP bought in this run" in printed and "How to read it" in printed
    assert "Absolute class-IL accuracy is low on this tiny backbone" in printed  # the shipped backbone
    table = printed.split("== What PGP bought in this run")[1]
    assert "L2P-PGP" in table and "L2P (no PGP)" in table and "forgetting, paper definition" in table

    results = json.loads((out / "results.json").read_text())
    baseline = json.loads((out / "baseline" / "results.json").read_text())
    assert results["baseline"]["accuracy_matrix"] == baseline["accuracy_matrix"]
    assert results["baseline"]["summary"]["forgetting_paper"] == baseline["summary"]["forgetting_paper"]
    assert results["manifest"]["dataset"] == "pgp_peft:fashion_mnist_demo"
    assert results["manifest"]["train_sizes"] == [40] * 5 and results["manifest"]["test_sizes"] == [20] * 5
    for plot in ("accuracy_matrix.png", "accuracy_curves.png"):  # the real matplotlib plots
        with Image.open(out / plot) as image:
            assert image.format == "PNG" and min(image.size) > 100

    # The recorded backbone is the built-in one: loading needs no base_model, and predicts class names.
    saved = json.loads((out / "config.json").read_text())
    assert saved["base_model_name_or_path"] == "pgp_peft:vit-tiny-patch4-32-cifar10"
    loaded = PGPModel.from_pretrained(out)
    from pgp_peft.data import load_demo_dataset

    _, test = load_demo_dataset()
    names = loaded.predict([test[i]["image"] for i in range(3)])
    assert len(names) == 3 and set(names) <= set(saved["class_names"])


# ----------------------------------------------------------------------------- CLI: bad input
def test_unknown_recipe_lists_the_valid_names(capsys, restore_logging):
    with pytest.raises(ValueError, match="unknown recipe 'l2p_cifar'") as excinfo:
        load_recipe("l2p_cifar")
    assert all(name in str(excinfo.value) for name in ALL_RECIPES)
    assert main(["--recipe", "l2p_cifar"]) == 2  # one `error: ...` line, exit code 2
    printed = capsys.readouterr().err
    assert printed.startswith("error: unknown recipe") and all(name in printed for name in ALL_RECIPES)


def test_list_prints_every_recipe(capsys):
    assert main(["--list"]) == 0
    assert capsys.readouterr().out.split() == ALL_RECIPES


@pytest.mark.parametrize(
    ("override", "closest"),
    [
        ("training.num_train_epoch=1", "training.num_train_epochs"),
        ("num_train_epoch=1", "training.num_train_epochs"),
        ("training.per_device_batch_size=1", "training.per_device_eval_batch_size"),
        ("adapter.pool_sise=4", "adapter.pool_size"),
        ("adapter.prompt_treshold=0.9", "adapter.prompt_threshold"),  # a config field the recipe omits
        ("data.num_task=5", "data.num_tasks"),
    ],
)
def test_unknown_override_key_names_the_closest_valid_key(override, closest, capsys, restore_logging):
    with pytest.raises(ValueError, match=f"did you mean '{closest}'"):
        apply_overrides(load_recipe("l2p_cifar100_10"), [override])
    assert main(["--recipe", "l2p_cifar100_10", override]) == 2
    assert closest in capsys.readouterr().err


@pytest.mark.parametrize(
    "override",
    [
        "training.num_train_epochs=abc",
        "training.per_device_train_batch_size=1.5",
        "training.base_lr=fast",
        "training.use_cpu=maybe",
        "data.num_tasks=[1, 2]",
        "adapter.g_prompt_layers=3",
        # keys whose recipe value is None are type-checked too (runner fix)
        "adapter.prompt_threshold=abc",
        "data.max_train_per_task=many",
        "hub.private=maybe",
    ],
)
def test_bad_override_value_names_the_key(override, capsys, restore_logging):
    key = override.split("=", 1)[0]
    with pytest.raises(ValueError, match=f"override {key}: expected"):
        apply_overrides(load_recipe("demo"), [override])
    assert main(["--recipe", "demo", override]) == 2
    assert key in capsys.readouterr().err


def test_override_values_are_parsed_and_typed():
    recipe = apply_overrides(
        load_recipe("l2p_cifar100_10"),
        [
            "training.base_lr=1e-3",  # YAML 1.1 reads this as a string: accepted as a number (runner fix)
            "model.layer_norm_eps=1e-5",
            "adapter.prompt_threshold=1",
            "top_k=3",  # a bare key that is unique across sections
            "adapter.e_prompt_layers=[2, 3]",
            "data.holdout_fraction=null",
            "--training.num_train_epochs=2",
        ],
    )
    assert recipe["training"]["base_lr"] == 1e-3 and isinstance(recipe["training"]["base_lr"], float)
    assert recipe["model"]["layer_norm_eps"] == 1e-5
    assert recipe["adapter"]["prompt_threshold"] == 1.0
    assert recipe["adapter"]["top_k"] == 3 and recipe["adapter"]["e_prompt_layers"] == [2, 3]
    assert recipe["data"]["holdout_fraction"] is None and recipe["training"]["num_train_epochs"] == 2
    with pytest.raises(ValueError, match="not of the form key=value"):
        apply_overrides(recipe, ["training.num_train_epochs"])


def test_report_to_reaches_the_training_arguments(tmp_path):
    recipe = load_recipe("l2p_cifar100_10")
    assert build_training_arguments(recipe, str(tmp_path)).report_to == []  # default "none"
    for override, expected in [
        ("training.report_to=tensorboard", ["tensorboard"]),
        ("report_to=tensorboard,mlflow", ["tensorboard", "mlflow"]),  # the CLI form of a list
        ("training.report_to=none", []),
    ]:
        args = build_training_arguments(apply_overrides(recipe, [override]), str(tmp_path))
        assert args.report_to == expected, override
    in_a_file = {**recipe, "training": {**recipe["training"], "report_to": ["tensorboard", "wandb"]}}
    assert build_training_arguments(in_a_file, str(tmp_path)).report_to == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match=r"training.report_to: unknown tracker\(s\) \['tensorbord'\]"):
        build_training_arguments(apply_overrides(recipe, ["training.report_to=tensorbord"]), str(tmp_path))


def test_full_determinism_reaches_the_training_arguments(tmp_path):
    recipe = load_recipe("demo")
    assert build_training_arguments(recipe, str(tmp_path)).full_determinism is False
    recipe = apply_overrides(recipe, ["training.full_determinism=true"])
    assert build_training_arguments(recipe, str(tmp_path)).full_determinism is True


def test_cli_flags_reach_the_recipe(monkeypatch, tmp_path, capsys, restore_logging):
    """--no-pgp (the baseline), hub flags and --key=value overrides, without training."""
    import pgp_peft.runner as runner

    calls: list[tuple[dict, str]] = []
    monkeypatch.setattr(
        runner, "run_recipe", lambda recipe, output_dir, **kw: calls.append((recipe, output_dir))
    )
    monkeypatch.setattr(runner, "check_hub_access", lambda hub: None)  # no Hub here
    monkeypatch.chdir(tmp_path)  # the default output folders are created under outputs/

    assert main(["--recipe", "l2p_cifar100_10", "--no-pgp", "--training.num_train_epochs=1"]) == 0
    recipe, output_dir = calls[-1]
    assert recipe["adapter"]["use_pgp"] is False
    assert build_adapter_config(recipe, 100, None).use_pgp is False
    assert recipe["training"]["num_train_epochs"] == 1
    assert Path(output_dir) == Path("outputs") / "l2p_cifar100_10_baseline"

    assert main(["--recipe", "dualprompt_imr"]) == 0
    assert calls[-1][0]["adapter"]["use_pgp"] is True
    assert Path(calls[-1][1]) == Path("outputs") / "dualprompt_imr"

    args = ["--recipe", "demo", "--push_to_hub", "--hub_model_id", "me/x", "--hub_private"]
    assert main([*args, "--hub_strategy", "every_task"]) == 0
    hub = calls[-1][0]["hub"]
    assert hub == {
        **hub,
        "push_to_hub": True,
        "hub_model_id": "me/x",
        "private": True,
        "strategy": "every_task",
    }

    assert main(["--recipe", "demo", "--frobnicate"]) == 2
    assert "error: unrecognised argument '--frobnicate'" in capsys.readouterr().err


def test_bad_hub_settings_fail_before_training(monkeypatch, assets, tmp_path, capsys, restore_logging):
    """A push without a repo id, or an unknown strategy, is refused up front, not after the run (runner fix)."""
    import pgp_peft.runner as runner

    def no_data(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(runner, "build_datasets", no_data)
    assert main(["--recipe", "demo", "--push_to_hub"]) == 2
    assert "hub.hub_model_id: required with push_to_hub" in capsys.readouterr().err
    recipe = apply_overrides(load_recipe("demo"), ["hub.push_to_hub=true", "hub.hub_model_id=me/x"])
    with pytest.raises(
        ValueError, match=r"hub.strategy: expected one of \['end', 'every_task'\], got 'every-task'"
    ):
        apply_overrides(recipe, ["hub.strategy=every-task"])
    with pytest.raises(ValueError, match="hub.strategy: expected 'end' or 'every_task', got 'every-task'"):
        run_recipe({**recipe, "hub": {**recipe["hub"], "strategy": "every-task"}}, str(tmp_path))
    with pytest.raises(ValueError, match="hub.hub_model_id: required"):
        run_recipe(apply_overrides(recipe, ["hub.hub_model_id=null"]), str(tmp_path))


def test_recipe_file_with_unknown_section_is_rejected(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nadapter: {method: l2p}\noptimizer: {lr: 1}\n")
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['optimizer'\]"):
        load_recipe(str(path))
    path.write_text("adapter: {method: l2p, pool_size: 4}\ndata: {num_tasks: 2}\n")
    recipe = load_recipe(str(path))
    assert recipe["name"] == "mine" and recipe["adapter"]["pool_size"] == 4
    assert recipe["training"]["num_train_epochs"] == 5  # defaults fill what the file does not state


# ----------------------------------------------------------------------------- TrainingArguments names
def test_any_training_arguments_field_reaches_the_trainer(tmp_path):
    """The training section is `ContinualTrainingArguments`: every `TrainingArguments` field by its own name."""
    from transformers import TrainingArguments

    recipe = apply_overrides(
        load_recipe("l2p_cifar100_10"),
        [
            "training.warmup_steps=3",
            "gradient_accumulation_steps=2",  # a bare TrainingArguments key
            "training.lr_scheduler_type=cosine",
            "training.optim=sgd",
        ],
    )
    validate_recipe(recipe)
    args = build_training_arguments(recipe, str(tmp_path))
    assert isinstance(args, TrainingArguments) and isinstance(args, ContinualTrainingArguments)
    assert args.warmup_steps == 3 and args.gradient_accumulation_steps == 2
    assert args.lr_scheduler_type.value == "cosine" and args.optim.value == "sgd"
    assert args.optim_args == "momentum=0.9"  # the authors' SGD momentum, not torch's 0
    assert args.learning_rate == pytest.approx(0.03 * 16 / 256)  # the recipe's base_lr at its batch size
    assert args.save_strategy.value == "no" and args.remove_unused_columns is False


def test_learning_rate_is_given_directly_only_without_base_lr(tmp_path):
    direct = apply_overrides(
        load_recipe("l2p_cifar100_10"), ["training.base_lr=null", "training.learning_rate=1e-3"]
    )
    validate_recipe(direct)
    assert build_training_arguments(direct, str(tmp_path)).learning_rate == 1e-3
    both = apply_overrides(load_recipe("l2p_cifar100_10"), ["training.learning_rate=1e-3"])
    with pytest.raises(ValueError, match="training.learning_rate and training.base_lr are both set"):
        validate_recipe(both)
    # A copy of the arguments (dataclasses.replace, as a user may do) carries the derived rate: no conflict.
    args = build_training_arguments(load_recipe("l2p_cifar100_10"), str(tmp_path))
    assert dataclasses.replace(args).learning_rate == args.learning_rate


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.epochs=1", "training.epochs is now training.num_train_epochs"),
        ("batch_size=8", "training.batch_size is now training.per_device_train_batch_size"),
        ("training.optimizer=sgd", "training.optimizer is now training.optim"),
        ("training.output_dir=x", "pass --output_dir"),
        ("training.save_strategy=steps", "the continual trainer checkpoints after every task"),
        ("training.push_to_hub=true", "use hub.push_to_hub"),
        ("adapter.num_tasks=3", "adapter.num_tasks: set from data.num_tasks"),
    ],
)
def test_renamed_and_trainer_owned_keys_are_refused_naming_the_key_to_use(
    override, message, capsys, restore_logging
):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_overrides(load_recipe("demo"), [override])
    assert main(["--recipe", "demo", override]) == 2
    assert message in capsys.readouterr().err


def test_a_recipe_file_is_checked_as_the_command_line_is(tmp_path):
    path = tmp_path / "mine.yaml"
    cases = [
        (
            "training: {epochs: 3}\n",
            "unknown key 'training.epochs': training.epochs is now training.num_train_epochs",
        ),
        ("training: {num_train_epochs: many}\n", "training.num_train_epochs: expected a number, got 'many'"),
        ("data: {num_tasks: 2, augment: maybe}\n", "data.augment: expected true/false, got 'maybe'"),
        ("adapter: {method: dualprompt, e_prompt_layers: 3}\n", "adapter.e_prompt_layers: expected a list"),
        ("hub: {strategy: weekly}\n", "hub.strategy: expected one of ['end', 'every_task'], got 'weekly'"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"recipe {path}: {message}")):
            load_recipe(str(path))
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected sections"):
        load_recipe(str(path))
    # values are typed as on the command line: a YAML int for a float field is a float
    path.write_text("training: {num_train_epochs: 3, base_lr: 1e-3}\n")
    training = load_recipe(str(path))["training"]
    assert training["num_train_epochs"] == 3.0 and training["base_lr"] == 1e-3


def test_recipe_names_resolve_only_in_the_recipe_folder(monkeypatch, tmp_path):
    """No lookup through the package's install path: a name needs PGP_RECIPES_DIR (set by train_cl.py)."""
    monkeypatch.delenv("PGP_RECIPES_DIR")
    with pytest.raises(ValueError, match="a recipe name needs the recipe folder"):
        load_recipe("demo")
    path = tmp_path / "mine.yaml"
    path.write_text("data: {num_tasks: 2}\n")
    assert load_recipe(str(path))["data"]["num_tasks"] == 2
    with pytest.raises(ValueError, match="no such file"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_hf_argument_parser_forms_on_the_command_line(monkeypatch, tmp_path, capsys, restore_logging):
    """`--key value` (lists as several words, a bare boolean flag) as HfArgumentParser reads them."""
    import pgp_peft.runner as runner

    calls: list[dict] = []
    monkeypatch.setattr(runner, "run_recipe", lambda recipe, output_dir, **kw: calls.append(recipe))
    monkeypatch.chdir(tmp_path)
    argv = ["--recipe", "dualprompt_imr", "--e_prompt_layers", "2", "3", "--use_cpu", "--output_dir", "o"]
    assert main([*argv, "--seed", "7", "--per_device_train_batch_size=8"]) == 0
    recipe = calls[-1]
    assert recipe["adapter"]["e_prompt_layers"] == [2, 3]
    assert recipe["training"]["use_cpu"] is True and recipe["training"]["seed"] == 7
    assert recipe["training"]["per_device_train_batch_size"] == 8
    capsys.readouterr()
    assert main(["--recipe", "demo", "--num_train_epochs", "1", "2"]) == 2
    assert "unrecognised argument '2'" in capsys.readouterr().err  # a scalar takes one word, as in argparse
    assert main(["--recipe", "demo", "--hub_strategy", "weekly"]) == 2
    assert "invalid choice: 'weekly'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and "--overwrite_output_dir" in capsys.readouterr().out


def test_command_line_edge_cases(monkeypatch, tmp_path, capsys, restore_logging):
    """Values containing '=', LoRA's `--r` (no abbreviation of --recipe), explicit false for the hub flags,
    the `--` separator, command-line order, and words typed as HfArgumentParser types them."""
    import pgp_peft.runner as runner

    calls: list[dict] = []
    monkeypatch.setattr(runner, "run_recipe", lambda recipe, output_dir, **kw: calls.append(recipe))
    monkeypatch.chdir(tmp_path)
    assert main(["--recipe", "lora_demo", "--r", "4", "--optim", "sgd", "--optim_args", "momentum=0.5"]) == 0
    assert calls[-1]["adapter"]["r"] == 4 and calls[-1]["training"]["optim_args"] == "momentum=0.5"
    assert (
        main(["--recipe", "demo", "hub.push_to_hub=true", "hub.private=true", "--push_to_hub", "false"]) == 0
    )
    assert calls[-1]["hub"]["push_to_hub"] is False and calls[-1]["hub"]["private"] is True
    assert main(["--recipe", "demo", "--hub_private", "false"]) == 0 and calls[-1]["hub"]["private"] is False
    assert main(["--recipe", "demo", "--seed=4", "training.seed=3", "--", "data.max_test_per_task=7"]) == 0
    assert calls[-1]["training"]["seed"] == 3 and calls[-1]["data"]["max_test_per_task"] == 7
    assert main(["--recipe", "demo", "--class_names", "yes", "T-shirt, top", "--revision", "0123"]) == 0
    assert calls[-1]["data"]["class_names"] == ["yes", "T-shirt, top"]
    assert calls[-1]["model"]["revision"] == "0123"
    # a scalar flag takes one word even when it looks like an override; a list stops at the next override
    assert (
        main(["--recipe", "demo", "--optim_args", "weight_decay=0.1", "--e_prompt_layers", "1", "seed=5"])
        == 0
    )
    assert calls[-1]["training"]["optim_args"] == "weight_decay=0.1" and calls[-1]["training"]["seed"] == 5
    assert calls[-1]["adapter"]["e_prompt_layers"] == [1]
    capsys.readouterr()
    with pytest.raises(SystemExit):  # -h after a recipe flag is the help, not its value
        main(["--recipe", "demo", "--seed", "3", "-h"])
    assert "--overwrite_output_dir" in capsys.readouterr().out
    for argv, message in [
        (["--seed", "null"], "override training.seed: expected an integer, got null"),
        (["save_strategy=epoch"], "training.save_strategy: set by the continual trainer"),
        (["--eval_strategy", "steps"], "training.eval_strategy: set by the continual trainer"),
        (["training.hub_revision=dev"], "pgp_peft pushes to the repo's main branch"),
        (["--optim", "adam"], "unknown optimizer 'adam'; did you mean 'adamw_torch'?"),
        (["training.momentum=0.5"], "e.g. training.optim_args=momentum=0.9"),
    ]:
        assert main(["--recipe", "demo", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    monkeypatch.delenv("PGP_RECIPES_DIR")
    assert main(["--list"]) == 2
    assert "--list needs the recipe folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- determinism, through the CLI
REPO = Path(__file__).resolve().parents[1]
# The demo recipe (PGP run + no-PGP baseline), shrunk: 2 tasks x 5 classes, 48 training images per
# task (2 steps of 32), 1 epoch.
SMALL_DEMO = [
    "--recipe",
    "demo",
    "data.num_tasks=2",
    "data.max_train_per_task=48",
    "data.max_test_per_task=10",
    "training.num_train_epochs=1",
    "adapter.memory_samples=16",
]


def _cli(out: Path, *extra: str, kill_at: str | None = None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PGP_RECIPES_DIR": str(REPO / "recipes")}
    command = [sys.executable, str(REPO / "recipes" / "train_cl.py")]
    if kill_at:
        command = [sys.executable, str(REPO / "tests" / "scripts" / "cli_kill.py"), kill_at]
    with open(out.parent / f"{out.name}.log", "a") as log:
        return subprocess.Popen(
            [*command, *SMALL_DEMO, "--output_dir", str(out), *extra], env=env, stdout=log, stderr=log
        )


def _finish(process) -> int:
    try:
        return process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_same_seed_gives_identical_results_twice_and_across_kill_and_resume(tmp_path):
    """Two CLI runs of the same recipe and seed, and a run SIGKILLed in task 1 then `--resume`d, end
    with bitwise identical accuracy matrices and adapters (PGP run and its no-PGP baseline)."""
    import signal

    from safetensors.torch import load_file

    first, second, killed = tmp_path / "first", tmp_path / "second", tmp_path / "killed"
    processes = [_cli(first), _cli(second), _cli(killed, kill_at="1:1")]
    codes = [_finish(process) for process in processes]
    log = lambda out: (tmp_path / f"{out.name}.log").read_text()[-3000:]  # noqa: E731
    assert codes[:2] == [0, 0], log(first) + log(second)
    assert codes[2] == -signal.SIGKILL, log(killed)
    assert (killed / "baseline" / "checkpoint-task-1").is_dir()  # the baseline runs first, to the end
    assert (killed / "checkpoint-task-0").is_dir() and not (killed / "checkpoint-task-1").exists()
    assert _finish(_cli(killed, "--resume")) == 0, log(killed)

    results = [json.loads((out / "results.json").read_text()) for out in (first, second, killed)]
    for key in ("accuracy_matrix", "task_il_accuracy_matrix"):
        assert results[0][key] == results[1][key] == results[2][key], key
        assert results[0]["baseline"][key] == results[1]["baseline"][key] == results[2]["baseline"][key]
    assert results[0]["memory_ranks"] == results[2]["memory_ranks"]

    def weights_of(out: Path, sub: str = "") -> dict[str, torch.Tensor]:
        return load_file(str(out / sub / "model.safetensors"))

    for sub in ("", "baseline"):
        weights = [weights_of(out, sub) for out in (first, second, killed)]
        for name in weights[0]:
            assert torch.equal(weights[0][name], weights[1][name]), (sub, name)
            assert torch.equal(weights[0][name], weights[2][name]), (sub, name)
    # Only the projection differs between the run and its baseline.
    baseline_config = json.loads((first / "baseline" / "config.json").read_text())
    assert results[0]["config"]["use_pgp"] is True and baseline_config["use_pgp"] is False
    baseline_weights = load_file(str(first / "baseline" / "model.safetensors"))
    assert not torch.equal(weights_of(first)["prompt_pool.prompt"], baseline_weights["prompt_pool.prompt"])
