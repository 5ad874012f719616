"""CLIP-PGP (`pgp_peft.methods.clip` + `heads.TextContextHead`) on a tiny random CLIPModel and a tiny BPE tokenizer written here (no downloads)."""

from __future__ import annotations

import copy
import json
import string
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_assets import tiny_clip_config
from transformers import CLIPModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

from pgp_peft.config import PromptGradientProjectionConfig
from pgp_peft.heads import TextContextHead
from pgp_peft.model import PGPModel, get_pgp_model

CLASS_NAMES = ["cat", "dog", "aquarium_fish", "bee", "owl", "ant"]
CONTEXT = 4
IMAGE_PROMPT = 3


def make_tokenizer(directory, eos_last: bool = False) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters (no merges), from vocab.json + merges.txt.

    eos_last: give <|endoftext|> the largest id, as the real CLIP vocabulary does (legacy configs pool there).
    """
    letters = list(string.ascii_lowercase)
    words = [*letters, *[c + "</w>" for c in letters], ".", ".</w>"]
    tokens = (
        ["<|startoftext|>", *words, "<|endoftext|>"]
        if eos_last
        else ["<|startoftext|>", "<|endoftext|>", *words]
    )
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(directory)
    ids = tok("cat.")["input_ids"]
    assert len(ids) == 6 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    return tok


def make_clip(tokenizer, eos_token_id: int | None = None) -> CLIPModel:
    torch.manual_seed(0)
    config = tiny_clip_config(tokenizer, eos_token_id=eos_token_id, max_position_embeddings=40)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tiny_clip_tokenizer"))


@pytest.fixture(scope="module")
def clip_template(tokenizer):
    return make_clip(tokenizer)


@pytest.fixture
def clip(clip_template):
    return copy.deepcopy(clip_template)


def make_config(**overrides):
    values = dict(
        class_names=CLASS_NAMES,
        text_context_length=CONTEXT,
        image_prompt_length=IMAGE_PROMPT,
        prompt_init="normal",
    )
    values.update(overrides)
    return PromptGradientProjectionConfig.clip(**values)


@pytest.fixture
def model(clip, tokenizer):
    torch.manual_seed(1)
    pgp = PGPModel(make_config(), base_model=clip, tokenizer=tokenizer)
    pgp.register_task_classes(0, [0, 1])
    pgp.register_task_classes(1, [2, 3])
    return pgp


def pixels(batch=3, seed=2):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def plain_text_features(clip, tokenizer, texts):
    ids = tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    return ids, clip.get_text_features(ids).pooler_output


# ------------------------------------------------------------------ construction
def test_preset_initialises_image_prompt_and_contexts_as_the_reference(clip, tokenizer):
    """Reference CLIP-PGP: the image prompt is an nn.Linear(D, L) weight (U(±1/√D)), every CoOp
    context N(0, 0.02²)."""
    torch.manual_seed(0)
    config = PromptGradientProjectionConfig.clip(
        class_names=CLASS_NAMES, text_context_length=CONTEXT, image_prompt_length=IMAGE_PROMPT
    )
    assert config.prompt_init == "linear"
    pgp = PGPModel(config, base_model=clip, tokenizer=tokenizer)
    prompt = pgp.method.image_prompt.prompt
    assert prompt.abs().max() <= prompt.shape[-1] ** -0.5
    contexts = torch.cat([context.flatten() for context in pgp.head.text_contexts])
    assert abs(contexts.std().item() - 0.02) < 0.004 and abs(contexts.mean().item()) < 0.004


def test_get_pgp_model_dispatches_and_shapes(clip, tokenizer):
    pgp = get_pgp_model(clip, make_config(), tokenizer=tokenizer)
    assert isinstance(pgp.head, TextContextHead)
    assert pgp.num_classes == len(CLASS_NAMES) and pgp.head.max_tasks == len(CLASS_NAMES)
    assert pgp.head.text_context.shape == (len(CLASS_NAMES), CONTEXT, 32)
    assert abs(float(pgp.head.text_context.detach().std()) - 0.02) < 0.005
    assert pgp.method.image_prompt.prompt.shape == (IMAGE_PROMPT, 32)
    assert pgp.memory.names == ["image_prompt"]


def test_missing_class_names_raise_with_guidance(clip, tokenizer):
    with pytest.raises(ValueError, match=r"class_names.*ClassLabel"):
        PGPModel(make_config(class_names=None, num_classes=6), base_model=clip, tokenizer=tokenizer)


def test_missing_tokenizer_raises_clear_error(clip, tmp_path):
    with pytest.raises(ValueError, match=r"no base_model_name_or_path.*tokenizer="):
        PGPModel(make_config(), base_model=clip)
    empty = tmp_path / "clip_without_tokenizer"
    empty.mkdir()
    with pytest.raises(OSError, match=r"could not load it from .*clip_without_tokenizer.*tokenizer="):
        PGPModel(make_config(base_model_name_or_path=str(empty)), base_model=clip)


def test_tokenizer_loaded_from_base_model_directory(clip, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    pgp = PGPModel(make_config(base_model_name_or_path=str(tmp_path)), base_model=clip)
    expected = tokenizer("cat.")["input_ids"]
    ids = pgp.head.text_input_ids[0].tolist()
    assert ids[:1] + ids[1 + CONTEXT : CONTEXT + len(expected)] == expected


def test_needs_full_clip_model_and_short_enough_prompts(clip_template, tokenizer):
    vision = CLIPVisionModel(CLIPVisionConfig(**clip_template.config.vision_config.to_dict()))
    with pytest.raises(TypeError, match="full transformers.CLIPModel"):
        PGPModel(make_config(), base_model=vision, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        PGPModel(
            make_config(text_context_length=30), base_model=copy.deepcopy(clip_template), tokenizer=tokenizer
        )


# ------------------------------------------------------------------ image side
def test_unprompted_pass_is_clips_image_features_bitwise(clip_template, model):
    x = pixels()
    expected = clip_template.get_image_features(x).pooler_output  # the untouched model (plain sdpa)
    with torch.no_grad():
        got = model.head.image_features(model.backbone(x)[:, 0])
    assert torch.equal(got, expected)


def test_image_prompt_enters_before_pre_layernorm(model):
    seen = {}
    hook = model.backbone.model.vision_model.pre_layrnorm.register_forward_hook(
        lambda module, args, output: seen.update(inputs=args[0], outputs=output)
    )
    try:
        with torch.no_grad():
            features = model.head.image_features(model.forward_features(pixels()).features)
    finally:
        hook.remove()
    num_patches = (16 // 4) ** 2
    assert seen["inputs"].shape == (3, 1 + IMAGE_PROMPT + num_patches, 32)
    # CLIP's image prompt gets no position embedding (as the CLIP-PGP reference): the raw prompt goes in.
    assert torch.equal(seen["inputs"][0, 1 : 1 + IMAGE_PROMPT], model.method.image_prompt.prompt)
    assert torch.allclose(seen["outputs"].mean(-1), torch.zeros(()), atol=1e-5)
    assert features.shape == (3, 16)


def test_memory_rows_are_the_embeddings_the_prompt_meets(model):
    x = pixels()
    rows = model.method.embedding_rows(x)
    assert rows.shape == (3, 1 + 16, 32) and not rows.requires_grad
    assert torch.equal(rows, model.backbone.model.vision_model.embeddings(x))


# ------------------------------------------------------------------ text side
def test_context_hook_is_inert_outside_class_prompts(model, clip_template, tokenizer):
    """The hook on token_embedding changes nothing for other callers of the text tower, also after use."""
    ids, expected = plain_text_features(clip_template, tokenizer, ["cat.", "aquarium fish.", "a bee."])
    with torch.no_grad():
        model.head.class_text_features(model.class_task)
        got = model.backbone.model.get_text_features(ids).pooler_output
    assert torch.equal(got, expected)
    assert model.head._pending_contexts is None


def test_class_prompts_are_sos_context_name_eos(model, tokenizer):
    """A context equal to the embeddings of 'x x x x' gives CLIP's features of 'x x x x {name}.'."""
    x_id = tokenizer.convert_tokens_to_ids("x</w>")
    words = model.backbone.model.text_model.embeddings.token_embedding.weight[x_id].detach()
    with torch.no_grad():
        for context in model.head.text_contexts:
            context.copy_(words.expand(CONTEXT, -1))
        got = model.head.class_text_features(model.class_task)
    texts = [" ".join(["x"] * CONTEXT) + " " + name.replace("_", " ") + "." for name in CLASS_NAMES]
    _, expected = plain_text_features(model.backbone.model, tokenizer, texts)
    assert torch.equal(got, expected)


