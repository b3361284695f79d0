"""SCLIP segmentation: window geometry, Segmenter vs a plain formulation, queries cache, mIoU,
mmseg readers on generated folders, PAMR, and the `segment` / `seg-eval` commands."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipadapt.segmentation.evaluation as evaluate_module
from clipadapt.data.mmseg import SEG_DATASETS, class_file, load_segmentation, read_label
from clipadapt.errors import ClipAdaptError
from clipadapt.metrics import miou
from clipadapt.segmentation import (
    Segmenter,
    evaluate,
    parse_classes,
    query_embeddings,
    resized_shape,
    segmenter_options,
    window_boxes,
)
from clipadapt.segmentation.overlay import comparison_image, overlay_image, palette
from clipadapt.segmentation.pamr import pamr
from clipadapt.segmentation.segmenter import OPENAI_MEAN, OPENAI_STD


def rng_image(height: int, width: int, seed: int = 0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


class Proxy:
    """A Backbone wrapper that counts encoded texts and can override attributes."""

    def __init__(self, bb, **overrides):
        self._bb, self.texts = bb, 0
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._bb, name)

    def encode_texts(self, texts):
        self.texts += len(texts)
        return self._bb.encode_texts(texts)


# --- sliding-window geometry ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("height", "width", "tops", "lefts"),
    [
        (336, 448, [0, 112], [0, 112, 224]),  # VOC-like 448x336 -> 2 x 3 windows
        (224, 224, [0], [0]),
        (336, 500, [0, 112], [0, 112, 224, 276]),  # last window flush with the right border
        (100, 300, [0], [0, 76]),  # shorter than the window: one window, the whole height
        (225, 224, [0, 1], [0]),
    ],
)
def test_window_placement(height, width, tops, lefts):
    boxes = window_boxes(height, width, 224, 112)
    expected = [
        (t, left, min(t + 224, height), min(left + 224, width)) for t in tops for left in lefts
    ]
    assert boxes == expected


@pytest.mark.parametrize(("height", "width"), [(336, 448), (560, 1120), (448, 597), (57, 91)])
@pytest.mark.parametrize(("window", "stride"), [(224, 112), (32, 16), (64, 48)])
def test_windows_cover_flush_and_count(height, width, window, stride):
    boxes = window_boxes(height, width, window, stride)
    rows = max(math.ceil((height - window) / stride), 0) + 1
    cols = max(math.ceil((width - window) / stride), 0) + 1
    assert len(boxes) == rows * cols
    cover = torch.zeros(height, width)
    for t, left, b, r in boxes:
        assert (b - t, r - left) == (min(window, height), min(window, width))
        cover[t:b, left:r] += 1
    assert cover.min() >= 1
    assert max(b for _, _, b, _ in boxes) == height and max(r for *_, r in boxes) == width


def test_resized_shape():
    assert resized_shape(480, 640, 336, 2048) == (336, 448)
    assert resized_shape(1024, 2048, 560, 2048) == (560, 1120)
    assert resized_shape(100, 2000, 336, 2048) == (102, 2048)  # long side capped


# --- per-dataset settings --------------------------------------------------------------------
def test_published_settings_for_224_models():
    voc21 = segmenter_options("voc21", 224)
    assert voc21 == dict(
        short_side=336,
        long_side=2048,
        scale=65.0,
        bg_threshold=0.1,
        area_threshold=0.1,
        window=224,
        stride=112,
    )
    assert segmenter_options("coco_object", 224)["scale"] == 50.0
    assert segmenter_options("coco_object", 224)["bg_threshold"] == 0.1
    assert segmenter_options("coco_object", 224)["area_threshold"] is None
    assert segmenter_options("context60", 224)["scale"] == 50.0
    assert segmenter_options("cityscapes", 224)["short_side"] == 560
    assert segmenter_options("coco_stuff", 224)["short_side"] == 448
    for name in ("voc20", "context59", "ade20k"):
        assert segmenter_options(name, 224)["scale"] == 40.0
        assert segmenter_options(name, 224)["bg_threshold"] is None
    small = segmenter_options("cityscapes", 64)
    assert (small["window"], small["stride"], small["short_side"]) == (64, 32, 160)


def test_segmenter_defaults_come_from_the_model(tiny_vit_backbone, tmp_path):
    seg = Segmenter(tiny_vit_backbone, ["a"], cache_dir=tmp_path, progress=False)
    assert (seg.window, seg.stride, seg.short_side, seg.scale) == (32, 16, 48, 40.0)
    big = Segmenter(Proxy(tiny_vit_backbone, image_size=224), ["a"], cache_dir=tmp_path)
    assert (big.window, big.stride, big.short_side, big.long_side) == (224, 112, 336, 2048)


def test_class_files_are_packaged():
    sizes = {
        "voc21": 21,
        "voc20": 20,
        "context60": 60,
        "context59": 59,
        "coco_stuff": 171,
        "coco_object": 81,
        "cityscapes": 19,
        "ade20k": 150,
    }
    for name, size in sizes.items():
        classes = parse_classes(name)
        assert len(classes) == size, name
    assert sum(len(c) for c in parse_classes("coco_object")) == 113
    assert parse_classes(class_file("context60"))[0] == ["background"]
    assert parse_classes(["road, street", "car"]) == [["road", "street"], ["car"]]
    with pytest.raises(ClipAdaptError, match="no_such.txt"):
        parse_classes("no_such.txt")


# --- Segmenter against a plain formulation -----------------------------------------------------
def plain_probabilities(bb, classes, image, window, stride, short_side, scale):
    """Window by window, one crop at a time; synonym max through a (C, Q, H, W) broadcast."""
    names = [n for c in classes for n in c]
    queries = torch.stack(
        [
            F.normalize(
                F.normalize(
                    bb.encode_texts([t.format(n) for t in default_templates()]), dim=-1
                ).mean(0),
                dim=-1,
            )
            for n in names
        ]
    )
    w0, h0 = image.size
    h, w = resized_shape(h0, w0, short_side, 2048)
    x = torch.from_numpy(np.asarray(image.resize((w, h), Image.BILINEAR), np.float32) / 255)
    x = ((x - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)).permute(2, 0, 1)
    total, count = torch.zeros(len(names), h, w), torch.zeros(h, w)
    for t, left, b, r in window_boxes(h, w, window, stride):
        feats = bb.dense_features(x[None, :, t:b, left:r])[0]
        cos = torch.einsum("hwd,qd->qhw", feats, queries)
        total[:, t:b, left:r] += F.interpolate(cos[None], (b - t, r - left), mode="bilinear")[0]
        count[t:b, left:r] += 1
    logits = F.interpolate((total / count)[None], (h0, w0), mode="bilinear")[0]
    probs = torch.softmax(scale * logits, dim=0)
    member = torch.tensor([[float(n in c) for n in names] for c in classes])  # [C, Q]
    return (probs[None] * member[:, :, None, None]).amax(dim=1)


def default_templates():
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


@pytest.mark.parametrize("size", [(37, 61), (48, 48), (90, 41)])
def test_segmenter_matches_plain_formulation(tiny_vit_backbone, tmp_path, size):
    classes = [["circle", "round shape"], ["square"], ["star", "starfish", "asterisk"]]
    image = rng_image(*size, seed=size[0])
    seg = Segmenter(
        tiny_vit_backbone,
        [", ".join(c) for c in classes],
        batch_size=3,
        cache_dir=tmp_path,
        progress=False,
    )
    expected = plain_probabilities(tiny_vit_backbone, classes, image, 32, 16, 48, 40.0)
    got = seg.probabilities(image)
    assert got.shape == (3, *size)
    assert (got - expected).abs().max() <= 1e-5
    pred = seg.predict(image)
    assert pred.dtype == torch.long and pred.shape == size
    assert torch.equal(pred, expected.argmax(0))


@pytest.mark.parametrize(
    ("bg_threshold", "area_threshold"), [(None, None), (0.45, None), (None, 0.3), (0.3, 0.2)]
)
def test_fast_predict_equals_decide_on_probabilities(
    tiny_vit_backbone, tmp_path, bg_threshold, area_threshold
):
    classes = ["bg, floor", "a", "b, bee", "c", "d", "e"]
    seg = Segmenter(
        tiny_vit_backbone,
        classes,
        bg_threshold=bg_threshold,
        scale=5.0,
        area_threshold=area_threshold,
        cache_dir=tmp_path,
        progress=False,
    )
    image = rng_image(61, 45, seed=9)
    probs = seg.probabilities(image)
    reference = seg.decide(probs.clone())
    assert torch.equal(seg.predict(image), reference)
    plain = probs.argmax(0)
    if bg_threshold:  # the settings do change the answer: the comparison is not vacuous
        assert (probs.amax(0) < bg_threshold).any()
    if area_threshold:
        area = torch.bincount(plain.flatten(), minlength=6)[1:]
        assert ((area > 0) & (area < area_threshold * area.sum())).any()
        assert not torch.equal(reference, plain)


def test_batch_size_does_not_change_logits(tiny_vit_backbone, tmp_path):
    image = rng_image(50, 83, seed=1)
    one = Segmenter(tiny_vit_backbone, ["a", "b"], batch_size=1, cache_dir=tmp_path)
    many = Segmenter(tiny_vit_backbone, ["a", "b"], batch_size=64, cache_dir=tmp_path)
    assert (one.logits(image) - many.logits(image)).abs().max() <= 1e-5


def test_background_threshold_and_area_filter(tiny_vit_backbone, tmp_path):
    seg = Segmenter(
        tiny_vit_backbone,
        ["bg", "a", "b"],
        bg_threshold=0.4,
        area_threshold=0.1,
        cache_dir=tmp_path,
    )
    probs = torch.zeros(3, 1, 20)
    probs[:, 0, :18] = torch.tensor([0.2, 0.5, 0.3])[:, None]  # class a, 18 px
    probs[:, 0, 18] = torch.tensor([0.35, 0.05, 0.6])  # class b: 1 px < 10% of 19 -> dropped
    probs[:, 0, 19] = torch.tensor([0.3, 0.35, 0.35])  # best prob 0.35 < 0.4 -> background
    pred = seg.decide(probs.clone())
    assert pred[0, :18].eq(1).all()
    assert pred[0, 18] == 0  # b dropped, next best is the background
    assert pred[0, 19] == 0
    seg.area_threshold, seg.bg_threshold = None, None
    assert seg.decide(probs.clone())[0, 18:].tolist() == [2, 1]


def test_predict_keeps_size_and_runs_with_pamr(tiny_vit_backbone, tmp_path):
    seg = Segmenter(tiny_vit_backbone, ["a", "b", "c"], pamr=True, cache_dir=tmp_path)
    pred = seg.predict(rng_image(33, 47))
    assert pred.shape == (33, 47) and pred.max() < 3


def test_segmenter_rejects_bad_options(tiny_vit_backbone, tmp_path):
    for bad in [
        dict(stride=64),
        dict(window=0),
        dict(window=4),
        dict(scale=0),
        dict(bg_threshold=2.0),
        dict(attention="sclip"),
    ]:
        with pytest.raises(ClipAdaptError):
            Segmenter(tiny_vit_backbone, ["a"], cache_dir=tmp_path, **bad)


# --- queries cache --------------------------------------------------------------------------
def test_queries_are_cached_on_disk_and_keyed(tiny_vit_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPADAPT_CACHE", str(tmp_path / "env"))
    names = ["cat", "dog"]
    first = Proxy(tiny_vit_backbone)
    q1 = query_embeddings(first, names, progress=False)
    assert first.texts == 80 * 2
    files = list((tmp_path / "env" / "queries").glob("*.safetensors"))
    assert len(files) == 1
    again = Proxy(tiny_vit_backbone)
    assert torch.equal(query_embeddings(again, names, progress=False), q1)
    assert again.texts == 0
    plain = torch.stack(
        [
            F.normalize(
                tiny_vit_backbone.encode_texts([t.format(n) for t in default_templates()]).mean(0),
                dim=-1,
            )
            for n in names
        ]
    )
    assert (q1 - plain).abs().max() <= 1e-5
    other_names = Proxy(tiny_vit_backbone)
    query_embeddings(other_names, ["cat", "bird"], progress=False)
    assert other_names.texts == 160
    other_weights = Proxy(
        tiny_vit_backbone, identity={**tiny_vit_backbone.identity, "weights_sha256": "0" * 64}
    )
    query_embeddings(other_weights, names, progress=False)
    assert other_weights.texts == 160
    files[0].write_bytes(b"not a safetensors file")
    corrupt = Proxy(tiny_vit_backbone)
    assert torch.equal(query_embeddings(corrupt, names, progress=False), q1)
    assert corrupt.texts == 160
    explicit = Proxy(tiny_vit_backbone)
    query_embeddings(explicit, names, cache_dir=tmp_path / "arg", progress=False)
    assert len(list((tmp_path / "arg").glob("*.safetensors"))) == 1


# --- mIoU --------------------------------------------------------------------------------------
class FakeDataset:
    name = "fake"
    ignore_index = 255

    def __init__(self, targets, classnames):
        self.targets, self.classnames = targets, classnames
        self.num_classes = len(classnames)
        self.items = [argparse.Namespace(label=f"label{i}.png") for i in range(len(targets))]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.items[i]

    def image(self, i):
        h, w = self.targets[i].shape
        return Image.new("RGB", (w, h))

    def label(self, i):
        return self.targets[i]


class FakeSegmenter:
    def __init__(self, preds, num_classes):
        self.preds, self.num_classes, self.calls = list(preds), num_classes, []

    def predict(self, image):
        self.calls.append(len(self.calls))
        return self.preds.pop(0)


def test_miou_accumulates_intersection_and_union_over_the_dataset():
    targets = [torch.tensor([[0, 0, 1], [1, 2, 255]]), torch.tensor([[2, 2]])]
    preds = [torch.tensor([[0, 1, 1], [1, 1, 0]]), torch.tensor([[2, 0]])]
    # By hand: confusion rows (truth) [1,1,0,0], [0,2,0,0], [1,1,1,0], [0,0,0,0];
    # I = 1, 2, 1; U = 3, 4, 3; class 3 never appears (nan, left out of the mean).
    result = evaluate(
        FakeSegmenter(preds, 4), FakeDataset(targets, ["a", "b", "c", "d"]), progress=False
    )
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(result["confusion"], expected)
    assert result["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 4 + 1 / 3) / 3)
    assert miou(expected) == pytest.approx(100 * 7 / 18)
    assert result["per_class_iou"] == pytest.approx(
        {"a": 100 / 3, "b": 50.0, "c": 100 / 3, "d": None}
    )
    assert result["aAcc"] == pytest.approx(100 * 4 / 7)


def test_miou_second_example_and_bad_label():
    confusion = torch.tensor([[5, 0, 1], [2, 3, 0], [0, 0, 0]])
    # IoU: 5 / (6 + 7 - 5) = 5/8, 3 / (5 + 3 - 3) = 3/5, class 2: 0 / 1 = 0
    assert miou(confusion) == pytest.approx(100 * (5 / 8 + 3 / 5 + 0) / 3)
    data = FakeDataset([torch.tensor([[0, 7]])], ["a", "b"])
    with pytest.raises(ClipAdaptError, match="label0.png: label 7"):
        evaluate(FakeSegmenter([torch.tensor([[0, 1]])], 2), data, progress=False)


def test_evaluate_shards_by_rank(monkeypatch):
    targets = [torch.tensor([[i % 2]]) for i in range(5)]
    monkeypatch.setattr(evaluate_module, "_rank_world", lambda: (1, 2))
    monkeypatch.setattr(evaluate_module, "_all_reduce", lambda c, device: c)
    seg = FakeSegmenter([torch.tensor([[1]]), torch.tensor([[1]])], 2)
    seg.bb = argparse.Namespace(device="cpu")
    result = evaluate(seg, FakeDataset(targets, ["a", "b"]), progress=False)
    assert len(seg.calls) == 2  # images 1 and 3
    assert result["confusion"].tolist() == [[0, 0], [0, 2]]


# --- mmseg readers -----------------------------------------------------------------------------
PALETTE = np.random.default_rng(7).integers(0, 256, (256, 3), dtype=np.uint8)


def save_label(path: Path, array: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette(PALETTE.flatten().tolist())
    image.save(path)


def save_image(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng_image(height, width, seed).save(path)


def make_mmseg(root: Path, name: str, labels: list[np.ndarray]) -> list[str]:
    """Write a small benchmark folder in the mmseg layout; returns the image stems in order."""
    stems = [f"img_{i:03d}" for i in range(len(labels))]
    for i, (stem, label) in enumerate(zip(stems, labels, strict=True)):
        h, w = label.shape
        if name in ("voc21", "voc20", "context60", "context59"):
            voc = root / "VOCdevkit" / ("VOC2012" if name.startswith("voc") else "VOC2010")
            seg = "SegmentationClass" if name.startswith("voc") else "SegmentationClassContext"
            sets = "Segmentation" if name.startswith("voc") else "SegmentationContext"
            save_image(voc / "JPEGImages" / f"{stem}.jpg", h, w, i)
            save_label(voc / seg / f"{stem}.png", label, palette=True)
            split = voc / "ImageSets" / sets / "val.txt"
            split.parent.mkdir(parents=True, exist_ok=True)
            split.write_text("\n".join(reversed(stems)) + "\n")  # split-file order, not sorted
        elif name in ("coco_stuff", "coco_object"):
            coco = root / "coco_stuff164k"
            suffix = "_labelTrainIds.png" if name == "coco_stuff" else "_instanceTrainIds.png"
            save_image(coco / "images" / "val2017" / f"{stem}.jpg", h, w, i)
            save_label(coco / "annotations" / "val2017" / f"{stem}{suffix}", label, palette=False)
        elif name == "coco_stuff10k":
            coco = root / "coco_stuff10k"
            save_image(coco / "images" / "test2014" / f"{stem}.jpg", h, w, i)
            save_label(
                coco / "annotations" / "test2014" / f"{stem}_labelTrainIds.png",
                label,
                palette=False,
            )
        elif name == "cityscapes":
            city = ["aachen", "bonn"][i % 2]
            cs = root / "cityscapes"
            save_image(cs / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", h, w, i)
            save_label(
                cs / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png",
                label,
                palette=False,
            )
        else:
            ade = root / "ade" / "ADEChallengeData2016"
            save_image(ade / "images" / "validation" / f"{stem}.jpg", h, w, i)
            save_label(ade / "annotations" / "validation" / f"{stem}.png", label, palette=False)
    return stems


REDUCED = {"voc20", "context59", "ade20k", "coco_stuff10k"}


@pytest.mark.parametrize("name", SEG_DATASETS)
def test_readers_on_generated_mmseg_folders(tmp_path, name):
    labels = [
        np.array([[0, 1, 2, 3], [4, 5, 255, 0], [1, 1, 2, 2]]),
        np.array([[3, 3, 0], [255, 2, 1]]),
        np.array([[0, 0], [1, 1]]),
    ]
    stems = make_mmseg(tmp_path, name, labels)
    data = load_segmentation(name, tmp_path)
    assert len(data) == 3
    assert data.num_classes == len(parse_classes(name))
    expected_order = {
        "voc21": stems[::-1],
        "voc20": stems[::-1],
        "context60": stems[::-1],
        "context59": stems[::-1],
        "cityscapes": [stems[0], stems[2], stems[1]],  # by city
    }.get(name, stems)
    found = [Path(it.image).name.split("_leftImg8bit")[0].split(".")[0] for it in data.items]
    assert found == expected_order
    for i, item in enumerate(data.items):
        index = stems.index(Path(item.label).name[: len(stems[0])])
        raw = torch.from_numpy(labels[index].astype(np.int64))
        if name in REDUCED:
            expected = torch.where(raw == 0, 255, raw - 1)
            expected[raw == 255] = 255
        else:
            expected = raw
        assert torch.equal(data.label(i), expected)
        image = data.image(i)
        assert image.mode == "RGB" and image.size == (raw.shape[1], raw.shape[0])


def test_reader_accepts_the_dataset_folder_and_explains_errors(tmp_path):
    make_mmseg(tmp_path, "voc21", [np.zeros((2, 2))])
    inner = load_segmentation("voc21", tmp_path / "VOCdevkit" / "VOC2012")
    assert len(inner) == 1
    with pytest.raises(ClipAdaptError, match="VOCdevkit/VOC2012/JPEGImages"):
        load_segmentation("voc21", tmp_path / "elsewhere")
    label = tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "img_000.png"
    Image.new("RGB", (2, 2), (1, 2, 3)).save(label)
    with pytest.raises(ClipAdaptError, match="img_000.png: label image has mode RGB"):
        read_label(label)
    label.unlink()
    with pytest.raises(ClipAdaptError, match="img_000.png: file not found"):
        load_segmentation("voc21", tmp_path)
    with pytest.raises(ClipAdaptError, match="'voc22'"):
        load_segmentation("voc22", tmp_path)


def test_palette_label_is_read_as_indices_not_colours(tmp_path):
    path = tmp_path / "l.png"
    save_label(path, np.array([[0, 7], [255, 20]]), palette=True)
    assert read_label(path).tolist() == [[0, 7], [255, 20]]
    assert read_label(path, reduce_zero_label=True).tolist() == [[255, 6], [255, 19]]


# --- PAMR --------------------------------------------------------------------------------------
def test_pamr_matches_per_pixel_formulation():
    gen = torch.Generator().manual_seed(0)
    image, mask = torch.rand(3, 5, 6, generator=gen), torch.rand(2, 5, 6, generator=gen)
    dilations = (1, 2)
    got = pamr(image, mask, iterations=2, dilations=dilations)
    h, w = 5, 6
    offs = [
        (dy * d, dx * d)
        for d in dilations
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if (dy, dx) != (0, 0)
    ]

    def at(t, y, x):  # replicate border
        return t[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    alpha = torch.zeros(len(offs), h, w)
    for y in range(h):
        for x in range(w):
            nbrs = torch.stack([at(image, y + dy, x + dx) for dy, dx in offs])  # [N, 3]
            sigma = nbrs.std(dim=0, unbiased=False)
            k = -((nbrs - image[:, y, x]).abs() / (1e-8 + 0.1 * sigma)).mean(dim=1)
            alpha[:, y, x] = torch.softmax(k, dim=0)
    m = mask
    for _ in range(2):
        new = torch.zeros_like(m)
        for y in range(h):
            for x in range(w):
                for n, (dy, dx) in enumerate(offs):
                    new[:, y, x] += alpha[n, y, x] * at(m, y + dy, x + dx)
        m = new
    assert (got - m).abs().max() <= 1e-5
    constant = torch.full((2, 5, 6), 0.25)
    assert torch.allclose(pamr(image, constant, dilations=dilations), constant)


# --- commands ----------------------------------------------------------------------------------
def run_command(argv: list[str]) -> int:
    from clipadapt.commands import seg_eval, segment

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    segment.add_parser(sub)
    seg_eval.add_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


def test_segment_writes_mask_and_overlay(tmp_path, capsys):
    image_path = tmp_path / "street.jpg"
    rng_image(45, 70, seed=3).save(image_path)
    out = tmp_path / "out" / "overlay.png"
    argv = [
        "segment",
        str(image_path),
        "--classes",
        "road, car, sky",
        "--out",
        str(out),
        "--model",
        "tiny-test-vit",
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert run_command(argv) == 0
    mask = Image.open(tmp_path / "out" / "overlay_mask.png")
    assert mask.mode == "P" and mask.size == (70, 45)
    indices = np.array(mask)
    assert indices.max() < 3
    overlay = Image.open(out)
    assert overlay.mode == "RGB" and overlay.height >= 45 and overlay.width > 70  # legend
    assert "wrote" in capsys.readouterr().out
    class_file_path = tmp_path / "classes.txt"
    class_file_path.write_text("road, street\ncar\n")
    argv[2:4] = ["--class-file", str(class_file_path)]
    argv += ["--mask", str(tmp_path / "m.png"), "--attention", "clearclip"]
    assert run_command(argv) == 0
    assert np.array(Image.open(tmp_path / "m.png")).max() < 2
    with pytest.raises(ClipAdaptError, match="exactly one of --classes or --class-file"):
        run_command(["segment", str(image_path), "--out", str(out)])


def test_seg_eval_writes_json(tmp_path, capsys):
    labels = [np.array([[0, 1, 1, 15], [255, 1, 0, 0], [2, 2, 2, 0]] * 8).repeat(8, axis=1)]
    labels.append(np.zeros((20, 30)))
    make_mmseg(tmp_path / "data", "voc21", labels)
    out = tmp_path / "res.json"
    argv = [
        "seg-eval",
        "--data",
        "voc21",
        "--data-root",
        str(tmp_path / "data"),
        "--model",
        "tiny-test-vit",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    assert run_command(argv) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "voc21" and result["method"] == "sclip"
    assert result["hparams"]["scale"] == 65.0 and result["hparams"]["window"] == 32
    metrics = result["metrics"]
    assert result["images"] == 2 and len(result["per_class_iou"]) == 21
    assert 0 <= metrics["mIoU"] <= 100
    printed = capsys.readouterr().out
    assert list(result["per_class_iou"])[:2] == ["background", "aeroplane"]
    assert "aeroplane" in printed and f"mIoU {metrics['mIoU']:.2f}" in printed


def test_overlays_leave_the_background_unpainted_and_compare_side_by_side():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    pred = torch.zeros(20, 30, dtype=torch.long)
    pred[5:10, 5:15] = 2
    names = ["background", "car", "road"]
    picture = np.asarray(overlay_image(image, pred, names, alpha=0.5))[:20, :30].astype(float)
    base = np.asarray(image).astype(float)
    background = (pred == 0).numpy()
    assert np.array_equal(picture[background], base[background])  # unpainted
    want = 0.5 * base[5:10, 5:15] + 0.5 * palette(3)[2]
    assert np.abs(picture[5:10, 5:15] - want).max() <= 0.5  # class 2 blended in its colour
    truth = pred.clone()
    truth[0, 0] = 255  # ignored pixels keep the image too
    strip = comparison_image(image, [("truth", truth), ("pred", pred)], names, min_side=60)
    scale = 3  # the short side (20) enlarged to at least 60
    assert strip.height >= 20 * scale and strip.width > 3 * 30 * scale  # 3 panels + legend
    panel = np.asarray(strip)[16 : 16 + 20 * scale, 30 * scale + 4 : 2 * 30 * scale + 4]
    assert np.array_equal(panel[0, 0], np.asarray(image)[0, 0])  # the 255 pixel: unpainted
