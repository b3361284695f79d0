"""Dataset readers (real on-disk layouts, generated images) and the CoOp few-shot sampler."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipadapt.data import few_shot, load_dataset, load_split, load_subset, save_subset
from clipadapt.data.dataset import ClassificationDataset, Item
from clipadapt.errors import ClipAdaptError


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _coop(folder: Path, image_dir: str, split_file: str, splits: dict) -> None:
    for entries in splits.values():
        for rel, _, _ in entries:
            _image(folder / image_dir / rel)
    (folder / split_file).write_text(json.dumps(splits))


PETS = {
    "train": [
        ["Abyssinian_1.jpg", 0, "abyssinian"],
        ["beagle_1.jpg", 1, "beagle"],
        ["Abyssinian_2.jpg", 0, "abyssinian"],
    ],
    "val": [["beagle_2.jpg", 1, "beagle"]],
    "test": [["Abyssinian_3.jpg", 0, "abyssinian"], ["beagle_3.jpg", 1, "beagle"]],
}


def test_coop_json_reader(tmp_path):
    folder = tmp_path / "oxford_pets"
    _coop(folder, "images", "split_zhou_OxfordPets.json", PETS)
    splits = load_dataset(folder)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 2]
    train = splits["train"]
    assert train.name == "oxford_pets"
    assert train.classnames == ["abyssinian", "beagle"]
    assert train[1] == Item(str(folder / "images" / "beagle_1.jpg"), 1, "beagle")
    # by name inside the CoOp $DATA root, in CoOp's own spelling
    assert load_dataset("OxfordPets", root=tmp_path)["test"].paths == splits["test"].paths


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(tmp_path):
    folder = tmp_path / "stanford_cars"
    splits = {
        "train": [
            ["cars_train/00001.jpg", 0, "2000 AM General Hummer SUV"],
            ["cars_train/00002.jpg", 1, "2012 Acura RL Sedan"],
        ],
        "val": [],
        "test": [["cars_test/00001.jpg", 1, "2012 Acura RL Sedan"]],
    }
    _coop(folder, "", "split_zhou_StanfordCars.json", splits)
    ds = load_dataset(folder)
    assert ds["test"][0].path == str(folder / "cars_test" / "00001.jpg")
    assert ds["train"].classnames == ["2000 AM General Hummer SUV", "2012 Acura RL Sedan"]


def test_detects_a_renamed_coop_folder_by_its_split_file(tmp_path):
    folder = tmp_path / "my_textures"
    splits = {
        "train": [["banded/a.jpg", 0, "banded"], ["dotted/b.jpg", 1, "dotted"]],
        "val": [],
        "test": [],
    }
    _coop(folder, "images", "split_zhou_DescribableTextures.json", splits)
    assert load_dataset(folder)["train"].name == "dtd"


def test_coop_errors_are_one_line_and_name_the_problem(tmp_path):
    folder = tmp_path / "oxford_pets"
    _coop(folder, "images", "split_zhou_OxfordPets.json", PETS)
    (folder / "images" / "beagle_3.jpg").unlink()
    with pytest.raises(ClipAdaptError, match="beagle_3.jpg") as e:
        load_dataset(folder)
    assert "\n" not in str(e.value)

    empty = tmp_path / "eurosat"
    empty.mkdir()
    with pytest.raises(ClipAdaptError, match="missing split file split_zhou_EuroSAT.json"):
        load_dataset(empty)

    gap = tmp_path / "dtd"
    _coop(
        gap,
        "images",
        "split_zhou_DescribableTextures.json",
        {"train": [["a.jpg", 0, "banded"], ["b.jpg", 2, "dotted"]], "val": [], "test": []},
    )
    with pytest.raises(ClipAdaptError, match="label 1 has no images"):
        load_dataset(gap)

    bad = tmp_path / "ucf101"
    _coop(
        bad,
        "UCF-101-midframes",
        "split_zhou_UCF101.json",
        {"train": [["a.jpg", -1, "Biking"]], "val": [], "test": []},
    )
    with pytest.raises(ClipAdaptError, match="unknown label -1"):
        load_dataset(bad)


def test_fgvc_aircraft_txt_reader(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    folder.mkdir()
    (folder / "variants.txt").write_text("707-320\nA300B4\nBoeing 717\n")
    lines = {
        "train": ["1025794 707-320", "1340192 A300B4", "0056978 Boeing 717"],
        "val": ["1025795 A300B4"],
        "test": ["2025794 Boeing 717", "2025795 707-320"],
    }
    for split, rows in lines.items():
        (folder / f"images_variant_{split}.txt").write_text("\n".join(rows) + "\n")
        for row in rows:
            _image(folder / "images" / f"{row.split()[0]}.jpg")
    ds = load_dataset(folder)
    assert ds["train"].classnames == ["707-320", "A300B4", "Boeing 717"]
    assert ds["train"][2] == Item(str(folder / "images" / "0056978.jpg"), 2, "Boeing 717")
    assert ds["test"].labels == [2, 0]
    (folder / "images_variant_val.txt").write_text("1025795 A380\n")
    with pytest.raises(ClipAdaptError, match="unknown label 'A380'"):
        load_dataset(folder)


def test_imagenet_folders(tmp_path):
    folder = tmp_path / "imagenet"
    folder.mkdir()
    (folder / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    for split, n in (("train", 3), ("val", 2)):
        for wnid in ("n01443537", "n01440764"):
            for i in range(n):
                _image(folder / "images" / split / wnid / f"{wnid}_{i}.JPEG", i)
    ds = load_dataset(folder)
    assert ds["train"].classnames == ["tench", "goldfish"]
    assert len(ds["train"]) == 6 and len(ds["val"]) == 0 and len(ds["test"]) == 4
    assert ds["test"][0].path.endswith("images/val/n01440764/n01440764_0.JPEG")
    assert ds["test"].labels == [0, 0, 1, 1]
    # no val split: the sampler takes validation shots from the training images not drawn
    sub = few_shot(ds, shots=1, seed=1)
    assert sub["val"].parent_split == "train"
    assert not set(sub["train"].paths) & set(sub["val"].paths)
    assert sorted(sub["val"].labels) == [0, 1]


def test_image_folder_with_and_without_splits(tmp_path):
    for split in ("train", "test"):
        for cls, n in (("dog", 2), ("cat", 1)):
            for i in range(n):
                _image(tmp_path / "split" / split / cls / f"{i}.png")
    ds = load_dataset(tmp_path / "split")
    assert ds["train"].classnames == ["cat", "dog"]
    assert ds["train"].labels == [0, 1, 1] and len(ds["val"]) == 0 and len(ds["test"]) == 3

    for cls in ("b", "a"):
        _image(tmp_path / "flat" / cls / "sub" / "x.jpg")
    with pytest.warns(UserWarning, match="no train/val/test splits; using a seeded 50/20/30"):
        flat = load_dataset(tmp_path / "flat")
    # one image per class: it goes to train (a held-out split needs two)
    assert flat["train"][0] == Item(str(tmp_path / "flat" / "a" / "sub" / "x.jpg"), 0, "a")
    assert len(flat["train"]) == 2 and len(flat["test"]) == 0

    (tmp_path / "split" / "test" / "bird").mkdir()
    _image(tmp_path / "split" / "test" / "bird" / "0.png")
    with pytest.raises(ClipAdaptError, match="unknown label 'bird'"):
        load_dataset(tmp_path / "split")

    (tmp_path / "split" / "train" / "bird").mkdir()
    with pytest.raises(ClipAdaptError, match="'bird'.*empty class"):
        load_dataset(tmp_path / "split")


def test_csv_reader(tmp_path):
    for name in ("a.jpg", "sub/b.jpg", "c.jpg"):
        _image(tmp_path / "d" / name)
    (tmp_path / "d" / "train.csv").write_text("path,label\na.jpg,zebra\nsub/b.jpg,ant\n")
    (tmp_path / "d" / "test.csv").write_text("path,label\nc.jpg,zebra\n")
    ds = load_dataset(tmp_path / "d")
    assert ds["train"].classnames == ["ant", "zebra"]
    assert ds["train"][1] == Item(str(tmp_path / "d" / "sub" / "b.jpg"), 0, "ant")
    assert ds["test"].labels == [1]

    (tmp_path / "d" / "test.csv").write_text("path,label\nc.jpg,yak\n")
    with pytest.raises(ClipAdaptError, match="unknown label 'yak'"):
        load_dataset(tmp_path / "d")
    (tmp_path / "d" / "test.csv").write_text("file,label\nc.jpg,zebra\n")
    with pytest.raises(ClipAdaptError, match="path,label"):
        load_dataset(tmp_path / "d")

    # one CSV file with integer labels and names
    (tmp_path / "one.csv").write_text("path,label,classname\nd/a.jpg,1,zebra\nd/c.jpg,0,ant\n")
    with pytest.warns(UserWarning):
        one = load_dataset(tmp_path / "one.csv")
    assert one["train"].classnames == ["ant", "zebra"] and sorted(one["train"].labels) == [0, 1]
    (tmp_path / "one.csv").write_text("path,label\nd/missing.jpg,0\n")
    with pytest.raises(ClipAdaptError, match="missing.jpg"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dataset(tmp_path / "one.csv")


def test_generic_split_json_with_an_image_subfolder(tmp_path):
    folder = tmp_path / "world"
    splits = {
        "train": [["circle/0.png", 0, "circle"], ["square/0.png", 1, "square"]],
        "val": [["circle/1.png", 0, "circle"]],
        "test": [["square/1.png", 1, "square"]],
    }
    _coop(folder, "images", "split_zhou_ShapesWorld.json", splits)
    ds = load_dataset(folder)
    assert ds["train"].name == "shapesworld"
    assert ds["test"][0].path == str(folder / "images" / "square" / "1.png")
    (folder / "split_other.json").write_text("{}")
    with pytest.raises(ClipAdaptError, match="several split files"):
        load_dataset(folder)


def test_load_split_errors(tmp_path):
    with pytest.raises(ClipAdaptError, match="no such dataset"):
        load_dataset(tmp_path / "nope")
    folder = tmp_path / "oxford_pets"
    _coop(folder, "images", "split_zhou_OxfordPets.json", {**PETS, "val": []})
    with pytest.raises(ClipAdaptError, match="val split is empty"):
        load_split(folder, "val")


# --- the few-shot sampler ------------------------------------------------------------------------


def _synthetic(sizes: dict[int, int], split: str = "train") -> ClassificationDataset:
    """Classes interleaved, first appearance order 2, 0, 1; `sizes` images per label."""
    items, pending = [], {label: list(range(n)) for label, n in sizes.items()}
    while any(pending.values()):
        for label in (2, 0, 1):
            if pending.get(label):
                i = pending[label].pop(0)
                items.append(Item(f"/{split}/{label}/{i}.jpg", label, f"c{label}"))
    return ClassificationDataset("syn", "/", items, ["c0", "c1", "c2"], split=split)


def _reference_draw(ds: ClassificationDataset, shots: int, rng) -> list[str]:
    """CoOp's loop: classes in first-appearance order, random.sample K (or keep all)."""
    groups: dict[int, list[Item]] = {}
    for it in ds.items:
        groups.setdefault(it.label, []).append(it)
    out = []
    for members in groups.values():
        out += rng.sample(members, shots) if len(members) >= shots else members
    return [it.path for it in out]


