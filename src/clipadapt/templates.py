"""Prompt templates: one per dataset (CoOp / Tip-Adapter), the ImageNet ensembles, ShapesWorld.

A template is a format string with one ``{}`` for the class name (``_`` in class names becomes a
space in ``Backbone.text_classifier``). ``get_templates(name)`` accepts a dataset name in any
spelling ("OxfordPets", "oxford_pets"), an ensemble name ("imagenet-select", "openai-80"), or a
literal template containing ``{}``.
"""

from __future__ import annotations

from clipadapt.errors import ClipAdaptError

DEFAULT_TEMPLATE = "a photo of a {}."

IMAGENET_SELECT = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


def _openai_80() -> list[str]:
    """open_clip's OPENAI_IMAGENET_TEMPLATES (80 callables) as format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


# Keys: CoOp folder names (clipadapt.data.coop), ensembles, and the embedded ShapesWorld.
TEMPLATES: dict[str, list[str]] = {
    "imagenet": IMAGENET_SELECT,
    "imagenet-select": IMAGENET_SELECT,
    "caltech-101": ["a photo of a {}."],
    "oxford_pets": ["a photo of a {}, a type of pet."],
    "stanford_cars": ["a photo of a {}."],
    "oxford_flowers": ["a photo of a {}, a type of flower."],
    "food-101": ["a photo of {}, a type of food."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft."],
    "sun397": ["a photo of a {}."],
    "dtd": ["{} texture."],
    "eurosat": ["a centered satellite photo of {}."],
    "ucf101": ["a photo of a person doing {}."],
    "shapesworld": ["a photo of a {}."],
    # the classification tasks clipadapt.data.shapesworld_write writes (shapesworld-<task>)
    "shapesworld-shapes": ["a photo of a {}."],
    "shapesworld-colours": ["a photo of a {} object."],
    "shapesworld-patterns": ["a photo of a {}."],
    "shapesworld-conditions": ["a photo taken at {}."],
}
ENSEMBLES = ("imagenet-select", "openai-80")


def template_names() -> list[str]:
    return sorted([*TEMPLATES, "openai-80"])


def get_templates(name: str | None) -> list[str]:
    """Templates for a dataset/ensemble name or a literal ``"... {} ..."``; None -> default.

    A dataset without an entry gets ``["a photo of a {}."]``.
    """
    if name is None:
        return [DEFAULT_TEMPLATE]
    if "{}" in name:
        return [name]
    if name == "openai-80":
        return _openai_80()
    if name in TEMPLATES:
        return list(TEMPLATES[name])
    if name.lower().startswith("shapesworld"):
        return list(TEMPLATES.get(name.lower(), TEMPLATES["shapesworld"]))
    from clipadapt.data.names import dataset_key

    return list(TEMPLATES.get(dataset_key(name), [DEFAULT_TEMPLATE]))


def require_templates(name: str) -> list[str]:
    """Like :func:`get_templates`, but an unknown name is an error (for ``--templates``)."""
    if "{}" in name or name == "openai-80" or name in TEMPLATES:
        return get_templates(name)
    from clipadapt.data.names import canonical_name

    if canonical_name(name) in TEMPLATES:
        return get_templates(name)
    raise ClipAdaptError(
        f"--templates {name!r}: expected one of {', '.join(template_names())} "
        "or a template containing {}"
    )
