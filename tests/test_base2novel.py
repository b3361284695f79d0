"""The base-to-novel protocol: class split, draws, per-set evaluation, HM, `bench` end to end."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT
from PIL import Image
from safetensors.torch import save_file

from clipadapt import methods
from clipadapt.commands import bench
from clipadapt.data.dataset import ClassificationDataset, Item
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.protocols.base2novel import (
    base2novel_split,
    class_split,
    harmonic_mean,
    markdown_table,
    novel_logits,
    score,
)

NAMES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]


def _split(name: str, counts: dict[int, int], split: str) -> ClassificationDataset:
    items = [
        Item(f"/data/{split}/{NAMES[label]}/{i}.jpg", label, NAMES[label])
        for label, n in counts.items()
        for i in range(n)
    ]
    return ClassificationDataset(name, "/data", items, list(NAMES), split=split)


def _splits(train=30, val=20, test=5, with_val=True) -> dict[str, ClassificationDataset]:
    c = range(len(NAMES))
    return {
        "train": _split("toy", {k: train for k in c}, "train"),
        "val": _split("toy", {k: val for k in c} if with_val else {}, "val"),
        "test": _split("toy", {k: test + k for k in c}, "test"),
    }


def test_class_split_ceil_and_floor():
    assert class_split(7) == ([0, 1, 2, 3], [4, 5, 6])
    assert class_split(7, "floor") == ([0, 1, 2], [3, 4, 5, 6])
    assert class_split(8) == class_split(8, "floor") == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert class_split(100)[0] == list(range(50)) and class_split(397)[1][0] == 199
    with pytest.raises(ClipAdaptError, match="rule"):
        class_split(7, "round")
    with pytest.raises(ClipAdaptError, match="at least 2"):
        class_split(1)


def test_harmonic_mean():
    assert harmonic_mean(69.34, 74.22) == pytest.approx(71.70, abs=0.005)  # CLIP, 11 datasets
    assert harmonic_mean(80.0, 80.0) == 80.0
    assert harmonic_mean(0.0, 0.0) == 0.0


@pytest.mark.parametrize("rule", ["ceil", "floor"])
def test_split_draws_base_shots_and_separates_class_sets(rule):
    splits = _splits()
    draw = base2novel_split(splits, shots=16, val_shots=16, seed=1, rule=rule)
    nb = 4 if rule == "ceil" else 3
    assert draw.base == list(range(nb)) and draw.novel == list(range(nb, 7))
    # train / val: 16 images of every base class each, relabelled into the base class set
    for ds, source in ((draw.train, "train"), (draw.val, "val")):
        assert ds.classnames == NAMES[:nb]
        assert Counter(it.label for it in ds) == dict.fromkeys(range(nb), 16)
        assert all(f"/{source}/" in it.path for it in ds)
        assert all(ds.classnames[it.label] == it.classname for it in ds)
        assert len({it.path for it in ds}) == len(ds)
    # test: base images scored against base classes only, novel against novel only
    assert draw.test_base.classnames == NAMES[:nb]
    assert draw.test_novel.classnames == NAMES[nb:]
    assert Counter(it.label for it in draw.test_base) == {k: 5 + k for k in range(nb)}
    assert Counter(it.label for it in draw.test_novel) == {k - nb: 5 + k for k in range(nb, 7)}
    assert all(
        ds.classnames[it.label] == it.classname
        for ds in (draw.test_base, draw.test_novel)
        for it in ds
    )
    assert len(draw.test_base) + len(draw.test_novel) == len(splits["test"])


def test_split_is_seeded_and_falls_back_to_train_for_validation():
    splits = _splits()
    a, b = base2novel_split(splits, seed=1), base2novel_split(splits, seed=1)
    c = base2novel_split(splits, seed=2)
    assert a.train.paths == b.train.paths and a.val.paths == b.val.paths
    assert a.train.paths != c.train.paths
    no_val = base2novel_split(_splits(train=40, with_val=False), seed=1)
    assert Counter(it.label for it in no_val.val) == dict.fromkeys(range(4), 16)
    assert not set(no_val.val.paths) & set(no_val.train.paths)
    assert all("/train/" in p for p in no_val.val.paths)
    with pytest.warns(UserWarning, match="fewer than 16"):
        short = base2novel_split(_splits(train=10), seed=1)
    assert len(short.train) == 4 * 10


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _features(n: int, text: torch.Tensor, seed: int) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(text), (n,), generator=g)
    feats = text[labels] + 0.8 * torch.randn(n, text.shape[1], generator=g)
    return FeatureSet(feats, labels, [f"c{i}" for i in range(len(text))])


def test_novel_evaluation_per_method():
    base_w, novel_w = _unit(4, 16, seed=1), _unit(3, 16, seed=2)
    train, test_novel = _features(32, base_w, 3), _features(40, novel_w, 4)
    x = test_novel.features
    zero_shot = 30.0 * F.normalize(x, dim=-1) @ novel_w.T

    clip_adapter = methods.get("clip-adapter", epochs=2, scale=30.0, use_views=False)
    clip_adapter.fit(train, base_w)
    adapted = clip_adapter.head.adapt(x)
    want = 30.0 * F.normalize(adapted, dim=-1) @ novel_w.T
    torch.testing.assert_close(novel_logits(clip_adapter, test_novel, novel_w), want)
    assert not torch.allclose(want, zero_shot, atol=1e-3)

    mm = methods.get("mm-adapter", epochs=2, scale=30.0, hidden=8, width=16, heads=2)
    mm.fit(train, base_w)
    got = novel_logits(mm, test_novel, novel_w)
    assert got.shape == (40, 3)
    torch.testing.assert_close(got, mm.head(x, novel_w))
    assert not torch.allclose(got, zero_shot, atol=1e-3)

    for name, kw in (("tip-adapter-f", {"epochs": 1}), ("linear-probe", {}), ("zero-shot", {})):
        method = methods.get(name, scale=30.0, **kw).fit(train, base_w)
        torch.testing.assert_close(novel_logits(method, test_novel, novel_w), zero_shot)


def test_score_uses_each_class_set():
    base_w, novel_w = _unit(4, 16, seed=5), _unit(3, 16, seed=6)
    test_base, test_novel = _features(50, base_w, 7), _features(60, novel_w, 8)
    method = methods.get("zero-shot", scale=30.0).fit(None, base_w)
    got = score(method, test_base, test_novel, novel_w)
    b = 100.0 * float(
        ((test_base.features @ base_w.T).argmax(1) == test_base.labels).double().mean()
    )
    n = 100.0 * float(
        ((test_novel.features @ novel_w.T).argmax(1) == test_novel.labels).double().mean()
    )
    assert got["base"] == pytest.approx(b) and got["novel"] == pytest.approx(n)
    assert got["hm"] == pytest.approx(2 * b * n / (b + n))
    assert 0 < n < 100 and 0 < b < 100


def test_table_averages_base_and_novel_then_takes_hm():
    def rec(method, dataset, seed, b, n):
        metrics = {"base": b, "novel": n, "hm": harmonic_mean(b, n)}
        return {
            "protocol": "base2novel",
            "method": method,
            "dataset": dataset,
            "seed": seed,
            "metrics": metrics,
        }

    records = [
        rec("mm-adapter", "a", 1, 80, 60),
        rec("mm-adapter", "a", 2, 90, 70),
        rec("mm-adapter", "b", 1, 50, 40),
    ]
    table = markdown_table(records, ["mm-adapter", "zero-shot"], ["a", "b"])
    row = next(line for line in table.splitlines() if line.startswith("| mm-adapter"))
    assert f"85.00 / 65.00 / {harmonic_mean(85, 65):.2f}" in row
    assert f"67.50 / 52.50 / {harmonic_mean(67.5, 52.5):.2f}" in row  # average over datasets
    assert "novel texts in the attention" in row
    assert "| zero-shot | – | – | – |" in table


# -- `clipadapt bench --protocol base2novel` end to end --------------------------------------------
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 30), (200, 40, 220)]


def _write_dataset(folder: Path, per_split=(4, 3, 4)) -> Path:
    """A CoOp-style split json over 32 px images: one colour per class (5 classes), noisy."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in zip(("train", "val", "test"), per_split, strict=True):
        entries = []
        for label, rgb in enumerate(COLOURS):
            for i in range(count):
                rel = f"c{label}/{split}{i}.png"
                pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255)
                (folder / "images" / f"c{label}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / "images" / rel)
                entries.append([rel, label, f"colour {label}"])
        splits[split] = entries
    (folder / "split_toy.json").write_text(json.dumps(splits))
    return folder


def _bench(argv: list[str]) -> int:
    """`clipadapt bench ...` through the bench command's own parser."""
    parser = argparse.ArgumentParser(prog="clipadapt")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_bench_base2novel_cli(tmp_path, capsys):
    import open_clip

    data = _write_dataset(tmp_path / "toy")
    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    model = open_clip.create_model(TINY_VIT, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--protocol",
        "base2novel",
        "--methods",
        "zero-shot,mm-adapter,clip-adapter,tip-adapter-f,linear-probe",
        "--data",
        str(data),
        "--shots",
        "2",
        "--seeds",
        "1,2",
        "--views",
        "1",
        "--hparam",
        "epochs=3",
        "--hparam",
        "mm-adapter:width=16",
        "--hparam",
        "tip-adapter-f:steps=10,5",
        "--out",
        str(out),
        "--model",
        TINY_VIT,
        "--pretrained",
        str(weights),
        "--cache",
        str(tmp_path / "cache"),
        "--num-workers",
        "0",
    ]
    assert _bench(argv) == 0
    runs = sorted((out / "runs-base2novel").glob("*.json"))
    assert len(runs) == 1 + 4 * 2  # zero-shot once, the others per seed
    records = [json.loads(p.read_text()) for p in runs]
    for r in records:
        m = r["metrics"]
        assert r["protocol"] == "base2novel" and (r["base_classes"], r["novel_classes"]) == (3, 2)
        assert m["hm"] == pytest.approx(harmonic_mean(m["base"], m["novel"]))
    by = {(r["method"], r["seed"]): r for r in records}
    assert by[("mm-adapter", 1)]["hparams"]["width"] == 16
    assert by[("mm-adapter", 1)]["fitted"]["epoch"] <= 3
    zero_novel = by[("zero-shot", None)]["metrics"]["novel"]
    assert by[("tip-adapter-f", 2)]["metrics"]["novel"] == zero_novel  # cache: base classes only
    subset = json.loads((out / "subsets" / "toy__base2novel__2shot__seed1.json").read_text())
    assert subset["base"] == ["colour 0", "colour 1", "colour 2"]
    assert len(subset["train"]) == 6 and len(subset["val"]) == 6
    table = (out / "base2novel.md").read_text()
    assert table.count("\n| ") == 5 + 1 and "toy" in table
    # a second run resumes: nothing is refitted, the same table comes out
    before = {p.name: p.stat().st_mtime_ns for p in runs}
    capsys.readouterr()
    assert _bench(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in runs} == before
    assert (out / "base2novel.md").read_text() == table
    # other weights under the same --model name: the stored runs are not theirs, all rerun
    torch.manual_seed(1)
    other = open_clip.create_model(TINY_VIT, pretrained=None)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    assert _bench(argv) == 0
    assert all(p.stat().st_mtime_ns != before[p.name] for p in runs)
