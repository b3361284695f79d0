"""Atomic file writes: write to a temporary name beside the target, then rename."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from clipadapt.errors import ClipAdaptError


def default_cache_dir() -> Path:
    """``$CLIPADAPT_CACHE``, else ``~/.cache/clipadapt``."""
    return Path(os.environ.get("CLIPADAPT_CACHE") or "~/.cache/clipadapt").expanduser()


def make_dirs(directory: str | os.PathLike) -> Path:
    """``mkdir -p``; ClipAdaptError naming the folder when it cannot be created."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClipAdaptError(f"{directory}: cannot create directory ({e.strerror})") from e
    return directory


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the file to ``path``."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ClipAdaptError(f"{path}: cannot write ({e.strerror})") from e
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if type(e).__module__.split(".")[0] == "safetensors":  # its own error type, e.g. disk full
            raise ClipAdaptError(f"{path}: cannot write ({first_line(e)})") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def first_line(e: BaseException) -> str:
    """An exception's message, first line only (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_json(path: str | os.PathLike, obj) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    return atomic_write(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; ClipAdaptError naming it when it cannot be read or decoded."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ClipAdaptError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise ClipAdaptError(f"{path}: cannot read ({e.strerror})") from e


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ClipAdaptError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise ClipAdaptError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
    except UnicodeDecodeError as e:
        raise ClipAdaptError(f"{path}: invalid JSON (not UTF-8 text at byte {e.start})") from e
    except RecursionError as e:
        raise ClipAdaptError(f"{path}: invalid JSON (nested too deeply)") from e
    except OSError as e:
        raise ClipAdaptError(f"{path}: cannot read ({e.strerror})") from e
