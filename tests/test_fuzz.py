"""Property-based fuzzing of the readers: whatever the files hold, the only exception that
escapes is ClipAdaptError (a warning is fine; a KeyError, TypeError or IndexError is a bug).

Example counts are kept small so that the whole file runs in seconds.
"""

from __future__ import annotations

import json
import string
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipadapt.data import load_dataset, load_subset
from clipadapt.errors import ClipAdaptError
from clipadapt.features.cache import CacheEntry
from clipadapt.features.extract import _Images
from clipadapt.io import read_json

FUZZ = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

# JSON values, biased towards the shapes the readers expect so that deeper code is reached
scalars = st.none() | st.booleans() | st.integers(-3, 5) | st.floats() | st.text(max_size=6)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)
names = st.sampled_from(["a.png", "b/c.png", "", "../x.png", "d.jpg", 3, None])
labels = st.sampled_from([0, 1, 2, -1, "0", 1.5, None, True])
classnames = st.sampled_from(["cat", "dog", "", 7, None])
entries = st.one_of(st.tuples(names, labels, classnames).map(list), json_values)
split_docs = st.one_of(
    st.dictionaries(st.sampled_from(["train", "val", "test", "x"]), st.lists(entries, max_size=4)),
    json_values,
)
texts = st.text(alphabet=string.printable + "é,\"'\x00", max_size=80)
contents = texts.map(str.encode) | st.binary(max_size=40)  # also not UTF-8 at all


def _png(rng: np.random.Generator) -> bytes:
    path = Path(tempfile.mkstemp(suffix=".png")[1])
    Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.unlink()
    return data


VALID_PNG = _png(np.random.default_rng(0))


@contextmanager
def folder():
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = Path(d)
        for rel in ("a.png", "b/c.png", "d.jpg", "images/a.png"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(VALID_PNG)
        yield root


def only_ours(read, *args) -> None:
    try:
        read(*args)
    except ClipAdaptError as e:
        assert "\n" not in str(e)


@FUZZ
@given(doc=split_docs, name=st.sampled_from(["split_zhou_Toy.json", "split_zhou_OxfordPets.json"]))
def test_split_json(doc, name):
    with folder() as root:
        (root / name).write_text(json.dumps(doc))
        only_ours(load_dataset, root)
        only_ours(load_dataset, root / name)


@FUZZ
@given(
    header=st.sampled_from(["path,label", "path,label,classname", "label,path", "file", ""]),
    body=st.lists(
        st.tuples(names.map(str), labels.map(str), classnames.map(str)).map(",".join) | texts,
        max_size=5,
    ),
    split=st.sampled_from(["train.csv", "test.csv", "data.csv"]),
    tail=st.just(b"") | st.binary(max_size=8),
)
def test_csv(header, body, split, tail):
    with folder() as root:
        (root / split).write_bytes(("\n".join([header, *body]) + "\n").encode() + tail)
        only_ours(load_dataset, root)
        only_ours(load_dataset, root / split)


@FUZZ
@given(variants=contents, lines=st.lists(contents, min_size=3, max_size=3))
def test_fgvc_aircraft_txt(variants, lines):
    with folder() as root:
        aircraft = root / "fgvc_aircraft"
        aircraft.mkdir()
        (aircraft / "variants.txt").write_bytes(variants)
        for split, text in zip(("train", "val", "test"), lines, strict=True):
            (aircraft / f"images_variant_{split}.txt").write_bytes(text)
        only_ours(load_dataset, aircraft)


@FUZZ
@given(classnames_txt=contents, wnids=st.lists(st.text(string.ascii_letters, max_size=4)))
def test_imagenet_classnames(classnames_txt, wnids):
    with folder() as root:
        imagenet = root / "imagenet"
        (imagenet / "images" / "val").mkdir(parents=True)
        (imagenet / "images" / "train").mkdir(parents=True)
        for w in wnids:
            (imagenet / "images" / "train" / (w or "_")).mkdir(exist_ok=True)
        (imagenet / "classnames.txt").write_bytes(classnames_txt)
        only_ours(load_dataset, imagenet)


@FUZZ
@given(doc=st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "dataset": json_values, "root": json_values, "classnames": json_values,
    "train": st.lists(st.lists(labels | names, max_size=3), max_size=3) | json_values,
    "val": st.lists(st.lists(labels | names, max_size=3), max_size=3) | json_values,
    "indices": json_values,
})))  # fmt: skip
def test_subset_file(doc):
    with folder() as root:
        (root / "subset.json").write_text(json.dumps(doc))
        only_ours(load_subset, root / "subset.json")


@FUZZ
@given(data=st.binary(max_size=64) | texts.map(str.encode))
def test_read_json(data):
    with folder() as root:
        (root / "x.json").write_bytes(data)
        only_ours(read_json, root / "x.json")


@FUZZ
@given(
    manifest=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"shard_size": st.sampled_from([2, 0, -1, "2", None])},
            optional={
                "count": st.sampled_from([5, 4, "5"]),
                "shards": st.lists(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "file": st.sampled_from(
                                ["shard-00000.safetensors", "shard-00001.safetensors", "../x", 1]
                            ),
                            "start": st.sampled_from([0, 2, 4, 1, -2, "0", None]),
                            "stop": st.sampled_from([2, 4, 5, 3, None]),
                            "sha256": st.text(max_size=3),
                        },
                    )
                    | json_values,
                    max_size=3,
                )
                | json_values,
                "bad": st.lists(json_values, max_size=2) | json_values,
            },
        ),
    ),
    part=st.booleans(),
)
def test_cache_documents(manifest, part):
    """A damaged manifest or part file is discarded (with a warning), never trusted or raised."""
    with folder() as root:
        entry = CacheEntry(root, "s", {"x": 1}, 5, 2)
        entry.write_shard(0, torch.zeros(2, 3), [])
        if isinstance(manifest, dict):
            manifest = {"key": entry.key, "count": 5, **manifest}
        name = "part-00003.json" if part else "manifest.json"
        (entry.path / name).write_text(json.dumps(manifest))
        reopened = CacheEntry(root, "s", {"x": 1}, 5, 2)
        for start in reopened.rows:
            assert torch.equal(reopened.rows[start], torch.zeros(2, 3))
        assert set(reopened.rows) <= {0}


@FUZZ
@given(
    cut=st.integers(0, len(VALID_PNG)),
    flips=st.lists(st.tuples(st.integers(0, len(VALID_PNG) - 1), st.integers(0, 255)), max_size=4),
    junk=st.binary(max_size=16),
)
def test_image_decoding_reports_instead_of_raising(cut, flips, junk):
    """A damaged file is one bad image with a reason, never an exception out of the loader."""
    data = bytearray(VALID_PNG[:cut] + junk)
    for i, value in flips:
        if i < len(data):
            data[i] = value
    with folder() as root:
        (root / "x.png").write_bytes(bytes(data))
        i, xs, error = _Images([str(root / "x.png")], ["x.png"], [(_to_tensor, 0)], 0)[0]
        assert i == 0 and (xs is None) != (error is None)
        if xs is not None:
            assert xs[0].shape[0] == 3


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
