"""Adapter files, local or on the Hub: the leaf helpers under `PGPModel.save_pretrained` /
`from_pretrained` / `push_to_hub`.

An adapter folder holds config.json (the adapter config, the library name and version, the backbone's
shape), model.safetensors (the adapter's tensors by their saved names) and README.md (the model card).
Never the frozen backbone; only safetensors are read, never pickle. Nothing here knows the model class.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file, save_file

from .cards import LIBRARY_NAME
from .config import CONFIG_NAME, read_config_json
from .fileio import atomic_write_text, publish_files, staging_dir

WEIGHTS_NAME = "model.safetensors"
README_NAME = "README.md"


def write_adapter_folder(
    save_directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config_payload: dict[str, Any],
    card: Any = None,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write model.safetensors, README.md (`card.save`, a `ModelCard`), `extra(folder)`'s files and
    config.json.

    Files are first written to a temporary sibling directory and then moved into place one by one with
    `os.replace`, config.json last, so a failure half way leaves the previous save readable and a reader
    that sees the new config also sees the new weights.
    """
    target = Path(save_directory)
    staging = staging_dir(target)
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        if card is not None:
            card.save(staging / README_NAME)
        if extra is not None:
            extra(staging)
        atomic_write_text(staging / CONFIG_NAME, json.dumps(config_payload, indent=2) + "\n")
        publish_files(staging, target, last=CONFIG_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_adapter_file(
    source: str,
    filename: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> str:
    """Local path of `filename` from an adapter folder or Hub repo `source`; a clear error if it is missing."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{filename} not found in {source}: not a pgp_peft adapter directory")
        return path
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(
            repo_id=source,
            filename=filename,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
        )
    except LocalEntryNotFoundError as error:  # offline, and not in the Hub cache
        raise FileNotFoundError(
            f"{source}: no such local folder, and no cached Hub copy of {filename} while the Hub cannot be "
            f"reached ({' '.join(str(error).split())[:200]}); check the path, or go online"
        ) from error
    except EntryNotFoundError as error:
        from huggingface_hub import list_repo_files

        files = list_repo_files(source, revision=revision, token=token)
        raise ValueError(
            f"{source} is not a pgp_peft adapter: no {filename}; the repo has {sorted(files)[:20]}"
        ) from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"{source}: no such local folder, and no Hub repository of that name (or no access to it)"
        ) from error


def check_adapter_source(source: str) -> None:
    """A path that is no folder: say so, rather than the Hub's "Repo id must be in the form ..."."""
    if os.path.isdir(source):
        return
    if os.path.exists(source):
        raise NotADirectoryError(
            f"{source}: is a file; an adapter is a folder with config.json and model.safetensors"
        )
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    looks_like_path = source.startswith((".", "/", "~"))
    try:
        validate_repo_id(source)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise FileNotFoundError(f"{source}: no such folder (nor a valid Hub repo id such as 'user/adapter')")


def read_adapter_config(path: str, source: str) -> dict[str, Any]:
    """The config.json payload of a pgp_peft adapter; a `ValueError` if it is another library's or no
    JSON object."""
    payload = read_config_json(path, source=f"{source}/{CONFIG_NAME}")
    library = payload.get("library_name")
    if library != LIBRARY_NAME or "method" not in payload:
        raise ValueError(
            f"{source} is not a pgp_peft adapter: its config.json has library_name={library!r} "
            f"and keys {sorted(payload)[:12]}"
        )
    return payload


def read_adapter_tensors(path: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, on `device`."""
    return load_file(path, device=str(device))


def create_adapter_repo(repo_id: str, *, token: str | None, private: bool | None) -> str:
    """Create `repo_id` on the Hub if needed; returns its full id (`namespace/name`).

    Without a token: a `ValueError` saying how to log in, before anything is sent."""
    from huggingface_hub import HfApi, get_token

    if token is None and get_token() is None:
        raise ValueError(
            f"cannot push to {repo_id!r}: no Hugging Face token found. Log in with `hf auth login`, set "
            "the HF_TOKEN environment variable, or pass token=... (your local files are untouched)"
        )
    return HfApi(token=token).create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id


def upload_adapter_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None,
    commit_message: str,
    branch: str | None = None,
    create_pr: bool | None = None,
    **kwargs: Any,
):
    """Upload `folder` to `repo_id` in one commit (a refused push raises the Hub's error)."""
    from huggingface_hub import HfApi

    return HfApi(token=token).upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=branch,
        create_pr=create_pr,
        **kwargs,
    )
