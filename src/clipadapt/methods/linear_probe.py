"""Linear probe (Radford et al. 2021): logistic regression on frozen, L2-normalised features.

    minimise  mean_i CE(x_i Wᵀ + b, y_i) + (λ / 2) ‖W‖²       (bias not regularised)

Solved full-batch with L-BFGS (strong-Wolfe line search). λ is searched on the validation set
over ``l2_grid`` from strong to weak (each fit warm-starts from the previous one; ties keep the
stronger λ); without a validation set ``l2`` is used. The solution of this convex problem does
not depend on the start; ``init="text"`` starts from W = s·W_text, b = 0, which only makes the
first fit converge faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.hparams import HParams, hp
from clipadapt.methods import register
from clipadapt.methods.base import Method


@dataclass
class LinearProbeConfig(HParams):
    l2: float = hp(1e-4, "L2 weight λ when there is no validation set (or search=false)")
    search: bool = hp(True, "choose λ from l2_grid by validation accuracy")
    l2_grid: tuple[float, ...] = hp(
        (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7), "the λ values searched"
    )
    init: str = hp("text", "text (W = s·W_text) or zeros")
    scale: float = hp(100.0, "logit scale s of the text initialisation (init=text only)")
    max_iter: int = hp(500, "L-BFGS iterations")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("text", "zeros"):
            raise ClipAdaptError(f"init={self.init!r}: expected 'text' or 'zeros'")
        if self.l2 < 0 or any(v < 0 for v in self.l2_grid):
            raise ClipAdaptError("l2 and l2_grid: expected non-negative values")


def objective(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, l2: float) -> Tensor:
    """mean CE(x Wᵀ + b, y) + (λ/2) ‖W‖²; x [N, D] normalised, weight [C, D], bias [C]."""
    return F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def fit_lbfgs(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, l2: float, max_iter: int):
    """Minimise ``objective`` from (weight, bias); returns the solution (new tensors)."""
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective(x, y, weight, bias, l2)
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


@register
class LinearProbe(Method):
    name = "linear-probe"
    Config = LinearProbeConfig

    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None):
        c = self.config
        x, y = self._inputs(train), train.labels.to(self.device)
        text_weights = text_weights.detach().to(self.device, torch.float32)
        weight = c.scale * text_weights if c.init == "text" else torch.zeros_like(text_weights)
        bias = torch.zeros(text_weights.shape[0], device=self.device)
        if val is None or not c.search:
            self.weight, self.bias = fit_lbfgs(x, y, weight, bias, c.l2, c.max_iter)
            self.fitted = {"l2": c.l2}
            return self
        xv, yv = self._inputs(val), val.labels.to(self.device)
        best = None
        for l2 in sorted(c.l2_grid, reverse=True):
            weight, bias = fit_lbfgs(x, y, weight, bias, l2, c.max_iter)
            acc = float(((xv @ weight.T + bias).argmax(1) == yv).float().mean())
            if best is None or acc > best[0]:
                best = (acc, l2, weight, bias)
        acc, l2, self.weight, self.bias = best
        self.fitted = {"l2": l2, "val_accuracy": acc}
        return self

    @torch.no_grad()
    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] -> [N, C] = normalise(f) Wᵀ + b."""
        if not hasattr(self, "weight"):
            raise ClipAdaptError("linear-probe: call fit(...) or load_adapter(...) first")
        return self._inputs(features) @ self.weight.T + self.bias

    def state_tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.weight = tensors["weight"].to(self.device, torch.float32)
        self.bias = tensors["bias"].to(self.device, torch.float32)
