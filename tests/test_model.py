"""PGPModel and VisionBackbone behaviour on a tiny random ViT (docs/ALGORITHM.md §4, §7 item 7); every
backbone family: tests/test_backbone_families.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertModel

import pgp_peft.hub as model_module
from pgp_peft.backbones import VisionBackbone
from pgp_peft.config import PromptGradientProjectionConfig as Config
from pgp_peft.model import PGPModel, get_pgp_model

IMPLS = [("pgp_sdpa", "sdpa"), ("pgp_eager", "eager")]
HIDDEN = 32
NUM_PATCHES = 16  # 16x16 images, 4x4 patches (conftest.TINY_VIT)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny forwards are dominated by thread overhead: one intra-op thread is several times faster on a
    busy machine. Restored afterwards so other modules keep their setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def l2p_model(tiny_vit, seed: int = 0, vit_seed: int = 0, attn: str | None = None, **overrides) -> PGPModel:
    values = dict(num_classes=6, pool_size=4, top_k=2, prompt_length=3)
    values.update(overrides)
    torch.manual_seed(seed)
    return PGPModel(Config.l2p(**values), base_model=tiny_vit(seed=vit_seed), attn_implementation=attn)


def dual_model(tiny_vit, seed: int = 0, vit_seed: int = 0, attn: str | None = None, **overrides) -> PGPModel:
    values = dict(num_classes=6, pool_size=4, g_prompt_length=2, e_prompt_length=3)
    values.update(overrides)
    torch.manual_seed(seed)
    return PGPModel(Config.dualprompt(**values), base_model=tiny_vit(seed=vit_seed), attn_implementation=attn)


def random_prefixes(
    batch: int, lengths: dict[int, int], seed: int = 7
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {
        layer: (
            torch.randn(batch, length, HIDDEN, generator=generator),
            torch.randn(batch, length, HIDDEN, generator=generator),
        )
        for layer, length in lengths.items()
    }


def set_keys_to_queries(
    model: PGPModel, pixel_values: torch.Tensor, rest: torch.Tensor | None = None
) -> None:
    """Key slot i := query of sample i, so sample i selects slot i first (cosine 1)."""
    queries = model.backbone.query(pixel_values)
    method = model.method
    keys = method.prompt_pool.key if hasattr(method, "prompt_pool") else method.prefix_pool.e_key
    with torch.no_grad():
        keys[: len(queries)] = queries
        if rest is not None:
            keys[len(queries) :] = rest


def patch_pixels(image: torch.Tensor, token: int, patch: int = 4, grid: int = 4) -> tuple[slice, slice]:
    """Pixel region (rows, cols) of patch token `token` (1-based: token 0 is CLS)."""
    row, col = divmod(token - 1, grid)
    return slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)


# ----------------------------------------------------------------------------- 1. bitwise identity
@pytest.mark.parametrize("impl, plain", IMPLS)
def test_no_prompts_is_bitwise_the_plain_backbone(tiny_vit, pixel_values, impl, plain):
    backbone = VisionBackbone(tiny_vit(attn="sdpa"), attn_implementation=impl)
    reference = tiny_vit(attn=plain)
    reference.load_state_dict(backbone.model.state_dict())
    assert backbone.model.config._attn_implementation == impl
    assert reference.config._attn_implementation == plain
    batch = pixel_values.shape[0]
    empty = torch.zeros(batch, 0, HIDDEN)
    with torch.no_grad():
        expected = reference(pixel_values).last_hidden_state
        assert torch.equal(backbone(pixel_values), expected)
        assert torch.equal(backbone(pixel_values, prefixes={}), expected)
        assert torch.equal(
            backbone(pixel_values, prefixes={layer: (empty, empty) for layer in range(5)}), expected
        )
        assert torch.equal(backbone(pixel_values, prompt_tokens=empty), expected)
        assert torch.equal(backbone.query(pixel_values), expected[:, 0])


@pytest.mark.parametrize("impl, plain", IMPLS)
def test_dualprompt_with_zero_length_prefixes_is_bitwise_the_plain_backbone(
    tiny_vit, pixel_values, impl, plain
):
    model = dual_model(tiny_vit, attn=impl, g_prompt_length=0, e_prompt_length=0).eval()
    reference = tiny_vit(attn=plain)
    reference.load_state_dict(model.backbone.model.state_dict())
    with torch.no_grad():
        expected = reference(pixel_values).last_hidden_state[:, 0]
        out = model(pixel_values)
    assert out.prompt_ids is None
    assert torch.equal(out.features, expected)


# ----------------------------------------------------------------------------- 2. sdpa vs eager
def test_sdpa_and_eager_prefix_attention_agree_on_random_prefixes(tiny_vit, pixel_values):
    sdpa = VisionBackbone(tiny_vit(), attn_implementation="pgp_sdpa")
    eager = VisionBackbone(tiny_vit(), attn_implementation="pgp_eager")
    prefixes = random_prefixes(pixel_values.shape[0], {0: 2, 1: 5, 3: 1, 4: 3})
    with torch.no_grad():
        plain = sdpa(pixel_values)
        out_sdpa = sdpa(pixel_values, prefixes=prefixes)
        out_eager = eager(pixel_values, prefixes=prefixes)
    assert (out_sdpa - plain).abs().max() > 1e-2  # the prefixes do act
    assert (out_sdpa - out_eager).abs().max() < 1e-5


def test_sdpa_and_eager_dualprompt_models_agree(tiny_vit, pixel_values):
    sdpa = dual_model(tiny_vit, attn="pgp_sdpa").eval()
    eager = dual_model(tiny_vit, seed=99, attn="pgp_eager").eval()
    eager.load_adapter_state_dict(sdpa.adapter_state_dict())
    with torch.no_grad():
        a, b = sdpa(pixel_values), eager(pixel_values)
    assert torch.equal(a.prompt_ids, b.prompt_ids)
    assert (a.features - b.features).abs().max() < 1e-5
    assert (a.logits - b.logits).abs().max() < 1e-5


# ----------------------------------------------------------------------------- 3. padding mask
@pytest.mark.parametrize("impl, plain", IMPLS)
def test_padding_mask_is_applied_with_prefixes(tiny_vit, pixel_values, impl, plain):
    backbone = VisionBackbone(tiny_vit(), attn_implementation=impl)
    prefixes = random_prefixes(pixel_values.shape[0], {0: 2, 2: 3, 4: 1})
    mask = torch.ones(pixel_values.shape[0], 1 + NUM_PATCHES, dtype=torch.long)
    masked = {0: [2, 3, 7], 2: list(range(10, 17))}  # sample -> masked patch tokens; samples 1, 3 unmasked
    for sample, tokens in masked.items():
        mask[sample, tokens] = 0

    changed = pixel_values.clone()
    generator = torch.Generator().manual_seed(5)
    for sample, tokens in masked.items():
        for token in tokens:
            rows, cols = patch_pixels(changed[sample], token)
            changed[sample, :, rows, cols] = torch.rand(3, 4, 4, generator=generator)

    with torch.no_grad():
        unmasked = backbone(pixel_values, prefixes=prefixes)
        out = backbone(pixel_values, prefixes=prefixes, attention_mask=mask)
        out_changed = backbone(changed, prefixes=prefixes, attention_mask=mask)
        out_changed_unmasked = backbone(changed, prefixes=prefixes)
        no_prefix = backbone(pixel_values, attention_mask=mask)
        reference = tiny_vit(attn=plain)
        reference.load_state_dict(backbone.model.state_dict())
        reference_out = reference(pixel_values, attention_mask=mask).last_hidden_state

    # the mask acts on the samples that have padding, and only on them
    for sample in masked:
        assert (out[sample, 0] - unmasked[sample, 0]).abs().max() > 1e-3
    torch.testing.assert_close(out[[1, 3]], unmasked[[1, 3]], atol=1e-5, rtol=0)
    # masked tokens do not influence the unmasked tokens (CLS included) ...
    for sample, tokens in masked.items():
        kept = [t for t in range(1 + NUM_PATCHES) if t not in tokens]
        torch.testing.assert_close(out_changed[sample, kept], out[sample, kept], atol=1e-6, rtol=0)
        # ... whereas without the mask the pixel change does reach CLS
        assert (out_changed_unmasked[sample, 0] - unmasked[sample, 0]).abs().max() > 1e-3
    # prefixes are still attended under the mask, and the mask alone matches the stock model's masking
    assert (out - no_prefix).abs().max() > 1e-2
    torch.testing.assert_close(no_prefix, reference_out, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- 4. per-sample selection
def test_l2p_batch_equals_each_sample_alone(tiny_vit, pixel_values):
    model = l2p_model(tiny_vit).eval()
    set_keys_to_queries(model, pixel_values)
    with torch.no_grad():
        batch = model(pixel_values)
        assert batch.prompt_ids[:, 0].tolist() == [0, 1, 2, 3]  # every sample picks a different first prompt
        assert len({tuple(sorted(row)) for row in batch.prompt_ids.tolist()}) > 1
        for i in range(pixel_values.shape[0]):
            alone = model(pixel_values[i : i + 1])
            assert torch.equal(alone.prompt_ids[0], batch.prompt_ids[i])
            torch.testing.assert_close(alone.logits[0], batch.logits[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["pgp_sdpa", "pgp_eager"])
def test_dualprompt_batch_equals_each_sample_alone(tiny_vit, pixel_values, impl):
    model = dual_model(tiny_vit, attn=impl).eval()
    set_keys_to_queries(model, pixel_values)
    with torch.no_grad():
        batch = model(pixel_values)
        assert batch.prompt_ids.flatten().tolist() == [0, 1, 2, 3]  # all different E-prompts
        for i in range(pixel_values.shape[0]):
            alone = model(pixel_values[i : i + 1])
            assert alone.prompt_ids.flatten().tolist() == [i]
            torch.testing.assert_close(alone.logits[0], batch.logits[i], atol=1e-5, rtol=0)
        # and the selected E-prompt matters: forcing sample 0 onto slot 1 changes its output
        with torch.no_grad():
            model.method.prefix_pool.e_key[0] = -model.method.prefix_pool.e_key[0]
        moved = model(pixel_values[:1])
        assert moved.prompt_ids.item() != 0
        assert (moved.logits[0] - batch.logits[0]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- 5. gradients
def test_l2p_gradient_reaches_only_selected_prompts_and_keys(tiny_vit, pixel_values):
    model = l2p_model(tiny_vit, pool_size=6, top_k=2)
    x = pixel_values[:2]
    far = -model.backbone.query(x).mean(0, keepdim=True) + 0.01 * torch.randn(4, HIDDEN)
    set_keys_to_queries(model, x, rest=far)  # slots 2-5 point away from every query
    model.register_task_classes(0, range(6))
    model.train()
    out = model(x, labels=torch.tensor([1, 4]), task_id=0)
    selected = set(out.prompt_ids.flatten().tolist())
    assert selected == {0, 1}
    out.loss.backward()
    prompt_rows = model.method.prompt_pool.prompt.grad.abs().sum(dim=(1, 2))
    key_rows = model.method.prompt_pool.key.grad.abs().sum(dim=1)
    for slot in range(6):
        if slot in selected:
            assert prompt_rows[slot] > 0 and key_rows[slot] > 0
        else:
            assert prompt_rows[slot] == 0 and key_rows[slot] == 0
    assert model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_dualprompt_prompt_mask_trains_only_the_task_slot(tiny_vit, pixel_values):
    model = dual_model(tiny_vit)
    model.register_task_classes(0, [0, 1])
    model.register_task_classes(1, [2, 3])
    model.train()
    out = model(pixel_values, labels=torch.tensor([2, 3, 3, 2]), task_id=1)
    assert out.prompt_ids.flatten().tolist() == [1, 1, 1, 1]  # the task id picks the slot
    out.loss.backward()
    e_grad = model.method.prefix_pool.e_prompt.grad  # (layers, 2, P, L, D)
    slot_grad = e_grad.abs().sum(dim=(0, 1, 3, 4))
    assert slot_grad[1] > 0
    assert slot_grad[[0, 2, 3]].sum() == 0
    key_grad = model.method.prefix_pool.e_key.grad.abs().sum(dim=1)  # the pull term uses the forced key
    assert key_grad[1] > 0 and key_grad[[0, 2, 3]].sum() == 0
    assert model.method.prefix_pool.g_prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())


def test_dualprompt_prompt_mask_with_top_k_2_uses_a_block_of_distinct_slots(tiny_vit, pixel_values):
    model = dual_model(tiny_vit, pool_size=6, top_k=2)
    model.register_task_classes(1, [2, 3])
    model.train()
    out = model(pixel_values, labels=torch.tensor([2, 3, 3, 2]), task_id=1)
    assert out.prompt_ids.tolist() == [[2, 3]] * 4


def test_dualprompt_task_beyond_pool_selects_by_key(tiny_vit, pixel_values):
    model = dual_model(tiny_vit)
    set_keys_to_queries(model, pixel_values)
    model.register_task_classes(5, [4, 5])
    model.train()
    out = model(pixel_values, labels=torch.tensor([4, 5, 4, 5]), task_id=5)  # pool has 4 slots
    assert out.prompt_ids.flatten().tolist() == [0, 1, 2, 3]


def test_begin_task_copies_previous_e_prompt_slot(tiny_vit):
    model = dual_model(tiny_vit)
    before = model.method.prefix_pool.e_prompt.detach().clone()
    model.begin_task(0)
    assert torch.equal(model.method.prefix_pool.e_prompt, before)
    model.begin_task(2)
    assert torch.equal(model.method.prefix_pool.e_prompt[:, :, 2], before[:, :, 1])
    assert torch.equal(model.method.prefix_pool.e_prompt[:, :, [0, 1, 3]], before[:, :, [0, 1, 3]])


# ----------------------------------------------------------------------------- 6. class mask
def test_class_masks(tiny_vit, pixel_values):
    model = l2p_model(tiny_vit)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(pixel_values).logits).all()  # nothing seen yet: no mask
    model.register_task_classes(0, [0, 1])
    model.register_task_classes(1, [2, 3])

    def finite_classes(logits: torch.Tensor) -> list[list[int]]:
        assert not torch.isnan(logits).any()
        return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]

    model.train()
    out = model(pixel_values, labels=torch.tensor([2, 3, 2, 3]), task_id=1)
    assert finite_classes(out.logits) == [[2, 3]] * 4
    assert torch.isneginf(out.logits[:, [0, 1, 4, 5]]).all()
    assert torch.isfinite(out.loss)
    with torch.no_grad():
        assert finite_classes(model(pixel_values).logits) == [[0, 1, 2, 3]] * 4  # no task id: seen classes
        model.eval()
        assert finite_classes(model(pixel_values).logits) == [[0, 1, 2, 3]] * 4  # class-IL over seen
        assert finite_classes(model(pixel_values, task_id=1).logits) == [[0, 1, 2, 3]] * 4
        assert finite_classes(model(pixel_values, task_id=0, class_mask="task").logits) == [[0, 1]] * 4
        per_sample = model(pixel_values, task_id=torch.tensor([0, 1, 1, 0]), class_mask="task").logits
        assert finite_classes(per_sample) == [[0, 1], [2, 3], [2, 3], [0, 1]]
        assert finite_classes(model(pixel_values, class_mask="all").logits) == [list(range(6))] * 4
        with pytest.raises(ValueError, match="task_id"):
            model(pixel_values, class_mask="task")


# ----------------------------------------------------------------------------- 7. save / load
def _trained_state(model: PGPModel) -> PGPModel:
    """Move the adapter away from its seeded init and fill some bookkeeping, so a load must restore it."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.register_task_classes(0, [0, 1])
    model.register_task_classes(1, [2, 3])
    name = model.memory.names[0]
    dim = model.memory.dim(name)
    model.memory.set_basis(name, torch.linalg.qr(torch.randn(dim, 2, generator=generator))[0])
    return model.eval()