def test_legacy_eos_config_pools_at_the_eos_token(tmp_path):
    """openai/clip-* configs keep eos_token_id=2, and CLIPTextModel then pools at argmax(input_ids)."""
    tok = make_tokenizer(tmp_path, eos_last=True)
    clip = make_clip(tok, eos_token_id=2)
    pgp = PGPModel(make_config(), base_model=clip, tokenizer=tok)
    words = clip.text_model.embeddings.token_embedding.weight[tok.convert_tokens_to_ids("x</w>")].detach()
    with torch.no_grad():
        for context in pgp.head.text_contexts:
            context.copy_(words.expand(CONTEXT, -1))
        got = pgp.head.class_text_features(pgp.class_task)
    texts = [" ".join(["x"] * CONTEXT) + " " + name.replace("_", " ") + "." for name in CLASS_NAMES]
    _, expected = plain_text_features(clip, tok, texts)
    assert torch.equal(got, expected)
    (tmp_path / "eos_first").mkdir()
    small = make_tokenizer(tmp_path / "eos_first")  # EOS is id 1, not the largest
    with pytest.raises(ValueError, match="legacy eos_token_id=2"):
        PGPModel(make_config(), base_model=make_clip(small, eos_token_id=2), tokenizer=small)


def test_each_class_uses_the_context_of_its_task(model):
    with torch.no_grad():
        before = model.head.class_text_features(model.class_task)
        model.head.text_contexts[1].add_(torch.randn(CONTEXT, 32))  # not a constant: LayerNorm removes those
        after = model.head.class_text_features(model.class_task)
    changed = (before - after).abs().amax(dim=-1) > 1e-4
    assert changed.tolist() == [False, False, True, True, False, False]  # classes 2, 3 belong to task 1
    # unseen classes (4, 5) use context 0 until registered; then their own task's context
    model.register_task_classes(2, [4, 5])
    with torch.no_grad():
        model.head.text_contexts[2].add_(torch.randn(CONTEXT, 32))
        registered = model.head.class_text_features(model.class_task)
    assert not torch.allclose(registered[4:], after[4:])
    assert torch.equal(registered[:4], after[:4])


