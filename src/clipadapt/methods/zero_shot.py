"""Zero-shot CLIP (Radford et al. 2021): logits = s · normalise(f) Wᵀ."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.methods import register
from clipadapt.methods.base import Method


@dataclass
class ZeroShotConfig:
    scale: float = 100.0  # logit scale s (callers set the backbone's)

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ClipAdaptError(f"scale={self.scale}: expected a positive logit scale")


@register
class ZeroShot(Method):
    """The text classifier alone; ``fit`` only stores W."""

    name = "zero-shot"
    Config = ZeroShotConfig

    def selection(self) -> str:
        return "none"  # nothing is chosen

    def fit(self, train: FeatureSet | None, text_weights: Tensor, val: FeatureSet | None = None):
        self.text_weights = text_weights.detach().to(self.device, torch.float32)
        return self

    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] -> [N, C] = s · normalise(f) Wᵀ."""
        if not hasattr(self, "text_weights"):
            raise ClipAdaptError("zero-shot: call fit(...) or load_adapter(...) before logits")
        return self.config.scale * self._inputs(features) @ self.text_weights.T

    def state_tensors(self) -> dict[str, Tensor]:
        return {"text_weights": self.text_weights}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.text_weights = tensors["text_weights"].to(self.device, torch.float32)
