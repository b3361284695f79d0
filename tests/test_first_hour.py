"""What a newcomer hits in the first hour: plain folders, names, flags, errors and warnings."""

from __future__ import annotations

import json
import os
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
    for i in range(2):
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


def _cli(*argv: str) -> tuple[int, str, bool]:
    """Run the CLI in a fresh interpreter -> (exit code, stderr, whether torch was imported)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom clipadapt.cli import main\n"
        "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\nsys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )
    err = proc.stderr
    return proc.returncode, err.rsplit("TORCH", 1)[0], "TORCH True" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["bench", "--help"],
        ["seg-eval", "--help"],
        ["fit", "--help"],
        ["segment", "--help"],
        ["predict", "--help"],
    ],
)
def test_help_does_not_import_torch(argv):
    rc, err, torch_loaded = _cli(*argv)
    assert rc == 0 and not torch_loaded, err


def test_argument_and_dataset_errors_come_before_torch(tmp_path):
    rc, err, torch_loaded = _cli(
        "bench", "--methods", "zero-shot", "--data", "nosuch", "--out", "o"
    )
    assert rc == 2 and not torch_loaded
    assert err.strip() == "clipadapt: error: nosuch: no such dataset folder or file"
    rc, err, torch_loaded = _cli(
        "zeroshot", "--data", "Flowers102", "--data-root", str(tmp_path), "--out", "r.json"
    )
    assert rc == 2 and not torch_loaded
    assert "no such dataset folder in" in err and "known names" in err
    rc, err, torch_loaded = _cli("predict", "--adapter", str(tmp_path), str(tmp_path / "x.jpg"))
    assert rc == 2 and not torch_loaded and "config.json: file not found" in err
    (tmp_path / "config.json").write_text("{}")
    rc, err, torch_loaded = _cli("predict", "--adapter", str(tmp_path), str(tmp_path / "x.jpg"))
    assert rc == 2 and not torch_loaded and "x.jpg: no such image file" in err
    rc, err, _ = _cli("bench", "--methods", "zero-shot", "--out", "o")
    assert rc == 2 and "one of the arguments --data is required" in err


def test_old_flag_spellings_still_work_with_one_deprecation_line(tmp_path):
    rc, err, _ = _cli("bench", "--methods", "zero-shot", "--datasets", "nosuch", "--out", "o")
    lines = err.strip().splitlines()
    assert rc == 2 and lines == [
        "clipadapt: warning: --datasets is deprecated; use --data",
        "clipadapt: error: nosuch: no such dataset folder or file",
    ]
    rc, err, _ = _cli("seg-eval", "--dataset", "voc21", "--data-root", str(tmp_path))
    assert rc == 2 and err.startswith("clipadapt: warning: --dataset is deprecated; use --data\n")
    assert "VOCdevkit" in err  # parsed as --data voc21: the layout is looked for
    from clipadapt.cli import build_parser

    args = build_parser().parse_args(
        ["segment", "im.png", "--classes", "a", "--out", "o.png", "--cache", "C"]
    )
    assert args.cache_dir == "C"
    with pytest.warns(UserWarning, match="--cache-dir is deprecated; use --cache"):
        old = build_parser().parse_args(
            ["segment", "im.png", "--classes", "a", "--out", "o.png", "--cache-dir", "C"]
        )
    assert old.cache_dir == "C"


def test_every_dataset_command_speaks_the_same_flags():
    from clipadapt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("extract", "zeroshot", "fit", "eval", "bench"):
        flags = {o for a in sub[name]._actions for o in a.option_strings}
        assert {"--data", "--data-root", "--split-ratios"} <= flags, name
    for name in ("zeroshot", "fit", "eval", "bench", "segment", "seg-eval"):
        flags = {o for a in sub[name]._actions for o in a.option_strings}
        assert "--cache" in flags, name


def test_warnings_print_as_one_clipadapt_line(tmp_path):
    _flat_folder(tmp_path / "flat", per_class=3)
    rc, err, _ = _cli(
        "extract",
        "--data",
        str(tmp_path / "flat"),
        "--out",
        str(tmp_path / "c"),
        "--model",
        "nosuch-model",
        "--split",
        "test",
    )
    warning_lines = [ln for ln in err.splitlines() if "warning" in ln.lower()]
    assert warning_lines and all(ln.startswith("clipadapt: warning: ") for ln in warning_lines)
    assert "UserWarning" not in err and "splitting.py" not in err


def test_interrupt_during_start_up_exits_130_without_a_traceback(monkeypatch, capsys):
    import clipadapt.commands.bench as bench
    from clipadapt.cli import main

    def interrupted(subparsers):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "add_parser", interrupted)
    assert main(["bench", "--help"]) == 130
    assert "interrupted" in capsys.readouterr().err


def _zero_shot_adapter(directory: Path, dim: int = 8, classes: int = 3) -> Path:
    import torch

    from clipadapt.methods import get

    method = get("zero-shot").fit(None, torch.nn.functional.normalize(torch.randn(classes, dim)))
    method.meta = {"embed_dim": dim, "classnames": [f"c{i}" for i in range(classes)]}
    return method.save(directory)


def test_a_full_disk_while_saving_is_one_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    import torch
    from safetensors import SafetensorError

    import clipadapt.methods.base as base
    import clipadapt.zeroshot as zeroshot

    saved = _zero_shot_adapter(tmp_path / "a")
    before = (saved / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os 28))")

    monkeypatch.setattr(base, "save_file", full)
    with pytest.raises(ClipAdaptError, match=r"model\.safetensors: cannot write .*No space left"):
        _zero_shot_adapter(tmp_path / "a")
    assert (saved / "model.safetensors").read_bytes() == before
    assert not list(saved.glob("*.tmp-*"))

    class Bb:
        identity = {"name": "x"}

        def text_classifier(self, names, templates):
            return torch.nn.functional.normalize(torch.randn(len(names), 4))

    monkeypatch.setattr(zeroshot, "save_file", full)
    with pytest.raises(ClipAdaptError, match=r"text-.*\.safetensors: cannot write"):
        zeroshot.text_weights(Bb(), ["a", "b"], ["{}"], tmp_path / "cache")


def test_a_corrupted_text_weights_cache_is_recomputed(tmp_path):
    import torch

    from clipadapt.zeroshot import text_weights

    calls = []

    class Bb:
        identity = {"name": "x"}

        def text_classifier(self, names, templates):
            calls.append(1)
            return torch.nn.functional.normalize(
                torch.ones(len(names), 4) + torch.eye(len(names), 4)
            )

    first = text_weights(Bb(), ["a", "b"], ["{}"], tmp_path)
    assert torch.equal(text_weights(Bb(), ["a", "b"], ["{}"], tmp_path), first) and len(calls) == 1
    (path,) = tmp_path.glob("text-*.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # one bit of one weight: the file still parses
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="corrupted text-weights cache; recomputing"):
        again = text_weights(Bb(), ["a", "b"], ["{}"], tmp_path)
    assert torch.equal(again, first) and len(calls) == 2


def test_an_adapter_whose_tensors_do_not_fit_its_config_fails_at_load(tmp_path):
    import torch
    from safetensors.torch import save_file

    from clipadapt.methods import load_adapter

    saved = _zero_shot_adapter(tmp_path / "a", dim=8)
    assert load_adapter(saved).logits(torch.randn(2, 8)).shape == (2, 3)
    save_file({"text_weights": torch.randn(3, 6)}, str(saved / "model.safetensors"))
    with pytest.raises(ClipAdaptError, match=r"model\.safetensors: tensors do not fit the config"):
        load_adapter(saved)
    save_file({"text_weights": torch.randn(5, 8)}, str(saved / "model.safetensors"))
    with pytest.raises(ClipAdaptError, match="gives 5 classes but the config names 3"):
        load_adapter(saved)


def test_an_adapter_config_with_a_non_object_meta_is_one_error(tmp_path):
    from clipadapt.methods import load_adapter

    saved = _zero_shot_adapter(tmp_path / "a")
    doc = json.loads((saved / "config.json").read_text())
    doc["meta"] = [1, 2]
    (saved / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ClipAdaptError, match=r"config\.json: 'meta' must be a JSON object"):
        load_adapter(saved)


def test_the_extract_summary_counts_skipped_and_reused_images(tmp_path, capsys):
    import open_clip
    import torch
    from safetensors.torch import save_file

    from clipadapt import cli

    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-vit", pretrained=None)
    weights = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    root = _flat_folder(tmp_path / "d", per_class=4)
    (root / "ant" / "bad.png").write_bytes(b"not a png")
    argv = ["extract", "--model", "tiny-test-vit", "--pretrained", weights, "--data", str(root)]
    argv += ["--split-ratios", "1,0,0"]
    argv += ["--split", "train", "--out", str(tmp_path / "c"), "--skip-bad", "--num-workers", "0"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "12 images x 32 dims, 12 computed, 0 reused, 1 skipped" in out, out
    assert "clipadapt: warning: skipped 1 unreadable images" in err
    assert cli.main([*argv, "--augment-views", "2"]) == 0
    out = capsys.readouterr().out
    assert "12 images x 32 dims, 0 computed, 12 reused, 1 skipped" in out, out
    assert "embed-v1: 12 computed, 0 reused" in out, out


def test_exif_orientation_is_applied(tmp_path):
    from clipadapt.data.mmseg import read_image
    from clipadapt.features.extract import load_rgb

    pixels = np.zeros((10, 20, 3), dtype=np.uint8)  # 20 wide, 10 high
    pixels[:, :5] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer turns it 90° clockwise
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    Image.fromarray(pixels).save(tmp_path / "plain.jpg", quality=100)
    for read in (load_rgb, read_image):
        turned, plain = read(str(tmp_path / "phone.jpg")), read(str(tmp_path / "plain.jpg"))
        assert plain.size == (20, 10) and turned.size == (10, 20)
        top = np.asarray(turned)[:3].mean()  # clockwise: the left band becomes the top rows
        assert top > 200 and np.asarray(turned)[-3:].mean() < 50
