"""How fast do small image towers learn ShapesWorld's shapes? A supervised probe, CPU.

    python scripts/shape_learnability.py --arch vit  --steps 600
    python scripts/shape_learnability.py --arch cnn  --steps 600
    python scripts/shape_learnability.py --arch vit-distill --steps 600

Each trains an 8-way shape classifier from scratch (AdamW lr 1e-3, batch 64, one thread) on a
fixed set of generated single-object scenes and prints held-out accuracy every 100 steps.
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
from pretrain_tiny_shapes import ASSETS, Distiller, to_input

from clipadapt.data import shapesworld as sw

CLEAN = {"lighting": 0, "weather": 0, "quality": 0}


def scenes_and_labels(seed: int, n: int, clean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """n single-object scenes; clean = large solid shapes in daylight, else the full world."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(sw.SHAPES), size=n)
    if clean:
        scenes = [
            sw.sample_scene(
                rng, (1, 1), shape=int(y), pattern=0, attrs=CLEAN, size_range=(0.26, 0.42)
            )
            for y in labels
        ]
    else:
        scenes = [sw.sample_scene(rng, (1, 1), shape=int(y)) for y in labels]
    images = torch.from_numpy(np.stack([sw.render(s, 64)[0] for s in scenes]))
    return to_input(images), torch.from_numpy(labels)


def vit() -> torch.nn.Module:
    cfg = json.loads((ASSETS / "tiny-shapes.json").read_text())
    return open_clip.model.CLIP(**cfg).visual


def logits(model, head, x):
    out = model(x)
    return head(out[0] if isinstance(out, tuple) else out)  # TeacherCNN: (embedding, map)


def train(model, head, x, steps, log, extra_loss=None, tag=""):
    params = list(model.parameters()) + list(head.parameters())
    if extra_loss is not None:
        params += list(extra_loss.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        i = torch.randint(0, len(x[0]), (64,))
        loss = F.cross_entropy(logits(model, head, x[0][i]), x[1][i])
        if extra_loss is not None:
            loss = loss + extra_loss(x[0][i])
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
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    clean = not args.full_world
    train_set = scenes_and_labels(1, args.train, clean)
    x_test, y_test = scenes_and_labels(2, 512, clean)

    def evaluator(model, head):
        def log(tag, step, loss, seconds):
            with torch.no_grad():
                acc = (logits(model, head, x_test).argmax(1) == y_test).float().mean().item()
            print(f"{tag}step {step} loss {loss:.3f} test acc {acc:.3f} ({seconds:.0f} s)")

        return log

    teacher = distiller = None
    if args.arch in ("cnn", "vit-distill"):
        distiller = Distiller(len(sw.SHAPES), vit_width=128)  # the CNN + the token regression
        teacher = distiller.teacher
        steps = args.steps if args.arch == "cnn" else args.teacher_steps
        identity = torch.nn.Identity()
        train(teacher, identity, train_set, steps, evaluator(teacher, identity), tag="cnn ")
    if args.arch == "cnn":
        return
    model, head = vit(), torch.nn.Linear(128, len(sw.SHAPES))
    extra = None
    if distiller is not None:
        teacher.requires_grad_(False)
        feats: dict[str, torch.Tensor] = {}
        model.transformer.resblocks[args.layer].register_forward_hook(
            lambda _m, _i, o: feats.__setitem__("tokens", o)
        )

        class Dense(torch.nn.Module):
            """The pre-training script's dense loss, as a module so that `train` optimises reg."""

            def __init__(self):
                super().__init__()
                self.reg = distiller.reg

            def forward(self, x):
                return distiller.dense_loss(feats["tokens"], teacher.stem(x))

        extra = Dense()
    train(model, head, train_set, args.steps, evaluator(model, head), extra, tag="vit ")


if __name__ == "__main__":
    main()
