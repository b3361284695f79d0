"""Tip-Adapter (Zhang et al., ECCV 2022): a training-free key-value cache of the few shots.

    keys[M, D]   = normalise(mean over A augmented views of the unnormalised embeddings)
    values[M, C] = one-hot labels
    logits       = s · f Wᵀ + α · exp(-β (1 - f keysᵀ)) values

α (residual ratio) and β (sharpness) are searched on the validation set over the published grid
β_i = 0.1 + i (β_max - 0.1) / 200, α_j = 0.1 + j (α_max - 0.1) / 20 (β outer, α inner, the first
maximiser wins). ``search_hparams`` returns exactly what the naive 4,000-point loop over
``tip_logits`` returns, much faster: f·keysᵀ and s·f Wᵀ are computed once, exp once per β, and
each α reuses the β's cache logits and needs only a max over the non-label classes. Every
floating-point value it compares is computed by the same operations as in ``tip_logits``, so
the correct-count at every grid point is identical to the naive loop's (ties in a row go to the
first maximiser, as argmax does). With the cache's one-hot values in class order (``build_cache``
orders them), "· values" is a sum over each class's K keys instead of an [N, M] x [M, C] matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clipadapt import recipes
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.hparams import HParams, hp
from clipadapt.methods import register, search
from clipadapt.methods.base import Method

# (β_max, α_max) of the published search, per canonical dataset name (clipadapt.recipes).
SEARCH_RANGES: dict[str, tuple[float, float]] = {
    k: r.search_scale for k, r in recipes.TIP_RECIPES.items()
}
DEFAULT_RANGE = recipes.TIP_RECIPES[recipes.TIP_DEFAULT].search_scale


def search_range(dataset: str | None) -> tuple[float, float]:
    """(β_max, α_max) for a dataset name ("caltech-101", "Caltech101", "oxford_pets", ...)."""
    beta_max, alpha_max = recipes.tip_recipe(dataset).search_scale
    return float(beta_max), float(alpha_max)


def build_cache(train: FeatureSet, num_classes: int) -> tuple[Tensor, Tensor]:
    """keys [M, D] = normalise(mean over views of unnormalised embeddings); values [M, C] one-hot.

    Without views the eval-transform features are the single "view". Keys are ordered by class
    (stable), which lets ``tip_logits`` sum each class's affinities instead of a matmul."""
    views = train.views if train.views is not None else train.features[None]
    order = torch.sort(train.labels.long(), stable=True).indices
    keys = F.normalize(views[:, order].float().mean(dim=0), dim=-1)
    values = F.one_hot(train.labels.long()[order], num_classes).float()
    return keys, values


def _clip_logits(feats: Tensor, text_weights: Tensor, scale: float) -> Tensor:
    return scale * (feats @ text_weights.T)


def _shots_per_class(values: Tensor) -> int | None:
    """K if values [M, C] is one-hot with classes in order, K consecutive keys each; else None."""
    m, c = values.shape
    if c == 0 or m % c:
        return None
    k = m // c
    expected = F.one_hot(torch.arange(c, device=values.device).repeat_interleave(k), c)
    return k if torch.equal(values, expected.to(values.dtype)) else None


def _one_hot_classes(values: Tensor) -> Tensor | None:
    """[M] class of each key if values [M, C] is one-hot (any order, any count per class)."""
    if values.numel() == 0 or not bool(((values == 0) | (values == 1)).all()):
        return None
    if not bool((values.sum(dim=1) == 1).all()):
        return None
    return values.argmax(dim=1)


class CacheValues:
    """sharp [N, M] -> sharp · values [N, C], for the layout of ``values`` [M, C]:

    - one-hot with classes in order, K keys each (``build_cache``): a sum over each class's K
      consecutive columns, M·N additions instead of an M·N·C matmul;
    - one-hot in any other order (on CPU): ``index_add_``, adding the keys in their order;
    - otherwise (soft values, or one-hot off the CPU): the matmul.
    """

    def __init__(self, values: Tensor) -> None:
        self.values = values
        self.num_classes = values.shape[1]
        self.shots = _shots_per_class(values)
        self.classes = None
        if self.shots is None and values.device.type == "cpu":
            self.classes = _one_hot_classes(values)

    def __call__(self, sharp: Tensor) -> Tensor:
        if self.shots is not None:
            return sharp.unflatten(-1, (-1, self.shots)).sum(dim=-1)
        if self.classes is not None:
            out = sharp.new_zeros(*sharp.shape[:-1], self.num_classes)
            return out.index_add(-1, self.classes, sharp)
        return sharp @ self.values