@pytest.mark.parametrize("build", [l2p_model, dual_model], ids=["l2p", "dualprompt"])
def test_save_load_round_trip_is_bitwise(tiny_vit, pixel_values, tmp_path, build):
    model = _trained_state(build(tiny_vit))
    with torch.no_grad():
        expected = model(pixel_values)
    target = tmp_path / "adapter"
    model.save_pretrained(target)

    assert sorted(os.listdir(target)) == ["README.md", "config.json", "model.safetensors"]
    assert (target / "README.md").read_text().strip()
    payload = json.loads((target / "config.json").read_text())
    assert payload["library_name"] == "pgp_peft"
    assert payload["method"] == model.config.method
    assert Config.from_pretrained(target) == model.config  # the adapter's config.json reads as a config
    with safe_open(str(target / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys and not any(key.startswith("backbone.") for key in keys)
    assert keys == set(model.adapter_state_dict())
    with safe_open(str(target / "model.safetensors"), framework="pt") as handle:
        for name, rank in model.memory.ranks().items():  # bases as their kept columns, no zero padding
            key = "memory.basis__" + name.replace(".", "_")
            assert handle.get_slice(key).get_shape() == [model.memory.dim(name), rank]
    backbone_bytes = sum(p.numel() * p.element_size() for p in model.backbone.parameters())
    assert os.path.getsize(target / "model.safetensors") < 0.25 * backbone_bytes

    loaded = PGPModel.from_pretrained(target, base_model=tiny_vit())
    assert not loaded.training
    assert loaded.config == model.config
    assert torch.equal(loaded.class_task, model.class_task)
    assert loaded.memory.ranks() == model.memory.ranks()
    for name, buffer in model.memory.state_dict().items():
        assert torch.equal(loaded.memory.state_dict()[name], buffer), name
    with torch.no_grad():
        got = loaded(pixel_values)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.prompt_ids, expected.prompt_ids)


def test_save_into_existing_dir_replaces_previous_save(tiny_vit, pixel_values, tmp_path):
    target = tmp_path / "adapter"
    l2p_model(tiny_vit).save_pretrained(target)
    model = _trained_state(l2p_model(tiny_vit, seed=1))
    model.save_pretrained(target)
    with torch.no_grad():
        expected = model(pixel_values).logits
        got = PGPModel.from_pretrained(target, base_model=tiny_vit())(pixel_values).logits
    assert torch.equal(got, expected)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


@pytest.mark.parametrize("failing", ["save_file", "atomic_write_text"])
def test_failed_save_keeps_previous_save_and_leaves_no_temp_dirs(
    tiny_vit, pixel_values, tmp_path, monkeypatch, failing
):
    parent = tmp_path / "runs"
    target = parent / "adapter"
    model = _trained_state(l2p_model(tiny_vit))
    with torch.no_grad():
        old = model(pixel_values).logits
    model.save_pretrained(target)
    files_before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    with torch.no_grad():
        model.head.weight.mul_(-1.0)
        model.method.prompt_pool.prompt.add_(1.0)
        new = model(pixel_values).logits
    assert not torch.equal(new, old)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_module, failing, fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    monkeypatch.undo()

    assert sorted(os.listdir(parent)) == ["adapter"]  # no staging directory left behind
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == files_before
    with torch.no_grad():
        reloaded = PGPModel.from_pretrained(target, base_model=tiny_vit())(pixel_values).logits
    assert torch.equal(reloaded, old)


# ----------------------------------------------------------------------------- 8. bad input
def test_unsupported_base_model_raises_type_error_naming_supported_classes():
    bert = BertModel(
        BertConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=50
        )
    )
    for build in (
        lambda: PGPModel(Config.l2p(num_classes=3), base_model=bert),
        lambda: get_pgp_model(bert, Config.l2p(), num_classes=3),
    ):
        with pytest.raises(TypeError) as info:
            build()
        message = str(info.value)
        for name in ("ViTModel", "CLIPVisionModel", "CLIPModel", "BertModel"):
            assert name in message


