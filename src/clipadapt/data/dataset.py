"""Item and ClassificationDataset: what every reader returns and the extractor consumes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from clipadapt.errors import ClipAdaptError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclass(frozen=True)
class Item:
    """One labelled image. ``path`` is absolute; ``label`` indexes the dataset's classnames."""

    path: str
    label: int
    classname: str


@dataclass
class ClassificationDataset:
    """One split of an image classification dataset.

    name:       canonical dataset name (``"oxford_pets"``, ``"shapesworld"``, a folder name, ...)
    root:       the dataset folder
    items:      the images, in split-file order
    classnames: class names ordered by label (all classes of the dataset, not only this split's)
    """

    name: str
    root: str
    items: list[Item]
    classnames: list[str]
    split: str = ""
    source: str = field(default="", repr=False)
    indices: list[int] | None = field(default=None, repr=False)  # positions in `parent_split`
    parent_split: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    def __iter__(self):
        return iter(self.items)

    @property
    def paths(self) -> list[str]:
        return [it.path for it in self.items]

    @property
    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def subset(self, index: Iterable[int], split: str | None = None) -> ClassificationDataset:
        """A dataset with the items at ``index`` (same classnames); remembers ``indices``."""
        index = list(index)
        return ClassificationDataset(
            name=self.name,
            root=self.root,
            items=[self.items[i] for i in index],
            classnames=list(self.classnames),
            split=self.split if split is None else split,
            source=self.source,
            indices=index,
            parent_split=self.split,
        )


def check_classnames(classnames: Sequence[str | None], where: str) -> list[str]:
    """Labels 0..C-1 must all have a name: a gap means an empty class."""
    for label, name in enumerate(classnames):
        if name is None:
            raise ClipAdaptError(f"{where}: class label {label} has no images (empty class)")
    return list(classnames)  # type: ignore[arg-type]


def check_exists(items: Sequence[Item], where: str) -> None:
    """Every image named by a split must exist; name the first missing one."""
    for it in items:
        if not os.path.isfile(it.path):
            raise ClipAdaptError(f"{where}: image {it.path} named by the split does not exist")


def make_splits(
    name: str,
    root: str,
    splits: dict[str, list[Item]],
    classnames: list[str],
    source: str,
    check_files: bool = True,
) -> dict[str, ClassificationDataset]:
    """Validate labels/names/files and wrap each split; missing splits become empty."""
    num_classes = len(classnames)
    check_nonempty_classes(
        splits.get("train") or [it for v in splits.values() for it in v], classnames, source
    )
    for split, items in splits.items():
        for it in items:
            if not 0 <= it.label < num_classes:
                raise ClipAdaptError(
                    f"{source}: unknown label {it.label} for {it.path} in split {split!r} "
                    f"(expected 0..{num_classes - 1})"
                )
        if check_files:
            check_exists(items, source)
    return {
        split: ClassificationDataset(
            name=name,
            root=root,
            items=list(splits.get(split, [])),
            classnames=list(classnames),
            split=split,
            source=source,
        )
        for split in ("train", "val", "test")
    }


def check_nonempty_classes(items: Sequence[Item], classnames: Sequence[str], where: str) -> None:
    """Every class needs at least one image (in train when there is a train split)."""
    counts = [0] * len(classnames)
    for it in items:
        if 0 <= it.label < len(counts):
            counts[it.label] += 1
    for label, n in enumerate(counts):
        if n == 0:
            raise ClipAdaptError(
                f"{where}: class {classnames[label]!r} (label {label}) has no images (empty class)"
            )


EXIF_ORIENTATION = 0x0112


def upright(image):
    """``image`` turned as its EXIF orientation says (phone photos are stored sideways with a
    tag); an image without the tag is returned as it is, not copied."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (0, 1):
        return image
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def is_image(filename: str) -> bool:
    return filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith(".")
