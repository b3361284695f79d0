"""The CoOp layouts of the 11 few-shot datasets, and CoOp-style split json in any folder.

Each reader returns ``{"train", "val", "test"}`` -> ClassificationDataset (see docs/datasets.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from clipadapt.data import names
from clipadapt.data.dataset import ClassificationDataset, Item, is_image, make_splits
from clipadapt.errors import ClipAdaptError
from clipadapt.io import read_json, read_text


@dataclass(frozen=True)
class CoopSpec:
    """Where a CoOp dataset keeps its images and split file, relative to its folder."""

    folder: str
    image_dir: str  # "" = paths are relative to the dataset folder (StanfordCars)
    split_file: str


SPLIT_JSON = {
    "caltech-101": CoopSpec("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": CoopSpec("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": CoopSpec("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": CoopSpec("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food-101": CoopSpec("food-101", "images", "split_zhou_Food101.json"),
    "sun397": CoopSpec("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": CoopSpec("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": CoopSpec("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": CoopSpec("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
COOP_DATASETS = ("imagenet", *SPLIT_JSON, "fgvc_aircraft")


def canonical_name(name: str, aliases: bool = True) -> str | None:
    """The CoOp folder name for ``name`` ("OxfordPets", "oxford_pets", "Flowers102", "sun"),
    or None. With ``aliases=False`` only the folder's own name or its split file's name count
    (how a folder is recognised by its name)."""
    canonical = names.canonical_name(name)
    if aliases or canonical is None:
        return canonical
    key = names.squash(name)
    own = {names.squash(canonical)}
    if canonical in SPLIT_JSON:
        own.add(names.squash(SPLIT_JSON[canonical].split_file[len("split_zhou_") : -len(".json")]))
    return canonical if key in own else None


def _entries(data: dict, split: str, split_file: Path) -> list:
    entries = data.get(split, [])
    if not isinstance(entries, list):
        raise ClipAdaptError(f"{split_file}: {split!r} is not a list of [path, label, classname]")
    return entries


def read_split_json(
    split_file: Path, image_root: Path, name: str, data: dict | None = None
) -> dict[str, ClassificationDataset]:
    """``{"train": [[relpath, label, classname], ...], "val": ..., "test": ...}``."""
    data = read_json(split_file) if data is None else data
    if not isinstance(data, dict):
        raise ClipAdaptError(f"{split_file}: expected a JSON object with train/val/test lists")
    names: dict[int, str] = {}
    splits: dict[str, list[Item]] = {}
    for split in ("train", "val", "test"):
        items = []
        for entry in _entries(data, split, split_file):
            if not (
                isinstance(entry, list | tuple)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and isinstance(entry[2], str)
            ):
                raise ClipAdaptError(
                    f"{split_file}: {split} entry {entry!r} is not [path, label, classname]"
                )
            rel, label, classname = entry
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                raise ClipAdaptError(
                    f"{split_file}: unknown label {label!r} for {rel} (expected an integer >= 0)"
                )
            if names.setdefault(label, classname) != classname:
                raise ClipAdaptError(
                    f"{split_file}: label {label} is named both {names[label]!r} and {classname!r}"
                )
            items.append(Item(str(image_root / rel), label, classname))
        splits[split] = items
    if not names:
        raise ClipAdaptError(f"{split_file}: no images in any split")
    classnames = [names.get(label) for label in range(max(names) + 1)]
    for label, cname in enumerate(classnames):
        if cname is None:
            raise ClipAdaptError(f"{split_file}: class label {label} has no images (empty class)")
    return make_splits(name, str(split_file.parent), splits, classnames, str(split_file))


def read_coop(folder: Path, name: str) -> dict[str, ClassificationDataset]:
    """One of the nine datasets with a ``split_zhou_*.json`` (see SPLIT_JSON)."""
    spec = SPLIT_JSON[name]
    split_file = folder / spec.split_file
    if not split_file.is_file():
        raise ClipAdaptError(f"{folder}: missing split file {spec.split_file} for {name}")
    return read_split_json(split_file, folder / spec.image_dir, name)


def read_generic_split(folder: Path, split_file: Path) -> dict[str, ClassificationDataset]:
    """A folder with one CoOp-style ``split_*.json`` (e.g. ShapesWorld).

    Paths are relative to the folder, or to the one subfolder that holds the first image.
    """
    stem = split_file.stem.removeprefix("split_").removeprefix("zhou_")
    name = stem.lower() or folder.name
    data = read_json(split_file)
    if not isinstance(data, dict):
        raise ClipAdaptError(f"{split_file}: expected a JSON object with train/val/test lists")
    firsts = (e for s in ("train", "val", "test") for e in _entries(data, s, split_file)[:1])
    first = next((e[0] for e in firsts if isinstance(e, list | tuple) and e), None)
    image_root = folder
    if isinstance(first, str) and not (folder / first).is_file():
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
        image_root = next((d for d in subdirs if (d / first).is_file()), folder)
    return read_split_json(split_file, image_root, name, data)


def read_fgvc_aircraft(folder: Path) -> dict[str, ClassificationDataset]:
    """``variants.txt`` (class names by label) + ``images_variant_{train,val,test}.txt``."""
    variants_file = folder / "variants.txt"
    if not variants_file.is_file():
        raise ClipAdaptError(f"{folder}: missing split file variants.txt for fgvc_aircraft")
    classnames = [ln.strip() for ln in read_text(variants_file).splitlines() if ln.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for split in ("train", "val", "test"):
        split_file = folder / f"images_variant_{split}.txt"
        if not split_file.is_file():
            raise ClipAdaptError(f"{folder}: missing split file {split_file.name}")
        items = []
        for lineno, line in enumerate(read_text(split_file).splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise ClipAdaptError(
                    f"{split_file}:{lineno}: unknown label {variant!r} (not in variants.txt)"
                )
            path = folder / "images" / f"{image_id}.jpg"
            items.append(Item(str(path), label_of[variant], variant))
        splits[split] = items
    return make_splits("fgvc_aircraft", str(folder), splits, classnames, str(folder))


def _list_class_folder(directory: Path) -> list[str]:
    return sorted(e.path for e in os.scandir(directory) if e.is_file() and is_image(e.name))


def read_imagenet(folder: Path) -> dict[str, ClassificationDataset]:
    """``images/{train,val}/<wnid>/`` + ``classnames.txt``; test = val; no val split.

    Labels follow the sorted wnid folders of ``images/train`` (as CoOp); the few-shot sampler
    draws the validation shots from the remaining training images.
    """
    names_file = folder / "classnames.txt"
    if not names_file.is_file():
        raise ClipAdaptError(f"{folder}: missing split file classnames.txt for imagenet")
    name_of = {}
    for line in read_text(names_file).splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            name_of[wnid] = name.strip()
    train_dir, val_dir = folder / "images" / "train", folder / "images" / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise ClipAdaptError(f"{folder}: missing image folder {d.relative_to(folder)}")
    wnids = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    for wnid in wnids:
        if wnid not in name_of:
            raise ClipAdaptError(f"{names_file}: unknown label {wnid!r} (folder in images/train)")
    label_of = {w: i for i, w in enumerate(wnids)}
    classnames = [name_of[w] for w in wnids]
    splits = {}
    for split, d in (("train", train_dir), ("test", val_dir)):
        items = []
        for wnid in sorted(e.name for e in os.scandir(d) if e.is_dir()):
            if wnid not in label_of:
                raise ClipAdaptError(f"{d / wnid}: unknown label {wnid!r} (not in images/train)")
            label = label_of[wnid]
            items += [Item(p, label, classnames[label]) for p in _list_class_folder(d / wnid)]
        splits[split] = items
    return make_splits("imagenet", str(folder), splits, classnames, str(folder), False)


def read_known(folder: Path, name: str) -> dict[str, ClassificationDataset]:
    """Read CoOp dataset ``name`` (a CoOp folder name) from ``folder``."""
    if name == "imagenet":
        return read_imagenet(folder)
    if name == "fgvc_aircraft":
        return read_fgvc_aircraft(folder)
    return read_coop(folder, name)


def detect_known(folder: Path) -> str | None:
    """Which CoOp dataset ``folder`` holds, from its name or its files; None if none."""
    by_name = canonical_name(folder.name, aliases=False)
    if by_name is not None:
        return by_name
    for name, spec in SPLIT_JSON.items():
        if (folder / spec.split_file).is_file():
            return name
    if (folder / "images_variant_train.txt").is_file():
        return "fgvc_aircraft"
    if (folder / "classnames.txt").is_file() and (folder / "images" / "train").is_dir():
        return "imagenet"
    return None


__all__ = [
    "COOP_DATASETS",
    "SPLIT_JSON",
    "ClassificationDataset",
    "canonical_name",
    "detect_known",
    "read_known",
    "read_generic_split",
    "read_split_json",
]