@pytest.mark.parametrize("build", [l2p_model, dual_model])
def test_head_starts_as_the_timm_vit_head(tiny_vit, build):
    """The reference trains timm's ViT head: trunc-normal weights (std 0.02), zero bias; not
    nn.Linear's default U(±1/√D) (std ≈ 0.10 at D = 32) with a random bias."""
    model = build(tiny_vit, num_classes=300)  # 300 x 32 weights: the std is measured to ±0.001
    assert torch.equal(model.head.bias, torch.zeros(300))
    assert abs(model.head.weight.std().item() - 0.02) < 0.001
    assert abs(model.head.weight.mean().item()) < 0.001


def test_get_pgp_model_overrides_num_classes(tiny_vit):
    model = get_pgp_model(tiny_vit(), Config.l2p(pool_size=4, top_k=2), num_classes=7)
    assert model.head.out_features == 7 and model.config.num_classes == 7


@pytest.mark.parametrize(
    "build, overrides, saved, given",
    [
        (l2p_model, dict(hidden_size=48), "'hidden_size': 32", "'hidden_size': 48"),
        (l2p_model, dict(num_hidden_layers=6), "'num_hidden_layers': 5", "'num_hidden_layers': 6"),
        (dual_model, dict(hidden_size=64, intermediate_size=32), "'hidden_size': 32", "'hidden_size': 64"),
        (dual_model, dict(num_hidden_layers=7), "'num_hidden_layers': 5", "'num_hidden_layers': 7"),
    ],
)
def test_loading_onto_another_backbone_shape_names_both(tiny_vit, tmp_path, build, overrides, saved, given):
    build(tiny_vit).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError) as info:
        PGPModel.from_pretrained(tmp_path / "adapter", base_model=tiny_vit(**overrides))
    message = str(info.value)
    assert saved in message and given in message