def tip_logits(
    feats: Tensor,
    keys: Tensor,
    values: Tensor | CacheValues,
    text_weights: Tensor,
    alpha: float,
    beta: float,
    scale: float = 100.0,
) -> Tensor:
    """feats [N, D] and keys [M, D] L2-normalised, values [M, C], text_weights [C, D] -> [N, C]:
    scale · f Wᵀ + α · exp(-β (1 - f keysᵀ)) values."""
    cache_values = values if isinstance(values, CacheValues) else CacheValues(values)
    sharp = torch.exp(-beta * (1.0 - feats @ keys.T))
    return _clip_logits(feats, text_weights, scale) + cache_values(sharp) * alpha


def search_grid(beta_max: float, alpha_max: float, steps=(200, 20)) -> tuple[list, list]:
    """The published grid: β_i = i (β_max - 0.1) / steps[0] + 0.1, i < steps[0]; same for α
    (utils.py search_hp, the same operations in the same order)."""
    betas = [i * (beta_max - 0.1) / steps[0] + 0.1 for i in range(steps[0])]
    alphas = [j * (alpha_max - 0.1) / steps[1] + 0.1 for j in range(steps[1])]
    return betas, alphas


@torch.no_grad()
def search_hparams(
    feats: Tensor,
    labels: Tensor,
    keys: Tensor,
    values: Tensor,
    text_weights: Tensor,
    beta_max: float,
    alpha_max: float,
    steps: tuple[int, int] = (200, 20),
    scale: float = 100.0,
    progress: bool | None = None,
    budget: int = search.DEFAULT_BUDGET,
) -> tuple[float, float, float]:
    """Grid search of (β, α) by accuracy of ``tip_logits`` on (feats [N, D], labels [N]).

    Returns (beta, alpha, accuracy in [0, 1]) of the first maximiser in the order β outer,
    α inner: the same triple as the plain loop over the grid, with the reference's rule that a
    point must beat accuracy 0 (else (0.0, 0.0, 0.0), the reference's initial β, α). Working
    memory stays under ``budget`` bytes (``clipadapt.methods.search``).
    """
    if feats.shape[0] == 0:
        raise ClipAdaptError("search_hparams: the validation set is empty")
    betas, alphas = search_grid(beta_max, alpha_max, steps)
    counts = grid_correct_counts(
        feats, labels, keys, values, text_weights, betas, alphas, scale, progress, budget
    )
    best = search.first_maximiser(counts)
    if best is None:
        return 0.0, 0.0, 0.0
    i, j = best
    return betas[i], alphas[j], int(counts[i, j]) / feats.shape[0]


@torch.no_grad()
def grid_correct_counts(
    feats: Tensor,
    labels: Tensor,
    keys: Tensor,
    values: Tensor,
    text_weights: Tensor,
    betas: list[float],
    alphas: list[float],
    scale: float = 100.0,
    progress: bool | None = None,
    budget: int = search.DEFAULT_BUDGET,
) -> Tensor:
    """[len(betas), len(alphas)] int64: at each (β, α), the number of rows whose first argmax
    of ``tip_logits(feats, keys, values, text_weights, α, β, scale)`` is the label.

    Same floating-point operations as ``tip_logits``, so the counts are exactly the plain
    loop's; f·keysᵀ and s·f Wᵀ are computed once per chunk of rows, exp(-β (1 - f keysᵀ)) and
    the cache logits once per β, and each α is a scaled add (``search.affinity_grid_counts``).
    """
    cache_values = CacheValues(values)
    return search.affinity_grid_counts(
        feats,
        labels,
        keys,
        lambda f: _clip_logits(f, text_weights, scale),
        lambda kernel, i: cache_values(kernel),
        betas,
        alphas,
        num_classes=text_weights.shape[0],
        budget=budget,
        progress=progress,
    )


