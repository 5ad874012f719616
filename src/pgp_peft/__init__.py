"""pgp_peft: Prompt Gradient Projection continual learning on the Hugging Face stack."""

from .config import PromptGradientProjectionConfig
from .methods import available_methods, get_method, register_method
from .model import PGPModel, PGPOutput, get_pgp_model
from .version import __version__


def __getattr__(name: str):
    # The trainer, data and metrics modules pull in transformers.Trainer / datasets / matplotlib:
    # import them only when asked for, so `import pgp_peft` stays light.
    lazy = {
        "ContinualTrainer": "trainer",
        "ProjectionCallback": "trainer",
        "ContinualCallback": "callbacks",
        "ContinualSplits": "data",
        "make_class_incremental_splits": "data",
        "load_image_dataset": "data",
        "build_transform": "data",
        "AccuracyMatrix": "metrics",
        "NullSpaceMemory": "projection",
        "update_memory": "memory",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(f"module 'pgp_peft' has no attribute {name!r}")


__all__ = [
    "PromptGradientProjectionConfig",
    "PGPModel",
    "PGPOutput",
    "get_pgp_model",
    "ContinualTrainer",
    "ProjectionCallback",
    "ContinualCallback",
    "ContinualSplits",
    "make_class_incremental_splits",
    "load_image_dataset",
    "build_transform",
    "AccuracyMatrix",
    "NullSpaceMemory",
    "update_memory",
    "available_methods",
    "get_method",
    "register_method",
    "__version__",
]
