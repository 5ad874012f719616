"""`PromptGradientProjectionConfig`: the shared base of every PGP adapter configuration.

The base holds what every method has: the frozen backbone, the classes and tasks, and the gradient
projection. Each method (`pgp_peft.methods.<name>`) subclasses it with its own fields and the paper's
defaults, and registers the subclass with `pgp_peft.methods.register_method`. The base stays the
public entry point:

* `PromptGradientProjectionConfig.l2p(...)`, `.dualprompt(...)`, `.clip(...)` return the method's
  config with the paper's values (override any field with keyword arguments);
* `PromptGradientProjectionConfig(method="dualprompt", ...)` builds the registered subclass;
* `from_dict` / `from_pretrained` dispatch on the `"method"` key, so config.json files written by
  pgp_peft 0.1.0 (one flat class with every method's fields) load unchanged: keys of fields a method no
  longer has are dropped (see `legacy_fields`).

Field names follow PEFT where they mean the same thing (`base_model_name_or_path`, `revision`,
`inference_mode`). This module imports no method: the registry fills `_CONFIG_CLASSES`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .fileio import atomic_write_text

logger = logging.getLogger(__name__)

PROJECTION_SPACES = ("feature", "reference")
PREPROCESSING_MODES = ("reference", "processor")
PROMPT_INITS = ("uniform", "linear", "zero", "normal")

CONFIG_NAME = "config.json"
# Keys PGPModel.save_pretrained adds to config.json next to the config fields (not config fields).
ADAPTER_METADATA_KEYS = {"library_name", "pgp_peft_version", "backbone"}
# Fields of 0.1.0 that were never a choice: accepted in old files when they hold their only value.
REMOVED_FIXED_FIELDS = ("query_source", "tuning_type")
# The only keys `base_model_kwargs` may hold: plain backbone-config attributes that change neither the
# weights' shapes nor how or from where code and files are loaded. A config.json comes from a download,
# so loader controls (trust_remote_code, code_revision, revision, token, cache_dir, device_map,
# torch_dtype, quantization_config, attn_implementation, ...) are refused, never passed on.
BACKBONE_CONFIG_OVERRIDES = (
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "attention_dropout",
    "dropout",
)

# method name -> config class, filled by `pgp_peft.methods.register_method`.
_CONFIG_CLASSES: dict[str, type[PromptGradientProjectionConfig]] = {}


def register_config_class(name: str, config_cls: type[PromptGradientProjectionConfig]) -> None:
    """Make `config_cls` the config of method `name` (called by `pgp_peft.methods.register_method`)."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, PromptGradientProjectionConfig)):
        raise TypeError(f"the config of method {name!r} must subclass PromptGradientProjectionConfig")
    _CONFIG_CLASSES[name] = config_cls


def config_class(method: Any) -> type[PromptGradientProjectionConfig]:
    """The registered config class of `method`; a `ValueError` naming the known methods otherwise."""
    if method not in _CONFIG_CLASSES:
        raise ValueError(
            f"PromptGradientProjectionConfig.method: unknown method {method!r}; expected one of "
            f"{sorted(_CONFIG_CLASSES)}"
        )
    return _CONFIG_CLASSES[method]


def read_config_json(path: str | os.PathLike, source: str | None = None) -> dict[str, Any]:
    """A config.json's JSON object; invalid JSON or another JSON type raises `ValueError` naming the file."""
    where = source or str(path)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error}); re-save the adapter or fix the file") from None
    if not isinstance(payload, dict):
        raise ValueError(
            f"{where}: expected a JSON object of config fields, got a JSON {type(payload).__name__}"
        )
    return payload


def fail(name: str, message: str) -> None:
    """Raise the config error for field `name` (every config names its fields the same way)."""
    raise ValueError(f"PromptGradientProjectionConfig.{name}: {message}")


def check_choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        fail(name, f"unknown value {value!r}; expected one of {list(choices)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_types(
    config: Any,
    *,
    strings: tuple[str, ...] = (),
    optional_strings: tuple[str, ...] = (),
    bools: tuple[str, ...] = (),
    numbers: tuple[str, ...] = (),
    int_lists: tuple[str, ...] = (),
) -> None:
    """Refuse values of the wrong JSON type by field name (a config.json is hand-editable and downloaded),
    e.g. `e_prompt_layers: "2,3,4"` instead of `[2, 3, 4]`. Lists are normalised to `list`."""
    for name in strings:
        if not isinstance(getattr(config, name), str):
            fail(name, f"expected a string, got {getattr(config, name)!r}")
    for name in optional_strings:
        if getattr(config, name) is not None and not isinstance(getattr(config, name), str):
            fail(name, f"expected a string or null, got {getattr(config, name)!r}")
    for name in bools:
        if not isinstance(getattr(config, name), bool):
            fail(name, f"expected true or false, got {getattr(config, name)!r}")
    for name in numbers:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(name, f"expected a number, got {value!r}")
    for name in int_lists:
        value = getattr(config, name)
        if not isinstance(value, (list, tuple)) or not all(_is_int(i) for i in value):
            fail(name, f"expected a list of layer indices like [2, 3, 4], got {value!r}")
        setattr(config, name, list(value))


