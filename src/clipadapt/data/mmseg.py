"""Segmentation readers for the eight open-vocabulary benchmarks in the mmsegmentation layouts.

Label PNGs are read as class indices (palette indices for mode ``P``, never RGB); 255 is
ignored. "Reduce zero label" (voc20, context59, ade20k, coco_stuff10k): 0 becomes 255, the
rest shift down by 1.
The data root may be the folder holding ``VOCdevkit/``, ``coco_stuff164k/``, ... or the dataset
folder itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from clipadapt.data.dataset import upright
from clipadapt.errors import ClipAdaptError

if TYPE_CHECKING:  # numpy, torch and PIL load when an image is read, not with the layouts
    import torch
    from PIL import Image

IGNORE_INDEX = 255
LABEL_MODES = ("P", "L", "I", "I;16")


@dataclass(frozen=True)
class Layout:
    """Where one benchmark keeps its images and labels. ``{split}`` is replaced by the split's
    folder name (``split_names`` maps "val" to e.g. "val2017")."""

    folder: str  # relative to the data root
    images: str  # relative to ``folder``
    labels: str
    image_suffix: str
    label_suffix: str
    class_file: str  # in clipadapt/data/seg_classnames/
    split_file: str | None = None  # relative to ``folder``; without it every image is listed
    reduce_zero_label: bool = False
    split_names: tuple[tuple[str, str], ...] = ()

    def split_name(self, split: str) -> str:
        return dict(self.split_names).get(split, split)


_VOC = dict(
    folder="VOCdevkit/VOC2012",
    images="JPEGImages",
    labels="SegmentationClass",
    image_suffix=".jpg",
    label_suffix=".png",
    split_file="ImageSets/Segmentation/{split}.txt",
)
_CONTEXT = dict(
    folder="VOCdevkit/VOC2010",
    images="JPEGImages",
    labels="SegmentationClassContext",
    image_suffix=".jpg",
    label_suffix=".png",
    split_file="ImageSets/SegmentationContext/{split}.txt",
)
_COCO = dict(
    folder="coco_stuff164k",
    images="images/{split}",
    labels="annotations/{split}",
    image_suffix=".jpg",
    split_names=(("val", "val2017"), ("train", "train2017")),
)

LAYOUTS: dict[str, Layout] = {
    "voc21": Layout(**_VOC, class_file="voc21.txt"),
    "voc20": Layout(**_VOC, class_file="voc20.txt", reduce_zero_label=True),
    "context60": Layout(**_CONTEXT, class_file="context60.txt"),
    "context59": Layout(**_CONTEXT, class_file="context59.txt", reduce_zero_label=True),
    "coco_stuff": Layout(**_COCO, label_suffix="_labelTrainIds.png", class_file="coco_stuff.txt"),
    "coco_object": Layout(
        **_COCO, label_suffix="_instanceTrainIds.png", class_file="coco_object.txt"
    ),
    # COCO-Stuff-10k (SCLIP configs/cfg_coco_stuff10k.py): test2014 images, zero label reduced
    "coco_stuff10k": Layout(
        folder="coco_stuff10k",
        images="images/{split}",
        labels="annotations/{split}",
        image_suffix=".jpg",
        label_suffix="_labelTrainIds.png",
        class_file="coco_stuff.txt",
        reduce_zero_label=True,
        split_names=(("val", "test2014"), ("test", "test2014"), ("train", "train2014")),
    ),
    "cityscapes": Layout(
        folder="cityscapes",
        images="leftImg8bit/{split}",
        labels="gtFine/{split}",
        image_suffix="_leftImg8bit.png",
        label_suffix="_gtFine_labelTrainIds.png",
        class_file="city_scapes.txt",
    ),
    "ade20k": Layout(
        folder="ade/ADEChallengeData2016",
        images="images/{split}",
        labels="annotations/{split}",
        image_suffix=".jpg",
        label_suffix=".png",
        class_file="ade20k.txt",
        reduce_zero_label=True,
        split_names=(("val", "validation"), ("train", "training")),
    ),
}
SEG_DATASETS = tuple(LAYOUTS)


@dataclass(frozen=True)
class SegItem:
    image: str  # absolute paths
    label: str


@dataclass
class SegmentationDataset:
    """One split of a segmentation benchmark.

    classnames: one entry per class index, synonyms joined by ", " (the class-name file's lines).
    """

    name: str
    root: str
    items: list[SegItem]
    classnames: list[str]
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> SegItem:
        return self.items[i]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def image(self, i: int) -> Image.Image:
        """The i-th image, RGB."""
        return read_image(self.items[i].image)

    def label(self, i: int) -> torch.Tensor:
        """The i-th label map, LongTensor[H, W] (class indices, 255 ignored)."""
        return read_label(self.items[i].label, self.reduce_zero_label)


def class_file(name: str) -> Path:
    """The packaged class-name file of benchmark ``name``."""
    if name not in LAYOUTS:
        raise ClipAdaptError(f"dataset {name!r}: expected one of {', '.join(SEG_DATASETS)}")
    return Path(
        str(resources.files("clipadapt.data") / "seg_classnames" / LAYOUTS[name].class_file)
    )


def read_class_lines(path: str | os.PathLike) -> list[str]:
    """One class per line (line number = class index); trailing blank lines are allowed."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise ClipAdaptError(f"{path}: class-name file not found") from e
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ClipAdaptError(f"{path}: line {number} is empty; expected one class per line")
    if not lines:
        raise ClipAdaptError(f"{path}: no classes; expected one class per line")
    return [line.strip() for line in lines]


def read_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image, turned upright by its EXIF orientation (phone photos)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return upright(im).convert("RGB")
    except FileNotFoundError as e:
        raise ClipAdaptError(f"{path}: image not found") from e
    except OSError as e:
        raise ClipAdaptError(f"{path}: cannot read image ({e})") from e


def read_label(path: str | os.PathLike, reduce_zero_label: bool = False) -> torch.Tensor:
    """A label PNG as class indices -> LongTensor[H, W]. Palette PNGs give their indices."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in LABEL_MODES:
                raise ClipAdaptError(
                    f"{path}: label image has mode {im.mode}; expected a palette (P) or "
                    "grayscale (L) PNG of class indices"
                )
            label = torch.from_numpy(np.array(im).astype(np.int64))
    except FileNotFoundError as e:
        raise ClipAdaptError(f"{path}: label image not found") from e
    if reduce_zero_label:
        label = torch.where(label == 0, IGNORE_INDEX, label - 1)
        label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
    return label


def load_segmentation(name: str, data_root: str | os.PathLike, split: str = "val"):
    """Read benchmark ``name`` (one of SEG_DATASETS) under ``data_root`` -> SegmentationDataset."""
    if name not in LAYOUTS:
        raise ClipAdaptError(f"dataset {name!r}: expected one of {', '.join(SEG_DATASETS)}")
    layout = LAYOUTS[name]
    sub = layout.split_name(split)
    folder = _find_folder(Path(data_root), layout, sub)
    images = folder / layout.images.format(split=sub)
    labels = folder / layout.labels.format(split=sub)
    if layout.split_file:
        split_file = folder / layout.split_file.format(split=sub)
        if not split_file.is_file():
            raise ClipAdaptError(f"{split_file}: split file not found (dataset {name})")
        stems = [s.strip() for s in split_file.read_text().splitlines() if s.strip()]
    else:
        stems = _stems(images, layout.image_suffix)
    items = [
        SegItem(str(images / (s + layout.image_suffix)), str(labels / (s + layout.label_suffix)))
        for s in stems
    ]
    if not items:
        raise ClipAdaptError(f"{images}: no *{layout.image_suffix} images (dataset {name})")
    for it in items:
        for path in (it.image, it.label):
            if not os.path.isfile(path):
                raise ClipAdaptError(f"{path}: file not found (dataset {name}, split {split})")
    return SegmentationDataset(
        name=name,
        root=str(folder),
        items=items,
        classnames=read_class_lines(class_file(name)),
        reduce_zero_label=layout.reduce_zero_label,
    )


def _find_folder(root: Path, layout: Layout, split: str) -> Path:
    """Accept the data root, the dataset folder, or anything between them."""
    parts = Path(layout.folder).parts
    candidates = [root.joinpath(*parts[i:]) for i in range(len(parts) + 1)]
    for folder in candidates:
        if (folder / layout.images.format(split=split)).is_dir():
            return folder
    raise ClipAdaptError(
        f"{root}: no {layout.folder}/{layout.images.format(split=split)} folder; expected the "
        "mmsegmentation layout (docs/datasets.md in the clipadapt repository)"
    )


def _stems(images: Path, suffix: str) -> list[str]:
    """Image paths relative to ``images`` without ``suffix``, recursively, sorted."""
    stems = []
    for dirpath, dirnames, filenames in os.walk(images):
        dirnames.sort()
        rel = os.path.relpath(dirpath, images)
        for f in sorted(filenames):
            if f.endswith(suffix) and not f.startswith("."):
                stem = f[: -len(suffix)]
                stems.append(stem if rel == "." else os.path.join(rel, stem))
    return stems