def test_sampler_follows_the_coop_protocol():
    import random

    splits = {
        "train": _synthetic({0: 20, 1: 20, 2: 20}),
        "val": _synthetic({0: 9, 1: 9, 2: 9}, "val"),
    }
    for shots in (1, 2, 4, 8, 16):
        sub = few_shot(splits, shots=shots, seed=3)
        assert Counter(sub["train"].labels) == {0: shots, 1: shots, 2: shots}
        assert Counter(sub["val"].labels) == {k: min(shots, 4) for k in (0, 1, 2)}
        assert len(set(sub["train"].paths)) == 3 * shots  # without replacement
        assert all(p.startswith("/val/") for p in sub["val"].paths)
        # classes in order of first appearance (2, 0, 1), same generator for train then val
        assert sub["train"].labels[:shots] == [2] * shots
        rng = random.Random(3)
        assert sub["train"].paths == _reference_draw(splits["train"], shots, rng)
        assert sub["val"].paths == _reference_draw(splits["val"], min(shots, 4), rng)
        indices = sub["train"].indices
        assert [splits["train"][i].path for i in indices] == sub["train"].paths


def test_sampler_is_deterministic_by_seed_and_keeps_all_if_fewer(tmp_path):
    splits = {"train": _synthetic({0: 30, 1: 3, 2: 30}), "val": _synthetic({0: 5, 1: 5, 2: 5})}
    with pytest.warns(UserWarning, match=r"keeping all of them: c1 \(3\)"):
        a = few_shot(splits, shots=8, seed=1)
    with pytest.warns(UserWarning):
        b = few_shot(splits, shots=8, seed=1)
        c = few_shot(splits, shots=8, seed=2)
    assert a["train"].paths == b["train"].paths and a["val"].paths == b["val"].paths
    assert a["train"].paths != c["train"].paths
    assert Counter(a["train"].labels) == {0: 8, 1: 3, 2: 8}

    path = save_subset(tmp_path / "subset.json", a, shots=8, seed=1)
    loaded = load_subset(path)
    for split in ("train", "val"):
        assert loaded[split].items == a[split].items
        assert loaded[split].indices == a[split].indices
    doc = json.loads(path.read_text())
    assert doc["seed"] == 1 and doc["shots"] == 8 and doc["train"][0] == [a["train"][0].path, 2]
    with pytest.raises(ClipAdaptError, match="positive number of shots"):
        few_shot(splits, shots=0, seed=1)
