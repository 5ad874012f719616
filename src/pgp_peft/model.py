"""`PGPModel`: a frozen backbone + a continual-learning method + a head + the null-space memory.

Mirrors PEFT: `get_pgp_model(base_model, config)` wraps a Hugging Face model, `save_pretrained`
writes only the adapter (config.json + model.safetensors + README.md, never the backbone), and
`PGPModel.from_pretrained(dir_or_repo)` rebuilds the backbone from `base_model_name_or_path` @
`revision` unless one is passed in. Which method (L2P, DualPrompt, CLIP, ...) is the registry's
business (`pgp_peft.methods`): this module never asks which one it holds.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .backbones import (
    VisionBackbone,
    backbone_config_signature,
    build_backbone,
    load_base_model,
    resolve_builtin,
)
from .cards import LIBRARY_NAME, RUN_FILES, build_model_card, card_kwargs_from_run
from .config import CONFIG_NAME, PromptGradientProjectionConfig
from .hub import (
    WEIGHTS_NAME,
    check_adapter_source,
    create_adapter_repo,
    fetch_adapter_file,
    read_adapter_config,
    read_adapter_tensors,
    upload_adapter_folder,
    write_adapter_folder,
)
from .methods import MethodOutput, PGPMethod, ProtectedSlice, get_method
from .projection import NullSpaceMemory, check_reference_memory_size, project_update_
from .version import __version__

logger = logging.getLogger(__name__)


@dataclass
class PGPOutput(ModelOutput):
    """loss (), logits (B, C), prompt_ids (B, k) selected pool slots, key_similarity () mean cosine
    of the selected keys to the query, pull_term () the pull-constraint value, features (B, D)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    prompt_ids: torch.Tensor | None = None
    key_similarity: torch.Tensor | None = None
    pull_term: torch.Tensor | None = None
    features: torch.Tensor | None = None


