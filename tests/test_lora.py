"""LoRA-PGP: peft LoRA injection, protected spaces, the Δ(BA)x = 0 guarantee, and peft interop."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from pgp_peft.backbones import build_backbone
from pgp_peft.methods.lora import LoraPGPMethod, LoraPGPSettings
from pgp_peft.projection import GramAccumulator, NullSpaceMemory, project_update_


def make_lora(tiny_vit, r: int = 4, targets=("q_proj", "v_proj"), seed: int = 0):
    backbone = build_backbone(tiny_vit(seed=seed))
    method = LoraPGPMethod(LoraPGPSettings(r=r, lora_alpha=2.0 * r, target_modules=list(targets)), backbone)
    return backbone, method


@torch.no_grad()
def randomise_lora(method: LoraPGPMethod, seed: int = 1) -> None:
    """Stand-in for a trained adapter: B is zero after peft's init, give it (and A) random values."""
    generator = torch.Generator().manual_seed(seed)
    for path in method.layer_paths:
        a, b = method.lora_weights(path)
        a.copy_(torch.randn(a.shape, generator=generator) * 0.3)
        b.copy_(torch.randn(b.shape, generator=generator) * 0.3)


def update_bases(
    method: LoraPGPMethod, memory: NullSpaceMemory, images: torch.Tensor, threshold: float
) -> None:
    """Feature-mode memory update from `images` (what the trainer does at a task boundary)."""
    grams = {name: GramAccumulator(dim) for name, dim in method.protected_spaces().items()}
    for name, rows in method.memory_rows(images).items():
        grams[name].add(rows)
    for name, gram in grams.items():
        memory.update_feature(name, gram.gram, threshold)


def test_lora_is_injected_by_peft_and_starts_as_the_backbone(tiny_vit, pixel_values):
    plain = build_backbone(tiny_vit())
    backbone, method = make_lora(tiny_vit)
    assert method.layer_paths == [f"layers.{i}.attention.{n}" for i in range(5) for n in ("q_proj", "v_proj")]
    for path in method.layer_paths:
        assert isinstance(backbone.model.get_submodule(path), PeftLoraLinear)
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    expected = {f"model.{path}.lora_{m}.default.weight" for path in method.layer_paths for m in ("A", "B")}
    assert trainable == expected
    # peft initialises B = 0: the adapted model is the backbone until it is trained
    torch.testing.assert_close(method.features(pixel_values), plain(pixel_values)[:, 0], rtol=0, atol=0)
    assert list(method.parameters()) == []  # the LoRA tensors are owned by the backbone's modules


def test_lora_spaces_and_slices(tiny_vit):
    _, method = make_lora(tiny_vit, r=3)
    spaces = method.protected_spaces()
    assert len(spaces) == 20
    assert spaces["layers.2.attention.v_proj.lora_A"] == 32  # d_in
    assert spaces["layers.2.attention.v_proj.lora_B"] == 3  # r
    slices = method.protected_slices()
    assert len(slices) == 20
    a, b = method.lora_weights("layers.0.attention.q_proj")
    assert slices[0][0] is a and slices[0][2] == ["layers.0.attention.q_proj.lora_A"] and a.shape == (3, 32)
    assert slices[1][0] is b and slices[1][2] == ["layers.0.attention.q_proj.lora_B"] and b.shape == (32, 3)
    for parameter, index, names in slices:
        assert parameter[index].shape[-1] == spaces[names[0]]  # the projection acts on the last axis
    assert method.scaling("layers.0.attention.q_proj") == pytest.approx(2.0)


def test_lora_memory_rows_are_layer_inputs_and_down_projections(tiny_vit, pixel_values):
    backbone, method = make_lora(tiny_vit, r=3)
    randomise_lora(method)
    seen = {}
    layer = backbone.model.get_submodule("layers.1.attention.v_proj")
    handle = layer.base_layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    rows = method.memory_rows(pixel_values)
    handle.remove()
    assert set(rows) == set(method.protected_spaces())
    x = rows["layers.1.attention.v_proj.lora_A"]
    assert x.shape == (4 * 17, 32)  # every token (CLS + 16 patches) of every image
    torch.testing.assert_close(x, seen["x"].reshape(-1, 32))
    a, _ = method.lora_weights("layers.1.attention.v_proj")
    torch.testing.assert_close(rows["layers.1.attention.v_proj.lora_B"], x @ a.detach().T)
    # q and v read the same input
    torch.testing.assert_close(rows["layers.1.attention.q_proj.lora_A"], x)


