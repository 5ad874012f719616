"""LoRA-PGP: null-space gradient projection for stock `peft` LoRA adapters on a frozen ViT / CLIP vision tower.

The adapter is created by `peft` itself (`LoraConfig` + `inject_adapter_in_model`), so every adapted linear
is a `peft.tuners.lora.Linear` computing

    y = W0 x + s * B A x,        A = lora_A.weight (r, d_in),  B = lora_B.weight (d_out, r),  s = alpha / r.

What PGP protects, per adapted linear at path `p` (relative to the model passed in, e.g.
`layers.3.attention.v_proj`):

    space "p.lora_A"  (dim d_in): rows = the layer's inputs x of the memory samples (every token);
    space "p.lora_B"  (dim r):    rows = z = A x, the same inputs after the (current) down-projection.

Both bases U (d_in x k_A) and V (r x k_B) are grown with the same energy rule as the prompt spaces
(`projection.feature_basis_update`), and the gradients are projected on their last axis with the same
`g <- g - g U U^T` as prompts: grad_A <- grad_A (I - U U^T), grad_B <- grad_B (I - V V^T).

The guarantee. Let the old task's inputs x lie in span(U), and let every later change of A and B be
projected (exactly so for SGD; for Adam-type optimizers with `project_update=True`):

1. Every row of ΔA is orthogonal to span(U), so ΔA x = 0: the down-projection of old inputs does not
   move, z = (A + ΔA) x = A x. In particular the product term ΔB ΔA x vanishes.
2. Hence Δ(BA) x = (B + ΔB)(A + ΔA) x - B A x = ΔB A x = ΔB z.
3. Every row of ΔB is orthogonal to span(V), so ΔB z = 0 exactly when z = A x lies in span(V).

So Δy = s Δ(BA) x = 0 for x in span(U) with A x in span(V). Step 1 also keeps condition 3 true over
the whole task sequence: V was built from z = A x at the end of the old task, and A x is frozen from
then on for x in span(U). The approximation is only the energy threshold: U and V keep a share eps of
the rows' energy, so the drift of an old input is bounded by its energy outside span(U) (through ΔA)
and the energy of its z outside span(V) (through ΔB). Since z lives in only r dimensions and a task
has many more token rows than r, V typically captures most of R^r after the first task; B then barely
moves and later tasks learn through A in the null space of U (measured in benchmarks/bench_lora.py).

The paper has no LoRA variant of its sample-space ("reference") memory, so `projection_space` must be
`"feature"`.

Saving: model.safetensors holds the LoRA matrices as `lora.<path>.lora_A.weight` / `lora.<path>.lora_B.weight`
next to the head, the bases and the class map (what `PGPModel.from_pretrained` and checkpoint resume load,
strictly); `save_extra` adds the same weights as `adapter_config.json` + `adapter_model.safetensors` in
the exact layout `peft.PeftModel.save_pretrained` uses, so `PeftModel.from_pretrained(base_model, folder)`
loads them (merge and serve them anywhere peft runs). The backbone passed in is modified in place (LoRA
layers injected), as peft does; a backbone that already carries peft adapters is refused.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import CONFIG_NAME as PEFT_CONFIG_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as PEFT_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from ..backbones import VisionBackbone
from ..config import PromptGradientProjectionConfig, check_int, check_types, fail
from ..fileio import atomic_write_text
from .base import MethodCard, MethodOutput, PGPMethod, ProtectedSlice

ADAPTER_NAME = "default"
# The prefix PeftModel puts in front of every key (PeftModel.base_model = LoraModel, LoraModel.model = ours).
PEFT_KEY_PREFIX = "base_model.model."
SPACE_A, SPACE_B = "lora_A", "lora_B"


@dataclass
class LoraPGPConfig(PromptGradientProjectionConfig):
    """LoRA-PGP (`method="lora"`); defaults: InfLoRA's LoRA setting (Liang & Li, CVPR 2024).

    r: LoRA rank (InfLoRA: 10).
    lora_alpha: scaling numerator; the update is scaled by lora_alpha / r (InfLoRA has no scaling, i.e.
        lora_alpha = r).
    target_modules: names of the linears to adapt, matched as peft matches them (the last path
        component). On transformers 5.x ViT: `q_proj`, `k_proj`, `v_proj`, `o_proj`, `fc1`, `fc2`; on CLIP
        only the vision tower's are adapted. InfLoRA adapts keys and values.

    lora_b_threshold: energy threshold of the `B` spaces (the down-projections z = A x, dimension r);
        None = `prompt_threshold`, which the `A` spaces (the layer inputs) always use. The `B` spaces fill up
        within a few tasks at high thresholds (z has only r dimensions), freezing `B`; a lower value here
        keeps `B` learning.

    `projection_space` must be `"feature"`.
    """

    method: str = "lora"
    r: int = 10
    lora_alpha: float = 10.0
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj"])
    lora_b_threshold: float | None = None

    def check_field_types(self) -> None:
        super().check_field_types()
        check_types(self, numbers=("lora_alpha",))
        targets = self.target_modules
        if (
            not isinstance(targets, (list, tuple))
            or not targets
            or not all(isinstance(name, str) and name for name in targets)
        ):
            fail(
                "target_modules",
                f"a non-empty list of linear-layer names (e.g. ['k_proj', 'v_proj']), got {targets!r}",
            )
        self.target_modules = list(targets)

    def validate(self, num_hidden_layers: int | None = None) -> None:
        super().validate(num_hidden_layers)
        check_int(self, "r", minimum=1)
        if self.lora_alpha <= 0:
            fail("lora_alpha", f"must be > 0, got {self.lora_alpha!r}")
        value = self.lora_b_threshold
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0
        ):
            fail("lora_b_threshold", f"threshold must lie in (0, 1] or be null, got {value!r}")
        if self.projection_space != "feature":
            fail(
                "projection_space",
                f"LoRA-PGP supports 'feature' only, got {self.projection_space!r}: the paper's sample-space "
                "('reference') memory is defined for prompts, and the authors released no LoRA reference to "
                "reproduce. Set projection_space='feature'.",
            )


def vision_tower_prefix(model: nn.Module, vision: nn.Module) -> str:
    """The module path of the vision transformer `vision` inside `model` ("" when it is the model)."""
    for path, module in model.named_modules():
        if module is vision:
            return path
    raise ValueError(f"the vision tower is not a submodule of the {type(model).__name__} given")


def lora_peft_config(config: LoraPGPConfig, vision_prefix: str = "") -> LoraConfig:
    """The `peft.LoraConfig` of a LoRA-PGP adapter.

    When the vision transformer is a submodule (`vision_prefix`, e.g. "vision_model" of a full
    CLIPModel), the targets are restricted to it with a regular expression (peft full-matches a string
    `target_modules` against module paths), so the text tower is untouched both here and when peft itself
    loads the saved adapter.
    """
    targets: list[str] | str = sorted(set(config.target_modules))
    if vision_prefix:
        names = "|".join(re.escape(name) for name in targets)
        targets = rf"{re.escape(vision_prefix)}\..*\.({names})"
    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,  # the frozen backbone runs in eval mode: dropout would never be active
        bias="none",
        init_lora_weights=True,  # A Kaiming-uniform, B = 0: the adapted model starts as the backbone
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
    )


class LoraPGPMethod(PGPMethod):
    """LoRA adapters injected by peft into the frozen backbone, with the PGP spaces of every adapted linear.

    The LoRA parameters are owned by the peft layers inside `backbone.model`; this module keeps plain
    (unregistered) references to them. `adapter_tensors` names them `lora.<path>.lora_A.weight` /
    `lora.<path>.lora_B.weight` in model.safetensors (what pgp_peft loads, strictly, also on resume);
    `save_extra` writes the same weights in peft's layout next to it.
    """

    name = "lora"
    card = MethodCard(
        name="LoRA",
        contents=(
            "the LoRA matrices A and B of every adapted linear and the classification head; the LoRA weights "
            "also as a peft adapter (adapter_config.json + adapter_model.safetensors, loadable with "
            "peft.PeftModel.from_pretrained)"
        ),
        settings=("r", "lora_alpha", "target_modules", "lora_b_threshold"),
        tags=("lora", "peft"),
        selection_text=(
            "not applicable: LoRA adapts the backbone's linears, every image passes through the same adapted "
            "layers (no prompt pool)."
        ),
    )

    def __init__(self, config: LoraPGPConfig, backbone: VisionBackbone) -> None:
        super().__init__(config, backbone)
        model = backbone.model
        if getattr(model, "peft_config", None):
            raise ValueError(
                "the backbone already carries peft adapters; pass a plain transformers model (LoRA-PGP "
                "injects its own adapter)"
            )
        self.vision_prefix = vision_tower_prefix(model, backbone.vision)
        self.peft_config = lora_peft_config(config, self.vision_prefix)
        try:
            inject_adapter_in_model(self.peft_config, model, adapter_name=ADAPTER_NAME)
        except ValueError as error:
            linear_names = sorted(
                {
                    path.rsplit(".", 1)[-1]
                    for path, module in backbone.vision.named_modules()
                    if isinstance(module, nn.Linear)
                }
            )
            fail(
                "target_modules",
                f"{config.target_modules!r}: peft could not adapt them ({error}). Linear layers of this "
                f"{type(backbone.vision).__name__}: {linear_names}",
            )
        self._layers: dict[str, LoraLayer] = {
            path: module for path, module in model.named_modules() if isinstance(module, LoraLayer)
        }
        for layer in self._layers.values():
            # The adapter trains in float32 whatever the backbone's dtype (peft casts x to A's dtype).
            for parameter in (layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight):
                parameter.data = parameter.data.float()
                parameter.requires_grad_(True)

    # ------------------------------------------------------------------ structure
    @property
    def layer_paths(self) -> list[str]:
        """Paths of the adapted linears inside the backbone model, in module order."""
        return list(self._layers)

    def lora_weights(self, path: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(A (r, d_in), B (d_out, r)) of the adapted linear at `path`."""
        layer = self._layers[path]
        return layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight

    def scaling(self, path: str) -> float:
        """s = lora_alpha / r of the adapted linear at `path`."""
        return float(self._layers[path].scaling[ADAPTER_NAME])

    def protected_spaces(self) -> dict[str, int]:
        """ "<path>.lora_A" -> d_in and "<path>.lora_B" -> r for every adapted linear."""
        spaces: dict[str, int] = {}
        for path in self._layers:
            a, _ = self.lora_weights(path)
            spaces[f"{path}.{SPACE_A}"] = a.shape[1]
            spaces[f"{path}.{SPACE_B}"] = a.shape[0]
        return spaces

    def threshold(self, space: str) -> float:
        """ε of a space: `lora_b_threshold` (if set) for the `B` spaces, `prompt_threshold` otherwise."""
        if space.endswith(f".{SPACE_B}") and self.config.lora_b_threshold is not None:
            return float(self.config.lora_b_threshold)
        return float(self.config.prompt_threshold)

    def protected_slices(self) -> list[ProtectedSlice]:
        """(lora_A.weight (r, d_in), (), [A space]) and (lora_B.weight (d_out, r), (), [B space]) per
        adapted linear: the projection acts on the last axis, g <- g - g U Uᵀ."""
        out: list[ProtectedSlice] = []
        for path in self._layers:
            a, b = self.lora_weights(path)
            out.append(ProtectedSlice(a, (), [f"{path}.{SPACE_A}"]))
            out.append(ProtectedSlice(b, (), [f"{path}.{SPACE_B}"]))
        return out

    # ------------------------------------------------------------------ forward
    def features(self, pixel_values, task_id=None, *, query=None, use_task_slot=None) -> MethodOutput:
        """pixel_values (B, C, H, W) -> the adapted backbone's pooled (CLS) features (B, D); no selection."""
        return MethodOutput(self.backbone.pool(self.backbone(pixel_values)))

    # ------------------------------------------------------------------ memory rows
    @contextlib.contextmanager
    def record_inputs(self) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block, every forward pass stores each adapted linear's input x (..., d_in) by path."""
        recorded: dict[str, torch.Tensor] = {}
        handles = []
        for path, layer in self._layers.items():

            def hook(module, args, path=path):
                recorded[path] = args[0].detach()

            handles.append(layer.register_forward_pre_hook(hook))
        try:
            yield recorded
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def rows_from_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{path: x (..., d_in)} -> {"<path>.lora_A": x rows (n, d_in), "<path>.lora_B": z = A x rows (n, r)}."""
        rows: dict[str, torch.Tensor] = {}
        for path, x in inputs.items():
            a, _ = self.lora_weights(path)
            x = x.reshape(-1, a.shape[1]).to(a.dtype)
            rows[f"{path}.{SPACE_A}"] = x
            rows[f"{path}.{SPACE_B}"] = x @ a.detach().T
        return rows

    @torch.no_grad()
    def memory_rows(self, pixel_values: torch.Tensor, task_id: int) -> dict[str, torch.Tensor]:
        """Feature-mode rows of one batch of memory samples: every token's input to every adapted linear
        (space "<path>.lora_A", (B·N, d_in)) and its down-projection z = A x ("<path>.lora_B", (B·N, r)).

        Memory: the rows of one batch for every adapted linear are held at once (B·N·d_in floats per
        linear; linears sharing an input share the tensor), so choose the memory batch size accordingly.
        """
        with self.record_inputs() as inputs:
            self.backbone(pixel_values)
        missing = [path for path in self._layers if path not in inputs]
        if missing:
            raise RuntimeError(f"adapted layers {missing} were not called by the backbone's forward pass")
        return self.rows_from_inputs(inputs)

    # ------------------------------------------------------------------ persistence
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The live LoRA parameters, saved as `lora.<path>.lora_A.weight` / `lora.<path>.lora_B.weight`."""
        tensors: dict[str, torch.Tensor] = {}
        for path in self._layers:
            a, b = self.lora_weights(path)
            tensors[f"lora.{path}.lora_A.weight"] = a
            tensors[f"lora.{path}.lora_B.weight"] = b
        return tensors

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights keyed as in a peft adapter file ("base_model.model.<path>.lora_A.weight")."""
        state = get_peft_model_state_dict(self.backbone.model, adapter_name=ADAPTER_NAME)
        return {PEFT_KEY_PREFIX + key: tensor.detach().contiguous().clone() for key, tensor in state.items()}

    def save_extra(self, directory: Path) -> None:
        """Write the LoRA weights in peft's layout (`adapter_config.json` + `adapter_model.safetensors`, as
        `PeftModel.save_pretrained` does), for `peft.PeftModel.from_pretrained(base_model, directory)`."""
        directory = Path(directory)
        save_file(self.lora_state_dict(), str(directory / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        payload = self.peft_config.to_dict()
        # peft writes target_modules sets as sorted lists; keep the JSON deterministic the same way.
        if isinstance(payload.get("target_modules"), set):
            payload["target_modules"] = sorted(payload["target_modules"])
        payload["peft_type"] = str(self.peft_config.peft_type.value)
        atomic_write_text(directory / PEFT_CONFIG_NAME, json.dumps(payload, indent=2, sort_keys=True) + "\n")
