"""Dataset names: the one alias table that every reader, template set and recipe looks up.

The canonical name of a CoOp dataset is its folder name in CoOp's ``$DATA`` layout
(``caltech-101``, ``oxford_pets``, ...). Users write the paper's names ("Flowers102", "SUN",
"UCF", "Caltech-101", "OxfordPets"), folder names, or short names; all of them land here.
"""

from __future__ import annotations

import re

# canonical CoOp folder name -> the spellings users write (compared without case or separators)
ALIASES: dict[str, tuple[str, ...]] = {
    "imagenet": ("imagenet", "imagenet1k", "ilsvrc2012"),
    "caltech-101": ("caltech101", "caltech"),
    "oxford_pets": ("oxfordpets", "oxfordiiitpet", "oxfordiiitpets", "pets"),
    "stanford_cars": ("stanfordcars", "cars"),
    "oxford_flowers": ("oxfordflowers", "flowers102", "oxford102flowers", "flowers"),
    "food-101": ("food101", "food"),
    "fgvc_aircraft": ("fgvcaircraft", "aircraft", "fgvc"),
    "sun397": ("sun397", "sun"),
    "dtd": ("dtd", "describabletextures", "textures"),
    "eurosat": ("eurosat",),
    "ucf101": ("ucf101", "ucf"),
}
# the paper's spelling of each dataset (tables, messages)
DISPLAY = {
    "imagenet": "ImageNet",
    "caltech-101": "Caltech101",
    "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars",
    "oxford_flowers": "Flowers102",
    "food-101": "Food101",
    "fgvc_aircraft": "FGVCAircraft",
    "sun397": "SUN397",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "ucf101": "UCF101",
}
_LOOKUP = {alias: name for name, aliases in ALIASES.items() for alias in aliases}


def squash(name: str) -> str:
    """Lower case without separators: "Caltech-101" -> "caltech101"."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_name(name: str) -> str | None:
    """The canonical (CoOp folder) name of a dataset name, or None for a name we do not know.

    "Flowers102", "flowers-102", "oxford_flowers" -> "oxford_flowers"; "sun" -> "sun397".
    A path ("<root>/<name>/") is looked up by its last part.
    """
    last = str(name).replace("\\", "/").rstrip("/").split("/")[-1]
    return _LOOKUP.get(squash(last))


def dataset_key(name: str | None) -> str:
    """A key for per-dataset settings: the canonical name of a known dataset, else the
    squashed last part of ``name`` ("my-data/" -> "mydata")."""
    last = str(name or "").replace("\\", "/").rstrip("/").split("/")[-1]
    return canonical_name(last) or squash(last)


def known_names() -> list[str]:
    return list(ALIASES)
