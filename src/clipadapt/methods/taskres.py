"""TaskRes (Yu et al., CVPR 2023): a learned task residual on the frozen text classifier.

    t'_c   = t_c + α · x_c                x [C, D] learnable, zero-initialised
    logits = s · normalise(f) · normalise(t')ᵀ

Recipe of the released code (trainers/taskres.py, configs/trainers/TaskRes/*.yaml through
Dassl): α 0.5 (Flowers 1.0), Adam lr 2e-3 (ImageNet 2e-4), Dassl's weight decay 5e-4, batch 256,
one warm-up epoch at a constant 1e-5 then cosine stepped per epoch, 100 epochs at 1/2/4 shots and
200 at 8/16; the last epoch is the model. One augmented view per image per epoch, drawn from
the cached views (the reference re-augments every epoch through the encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt import recipes
from clipadapt import train as training
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet, as_features
from clipadapt.hparams import hp
from clipadapt.methods import register
from clipadapt.methods.base import Method


@dataclass
class TaskResConfig:
    alpha: float | None = hp(None, "residual scale (None: 0.5, OxfordFlowers 1.0)")
    scale: float = hp(100.0, "logit scale (the protocols fill the backbone's exp(logit_scale))")
    epochs: int | None = hp(None, "None: 100 at up to 4 shots, else 200")
    batch_size: int = hp(256, "samples per step")
    optimizer: str = hp("adam", "adamw, adam or sgd")
    lr: float | None = hp(None, "None: 2e-3, ImageNet 2e-4")
    weight_decay: float = hp(5e-4, "Dassl's default (the configs do not set it)")
    warmup_epochs: float = hp(1.0, "epochs at the constant warm-up lr")
    warmup_type: str = hp("constant", "per-epoch warm-up: linear or constant")
    warmup_lr: float = hp(1e-5, "the warm-up lr")
    lr_step: str = hp("epoch", "epoch: the lr changes once per epoch (Dassl); iteration")
    use_views: bool = hp(True, "draw a random cached augmented view per sample each epoch")
    dataset: str | None = hp(None, "picks the per-dataset α and lr")
    seed: int = hp(1, "batch-order seed")

    def resolved(self, shots: int) -> dict:
        key = recipes.dataset_key(self.dataset)
        return {
            "alpha": self.alpha
            if self.alpha is not None
            else (1.0 if key == "oxford_flowers" else 0.5),
            "epochs": self.epochs if self.epochs is not None else (100 if shots <= 4 else 200),
            "lr": self.lr if self.lr is not None else (2e-4 if key == "imagenet" else 2e-3),
        }


class TaskResHead(nn.Module):
    """[B, D] unnormalised embeddings -> [B, C]."""

    def __init__(self, text_weights: Tensor, alpha: float, scale: float) -> None:
        super().__init__()
        self.register_buffer("text_weights", text_weights.float())
        self.residual = nn.Parameter(torch.zeros_like(self.text_weights))
        self.alpha, self.scale = alpha, scale

    def classifier(self) -> Tensor:
        """t' = t + α · x."""
        return self.text_weights + self.alpha * self.residual

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.classifier(), dim=-1).T


@register
class TaskRes(Method):
    name = "taskres"
    Config = TaskResConfig
    default_views = 10
    unit_text = False  # t: the mean of the unnormalised template embeddings per class

    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None):
        c = self.config
        shots = int(torch.bincount(train.labels.long()).max()) if len(train) else 1
        r = c.resolved(shots)
        self.head = TaskResHead(text_weights.detach().to(self.device), r["alpha"], c.scale)
        config = training.TrainConfig.from_config(
            c, epochs=r["epochs"], lr=r["lr"], device=self.device, desc=self.name
        )
        training.train(self.head, train, config)
        self.fitted = {"alpha": r["alpha"], "epoch": r["epochs"], "lr": r["lr"]}
        if val is not None and len(val) > 0:  # reported, not used to choose
            self.fitted["val_accuracy"] = training.accuracy_on(self.head, val, device=self.device)
        return self

    @torch.no_grad()
    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        if not hasattr(self, "head"):
            raise ClipAdaptError("taskres: call fit(...) or load_adapter(...) first")
        return self.head(as_features(features).to(self.device, torch.float32))

    def state_tensors(self) -> dict[str, Tensor]:
        return {"text_weights": self.head.text_weights, "residual": self.head.residual.detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        alpha = self.fitted.get("alpha", self.config.resolved(1)["alpha"])
        self.head = TaskResHead(tensors["text_weights"].to(self.device), alpha, self.config.scale)
        self.head.residual.data.copy_(tensors["residual"].to(self.device))
        self.head.eval()
