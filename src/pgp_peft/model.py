"""`PGPModel`: the trainable continual state (prompts, keys, head, projection bases) on a frozen backbone.

Mirrors PEFT: `get_pgp_model(base_model, config)` wraps a Hugging Face model, `save_pretrained`
writes only the adapter (config.json + model.safetensors + README.md, never the backbone), and
`PGPModel.from_pretrained(dir_or_repo)` rebuilds the backbone from `base_model_name_or_path` @
`revision` unless one is passed in.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from . import __version__
from .backbones import VisionBackbone, build_backbone
from .config import CONFIG_NAME, PromptGradientProjectionConfig, atomic_write_text
from .projection import NullSpaceMemory
from .prompts import ImagePrompt, L2PPromptPool, PrefixPromptPool, PromptSelection

WEIGHTS_NAME = "model.safetensors"
LIBRARY_NAME = "pgp_peft"
RUN_FILES = ("results.json", "accuracy_matrix.png", "accuracy_curves.png")


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


class PGPModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name=LIBRARY_NAME,
    tags=["pgp_peft", "continual-learning", "prompt-tuning", "image-classification"],
    repo_url="https://github.com/JingyangQiao/prompt-gradient-projection",
    paper_url="https://openreview.net/forum?id=EH2O3h7sBI",
):
    """Prompt pools + classifier + null-space memory around a frozen `ViTModel` / CLIP vision tower.

    Args:
        config: the adapter configuration.
        base_model: the backbone (ViTModel, CLIPVisionModel or CLIPModel). If None it is loaded
            from `config.base_model_name_or_path` at `config.revision`.
        attn_implementation: `"pgp_sdpa"` or `"pgp_eager"`; default follows the backbone's.
    """

    # The Trainer must not pass `num_items_in_batch` to forward: the loss is a plain batch mean.
    accepts_loss_kwargs = False
    main_input_name = "pixel_values"

    def __init__(
        self,
        config: PromptGradientProjectionConfig,
        base_model: nn.Module | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        if base_model is None:
            base_model = load_base_model(config)
        self.backbone: VisionBackbone = build_backbone(base_model, attn_implementation)
        config.validate(num_hidden_layers=self.backbone.num_layers)
        if config.method == "clip" and not self.backbone.is_clip:
            raise TypeError("method='clip' needs a CLIPModel backbone")
        if config.method != "clip" and config.num_classes is None:
            raise ValueError("PromptGradientProjectionConfig.num_classes: required for L2P and DualPrompt heads")
        if config.projection_space == "reference" and config.memory_samples != self.backbone.hidden_size:
            raise ValueError(
                f"PromptGradientProjectionConfig.memory_samples: reference mode needs memory_samples == hidden size "
                f"({config.memory_samples} != {self.backbone.hidden_size}); the reference applies an n_mem x n_mem "
                "projector on the embedding axis. Use projection_space='feature' for other sizes."
            )
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base_model, "name_or_path", None) or None
        self.config = config
        hidden = self.backbone.hidden_size

        self.prompt_pool: L2PPromptPool | None = None
        self.prefix_pool: PrefixPromptPool | None = None
        self.image_prompt: ImagePrompt | None = None
        if config.method == "l2p":
            self.prompt_pool = L2PPromptPool(
                config.pool_size,
                config.prompt_length,
                hidden,
                config.top_k,
                config.prompt_init,
                config.key_init,
                use_keys=config.use_prompt_keys,
                batchwise=config.batchwise_prompt,
            )
        elif config.method == "dualprompt":
            self.prefix_pool = PrefixPromptPool(
                hidden,
                config.g_prompt_layers,
                config.g_prompt_length,
                config.e_prompt_layers,
                config.e_prompt_length,
                config.pool_size,
                config.top_k,
                config.prompt_init,
                config.key_init,
                batchwise=config.batchwise_prompt,
            )
        else:
            self.image_prompt = ImagePrompt(config.image_prompt_length, hidden, config.prompt_init)

        self.num_classes = config.num_classes or len(config.class_names or [])
        self.head = nn.Linear(hidden, self.num_classes) if config.method != "clip" else None
        # class_task[c] = the task that introduced class c (-1: not seen yet). Drives class masks.
        self.register_buffer("class_task", torch.full((self.num_classes,), -1, dtype=torch.long))
        self.memory = NullSpaceMemory(self.protected_spaces())

    # ------------------------------------------------------------------ structure
    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    @property
    def head_dim(self) -> int:
        return self.backbone.hidden_size // self.backbone.num_heads

    def prefix_space_names(self, layer: int) -> list[str]:
        """Feature mode protects each head of a prefix layer separately; reference mode the whole layer."""
        if self.config.projection_space == "reference":
            return [f"prefix_l{layer}"]
        return [f"prefix_l{layer}_h{head}" for head in range(self.backbone.num_heads)]

    def protected_spaces(self) -> dict[str, int]:
        """Space name -> dimension of the vectors it protects."""
        hidden = self.backbone.hidden_size
        if self.config.method == "l2p":
            return {"prompt": hidden, "key": hidden}
        if self.config.method == "clip":
            return {"image_prompt": hidden}
        spaces: dict[str, int] = {}
        for layer in [*self.config.g_prompt_layers, *self.config.e_prompt_layers]:
            dim = hidden if self.config.projection_space == "reference" else self.head_dim
            spaces.update({name: dim for name in self.prefix_space_names(layer)})
        return spaces

    def protected_slices(self) -> list[tuple[nn.Parameter, tuple, list[str]]]:
        """(parameter, index, space names): the slices the projection acts on, last axis = D.

        L2P: the whole prompt pool and the keys (rows not selected have zero gradient anyway).
        DualPrompt: the key halves of the G-prompt and of every E-prompt slot, per head; value
        halves and E-prompt keys are not projected (as in the paper). CLIP: the image prompt.
        """
        out: list[tuple[nn.Parameter, tuple, list[str]]] = []
        if self.prompt_pool is not None:
            out.append((self.prompt_pool.prompt, (), ["prompt"]))
            if self.prompt_pool.key is not None:
                out.append((self.prompt_pool.key, (), ["key"]))
        if self.prefix_pool is not None:
            if self.prefix_pool.g_prompt is not None:
                for position, layer in enumerate(self.prefix_pool.g_layers):
                    out.append((self.prefix_pool.g_prompt, (position, 0), self.prefix_space_names(layer)))
            if self.prefix_pool.e_prompt is not None:
                for position, layer in enumerate(self.prefix_pool.e_layers):
                    out.append((self.prefix_pool.e_prompt, (position, 0), self.prefix_space_names(layer)))
        if self.image_prompt is not None:
            out.append((self.image_prompt.prompt, (), ["image_prompt"]))
        return out

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
        """Per-task setup: DualPrompt's shared pool starts the new task's slots from the previous task's."""
        if self.prefix_pool is not None and self.config.shared_pool_copy and task_id > 0:
            top_k = self.config.top_k
            for offset in range(top_k):
                self.prefix_pool.copy_slot((task_id - 1) * top_k + offset, task_id * top_k + offset)

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
    def _task_slot(
        self, task_id: int | torch.Tensor | None, batch: int, device, use_task_slot: bool | None = None
    ) -> torch.Tensor | None:
        """DualPrompt's prompt mask: while training, task t uses the slots t·k .. (t+1)·k - 1 (as the
        reference), or selects by key when the pool has no such block (more tasks than slots)."""
        if use_task_slot is None:
            use_task_slot = self.training
        if task_id is None or not (use_task_slot and self.config.prompt_mask):
            return None
        top_k = self.config.top_k
        task = task_id if isinstance(task_id, torch.Tensor) else torch.tensor(task_id)
        task = task.to(device).reshape(-1).expand(batch)
        if bool(((task + 1) * top_k > self.config.pool_size).any()):
            return None  # RECIPES.md: with 20 tasks and a pool of 10, later tasks select by key
        return task.unsqueeze(1) * top_k + torch.arange(top_k, device=device)

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        task_id: int | torch.Tensor | None = None,
        *,
        query_recorder=None,
        token_recorder=None,
        use_task_slot: bool | None = None,
    ) -> tuple[torch.Tensor, PromptSelection | None]:
        """Prompted pass. pixel_values (B, C, H, W) -> (features (B, D), selection or None).

        `use_task_slot` forces (True) or forbids (False) the prompt mask; default: in training only."""
        batch = pixel_values.shape[0]
        selection = None
        if self.config.method == "clip":
            hidden = self.backbone(
                pixel_values,
                prompt_tokens=self.image_prompt.tokens(batch),
                query_recorder=query_recorder,
                token_recorder=token_recorder,
            )
            return hidden[:, 0], None
        query = self.backbone.query(pixel_values)
        forced = self._task_slot(task_id, batch, pixel_values.device, use_task_slot)
        if self.prompt_pool is not None:
            selection = self.prompt_pool.select(query, forced)
            tokens = self.prompt_pool.gather(selection.indices)
            hidden = self.backbone(
                pixel_values,
                prompt_tokens=tokens,
                query_recorder=query_recorder,
                token_recorder=token_recorder,
            )
            if self.config.head_type == "prompt":
                features = hidden[:, 1 : 1 + tokens.shape[1]].mean(dim=1)
            else:
                features = hidden[:, 0]
            return features, selection
        selection = self.prefix_pool.select(query, forced)
        prefixes = self.prefix_pool.prefixes(batch, selection.indices if selection is not None else None)
        hidden = self.backbone(
            pixel_values, prefixes=prefixes, query_recorder=query_recorder, token_recorder=token_recorder
        )
        return hidden[:, 0], selection

    def compute_logits(self, features: torch.Tensor, task_id=None) -> torch.Tensor:
        """features (B, D) -> logits (B, C). CLIP's subclass logic lives in `clip.py`."""
        return self.head(features)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        task_id: int | torch.Tensor | None = None,
        class_mask: str | None = None,
    ) -> PGPOutput:
        """pixel_values (B, C, H, W), labels (B,) class-order ids, task_id (int or (B,)).

        class_mask: `task` (default while training with a task id: logits outside the task's
        classes are -inf, the paper's class mask), `seen` (default otherwise: class-IL over all
        classes seen so far), or `all`. Task-IL evaluation = `task_id=true task, class_mask="task"`.
        Loss = CE - pull_constraint_coeff · pull term.
        """
        features, selection = self.forward_features(pixel_values, task_id)
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
            if pull is not None and self.config.pull_constraint_coeff:
                loss = loss - self.config.pull_constraint_coeff * pull
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

                from .runner import resolve_builtin

                kwargs["image_processor"] = AutoImageProcessor.from_pretrained(
                    resolve_builtin(self.config.base_model_name_or_path), revision=self.config.revision
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
            current = parameter.data[index]
            delta = current - before
            self.project_tensor_(delta, names)
            current.copy_(before + delta)

    # ------------------------------------------------------------------ save / load
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
        save_file(self.adapter_state_dict(), str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"})
        atomic_write_text(Path(save_directory) / CONFIG_NAME, json.dumps(self._config_payload(), indent=2) + "\n")

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> str | None:
        """Write config.json, model.safetensors and README.md; never the backbone.

        Files are first written to a temporary sibling directory and then moved into place one by one
        with `os.replace`, so a failure half way leaves the previous save readable.
        """
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            super().save_pretrained(staging, **{k: v for k, v in kwargs.items() if k != "push_to_hub"})
            target.mkdir(parents=True, exist_ok=True)
            # Weights first, config last: a reader that sees the new config also sees the new weights.
            order = sorted(os.listdir(staging), key=lambda name: (name == CONFIG_NAME, name))
            for name in order:
                os.replace(staging / name, target / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if kwargs.get("push_to_hub"):
            repo_id = kwargs.get("repo_id") or target.name
            return self.push_to_hub(repo_id, model_card_kwargs=kwargs.get("model_card_kwargs"))
        return None

    def generate_model_card(self, *args: Any, **kwargs: Any):
        """The pgp_peft model card (model_cards/pgp_model_card.md) filled from the config and run results."""
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
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
        card_kwargs = dict(model_card_kwargs or {})
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
        map_location: str | torch.device = "cpu",
        attn_implementation: str | None = None,
        **config_overrides: Any,
    ) -> PGPModel:
        """Load an adapter from a local directory or a Hub repo id (safetensors only, never pickle).

        The backbone is `base_model` if given, else loaded from the recorded base model and revision.
        A backbone of another hidden size or depth raises `ValueError` naming both shapes.
        """
        source = str(pretrained_model_name_or_path)
        tokenizer = config_overrides.pop("tokenizer", None)  # CLIP adapters only

        def fetch(filename: str) -> str:
            if os.path.isdir(source):
                path = os.path.join(source, filename)
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{filename} not found in {source}: not a pgp_peft adapter directory")
                return path
            return hf_hub_download(
                repo_id=source,
                filename=filename,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
            )

        with open(fetch(CONFIG_NAME), encoding="utf-8") as handle:
            payload = json.load(handle)
        library = payload.get("library_name")
        if library != LIBRARY_NAME or "method" not in payload:
            raise ValueError(
                f"{source} is not a pgp_peft adapter: its config.json has library_name={library!r} "
                f"and keys {sorted(payload)[:12]}"
            )
        saved_signature = payload.pop("backbone", None)
        payload.update(config_overrides)
        config = PromptGradientProjectionConfig.from_dict(payload)
        if config.method == "clip" and cls is PGPModel:
            from .clip import CLIPPGPModel

            return CLIPPGPModel.from_pretrained(
                pretrained_model_name_or_path,
                base_model=base_model,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                map_location=map_location,
                attn_implementation=attn_implementation,
                tokenizer=tokenizer,
                **config_overrides,
            )
        model = cls(config, base_model=base_model, attn_implementation=attn_implementation)
        if saved_signature is not None and saved_signature != model.backbone_signature():
            raise ValueError(
                f"adapter {source} was trained on a backbone with {saved_signature}, but the backbone given has "
                f"{model.backbone_signature()}"
            )
        state = load_file(fetch(WEIGHTS_NAME), device=str(map_location))
        model.load_adapter_state_dict(state, source=source)
        model.to(map_location)
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
        self.load_state_dict(state, strict=False)


def load_base_model(config: PromptGradientProjectionConfig) -> nn.Module:
    """Load the frozen backbone named in the config, with a clear error when it cannot be had."""
    from .runner import resolve_builtin

    name, revision = resolve_builtin(config.base_model_name_or_path), config.revision
    if not name:
        raise ValueError(
            "no base model given: pass base_model=... or set config.base_model_name_or_path "
            "(e.g. 'google/vit-base-patch16-224-in21k')"
        )
    from transformers import AutoConfig, AutoModel, CLIPModel, ViTModel

    try:
        backbone_config = AutoConfig.from_pretrained(name, revision=revision)
        if backbone_config.model_type == "vit":
            return ViTModel.from_pretrained(name, revision=revision, add_pooling_layer=False)
        if backbone_config.model_type == "clip":
            return CLIPModel.from_pretrained(name, revision=revision)
        return AutoModel.from_pretrained(name, revision=revision)
    except OSError as error:
        raise OSError(
            f"could not load the base model {name!r} at revision {revision!r}: {error}\n"
            "If you are offline, load the backbone yourself and pass it: "
            "PGPModel.from_pretrained(repo, base_model=ViTModel.from_pretrained(local_dir))"
        ) from error


def get_pgp_model(
    base_model: nn.Module,
    config: PromptGradientProjectionConfig,
    num_classes: int | None = None,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PGPModel:
    """Wrap a Hugging Face vision model with a PGP adapter (like `peft.get_peft_model`).

    The base model is frozen and switched to the `pgp_*` attention implementation; nothing else in
    it changes. `num_classes` overrides `config.num_classes`.
    """
    if num_classes is not None:
        config = config.replace(num_classes=num_classes)
    if config.method == "clip":
        from .clip import CLIPPGPModel

        return CLIPPGPModel(config, base_model=base_model, attn_implementation=attn_implementation, **kwargs)
    if kwargs:
        raise TypeError(f"unexpected arguments for {config.method}: {sorted(kwargs)}")
    return PGPModel(config, base_model=base_model, attn_implementation=attn_implementation)
