"""PromptGradientProjectionConfig: paper presets, JSON round trips and validation errors."""

from __future__ import annotations

import json

import pytest

from pgp_peft.config import CONFIG_NAME, PromptGradientProjectionConfig
from pgp_peft.model import PGPModel

Config = PromptGradientProjectionConfig


# ----------------------------------------------------------------------------- presets (docs/RECIPES.md)
def test_l2p_preset_has_paper_values():
    c = Config.l2p()
    assert c.method == "l2p"
    assert (c.pool_size, c.prompt_length, c.top_k) == (10, 5, 5)
    assert c.head_type == "prompt"
    assert c.pull_constraint_coeff == pytest.approx(0.1)
    assert c.prompt_init == "uniform" and c.key_init == "uniform"
    assert c.use_prompt_keys is True
    # the batch-wise majority vote leaks task identity: off by default
    assert c.batchwise_prompt is False
    assert c.use_pgp is True
    assert c.projection_space == "feature"


def test_dualprompt_preset_has_paper_values():
    c = Config.dualprompt()
    assert c.method == "dualprompt"
    assert c.g_prompt_layers == [0, 1] and c.g_prompt_length == 5
    assert c.e_prompt_layers == [2, 3, 4] and c.e_prompt_length == 5
    assert c.pool_size == 10 and c.top_k == 1
    assert c.prompt_mask is True
    assert c.shared_pool_copy is True
    assert c.pull_constraint_coeff == pytest.approx(1.0)
    assert c.batchwise_prompt is False
    assert c.use_pgp is True


def test_clip_preset_has_paper_values():
    c = Config.clip()
    assert c.method == "clip"
    assert c.image_prompt_length == 10
    assert c.text_context_length == 16
    assert c.use_pgp is True


def test_preset_overrides_apply_and_keep_other_values():
    c = Config.dualprompt(e_prompt_length=20, num_classes=200)  # the ImageNet-R recipe
    assert c.e_prompt_length == 20 and c.num_classes == 200
    assert c.g_prompt_length == 5 and c.e_prompt_layers == [2, 3, 4]
    c = Config.l2p(prompt_length=30, top_k=1)
    assert (c.pool_size, c.prompt_length, c.top_k) == (10, 30, 1)


# ----------------------------------------------------------------------------- serialisation
def _rich_configs() -> list[Config]:
    return [
        Config.l2p(num_classes=100, head_type="token", memory_samples=None, project_update=True),
        Config.dualprompt(num_classes=20, e_prompt_length=20, prompt_threshold=1.0, key_threshold=0.5),
        Config.clip(
            class_names=["cat", "dog", "ship"], num_classes=3, base_model_name_or_path="x/y", revision="r1"
        ),
        Config.l2p(
            num_classes=32,
            projection_space="reference",
            memory_samples=32,
            reference_pca_components={"prompt": 3, "key": 2, "prefix": 7, "clip": 1},
        ),
    ]


@pytest.mark.parametrize("config", _rich_configs(), ids=["l2p", "dualprompt", "clip", "reference"])
def test_json_string_round_trip_is_equal(config):
    text = config.to_json_string()
    restored = Config.from_dict(json.loads(text))
    assert restored == config
    assert restored.to_json_string() == text


@pytest.mark.parametrize("config", _rich_configs(), ids=["l2p", "dualprompt", "clip", "reference"])
def test_save_pretrained_round_trip_is_equal(config, tmp_path):
    config.save_pretrained(tmp_path / "cfg")
    assert (tmp_path / "cfg" / CONFIG_NAME).is_file()
    assert sorted(p.name for p in (tmp_path / "cfg").iterdir()) == [CONFIG_NAME]  # no temp file left
    assert Config.from_pretrained(tmp_path / "cfg") == config


def test_save_pretrained_overwrites_previous_config(tmp_path):
    Config.l2p(num_classes=10).save_pretrained(tmp_path)
    Config.dualprompt(num_classes=7).save_pretrained(tmp_path)
    assert Config.from_pretrained(tmp_path) == Config.dualprompt(num_classes=7)


