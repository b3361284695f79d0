"""mIoU over a segmentation dataset: intersection and union accumulated over all images.

The confusion matrix [C, C] (rows: ground truth, columns: prediction, ignore index excluded)
holds everything: I_c = diagonal, U_c = row sum + column sum - diagonal, IoU_c = I_c / U_c.
Under torch.distributed each rank takes every world-size-th image and the matrices are summed.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from clipadapt import distributed
from clipadapt.errors import ClipAdaptError
from clipadapt.metrics import confusion_matrix, miou

IGNORE_INDEX = 255


def confusion_update(
    confusion: Tensor, pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Add one image: pred, target LongTensor[H, W] -> confusion [C, C] (in place, returned).

    Raises ClipAdaptError when a target index is neither ignored nor a class.
    """
    num_classes = confusion.shape[0]
    gt = target[target != ignore_index]
    if gt.numel() and (gt.min() < 0 or gt.max() >= num_classes):
        bad = int(gt[(gt < 0) | (gt >= num_classes)][0])
        raise ClipAdaptError(
            f"label {bad}: expected class indices 0..{num_classes - 1} or {ignore_index} (ignored)"
        )
    counts = confusion_matrix(pred.to(target.device), target, num_classes, ignore_index)
    confusion += counts.to(confusion.device)
    return confusion


def class_iou(confusion: Tensor) -> Tensor:
    """confusion [C, C] -> IoU per class [C] (float64; nan where the union is empty)."""
    confusion = confusion.double()
    inter = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.nan)


def evaluate(
    segmenter,
    dataset,
    limit: int | None = None,
    progress: bool = True,
    names: list[str] | None = None,
) -> dict:
    """Run ``segmenter`` over ``dataset`` (a SegmentationDataset) -> metrics dict.

    Returns {"mIoU": percent, "aAcc": percent, "per_class_iou": {name: percent or None},
    "images": count, "confusion": LongTensor[C, C]}; names default to the dataset's classnames.
    """
    num = len(dataset) if limit is None else min(limit, len(dataset))
    rank, world = _rank_world()
    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.long)
    if segmenter.num_classes != dataset.num_classes:
        raise ClipAdaptError(
            f"{dataset.name}: {dataset.num_classes} classes, but the segmenter has "
            f"{segmenter.num_classes}"
        )
    indices = range(rank, num, world)
    for i in tqdm(indices, desc=f"seg-eval {dataset.name}", unit="img", disable=not progress):
        image, target = dataset.image(i), dataset.label(i)
        if (image.height, image.width) != tuple(target.shape):
            raise ClipAdaptError(
                f"{dataset[i].label}: label is {target.shape[1]}x{target.shape[0]}, "
                f"image is {image.width}x{image.height}; expected the same size"
            )
        try:
            confusion_update(confusion, segmenter.predict(image), target, dataset.ignore_index)
        except ClipAdaptError as e:
            raise ClipAdaptError(f"{dataset[i].label}: {e}") from e
    if world > 1:
        confusion = _all_reduce(confusion, segmenter.bb.device)
    iou = class_iou(confusion)
    total = confusion.sum().item()
    return {
        "mIoU": miou(confusion),
        "aAcc": 100 * confusion.diagonal().sum().item() / total if total else float("nan"),
        "per_class_iou": {
            name: None if torch.isnan(v) else 100 * float(v)
            for name, v in zip(names or dataset.classnames, iou, strict=True)
        },
        "images": num,
        "confusion": confusion,
    }


def _rank_world() -> tuple[int, int]:
    return distributed.rank_world()


def _all_reduce(confusion: Tensor, device) -> Tensor:
    """The sum of ``confusion`` over ranks, on the CPU (``device``: unused, kept for callers)."""
    return distributed.all_sum(confusion.cpu())
