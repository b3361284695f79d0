"""Bad input and faults: each case a user can meet, and what clipadapt guarantees for it.

Cases already tested elsewhere are not repeated here: missing split files and unknown labels of
the readers and an empty class (test_data.py), fewer images than shots (test_data.py), a
truncated or non-image file in the library (test_cache.py), image modes (test_cache.py), a
tampered shard and a killed extraction (test_cache.py), checkpoint shape and key mismatches,
TorchScript without trust (test_backbones.py), an adapter on another backbone
(test_cli_fewshot.py).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, Counting, write_colour_dataset
from PIL import Image
from safetensors.torch import save_file

import clipadapt as ca
from clipadapt import cli
from clipadapt.backbones.base import Backbone
from clipadapt.data import load_split, load_subset
from clipadapt.data.dataset import ClassificationDataset, Item
from clipadapt.errors import ClipAdaptError
from clipadapt.features import extract
from clipadapt.features.cache import CacheEntry

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src" / "clipadapt"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}


def _write_dataset(folder: Path, name: str, colours: dict, per_split=(4, 1, 2)) -> Path:
    return write_colour_dataset(folder, name, colours, per_split, seed=len(name))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("robustness")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_VIT, pretrained=None)
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {
        "root": root,
        "toy": _write_dataset(root / "toy", "Toy", COLOURS),
        "weights": weights,
        "state_dict": model.state_dict(),
    }


@pytest.fixture
def commands(monkeypatch):
    """The commands these tests run (others may be half-written by their authors)."""
    monkeypatch.setattr(cli, "COMMANDS", ["extract", "zeroshot", "fit", "eval"])


def _model_args(world, weights=None) -> list[str]:
    return ["--model", TINY_VIT, "--pretrained", str(weights or world["weights"])]


def _one_error_line(capsys) -> str:
    """The error the command printed: one line, the last on stderr, no traceback."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:] and lines[-1].startswith("clipadapt: error: "), err
    return lines[-1]


# --- bad images ----------------------------------------------------------------------------------
def test_cli_unreadable_image_stops_with_one_line_or_is_skipped_and_recorded(
    world, commands, tmp_path, capsys
):
    data = tmp_path / "toy"
    shutil.copytree(world["toy"], data)
    bad = data / "images" / "green" / "test1.png"
    bad.write_bytes(bad.read_bytes()[:50])
    cache, result = tmp_path / "cache", tmp_path / "zs.json"
    argv = ["zeroshot", *_model_args(world), "--data", str(data), "--num-workers", "0"]
    argv += ["--cache", str(cache), "--out", str(result)]
    assert cli.main(argv) == 2
    err = _one_error_line(capsys)
    assert f"{bad}: cannot read image" in err and "--skip-bad" in err
    assert not result.exists()

    assert cli.main([*argv, "--skip-bad"]) == 0  # warnings print as one clipadapt line
    assert (
        "clipadapt: warning: " in (err := capsys.readouterr().err) and "skipped 1 unreadable" in err
    )
    record = json.loads(result.read_text())
    assert [s["path"] for s in record["skipped"]] == [str(bad)]
    assert "truncated" in record["skipped"][0]["reason"]
    (entry,) = cache.glob("embed-v0-*")
    manifest = json.loads((entry / "manifest.json").read_text())
    assert [(b["index"], b["path"]) for b in manifest["bad"]] == [(3, str(bad))]


def test_every_image_mode_is_encoded_as_its_rgb_image(tiny_vit_backbone, tmp_path):
    size = (12, 10)
    cases = {  # file -> (image as stored, the RGB image it stands for)
        "gray.png": (Image.new("L", size, 100), (100, 100, 100)),
        "gray16.png": (Image.fromarray(np.full(size[::-1], 200 * 257, np.uint16)), (200,) * 3),
        "rgba.png": (Image.new("RGBA", size, (10, 20, 30, 0)), (10, 20, 30)),
        "gray-alpha.png": (Image.new("LA", size, (77, 0)), (77, 77, 77)),
        "cmyk.tif": (Image.new("CMYK", size, (0, 255, 255, 0)), (255, 0, 0)),
        "bilevel.png": (Image.new("1", size, 1), (255, 255, 255)),
    }
    palette = Image.new("P", size, 0)
    palette.putpalette([0, 200, 0] * 256)
    cases["palette.png"] = (palette, (0, 200, 0))
    items = []
    for name, (image, _) in cases.items():
        image.save(tmp_path / name)
        items.append(Item(str(tmp_path / name), 0, "x"))
    ds = ClassificationDataset("modes", str(tmp_path), items, ["x"], split="test")
    fs = extract(tiny_vit_backbone, ds, num_workers=1, batch_size=3, progress=False)
    assert len(fs) == len(cases)
    bb = tiny_vit_backbone
    rgb = torch.stack([bb.preprocess(Image.new("RGB", size, c)) for _, c in cases.values()])
    torch.testing.assert_close(fs.features, bb.encode_images(rgb, normalize=False))


