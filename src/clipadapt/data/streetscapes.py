"""Global StreetScapes manual labels: the attribute tasks CLIP-MHAdapter is trained on.

    manual_labels/
      train/<task>.csv, test/<task>.csv   columns uuid, <task> (the label), img_path (relative to
                                          manual_labels/, starting with img/); others ignored
      img/...
      tasks.json                          optional: {task: {"template": "... {} ...",
                                                            "classnames": {label: name}}}

The eight built-in tasks (glare, lighting_condition, pano_status, platform, quality, reflection,
view_direction, weather) carry the template and class names that CLIP-MHAdapter uses; ``tasks.json``
(written by ShapesWorld for its scene attributes) adds tasks or overrides built-in ones.

Labels are matched whatever their spelling: case, surrounding and repeated whitespace, ``_``
for a space, the order of ``/``-joined parts ("dusk/dawn" = "dawn/dusk", "back/front" =
"front/back") and true/yes, false/no. A label is spelled as the task lists it, else
lower-cased and cleaned. Label ids: alphabetical order of the (lower-cased) train labels.
Validation: a seeded, stratified ``val_fraction`` of train per class, at least one per class.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipadapt.data.dataset import ClassificationDataset, Item, make_splits
from clipadapt.errors import ClipAdaptError

TASKS_FILE = "tasks.json"


@dataclass(frozen=True)
class TaskSpec:
    """A task's zero-shot template and class names: ``names[label]`` is the text that fills
    the template (a label missing from ``names`` is its own text)."""

    template: str
    names: dict[str, str]


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "glare": TaskSpec("a photo with {}.", {"yes": "glare", "no": "no glare"}),
    "lighting_condition": TaskSpec(
        "a photo taken during {}.", {"day": "day", "night": "night", "dawn/dusk": "twilight"}
    ),
    "pano_status": TaskSpec("a {} photo.", {"true": "panoramic", "false": "non-panoramic"}),
    "platform": TaskSpec("a photo taken on {}.", {}),
    "quality": TaskSpec(
        "a photo of {} quality.",
        {"good": "good", "slightly poor": "slightly poor", "very poor": "very poor"},
    ),
    "reflection": TaskSpec("a photo with {}.", {"yes": "reflection", "no": "no reflection"}),
    "view_direction": TaskSpec(
        "a photo captured {} the road.", {"front/back": "along", "side": "across"}
    ),
    "weather": TaskSpec(
        "a photo in {} weather.", {w: w for w in ("clear", "cloudy", "rainy", "snowy", "foggy")}
    ),
}
_TRUE, _FALSE = {"true", "yes"}, {"false", "no"}


def _clean(label: str) -> str:
    """Lower case, ``_`` -> space, whitespace collapsed, spaces around ``/`` removed."""
    text = " ".join(label.replace("_", " ").lower().split())
    return "/".join(part.strip() for part in text.split("/"))


def label_key(label: str) -> str:
    """What two spellings of one label have in common (see the module docstring)."""
    text = _clean(label)
    if "/" in text:
        return "/".join(sorted(text.split("/")))
    if text in _TRUE:
        return "true"
    if text in _FALSE:
        return "false"
    return text


def normalise_label(raw: str, known: list[str] | tuple[str, ...] = ()) -> str:
    """The canonical spelling of ``raw``: the ``known`` label with the same key, else the key."""
    key = label_key(raw)
    return next((k for k in known if label_key(k) == key), key)


@dataclass
class StreetTask:
    """One attribute task: ``labels[i]`` is label id i's canonical spelling, ``classnames[i]``
    its text in ``template``; ``splits`` = {"train", "val", "test"} ClassificationDatasets whose
    classnames are ``classnames``; ``builtin``: the Global StreetScapes task of that name (not
    one that tasks.json defines or overrides)."""

    name: str
    template: str
    labels: list[str]
    classnames: list[str]
    splits: dict[str, ClassificationDataset]
    builtin: bool = False


def manual_labels_root(path: str | Path) -> Path:
    """The folder holding train/ and test/: ``path`` itself or its ``manual_labels/``."""
    path = Path(path).expanduser()
    for candidate in (path, path / "manual_labels"):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise ClipAdaptError(
        f"{path}: not a StreetScapes manual-labels folder (expected train/<task>.csv and "
        "test/<task>.csv, in it or in its manual_labels/)"
    )


def task_specs(root: str | Path) -> dict[str, TaskSpec]:
    """The built-in tasks, updated with the root's tasks.json (if any)."""
    root = manual_labels_root(root)
    specs = dict(BUILTIN_TASKS)
    path = root / TASKS_FILE
    if not path.is_file():
        return specs
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ClipAdaptError(f"{path}: cannot read ({e})") from e
    if not isinstance(doc, dict):
        raise ClipAdaptError(f"{path}: expected an object {{task: {{template, classnames}}}}")
    for task, entry in doc.items():
        template = entry.get("template") if isinstance(entry, dict) else None
        names = entry.get("classnames", {}) if isinstance(entry, dict) else None
        if not isinstance(template, str) or "{}" not in template or not isinstance(names, dict):
            raise ClipAdaptError(
                f'{path}: task {task!r}: expected {{"template": "...{{}}...", '
                '"classnames": {label: name}}'
            )
        specs[task] = TaskSpec(template, {str(k): str(v) for k, v in names.items()})
    return specs


