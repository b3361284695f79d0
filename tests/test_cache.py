"""Feature extraction and its cache: values, reuse, invalidation, resume, bad images, views."""

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
from conftest import Counting
from PIL import Image
from torchvision import transforms as T

from clipadapt.data import load_dataset
from clipadapt.errors import ClipAdaptError
from clipadapt.features import extract
from clipadapt.features.extract import _seeded, image_keys, load_rgb, to_rgb, view_seed

N_IMAGES = 12


def _write_images(root: Path, n: int = N_IMAGES) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = ("ant", "bee", "cow")[i % 3]
        (root / cls).mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(20, 60, size=2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / cls / f"{i:02d}.jpg"
        )


@pytest.fixture
def images(tmp_path):
    _write_images(tmp_path / "imgs")
    with pytest.warns(UserWarning, match="no train/val/test splits"):
        return load_dataset(tmp_path / "imgs", split_ratios="1,0,0")["train"]


def _plain_features(bb, paths: list[str]) -> torch.Tensor:
    """Eval embeddings one image at a time, no DataLoader, no cache."""
    return torch.cat([bb.encode_images(bb.preprocess(load_rgb(p))[None], False) for p in paths])


def test_extract_matches_the_plain_computation(tiny_vit_backbone, images, tmp_path):
    bb = tiny_vit_backbone
    fs = extract(bb, images, cache_dir=tmp_path / "c", batch_size=5, num_workers=2, progress=False)
    assert fs.features.shape == (N_IMAGES, bb.embed_dim) and fs.features.dtype == torch.float32
    torch.testing.assert_close(fs.features, _plain_features(bb, images.paths))
    assert fs.labels.tolist() == images.labels and fs.paths == images.paths
    assert fs.classnames == ["ant", "bee", "cow"] and fs.views is None and fs.tokens is None
    in_memory = extract(bb, images, cache_dir=None, batch_size=3, num_workers=0, progress=False)
    torch.testing.assert_close(in_memory.features, fs.features)


