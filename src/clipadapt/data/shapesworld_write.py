"""Write ShapesWorld datasets to disk in the layouts real data uses (docs/datasets.md).

- classification (CoOp layout): ``<root>/shapesworld-<task>/images/<class>/<n>.jpg`` and
  ``split_shapesworld-<task>.json`` with ``{"train"|"val"|"test": [[path, label, classname]]}``;
- scene attributes (Global StreetScapes manual-label layout):
  ``<root>/shapesworld-streets/manual_labels/{train,test}/<task>.csv`` (uuid, <task>, img_path)
  with images under ``manual_labels/img/`` and ``tasks.json`` (template and class names per task);
- segmentation (mmseg layout): ``<root>/shapesworld-seg/images/validation/*.jpg``,
  ``annotations/validation/*.png`` (palette PNG: 0 background, 1..8 shapes) and ``classnames.txt``.

Everything is deterministic by seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipadapt.data import shapesworld as sw
from clipadapt.io import atomic_write, write_json, write_text

# task -> (class names, scene constraints of class i, zero-shot template)
CLASSIFICATION_TASKS = {
    "shapes": (sw.SHAPES, lambda i: {"shape": i}, "a photo of a {}."),
    "colours": (sw.COLOUR_NAMES, lambda i: {"colour": i}, "a photo of a {} object."),
    "patterns": (
        [f"{p} {s}" for s in sw.SHAPES for p in sw.PATTERNS],
        lambda i: {"shape": i // len(sw.PATTERNS), "pattern": i % len(sw.PATTERNS)},
        "a photo of a {}.",
    ),
    "tones": (
        [f"{t} {c}" for c in sw.COLOUR_NAMES for t in sw.TONES[1:]],
        lambda i: {"colour": i // (len(sw.TONES) - 1), "tone": 1 + i % (len(sw.TONES) - 1)},
        "a photo of a {} object.",
    ),
    "conditions": (
        [
            f"{light} in {weather} weather"
            for light in sw.ATTRIBUTES["lighting"]
            for weather in sw.ATTRIBUTES["weather"]
        ],
        lambda i: {
            "attrs": {
                "lighting": i // len(sw.ATTRIBUTES["weather"]),
                "weather": i % len(sw.ATTRIBUTES["weather"]),
            }
        },
        "a photo taken at {}.",
    ),
}
SEG_SIZE = 128


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def write_classification(
    root: str | Path,
    task: str,
    *,
    per_class: tuple[int, int, int] = (32, 16, 50),
    seed: int = 0,
    size: int = 64,
    progress: bool = True,
) -> Path:
    """A CoOp-style dataset for ``task`` (a CLASSIFICATION_TASKS key); returns its folder.

    ``per_class`` = images per class in (train, val, test). For shapes, colours, patterns and tones
    each image shows one object of the class (other properties and the scene attributes
    random); for conditions (lighting x weather) 1-3 random objects under those conditions.
    """
    names, constraint, _ = CLASSIFICATION_TASKS[task]
    folder = Path(root) / f"shapesworld-{task}"
    split_file = folder / f"split_shapesworld-{task}.json"
    if split_file.exists():
        return folder
    rng = np.random.default_rng([seed, sum(map(ord, task))])
    splits: dict[str, list] = {}
    n = 0
    bar = tqdm(total=sum(per_class) * len(names), desc=f"ShapesWorld {task}", disable=not progress)
    for split, count in zip(("train", "val", "test"), per_class, strict=True):
        entries = []
        for label, name in enumerate(names):
            for _ in range(count):
                n_objects = (1, 3) if task == "conditions" else (1, 1)
                scene = sw.sample_scene(rng, n_objects=n_objects, **constraint(label))
                rel = f"{name.replace(' ', '_')}/{n:05d}.jpg"
                _save_jpeg(folder / "images" / rel, sw.render(scene, size)[0])
                entries.append([rel, label, name])
                n += 1
                bar.update()
        splits[split] = entries
    bar.close()
    write_json(split_file, splits)
    return folder


def write_streets(
    root: str | Path,
    *,
    n_train: int = 600,
    n_test: int = 300,
    seed: int = 0,
    size: int = 64,
    exposure: tuple[float, float] = (0.6, 1.4),
    progress: bool = True,
) -> Path:
    """A Global StreetScapes-style manual-label set for the scene attributes; returns its root.

    Street-view photos come from many cameras: each image gets a camera gain drawn uniformly
    from ``exposure`` (pre-training never varies it), so that no attribute can be read off
    the mean brightness alone (with a fixed gain, zero-shot is 100% on lighting).
    """
    base = Path(root) / "shapesworld-streets" / "manual_labels"
    if (base / "tasks.json").exists():
        return base
    rng = np.random.default_rng([seed, 101])
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    bar = tqdm(total=n_train + n_test, desc="ShapesWorld streets", disable=not progress)
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            scene = sw.sample_scene(rng)
            scene.exposure = float(rng.uniform(*exposure))
            uuid = f"{split}-{i:05d}"
            _save_jpeg(base / "img" / f"{uuid}.jpg", sw.render(scene, size)[0])
            row = {"uuid": uuid, "img_path": f"img/{uuid}.jpg", "source": "shapesworld"}
            row.update({a: sw.ATTRIBUTES[a][getattr(scene, a)] for a in sw.ATTRIBUTES})
            rows[split].append(row)
            bar.update()
    bar.close()
    for split, split_rows in rows.items():
        for task in sw.ATTRIBUTES:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=["uuid", task, "img_path", "source"])
            writer.writeheader()
            for r in split_rows:
                writer.writerow({k: r[k] for k in ("uuid", task, "img_path", "source")})
            write_text(base / split / f"{task}.csv", buf.getvalue())
    tasks = {
        t: {"template": sw.ATTRIBUTE_TEMPLATES[t], "classnames": {v: v for v in vals}}
        for t, vals in sw.ATTRIBUTES.items()
    }
    write_json(base / "tasks.json", tasks)
    return base


def seg_palette() -> list[int]:
    colours = [(0, 0, 0)] + [sw.COLOURS[c] for c in sw.COLOUR_NAMES]
    flat = [v for c in colours for v in c]
    return flat + [255, 255, 255] * (256 - len(colours))


def write_segmentation(
    root: str | Path,
    *,
    n: int = 60,
    seed: int = 0,
    size: int = SEG_SIZE,
    progress: bool = True,
) -> Path:
    """An mmseg-style validation folder of multi-object scenes with palette label PNGs."""
    folder = Path(root) / "shapesworld-seg"
    if (folder / "classnames.txt").exists():
        return folder
    rng = np.random.default_rng([seed, 202])
    for i in tqdm(range(n), desc="ShapesWorld seg", disable=not progress):
        scene = sw.sample_scene(rng, n_objects=(2, 4), size_range=(0.09, 0.2))
        image, mask = sw.render(scene, size)
        _save_jpeg(folder / "images" / "validation" / f"{i:05d}.jpg", image)
        label = Image.fromarray(mask, mode="P")
        label.putpalette(seg_palette())
        buf = io.BytesIO()
        label.save(buf, format="PNG")
        path = folder / "annotations" / "validation" / f"{i:05d}.png"
        atomic_write(path, lambda tmp, b=buf: Path(tmp).write_bytes(b.getvalue()))
    write_text(folder / "classnames.txt", "\n".join(["background", *sw.SHAPES]) + "\n")
    return folder


def write_all(root: str | Path, seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """Every demo dataset under ``root``; existing ones are kept."""
    out = {
        t: write_classification(root, t, seed=seed, progress=progress) for t in CLASSIFICATION_TASKS
    }
    out["streets"] = write_streets(root, seed=seed, progress=progress)
    out["seg"] = write_segmentation(root, seed=seed, progress=progress)
    return out


def task_templates() -> dict[str, str]:
    """Zero-shot template of each ShapesWorld classification dataset, by dataset name."""
    return {f"shapesworld-{t}": tpl for t, (_, _, tpl) in CLASSIFICATION_TASKS.items()}


def describe(root: str | Path) -> str:
    return json.dumps({k: str(v) for k, v in write_all(root, progress=False).items()})
