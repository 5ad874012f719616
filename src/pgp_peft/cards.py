"""Model cards for pgp_peft adapters: Hub metadata (tags, base model, model-index) and a readable body.

The card text lives in one Jinja template shipped in the package, ``pgp_peft/templates/pgp_model_card.md``
(``model_cards/`` of the repository points to it). Jinja2 is what ``huggingface_hub.ModelCard.from_template``
uses; it is installed with torch. The method's wording comes from its `MethodCard` (`pgp_peft.methods`).

Everything numeric is pre-formatted here; the template only lays it out.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .methods import available_methods, get_method
from .metrics import matrix_to_markdown

__all__ = [
    "LIBRARY_NAME",
    "LIBRARY_TAGS",
    "PAPER_CITATION",
    "RUN_FILES",
    "TEMPLATE_NAME",
    "build_model_card",
    "card_kwargs_from_results",
    "card_kwargs_from_run",
    "template_path",
]

TEMPLATE_NAME = "pgp_model_card.md"
LIBRARY_NAME = "pgp_peft"

PAPER_CITATION = """@inproceedings{qiao2024prompt,
  title={Prompt Gradient Projection for Continual Learning},
  author={Qiao, Jingyang and Zhang, Zhizhong and Tan, Xin and Chen, Chengwei and Qu, Yanyun and Peng, Yong and Xie, Yuan},
  booktitle={The Twelfth International Conference on Learning Representations},
  year={2024}
}"""

# The library's Hub identity: `library_name` in every adapter's config.json and card, and the tags
# every card has (the method adds its own, see `MethodCard.tags`).
LIBRARY_TAGS: tuple[str, ...] = (LIBRARY_NAME, "continual-learning", "image-classification")
# Files of a training run's folder that go to the Hub with the adapter (plots are embedded in the card).
RUN_FILES = ("results.json", "accuracy_matrix.png", "accuracy_curves.png")
_COMMON_SETTINGS: tuple[str, ...] = ("method", "base_model_name_or_path", "revision", "num_classes")
_PGP_SETTINGS: tuple[str, ...] = ("projection_space", "prompt_threshold", "key_threshold", "memory_samples")
# Built-in data drawn from a Hub dataset: the card's `datasets` metadata names that source (the text
# says it is a subset; the model-index results stay "custom"). The built-in backbone has no Hub repo,
# so it gets no `base_model` metadata (the Hub only accepts existing model ids there).
_HUB_SOURCE_OF_BUILTIN_DATA = {"pgp_peft:fashion_mnist_demo": "zalando-datasets/fashion_mnist"}


def template_path() -> Path:
    """The model-card template shipped in the package (``pgp_peft/templates/pgp_model_card.md``), the
    only copy: ``model_cards/`` of the repository points to it."""
    path = Path(__file__).resolve().parent / "templates" / TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"Model card template not found at {path} (is package-data 'templates/*.md' included in the build?)"
        )
    return path


def build_model_card(
    *,
    config: Mapping[str, Any],
    results: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    dataset_id: str | None = None,
    repo_id: str | None = None,
    plot_filenames: Sequence[str] = (),
) -> ModelCard:
    """Build the model card of a PGP adapter.

    Args:
        config: the adapter config as a dict. Required: ``method`` (``"l2p"``, ``"dualprompt"`` or
            ``"clip"``). Used when present: ``base_model_name_or_path``, ``revision``, ``num_classes``,
            ``use_pgp``, ``projection_space``, ``prompt_selection`` (``"instance"``/``"batch"``, else
            derived from ``batchwise_prompt``), the method's pool settings, ``class_names``, ``license``,
            ``pgp_peft_version``.
        results: run results (accuracies in percent): ``accuracy_matrix`` (square list of lists,
            ``None``/NaN = not measured), ``average_accuracy``, ``forgetting_paper``,
            ``forgetting_reference``, ``bwt`` (or ``backward_transfer``, as ``metrics.summarize`` names
            it), ``num_tasks``, optional ``task_il_average_accuracy``, ``class_order`` and ``setting``
            (``"class-IL"`` or ``"online class-IL"``).
        recipe: training recipe settings, shown verbatim as YAML.
        class_names: class names indexed by dataset label id (shown in class order in the notes).
        dataset_id: Hub dataset id (card metadata ``datasets`` and the model-index dataset).
        repo_id: the repository the card is for (title, model-index name and the loading snippet).
        plot_filenames: image files uploaded next to the card, embedded by relative file name.

    Returns:
        A ``huggingface_hub.ModelCard`` whose metadata has ``library_name: pgp_peft``, the tags, the
        ``base_model`` (a Hub id; the revision is given in the text), ``pipeline_tag`` and, with
        results, a ``model-index`` with average accuracy and both forgetting definitions.

    Raises:
        ValueError: unknown method or prompt selection, or malformed results.
    """
    method = str(config.get("method", "")).lower()
    if method not in available_methods():
        raise ValueError(
            f"config['method'] must be one of {available_methods()}, got {config.get('method')!r}"
        )
    card = get_method(method).method_cls.card
    use_pgp = bool(config.get("use_pgp", False))
    selection = _prompt_selection(config)
    method_label = card.name + ("-PGP" if use_pgp else "")
    names = list(class_names) if class_names is not None else config.get("class_names")
    base_model = config.get("base_model_name_or_path")
    # Only a Hub id may go into the metadata: a local folder would link a dataset that does not exist.
    hub_dataset = dataset_id if _is_hub_repo_id(dataset_id) else None
    summary = _Summary.from_results(results) if results is not None else None
    model_name = repo_id or f"{LIBRARY_NAME}-{method_label.lower()}"

    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        tags=[*LIBRARY_TAGS, *card.tags, method, *(["pgp"] if use_pgp else [])],
        base_model=base_model if _is_hub_repo_id(base_model) else None,
        datasets=[hub_dataset or _HUB_SOURCE_OF_BUILTIN_DATA.get(dataset_id)]
        if (hub_dataset or dataset_id in _HUB_SOURCE_OF_BUILTIN_DATA)
        else None,
        pipeline_tag="image-classification",
        license=config.get("license") or (recipe or {}).get("license"),
        metrics=["accuracy"] if summary is not None else None,
        model_name=model_name if summary is not None else None,
        eval_results=summary.eval_results(hub_dataset) if summary is not None else None,
    )
    template_kwargs: dict[str, Any] = {
        "title": repo_id.split("/")[-1] if repo_id else f"{method_label} adapter",
        "method_name": method_label,
        "pgp_sentence": _pgp_sentence(card.name, use_pgp, config.get("projection_space")),
        "contents": card.contents + (", and the PGP projection bases" if use_pgp else ""),
        "backbone": _backbone_text(base_model, config.get("revision")),
        "backbone_plain": _backbone_plain(base_model, config.get("revision")),
        "has_results": summary is not None,
        "setting_sentence": summary.setting_sentence(dataset_id) if summary is not None else "",
        "summary_rows": summary.rows() if summary is not None else [],
        "matrix_table": summary.matrix_table() if summary is not None else "",
        "plots": [str(name) for name in plot_filenames],
        "config_yaml": _to_yaml(
            _key_settings(config, card.settings, use_pgp, selection, card.selection_text)
        ),
        "recipe_yaml": _to_yaml(recipe) if recipe else "",
        "repo_id": repo_id or "path/to/adapter-or-repo-id",
        "prompt_selection_text": card.selection_text or _prompt_selection_text(selection),
        "class_order_text": _class_order_text(summary.class_order if summary is not None else None, names),
        "provenance_text": _provenance_text(summary is not None, config.get("pgp_peft_version")),
        "citation": PAPER_CITATION,
    }
    return ModelCard.from_template(card_data, template_path=str(template_path()), **template_kwargs)


class _Summary:
    """Validated, typed view of the ``results`` mapping."""

    def __init__(
        self,
        matrix: list[list[float | None]],
        metrics: dict[str, float | None],
        setting: str,
        class_order: list[int] | None,
    ) -> None:
        self.matrix = matrix
        self.metrics = metrics
        self.setting = setting
        self.class_order = class_order

    @classmethod
    def from_results(cls, results: Mapping[str, Any]) -> _Summary:
        raw_matrix = results.get("accuracy_matrix")
        if raw_matrix is None:
            raise ValueError("results['accuracy_matrix'] is required")
        matrix = [[_optional_float(value) for value in row] for row in raw_matrix]
        num_tasks = len(matrix)
        if num_tasks == 0 or any(len(row) != num_tasks for row in matrix):
            raise ValueError("results['accuracy_matrix'] must be a non-empty square list of lists")
        declared = results.get("num_tasks")
        if declared is not None and int(declared) != num_tasks:
            raise ValueError(
                f"results['num_tasks']={declared} but the accuracy matrix is {num_tasks}x{num_tasks}"
            )
        bwt = results.get("bwt", results.get("backward_transfer"))
        metrics = {
            "average_accuracy": _optional_float(results.get("average_accuracy")),
            "forgetting_paper": _optional_float(results.get("forgetting_paper")),
            "forgetting_reference": _optional_float(results.get("forgetting_reference")),
            "bwt": _optional_float(bwt),
            "task_il_average_accuracy": _optional_float(results.get("task_il_average_accuracy")),
        }
        if metrics["average_accuracy"] is None:
            raise ValueError("results['average_accuracy'] is required")
        order = results.get("class_order")
        class_order = [int(label) for label in order] if order is not None else None
        return cls(matrix, metrics, str(results.get("setting") or "class-IL"), class_order)

    @property
    def num_tasks(self) -> int:
        return len(self.matrix)

    def eval_results(self, dataset_id: str | None) -> list[EvalResult]:
        """The model-index entries: average accuracy and both forgetting definitions (percent)."""
        common = {
            "task_type": "image-classification",
            "task_name": f"Continual learning, {self.setting} ({self.num_tasks} tasks)",
            "dataset_type": dataset_id or "custom",
            "dataset_name": dataset_id or "custom",
        }
        entries = [
            ("accuracy", "average_accuracy", "Average accuracy after the last task (%)"),
            ("forgetting", "forgetting_paper", "Forgetting, paper definition (%)"),
            ("forgetting", "forgetting_reference", "Forgetting, reference-code definition (%)"),
        ]
        return [
            EvalResult(**common, metric_type=metric_type, metric_name=name, metric_value=self.metrics[key])
            for metric_type, key, name in entries
            if self.metrics[key] is not None
        ]

    def setting_sentence(self, dataset_id: str | None) -> str:
        dataset = f" on `{dataset_id}`" if dataset_id else ""
        return (
            f"Setting: **{self.setting}**, {self.num_tasks} tasks{dataset}. Accuracies are in percent on the "
            "test split, after training the last task."
        )

    def rows(self) -> list[tuple[str, str]]:
        labels = [
            ("average_accuracy", "Average accuracy (%)"),
            ("forgetting_paper", "Forgetting, paper definition (%)"),
            ("forgetting_reference", "Forgetting, reference code (%)"),
            ("bwt", "BWT (%)"),
            ("task_il_average_accuracy", "Task-IL average accuracy (%)"),
        ]
        return [(label, f"{self.metrics[key]:.2f}") for key, label in labels if self.metrics[key] is not None]

    def matrix_table(self) -> str:
        """Markdown table of the accuracy matrix (``pgp_peft.metrics.matrix_to_markdown``)."""
        return matrix_to_markdown(np.array(self.matrix, dtype=np.float64))


def _optional_float(value: Any) -> float | None:
    """``None`` for missing/NaN values, else ``float(value)``."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _is_hub_repo_id(name: Any) -> bool:
    """Whether ``name`` is a valid Hub repo id (``validate_repo_id``) and not an existing local path."""
    if not isinstance(name, str):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).expanduser().exists()


