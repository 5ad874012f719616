"""How prompts enter a frozen Hugging Face vision transformer.

Two mechanisms, both leaving the user's model untouched except where the adapter attaches:

* Prompt tokens (L2P, CLIP image prompt) through a forward hook on the embeddings module: while a
  prompted pass is active, the hook inserts the prompt tokens right after CLS, giving
  `[CLS, prompts, patches]`. In ViT, prompt tokens get position information from the CLS position
  embedding (the L2P reference gives them the CLS slot's embedding too), so no new position
  parameters are learned and the patch positions are unchanged. CLIP's image prompt gets no
  position embedding (as the CLIP-PGP reference); it then passes through CLIP's `pre_layrnorm`
  with every other token.
* Prefixes (DualPrompt) through a registered attention implementation (`pgp_sdpa` / `pgp_eager`)
  that prepends per-sample key/value prefixes in head space. Prefixes travel as forward kwargs,
  which transformers passes unchanged down to the attention function. The same attention function
  can record the queries PGP protects. The matching mask functions are registered too, otherwise
  transformers silently drops padding masks for an unknown implementation name.

A `VisionBackbone` wraps one supported model (ViTModel, DeiTModel, Dinov2Model, CLIPVisionModel, the
vision tower of CLIPModel) behind one interface, so prompt code never branches on the model class. What
differs between these families is data: one `BackboneFamily` row each in `BACKBONE_FAMILIES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface, CLIPModel, CLIPVisionModel, DeiTModel, Dinov2Model, ViTModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

PREFIX_KWARG = "pgp_prefixes"
QUERY_RECORDER_KWARG = "pgp_query_recorder"

QueryRecorder = Callable[[int, torch.Tensor], None]
Prefixes = dict[int, tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- attention functions
def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q Kᵀ · scale + mask) V. query (B, H, Nq, d), key/value (B, H, Nk, d) -> (B, Nq, H, d)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def _pad_mask_for_prefix(mask: torch.Tensor | None, prefix_length: int) -> torch.Tensor | None:
    """Extend a (B, 1, Nq, Nk) mask so every query may attend to the `prefix_length` prefix keys."""
    if mask is None or prefix_length == 0:
        return mask
    shape = (*mask.shape[:-1], prefix_length)
    if mask.dtype == torch.bool:
        allowed = torch.ones(shape, dtype=torch.bool, device=mask.device)
    else:
        allowed = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([allowed.expand(mask.shape[0], *shape[1:]), mask], dim=-1)


def _to_heads(prefix: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, H, L, D/H), heads split row-major like the projections' outputs."""
    batch, length, dim = prefix.shape
    return prefix.reshape(batch, length, num_heads, dim // num_heads).transpose(1, 2)


def _prefixed_attention(base: Callable) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        prefixes: Prefixes | None = kwargs.pop(PREFIX_KWARG, None)
        recorder: QueryRecorder | None = kwargs.pop(QUERY_RECORDER_KWARG, None)
        layer = getattr(module, "pgp_layer_index", None)
        if recorder is not None and layer is not None:
            recorder(layer, query)
        if prefixes and layer in prefixes:
            prefix_key, prefix_value = prefixes[layer]
            num_heads = query.shape[1]
            key = torch.cat([_to_heads(prefix_key, num_heads).to(key.dtype), key], dim=2)
            value = torch.cat([_to_heads(prefix_value, num_heads).to(value.dtype), value], dim=2)
            attention_mask = _pad_mask_for_prefix(attention_mask, prefix_key.shape[1])
        return base(module, query, key, value, attention_mask, **kwargs)

    return attention


PGP_ATTENTION = {
    "pgp_sdpa": ("sdpa", sdpa_attention_forward, sdpa_mask),
    "pgp_eager": ("eager", eager_attention, eager_mask),
}
for _name, (_, _fn, _mask) in PGP_ATTENTION.items():
    AttentionInterface.register(_name, _prefixed_attention(_fn))
    AttentionMaskInterface.register(_name, _mask)


# ----------------------------------------------------------------------------- backbone families
@dataclass(frozen=True)
class BackboneFamily:
    """What differs between the supported vision transformers; everything else is shared.

    Attributes:
        name: the family (`config.model_type` of the checkpoints it loads).
        model_classes: the transformers classes of the family `VisionBackbone` accepts.
        vision: model -> the vision transformer inside it (CLIPModel: `vision_model`).
        layers: vision transformer -> its transformer layers, in order.
        attention: the attribute of a layer holding the attention module that calls the attention
            function (where the layer index for prefixes and query recording is set).
        cls_position_embedding: embeddings module -> (D,) the position embedding of the CLS slot.
        prompts_take_cls_position: whether inserted prompt tokens get the CLS position embedding (ViT-style
            models, as the L2P reference) or none (CLIP, as the CLIP-PGP reference).
        final_norm: the final LayerNorm `VisionBackbone` applies to every token itself (CLIP applies its
            `post_layernorm` to the pooled token only), or None when `last_hidden_state` is already normed.
        load_class: the class a checkpoint of the family is loaded as by name (CLIP: the full CLIPModel,
            whose text tower CLIP-PGP needs).
        load_kwargs: extra `from_pretrained` kwargs for `load_class` (the pooler is not used: the adapter
            reads the final token states).
    """

    name: str
    model_classes: tuple[type[nn.Module], ...]
    vision: Callable[[nn.Module], nn.Module]
    layers: Callable[[nn.Module], nn.ModuleList]
    attention: str
    cls_position_embedding: Callable[[nn.Module], torch.Tensor]
    prompts_take_cls_position: bool
    load_class: type[nn.Module]
    final_norm: str | None = None
    load_kwargs: dict = field(default_factory=dict)


def _itself(model: nn.Module) -> nn.Module:
    return model


def _vit_cls_position(embeddings: nn.Module) -> torch.Tensor:
    return embeddings.position_embeddings[0, 0]


BACKBONE_FAMILIES: tuple[BackboneFamily, ...] = (
    BackboneFamily(
        name="vit",
        model_classes=(ViTModel,),
        load_class=ViTModel,
        vision=_itself,
        layers=lambda vision: vision.layers,
        attention="attention",
        cls_position_embedding=_vit_cls_position,
        prompts_take_cls_position=True,
        load_kwargs={"add_pooling_layer": False},
    ),
    # DeiT: [CLS, distillation token, patches]; prompts go after CLS, the distillation token stays a token
    # like the patches (its head, DeiTForImageClassificationWithTeacher's, is not part of DeiTModel).
    BackboneFamily(
        name="deit",
        model_classes=(DeiTModel,),
        load_class=DeiTModel,
        vision=_itself,
        layers=lambda vision: vision.layers,
        attention="attention",
        cls_position_embedding=_vit_cls_position,
        prompts_take_cls_position=True,
        load_kwargs={"add_pooling_layer": False},
    ),
    BackboneFamily(
        name="dinov2",
        model_classes=(Dinov2Model,),
        load_class=Dinov2Model,
        vision=_itself,
        layers=lambda vision: vision.encoder.layer,
        attention="attention",
        cls_position_embedding=_vit_cls_position,
        prompts_take_cls_position=True,
    ),
    BackboneFamily(
        name="clip",
        model_classes=(CLIPVisionModel, CLIPModel),
        load_class=CLIPModel,
        vision=lambda model: model.vision_model if isinstance(model, CLIPModel) else model,
        layers=lambda vision: vision.encoder.layers,
        attention="self_attn",
        cls_position_embedding=lambda embeddings: embeddings.position_embedding.weight[0],
        prompts_take_cls_position=False,
        final_norm="post_layernorm",
    ),
)
SUPPORTED_MODELS: tuple[type[nn.Module], ...] = tuple(
    cls for family in BACKBONE_FAMILIES for cls in family.model_classes
)


def backbone_family(model: nn.Module) -> BackboneFamily:
    """The family of `model`; `TypeError` naming the supported classes otherwise."""
    for family in BACKBONE_FAMILIES:
        if isinstance(model, family.model_classes):
            return family
    names = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
    raise TypeError(f"pgp_peft supports {names}; got {type(model).__name__}")


def family_of_model_type(model_type: str) -> BackboneFamily | None:
    """The family whose checkpoints have `config.model_type == model_type`, or None."""
    return next((family for family in BACKBONE_FAMILIES if family.name == model_type), None)


# ----------------------------------------------------------------------------- the backbone wrapper
@dataclass
class _PromptedPass:
    prompt_tokens: torch.Tensor | None = None
    token_recorder: Callable[[torch.Tensor], None] | None = None


class VisionBackbone(nn.Module):
    """A frozen HF vision transformer with hooks for prompts, prefixes and representation recording.

    Attributes: hidden_size (D), num_layers, num_heads, image_size. `forward` returns the final
    token states (B, N, D) after the final LayerNorm, N = 1 + #prompt tokens + #patches.
    """

    def __init__(self, model: nn.Module, attn_implementation: str | None = None) -> None:
        super().__init__()
        self.family = backbone_family(model)
        self.model = model
        vision = self.family.vision(model)
        self.vision = vision
        config = vision.config
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.image_size = config.image_size
        self.embeddings = vision.embeddings
        for index, layer in enumerate(self.family.layers(vision)):
            getattr(layer, self.family.attention).pgp_layer_index = index

        current = config._attn_implementation or "sdpa"
        if attn_implementation is None:
            attn_implementation = "pgp_eager" if current in ("eager", "pgp_eager") else "pgp_sdpa"
        if attn_implementation not in PGP_ATTENTION:
            raise ValueError(
                f"attn_implementation must be one of {list(PGP_ATTENTION)}, got {attn_implementation!r}"
            )
        # set_attn_implementation mutates the config in place: only the vision tower's own config.
        vision.set_attn_implementation(attn_implementation)
        self.attn_implementation = attn_implementation

        self.model.requires_grad_(False)
        self.model.eval()
        self._pass: _PromptedPass | None = None
        self._hook = self.embeddings.register_forward_hook(self._embeddings_hook)

    # The backbone stays in eval mode (frozen, no dropout) whatever mode the wrapper is put in.
    def train(self, mode: bool = True) -> VisionBackbone:
        super().train(mode)
        self.model.eval()
        return self

    def cls_position_embedding(self) -> torch.Tensor:
        """(D,) the position embedding of the CLS slot (which prompt tokens share in ViT-style models)."""
        return self.family.cls_position_embedding(self.embeddings)

    def _embeddings_hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        state = self._pass
        if state is None:
            return output
        if state.token_recorder is not None:
            state.token_recorder(output)
        if state.prompt_tokens is None:
            return output
        prompts = state.prompt_tokens.to(output.dtype)
        if self.family.prompts_take_cls_position:
            prompts = prompts + self.cls_position_embedding().to(output.dtype)
        return torch.cat([output[:, :1], prompts, output[:, 1:]], dim=1)

    @contextlib.contextmanager
    def _prompted(self, state: _PromptedPass) -> Iterator[None]:
        previous, self._pass = self._pass, state
        try:
            yield
        finally:
            self._pass = previous

    def forward(
        self,
        pixel_values: torch.Tensor,
        *,
        prompt_tokens: torch.Tensor | None = None,
        prefixes: Prefixes | None = None,
        query_recorder: QueryRecorder | None = None,
        token_recorder: Callable[[torch.Tensor], None] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """pixel_values (B, C, H, W); prompt_tokens (B, Lp, D) inserted after CLS; prefixes
        {layer: (key (B, L, D), value (B, L, D))}. Returns token states (B, N, D) after the final
        LayerNorm (CLIP: `post_layernorm`, which CLIP applies to the pooled token, applied to all; see
        `BackboneFamily.final_norm`)."""
        kwargs = {}
        if prefixes:
            kwargs[PREFIX_KWARG] = prefixes
        if query_recorder is not None:
            kwargs[QUERY_RECORDER_KWARG] = query_recorder
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        state = _PromptedPass(prompt_tokens=prompt_tokens, token_recorder=token_recorder)
        with self._prompted(state):
            outputs = self.vision(pixel_values=pixel_values, **kwargs)
        hidden = outputs.last_hidden_state
        if self.family.final_norm is not None:
            hidden = getattr(self.vision, self.family.final_norm)(hidden)
        return hidden

    @torch.no_grad()
    def query(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen CLS feature without prompts (B, D): the query for key-query selection."""
        return self.forward(pixel_values)[:, 0]

    def project_image_features(self, cls_states: torch.Tensor) -> torch.Tensor:
        """CLIP only: (B, D) post-LayerNorm CLS states -> (B, projection_dim) image embeddings."""
        if not isinstance(self.model, CLIPModel):
            raise TypeError("image projection needs a full CLIPModel (with visual_projection)")
        return self.model.visual_projection(cls_states)


def build_backbone(model: nn.Module, attn_implementation: str | None = None) -> VisionBackbone:
    """Wrap a supported HF model; raises `TypeError` naming the supported classes otherwise."""
    if isinstance(model, VisionBackbone):
        return model
    return VisionBackbone(model, attn_implementation=attn_implementation)
