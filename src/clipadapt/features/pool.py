"""Backbone outputs of many few-shot subsets of the same splits, computed once.

A benchmark draws one subset per (shots, seed) from the same train and validation splits, so
the same image turns up in many subsets. An augmented view is seeded by the image, not by its
place in a list (features/extract.py), so a subset's FeatureSet is a selection of rows of the
FeatureSet of all the images the subsets use: ``SubsetPool`` extracts that union once per set
of extraction options and hands each subset its rows. The demo's 15 subsets of a 32-image-per-
class split need each image's views once instead of about three times.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from clipadapt.data.dataset import ClassificationDataset
from clipadapt.features.featureset import FeatureSet


def rows_for(pool: FeatureSet, ds: ClassificationDataset) -> tuple[list[int], list[int]]:
    """(pool rows, item positions) of ``ds``'s images that ``pool`` holds (not unreadable)."""
    row_of = {p: i for i, p in enumerate(pool.paths)}
    pos = [i for i, p in enumerate(ds.paths) if p in row_of]
    return [row_of[ds.paths[i]] for i in pos], pos


def select(pool: FeatureSet, ds: ClassificationDataset, views: bool = True) -> FeatureSet:
    """The rows of ``pool`` for ``ds``'s images, with ``ds``'s labels and class names
    (without the augmented views unless ``views``)."""
    rows, pos = rows_for(pool, ds)
    if not views:
        pool = dataclasses.replace(pool, views=None, view_tokens=None)
    labels = torch.tensor([ds.items[i].label for i in pos], dtype=torch.long)
    return dataclasses.replace(pool.subset(rows), labels=labels, classnames=list(ds.classnames))


class SubsetPool:
    """``features(part, options)`` = ``extract(bb, part, **options, **extract_kw)``, from one
    extraction per (role, options) of every image the drawn subsets use in that role.

    splits: the reader's {"train", "val", ...}, the parents of the drawn subsets.
    draws: the drawn subsets ({"train": ..., "val": ...} as ``few_shot`` returns them). A role
        is (parent split, subset split): the validation images drawn from "train" when a
        dataset has no validation split form their own union, not extracted with views.
    """

    def __init__(
        self,
        bb,
        splits: dict[str, ClassificationDataset],
        draws: Iterable[dict[str, ClassificationDataset]],
        extract_kw: dict[str, Any],
    ) -> None:
        self.bb, self.splits, self.extract_kw = bb, splits, extract_kw
        union: dict[tuple[str, str], set[int]] = {}
        for draw in draws:
            for part in draw.values():
                if part.parent_split in splits and part.indices is not None:
                    union.setdefault(_role(part), set()).update(part.indices)
        self.union = {role: sorted(index) for role, index in union.items()}
        self._extracted: dict[tuple, FeatureSet] = {}

    def features(self, part: ClassificationDataset, options: dict[str, Any]) -> FeatureSet:
        from clipadapt.features.extract import extract

        role = _role(part)
        if (
            part.indices is None
            or role not in self.union
            or not set(part.indices) <= set(self.union[role])
        ):
            return extract(self.bb, part, **options, **self.extract_kw)
        key = (*role, repr(sorted(options.items())))
        if key not in self._extracted:
            pooled = self.splits[part.parent_split].subset(self.union[role], split=part.split)
            self._extracted[key] = extract(self.bb, pooled, **options, **self.extract_kw)
        return select(self._extracted[key], part)


def _role(part: ClassificationDataset) -> tuple[str, str]:
    return (part.parent_split or "", part.split)
