"""LoRA-PGP: peft LoRA injection, protected spaces, the Δ(BA)x = 0 guarantee, peft interop, the trainer."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

import tiny_cl  # noqa: E402

from pgp_peft import PGPModel, PromptGradientProjectionConfig, get_pgp_model  # noqa: E402
from pgp_peft.backbones import build_backbone  # noqa: E402
from pgp_peft.memory import update_memory  # noqa: E402
from pgp_peft.methods.lora import LoraPGPConfig, LoraPGPMethod  # noqa: E402

Config = PromptGradientProjectionConfig


def make_lora(tiny_vit, r: int = 4, targets=("q_proj", "v_proj"), seed: int = 0, **overrides) -> PGPModel:
    config = Config.lora(num_classes=5, r=r, lora_alpha=2.0 * r, target_modules=list(targets), **overrides)
    torch.manual_seed(seed)
    return get_pgp_model(tiny_vit(seed=seed), config)


@torch.no_grad()
def randomise_lora(model: PGPModel, seed: int = 1) -> None:
    """Stand-in for a trained adapter: B is zero after peft's init, give it (and A) random values."""
    generator = torch.Generator().manual_seed(seed)
    for path in model.method.layer_paths:
        a, b = model.method.lora_weights(path)
        a.copy_(torch.randn(a.shape, generator=generator) * 0.3)
        b.copy_(torch.randn(b.shape, generator=generator) * 0.3)


def test_lora_config_preset_and_round_trip():
    config = Config.lora(num_classes=10, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    assert type(config) is LoraPGPConfig and config.method == "lora"
    assert (config.r, config.lora_alpha, config.target_modules) == (8, 16, ["q_proj", "v_proj"])
    assert Config.from_dict(json.loads(config.to_json_string())) == config
    default = Config.lora()
    assert (default.r, default.lora_alpha, default.target_modules) == (10, 10.0, ["k_proj", "v_proj"])


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"r": 0}, "r"),
        ({"lora_alpha": -1.0}, "lora_alpha"),
        ({"lora_alpha": True}, "lora_alpha"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"projection_space": "reference"}, "projection_space"),
        ({"lora_b_threshold": 1.5}, "lora_b_threshold"),
        ({"lora_b_threshold": "0.9"}, "lora_b_threshold"),
    ],
)
def test_lora_bad_config_values_name_the_field(overrides, key):
    with pytest.raises(ValueError, match=rf"PromptGradientProjectionConfig\.{key}:"):
        Config.lora(num_classes=4, **overrides)


def test_lora_unknown_target_names_the_linears(tiny_vit):
    with pytest.raises(
        ValueError, match=r"target_modules: \['query'\].*Linear layers of this ViTModel.*q_proj"
    ):
        make_lora(tiny_vit, targets=("query",))


def test_lora_is_injected_by_peft_and_starts_as_the_backbone(tiny_vit, pixel_values):
    plain = build_backbone(tiny_vit())
    model = make_lora(tiny_vit)
    method = model.method
    assert isinstance(method, LoraPGPMethod)
    assert method.layer_paths == [f"layers.{i}.attention.{n}" for i in range(5) for n in ("q_proj", "v_proj")]
    for path in method.layer_paths:
        assert isinstance(model.backbone.model.get_submodule(path), PeftLoraLinear)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"backbone.model.{p}.lora_{m}.default.weight" for p in method.layer_paths for m in "AB"}
    assert trainable == expected | {"head.weight", "head.bias"}
    # peft initialises B = 0: the adapted model is the backbone until it is trained
    model.eval()
    torch.testing.assert_close(model(pixel_values).features, plain(pixel_values)[:, 0], rtol=0, atol=0)


def test_lora_refuses_a_backbone_that_already_has_an_adapter(tiny_vit):
    model = make_lora(tiny_vit)
    with pytest.raises(ValueError, match="already carries peft adapters"):
        get_pgp_model(model.backbone.model, Config.lora(num_classes=5))


