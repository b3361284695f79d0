"""ShapesWorld: a procedural world of coloured shapes, deterministic by seed.

Every scene has 1-3 objects (8 shapes x 8 colours x 3 fill patterns x 2 sizes, rotated and
placed at random) on a textured background, and three scene attributes in the spirit of
street-view attributes: lighting (daytime / dusk / night), weather (clear / rainy / foggy /
snowy) and quality (sharp / blurry / noisy). Each scene comes with a per-pixel class mask and a
structured description from which captions are written.

`write_*` functions put datasets on disk in the layouts real data uses (docs/datasets.md): a
CoOp-style split json, a StreetScapes-style CSV set and an mmseg-style segmentation folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "cross", "heart", "arrow"]
COLOURS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "green": (40, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (40, 75, 215),
    "purple": (135, 55, 190),
    "pink": (245, 125, 190),
}
COLOUR_NAMES = list(COLOURS)
PATTERNS = ["solid", "striped", "dotted"]
# Tones of a colour, for the fine-grained `tones` task: the pre-training captions never say
# "light" or "dark", so zero-shot knows the colour but not the tone.
TONES = ["plain", "light", "dark"]
SIZES = ["small", "large"]
ATTRIBUTES = {
    "lighting": ["daytime", "dusk", "night"],
    "weather": ["clear", "rainy", "foggy", "snowy"],
    "quality": ["sharp", "blurry", "noisy"],
}
# One zero-shot template per scene attribute (the StreetScapes protocol uses one per task).
ATTRIBUTE_TEMPLATES = {
    "lighting": "a photo taken at {}.",
    "weather": "a photo in {} weather.",
    "quality": "a {} photo.",
}
# Background textures (Scene.texture), as captions may name them ("on a grid background").
TEXTURES = ["plain", "grainy", "grid", "checkered"]
BACKGROUNDS = [
    (128, 128, 128),
    (200, 195, 180),
    (70, 75, 85),
    (150, 140, 120),
    (215, 215, 215),
    (95, 105, 95),
    (165, 160, 170),
    (110, 95, 85),
]


@dataclass
class Obj:
    shape: int
    colour: int
    pattern: int
    size: int
    cx: float  # centre, fraction of the image side
    cy: float
    radius: float  # fraction of the image side
    angle: float  # degrees
    tone: int = 0  # index into TONES


@dataclass
class Scene:
    objects: list[Obj]
    lighting: int
    weather: int
    quality: int
    background: int
    texture: int
    seed: int
    extra: dict = field(default_factory=dict)
    exposure: float = 1.0  # camera gain on the rendered scene (1: as lit)


# ---------------------------------------------------------------------------------- sampling


def sample_scene(
    rng: np.random.Generator,
    n_objects: tuple[int, int] = (1, 3),
    shape: int | None = None,
    colour: int | None = None,
    pattern: int | None = None,
    attrs: dict[str, int] | None = None,
    size_range: tuple[float, float] = (0.13, 0.34),
    tone: int = 0,
) -> Scene:
    """Draw a scene; fixed values (shape, colour, pattern, tone, attrs) apply to the first
    object (the others are plain)."""
    n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    objects: list[Obj] = []
    for i in range(n):
        small = rng.random() < 0.5
        lo, hi = size_range
        mid = (lo + hi) / 2
        radius = rng.uniform(lo, mid) if small else rng.uniform(mid, hi)
        if n > 1:
            radius *= 0.8
        for _ in range(20):  # keep objects mostly apart
            cx, cy = rng.uniform(radius, 1 - radius, size=2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > 0.8 * (radius + o.radius) for o in objects):
                break
        objects.append(
            Obj(
                shape=int(rng.integers(len(SHAPES))) if shape is None or i else shape,
                colour=int(rng.integers(len(COLOURS))) if colour is None or i else colour,
                pattern=int(rng.integers(len(PATTERNS))) if pattern is None or i else pattern,
                size=0 if small else 1,
                cx=float(cx),
                cy=float(cy),
                radius=float(radius),
                angle=float(rng.uniform(-25, 25)),
                tone=0 if i else tone,
            )
        )
    attrs = attrs or {}
    values = {k: attrs.get(k, int(rng.integers(len(v)))) for k, v in ATTRIBUTES.items()}
    return Scene(
        objects=objects,
        background=int(rng.integers(len(BACKGROUNDS))),
        texture=int(rng.integers(len(TEXTURES))),
        seed=int(rng.integers(2**31)),
        **values,
    )


# ---------------------------------------------------------------------------------- drawing


def _star(k: int, inner: float) -> list[tuple[float, float]]:
    return [
        (
            (1 if i % 2 == 0 else inner) * math.sin(math.pi * i / k),
            -(1 if i % 2 == 0 else inner) * math.cos(math.pi * i / k),
        )
        for i in range(2 * k)
    ]


def _polygon(name: str) -> list[tuple[float, float]]:
    """Unit outline of a shape, centred at 0, radius about 1."""
    if name == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if name == "triangle":
        return [(0, -1), (0.95, 0.75), (-0.95, 0.75)]
    if name == "star":
        return _star(5, 0.45)
    if name == "hexagon":
        return [(math.cos(math.pi * i / 3), math.sin(math.pi * i / 3)) for i in range(6)]
    if name == "cross":
        a, b = 0.32, 0.95
        return [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    if name == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17, -y / 17 + 0.1))
        return pts
    if name == "arrow":
        return [
            (-0.95, -0.3),
            (0.15, -0.3),
            (0.15, -0.7),
            (0.95, 0),
            (0.15, 0.7),
            (0.15, 0.3),
            (-0.95, 0.3),
        ]
    raise ValueError(name)


_UNIT = {name: _polygon(name) for name in SHAPES if name != "circle"}


def _object_mask(obj: Obj, size: int, ss: int = 2) -> np.ndarray:
    """Anti-aliased [size, size] float mask of one object, supersampled ss times."""
    side = size * ss
    im = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(im)
    cx, cy, r = obj.cx * side, obj.cy * side, obj.radius * side
    if SHAPES[obj.shape] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        a = math.radians(obj.angle)
        ca, sa = math.cos(a), math.sin(a)
        pts = [
            (cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca))
            for x, y in _UNIT[SHAPES[obj.shape]]
        ]
        draw.polygon(pts, fill=255)
    im = im.resize((size, size), Image.BOX)
    return np.asarray(im, dtype=np.float32) / 255.0


def _pattern(obj: Obj, size: int) -> np.ndarray:
    """[size, size] in {0,1}: where the fill pattern darkens the object."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = max(3.0, obj.radius * size / 2.2)
    name = PATTERNS[obj.pattern]
    if name == "striped":
        a = math.radians(obj.angle + 45)
        u = xx * math.cos(a) + yy * math.sin(a)
        return ((u / period) % 1.0 < 0.45).astype(np.float32)
    if name == "dotted":
        gx = (xx / period) % 1.0 - 0.5
        gy = (yy / period) % 1.0 - 0.5
        return ((gx**2 + gy**2) < 0.09).astype(np.float32)
    return np.zeros((size, size), np.float32)


