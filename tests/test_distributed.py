"""torch.distributed: rank helpers, and `torchrun -m clipadapt extract` equal to one process.

The torchrun tests start 2 gloo processes on the CPU (`python -m torch.distributed.run`) over
the tiny test model, and compare with a one-process run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT, Counting
from PIL import Image
from safetensors.torch import save_file

from clipadapt import cli, distributed
from clipadapt.data import load_split
from clipadapt.errors import ClipAdaptError
from clipadapt.features import extract
from clipadapt.features.extract import _AlignedBatches, _sharded_size

TESTS = Path(__file__).parent
N_IMAGES = 12  # classes a, b, c with 4 images each; image 9 (c/01.png) lies in rank 1's half


# --- the helpers in one process ----------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_shards_partition_the_items(world):
    for n in (0, 1, 4, 7, 12, 101):
        blocks = [distributed.shard_range(n, r, world) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))
        assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1
        for i in range(n):
            assert i in blocks[distributed.owner(i, n, world)]
        items = [10 * i for i in range(n)]
        parts = [distributed.shard_indices(items, r, world) for r in range(world)]
        assert sum(parts, []) == items


def test_helpers_are_no_ops_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cpu") == (0, 1, "cpu")
    assert not distributed.is_distributed() and distributed.is_main()
    assert distributed.rank_world() == (0, 1)
    assert distributed.shard_indices([3, 1, 2]) == [3, 1, 2]
    t = torch.arange(4)
    s = distributed.all_sum(t)
    assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.raise_if_any(None)
    with pytest.raises(ClipAdaptError, match="^boom$"):
        distributed.raise_if_any("boom")


def test_sharded_shards_and_batches_line_up():
    # a rank's share rounded up to whole batches, never above the requested shard size
    assert _sharded_size(2048, 12, 2, 2) == 6
    assert _sharded_size(2048, 12, 2, 4) == 8
    assert _sharded_size(4, 1000, 2, 64) == 4
    assert _sharded_size(2048, 100_000, 8, 64) == 2048
    # batches follow row // batch_size, so a resumed or sharded run batches images as one run
    assert list(_AlignedBatches([(6, 9), (0, 3), (5, 7)], 3)) == [[0, 1, 2], [5], [6, 7, 8]]
    assert list(_AlignedBatches([(0, 2), (2, 4), (8, 9)], 3)) == [[0, 1, 2], [3], [8]]
    assert len(_AlignedBatches([(0, 2), (2, 4), (8, 9)], 3)) == 3


# --- torchrun ----------------------------------------------------------------------------------
def _write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        path = root / "train" / "abc"[i // 4] / f"{i % 4:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("distributed")
    _write_images(root / "data")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_VIT, pretrained=None)
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    bad = root / "data" / "train" / "c" / "01.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    return {"root": root, "data": root / "data", "weights": weights, "bad": bad}


def _torchrun(script: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _extract_args(setup, out: Path) -> list[str]:
    return [
        "extract",
        "--model",
        TINY_VIT,
        "--pretrained",
        str(setup["weights"]),
        "--data",
        str(setup["data"]),
        "--split",
        "train",
        "--split-ratios",
        "1,0,0",  # a train/ folder alone: every image in train
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--augment-views",
        "1",
        "--skip-bad",
    ]


def _cached(setup, cache: Path):
    """The FeatureSet in ``cache``, asserting that nothing had to be computed."""
    import clipadapt as ca

    bb = Counting(ca.load_backbone(TINY_VIT, str(setup["weights"])))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        fs = extract(
            bb,
            load_split(setup["data"], "train", split_ratios="1,0,0"),
            views=1,
            cache_dir=cache,
            skip_bad=True,
            num_workers=0,
            progress=False,
        )
    assert bb.images == 0
    return fs


SCRIPT = """
import json, sys, warnings
sys.path.insert(0, {tests!r})
import conftest  # registers the tiny test architectures with open_clip
import torch
import clipadapt as ca
from clipadapt import cli, distributed
from clipadapt.data import load_split
from clipadapt.errors import ClipAdaptError
from clipadapt.features import extract

