"""PGP through the real `ContinualTrainer` (docs/ALGORITHM.md §7 items 3-6) on a tiny random ViT.

What is measured:
- no projection while the first task trains (the memory is empty, gradients untouched);
- a projected step changes only the protected slices (DualPrompt key halves), nothing else;
- the change of every protected slice over a whole later task is orthogonal to the bases the task
  was trained with (SGD, and Adam with `project_update=True`), while plain Adam leaks (§2 step 5);
- old-task outputs drift far less with PGP than without;
- feature-mode memory updates do not depend on the order or batching of the memory samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

import tiny_cl  # noqa: E402

from pgp_peft.callbacks import TaskEndFunction  # noqa: E402
from pgp_peft.memory import update_memory  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine they thrash."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class GradProbe(TrainerCallback):
    """Records (task, memory ranks, gradients) at `on_pre_optimizer_step`.

    Registered before the trainer's ProjectionCallback (via `callbacks=`) it sees the raw gradients;
    added with `trainer.add_callback` after construction it sees the projected ones."""

    def __init__(self) -> None:
        self.trainer = None
        self.records: list[tuple[int, dict[str, int], dict[str, torch.Tensor]]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.model
        self.records.append((self.trainer.current_task, model.memory.ranks(), trainable_grads(model)))


class ProjectedGradProbe(GradProbe):
    pass


@pytest.fixture(scope="module")
def splits2():
    return tiny_cl.make_splits(num_tasks=2, train_per_class=12, test_per_class=5)


# ---------------------------------------------------------------------------------- §7.3
@pytest.fixture(scope="module")
def probed_dualprompt_run(splits2, tmp_path_factory):
    """A 2-task DualPrompt-PGP run with gradient probes before and after the projection callback."""
    model = tiny_cl.make_model("dualprompt", num_classes=4)
    raw, projected = GradProbe(), ProjectedGradProbe()
    trainer = tiny_cl.make_trainer(
        model, splits2, str(tmp_path_factory.mktemp("probe")), callbacks=[raw], num_train_epochs=1
    )
    trainer.add_callback(projected)  # after the ProjectionCallback (a subclass: Trainer warns on duplicates)
    raw.trainer = projected.trainer = trainer
    bases = {}
    trainer.add_callback(
        TaskEndFunction(lambda tr, t, r: bases.setdefault(t, tiny_cl.memory_bases(tr.model)))
    )
    trainer.train_continual()
    assert len(raw.records) == len(projected.records) == 2 * tiny_cl.steps_per_epoch(24, 8)
    return model, raw.records, projected.records, bases


def test_no_projection_during_the_first_task(probed_dualprompt_run):
    model, raw, projected, _ = probed_dualprompt_run
    first = [(r, p) for r, p in zip(raw, projected) if r[0] == 0]
    later = [(r, p) for r, p in zip(raw, projected) if r[0] == 1]
    assert first and later
    for (_, ranks, before), (_, _, after) in first:
        assert set(ranks.values()) == {0}, "the memory must be empty while task 0 trains"
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), f"task 0 gradient of {name} was modified"
    # The probes do see the projection once the memory holds task 0's bases.
    for (_, ranks, before), (_, _, after) in later:
        assert any(ranks.values())
        assert not torch.equal(before["method.prefix_pool.g_prompt"], after["method.prefix_pool.g_prompt"])


def test_projected_step_changes_only_protected_slices(probed_dualprompt_run):
    model, raw, projected, bases = probed_dualprompt_run
    heads = model.backbone.num_heads
    layers = {
        "method.prefix_pool.g_prompt": model.method.prefix_pool.g_layers,
        "method.prefix_pool.e_prompt": model.method.prefix_pool.e_layers,
    }
    for (task, _, before), (_, _, after) in zip(raw, projected):
        if task != 1:
            continue
        # Not protected (as in the paper): value halves, E-prompt keys, the head.
        for name in ("method.prefix_pool.e_key", "head.weight", "head.bias"):
            assert torch.equal(before[name], after[name]), name
        for name in layers:
            assert torch.equal(before[name][:, 1], after[name][:, 1]), f"value half of {name} changed"
            assert not torch.equal(before[name][:, 0], after[name][:, 0]), f"key half of {name} not projected"
        # The projected key halves are orthogonal to the bases of task 0, per layer and head.
        for name, layer_ids in layers.items():
            for position, layer in enumerate(layer_ids):
                key_half = after[name][position, 0]
                key_half = key_half.reshape(*key_half.shape[:-1], heads, -1)
                for head in range(heads):
                    basis = bases[0][f"prefix_l{layer}_h{head}"]
                    g = key_half[..., head, :].reshape(-1, basis.shape[0]).double()
                    raw_g = before[name][position, 0].reshape(*key_half.shape)[..., head, :]
                    assert float((g @ basis.double()).norm()) <= 1e-5 * float(raw_g.norm()) + 1e-12


# ---------------------------------------------------------------------------------- §7.4
LEAK_CASES = [
    # method, optim, project_update, leaks?
    ("l2p", "sgd", False, False),
    ("dualprompt", "sgd", False, False),
    ("l2p", "adamw_torch", True, False),
    ("dualprompt", "adamw_torch", True, False),
    ("l2p", "adamw_torch", False, True),
    ("dualprompt", "adamw_torch", False, True),
]


@pytest.mark.parametrize("method,optim,project_update,leaks", LEAK_CASES)
def test_whole_task_update_stays_in_the_null_space(splits2, tmp_path, method, optim, project_update, leaks):
    # SGD steps are ~1e-5 per coordinate here: with U(-1, 1) prompts and keys, float32 rounding of p + Δ
    # alone leaves a ~1e-4 relative leak. Small initial values keep the rounding relative to Δ.
    model = tiny_cl.make_model(
        method,
        num_classes=4,
        project_update=project_update,
        prompt_init="zero" if optim == "sgd" else "uniform",
        key_init="normal" if optim == "sgd" else "uniform",  # zero keys have no cosine gradient
    )
    snapshots = tiny_cl.TaskSnapshots()
    trainer = tiny_cl.make_trainer(
        model,
        splits2,
        str(tmp_path),
        callbacks=[snapshots],
        optim=optim,
        learning_rate=0.05 if optim == "sgd" else 0.01,
        weight_decay=0.0,
    )
    snapshots.trainer = trainer
    trainer.train_continual()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    if optim == "sgd":
        assert isinstance(optimizer, torch.optim.SGD)
        assert all(g["momentum"] == 0 and g["weight_decay"] == 0 for g in optimizer.param_groups)

    active = snapshots.bases[1]  # the bases task 1 was trained with (grown from task 0)
    expected_spaces = [name for name, basis in active.items() if basis.shape[1] > 0]
    assert set(expected_spaces) == set(model.memory.names), "every space must be protected after task 0"
    for old, new in zip(snapshots.before[1], snapshots.after[1]):
        assert float((new - old).norm()) > 0.0, "a protected slice did not move over task 1"
    leak = tiny_cl.relative_leaks(model, snapshots.before[1], snapshots.after[1], active)
    assert {key.rsplit(":", 1)[1] for key in leak} == set(expected_spaces), (
        "a protected space was not measured"
    )
    worst, best = max(leak.values()), min(leak.values())
    print(f"{method} {optim} project_update={project_update}: relative leak max {worst:.2e} min {best:.2e}")
    if leaks:
        assert best > 1e-3, f"Adam without project_update should leak in every space: {leak}"
    else:
        assert worst < 1e-4, {k: v for k, v in leak.items() if v >= 1e-4}


# ---------------------------------------------------------------------------------- §7.6
class FeatureProbe(TrainerCallback):
    """Old-task features/logits at the start of task 1 (i.e. right after task 0 and its memory update)."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels, self.trainer, self.before = pixels, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.current_task == 1:
            self.before = old_task_outputs(self.trainer.model, self.pixels)


