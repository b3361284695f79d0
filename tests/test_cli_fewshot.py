"""`clipadapt fit / eval / predict / bench` end to end on generated images and a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, write_colour_dataset
from safetensors.torch import save_file

import clipadapt as ca
from clipadapt import cli
from clipadapt.data import load_split
from clipadapt.features import extract
from clipadapt.methods import load_adapter

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}


def _write_dataset(folder: Path, name: str, seed: int, per_split=(5, 2, 4)) -> Path:
    return write_colour_dataset(folder, name, COLOURS, per_split, seed)


def _weights(path: Path, seed: int) -> Path:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_VIT, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot-cli")
    return {
        "root": root,
        "toy_a": _write_dataset(root / "data" / "toy_a", "ToyA", seed=0),
        "toy_b": _write_dataset(root / "data" / "toy_b", "ToyB", seed=1),
        "weights": _weights(root / "tiny.safetensors", seed=0),
        "other_weights": _weights(root / "other.safetensors", seed=1),
        "cache": root / "cache",
    }


def _backbone_args(world, weights="weights"):
    return [
        "--model",
        TINY_VIT,
        "--pretrained",
        str(world[weights]),
        "--cache",
        str(world["cache"]),
        "--num-workers",
        "0",
    ]


def _fit(world, out, method="tip-adapter", *extra):
    argv = [
        "fit",
        "--method",
        method,
        "--data",
        str(world["toy_a"]),
        "--shots",
        "2",
        "--seed",
        "1",
        "--views",
        "2",
        "--out",
        str(out),
        *_backbone_args(world),
        *extra,
    ]
    return cli.main(argv)


def test_fit_writes_an_adapter_that_eval_and_predict_use(world, tmp_path, capsys):
    out = tmp_path / "tip"
    assert _fit(world, out, "tip-adapter", "--hparam", "steps=20,5") == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "subset.json"}
    doc = json.loads((out / "config.json").read_text())
    assert doc["method"] == "tip-adapter" and doc["config"]["steps"] == [20, 5]
    assert doc["meta"]["classnames"] == list(COLOURS)
    assert doc["meta"]["backbone"]["name"] == TINY_VIT
    assert doc["meta"]["views"] == 2 and doc["meta"]["train_images"] == 6
    subset = json.loads((out / "subset.json").read_text())
    assert len(subset["train"]) == 6 and len(subset["val"]) == 6  # 2 + min(2, 4) per class

    # eval: the same numbers as the library on the same features
    result = tmp_path / "result.json"
    argv = [
        "eval",
        "--adapter",
        str(out),
        "--data",
        str(world["toy_a"]),
        "--split",
        "test",
        "--cache",
        str(world["cache"]),
        "--num-workers",
        "0",
        "--out",
        str(result),
    ]
    assert cli.main(argv) == 0
    record = json.loads(result.read_text())
    bb = ca.load_backbone(TINY_VIT, str(world["weights"]))
    method = load_adapter(out, backbone=bb)
    test = extract(bb, load_split(world["toy_a"], "test"), num_workers=0, progress=False)
    want = 100.0 * float((method.logits(test).argmax(1) == test.labels).float().mean())
    assert record["metrics"]["top1"] == pytest.approx(want)
    assert (record["method"], record["shots"], record["seed"]) == ("tip-adapter", 2, 1)

    # predict: top-k classes with softmax probabilities, most probable first
    images = sorted((world["toy_a"] / "images" / "blue").glob("test*.png"))[:2]
    capsys.readouterr()
    argv = ["predict", "--adapter", str(out), *map(str, images), "--topk", "2", "--json"]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in images]
    rows = [test.paths.index(str(p)) for p in images]
    probs = method.logits(test.features[rows]).softmax(-1)
    for line, p in zip(lines, probs, strict=True):
        top = p.topk(2)
        assert [t["class"] for t in line["top"]] == [list(COLOURS)[i] for i in top.indices]
        # predict encodes the two images as their own batch: float32 noise of ~1e-7 in the
        # features, times Tip-Adapter's constant logit scale 100, moves p by ~1e-6
        assert [t["p"] for t in line["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert cli.main(["predict", "--adapter", str(out), str(images[0])]) == 0
    assert "1. " in capsys.readouterr().out


def test_an_adapter_refuses_another_backbone(world, tmp_path, capsys):
    out = tmp_path / "zs"
    assert _fit(world, out, "zero-shot") == 0
    capsys.readouterr()
    argv = [
        "eval",
        "--adapter",
        str(out),
        "--data",
        str(world["toy_a"]),
        *_backbone_args(world, "other_weights"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipadapt: error: ") and "fitted on backbone" in err
    assert len(err.splitlines()) == 1


def test_fit_user_errors_are_one_line(world, tmp_path, capsys):
    assert _fit(world, tmp_path / "x", "tip-adapter", "--hparam", "alfa=3") == 2
    assert "--hparam 'alfa=3'" in capsys.readouterr().err
    assert _fit(world, tmp_path / "x", "no-such-method") == 2
    assert "unknown method 'no-such-method'" in capsys.readouterr().err
    assert cli.main(["predict", "--adapter", str(tmp_path / "missing"), "a.png"]) == 2
    assert "config.json: file not found" in capsys.readouterr().err


def test_clip_adapter_fit_and_eval(world, tmp_path):
    out = tmp_path / "ca"
    assert _fit(world, out, "clip-adapter", "--hparam", "epochs=3") == 0
    doc = json.loads((out / "config.json").read_text())
    assert doc["config"]["epochs"] == 3 and 1 <= doc["fitted"]["epoch"] <= 3
    argv = [
        "eval",
        "--adapter",
        str(out),
        "--data",
        str(world["toy_a"]),
        "--cache",
        str(world["cache"]),
        "--num-workers",
        "0",
    ]
    assert cli.main(argv) == 0


def test_fit_threads_apply_to_the_fit_only_and_keep_the_result(world, tmp_path, monkeypatch):
    from clipadapt import train
    from clipadapt.methods.clip_adapter import ClipAdapter

    seen = []
    fit = ClipAdapter.fit

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(ClipAdapter, "fit", spy)
    monkeypatch.setattr(train, "_fit_threads", None)
    before = torch.get_num_threads()
    assert _fit(world, tmp_path / "a", "clip-adapter", "--hparam", "epochs=2") == 0
    assert (
        _fit(world, tmp_path / "b", "clip-adapter", "--hparam", "epochs=2", "--fit-threads", "1")
        == 0
    )
    assert seen == [before, 1] and torch.get_num_threads() == before
    a, b = (load_adapter(tmp_path / d) for d in "ab")
    assert all(torch.equal(a.head.state_dict()[k], v) for k, v in b.head.state_dict().items())


def test_bench_runs_resumes_and_reports(world, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--methods",
        "zero-shot,tip-adapter,linear-probe",
        "--data",
        "toy_a,toy_b",
        "--data-root",
        str(world["root"] / "data"),
        "--shots",
        "1,2",
        "--seeds",
        "1,2",
        "--views",
        "2",
        "--out",
        str(out),
        "--hparam",
        "tip-adapter:steps=20,5",
        "--hparam",
        "max_iter=20",
        *_backbone_args(world),
    ]
    assert cli.main(argv) == 0
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(runs) == 2 * (1 + 2 * 2 * 2)  # zero-shot once + 2 methods x 2 shots x 2 seeds
    record = json.loads((out / "runs" / runs[0]).read_text())
    assert {"dataset", "model", "pretrained", "method", "shots", "seed", "metrics"} <= set(record)
    assert len(list((out / "subsets").glob("*.json"))) == 2 * 2 * 2
    table = (out / "results.md").read_text()
    assert "| method | shots | toya | toyb | average |" in table
    assert table.count("tip-adapter |") == 2 and "±" in table
    for png in ("toya.png", "toyb.png", "average.png"):
        assert (out / "curves" / png).read_bytes()[:4] == b"\x89PNG"

    # mean ± std over seeds, average over datasets: recomputed from the JSONs
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    for r in records:  # wall-clock seconds per phase; zero-shot has no fit
        want = {"eval"} if r["method"] == "zero-shot" else {"extract", "fit", "eval"}
        assert set(r["seconds"]) == want and all(v >= 0 for v in r["seconds"].values())
    tip = {
        d: [
            r["metrics"]["top1"]
            for r in records
            if (r["method"], r["shots"], r["dataset"]) == ("tip-adapter", 2, d)
        ]
        for d in ("toya", "toyb")
    }
    row = next(line for line in table.splitlines() if line.startswith("| tip-adapter | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{np.mean(tip['toya']):.2f} ± {np.std(tip['toya'], ddof=1):.2f}"
    assert cells[4] == f"{(np.mean(tip['toya']) + np.mean(tip['toyb'])) / 2:.2f}"

    capsys.readouterr()
    assert cli.main(argv) == 0  # everything finished: nothing reruns
    assert "0 runs done, 18 skipped" in capsys.readouterr().out
    (out / "runs" / runs[3]).unlink()
    assert cli.main(argv) == 0
    assert "1 runs done, 17 skipped" in capsys.readouterr().out
    # other weights under the same --model: the stored runs are not theirs, so all rerun
    other = [*argv[: -len(_backbone_args(world))], *_backbone_args(world, "other_weights")]
    assert cli.main(other) == 0
    assert "18 runs done, 0 skipped" in capsys.readouterr().out
