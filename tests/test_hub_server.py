"""The loopback Hub (tests/hub_server.py) driven by the real ``huggingface_hub`` client."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hub_server import DEFAULT_USER, LocalHub, git_blob_oid, local_hub
from hub_server import local_hub_server as local_hub_server  # noqa: F401  (registers the fixture)
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    create_commit,
    hf_api,
    hf_hub_download,
    list_repo_files,
    model_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save as save_safetensors

REPO_ID = f"{DEFAULT_USER}/pgp-demo"

CARD = """---
library_name: pgp_peft
tags:
- pgp_peft
- continual-learning
---

# PGP demo

A card with metadata.
"""


def _write_model_folder(folder: Path, *, scale: float = 1.0) -> dict[str, bytes]:
    """Write a README card, a config and real safetensors weights; return their bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"prompt": torch.arange(12, dtype=torch.float32).reshape(3, 4) * scale, "key": torch.ones(2, 4)}
    contents = {
        "README.md": CARD.encode("utf-8"),
        "config.json": json.dumps({"method": "l2p", "scale": scale}).encode("utf-8"),
        "model.safetensors": save_safetensors(tensors),
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return contents


def test_create_repo_records_private_flag(local_hub_server: LocalHub) -> None:
    api = HfApi()
    url = api.create_repo("secret-model", private=True)  # no namespace: the token's user
    assert url.repo_id == f"{DEFAULT_USER}/secret-model"
    assert url.startswith(local_hub_server.url)
    api.create_repo(REPO_ID)

    repos = local_hub_server.repos
    assert repos[f"{DEFAULT_USER}/secret-model"].private is True
    assert repos[REPO_ID].private is False
    assert repos[REPO_ID].commit_messages == ["initial commit"]
    assert repos[REPO_ID].files() == {".gitattributes": repos[REPO_ID].files()[".gitattributes"]}

    assert api.create_repo(REPO_ID, exist_ok=True).repo_id == REPO_ID
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO_ID)
    assert excinfo.value.response.status_code == 409
    assert model_info(f"{DEFAULT_USER}/secret-model").private is True


def test_upload_folder_round_trip(local_hub_server: LocalHub, tmp_path: Path) -> None:
    contents = _write_model_folder(tmp_path / "model")
    api = HfApi()
    api.create_repo(REPO_ID, private=True)
    commit = api.upload_folder(repo_id=REPO_ID, folder_path=tmp_path / "model", commit_message="Add model")

    repo = local_hub_server.repo(REPO_ID)
    assert commit.oid == repo.head and len(commit.oid) == 40
    assert repo.commit_messages == ["initial commit", "Add model"]
    assert ("POST", "/api/validate-yaml", 200) in local_hub_server.request_log

    for name, data in contents.items():
        assert Path(hf_hub_download(REPO_ID, name)).read_bytes() == data
    snapshot = Path(snapshot_download(REPO_ID))
    assert snapshot.name == commit.oid
    assert sorted(p.name for p in snapshot.iterdir()) == [".gitattributes", *sorted(contents)]
    for name, data in contents.items():
        assert (snapshot / name).read_bytes() == data

    info = model_info(REPO_ID, files_metadata=True)
    assert info.sha == commit.oid and info.private is True
    assert info.card_data.library_name == "pgp_peft"
    assert "continual-learning" in info.tags
    sizes = {sibling.rfilename: sibling.size for sibling in info.siblings}
    assert sizes["model.safetensors"] == len(contents["model.safetensors"])
    assert sorted(list_repo_files(REPO_ID)) == [".gitattributes", *sorted(contents)]


def test_second_upload_keeps_old_revision(local_hub_server: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO_ID)
    first = _write_model_folder(tmp_path / "v1", scale=1.0)
    old = api.upload_folder(repo_id=REPO_ID, folder_path=tmp_path / "v1", commit_message="v1")
    second = _write_model_folder(tmp_path / "v2", scale=2.0)
    new = api.upload_folder(repo_id=REPO_ID, folder_path=tmp_path / "v2", commit_message="v2")

    assert new.oid != old.oid
    assert Path(hf_hub_download(REPO_ID, "config.json")).read_bytes() == second["config.json"]
    assert (
        Path(hf_hub_download(REPO_ID, "config.json", revision=old.oid)).read_bytes() == first["config.json"]
    )
    old_snapshot = Path(snapshot_download(REPO_ID, revision=old.oid))
    assert (old_snapshot / "model.safetensors").read_bytes() == first["model.safetensors"]

    repo = local_hub_server.repo(REPO_ID)
    assert repo.commit_count == 3
    assert repo.files(old.oid)["config.json"] == first["config.json"]
    # The preupload answer carries the remote blob ids, so the client did not re-send the unchanged card.
    assert git_blob_oid(second["README.md"]) == git_blob_oid(first["README.md"])
    assert repo.commits[new.oid].changed_paths == {"config.json", "model.safetensors"}

    # Nothing changed: the client skips the commit instead of creating an empty one.
    again = api.upload_folder(repo_id=REPO_ID, folder_path=tmp_path / "v2", commit_message="v2 again")
    assert again.oid == new.oid and repo.commit_count == 3


