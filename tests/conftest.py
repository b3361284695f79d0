"""Shared fixtures: tiny random-init open_clip architectures, registered offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).parent / "configs"
TINY_VIT = "tiny-test-vit"  # 2-layer ViT, 32 px, patch 8, embed 32
TINY_RN = "tiny-test-rn"  # ModifiedResNet [1,1,1,1], 32 px, embed 32

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))


def _register() -> None:
    import open_clip

    open_clip.add_model_config(CONFIGS)


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
