"""ImageFolder (``root/<class>/<image>``) and CSV (``path,label``) readers.

Both accept split subfolders/files (``train``, ``val``, ``test``). Without them the one folder or
CSV file is split per class with a seed, 50/20/30 by default (data/splitting.py: CoOp's rule for
custom datasets), and the split is stored as a reusable split json. A ``train`` + ``val`` pair
without ``test`` evaluates on ``val``, as CoOp does for ImageNet.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from clipadapt.data.dataset import ClassificationDataset, Item, is_image, make_splits
from clipadapt.data.splitting import held_out_split
from clipadapt.errors import ClipAdaptError, warn

SPLITS = ("train", "val", "test")


def complete_splits(
    splits: dict[str, list[Item]], where: Path, split_ratios=None, cache_dir=None
) -> dict[str, list[Item]]:
    """Give a dataset without a test split one: draw a held-out split from a lone ``train``;
    with ``train`` + ``val`` test on ``val`` (CoOp's ImageNet rule)."""
    if set(splits) == {"train"}:
        return held_out_split(where.name, where, splits["train"], split_ratios, cache_dir)
    if "test" not in splits and "val" in splits:
        warn(f"{where}: no test split; evaluating on val (as CoOp does for ImageNet)")
        return {"train": splits.get("train", []), "val": [], "test": splits["val"]}
    return splits


def _class_folders(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name[0] != ".")


def _images_under(directory: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f)]
    return found


def read_image_folder(
    root: Path, split_ratios=None, cache_dir=None
) -> dict[str, ClassificationDataset]:
    """``root/<class>/<image>`` or ``root/{train,val,test}/<class>/<image>``.

    Labels follow the sorted class folder names of ``train`` (torchvision's convention); images
    in nested folders below a class folder belong to that class.
    """
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in split_dirs and "test" not in split_dirs:
        split_dirs = {"train": root}
    reference = split_dirs.get("train", split_dirs.get("test"))
    classnames = _class_folders(reference)
    if not classnames:
        raise ClipAdaptError(f"{reference}: no class folders (expected <class>/<image> inside)")
    label_of = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for split, directory in split_dirs.items():
        items = []
        for cls in _class_folders(directory):
            if cls not in label_of:
                raise ClipAdaptError(
                    f"{directory / cls}: unknown label {cls!r} (not a class folder of {reference})"
                )
            items += [Item(p, label_of[cls], cls) for p in _images_under(directory / cls)]
        splits[split] = items
    splits = complete_splits(splits, root, split_ratios, cache_dir)
    return make_splits(root.name, str(root), splits, classnames, str(root), check_files=False)


def _read_rows(csv_file: Path) -> list[tuple[str, str, str | None]]:
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            reader = csv.DictReader(f)
            reader.fieldnames = [(n or "").strip() for n in reader.fieldnames or []]
            fields = reader.fieldnames
            if "path" not in fields or "label" not in fields:
                raise ClipAdaptError(
                    f"{csv_file}: expected a header with columns path,label (got {fields})"
                )
            has_name = "classname" in fields
            rows = []
            for row in reader:
                path, label = (row["path"] or "").strip(), row["label"]
                if not path or label is None:
                    raise ClipAdaptError(
                        f"{csv_file}:{reader.line_num}: expected a path and a label"
                    )
                rows.append((path, label.strip(), row["classname"] if has_name else None))
            return rows
    except OSError as e:
        raise ClipAdaptError(f"{csv_file}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ClipAdaptError(f"{csv_file}: not UTF-8 text (byte {e.start})") from e
    except csv.Error as e:
        raise ClipAdaptError(f"{csv_file}: not a CSV file ({e})") from e


def read_csv(path: Path, split_ratios=None, cache_dir=None) -> dict[str, ClassificationDataset]:
    """A CSV file with a header ``path,label[,classname]``, or a folder of ``{split}.csv``.

    Paths are relative to the CSV's folder. Labels are class names (ids in sorted order of the
    train labels), or all non-negative integers (used as ids; names from an optional
    ``classname`` column, else the integer).
    """
    if path.is_file():
        files = {"train": path}
    else:
        files = {s: path / f"{s}.csv" for s in SPLITS if (path / f"{s}.csv").is_file()}
        if not files:
            found = sorted(path.glob("*.csv"))
            if len(found) != 1:
                raise ClipAdaptError(
                    f"{path}: expected train.csv/val.csv/test.csv or one CSV file "
                    f"(found {len(found)})"
                )
            files = {"train": found[0]}
    rows = {s: _read_rows(f) for s, f in files.items()}
    reference = "train" if "train" in rows else next(iter(rows))
    numeric = all(lab.isdigit() for rs in rows.values() for _, lab, _ in rs)
    if numeric:
        names: dict[int, str] = {}
        for rs in rows.values():
            for _, lab, cname in rs:
                names.setdefault(int(lab), cname if cname else lab)
        classnames = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]
        label_of = {lab: int(lab) for rs in rows.values() for _, lab, _ in rs}
    else:
        classnames = sorted({lab for _, lab, _ in rows[reference]})
        label_of = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for split, rs in rows.items():
        base = files[split].parent
        items = []
        for rel, lab, _ in rs:
            if lab not in label_of:
                raise ClipAdaptError(
                    f"{files[split]}: unknown label {lab!r} for {rel} "
                    f"(not among the labels of {files[reference].name})"
                )
            label = label_of[lab]
            items.append(Item(str(base / rel), label, classnames[label]))
        splits[split] = items
    splits = complete_splits(splits, path, split_ratios, cache_dir)
    root = path if path.is_dir() else path.parent
    name = path.stem if path.is_file() else path.name
    return make_splits(name, str(root), splits, classnames, str(path))
