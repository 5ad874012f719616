"""Model cards (pgp_peft.cards): metadata, body content and the packaged template."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hub_server import DEFAULT_USER, LocalHub
from hub_server import local_hub_server as local_hub_server  # noqa: F401  (registers the fixture)
from huggingface_hub import HfApi, ModelCard, model_info

from pgp_peft.cards import (
    PAPER_CITATION,
    build_model_card,
    template_path,
)

BASE = "google/vit-base-patch16-224"
REVISION = "3f49326eb077187dfe1c2a2bb15fbd74e6ab91e3"


def _config(**overrides: Any) -> dict[str, Any]:
    config = {
        "method": "l2p",
        "base_model_name_or_path": BASE,
        "revision": REVISION,
        "num_classes": 6,
        "use_pgp": True,
        "projection_space": "feature",
        "batchwise_prompt": False,
        "pool_size": 10,
        "prompt_length": 5,
        "top_k": 5,
        "prompt_threshold": 0.97,
    }
    config.update(overrides)
    return config


def _results(**overrides: Any) -> dict[str, Any]:
    results = {
        "accuracy_matrix": [[91.5, 85.25, 80.0], [None, 88.0, 84.75], [None, None, 90.125]],
        "average_accuracy": 84.958,
        "forgetting_paper": 7.375,
        "forgetting_reference": 7.5,
        "bwt": -5.375,
        "num_tasks": 3,
        "task_il_average_accuracy": 95.5,
        "class_order": [4, 0, 5, 1, 3, 2],
        "setting": "class-IL",
    }
    results.update(overrides)
    return results


def _table_rows(content: str, first_cell: str) -> list[list[str]]:
    """Cells of the Markdown table rows whose first cell is ``first_cell``."""
    rows = []
    for line in content.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_card_without_results() -> None:
    card = build_model_card(config=_config(), repo_id=f"{DEFAULT_USER}/l2p-pgp")
    data = ModelCard(card.content).data  # the metadata parses back

    assert data.library_name == "pgp_peft"
    assert data.tags == [
        "pgp_peft",
        "continual-learning",
        "image-classification",
        "prompt-tuning",
        "l2p",
        "pgp",
    ]
    assert data.base_model == BASE
    assert data.pipeline_tag == "image-classification"
    assert data.eval_results is None and data.get("model-index") is None
    assert data.license is None and data.datasets is None

    text = card.text
    assert f"`{BASE}` at revision `{REVISION}`" in text
    assert f'PGPModel.from_pretrained("{DEFAULT_USER}/l2p-pgp")' in text
    assert "model.predict(images)" in text
    assert "instance-wise" in text
    assert "## Results" not in text
    assert PAPER_CITATION in text
    assert "Prompt Gradient Projection is **on**" in text
    assert "pool_size: 10" in text  # key settings block


def test_card_with_results() -> None:
    results = _results()
    card = build_model_card(
        config=_config(),
        results=results,
        recipe={"epochs": 5, "lr": 0.03, "seed": 42},
        class_names=["apple", "bus", "cat", "dog", "eel", "fox"],
        dataset_id="uoft-cs/cifar100",
        repo_id=f"{DEFAULT_USER}/l2p-pgp",
        plot_filenames=["accuracy_matrix.png", "accuracy_curves.png"],
    )
    data = ModelCard(card.content).data
    assert data.datasets == ["uoft-cs/cifar100"]
    assert data.model_name == f"{DEFAULT_USER}/l2p-pgp"
    by_name = {result.metric_name: result for result in data.eval_results}
    assert len(by_name) == 3
    accuracy = next(r for r in data.eval_results if r.metric_type == "accuracy")
    assert accuracy.metric_value == results["average_accuracy"]
    forgetting = sorted(r.metric_value for r in data.eval_results if r.metric_type == "forgetting")
    assert forgetting == sorted([results["forgetting_paper"], results["forgetting_reference"]])
    assert {r.task_type for r in data.eval_results} == {"image-classification"}
    assert {r.dataset_type for r in data.eval_results} == {"uoft-cs/cifar100"}

    text = card.text
    # Matrix: rows = evaluated task, columns = after training task.
    assert _table_rows(text, "task")[0] == ["task", "after 0", "after 1", "after 2"]
    assert _table_rows(text, "0")[0] == ["0", "91.50", "85.25", "80.00"]
    assert _table_rows(text, "1")[0] == ["1", "-", "88.00", "84.75"]
    assert _table_rows(text, "2")[0] == ["2", "-", "-", "90.12"]
    # Summary numbers, both forgetting definitions, BWT and task-IL accuracy.
    summary = {row[0]: row[1] for row in (_table_rows(text, name)[0] for name in _SUMMARY_NAMES)}
    assert summary == {
        "Average accuracy (%)": "84.96",
        "Forgetting, paper definition (%)": "7.38",
        "Forgetting, reference code (%)": "7.50",
        "BWT (%)": "-5.38",
        "Task-IL average accuracy (%)": "95.50",
    }
    assert "![accuracy_matrix.png](accuracy_matrix.png)" in text
    assert "![accuracy_curves.png](accuracy_curves.png)" in text
    assert "Setting: **class-IL**, 3 tasks" in text
    assert "`[4, 0, 5, 1, 3, 2]`" in text and "eel, apple, fox, bus, dog, cat" in text
    assert "seed: 42" in text
    assert "not copied from the paper" in text


_SUMMARY_NAMES = (
    "Average accuracy (%)",
    "Forgetting, paper definition (%)",
    "Forgetting, reference code (%)",
    "BWT (%)",
    "Task-IL average accuracy (%)",
)


def test_card_accepts_metrics_summarize_output() -> None:
    """``pgp_peft.metrics.summarize`` output (NaN for unseen, ``backward_transfer``) is valid ``results``."""
    from pgp_peft.metrics import summarize

    matrix = np.array([[80.0, 70.0], [np.nan, 90.0]])
    results = summarize(matrix)
    card = build_model_card(config=_config(), results={**results, "setting": "online class-IL"})
    text = card.text
    assert _table_rows(text, "1")[0] == ["1", "-", "90.00"]
    assert _table_rows(text, "BWT (%)")[0][1] == f"{results['backward_transfer']:.2f}"
    accuracy = next(r for r in ModelCard(card.content).data.eval_results if r.metric_type == "accuracy")
    assert math.isclose(accuracy.metric_value, 80.0)
    assert "**online class-IL**" in text


def test_prompt_selection_and_pgp_variants() -> None:
    batch = build_model_card(config=_config(batchwise_prompt=True)).text
    assert "batch-wise" in batch and "prompt_selection: batch" in batch
    explicit = build_model_card(config=_config(batchwise_prompt=True, prompt_selection="instance")).text
    assert "instance-wise" in explicit

    baseline = build_model_card(config=_config(method="dualprompt", use_pgp=False))
    assert "pgp" not in ModelCard(baseline.content).data.tags
    assert "dualprompt" in ModelCard(baseline.content).data.tags
    assert "Prompt Gradient Projection is **off**" in baseline.text
    assert "projection_space" not in baseline.text

    clip = build_model_card(config=_config(method="clip"))
    assert "no prompt pool" in clip.text

    with pytest.raises(ValueError, match="method"):
        build_model_card(config=_config(method="coda"))
    with pytest.raises(ValueError, match="prompt_selection"):
        build_model_card(config=_config(prompt_selection="task"))


def test_local_backbone_is_not_base_model_metadata(tmp_path: Any) -> None:
    card = build_model_card(config=_config(base_model_name_or_path=str(tmp_path), revision=None))
    assert ModelCard(card.content).data.base_model is None
    assert "a local path" in card.text


def test_malformed_results_are_rejected() -> None:
    with pytest.raises(ValueError, match="square"):
        build_model_card(config=_config(), results=_results(accuracy_matrix=[[1.0, 2.0]]))
    with pytest.raises(ValueError, match="num_tasks"):
        build_model_card(config=_config(), results=_results(num_tasks=5))
    with pytest.raises(ValueError, match="class_order"):
        build_model_card(config=_config(), results=_results(), class_names=["a", "b"])


def test_one_template_ships_in_the_package() -> None:
    """The packaged template is the only copy; the repository's model_cards/ points to it."""
    import pgp_peft

    packaged = Path(pgp_peft.__file__).parent / "templates" / "pgp_model_card.md"
    assert template_path() == packaged.resolve() and packaged.read_text().startswith("---\n{{ card_data }}")
    pointer = Path(__file__).resolve().parents[1] / "model_cards" / "README.md"
    assert "src/pgp_peft/templates/pgp_model_card.md" in pointer.read_text()
    assert sorted(p.name for p in pointer.parent.iterdir()) == ["README.md"]