def _prompt_selection(config: Mapping[str, Any]) -> str:
    selection = config.get("prompt_selection")
    if selection is None:
        selection = "batch" if config.get("batchwise_prompt") else "instance"
    if selection not in ("instance", "batch"):
        raise ValueError(f"prompt_selection must be 'instance' or 'batch', got {selection!r}")
    return str(selection)


def _pgp_sentence(method_name: str, use_pgp: bool, projection_space: Any) -> str:
    if not use_pgp:
        return (
            f"Prompt Gradient Projection is **off**: this is the plain {method_name} baseline, "
            "trained with the same code."
        )
    space = f" (projection space: `{projection_space}`)" if projection_space else ""
    return (
        "Prompt Gradient Projection is **on**: while each new task was learned, the gradients of the adapter "
        f"(prompts and keys, or LoRA matrices) were projected onto the null space of earlier tasks' "
        f"representations{space}, which is "
        "what reduces forgetting."
    )


def _backbone_text(base_model: Any, revision: Any) -> str:
    if not base_model:
        return "the backbone passed to `PGPModel.from_pretrained(..., base_model=...)` (none was recorded)"
    if not _is_hub_repo_id(base_model):
        return (
            f"`{base_model}`, a local path rather than a Hub model (elsewhere, load the adapter with "
            "`PGPModel.from_pretrained(..., base_model=...)`)"
        )
    pinned = (
        f" at revision `{revision}`" if revision else " (no revision recorded: the latest `main` is loaded)"
    )
    return f"`{base_model}`{pinned}"


