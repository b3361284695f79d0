"""Are a backbone's dense (patch) features in the text space? The question behind SCLIP.

    python scripts/dense_probe.py [--pretrained FILE] [--scenes 200]

On generated ShapesWorld scenes (64 px, 1-2 objects) each 8x8 patch gets the class of the
object covering most of it. For every attention variant of `dense_features`, over the object
patches: zero-shot accuracy (the patch feature against the text prompts of the 8 shapes, or of
the 8 colours) and the accuracy of a linear probe fitted on half the patches and scored on the
other half. A probe far above zero-shot means the information is in the patch features but not
aligned with the text: training-free segmentation cannot read it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from clipadapt.backbones import load_backbone
from clipadapt.backbones.dense import ATTENTIONS, dense_features
from clipadapt.data import shapesworld as sw

PATCH = 8


def scenes(n: int, seed: int, size: int = 64):
    """Images [n, 3, size, size] in [0, 1] and per-pixel shape and colour maps (0: background)."""
    rng = np.random.default_rng(seed)
    images, shapes, colours = [], [], []
    for _ in range(n):
        scene = sw.sample_scene(rng, n_objects=(1, 2))
        image, shape_map = sw.render(scene, size)
        colour_map = np.zeros_like(shape_map)
        for obj in scene.objects:  # drawn in order, later objects on top, as render does
            colour_map[sw._object_mask(obj, size) >= 0.5] = obj.colour + 1
        images.append(torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255)
        shapes.append(shape_map)
        colours.append(colour_map)
    return (
        torch.stack(images),
        torch.from_numpy(np.stack(shapes)),
        torch.from_numpy(np.stack(colours)),
    )


def patch_labels(pixel_labels: torch.Tensor) -> torch.Tensor:
    """[N, H, W] -> [N, H/8, W/8]: the most frequent label of each patch."""
    n, h, w = pixel_labels.shape
    patches = pixel_labels.long().unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)
    return torch.mode(patches.reshape(n, h // PATCH, w // PATCH, -1), dim=-1).values


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int) -> float:
    """Multinomial logistic regression (L-BFGS) on the first half, accuracy on the second."""
    half = len(x) // 2
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(10 * x[:half]), y[:half])
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return linear(10 * x[half:]).argmax(1).eq(y[half:]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-shapes")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args()
    bb = load_backbone(args.model, args.pretrained)
    images, shape_map, colour_map = scenes(args.scenes, args.seed)
    mean, std = torch.tensor(bb.mean)[:, None, None], torch.tensor(bb.std)[:, None, None]
    x = (images - mean) / std
    tasks = {
        "shape": (patch_labels(shape_map), sw.SHAPES, "a photo of a {}."),
        "colour": (patch_labels(colour_map), sw.COLOUR_NAMES, "a photo of a {} object."),
    }
    print(f"{args.scenes} scenes, {int((patch_labels(shape_map) > 0).sum())} object patches")
    print("attention  shape: zero-shot / probe   colour: zero-shot / probe   (chance 0.125)")
    for attention in ATTENTIONS:
        with torch.no_grad():
            feats = F.normalize(dense_features(bb, x, attention).float(), dim=-1)
        cells = []
        for labels, names, template in tasks.values():
            on_object = labels > 0
            f, y = feats[on_object], labels[on_object] - 1
            text = bb.text_classifier(names, [template])
            zero_shot = (f @ text.T).argmax(1).eq(y).float().mean().item()
            cells.append(f"{zero_shot:.3f} / {probe_accuracy(f, y, len(names)):.3f}")
        print(f"{attention:9s}  {cells[0]:>17s}   {cells[1]:>17s}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
