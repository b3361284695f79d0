"""Few-shot methods on cached CLIP features, by name.

    method = clipadapt.methods.get("tip-adapter-f", **hparams)
    clipadapt.methods.names()   # every registered name

A method module registers its class with ``@register``; every module in this package is
imported on first use of ``get``/``names``, so a new method is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from clipadapt.errors import ClipAdaptError
from clipadapt.methods.base import Method, load_adapter, parse_hparams

_REGISTRY: dict[str, type[Method]] = {}
_NOT_METHODS = {"base"}


def register(cls_or_name: type[Method] | str | None = None):
    """Class decorator: ``@register`` (uses ``cls.name``) or ``@register("my-method")``."""

    def wrap(cls: type[Method], name: str | None = None) -> type[Method]:
        name = name or cls.name
        cls.name = name
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = cls
        return cls

    if isinstance(cls_or_name, type):
        return wrap(cls_or_name)
    return lambda cls: wrap(cls, cls_or_name)


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def names() -> list[str]:
    """Every registered method name, sorted."""
    _discover()
    return sorted(_REGISTRY)


def get_class(name: str) -> type[Method]:
    _discover()
    if name not in _REGISTRY:
        raise ClipAdaptError(f"unknown method {name!r} (expected one of: {', '.join(names())})")
    return _REGISTRY[name]


def get(name: str, **hparams: Any) -> Method:
    """A new, unfitted method; ``hparams`` override its Config defaults (plus ``device``)."""
    return get_class(name)(**hparams)


from clipadapt.methods import (  # noqa: E402  (modules register themselves on import)
    clap,
    clip_adapter,
    gda,
    linear_probe,
    lp_plus_plus,
    mh_adapter,
    mm_adapter,
    proker,
    taskres,
    tip_adapter,
    tip_adapter_f,
    zero_shot,
)

__all__ = [
    "Method",
    "clap",
    "clip_adapter",
    "gda",
    "get",
    "get_class",
    "linear_probe",
    "lp_plus_plus",
    "mh_adapter",
    "mm_adapter",
    "load_adapter",
    "names",
    "parse_hparams",
    "proker",
    "register",
    "taskres",
    "tip_adapter",
    "tip_adapter_f",
    "zero_shot",
]
