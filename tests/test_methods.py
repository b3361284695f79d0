"""Few-shot methods: each against a plain formulation of its equations, registry and configs,
save/load round trips, and the expected ordering on a synthetic feature-space task."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import clipadapt as ca
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.methods import get, names, parse_hparams
from clipadapt.methods.linear_probe import objective
from clipadapt.methods.tip_adapter import tip_logits

METHODS = ["zero-shot", "linear-probe", "clip-adapter", "tip-adapter", "tip-adapter-f"]
FAST = {  # small training budgets for the round-trip tests
    "zero-shot": {},
    "linear-probe": {"l2_grid": (1e-2, 1e-4), "max_iter": 50},
    "clip-adapter": {"epochs": 3},
    "tip-adapter": {"steps": (20, 5)},
    "tip-adapter-f": {"epochs": 3, "steps": (20, 5)},
}


def synthetic_task(seed=0, classes=10, dim=64, shots=16, views=4, noise=1.1, text_noise=1.1):
    """Class prototypes plus noise; unnormalised embeddings of norm ~10 like CLIP's; the text
    weights (what zero-shot sees) are a perturbed copy of the true prototypes."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)

    def split(per_class, n_views=0):
        labels = torch.arange(classes).repeat_interleave(per_class)
        x = 10 * (protos[labels] + noise * torch.randn(len(labels), dim, generator=g) / dim**0.5)
        v = None
        if n_views:  # augmented views: the same image, jittered
            v = x[None] + 3 * torch.randn(n_views, *x.shape, generator=g) / dim**0.5
        return FeatureSet(x, labels, [f"c{i}" for i in range(classes)], views=v)

    text = F.normalize(
        protos + text_noise * torch.randn(classes, dim, generator=g) / dim**0.5, dim=-1
    )
    return split(shots, views), split(4), split(60), text


def accuracy(method, data):
    return float((method.logits(data).argmax(1) == data.labels).float().mean())


def test_registry_lists_the_methods_and_rejects_unknown_names():
    assert set(METHODS) <= set(names())
    with pytest.raises(ClipAdaptError, match="unknown method 'nope'"):
        get("nope")
    with pytest.raises(ClipAdaptError, match="unknown hyper-parameter 'alfa'"):
        get("tip-adapter", alfa=2.0)
    with pytest.raises(ClipAdaptError, match="ratio"):
        get("clip-adapter", ratio=1.5)


def test_defaults_are_the_published_ones():
    c = get("clip-adapter").config
    assert (c.ratio, c.reduction, c.optimizer, c.lr, c.momentum, c.weight_decay) == (
        0.2,
        4,
        "sgd",
        2e-3,
        0.9,
        5e-4,
    )
    assert (c.batch_size, c.epochs, c.scale) == (32, 200, 100.0)
    t = get("tip-adapter").config
    assert (t.initial(), t.steps) == ((1.17, 1.0), (200, 20))  # ImageNet's config
    f = get("tip-adapter-f").config
    assert (f.optimizer, f.lr, f.eps, f.weight_decay, f.batch_size) == (
        "adamw",
        1e-3,
        1e-4,
        0.01,
        256,
    )
    assert f.resolved_epochs() == 20
    assert get("tip-adapter-f", dataset="eurosat").config.resolved_epochs() == 100


def test_parse_hparams_types_values():
    assert parse_hparams("tip-adapter", ["alpha=2", "steps=10,5", "search=false"]) == {
        "alpha": 2.0,
        "steps": (10, 5),
        "search": False,
    }
    assert parse_hparams("clip-adapter", ["patience=none", "epochs=7"]) == {
        "patience": None,
        "epochs": 7,
    }
    with pytest.raises(ClipAdaptError, match="--hparam 'alfa=2'"):
        parse_hparams("tip-adapter", ["alfa=2"])
    with pytest.raises(ClipAdaptError, match="epochs=x"):
        parse_hparams("clip-adapter", ["epochs=x"])


def test_zero_shot_is_scaled_cosine_similarity():
    train, _, test, text = synthetic_task()
    method = get("zero-shot", scale=50.0).fit(train, text)
    x = test.features
    want = 50.0 * (x / x.norm(dim=-1, keepdim=True)) @ text.T
    torch.testing.assert_close(method.logits(test), want)
    torch.testing.assert_close(method.logits(test.features), want)  # a raw tensor works too


def test_clip_adapter_head_is_the_paper_equation():
    train, _, test, text = synthetic_task()
    method = get("clip-adapter", epochs=2, ratio=0.3).fit(train, text)
    w1 = method.head.fc1.weight.T  # x W1: D -> D/4
    w2 = method.head.fc2.weight.T  # D/4 -> D
    assert w1.shape == (64, 16) and w2.shape == (16, 64)
    x = test.features
    adapted = 0.3 * torch.relu(torch.relu(x @ w1) @ w2) + 0.7 * x  # on the unnormalised x
    want = 100.0 * (adapted / adapted.norm(dim=-1, keepdim=True)) @ text.T
    torch.testing.assert_close(method.logits(test), want, rtol=1e-5, atol=1e-4)
    assert sum(p.numel() for p in method.head.parameters()) == 2 * 64 * 16  # no biases