def test_card_round_trips_through_the_hub(local_hub_server: LocalHub) -> None:
    repo_id = f"{DEFAULT_USER}/l2p-pgp"
    HfApi().create_repo(repo_id)
    card = build_model_card(
        config=_config(), results=_results(), dataset_id="uoft-cs/cifar100", repo_id=repo_id
    )
    card.push_to_hub(repo_id)

    assert ("POST", "/api/validate-yaml", 200) in local_hub_server.request_log
    assert ModelCard.load(repo_id).content == card.content
    info = model_info(repo_id)
    assert info.card_data.library_name == "pgp_peft"
    assert info.card_data.base_model == BASE
    assert info.card_data.eval_results[0].metric_value == _results()["average_accuracy"]


def test_demo_run_card_names_the_hub_source_of_its_data() -> None:
    """Built-in demo data: `datasets` names its Hub source; the built-in backbone (no Hub repo) is no base_model."""
    card = build_model_card(
        config=_config(base_model_name_or_path="pgp_peft:vit-tiny-patch4-32-cifar10", revision=None),
        dataset_id="pgp_peft:fashion_mnist_demo",
        results=_results(),
    )
    data = ModelCard(card.content).data
    assert data.datasets == ["zalando-datasets/fashion_mnist"] and data.base_model is None
    assert {result.dataset_type for result in data.eval_results} == {
        "custom"
    }  # a subset: no Hub result claimed
