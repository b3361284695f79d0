"""Zero-shot CLIP (Radford et al. 2021): logits = s · normalise(f) Wᵀ."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet, as_features
from clipadapt.hparams import HParams, hp
from clipadapt.methods import register
from clipadapt.methods.base import Method
from clipadapt.zeroshot import zero_shot_logits


@dataclass
class ZeroShotConfig(HParams):
    scale: float = hp(100.0, "logit scale s; the protocols fill the backbone's exp(logit_scale)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale <= 0:
            raise ClipAdaptError(f"scale={self.scale}: expected a positive logit scale")


@register
class ZeroShot(Method):
    """The text classifier alone; ``fit`` only stores W."""

    name = "zero-shot"
    Config = ZeroShotConfig
    novel_rule = "zero-shot classifier"

    def selection(self) -> str:
        return "none"  # nothing is chosen

    def fit(self, train: FeatureSet | None, text_weights: Tensor, val: FeatureSet | None = None):
        self.text_weights = text_weights.detach().to(self.device, torch.float32)
        return self

    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] -> [N, C] = s · normalise(f) Wᵀ."""
        if not hasattr(self, "text_weights"):
            raise ClipAdaptError("zero-shot: call fit(...) or load_adapter(...) before logits")
        return zero_shot_logits(
            as_features(features).to(self.device), self.text_weights, self.config.scale
        )

    def state_tensors(self) -> dict[str, Tensor]:
        return {"text_weights": self.text_weights}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.text_weights = tensors["text_weights"].to(self.device, torch.float32)
