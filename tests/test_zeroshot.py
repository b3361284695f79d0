"""Zero-shot evaluation, templates, metrics, results JSON, and the extract/zeroshot commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipadapt import cli, metrics
from clipadapt.data import load_dataset
from clipadapt.errors import ClipAdaptError
from clipadapt.features import extract
from clipadapt.results import read_results, write_result
from clipadapt.templates import get_templates, require_templates
from clipadapt.zeroshot import evaluate_zero_shot, text_weights, zero_shot_logits

# --- the zero-shot classifier against a plain formulation ------------------------------------


def _plain_classifier(bb, classnames, templates) -> torch.Tensor:
    rows = []
    for name in classnames:
        name = name.replace("_", " ")
        embeddings = []
        for t in templates:
            z = bb.encode_texts([t.format(name)], normalize=False)[0]
            embeddings.append(z / z.norm())
        mean = torch.stack(embeddings).mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_zero_shot_logits_match_the_plain_formula(tiny_vit_backbone):
    bb = tiny_vit_backbone
    classnames, templates = ["golden_retriever", "tabby cat", "fire truck"], get_templates("dtd")
    templates = templates + ["a photo of a {}."]
    w = text_weights(bb, classnames, templates)
    torch.testing.assert_close(w, _plain_classifier(bb, classnames, templates))
    f = torch.randn(5, bb.embed_dim, generator=torch.Generator().manual_seed(0)) * 3
    logits = zero_shot_logits(f, w, scale=100.0)
    for i in range(5):
        for c in range(3):
            cos = float(f[i] @ w[c]) / float(f[i].norm())
            assert math.isclose(float(logits[i, c]), 100.0 * cos, rel_tol=1e-5, abs_tol=1e-4)


def test_text_weights_are_cached(tiny_vit_backbone, tmp_path):
    class Counting:
        def __init__(self, bb):
            self._bb, self.calls = bb, 0

        def __getattr__(self, name):
            return getattr(self._bb, name)

        def text_classifier(self, classnames, templates):
            self.calls += 1
            return self._bb.text_classifier(classnames, templates)

    bb = Counting(tiny_vit_backbone)
    a = text_weights(bb, ["ant", "bee"], ["a {}."], tmp_path)
    b = text_weights(bb, ["ant", "bee"], ["a {}."], tmp_path)
    c = text_weights(bb, ["ant", "bee"], ["the {}."], tmp_path)
    assert bb.calls == 2 and torch.equal(a, b) and not torch.equal(a, c)


def test_evaluate_zero_shot_on_a_tiny_dataset(tiny_vit_backbone, tmp_path):
    bb = tiny_vit_backbone
    folder = _tiny_pets(tmp_path)
    test = load_dataset(folder)["test"]
    got = evaluate_zero_shot(bb, test, cache_dir=tmp_path / "cache", num_workers=0, progress=False)
    # plain: embeddings one by one, the pets template, numpy argmax
    feats = extract(bb, test, num_workers=0, progress=False).features.numpy()
    w = _plain_classifier(bb, test.classnames, ["a photo of a {}, a type of pet."]).numpy()
    logits = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ w.T
    labels = np.array(test.labels)
    pred = logits.argmax(1)
    recall = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    assert got["top1"] == pytest.approx(100 * np.mean(pred == labels))
    assert got["mean_per_class_recall"] == pytest.approx(100 * np.mean(recall))
    assert got["top5"] == 100.0  # three classes


def _tiny_pets(tmp_path):
    folder = tmp_path / "oxford_pets"
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for i in range(9):
        name = ("abyssinian", "beagle", "pug")[i % 3]
        rel = f"{name}_{i}.jpg"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            folder / "images" / rel
        )
        split["test" if i >= 3 else "train"].append([rel, i % 3, name])
    (folder / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return folder


# --- templates -------------------------------------------------------------------------------


def test_templates_by_dataset_and_ensemble():
    assert get_templates("OxfordPets") == ["a photo of a {}, a type of pet."]
    assert get_templates("oxford_flowers") == ["a photo of a {}, a type of flower."]
    assert get_templates("FGVCAircraft") == ["a photo of a {}, a type of aircraft."]
    assert get_templates("DescribableTextures") == ["{} texture."]
    assert get_templates("EuroSAT") == ["a centered satellite photo of {}."]
    assert get_templates("Food101") == ["a photo of {}, a type of food."]
    assert get_templates("UCF101") == ["a photo of a person doing {}."]
    for name in ("Caltech101", "StanfordCars", "SUN397", "shapesworld", "my_folder"):
        assert get_templates(name) == ["a photo of a {}."]
    assert get_templates("shapesworld-colours") == ["a photo of a {} object."]
    select = get_templates("imagenet")
    assert len(select) == 7 and select[0] == "itap of a {}." and "a origami {}." in select
    openai = get_templates("openai-80")
    assert len(openai) == 80 and openai[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in openai)
    assert get_templates("a sketch of a {}.") == ["a sketch of a {}."]
    assert require_templates("openai-80") == openai
    with pytest.raises(ClipAdaptError, match="--templates 'nope'"):
        require_templates("nope")


# --- metrics against plain loops --------------------------------------------------------------


def test_classification_metrics_match_plain_loops():
    g = torch.Generator().manual_seed(0)
    n, c = 200, 6
    logits, labels = torch.randn(n, c, generator=g), torch.randint(0, c - 1, (n,), generator=g)
    pred = logits.argmax(1)
    rank = logits.argsort(dim=1, descending=True)
    for k in (1, 3, 5):
        hits = sum(int(labels[i]) in rank[i, :k].tolist() for i in range(n))
        assert metrics.topk_accuracy(logits, labels, k) == pytest.approx(100 * hits / n)
    conf = metrics.confusion_matrix(pred, labels, c)
    for t in range(c):
        for p in range(c):
            assert conf[t, p] == sum(1 for i in range(n) if labels[i] == t and pred[i] == p)
    present = [t for t in range(c) if (labels == t).any()]  # class 5 never occurs
    recalls = [float((pred[labels == t] == t).float().mean()) for t in present]
    assert metrics.mean_per_class_recall(conf) == pytest.approx(100 * np.mean(recalls))
    chance = 1 / len(present)
    adjusted = (np.mean(recalls) - chance) / (1 - chance)
    assert metrics.balanced_accuracy(conf, adjusted=True) == pytest.approx(100 * adjusted)
    f1 = {}
    for t in range(c):
        tp = sum(1 for i in range(n) if pred[i] == t and labels[i] == t)
        fp = sum(1 for i in range(n) if pred[i] == t and labels[i] != t)
        fn = sum(1 for i in range(n) if pred[i] != t and labels[i] == t)
        if tp + fp + fn:
            f1[t] = 2 * tp / (2 * tp + fp + fn)
    # macro-F1 averages over the classes present in the ground truth (the reference evaluator)
    assert metrics.macro_f1(conf) == pytest.approx(100 * np.mean([f1[t] for t in present]))
    support = {t: int((labels == t).sum()) for t in range(c)}
    weighted = sum(f1.get(t, 0) * support[t] for t in range(c)) / n
    assert metrics.weighted_f1(conf) == pytest.approx(100 * weighted)
    got = metrics.classification_metrics(logits, labels)
    assert set(got) == {"top1", "top5", "mean_per_class_recall"}


def test_miou_is_the_nan_mean_over_classes_with_a_union():
    gt = torch.tensor([[0, 0, 1], [1, 255, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 0]])
    conf = metrics.confusion_matrix(pred, gt, 4, ignore_index=255)
    # class 0: I=1, U=3; class 1: I=2, U=3; class 2: I=0, U=1; class 3: empty union
    assert metrics.miou(conf) == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)


# --- results ------------------------------------------------------------------------------------


def test_results_json(tmp_path):
    path = write_result(
        tmp_path / "r.json",
        dataset="dtd",
        model="RN50",
        pretrained="openai",
        method="zero-shot",
        shots=0,
        seed=None,
        metrics={"top1": np.float64(42.5)},
        split="test",
    )
    record = json.loads(path.read_text())
    assert record == {
        "dataset": "dtd",
        "model": "RN50",
        "pretrained": "openai",
        "method": "zero-shot",
        "shots": 0,
        "seed": None,
        "metrics": {"top1": 42.5},
        "recipe": "clean",  # every result records its recipe
        "split": "test",
    }
    assert not list(tmp_path.glob("*.tmp-*"))
    (tmp_path / "subset.json").write_text('{"train": []}')
    assert read_results(tmp_path) == [record]


# --- command line ------------------------------------------------------------------------------


@pytest.fixture
def only_my_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["extract", "zeroshot"])


def test_cli_extract_and_zeroshot(only_my_commands, tiny_vit_backbone, tmp_path, capsys):
    folder = _tiny_pets(tmp_path)
    common = ["--model", "tiny-test-vit", "--data", str(folder), "--num-workers", "0"]
    cache = tmp_path / "cache"
    torch.manual_seed(0)  # the random-init weights of the fixture
    assert cli.main(["extract", *common, "--split", "train", "--out", str(cache)]) == 0
    assert "3 computed, 0 reused" in capsys.readouterr().out
    torch.manual_seed(0)
    assert cli.main(["extract", *common, "--split", "train", "--out", str(cache)]) == 0
    assert "0 computed, 3 reused" in capsys.readouterr().out

    out = tmp_path / "res" / "zs.json"
    args = ["zeroshot", *common, "--cache", str(cache), "--out", str(out)]
    torch.manual_seed(0)
    assert cli.main(args) == 0
    record = json.loads(out.read_text())
    assert record["dataset"] == "oxford_pets" and record["method"] == "zero-shot"
    assert record["templates"] == ["a photo of a {}, a type of pet."]
    # the library on the same backbone (same seed-0 weights) gives the same numbers
    test = load_dataset(folder)["test"]
    expected = evaluate_zero_shot(tiny_vit_backbone, test, num_workers=0, progress=False)
    assert record["metrics"] == pytest.approx(expected)


def test_cli_user_errors_are_one_line(only_my_commands, tmp_path, capsys):
    code = cli.main(["zeroshot", "--data", str(tmp_path / "missing"), "--out", "x.json"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("clipadapt: error: ") and err.count("\n") == 1
    assert "missing" in err
    folder = _tiny_pets(tmp_path)
    args = ["zeroshot", "--data", str(folder), "--templates", "nope", "--out", "x.json"]
    assert cli.main(args) == 2
    assert "--templates 'nope'" in capsys.readouterr().err