def test_lora_spaces_and_slices(tiny_vit):
    method = make_lora(tiny_vit, r=3).method
    spaces = method.protected_spaces()
    assert len(spaces) == 20
    assert spaces["layers.2.attention.v_proj.lora_A"] == 32  # d_in
    assert spaces["layers.2.attention.v_proj.lora_B"] == 3  # r
    slices = method.protected_slices()
    assert len(slices) == 20
    a, b = method.lora_weights("layers.0.attention.q_proj")
    assert slices[0].parameter is a and slices[0].spaces == ["layers.0.attention.q_proj.lora_A"]
    assert slices[1].parameter is b and slices[1].spaces == ["layers.0.attention.q_proj.lora_B"]
    assert a.shape == (3, 32) and b.shape == (32, 3)
    assert method.scaling("layers.0.attention.q_proj") == pytest.approx(2.0)


def test_lora_memory_rows_are_layer_inputs_and_down_projections(tiny_vit, pixel_values):
    model = make_lora(tiny_vit, r=3)
    randomise_lora(model)
    seen = {}
    layer = model.backbone.model.get_submodule("layers.1.attention.v_proj")
    handle = layer.base_layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].clone()))
    rows = model.method.memory_rows(pixel_values, task_id=0)
    handle.remove()
    assert set(rows) == set(model.method.protected_spaces())
    x = rows["layers.1.attention.v_proj.lora_A"]
    assert x.shape == (4 * 17, 32)  # every token (CLS + 16 patches) of every image
    torch.testing.assert_close(x, seen["x"].reshape(-1, 32))
    a, _ = model.method.lora_weights("layers.1.attention.v_proj")
    torch.testing.assert_close(rows["layers.1.attention.v_proj.lora_B"], x @ a.detach().T)
    torch.testing.assert_close(rows["layers.1.attention.q_proj.lora_A"], x)  # q and v read the same input


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
    model = get_pgp_model(clip, Config.lora(num_classes=4, r=2, target_modules=["q_proj", "v_proj"]))
    assert sorted(model.method.layer_paths) == [
        f"vision_model.encoder.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")
    ]
    assert not any(isinstance(m, PeftLoraLinear) for m in clip.text_model.modules())
    rows = model.method.memory_rows(torch.rand(2, 3, 16, 16), task_id=0)
    assert rows["vision_model.encoder.layers.0.self_attn.q_proj.lora_B"].shape == (2 * 17, 2)
    assert model(torch.rand(2, 3, 16, 16)).logits.shape == (2, 4)


