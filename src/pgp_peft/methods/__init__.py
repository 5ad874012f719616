"""The method registry: one config class + one `PGPMethod` class per method name.

`register_method(name, config_cls, method_cls)` makes a method available to `PGPModel`,
`PromptGradientProjectionConfig` (construction, presets, `from_dict` dispatch on `"method"`), the
memory update, the model card and the runner. The built-in methods are registered at the bottom of
this module (registration lives here, not in the method modules, so no method module imports this
one: the package has no import cycle). A new method: a module `methods/<name>.py` with its config
(a `PromptGradientProjectionConfig` subclass whose `method` defaults to the name) and its
`PGPMethod` subclass, and one `register_method` line below.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PromptGradientProjectionConfig, config_class, register_config_class
from .base import MethodCard, MethodOutput, PGPMethod, ProtectedSlice
from .clip import CLIPPromptConfig, CLIPPromptMethod
from .dualprompt import DualPromptConfig, DualPromptMethod
from .l2p import L2PConfig, L2PMethod
from .lora import LoraPGPConfig, LoraPGPMethod

__all__ = [
    "CLIPPromptConfig",
    "CLIPPromptMethod",
    "DualPromptConfig",
    "DualPromptMethod",
    "L2PConfig",
    "L2PMethod",
    "LoraPGPConfig",
    "LoraPGPMethod",
    "MethodCard",
    "MethodOutput",
    "MethodSpec",
    "PGPMethod",
    "ProtectedSlice",
    "available_methods",
    "get_method",
    "register_method",
]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class and its `PGPMethod` class."""

    config_cls: type[PromptGradientProjectionConfig]
    method_cls: type[PGPMethod]


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, config_cls: type[PromptGradientProjectionConfig], method_cls: type[PGPMethod]
) -> None:
    """Register (or replace) method `name`."""
    if not (isinstance(method_cls, type) and issubclass(method_cls, PGPMethod)):
        raise TypeError(f"the method class of {name!r} must subclass PGPMethod, got {method_cls!r}")
    default = {f.name: f.default for f in config_cls.__dataclass_fields__.values()}.get("method")
    if default != name:
        raise ValueError(f"{config_cls.__name__}.method must default to {name!r}, got {default!r}")
    register_config_class(name, config_cls)
    _METHODS[name] = MethodSpec(config_cls, method_cls)


def get_method(name: str) -> MethodSpec:
    """The registered method `name`; a `ValueError` naming the registered ones otherwise."""
    if name not in _METHODS:
        config_class(name)  # raises the config's error for an unknown method
    return _METHODS[name]


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


register_method("l2p", L2PConfig, L2PMethod)
register_method("dualprompt", DualPromptConfig, DualPromptMethod)
register_method("clip", CLIPPromptConfig, CLIPPromptMethod)
register_method("lora", LoraPGPConfig, LoraPGPMethod)