def test_clip_adapter_keeps_its_last_epoch_unless_told_to_select_on_val():
    train, val, test, text = synthetic_task(classes=20, noise=1.0, text_noise=5.0)
    last = get("clip-adapter", epochs=6, use_views=False).fit(train, text, val=val)
    unseen = get("clip-adapter", epochs=6, use_views=False).fit(train, text)
    assert last.fitted["epoch"] == 6
    torch.testing.assert_close(last.logits(test), unseen.logits(test))  # val did not choose
    assert last.fitted["val_accuracy"] == pytest.approx(accuracy(last, val))  # but reported
    # a validation set on which the untrained adapter looks best: "val" keeps epoch 1
    misleading = FeatureSet(val.features, (val.labels + 1) % 20, val.classnames)
    chosen = get("clip-adapter", epochs=6, use_views=False, select_epoch="val")
    chosen.fit(train, text, val=misleading)
    assert chosen.fitted["epoch"] < 6
    assert chosen.fitted["val_accuracy"] == pytest.approx(accuracy(chosen, misleading))
    assert not torch.equal(chosen.logits(test), last.logits(test))
    with pytest.raises(ClipAdaptError, match="select_epoch='best'"):
        get("clip-adapter", select_epoch="best")


def test_linear_probe_reaches_the_regularised_optimum():
    train, _, _, text = synthetic_task()
    method = get("linear-probe", l2=1e-3).fit(train, text)  # no val: fixed λ
    w = method.weight.clone().requires_grad_(True)
    b = method.bias.clone().requires_grad_(True)
    x = train.features / train.features.norm(dim=-1, keepdim=True)
    loss = objective(x, train.labels, w, b, 1e-3)
    loss.backward()
    assert w.grad.norm() < 1e-4 and b.grad.norm() < 1e-4
    # the independent formulation: mean NLL of the softmax plus (λ/2)‖W‖²
    probs = torch.softmax(x @ w.T + b, dim=1)
    plain = -probs[torch.arange(len(x)), train.labels].log().mean() + 0.5e-3 * (w**2).sum()
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(method.logits(train), x @ method.weight.T + method.bias)


def test_linear_probe_picks_l2_by_validation_accuracy():
    train, val, _, text = synthetic_task()
    grid = (1e-1, 1e-3, 1e-5)
    method = get("linear-probe", l2_grid=grid).fit(train, text, val=val)
    scores = {}
    for l2 in grid:
        m = get("linear-probe", l2=l2, search=False).fit(train, text)
        scores[l2] = accuracy(m, val)
    assert method.fitted["val_accuracy"] == pytest.approx(max(scores.values()))
    assert scores[method.fitted["l2"]] == pytest.approx(max(scores.values()))


def test_tip_adapter_f_trains_keys_and_selects_the_epoch_on_val():
    train, val, test, text = synthetic_task()
    tip = get("tip-adapter").fit(train, text, val=val)
    method = get("tip-adapter-f", epochs=5).fit(train, text)  # no val: the last epoch
    assert method.fitted["epoch"] == 5
    assert not torch.equal(method.keys, tip.keys)  # keys were trained ...
    torch.testing.assert_close(method.keys.norm(dim=-1), tip.keys.norm(dim=-1), atol=0.2, rtol=0)
    assert torch.equal(method.values, tip.values)  # ... values were not
    f = test.features / test.features.norm(dim=-1, keepdim=True)
    want = tip_logits(
        f, method.keys, method.values, text, method.fitted["alpha"], method.fitted["beta"]
    )
    torch.testing.assert_close(method.logits(test), want)

    # with val: the untrained keys (Tip-Adapter, epoch 0) are a candidate; ties keep them
    chosen = set()
    for seed in range(2, 4):  # seed 2: no epoch beats the untrained keys; seed 3: epoch 8 does
        train, val, _, text = synthetic_task(seed=seed, noise=2.0)
        ab = {"alpha": 1.0, "beta": 5.5}  # the seeds below were chosen for these
        picked = get("tip-adapter-f", epochs=30, lr=0.01, **ab).fit(train, text, val=val)
        tip = get("tip-adapter", **ab).fit(train, text)  # unsearched: the initial alpha, beta
        initial = accuracy(tip, val)
        assert picked.fitted["epoch_val_accuracy"] >= initial - 1e-6
        if picked.fitted["epoch_val_accuracy"] == pytest.approx(initial):
            assert picked.fitted["epoch"] == 0 and torch.equal(picked.keys, tip.keys)
        else:
            assert picked.fitted["epoch"] >= 1 and not torch.equal(picked.keys, tip.keys)
        chosen.add(picked.fitted["epoch"] == 0)
    assert chosen == {True, False}


