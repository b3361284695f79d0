"""What a newcomer hits in the first hour: plain folders, names, flags, errors and warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipadapt.data import load_dataset
from clipadapt.data.coop import canonical_name
from clipadapt.data.splitting import parse_split_ratios, stratified_split
from clipadapt.errors import ClipAdaptError
from clipadapt.recipes import tip_recipe

CLASSES = ("ant", "bee", "cow")


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _flat_folder(root: Path, per_class: int = 10) -> Path:
    for c, cls in enumerate(CLASSES):
        for i in range(per_class):
            _image(root / cls / f"{i:02d}.png", seed=10 * c + i)
    return root


def test_a_plain_image_folder_gets_a_seeded_stratified_held_out_split(tmp_path):
    root = _flat_folder(tmp_path / "pets")
    with pytest.warns(UserWarning, match=r"seeded 50/20/30 .* stored in .*split_pets\.json"):
        ds = load_dataset(root)
    for split, n in (("train", 5), ("val", 2), ("test", 3)):  # CoOp: round(50%), round(20%)
        assert [ds[split].labels.count(c) for c in range(3)] == [n, n, n], split
    paths = {s: set(ds[s].paths) for s in ("train", "val", "test")}
    assert not (paths["train"] & paths["test"] or paths["train"] & paths["val"])
    assert paths["val"].isdisjoint(paths["test"])
    assert len(paths["train"] | paths["val"] | paths["test"]) == 30

    (split_file,) = (Path(os.environ["CLIPADAPT_CACHE"]) / "splits").glob("pets-*/split_pets.json")
    stored = json.loads(split_file.read_text())
    assert [e[0] for e in stored["test"]] == ds["test"].paths
    again = load_dataset(root)  # the stored split is reused, the same draw every time
    assert again["test"].paths == ds["test"].paths
    reused = load_dataset(split_file)  # and readable on its own
    assert reused["test"].paths == ds["test"].paths and reused["train"].labels == ds["train"].labels

    with pytest.warns(UserWarning, match="seeded 60/20/20"):
        other = load_dataset(root, split_ratios="0.6,0.2,0.2")
    assert len(other["train"]) == 18 and len(other["test"]) == 6


def test_stratified_split_is_seeded_and_keeps_a_test_image():
    from clipadapt.data.dataset import Item

    items = [Item(f"/x/{c}/{i}.png", c, str(c)) for c in range(4) for i in range(7)]
    a = stratified_split(items, (0.5, 0.2, 0.3), seed=1)
    b = stratified_split(items, (0.5, 0.2, 0.3), seed=1)
    c = stratified_split(items, (0.5, 0.2, 0.3), seed=2)
    assert a == b and a != c
    assert [len(a[s]) for s in ("train", "val", "test")] == [
        16,
        4,
        8,
    ]  # 7 -> 4 (3.5 rounds to even), 1, 2
    two = stratified_split([Item("/a", 0, "a"), Item("/b", 0, "a")], (0.5, 0.2, 0.3))
    assert len(two["train"]) == 1 and len(two["test"]) == 1
    assert parse_split_ratios("50,20,30") == pytest.approx((0.5, 0.2, 0.3))
    assert parse_split_ratios("0.8,0.1") == pytest.approx((0.8, 0.1, 0.1))
    for bad in ("0.5", "a,b,c", "0,0.5,0.5", "-1,1,1"):
        with pytest.raises(ClipAdaptError, match="--split-ratios"):
            parse_split_ratios(bad)


def test_a_csv_file_without_splits_is_split_too(tmp_path):
    root = _flat_folder(tmp_path / "imgs", per_class=4)
    rows = [f"{cls}/{i:02d}.png,{cls}" for cls in CLASSES for i in range(4)]
    (tmp_path / "all.csv").write_text("path,label\n" + "\n".join(f"imgs/{r}" for r in rows))
    with pytest.warns(UserWarning, match="no train/val/test splits"):
        ds = load_dataset(tmp_path / "all.csv")
    assert len(ds["train"]) == 6 and len(ds["test"]) == 3 and len(ds["val"]) == 3
    assert root.is_dir()


def test_train_and_val_folders_test_on_val(tmp_path):
    for split in ("train", "val"):
        for c, cls in enumerate(CLASSES):
            _image(tmp_path / "tv" / split / cls / "0.png", seed=c)
    with pytest.warns(UserWarning, match="no test split; evaluating on val"):
        ds = load_dataset(tmp_path / "tv")
    assert len(ds["test"]) == 3 and all("/val/" in p for p in ds["test"].paths)
    assert len(ds["val"]) == 0 and len(ds["train"]) == 3


def test_an_excel_csv_with_a_byte_order_mark_and_crlf_reads(tmp_path):
    for i, cls in enumerate(("zebra", "ant")):
        _image(tmp_path / "d" / f"{i}.jpg", seed=i)
    body = "\ufeffpath , label\r\n0.jpg,zebra\r\n1.jpg, ant\r\n"
    (tmp_path / "d" / "train.csv").write_bytes(body.encode("utf-8"))
    (tmp_path / "d" / "test.csv").write_bytes(body.encode("utf-8"))
    ds = load_dataset(tmp_path / "d")
    assert ds["train"].classnames == ["ant", "zebra"] and ds["test"].labels == [1, 0]


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("Flowers102", "oxford_flowers"),
        ("flowers-102", "oxford_flowers"),
        ("sun", "sun397"),
        ("SUN397", "sun397"),
        ("ucf", "ucf101"),
        ("Caltech-101", "caltech-101"),
        ("OxfordPets", "oxford_pets"),
        ("FGVCAircraft", "fgvc_aircraft"),
        ("DescribableTextures", "dtd"),
        ("ImageNet", "imagenet"),
    ],
)
def test_paper_dataset_names_share_one_alias_table(name, canonical):
    from clipadapt.templates import get_templates

    assert canonical_name(name) == canonical
    assert tip_recipe(name) == tip_recipe(canonical)
    assert get_templates(name) == get_templates(canonical)


def test_a_paper_name_finds_its_folder_under_the_data_root(tmp_path):
    splits = {"train": [["a/0.jpg", 0, "a"]], "val": [], "test": [["a/1.jpg", 0, "a"]]}
    folder = tmp_path / "DATA" / "oxford_flowers"
    for rel, _, _ in splits["train"] + splits["test"]:
        _image(folder / "jpg" / rel)
    (folder / "split_zhou_OxfordFlowers.json").write_text(json.dumps(splits))
    for name in ("Flowers102", "flowers-102", "oxford_flowers"):
        assert load_dataset(name, root=tmp_path / "DATA")["test"].name == "oxford_flowers"
    with pytest.raises(ClipAdaptError, match="no such dataset folder .*known names: .*Flowers102"):
        load_dataset("sun", root=tmp_path / "DATA")


def test_a_folder_of_datasets_is_not_read_as_one(tmp_path):
    for name in ("caltech-101", "dtd", "eurosat"):
        _image(tmp_path / "DATA" / name / "images" / "0.jpg")
    with pytest.raises(
        ClipAdaptError, match=r"a folder of 3 datasets .*--data caltech-101 --data-root"
    ):
        load_dataset(tmp_path / "DATA")
