"""The embedded tiny-shapes CLIP: loads offline through the local-file path; zero-shot floors on
freshly generated ShapesWorld data (a seed the pre-training never saw)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import clipadapt as ca
from clipadapt.data import shapesworld as sw

N = 200  # held-out images per task
SEED = 20261122


@pytest.fixture(scope="module")
def tiny():
    return ca.load_backbone("tiny-shapes")


def _zero_shot(bb, scenes, labels, names, template) -> float:
    images = torch.stack([bb.preprocess(Image.fromarray(sw.render(s, 64)[0])) for s in scenes])
    weights = bb.text_classifier(names, [template])
    pred = (bb.encode_images(images) @ weights.T).argmax(1)
    return float((pred == torch.as_tensor(labels)).float().mean())


def _task(bb, name: str) -> tuple[float, int]:
    rng = np.random.default_rng([SEED, sum(map(ord, name))])
    if name in sw.ATTRIBUTES:
        names = sw.ATTRIBUTES[name]
        labels = rng.integers(len(names), size=N)
        scenes = [sw.sample_scene(rng, attrs={name: int(y)}) for y in labels]
        return _zero_shot(bb, scenes, labels, names, sw.ATTRIBUTE_TEMPLATES[name]), len(names)
    names = sw.SHAPES if name == "shape" else sw.COLOUR_NAMES
    labels = rng.integers(len(names), size=N)
    scenes = [sw.sample_scene(rng, n_objects=(1, 1), **{name: int(y)}) for y in labels]
    template = "a photo of a {}." if name == "shape" else "a photo of a {} object."
    return _zero_shot(bb, scenes, labels, names, template), len(names)


def test_loads_offline_through_the_file_path(tiny):
    assert tiny.identity["name"] == "tiny-shapes" and len(tiny.identity["weights_sha256"]) == 64
    assert tiny.embed_dim == 128 and tiny.image_size == 64
    x = torch.stack([tiny.preprocess(Image.new("RGB", (64, 64), (200, 40, 40)))])
    f = tiny.encode_images(x)
    assert f.shape == (1, 128) and torch.allclose(f.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_colour_floor(tiny):
    acc, _ = _task(tiny, "colour")
    assert acc >= 0.95, acc


@pytest.mark.parametrize("attribute", sorted(sw.ATTRIBUTES))
def test_scene_attributes_clearly_above_chance(tiny, attribute):
    acc, classes = _task(tiny, attribute)
    assert acc >= 1.0 / classes + 0.15, (attribute, acc)


def test_shape_floor(tiny):
    acc, _ = _task(tiny, "shape")
    assert acc >= 0.75, acc
