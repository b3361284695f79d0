"""The pre-training script's region loss: targets from the world's masks, pooled features."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipadapt.data import shapesworld as sw
from clipadapt.data import shapesworld_text as st

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny_shapes.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pretrain_tiny_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_region_targets_cover_the_image_and_name_only_true_facts(script):
    rng = np.random.default_rng(5)
    for _ in range(30):
        scene = sw.sample_scene(rng)
        cover, facts, phrases, asserted = script.region_targets(scene, rng, 64, 8)
        assert cover.shape[1] == 64 and len(cover) == len(facts) == len(phrases)
        assert len(cover) <= len(scene.objects) + 1
        assert (cover >= 0).all() and (cover.sum(0) <= 1 + 1e-5).all()
        if len(cover) == len(scene.objects) + 1:  # nothing dropped: every patch fully shared
            np.testing.assert_allclose(cover.sum(0), 1.0, atol=1e-5)
        for f, phrase, fact in zip(facts, phrases, asserted, strict=True):
            assert f[fact], phrase  # the phrase's fact holds for its own region
            is_bg = "background" in phrase
            assert f[script.BACKGROUND_FACT] == is_bg
            assert not is_bg or f[st.texture_fact(scene.texture)]


def test_a_region_phrase_is_false_for_the_other_objects(script):
    scene = sw.Scene(
        objects=[
            sw.Obj(0, 0, 0, 1, 0.3, 0.3, 0.2, 0.0),  # red circle
            sw.Obj(1, 5, 0, 1, 0.7, 0.7, 0.2, 0.0),  # blue square
        ],
        lighting=0,
        weather=0,
        quality=0,
        background=0,
        texture=2,
        seed=1,
    )
    cover, facts, phrases, asserted = script.region_targets(scene, np.random.default_rng(0), 64, 8)
    assert len(cover) == 3 and "background" in phrases[2]
    assert cover[0].reshape(8, 8)[2, 2] > 0.9 and cover[1].reshape(8, 8)[5, 5] > 0.9
    for i, fact in enumerate(asserted):
        assert [bool(facts[j, fact]) for j in range(3)] == [j == i for j in range(3)], phrases[i]


def test_region_embedding_is_the_coverage_weighted_mean_of_normalised_patches(script):
    torch.manual_seed(0)
    open_clip.add_model_config(script.ASSETS)
    model = open_clip.create_model("tiny-shapes", pretrained=None)
    grid = model.visual.grid_size
    last_input = torch.randn(2, 1 + grid[0] * grid[1], model.visual.conv1.out_channels)
    cover = torch.rand(3, grid[0] * grid[1])
    owner = torch.tensor([0, 1, 1])
    got = script.region_embedding(model, last_input, "maskclip", cover, owner)
    # plain: the value path of the last block, ln_post, projection, per patch; then pool
    block = model.visual.transformer.resblocks[-1]
    width = last_input.shape[-1]
    v = F.linear(block.ln_1(last_input), block.attn.in_proj_weight, block.attn.in_proj_bias)
    v = v[..., 2 * width :]
    feats = model.visual.ln_post(block.attn.out_proj(v)[:, 1:]) @ model.visual.proj
    feats = feats / feats.norm(dim=-1, keepdim=True)
    want = torch.stack([(cover[r, :, None] * feats[owner[r]]).sum(0) for r in range(3)])
    want = want / want.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