@dataclass
class TipAdapterConfig(HParams):
    alpha: float | None = hp(None, "residual ratio α; None: the dataset's init_alpha (recipes)")
    beta: float | None = hp(None, "sharpness β; None: the dataset's init_beta (recipes)")
    scale: float = hp(100.0, "logit scale: a constant in the reference code, not the backbone's")
    search: bool = hp(True, "search (β, α) on the validation set when one is given")
    dataset: str | None = hp(None, "picks the per-dataset recipe (clipadapt.recipes)")
    beta_max: float | None = hp(None, "top of the β search range; None: the dataset's")
    alpha_max: float | None = hp(None, "top of the α search range; None: the dataset's")
    steps: tuple[int, int] = hp((200, 20), "grid points of the β and α searches")

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.steps) != 2 or min(self.steps) < 1:
            raise ClipAdaptError(f"steps={self.steps}: expected two positive integers")

    def initial(self) -> tuple[float, float]:
        """(α, β) before the search (and while Tip-Adapter-F trains): the config's, else the
        dataset's ``init_alpha``, ``init_beta``."""
        recipe = recipes.tip_recipe(self.dataset)
        alpha = recipe.init_alpha if self.alpha is None else self.alpha
        beta = recipe.init_beta if self.beta is None else self.beta
        return float(alpha), float(beta)

    def search_range(self) -> tuple[float, float]:
        beta_max, alpha_max = search_range(self.dataset)
        return (
            float(self.beta_max) if self.beta_max is not None else beta_max,
            float(self.alpha_max) if self.alpha_max is not None else alpha_max,
        )


@register
class TipAdapter(Method):
    name = "tip-adapter"
    Config = TipAdapterConfig
    learned_scale = False  # the reference multiplies by a constant 100 (main.py:32, 93, 116)
    novel_rule = "zero-shot (cache has base classes only)"  # its term adds nothing to them
    default_views = 10  # A: augmented passes averaged into each cache key

    def val_source(self) -> str:
        """clean: the few-shot validation draw. reference: the whole validation split, as the
        authors' dataset readers give it (only train is subsampled, datasets/*.py), and on
        ImageNet the test set (main_imagenet.py searches (β, α) on test_features)."""
        if self.recipe != "reference":
            return "fewshot"
        return "test" if recipes.dataset_key(self.config.dataset) == "imagenet" else "val"

    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None):
        self.text_weights = text_weights.detach().to(self.device, torch.float32)
        keys, values = build_cache(train, self.text_weights.shape[0])
        self.keys, self.values = keys.to(self.device), values.to(self.device)
        self._search(val)
        return self

    def _search(self, val: FeatureSet | None) -> None:
        """Set the final (α, β): searched on ``val`` if given, else the config's; ``fitted``
        reports them."""
        self.alpha, self.beta = self.config.initial()
        self.fitted.update(alpha=self.alpha, beta=self.beta)
        if val is not None and self.config.search:
            beta_max, alpha_max = self.config.search_range()
            beta, alpha, acc = search_hparams(
                self._inputs(val),
                val.labels,
                self.keys,
                self.values,
                self.text_weights,
                beta_max,
                alpha_max,
                self.config.steps,
                self.config.scale,
            )
            self.alpha, self.beta = alpha, beta
            self.fitted.update(
                alpha=alpha, beta=beta, val_accuracy=acc, search=[beta_max, alpha_max]
            )

    @torch.no_grad()
    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] unnormalised embeddings -> [N, C] with the fitted (α, β)."""
        if not hasattr(self, "keys"):
            raise ClipAdaptError(f"{self.name}: call fit(...) or load_adapter(...) first")
        return tip_logits(
            self._inputs(features),
            self.keys,
            self.values,
            self.text_weights,
            self.alpha,
            self.beta,
            self.config.scale,
        )

    def state_tensors(self) -> dict[str, Tensor]:
        return {
            "keys": self.keys,
            "values": self.values,
            "text_weights": self.text_weights,
            "alpha": torch.tensor(self.alpha, dtype=torch.float64),
            "beta": torch.tensor(self.beta, dtype=torch.float64),
        }

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.keys = tensors["keys"].to(self.device, torch.float32)
        self.values = tensors["values"].to(self.device, torch.float32)
        self.text_weights = tensors["text_weights"].to(self.device, torch.float32)
        # adapters saved before α, β were tensors carry them only in the fitted report
        self.alpha = float(tensors["alpha"]) if "alpha" in tensors else self.fitted["alpha"]
        self.beta = float(tensors["beta"]) if "beta" in tensors else self.fitted["beta"]