def test_an_image_too_large_to_decode_safely_is_refused(tiny_vit_backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns above it, fails above 2x
    items = []
    for name, side in (("small", 20), ("large", 40), ("huge", 50)):
        Image.new("RGB", (side, side), (1, 2, 3)).save(tmp_path / f"{name}.png")
        items.append(Item(str(tmp_path / f"{name}.png"), 0, "x"))
    ds = ClassificationDataset("big", str(tmp_path), items, ["x"], split="test")
    with pytest.raises(ClipAdaptError, match="large.png: cannot read image .*too large") as e:
        extract(tiny_vit_backbone, ds, num_workers=0, progress=False)
    assert "\n" not in str(e.value)
    stats: dict = {}
    with pytest.warns(UserWarning, match="skipped 2"):
        fs = extract(
            tiny_vit_backbone, ds, num_workers=0, skip_bad=True, progress=False, stats=stats
        )
    assert fs.paths == [items[0].path]
    assert all("too large to decode safely" in b["reason"] for b in stats["bad"])


# --- split files, checkpoints, adapters ---------------------------------------------------------
def test_a_subset_file_with_unknown_labels_or_no_structure_is_one_line(tmp_path):
    doc = {"dataset": "d", "root": "/", "classnames": ["a", "b"], "val": []}
    for train, expect in (
        ([["/x.png", 2]], "unknown label 2 for /x.png"),
        ([["/x.png"]], "not a few-shot subset file"),
        ("nonsense", "not a few-shot subset file"),
    ):
        (tmp_path / "subset.json").write_text(json.dumps({**doc, "train": train}))
        with pytest.raises(ClipAdaptError, match=expect) as e:
            load_subset(tmp_path / "subset.json")
        assert "\n" not in str(e.value)


def test_cli_checkpoint_that_does_not_fit_is_one_line(world, commands, tmp_path, capsys):
    sd = {k: v.contiguous() for k, v in world["state_dict"].items()}
    sd["visual.proj"] = torch.zeros(7, 32)
    save_file(sd, str(tmp_path / "misfit.safetensors"))
    argv = ["extract", *_model_args(world, tmp_path / "misfit.safetensors")]
    assert cli.main([*argv, "--data", str(world["toy"]), "--out", str(tmp_path / "c")]) == 2
    err = _one_error_line(capsys)
    assert "misfit.safetensors" in err and "visual.proj is (7, 32)" in err


def test_an_adapter_refuses_another_class_list(world, commands, tmp_path, capsys):
    adapter, cache = tmp_path / "zs", tmp_path / "cache"
    common = [*_model_args(world), "--cache", str(cache), "--num-workers", "0"]
    fit = ["fit", "--method", "zero-shot", "--data", str(world["toy"]), "--shots", "1"]
    assert cli.main([*fit, "--out", str(adapter), *common]) == 0
    other = _write_dataset(tmp_path / "other", "Other", {"cyan": (0, 200, 200), **COLOURS})
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(adapter), "--data", str(other), *common[4:]]) == 2
    err = _one_error_line(capsys)
    assert "4 classes differ from the 3 classes the adapter" in err


# --- trust ---------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it creates the directory ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker, 0o777, True))


