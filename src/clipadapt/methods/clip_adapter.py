"""CLIP-Adapter (Gao et al. 2021): a residual bottleneck MLP on the image embedding.

    A(x)  = ReLU(ReLU(x W1) W2)            W1: D -> D/4, W2: D/4 -> D, no biases
    x'    = r · A(x) + (1 - r) · x          on the *unnormalised* embedding x
    logits = s · normalise(x') Wᵀ

Only the adapter trains (cross-entropy), on augmented views, with the recipe of the released
code (CoOp's rn50.yaml through Dassl): SGD lr 2e-3, momentum 0.9, weight decay 5e-4, batch 32,
200 epochs, one warm-up epoch at 1e-5 then cosine, stepped per epoch, and, as there, the last
epoch is the model (``select_epoch="last"``). ``select_epoch="val"`` keeps the
epoch with the best validation accuracy instead (the StreetScapes protocol does, with its 20%
validation split). In the few-shot protocol the validation set has min(shots, 4) images per
class: at 1-2 shots, choosing among 200 epochs on 1-2 images per class mostly picks noise, and on
a development world (ShapesWorld `tones`, generator seed 1, not the demo's data) the last epoch
scored higher at every shot count (docs/fewshot.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt import train as training
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet, as_features
from clipadapt.hparams import TrainHParams, hp
from clipadapt.methods import register
from clipadapt.methods.base import Method
from clipadapt.zeroshot import zero_shot_logits

SELECT_EPOCH = ("last", "val")


@dataclass
class ClipAdapterConfig(TrainHParams):
    ratio: float = hp(0.2, "residual ratio r: 0.2 generic data, 0.6-0.8 fine-grained/far-domain")
    reduction: int = hp(4, "bottleneck D -> D / reduction")
    scale: float = hp(100.0, "logit scale s; the protocols fill the backbone's exp(logit_scale)")
    select_epoch: str = hp("last", "last (the released code) or val (best validation accuracy)")
    # the released recipe (CoOp configs/trainers/CoOp/rn50.yaml through Dassl): SGD, one
    # warm-up epoch at a constant 1e-5, then cosine over 200 epochs, stepped once per epoch
    epochs: int = 200
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    warmup_type: str = "constant"
    lr_step: str = "epoch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select_epoch not in SELECT_EPOCH:
            raise ClipAdaptError(
                f"select_epoch={self.select_epoch!r}: expected one of {', '.join(SELECT_EPOCH)}"
            )
        if not 0.0 <= self.ratio <= 1.0:
            raise ClipAdaptError(f"ratio={self.ratio}: expected a value in [0, 1]")
        if self.reduction < 1:
            raise ClipAdaptError(f"reduction={self.reduction}: expected an integer >= 1")


class ClipAdapterHead(nn.Module):
    """[B, D] unnormalised embeddings -> [B, C] logits."""

    def __init__(
        self,
        text_weights: Tensor,
        reduction: int = 4,
        ratio: float = 0.2,
        scale: float = 100.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        dim = text_weights.shape[1]
        self.fc1 = nn.Linear(dim, dim // reduction, bias=False)  # W1
        self.fc2 = nn.Linear(dim // reduction, dim, bias=False)  # W2
        for layer in (self.fc1, self.fc2):  # nn.Linear's own init, drawn from `generator`
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        self.register_buffer("text_weights", text_weights.float())
        self.ratio, self.scale = ratio, scale

    def adapt(self, x: Tensor) -> Tensor:
        """x' = r · ReLU(ReLU(x W1) W2) + (1 - r) · x."""
        a = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.ratio * a + (1.0 - self.ratio) * x

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(self.adapt(x), dim=-1) @ self.text_weights.T


@register
class ClipAdapter(Method):
    name = "clip-adapter"
    Config = ClipAdapterConfig
    default_views = 10
    novel_rule = "adapted image features x zero-shot classifier"

    def _head(self, text_weights: Tensor, generator: torch.Generator | None = None):
        c = self.config
        return ClipAdapterHead(text_weights, c.reduction, c.ratio, c.scale, generator)

    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None):
        generator = torch.Generator().manual_seed(self.config.seed)
        self.head = self._head(text_weights.detach().cpu(), generator).to(self.device)
        config = training.TrainConfig.from_config(self.config, device=self.device, desc=self.name)
        select = val if self.config.select_epoch == "val" else None
        result = training.train(self.head, train, config, val=select)
        score = result.best_score
        if val is not None and select is None:  # reported, not used to choose
            score = training.accuracy_on(self.head, val, device=self.device)
        self.fitted = {"epoch": result.best_epoch, "val_accuracy": score}
        return self

    @torch.no_grad()
    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] unnormalised embeddings -> [N, C]."""
        if not hasattr(self, "head"):
            raise ClipAdaptError("clip-adapter: call fit(...) or load_adapter(...) first")
        return self.head(as_features(features).to(self.device, torch.float32))

    @torch.no_grad()
    def novel_logits(self, features: Tensor | FeatureSet, weights: Tensor) -> Tensor:
        """The adapted features x' against another class set's zero-shot classifier."""
        adapted = self.head.adapt(as_features(features).to(self.device, torch.float32))
        return zero_shot_logits(adapted, weights.to(self.device), self.config.scale)

    def state_tensors(self) -> dict[str, Tensor]:
        return dict(self.head.state_dict())

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.head = self._head(tensors["text_weights"]).to(self.device)
        self.head.load_state_dict(tensors)
        self.head.eval()
