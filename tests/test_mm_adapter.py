"""Multi-Modal Adapter: the batched forward against a literal per-image formulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipadapt import methods
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.methods import load_adapter
from clipadapt.methods.mm_adapter import MMAdapterHead


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _head(text, mask="bias", blend=0.2, seed=0, **kw) -> MMAdapterHead:
    """A head whose every parameter (biases included) is random, not the zero-bias init."""
    torch.manual_seed(seed)
    head = MMAdapterHead(text, blend=blend, mask=mask, scale=50.0, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return head.eval()


def reference_logits(head: MMAdapterHead, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One image at a time: the (C + 1)-token sequence [t_1..t_C, v_b] through Down,
    nn.MultiheadAttention with the pattern as its attn_mask, Up, then the paper's blend."""
    c, lam, s = len(text), head.blend, head.scale
    if head.mask == "bias":  # +1 on text->image and image->text scores
        attn_mask = torch.zeros(c + 1, c + 1)
        attn_mask[:c, c] = 1.0
        attn_mask[c, :c] = 1.0
    else:  # True = not allowed: texts see only the image, the image only the texts
        attn_mask = torch.ones(c + 1, c + 1, dtype=torch.bool)
        attn_mask[:c, c] = False
        attn_mask[c, :c] = False
    rows = []
    for b in range(len(x)):
        v = F.normalize(x[b], dim=-1)
        seq = torch.cat([text, v[None]])  # [C + 1, D]
        z = head.down(seq)[None]
        o, _ = head.attn(z, z, z, attn_mask=attn_mask, need_weights=True)
        out = head.up(o[0])  # [C + 1, D]
        v2 = F.normalize((1 - lam) * v + lam * F.normalize(out[c], dim=-1), dim=-1)
        t2 = F.normalize((1 - lam) * text + lam * F.normalize(out[:c], dim=-1), dim=-1)
        rows.append(s * t2 @ v2)
    return torch.stack(rows)


@pytest.mark.parametrize("mask", ["bias", "hard"])
@pytest.mark.parametrize("blend", [0.2, 0.7])
def test_batched_forward_matches_per_image_attention(mask, blend):
    text, x = (
        _unit(9, 48, seed=1),
        3.0 * torch.randn(6, 48, generator=torch.Generator().manual_seed(2)),
    )
    head = _head(text, mask=mask, blend=blend, hidden=8, width=16, heads=4)
    with torch.no_grad():
        got = head(x)
        want = reference_logits(head, x, text)
        # another class set in the sequence (novel classes): same adapter, C' = 5
        other = _unit(5, 48, seed=3)
        got_other, want_other = head(x, other), reference_logits(head, x, other)
    assert got.shape == (6, 9) and got_other.shape == (6, 5)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(got_other, want_other, atol=2e-4, rtol=1e-5)
    assert not torch.allclose(got, 50.0 * F.normalize(x, dim=-1) @ text.T, atol=1e-2)


def test_gradients_match_per_image_formulation():
    text, x = _unit(7, 32, seed=4), torch.randn(5, 32, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 3, 6, 1, 1])
    head = _head(text, hidden=8, width=16, heads=2)
    grads = []
    for fn in (lambda: head(x), lambda: reference_logits(head, x, text)):
        head.zero_grad()
        F.cross_entropy(fn(), labels).backward()
        grads.append([p.grad.clone() for p in head.parameters()])
    for g_batched, g_ref in zip(*grads, strict=True):
        torch.testing.assert_close(g_batched, g_ref, atol=1e-4, rtol=1e-3)


def test_memory_order_has_no_batch_by_class_by_embedding_tensor():
    """Every tensor autograd keeps is at most B·C·d elements (here B·C·D is 4x that)."""
    b, c, dim, width = 16, 12, 512, 128
    head = _head(_unit(c, dim, seed=6))
    x = torch.randn(b, dim, generator=torch.Generator().manual_seed(7))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        head(x).sum().backward()
    assert max(sizes) <= b * c * width < b * c * dim


def test_parameter_count_at_512():
    method = methods.get("mm-adapter")
    head = method._head(_unit(10, 512, seed=8))
    assert sum(p.numel() for p in head.parameters()) == 107_712
    assert [p.numel() for p in head.parameters() if p.ndim == 2][:2] == [512 * 32, 32 * 128]


@pytest.mark.parametrize("mask", ["bias", "hard"])
def test_blend_zero_is_exactly_zero_shot(mask):
    text = _unit(11, 64, seed=9)
    x = 2.0 * torch.randn(20, 64, generator=torch.Generator().manual_seed(10))
    zero_shot = methods.get("zero-shot", scale=50.0).fit(None, text)
    mm = methods.get("mm-adapter", blend=0.0, mask=mask, scale=50.0)
    mm.head = _head(text, mask=mask, blend=0.0, seed=11)  # random, far from zero, adapter
    assert torch.equal(mm.logits(x), zero_shot.logits(x))
    other = _unit(4, 64, seed=12)
    assert torch.equal(mm.logits(x, other), zero_shot.fit(None, other).logits(x))


def _toy(n_per_class: int, seed: int, text: torch.Tensor) -> FeatureSet:
    """Image embeddings near their class text with a class-specific offset (so zero-shot is
    imperfect and an adapter has something to learn)."""
    g = torch.Generator().manual_seed(seed)
    c, d = text.shape
    offset = torch.randn(c, d, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(c).repeat_interleave(n_per_class)
    feats = text[labels] + 0.3 * offset[labels] + 0.1 * torch.randn(len(labels), d, generator=g)
    return FeatureSet(features=feats, labels=labels, classnames=[f"c{i}" for i in range(c)])


def test_fit_improves_on_zero_shot_and_round_trips(tmp_path):
    text = _unit(6, 32, seed=13)
    train, val, test = _toy(16, 14, text), _toy(16, 15, text), _toy(30, 16, text)
    method = methods.get(
        "mm-adapter", hidden=8, width=16, heads=2, epochs=40, patience=10, scale=20.0
    )
    method.fit(train, text, val=val)
    zs = methods.get("zero-shot", scale=20.0).fit(None, text)

    def acc(m):
        return float((m.logits(test).argmax(1) == test.labels).float().mean())

    assert 1 <= method.fitted["epoch"] <= 40
    assert acc(method) > acc(zs) + 0.1  # about 0.99 against 0.84
    method.save(tmp_path / "mm")
    loaded = load_adapter(tmp_path / "mm")
    assert loaded.config == method.config
    assert torch.equal(loaded.logits(test), method.logits(test))
    again = methods.get(
        "mm-adapter", hidden=8, width=16, heads=2, epochs=40, patience=10, scale=20.0
    ).fit(train, text, val=val)
    assert torch.equal(again.logits(test), method.logits(test))  # seeded


def test_config_and_input_errors():
    with pytest.raises(ClipAdaptError, match="mask"):
        methods.get("mm-adapter", mask="soft")
    with pytest.raises(ClipAdaptError, match="divisible"):
        methods.get("mm-adapter", width=30, heads=4)
    with pytest.raises(ClipAdaptError, match="blend"):
        methods.get("mm-adapter", blend=1.5)
    method = methods.get("mm-adapter")
    with pytest.raises(ClipAdaptError, match="fit"):
        method.logits(torch.randn(2, 8))
    with pytest.raises(ClipAdaptError, match="L2-normalised"):
        method.fit(_toy(2, 0, _unit(3, 8, seed=0)), 3.0 * _unit(3, 8, seed=0))