def test_a_pickled_checkpoint_runs_no_code_unless_trusted(world, commands, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": dict(world["state_dict"]), "extra": Payload(marker)}, evil)
    argv = ["extract", *_model_args(world, evil), "--data", str(world["toy"]), "--split", "val"]
    argv += ["--out", str(tmp_path / "cache"), "--num-workers", "0"]
    assert cli.main(argv) == 2
    err = _one_error_line(capsys)
    assert "evil.pt" in err and "--trust-checkpoint" in err and not marker.exists()

    assert cli.main([*argv, "--trust-checkpoint"]) == 0
    assert marker.is_dir()  # the user vouched for the file, so it was unpickled
    trusted = ca.load_backbone(TINY_VIT, str(evil), trust_checkpoint=True)
    plain = ca.load_backbone(TINY_VIT, str(world["weights"]))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(trusted.encode_images(x), plain.encode_images(x))


def test_adapters_and_caches_are_safetensors_and_json_only(world, commands, tmp_path, capsys):
    adapter, cache = tmp_path / "zs", tmp_path / "cache"
    common = [*_model_args(world), "--cache", str(cache), "--num-workers", "0"]
    fit = ["fit", "--method", "zero-shot", "--data", str(world["toy"]), "--shots", "1"]
    assert cli.main([*fit, "--out", str(adapter), *common]) == 0
    files = [p for p in [*adapter.rglob("*"), *cache.rglob("*")] if p.is_file()]
    assert files and {p.suffix for p in files} == {".json", ".safetensors"}

    # a pickle planted where clipadapt reads safetensors is refused without being unpickled
    marker = tmp_path / "code-ran"
    torch.save({"w": Payload(marker)}, adapter / "model.safetensors")
    with pytest.raises(ClipAdaptError, match="model.safetensors: cannot read safetensors"):
        ca.load_adapter(adapter)
    shard = next(cache.glob("embed-v0-*/shard-00000.safetensors"))
    torch.save({"rows": Payload(marker)}, shard)
    (text_cache,) = cache.glob("text-*.safetensors")
    torch.save({"weights": Payload(marker)}, text_cache)
    assert (
        cli.main([*fit, "--out", str(tmp_path / "again"), *common]) == 0
    )  # warnings print as one clipadapt line
    assert (
        "clipadapt: warning: " in (err := capsys.readouterr().err)
        and "does not match its digest" in err
    )
    assert not marker.exists()
    assert (adapter.parent / "again" / "model.safetensors").is_file()


def test_no_code_path_unpickles_without_the_trust_flag():
    """Source scan: torch.load only with weights_only=True, except the one trusted fallback."""
    untrusted, trusted = [], []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            if name in ("pickle.load", "pickle.loads", "torch.jit.load", "torch.load"):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if name == "torch.load" and kw.get("weights_only") == "True":
                    continue
                (trusted if "checkpoint.py" in where else untrusted).append(f"{where} {name}")
            if name.endswith("load") and any(k.arg == "allow_pickle" for k in node.keywords):
                untrusted.append(f"{where} allow_pickle")
    assert untrusted == []
    assert sorted(t.split()[1] for t in trusted) == ["torch.jit.load", "torch.load"]


# --- writes that fail ----------------------------------------------------------------------------
def test_an_unwritable_output_is_one_line(world, commands, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = ["--data", str(world["toy"]), "--split", "val", "--num-workers", "0"]
    assert cli.main(["extract", *_model_args(world), *data, "--out", str(blocker / "c")]) == 2
    err = _one_error_line(capsys)
    assert f"{blocker}/c/embed-v0-" in err and "cannot create directory (Not a directory)" in err
    argv = ["zeroshot", *_model_args(world), *data, "--cache", str(tmp_path / "cache")]
    assert cli.main([*argv, "--out", str(blocker / "r.json")]) == 2
    assert f"{blocker}: cannot create directory" in _one_error_line(capsys)
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli.main([*argv, "--out", str(locked / "r.json")]) == 2
        assert "r.json: cannot write" in _one_error_line(capsys)


@pytest.fixture
def twelve(tmp_path):
    """12 images in 3 class folders (a train split only, kept whole: split ratios 1,0,0)."""
    rng = np.random.default_rng(0)
    for i in range(12):
        path = tmp_path / "data" / "train" / "abc"[i % 3] / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    return load_split(tmp_path / "data", "train", split_ratios="1,0,0")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("full", ["shard-00001.safetensors", "manifest.json"])
def test_a_full_disk_during_a_write_loses_nothing(tiny_vit_backbone, twelve, tmp_path, full):
    """The temporary file of the write is a link to /dev/full: the kernel answers ENOSPC."""
    kw = {"shard_size": 4, "batch_size": 2, "num_workers": 0, "progress": False}
    stats: dict = {}
    whole = extract(tiny_vit_backbone, twelve, cache_dir=tmp_path / "c", stats=stats, **kw)
    entry = Path(stats["entries"]["embed-v0"])
    shutil.rmtree(entry)
    entry.mkdir()
    (entry / f"{full}.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(ClipAdaptError, match=f"{full}: cannot write \\(No space left") as e:
        extract(tiny_vit_backbone, twelve, cache_dir=tmp_path / "c", **kw)
    assert "\n" not in str(e.value) and not list(entry.glob("*.tmp-*"))
    listed = []
    if (entry / "manifest.json").exists():
        listed = [s["stop"] for s in json.loads((entry / "manifest.json").read_text())["shards"]]
    assert listed == ([4] if full.startswith("shard") else [])

    again = Counting(tiny_vit_backbone)
    fs = extract(again, twelve, cache_dir=tmp_path / "c", **kw)
    assert again.images == 12 - 4 * len(listed)
    assert torch.equal(fs.features, whole.features)


# --- Ctrl-C ---------------------------------------------------------------------------------------
INTERRUPT = """
import functools, os, signal, sys, warnings
sys.path.insert(0, {tests!r})
import conftest
from torch.optim.optimizer import register_optimizer_step_pre_hook
import clipadapt.features as features
from clipadapt import cli
from clipadapt.backbones.base import Backbone

warnings.simplefilter("ignore")
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if we inherit
cli.COMMANDS = ["extract", "fit"]                          # SIGINT ignored (a background job)
features.extract = functools.partial(features.extract, shard_size=4)
encode, calls = Backbone.encode_images, {{"encode": 0, "step": 0}}

def ctrl_c():  # what a terminal does: SIGINT to the whole foreground process group
    os.killpg(0, signal.SIGINT)

def encode_then_ctrl_c(self, x, normalize=True):
    calls["encode"] += 1
    if {during!r} == "extraction" and calls["encode"] == 4:  # shard 0 is written, 4-5 not
        ctrl_c()
    return encode(self, x, normalize)

def step_then_ctrl_c(optimizer, args, kwargs):
    calls["step"] += 1
    if {during!r} == "training" and calls["step"] == 2:
        ctrl_c()

Backbone.encode_images = encode_then_ctrl_c
register_optimizer_step_pre_hook(step_then_ctrl_c)
sys.exit(cli.main(sys.argv[1:]))
"""


def _interrupted(tmp_path: Path, during: str, argv: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / "interrupt.py"
    script.write_text(textwrap.dedent(INTERRUPT.format(tests=str(TESTS), during=during)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(script), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,  # its own process group, as a terminal job
    )


def test_ctrl_c_during_extraction_then_rerun_resumes(world, commands, twelve, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["extract", *_model_args(world), "--data", twelve.root, "--split", "train"]
    argv += ["--split-ratios", "1,0,0"]
    argv += ["--out", str(cache), "--batch-size", "2", "--num-workers", "1"]
    proc = _interrupted(tmp_path, "extraction", argv)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted; finished work is kept, rerun to resume" in proc.stderr
    (entry,) = cache.iterdir()
    manifest = json.loads((entry / "manifest.json").read_text())
    assert [s["stop"] for s in manifest["shards"]] == [4] and not manifest["complete"]
    assert not list(entry.glob("*.tmp-*"))

    assert cli.main(argv) == 0
    assert "8 computed, 4 reused" in capsys.readouterr().out
    bb = ca.load_backbone(TINY_VIT, str(world["weights"]))
    resumed = extract(bb, twelve, cache_dir=cache, num_workers=0, progress=False)
    fresh = extract(bb, twelve, batch_size=2, num_workers=0, progress=False)
    assert torch.equal(resumed.features, fresh.features)


def test_ctrl_c_during_training_loses_nothing(world, commands, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    fit = ["fit", "--method", "clip-adapter", "--data", str(world["toy"]), "--shots", "1"]
    fit += ["--views", "1", "--hparam", "epochs=2", *_model_args(world), "--cache", str(cache)]
    fit += ["--num-workers", "0"]
    proc = _interrupted(tmp_path, "training", [*fit, "--out", str(tmp_path / "a")])
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "interrupted; finished work is kept" in proc.stderr
    assert not (tmp_path / "a" / "config.json").exists()  # no adapter is better than half of one
    assert not list(tmp_path.glob("a/*.tmp-*"))
    manifests = [json.loads(p.read_text()) for p in cache.glob("*/manifest.json")]
    assert manifests and all(m["complete"] for m in manifests)

    encoded, encode = [], Backbone.encode_images

    def counting(self, x, normalize=True):
        encoded.append(len(x))
        return encode(self, x, normalize)

    monkeypatch.setattr(Backbone, "encode_images", counting)
    assert cli.main([*fit, "--out", str(tmp_path / "a")]) == 0
    assert encoded == []  # the rerun found every feature it needs in the cache
    assert cli.main([*fit, "--out", str(tmp_path / "b")]) == 0
    resumed, uninterrupted = ca.load_adapter(tmp_path / "a"), ca.load_adapter(tmp_path / "b")
    for key, value in uninterrupted.state_tensors().items():
        assert torch.equal(resumed.state_tensors()[key], value)


# --- the cache's own documents --------------------------------------------------------------------
FIELDS = {"stream": "test"}


def test_part_files_of_sharded_writers_are_folded_and_checked(tmp_path):
    rows = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    # rank 1 of a sharded run wrote shard [4, 8) and its part file, then the run stopped
    rank1 = CacheEntry(tmp_path, "s", FIELDS, 10, 4, rank=1)
    rank1.write_shard(4, rows[4:8], [{"index": 5, "path": "/5.png", "reason": "bad"}])
    assert sorted(p.name for p in rank1.path.iterdir()) == [
        "part-00001.json",
        "shard-00001.safetensors",
    ]
    # a single writer later sees that shard, writes the rest and folds the part in
    alone = CacheEntry(tmp_path, "s", FIELDS, 10, 2048)
    assert alone.shard_size == 4 and alone.missing() == [(0, 4), (8, 10)]
    alone.write_shard(0, rows[:4], [])
    alone.write_shard(8, rows[8:], [])
    assert alone.complete and torch.equal(alone.read(), rows)
    manifest = json.loads((alone.path / "manifest.json").read_text())
    assert manifest["complete"] and [b["index"] for b in manifest["bad"]] == [5]
    assert not list(alone.path.glob("part-*"))
    assert torch.equal(CacheEntry(tmp_path, "s", FIELDS, 10, 4).read(), rows)

    # a part whose shard was changed afterwards is discarded, with its shard
    other = CacheEntry(tmp_path, "t", FIELDS, 10, 4, rank=0)
    other.write_shard(0, rows[:4], [])
    save_file({"rows": rows[:4] + 1}, str(other.path / "shard-00000.safetensors"))
    with pytest.warns(UserWarning, match="part-00000.json: shard shard-00000.safetensors does"):
        fresh = CacheEntry(tmp_path, "t", FIELDS, 10, 4)
    assert fresh.missing() == [(0, 4), (4, 8), (8, 10)] and not list(fresh.path.iterdir())


def test_a_manifest_cannot_point_outside_its_entry(tmp_path):
    victim = tmp_path / "victim.safetensors"
    save_file({"rows": torch.zeros(4, 3)}, str(victim))
    entry = CacheEntry(tmp_path / "cache", "s", FIELDS, 4, 4)
    doc = {"key": entry.key, "count": 4, "shard_size": 4}
    shard = {"file": "../../victim.safetensors", "start": 0, "stop": 4, "sha256": "x"}
    (entry.path / "manifest.json").write_text(json.dumps({**doc, "shards": [shard]}))
    with pytest.warns(UserWarning, match="wrong name"):
        reopened = CacheEntry(tmp_path / "cache", "s", FIELDS, 4, 4)
    assert reopened.missing() == [(0, 4)] and victim.is_file()
