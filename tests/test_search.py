"""The chunked grid search over cached affinities against a plain per-point formulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipadapt.errors import ClipAdaptError
from clipadapt.methods import search
from clipadapt.methods.tip_adapter import grid_correct_counts, search_grid, search_hparams


def plain_search(feats, labels, keys, values, text, betas, alphas, scale, layout):
    """Each grid point from scratch, as the reference's loop does: the logits
    s·f Wᵀ + (exp(-β (1 - f keysᵀ)) values)·α, the first argmax, the count; then the best point
    by `acc > best_acc` from best_acc = 0, β outer, α inner."""
    n, c = feats.shape[0], text.shape[0]
    counts = []
    best, best_beta, best_alpha = 0, 0.0, 0.0
    for beta in betas:
        for alpha in alphas:
            sharp = torch.exp(-beta * (1.0 - feats @ keys.T))
            if layout == "grouped":  # class c's keys are the K consecutive columns c·K...
                cache = sharp.view(n, c, -1).sum(dim=-1)
            elif layout == "shuffled":  # one-hot in any order: add the keys one by one
                cache = torch.zeros(n, c)
                for m, cls in enumerate(values.argmax(dim=1).tolist()):
                    cache[:, cls] += sharp[:, m]
            else:
                cache = sharp @ values
            logits = scale * (feats @ text.T) + cache * alpha
            correct = int((logits.argmax(dim=1) == labels).sum())
            counts.append(correct)
            if correct > best:
                best, best_beta, best_alpha = correct, beta, alpha
    return (best_beta, best_alpha, best / n), counts


def task(seed, classes=7, shots=3, n=150, dim=12, tie=False):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    key_labels = torch.arange(classes).repeat_interleave(shots)
    keys = F.normalize(
        protos[key_labels] + 0.5 * torch.randn(len(key_labels), dim, generator=g), dim=-1
    )
    text = F.normalize(protos + 0.9 * torch.randn(classes, dim, generator=g), dim=-1)
    if tie:  # class 1 copies class 0: rows tie within the row at every grid point
        text[1] = text[0]
        keys[shots : 2 * shots] = keys[:shots]
    labels = torch.randint(classes, (n,), generator=g)
    feats = F.normalize(protos[labels] + 0.5 * torch.randn(n, dim, generator=g), dim=-1)
    return feats, labels, keys, key_labels, text, g


@pytest.mark.parametrize(
    "seed, layout, tie",
    [(0, "grouped", False), (1, "grouped", True), (2, "shuffled", True), (3, "soft", False)],
)
@pytest.mark.parametrize("chunk_rows", [None, 40, 33])
def test_chunked_search_equals_the_plain_loop_bit_for_bit(seed, layout, tie, chunk_rows):
    feats, labels, keys, key_labels, text, g = task(seed, tie=tie)
    values = F.one_hot(key_labels, text.shape[0]).float()
    if layout == "shuffled":
        perm = torch.randperm(len(keys), generator=g)
        keys, values = keys[perm], values[perm]
    elif layout == "soft":
        values = torch.rand(values.shape, generator=g)
    betas, alphas = search_grid(9.0, 4.0, (25, 8))
    per_row = search.search_bytes_per_row(len(keys), text.shape[0], len(alphas))
    budget = search.DEFAULT_BUDGET if chunk_rows is None else -(-chunk_rows * per_row * 4 // 3)
    want, want_counts = plain_search(feats, labels, keys, values, text, betas, alphas, 20.0, layout)
    counts = grid_correct_counts(
        feats, labels, keys, values, text, betas, alphas, 20.0, budget=budget
    )
    assert counts.flatten().tolist() == want_counts
    assert len(set(want_counts)) >= 3  # the grid is not flat: points can be told apart
    got = search_hparams(feats, labels, keys, values, text, 9.0, 4.0, (25, 8), 20.0, budget=budget)
    assert got == want


def test_chunks_stay_under_the_budget_and_cover_every_row():
    feats, labels, keys, key_labels, text, _ = task(4, n=301)
    values = F.one_hot(key_labels, text.shape[0]).float()
    per_row = search.search_bytes_per_row(len(keys), text.shape[0], 5)
    seen = []

    def base(f):
        seen.append(f.shape[0])
        return 30.0 * (f @ text.T)

    search.affinity_grid_counts(
        feats,
        labels,
        keys,
        base,
        lambda kernel, i: kernel @ values,
        [1.0, 2.0],
        [0.5] * 5,
        num_classes=text.shape[0],
        budget=-(-50 * per_row * 4 // 3),
    )
    assert sum(seen) == 301 and max(seen) <= 50 and min(seen) >= max(seen) - 1


def test_row_chunks_at_imagenet_size_fit_one_gib():
    per_row = search.search_bytes_per_row(16_000, 1_000, 20)
    chunks = search.row_chunks(50_000, per_row)
    sizes = [c.stop - c.start for c in chunks]
    assert sum(sizes) == 50_000 and chunks[0].start == 0 and chunks[-1].stop == 50_000
    assert all(a.stop == b.start for a, b in zip(chunks[:-1], chunks[1:], strict=True))
    assert max(sizes) * per_row <= search.usable_bytes(1 << 30) < 1 << 30
    assert len(chunks) == -(-50_000 * per_row // search.usable_bytes(1 << 30))  # fewest that fit


def test_a_budget_below_the_minimum_chunk_is_refused():
    with pytest.raises(ClipAdaptError, match="budget 1000 bytes"):
        search.row_chunks(100, 1000, budget=1000)
    assert search.row_chunks(3, 1000, budget=4000) == [slice(0, 3)]  # all rows fit: fine


def test_scaled_add_correct_settles_ties_like_argmax():
    g = torch.Generator().manual_seed(5)
    base = torch.randint(0, 3, (200, 6), generator=g).float()
    extra = torch.randint(0, 3, (200, 6), generator=g).float()
    labels = torch.randint(0, 6, (200,), generator=g)
    alphas = torch.tensor([0.0, 0.5, 1.0, 2.0])
    got = search.scaled_add_correct(base, extra, labels, alphas)
    want = [int(((extra * float(a) + base).argmax(1) == labels).sum()) for a in alphas]
    assert got.tolist() == want


def test_no_correct_point_keeps_the_references_initial_beta_alpha():
    feats, labels, keys, key_labels, text, _ = task(6, classes=2, n=20)
    labels = 1 - (30.0 * feats @ text.T).argmax(1)  # wrong for zero-shot ...
    values = F.one_hot(key_labels, 2).float()
    keys = -keys  # ... and the cache pushes the same way: no point gets a row right
    counts = grid_correct_counts(feats, labels, keys, values, text, [0.1, 1.0], [0.1, 0.5], 30.0)
    assert int(counts.max()) == 0
    assert search_hparams(feats, labels, keys, values, text, 2.0, 1.0, (2, 2), 30.0) == (
        0.0,
        0.0,
        0.0,
    )
