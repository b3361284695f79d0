"""How fast do small image towers learn ShapesWorld's shapes? A supervised probe, CPU.

    python scripts/shape_learnability.py --arch vit  --steps 600
    python scripts/shape_learnability.py --arch cnn  --steps 600
    python scripts/shape_learnability.py --arch vit-distill --steps 600
    python scripts/shape_learnability.py --arch vit --data fresh --steps 900 \
        --centre-steps 200 --spread-steps 400

Each trains an 8-way shape classifier from scratch (AdamW lr 1e-3, batch 64, one thread) on
generated single-object scenes (a fixed set of `--train` images, or `--data fresh`: new
scenes every step) and prints held-out accuracy (objects anywhere) every 100 steps.
`--position centred|grid` places the training objects at the image centre or on the patch
grid; `--centre-steps/--spread-steps` is the pre-training script's position curriculum
(fresh data: centred first, then the range grows to the whole image).
`vit` is the tiny-shapes vision tower; `cnn` a 4-conv network of similar cost;
`vit-distill` first trains the CNN for `--teacher-steps`, then trains the ViT with an extra
loss: its tokens after block `--layer` regress the CNN's stride-8 feature map. These are the
measurements behind docs/tiny-shapes.md and the teacher in scripts/pretrain_tiny_shapes.py.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from pretrain_tiny_shapes import ASSETS, Distiller, spread_at, to_input, towards_centre

from clipadapt.data import shapesworld as sw

CLEAN = {"lighting": 0, "weather": 0, "quality": 0}


def scenes_and_labels(
    seed, n: int, clean: bool, position: str = "random", spread: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """n single-object scenes; clean = large solid shapes in daylight, else the full world.
    The object sits anywhere (``random``, its offset from the centre scaled by ``spread``),
    at the centre, or with its centre on the 8-pixel patch grid (``grid``)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(sw.SHAPES), size=n)
    kw = dict(pattern=0, attrs=CLEAN, size_range=(0.26, 0.42)) if clean else {}
    scenes = [sw.sample_scene(rng, (1, 1), shape=int(y), **kw) for y in labels]
    for scene in scenes:
        o = scene.objects[0]
        if position == "centred":
            o.cx = o.cy = 0.5
        elif position == "grid":
            o.cx, o.cy = round(o.cx * 8) / 8, round(o.cy * 8) / 8
        else:
            towards_centre(o, spread)
    images = torch.from_numpy(np.stack([sw.render(s, 64)[0] for s in scenes]))
    return to_input(images), torch.from_numpy(labels)


def vit() -> torch.nn.Module:
    cfg = json.loads((ASSETS / "tiny-shapes.json").read_text())
    return open_clip.model.CLIP(**cfg).visual


def logits(model, head, x):
    out = model(x)
    return head(out[0] if isinstance(out, tuple) else out)  # TeacherCNN: (embedding, map)


def train(model, head, batch, steps, log, extra_loss=None, tag=""):
    """``batch(step)`` -> (images, labels) of that step."""
    params = list(model.parameters()) + list(head.parameters())
    if extra_loss is not None:
        params += list(extra_loss.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        x, y = batch(step)
        loss = F.cross_entropy(logits(model, head, x), y)
        if extra_loss is not None:
            loss = loss + extra_loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(tag, step + 1, loss.item(), time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["vit", "cnn", "vit-distill"], default="vit")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--train", type=int, default=8192)
    ap.add_argument("--full-world", action="store_true", help="all sizes, patterns, conditions")
    ap.add_argument("--data", choices=["fixed", "fresh"], default="fixed")
    ap.add_argument("--position", choices=["random", "centred", "grid"], default="random")
    ap.add_argument("--centre-steps", type=int, default=0, help="fresh data: centred objects")
    ap.add_argument("--spread-steps", type=int, default=0, help="then their range grows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    clean = not args.full_world
    x_test, y_test = scenes_and_labels(2, 512, clean)
    if args.data == "fixed":
        x_train, y_train = scenes_and_labels(1, args.train, clean, args.position)

        def batch(_step):
            i = torch.randint(0, len(x_train), (64,))
            return x_train[i], y_train[i]
    else:

        def batch(step):
            spread = spread_at(step, args.centre_steps, args.spread_steps)
            return scenes_and_labels([1, step], 64, clean, args.position, spread)

    def evaluator(model, head):
        def log(tag, step, loss, seconds):
            with torch.no_grad():
                acc = (logits(model, head, x_test).argmax(1) == y_test).float().mean().item()
            print(f"{tag}step {step} loss {loss:.3f} test acc {acc:.3f} ({seconds:.0f} s)")

        return log

    teacher = distiller = None
    if args.arch in ("cnn", "vit-distill"):
        # the CNN + the token regression
        distiller = Distiller(len(sw.SHAPES), vit_width=128, embed_dim=128, layers=(args.layer,))
        teacher = distiller.teacher
        steps = args.steps if args.arch == "cnn" else args.teacher_steps
        identity = torch.nn.Identity()
        train(teacher, identity, batch, steps, evaluator(teacher, identity), tag="cnn ")
    if args.arch == "cnn":
        return
    model, head = vit(), torch.nn.Linear(128, len(sw.SHAPES))
    extra = None
    if distiller is not None:
        teacher.requires_grad_(False)
        tokens = distiller.hook(model)

        class Dense(torch.nn.Module):
            """The pre-training script's dense loss, as a module so that `train` optimises reg."""

            def __init__(self):
                super().__init__()
                self.reg = distiller.reg

            def forward(self, x):
                return distiller.dense_loss(tokens, teacher.stem(x))

        extra = Dense()
    train(model, head, batch, args.steps, evaluator(model, head), extra, tag="vit ")


if __name__ == "__main__":
    main()
