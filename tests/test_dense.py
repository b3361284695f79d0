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


# --- the released code's own formulation ------------------------------------------------------
# Plain restatements of the reference repositories' code paths (facts, not their code):
# wangf3014/SCLIP clip/model.py (custom_attn, interpolate_pos_encoding), mc-lan/ClearCLIP
# open_clip/transformer.py (model_type MaskCLIP / ClearCLIP with ignore_residual=True) and
# sinahmr/NACLIP clip/model.py (attn_strategy naclip, arch "reduced", gaussian_window and
# get_attention_addition). Sequence-first tokens, heads folded into the batch, as they run.


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 (torch's A)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def plain_bicubic(grid: torch.Tensor, out: tuple[int, int], inv: tuple[float, float]):
    """grid [C, g0, g1] -> [C, out0, out1]: output pixel i samples the source at
    (i + 0.5) · inv - 0.5 (align_corners False), taps clamped at the border, one axis at a
    time, in float64 loops."""

    def along(x, n_out, step, axis):
        n_in = x.shape[axis]
        rows = []
        for i in range(n_out):
            src = (i + 0.5) * step - 0.5
            i0 = math.floor(src)
            w = cubic_weights(src - i0)
            acc = 0
            for k in range(4):
                j = min(max(i0 - 1 + k, 0), n_in - 1)
                acc = acc + w[k] * x.select(axis, j)
            rows.append(acc)
        return torch.stack(rows, dim=axis)

    y = along(grid.double(), out[0], inv[0], 1)
    return along(y, out[1], inv[1], 2)


@pytest.mark.parametrize("new", [(6, 9), (3, 5), (7, 7)])
def test_position_rules_against_plain_bicubic(new):
    """exact: source step g / h; sclip (SCLIP clip/model.py:263-281): scale factor
    (h + 0.1) / √N, so the step is √N / (h + 0.1) and the size still h."""
    g, width = 4, 5
    pos = torch.randn(1 + g * g, width, generator=torch.Generator().manual_seed(8))
    grid = pos[1:].reshape(g, g, width).permute(2, 0, 1)
    for rule, inv in (
        ("exact", (g / new[0], g / new[1])),
        ("sclip", (g / (new[0] + 0.1), g / (new[1] + 0.1))),
    ):
        want = plain_bicubic(grid, new, inv).permute(1, 2, 0).reshape(-1, width)
        got = interpolate_positions(pos, (g, g), new, rule)
        assert torch.equal(got[0], pos[0])  # CLS position kept
        assert (got[1:].double() - want).abs().max() <= 1e-5, rule
    exact = interpolate_positions(pos, (g, g), new, "exact")
    sclip = interpolate_positions(pos, (g, g), new, "sclip")
    assert (exact - sclip).abs().max() > 1e-3  # the two rules do differ


def test_sclip_rule_keeps_the_table_when_the_token_count_matches():
    # clip/model.py:239-242 interpolates only when x.shape[1] != positional_embedding.shape[0]
    pos = torch.randn(1 + 16, 3)
    assert interpolate_positions(pos, (4, 4), (2, 8), "sclip") is pos
    assert interpolate_positions(pos, (4, 4), (2, 8), "exact").shape == pos.shape
    with pytest.raises(ClipAdaptError, match="positions='nearest'"):
        dense_features(pos, torch.zeros(1, 3, 8, 8), "csa", positions="nearest")


def naclip_addition(h: int, w: int, std: float) -> torch.Tensor:
    """NACLIP's attention addition: a Gaussian window of (2h-1) x (2w-1) taps, exp of minus
    the squared offsets scaled by 1/(std·√2), convolved ('same' padding) over one-hot images
    of every patch; zero row and column for CLS. -> [1+h*w, 1+h*w]."""
    c = 1 / (std * math.sqrt(2))
    axes = [torch.linspace(-(d - 1) / 2 * c, (d - 1) / 2 * c, d) for d in (2 * h - 1, 2 * w - 1)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*axes, indexing="ij")) ** 2).sum(0))
    onehot = torch.eye(h * w).reshape(h * w, 1, h, w)
    out = F.conv2d(onehot, window[None, None], padding="same").reshape(h * w, h * w)
    full = torch.zeros(1 + h * w, 1 + h * w)
    full[1:, 1:] = out
    return full


