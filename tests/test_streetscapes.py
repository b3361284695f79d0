"""Global StreetScapes manual-label reader, protocol metrics and the streetscapes benchmark."""

from __future__ import annotations

import argparse
import copy
import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipadapt.commands import bench
from clipadapt.data.streetscapes import (
    find_tasks,
    label_key,
    normalise_label,
    read_task,
    stratified_split,
)
from clipadapt.errors import ClipAdaptError
from clipadapt.protocols.streetscapes import (
    DEFAULT_METHODS,
    build_method,
    markdown_table,
    run_streetscapes,
    street_metrics,
)


def write_task(root: Path, split: str, task: str, labels: list[str], column: str | None = None):
    """root/<split>/<task>.csv with uuid, <task>, img_path, an extra column; one image per row."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    with open(root / split / f"{task}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uuid", column or task, "img_path", "source"])
        for i, label in enumerate(labels):
            name = f"{split}-{task}-{i}.png"
            if not (root / "img" / name).exists():
                Image.new("RGB", (8, 8), (i * 7 % 255, 0, 0)).save(root / "img" / name)
            writer.writerow([f"u{i}", label, f"img/{name}", "x"])


LIGHTING_TRAIN = ["Day", " night ", "dawn/dusk", "Dusk/Dawn", "DUSK / DAWN", "day", "NIGHT"] * 3
LIGHTING_TEST = ["day", "Dawn/Dusk", "night", "dusk/dawn"]


@pytest.fixture
def manual(tmp_path):
    root = tmp_path / "streets" / "manual_labels"
    write_task(root, "train", "lighting_condition", LIGHTING_TRAIN)
    write_task(root, "test", "lighting_condition", LIGHTING_TEST)
    write_task(root, "train", "pano_status", ["True", "yes", "FALSE", "no ", "true", "False"])
    write_task(root, "test", "pano_status", ["TRUE", "no"])
    write_task(root, "train", "view_direction", ["front/back", "Back/Front", "side", "Side"] * 2)
    write_task(root, "test", "view_direction", ["back/front", "side"])
    quality = ["Slightly_Poor", "slightly  poor", "very poor", "Good", "good ", "VERY_POOR"]
    write_task(root, "train", "quality", quality)
    write_task(root, "test", "quality", ["good", "Slightly Poor", "very poor"])
    write_task(root, "train", "glare", ["Yes", "no", "TRUE", "false"], column="Glare")
    write_task(root, "test", "glare", ["yes"])
    return root


def test_label_spellings_are_normalised():
    assert label_key(" Dusk / Dawn ") == label_key("dawn/dusk") == label_key("dawn_/dusk")
    assert normalise_label("Back/Front", ["front/back", "side"]) == "front/back"
    assert normalise_label("YES", ["true", "false"]) == "true"
    assert normalise_label("True", ["yes", "no"]) == "yes"
    assert normalise_label("Slightly_Poor", ["good", "slightly poor"]) == "slightly poor"
    assert normalise_label("Driving  Surface", []) == "driving surface"  # no known labels
    assert normalise_label("dusk/dawn", []) == "dawn/dusk"


def test_reader_on_messy_csvs(manual):
    assert find_tasks(manual) == [
        "glare",
        "lighting_condition",
        "pano_status",
        "quality",
        "view_direction",
    ]
    t = read_task(manual.parent, "lighting_condition")  # the parent of manual_labels works too
    assert t.labels == ["dawn/dusk", "day", "night"]  # alphabetical ids
    assert t.classnames == ["twilight", "day", "night"]
    assert t.template == "a photo taken during {}."
    assert t.builtin
    train, val, test = (t.splits[k] for k in ("train", "val", "test"))
    assert train.classnames == t.classnames and train.name == "streets/lighting_condition"
    want = Counter({0: 9, 1: 6, 2: 6})  # dawn/dusk 3 spellings x 3, day 2 x 3, night 2 x 3
    assert Counter(train.labels) + Counter(val.labels) == want
    assert [it.label for it in test] == [1, 0, 2, 0]
    assert all(Path(p).is_file() and "/img/" in p for p in test.paths)
    assert not set(train.paths) & set(val.paths)

    pano = read_task(manual, "pano_status")
    assert pano.labels == ["false", "true"] and pano.classnames == ["non-panoramic", "panoramic"]
    assert [it.label for it in pano.splits["test"]] == [1, 0]
    view = read_task(manual, "view_direction")
    assert view.labels == ["front/back", "side"] and view.classnames == ["along", "across"]
    quality = read_task(manual, "quality")
    assert quality.labels == ["good", "slightly poor", "very poor"]
    assert [it.label for it in quality.splits["test"]] == [0, 1, 2]
    glare = read_task(manual, "glare")  # the column's case differs from the file name
    assert glare.labels == ["no", "yes"] and glare.classnames == ["no glare", "glare"]


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = [0] * 50 + [1] * 7 + [2] * 2 + [3]
    train, val = stratified_split(labels, 0.2, seed=1)
    assert sorted(train + val) == list(range(len(labels)))
    counts = Counter(labels[i] for i in val)
    assert counts == {0: 10, 1: 1, 2: 1}  # round(0.2 n), at least 1, never the only image
    assert (train, val) == stratified_split(labels, 0.2, seed=1)
    assert val != stratified_split(labels, 0.2, seed=2)[1]
    with pytest.raises(ClipAdaptError, match="val_fraction"):
        stratified_split(labels, 1.0)


def test_tasks_json_adds_and_overrides_tasks(manual):
    write_task(manual, "train", "season", ["Summer", "winter", "WINTER", "summer "])
    write_task(manual, "test", "season", ["winter"])
    with pytest.raises(ClipAdaptError, match="unknown task 'season'"):
        read_task(manual, "season")
    tasks = {
        "season": {"template": "a photo taken in {}.", "classnames": {"winter": "wintertime"}},
        "quality": {"template": "a {} photo.", "classnames": {"good": "sharp"}},
    }
    (manual / "tasks.json").write_text(json.dumps(tasks))
    season = read_task(manual, "season")
    assert season.labels == ["summer", "winter"]
    assert season.classnames == ["summer", "wintertime"]
    assert season.template == "a photo taken in {}." and not season.builtin
    quality = read_task(manual, "quality")
    assert quality.template == "a {} photo." and quality.classnames[0] == "sharp"
    assert not quality.builtin
    (manual / "tasks.json").write_text(json.dumps({"season": {"template": "no slot"}}))
    with pytest.raises(ClipAdaptError, match="tasks.json"):
        read_task(manual, "season")


def test_reader_errors_name_the_file(manual):
    write_task(manual, "test", "weather", ["clear"])
    write_task(manual, "train", "weather", ["clear", "rainy"])
    write_task(manual, "test", "weather", ["snowy"])
    with pytest.raises(ClipAdaptError, match=r"test/weather.csv: unknown label 'snowy'"):
        read_task(manual, "weather")
    write_task(manual, "train", "platform", ["road"], column="label")
    write_task(manual, "test", "platform", ["road"])
    with pytest.raises(ClipAdaptError, match=r"platform.csv: expected columns 'platform'"):
        read_task(manual, "platform")
    (manual / "img" / "test-glare-0.png").unlink()
    with pytest.raises(ClipAdaptError, match="test-glare-0.png"):
        read_task(manual, "glare")
    with pytest.raises(ClipAdaptError, match="not a StreetScapes manual-labels folder"):
        read_task(manual / "img", "glare")


def one_hot(pred, classes):
    return torch.nn.functional.one_hot(torch.tensor(pred), classes).float()


def test_metrics_against_hand_computed_values():
    # confusion (rows true): [[2,1,0],[0,1,1],[0,0,1]]
    m = street_metrics(one_hot([0, 0, 1, 1, 2, 2], 3), torch.tensor([0, 0, 0, 1, 1, 2]))
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    # F1 per class: 2·2/(2·2+0+1) = 4/5, 2/(2+1+1) = 1/2, 2/(2+1+0) = 2/3
    assert m["macro_f1"] == pytest.approx(100 * 59 / 90)  # (4/5 + 1/2 + 2/3) / 3
    assert m["weighted_f1"] == pytest.approx(100 * 61 / 90)  # (3·4/5 + 2·1/2 + 1·2/3) / 6
    # recalls 2/3, 1/2, 1 -> 13/18; adjusted (13/18 - 1/3) / (1 - 1/3) = 7/12
    assert m["adjusted_balanced_accuracy"] == pytest.approx(100 * 7 / 12)
    # a class predicted but absent from the truth is not averaged in macro-F1 (the reference
    # evaluator: sklearn f1_score(labels=unique(y_true))), nor in the chance level of the
    # adjusted balanced accuracy (2 classes present); it lowers class 0's recall only
    m = street_metrics(one_hot([0, 2, 1, 1], 3), torch.tensor([0, 0, 1, 1]))
    assert m["accuracy"] == pytest.approx(75.0)
    assert m["macro_f1"] == pytest.approx(100 * 5 / 6)  # (2/3 + 1) / 2, not (2/3 + 1 + 0) / 3
    assert m["weighted_f1"] == pytest.approx(100 * 5 / 6)  # (2·2/3 + 2·1) / 4
    assert m["adjusted_balanced_accuracy"] == pytest.approx(50.0)  # (3/4 - 1/2) / (1/2)
    perfect = street_metrics(one_hot([1, 0, 2], 3), torch.tensor([1, 0, 2]))
    assert all(v == pytest.approx(100.0) for v in perfect.values())


@pytest.fixture(scope="module")
def streets(tmp_path_factory):
    from clipadapt.data.shapesworld_write import write_streets

    root = tmp_path_factory.mktemp("sw")
    return write_streets(root, n_train=40, n_test=16, size=32, progress=False)


FAST = {
    "mh-adapter": {"epochs": 2, "heads": 2, "hidden": 16},
    "mh-adapter-mt": {"epochs": 2, "heads": 2, "hidden": 16},
    "clip-adapter": {"epochs": 2},
    "linear-probe": {"max_iter": 20},
}


def test_the_protocol_selects_clip_adapters_epoch_on_val_unless_overridden():
    kw = {"scale": 50.0, "seed": 2, "device": "cpu"}
    assert build_method("clip-adapter", {}, **kw).config.select_epoch == "val"
    override = build_method("clip-adapter", {"select_epoch": "last"}, **kw)
    assert override.config.select_epoch == "last"
    assert build_method("clip-adapter", {}, **kw).config.seed == 2


def test_protocol_runs_every_method_and_resumes(streets, tiny_vit_backbone, tmp_path, monkeypatch):
    kw = {"cache_dir": tmp_path / "cache", "num_workers": 0, "progress": False}
    records = run_streetscapes(
        tiny_vit_backbone,
        streets,
        out_dir=tmp_path / "out",
        tasks=["lighting", "weather"],
        views=1,
        hparams=FAST,
        extract_kw=kw,
    )
    assert {(r["task"], r["method"]) for r in records} == {
        (t, m) for t in ("lighting", "weather") for m in DEFAULT_METHODS
    }
    for r in records:
        assert set(r["metrics"]) == {
            "accuracy",
            "macro_f1",
            "weighted_f1",
            "adjusted_balanced_accuracy",
        }
        sizes = r["sizes"]  # 20% of each class to val, rounded per class
        assert sizes["train"] + sizes["val"] == 40 and 8 <= sizes["val"] <= 10
        assert sizes["test"] == 16
        assert r["reference"] == {"MaxViT-T accuracy": None}  # ShapesWorld's own weather task
    mt = [r for r in records if r["method"] == "mh-adapter-mt"]
    assert mt[0]["fitted"] == mt[1]["fitted"]  # one model for both tasks
    assert len(list((tmp_path / "out" / "runs").glob("*.json"))) == 10

    def no_extraction(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")

    monkeypatch.setattr("clipadapt.features.extract", no_extraction)
    again = run_streetscapes(
        tiny_vit_backbone,
        streets,
        out_dir=tmp_path / "out",
        tasks=["lighting", "weather"],
        extract_kw=kw,
    )
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records]
    assert records[0]["backbone"] == tiny_vit_backbone.identity
    other = copy.copy(tiny_vit_backbone)  # same name, other weights: nothing is reused
    other.identity = {**tiny_vit_backbone.identity, "weights_sha256": "0" * 64}
    with pytest.raises(AssertionError, match="recomputed"):
        run_streetscapes(
            other, streets, out_dir=tmp_path / "out", tasks=["lighting"], extract_kw=kw
        )
    table = markdown_table(records, list(DEFAULT_METHODS))
    assert table.count("| lighting |") == 5 and "| mean over tasks | mh-adapter-mt |" in table


def test_table_shows_the_maxvit_reference_for_builtin_tasks():
    def rec(task, method, acc, seed, ref):
        metrics = dict.fromkeys(
            ("accuracy", "macro_f1", "weighted_f1", "adjusted_balanced_accuracy"), acc
        )
        return {
            "dataset": "gs",
            "task": task,
            "method": method,
            "seed": seed,
            "metrics": metrics,
            "reference": {"MaxViT-T accuracy": ref},
        }

    records = [rec("glare", "mh-adapter", a, s, 94.1) for a, s in ((90.0, 1), (92.0, 2))]
    records += [rec("weather", "mh-adapter", 70.0, 1, 75.5)]
    table = markdown_table(records)
    assert "| glare | mh-adapter | 91.00 ± 1.41 | 91.00 ± 1.41 |" in table
    assert table.rstrip().endswith(
        "| mean over tasks | mh-adapter | 80.50 | 80.50 | 80.50 | 80.50 | 84.8 |"
    )


def test_bench_cli_streetscapes_protocol(streets, tmp_path, capsys):
    argv = [
        "bench",
        "--protocol",
        "streetscapes",
        "--data",
        str(streets),
        "--tasks",
        "quality",
        "--methods",
        "zero-shot,mh-adapter",
        "--seeds",
        "1",
        "--views",
        "0",
        "--hparam",
        "mh-adapter:epochs=1",
        "--hparam",
        "heads=2",
        "--model",
        "tiny-test-vit",
        "--cache",
        str(tmp_path / "cache"),
        "--num-workers",
        "0",
        "--out",
        str(tmp_path / "out"),
    ]
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "| quality | zero-shot |" in out and "| quality | mh-adapter |" in out
    assert (tmp_path / "out" / "results.md").is_file()
    run = json.loads(next((tmp_path / "out" / "runs").glob("*mh-adapter*.json")).read_text())
    assert run["hparams"]["heads"] == 2 and run["hparams"]["epochs"] == 1
    assert run["protocol"] == "streetscapes" and run["views"] == 0


def test_a_zero_shot_only_run_extracts_no_training_images(
    streets, tiny_vit_backbone, tmp_path, monkeypatch
):
    import clipadapt.features as features

    extracted, extract = [], features.extract

    def spy(bb, dataset, **kwargs):
        extracted.append((dataset.split, kwargs.get("views", 0)))
        return extract(bb, dataset, **kwargs)

    monkeypatch.setattr(features, "extract", spy)
    kw = {"cache_dir": None, "num_workers": 0, "progress": False}
    records = run_streetscapes(
        tiny_vit_backbone,
        streets,
        out_dir=tmp_path / "out",
        methods=["zero-shot"],
        tasks=["lighting"],
        extract_kw=kw,
    )
    assert extracted == [("test", 0)]
    assert records[0]["sizes"]["test"] == 16 and records[0]["sizes"]["train"] > 0