# ------------------------------------------------------------------ logits
def test_logits_are_scaled_cosine_with_class_masks(model):
    model.eval()
    x = pixels()
    with torch.no_grad():
        out = model(x)  # class-IL over the seen classes
        image = torch.nn.functional.normalize(
            model.head.image_features(model.forward_features(x).features), dim=-1
        )
        text = torch.nn.functional.normalize(model.head.class_text_features(model.class_task), dim=-1)
        expected = model.backbone.model.logit_scale.exp() * image @ text.t()
        task_il = model(x, task_id=torch.tensor([0, 1, 1]), class_mask="task")
        everything = model(x, class_mask="all")
    assert out.logits.shape == (3, 6)
    assert torch.isinf(out.logits[:, 4:]).all() and torch.isfinite(out.logits[:, :4]).all()
    assert torch.allclose(out.logits[:, :4], expected[:, :4], atol=1e-5)
    assert torch.isfinite(everything.logits).all()
    finite = torch.isfinite(task_il.logits)
    assert (
        finite.tolist()
        == [[True, True, False, False, False, False]] + [[False, False, True, True, False, False]] * 2
    )


def test_only_image_prompt_and_current_context_get_gradient(model):
    model.train()
    model.begin_task(1)
    out = model(pixels(), labels=torch.tensor([2, 3, 2]), task_id=1)
    out.loss.backward()
    assert (
        model.method.image_prompt.prompt.grad is not None
        and model.method.image_prompt.prompt.grad.abs().sum() > 0
    )
    assert model.head.text_contexts[1].grad is not None and model.head.text_contexts[1].grad.abs().sum() > 0
    assert all(model.head.text_contexts[t].grad is None for t in range(model.head.max_tasks) if t != 1)
    assert all(p.grad is None for p in model.backbone.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"method.image_prompt.prompt", "head.text_contexts.1"}
    with pytest.raises(ValueError, match="has no text context"):
        model.begin_task(model.head.max_tasks)