class PGPModel(nn.Module):
    """A continual-learning method + head + null-space memory around a frozen vision transformer.

    Args:
        config: the adapter configuration (its `method` picks the registered `PGPMethod`).
        base_model: the backbone (a model of `backbones.BACKBONE_FAMILIES`). If None it is loaded
            from `config.base_model_name_or_path` at `config.revision`.
        attn_implementation: `"pgp_sdpa"` or `"pgp_eager"`; default follows the backbone's.
        tokenizer: for methods whose head reads text (CLIP: the CLIP tokenizer; loaded from
            `config.base_model_name_or_path` if None). Ignored by the others.

    Attributes:
        backbone (`VisionBackbone`), method (`PGPMethod`), head, memory (`NullSpaceMemory`),
        class_task (C,): the task that introduced each class (-1: not seen yet).
    """

    # The Trainer must not pass `num_items_in_batch` to forward: the loss is a plain batch mean.
    accepts_loss_kwargs = False
    main_input_name = "pixel_values"

    def __init__(
        self,
        config: PromptGradientProjectionConfig,
        base_model: nn.Module | None = None,
        attn_implementation: str | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        spec = get_method(config.method)
        if base_model is None:
            base_model = load_base_model(config)
        self.backbone: VisionBackbone = build_backbone(base_model, attn_implementation)
        config.validate(num_hidden_layers=self.backbone.num_layers)
        if config.projection_space == "reference":
            try:
                check_reference_memory_size(config.memory_samples or 0, self.backbone.hidden_size)
            except ValueError as error:
                raise ValueError(f"PromptGradientProjectionConfig.memory_samples: {error}") from None
        config = config.replace()  # the model owns its config; the caller's object is left as it was
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model, "name_or_path", None) or None
        self.config = config

        self.method: PGPMethod = spec.method_cls(config, self.backbone)
        self.num_classes = config.num_classes or len(config.class_names or [])
        self.head = self.method.build_head(self.num_classes, tokenizer)
        # class_task[c] = the task that introduced class c (-1: not seen yet). Drives class masks.
        self.register_buffer("class_task", torch.full((self.num_classes,), -1, dtype=torch.long))
        self.memory = NullSpaceMemory(self.method.protected_spaces())
        # The adapter lives where the backbone lives; its parameters stay float32 (mixed precision
        # casts activations, and the projection needs fp32 bases).
        backbone_parameter = next(self.backbone.model.parameters(), None)
        if backbone_parameter is not None and backbone_parameter.device.type != "cpu":
            for module in (self.method, self.head, self.memory):
                module.to(backbone_parameter.device)
            self.class_task = self.class_task.to(backbone_parameter.device)
        if config.inference_mode:
            self.requires_grad_(False)  # as PEFT: a loaded adapter for inference is frozen

    # ------------------------------------------------------------------ structure
    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    def protected_spaces(self) -> dict[str, int]:
        """Space name -> dimension of the vectors it protects (the method's)."""
        return self.method.protected_spaces()

    def protected_slices(self) -> list[ProtectedSlice]:
        """(parameter, index, space names): the slices the projection acts on, last axis = the space's dim."""
        return self.method.protected_slices()

    # ------------------------------------------------------------------ continual bookkeeping
    def register_task_classes(self, task_id: int, classes: Iterable[int]) -> None:
        """Record that `task_id` introduces `classes` (class-order positions)."""
        for cls in classes:
            if not 0 <= int(cls) < self.num_classes:
                raise ValueError(f"class id {cls} outside [0, {self.num_classes})")
            self.class_task[int(cls)] = task_id

    @property
    def num_tasks_seen(self) -> int:
        return int(self.class_task.max().item()) + 1 if self.num_classes else 0

    def begin_task(self, task_id: int) -> None:
        """Per-task setup of the method and the head (before the task's optimizer is built)."""
        self.head.begin_task(task_id)
        self.method.begin_task(task_id)

    def class_mask(self, mode: str, task_id: int | torch.Tensor | None = None) -> torch.Tensor | None:
        """Boolean (C,) or (B, C) mask of the classes logits may use: `task` (the task's classes),
        `seen` (every class seen so far) or `all`."""
        if mode == "all":
            return None
        if mode == "seen":
            seen = self.class_task >= 0
            return seen if bool(seen.any()) else None
        if task_id is None:
            raise ValueError("class mask 'task' needs task_id")
        if isinstance(task_id, torch.Tensor) and task_id.dim() > 0:
            return self.class_task.unsqueeze(0) == task_id.to(self.class_task.device).unsqueeze(1)
        return self.class_task == int(task_id)

    # ------------------------------------------------------------------ forward
    def forward_features(
        self,
        pixel_values: torch.Tensor,
        task_id: int | torch.Tensor | None = None,
        *,
        query: torch.Tensor | None = None,
        use_task_slot: bool | None = None,
    ) -> MethodOutput:
        """The method's pass. pixel_values (B, C, H, W) -> (features (B, D), selection or None).

        `query` (B, D): the frozen query `self.backbone.query(pixel_values)` computed earlier (e.g. by
        the ContinualTrainer's query cache); it is the same for an image as long as the backbone is
        frozen and the image is not re-augmented, so passing it skips the frozen query pass. None:
        computed when the method needs it. Methods without a query pass (CLIP) refuse one.
        `use_task_slot` forces (True) or forbids (False) the prompt mask; default: in training only."""
        return self.method.features(pixel_values, task_id, query=query, use_task_slot=use_task_slot)

    def compile_backbone(self, **compile_kwargs: Any) -> None:
        """`torch.compile` the frozen transformer in place (`nn.Module.compile`); prompts, prefixes and
        the head stay eager. The first passes of every new input shape compile (tens of seconds on a
        CPU); see benchmarks/README.md §5 for when it pays off."""
        self.backbone.vision.compile(**compile_kwargs)

    def compute_logits(self, features: torch.Tensor, task_id=None) -> torch.Tensor:
        """features (B, D) -> logits (B, C), by the head."""
        return self.head(features, self.class_task, task_id)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        task_id: int | torch.Tensor | None = None,
        class_mask: str | None = None,
        query: torch.Tensor | None = None,
    ) -> PGPOutput:
        """pixel_values (B, C, H, W), labels (B,) class-order ids, task_id (int or (B,)), query (B, D)
        an optional precomputed frozen query.

        class_mask: `task` (default while training with a task id: logits outside the task's
        classes are -inf, the paper's class mask), `seen` (default otherwise: class-IL over all
        classes seen so far), or `all`. Task-IL evaluation = `task_id=true task, class_mask="task"`.
        Loss = CE + the method's auxiliary term (L2P/DualPrompt: - pull_constraint_coeff · pull term).
        """
        features, selection = self.forward_features(pixel_values, task_id, query=query)
        logits = self.compute_logits(features, task_id)
        if class_mask is None:
            class_mask = "task" if (self.training and task_id is not None) else "seen"
        mask = self.class_mask(class_mask, task_id)
        if mask is not None:
            logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
        loss = pull = similarity = None
        if selection is not None:
            pull = selection.pull_constraint()
            similarity = selection.selected_similarity.mean()
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels.to(logits.device))
            auxiliary = self.method.auxiliary_loss(selection)
            if auxiliary is not None:
                loss = loss + auxiliary
        return PGPOutput(
            loss=loss,
            logits=logits,
            prompt_ids=selection.indices if selection is not None else None,
            key_similarity=similarity,
            pull_term=pull,
            features=features,
        )

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images, *, top_k: int = 1, transform=None, batch_size: int = 32) -> list:
        """Class names for PIL images, numpy arrays or a (B, C, H, W) tensor in [0, 1] (class-IL over
        every class seen in training). Returns one name per image, or with `top_k > 1` a list of
        `(name, probability)` pairs per image."""
        if self.num_tasks_seen == 0:
            raise ValueError("this adapter has not been trained on any task yet (no classes seen)")
        pixel_values = self._prepare_images(images, transform)
        names = self.config.class_names or [str(i) for i in range(self.num_classes)]
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out: list = []
        for start in range(0, pixel_values.shape[0], batch_size):
            logits = self(pixel_values[start : start + batch_size].to(device), class_mask="seen").logits
            probabilities = logits.float().softmax(-1)
            values, indices = probabilities.topk(min(top_k, int((self.class_task >= 0).sum())), dim=-1)
            for row_values, row_indices in zip(values.tolist(), indices.tolist()):
                if top_k == 1:
                    out.append(names[row_indices[0]])
                else:
                    out.append([(names[i], p) for i, p in zip(row_indices, row_values)])
        self.train(was_training)
        return out

    def _prepare_images(self, images, transform=None) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images if images.dim() == 4 else images.unsqueeze(0)
        if not isinstance(images, (list, tuple)):
            images = [images]
        if transform is None:
            from .data import build_transform

            kwargs: dict[str, Any] = {"mode": self.config.preprocessing}
            if self.config.preprocessing == "processor":
                from transformers import AutoImageProcessor

                kwargs["image_processor"] = AutoImageProcessor.from_pretrained(
                    resolve_builtin(self.config.base_model_name_or_path),
                    revision=self.config.revision,
                    trust_remote_code=False,  # the name comes from a downloaded config.json
                )
            transform = build_transform(self.backbone.image_size, image_column="image", **kwargs)
        return transform({"image": list(images)})["pixel_values"]

    # ------------------------------------------------------------------ projection
    def project_tensor_(self, tensor: torch.Tensor, names: list[str]) -> None:
        if len(names) == 1:
            self.memory.project_(tensor, names[0])
        else:
            self.memory.project_heads_(tensor, names)

    @torch.no_grad()
    def project_gradients_(self) -> None:
        """g <- g - g U Uᵀ on every protected slice (no-op while the memory is empty, i.e. task 1)."""
        if not self.config.use_pgp or self.memory.is_empty():
            return
        for parameter, index, names in self.protected_slices():
            if parameter.grad is not None:
                self.project_tensor_(parameter.grad[index], names)

    @torch.no_grad()
    def snapshot_protected(self) -> list[torch.Tensor]:
        """Copies of the protected slices, taken before an optimizer step (for `project_update`)."""
        return [parameter.detach()[index].clone() for parameter, index, _ in self.protected_slices()]

    @torch.no_grad()
    def project_updates_(self, snapshots: list[torch.Tensor]) -> None:
        """θ <- θ_old + P⊥(θ - θ_old) on every protected slice: the update itself stays in the null space."""
        if not self.config.use_pgp or self.memory.is_empty():
            return
        for (parameter, index, names), before in zip(self.protected_slices(), snapshots):
            project_update_(
                parameter.data[index], before, lambda delta, names=names: self.project_tensor_(delta, names)
            )

    # ------------------------------------------------------------------ adapter state
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors of the adapter by their saved names: the method's (e.g. `prompt_pool.prompt`),
        the head's (`head.weight`, CLIP: `text_contexts.{t}`), `class_task` and `memory.*`. Never the
        frozen backbone. The names are those pgp_peft 0.1.0 saved."""
        tensors: dict[str, torch.Tensor] = {}
        parts = [
            self.method.adapter_tensors(),
            self.head.adapter_tensors(),
            {"class_task": self.class_task},
            {f"memory.{name}": tensor for name, tensor in self.memory.state_dict(keep_vars=True).items()},
        ]
        for part in parts:
            clash = sorted(set(tensors) & set(part))
            if clash:
                raise RuntimeError(f"two parts of the adapter save tensors under the same names {clash}")
            tensors.update(part)
        return tensors

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached contiguous copies of `adapter_tensors()` (what model.safetensors holds)."""
        tensors = self.adapter_tensors()
        # The memory's bases are saved as their (D, r) kept columns, not the zero-padded (D, D) buffers.
        tensors.update({f"memory.{name}": tensor for name, tensor in self.memory.saved_state().items()})
        return {name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load of adapter tensors: missing, unexpected or mis-shaped entries raise `ValueError`."""
        expected = self.adapter_tensors()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: missing adapter tensors {missing}, unexpected {unexpected}")
        memory_prefix = "memory."
        for name, tensor in state.items():
            if name.startswith(memory_prefix + "basis__"):
                continue  # (D, r): checked against the stored rank by the memory
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
        memory_state = {
            name[len(memory_prefix) :]: tensor
            for name, tensor in state.items()
            if name.startswith(memory_prefix)
        }
        self.memory.load_saved_state(memory_state, source)  # checked before anything is written
        for name, tensor in state.items():
            if not name.startswith(memory_prefix):
                expected[name].copy_(tensor)

    def backbone_signature(self) -> dict[str, int]:
        return {
            "hidden_size": self.backbone.hidden_size,
            "num_hidden_layers": self.backbone.num_layers,
            "num_attention_heads": self.backbone.num_heads,
        }

    def _config_payload(self) -> dict[str, Any]:
        payload = self.config.to_dict()
        payload.update(
            library_name=LIBRARY_NAME, pgp_peft_version=__version__, backbone=self.backbone_signature()
        )
        return payload

    # ------------------------------------------------------------------ save / load / share
    def generate_model_card(self, **card_kwargs: Any):
        """The model card (`cards.build_model_card`) filled from the config and `card_kwargs` (run results)."""
        return build_model_card(config=self._config_payload(), **card_kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, model_card_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Write config.json, model.safetensors and README.md (the model card); never the backbone.

        Files are first written to a temporary sibling directory and then moved into place one by one,
        config.json last, so a failure half way leaves the previous save readable.
        """
        write_adapter_folder(
            save_directory,
            self.adapter_state_dict(),
            self._config_payload(),
            self.generate_model_card(**(model_card_kwargs or {})),
            extra=self.method.save_extra,
        )

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
        """Upload the adapter (config, tensors, bases, model card) in one commit.

        With `output_dir` (a training run's folder) its results.json and accuracy plots go along and fill
        the card. The local save is never modified; a refused push raises the Hub's error.
        """
        repo_id = create_adapter_repo(repo_id, token=token, private=private)
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
            return upload_adapter_folder(
                folder,
                repo_id,
                token=token,
                commit_message=commit_message,
                branch=branch,
                create_pr=create_pr,
                **kwargs,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        base_model: nn.Module | None = None,
        tokenizer: Any = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        map_location: str | torch.device | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        **config_overrides: Any,
    ) -> PGPModel:
        """Load an adapter from a local directory or a Hub repo id (safetensors only, never pickle).

        The backbone is `base_model` if given, else loaded from the recorded base model and revision
        with the recorded `base_model_kwargs` (an allow-list of config overrides, see
        `config.BACKBONE_CONFIG_OVERRIDES`). Nothing read from the adapter's files can enable remote
        code: only this call's `trust_remote_code=True` lets the backbone repo run its own Python.
        `tokenizer` as in the constructor. A backbone of another hidden size or depth raises
        `ValueError` naming both shapes; a non-finite tensor in model.safetensors raises `ValueError`
        naming it. Keyword arguments left over override config fields.
        """
        source = str(pretrained_model_name_or_path)
        if not isinstance(trust_remote_code, bool):
            raise TypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
        check_adapter_source(source)
        download = dict(
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
        )
        payload = read_adapter_config(fetch_adapter_file(source, CONFIG_NAME, **download), source)
        saved_signature = payload.pop("backbone", None)
        payload.update(config_overrides)
        try:
            config = PromptGradientProjectionConfig.from_dict(payload)
        except ValueError as error:
            raise ValueError(f"{source}/{CONFIG_NAME}: {error}") from None
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
        model = cls(
            config, base_model=base_model, attn_implementation=attn_implementation, tokenizer=tokenizer
        )
        if saved_signature is not None and saved_signature != model.backbone_signature():
            raise ValueError(
                f"adapter {source} was trained on a backbone with {saved_signature}, but the backbone given has "
                f"{model.backbone_signature()}"
            )
        # Default: wherever the backbone is (a CUDA backbone passed in stays on CUDA).
        device = map_location if map_location is not None else next(model.parameters()).device
        state = read_adapter_tensors(fetch_adapter_file(source, WEIGHTS_NAME, **download), device)
        model.load_adapter_state_dict(state, source=f"{source}/{WEIGHTS_NAME}")
        if model.method.extra_files:
            # Files of one snapshot land in one folder: the folder of the last one fetched holds them all.
            paths = [fetch_adapter_file(source, name, **download) for name in model.method.extra_files]
            model.method.load_extra(Path(paths[-1]).parent)
        model.to(device)
        model.eval()
        return model


def get_pgp_model(
    base_model: nn.Module,
    config: PromptGradientProjectionConfig,
    num_classes: int | None = None,
    attn_implementation: str | None = None,
    tokenizer: Any = None,
) -> PGPModel:
    """Wrap a Hugging Face vision model with a PGP adapter (like `peft.get_peft_model`).

    The base model is frozen and switched to the `pgp_*` attention implementation; nothing else in
    it changes. `num_classes` overrides `config.num_classes`; `tokenizer` as in `PGPModel`.

    The prompts, keys, head (and CLIP's text contexts) are drawn from torch's global RNG, as every
    `transformers` / `peft` model is: call `transformers.set_seed(seed)` *before* this function for
    a reproducible run (`ContinualTrainer` seeds each task itself, but not the initialisation).
    """
    if num_classes is not None:
        config = config.replace(num_classes=num_classes)
    return PGPModel(
        config, base_model=base_model, attn_implementation=attn_implementation, tokenizer=tokenizer
    )
