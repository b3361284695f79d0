"""Tip-Adapter: logits against the paper's equation, the fast search against the naive loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipadapt.features.featureset import FeatureSet
from clipadapt.methods import get
from clipadapt.methods.tip_adapter import (
    build_cache,
    grid_correct_counts,
    search_hparams,
    search_range,
    tip_logits,
)


def plain_tip_logits(feats, keys, values, text, alpha, beta, scale):
    """Term by term in float64: s·cos(f, w_c) + α Σ_m exp(-β (1 - cos(f, k_m))) · values[m, c]."""
    f, k, v, w = (t.double() for t in (feats, keys, values, text))
    out = torch.zeros(len(f), len(w), dtype=torch.float64)
    for n in range(len(f)):
        for c in range(len(w)):
            cache = sum(torch.exp(-beta * (1 - f[n] @ k[m])) * v[m, c] for m in range(len(k)))
            out[n, c] = scale * (f[n] @ w[c]) + alpha * cache
    return out


def naive_search(feats, labels, keys, values, text, beta_max, alpha_max, steps, scale):
    """The published loop: every grid point recomputes the logits; the first maximiser wins."""
    best, counts = (-1, None, None), []
    for i in range(steps[0]):
        beta = 0.1 + i * (beta_max - 0.1) / steps[0]
        for j in range(steps[1]):
            alpha = 0.1 + j * (alpha_max - 0.1) / steps[1]
            logits = tip_logits(feats, keys, values, text, alpha, beta, scale)
            correct = int((logits.argmax(dim=1) == labels).sum())
            counts.append(correct)
            if correct > best[0]:
                best = (correct, beta, alpha)
    return (best[1], best[2], best[0] / len(labels)), counts


def task(seed, classes=6, shots=4, n=60, dim=16, duplicate_class=False):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    key_labels = torch.arange(classes).repeat_interleave(shots)
    keys = F.normalize(
        protos[key_labels] + 0.4 * torch.randn(len(key_labels), dim, generator=g), dim=-1
    )
    text = F.normalize(protos + 0.8 * torch.randn(classes, dim, generator=g), dim=-1)
    if duplicate_class:  # class 1 is an exact copy of class 0: every row has a tied maximum
        text[1] = text[0]
        keys[shots : 2 * shots] = keys[:shots]
    labels = torch.randint(classes, (n,), generator=g)
    feats = F.normalize(protos[labels] + 0.4 * torch.randn(n, dim, generator=g), dim=-1)
    return feats, labels, keys, key_labels, text, g


@pytest.mark.parametrize("layout", ["grouped-one-hot", "shuffled-one-hot", "soft"])
def test_tip_logits_match_the_equation(layout):
    feats, _, keys, key_labels, text, g = task(0, n=7)
    values = F.one_hot(key_labels, text.shape[0]).float()
    if layout == "shuffled-one-hot":
        values = values[torch.randperm(len(values), generator=g)]
    elif layout == "soft":
        values = torch.rand(values.shape, generator=g)
    got = tip_logits(feats, keys, values, text, alpha=1.7, beta=5.5, scale=100.0)
    want = plain_tip_logits(feats, keys, values, text, 1.7, 5.5, 100.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "seed, layout, steps",
    [(2, "one-hot", (200, 20)), (0, "one-hot", (40, 10)), (1, "soft", (40, 10))],
)
def test_search_equals_naive_loop_at_every_grid_point(seed, layout, steps):
    feats, labels, keys, key_labels, text, g = task(seed, duplicate_class=seed == 2)
    values = F.one_hot(key_labels, text.shape[0]).float()
    if layout == "soft":
        values = torch.rand(values.shape, generator=g)
    # scale 30 (not 100) so that the cache term moves predictions on this small task
    want, naive_counts = naive_search(feats, labels, keys, values, text, 12.0, 5.0, steps, 30.0)
    assert search_hparams(feats, labels, keys, values, text, 12.0, 5.0, steps, 30.0) == want
    betas = [0.1 + i * (12.0 - 0.1) / steps[0] for i in range(steps[0])]
    alphas = [0.1 + j * (5.0 - 0.1) / steps[1] for j in range(steps[1])]
    counts = grid_correct_counts(feats, labels, keys, values, text, betas, alphas, 30.0)
    assert counts.flatten().tolist() == naive_counts
    assert len(set(naive_counts)) >= 3  # the grid is not flat: the test can tell points apart


def test_ties_pick_the_first_maximiser_beta_outer_alpha_inner():
    # Text weights alone decide every prediction when the cache is orthogonal to the features,
    # so all 4,000 points tie: the answer must be the very first one.
    feats = torch.eye(4)[:, :4]
    keys = -torch.eye(4)
    values = torch.eye(4)
    text = torch.eye(4)
    labels = torch.arange(4)
    beta, alpha, acc = search_hparams(feats, labels, keys, values, text, 7.0, 3.0)
    assert (beta, alpha, acc) == (0.1, 0.1, 1.0)


def test_tied_logits_within_a_row_follow_argmax():
    feats, labels, keys, key_labels, text, _ = task(3, duplicate_class=True)
    labels[:10] = 1  # class 1 ties with class 0 and is never the first maximiser
    values = F.one_hot(key_labels, text.shape[0]).float()
    betas, alphas = [1.0, 5.5], [0.5, 1.0, 3.0]
    counts = grid_correct_counts(feats, labels, keys, values, text, betas, alphas)
    for i, beta in enumerate(betas):
        for j, alpha in enumerate(alphas):
            logits = tip_logits(feats, keys, values, text, alpha, beta)
            assert int(counts[i, j]) == int((logits.argmax(1) == labels).sum())


def test_search_ranges_per_dataset():
    assert search_range("caltech-101") == (12.0, 5.0)
    assert search_range("Caltech101") == (12.0, 5.0)
    assert search_range("oxford_flowers") == (50.0, 50.0)
    assert search_range("fgvc_aircraft") == (30.0, 30.0)
    assert search_range("shapesworld") == (7.0, 3.0)
    assert search_range(None) == (7.0, 3.0)


def test_cache_is_the_normalised_mean_of_unnormalised_views():
    g = torch.Generator().manual_seed(0)
    views = torch.randn(10, 6, 8, generator=g) * 5  # A=10 views of 6 images
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    fs = FeatureSet(views[0], labels, ["a", "b", "c"], views=views)
    keys, values = build_cache(fs, 3)
    order = [1, 3, 2, 5, 0, 4]  # by class, stable
    want = views.mean(0)[order]
    torch.testing.assert_close(keys, want / want.norm(dim=-1, keepdim=True))
    assert torch.equal(values, F.one_hot(labels[order], 3).float())


def test_method_fit_searches_on_val_and_uses_the_optimum():
    feats, labels, keys, key_labels, text, g = task(4, n=40)
    train = FeatureSet(keys * 3.0, key_labels, list("abcdef"), views=(keys * 3.0)[None])
    val = FeatureSet(feats * 2.0, labels, list("abcdef"))
    method = get("tip-adapter", dataset="caltech-101").fit(train, text, val=val)
    values = F.one_hot(key_labels, 6).float()
    beta, alpha, acc = search_hparams(feats, labels, keys, values, text, 12.0, 5.0)
    assert (method.fitted["beta"], method.fitted["alpha"]) == (beta, alpha)
    assert method.fitted["val_accuracy"] == acc
    torch.testing.assert_close(
        method.logits(val), tip_logits(feats, keys, values, text, alpha, beta)
    )
    unsearched = get("tip-adapter").fit(train, text)
    assert (unsearched.fitted["alpha"], unsearched.fitted["beta"]) == (1.17, 1.0)  # ImageNet's
