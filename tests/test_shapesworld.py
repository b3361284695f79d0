"""ShapesWorld: determinism by seed, the on-disk layouts, captions that tell the truth."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from clipadapt.data import shapesworld as sw
from clipadapt.data import shapesworld_text as st
from clipadapt.data import shapesworld_write as sww


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_render_is_deterministic_and_masks_cover_objects():
    a = sw.sample_scene(np.random.default_rng(3))
    b = sw.sample_scene(np.random.default_rng(3))
    assert a == b
    (ia, ma), (ib, mb) = sw.render(a, 64), sw.render(b, 64)
    assert ia.dtype == np.uint8 and ia.shape == (64, 64, 3)
    assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    assert set(np.unique(ma)) <= {0} | {o.shape + 1 for o in a.objects}
    assert (ma > 0).any()
    c = sw.sample_scene(np.random.default_rng(4))
    assert not np.array_equal(sw.render(c, 64)[0], ia)


def test_instance_masks_agree_with_the_rendered_class_mask():
    rng = np.random.default_rng(11)
    for _ in range(20):
        scene = sw.sample_scene(rng, n_objects=(2, 3), size_range=(0.2, 0.4))
        _, mask = sw.render(scene, 64)
        inst = sw.instance_masks(scene, 64)
        assert inst.shape == (len(scene.objects), 64, 64)
        assert inst.min() >= 0 and inst.sum(0).max() <= 1 + 1e-5
        # where one object holds most of a pixel, the class mask names its shape
        top = inst.argmax(0)
        sure = inst.max(0) >= 0.75
        shapes = np.array([o.shape + 1 for o in scene.objects])[top]
        assert np.array_equal(mask[sure], shapes[sure])
        assert (mask[inst.sum(0) == 0] == 0).all()
    # a later object hides an earlier one where they overlap
    first = scene.objects[0]
    second = dataclasses.replace(scene.objects[1], cx=first.cx + 0.05, cy=first.cy)
    inst = sw.instance_masks(dataclasses.replace(scene, objects=[first, second]), 64)
    hidden = inst[1] >= 1
    assert hidden.sum() > 20 and (inst[0][hidden] == 0).all()
    assert (sw.instance_masks(dataclasses.replace(scene, objects=[first]), 64)[0][hidden] > 0).any()


def test_world_has_at_least_eight_shapes_and_colours():
    assert len(sw.SHAPES) >= 8 and len(sw.COLOURS) >= 8
    rng = np.random.default_rng(0)
    counts = [len(sw.sample_scene(rng).objects) for _ in range(200)]
    assert min(counts) == 1 and max(counts) == 3


def test_constrained_scene_has_the_asked_first_object():
    rng = np.random.default_rng(1)
    for shape in range(len(sw.SHAPES)):
        s = sw.sample_scene(rng, n_objects=(1, 1), shape=shape, pattern=2, attrs={"weather": 1})
        assert s.objects[0].shape == shape and s.objects[0].pattern == 2 and s.weather == 1


def test_captions_assert_only_true_facts():
    rng = np.random.default_rng(2)
    for _ in range(300):
        scene = sw.sample_scene(rng)
        text, facts = st.caption(scene, rng)
        assert text.endswith(".") and facts
        assert st.image_facts(scene)[facts].all(), text


def test_background_captions_name_the_texture_and_draw_nothing_when_off():
    rng, same = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(50):  # background=0: the recipe of the shipped model, same stream
        scene = sw.sample_scene(rng)
        assert st.caption(scene, rng) == st.caption(sw.sample_scene(same), same, background=0.0)
    named = 0
    for _ in range(200):
        scene = sw.sample_scene(rng)
        text, facts = st.caption(scene, rng, background=0.5)
        assert st.image_facts(scene)[facts].all(), text
        if "background" in text:
            named += 1
            assert text.endswith(f"on a {sw.TEXTURES[scene.texture]} background.")
            assert st.texture_fact(scene.texture) in facts
            other = dataclasses.replace(scene, texture=(scene.texture + 1) % len(sw.TEXTURES))
            assert not st.image_facts(other)[facts].all()
    assert 60 < named < 140


def test_caption_facts_reject_a_wrong_image():
    red_star = sw.Scene([sw.Obj(3, 0, 0, 0, 0.5, 0.5, 0.2, 0)], 0, 0, 0, 0, 0, 0)
    blue_star = sw.Scene([sw.Obj(3, 5, 0, 0, 0.5, 0.5, 0.2, 0)], 0, 0, 0, 0, 0, 0)
    fact = st.object_fact(3, 0, None, None)  # "a red star"
    assert st.image_facts(red_star)[fact] and not st.image_facts(blue_star)[fact]


def test_written_layouts_are_readable_and_deterministic(tmp_path):
    from clipadapt.data import load_dataset

    kw = dict(per_class=(2, 1, 2), seed=5, progress=False)
    a = sww.write_classification(tmp_path / "a", "patterns", **kw)
    b = sww.write_classification(tmp_path / "b", "patterns", **kw)
    assert _digest(a) == _digest(b)
    split = json.loads((a / "split_shapesworld-patterns.json").read_text())
    assert len(split["train"]) == 2 * 24 and len(split["test"]) == 2 * 24
    rel, label, name = split["train"][0]
    assert (a / "images" / rel).is_file() and name == "solid circle" and label == 0
    splits = load_dataset(a)
    assert len(splits["test"].classnames) == 24 and splits["test"].classnames[1] == "striped circle"


def test_streets_layout(tmp_path):
    base = sww.write_streets(tmp_path, n_train=12, n_test=6, seed=1, progress=False)
    tasks = json.loads((base / "tasks.json").read_text())
    assert set(tasks) == set(sw.ATTRIBUTES)
    with open(base / "train" / "weather.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(rows[0]) >= {"uuid", "weather", "img_path"}
    assert rows[0]["img_path"].startswith("img/") and (base / rows[0]["img_path"]).is_file()
    assert {r["weather"] for r in rows} <= set(sw.ATTRIBUTES["weather"])


def test_segmentation_layout_uses_palette_indices(tmp_path):
    folder = sww.write_segmentation(tmp_path, n=3, seed=2, progress=False)
    names = (folder / "classnames.txt").read_text().splitlines()
    assert names == ["background", *sw.SHAPES]
    label = Image.open(folder / "annotations" / "validation" / "00000.png")
    assert label.mode == "P"
    values = np.unique(np.asarray(label))
    assert values.max() <= len(sw.SHAPES) and 0 in values and len(values) >= 2
    assert Image.open(folder / "images" / "validation" / "00000.jpg").size == (sww.SEG_SIZE,) * 2


@pytest.mark.parametrize("task", sorted(sww.CLASSIFICATION_TASKS))
def test_every_task_has_a_template(task):
    names, _, template = sww.CLASSIFICATION_TASKS[task]
    assert "{}" in template and len(names) == len(set(names)) >= 8


def test_tones_lighten_and_darken_only_the_first_object():
    base = sw.Obj(0, 0, 0, 1, 0.5, 0.5, 0.3, 0)
    plain, light, dark = (sw.object_rgb(sw.Obj(**{**vars(base), "tone": t})) for t in range(3))
    assert (light > plain).all() and (dark < plain).all()
    np.testing.assert_allclose(light, 0.5 * plain + 127)
    np.testing.assert_allclose(dark, 0.5 * plain)
    scene = sw.sample_scene(np.random.default_rng(3), n_objects=(3, 3), tone=2)
    assert [o.tone for o in scene.objects] == [2, 0, 0]
    # asking for a tone draws nothing more from the generator: other datasets stay as they were
    a = sw.sample_scene(np.random.default_rng(4))
    b = sw.sample_scene(np.random.default_rng(4), tone=1)
    assert a.seed == b.seed and [o.shape for o in a.objects] == [o.shape for o in b.objects]


def test_tones_task_labels_match_the_drawn_objects():
    names, constraint, _ = sww.CLASSIFICATION_TASKS["tones"]
    assert len(names) == 2 * len(sw.COLOUR_NAMES)
    for label, name in enumerate(names):
        tone, colour = name.split()
        c = constraint(label)
        assert sw.TONES[c["tone"]] == tone and sw.COLOUR_NAMES[c["colour"]] == colour


def test_exposure_scales_the_rendered_scene_and_streets_vary_it(tmp_path):
    scene = sw.sample_scene(np.random.default_rng(3), attrs={"quality": 0})  # sharp: no noise
    plain, mask = sw.render(scene)
    assert np.array_equal(plain, sw.render(dataclasses.replace(scene, exposure=1.0))[0])
    dark, dark_mask = sw.render(dataclasses.replace(scene, exposure=0.5))
    assert np.array_equal(mask, dark_mask)
    assert np.abs(dark.astype(float) - 0.5 * plain.astype(float)).max() <= 1.0  # uint8 rounding

    base = sww.write_streets(tmp_path, n_train=30, n_test=0, seed=1, progress=False)
    again = sww.write_streets(
        tmp_path / "fixed", n_train=30, n_test=0, seed=1, exposure=(1, 1), progress=False
    )
    means = [
        [np.asarray(Image.open(b / "img" / f"train-{i:05d}.jpg"), float).mean() for i in range(30)]
        for b in (base, again)
    ]
    ratio = np.array(means[0]) / np.array(means[1])
    assert ratio.min() < 0.85 and ratio.max() > 1.1  # the camera gain differs per image
