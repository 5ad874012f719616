"""Every registered method, through the same checks: the `PGPMethod` protocol as `PGPModel` and the
memory update use it, on the tiny test backbones.

A new method registers a builder in `BUILDERS` (its config on a tiny backbone); the checks are shared.
"""

from __future__ import annotations

import pytest
import torch
from tiny_assets import TINY_VIT, tiny_clip_config, write_char_tokenizer_files
from transformers import CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

from pgp_peft import PGPModel, PromptGradientProjectionConfig
from pgp_peft.memory import update_memory
from pgp_peft.methods import available_methods, get_method

Config = PromptGradientProjectionConfig
CLASS_NAMES = ["apple", "bear", "bee", "bird", "boat", "bus"]


def tiny_vit() -> ViTModel:
    torch.manual_seed(0)
    return ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False).eval()


def tiny_clip(folder) -> tuple[CLIPModel, CLIPTokenizer]:
    write_char_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    return CLIPModel(tiny_clip_config(tokenizer)).eval(), tokenizer


# method -> builder(tmp_path, **config overrides) -> (config, backbone, tokenizer)
BUILDERS = {
    "l2p": lambda tmp, **kw: (
        Config.l2p(num_classes=6, pool_size=4, top_k=2, prompt_length=2, **kw),
        tiny_vit(),
        None,
    ),
    "dualprompt": lambda tmp, **kw: (
        Config.dualprompt(num_classes=6, pool_size=3, g_prompt_length=2, e_prompt_length=2, **kw),
        tiny_vit(),
        None,
    ),
    "clip": lambda tmp, **kw: (
        Config.clip(class_names=CLASS_NAMES, num_tasks=3, text_context_length=3, image_prompt_length=5, **kw),
        *tiny_clip(tmp),
    ),
    "lora": lambda tmp, **kw: (
        Config.lora(num_classes=6, r=4, target_modules=["q_proj", "v_proj", "fc1"], **kw),
        tiny_vit(),
        None,
    ),
}


def build(method: str, tmp_path, **overrides) -> tuple[PGPModel, dict]:
    config, backbone, tokenizer = BUILDERS[method](tmp_path, **overrides)
    torch.manual_seed(1)
    model = PGPModel(config, base_model=backbone, tokenizer=tokenizer)
    model.register_task_classes(0, [0, 1])
    model.register_task_classes(1, [2, 3])
    # An identical fresh backbone to load into: LoRA injects its layers into the backbone it is given.
    _, fresh_backbone, _ = BUILDERS[method](tmp_path, **overrides)
    return model, {"base_model": fresh_backbone, "tokenizer": tokenizer}


def trainable_tensors(model: PGPModel) -> list[torch.Tensor]:
    """The method's trainable tensors (LoRA's live inside the backbone's modules, the prompts' in the method)."""
    return [t for t in model.method.adapter_tensors().values() if t.requires_grad]


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


METHODS = available_methods()


def test_every_registered_method_has_a_builder():
    assert sorted(BUILDERS) == sorted(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_config_and_method_classes_match_the_registry(method):
    spec = get_method(method)
    config = getattr(Config, method)() if hasattr(Config, method) else spec.config_cls()
    assert type(config) is spec.config_cls and config.method == method
    assert spec.method_cls.name == method and spec.method_cls.card.name


@pytest.mark.parametrize("method", METHODS)
def test_forward_shapes_and_loss(method, tmp_path):
    model, _ = build(method, tmp_path)
    model.train()
    model.begin_task(1)
    out = model(images(), labels=torch.tensor([2, 3, 2, 3]), task_id=1)
    assert out.logits.shape == (4, 6) and out.features.shape == (4, model.hidden_size)
    assert torch.isfinite(out.loss)
    finite = torch.isfinite(out.logits)
    assert finite[:, 2:4].all() and not finite[:, [0, 1, 4, 5]].any()  # the task's class mask
    out.loss.backward()
    own = {id(t) for t in trainable_tensors(model)}
    assert all(p.grad is None for p in model.backbone.parameters() if id(p) not in own)  # frozen backbone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable_tensors(model))


@pytest.mark.parametrize("method", METHODS)
def test_protected_slices_are_method_parameters_in_declared_spaces(method, tmp_path):
    model, _ = build(method, tmp_path)
    spaces = model.method.protected_spaces()
    assert spaces and set(model.memory.names) == set(spaces)
    own = {id(p) for p in trainable_tensors(model)}
    covered: set[str] = set()
    for parameter, index, names in model.method.protected_slices():
        assert id(parameter) in own
        block = parameter.detach()[index]
        assert block.shape[-1] == sum(spaces[name] for name in names), names
        covered.update(names)
    assert covered == set(spaces)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("projection_space", ["feature", "reference"])
def test_memory_update_fills_every_space_and_projection_removes_it(method, projection_space, tmp_path):
    if method == "lora" and projection_space == "reference":
        with pytest.raises(ValueError, match="projection_space: LoRA-PGP supports 'feature' only"):
            build(method, tmp_path, projection_space=projection_space, memory_samples=32)
        return
    model, _ = build(method, tmp_path, projection_space=projection_space, memory_samples=32)
    updates = update_memory(model, [images(16, seed=1), images(16, seed=2)], task_id=0)
    assert set(updates) == set(model.method.protected_spaces())
    assert all(rank > 0 for rank in model.memory.ranks().values())
    model.train()
    model.begin_task(1)
    model(images(), labels=torch.tensor([2, 3, 2, 3]), task_id=1).loss.backward()
    model.project_gradients_()
    for parameter, index, names in model.method.protected_slices():
        grad = parameter.grad[index] if parameter.grad is not None else None
        if grad is None:
            continue
        heads = grad.reshape(*grad.shape[:-1], len(names), -1)
        for head, name in enumerate(names):
            basis = model.memory.basis(name).to(grad.dtype)
            rows = heads[..., head, :].reshape(-1, basis.shape[0])
            assert float((rows @ basis).norm()) <= 1e-4 * max(1.0, float(rows.norm())), name


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(method, tmp_path):
    model, kwargs = build(method, tmp_path)
    update_memory(model, [images(8, seed=3)], task_id=0)
    with torch.no_grad():
        for parameter in trainable_tensors(model):
            parameter.add_(0.1)
    model.eval()
    with torch.no_grad():
        expected = model(images()).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PGPModel.from_pretrained(tmp_path / "adapter", **kwargs)
    assert type(loaded.method) is type(model.method) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images()).logits, expected)
    saved = loaded.adapter_state_dict()
    assert not any(name.startswith("backbone.") for name in saved)
    assert saved.keys() == model.adapter_state_dict().keys()