def test_from_dict_accepts_library_metadata():
    values = Config.l2p(num_classes=5).to_dict()
    values.update(library_name="pgp_peft", pgp_peft_version="0.1.0")
    assert Config.from_dict(values) == Config.l2p(num_classes=5)


@pytest.mark.parametrize(
    "typo, closest",
    [("top_kk", "top_k"), ("prompt_lenght", "prompt_length"), ("projection_spcae", "projection_space")],
)
def test_from_dict_unknown_key_names_it_and_the_closest_valid_key(typo, closest):
    values = Config.l2p().to_dict()
    values[typo] = 3
    with pytest.raises(ValueError) as info:
        Config.from_dict(values)
    message = str(info.value)
    assert typo in message
    assert repr(closest) in message


# ----------------------------------------------------------------------------- validation
def _field_error(field: str) -> str:
    return rf"PromptGradientProjectionConfig\.{field}\b"


def test_top_k_larger_than_pool_raises_naming_top_k():
    with pytest.raises(ValueError, match=_field_error("top_k")):
        Config.l2p(pool_size=4, top_k=5)
    Config.l2p(pool_size=5, top_k=5)  # equal is fine


def test_validate_layer_indices_against_depth():
    c = Config.dualprompt()
    c.validate(num_hidden_layers=5)  # layers 0-4 fit a 5-layer backbone
    with pytest.raises(ValueError, match=_field_error("e_prompt_layers")):
        c.validate(num_hidden_layers=4)
    with pytest.raises(ValueError, match=_field_error("g_prompt_layers")):
        Config.dualprompt(g_prompt_layers=[0, 7], e_prompt_layers=[2]).validate(num_hidden_layers=5)


def test_layer_index_beyond_depth_raises_at_model_construction(tiny_vit):
    config = Config.dualprompt(num_classes=4, pool_size=4, e_prompt_layers=[2, 3, 5])
    with pytest.raises(ValueError, match=_field_error("e_prompt_layers")) as info:
        PGPModel(config, base_model=tiny_vit())
    assert "5 layers" in str(info.value)


@pytest.mark.parametrize(
    "field, bad",
    [("g_prompt_layers", [-1, 0]), ("e_prompt_layers", [2, 2]), ("e_prompt_layers", [1, 2])],
    ids=["negative", "duplicate", "overlap-with-g"],
)
def test_bad_layer_lists_raise_naming_field(field, bad):
    with pytest.raises(ValueError, match=_field_error(field)):
        Config.dualprompt(**{field: bad})


@pytest.mark.parametrize(
    "field, bad",
    [
        ("pool_size", 0),
        ("prompt_length", 0),
        ("prompt_length", -3),
        ("top_k", 0),
        ("image_prompt_length", 0),
        ("text_context_length", -1),
        ("g_prompt_length", -1),
        ("e_prompt_length", -5),
        ("memory_samples", 0),
        ("num_classes", 0),
        ("num_tasks", 0),
    ],
)
def test_non_positive_sizes_raise_naming_field(field, bad):
    method = next(m for m in ("dualprompt", "l2p", "clip") if hasattr(getattr(Config, m)(), field))
    with pytest.raises(ValueError, match=_field_error(field)):
        getattr(Config, method)(**{field: bad})


def test_zero_prefix_lengths_are_valid():
    c = Config.dualprompt(g_prompt_length=0, e_prompt_length=0)
    assert c.g_prompt_length == 0 and c.e_prompt_length == 0


@pytest.mark.parametrize("field", ["prompt_threshold", "key_threshold"])
@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, 1.0000001])
def test_thresholds_outside_unit_interval_raise_naming_field(field, bad):
    with pytest.raises(ValueError, match=_field_error(field)):
        Config.l2p(**{field: bad})