@torch.no_grad()
def old_task_outputs(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    out = model(pixels, class_mask="all")
    model.train(was_training)
    return out.features.clone(), out.logits[:, :2].clone()  # task 0 owns classes 0 and 1


def test_old_task_outputs_drift_far_less_with_pgp(splits2, tmp_path):
    pixels = tiny_cl.eval_pixels(splits2.test[0])
    drifts = {}
    for use_pgp in (True, False):
        # L2P with the CLS head: the prompts are protected against the old tokens and prompts, so old
        # CLS outputs stay put. (With the default "prompt" head the prompt tokens' own outputs carry Δp
        # through the residual stream, and PGP only halves the drift on this tiny backbone.)
        model = tiny_cl.make_model(
            "l2p",
            num_classes=4,
            use_pgp=use_pgp,
            head_type="token",
            prompt_threshold=0.99,
            key_threshold=0.99,
        )
        probe = FeatureProbe(pixels)
        trainer = tiny_cl.make_trainer(
            model, splits2, str(tmp_path / str(use_pgp)), callbacks=[probe], learning_rate=0.5
        )
        probe.trainer = trainer
        trainer.train_continual()
        features, logits = old_task_outputs(model, pixels)
        drifts[use_pgp] = (
            float((features - probe.before[0]).norm() / probe.before[0].norm()),
            float((logits - probe.before[1]).norm() / probe.before[1].norm()),
        )
    print(f"relative drift of task-0 (features, logits): PGP {drifts[True]}, no PGP {drifts[False]}")
    for kind in (0, 1):
        assert drifts[False][kind] > 1e-2, "the baseline must drift for the comparison to mean anything"
        assert drifts[True][kind] * 50 < drifts[False][kind], drifts


# ---------------------------------------------------------------------------------- §7.5
def _batches(pixels: torch.Tensor, order: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"pixel_values": pixels[order[i : i + batch_size]]} for i in range(0, len(order), batch_size)]


