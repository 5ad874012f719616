"""The run's argument dataclasses (`pgp_peft.arguments`) on `HfArgumentParser` and `TrainingArguments`.

Also run by CI at the declared dependency floors (transformers' argument parsing changes between
versions: these tests pin what the recipes rely on)."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from pgp_peft.arguments import (
    ContinualTrainingArguments,
    DataArguments,
    HubArguments,
    ModelArguments,
    ScriptArguments,
    parse_value,
    report_to_names,
    training_recipe_defaults,
)
from pgp_peft.config import config_class
from pgp_peft.methods import available_methods

SECTIONS = [ModelArguments, DataArguments, HubArguments, ContinualTrainingArguments, ScriptArguments]


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda cls: cls.__name__)
def test_every_dataclass_builds_an_hf_argument_parser(cls):
    parser = HfArgumentParser(cls)
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    namespace, _ = parser.parse_known_args([])
    assert names <= set(vars(namespace))


@pytest.mark.parametrize("method", available_methods())
def test_every_method_config_builds_an_hf_argument_parser(method):
    HfArgumentParser(config_class(method))


def test_values_are_typed_from_the_field_types():
    assert parse_value(ContinualTrainingArguments, "num_train_epochs", 3, "k") == 3.0
    assert parse_value(ContinualTrainingArguments, "base_lr", "1e-3", "k") == 1e-3  # YAML 1.1 reads a string
    assert parse_value(ContinualTrainingArguments, "base_lr", "-1e-3", "k") == -1e-3  # not read as a flag
    assert parse_value(ContinualTrainingArguments, "use_cpu", "yes", "k") is True
    assert parse_value(ContinualTrainingArguments, "train_query_cache", False, "k") is False  # Optional[bool]
    assert parse_value(DataArguments, "class_names", ["a", "b"], "k") == ["a", "b"]
    assert parse_value(DataArguments, "class_names", [], "k") == []
    assert parse_value(DataArguments, "holdout_fraction", None, "k") is None
    assert parse_value(config_class("dualprompt"), "e_prompt_layers", [2, 3], "k") == [2, 3]
    assert parse_value(HubArguments, "strategy", "every_task", "k") == "every_task"


@pytest.mark.parametrize(
    ("cls", "name", "value", "expected"),
    [
        (ContinualTrainingArguments, "num_train_epochs", "abc", "a number"),
        (ContinualTrainingArguments, "per_device_train_batch_size", 1.5, "an integer"),
        (ContinualTrainingArguments, "use_cpu", "maybe", "true/false"),
        (DataArguments, "num_tasks", [1, 2], "an integer"),
        (DataArguments, "preprocessing", "imagenet", "one of ['reference', 'processor']"),
        (HubArguments, "strategy", "weekly", "one of ['end', 'every_task']"),
    ],
)
def test_a_wrong_type_names_the_key_and_what_it_expects(cls, name, value, expected):
    with pytest.raises(ValueError) as error:
        parse_value(cls, name, value, f"override x.{name}")
    assert str(error.value).startswith(f"override x.{name}: expected {expected}, got {value!r}")


def test_list_fields_refuse_a_scalar():
    with pytest.raises(ValueError, match="expected a list like"):
        parse_value(config_class("dualprompt"), "e_prompt_layers", 3, "k")


def test_learning_rate_rule_and_cpu_defaults(tmp_path):
    args = ContinualTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=24, base_lr=0.005)
    assert isinstance(args, TrainingArguments)
    assert args.learning_rate == pytest.approx(0.005 * 24 / 256)
    assert args.lr_scheduler_type.value == "constant" and args.optim.value == "adamw_torch"
    assert args.save_strategy.value == "no" and args.remove_unused_columns is False
    assert args.report_to == []
    direct = ContinualTrainingArguments(output_dir=str(tmp_path), base_lr=None, learning_rate=0.1)
    assert direct.learning_rate == 0.1
    # base_lr decides, with a warning (a recipe setting both is refused before this): a copy with another
    # batch size gets its own rate, and a copy of the first task's arguments (lr set by the trainer) works.
    both = ContinualTrainingArguments(output_dir=str(tmp_path), base_lr=0.03, learning_rate=0.1)
    assert both.learning_rate == pytest.approx(0.03 * 16 / 256)
    assert dataclasses.replace(args, per_device_train_batch_size=48).learning_rate == pytest.approx(
        0.005 * 48 / 256
    )
    args.learning_rate = 1e-4  # what ContinualTrainer does for the first task's rate
    dataclasses.replace(args)
    assert ContinualTrainingArguments(output_dir=str(tmp_path)).learning_rate == pytest.approx(
        0.03 * 16 / 256
    )
    # the transformers way: only learning_rate
    assert ContinualTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3).learning_rate == 1e-3
    cpu = ContinualTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert cpu.bf16 is False and cpu.dataloader_pin_memory is False


def test_first_task_arguments_scale_with_the_batch(tmp_path):
    args = ContinualTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        base_lr=0.08,
        first_task_base_lr=0.008,
        first_task_weight_decay=5e-4,
    )
    assert args.first_task_arguments() == {"learning_rate": pytest.approx(0.001), "weight_decay": 5e-4}
    assert ContinualTrainingArguments(output_dir=str(tmp_path)).first_task_arguments() == {}


def test_report_to_accepts_the_command_line_form():
    assert report_to_names("none") == [] and report_to_names([]) == []
    assert report_to_names("tensorboard, mlflow") == ["tensorboard", "mlflow"]
    with pytest.raises(ValueError, match=r"unknown tracker\(s\) \['tensorbord'\]"):
        report_to_names("tensorbord")


def test_recipe_defaults_are_the_fields_the_subclass_declares():
    defaults = training_recipe_defaults()
    assert defaults["num_train_epochs"] == 5.0 and defaults["base_lr"] == 0.03
    assert "seed" not in defaults  # TrainingArguments' own default (42) applies
    assert "save_strategy" not in defaults and "remove_unused_columns" not in defaults  # trainer-owned
