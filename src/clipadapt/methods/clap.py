"""CLAP (Silva-Rodríguez et al., CVPR 2024): a linear probe held near the zero-shot prototypes.

    logits = s · normalise(f) · normalise(W)ᵀ,   W [C, D] initialised to the text weights T
    loss   = CE + (1/C) Σ_c λ_c ‖w_c - t_c‖²        (t_c: the class's mean unnormalised
                                                    template embedding, as in the code)
    λ_c    = mean zero-shot probability of class c over the class-c support samples

No validation set: the last epoch is the model. As in the released code (trainers/adapters.py):
every augmented view (20 per image) is its own sample; an epoch is ⌊K·C / 256⌋ mini-batches
of 256 (one if K·C < 256) from the shuffled pool of views, so it sees about one view per image;
SGD lr 0.1 (momentum 0.9, no weight decay), 300 epochs, one warm-up epoch at 1e-5 then cosine,
stepped per epoch. λ stays fixed (``constraint="l2"``, every released run); ``"adaptive"``
adds the paper's augmented-Lagrangian outer step after each epoch, λ ← max(0, λ + ρ h),
ρ ← h with h_c = ‖w_c - t_c‖² and ρ starting at 0; ``"none"`` is the plain zero-shot-initialised
linear probe (ZS-LP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.hparams import hp
from clipadapt.methods import register
from clipadapt.methods.base import Method
from clipadapt.train import dassl_lr

CONSTRAINTS = ("l2", "adaptive", "none")


@dataclass
class ClapConfig:
    scale: float = hp(100.0, "logit scale (the protocols fill the backbone's exp(logit_scale))")
    constraint: str = hp(
        "l2", "l2: fixed class multipliers (released runs); adaptive: ALM outer step; none: ZS-LP"
    )
    epochs: int = hp(300, "training epochs")
    batch_size: int = hp(256, "samples per step; an epoch is floor(K·C / batch) steps")
    lr: float = hp(0.1, "SGD learning rate")
    momentum: float = hp(0.9, "SGD momentum")
    weight_decay: float = hp(0.0, "SGD weight decay")
    warmup_epochs: int = hp(1, "epochs at the constant warm-up lr before the cosine")
    warmup_lr: float = hp(1e-5, "the warm-up lr")
    seed: int = hp(1, "batch-order seed")

    def __post_init__(self) -> None:
        if self.constraint not in CONSTRAINTS:
            raise ClipAdaptError(
                f"constraint={self.constraint!r}: expected one of {', '.join(CONSTRAINTS)}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ClipAdaptError("epochs and batch_size: expected positive integers")


def clap_logits(x: Tensor, prototypes: Tensor, scale: float) -> Tensor:
    """s · normalise(x) normalise(W)ᵀ."""
    return scale * F.normalize(x, dim=-1) @ F.normalize(prototypes, dim=-1).T


def class_multipliers(x: Tensor, y: Tensor, text_weights: Tensor, scale: float) -> Tensor:
    """λ_c = mean over the class-c samples of the zero-shot softmax probability of class c."""
    c = text_weights.shape[0]
    probs = clap_logits(x, text_weights, scale).softmax(-1)
    own = probs.gather(1, y[:, None])[:, 0]
    total = torch.zeros(c, dtype=probs.dtype, device=probs.device).index_add_(0, y, own)
    return total / torch.bincount(y, minlength=c).clamp(min=1).to(probs.dtype)


def constraint_penalty(prototypes: Tensor, text_weights: Tensor, lambdas: Tensor) -> Tensor:
    """(1/C) Σ_c λ_c ‖w_c - t_c‖²."""
    return (lambdas * (prototypes - text_weights).pow(2).sum(-1)).mean()


def outer_step(prototypes: Tensor, text_weights: Tensor, lambdas: Tensor, rho: Tensor):
    """The PHR augmented-Lagrangian update: (max(0, λ + ρ h), h) with h_c = ‖w_c - t_c‖²."""
    h = (prototypes - text_weights).pow(2).sum(-1)
    return (lambdas + rho * h).clamp(min=0), h


@register
class Clap(Method):
    name = "clap"
    Config = ClapConfig
    default_views = 20  # epochs_aumentation: 20 augmented passes, each view its own sample
    unit_text = False  # t: the mean of the unnormalised template embeddings per class

    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None):
        c = self.config
        t = text_weights.detach().to(self.device, torch.float32)
        views = train.views if train.views is not None else train.features[None]
        x = views.to(self.device, torch.float32).flatten(0, 1)  # raw features, as cached
        y = train.labels.to(self.device).long().repeat(views.shape[0])
        lambdas = class_multipliers(x, y, t, c.scale)
        rho = torch.zeros_like(lambdas)
        weight = t.clone().requires_grad_(True)
        opt = torch.optim.SGD([weight], lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        images = len(train)
        steps = images // c.batch_size if images >= c.batch_size else 1
        generator = torch.Generator().manual_seed(c.seed)
        for epoch in range(c.epochs):
            lr = dassl_lr(epoch, c.lr, c.epochs, c.warmup_epochs, "constant", c.warmup_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            order = torch.randperm(x.shape[0], generator=generator).to(self.device)
            for step in range(steps):
                index = order[step * c.batch_size : (step + 1) * c.batch_size]
                loss = F.cross_entropy(clap_logits(x[index], weight, c.scale), y[index])
                if c.constraint != "none":
                    loss = loss + constraint_penalty(weight, t, lambdas)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if c.constraint == "adaptive":
                with torch.no_grad():
                    lambdas, rho = outer_step(weight, t, lambdas, rho)
        self.prototypes = weight.detach()
        self.lambdas = lambdas
        self.fitted = {"epoch": c.epochs, "steps_per_epoch": steps}
        if val is not None and len(val) > 0:  # reported, not used to choose
            acc = (self.logits(val).argmax(-1).cpu() == val.labels.long()).float().mean()
            self.fitted["val_accuracy"] = float(acc)
        return self

    @torch.no_grad()
    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] unnormalised embeddings -> [N, C]."""
        if not hasattr(self, "prototypes"):
            raise ClipAdaptError("clap: call fit(...) or load_adapter(...) first")
        return clap_logits(self._inputs(features), self.prototypes, self.config.scale)

    def state_tensors(self) -> dict[str, Tensor]:
        return {"prototypes": self.prototypes, "lambdas": self.lambdas}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.prototypes = tensors["prototypes"].to(self.device, torch.float32)
        self.lambdas = tensors["lambdas"].to(self.device, torch.float32)
