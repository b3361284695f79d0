"""Defaults equal the authors' released run configurations (docs/fidelity.md).

The tables here are written by hand from the reference repositories' files, independently of
clipadapt.recipes, so a wrong entry there fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from clipadapt import train as training
from clipadapt.methods import get, get_class
from clipadapt.segmentation.configs import SEG_CONFIGS

# gaopengcuhk/Tip-Adapter configs/<file>.yaml: file -> (search_scale, search_step, init_beta,
# init_alpha, lr, augment_epoch, train_epoch)
TIP_YAML = {
    "caltech101.yaml": ((12, 5), (200, 20), 1, 3, 0.001, 10, 20),
    "dtd.yaml": ((13, 13), (200, 20), 1, 2, 0.001, 10, 20),
    "eurosat.yaml": ((12, 10), (200, 20), 1, 2, 0.001, 10, 100),
    "fgvc.yaml": ((30, 30), (200, 20), 1, 5, 0.001, 10, 20),
    "food101.yaml": ((10, 10), (200, 20), 1, 1.17, 0.001, 10, 20),
    "imagenet.yaml": ((7, 3), (200, 20), 1, 1.17, 0.001, 10, 20),
    "oxford_flowers.yaml": ((50, 50), (200, 20), 1, 10, 0.001, 10, 20),
    "oxford_pets.yaml": ((7, 3), (200, 20), 1, 1.17, 0.001, 10, 20),
    "stanford_cars.yaml": ((20, 10), (200, 20), 1, 3, 0.001, 10, 20),
    "sun397.yaml": ((12, 10), (200, 20), 1, 1.17, 0.001, 10, 20),
    "ucf101.yaml": ((7, 3), (200, 20), 1, 3, 0.001, 10, 20),
}
# the names users pass (CoOp folder names and common spellings) -> the config file
DATASET_NAMES = {
    "caltech-101": "caltech101.yaml",
    "dtd": "dtd.yaml",
    "eurosat": "eurosat.yaml",
    "fgvc_aircraft": "fgvc.yaml",
    "food-101": "food101.yaml",
    "imagenet": "imagenet.yaml",
    "oxford_flowers": "oxford_flowers.yaml",
    "oxford_pets": "oxford_pets.yaml",
    "stanford_cars": "stanford_cars.yaml",
    "sun397": "sun397.yaml",
    "ucf101": "ucf101.yaml",
    "OxfordPets": "oxford_pets.yaml",
    "Caltech101": "caltech101.yaml",
    "my-own-dataset": "imagenet.yaml",  # no config of its own: ImageNet's, the generic one
}


@pytest.mark.parametrize("dataset", sorted(DATASET_NAMES))
def test_tip_adapter_defaults_equal_the_authors_config_per_dataset(dataset):
    scale, step, beta, alpha, lr, augment, epochs = TIP_YAML[DATASET_NAMES[dataset]]
    for name in ("tip-adapter", "tip-adapter-f"):
        method = get(name, dataset=dataset)
        c = method.config
        assert c.search_range() == tuple(float(v) for v in scale)
        assert c.steps == step
        assert c.initial() == (alpha, beta)
        assert method.default_views == augment
        assert c.scale == 100.0  # a constant in main.py, whatever the backbone
        assert not get_class(name).learned_scale
    f = get("tip-adapter-f", dataset=dataset).config
    assert (f.lr, f.resolved_epochs()) == (lr, epochs)
    assert (f.optimizer, f.eps, f.weight_decay, f.batch_size) == ("adamw", 1e-4, 0.01, 256)


def test_sun397_trains_20_epochs_although_it_shares_eurosats_search_range():
    sun, euro = (
        get("tip-adapter-f", dataset="sun397").config,
        get("tip-adapter-f", dataset="eurosat").config,
    )
    assert sun.search_range() == euro.search_range()
    assert (sun.resolved_epochs(), euro.resolved_epochs()) == (20, 100)


def test_explicit_values_override_the_dataset_recipe():
    c = get("tip-adapter-f", dataset="oxford_flowers", alpha=2.0, beta=3.0, epochs=7).config
    assert c.initial() == (2.0, 3.0) and c.resolved_epochs() == 7


def test_the_trainable_adapters_defaults_equal_their_reference_configs():
    # CLIP-Adapter: CoOp configs/trainers/CoOp/rn50.yaml + Dassl defaults; clip_adapter.py
    c = get("clip-adapter").config
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (
        "sgd", 2e-3, 0.9, 5e-4, 32, 200,
    )  # fmt: skip
    assert (c.warmup_epochs, c.warmup_type, c.warmup_lr, c.lr_step) == (
        1,
        "constant",
        1e-5,
        "epoch",
    )
    assert (c.ratio, c.reduction, c.select_epoch) == (0.2, 4, "last")
    # CLIP-MHAdapter: configs/vit_b16-adamw.yaml, patches/defaults.py
    m = get("mh-adapter").config
    assert (m.optimizer, m.lr, m.weight_decay, m.batch_size, m.epochs, m.patience) == (
        "adamw", 5e-4, 5e-4, 256, 100, 10,
    )  # fmt: skip
    assert (m.warmup_epochs, m.warmup_type, m.warmup_lr, m.lr_step) == (5, "linear", 1e-5, "epoch")
    assert (m.heads, m.ratio, m.dropout) == (4, 0.2, 0.1)
    # Multi-Modal Adapter: the authors' runs (constant lr 5e-3, batch 256, patience 20)
    a = get("mm-adapter").config
    assert (a.optimizer, a.lr, a.weight_decay, a.batch_size, a.patience, a.schedule) == (
        "adam", 5e-3, 1e-4, 256, 20, "constant",
    )  # fmt: skip
    for name in ("clip-adapter", "mh-adapter", "mm-adapter"):
        assert get_class(name).learned_scale  # the backbone's exp(logit_scale)


def dassl_reference(epochs, base, warmup, kind, low):
    """Dassl's per-epoch lr, by stepping torch's own schedulers the way Dassl's warm-up
    wrapper does (CosineAnnealingLR(T_max=max_epoch) started when the warm-up ends)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs))
    out = []
    for e in range(epochs):
        if e < warmup:
            out.append(low if kind == "constant" or e == 0 else base * e / warmup)
        else:
            out.append(cosine.get_last_lr()[0])
            cosine.step()
    return out