def test_training_a_frozen_context_warns(model):
    model.train()  # begin_task(1) not called: context 1 is frozen
    with pytest.warns(UserWarning, match=r"begin_task\(1\)"):
        model(pixels(), labels=torch.tensor([2, 3, 2]), task_id=1)
    model.begin_task(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(pixels(), labels=torch.tensor([2, 3, 2]), task_id=1)


def test_projection_acts_on_image_prompt_only(model):
    model.train()
    model.begin_task(1)
    model(pixels(), labels=torch.tensor([2, 3, 2]), task_id=1).loss.backward()
    basis, _ = torch.linalg.qr(torch.randn(32, 5, generator=torch.Generator().manual_seed(3)))
    model.memory.set_basis("image_prompt", basis)
    prompt_grad = model.method.image_prompt.prompt.grad.clone()
    context_grad = model.head.text_contexts[1].grad.clone()
    model.project_gradients_()
    projected = model.method.image_prompt.prompt.grad
    assert (projected @ basis).abs().max() < 1e-6 * prompt_grad.abs().max()
    assert torch.allclose(projected, prompt_grad - prompt_grad @ basis @ basis.t(), atol=1e-7)
    assert torch.equal(model.head.text_contexts[1].grad, context_grad)


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip(model, clip_template, tokenizer, tmp_path):
    with torch.no_grad():
        model.method.image_prompt.prompt.add_(0.3 * torch.randn(IMAGE_PROMPT, 32))
        model.head.text_contexts[1].add_(0.1 * torch.randn(CONTEXT, 32))
    basis, _ = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(4)))
    model.memory.set_basis("image_prompt", basis)
    model.eval()
    x = pixels()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert not any(name.startswith("backbone.") for name in state)
    assert {f"text_contexts.{t}" for t in range(6)} <= set(state) and "image_prompt.prompt" in state
    assert not any("ids" in name or "eos_index" in name for name in state)  # rebuilt from the class names

    loaded = PGPModel.from_pretrained(tmp_path, base_model=copy.deepcopy(clip_template), tokenizer=tokenizer)
    assert isinstance(loaded.head, TextContextHead) and not loaded.training
    with torch.no_grad():
        got = loaded(x).logits
    assert torch.equal(got, expected)
    assert torch.equal(loaded.memory.basis("image_prompt"), basis)
    assert loaded.config.class_names == CLASS_NAMES


def test_clip_takes_no_precomputed_query(model):
    """CLIP has no frozen query pass: a query passed in (e.g. from a cache) is an error, not ignored."""
    with pytest.raises(ValueError, match="takes no query"):
        model(pixels(), query=torch.zeros(3, model.hidden_size))
