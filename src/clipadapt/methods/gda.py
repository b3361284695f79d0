"""GDA (Wang et al., ICLR 2024): Gaussian discriminant analysis on the few shots, blended with CLIP.

Every augmented view x (L2-normalised) of the support set is a sample, N' = views · K · C:

    μ_c  = mean of the class-c samples
    Z    = the samples centred on their class mean;  S = ZᵀZ / (N' - 1)
    P    = D · (ZᵀZ + tr(S) · I)⁻¹                     (the shared precision, shrunk towards I)
    W_c  = P μ_c,   b_c = log(1/C) - ½ μ_cᵀ P μ_c
    logits = s · f Tᵀ + α · (f Wᵀ + b)                   (s = 100, a constant in the code)

α is the only hyper-parameter: the first best validation accuracy over (1e-4, 1e-3, ..., 100),
ascending, strict ">" from a best of 0 (ties keep the smaller α; α = 0.1 if nothing scores).

Base-to-novel (the authors' main_base2new.py): the base classes use the mean of the per-class
covariances, pseudo-inverted without shrinkage (``precision="pooled"``); a novel class with text
weight t gets μ = mean of the 64 support samples most similar to t and 16 copies of t, and the
novel precision is the mean over novel classes of D · (63 · Σ_t + tr(Σ_t) · I)⁺ with Σ_t the
scatter of those 64 samples around t (``novel_logits``). α is the base classes'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet, as_features
from clipadapt.hparams import hp
from clipadapt.methods import register, search
from clipadapt.methods.base import Method

ALPHAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)  # main_few_shots.py:69
PRECISIONS = ("shrinkage", "pooled")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class GDAConfig:
    alpha: float = hp(0.1, "blend weight without a validation set (the code's initial best)")
    alphas: tuple[float, ...] = hp(ALPHAS, "the α grid searched on validation, ascending")
    search: bool = hp(True, "search α on the validation set when one is given")
    scale: float = hp(100.0, "zero-shot logit scale (a constant 100 in the reference code)")
    precision: str = hp(
        "shrinkage", "shrinkage (the few-shot script) or pooled (base2new's base classes)"
    )
    novel_topk: int = hp(64, "base-to-novel: support samples nearest each novel text")
    novel_text_copies: int = hp(16, "base-to-novel: copies of the novel text in its mean")
    fit_dtype: str = hp("float64", "float64 or float32 (the reference's) for the estimates")
    keep_support: bool = hp(False, "save the support samples (novel_logits after loading)")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ClipAdaptError(
                f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}"
            )
        if self.fit_dtype not in DTYPES:
            raise ClipAdaptError(f"fit_dtype={self.fit_dtype!r}: expected float64 or float32")
        if not self.alphas:
            raise ClipAdaptError("alphas: expected at least one value")


def support_samples(train: FeatureSet) -> tuple[Tensor, Tensor]:
    """Every augmented view as its own L2-normalised sample: ([V·N, D], [V·N]); without views
    the eval-transform features."""
    views = train.views if train.views is not None else train.features[None]
    x = F.normalize(views.float(), dim=-1).flatten(0, 1)
    return x, train.labels.long().repeat(views.shape[0])


def class_means(x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """[C, D]: the mean of each class's rows."""
    if len(y) and int(y.max()) >= num_classes:
        raise ClipAdaptError(f"gda: label {int(y.max())} but only {num_classes} text weights")
    one_hot = F.one_hot(y, num_classes).to(x.dtype)
    counts = one_hot.sum(0)
    if bool((counts == 0).any()):
        missing = int((counts == 0).nonzero()[0])
        raise ClipAdaptError(f"gda: class {missing} has no training sample")
    return (one_hot.T @ x) / counts[:, None]


def shrinkage_precision(z: Tensor) -> Tensor:
    """P = D · ((N-1)·S + tr(S)·I)⁺ with S the unbiased covariance of the centred rows z [N, D]."""
    n, d = z.shape
    scatter = z.T @ z  # (N - 1) · S: the columns of z have mean 0
    trace = scatter.diagonal().sum() / max(n - 1, 1)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    return d * torch.linalg.pinv(scatter + trace * eye, hermitian=True)


def pooled_precision(x: Tensor, y: Tensor, means: Tensor) -> Tensor:
    """(mean over classes of each class's unbiased covariance)⁺, no shrinkage."""
    c, d = means.shape
    total = torch.zeros(d, d, dtype=x.dtype, device=x.device)
    for k in range(c):
        z = x[y == k] - means[k]
        total += z.T @ z / max(z.shape[0] - 1, 1)
    return torch.linalg.pinv(total / c, hermitian=True)


def linear_head(means: Tensor, precision: Tensor) -> tuple[Tensor, Tensor]:
    """W [C, D] = μ P, b [C] = log(1/C) - ½ μᵀ P μ (equal priors)."""
    weight = means @ precision
    bias = math.log(1.0 / means.shape[0]) - 0.5 * (weight * means).sum(-1)
    return weight, bias


def gda_logits(feats: Tensor, text_weights: Tensor, weight: Tensor, bias: Tensor, alpha, scale):
    """feats [N, D] normalised -> s · f Tᵀ + α · (f Wᵀ + b)."""
    return scale * feats @ text_weights.T + alpha * (feats @ weight.T + bias)