warnings.simplefilter("ignore")
rank, world, device = distributed.init("cpu")
out = {{"rank_world": [rank, world], "device": device, "main": distributed.is_main()}}
mine = distributed.shard_indices(list(range(7)))
out["mine"] = mine
# each rank counts its items into a confusion matrix; the sum is the one-process matrix
conf = torch.zeros(3, 3, dtype=torch.long)
for i in mine:
    conf[i % 3, (i * i) % 3] += 1
out["confusion"] = distributed.all_sum(conf).tolist()
out["objects"] = distributed.all_gather_objects({{"rank": rank}})
try:
    distributed.raise_if_any("trouble on rank 1" if rank == 1 else None)
except ClipAdaptError as e:
    out["shared_error"] = str(e)
# an unreadable image in rank 1's half, without skip_bad: every rank raises rank 1's error
bb = ca.load_backbone({model!r}, {weights!r})
try:
    extract(bb, load_split({data!r}, "train", split_ratios="1,0,0"),
            cache_dir=sys.argv[1] + "/failed", batch_size=2, num_workers=0, progress=False)
except ClipAdaptError as e:
    out["extract_error"] = str(e)
with open(f"{{sys.argv[1]}}/rank{{rank}}.json", "w") as f:
    json.dump(out, f)
# then the command, as `torchrun -m clipadapt extract ...` runs it
cli.COMMANDS = ["extract", "zeroshot"]  # the commands under test (others may be in progress)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def torchrun(setup, tmp_path_factory):
    """One `torchrun --nproc_per_node=2` job (gloo, CPU): the helpers, a failing extraction,
    then `clipadapt extract` into ``sharded``."""
    out = tmp_path_factory.mktemp("torchrun")
    script = out / "job.py"
    text = SCRIPT.format(
        tests=str(TESTS), model=TINY_VIT, weights=str(setup["weights"]), data=str(setup["data"])
    )
    script.write_text(textwrap.dedent(text))
    proc = _torchrun(script, str(out), *_extract_args(setup, out / "sharded"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "stdout": proc.stdout}


def test_torchrun_helpers_and_a_shared_error(setup, torchrun):
    ranks = [json.loads((torchrun["out"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank_world"] for r in ranks] == [[0, 2], [1, 2]]
    assert [r["main"] for r in ranks] == [True, False] and ranks[1]["device"] == "cpu"
    assert [r["mine"] for r in ranks] == [[0, 1, 2], [3, 4, 5, 6]]
    expected = torch.zeros(3, 3, dtype=torch.long)
    for i in range(7):
        expected[i % 3, (i * i) % 3] += 1
    assert ranks[0]["confusion"] == ranks[1]["confusion"] == expected.tolist()
    assert ranks[0]["objects"] == ranks[1]["objects"] == [{"rank": 0}, {"rank": 1}]
    assert ranks[0]["shared_error"] == ranks[1]["shared_error"] == "trouble on rank 1"
    message = f"{setup['bad']}: cannot read image"
    assert all(r["extract_error"].startswith(message) for r in ranks)


def test_a_failed_sharded_run_keeps_its_finished_shards(setup, torchrun):
    import clipadapt as ca

    cache = torchrun["out"] / "failed"
    (entry,) = cache.iterdir()
    # rank 0 finished rows 0-5 (its part file); rank 1 stopped at the unreadable row 9
    assert (entry / "part-00000.json").is_file() and not (entry / "part-00001.json").exists()
    bb = Counting(ca.load_backbone(TINY_VIT, str(setup["weights"])))
    dataset = load_split(setup["data"], "train", split_ratios="1,0,0")
    kw = {"skip_bad": True, "batch_size": 2, "num_workers": 0, "progress": False}
    with pytest.warns(UserWarning, match="skipped 1"):
        fs = extract(bb, dataset, cache_dir=cache, **kw)
    assert bb.images == 5  # rows 6-11 but the unreadable 9
    assert not list(entry.glob("part-*"))
    assert json.loads((entry / "manifest.json").read_text())["complete"]
    with pytest.warns(UserWarning, match="skipped 1"):
        fresh = extract(bb._bb, dataset, **kw)
    assert torch.equal(fs.features, fresh.features)


def test_torchrun_extract_equals_one_process(setup, torchrun, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["extract", "zeroshot"])
    # rank 0 alone reports, with the counts of both ranks
    lines = [ln for ln in torchrun["stdout"].splitlines() if "images x" in ln]
    assert len(lines) == 1 and "11 computed, 0 reused, 1 skipped" in lines[0], torchrun["stdout"]
    assert f"skipped {setup['bad']}" in torchrun["stdout"]

    sharded, single = torchrun["out"] / "sharded", tmp_path / "single"
    assert cli.main(_extract_args(setup, single)) == 0  # warnings print as one clipadapt line
    assert (
        "clipadapt: warning: " in (err := capsys.readouterr().err) and "skipped 1 unreadable" in err
    )
    capsys.readouterr()
    entries = sorted(p.name for p in sharded.iterdir())
    assert entries == sorted(p.name for p in single.iterdir()) and len(entries) == 2
    for name in entries:
        files = sorted(p.name for p in (sharded / name).iterdir())
        assert files == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
        manifest = json.loads((sharded / name / "manifest.json").read_text())
        one = json.loads((single / name / "manifest.json").read_text())
        assert manifest["complete"] and manifest["key"] == one["key"]
        assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 6), (6, 12)]
        assert manifest["bad"] == one["bad"] and [b["index"] for b in one["bad"]] == [9]
    a, b = _cached(setup, sharded), _cached(setup, single)
    assert a.paths == b.paths and len(a.paths) == N_IMAGES - 1
    assert torch.equal(a.features, b.features) and torch.equal(a.views, b.views)
    assert torch.equal(a.labels, b.labels)


# --- `clipadapt eval` under torchrun -----------------------------------------------------------
EVAL_SCRIPT = """
import sys, warnings
sys.path.insert(0, {tests!r})
import conftest  # registers the tiny test architectures with open_clip
from clipadapt import cli

warnings.simplefilter("ignore")
cli.COMMANDS = ["eval"]
sys.exit(cli.main(sys.argv[1:]))
"""


def test_torchrun_eval_equals_one_process(setup, tmp_path, capsys, monkeypatch):
    from test_cli_fewshot import _write_dataset

    monkeypatch.setattr(cli, "COMMANDS", ["fit", "eval"])
    data = _write_dataset(tmp_path / "toy", "Toy", seed=0, per_split=(2, 2, 4))
    model = ["--model", TINY_VIT, "--pretrained", str(setup["weights"]), "--num-workers", "0"]
    adapter = tmp_path / "adapter"
    fit = ["fit", "--method", "linear-probe", "--data", str(data), "--shots", "2"]
    assert cli.main([*fit, "--out", str(adapter), "--cache", str(tmp_path / "c0"), *model]) == 0
    bad = data / "images" / "green" / "test1.png"  # row 5 of 12: in rank 0's half
    bad.write_bytes(bad.read_bytes()[:60])

    def eval_args(name: str) -> list[str]:
        return [
            "eval",
            "--adapter",
            str(adapter),
            "--data",
            str(data),
            "--split",
            "test",
            "--skip-bad",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
            "--cache",
            str(tmp_path / f"cache-{name}"),
            "--out",
            str(tmp_path / f"{name}.json"),
        ]

    assert cli.main(eval_args("single")) == 0  # warnings print as one clipadapt line
    assert (
        "clipadapt: warning: " in (err := capsys.readouterr().err) and "skipped 1 unreadable" in err
    )
    capsys.readouterr()
    script = tmp_path / "eval_job.py"
    script.write_text(textwrap.dedent(EVAL_SCRIPT.format(tests=str(TESTS))))
    proc = _torchrun(script, *eval_args("sharded"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([ln for ln in proc.stdout.splitlines() if "images)" in ln]) == 1, proc.stdout
    single = json.loads((tmp_path / "single.json").read_text())
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    assert sharded["metrics"] == pytest.approx(single["metrics"], abs=1e-6)
    assert sharded["skipped"] == single["skipped"] and len(single["skipped"]) == 1
    assert single["skipped"][0]["path"] == str(bad)
    # each rank computed its half of the cached test features (two shards of 6 rows)
    (entry,) = (tmp_path / "cache-sharded").glob("*/manifest.json")
    manifest = json.loads(entry.read_text())
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 6), (6, 12)]


@pytest.mark.parametrize("command", ["fit", "eval", "predict", "segment", "seg-eval", "bench"])
def test_trust_checkpoint_is_an_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "--trust-checkpoint" in capsys.readouterr().out
