"""clipadapt: adapt a frozen CLIP model to your task, on cached features."""

from __future__ import annotations

from importlib import import_module

from clipadapt.backbones import load_backbone
from clipadapt.errors import ClipAdaptError

_LAZY_MODULES = ("methods", "segmentation", "metrics")

__all__ = ["ClipAdaptError", "__version__", "load_adapter", "load_backbone", *_LAZY_MODULES]


def __getattr__(name: str):
    """Import submodules on first use: a missing or heavy one never breaks ``import clipadapt``."""
    if name in _LAZY_MODULES:
        return import_module(f"clipadapt.{name}")
    if name == "__version__":
        from importlib import metadata

        try:
            return metadata.version("clipadapt")
        except metadata.PackageNotFoundError:
            return "0+unknown"
    if name == "load_adapter":
        return import_module("clipadapt.methods").load_adapter
    raise AttributeError(f"module 'clipadapt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
