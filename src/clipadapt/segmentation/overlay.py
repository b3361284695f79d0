"""Writing predictions: an index mask PNG and a blended overlay with a legend."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from clipadapt.io import atomic_write

SWATCH = 14  # legend swatch side, pixels


def palette(num_classes: int) -> np.ndarray:
    """Distinct colours [C, 3] uint8 (hues spaced by the golden ratio, deterministic)."""
    colours = []
    for c in range(num_classes):
        hue = (c * 0.618033988749895) % 1.0
        value = 0.95 if c % 2 == 0 else 0.7
        colours.append([round(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.75, value)])
    return np.array(colours, dtype=np.uint8).reshape(-1, 3)


def mask_image(pred: Tensor, num_classes: int) -> Image.Image:
    """Class indices [H, W] -> a palette PNG image (pixel value = class index; 16-bit
    grayscale beyond 256 classes)."""
    indices = pred.cpu().numpy()
    if num_classes > 256:
        return Image.fromarray(indices.astype(np.uint16))
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(palette(num_classes).flatten().tolist())
    return image


UNPAINTED = ("background",)  # classes left as the image shows them (legend: a white swatch)
WHITE = (255, 255, 255)


def _blend(image: Image.Image, indices: np.ndarray, names: Sequence[str], alpha: float):
    """(blended RGB picture, legend entries of the classes present). Pixels of UNPAINTED
    classes, and indices outside the class list (e.g. 255, ignored), keep the image's colour."""
    colours = palette(len(names)).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    painted = np.array([n.split(",")[0].strip().lower() not in UNPAINTED for n in names])
    known = indices < len(names)
    safe = np.where(known, indices, 0)
    paint = known & painted[safe]
    blended = np.where(paint[..., None], (1 - alpha) * base + alpha * colours[safe], base)
    picture = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))
    present = [int(c) for c in np.unique(indices) if c < len(names)]
    entries = [
        (names[c], tuple(int(v) for v in colours[c]) if painted[c] else WHITE) for c in present
    ]
    return picture, entries


def overlay_image(
    image: Image.Image, pred: Tensor, names: Sequence[str], alpha: float = 0.5
) -> Image.Image:
    """Blend class colours over ``image`` and add a legend of the classes present, to the right.
    A class named "background" is left unpainted."""
    picture, entries = _blend(image, pred.cpu().numpy(), names, alpha)
    return _with_legend(picture, entries)


def comparison_image(
    image: Image.Image,
    panels: Sequence[tuple[str, Tensor | np.ndarray]],
    names: Sequence[str],
    alpha: float = 0.5,
    min_side: int = 192,
) -> Image.Image:
    """The image, then one overlay per (title, class-index map) side by side under their titles,
    enlarged (nearest neighbour) to at least ``min_side`` pixels, and one legend for them all."""
    scale = max(1, -(-min_side // min(image.size)))
    font = ImageFont.load_default()
    title_height = 16
    pictures, legend = [("image", image.convert("RGB"))], {}
    for title, indices in panels:
        indices = indices.cpu().numpy() if isinstance(indices, Tensor) else np.asarray(indices)
        picture, entries = _blend(image, indices, names, alpha)
        pictures.append((title, picture))
        legend.update(entries)
    width, height = image.width * scale, image.height * scale
    strip = Image.new("RGB", (len(pictures) * (width + 4), height + title_height), WHITE)
    draw = ImageDraw.Draw(strip)
    for i, (title, picture) in enumerate(pictures):
        x = i * (width + 4)
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
        strip.paste(picture.resize((width, height), Image.NEAREST), (x, title_height))
    order = {name: i for i, name in enumerate(names)}
    return _with_legend(strip, sorted(legend.items(), key=lambda e: order[e[0]]))


def _with_legend(picture: Image.Image, entries: list[tuple[str, tuple[int, ...]]]) -> Image.Image:
    font = ImageFont.load_default()
    line = SWATCH + 6
    text_width = max((int(font.getlength(name)) for name, _ in entries), default=0)
    width = picture.width + SWATCH + text_width + 24
    height = max(picture.height, 8 + line * len(entries))
    canvas = Image.new("RGB", (width, height), WHITE)
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = picture.width + 8
    for row, (name, colour) in enumerate(entries):
        y = 6 + row * line
        draw.rectangle([x, y, x + SWATCH, y + SWATCH], fill=colour, outline=(0, 0, 0))
        draw.text((x + SWATCH + 6, y), name, fill=(0, 0, 0), font=font)
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write ``image`` as PNG atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