@pytest.mark.parametrize("field", ["prompt_threshold", "key_threshold"])
@pytest.mark.parametrize("good", [1.0, 1, 0.5, 1e-6])
def test_thresholds_inside_unit_interval_are_valid(field, good):
    assert getattr(Config.l2p(**{field: good}), field) == good


@pytest.mark.parametrize(
    "field, bad",
    [
        ("method", "coda"),
        ("projection_space", "pixel"),
        ("head_type", "mean"),
        ("prompt_init", "xavier"),
        ("preprocessing", "imagenet"),
    ],
)
def test_unknown_choices_raise_naming_field(field, bad):
    with pytest.raises(ValueError, match=_field_error(field)) as info:
        Config(**{field: bad})
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    "method, field, only_value, bad",
    [
        ("l2p", "tuning_type", "prompt", "prefix"),
        ("dualprompt", "tuning_type", "prefix", "prompt"),
        ("clip", "tuning_type", "prompt", "adapter"),
        ("l2p", "query_source", "frozen_cls", "prompted_cls"),
    ],
)
def test_removed_fixed_fields_load_from_old_files_only_with_their_only_value(method, field, only_value, bad):
    """query_source and tuning_type were never a choice: 0.1.0 files holding their only value load (the
    key is dropped); any other value names the field."""
    payload = getattr(Config, method)().to_dict()
    assert field not in payload
    assert Config.from_dict({**payload, field: only_value}) == getattr(Config, method)()
    with pytest.raises(ValueError, match=_field_error(field)) as info:
        Config.from_dict({**payload, field: bad})
    assert repr(bad) in str(info.value)


def test_presets_and_construction_dispatch_on_method():
    from pgp_peft.methods import available_methods, get_method

    for method in available_methods():
        preset = getattr(Config, method)()
        assert type(preset) is get_method(method).config_cls and isinstance(preset, Config)
        assert type(Config(method=method)) is type(preset)
        assert Config.from_dict(preset.to_dict()) == preset
    with pytest.raises(TypeError):
        Config.l2p(g_prompt_layers=[0])  # another method's field


def test_replace_revalidates():
    with pytest.raises(ValueError, match=_field_error("top_k")):
        Config.l2p().replace(pool_size=2)


def test_negative_pull_coefficient_raises():
    with pytest.raises(ValueError, match=_field_error("pull_constraint_coeff")):
        Config.l2p(pull_constraint_coeff=-0.1)


def test_class_names_must_match_num_classes():
    with pytest.raises(ValueError, match=_field_error("class_names")):
        Config.clip(class_names=["a", "b"], num_classes=3)


def test_config_from_pretrained_reads_an_adapter_config_json(tmp_path):
    """An adapter directory's config.json (as written by PGPModel._config_payload) loads as a config."""
    config = Config.dualprompt(num_classes=10)
    payload = config.to_dict()
    payload.update(
        library_name="pgp_peft",
        pgp_peft_version="0.1.0",
        backbone={"hidden_size": 32, "num_hidden_layers": 5, "num_attention_heads": 4},
    )
    (tmp_path / CONFIG_NAME).write_text(json.dumps(payload))
    assert Config.from_pretrained(tmp_path) == config


def test_v0_1_0_fields_another_method_owns_are_dropped_with_a_warning_when_set(caplog):
    """A 0.1.0 config.json holds every method's fields; those this method does not have had no effect
    and are dropped: silently at their 0.1.0 value, with a warning naming them otherwise."""
    payload = Config.dualprompt().to_dict()
    quiet = {**payload, "head_type": "token", "image_prompt_length": 10, "use_prompt_keys": True}
    with caplog.at_level("WARNING", logger="pgp_peft.config"):
        assert Config.from_dict(quiet) == Config.dualprompt()
    assert not caplog.records
    with caplog.at_level("WARNING", logger="pgp_peft.config"):
        assert Config.from_dict({**payload, "head_type": "prompt"}) == Config.dualprompt()
    assert "head_type" in caplog.text
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'head_typ'"):
        Config.from_dict({**payload, "head_typ": "prompt"})