def test_upload_file_and_create_commit_with_deletions(local_hub_server: LocalHub) -> None:
    api = HfApi()
    api.create_repo(REPO_ID)
    api.upload_file(path_or_fileobj=CARD.encode(), path_in_repo="README.md", repo_id=REPO_ID)
    create_commit(
        REPO_ID,
        operations=[
            CommitOperationAdd(path_in_repo="plots/a.png", path_or_fileobj=b"\x89PNG a"),
            CommitOperationAdd(path_in_repo="plots/b.png", path_or_fileobj=b"\x89PNG b"),
            CommitOperationAdd(path_in_repo="notes.txt", path_or_fileobj=b"notes"),
        ],
        commit_message="Add plots",
    )
    assert sorted(list_repo_files(REPO_ID)) == [
        ".gitattributes",
        "README.md",
        "notes.txt",
        "plots/a.png",
        "plots/b.png",
    ]
    top_level = {entry.path for entry in api.list_repo_tree(REPO_ID)}
    assert top_level == {".gitattributes", "README.md", "notes.txt", "plots"}

    create_commit(
        REPO_ID,
        operations=[CommitOperationDelete("plots/"), CommitOperationDelete("notes.txt")],
        commit_message="Clean up",
    )
    assert sorted(list_repo_files(REPO_ID)) == [".gitattributes", "README.md"]
    with pytest.raises(RemoteEntryNotFoundError):
        create_commit(REPO_ID, operations=[CommitOperationDelete("missing.txt")], commit_message="Nope")

    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(
            path_or_fileobj=b"---\ntags: [unclosed\n---\n", path_in_repo="README.md", repo_id=REPO_ID
        )
    assert local_hub_server.repo(REPO_ID).commit_messages[-1] == "Clean up"


def test_missing_or_invalid_token_is_refused(local_hub_server: LocalHub) -> None:
    api = HfApi()
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(REPO_ID, token=False)
    assert excinfo.value.response.status_code == 401
    assert local_hub_server.repos == {}

    api.create_repo(REPO_ID)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID, token=False)
    assert excinfo.value.response.status_code == 401
    assert not isinstance(excinfo.value, RepositoryNotFoundError)

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID, token="hf_wrong")
    assert excinfo.value.response.status_code == 401
    assert "Invalid credentials" in str(excinfo.value)
    assert local_hub_server.repo(REPO_ID).commit_count == 1

    # Reading a public repo needs no token.
    assert hf_hub_download(REPO_ID, ".gitattributes", token=False)


def test_refused_push_raises(local_hub_server: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO_ID)
    _write_model_folder(tmp_path / "model")
    local_hub_server.refuse_pushes = True
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_folder(repo_id=REPO_ID, folder_path=tmp_path / "model")
    assert excinfo.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID)
    assert excinfo.value.response.status_code == 403
    assert local_hub_server.repo(REPO_ID).commit_count == 1

    local_hub_server.set_refuse_pushes(False)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID)
    assert local_hub_server.repo(REPO_ID).commit_count == 2


def test_not_found_errors(local_hub_server: LocalHub) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{DEFAULT_USER}/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        model_info(f"{DEFAULT_USER}/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(f"{DEFAULT_USER}/does-not-exist")

    HfApi().create_repo(REPO_ID, private=True)
    with pytest.raises(EntryNotFoundError) as excinfo:
        hf_hub_download(REPO_ID, "missing.json")
    assert isinstance(excinfo.value, RemoteEntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO_ID, ".gitattributes", revision="no-such-branch")
    # A private repo looks missing without a token.
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO_ID, ".gitattributes", token=False)
    with pytest.raises(RepositoryNotFoundError):
        model_info(REPO_ID, token=False)


def test_local_hub_patches_and_restores_client(tmp_path: Path) -> None:
    before_constants = {
        name: getattr(constants, name)
        for name in (
            "ENDPOINT",
            "HUGGINGFACE_CO_URL_TEMPLATE",
            "HF_HUB_CACHE",
            "HF_HUB_OFFLINE",
            "HF_TOKEN_PATH",
        )
    }
    before_env = {name: os.environ.get(name) for name in ("HF_ENDPOINT", "HF_TOKEN", "HF_HUB_CACHE")}
    before_api_endpoint = hf_api.api.endpoint

    with local_hub(tokens={"hf_alice": "alice"}, refuse_pushes=True, cache_dir=tmp_path, login=False) as hub:
        assert constants.ENDPOINT == hub.url == hf_api.api.endpoint
        assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub.url)
        assert constants.HF_HUB_CACHE == str(tmp_path)
        assert os.environ.get("HF_TOKEN") is None
        assert HfApi().create_repo("m", token="hf_alice").repo_id == "alice/m"
        assert hub.refuse_pushes is True
        hf_hub_download("alice/m", ".gitattributes")
        assert any(tmp_path.iterdir())

    assert {name: getattr(constants, name) for name in before_constants} == before_constants
    assert {name: os.environ.get(name) for name in before_env} == before_env
    assert hf_api.api.endpoint == before_api_endpoint
    assert not hub.errors


def test_seeded_backbone_loads_with_transformers(local_hub_server: LocalHub, tmp_path: Path) -> None:
    """A repo seeded without HTTP (canonical single-segment id) serves ``transformers`` ``from_pretrained``."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    backbone = ViTModel(
        ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8
        ),
        add_pooling_layer=False,
    )
    backbone.save_pretrained(tmp_path / "vit")
    files = {path.name: path.read_bytes() for path in (tmp_path / "vit").iterdir()}
    local_hub_server.create_repo("tiny-vit", files)
    with pytest.raises(ValueError, match="already created"):
        local_hub_server.create_repo("tiny-vit")

    revision = local_hub_server.repo("tiny-vit").head
    loaded = ViTModel.from_pretrained("tiny-vit", revision=revision, add_pooling_layer=False)
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
