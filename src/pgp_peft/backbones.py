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

A `VisionBackbone` wraps one supported model behind one interface, so method code never branches on
the model class. What differs between model families is data, in `BACKBONE_FAMILIES`: where the layers
and their attention modules are, how many special tokens precede the patches, which position embedding
prompt tokens share, whether a final LayerNorm is still to be applied, and how the image is pooled:

    family    classes                      special tokens        prompt position    final norm        pooled
    vit       ViTModel                     CLS                   CLS slot's         (applied)         CLS
    deit      DeiTModel                    CLS, distillation     CLS slot's         (applied)         CLS
    dinov2    Dinov2Model                  CLS                   CLS slot's         (applied)         CLS
    clip      CLIPModel, CLIPVisionModel   CLS                   none (reference)   post_layernorm    CLS
    siglip    SiglipVisionModel            none                  none               (applied)         patch mean

DeiT: prompts go after both special tokens, `[CLS, DIST, prompts, patches]`, so neither token moves;
the features are the CLS output and the distillation token is left to the backbone (no distillation
head: `DeiTModel`, not `DeiTForImageClassificationWithTeacher`). SigLIP has no CLS token: prompts go
first, `[prompts, patches]`, and the query and the token features are the mean of the patch outputs
(prompts excluded), the same rule for the frozen query and for the prompted features; SigLIP's own
attention-pooling head is not used (it would attend over the prompts too). SigLIP's attention does not
pass forward kwargs to the attention function (transformers 5.24), so attention prefixes (DualPrompt)
are refused on it with a `TypeError`; prompt tokens (L2P) work.

`load_backbone` loads a supported checkpoint by name (Hub id, local folder or a built-in name).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    CLIPModel,
    CLIPVisionModel,
    DeiTModel,
    Dinov2Model,
    SiglipVisionModel,
    ViTModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .config import BACKBONE_CONFIG_OVERRIDES

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


# ----------------------------------------------------------------------------- families
@dataclass(frozen=True)
class BackboneFamily:
    """What differs between supported model families (see the module docstring's table).

    vision_tower: attribute holding the vision transformer ("" = the model itself).
    layers: path from the vision tower to its list of transformer layers.
    attention: attribute of a layer holding its attention module (the one calling the attention function).
    patch_embeddings: path from the vision tower to the module embedding the patches.
    num_special_tokens: tokens before the patches (CLS, DeiT's distillation token); 0 = no CLS.
    prompt_position_embedding: path to the (1, N, D) position embedding whose CLS row prompt tokens
        share, or None (prompt tokens get no position embedding).
    final_norm: LayerNorm the model applies only to its pooled token, to be applied to every token
        here (CLIP's `post_layernorm`); None when `last_hidden_state` is already normalised.
    model_type: `config.model_type` of the checkpoints `load_backbone` loads as this family (None: not
        loadable by name; pass the model).
    load_kwargs: extra `from_pretrained` kwargs (ViT, DeiT: no pooler, the adapter does not use it).
    has_text_tower: the model also has a text tower (CLIPModel).
    passes_attention_kwargs: the model hands forward kwargs down to its attention function, which is
        how prefixes reach attention and queries are recorded (SigLIP's attention does not, in
        transformers 5.24: prefix methods refuse SigLIP with a clear error rather than run unprompted).
    """

    name: str
    model_classes: tuple[type[nn.Module], ...]
    vision_tower: str
    layers: str
    attention: str
    patch_embeddings: str
    num_special_tokens: int
    prompt_position_embedding: str | None
    final_norm: str | None
    model_type: str | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    has_text_tower: bool = False
    passes_attention_kwargs: bool = True


