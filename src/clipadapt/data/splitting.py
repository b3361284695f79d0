"""A held-out split for a dataset that comes without one (a plain ImageFolder or one CSV file).

CoOp's rule for its custom datasets: per class, shuffle the images with a seed, then take
round(50%) for train, round(20%) for val and the rest for test. The drawn split is written as a
CoOp-style split json under the cache folder (``<cache>/splits/<name>-<digest>/split_<name>.json``,
absolute paths), reused whenever the same images are split with the same ratios and seed, and
readable on its own: ``--data that.json`` loads exactly that split.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from clipadapt.data.dataset import Item
from clipadapt.errors import ClipAdaptError, warn
from clipadapt.io import default_cache_dir, read_json, write_json

DEFAULT_RATIOS = (0.5, 0.2, 0.3)  # CoOp: read_and_split_data(p_trn=0.5, p_val=0.2)
SPLIT_SEED = 1


def parse_split_ratios(text: str | tuple | list | None) -> tuple[float, float, float]:
    """ "0.5,0.2,0.3" (or "50,20,30", or two numbers: test takes the rest) -> fractions."""
    if text is None:
        return DEFAULT_RATIOS
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = [float(p) for p in parts]
    except (TypeError, ValueError):
        values = []
    if len(values) == 2 and all(v >= 0 for v in values):
        total = 100.0 if sum(values) > 1 else 1.0
        values.append(total - sum(values))
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0 or values[0] == 0:
        raise ClipAdaptError(
            f"--split-ratios {text!r}: expected train,val,test fractions such as 0.5,0.2,0.3 "
            "(train > 0, none negative)"
        )
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def stratified_split(
    items: list[Item], ratios: tuple[float, float, float], seed: int = SPLIT_SEED
) -> dict[str, list[Item]]:
    """Per class (in label order), shuffle with ``seed`` and cut round(n·p_train),
    round(n·p_val), the rest for test; each split keeps the order of ``items``. A class of two
    or more images keeps at least one image for train and one for test when their ratios are
    positive."""
    rng = random.Random(seed)
    by_label: dict[int, list[Item]] = {}
    for it in items:
        by_label.setdefault(it.label, []).append(it)
    out: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        n = len(group)
        n_train = max(1, round(n * ratios[0]))
        n_val = round(n * ratios[1])
        if ratios[2] > 0 and n >= 2 and n_train + n_val >= n:  # keep one for test
            n_val = max(0, n - 1 - n_train)
            n_train = min(n_train, n - 1 - n_val)
        out["train"] += group[:n_train]
        out["val"] += group[n_train : n_train + n_val]
        out["test"] += group[n_train + n_val :]
    order = {id(it): i for i, it in enumerate(items)}
    return {s: sorted(v, key=lambda it: order[id(it)]) for s, v in out.items()}  # listing order


def _digest(items: list[Item], ratios, seed: int) -> str:
    listing = sorted((it.path, it.label) for it in items)
    blob = json.dumps({"items": listing, "ratios": list(ratios), "seed": seed})
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def held_out_split(
    name: str,
    where: str | os.PathLike,
    items: list[Item],
    ratios: tuple[float, float, float] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, list[Item]]:
    """The stored split of ``items`` (drawn and written the first time); says so in one line."""
    ratios = parse_split_ratios(ratios)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "dataset"
    folder = Path(cache_dir or default_cache_dir()) / "splits"
    split_file = folder / f"{safe}-{_digest(items, ratios, SPLIT_SEED)}" / f"split_{safe}.json"
    by_path = {it.path: it for it in items}
    splits = None
    if split_file.is_file():
        try:
            data = read_json(split_file)
            splits = {s: [by_path[e[0]] for e in data[s]] for s in ("train", "val", "test")}
        except (ClipAdaptError, KeyError, TypeError, IndexError):
            splits = None  # unreadable or not ours: draw it again
    if splits is None:
        splits = stratified_split(items, ratios, SPLIT_SEED)
        data = {s: [[it.path, it.label, it.classname] for it in v] for s, v in splits.items()}
        try:
            write_json(split_file, data)
        except ClipAdaptError as e:
            warn(f"{where}: could not store the drawn split ({e})")
    pct = "/".join(f"{round(100 * r)}" for r in ratios)
    warn(
        f"{where}: no train/val/test splits; using a seeded {pct} train/val/test split per "
        f"class ({', '.join(f'{len(v)} {s}' for s, v in splits.items())}), stored in "
        f"{split_file} (--data that file reuses it; --split-ratios changes it)"
    )
    return splits
