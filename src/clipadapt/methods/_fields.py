"""Shared helper of the successor methods' Configs: a dataclass field with a help text."""

from __future__ import annotations

import dataclasses
from typing import Any


def hp(default: Any, help: str) -> Any:
    """A dataclass field with ``default`` and its ``help`` text (metadata["help"])."""
    return dataclasses.field(default=default, metadata={"help": help})