def test_lora_bad_settings_raise(tiny_vit):
    with pytest.raises(
        ValueError, match=r"target_modules=\['query'\].*Linear layers of this ViTModel.*q_proj"
    ):
        make_lora(tiny_vit, targets=("query",))
    for settings, key in (
        (LoraPGPSettings(r=0), "r"),
        (LoraPGPSettings(lora_alpha=-1.0), "lora_alpha"),
        (LoraPGPSettings(target_modules=[]), "target_modules"),
    ):
        with pytest.raises(ValueError, match=rf"LoraPGPConfig\.{key}:"):
            LoraPGPMethod(settings, build_backbone(tiny_vit()))


def test_lora_refuses_reference_mode(tiny_vit):
    with pytest.raises(ValueError, match="projection_space='feature' only"):
        LoraPGPMethod(LoraPGPSettings(), build_backbone(tiny_vit()), projection_space="reference")


def test_lora_clip_adapts_the_vision_tower_only():
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=50,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=16,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=16,
                patch_size=4,
            ),
            projection_dim=16,
        )  # fmt: skip
    ).eval()
    method = LoraPGPMethod(LoraPGPSettings(r=2, target_modules=["q_proj", "v_proj"]), build_backbone(clip))
    assert sorted(method.layer_paths) == [
        f"vision_model.encoder.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")
    ]
    assert not any(isinstance(m, PeftLoraLinear) for m in clip.text_model.modules())
    rows = method.memory_rows(torch.rand(2, 3, 16, 16))
    assert rows["vision_model.encoder.layers.0.self_attn.q_proj.lora_B"].shape == (2 * 17, 2)