BACKBONE_FAMILIES: tuple[BackboneFamily, ...] = (
    BackboneFamily(
        name="vit",
        model_classes=(ViTModel,),
        vision_tower="",
        layers="layers",
        attention="attention",
        patch_embeddings="embeddings.patch_embeddings",
        num_special_tokens=1,
        prompt_position_embedding="embeddings.position_embeddings",
        final_norm=None,
        model_type="vit",
        load_kwargs={"add_pooling_layer": False},
    ),
    BackboneFamily(
        name="deit",
        model_classes=(DeiTModel,),
        vision_tower="",
        layers="layers",
        attention="attention",
        patch_embeddings="embeddings.patch_embeddings",
        num_special_tokens=2,
        prompt_position_embedding="embeddings.position_embeddings",
        final_norm=None,
        model_type="deit",
        load_kwargs={"add_pooling_layer": False},
    ),
    BackboneFamily(
        name="dinov2",
        model_classes=(Dinov2Model,),
        vision_tower="",
        layers="encoder.layer",
        attention="attention",
        patch_embeddings="embeddings.patch_embeddings",
        num_special_tokens=1,
        prompt_position_embedding="embeddings.position_embeddings",
        final_norm=None,
        model_type="dinov2",
    ),
    BackboneFamily(
        name="clip",
        model_classes=(CLIPModel,),
        vision_tower="vision_model",
        layers="encoder.layers",
        attention="self_attn",
        patch_embeddings="embeddings.patch_embedding",
        num_special_tokens=1,
        prompt_position_embedding=None,
        final_norm="post_layernorm",
        has_text_tower=True,
        model_type="clip",
    ),
    BackboneFamily(
        name="clip_vision",
        model_classes=(CLIPVisionModel,),
        vision_tower="",
        layers="encoder.layers",
        attention="self_attn",
        patch_embeddings="embeddings.patch_embedding",
        num_special_tokens=1,
        prompt_position_embedding=None,
        final_norm="post_layernorm",
        model_type="clip_vision_model",
    ),
    BackboneFamily(
        name="siglip",
        model_classes=(SiglipVisionModel,),
        vision_tower="",
        layers="encoder.layers",
        attention="self_attn",
        patch_embeddings="embeddings.patch_embedding",
        num_special_tokens=0,
        prompt_position_embedding=None,
        final_norm=None,
        passes_attention_kwargs=False,
        model_type="siglip_vision_model",
    ),
)


def backbone_family(model: nn.Module) -> BackboneFamily:
    """The family of a supported model; a `TypeError` naming the supported classes otherwise."""
    for family in BACKBONE_FAMILIES:
        if type(model) in family.model_classes:
            return family
    for family in BACKBONE_FAMILIES:  # subclasses of a supported class
        if isinstance(model, family.model_classes):
            return family
    names = ", ".join(cls.__name__ for family in BACKBONE_FAMILIES for cls in family.model_classes)
    raise TypeError(f"pgp_peft supports {names}; got {type(model).__name__}")


def family_of_model_type(model_type: str) -> BackboneFamily | None:
    """The family whose checkpoints have `config.model_type == model_type`, or None."""
    return next((family for family in BACKBONE_FAMILIES if family.model_type == model_type), None)