def find_tasks(root: str | Path) -> list[str]:
    """Tasks with both a train and a test CSV, sorted."""
    root = manual_labels_root(root)
    train = {p.stem for p in (root / "train").glob("*.csv")}
    return sorted(t for t in train if (root / "test" / f"{t}.csv").is_file())


def _read_csv(path: Path, task: str) -> list[tuple[str, str]]:
    """(img_path, raw label) per row; rows with an empty label are skipped with a warning."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            column = next((c for c in fields if c.strip().lower() == task.lower()), None)
            if column is None or "img_path" not in fields:
                raise ClipAdaptError(
                    f"{path}: expected columns {task!r} and 'img_path' (got {fields})"
                )
            rows = [(row["img_path"] or "", row[column] or "") for row in reader]
    except OSError as e:
        raise ClipAdaptError(f"{path}: cannot read ({e.strerror})") from e
    kept = [(p.strip(), lab) for p, lab in rows if lab.strip()]
    if len(kept) < len(rows):
        warnings.warn(f"{path}: skipped {len(rows) - len(kept)} rows without a label", stacklevel=3)
    return kept


def stratified_split(
    labels: list[int], fraction: float = 0.2, seed: int = 1
) -> tuple[list[int], list[int]]:
    """(train, val) positions: per class (in id order) a seeded shuffle, ``round(fraction ·
    n_c)`` of it to val (at least 1 and at most n_c - 1). Both lists are sorted."""
    if not 0.0 < fraction < 1.0:
        raise ClipAdaptError(f"val_fraction={fraction}: expected a value between 0 and 1")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        n_val = min(max(1, math.floor(fraction * len(members) + 0.5)), len(members) - 1)
        val += [members[i] for i in rng.permutation(len(members))[:n_val]]
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def read_task(
    root: str | Path, task: str, *, val_fraction: float = 0.2, seed: int = 1
) -> StreetTask:
    """Read one task's train/test CSVs and split train into train/val (stratified, seeded)."""
    root = manual_labels_root(root)
    specs = task_specs(root)
    files = {split: root / split / f"{task}.csv" for split in ("train", "test")}
    for path in files.values():
        if not path.is_file():
            raise ClipAdaptError(f"{path}: file not found (tasks here: {find_tasks(root)})")
    if task not in specs:
        raise ClipAdaptError(
            f"{files['train']}: unknown task {task!r} (expected one of the built-in tasks "
            f"{sorted(BUILTIN_TASKS)} or an entry in {root / TASKS_FILE})"
        )
    spec = specs[task]
    known = list(spec.names)
    rows = {
        split: [(p, normalise_label(lab, known)) for p, lab in _read_csv(path, task)]
        for split, path in files.items()
    }
    labels = sorted({lab for _, lab in rows["train"]}, key=lambda s: (s.lower(), s))
    if not labels:
        raise ClipAdaptError(f"{files['train']}: no labelled rows")
    label_id = {lab: i for i, lab in enumerate(labels)}
    classnames = [spec.names.get(lab, lab) for lab in labels]
    items: dict[str, list[Item]] = {}
    for split, split_rows in rows.items():
        items[split] = []
        for rel, lab in split_rows:
            if lab not in label_id:
                raise ClipAdaptError(
                    f"{files[split]}: unknown label {lab!r} for {rel} "
                    f"(the train labels are {labels})"
                )
            items[split].append(Item(str(root / rel), label_id[lab], classnames[label_id[lab]]))
    counts = Counter(it.label for it in items["train"])
    small = [labels[i] for i in range(len(labels)) if counts[i] < 2]
    if small:
        warnings.warn(
            f"{files['train']}: classes {small} have a single train image; none goes to val",
            stacklevel=2,
        )
    train_pos, val_pos = stratified_split([it.label for it in items["train"]], val_fraction, seed)
    splits = {
        "train": [items["train"][i] for i in train_pos],
        "val": [items["train"][i] for i in val_pos],
        "test": items["test"],
    }
    name = root.parent.name if root.name == "manual_labels" else root.name
    datasets = make_splits(f"{name}/{task}", str(root), splits, classnames, str(files["train"]))
    builtin = spec is BUILTIN_TASKS.get(task)
    return StreetTask(task, spec.template, labels, classnames, datasets, builtin)
