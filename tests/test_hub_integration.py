"""Sharing adapters on the Hub: push, load, predict and continue, against the loopback Hub (hub_server.py).

The real `huggingface_hub` client talks to an in-process Hub-compatible server, so uploads, commits,
revisions, private repos and refused pushes are exercised end to end without the real Hub. The adapter is
a tiny L2P-PGP trained by the `demo` recipe on the tiny stand-ins of `tiny_assets.py`.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch
from hub_server import DEFAULT_USER, LocalHub, local_hub
from hub_server import local_hub_server as local_hub_server  # noqa: F401  (registers the fixture)
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from PIL import Image
from tiny_assets import (
    CLASS_NAMES,
    IMAGE_SIZE,
    TinyAssets,
    class_image,
    file_digests,
    load_tiny_vit,
    save_tiny_vit,
    torch_threads,
)

from pgp_peft import PGPModel
from pgp_peft.recipe import apply_overrides, load_recipe
from pgp_peft.runner import main, run_recipe

NUM_TASKS = 2
ADAPTER_FILES = {"config.json", "model.safetensors", "README.md"}
RUN_FILES = {"results.json", "accuracy_matrix.png", "accuracy_curves.png"}


@dataclass
class TrainedRun:
    model: PGPModel  # do not mutate: copy.deepcopy it first
    run_dir: Path
    recipe: dict[str, Any]
    assets: TinyAssets


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> TrainedRun:
    """The demo recipe (L2P-PGP) on the tiny ViT and imagefolder, 2 tasks: adapter + run files."""
    recipe = load_recipe("demo")
    recipe = apply_overrides(recipe, [*assets.overrides(recipe), f"data.num_tasks={NUM_TASKS}"])
    run_dir = tmp_path_factory.mktemp("demo_run")
    model, _ = run_recipe(recipe, str(run_dir))
    model.eval()
    return TrainedRun(model, run_dir, recipe, assets)


@pytest.fixture
def restore_logging():
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


def pixels(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))


def logits(model: PGPModel, values: torch.Tensor | None = None) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixels() if values is None else values).logits


def perturbed(model: PGPModel) -> PGPModel:
    """A copy with other head weights (a 'retrained' adapter)."""
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head.weight.add_(0.5)
    return changed


def repo_text(hub: LocalHub, repo_id: str, path: str, revision: str = "main") -> str:
    return hub.repo(repo_id).files(revision)[path].decode("utf-8")


# ----------------------------------------------------------------------------- push and load
def test_push_uploads_adapter_and_run_files(local_hub_server: LocalHub, trained: TrainedRun):
    repo_id = f"{DEFAULT_USER}/l2p-pgp-demo"
    url = trained.model.push_to_hub(repo_id, output_dir=trained.run_dir)
    assert str(url).startswith(local_hub_server.url)

    repo = local_hub_server.repo(repo_id)
    files = repo.files()
    assert set(files) == {".gitattributes", *ADAPTER_FILES, *RUN_FILES}
    assert repo.commit_messages == ["initial commit", "Upload pgp_peft adapter"]
    assert repo.private is False
    # The run's files go up byte for byte; the adapter is the one saved by the run.
    for name in (*RUN_FILES, "config.json", "model.safetensors"):
        assert files[name] == (trained.run_dir / name).read_bytes(), name
    config = json.loads(files["config.json"])
    assert config["library_name"] == "pgp_peft" and config["method"] == "l2p"
    card = ModelCard(files["README.md"].decode("utf-8"))
    assert card.data.library_name == "pgp_peft"
    assert {"pgp_peft", "continual-learning", "l2p", "pgp"} <= set(card.data.tags)
    assert f'PGPModel.from_pretrained("{repo_id}")' in card.text


def test_pushed_card_shows_the_run_results(local_hub_server: LocalHub, trained: TrainedRun):
    repo_id = f"{DEFAULT_USER}/card-from-run"
    trained.model.push_to_hub(repo_id, output_dir=trained.run_dir)
    text = repo_text(local_hub_server, repo_id, "README.md")
    results = json.loads((trained.run_dir / "results.json").read_text())
    assert "| task | after 0 | after 1 |" in text
    first = results["accuracy_matrix"]["values"][0]
    assert f"| 0 | {first[0]:.2f} | {first[1]:.2f} |" in text
    assert "![accuracy_matrix.png](accuracy_matrix.png)" in text
    assert ModelCard(text).data.eval_results  # model-index with the average accuracy


def test_from_pretrained_hub_repo_gives_identical_logits(local_hub_server: LocalHub, trained: TrainedRun):
    repo_id = f"{DEFAULT_USER}/round-trip"
    trained.model.push_to_hub(repo_id)
    loaded = PGPModel.from_pretrained(repo_id, base_model=load_tiny_vit(trained.assets.vit))
    assert torch.equal(logits(loaded), logits(trained.model))
    expected = trained.model.adapter_state_dict()
    for name, tensor in loaded.adapter_state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert loaded.config.to_dict() == trained.model.config.to_dict()
    assert not loaded.training


def test_second_push_makes_a_new_commit_with_the_new_weights(local_hub_server: LocalHub, trained: TrainedRun):
    repo_id = f"{DEFAULT_USER}/updated"
    vit = trained.assets.vit
    trained.model.push_to_hub(repo_id, output_dir=trained.run_dir)
    first = local_hub_server.repo(repo_id).head

    changed = perturbed(trained.model)
    changed.push_to_hub(repo_id, output_dir=trained.run_dir, commit_message="after more training")
    repo = local_hub_server.repo(repo_id)
    assert repo.commit_messages == ["initial commit", "Upload pgp_peft adapter", "after more training"]
    assert repo.head != first
    assert repo.history()[0].changed_paths == {"model.safetensors"}  # config, card, run files unchanged

    latest = PGPModel.from_pretrained(repo_id, base_model=load_tiny_vit(vit))
    assert torch.equal(latest.head.weight, changed.head.weight)
    assert torch.equal(logits(latest), logits(changed))
    old = PGPModel.from_pretrained(repo_id, revision=first, base_model=load_tiny_vit(vit))
    assert torch.equal(logits(old), logits(trained.model))


def test_private_is_passed_through(local_hub_server: LocalHub, trained: TrainedRun):
    repo_id = f"{DEFAULT_USER}/secret-adapter"
    trained.model.push_to_hub(repo_id, private=True)
    assert local_hub_server.repo(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):  # invisible without a token
        hf_hub_download(repo_id, "config.json", token=False)
    loaded = PGPModel.from_pretrained(repo_id, base_model=load_tiny_vit(trained.assets.vit))  # logged in
    assert torch.equal(logits(loaded), logits(trained.model))


# ----------------------------------------------------------------------------- the backbone from the Hub
def test_backbone_is_rebuilt_from_the_recorded_hub_id_and_revision(
    local_hub_server: LocalHub, trained: TrainedRun, tmp_path
):
    """Without base_model, the backbone comes from base_model_name_or_path @ revision, on the Hub."""
    backbone_id = f"{DEFAULT_USER}/tiny-vit"
    files = {path.name: path.read_bytes() for path in trained.assets.vit.iterdir()}
    local_hub_server.create_repo(backbone_id, files)
    pinned = local_hub_server.repo(backbone_id).head
    retrained = save_tiny_vit(tmp_path / "vit-v2", seed=1)  # main moves on to other weights
    local_hub_server.commit(
        backbone_id, {path.name: path.read_bytes() for path in retrained.iterdir()}, message="v2"
    )

    adapter = copy.deepcopy(trained.model)
    adapter.config.base_model_name_or_path, adapter.config.revision = backbone_id, pinned
    adapter.push_to_hub(f"{DEFAULT_USER}/pinned")
    loaded = PGPModel.from_pretrained(f"{DEFAULT_USER}/pinned")
    assert torch.equal(logits(loaded), logits(trained.model))
    assert loaded.config.revision == pinned
    assert any(
        f"/{backbone_id}/resolve/{pinned}/model.safetensors" in path
        for _, path, _ in local_hub_server.request_log
    )

    adapter.config.revision = None  # unpinned: the latest main
    adapter.push_to_hub(f"{DEFAULT_USER}/unpinned")
    latest = PGPModel.from_pretrained(f"{DEFAULT_USER}/unpinned")
    expected = load_tiny_vit(retrained).state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in latest.backbone.model.state_dict().items())
    assert not torch.equal(logits(latest), logits(trained.model))


@pytest.mark.parametrize(
    ("backbone_id", "revision"),
    [(f"{DEFAULT_USER}/no-such-backbone", "v1.0"), (f"{DEFAULT_USER}/tiny-vit", "no-such-revision")],
)
def test_missing_backbone_error_names_it_and_how_to_pass_one(
    local_hub_server: LocalHub, trained: TrainedRun, backbone_id, revision
):
    local_hub_server.create_repo(
        f"{DEFAULT_USER}/tiny-vit", {path.name: path.read_bytes() for path in trained.assets.vit.iterdir()}
    )
    adapter = copy.deepcopy(trained.model)
    adapter.config.base_model_name_or_path, adapter.config.revision = backbone_id, revision
    adapter.push_to_hub(f"{DEFAULT_USER}/orphan")
    with pytest.raises(OSError) as excinfo:
        PGPModel.from_pretrained(f"{DEFAULT_USER}/orphan")
    message = str(excinfo.value)
    assert backbone_id in message and revision in message
    assert "base_model=" in message  # how to pass a local backbone instead
    # ... and passing one works.
    loaded = PGPModel.from_pretrained(f"{DEFAULT_USER}/orphan", base_model=load_tiny_vit(trained.assets.vit))
    assert torch.equal(logits(loaded), logits(trained.model))


# ----------------------------------------------------------------------------- predict
def test_loaded_adapter_predicts_class_names_from_its_config(
    local_hub_server: LocalHub, trained: TrainedRun, tmp_path
):
    repo_id = f"{DEFAULT_USER}/predictor"
    trained.model.push_to_hub(repo_id)
    loaded = PGPModel.from_pretrained(repo_id, base_model=load_tiny_vit(trained.assets.vit))
    assert loaded.config.class_names == CLASS_NAMES  # recorded by the run (imagefolder class names)

    images = [class_image(label, 200) for label in (0, 3, 7, 12)]
    names = loaded.predict(images)
    assert len(names) == 4 and set(names) <= set(CLASS_NAMES[: len(CLASS_NAMES) // NUM_TASKS * NUM_TASKS])
    batch = torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1) for im in images]
    )
    assert loaded.predict(batch) == names  # a (B, 3, H, W) tensor in [0, 1] gives the same answer
    seen = loaded.class_task >= 0
    expected = logits(loaded, batch).masked_fill(~seen, float("-inf")).argmax(-1)
    assert names == [CLASS_NAMES[i] for i in expected.tolist()]
    top = loaded.predict(images[:1], top_k=3)[0]
    assert [name for name, _ in top][0] == names[0] and len(top) == 3
    assert all(a >= b for (_, a), (_, b) in zip(top, top[1:]))

    # The names are the saved config's: rename them in config.json and the predictions follow.
    local = tmp_path / "renamed"
    loaded.save_pretrained(local)
    config = json.loads((local / "config.json").read_text())
    config["class_names"] = [name.upper() for name in config["class_names"]]
    (local / "config.json").write_text(json.dumps(config))
    renamed = PGPModel.from_pretrained(local, base_model=load_tiny_vit(trained.assets.vit))
    assert renamed.predict(images) == [name.upper() for name in names]


# ----------------------------------------------------------------------------- continue training
def _noise_splits(num_tasks: int = 4):
    """A new task sequence: 20 classes of seeded noise images (nothing like the colour classes)."""
    from pgp_peft.data import make_class_incremental_splits

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)) for _ in range(40)
    ]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    data = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 20 for i in range(40)]}, features=features
    )
    return make_class_incremental_splits(data, data, num_tasks=num_tasks)


def test_loaded_adapter_keeps_its_bases_and_grows_them(
    local_hub_server: LocalHub, trained: TrainedRun, tmp_path
):
    from transformers import TrainingArguments

    from pgp_peft.data import build_transform
    from pgp_peft.trainer import ContinualTrainer

    repo_id = f"{DEFAULT_USER}/continue"
    trained.model.push_to_hub(repo_id)
    loaded = PGPModel.from_pretrained(repo_id, base_model=load_tiny_vit(trained.assets.vit))
    before = {name: loaded.memory.basis(name).clone() for name in loaded.memory.names}
    assert loaded.memory.ranks() == trained.model.memory.ranks()
    assert all(rank > 0 for rank in loaded.memory.ranks().values())
    for name, basis in before.items():
        assert torch.equal(basis, trained.model.memory.basis(name))
    assert loaded.num_tasks_seen == NUM_TASKS

    args = TrainingArguments(
        str(tmp_path), per_device_eval_batch_size=16, use_cpu=True, report_to=[], remove_unused_columns=False
    )
    trainer = ContinualTrainer(
        loaded, args, splits=_noise_splits(), eval_transform=build_transform(IMAGE_SIZE, image_column="image")
    )
    after = trainer.update_memory(NUM_TASKS)  # the next task of the sequence
    assert all(after[name] >= basis.shape[1] for name, basis in before.items())
    assert sum(after.values()) > sum(basis.shape[1] for basis in before.values())
    for name, old in before.items():  # the old directions are kept, not recomputed
        new = loaded.memory.basis(name)
        assert torch.allclose(new @ (new.T @ old), old, atol=1e-4), name


# ----------------------------------------------------------------------------- bad input
def test_push_without_token_fails_and_leaves_the_local_save_untouched(trained: TrainedRun):
    before = file_digests(trained.run_dir)
    assert {*ADAPTER_FILES, *RUN_FILES} <= set(before)
    with local_hub(login=False) as hub:
        with pytest.raises(ValueError, match="no Hugging Face token found"):
            trained.model.push_to_hub(f"{DEFAULT_USER}/no-token", output_dir=trained.run_dir)
        assert hub.repos == {}  # refused before any request
        # a token the server does not accept: the Hub's own 401 reaches the caller
        with pytest.raises(HfHubHTTPError) as excinfo:
            trained.model.push_to_hub(f"{DEFAULT_USER}/no-token", token="hf_not_a_valid_token")
        assert excinfo.value.response.status_code == 401
        assert hub.repos == {}
    assert file_digests(trained.run_dir) == before


def test_push_without_token_says_how_to_log_in(trained: TrainedRun):
    with local_hub(login=False):
        with pytest.raises(Exception) as excinfo:
            trained.model.push_to_hub(f"{DEFAULT_USER}/no-token")
    assert re.search(r"token|log ?in", str(excinfo.value), re.IGNORECASE)


def test_refused_push_raises_and_leaves_the_local_save_untouched(
    local_hub_server: LocalHub, trained: TrainedRun
):
    repo_id = f"{DEFAULT_USER}/refused"
    trained.model.push_to_hub(repo_id, output_dir=trained.run_dir)
    head = local_hub_server.repo(repo_id).head
    before = file_digests(trained.run_dir)

    local_hub_server.refuse_pushes = True
    with pytest.raises(HfHubHTTPError) as excinfo:
        perturbed(trained.model).push_to_hub(repo_id, output_dir=trained.run_dir)
    assert excinfo.value.response.status_code == 403
    assert local_hub_server.repo(repo_id).head == head
    assert file_digests(trained.run_dir) == before
    # the local save still loads
    local = PGPModel.from_pretrained(trained.run_dir, base_model=load_tiny_vit(trained.assets.vit))
    assert torch.equal(logits(local), logits(trained.model))


def test_repo_that_is_not_a_pgp_adapter_is_rejected(local_hub_server: LocalHub, trained: TrainedRun):
    plain = f"{DEFAULT_USER}/plain-vit"  # a transformers checkpoint: config.json without library_name
    local_hub_server.create_repo(
        plain, {path.name: path.read_bytes() for path in trained.assets.vit.iterdir()}
    )
    with pytest.raises(
        ValueError, match=r"not a pgp_peft adapter: its config.json has library_name=None"
    ) as excinfo:
        PGPModel.from_pretrained(plain)
    assert "model_type" in str(excinfo.value)  # what was found instead

    other = f"{DEFAULT_USER}/other-library"
    local_hub_server.create_repo(
        other, {"config.json": json.dumps({"library_name": "timm", "architecture": "vit"})}
    )
    with pytest.raises(ValueError, match="library_name='timm'"):
        PGPModel.from_pretrained(other)


def test_repo_without_config_is_rejected_with_what_it_holds(local_hub_server: LocalHub):
    repo_id = f"{DEFAULT_USER}/just-a-readme"
    local_hub_server.create_repo(repo_id, {"README.md": "# notes\n", "weights.bin": b"\0" * 8})
    with pytest.raises(ValueError, match="not a pgp_peft adapter") as excinfo:
        PGPModel.from_pretrained(repo_id)
    assert "README.md" in str(excinfo.value)


def test_local_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "README.md").write_text("# notes\n")
    with pytest.raises((FileNotFoundError, ValueError), match="not a pgp_peft adapter"):
        PGPModel.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- the training entry point
def test_cli_pushes_one_commit_per_task_and_the_final_card(
    local_hub_server: LocalHub, assets: TinyAssets, tmp_path, capsys, restore_logging
):
    repo_id = f"{DEFAULT_USER}/x"
    num_tasks = 4
    out = tmp_path / "run"
    recipe = load_recipe("demo")
    argv = ["--recipe", "demo", "--output_dir", str(out), "--push_to_hub", "--hub_model_id", repo_id]
    argv += [
        "--hub_strategy",
        "every_task",
        "--hub_private",
        *assets.overrides(recipe),
        f"data.num_tasks={num_tasks}",
    ]
    assert main(argv) == 0
    assert "== demo: class-incremental accuracy matrix" in capsys.readouterr().out

    repo = local_hub_server.repo(repo_id)
    assert repo.private is True
    assert repo.commit_messages == [
        "initial commit",
        *(f"pgp_peft: demo after task {t}" for t in range(1, num_tasks + 1)),
    ]
    assert repo.commit_count == 1 + num_tasks
    for commit in repo.history()[:-1]:  # every task commit carries the adapter and the run so far
        assert {*ADAPTER_FILES, *RUN_FILES} <= set(commit.files)

    files = repo.files()
    # The last push is the final adapter and results.
    for name in ("model.safetensors", "results.json", "accuracy_matrix.png"):
        assert files[name] == (out / name).read_bytes(), name
    results = json.loads(files["results.json"])
    assert len(results["accuracy_matrix"]["values"]) == num_tasks
    text = files["README.md"].decode("utf-8")
    card = ModelCard(text)
    assert card.data.library_name == "pgp_peft"
    average = next(r for r in card.data.eval_results if r.metric_type == "accuracy").metric_value
    assert average == pytest.approx(results["summary"]["average_accuracy"])
    header = "| task | " + " | ".join(f"after {t}" for t in range(num_tasks)) + " |"
    assert header in text
    last_row = next(line for line in text.splitlines() if line.startswith(f"| {num_tasks - 1} |"))
    assert last_row.split("|")[-2].strip() != "-"  # the final card has the last column filled in
    assert f"Setting: **class-IL**, {num_tasks} tasks" in text
    assert "![accuracy_matrix.png](accuracy_matrix.png)" in text
    assert f'PGPModel.from_pretrained("{repo_id}")' in text


def test_cli_push_at_the_end_makes_one_commit(
    local_hub_server: LocalHub, assets: TinyAssets, tmp_path, restore_logging
):
    repo_id = f"{DEFAULT_USER}/y"
    recipe = load_recipe("demo")
    argv = [
        "--recipe",
        "demo",
        "--output_dir",
        str(tmp_path / "run"),
        "--push_to_hub",
        "--hub_model_id",
        repo_id,
    ]
    assert main([*argv, *assets.overrides(recipe), "data.num_tasks=2"]) == 0
    repo = local_hub_server.repo(repo_id)
    assert repo.commit_messages == ["initial commit", "pgp_peft: demo after 2 tasks"]
    assert repo.private is False
    assert "| task | after 0 | after 1 |" in repo.files()["README.md"].decode("utf-8")


def test_card_does_not_claim_a_local_folder_as_a_hub_dataset(trained: TrainedRun):
    card = ModelCard((trained.run_dir / "README.md").read_text())
    assert str(trained.assets.data) not in json.dumps(card.data.to_dict())


def test_lora_adapter_pushes_peft_files_and_loads_from_the_hub(local_hub_server: LocalHub, assets, tmp_path):
    """LoRA-PGP (the lora_demo recipe, 2 tasks): the pushed repo holds the pgp_peft files and the peft
    adapter files; pgp_peft and peft both load it from the Hub with the same LoRA weights."""
    from peft import PeftModel, get_peft_model_state_dict

    recipe = load_recipe("lora_demo")
    recipe = apply_overrides(recipe, [*assets.overrides(recipe), f"data.num_tasks={NUM_TASKS}"])
    model, _ = run_recipe(recipe, str(tmp_path / "run"))
    repo_id = f"{DEFAULT_USER}/lora-pgp-demo"
    model.push_to_hub(repo_id, output_dir=tmp_path / "run")
    files = local_hub_server.repo(repo_id).files()
    assert {*ADAPTER_FILES, "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["config.json"])["method"] == "lora"

    loaded = PGPModel.from_pretrained(repo_id, base_model=load_tiny_vit(assets.vit))
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.memory.ranks() == model.memory.ranks()

    peft_model = PeftModel.from_pretrained(load_tiny_vit(assets.vit), repo_id)
    theirs = get_peft_model_state_dict(peft_model)
    for path in model.method.layer_paths:
        a, b = model.method.lora_weights(path)
        assert torch.equal(theirs[f"base_model.model.{path}.lora_A.weight"], a)
        assert torch.equal(theirs[f"base_model.model.{path}.lora_B.weight"], b)
    assert any(
        float(model.method.lora_weights(p)[1].abs().sum()) > 0 for p in model.method.layer_paths
    )  # trained