def check_int(config: Any, name: str, *, minimum: int, allow_none: bool = False) -> None:
    """An int (not a bool) >= minimum; with `allow_none`, None too."""
    value = getattr(config, name)
    if value is None and allow_none:
        return
    if not _is_int(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        fail(name, f"must be {kind}{' or None' if allow_none else ''}, got {value!r}")


@dataclass
class PromptGradientProjectionConfig:
    """What every PGP adapter has: backbone, classes, tasks and the gradient projection.

    Backbone
        base_model_name_or_path, revision: the frozen backbone (Hub id or local folder).
        base_model_kwargs: config overrides applied when the backbone is loaded from its name (e.g.
            `{"layer_norm_eps": 1e-6}`, as the paper's ViT-B recipes), so a reloaded adapter sees
            exactly the backbone it was trained on. Only the numeric attributes in
            `BACKBONE_CONFIG_OVERRIDES` are accepted: loader options (`trust_remote_code`, `revision`,
            `token`, ...) are refused, since a saved config is downloaded, untrusted data.
        inference_mode: a loaded adapter is frozen (as PEFT).

    Classes and tasks
        method: the registered method (`"l2p"`, `"dualprompt"`, `"clip"`); picks the config class.
        num_classes: number of classes over all tasks (the head's width).
        num_tasks: length of the task sequence, if known (CLIP allocates one text context per task).
        class_names: readable class names in class order (CLIP builds its text prompts from them;
            `predict` returns them).
        preprocessing: how images were prepared in training, reused by `predict`: `"reference"`
            (resize, [0, 1], no normalisation, as the paper's code) or `"processor"` (the base
            checkpoint's image processor).

    Projection
        use_pgp: apply Prompt Gradient Projection between tasks (False = the baseline method).
        projection_space: `"feature"` (default: per protected space the Gram matrix of the rows its
            parameters meet, in embedding space, docs/ALGORITHM.md) or `"reference"` (the authors'
            sample-row PCA memory; needs memory_samples == hidden size).
        prompt_threshold, key_threshold: energy thresholds ε in (0, 1]; `key_threshold` for spaces
            named `key`, `prompt_threshold` for every other space.
        memory_samples: samples per task streamed to build the bases (None = the whole task).
        project_update: also project the parameter change after each optimizer step (keeps the
            guarantee for Adam-type optimizers; beyond the paper).
        reference_pca_components: PCA widths of reference mode (`prompt`, `key`, `prefix`, `clip`).
    """

    method: str = "l2p"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    base_model_kwargs: dict[str, Any] = field(default_factory=dict)
    inference_mode: bool = False
    num_classes: int | None = None
    num_tasks: int | None = None
    class_names: list[str] | None = None
    preprocessing: str = "reference"

    # projection
    use_pgp: bool = True
    projection_space: str = "feature"
    prompt_threshold: float = 0.97
    key_threshold: float = 0.97
    memory_samples: int | None = 256
    project_update: bool = False
    reference_pca_components: dict[str, int] = field(
        default_factory=lambda: {"prompt": 9, "key": 5, "prefix": 50, "clip": 5}
    )

    # Fields a 0.1.0 config.json of this method holds but this class does not have, with the value
    # 0.1.0 wrote for them. Such keys are dropped when loading; a different value (it had no effect in
    # 0.1.0 either) is dropped with a warning, except `REMOVED_FIXED_FIELDS`, which were always checked.
    legacy_fields: ClassVar[dict[str, Any]] = {}

    def __new__(cls, *args: Any, **kwargs: Any):
        # `PromptGradientProjectionConfig(method="dualprompt", ...)` builds the method's own class.
        if cls is PromptGradientProjectionConfig:
            cls = config_class(kwargs.get("method", args[0] if args else "l2p"))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self.check_field_types()
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def l2p(cls, **overrides: Any) -> PromptGradientProjectionConfig:
        """L2P-PGP as in the paper: pool 10, length 5, top-k 5, prompt head, pull coefficient 0.1."""
        return config_class("l2p")(**overrides)

    @classmethod
    def dualprompt(cls, **overrides: Any) -> PromptGradientProjectionConfig:
        """DualPrompt-PGP as in the paper: G-prompt length 5 at layers 0-1, E-prompt pool 10 at
        layers 2-4 (length 5), top-k 1, prompt mask, shared pool, CLS head, pull 1.0."""
        return config_class("dualprompt")(**overrides)

    @classmethod
    def clip(cls, **overrides: Any) -> PromptGradientProjectionConfig:
        """CLIP-PGP: one shared 10-token image prompt after CLS, a 16-vector text context per task."""
        return config_class("clip")(**overrides)

    @classmethod
    def lora(cls, **overrides: Any) -> PromptGradientProjectionConfig:
        """LoRA-PGP: stock peft LoRA (r 10 on k_proj / v_proj, InfLoRA's setting) with null-space projection."""
        return config_class("lora")(**overrides)

    # ------------------------------------------------------------------ validation
    def check_field_types(self) -> None:
        """Refuse values of the wrong JSON type by field name; subclasses add their own fields."""
        check_types(
            self,
            strings=("method", "preprocessing", "projection_space"),
            optional_strings=("base_model_name_or_path", "revision"),
            bools=("inference_mode", "use_pgp", "project_update"),
        )
        if self.class_names is not None:
            if not isinstance(self.class_names, (list, tuple)) or not all(
                isinstance(n, str) for n in self.class_names
            ):
                fail("class_names", f"expected a list of strings or null, got {self.class_names!r}")
            self.class_names = list(self.class_names)
        if not isinstance(self.reference_pca_components, dict) or not all(
            isinstance(k, str) and _is_int(v) and v > 0 for k, v in self.reference_pca_components.items()
        ):
            fail(
                "reference_pca_components",
                f"expected a mapping of names to positive integers, got {self.reference_pca_components!r}",
            )
        self._check_base_model_kwargs()

    def _check_base_model_kwargs(self) -> None:
        kwargs = self.base_model_kwargs
        where = "PromptGradientProjectionConfig.base_model_kwargs"
        if not isinstance(kwargs, dict):
            raise ValueError(f"{where}: expected a mapping like {{'layer_norm_eps': 1e-6}}, got {kwargs!r}")
        refused = sorted(key for key in kwargs if key not in BACKBONE_CONFIG_OVERRIDES)
        if refused:
            raise ValueError(
                f"{where}: {refused} refused; only the backbone-config overrides {list(BACKBONE_CONFIG_OVERRIDES)} "
                "are accepted. Loader options such as trust_remote_code or code_revision are never read from a "
                "config: if you trust the backbone's code, pass trust_remote_code=True to from_pretrained yourself"
            )
        for key, value in kwargs.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{where}: {key} must be a finite non-negative number, got {value!r}")

    def validate(self, num_hidden_layers: int | None = None) -> None:
        """Raise `ValueError` naming the offending field. With `num_hidden_layers`, also check layer indices."""
        self._check_base_model_kwargs()  # again: the field is mutable after construction
        expected = config_class(self.method)
        if type(self) is not expected:
            fail(
                "method", f"{type(self).__name__} cannot hold method {self.method!r}; use {expected.__name__}"
            )
        check_choice(self, "projection_space", PROJECTION_SPACES)
        check_choice(self, "preprocessing", PREPROCESSING_MODES)
        for name in ("prompt_threshold", "key_threshold"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not 0.0 < float(value) <= 1.0
            ):
                fail(name, f"threshold must lie in (0, 1], got {value!r}")
        check_int(self, "memory_samples", minimum=1, allow_none=True)
        check_int(self, "num_classes", minimum=1, allow_none=True)
        check_int(self, "num_tasks", minimum=1, allow_none=True)
        if (
            self.class_names is not None
            and self.num_classes is not None
            and len(self.class_names) != self.num_classes
        ):
            fail("class_names", f"{len(self.class_names)} names for num_classes={self.num_classes}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PromptGradientProjectionConfig:
        """Build the config of `values["method"]`; unknown keys raise a `ValueError` naming them (and
        the closest valid key). Keys of 0.1.0 fields this method does not have are dropped."""
        if not isinstance(values, dict):
            raise ValueError(
                f"PromptGradientProjectionConfig: expected a mapping of fields, got {type(values).__name__}"
            )
        target = config_class(values.get("method", "l2p")) if cls is PromptGradientProjectionConfig else cls
        known = {f.name for f in dataclasses.fields(target)}
        values = target._drop_legacy_fields(values, known)
        unknown = sorted(set(values) - known - ADAPTER_METADATA_KEYS)
        if unknown:

            def hint(key: str) -> str:
                close = difflib.get_close_matches(key, known, n=1)
                return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)

            hints = [hint(key) for key in unknown]
            raise ValueError(f"{target.__name__}: unknown field(s) {', '.join(hints)}")
        return target(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def _drop_legacy_fields(cls, values: dict[str, Any], known: set[str]) -> dict[str, Any]:
        kept = dict(values)
        for name, legacy_value in cls.legacy_fields.items():
            if name in known or name not in kept:
                continue
            value = kept.pop(name)
            if value == legacy_value:
                continue
            if name in REMOVED_FIXED_FIELDS:
                fail(
                    name,
                    f"{value!r} is not possible for method {cls.__name__}: the field was removed (its only "
                    f"value was {legacy_value!r}); delete the key",
                )
            logger.warning(
                "%s: ignoring %s=%r from a pgp_peft 0.1.0 config; the field is not used by this method",
                cls.__name__,
                name,
                value,
            )
        return kept

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` atomically (temp file, then rename)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / CONFIG_NAME, self.to_json_string())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PromptGradientProjectionConfig:
        path = Path(directory) / CONFIG_NAME
        payload = read_config_json(path)
        try:
            return cls.from_dict(payload)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def replace(self, **changes: Any) -> PromptGradientProjectionConfig:
        return dataclasses.replace(self, **changes)
