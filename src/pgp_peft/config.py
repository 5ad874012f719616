"""`PromptGradientProjectionConfig`: everything that defines a PGP adapter, validated and JSON-serialisable.

Field names follow PEFT where they mean the same thing (`base_model_name_or_path`, `revision`,
`inference_mode`). Presets `l2p()`, `dualprompt()` and `clip()` return the paper's values
(docs/RECIPES.md); override any field with keyword arguments.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

METHODS = ("l2p", "dualprompt", "clip")
PROJECTION_SPACES = ("feature", "reference")
HEAD_TYPES = ("prompt", "token")
PROMPT_INITS = ("uniform", "linear", "zero", "normal")
QUERY_SOURCES = ("frozen_cls",)
TUNING_TYPES = ("prompt", "prefix")

CONFIG_NAME = "config.json"
# Keys PGPModel.save_pretrained adds to config.json next to the config fields (not config fields).
ADAPTER_METADATA_KEYS = {"library_name", "pgp_peft_version", "backbone"}
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


@dataclass
class PromptGradientProjectionConfig:
    """Configuration of a PGP prompt adapter (L2P, DualPrompt or CLIP) and its gradient projection.

    Prompt pools
        method: `"l2p"` (prompt pool at the input), `"dualprompt"` (G/E prefix pools) or `"clip"`
            (one shared image prompt + per-task text context).
        pool_size, prompt_length, top_k: L2P pool of `pool_size` prompts of `prompt_length` tokens,
            `top_k` selected per sample.
        tuning_type: `"prompt"` (tokens inserted after CLS) or `"prefix"` (key/value prefixes per layer).
        g_prompt_layers / g_prompt_length: DualPrompt's shared G-prompt.
        e_prompt_layers / e_prompt_length: DualPrompt's E-prompt pool (`pool_size` slots).
        prompt_init, key_init: `"uniform"` (U(-1, 1), the reference L2P / DualPrompt), `"linear"`
            (U(±1/√D), the reference CLIP image prompt), `"zero"` or `"normal"` (N(0, 0.02²)).
        use_prompt_keys: learn keys and select prompts by key-query cosine similarity.
        batchwise_prompt: the reference's batch-wise majority vote over selected ids. Off by default:
            it assumes a test batch comes from a single task (an evaluation leak).
        prompt_mask: during training the task id selects the prompt slot (DualPrompt).
        shared_pool_copy: a new task's E-prompt slot starts as a copy of the previous task's.
        head_type: `"prompt"` (mean of prompt-token outputs) or `"token"` (CLS output).
        pull_constraint_coeff: weight of the key-query similarity term subtracted from the loss.
        image_prompt_length, text_context_length: CLIP's image prompt and CoOp text context sizes.
        num_tasks: length of the task sequence, if known (CLIP allocates one text context per task).
        class_names: readable class names (CLIP builds its text prompts from them; `predict` returns them).
        preprocessing: how images were prepared in training, reused by `predict`: `"reference"`
            (resize, [0, 1], no normalisation, as the paper's code) or `"processor"` (the base
            checkpoint's image processor).

    Backbone
        base_model_name_or_path, revision: the frozen backbone (Hub id or local folder).
        base_model_kwargs: config overrides applied when the backbone is loaded from its name (e.g.
            `{"layer_norm_eps": 1e-6}`, as the paper's ViT-B recipes), so a reloaded adapter sees
            exactly the backbone it was trained on. Only the numeric attributes in
            `BACKBONE_CONFIG_OVERRIDES` are accepted: loader options (`trust_remote_code`, `revision`,
            `token`, ...) are refused, since a saved config is downloaded, untrusted data.

    Projection
        use_pgp: apply Prompt Gradient Projection between tasks (False = the baseline method).
        projection_space: `"feature"` (default, embedding-space Gram matrices, docs/ALGORITHM.md §2) or
            `"reference"` (the authors' sample-row PCA memory, §3; needs memory_samples == hidden size).
        prompt_threshold, key_threshold: energy thresholds ε in (0, 1] for prompt and key spaces.
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

    # prompt pools
    pool_size: int = 10
    prompt_length: int = 5
    top_k: int = 5
    tuning_type: str = "prompt"
    g_prompt_layers: list[int] = field(default_factory=list)
    g_prompt_length: int = 0
    e_prompt_layers: list[int] = field(default_factory=list)
    e_prompt_length: int = 0
    prompt_init: str = "uniform"
    key_init: str = "uniform"
    use_prompt_keys: bool = True
    query_source: str = "frozen_cls"
    batchwise_prompt: bool = False
    prompt_mask: bool = False
    shared_pool_copy: bool = False
    head_type: str = "prompt"
    pull_constraint_coeff: float = 0.1
    image_prompt_length: int = 10
    text_context_length: int = 16
    text_template: str = "{}."
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

    def __post_init__(self) -> None:
        self._check_field_types()
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def l2p(cls, **overrides: Any) -> PromptGradientProjectionConfig:
        """L2P-PGP as in the paper: pool 10, length 5, top-k 5, prompt head, pull coefficient 0.1."""
        values: dict[str, Any] = dict(
            method="l2p",
            pool_size=10,
            prompt_length=5,
            top_k=5,
            tuning_type="prompt",
            head_type="prompt",
            pull_constraint_coeff=0.1,
            batchwise_prompt=False,
            prompt_mask=False,
            shared_pool_copy=False,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def dualprompt(cls, **overrides: Any) -> PromptGradientProjectionConfig:
        """DualPrompt-PGP as in the paper: G-prompt length 5 at layers 0-1, E-prompt pool 10 at
        layers 2-4 (length 5), top-k 1, prefix tuning, prompt mask, shared pool, CLS head, pull 1.0."""
        values: dict[str, Any] = dict(
            method="dualprompt",
            pool_size=10,
            prompt_length=5,
            top_k=1,
            tuning_type="prefix",
            g_prompt_layers=[0, 1],
            g_prompt_length=5,
            e_prompt_layers=[2, 3, 4],
            e_prompt_length=5,
            head_type="token",
            pull_constraint_coeff=1.0,
            prompt_mask=True,
            shared_pool_copy=True,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def clip(cls, **overrides: Any) -> PromptGradientProjectionConfig:
        """CLIP-PGP: one shared 10-token image prompt after CLS, a 16-vector text context per task."""
        values: dict[str, Any] = dict(
            method="clip",
            tuning_type="prompt",
            use_prompt_keys=False,
            pool_size=1,
            prompt_length=10,
            top_k=1,
            image_prompt_length=10,
            text_context_length=16,
            prompt_init="linear",  # the reference image prompt is an nn.Linear weight: U(±1/√D)
            head_type="token",
            pull_constraint_coeff=0.0,
            prompt_threshold=0.97,
        )
        values.update(overrides)
        return cls(**values)

    # ------------------------------------------------------------------ validation
    def _check_field_types(self) -> None:
        """Refuse values of the wrong JSON type by field name (a config.json is hand-editable and
        downloaded): e.g. `e_prompt_layers: "2,3,4"` instead of `[2, 3, 4]`."""

        def fail(name: str, message: str) -> None:
            raise ValueError(f"PromptGradientProjectionConfig.{name}: {message}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("g_prompt_layers", "e_prompt_layers"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(is_int(i) for i in value):
                fail(name, f"expected a list of layer indices like [2, 3, 4], got {value!r}")
            setattr(self, name, list(value))
        if self.class_names is not None:
            if not isinstance(self.class_names, (list, tuple)) or not all(
                isinstance(n, str) for n in self.class_names
            ):
                fail("class_names", f"expected a list of strings or null, got {self.class_names!r}")
            self.class_names = list(self.class_names)
        if not isinstance(self.reference_pca_components, dict) or not all(
            isinstance(k, str) and is_int(v) and v > 0 for k, v in self.reference_pca_components.items()
        ):
            fail(
                "reference_pca_components",
                f"expected a mapping of names to positive integers, got {self.reference_pca_components!r}",
            )
        for name in ("method", "tuning_type", "text_template", "preprocessing", "projection_space"):
            if not isinstance(getattr(self, name), str):
                fail(name, f"expected a string, got {getattr(self, name)!r}")
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail(name, f"expected a string or null, got {getattr(self, name)!r}")
        for name in (
            "inference_mode",
            "use_prompt_keys",
            "batchwise_prompt",
            "prompt_mask",
            "shared_pool_copy",
            "use_pgp",
            "project_update",
        ):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"expected true or false, got {getattr(self, name)!r}")
        value = self.pull_constraint_coeff
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("pull_constraint_coeff", f"expected a number, got {value!r}")
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

        def fail(name: str, message: str) -> None:
            raise ValueError(f"PromptGradientProjectionConfig.{name}: {message}")

        if self.method not in METHODS:
            fail("method", f"unknown method {self.method!r}; expected one of {list(METHODS)}")
        if self.projection_space not in PROJECTION_SPACES:
            fail(
                "projection_space",
                f"unknown space {self.projection_space!r}; expected one of {list(PROJECTION_SPACES)}",
            )
        if self.tuning_type not in TUNING_TYPES:
            fail(
                "tuning_type",
                f"unknown tuning type {self.tuning_type!r}; expected one of {list(TUNING_TYPES)}",
            )
        if self.head_type not in HEAD_TYPES:
            fail("head_type", f"unknown head type {self.head_type!r}; expected one of {list(HEAD_TYPES)}")
        for name in ("prompt_init", "key_init"):
            if getattr(self, name) not in PROMPT_INITS:
                fail(name, f"unknown init {getattr(self, name)!r}; expected one of {list(PROMPT_INITS)}")
        if self.preprocessing not in ("reference", "processor"):
            fail("preprocessing", f"expected 'reference' or 'processor', got {self.preprocessing!r}")
        if self.query_source not in QUERY_SOURCES:
            fail(
                "query_source",
                f"unknown query source {self.query_source!r}; expected one of {list(QUERY_SOURCES)}",
            )
        for name in ("pool_size", "prompt_length", "top_k", "image_prompt_length", "text_context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        for name in ("g_prompt_length", "e_prompt_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, f"must be a non-negative integer (0 disables it), got {value!r}")
        if self.top_k > self.pool_size:
            fail("top_k", f"top_k={self.top_k} exceeds pool_size={self.pool_size}")
        for name in ("prompt_threshold", "key_threshold"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not 0.0 < float(value) <= 1.0
            ):
                fail(name, f"threshold must lie in (0, 1], got {value!r}")
        if self.memory_samples is not None and (
            not isinstance(self.memory_samples, int)
            or isinstance(self.memory_samples, bool)
            or self.memory_samples <= 0
        ):
            fail("memory_samples", f"must be a positive integer or None, got {self.memory_samples!r}")
        for name in ("num_classes", "num_tasks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                fail(name, f"must be a positive integer, got {value!r}")
        if self.pull_constraint_coeff < 0:
            fail("pull_constraint_coeff", f"must be >= 0, got {self.pull_constraint_coeff!r}")
        if self.method == "dualprompt" and self.tuning_type != "prefix":
            fail("tuning_type", "DualPrompt uses prefix tuning (tuning_type='prefix')")
        if self.method in ("l2p", "clip") and self.tuning_type != "prompt":
            fail("tuning_type", f"{self.method} inserts prompt tokens (tuning_type='prompt')")
        for name in ("g_prompt_layers", "e_prompt_layers"):
            layers = getattr(self, name)
            if any(i < 0 for i in layers):
                fail(name, f"layer indices must be >= 0, got {layers}")
            if len(set(layers)) != len(layers):
                fail(name, f"layer indices must be unique, got {layers}")
            if num_hidden_layers is not None and any(i >= num_hidden_layers for i in layers):
                fail(name, f"layer indices {layers} exceed the backbone's depth ({num_hidden_layers} layers)")
        if set(self.g_prompt_layers) & set(self.e_prompt_layers):
            fail("e_prompt_layers", "G- and E-prompt layers must not overlap")
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
        """Build from a dict; unknown keys raise a `ValueError` naming them (and the closest valid key)."""
        if not isinstance(values, dict):
            raise ValueError(
                f"PromptGradientProjectionConfig: expected a mapping of fields, got {type(values).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - ADAPTER_METADATA_KEYS)
        if unknown:
            import difflib

            def hint(key: str) -> str:
                close = difflib.get_close_matches(key, known, n=1)
                return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)

            hints = [hint(key) for key in unknown]
            raise ValueError(f"PromptGradientProjectionConfig: unknown field(s) {', '.join(hints)}")
        return cls(**{k: v for k, v in values.items() if k in known})

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
