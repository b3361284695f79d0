"""The CoOp few-shot protocol: K training images per class, min(K, 4) validation images.

Randomness: one ``random.Random(seed)`` per draw, used in this order: ``rng.sample`` over each
class's training items (classes in order of first appearance in the split), then the same for
the validation items. This is the draw CoOp makes after seeding Python's global generator.
When the dataset has no validation split (ImageNet, a flat folder), validation shots come from
the training items not drawn for training.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

from clipadapt.data.dataset import ClassificationDataset, Item
from clipadapt.errors import ClipAdaptError
from clipadapt.io import read_json, write_json

VAL_SHOTS_MAX = 4


def _by_class(indices: list[int], items: list[Item]) -> dict[int, list[int]]:
    """Item indices grouped by label; dict order = order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i in indices:
        groups.setdefault(items[i].label, []).append(i)
    return groups


def _draw(
    rng: random.Random,
    indices: list[int],
    items: list[Item],
    classnames: list[str],
    shots: int,
    what: str,
) -> list[int]:
    drawn, short = [], []
    for label, members in _by_class(indices, items).items():
        if len(members) >= shots:
            drawn += rng.sample(members, shots)
        else:
            drawn += members
            short.append(f"{classnames[label]} ({len(members)})")
    if short:
        warnings.warn(
            f"{what}: {len(short)} classes have fewer than {shots} images, keeping all of them: "
            + ", ".join(short[:10])
            + (" ..." if len(short) > 10 else ""),
            stacklevel=3,
        )
    return drawn


def few_shot(
    splits: dict[str, ClassificationDataset], shots: int, seed: int
) -> dict[str, ClassificationDataset]:
    """Draw the K-shot ``train`` and min(K, 4)-shot ``val`` subsets (CoOp protocol).

    splits: a reader's {"train", "val", ...}. Returns {"train", "val"} whose items keep the
    drawn order; each one's ``indices`` are positions in its ``parent_split`` ("val" is drawn
    from "train" when the dataset has no validation split).
    """
    if shots < 1:
        raise ClipAdaptError(f"shots={shots}: expected a positive number of shots per class")
    train = splits.get("train")
    if train is None or len(train) == 0:
        name = train.name if train is not None else "dataset"
        raise ClipAdaptError(f"{name}: the train split is empty; cannot draw {shots} shots")
    rng = random.Random(seed)
    val_shots = min(shots, VAL_SHOTS_MAX)
    train_idx = _draw(
        rng, list(range(len(train))), train.items, train.classnames, shots, f"{train.name} train"
    )
    val = splits.get("val")
    if val is not None and len(val) > 0:
        val_source = val
        val_pool = list(range(len(val)))
    else:
        val_source = train
        taken = set(train_idx)
        val_pool = [i for i in range(len(train)) if i not in taken]
    val_idx = (
        _draw(rng, val_pool, val_source.items, train.classnames, val_shots, f"{train.name} val")
        if val_pool
        else []
    )
    return {
        "train": train.subset(train_idx, split="train"),
        "val": val_source.subset(val_idx, split="val"),
    }


def save_subset(
    path: str | os.PathLike, subset: dict[str, ClassificationDataset], shots: int, seed: int
) -> Path:
    """Write the drawn subset (paths, labels, class names) as JSON, atomically."""
    train = subset["train"]
    doc = {
        "protocol": "coop-few-shot",
        "rng": "python random.Random(seed)",
        "dataset": train.name,
        "root": train.root,
        "shots": shots,
        "seed": seed,
        "classnames": train.classnames,
        **{split: [[it.path, it.label] for it in ds.items] for split, ds in subset.items()},
        "indices": {
            split: {"parent_split": ds.parent_split, "index": ds.indices}
            for split, ds in subset.items()
        },
    }
    return write_json(path, doc)


def load_subset(path: str | os.PathLike) -> dict[str, ClassificationDataset]:
    """Read a subset written by :func:`save_subset`: {"train", "val"} -> ClassificationDataset."""
    doc = read_json(path)
    try:
        classnames = list(doc["classnames"])
        out = {}
        for split in ("train", "val"):
            items = []
            for p, label in doc[split]:
                if not 0 <= label < len(classnames):
                    raise ClipAdaptError(f"{path}: unknown label {label} for {p}")
                items.append(Item(p, int(label), classnames[label]))
            where = doc.get("indices", {}).get(split, {})
            out[split] = ClassificationDataset(
                doc["dataset"],
                doc["root"],
                items,
                classnames,
                split=split,
                source=str(path),
                indices=where.get("index"),
                parent_split=where.get("parent_split"),
            )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ClipAdaptError(f"{path}: not a few-shot subset file ({type(e).__name__})") from e
    return out