def search_alpha(
    feats: Tensor,
    labels: Tensor,
    text_weights: Tensor,
    weight: Tensor,
    bias: Tensor,
    alphas,
    scale: float,
    default: float,
    budget: int = search.DEFAULT_BUDGET,
) -> tuple[float, float]:
    """(α, accuracy in [0, 1]): the first α with the best validation accuracy, strict ">"
    from 0 as in the code (``default`` if every α scores 0). Rows are scored in chunks under
    ``budget`` bytes; the counts are exactly those of ``gda_logits`` at each α."""
    labels = labels.to(feats.device)
    alphas = [float(a) for a in alphas]
    grid = torch.tensor(alphas, dtype=feats.dtype, device=feats.device)
    per_row = search.search_bytes_per_row(0, text_weights.shape[0], len(grid))
    counts = torch.zeros(len(grid), dtype=torch.long, device=feats.device)
    for rows in search.row_chunks(len(feats), per_row, budget):
        f = feats[rows]
        clip = scale * f @ text_weights.T
        counts += search.scaled_add_correct(clip, f @ weight.T + bias, labels[rows], grid)
    best = search.first_maximiser(counts[None])
    if best is None:
        return float(default), 0.0
    return alphas[best[1]], int(counts[best[1]]) / len(feats)


def novel_head(
    support: Tensor, novel_text: Tensor, topk: int = 64, copies: int = 16
) -> tuple[Tensor, Tensor]:
    """The base2new script's classifier for classes without samples: per novel text t, the
    ``topk`` support samples x with the largest t·x; μ_t = mean of those and ``copies`` × t;
    P = mean over t of D · ((k-1)·Σ_t + tr(Σ_t)·I)⁺ with Σ_t = (X - t)ᵀ(X - t) / (k - 1)."""
    k = min(topk, support.shape[0])
    d = support.shape[1]
    eye = torch.eye(d, dtype=support.dtype, device=support.device)
    means, precision = [], torch.zeros(d, d, dtype=support.dtype, device=support.device)
    for t in novel_text:
        near = support[torch.topk(support @ t, k).indices]
        means.append(torch.cat([near, t.expand(copies, d)]).mean(0))
        z = near - t
        cov = z.T @ z / max(k - 1, 1)
        precision += d * torch.linalg.pinv((k - 1) * cov + cov.trace() * eye, hermitian=True)
    return linear_head(torch.stack(means), precision / len(novel_text))


@register
class GDA(Method):
    name = "gda"
    Config = GDAConfig
    learned_scale = False  # `100. *` in main_few_shots.py:71, 80
    default_views = 10  # augment_epoch: 10, every view its own sample
    novel_rule = "synthesised Gaussians: novel texts + nearest base samples (GDA's base2new)"
    # main_base2new.py:56-57: the base classes' precision there is the pooled estimator
    protocol_defaults: ClassVar[dict[str, dict[str, Any]]] = {"base2novel": {"precision": "pooled"}}

    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None):
        c = self.config
        dtype = DTYPES[c.fit_dtype]
        self.text_weights = text_weights.detach().to(self.device, torch.float32)
        x, y = support_samples(train)
        x, y = x.to(self.device, dtype), y.to(self.device)
        means = class_means(x, y, self.text_weights.shape[0])
        if c.precision == "shrinkage":
            precision = shrinkage_precision(x - means[y])
        else:
            precision = pooled_precision(x, y, means)
        weight, bias = linear_head(means, precision)
        self.weight, self.bias = weight.float(), bias.float()
        self.support = x.float()
        self.fitted = {"alpha": float(c.alpha), "samples": int(x.shape[0])}
        if val is not None and c.search and len(val) > 0:
            alpha, acc = search_alpha(
                self._inputs(val),
                val.labels,
                self.text_weights,
                self.weight,
                self.bias,
                c.alphas,
                c.scale,
                c.alpha,
            )
            self.fitted.update(alpha=alpha, val_accuracy=acc)
        return self

    def _check(self) -> None:
        if not hasattr(self, "weight"):
            raise ClipAdaptError("gda: call fit(...) or load_adapter(...) first")

    @torch.no_grad()
    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] unnormalised embeddings -> [N, C]."""
        self._check()
        f = self._inputs(features)
        return gda_logits(
            f, self.text_weights, self.weight, self.bias, self.fitted["alpha"], self.config.scale
        )

    @torch.no_grad()
    def novel_logits(self, features: Tensor | FeatureSet, weights: Tensor) -> Tensor:
        """Logits over classes never seen in fit, from their text weights [C', D] alone."""
        self._check()
        if getattr(self, "support", None) is None:
            raise ClipAdaptError(
                "gda: novel classes need the support samples (fit here, or keep_support=true)"
            )
        c = self.config
        dtype = DTYPES[c.fit_dtype]
        text = F.normalize(weights.to(self.device, torch.float32), dim=-1)
        weight, bias = novel_head(
            self.support.to(dtype), text.to(dtype), c.novel_topk, c.novel_text_copies
        )
        f = self._inputs(as_features(features))
        return gda_logits(f, text, weight.float(), bias.float(), self.fitted["alpha"], c.scale)

    def state_tensors(self) -> dict[str, Tensor]:
        out = {"weight": self.weight, "bias": self.bias, "text_weights": self.text_weights}
        if self.config.keep_support and getattr(self, "support", None) is not None:
            out["support"] = self.support
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.weight = tensors["weight"].to(self.device, torch.float32)
        self.bias = tensors["bias"].to(self.device, torch.float32)
        self.text_weights = tensors["text_weights"].to(self.device, torch.float32)
        support = tensors.get("support")
        self.support = None if support is None else support.to(self.device, torch.float32)
