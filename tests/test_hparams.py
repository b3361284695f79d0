"""Hyper-parameters: help on every field, one training base, --hparam errors and --help-hparams,
method hooks (novel_logits), Tip-Adapter's α and β as attributes, one registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from clipadapt import cli, methods
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.hparams import TrainHParams, describe, field_help
from clipadapt.methods.mh_adapter import MultiTaskMHAdapter
from clipadapt.train import TrainConfig


def test_every_config_field_of_every_method_has_help():
    for name in methods.names():
        config = methods.get_class(name).Config
        missing = [f.name for f in dataclasses.fields(config) if not field_help(config, f.name)]
        assert not missing, f"{name}: no help for {missing}"


def test_trainable_methods_share_the_training_base_and_keep_their_defaults():
    shared = {f.name for f in dataclasses.fields(TrainHParams)}
    for name in ("clip-adapter", "tip-adapter-f", "mm-adapter", "mh-adapter"):
        config = methods.get_class(name).Config
        assert issubclass(config, TrainHParams)
        assert shared <= {f.name for f in dataclasses.fields(config)}
    clip = methods.get_class("clip-adapter").Config()
    assert (clip.epochs, clip.optimizer, clip.lr, clip.lr_step) == (200, "sgd", 2e-3, "epoch")
    # a redeclared default keeps the base's help text
    assert field_help(type(clip), "lr") == field_help(TrainHParams, "lr") != ""
    # the loop's config reads the method's values by name
    train = TrainConfig.from_config(clip)
    assert (train.epochs, train.batch_size, train.warmup_type) == (200, 32, "constant")


def test_bad_training_values_fail_when_the_config_is_made():
    with pytest.raises(ClipAdaptError, match="optimizer='lion'"):
        methods.get("clip-adapter", optimizer="lion")
    with pytest.raises(ClipAdaptError, match="epochs=0"):
        methods.get("mh-adapter", epochs=0)


def test_hparam_error_lists_fields_with_defaults_and_help():
    with pytest.raises(ClipAdaptError) as e:
        methods.parse_hparams("clip-adapter", ["rato=0.5"])
    message = str(e.value)
    assert "\n" not in message and "--hparam 'rato=0.5'" in message
    for name, default, text in describe(methods.get_class("clip-adapter").Config):
        assert f"{name}={default} ({text})" in message


def test_help_hparams_prints_each_field_and_exits(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["fit", "--method", "tip-adapter", "--help-hparams"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, _, text in describe(methods.get_class("tip-adapter").Config):
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{name} = "))
        assert text in line
    assert "epochs" not in out  # tip-adapter does not train


def _task(seed=0, classes=4, dim=16, n=24):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    labels = torch.arange(classes).repeat_interleave(n // classes)
    x = 10 * (protos[labels] + 0.5 * torch.randn(len(labels), dim, generator=g) / dim**0.5)
    return FeatureSet(x, labels, [f"c{i}" for i in range(classes)]), protos


def test_novel_logits_default_is_the_zero_shot_classifier():
    train, base_w = _task(0)
    test, novel_w = _task(1, classes=3)
    want = 30.0 * F.normalize(test.features, dim=-1) @ novel_w.T
    for name, kw in (("linear-probe", {}), ("tip-adapter", {"steps": (4, 2)}), ("zero-shot", {})):
        method = methods.get(name, scale=30.0, **kw).fit(train, base_w)
        torch.testing.assert_close(method.novel_logits(test, novel_w), want)


def test_tip_adapter_alpha_beta_are_attributes_and_survive_save(tmp_path):
    train, w = _task(2)
    val, _ = _task(3)
    method = methods.get("tip-adapter", steps=(10, 4)).fit(train, w, val=val)
    assert (method.alpha, method.beta) == (method.fitted["alpha"], method.fitted["beta"])
    method.fitted = {}  # only a report: the model does not read it
    before = method.logits(val)
    method.save(tmp_path / "tip")
    loaded = methods.load_adapter(tmp_path / "tip")
    assert (loaded.alpha, loaded.beta) == (method.alpha, method.beta)
    torch.testing.assert_close(loaded.logits(val), before)
    method.alpha = 0.0  # α = 0: the cache term vanishes, zero-shot remains
    torch.testing.assert_close(method.logits(val), 100.0 * F.normalize(val.features, dim=-1) @ w.T)


def test_multi_task_mh_adapter_is_registered_and_round_trips(tmp_path):
    cls = methods.get_class("mh-adapter-mt")
    assert cls is MultiTaskMHAdapter and cls.multi_task and "mh-adapter-mt" in methods.names()
    g = torch.Generator().manual_seed(0)
    n, tokens, width, dim = 12, 5, 8, 16
    labels = torch.stack([torch.arange(n) % 3, torch.arange(n) % 2], dim=1)
    data = FeatureSet(
        torch.randn(n, dim, generator=g),
        labels,
        ["x"] * 5,
        tokens=torch.randn(n, tokens, width, generator=g).half(),
    )
    texts = [F.normalize(torch.randn(k, dim, generator=g), dim=-1) for k in (3, 2)]
    mt = methods.get("mh-adapter-mt", epochs=1, heads=2, hidden=8, use_views=False)
    mt.fit(data, texts)
    mt.save(tmp_path / "mt")
    loaded = methods.load_adapter(tmp_path / "mt")
    for a, b in zip(loaded.logits(data), mt.logits(data), strict=True):
        torch.testing.assert_close(a, b)