def _train_new_task(model: PGPModel, steps: int = 6, adam: bool = False) -> None:
    """SGD (or Adam with `project_update`) on a new task's batch, through PGPModel's projection calls in
    the trainer's order: backward, project the gradients, step, (project the update)."""
    generator = torch.Generator().manual_seed(7)
    images = torch.rand(8, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    model.register_task_classes(1, range(5))
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=0.05) if adam else torch.optim.SGD(parameters, lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(images, labels=labels, task_id=1).loss.backward()
        model.project_gradients_()
        snapshots = model.snapshot_protected() if adam else None
        optimizer.step()
        if snapshots is not None:
            model.project_updates_(snapshots)


@torch.no_grad()
def _lora_deltas(method: LoraPGPMethod, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """s·B·A·x per adapted layer on fixed recorded inputs x."""
    out = {}
    for path, x in inputs.items():
        a, b = method.lora_weights(path)
        out[path] = method.scaling(path) * (x @ a.T @ b.T)
    return out


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam+project_update"])
def test_lora_projection_keeps_old_outputs_per_layer(tiny_vit, adam):
    """After a later task's steps, Δ(BA)x ≈ 0 for old inputs x, in every adapted layer.

    One old image has 17 tokens < d_in = 32 and z = A x spans 17 < r = 24 dimensions, so at eps = 1 both
    null spaces are non-trivial (A and B keep learning) and the old inputs lie exactly in span(U).
    (q_proj gets ~1e-3 of v_proj's gradient on this tiny random ViT, too little to drift measurably.)"""
    old_image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    runs = {}
    for use_pgp in (True, False):
        model = make_lora(
            tiny_vit,
            r=24,
            targets=("v_proj", "fc1"),
            prompt_threshold=1.0,
            use_pgp=use_pgp,
            project_update=adam,
        )
        method = model.method
        randomise_lora(model)
        model.register_task_classes(0, [0])
        update_memory(model, [old_image], task_id=0)
        if use_pgp:
            assert model.memory.rank("layers.0.attention.v_proj.lora_A") == 17
            assert model.memory.rank("layers.0.mlp.fc1.lora_B") == 17
        model.eval()
        with torch.no_grad(), method.record_inputs() as inputs:
            old_features = model(old_image).features
        before = _lora_deltas(method, inputs)
        weights = {p: [w.detach().clone() for w in method.lora_weights(p)] for p in method.layer_paths}
        _train_new_task(model, adam=adam)
        model.eval()
        after = _lora_deltas(method, inputs)
        change = {path: float((after[path] - before[path]).norm() / before[path].norm()) for path in before}
        with torch.no_grad():
            feature_change = float((model(old_image).features - old_features).norm() / old_features.norm())
        moved = {
            path: [
                float((w.detach() - w0).norm() / w0.norm())
                for w, w0 in zip(method.lora_weights(path), weights[path])
            ]
            for path in method.layer_paths
        }
        runs[use_pgp] = (change, feature_change, moved)
    (change_p, feature_p, moved_p), (change_n, feature_n, _) = runs[True], runs[False]
    for path in change_p:
        assert change_n[path] > 1e-2, f"{path}: the unprojected run must actually drift"
        assert change_p[path] < 1e-5, (path, change_p[path], change_n[path])  # float32 rounding
        # not vacuous: with projection both A and B still learn
        assert moved_p[path][0] > 1e-4 and moved_p[path][1] > 1e-4, (path, moved_p[path])
    assert feature_n > 1e-2 and feature_p < 1e-5


def test_lora_b_threshold_applies_to_the_b_spaces_only(tiny_vit):
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    ranks = {}
    for b_threshold in (None, 0.5):
        model = make_lora(tiny_vit, r=4, prompt_threshold=0.999, lora_b_threshold=b_threshold)
        randomise_lora(model)
        assert model.method.threshold("layers.0.attention.v_proj.lora_B") == (b_threshold or 0.999)
        assert model.method.threshold("layers.0.attention.v_proj.lora_A") == 0.999
        update_memory(model, [images], task_id=0)
        ranks[b_threshold] = model.memory.ranks()
    a_spaces = [name for name in ranks[None] if name.endswith(".lora_A")]
    b_spaces = [name for name in ranks[None] if name.endswith(".lora_B")]
    assert all(ranks[0.5][name] == ranks[None][name] for name in a_spaces)
    assert all(ranks[0.5][name] < ranks[None][name] for name in b_spaces)


def test_lora_threshold_below_one_fills_the_small_b_space(tiny_vit):
    """eps < 1 protects the top-energy directions of x; z lives in only r dimensions, and 68 token rows
    span all of them at eps = 0.999 (B is then frozen, A keeps a null space)."""
    model = make_lora(tiny_vit, r=4, prompt_threshold=0.999)
    randomise_lora(model)
    update_memory(model, [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))], task_id=0)
    assert model.memory.rank("layers.0.attention.v_proj.lora_B") == 4
    assert 0 < model.memory.rank("layers.0.attention.v_proj.lora_A") < 32


def test_saved_lora_adapter_loads_in_peft_and_in_pgp_peft(tiny_vit, pixel_values, tmp_path):
    model = make_lora(tiny_vit, r=3, targets=("k_proj", "v_proj", "fc1"))
    randomise_lora(model)
    model.register_task_classes(0, [0, 1])
    update_memory(model, [pixel_values], task_id=0)
    model.eval()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= files
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 3
    assert peft_config["target_modules"] == ["fc1", "k_proj", "v_proj"]
    ours = load_file(str(tmp_path / "model.safetensors"))
    assert not any(name.startswith("backbone.") for name in ours)
    assert "lora.layers.0.mlp.fc1.lora_B.weight" in ours and "head.weight" in ours

    # peft itself: identical LoRA weights, identical features
    peft_model = PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    theirs = get_peft_model_state_dict(peft_model)
    assert len(theirs) == 30
    for path in model.method.layer_paths:
        a, b = model.method.lora_weights(path)
        assert torch.equal(theirs[f"base_model.model.{path}.lora_A.weight"], a)
        assert torch.equal(theirs[f"base_model.model.{path}.lora_B.weight"], b)
        assert torch.equal(ours[f"lora.{path}.lora_A.weight"], a)
    with torch.no_grad():
        features = model(pixel_values).features
        peft_features = peft_model(pixel_values=pixel_values).last_hidden_state[:, 0]
        merged = peft_model.merge_and_unload()(pixel_values=pixel_values).last_hidden_state[:, 0]
    torch.testing.assert_close(peft_features, features, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, features, rtol=1e-5, atol=1e-5)

    # pgp_peft: everything back (LoRA, head, bases, classes), and it keeps learning
    loaded = PGPModel.from_pretrained(tmp_path, base_model=tiny_vit())
    assert isinstance(loaded.method, LoraPGPMethod) and loaded.memory.ranks() == model.memory.ranks()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)
    loaded.train()
    loaded.register_task_classes(1, [2, 3])
    loaded(pixel_values, labels=torch.tensor([2, 3, 2, 3]), task_id=1).loss.backward()
    loaded.project_gradients_()
    assert all(p.grad is not None for p, _, _ in loaded.method.protected_slices())


