"""Dataset readers, the few-shot sampler, and `load_dataset` that tells the layouts apart."""

from __future__ import annotations

import os
from pathlib import Path

from clipadapt.data.coop import (
    COOP_DATASETS,
    canonical_name,
    detect_known,
    read_generic_split,
    read_known,
)
from clipadapt.data.dataset import ClassificationDataset, Item
from clipadapt.data.folder import read_csv, read_image_folder
from clipadapt.data.names import DISPLAY
from clipadapt.data.sampler import few_shot, load_subset, save_subset
from clipadapt.data.splitting import parse_split_ratios
from clipadapt.errors import ClipAdaptError


def _resolve(path_or_name: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    if root is not None:
        root = Path(root).expanduser()
        for candidate in (canonical_name(str(path_or_name)), str(path_or_name)):
            if candidate and (root / candidate).exists():
                return root / candidate
        raise ClipAdaptError(f"{path_or_name}: no such dataset folder in {root}{_known_hint()}")
    hint = _known_hint() if canonical_name(str(path_or_name)) else ""
    raise ClipAdaptError(f"{path_or_name}: no such dataset folder or file{hint}")


def _known_hint() -> str:
    return " (known names: " + ", ".join(DISPLAY.values()) + ", or a folder path)"


def _check_not_collection(path: Path) -> None:
    """A folder whose subfolders are known datasets is a ``$DATA`` root, not one dataset."""
    with os.scandir(path) as entries:
        known = sorted(
            e.name
            for e in entries
            if e.is_dir() and canonical_name(e.name, aliases=False) is not None
        )
    if len(known) >= 2:
        raise ClipAdaptError(
            f"{path}: a folder of {len(known)} datasets ({', '.join(known[:4])}"
            f"{', ...' if len(known) > 4 else ''}), not one dataset; pass one of them, e.g. "
            f"--data {known[0]} --data-root {path}"
        )


def load_dataset(
    path_or_name: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    split_ratios: str | tuple[float, float, float] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, ClassificationDataset]:
    """Read a dataset in any supported layout -> {"train", "val", "test"}.

    path_or_name: a dataset folder, a CSV file, or a name ("oxford_pets", "OxfordPets", ...)
    looked up as a folder inside ``root`` (the CoOp ``$DATA`` folder).
    Layouts, tried in order: the 11 CoOp datasets (by folder name or their split files), a
    folder with exactly one ``split_*.json`` (CoOp-style, e.g. ShapesWorld), CSV
    (``train.csv``/``val.csv``/``test.csv`` or one CSV file), ImageFolder.
    A CSV or ImageFolder without splits gets a seeded stratified train/val/test split
    (``split_ratios``, default 0.5,0.2,0.3), stored as a split json under ``cache_dir``
    (default ``$CLIPADAPT_CACHE`` or ``~/.cache/clipadapt``).
    """
    if split_ratios is not None:
        split_ratios = parse_split_ratios(split_ratios)
    path = _resolve(path_or_name, root)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return read_csv(path, split_ratios, cache_dir)
        if path.suffix.lower() == ".json":
            return read_generic_split(path.parent, path)
        raise ClipAdaptError(f"{path}: expected a dataset folder, a .csv or a split_*.json file")
    known = detect_known(path)
    if known is not None:
        return read_known(path, known)
    split_files = sorted(path.glob("split_*.json"))
    if len(split_files) == 1:
        return read_generic_split(path, split_files[0])
    if len(split_files) > 1:
        names = ", ".join(p.name for p in split_files)
        raise ClipAdaptError(f"{path}: several split files ({names}); pass one of them")
    if any(path.glob("*.csv")):
        return read_csv(path, split_ratios, cache_dir)
    with os.scandir(path) as entries:
        has_folders = any(e.is_dir() for e in entries)
    if has_folders:
        _check_not_collection(path)
        return read_image_folder(path, split_ratios, cache_dir)
    raise ClipAdaptError(
        f"{path}: unknown dataset layout (expected a CoOp dataset, split_*.json, CSV, "
        "or <class>/<image> folders)"
    )


def load_split(
    path_or_name: str | os.PathLike,
    split: str,
    root: str | os.PathLike | None = None,
    **options,
) -> ClassificationDataset:
    """One split of :func:`load_dataset` (``options``: its keywords); an empty split is an
    error naming the dataset."""
    if split not in ("train", "val", "test"):
        raise ClipAdaptError(f"split {split!r}: expected train, val or test")
    ds = load_dataset(path_or_name, root, **options)[split]
    if len(ds) == 0:
        raise ClipAdaptError(f"{path_or_name}: the {split} split is empty")
    return ds


__all__ = [
    "COOP_DATASETS",
    "ClassificationDataset",
    "Item",
    "few_shot",
    "load_dataset",
    "load_split",
    "load_subset",
    "parse_split_ratios",
    "save_subset",
]
