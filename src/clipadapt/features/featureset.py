"""FeatureSet: cached backbone outputs that every method fits on."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class FeatureSet:
    """Image embeddings of one split.

    features: [N, D] float32 unnormalised image embeddings (eval transform).
    labels:   [N] int64 class indices into ``classnames``.
    views:    [V, N, D] unnormalised embeddings of V augmented views, or None.
    tokens:   [N, P, W] patch tokens (fp16), or None.
    view_tokens: [V, N, P, W] patch tokens (fp16) of the V augmented views, or None.
    """

    features: Tensor
    labels: Tensor
    classnames: list[str]
    paths: list[str] = field(default_factory=list)
    views: Tensor | None = None
    tokens: Tensor | None = None
    view_tokens: Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def normalized(self) -> Tensor:
        """[N, D] L2-normalised features."""
        return F.normalize(self.features.float(), dim=-1)

    def subset(self, index) -> FeatureSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return FeatureSet(
            features=self.features[index],
            labels=self.labels[index],
            classnames=list(self.classnames),
            paths=[self.paths[i] for i in index.tolist()] if self.paths else [],
            views=None if self.views is None else self.views[:, index],
            tokens=None if self.tokens is None else self.tokens[index],
            view_tokens=None if self.view_tokens is None else self.view_tokens[:, index],
        )


def as_features(x: Tensor | FeatureSet) -> Tensor:
    """The [N, D] unnormalised embeddings of a FeatureSet, or the tensor itself."""
    return x.features if isinstance(x, FeatureSet) else x
