"""Dense (per-patch) CLIP features for training-free segmentation.

Every variant runs the ViT unchanged up to its last block and only rewrites that block,
reusing its trained weights (SCLIP, Wang, Mei & Yuille, ECCV 2024, and its peers):

- ``vanilla``:   the unmodified block.
- ``csa``:       SCLIP's correlative self-attention, A = softmax(q qᵀ/√d) + softmax(k kᵀ/√d)
                 (rows sum to 2), out-projection, residual and MLP kept.
- ``clearclip``: softmax(q qᵀ/√d) v, out-projection; residual and MLP dropped.
- ``naclip``:    softmax(k kᵀ/√d + G) v with G a Gaussian neighbourhood bias (σ = 5 patches);
                 residual and MLP dropped.
- ``maskclip``:  the value path only, out_proj(v); residual and MLP dropped.

Each rewrite equals its authors' released block (wangf3014/SCLIP clip/model.py:249-251,
283-313; mc-lan/ClearCLIP open_clip/transformer.py:523-527, 589-622 with ignore_residual;
sinahmr/NACLIP clip/model.py:118-119, 153-232, arch "reduced"); tests/test_dense.py checks
each against a plain formulation of that code.

Then ln_post and the projection on every token, CLS dropped, each patch L2-normalised.
Positional embeddings are interpolated bicubically when the patch grid differs from the model's:
``positions="exact"`` (default) resizes them to the patch grid; ``positions="sclip"`` is the
rule of the SCLIP / ClearCLIP / NACLIP code, a bicubic ``scale_factor`` of (grid + 0.1) / √N
(N the native patch count), whose sampling positions differ slightly from the exact resize's,
applied only when the token count differs from the native one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.backbones.modes import ATTENTIONS, POSITION_RULES
from clipadapt.errors import ClipAdaptError

NACLIP_SIGMA = 5.0  # patches


@torch.no_grad()
def dense_features(bb, x: Tensor, attention: str = "csa", positions: str = "exact") -> Tensor:
    """Per-patch embeddings in the joint space.

    bb: a Backbone (uses ``bb.model``) or a bare open_clip CLIP model with a ViT visual tower.
    x: [B, 3, H, W] normalised images; H and W need not be the model's input size.
    positions: how the position embedding follows another patch grid, "exact" or "sclip"
        (the reference code's rule; see the module docstring).
    Returns [B, h, w, D] L2-normalised patch embeddings, h = H // patch, w = W // patch.
    """
    if attention not in ATTENTIONS:
        raise ClipAdaptError(f"attention={attention!r}: expected one of {', '.join(ATTENTIONS)}")
    check_positions(positions)
    visual = _vit(getattr(bb, "model", bb))
    weight = visual.conv1.weight
    tokens, grid = _embed(visual, x.to(weight.device, weight.dtype), positions)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        tokens = _run_block(block, tokens)
    tokens = _last_block(blocks[-1], tokens, attention, grid)
    tokens = visual.ln_post(tokens[:, 1:])
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    feats = F.normalize(tokens.float(), dim=-1)
    return feats.reshape(x.shape[0], grid[0], grid[1], -1)


def supports_dense(bb) -> bool:
    """Whether ``dense_features`` runs on this backbone (or bare model)."""
    try:
        _vit(getattr(bb, "model", bb))
    except ClipAdaptError:
        return False
    return True


def _vit(model: nn.Module) -> nn.Module:
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual if visual is not None else model).__name__
        raise ClipAdaptError(
            f"dense features: got a {kind} image tower; expected an open_clip ViT "
            "(ResNets and transformers models are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None or not all(
        isinstance(b, ResidualAttentionBlock) for b in visual.transformer.resblocks
    ):
        raise ClipAdaptError(
            "dense features: expected a plain open_clip ViT (standard attention blocks, "
            "no attentional pooler)"
        )
    return visual


def check_positions(positions: str) -> str:
    if positions not in POSITION_RULES:
        raise ClipAdaptError(
            f"positions={positions!r}: expected one of {', '.join(POSITION_RULES)}"
        )
    return positions


def _embed(visual: nn.Module, x: Tensor, positions: str = "exact") -> tuple[Tensor, tuple]:
    """Patchify, prepend CLS, add (interpolated) positions, ln_pre. -> ([B, 1+h*w, W], (h, w))."""
    patches = visual.conv1(x)  # [B, W, h, w]
    grid = (patches.shape[2], patches.shape[3])
    patches = patches.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
    tokens = torch.cat([cls, patches], dim=1)
    pos = interpolate_positions(visual.positional_embedding, visual.grid_size, grid, positions)
    tokens = tokens + pos.to(tokens.dtype)
    return visual.ln_pre(tokens), grid


def interpolate_positions(
    pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], rule: str = "exact"
):
    """Bicubic resize of the patch positions; CLS position kept. [1+g0*g1, W] -> [1+h*w, W].

    rule "exact": resized to ``new_grid``, sampling at (i + 0.5) · g / h - 0.5.
    rule "sclip": the SCLIP code's rule (clip/model.py:239-242, 263-281; the same in ClearCLIP
    and NACLIP): unchanged when h·w equals the native patch count, else a bicubic
    ``scale_factor`` of (h + 0.1) / √N per axis, sampling at (i + 0.5) · √N / (h + 0.1) - 0.5
    (needs a square native grid)."""
    if rule == "sclip":
        if new_grid[0] * new_grid[1] == old_grid[0] * old_grid[1]:
            return pos
        if old_grid[0] != old_grid[1]:
            raise ClipAdaptError(f"positions='sclip': expects a square grid, got {old_grid}")
    elif tuple(old_grid) == tuple(new_grid):
        return pos
    cls, grid = pos[:1], pos[1:]
    width = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    if rule == "sclip":
        side = old_grid[0]
        factor = ((new_grid[0] + 0.1) / side, (new_grid[1] + 0.1) / side)
        grid = F.interpolate(
            grid.float(),
            scale_factor=factor,
            mode="bicubic",
            align_corners=False,
            recompute_scale_factor=False,
        )
        if tuple(grid.shape[-2:]) != tuple(new_grid):  # the reference asserts the same
            raise ClipAdaptError(f"positions='sclip': grid {tuple(grid.shape[-2:])} != {new_grid}")
    else:
        grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, width).to(pos.dtype)
    return torch.cat([cls, grid], dim=0)


def _run_block(block: nn.Module, tokens: Tensor) -> Tensor:
    """An unmodified block on batch-first tokens (older open_clip blocks are sequence-first)."""
    if block.attn.batch_first:
        return block(tokens)
    return block(tokens.transpose(0, 1)).transpose(0, 1)


def _heads(t: Tensor, n_heads: int) -> Tensor:
    """[B, N, W] -> [B, heads, N, W / heads]."""
    b, n, w = t.shape
    return t.reshape(b, n, n_heads, w // n_heads).transpose(1, 2)


def _last_block(block: nn.Module, x: Tensor, attention: str, grid: tuple[int, int]) -> Tensor:
    """The rewritten last block on batch-first tokens [B, N, W] -> [B, N, W]."""
    if attention == "vanilla":
        return _run_block(block, x)
    attn: nn.MultiheadAttention = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (_heads(t, attn.num_heads) for t in (q, k, v))
    if attention == "csa":
        o = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    elif attention == "clearclip":
        o = F.scaled_dot_product_attention(q, q, v)
    elif attention == "naclip":
        bias = gaussian_bias(grid, NACLIP_SIGMA, x.device).to(k.dtype)
        o = F.scaled_dot_product_attention(k, k, v, attn_mask=bias)
    else:  # maskclip
        o = v
    o = attn.out_proj(o.transpose(1, 2).flatten(2))
    if attention != "csa":
        return o
    x = x + block.ls_1(o)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def gaussian_bias(grid: tuple[int, int], sigma: float, device=None) -> Tensor:
    """NACLIP's neighbourhood bias: exp(-‖p_i - p_j‖² / 2σ²) between patch positions (in
    patches), 0 wherever the CLS token is involved. -> [1+h*w, 1+h*w]."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    d2 = torch.cdist(pos, pos).square()
    bias = torch.zeros(1 + h * w, 1 + h * w)
    bias[1:, 1:] = torch.exp(-d2 / (2 * sigma * sigma))
    return bias.to(device)


def patch_size(bb) -> int:
    """The ViT's patch side in pixels."""
    size = _vit(getattr(bb, "model", bb)).patch_size
    return int(size[0] if isinstance(size, tuple | list) else size)
