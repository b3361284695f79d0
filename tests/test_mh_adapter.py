"""CLIP-MHAdapter: the paper's equations, parameter count, token caching per view, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import clipadapt as ca
from clipadapt.data.dataset import ClassificationDataset, Item
from clipadapt.errors import ClipAdaptError
from clipadapt.features import extract
from clipadapt.features.featureset import FeatureSet
from clipadapt.methods.mh_adapter import (
    MHAdapterConfig,
    MultiTaskMHAdapter,
    build_head,
    count_parameters,
    inverse_frequency,
)
from clipadapt.train import BatchProvider


def plain_logits(head, tokens, x):
    """The adapter written out from its weights: MLP, LayerNorm, per-head softmax attention,
    mean over tokens, blend, cosine classifier."""
    t = head.trunk
    h = F.relu(tokens @ t.down.weight.T + t.down.bias)
    h = F.relu(h @ t.up.weight.T + t.up.bias)
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    h = (h - mu) / torch.sqrt(var + t.norm.eps) * t.norm.weight + t.norm.bias
    d_model = h.shape[-1]
    heads = t.attn.num_heads
    d = d_model // heads
    wq, wk, wv = t.attn.in_proj_weight.split(d_model)
    bq, bk, bv = t.attn.in_proj_bias.split(d_model)
    q, k, v = h @ wq.T + bq, h @ wk.T + bk, h @ wv.T + bv
    outs = []
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(a @ v[..., sl])
    o = torch.cat(outs, -1) @ t.attn.out_proj.weight.T + t.attn.out_proj.bias
    g = o.mean(dim=1)
    f = head.ratio * g + (1 - head.ratio) * x
    f = f / f.norm(dim=-1, keepdim=True)
    return head.scale * f @ head.text_weights.T


@pytest.mark.parametrize("heads,ratio", [(1, 0.2), (4, 0.8), (8, 0.5)])
def test_adapter_matches_plain_formulation(heads, ratio):
    g = torch.Generator().manual_seed(heads)
    tokens = torch.randn(3, 7, 24, generator=g)
    x = torch.randn(3, 16, generator=g)
    text = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    config = MHAdapterConfig(heads=heads, hidden=10, ratio=ratio, scale=37.0)
    head = build_head(config, 24, text, seed=3).eval()
    for p in head.parameters():  # move off the init (zero biases, unit LayerNorm)
        p.data += 0.1 * torch.randn(p.shape, generator=g)
    got = head(tokens.half(), x)  # tokens arrive from the cache in fp16
    want = plain_logits(head, tokens.half().float(), x)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dropout_acts_in_training_only():
    text = F.normalize(torch.randn(4, 16), dim=-1)
    head = build_head(MHAdapterConfig(heads=2, hidden=8, dropout=0.5), 12, text, seed=0)
    tokens, x = torch.randn(2, 5, 12), torch.randn(2, 16)
    head.train()
    assert not torch.allclose(head(tokens, x), head(tokens, x))
    head.eval()
    torch.testing.assert_close(head(tokens, x), plain_logits(head, tokens, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("heads", [4, 8, 16])
def test_parameter_count_on_vit_b16_widths(heads):
    # ViT-B/16: 768-wide tokens -> 256 -> 512 = D
    head = build_head(MHAdapterConfig(heads=heads), 768, torch.zeros(3, 512), seed=0)
    assert count_parameters(head) == 1_380_096
    assert head.trunk.down.weight.shape == (256, 768)
    assert head.trunk.up.weight.shape == (512, 256)


def test_widths_follow_the_backbone_and_config():
    w, hidden, d = 128, 40, 96
    head = build_head(MHAdapterConfig(heads=4, hidden=hidden), w, torch.zeros(2, d), seed=0)
    formula = (w * hidden + hidden) + (hidden * d + d) + 2 * d + (4 * d * d + 4 * d)
    assert count_parameters(head) == formula
    with pytest.raises(ClipAdaptError, match="divisible"):
        build_head(MHAdapterConfig(heads=5), w, torch.zeros(2, d), seed=0)


def test_seeded_init_does_not_touch_the_global_generator():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_head(MHAdapterConfig(heads=2, hidden=8), 12, torch.zeros(3, 16), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_head(MHAdapterConfig(heads=2, hidden=8), 12, torch.zeros(3, 16), seed=5)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka


def test_inverse_frequency_weights():
    w = inverse_frequency(torch.tensor([0, 0, 0, 1]), 3)
    torch.testing.assert_close(w, torch.tensor([4 / 9, 4 / 3, 1.0]))


def test_batches_pair_each_view_embedding_with_the_same_views_tokens():
    n, v = 20, 3
    code = (1000 * torch.arange(v)[:, None] + torch.arange(n)[None]).float()  # [V, N]
    data = FeatureSet(
        features=torch.full((n, 2), -1.0),
        labels=torch.zeros(n, dtype=torch.long),
        classnames=["a"],
        views=code[..., None].expand(v, n, 2).clone(),
        tokens=torch.full((n, 4, 3), -1.0).half(),
        view_tokens=code[..., None, None].expand(v, n, 4, 3).half(),
    )
    provider = BatchProvider(data, 8, torch.Generator().manual_seed(0), torch.device("cpu"))
    seen = set()
    for _ in range(3):
        for batch in provider.epoch():
            drawn = batch.features[:, 0]
            assert torch.equal(batch.tokens[:, 0, 0].float(), drawn)
            assert torch.equal(drawn.long() % 1000, batch.index)
            seen |= set((drawn.long() // 1000).tolist())
    assert seen == set(range(v))
    off = BatchProvider(data, 8, torch.Generator(), torch.device("cpu"), use_views=False)
    for batch in off.epoch():  # no views: the eval tokens
        assert (batch.tokens == -1).all()


def synthetic(n, tasks=1, seed=0, t=6, w=12, d=16):
    """Labels readable from the tokens only (x is noise): class c shifts token channel c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n, tasks), generator=g)
    tokens = 0.3 * torch.randn(n, t, w, generator=g)
    for k in range(tasks):
        tokens[torch.arange(n), :, 3 * k + labels[:, k]] += 2.0
    x = torch.randn(n, d, generator=g)
    return FeatureSet(
        x, labels[:, 0] if tasks == 1 else labels, ["a", "b", "c"], tokens=tokens.half()
    )


