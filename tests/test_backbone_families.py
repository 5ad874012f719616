"""Every backbone family of `backbones.BACKBONE_FAMILIES` through the same identity and prefix checks,
on tiny random models (2 layers, 32 wide, 16x16 images of 4x4 patches)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from pgp_peft import PGPModel, PromptGradientProjectionConfig
from pgp_peft.backbones import BACKBONE_FAMILIES, VisionBackbone, backbone_family

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)
NUM_PATCHES = 16


def make_model(family: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A tiny random model of `family` in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if family == "vit":
        return ViTModel(
            ViTConfig(**SHAPE, intermediate_size=64, attn_implementation=attn), add_pooling_layer=False
        )
    if family == "deit":
        return DeiTModel(
            DeiTConfig(**SHAPE, intermediate_size=64, attn_implementation=attn), add_pooling_layer=False
        )
    if family == "dinov2":
        return Dinov2Model(Dinov2Config(**SHAPE, mlp_ratio=2, attn_implementation=attn)).eval()
    if family == "siglip":
        return SiglipVisionModel(
            SiglipVisionConfig(**SHAPE, intermediate_size=64, attn_implementation=attn)
        ).eval()
    if family == "clip_vision":
        return CLIPVisionModel(
            CLIPVisionConfig(**SHAPE, intermediate_size=64, attn_implementation=attn)
        ).eval()
    if family == "clip":
        config = CLIPConfig(
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
            ),
            vision_config=dict(**SHAPE, intermediate_size=64),
            projection_dim=16,
        )
        config.vision_config._attn_implementation = attn
        return CLIPModel(config).eval()
    raise ValueError(family)


FAMILIES = [family.name for family in BACKBONE_FAMILIES]


def plain_hidden(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The untouched model's final token states, with the family's final norm applied to all tokens."""
    family = backbone_family(model)
    vision = getattr(model, family.vision_tower) if family.vision_tower else model
    hidden = vision(pixel_values=pixel_values).last_hidden_state
    return getattr(vision, family.final_norm)(hidden) if family.final_norm else hidden


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def test_every_family_is_tested():
    assert sorted(FAMILIES) == sorted(["vit", "deit", "dinov2", "clip", "clip_vision", "siglip"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl, plain", [("pgp_sdpa", "sdpa"), ("pgp_eager", "eager")])
def test_no_prompts_is_bitwise_the_plain_model(family, impl, plain, pixel_values):
    backbone = VisionBackbone(make_model(family), attn_implementation=impl)
    reference = make_model(family, attn=plain)
    assert backbone.family.name == family
    batch = pixel_values.shape[0]
    empty = torch.zeros(batch, 0, 32)
    with torch.no_grad():
        expected = plain_hidden(reference, pixel_values)
        assert expected.shape[1] == backbone.num_special_tokens + NUM_PATCHES
        assert torch.equal(backbone(pixel_values), expected)
        assert torch.equal(backbone(pixel_values, prompt_tokens=empty), expected)
        assert torch.equal(backbone(pixel_values, prefixes={0: (empty, empty), 1: (empty, empty)}), expected)
        pooled = expected[:, 0] if backbone.num_special_tokens else expected.mean(dim=1)
        assert torch.equal(backbone.query(pixel_values), pooled)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tokens_go_after_the_special_tokens(family, pixel_values):
    backbone = VisionBackbone(make_model(family))
    seen: list[torch.Tensor] = []
    backbone.embeddings.register_forward_hook(lambda module, args, output: seen.append(output))
    prompts = torch.randn(pixel_values.shape[0], 3, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        backbone(pixel_values)
        hidden = backbone(pixel_values, prompt_tokens=prompts)
    plain, prompted = seen
    start = backbone.num_special_tokens
    position = backbone.cls_position_embedding()
    expected_prompts = prompts if position is None else prompts + position
    assert torch.equal(prompted[:, :start], plain[:, :start])
    assert torch.equal(prompted[:, start : start + 3], expected_prompts)
    assert torch.equal(prompted[:, start + 3 :], plain[:, start:])
    assert hidden.shape[1] == start + 3 + NUM_PATCHES
    assert backbone.patch_embeddings(pixel_values).shape == (pixel_values.shape[0], NUM_PATCHES, 32)


PREFIX_FAMILIES = [family.name for family in BACKBONE_FAMILIES if family.passes_attention_kwargs]


def test_prefixes_on_a_family_that_cannot_take_them_raise(pixel_values):
    backbone = VisionBackbone(make_model("siglip"))
    empty = torch.zeros(3, 0, 32)
    prefixes = {0: (torch.ones(3, 2, 32), torch.ones(3, 2, 32))}
    with pytest.raises(TypeError, match="does not pass forward kwargs"):
        backbone(pixel_values, prefixes=prefixes)
    assert torch.equal(backbone(pixel_values, prefixes={0: (empty, empty)}), backbone(pixel_values))
    config = PromptGradientProjectionConfig.dualprompt(
        num_classes=4, g_prompt_layers=[0], e_prompt_layers=[1]
    )
    with pytest.raises(TypeError, match="use L2P"):
        PGPModel(config, base_model=make_model("siglip"))


@pytest.mark.parametrize("family", PREFIX_FAMILIES)
def test_sdpa_and_eager_prefixes_agree_and_act(family, pixel_values):
    sdpa = VisionBackbone(make_model(family), attn_implementation="pgp_sdpa")
    eager = VisionBackbone(make_model(family), attn_implementation="pgp_eager")
    generator = torch.Generator().manual_seed(3)
    prefixes = {
        layer: (torch.randn(3, 2, 32, generator=generator), torch.randn(3, 2, 32, generator=generator))
        for layer in (0, 1)
    }
    queries: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        plain = sdpa(pixel_values)
        with sdpa.recording(query_recorder=lambda layer, query: queries.setdefault(layer, query)):
            out_sdpa = sdpa(pixel_values, prefixes=prefixes)
        out_eager = eager(pixel_values, prefixes=prefixes)
    assert (out_sdpa - plain).abs().max() > 1e-2
    assert (out_sdpa - out_eager).abs().max() < 1e-5
    assert sorted(queries) == [0, 1] and queries[0].shape == (3, 4, plain.shape[1], 8)


@pytest.mark.parametrize(
    "family, method",
    [(name, "l2p") for name in FAMILIES if name != "clip"]
    + [(name, "dualprompt") for name in PREFIX_FAMILIES if name != "clip"],
)
def test_prompt_methods_run_and_a_batch_equals_each_sample_alone(family, method, pixel_values):
    presets = {
        "l2p": dict(pool_size=4, top_k=2, prompt_length=2),
        "dualprompt": dict(
            pool_size=3, g_prompt_layers=[0], e_prompt_layers=[1], g_prompt_length=2, e_prompt_length=2
        ),
    }
    config = getattr(PromptGradientProjectionConfig, method)(num_classes=4, **presets[method])
    torch.manual_seed(0)
    model = PGPModel(config, base_model=make_model(family)).eval()
    with torch.no_grad():
        batch = model(pixel_values).logits
        alone = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(pixel_values.shape[0])])
    assert batch.shape == (3, 4)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["deit", "dinov2", "siglip"])