def _projectors(model) -> dict[str, torch.Tensor]:
    out = {}
    for name in model.memory.names:
        basis = model.memory.basis(name).double()
        out[name] = basis @ basis.T
    return out


@pytest.mark.parametrize("method", ["l2p", "dualprompt"])
def test_feature_mode_memory_is_invariant_to_sample_order(splits2, method):
    pixels = [tiny_cl.eval_pixels(splits2.train[t]) for t in range(2)]
    models = [tiny_cl.make_model(method, num_classes=4, memory_samples=None) for _ in range(3)]
    generator = torch.Generator().manual_seed(0)
    for task in range(2):
        n = len(pixels[task])
        plans = [
            (torch.arange(n), 8),  # in order, batches of 8
            (torch.randperm(n, generator=generator), 5),  # shuffled, uneven batches
            (torch.arange(n)[: n // 2], 8),  # half of the samples: must give different bases
        ]
        for model, (order, size) in zip(models, plans):
            update_memory(model, _batches(pixels[task], order, size), task)
        a, b, half = (_projectors(m) for m in models)
        assert models[0].memory.ranks() == models[1].memory.ranks()
        assert any(r > 0 for r in models[0].memory.ranks().values())
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), (task, name)
        differs = max(float((a[name] - half[name]).abs().max()) for name in a)
        assert differs > 1e-3, "the comparison must be able to see a different sample set"


def test_dualprompt_memory_skips_the_query_pass_but_records_the_same_queries():
    """The memory pass uses the task's known slots without the frozen query pass: same rows as a
    full forward with the prompt mask forced."""
    from pgp_peft.memory import collect_feature_grams

    model = tiny_cl.make_model("dualprompt", num_classes=4).eval()
    pixel_values = torch.rand(6, 3, 16, 16)
    grams = collect_feature_grams(model, [pixel_values], task_id=1, memory_samples=None)

    expected: dict[str, torch.Tensor] = {}

    def record(layer, query):
        for head, name in enumerate(model.method.prefix_space_names(layer)):
            rows = query[:, head].reshape(-1, query.shape[-1]).double()
            expected[name] = expected.get(name, 0) + rows.t() @ rows

    with torch.no_grad(), model.backbone.recording(query_recorder=record):
        model.forward_features(pixel_values, 1, use_task_slot=True)
    assert set(expected) == set(grams)
    for name, gram in expected.items():
        assert torch.allclose(grams[name], gram, rtol=1e-6, atol=1e-8), name


def _reference_dualprompt():
    """A tiny reference-mode DualPrompt (memory_samples must equal D = 32 there)."""
    return tiny_cl.make_model(
        "dualprompt", num_classes=4, projection_space="reference", memory_samples=32
    ).eval()


def _prefix_rows(model, pixel_values: torch.Tensor, slots: torch.Tensor) -> dict[str, torch.Tensor]:
    rows: dict[str, torch.Tensor] = {}

    def record(layer, query):
        rows[f"prefix_l{layer}"] = query.flatten(1).float()

    with torch.no_grad():
        prefixes = model.method.prefix_pool.prefixes(pixel_values.shape[0], slots)
        model.backbone(pixel_values, prefixes=prefixes, query_recorder=record)
    return rows


def test_reference_dualprompt_memory_selects_e_prompts_as_the_reference_memory_pass():
    """Reference `get_prefix_matrix`: `model(input)` in eval mode, no task id, no frozen CLS features,
    so each sample picks its E-prompt by key against the token-wise max of its embedded input, not
    the task's slot (which feature mode uses)."""
    from pgp_peft.memory import collect_reference_rows

    torch.manual_seed(0)
    model = _reference_dualprompt()
    pixel_values = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        query = model.backbone.embeddings(pixel_values).amax(dim=1)  # (B, D)
        keys = -query.mean(0).expand(model.config.pool_size, -1).clone()
        keys[2] = query.mean(0)  # slot 2 matches every sample's max-pooled embedding
        model.method.prefix_pool.e_key.copy_(keys)
        frozen_cls = model.backbone.query(pixel_values)
    from pgp_peft.methods.prompt_selection import task_slots

    assert task_slots(model.method, 0, 5, pixel_values.device, use_task_slot=True).tolist() == [[0]] * 5

    rows = collect_reference_rows(model, [pixel_values], task_id=0, memory_samples=None)
    expected = _prefix_rows(model, pixel_values, torch.full((5, 1), 2))
    task_slot = _prefix_rows(model, pixel_values, torch.zeros(5, 1, dtype=torch.long))
    assert set(rows) == {f"prefix_l{layer}" for layer in (0, 1, 2, 3, 4)}
    for name in ("prefix_l2", "prefix_l3", "prefix_l4"):  # E-prompt layers: slot 2's prefixes
        assert torch.equal(rows[name], expected[name]), name
    assert not torch.allclose(rows["prefix_l3"], task_slot["prefix_l3"])

    # The query is the max-pooled embedding, not the frozen CLS feature: keys that match the CLS
    # features instead still give the slot the embedding query prefers.
    with torch.no_grad():
        keys = torch.nn.functional.normalize(torch.randn(model.config.pool_size, 32), dim=-1)
        keys[1] = torch.nn.functional.normalize(frozen_cls.mean(0), dim=-1)
        model.method.prefix_pool.e_key.copy_(keys)
    by_embedding = torch.nn.functional.normalize(query, dim=-1) @ keys.t()
    by_cls = torch.nn.functional.normalize(frozen_cls, dim=-1) @ keys.t()
    assert not torch.equal(by_embedding.argmax(-1), by_cls.argmax(-1))  # the setup tells them apart
    rows = collect_reference_rows(model, [pixel_values], task_id=0, memory_samples=None)
    expected = _prefix_rows(model, pixel_values, by_embedding.argmax(-1, keepdim=True))
    assert torch.equal(rows["prefix_l3"], expected["prefix_l3"])
    # Per sample (the reference's memory loader has batch size 1): no batch-wise vote.
    alone = collect_reference_rows(model, [pixel_values[1:2]], task_id=0, memory_samples=None)
    assert torch.equal(rows["prefix_l3"][1:2], alone["prefix_l3"])


@pytest.mark.parametrize("space", ["feature", "reference"])
def test_memory_samples_use_the_training_transform_in_reference_mode(splits2, tmp_path, space):
    """The reference draws its memory samples from the training loader (training transform) for every
    method; feature mode keeps the eval transform (no augmentation noise in the protected spaces)."""
    from pgp_peft.data import build_transform, memory_subset
    from pgp_peft.trainer import ContinualTrainer

    eval_transform = build_transform(tiny_cl.IMAGE_SIZE)

    def train_transform(batch):  # distinguishable from the eval transform
        out = eval_transform(batch)
        out["pixel_values"] = out["pixel_values"] * 0.5
        return out

    model = tiny_cl.make_model(
        "dualprompt", num_classes=4, projection_space=space, memory_samples=32 if space == "reference" else 8
    )
    trainer = ContinualTrainer(
        model,
        tiny_cl.training_args(str(tmp_path)),
        splits=splits2,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
    memory = torch.cat([batch["pixel_values"] for batch in trainer._memory_batches(0)])
    rows = memory_subset(splits2.train[0], model.config.memory_samples, trainer.args.seed + 0)
    plain = eval_transform({"image": list(rows["image"]), "labels": list(rows["labels"])})["pixel_values"]
    expected = plain * 0.5 if space == "reference" else plain
    assert torch.equal(memory, expected)
