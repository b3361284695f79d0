"""Classification and segmentation metrics. Every score is a percentage (0-100).

Conventions: ``logits`` [N, C], ``labels`` [N] int64 in 0..C-1; a confusion matrix is [C, C]
int64 with rows = true class and columns = predicted class.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """% of rows whose true label is among the k largest logits (k is capped at C)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).double().mean().item()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in %."""
    return topk_accuracy(logits, labels, 1)


def confusion_matrix(
    pred: Tensor, labels: Tensor, num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """[C, C] counts, rows = true class, columns = prediction. Works for any shape of
    ``pred``/``labels`` (e.g. segmentation maps); ``ignore_index`` entries are dropped."""
    pred, labels = pred.reshape(-1).long(), labels.reshape(-1).long()
    if ignore_index is not None:
        keep = labels != ignore_index
        pred, labels = pred[keep], labels[keep]
    counts = torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_recall(confusion: Tensor) -> Tensor:
    """[C] recall in % per class; nan for classes without true samples."""
    confusion = confusion.double()
    support = confusion.sum(dim=1)
    return 100.0 * confusion.diagonal() / support.where(support > 0, torch.nan)


def mean_per_class_recall(confusion: Tensor) -> float:
    """Mean recall over classes that have true samples (= balanced accuracy), %."""
    return per_class_recall(confusion).nanmean().item()


def balanced_accuracy(confusion: Tensor, adjusted: bool = False) -> float:
    """Mean per-class recall in %; ``adjusted`` rescales so chance is 0 and perfect is 100:
    (b - 1/C) / (1 - 1/C), C = classes with true samples."""
    score = mean_per_class_recall(confusion) / 100.0
    if adjusted:
        present = int((confusion.sum(dim=1) > 0).sum())
        chance = 1.0 / present
        score = (score - chance) / (1.0 - chance)
    return 100.0 * score


def f1_scores(confusion: Tensor) -> Tensor:
    """[C] F1 per class in % (0 when a class has neither true samples nor predictions)."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    denom = confusion.sum(dim=0) + confusion.sum(dim=1)
    return 100.0 * torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))


def macro_f1(confusion: Tensor) -> float:
    """Unweighted mean of per-class F1 over the classes present in the ground truth, % (the
    reference evaluator: sklearn's f1_score with labels = the unique true labels). A class
    that is only predicted counts through the precision of the others, not as a 0."""
    confusion = confusion.double()
    present = confusion.sum(dim=1) > 0
    return f1_scores(confusion)[present].mean().item()


def weighted_f1(confusion: Tensor) -> float:
    """Per-class F1 weighted by true support, %."""
    support = confusion.double().sum(dim=1)
    return (f1_scores(confusion) * support).sum().item() / support.sum().item()


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """The metrics a results JSON carries for a classifier: top1, top5, mean_per_class_recall."""
    confusion = confusion_matrix(logits.argmax(dim=1), labels, logits.shape[1])
    return {
        "top1": accuracy(logits, labels),
        "top5": topk_accuracy(logits, labels, 5),
        "mean_per_class_recall": mean_per_class_recall(confusion),
    }


def miou(confusion: Tensor) -> float:
    """Mean IoU in %: IoU_c = TP / (TP + FP + FN) accumulated over the dataset, nan-mean over
    classes with a non-empty union (as SCLIP and mmsegmentation compute it)."""
    confusion = confusion.double()
    inter = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - inter
    return (100.0 * inter / union.where(union > 0, torch.nan)).nanmean().item()
