"""The shared training loop: views per epoch, schedule, model selection, early stop, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.train import BatchProvider, TrainConfig, lr_factor, train


def toy(n=40, dim=8, classes=4, views=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.randn(n, dim, generator=g) + 3 * nn.functional.one_hot(labels, dim).float()
    v = x[None] + 0.5 * torch.randn(views, n, dim, generator=g) if views else None
    return FeatureSet(x, labels, [str(i) for i in range(classes)], views=v)


def linear(dim=8, classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(dim, classes)


def test_each_epoch_draws_one_augmented_view_per_sample():
    n, v = 30, 5
    # view k of sample i holds the number 1000 k + i, so a batch says which view it drew
    views = (1000 * torch.arange(v)[:, None] + torch.arange(n)[None]).float()[..., None]
    data = FeatureSet(
        torch.full((n, 1), -1.0), torch.zeros(n, dtype=torch.long), ["a"], views=views
    )
    provider = BatchProvider(data, 8, torch.Generator().manual_seed(0), torch.device("cpu"))
    drawn = []
    for _ in range(20):
        rows, picks = [], []
        for batch in provider.epoch():
            value = batch.features[:, 0].long()
            assert torch.equal(value % 1000, batch.index)  # the view belongs to that sample
            rows.append(batch.index)
            picks.append(value // 1000)
        assert sorted(torch.cat(rows).tolist()) == list(range(n))  # each sample once per epoch
        drawn.append(torch.cat(picks))
    drawn = torch.stack(drawn)
    assert set(drawn.flatten().tolist()) == set(range(v))  # every view gets used ...
    assert len({tuple(d.tolist()) for d in drawn}) == 20  # ... differently each epoch


def test_without_views_the_eval_features_are_used():
    data = toy(views=0)
    provider = BatchProvider(data, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    for batch in provider.epoch():
        assert torch.equal(batch.features, data.features[batch.index])
    data = toy(views=3)
    provider = BatchProvider(data, 16, torch.Generator(), torch.device("cpu"), use_views=False)
    for batch in provider.epoch():
        assert torch.equal(batch.features, data.features[batch.index])


def test_lr_follows_linear_warmup_then_cosine_per_iteration():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup) == pytest.approx(0.1)
    assert lr_factor(9, total, warmup) == pytest.approx(1.0)
    assert lr_factor(10, total, warmup) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup) == pytest.approx(0.5)
    assert lr_factor(99, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))

    model = linear()
    data = toy()  # 40 samples, batch 8: 5 iterations per epoch
    # after epoch e the scheduler has taken 5 e steps
    config = TrainConfig(epochs=4, batch_size=8, lr=0.1, warmup_epochs=1, optimizer="sgd")
    result = train(model, data, config)
    assert [round(h["lr"], 6) for h in result.history] == [
        round(0.1 * lr_factor(5 * e, 20, 5), 6) for e in (1, 2, 3, 4)
    ]
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_keeps_the_best_state_by_validation_score_and_stops_early():
    model = linear()
    scores = iter([0.2, 0.6, 0.4, 0.6, 0.5, 0.3, 0.9])
    snapshots = []

    def evaluate(module):
        snapshots.append(module.weight.detach().clone())
        return next(scores)

    config = TrainConfig(epochs=7, batch_size=8, patience=3, optimizer="adam", lr=0.05)
    result = train(model, toy(), config, evaluate=evaluate)
    assert result.best_epoch == 2 and result.best_score == 0.6  # ties keep the earlier epoch
    assert len(result.history) == 5  # epochs 3, 4, 5 without improvement: stop
    assert torch.equal(model.weight, snapshots[1])


def test_score_initial_keeps_the_untrained_module_unless_an_epoch_beats_it():
    scores = iter([0.7, 0.6, 0.7, 0.5])  # epoch 0 (before training), then epochs 1-3
    model = linear()
    initial = model.weight.detach().clone()
    config = TrainConfig(epochs=3, batch_size=8, optimizer="adam", lr=0.05)
    result = train(model, toy(), config, evaluate=lambda m: next(scores), score_initial=True)
    assert (result.best_epoch, result.best_score) == (0, 0.7)  # a tie keeps the earlier
    assert torch.equal(model.weight, initial)
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]

    scores = iter([0.5, 0.6, 0.4, 0.4])
    result = train(linear(), toy(), config, evaluate=lambda m: next(scores), score_initial=True)
    assert result.best_epoch == 1


def test_fit_threads_set_and_restore_torch_threads(monkeypatch):
    import clipadapt.train as training

    monkeypatch.setattr(training, "_fit_threads", None)
    before = torch.get_num_threads()
    with training.fit_threads():
        assert torch.get_num_threads() == before  # none chosen: unchanged
    training.set_fit_threads(1)
    with training.fit_threads():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ClipAdaptError, match="--fit-threads 0"):
        training.set_fit_threads(0)


def test_default_evaluation_is_validation_accuracy():
    data, val = toy(seed=0), toy(seed=1, views=0)
    model = linear()
    result = train(model, data, TrainConfig(epochs=5, batch_size=8), val=val)
    acc = float((model(val.features).argmax(1) == val.labels).float().mean())
    assert acc == pytest.approx(result.best_score)
    assert result.best_score == max(h["val"] for h in result.history)


def test_training_learns_and_is_deterministic_by_seed():
    data, val = toy(seed=0), toy(seed=1, views=0)
    results = []
    for seed in (1, 1, 2):
        model = linear(seed=0)
        train(model, data, TrainConfig(epochs=5, batch_size=8, lr=0.05, seed=seed))
        results.append(model.weight.detach().clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])
    assert float((model(val.features).argmax(1) == val.labels).float().mean()) > 0.9


def test_global_rng_is_untouched():
    state = torch.get_rng_state()
    train(linear(), toy(), TrainConfig(epochs=2, batch_size=8))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_optimizers(name):
    model = linear()
    before = model.weight.detach().clone()
    train(model, toy(), TrainConfig(epochs=1, batch_size=8, optimizer=name))
    assert not torch.equal(before, model.weight)


def test_bad_config_is_a_user_error():
    with pytest.raises(ClipAdaptError, match="optimizer='lbfgs'"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ClipAdaptError, match="epochs=0"):
        TrainConfig(epochs=0)