def reference_forward(model, x, attention):
    """The reference repositories' forward on [B, 3, H, W], positions by their rule."""
    visual = model.visual
    p = visual.patch_size[0]
    b, _, height, width = x.shape
    h, w = height // p, width // p
    tokens = visual.conv1(x).reshape(b, visual.conv1.out_channels, -1).permute(0, 2, 1)
    cls = visual.class_embedding.expand(b, 1, -1)
    tokens = torch.cat([cls, tokens], dim=1)
    pos = visual.positional_embedding
    if tokens.shape[1] != pos.shape[0]:
        side = math.isqrt(pos.shape[0] - 1)
        grid = pos[1:].reshape(side, side, -1).permute(2, 0, 1)
        inv = (side / (h + 0.1), side / (w + 0.1))
        grid = plain_bicubic(grid, (h, w), inv).float().permute(1, 2, 0).reshape(h * w, -1)
        pos = torch.cat([pos[:1], grid])
    tokens = visual.ln_pre(tokens + pos)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        tokens = block(tokens)  # open_clip's own blocks (batch-first), not under test
    last = blocks[-1]
    xs = tokens.permute(1, 0, 2)  # NLD -> LND, as the references run
    n, bsz, embed = xs.shape
    heads = last.attn.num_heads
    d = embed // heads
    q, k, v = F.linear(last.ln_1(xs), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, -1)
    q, k, v = (t.reshape(n, bsz * heads, d).transpose(0, 1) for t in (q, k, v))
    scale = d**-0.5
    if attention == "csa":  # SCLIP custom_attn(csa=True)
        weights = torch.softmax(q @ q.transpose(1, 2) * scale, -1) + torch.softmax(
            k @ k.transpose(1, 2) * scale, -1
        )
    elif attention == "vanilla":  # SCLIP custom_attn(csa=False): the block's own attention
        weights = torch.softmax((q * scale) @ k.transpose(1, 2), -1)
    elif attention == "clearclip":  # ClearCLIP model_type 'ClearCLIP'
        weights = torch.softmax(q @ q.transpose(1, 2) * scale, -1)
    elif attention == "maskclip":  # ClearCLIP model_type 'MaskCLIP': -inf off the diagonal
        mask = torch.full((n, n), float("-inf")).fill_diagonal_(0)
        weights = torch.softmax(mask.expand(bsz * heads, n, n), -1)
    else:  # NACLIP attn_strategy 'naclip'
        weights = torch.softmax(k @ k.transpose(1, 2) * scale + naclip_addition(h, w, 5.0), -1)
    out = (weights @ v).transpose(0, 1).reshape(n, bsz, embed)
    out = last.attn.out_proj(out)
    if attention in ("csa", "vanilla"):  # SCLIP keeps the residual and the MLP
        xs = xs + out
        xs = xs + last.mlp(last.ln_2(xs))
    else:  # ClearCLIP ignore_residual=True, NACLIP arch 'reduced': attention output only
        xs = out
    feats = visual.ln_post(xs.permute(1, 0, 2)[:, 1:]) @ visual.proj
    return F.normalize(feats, dim=-1).reshape(b, h, w, -1)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("size", [(32, 32), (40, 56)])  # native, and a 5 x 7 grid
def test_each_variant_equals_its_released_code(attention, size, four_head_model):
    model = four_head_model
    if size == (32, 32):
        size = tuple(model.visual.image_size)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = reference_forward(model, x, attention)
        got = dense_features(model, x, attention, positions="sclip")
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5
    if size != tuple(model.visual.image_size):
        with torch.no_grad():
            exact = dense_features(model, x, attention)  # our default rule differs here
        assert (exact - want).abs().max() > 1e-5
