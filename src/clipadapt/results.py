"""One JSON per run: {dataset, model, pretrained, method, shots, seed, metrics, ...extras}."""

from __future__ import annotations

import os
import re
from pathlib import Path

from clipadapt.errors import ClipAdaptError
from clipadapt.io import read_json, write_json

REQUIRED = ("dataset", "model", "pretrained", "method", "shots", "seed", "metrics")


def make_result(
    *,
    dataset: str,
    model: str,
    pretrained: str | None,
    method: str,
    shots: int | None,
    seed: int | None,
    metrics: dict[str, float],
    recipe: str = "clean",
    selection: str | None = None,
    **extras,
) -> dict:
    """A result record; extras (e.g. "protocol", "hparams", "split", "templates") follow.

    ``recipe``: "clean" or "reference" (docs/fidelity.md). ``selection``: what chose among
    candidates while fitting, "test" when test data did (the report marks those rows)."""
    record = {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "method": method,
        "shots": shots,
        "seed": seed,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "recipe": recipe,
    }
    if selection is not None:
        record["selection"] = selection
    return {**record, **extras}


def write_result(path: str | os.PathLike, **fields) -> Path:
    """Write one run's result JSON atomically (fields as :func:`make_result`)."""
    return write_json(path, make_result(**fields))


def result_filename(dataset: str, model: str, method: str, shots, seed, recipe="clean") -> str:
    """A stable file name for a run, e.g.
    ``oxford_pets__ViT-B-16__tip-adapter__16shot__seed1.json`` (a recipe other than "clean"
    follows the method: ``tip-adapter-f@reference``)."""
    parts = [_safe(p) for p in (dataset, model, method, f"{shots}shot", f"seed{seed}")]
    if recipe != "clean":
        parts[2] += f"@{_safe(recipe)}"
    return "__".join(parts) + ".json"


def _safe(part) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(part))


def read_result(path: str | os.PathLike) -> dict:
    """Read a result JSON; missing keys are an error naming the file."""
    record = read_json(path)
    missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
    if missing:
        raise ClipAdaptError(f"{path}: not a result file (missing {', '.join(missing)})")
    return record


def read_results(directory: str | os.PathLike) -> list[dict]:
    """All result JSONs directly in ``directory``, sorted by file name (other JSON files, such
    as few-shot subset files, are left out)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ClipAdaptError(f"{directory}: no such results folder")
    records = [read_json(p) for p in sorted(directory.glob("*.json"))]
    return [r for r in records if isinstance(r, dict) and all(k in r for k in REQUIRED)]


def is_finished(path: str | os.PathLike, identity: dict) -> bool:
    """A stored run counts as done only if the same backbone weights produced it."""
    path = Path(path)
    return path.exists() and read_result(path).get("backbone") == identity