def _train_new_task(
    method, backbone, memory: NullSpaceMemory | None, steps: int = 6, adam: bool = False
) -> None:
    """SGD (or Adam with the update projected too) on a new task's batch; with `memory`, every LoRA
    gradient is projected before the step."""
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(8, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    torch.manual_seed(3)
    head = torch.nn.Linear(32, 5)
    parameters = [p for p, _, _ in method.protected_slices()] + list(head.parameters())
    optimizer = torch.optim.Adam(parameters, lr=0.05) if adam else torch.optim.SGD(parameters, lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(method.features(images)), labels)
        loss.backward()
        before = None
        if memory is not None:
            for parameter, index, names in method.protected_slices():
                memory.project_(parameter.grad[index], names[0])
            before = [parameter.detach()[index].clone() for parameter, index, _ in method.protected_slices()]
        optimizer.step()
        if adam and before is not None:
            for (parameter, index, names), old in zip(method.protected_slices(), before):
                project_update_(parameter.data[index], old, lambda d, n=names[0]: memory.project_(d, n))


@torch.no_grad()
def _lora_deltas(method, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """s·B·A·x per adapted layer on fixed recorded inputs x."""
    out = {}
    for path, x in inputs.items():
        a, b = method.lora_weights(path)
        out[path] = method.scaling(path) * (x @ a.T @ b.T)
    return out


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam+project_update"])
def test_lora_projection_keeps_old_outputs_per_layer(tiny_vit, adam):
    """After a later task's SGD steps, Δ(BA)x ≈ 0 for old inputs x, in every adapted layer.

    One old image has 17 tokens < d_in = 32 and z = A x spans 17 < r = 24 dimensions, so at eps = 1 both
    null spaces are non-trivial (A and B keep learning) and the old inputs lie exactly in span(U)."""
    old_image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    runs = {}
    for project in (True, False):
        # (q_proj gets ~1e-3 of v_proj's gradient on this tiny random ViT, too little to drift measurably)
        backbone, method = make_lora(tiny_vit, r=24, targets=("v_proj", "fc1"))
        randomise_lora(method)
        memory = NullSpaceMemory(method.protected_spaces())
        update_bases(method, memory, old_image, threshold=1.0)
        assert memory.rank("layers.0.attention.v_proj.lora_A") == 17
        assert memory.rank("layers.0.mlp.fc1.lora_B") == 17
        with method.record_inputs() as inputs:
            old_features = method.features(old_image)
        before = _lora_deltas(method, inputs)
        weights_before = {p: [w.detach().clone() for w in method.lora_weights(p)] for p in method.layer_paths}
        _train_new_task(method, backbone, memory if project else None, adam=adam)
        after = _lora_deltas(method, inputs)
        change = {path: (after[path] - before[path]).norm() / before[path].norm() for path in before}
        feature_change = (method.features(old_image) - old_features).norm() / old_features.norm()
        moved = {
            path: [
                (w - w0).norm() / w0.norm() for w, w0 in zip(method.lora_weights(path), weights_before[path])
            ]
            for path in method.layer_paths
        }
        runs[project] = (change, feature_change, moved)
    (change_p, feature_p, moved_p), (change_n, feature_n, _) = runs[True], runs[False]
    for path in change_p:
        assert change_n[path] > 1e-2, f"{path}: the unprojected run must actually drift"
        assert change_p[path] < 1e-5, (path, change_p[path], change_n[path])  # float32 rounding
        # not vacuous: with projection both A and B still learn
        assert moved_p[path][0] > 1e-3 and moved_p[path][1] > 1e-3, (path, moved_p[path])
    assert feature_n > 1e-2 and feature_p < 1e-5


def test_lora_projection_with_threshold_below_one_bounds_the_drift(tiny_vit):
    """eps < 1 protects the top-energy directions only: drift is small but no longer zero; B's space
    (z in R^r with 68 rows) fills up completely at eps = 0.999."""
    old_images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    backbone, method = make_lora(tiny_vit, r=4)
    randomise_lora(method)
    memory = NullSpaceMemory(method.protected_spaces())
    update_bases(method, memory, old_images, threshold=0.999)
    assert memory.rank("layers.0.attention.v_proj.lora_B") == 4
    assert 0 < memory.rank("layers.0.attention.v_proj.lora_A") < 32


def test_peft_loads_the_saved_adapter(tiny_vit, pixel_values, tmp_path):
    backbone, method = make_lora(tiny_vit, r=3, targets=("k_proj", "v_proj", "fc1"))
    randomise_lora(method)
    method.save_peft_files(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA"
        and config["r"] == 3
        and config["target_modules"] == ["fc1", "k_proj", "v_proj"]
    )

    peft_model = PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    ours = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(backbone.model).items()}
    theirs = get_peft_model_state_dict(peft_model)
    assert set(theirs) == set(ours) and len(ours) == 30
    for key, tensor in ours.items():
        assert torch.equal(theirs[key], tensor), key
    with torch.no_grad():
        peft_features = peft_model(pixel_values=pixel_values).last_hidden_state[:, 0]
        merged = peft_model.merge_and_unload()(pixel_values=pixel_values).last_hidden_state[:, 0]
    torch.testing.assert_close(peft_features, method.features(pixel_values), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, peft_features, rtol=1e-5, atol=1e-5)


def test_lora_loads_its_peft_files_strictly(tiny_vit, pixel_values, tmp_path):
    _, method = make_lora(tiny_vit, r=3)
    randomise_lora(method)
    method.save_peft_files(tmp_path)
    _, fresh = make_lora(tiny_vit, r=3, seed=0)
    fresh.load_peft_files(tmp_path)
    torch.testing.assert_close(fresh.features(pixel_values), method.features(pixel_values), rtol=0, atol=0)

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    state.pop("base_model.model.layers.4.attention.v_proj.lora_B.weight")
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing LoRA tensors \['base_model.model.layers.4.attention.v_proj"
    ):
        fresh.load_peft_files(tmp_path)
    _, wider = make_lora(tiny_vit, r=5)
    method.save_peft_files(tmp_path)
    with pytest.raises(ValueError, match=r"has shape \(3, 32\), this adapter needs \(5, 32\) \(r=5\)"):
        wider.load_peft_files(tmp_path)