def test_lora_run_resumed_from_a_task_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """ContinualTrainer with LoRA-PGP: 3 tasks in one go vs task 0, then a fresh process state (new model,
    new trainer) resuming from checkpoint-task-0: the same accuracies, bases and LoRA weights."""
    splits = tiny_cl.make_splits(num_tasks=3)
    adam = dict(optim="adamw_torch", learning_rate=0.01, weight_decay=0.0, num_train_epochs=1)

    def run(output_dir, resume: bool):
        model = tiny_cl.make_model("lora", num_classes=6, project_update=True)
        trainer = tiny_cl.make_trainer(model, splits, str(output_dir), **adam)
        return model, trainer.train_continual(resume_from_checkpoint=True if resume else None)

    full_model, full = run(tmp_path / "full", resume=False)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-task-0", resumed_dir / "checkpoint-task-0")
    model, resumed = run(resumed_dir, resume=True)
    assert resumed.accuracy.to_dict() == full.accuracy.to_dict()
    assert resumed.memory_ranks == full.memory_ranks
    expected = full_model.adapter_state_dict()
    assert [k for k, v in model.adapter_state_dict().items() if not torch.equal(v, expected[k])] == []
    lora_b = expected["lora.layers.4.attention.v_proj.lora_B.weight"]
    assert float(lora_b.abs().sum()) > 0  # the LoRA matrices did train


def test_lora_bf16_keeps_float32_adapter_and_projects(tmp_path, tiny_vit, pixel_values):
    """bf16 autocast (TrainingArguments(bf16=True)): LoRA weights and their gradients stay float32 and the
    whole-task change of task 2 (SGD) stays out of the protected spaces; a bf16 backbone gets float32 LoRA."""
    from transformers import TrainerCallback

    splits = tiny_cl.make_splits(num_tasks=2)
    model = tiny_cl.make_model("lora", num_classes=4)
    seen: set[tuple[torch.dtype, torch.dtype]] = set()

    class DtypeProbe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.update((p.dtype, p.grad.dtype) for p, _, _ in model.protected_slices() if p.grad is not None)

    snapshots = tiny_cl.TaskSnapshots()
    trainer = tiny_cl.make_trainer(
        model, splits, str(tmp_path), callbacks=[DtypeProbe(), snapshots], bf16=True
    )
    snapshots.trainer = trainer
    trainer.train_continual()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert seen == {(torch.float32, torch.float32)}
    # The change of task 2 inside the protected spaces, relative to the whole LoRA change of task 2. (Not
    # per slice: a full B space, or a q_proj whose new inputs already lie in span(U), has a float-noise
    # change whose direction is arbitrary.)
    bases = snapshots.bases[1]
    deltas = [
        (after.double() - before.double(), names[0])
        for before, after, (_, _, names) in zip(
            snapshots.before[1], snapshots.after[1], model.protected_slices()
        )
    ]
    total = sum(float(delta.norm()) ** 2 for delta, _ in deltas) ** 0.5
    inside = max(float((delta @ bases[name].double()).norm()) for delta, name in deltas)
    assert total > 1e-3 and inside < 1e-4 * total, (inside, total)  # float32 rounding of the steps

    half = get_pgp_model(tiny_vit().to(torch.bfloat16), Config.lora(num_classes=4, r=2))
    assert {w.dtype for p in half.method.layer_paths for w in half.method.lora_weights(p)} == {torch.float32}
    rows = half.method.memory_rows(pixel_values.to(torch.bfloat16), task_id=0)
    assert {r.dtype for r in rows.values()} == {torch.float32}
