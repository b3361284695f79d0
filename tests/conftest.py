"""Shared fixtures: tiny random-init open_clip architectures, registered offline."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CONFIGS = Path(__file__).parent / "configs"
TINY_VIT = "tiny-test-vit"  # 2-layer ViT, 32 px, patch 8, embed 32
TINY_RN = "tiny-test-rn"  # ModifiedResNet [1,1,1,1], 32 px, embed 32

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Caches (features, text weights, drawn splits) go to a fresh folder, never the user's.
os.environ["CLIPADAPT_CACHE"] = tempfile.mkdtemp(prefix="clipadapt-test-cache-")
torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))


def _register() -> None:
    from tiny_families import register_configs, register_timm_towers

    register_timm_towers()
    register_configs(CONFIGS)


_register()


@pytest.fixture(scope="session")
def tiny_vit_backbone():
    """A clipadapt Backbone over a random-init tiny ViT (seeded)."""
    import clipadapt as ca

    torch.manual_seed(0)
    return ca.load_backbone(TINY_VIT, pretrained=None)


@pytest.fixture(scope="session")
def tiny_open_clip_model():
    """A bare random-init tiny open_clip ViT CLIP model (seeded), eval mode."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(TINY_VIT, pretrained=None)
    return model.eval()


class Counting:
    """A backbone that counts the images it runs through the image tower."""

    def __init__(self, bb, preprocess=None) -> None:
        self._bb, self.images = bb, 0
        if preprocess is not None:
            self.preprocess = preprocess

    def __getattr__(self, name):
        return getattr(self._bb, name)

    def encode_images(self, x, normalize=True):
        self.images += x.shape[0]
        return self._bb.encode_images(x, normalize)

    def patch_tokens(self, x, layer=-1):
        self.images += x.shape[0]
        return self._bb.patch_tokens(x, layer)

    def encode_images_and_tokens(self, x, layer=-1, normalize=True):
        self.images += x.shape[0]
        return self._bb.encode_images_and_tokens(x, layer, normalize)


def write_colour_dataset(
    folder: Path, name: str, colours: dict, per_split=(5, 2, 4), seed: int = 0
) -> Path:
    """A CoOp-style split json (split_zhou_<name>.json) over 32 px noisy one-colour images,
    one class per entry of ``colours`` (class name -> RGB)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in zip(("train", "val", "test"), per_split, strict=True):
        entries = []
        for label, (cname, rgb) in enumerate(colours.items()):
            for i in range(count):
                rel = f"{cname}/{split}{i}.png"
                pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255)
                (folder / "images" / cname).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / "images" / rel)
                entries.append([rel, label, cname])
        splits[split] = entries
    (folder / f"split_zhou_{name}.json").write_text(json.dumps(splits))
    return folder
