"""The authors' released run configurations, per dataset, as data (docs/fidelity.md).

Every per-dataset default of a method is read from here, keyed by the canonical dataset name
(``dataset_key``), never inferred from another value. The sources are the released repositories:

- Tip-Adapter / Tip-Adapter-F: gaopengcuhk/Tip-Adapter ``configs/<dataset>.yaml``
  (``search_scale``, ``search_step``, ``init_beta``, ``init_alpha``, ``lr``, ``augment_epoch``,
  ``train_epoch``). Datasets without a config get ImageNet's (the generic one).
- CLIP-MHAdapter: SpaceTimeLab/CLIP-MHAdapter ``run-comparison.sh`` (the per-task
  ``mhadapter_params``: loss, class weighting, blend ratio, heads, chosen by the authors' grid
  search ``run-grid-search.sh``); unconfigured: ``patches/defaults.py`` (heads 4, blend 0.2).
"""

from __future__ import annotations

from dataclasses import dataclass

RECIPES = ("clean", "reference")


@dataclass(frozen=True)
class TipRecipe:
    """One Tip-Adapter config file: search range (β_max, α_max) and steps, the initial (β, α),
    Tip-Adapter-F's lr and epochs, and the augmented passes averaged into the cache keys."""

    search_scale: tuple[float, float]
    search_step: tuple[int, int] = (200, 20)
    init_beta: float = 1.0
    init_alpha: float = 1.17
    lr: float = 1e-3
    augment_epoch: int = 10
    train_epoch: int = 20


# gaopengcuhk/Tip-Adapter configs/<file>.yaml (commit d0e2d6f), lines 17-18 (search_scale,
# search_step), 20-21 (init_beta, init_alpha), 29-31 (lr, augment_epoch, train_epoch).
TIP_RECIPES: dict[str, TipRecipe] = {
    "imagenet": TipRecipe((7, 3), init_alpha=1.17),  # imagenet.yaml
    "caltech-101": TipRecipe((12, 5), init_alpha=3),  # caltech101.yaml
    "dtd": TipRecipe((13, 13), init_alpha=2),  # dtd.yaml
    "eurosat": TipRecipe((12, 10), init_alpha=2, train_epoch=100),  # eurosat.yaml
    "fgvc_aircraft": TipRecipe((30, 30), init_alpha=5),  # fgvc.yaml
    "food-101": TipRecipe((10, 10), init_alpha=1.17),  # food101.yaml
    "oxford_flowers": TipRecipe((50, 50), init_alpha=10),  # oxford_flowers.yaml
    "oxford_pets": TipRecipe((7, 3), init_alpha=1.17),  # oxford_pets.yaml
    "stanford_cars": TipRecipe((20, 10), init_alpha=3),  # stanford_cars.yaml
    "sun397": TipRecipe((12, 10), init_alpha=1.17),  # sun397.yaml: 20 epochs
    "ucf101": TipRecipe((7, 3), init_alpha=3),  # ucf101.yaml
}
TIP_DEFAULT = "imagenet"  # the recipe of a dataset without a config of its own


def dataset_key(dataset: str | None) -> str:
    """The key of a dataset's settings: its canonical name (clipadapt.data.names), so
    "Caltech-101", "caltech_101" and "caltech" all read caltech-101's config; a "<root>/<name>"
    path keeps its last part."""
    from clipadapt.data.names import dataset_key as key

    return key(dataset)


def tip_recipe(dataset: str | None) -> TipRecipe:
    """The Tip-Adapter config of ``dataset`` (ImageNet's for a dataset without one)."""
    return TIP_RECIPES.get(dataset_key(dataset), TIP_RECIPES[TIP_DEFAULT])


@dataclass(frozen=True)
class MHRecipe:
    """CLIP-MHAdapter's per-task setting: class weighting, blend ratio r, heads."""

    class_weights: bool
    ratio: float
    heads: int


# SpaceTimeLab/CLIP-MHAdapter run-comparison.sh (commit d5ba661), lines 139-146:
# "<loss> <weighting> <blend> <heads>" per task; every task uses the cross-entropy.
MH_TASK_RECIPES: dict[str, MHRecipe] = {
    "glare": MHRecipe(False, 0.8, 4),
    "lighting_condition": MHRecipe(True, 0.8, 8),
    "pano_status": MHRecipe(False, 0.2, 4),
    "platform": MHRecipe(False, 0.8, 4),
    "quality": MHRecipe(True, 0.2, 16),
    "reflection": MHRecipe(True, 0.8, 8),
    "view_direction": MHRecipe(True, 0.8, 4),
    "weather": MHRecipe(False, 0.2, 8),
}


def check_recipe(recipe: str) -> str:
    from clipadapt.errors import ClipAdaptError

    if recipe not in RECIPES:
        raise ClipAdaptError(f"recipe={recipe!r}: expected one of {', '.join(RECIPES)}")
    return recipe