def test_tip_adapter_f_keeps_the_untrained_keys_unless_the_trained_ones_win_after_search():
    train, val, test, text = synthetic_task(seed=4, classes=20, noise=1.0, text_noise=5.0)
    tip = get("tip-adapter").fit(train, text, val=val)  # the untrained keys, searched
    shuffle = torch.randperm(len(tip.keys), generator=torch.Generator().manual_seed(0))
    worse = tip.keys[shuffle]  # each key now under another image's label: worse on val

    def fitted_with(keys):  # a Tip-Adapter-F as fit() leaves it after training and the search
        method = get("tip-adapter-f")
        method.text_weights, method.values, method.keys = tip.text_weights, tip.values, keys
        method.fitted = {"epoch": 7, "epoch_val_accuracy": 0.5}
        method._search(val)
        return method

    beaten = fitted_with(worse)
    assert beaten.fitted["val_accuracy"] < tip.fitted["val_accuracy"]
    beaten._keep_untrained_unless_beaten(tip.keys, val)
    assert beaten.fitted["epoch"] == 0 and beaten.fitted["trained_epoch"] == 7
    assert torch.equal(beaten.keys, tip.keys)
    for key in ("alpha", "beta", "val_accuracy"):
        assert beaten.fitted[key] == tip.fitted[key]
    torch.testing.assert_close(beaten.logits(test), tip.logits(test))

    winner = fitted_with(tip.keys)  # now the untrained keys are the worse ones
    before = dict(winner.fitted)
    winner._keep_untrained_unless_beaten(worse, val)
    assert winner.fitted == before and torch.equal(winner.keys, tip.keys)


def test_tip_adapter_f_head_at_init_is_tip_adapter():
    from clipadapt.methods.tip_adapter import build_cache
    from clipadapt.methods.tip_adapter_f import TipAdapterFHead

    train, _, test, text = synthetic_task()
    keys, values = build_cache(train, 10)
    head = TipAdapterFHead(keys, values, text, alpha=1.0, beta=5.5)
    f = test.features / test.features.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(head(test.features), tip_logits(f, keys, values, text, 1.0, 5.5))


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip_gives_identical_logits(name, tmp_path):
    train, val, test, text = synthetic_task()
    method = get(name, **FAST[name]).fit(train, text, val=val)
    identity = {"name": "tiny-test-vit", "pretrained": None, "weights_sha256": "abc123"}
    method.meta = {"classnames": train.classnames, "templates": ["a {}."], "backbone": identity}
    method.save(tmp_path / "adapter")
    doc = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert doc["method"] == name and doc["meta"]["classnames"] == train.classnames
    assert doc["meta"]["backbone"] == identity
    same = SimpleNamespace(identity=dict(identity), embed_dim=64)
    loaded = ca.load_adapter(tmp_path / "adapter", backbone=same)
    assert type(loaded) is type(method) and loaded.config == method.config
    assert loaded.fitted == method.fitted
    assert torch.equal(loaded.logits(test), method.logits(test))

    other = SimpleNamespace(identity={**identity, "weights_sha256": "fff"}, embed_dim=64)
    with pytest.raises(ClipAdaptError, match="fitted on backbone"):
        ca.load_adapter(tmp_path / "adapter", backbone=other)
    moved = SimpleNamespace(identity={**identity, "pretrained": "/elsewhere/w.pt"}, embed_dim=64)
    ca.load_adapter(tmp_path / "adapter", backbone=moved)  # same weights digest: accepted


def test_load_adapter_errors_name_the_file(tmp_path):
    with pytest.raises(ClipAdaptError, match="config.json: file not found"):
        ca.load_adapter(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ClipAdaptError, match="not a clipadapt adapter"):
        ca.load_adapter(tmp_path)
    train, _, _, text = synthetic_task()
    get("zero-shot").fit(train, text).save(tmp_path)
    save_file({"other": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ClipAdaptError, match="model.safetensors: tensors do not fit"):
        ca.load_adapter(tmp_path)


def test_on_a_synthetic_task_adapters_beat_zero_shot():
    # zero-shot sees badly perturbed prototypes; the few shots are close to the true ones
    train, val, test, text = synthetic_task(classes=20, noise=1.0, text_noise=5.0)
    acc = {
        name: accuracy(get(name).fit(train, text, val=val), test)
        for name in ("zero-shot", "tip-adapter", "tip-adapter-f", "clip-adapter")
    }
    assert acc["zero-shot"] < 0.5  # the task leaves room to adapt
    assert acc["tip-adapter"] >= acc["zero-shot"] + 0.1
    assert acc["tip-adapter-f"] >= acc["tip-adapter"]
    assert acc["clip-adapter"] >= acc["zero-shot"] + 0.1
