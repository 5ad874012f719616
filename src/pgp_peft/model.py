"""`PGPModel`: the trainable continual state (prompts, keys, head, projection bases) on a frozen backbone.

Mirrors PEFT: `get_pgp_model(base_model, config)` wraps a Hugging Face model, `save_pretrained`
writes only the adapter (config.json + model.safetensors + README.md, never the backbone), and
`PGPModel.from_pretrained(dir_or_repo)` rebuilds the backbone from `base_model_name_or_path` @
`revision` unless one is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .backbones import VisionBackbone, build_backbone
from .cards import BASE_TAGS, LIBRARY_NAME
from .config import PromptGradientProjectionConfig
from .hub import AdapterHubMixin, load_base_model
from .projection import NullSpaceMemory, check_reference_memory_size, project_update_
from .prompts import ImagePrompt, L2PPromptPool, PrefixPromptPool, PromptSelection


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
    AdapterHubMixin,
    library_name=LIBRARY_NAME,
    tags=list(BASE_TAGS),
    repo_url="https://github.com/JingyangQiao/prompt-gradient-projection",
    paper_url="https://openreview.net/forum?id=EH2O3h7sBI",
):
    """Prompt pools + classifier + null-space memory around a frozen `ViTModel` / CLIP vision tower.

    Args:
        config: the adapter configuration.
        base_model: the backbone (`backbones.SUPPORTED_MODELS`: ViTModel, DeiTModel, Dinov2Model,
            CLIPVisionModel, CLIPModel). If None it is loaded from `config.base_model_name_or_path` at
            `config.revision`.
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
        if config.method == "clip" and self.backbone.family.name != "clip":
            raise TypeError("method='clip' needs a CLIPModel backbone")
        if config.method != "clip" and config.num_classes is None:
            raise ValueError(
                "PromptGradientProjectionConfig.num_classes: required for L2P and DualPrompt heads"
            )
        if config.projection_space == "reference":
            try:
                check_reference_memory_size(config.memory_samples or 0, self.backbone.hidden_size)
            except ValueError as error:
                raise ValueError(f"PromptGradientProjectionConfig.memory_samples: {error}") from None
        config = config.replace()  # the model owns its config; the caller's object is left as it was
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
        if self.head is not None:
            init_head_(self.head)
        # class_task[c] = the task that introduced class c (-1: not seen yet). Drives class masks.
        self.register_buffer("class_task", torch.full((self.num_classes,), -1, dtype=torch.long))
        self.memory = NullSpaceMemory(self.protected_spaces())
        # The adapter lives where the backbone lives; its parameters stay float32 (mixed precision
        # casts activations, and the projection needs fp32 bases).
        backbone_parameter = next(self.backbone.model.parameters(), None)
        if backbone_parameter is not None and backbone_parameter.device.type != "cpu":
            for module in (self.prompt_pool, self.prefix_pool, self.image_prompt, self.head, self.memory):
                if module is not None:
                    module.to(backbone_parameter.device)
            self.class_task = self.class_task.to(backbone_parameter.device)
        if config.inference_mode:
            self.requires_grad_(False)  # as PEFT: a loaded adapter for inference is frozen

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
        if isinstance(task_id, torch.Tensor):
            task = task_id.to(device).reshape(-1).expand(batch)
            # Checked on the host: reading back a device tensor would stall the device every step
            # (the ContinualTrainer passes the task as an int; a CPU tensor costs nothing either).
            last = int((task_id if task_id.device.type == "cpu" else task).max())
        else:
            last = int(task_id)
            task = torch.full((batch,), last, dtype=torch.long, device=device)
        if (last + 1) * top_k > self.config.pool_size:
            return None  # docs/RECIPES.md: with 20 tasks and a pool of 10, later tasks select by key
        return task.unsqueeze(1) * top_k + torch.arange(top_k, device=device)

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        task_id: int | torch.Tensor | None = None,
        *,
        query_recorder=None,
        token_recorder=None,
        use_task_slot: bool | None = None,
        query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PromptSelection | None]:
        """Prompted pass. pixel_values (B, C, H, W) -> (features (B, D), selection or None).

        `use_task_slot` forces (True) or forbids (False) the prompt mask; default: in training only.
        `query` (B, D): the frozen query `self.backbone.query(pixel_values)` computed earlier (e.g. by
        the ContinualTrainer's query cache); it is the same for an image as long as the backbone is
        frozen and the image is not re-augmented, so passing it skips the frozen query pass. None:
        computed here. CLIP has no query pass and refuses one."""
        batch = pixel_values.shape[0]
        selection = None
        if self.config.method == "clip":
            if query is not None:
                raise ValueError("method='clip' selects no prompts by key: it takes no query")
            hidden = self.backbone(
                pixel_values,
                prompt_tokens=self.image_prompt.tokens(batch),
                query_recorder=query_recorder,
                token_recorder=token_recorder,
            )
            return hidden[:, 0], None
        if query is None:
            query = self.backbone.query(pixel_values)
        elif query.shape != (batch, self.backbone.hidden_size):
            raise ValueError(
                f"query must be (batch, hidden_size) = {(batch, self.backbone.hidden_size)}, "
                f"got {tuple(query.shape)}"
            )
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

    def compile_backbone(self, **compile_kwargs: Any) -> None:
        """`torch.compile` the frozen transformer in place (`nn.Module.compile`); prompts, prefixes and
        the head stay eager. The first passes of every new input shape compile (tens of seconds on a
        CPU); see benchmarks/README.md §5 for when it pays off."""
        self.backbone.vision.compile(**compile_kwargs)

    def compute_logits(self, features: torch.Tensor, task_id=None) -> torch.Tensor:
        """features (B, D) -> logits (B, C). CLIP's subclass logic lives in `clip.py`."""
        return self.head(features.to(self.head.weight.dtype))

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        task_id: int | torch.Tensor | None = None,
        class_mask: str | None = None,
        query: torch.Tensor | None = None,
    ) -> PGPOutput:
        """pixel_values (B, C, H, W), labels (B,) class-order ids, task_id (int or (B,)), query (B, D)
        an optional precomputed frozen query (see `forward_features`).

        class_mask: `task` (default while training with a task id: logits outside the task's
        classes are -inf, the paper's class mask), `seen` (default otherwise: class-IL over all
        classes seen so far), or `all`. Task-IL evaluation = `task_id=true task, class_mask="task"`.
        Loss = CE - pull_constraint_coeff · pull term.
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

                from .hub import resolve_builtin

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


def init_head_(head: nn.Linear) -> nn.Linear:
    """The classifier head as timm's ViT head, which the reference trains: weight trunc-normal
    (std 0.02), bias zero. (`nn.Linear`'s default, U(±1/√D) weights and bias, starts the classes off
    unequal; on the reference side-by-side it cost about 7 class-IL points for L2P-PGP.)"""
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    return head


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

    The prompts, keys, head (and CLIP's text contexts) are drawn from torch's global RNG, as every
    `transformers` / `peft` model is: call `transformers.set_seed(seed)` *before* this function for
    a reproducible run (`ContinualTrainer` seeds each task itself, but not the initialisation).
    """
    if num_classes is not None:
        config = config.replace(num_classes=num_classes)
    if config.method == "clip":
        from .clip import CLIPPGPModel

        return CLIPPGPModel(config, base_model=base_model, attn_implementation=attn_implementation, **kwargs)
    if kwargs:
        raise TypeError(f"unexpected arguments for {config.method}: {sorted(kwargs)}")
    return PGPModel(config, base_model=base_model, attn_implementation=attn_implementation)