def _backbone_plain(base_model: Any, revision: Any) -> str:
    if not base_model:
        return "the backbone you pass as base_model"
    return f"{base_model}@{revision}" if revision else str(base_model)


def _key_settings(
    config: Mapping[str, Any],
    method_settings: Sequence[str],
    use_pgp: bool,
    selection: str,
    selection_text: str | None,
) -> dict[str, Any]:
    keys = [*_COMMON_SETTINGS, *method_settings, "use_pgp", *(_PGP_SETTINGS if use_pgp else ())]
    settings = {key: config[key] for key in keys if key in config}
    settings["use_pgp"] = use_pgp
    if selection_text is None:  # the method selects prompts by key
        settings["prompt_selection"] = selection
    return settings


class _CardYamlDumper(yaml.SafeDumper):
    """Safe YAML dumper writing mappings as blocks and lists of scalars inline (``[2, 3, 4]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    inline = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=inline)


_CardYamlDumper.add_representer(list, _represent_list)


def _to_yaml(data: Mapping[str, Any] | None) -> str:
    """Block YAML of ``data`` keeping insertion order; values that are not JSON types become strings."""
    if not data:
        return ""
    plain = json.loads(json.dumps(dict(data), default=str))
    text = yaml.dump(
        plain, Dumper=_CardYamlDumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return text.rstrip("\n")


def _prompt_selection_text(selection: str) -> str:
    if selection == "instance":
        return (
            "instance-wise: every image selects its own prompts by key-query matching, so a prediction "
            "does not depend on the other images in its batch."
        )
    return (
        "batch-wise: the prompts selected most often in a batch are used for every image of that batch "
        "(the reference code's test-time majority vote). This assumes a test batch comes from a single task, "
        "which leaks task identity, and makes predictions depend on batch composition: these numbers are not "
        "comparable with instance-wise results."
    )


def _class_order_text(class_order: list[int] | None, class_names: Sequence[str] | None) -> str:
    if class_order is None:
        text = "not recorded with these results (the default is the natural label order)."
        if class_names:
            text += " Classes: " + ", ".join(str(name) for name in class_names) + "."
        return text
    natural = class_order == sorted(class_order) == list(range(len(class_order)))
    text = f"logit *k* is dataset label `class_order[k]`, with class_order = `{class_order}`" + (
        " (the natural label order)." if natural else "."
    )
    if class_names:
        if any(not 0 <= label < len(class_names) for label in class_order):
            raise ValueError(f"class_order has labels outside [0, {len(class_names)}) of class_names")
        text += " In learning order: " + ", ".join(str(class_names[label]) for label in class_order) + "."
    return text


def _provenance_text(has_results: bool, version: Any) -> str:
    trained_with = f" Trained with pgp_peft {version}." if version else ""
    if not has_results:
        return f"**Results**: none were attached to this card.{trained_with}"
    return (
        "**Provenance of the numbers**: they were measured in this training run (configuration and recipe "
        "above), not copied from the paper, whose settings (backbone, pretraining, splits) may differ."
        + trained_with
    )


# ----------------------------------------------------------------------------- card inputs from a run
def card_kwargs_from_results(payload: dict[str, Any]) -> dict[str, Any]:
    """Model-card arguments (see `build_model_card`) from a run's results.json payload."""
    summary = payload.get("summary", {})
    manifest = payload.get("manifest", {})
    results = {
        "accuracy_matrix": payload.get("accuracy_matrix", {}).get("values"),
        "average_accuracy": summary.get("average_accuracy"),
        "forgetting_paper": summary.get("forgetting_paper"),
        "forgetting_reference": summary.get("forgetting_reference"),
        "bwt": summary.get("backward_transfer"),
        "num_tasks": manifest.get("num_tasks", summary.get("num_tasks")),
        "task_il_average_accuracy": summary.get("task_il", {}).get("average_accuracy"),
        "class_order": manifest.get("class_order"),
        "setting": payload.get("setting", "class-IL"),
    }
    return {
        "results": results,
        "recipe": payload.get("recipe"),
        "class_names": manifest.get("class_names"),
        "dataset_id": manifest.get("dataset"),
        "plot_filenames": [name for name in RUN_FILES if name.endswith(".png")],
    }


def card_kwargs_from_run(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Model-card arguments from a training run's folder (its results.json), or {} without one."""
    path = Path(output_dir) / "results.json"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as handle:
        return card_kwargs_from_results(json.load(handle))
