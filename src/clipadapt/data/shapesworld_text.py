"""ShapesWorld's language: captions for contrastive pre-training and the facts they assert.

A caption mentions some objects (each by shape and/or colour, sometimes size and pattern) and
some scene attributes. Each mention is a *fact*; an image satisfies a caption when it holds
every fact the caption asserts. The pre-training loss uses this to treat every image in a batch
that satisfies a caption as a positive (duplicate-aware contrastive targets).
"""

from __future__ import annotations

import numpy as np

from clipadapt.data.shapesworld import (
    ATTRIBUTES,
    COLOUR_NAMES,
    PATTERNS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
)

# Object facts: (shape or *, colour or *, pattern or *, size or *); scene facts: one per value.
_NS, _NC, _NP, _NZ = len(SHAPES) + 1, len(COLOUR_NAMES) + 1, len(PATTERNS) + 1, len(SIZES) + 1
N_OBJECT_FACTS = _NS * _NC * _NP * _NZ
_SCENE_OFFSET = {}
_off = N_OBJECT_FACTS
for _name, _values in ATTRIBUTES.items():
    _SCENE_OFFSET[_name] = _off
    _off += len(_values)
_TEXTURE_OFFSET = _off  # background texture facts
N_FACTS = _off + len(TEXTURES)

NUMBERS = {2: "two", 3: "three"}
SCENE_PHRASES = {
    "lighting": ["at {}", "taken at {}"],
    "weather": ["in {} weather"],
}


def object_fact(
    shape: int | None, colour: int | None, pattern: int | None, size: int | None
) -> int:
    s = len(SHAPES) if shape is None else shape
    c = len(COLOUR_NAMES) if colour is None else colour
    p = len(PATTERNS) if pattern is None else pattern
    z = len(SIZES) if size is None else size
    return ((s * _NC + c) * _NP + p) * _NZ + z


def scene_fact(attribute: str, value: int) -> int:
    return _SCENE_OFFSET[attribute] + value


def texture_fact(texture: int) -> int:
    return _TEXTURE_OFFSET + texture


def image_facts(scene: Scene) -> np.ndarray:
    """[N_FACTS] bool: every fact the scene satisfies."""
    facts = np.zeros(N_FACTS, bool)
    for o in scene.objects:
        for s in (o.shape, None):
            for c in (o.colour, None):
                for p in (o.pattern, None):
                    for z in (o.size, None):
                        facts[object_fact(s, c, p, z)] = True
    for name in ATTRIBUTES:
        facts[scene_fact(name, getattr(scene, name))] = True
    facts[texture_fact(scene.texture)] = True
    return facts


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(
    scene: Scene, rng: np.random.Generator, background: float = 0.0
) -> tuple[str, list[int]]:
    """A random caption of the scene and the facts it asserts.

    background: probability that the caption also names the background's texture ("... on a
    grid background"); at 0 (the shipped model's recipe) nothing more is drawn from ``rng``.
    """
    facts: list[int] = []
    phrases: list[str] = []
    scene_only = rng.random() < 0.15
    if not scene_only:
        objs = list(scene.objects)
        if len(objs) > 1 and rng.random() < 0.4:
            objs = [objs[int(rng.integers(len(objs)))]]
        descs: dict[tuple, int] = {}
        for o in objs:
            shape = o.shape if rng.random() < 0.85 else None
            colour = o.colour if (shape is None or rng.random() < 0.7) else None
            size = o.size if rng.random() < 0.3 else None
            pattern = o.pattern if rng.random() < (0.05 if o.pattern == 0 else 0.15) else None
            key = (shape, colour, pattern, size)
            descs[key] = descs.get(key, 0) + 1
            facts.append(object_fact(*key))
        for (shape, colour, pattern, size), count in descs.items():
            words = [SIZES[size]] if size is not None else []
            words += [COLOUR_NAMES[colour]] if colour is not None else []
            words += [PATTERNS[pattern]] if pattern is not None else []
            noun = SHAPES[shape] if shape is not None else str(rng.choice(["shape", "object"]))
            if count > 1:
                noun = noun + "es" if noun.endswith(("s", "x", "ss")) else noun + "s"
                phrases.append(" ".join([NUMBERS[count], *words, noun]))
            else:
                phrase = " ".join([*words, noun])
                phrases.append(f"{_article(phrase)} {phrase}")
    mentioned = {
        name: getattr(scene, name)
        for name in ATTRIBUTES
        if rng.random() < (0.6 if scene_only else 0.35)
    }
    if scene_only and not mentioned:
        name = str(rng.choice(list(ATTRIBUTES)))
        mentioned[name] = getattr(scene, name)
    facts += [scene_fact(name, value) for name, value in mentioned.items()]
    text = _sentence(phrases, mentioned, rng)
    if background and rng.random() < background:
        text = f"{text[:-1]} on a {TEXTURES[scene.texture]} background."
        facts.append(texture_fact(scene.texture))
    return text, facts


def _sentence(phrases: list[str], mentioned: dict[str, int], rng: np.random.Generator) -> str:
    quality = ATTRIBUTES["quality"][mentioned["quality"]] if "quality" in mentioned else None
    head = f"{_article(quality)} {quality} photo" if quality else "a photo"
    if phrases:
        objects = (
            phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        )
        text = f"{head} of {objects}" if rng.random() < 0.7 or quality else objects
    else:
        text = head
    for name in ("lighting", "weather"):
        if name in mentioned:
            value = ATTRIBUTES[name][mentioned[name]]
            text += " " + str(rng.choice(SCENE_PHRASES[name])).format(value)
    return text + "."
