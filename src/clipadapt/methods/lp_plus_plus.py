"""LP++ (Huang et al., CVPR 2024): a linear probe blended class-wise with the text weights.

    logits_ik = f_i · w_k + b_k + α_k · (f_i · t_k)          (text logits not scaled by 100)

f: L2-normalised features of one augmented view per image, N = K·C samples. Initialisation and
step sizes are data-driven, as in the released code (methods/linear_probe_p2.py):

    W_0  = per-class sum of the features,  b_0 ~ U(±1/√D) (nn.Linear's default)
    α_0  = 250 · mean over classes k of (mean over the class-k samples of f · t_k), every class
    η_W  = 4N / λ_max(FᵀF)              η_α = N / (4 · max_k Σ_i (f_i · t_k)²)

300 full-batch epochs: (W, b) take an SGD step with momentum 0.9 at η_W each epoch, α a plain
step α ← α - η_α · g every 10 epochs, where g is the sum of α's gradients since the start (the
code never zeroes α's gradient; ``alpha_grad="current"`` uses the last epoch's). After every
epoch the model is scored on the validation set and the last epoch scoring at least the best
so far is kept (``>=``, from 0); without a validation set the last epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.hparams import hp
from clipadapt.methods import register
from clipadapt.methods.base import Method

ALPHA_GRADS = ("accumulated", "current")
INITS = ("sum", "mean")


@dataclass
class LPPlusPlusConfig:
    epochs: int = hp(300, "full-batch epochs (configs/base.yaml train_epoch)")
    alpha_every: int = hp(10, "α takes a step every this many epochs")
    alpha_grad: str = hp(
        "accumulated", "accumulated (the code never zeroes α's gradient) or current"
    )
    alpha_init_scale: float = hp(250.0, "α_0 = this x the mean matching-class text cosine")
    init: str = hp("sum", "W_0: per-class sum (the code) or mean (the class centroids)")
    bias: bool = hp(True, "a bias term (the code's nn.Linear has one, the paper's equation not)")
    momentum: float = hp(0.9, "SGD momentum on W and b")
    use_views: bool = hp(True, "train on the first cached augmented view when there is one")
    seed: int = hp(1, "draws the bias initialisation")

    def __post_init__(self) -> None:
        if self.alpha_grad not in ALPHA_GRADS:
            raise ClipAdaptError(
                f"alpha_grad={self.alpha_grad!r}: expected one of {', '.join(ALPHA_GRADS)}"
            )
        if self.init not in INITS:
            raise ClipAdaptError(f"init={self.init!r}: expected one of {', '.join(INITS)}")
        if self.epochs < 1 or self.alpha_every < 1:
            raise ClipAdaptError("epochs and alpha_every: expected positive integers")


def init_alpha(x: Tensor, y: Tensor, text_weights: Tensor, scale: float = 250.0) -> Tensor:
    """α_0: ``scale`` × the mean over classes of the mean f·t_y over that class's samples."""
    c = text_weights.shape[0]
    own = (x * text_weights[y]).sum(-1)  # f_i · t_{y_i}
    per_class = torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(0, y, own)
    per_class = per_class / torch.bincount(y, minlength=c).clamp(min=1).to(x.dtype)
    return scale * per_class.mean()


def lr_weight(x: Tensor) -> float:
    """η_W = 4N / λ_max(FᵀF)."""
    top = torch.linalg.eigvalsh((x.T @ x).double())[-1]
    return float(4 * x.shape[0] / top)


def lr_alpha(x: Tensor, text_weights: Tensor) -> float:
    """η_α = N / (4 · max_k Σ_i (f_i · t_k)²)."""
    return float(x.shape[0] / (4 * (x @ text_weights.T).pow(2).sum(0).max()))


def lpp_logits(x: Tensor, text_weights: Tensor, weight: Tensor, bias: Tensor, alpha: Tensor):
    """[N, C] = f Wᵀ + b + α ⊙ (f Tᵀ)."""
    return x @ weight.T + bias + alpha * (x @ text_weights.T)


@register
class LPPlusPlus(Method):
    name = "lp++"
    Config = LPPlusPlusConfig
    default_views = 1  # main.py: one random-resized-crop + flip view per support image

    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None):
        c = self.config
        t = text_weights.detach().to(self.device, torch.float32)
        self.text_weights = t
        feats = train.views[0] if c.use_views and train.views is not None else train.features
        x = F.normalize(feats.to(self.device, torch.float32), dim=-1)
        y = train.labels.to(self.device).long()
        n, d = x.shape
        one_hot = F.one_hot(y, t.shape[0]).float()
        weight = one_hot.T @ x
        if c.init == "mean":
            weight = weight / one_hot.sum(0).clamp(min=1)[:, None]
        bound = 1.0 / math.sqrt(d)
        generator = torch.Generator().manual_seed(c.seed)
        bias = (torch.rand(t.shape[0], generator=generator) * 2 - 1) * bound
        bias = bias.to(self.device) if c.bias else torch.zeros(t.shape[0], device=self.device)
        alpha = init_alpha(x, y, t, c.alpha_init_scale).expand(t.shape[0]).clone()
        alpha_init = float(alpha[0])
        eta_w, eta_a = lr_weight(x), lr_alpha(x, t)

        weight.requires_grad_(True)
        alpha.requires_grad_(True)
        params = [weight] + ([bias.requires_grad_(True)] if c.bias else [])
        opt = torch.optim.SGD(params, lr=eta_w, momentum=c.momentum)
        text_logits = x @ t.T
        xv = yv = None
        if val is not None and len(val) > 0:
            xv, yv = self._inputs(val), val.labels.to(self.device)
        best, best_state, best_epoch = 0.0, None, c.epochs
        for epoch in range(c.epochs):
            logits = x @ weight.T + bias + alpha * text_logits
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            if c.alpha_grad == "current":
                alpha.grad = None
            loss.backward()
            opt.step()
            if (epoch + 1) % c.alpha_every == 0:
                with torch.no_grad():
                    alpha -= eta_a * alpha.grad
            if xv is not None:
                with torch.no_grad():
                    acc = float(
                        (lpp_logits(xv, t, weight, bias, alpha).argmax(-1) == yv).float().mean()
                    )
                if acc >= best:
                    best, best_epoch = acc, epoch + 1
                    best_state = (
                        weight.detach().clone(),
                        bias.detach().clone(),
                        alpha.detach().clone(),
                    )
        if best_state is None:
            best_state = (weight.detach(), bias.detach(), alpha.detach())
        self.weight, self.bias, self.alpha = best_state
        self.fitted = {
            "epoch": best_epoch,
            "lr_weight": eta_w,
            "lr_alpha": eta_a,
            "alpha_init": alpha_init,
        }
        if xv is not None:
            self.fitted["val_accuracy"] = best
        return self

    @torch.no_grad()
    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] unnormalised embeddings -> [N, C]."""
        if not hasattr(self, "weight"):
            raise ClipAdaptError("lp++: call fit(...) or load_adapter(...) first")
        return lpp_logits(
            self._inputs(features), self.text_weights, self.weight, self.bias, self.alpha
        )

    def state_tensors(self) -> dict[str, Tensor]:
        return {
            "weight": self.weight,
            "bias": self.bias,
            "alpha": self.alpha,
            "text_weights": self.text_weights,
        }

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        for key in ("weight", "bias", "alpha", "text_weights"):
            setattr(self, key, tensors[key].to(self.device, torch.float32))