def _background(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUNDS[scene.background], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = base[None, None, :] * (0.85 + 0.3 * yy[..., None] * rng.uniform(-1, 1))
    t = scene.texture
    if t == 1:  # grain
        img = img + rng.normal(0, 10, (size, size, 1))
    elif t == 2:  # grid
        step = rng.integers(6, 14) * size / 64
        grid = ((xx * size) % step < 1) | ((yy * size) % step < 1)
        img = img + grid[..., None] * rng.choice([-25.0, 25.0])
    elif t == 3:  # soft checker
        step = rng.integers(8, 20) * size / 64
        chk = (((xx * size) // step + (yy * size) // step) % 2)[..., None]
        img = img + (chk - 0.5) * 18
    return img


def instance_masks(scene: Scene, size: int = 64) -> np.ndarray:
    """[len(objects), size, size] float: the visible share of each pixel that each object
    covers, later objects occluding earlier ones as `render` paints them (1 - the sum over
    objects is the background's share)."""
    visible = np.zeros((len(scene.objects), size, size), np.float32)
    for i, obj in enumerate(scene.objects):
        m = _object_mask(obj, size)
        visible[:i] *= 1 - m
        visible[i] = m
    return visible


def render(scene: Scene, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The scene as an RGB uint8 image [size, size, 3] and a class mask [size, size].

    Mask values: 0 background, 1 + shape index where an object covers at least half a pixel.
    """
    rng = np.random.default_rng(scene.seed)
    img = _background(scene, size, rng)
    mask = np.zeros((size, size), np.uint8)
    for obj in scene.objects:
        m = _object_mask(obj, size)
        colour = object_rgb(obj)
        shade = 1.0 - 0.55 * _pattern(obj, size)
        fill = colour[None, None, :] * shade[..., None]
        img = img * (1 - m[..., None]) + fill * m[..., None]
        mask[m >= 0.5] = obj.shape + 1
    img = _lighting(img, ATTRIBUTES["lighting"][scene.lighting], rng)
    img = _weather(img, ATTRIBUTES["weather"][scene.weather], rng)
    if scene.exposure != 1.0:
        img = img * np.float32(scene.exposure)
    img = np.clip(img, 0, 255)
    return _quality(img, ATTRIBUTES["quality"][scene.quality], rng), mask


def object_rgb(obj: Obj) -> np.ndarray:
    """The object's fill colour: its colour, lightened or darkened by its tone."""
    rgb = np.array(COLOURS[COLOUR_NAMES[obj.colour]], np.float32)
    if TONES[obj.tone] == "light":
        return 0.5 * rgb + 127.0
    if TONES[obj.tone] == "dark":
        return 0.5 * rgb
    return rgb


def _lighting(img: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    if name == "dusk":
        return img * np.array([1.0, 0.78, 0.6], np.float32) * 0.85 + np.array(
            [30, 10, 0], np.float32
        )
    if name == "night":
        return img * np.array([0.45, 0.48, 0.62], np.float32)
    return img


def _weather(img: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    if name == "foggy":
        return img * 0.5 + 0.5 * np.array([205, 205, 210], np.float32)
    if name == "rainy":
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        for _ in range(int(size * 0.6)):
            x, y = rng.uniform(0, size, 2)
            dx = size * 0.04
            draw.line([(x, y), (x - dx, y + 3 * dx)], fill=160, width=1)
        streak = np.asarray(layer, np.float32)[..., None] / 255.0
        return img * (1 - streak) + 190 * streak
    if name == "snowy":
        flakes = rng.random((size, size)) < 0.035
        img = img * 0.9 + 20
        img[flakes] = 250
        return img
    return img


def _quality(img: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    out = img.astype(np.uint8)
    if name == "blurry":
        radius = 1.3 * img.shape[0] / 64
        return np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius)))
    if name == "noisy":
        return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    return out