def test_loading_dualprompt_onto_a_too_shallow_backbone_raises(tiny_vit, tmp_path):
    dual_model(tiny_vit).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError) as error:
        PGPModel.from_pretrained(tmp_path / "adapter", base_model=tiny_vit(num_hidden_layers=3))
    # Both shapes are named, checked before the adapter's layer indices are validated.
    assert "'num_hidden_layers': 5" in str(error.value) and "'num_hidden_layers': 3" in str(error.value)


def test_only_safetensors_are_read_never_pickle(tiny_vit, tmp_path, monkeypatch):
    model = l2p_model(tiny_vit)
    target = tmp_path / "adapter"
    model.save_pretrained(target)
    torch.save(model.adapter_state_dict(), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    torch.save(model.adapter_state_dict(), only_bin / "pytorch_model.bin")
    base = tiny_vit()

    calls = []

    def no_pickle(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(torch.serialization, "load", no_pickle)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        PGPModel.from_pretrained(target, base_model=base)
    with pytest.raises(FileNotFoundError, match="config.json"):
        PGPModel.from_pretrained(only_bin, base_model=base)
    assert calls == []


def test_config_without_library_name_is_rejected(tiny_vit, tmp_path):
    target = tmp_path / "adapter"
    l2p_model(tiny_vit).save_pretrained(target)
    payload = json.loads((target / "config.json").read_text())
    del payload["library_name"]
    (target / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="library_name"):
        PGPModel.from_pretrained(target, base_model=tiny_vit())

    # a bare config saved by the config class is not an adapter either
    bare = tmp_path / "bare"
    Config.l2p(num_classes=6, pool_size=4, top_k=2, prompt_length=3).save_pretrained(bare)
    with pytest.raises(ValueError, match="library_name"):
        PGPModel.from_pretrained(bare, base_model=tiny_vit())


def test_tampered_weights_shape_raises(tiny_vit, tmp_path):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "adapter"
    l2p_model(tiny_vit).save_pretrained(target)
    state = load_file(str(target / "model.safetensors"))
    state["prompt_pool.prompt"] = state["prompt_pool.prompt"][:, :2].contiguous()
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match="prompt_pool.prompt"):
        PGPModel.from_pretrained(target, base_model=tiny_vit())


# ----------------------------------------------------------------------------- 9. frozen backbone
def test_backbone_stays_in_eval_mode_and_frozen(tiny_vit, pixel_values):
    vit = tiny_vit(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    torch.manual_seed(0)
    model = PGPModel(Config.l2p(num_classes=6, pool_size=4, top_k=2, prompt_length=3), base_model=vit)
    model.train()
    assert model.training and model.method.prompt_pool.training and model.head.training
    assert not vit.training
    assert not any(module.training for module in model.backbone.model.modules())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"method.prompt_pool.prompt", "method.prompt_pool.key", "head.weight", "head.bias"}
    # behaviour: with dropout 0.5, a backbone in training mode would make two passes differ
    with torch.no_grad():
        first, second = model(pixel_values).logits, model(pixel_values).logits
    assert torch.equal(first, second)
    model.eval()
    model.train(True)
    assert not any(module.training for module in model.backbone.model.modules())


def test_saved_files_get_ordinary_permissions_not_tempfile_private_ones(tiny_vit, tmp_path):
    """Staging uses tempfile (0600/0700); what lands must follow the umask like a plain open()."""
    old = os.umask(0o022)
    try:
        l2p_model(tiny_vit).save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(old)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    for name in os.listdir(tmp_path / "adapter"):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("builder", [l2p_model, dual_model])
def test_bfloat16_backbone_runs_with_float32_adapter(tiny_vit, pixel_values, builder):
    model = builder(tiny_vit)
    model.backbone.model.to(torch.bfloat16)
    model.register_task_classes(0, range(6))
    out = model(pixel_values.to(torch.bfloat16))
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_model_to_bfloat16_keeps_the_projection_bases_float32(tiny_vit):
    model = l2p_model(tiny_vit)
    basis = torch.linalg.qr(torch.randn(32, 5, dtype=torch.float64))[0]
    model.memory.set_basis("prompt", basis)
    model.to(torch.bfloat16)
    assert model.memory.basis("prompt").dtype == torch.float32
    assert torch.allclose(model.memory.basis("prompt").double(), basis, atol=1e-6)


def test_get_pgp_model_leaves_the_callers_config_alone(tiny_vit):
    config = Config.l2p(num_classes=6, pool_size=4, top_k=2)
    get_pgp_model(tiny_vit(), config, num_classes=6)
    PGPModel(config, base_model=tiny_vit())
    assert config.base_model_name_or_path is None


def test_batchwise_selection_is_logged(tiny_vit, caplog):
    with caplog.at_level("WARNING", logger="pgp_peft.prompts"):
        l2p_model(tiny_vit, batchwise_prompt=True)
    assert "leaks task identity" in caplog.text


def test_inference_mode_freezes_the_adapter(tiny_vit):
    model = l2p_model(tiny_vit, inference_mode=True)
    assert not any(parameter.requires_grad for parameter in model.parameters())