def test_second_call_reuses_the_cache(tiny_vit_backbone, images, tmp_path):
    first = Counting(tiny_vit_backbone)
    a = extract(
        first,
        images,
        views=2,
        cache_dir=tmp_path / "c",
        shard_size=5,
        num_workers=0,
        progress=False,
    )
    assert first.images == 3 * N_IMAGES
    again = Counting(tiny_vit_backbone)
    stats: dict = {}
    b = extract(
        again,
        images,
        views=2,
        cache_dir=tmp_path / "c",
        shard_size=5,
        num_workers=0,
        progress=False,
        stats=stats,
    )
    assert again.images == 0 and set(stats["computed"].values()) == {0}
    assert torch.equal(a.features, b.features) and torch.equal(a.views, b.views)
    # more views: the first two are reused, only view 3 is computed
    more = Counting(tiny_vit_backbone)
    c = extract(more, images, views=3, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert more.images == N_IMAGES and torch.equal(c.views[:2], a.views)


def test_changes_invalidate_the_cache(tiny_vit_backbone, images, tmp_path):
    import clipadapt as ca

    bb = tiny_vit_backbone
    base = extract(bb, images, cache_dir=tmp_path / "c", num_workers=0, progress=False)

    torch.manual_seed(1)
    other_weights = Counting(ca.load_backbone("tiny-test-vit"))
    fs = extract(other_weights, images, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert other_weights.images == N_IMAGES and not torch.allclose(fs.features, base.features)

    flip = T.Compose([T.RandomHorizontalFlip(p=1.0), bb.preprocess])
    other_transform = Counting(bb, preprocess=flip)
    extract(other_transform, images, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert other_transform.images == N_IMAGES

    changed = images.paths[4]
    Image.new("RGB", (30, 30), (255, 0, 0)).save(changed, format="JPEG")
    counting = Counting(bb)
    fs = extract(counting, images, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert counting.images == N_IMAGES
    torch.testing.assert_close(fs.features, _plain_features(bb, images.paths))

    fewer = Counting(bb)
    extract(fewer, images.subset(range(5)), cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert fewer.images == 5
    entries = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "c").iterdir()}
    assert entries == {"embed-v0"} and len(list((tmp_path / "c").iterdir())) == 5


def test_a_tampered_shard_is_rejected_and_recomputed(tiny_vit_backbone, images, tmp_path):
    bb = tiny_vit_backbone
    base = extract(
        bb, images, cache_dir=tmp_path / "c", shard_size=4, num_workers=0, progress=False
    )
    (entry,) = (tmp_path / "c").iterdir()
    shard = entry / "shard-00001.safetensors"
    from safetensors.torch import load_file, save_file

    rows = load_file(shard)["rows"]
    save_file({"rows": rows + 1.0}, shard)
    counting = Counting(bb)
    with pytest.warns(UserWarning, match="does not match its digest"):
        fs = extract(
            counting, images, cache_dir=tmp_path / "c", shard_size=4, num_workers=0, progress=False
        )
    assert counting.images == N_IMAGES and torch.equal(fs.features, base.features)


RESUME_SCRIPT = """
import os, signal, sys, warnings
sys.path.insert(0, {tests!r})
import conftest
import torch
import clipadapt as ca
from clipadapt.data import load_dataset
from clipadapt.features import extract

warnings.simplefilter("ignore")
torch.manual_seed(0)
bb = ca.load_backbone("tiny-test-vit")
encode, calls = bb.encode_images, [0]

def killed_midway(x, normalize=True):
    calls[0] += 1
    if calls[0] == 4:  # shard 0 (rows 0-3) is on disk, rows 4-5 are in memory
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(x, normalize)

bb.encode_images = killed_midway
images = load_dataset({data!r}, split_ratios="1,0,0")["train"]
extract(bb, images, cache_dir={cache!r}, shard_size=4, batch_size=2, num_workers=0, progress=False)
"""


def test_an_interrupted_extraction_resumes(tiny_vit_backbone, images, tmp_path):
    cache = tmp_path / "cache"
    script = RESUME_SCRIPT.format(
        tests=str(Path(__file__).parent), data=images.root, cache=str(cache)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, timeout=300)
    assert proc.returncode == -9
    (entry,) = cache.iterdir()
    manifest = json.loads((entry / "manifest.json").read_text())
    assert [s["stop"] for s in manifest["shards"]] == [4] and not manifest["complete"]

    resumed = Counting(tiny_vit_backbone)
    fs = extract(
        resumed, images, cache_dir=cache, shard_size=4, batch_size=2, num_workers=0, progress=False
    )
    assert resumed.images == N_IMAGES - 4
    whole = extract(
        tiny_vit_backbone,
        images,
        cache_dir=tmp_path / "fresh",
        shard_size=4,
        batch_size=2,
        num_workers=0,
        progress=False,
    )
    assert torch.equal(fs.features, whole.features)
    assert json.loads((entry / "manifest.json").read_text())["complete"]


def test_views_are_seeded_per_image_and_view(tiny_vit_backbone, images):
    bb = tiny_vit_backbone
    a = extract(bb, images, views=2, seed=7, batch_size=5, num_workers=2, progress=False)
    b = extract(bb, images, views=2, seed=7, batch_size=3, num_workers=0, progress=False)
    torch.testing.assert_close(a.views, b.views)
    assert a.views.shape == (2, N_IMAGES, bb.embed_dim)
    augment = bb.train_transform("rrc-flip")
    keys = image_keys(images)
    assert keys[0] == "ant/00.jpg"  # relative to the dataset root: the same on any machine
    for v, i in ((1, 0), (2, 5)):
        with _seeded(view_seed(7, v, keys[i])):
            x = augment(load_rgb(images.paths[i]))
        torch.testing.assert_close(a.views[v - 1, i], bb.encode_images(x[None], False)[0])
    assert not torch.allclose(a.views[0], a.views[1])
    c = extract(bb, images, views=1, seed=8, num_workers=0, progress=False)
    assert not torch.allclose(c.views[0], a.views[0])


def test_a_subsets_views_are_rows_of_its_parents(tiny_vit_backbone, images):
    """Views are seeded by the image, not its place in the list: what SubsetPool relies on."""
    bb = tiny_vit_backbone
    whole = extract(bb, images, views=2, seed=3, num_workers=0, progress=False)
    index = [7, 2, 11]
    part = extract(bb, images.subset(index), views=2, seed=3, num_workers=0, progress=False)
    torch.testing.assert_close(part.views, whole.views[:, index])
    torch.testing.assert_close(part.features, whole.features[index])


def test_subset_pool_extracts_the_union_once_and_serves_each_subset(tiny_vit_backbone, images):
    from clipadapt.data import few_shot
    from clipadapt.features.pool import SubsetPool

    splits = {"train": images}
    draws = [few_shot(splits, shots, seed) for shots, seed in ((1, 1), (2, 1), (2, 2))]
    counting = Counting(tiny_vit_backbone)
    common = {"num_workers": 0, "progress": False}
    pool = SubsetPool(counting, splits, draws, common)
    views = {"train": 2, "val": 0}  # the validation images are drawn from "train" here
    for draw in draws:
        for role, part in draw.items():
            got = pool.features(part, {"views": views[role]})
            want = extract(tiny_vit_backbone, part, views=views[role], **common)
            torch.testing.assert_close(got.features, want.features)
            if views[role]:
                torch.testing.assert_close(got.views, want.views)
            assert got.labels.tolist() == part.labels and got.paths == part.paths
    union = {r: {i for d in draws for i in d[r].indices} for r in views}
    # each image once per role, with views only in the training role
    assert counting.images == 3 * len(union["train"]) + len(union["val"])
    assert counting.images < sum(3 * len(d["train"]) + len(d["val"]) for d in draws)


def test_patch_tokens_are_cached_in_fp16(tiny_vit_backbone, images, tmp_path):
    bb = tiny_vit_backbone
    fs = extract(
        bb,
        images,
        tokens_layer=-2,
        cache_dir=tmp_path / "c",
        tokens_shard_size=5,
        num_workers=0,
        progress=False,
    )
    x = torch.stack([bb.preprocess(load_rgb(p)) for p in images.paths[:3]])
    assert fs.tokens.dtype == torch.float16
    torch.testing.assert_close(fs.tokens[:3], bb.patch_tokens(x, -2).half())
    counting = Counting(bb)
    again = extract(
        counting, images, tokens_layer=-2, cache_dir=tmp_path / "c", num_workers=0, progress=False
    )
    assert counting.images == 0 and torch.equal(again.tokens, fs.tokens)


def test_embeddings_and_tokens_of_a_view_come_from_one_forward_pass(tiny_vit_backbone, images):
    bb, counting = tiny_vit_backbone, Counting(tiny_vit_backbone)
    options = dict(views=2, tokens_layer=-2, view_tokens=True, num_workers=0, progress=False)
    fs = extract(counting, images, **options)
    assert counting.images == 3 * N_IMAGES  # the eval view and two augmented views, once each
    x = torch.stack([bb.preprocess(load_rgb(p)) for p in images.paths])
    torch.testing.assert_close(fs.features, bb.encode_images(x, normalize=False))
    torch.testing.assert_close(fs.tokens, bb.patch_tokens(x, -2).half())
    assert fs.view_tokens.shape == (2, N_IMAGES, 16, 64)


def test_bad_images_raise_or_are_skipped(tiny_vit_backbone, images, tmp_path):
    bb = tiny_vit_backbone
    truncated, not_an_image = images.paths[2], images.paths[7]
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 3])
    Path(not_an_image).write_text("hello")
    with pytest.raises(ClipAdaptError, match=f"{truncated}: cannot read image") as e:
        extract(bb, images, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert "\n" not in str(e.value)

    stats: dict = {}
    with pytest.warns(UserWarning, match="skipped 2 unreadable images"):
        fs = extract(
            bb,
            images,
            cache_dir=tmp_path / "c",
            skip_bad=True,
            batch_size=4,
            views=1,
            num_workers=1,
            progress=False,
            stats=stats,
        )
    keep = [p for p in images.paths if p not in (truncated, not_an_image)]
    assert fs.paths == keep and fs.features.shape[0] == N_IMAGES - 2 == fs.views.shape[1]
    torch.testing.assert_close(fs.features, _plain_features(bb, keep))
    assert [b["path"] for b in stats["bad"]] == [truncated, not_an_image]
    manifest = json.loads((Path(stats["entries"]["embed-v0"]) / "manifest.json").read_text())
    assert [b["index"] for b in manifest["bad"]] == [2, 7]
    with pytest.raises(ClipAdaptError, match=f"{truncated}: cannot read image"):
        extract(bb, images, cache_dir=tmp_path / "c", num_workers=0, progress=False)


def test_image_modes_become_rgb(tmp_path):
    gray = Image.fromarray(np.full((4, 4), 100, np.uint8), "L")
    assert to_rgb(gray).mode == "RGB" and to_rgb(gray).getpixel((0, 0)) == (100, 100, 100)
    sixteen = Image.fromarray(np.array([[65535, 32896], [0, 257]], np.uint16))
    sixteen.save(tmp_path / "16.png")
    img = load_rgb(str(tmp_path / "16.png"))
    assert img.mode == "RGB"
    assert [img.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1), (1, 1))] == [255, 128, 0, 1]
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((1, 1)) == (10, 20, 30)
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))
    cmyk.save(tmp_path / "cmyk.jpg")
    red = load_rgb(str(tmp_path / "cmyk.jpg")).getpixel((1, 1))
    assert red[0] > 200 and red[1] < 50 and red[2] < 50
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 200, 0] * 256)
    assert to_rgb(palette).getpixel((0, 0)) == (0, 200, 0)