def test_fit_learns_from_the_tokens_and_round_trips(tmp_path):
    train, val, test = synthetic(96, seed=0), synthetic(24, seed=1), synthetic(60, seed=2)
    text = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(9)), dim=-1)
    method = ca.methods.get(
        "mh-adapter",
        heads=4,
        hidden=16,
        ratio=0.8,
        epochs=40,
        warmup_epochs=2,
        batch_size=32,
        lr=5e-3,
        scale=30.0,
        class_weights=True,
    )
    method.fit(train, text, val=val)
    acc = (method.logits(test).argmax(1) == test.labels).float().mean().item()
    zero_shot = ((test.features @ text.T).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.9 > zero_shot + 0.3
    assert method.fitted["val_accuracy"] is not None and 1 <= method.fitted["epoch"] <= 40
    method.save(tmp_path / "mh")
    loaded = ca.load_adapter(tmp_path / "mh")
    torch.testing.assert_close(loaded.logits(test), method.logits(test))


def test_logits_need_patch_tokens():
    method = ca.methods.get("mh-adapter", heads=2, hidden=8, epochs=1)
    data = synthetic(8)
    method.fit(data, F.normalize(torch.randn(3, 16), dim=-1))
    with pytest.raises(ClipAdaptError, match="patch tokens"):
        method.logits(data.features)
    with pytest.raises(ClipAdaptError, match="patch tokens"):
        method.fit(FeatureSet(data.features, data.labels, ["a", "b", "c"]), torch.zeros(3, 16))


def test_multitask_shares_one_trunk_and_learns_every_task():
    train, val, test = (synthetic(n, tasks=2, seed=s) for n, s in ((96, 0), (24, 1), (60, 2)))
    train.labels[:30, 1] = -1  # images without a label for task 1
    g = torch.Generator().manual_seed(4)
    texts = [F.normalize(torch.randn(3, 16, generator=g), dim=-1) for _ in range(2)]
    mt = MultiTaskMHAdapter(
        heads=4,
        hidden=16,
        ratio=0.8,
        epochs=40,
        warmup_epochs=2,
        batch_size=32,
        lr=5e-3,
        scale=30.0,
    )
    mt.fit(train, texts, val=val)
    logits = mt.logits(test)
    assert [tuple(x.shape) for x in logits] == [(60, 3), (60, 3)]
    for t in range(2):
        assert (logits[t].argmax(1) == test.labels[:, t]).float().mean() > 0.9
    # task t's logits are the single-task head's with that task's classifier, same trunk
    f = F.normalize(mt.head.blend(test.tokens, test.features), dim=-1)
    torch.testing.assert_close(logits[1], 30.0 * f @ texts[1].T, atol=1e-4, rtol=1e-4)
    with pytest.raises(ClipAdaptError, match="one column per task"):
        mt.fit(synthetic(8), texts)


def test_extract_caches_tokens_of_every_view(tiny_vit_backbone, tmp_path):
    from PIL import Image

    bb = tiny_vit_backbone
    paths = []
    for i in range(5):
        img = Image.effect_noise((40, 36), 60 + 20 * i).convert("RGB")
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    ds = ClassificationDataset("toy", str(tmp_path), [Item(p, 0, "a") for p in paths], ["a"])
    method = ca.methods.get("mh-adapter")
    options = method.extract_options(train=True)
    assert options == {"tokens_layer": -2, "views": 4, "view_tokens": True}
    options["views"] = 2
    fs = extract(bb, ds, **options, num_workers=0, progress=False, cache_dir=tmp_path / "c")
    x = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in paths])
    want = bb.patch_tokens(x, layer=-2)
    assert fs.tokens.dtype == torch.float16 and fs.tokens.shape == want.shape == (5, 16, 64)
    torch.testing.assert_close(fs.tokens.float(), want, atol=2e-2, rtol=1e-2)
    assert fs.view_tokens.shape == (2, 5, 16, 64) and fs.views.shape == (2, 5, 32)
    assert not torch.allclose(fs.view_tokens[0].float(), fs.tokens.float(), atol=1e-2)
    again = extract(bb, ds, **options, num_workers=0, progress=False, cache_dir=tmp_path / "c")
    assert torch.equal(again.view_tokens, fs.view_tokens)  # read back from the cache
    plain = extract(bb, ds, views=2, tokens_layer=-2, num_workers=0, progress=False)
    assert plain.view_tokens is None  # only on request