def test_new_families_train_reload_and_load_by_name(pixel_values, family, tmp_path):
    from pgp_peft.backbones import load_backbone

    source = tmp_path / f"tiny-{family}"
    make_model(family).save_pretrained(source)
    configs = [PromptGradientProjectionConfig.l2p(num_classes=6, pool_size=4, top_k=2, prompt_length=3)]
    if backbone_family(make_model(family)).passes_attention_kwargs:
        configs.append(
            PromptGradientProjectionConfig.dualprompt(
                num_classes=6, pool_size=4, g_prompt_layers=[0], e_prompt_layers=[1], g_prompt_length=2
            )
        )
    for config in configs:
        model = PGPModel(config, base_model=load_backbone(str(source)))
        assert type(model.backbone.model) is type(make_model(family))
        assert not any("pooler" in name for name, _ in model.backbone.model.named_parameters())
        model.train()
        model(pixel_values, labels=torch.tensor([0, 1, 0]), task_id=0).loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        model.eval()
        model.save_pretrained(tmp_path / config.method)
        loaded = PGPModel.from_pretrained(tmp_path / config.method)  # backbone rebuilt from the recorded path
        with torch.no_grad():
            assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_every_family_starts_as_the_backbone_and_fills_its_spaces(family, pixel_values):
    """LoRA-PGP: peft adapts every family's vision-tower k_proj / v_proj; B = 0 at init, so the features
    are the plain backbone's; every adapted layer's A and B spaces get a basis from the memory rows."""
    from pgp_peft.memory import update_memory

    plain = VisionBackbone(make_model(family))
    with torch.no_grad():
        expected = plain.pool(plain(pixel_values))
    model = PGPModel(PromptGradientProjectionConfig.lora(num_classes=4, r=2), base_model=make_model(family))
    assert len(model.method.layer_paths) == 2 * SHAPE["num_hidden_layers"]
    assert all(path.startswith(model.method.vision_prefix) for path in model.method.layer_paths)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).features, expected, rtol=0, atol=0)
    update_memory(model, [pixel_values], task_id=0)
    assert all(rank > 0 for rank in model.memory.ranks().values())