@pytest.mark.parametrize("warmup,kind", [(0, "linear"), (1, "constant"), (5, "linear")])
def test_per_epoch_schedule_follows_dassl(warmup, kind):
    epochs, base, low = 12, 0.01, 1e-5
    want = dassl_reference(epochs, base, warmup, kind, low)
    got = [training.dassl_lr(e, base, epochs, warmup, kind, low) for e in range(epochs)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    # inside train(): every iteration of an epoch uses that epoch's lr
    config = training.TrainConfig(
        epochs=epochs, lr=base, lr_step="epoch", warmup_epochs=warmup, warmup_type=kind
    )
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = training._scheduler(opt, config, steps_per_epoch=3)
    seen = []
    for _ in range(epochs * 3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr for lr in want for _ in range(3)], rel=1e-12, abs=1e-15)


def test_constant_schedule_keeps_the_base_lr():
    config = training.TrainConfig(epochs=3, lr=5e-3, schedule="constant")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=5e-3)
    sched = training._scheduler(opt, config, steps_per_epoch=4)
    for _ in range(12):
        assert opt.param_groups[0]["lr"] == 5e-3
        opt.step()
        sched.step()
    assert math.isclose(sched.get_last_lr()[0], 5e-3)


def test_sclip_thresholds_and_sizes_equal_the_configs():
    # wangf3014/SCLIP configs/cfg_<name>.py: logit_scale, prob_thd, area_thd, Resize short side
    assert SEG_CONFIGS["context60"].scale == 50.0
    assert SEG_CONFIGS["context60"].bg_threshold == 0.1  # cfg_context60.py:7
    assert SEG_CONFIGS["voc21"].bg_threshold == 0.1 and SEG_CONFIGS["voc21"].area_threshold == 0.1
    assert SEG_CONFIGS["coco_object"].bg_threshold == 0.1
    assert SEG_CONFIGS["coco_stuff"].short_side == 448  # cfg_coco_stuff164k.py:14
    assert SEG_CONFIGS["coco_stuff10k"].short_side == 336  # cfg_coco_stuff10k.py:14
    assert SEG_CONFIGS["cityscapes"].short_side == 560


def test_protocols_fill_the_learned_scale_except_for_tip_adapter():
    from types import SimpleNamespace

    from clipadapt.commands.fit import build_method

    bb = SimpleNamespace(logit_scale=29.6)
    for name, want in [("clip-adapter", 29.6), ("mm-adapter", 29.6), ("tip-adapter", 100.0)]:
        m = build_method(name, [], bb=bb, dataset="dtd", seed=1, device="cpu")
        assert m.config.scale == want
    m = build_method("tip-adapter-f", ["scale=29.6"], bb=bb, dataset="dtd", seed=1, device="cpu")
    assert m.config.scale == 29.6  # an explicit value still wins
