"""Hyper-parameter dataclasses: a help text on every field, the training ones in one base.

A method's ``Config`` is a dataclass whose fields are declared with :func:`hp` (default and
help). The fields every trainable method shares (epochs, optimiser, schedule, ...) are declared
once, in :class:`TrainHParams`; a method's Config inherits them and redeclares only the
defaults its authors used (``epochs: int = 200``): the help text is then the base's.
``describe`` lists a Config's fields with their defaults and help, for ``--help-hparams`` and
for the errors of ``--hparam``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from clipadapt.errors import ClipAdaptError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")
LR_STEPS = ("iteration", "epoch")
WARMUP_TYPES = ("linear", "constant")


def hp(default: Any, help: str) -> Any:
    """A dataclass field with ``default`` and its ``help`` text."""
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(config: type, name: str) -> str:
    """The help text of field ``name``: its own, else the nearest base class's."""
    for cls in getattr(config, "__mro__", (config,)):
        f = getattr(cls, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return ""


def describe(config: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) of every field of the dataclass ``config``: the method's own
    fields first, then the shared training ones, each in declaration order."""
    shared = {f.name for f in dataclasses.fields(TrainHParams)}
    out = []
    for f in sorted(dataclasses.fields(config), key=lambda f: f.name in shared):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, default, field_help(config, f.name)))
    return out


def help_text(config: type) -> str:
    """One line per field: ``name = default  help``."""
    rows = [(name, _show(default), text) for name, default, text in describe(config)]
    width = max((len(n) + len(d) for n, d, _ in rows), default=0) + 3
    return "\n".join(f"  {f'{n} = {d}':<{width}} {t}".rstrip() for n, d, t in rows)


def one_line(config: type) -> str:
    """Every field as ``name=default (help)``, on one line (for error messages)."""
    return "; ".join(f"{n}={_show(d)} ({t})" for n, d, t in describe(config))


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class HParams:
    """The root of every Config; subclasses validate in ``__post_init__`` and call super's."""

    def __post_init__(self) -> None:
        pass


@dataclass
class TrainHParams(HParams):
    """The fields of the one training loop (clipadapt.train), shared by the trainable methods."""

    epochs: int | None = hp(20, "training epochs")
    batch_size: int = hp(256, "samples per step")
    optimizer: str = hp("adamw", "adamw, adam or sgd")
    lr: float = hp(1e-3, "base learning rate")
    weight_decay: float = hp(0.0, "weight decay of the optimiser")
    momentum: float = hp(0.9, "sgd momentum (sgd only)")
    eps: float = hp(1e-8, "adam/adamw epsilon")
    warmup_epochs: float = hp(0.0, "warm-up epochs before the cosine")
    schedule: str = hp(
        "cosine", "cosine (after the warm-up, to 0) or constant (the base lr, no warm-up)"
    )
    lr_step: str = hp(
        "iteration",
        "iteration: the lr changes every step; epoch: once per epoch, as Dassl's trainers do",
    )
    warmup_type: str = hp("linear", "per-epoch warm-up: linear (Dassl) or constant")
    warmup_lr: float = hp(1e-5, "per-epoch warm-up: Dassl's WARMUP_MIN_LR / WARMUP_CONS_LR")
    patience: int | None = hp(None, "stop after this many epochs without a better val score")
    use_views: bool = hp(True, "draw a random cached augmented view per sample each epoch")
    seed: int = hp(1, "initialisation and batch-order seed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer not in OPTIMIZERS:
            raise ClipAdaptError(
                f"optimizer={self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}"
            )
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ClipAdaptError(f"{key}={value}: expected a positive integer")
        if self.lr <= 0:
            raise ClipAdaptError(f"lr={self.lr}: expected a positive learning rate")
        for key, allowed in (
            ("schedule", SCHEDULES),
            ("lr_step", LR_STEPS),
            ("warmup_type", WARMUP_TYPES),
        ):
            if getattr(self, key) not in allowed:
                raise ClipAdaptError(
                    f"{key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}"
                )
