"""Zero-shot CLIP evaluation: logits = s · normalise(f) Wᵀ with W from class names × templates."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from clipadapt.data.dataset import ClassificationDataset
from clipadapt.errors import warn
from clipadapt.features.cache import library_version
from clipadapt.features.extract import extract
from clipadapt.features.featureset import FeatureSet, as_features
from clipadapt.io import atomic_write
from clipadapt.metrics import classification_metrics
from clipadapt.templates import get_templates


def text_weights(
    bb,
    classnames: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    normalize: bool = True,
) -> Tensor:
    """The zero-shot classifier W [C, D] (rows L2-normalised), see ``Backbone.text_classifier``;
    ``normalize=False``: the mean of the unnormalised template embeddings per class.

    With ``cache_dir`` it is stored as ``text-<key>.safetensors``, keyed by the backbone
    identity, class names, templates, normalisation and library version.
    """
    options = {} if normalize else {"normalize": False}
    if cache_dir is None:
        return bb.text_classifier(list(classnames), list(templates), **options)
    fields = {
        "backbone": bb.identity,
        "classnames": list(classnames),
        "templates": list(templates),
        "library": library_version(),
    }
    if not normalize:  # the normalised classifier keeps the key it always had
        fields["normalize"] = False
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir).expanduser() / f"text-{key[:24]}.safetensors"
    if path.is_file():
        cached = _read_text_cache(path, len(classnames))
        if cached is not None:
            return cached
        path.unlink(missing_ok=True)  # unreadable or corrupted: recomputed, never trusted
    weights = bb.text_classifier(list(classnames), list(templates), **options).contiguous()
    metadata = {"sha256": _tensor_digest(weights)}
    atomic_write(path, lambda tmp: save_file({"weights": weights}, tmp, metadata=metadata))
    return weights


def _tensor_digest(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _read_text_cache(path: Path, num_classes: int) -> Tensor | None:
    """The cached weights if the file reads, has [C, D] weights and its recorded digest."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get("sha256")
            weights = f.get_tensor("weights")
    except Exception:  # safetensors raises its own error types
        return None
    if weights.ndim != 2 or weights.shape[0] != num_classes or recorded != _tensor_digest(weights):
        warn(f"{path}: corrupted text-weights cache; recomputing it")
        return None
    return weights


def zero_shot_logits(features: Tensor | FeatureSet, weights: Tensor, scale: float) -> Tensor:
    """features [N, D] unnormalised, weights [C, D] normalised -> logits [N, C]."""
    f = F.normalize(as_features(features).float(), dim=-1)
    return scale * f @ weights.float().T


def evaluate_zero_shot(
    bb,
    dataset: ClassificationDataset,
    *,
    templates: str | Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    stats: dict | None = None,
) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall (%) of zero-shot CLIP on ``dataset``.

    templates: a name for ``clipadapt.templates.get_templates`` or a list; None = the
    dataset's own templates (clipadapt.templates). ``stats``: see :func:`clipadapt.features.extract`
    (``stats["bad"]`` lists the images skipped with ``skip_bad``).
    """
    if templates is None or isinstance(templates, str):
        templates = get_templates(templates if templates is not None else dataset.name)
    feats = extract(
        bb,
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        cache_dir=cache_dir,
        skip_bad=skip_bad,
        progress=progress,
        stats=stats,
    )
    weights = text_weights(bb, dataset.classnames, templates, cache_dir)
    logits = zero_shot_logits(feats, weights.to(feats.features.device), bb.logit_scale)
    return classification_metrics(logits, feats.labels)


__all__ = ["evaluate_zero_shot", "text_weights", "zero_shot_logits"]
