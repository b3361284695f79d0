"""The "reference" recipe: the authors' protocol, test-set selection included, and how results
record it (docs/fidelity.md)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_fewshot import _backbone_args, _fit, world  # noqa: F401  (module fixture)
from test_methods import synthetic_task

from clipadapt import cli
from clipadapt.errors import ClipAdaptError
from clipadapt.methods import get, load_adapter
from clipadapt.methods.tip_adapter import search_hparams, tip_logits
from clipadapt.report import TEST_NOTE, markdown_table, row_label


def _accuracy(logits, labels):
    return float((logits.argmax(-1) == labels).float().mean())


def test_tip_adapter_f_reference_follows_main_py():
    """main.py:76-141: the epoch of best test accuracy at the initial (α, β), a (β, α) search
    on the whole validation split with those keys, then max(best-epoch, after-search) on test."""
    train, _, test, text = synthetic_task(seed=3, classes=6, dim=32, shots=8)
    _, full_val, _, _ = synthetic_task(seed=4, classes=6, dim=32, shots=8)
    m = get("tip-adapter-f", recipe="reference", epochs=6, steps=(20, 5), dataset="dtd")
    assert m.needs_test() and m.selection() == "test" and m.val_source() == "val"
    m.fit(train, text, val=full_val, test=test)
    f = m.fitted
    per_epoch = f["epoch_test_accuracies"]
    assert len(per_epoch) == 6  # epochs 1..6; the untrained keys are no candidate
    assert f["epoch"] == 1 + per_epoch.index(max(per_epoch))  # the first best, `acc > best_acc`
    feats = torch.nn.functional.normalize(test.features, dim=-1)
    alpha0, beta0 = m.config.initial()
    at_initial = tip_logits(feats, m.keys, m.values, m.text_weights, alpha0, beta0)
    assert _accuracy(at_initial, test.labels) == pytest.approx(f["epoch_test_accuracy"])
    assert f["epoch_test_accuracy"] == pytest.approx(max(per_epoch))
    vf = torch.nn.functional.normalize(full_val.features, dim=-1)
    beta, alpha, _ = search_hparams(
        vf, full_val.labels, m.keys, m.values, m.text_weights, 13.0, 13.0, (20, 5)
    )
    searched = tip_logits(feats, m.keys, m.values, m.text_weights, alpha, beta)
    assert _accuracy(searched, test.labels) == pytest.approx(f["after_search_test_accuracy"])
    reported = max(f["epoch_test_accuracy"], f["after_search_test_accuracy"])
    assert _accuracy(m.logits(test), test.labels) == pytest.approx(reported)
    if f["epoch_test_accuracy"] > f["after_search_test_accuracy"]:
        assert (f["alpha"], f["beta"], f["reported"]) == (alpha0, beta0, "best-epoch")
    else:
        assert (f["alpha"], f["beta"], f["reported"]) == (alpha, beta, "after-search")


def test_reference_needs_the_test_set_and_clean_never_sees_it():
    train, val, _, text = synthetic_task(seed=5, classes=4, dim=16, shots=4)
    ref = get("tip-adapter-f", recipe="reference", epochs=2, steps=(10, 5))
    with pytest.raises(ClipAdaptError, match="needs the validation and test features"):
        ref.fit(train, text, val=val)
    clean = get("tip-adapter-f", epochs=2, steps=(10, 5))
    assert not clean.needs_test() and clean.selection() == "val"
    assert clean.val_source() == "fewshot"
    with pytest.raises(ClipAdaptError, match="recipe='dirty'"):
        get("tip-adapter", recipe="dirty")


def test_tip_adapter_reference_searches_on_the_whole_val_split_or_imagenets_test():
    # datasets/*.py subsample only train; main_imagenet.py searches on test_features
    assert get("tip-adapter", recipe="reference", dataset="dtd").val_source() == "val"
    imagenet = get("tip-adapter", recipe="reference", dataset="imagenet")
    assert imagenet.val_source() == "test" and imagenet.selection() == "test"
    assert get("tip-adapter", dataset="imagenet").val_source() == "fewshot"


def test_a_saved_adapter_keeps_its_recipe(tmp_path):
    train, val, test, text = synthetic_task(seed=6, classes=4, dim=16, shots=4)
    m = get("tip-adapter-f", recipe="reference", epochs=2, steps=(10, 5))
    m.fit(train, text, val=val, test=test).save(tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "config.json").read_text())
    assert doc["recipe"] == "reference" and doc["fitted"]["selection"] == "test"
    back = load_adapter(tmp_path / "a")
    assert back.recipe == "reference" and back.selection() == "test"
    assert torch.equal(back.logits(test), m.logits(test))


def test_mh_adapter_reference_takes_the_authors_per_task_setting():
    from clipadapt.protocols.streetscapes import build_method

    # run-comparison.sh:139-146, "<loss> <weighting> <blend> <heads>"
    want = {"quality": (True, 0.2, 16), "glare": (False, 0.8, 4), "weather": (False, 0.2, 8)}
    for task, (weights, ratio, heads) in want.items():
        m = build_method(
            "mh-adapter", {}, scale=50.0, seed=1, device="cpu", recipe="reference", task=task
        )
        assert (m.config.class_weights, m.config.ratio, m.config.heads) == (weights, ratio, heads)
        clean = build_method("mh-adapter", {}, scale=50.0, seed=1, device="cpu", task=task)
        assert (clean.config.class_weights, clean.config.ratio, clean.config.heads) == (
            False, 0.2, 4,
        )  # fmt: skip
    explicit = build_method(
        "mh-adapter", {"heads": 2}, scale=50.0, seed=1, device="cpu", recipe="reference",
        task="quality",
    )  # fmt: skip
    assert explicit.config.heads == 2  # an explicit value still wins
    unknown = build_method(
        "mh-adapter", {}, scale=50.0, seed=1, device="cpu", recipe="reference", task="my_task"
    )
    assert unknown.config.heads == 4  # a task the authors did not run: the unconfigured default


def test_report_marks_test_selected_rows():
    base = {"dataset": "d", "shots": 16, "metrics": {"top1": 70.0}}
    clean = {**base, "method": "tip-adapter-f", "recipe": "clean", "selection": "val", "seed": 1}
    ref = {**base, "method": "tip-adapter-f", "recipe": "reference", "selection": "test"}
    ref = {**ref, "seed": 1, "metrics": {"top1": 72.0}}
    assert row_label(clean) == "tip-adapter-f"
    assert row_label(ref) == "tip-adapter-f (reference) †"
    old = {k: v for k, v in clean.items() if k not in ("recipe", "selection")}
    assert row_label(old) == "tip-adapter-f"  # results written before recipes existed
    table = markdown_table([clean, ref], methods=["tip-adapter-f"])
    lines = table.splitlines()
    assert lines[2].startswith("| tip-adapter-f | 16 | 70.00")
    assert lines[3].startswith("| tip-adapter-f (reference) † | 16 | 72.00")
    assert TEST_NOTE in table
    assert TEST_NOTE not in markdown_table([clean], methods=["tip-adapter-f"])


def test_bench_reference_recipe_records_and_marks_test_selection(world, tmp_path):  # noqa: F811
    out = tmp_path / "bench"
    common = [
        "bench",
        "--datasets",
        "toy_a",
        "--data-root",
        str(world["root"] / "data"),
        "--shots",
        "2",
        "--seeds",
        "1",
        "--views",
        "2",
        "--out",
        str(out),
        "--hparam",
        "tip-adapter-f:steps=20,5",
        "--hparam",
        "tip-adapter-f:epochs=3",
        *_backbone_args(world),
    ]
    assert cli.main([*common, "--methods", "zero-shot,tip-adapter-f"]) == 0
    clean_table = (out / "results.md").read_text()
    assert "†" not in clean_table
    assert cli.main([*common, "--methods", "tip-adapter-f", "--recipe", "reference"]) == 0
    runs = {p.name: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    ref = runs["toya__tiny-test-vit__tip-adapter-f@reference__2shot__seed1.json"]
    clean = runs["toya__tiny-test-vit__tip-adapter-f__2shot__seed1.json"]
    zero = runs["toya__tiny-test-vit__zero-shot__0shot__seedNone.json"]
    assert (ref["recipe"], ref["selection"]) == ("reference", "test")
    assert (clean["recipe"], clean["selection"]) == ("clean", "val")
    assert (zero["recipe"], zero["selection"]) == ("clean", "none")
    assert ref["fitted"]["epoch"] in (1, 2, 3) and len(ref["fitted"]["epoch_test_accuracies"]) == 3
    table = (out / "results.md").read_text()
    assert "| tip-adapter-f (reference) † | 2 |" in table and TEST_NOTE in table
    assert "| tip-adapter-f | 2 |" not in table  # one recipe per table


def test_fit_reference_warns_and_eval_records_the_recipe(world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ref"
    extra = ["--hparam", "steps=20,5", "--hparam", "epochs=2", "--recipe", "reference"]
    assert _fit(world, out, "tip-adapter-f", *extra) == 0
    assert "the test set chose this model" in capsys.readouterr().out
    doc = json.loads((out / "config.json").read_text())
    assert doc["recipe"] == "reference" and doc["meta"]["selection"] == "test"
    assert doc["meta"]["val_images"] == 6  # the whole validation split (2 per class)
    result = tmp_path / "result.json"
    argv = ["eval", "--adapter", str(out), "--data", str(world["toy_a"]), "--split", "test"]
    argv += ["--cache", str(world["cache"]), "--num-workers", "0", "--out", str(result)]
    assert cli.main(argv) == 0
    record = json.loads(result.read_text())
    assert (record["recipe"], record["selection"]) == ("reference", "test")
