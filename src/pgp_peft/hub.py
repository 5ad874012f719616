"""Saving, loading and sharing PGP adapters: adapter-only safetensors, atomic saves, the Hub.

`AdapterHubMixin` gives `PGPModel` the PEFT-style pair `save_pretrained` / `from_pretrained`
(plus `push_to_hub` through `huggingface_hub.PyTorchModelHubMixin`). What is written: config.json
(the adapter config, the library name and version, the backbone's shape), model.safetensors (prompts,
keys, head, class bookkeeping, projection bases) and README.md (the model card). Never the frozen
backbone; only safetensors are read, never pickle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .cards import LIBRARY_NAME
from .config import BACKBONE_CONFIG_OVERRIDES, CONFIG_NAME, PromptGradientProjectionConfig, read_config_json
from .fileio import atomic_write_text, publish_files, staging_dir

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
RUN_FILES = ("results.json", "accuracy_matrix.png", "accuracy_curves.png")


class AdapterHubMixin(PyTorchModelHubMixin):
    """Adapter-only persistence for `PGPModel` (which provides `config`, `backbone`, `state_dict`)."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone: prompts, keys, head, class bookkeeping, bases."""
        return {
            name: tensor.detach().contiguous().clone()
            for name, tensor in self.state_dict().items()
            if not name.startswith("backbone.")
        }

    def backbone_signature(self) -> dict[str, int]:
        return {
            "hidden_size": self.backbone.hidden_size,
            "num_hidden_layers": self.backbone.num_layers,
            "num_attention_heads": self.backbone.num_heads,
        }

    def _config_payload(self) -> dict[str, Any]:
        payload = self.config.to_dict()
        payload.update(
            library_name=LIBRARY_NAME,
            pgp_peft_version=__version__,
            backbone=self.backbone_signature(),
        )
        return payload

    def _save_pretrained(self, save_directory: Path) -> None:
        save_file(
            self.adapter_state_dict(), str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"}
        )
        atomic_write_text(
            Path(save_directory) / CONFIG_NAME, json.dumps(self._config_payload(), indent=2) + "\n"
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> str | None:
        """Write config.json, model.safetensors and README.md; never the backbone.

        Files are first written to a temporary sibling directory and then moved into place one by one
        with `os.replace`, so a failure half way leaves the previous save readable.
        """
        target = Path(save_directory)
        staging = staging_dir(target)
        try:
            super().save_pretrained(staging, **{k: v for k, v in kwargs.items() if k != "push_to_hub"})
            # Weights first, config last: a reader that sees the new config also sees the new weights.
            publish_files(staging, target, last=CONFIG_NAME)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if kwargs.get("push_to_hub"):
            repo_id = kwargs.get("repo_id") or target.name
            return self.push_to_hub(repo_id, model_card_kwargs=kwargs.get("model_card_kwargs"))
        return None

    def generate_model_card(self, *args: Any, **kwargs: Any):
        """The pgp_peft model card (pgp_peft/templates/pgp_model_card.md) filled from the config and run results."""
        from .cards import build_model_card

        return build_model_card(config=self._config_payload(), **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload pgp_peft adapter",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        output_dir: str | os.PathLike | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str:
        """Upload the adapter (config, prompts/keys/head, bases, model card) in one commit.

        With `output_dir` (a training run's folder) its results.json, accuracy plots and split
        manifest go along. The local save is never modified; a refused push raises the Hub's error.
        """
        from huggingface_hub import HfApi, get_token

        if token is None and get_token() is None:
            raise ValueError(
                f"cannot push to {repo_id!r}: no Hugging Face token found. Log in with `hf auth login`, set "
                "the HF_TOKEN environment variable, or pass token=... (your local files are untouched)"
            )
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        card_kwargs = dict(model_card_kwargs or {})
        if output_dir is not None and "results" not in card_kwargs:
            card_kwargs.update(card_kwargs_from_run(output_dir))
        card_kwargs.setdefault("repo_id", repo_id)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            self.save_pretrained(folder, model_card_kwargs=card_kwargs)
            if output_dir is not None:
                for name in RUN_FILES:
                    source = Path(output_dir) / name
                    if source.exists():
                        shutil.copy2(source, folder / name)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
                **kwargs,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        base_model: nn.Module | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        map_location: str | torch.device | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        **config_overrides: Any,
    ) -> AdapterHubMixin:
        """Load an adapter from a local directory or a Hub repo id (safetensors only, never pickle).

        The backbone is `base_model` if given, else loaded from the recorded base model and revision
        with the recorded `base_model_kwargs` (an allow-list of config overrides, see
        `config.BACKBONE_CONFIG_OVERRIDES`). Nothing read from the adapter's files can enable remote
        code: only this call's `trust_remote_code=True` lets the backbone repo run its own Python.
        A backbone of another hidden size or depth raises `ValueError` naming both shapes; a
        non-finite tensor in model.safetensors raises `ValueError` naming it.
        """
        source = str(pretrained_model_name_or_path)
        tokenizer = config_overrides.pop("tokenizer", None)  # CLIP adapters only
        if not isinstance(trust_remote_code, bool):
            raise TypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
        _check_adapter_source(source)

        def fetch(filename: str) -> str:
            if os.path.isdir(source):
                path = os.path.join(source, filename)
                if not os.path.exists(path):
                    raise FileNotFoundError(
                        f"{filename} not found in {source}: not a pgp_peft adapter directory"
                    )
                return path
            from huggingface_hub.errors import (
                EntryNotFoundError,
                LocalEntryNotFoundError,
                RepositoryNotFoundError,
            )

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

        payload = read_config_json(fetch(CONFIG_NAME), source=f"{source}/{CONFIG_NAME}")
        library = payload.get("library_name")
        if library != LIBRARY_NAME or "method" not in payload:
            raise ValueError(
                f"{source} is not a pgp_peft adapter: its config.json has library_name={library!r} "
                f"and keys {sorted(payload)[:12]}"
            )
        saved_signature = payload.pop("backbone", None)
        payload.update(config_overrides)
        try:
            config = PromptGradientProjectionConfig.from_dict(payload)
        except ValueError as error:
            raise ValueError(f"{source}/{CONFIG_NAME}: {error}") from None
        model_kwargs: dict[str, Any] = {}
        if config.method == "clip":
            from .clip import CLIPPGPModel

            cls = CLIPPGPModel  # a CLIP adapter loaded through PGPModel.from_pretrained
            if tokenizer is not None:
                model_kwargs["tokenizer"] = tokenizer
        if base_model is not None and saved_signature is not None:
            # Before building the adapter, so the error names both shapes (not a layer-index error).
            given = backbone_config_signature(base_model)
            if given is not None and given != saved_signature:
                raise ValueError(
                    f"adapter {source} was trained on a backbone with {saved_signature}, but the backbone "
                    f"given has {given}"
                )
        if base_model is None:
            if trust_remote_code:  # the adapter's config names the repo (and revision) whose code runs
                logger.warning(
                    "trust_remote_code=True: code from the backbone repo %r at revision %r (named by %s) may run",
                    config.base_model_name_or_path,
                    config.revision,
                    f"{source}/{CONFIG_NAME}",
                )
            # Loaded here, not in the model's constructor, so the caller's trust_remote_code reaches it.
            base_model = load_base_model(config, trust_remote_code=trust_remote_code)
        model = cls(config, base_model=base_model, attn_implementation=attn_implementation, **model_kwargs)
        if saved_signature is not None and saved_signature != model.backbone_signature():
            raise ValueError(
                f"adapter {source} was trained on a backbone with {saved_signature}, but the backbone given has "
                f"{model.backbone_signature()}"
            )
        # Default: wherever the backbone is (a CUDA backbone passed in stays on CUDA).
        device = map_location if map_location is not None else next(model.parameters()).device
        weights = fetch(WEIGHTS_NAME)
        state = load_file(weights, device=str(device))
        model.load_adapter_state_dict(state, source=f"{source}/{WEIGHTS_NAME}")
        model.to(device)
        model.eval()
        return model

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load of adapter tensors: missing, unexpected or mis-shaped entries raise `ValueError`."""
        expected = {name: t for name, t in self.state_dict().items() if not name.startswith("backbone.")}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: missing adapter tensors {missing}, unexpected {unexpected}")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but this backbone needs "
                    f"{tuple(expected[name].shape)} (hidden size {self.backbone.hidden_size}, "
                    f"{self.backbone.num_layers} layers)"
                )
        non_finite = sorted(
            name
            for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
        )
        if non_finite:
            raise ValueError(
                f"{source}: non-finite values (NaN or inf) in tensor(s) {non_finite}; the file is damaged or "
                "comes from a diverged run: load an earlier checkpoint"
            )
        self.load_state_dict(state, strict=False)


def card_kwargs_from_results(payload: dict[str, Any]) -> dict[str, Any]:
    """Model-card arguments (see `cards.build_model_card`) from a run's results.json payload."""
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


def backbone_config_signature(model: nn.Module) -> dict[str, int] | None:
    """The shape facts an adapter depends on, read from a HF model's (vision) config."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", config)
    if config is None or not hasattr(config, "hidden_size"):
        return None
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
    }


BUILTIN_PREFIX = "pgp_peft:"
BUILTIN_MODELS = ("vit-tiny-patch4-32-cifar10",)


def resolve_builtin(name: str | None) -> str | None:
    """`pgp_peft:vit-tiny-patch4-32-cifar10` -> the backbone folder shipped inside the package."""
    if name and name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX) :]
        if key not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown built-in model {name!r}; available: {[BUILTIN_PREFIX + m for m in BUILTIN_MODELS]}"
            )
        return str(Path(__file__).resolve().parent / "demo_data" / key)
    return name


def _check_adapter_source(source: str) -> None:
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


def load_backbone(
    name: str | None,
    revision: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    *,
    trust_remote_code: bool = False,
):
    """Load a frozen-backbone candidate (ViTModel / DeiTModel without pooler, Dinov2Model, or CLIPModel)
    from a Hub id, a local folder or a built-in name, with `config_overrides` (only
    `BACKBONE_CONFIG_OVERRIDES`, e.g. layer_norm_eps) applied to its config. `trust_remote_code` is
    passed to transformers as given."""
    refused = sorted(set(config_overrides or {}) - set(BACKBONE_CONFIG_OVERRIDES))
    if refused:
        raise ValueError(
            f"backbone config overrides {refused} refused; accepted: {list(BACKBONE_CONFIG_OVERRIDES)} "
            "(pass trust_remote_code as its own argument)"
        )
    name = resolve_builtin(name)
    if not name:
        raise ValueError(
            "no base model given: pass base_model=... or set config.base_model_name_or_path "
            "(e.g. 'google/vit-base-patch16-224-in21k')"
        )
    from transformers import AutoConfig

    from .backbones import family_of_model_type

    try:
        config = AutoConfig.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code, **(config_overrides or {})
        )
        family = family_of_model_type(config.model_type)
        if family is not None:
            return family.load_class.from_pretrained(
                name,
                revision=revision,
                config=config,
                trust_remote_code=trust_remote_code,
                **family.load_kwargs,
            )
    except OSError as error:
        raise OSError(
            f"could not load the base model {name!r} at revision {revision!r}: {error}\n"
            "If you are offline, load the backbone yourself and pass it: "
            "PGPModel.from_pretrained(repo, base_model=ViTModel.from_pretrained(local_dir))"
        ) from error
    raise TypeError(
        f"base model {name!r} is a {config.model_type!r} model; pgp_peft supports ViT, DeiT, DINOv2 and CLIP"
    )


def load_base_model(config: PromptGradientProjectionConfig, *, trust_remote_code: bool = False) -> nn.Module:
    """The backbone recorded in an adapter config: base_model_name_or_path @ revision (+ base_model_kwargs)."""
    return load_backbone(
        config.base_model_name_or_path,
        config.revision,
        config.base_model_kwargs,
        trust_remote_code=trust_remote_code,
    )
