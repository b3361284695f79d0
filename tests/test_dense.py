"""Dense features: each last-block variant against a plain per-head formulation of its equations."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipadapt.backbones.dense import ATTENTIONS, dense_features, interpolate_positions
from clipadapt.errors import ClipAdaptError


@pytest.fixture(scope="module")
def four_head_model(tmp_path_factory):
    """A 3-block ViT with 4 heads of width 8, 24 px, patch 4 (random init, seeded)."""
    folder = tmp_path_factory.mktemp("configs")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 24,
            "layers": 3,
            "width": 32,
            "head_width": 8,
            "patch_size": 4,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    (folder / "tiny-test-vit4.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    torch.manual_seed(1)
    return open_clip.create_model("tiny-test-vit4", pretrained=None).eval()


def last_block_input(model, x):
    """The residual stream entering the last block, captured from open_clip's own forward."""
    captured = {}
    block = model.visual.transformer.resblocks[-1]
    handle = block.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model.visual(x)
    handle.remove()
    return captured["x"]  # batch-first in open_clip >= 2.24


def plain_last_block(model, x, attention):
    """The paper equations, one image and one head at a time. x [B, N, W] -> [B, h*w, D]."""
    visual = model.visual
    block = visual.transformer.resblocks[-1]
    heads = block.attn.num_heads
    width = x.shape[-1]
    d = width // heads
    wq, wk, wv = block.attn.in_proj_weight.split(width)
    bq, bk, bv = block.attn.in_proj_bias.split(width)
    n_tokens = x.shape[1]
    side = math.isqrt(n_tokens - 1)
    out = []
    for b in range(x.shape[0]):
        h = block.ln_1(x[b])
        q, k, v = h @ wq.T + bq, h @ wk.T + bk, h @ wv.T + bv
        per_head = []
        for i in range(heads):
            qi, ki, vi = (t[:, i * d : (i + 1) * d] for t in (q, k, v))
            if attention == "csa":
                a = torch.softmax(qi @ qi.T / math.sqrt(d), -1) + torch.softmax(
                    ki @ ki.T / math.sqrt(d), -1
                )
            elif attention == "clearclip":
                a = torch.softmax(qi @ qi.T / math.sqrt(d), -1)
            elif attention == "naclip":
                bias = torch.zeros(n_tokens, n_tokens)
                for p in range(n_tokens - 1):
                    for r in range(n_tokens - 1):
                        dy, dx = p // side - r // side, p % side - r % side
                        bias[p + 1, r + 1] = math.exp(-(dy * dy + dx * dx) / (2 * 5.0**2))
                a = torch.softmax(ki @ ki.T / math.sqrt(d) + bias, -1)
            else:  # maskclip
                a = torch.eye(n_tokens)
            per_head.append(a @ vi)
        o = torch.cat(per_head, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
        if attention == "csa":
            y = x[b] + o
            y = y + block.mlp(block.ln_2(y))
        else:
            y = o
        y = visual.ln_post(y[1:]) @ visual.proj
        out.append(F.normalize(y, dim=-1))
    return torch.stack(out)


@pytest.mark.parametrize("attention", ["csa", "clearclip", "naclip", "maskclip"])
@pytest.mark.parametrize("which", ["tiny", "four_heads"])
def test_last_block_matches_plain_per_head_loop(
    attention, which, tiny_open_clip_model, four_head_model
):
    model = tiny_open_clip_model if which == "tiny" else four_head_model
    size = model.visual.image_size[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = plain_last_block(model, last_block_input(model, x), attention)
    got = dense_features(model, x, attention)
    grid = model.visual.grid_size
    assert got.shape == (2, grid[0], grid[1], model.visual.output_dim)
    assert (got.reshape(2, -1, got.shape[-1]) - expected).abs().max() <= 1e-4
    assert torch.allclose(got.norm(dim=-1), torch.ones(()), atol=1e-5)


def test_variants_differ(tiny_open_clip_model):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outs = {a: dense_features(tiny_open_clip_model, x, a) for a in ATTENTIONS}
    for a in ATTENTIONS:
        for b in ATTENTIONS:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)


def test_vanilla_equals_open_clip_tokens(tiny_open_clip_model):
    model = tiny_open_clip_model
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model.visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = model.visual(x)
    finally:
        model.visual.output_tokens = False
    expected = F.normalize(tokens @ model.visual.proj, dim=-1)
    got = dense_features(model, x, "vanilla").reshape(2, -1, expected.shape[-1])
    assert (got - expected).abs().max() <= 1e-5


def test_interpolated_positions_follow_open_clip_layout(tiny_open_clip_model):
    """A non-square input: our bicubic interpolation + embedding must equal open_clip's own
    forward on a copy of the model whose position table was resized (row-major grid)."""
    import copy

    model = tiny_open_clip_model
    x = torch.randn(1, 3, 48, 72, generator=torch.Generator().manual_seed(5))  # grid 6 x 9
    other = copy.deepcopy(model)
    pos = model.visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 9), mode="bicubic", align_corners=False)
    table = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(54, -1)])
    other.visual.positional_embedding = torch.nn.Parameter(table)
    other.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = other.visual(x)
    expected = F.normalize(tokens @ other.visual.proj, dim=-1).reshape(1, 6, 9, -1)
    got = dense_features(model, x, "vanilla")
    assert got.shape == (1, 6, 9, 32)
    assert (got - expected).abs().max() <= 1e-5


def test_interpolate_positions_identity_and_cls():
    pos = torch.randn(1 + 16, 8)
    assert interpolate_positions(pos, (4, 4), (4, 4)) is pos
    resized = interpolate_positions(pos, (4, 4), (3, 7))
    assert resized.shape == (1 + 21, 8)
    assert torch.equal(resized[0], pos[0])


def test_resnet_and_unknown_attention_are_user_errors(tiny_open_clip_model):
    torch.manual_seed(0)
    rn = open_clip.create_model("tiny-test-rn", pretrained=None).eval()
    with pytest.raises(ClipAdaptError, match="ModifiedResNet"):
        dense_features(rn, torch.randn(1, 3, 32, 32), "csa")
    with pytest.raises(ClipAdaptError, match="attention='sclip'"):
        dense_features(tiny_open_clip_model, torch.randn(1, 3, 32, 32), "sclip")


def test_backbone_method_delegates(tiny_vit_backbone):
    x = torch.randn(1, 3, 40, 32, generator=torch.Generator().manual_seed(6))
    got = tiny_vit_backbone.dense_features(x)
    assert got.shape == (1, 5, 4, tiny_vit_backbone.embed_dim)
    assert torch.equal(got, dense_features(tiny_vit_backbone.model, x, "csa"))