def _get(module: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        module = getattr(module, name)
    return module


# ----------------------------------------------------------------------------- the backbone wrapper
@dataclass
class _PromptedPass:
    prompt_tokens: torch.Tensor | None = None
    token_recorder: Callable[[torch.Tensor], None] | None = None


@dataclass
class _Recorders:
    query_recorder: QueryRecorder | None = None
    token_recorder: Callable[[torch.Tensor], None] | None = None


class VisionBackbone(nn.Module):
    """A frozen HF vision transformer with hooks for prompts, prefixes and representation recording.

    Attributes: family (`BackboneFamily`), model (the user's model), vision (its vision transformer),
    hidden_size (D), num_layers, num_heads, image_size, num_special_tokens. `forward` returns the final
    token states (B, N, D) after the final LayerNorm, N = #special tokens + #prompt tokens + #patches.
    """

    def __init__(self, model: nn.Module, attn_implementation: str | None = None) -> None:
        super().__init__()
        self.family = backbone_family(model)
        self.model = model
        vision = _get(model, self.family.vision_tower)
        self.vision = vision
        config = vision.config
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.image_size = config.image_size
        self.num_special_tokens = self.family.num_special_tokens
        self.embeddings = vision.embeddings
        for index, layer in enumerate(_get(vision, self.family.layers)):
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
        self._recorders = _Recorders()
        self._hook = self.embeddings.register_forward_hook(self._embeddings_hook)

    # The backbone stays in eval mode (frozen, no dropout) whatever mode the wrapper is put in.
    def train(self, mode: bool = True) -> VisionBackbone:
        super().train(mode)
        self.model.eval()
        return self

    def cls_position_embedding(self) -> torch.Tensor | None:
        """(D,) the position embedding prompt tokens share (the CLS slot's), or None for families
        whose prompts get none."""
        if self.family.prompt_position_embedding is None:
            return None
        return _get(self.vision, self.family.prompt_position_embedding)[0, 0]

    def _embeddings_hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        state = self._pass
        if state is None:
            return output
        if state.token_recorder is not None:
            state.token_recorder(output)
        if state.prompt_tokens is None:
            return output
        prompts = state.prompt_tokens.to(output.dtype)
        position = self.cls_position_embedding()
        if position is not None:
            prompts = prompts + position.to(output.dtype)
        start = self.num_special_tokens
        return torch.cat([output[:, :start], prompts, output[:, start:]], dim=1)

    @contextlib.contextmanager
    def _prompted(self, state: _PromptedPass) -> Iterator[None]:
        previous, self._pass = self._pass, state
        try:
            yield
        finally:
            self._pass = previous

    @contextlib.contextmanager
    def recording(
        self,
        *,
        query_recorder: QueryRecorder | None = None,
        token_recorder: Callable[[torch.Tensor], None] | None = None,
    ) -> Iterator[None]:
        """Record every prompted pass inside the block (not `query`'s frozen pass): `query_recorder(layer,
        queries (B, H, N, d))` per attention layer, `token_recorder(tokens (B, N, D))` for the embeddings
        output before prompts join it. Lets memory code record a method's own forward."""
        previous, self._recorders = self._recorders, _Recorders(query_recorder, token_recorder)
        try:
            yield
        finally:
            self._recorders = previous

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
        """pixel_values (B, C, H, W); prompt_tokens (B, Lp, D) inserted after the special tokens; prefixes
        {layer: (key (B, L, D), value (B, L, D))}. Returns token states (B, N, D) after the final
        LayerNorm (CLIP: `post_layernorm`, which CLIP applies to the pooled token, applied to all)."""
        query_recorder = query_recorder or self._recorders.query_recorder
        token_recorder = token_recorder or self._recorders.token_recorder
        has_prefix = any(key.shape[1] for key, _ in (prefixes or {}).values())
        if (has_prefix or query_recorder is not None) and not self.family.passes_attention_kwargs:
            raise TypeError(
                f"{type(self.vision).__name__} does not pass forward kwargs to its attention function, so "
                "attention prefixes (DualPrompt) and query recording cannot reach it; use a method that "
                "inserts prompt tokens (L2P) on this backbone"
            )
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

    def pool(self, hidden: torch.Tensor, num_prompt_tokens: int = 0) -> torch.Tensor:
        """(B, N, D) token states -> (B, D): the CLS output, or without a CLS token (SigLIP) the mean of
        the patch outputs (the `num_prompt_tokens` prompt outputs, which come first, excluded)."""
        if self.num_special_tokens > 0:
            return hidden[:, 0]
        return hidden[:, num_prompt_tokens:].mean(dim=1)

    @torch.no_grad()
    def query(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen pooled feature without prompts (B, D): the query for key-query selection."""
        with self.recording():
            return self.pool(self.forward(pixel_values))

    @torch.no_grad()
    def patch_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, num_patches, D) patch embeddings (no special tokens, no position embeddings)."""
        patches = _get(self.vision, self.family.patch_embeddings)(pixel_values)
        if patches.dim() == 4:  # a Conv2d patch embedding: (B, D, h, w)
            patches = patches.flatten(2).transpose(1, 2)
        return patches


def build_backbone(model: nn.Module, attn_implementation: str | None = None) -> VisionBackbone:
    """Wrap a supported HF model; raises `TypeError` naming the supported classes otherwise."""
    if isinstance(model, VisionBackbone):
        return model
    return VisionBackbone(model, attn_implementation=attn_implementation)


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


# ----------------------------------------------------------------------------- loading by name
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


def load_backbone(
    name: str | None,
    revision: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    *,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a frozen backbone of a `BACKBONE_FAMILIES` model type from a Hub id, a local folder or a
    built-in name, with `config_overrides` (only `config.BACKBONE_CONFIG_OVERRIDES`, e.g. layer_norm_eps)
    applied to its config. `trust_remote_code` is passed to transformers as given."""
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

    try:
        config = AutoConfig.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code, **(config_overrides or {})
        )
        family = family_of_model_type(config.model_type)
        if family is not None:
            return family.model_classes[0].from_pretrained(
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
        f"base model {name!r} is a {config.model_type!r} model; pgp_peft loads "
        f"{[family.model_type for family in BACKBONE_FAMILIES if family.model_type]}"
    )


def load_base_model(config, *, trust_remote_code: bool = False) -> nn.Module:
    """The backbone recorded in an adapter config: base_model_name_or_path @ revision (+ base_model_kwargs)."""
    return load_backbone(
        config.base_model_name_or_path,
        config.revision,
        config.base_model_kwargs,
        trust_remote_code=trust_remote_code,
    )
