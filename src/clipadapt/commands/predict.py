"""`clipadapt predict --adapter DIR IMAGE... [--topk 5]`: the top classes of each image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipadapt.commands.eval import add_adapter_options, load_with_backbone
from clipadapt.errors import ClipAdaptError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify image files with a saved adapter", description=__doc__
    )
    add_adapter_options(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.set_defaults(run=run)


def predict(method, bb, images: list[str], topk: int = 5) -> list[list[tuple[str, float]]]:
    """Per image, the ``topk`` (class name, probability) pairs, most probable first; the
    probabilities are softmax(logits) over all classes."""
    import torch

    from clipadapt.data import ClassificationDataset, Item
    from clipadapt.features import extract

    classnames = method.meta.get("classnames")
    if not classnames:
        raise ClipAdaptError("the adapter records no class names; refit it with `clipadapt fit`")
    for path in images:
        if not Path(path).is_file():
            raise ClipAdaptError(f"{path}: no such image file")
    items = [Item(str(Path(p).resolve()), 0, classnames[0]) for p in images]
    dataset = ClassificationDataset("images", "", items, list(classnames))
    feats = extract(bb, dataset, num_workers=0, progress=False, **method.extract_options(False))
    with torch.no_grad():
        probs = method.logits(feats).float().softmax(dim=-1).cpu()
    top = probs.topk(min(topk, probs.shape[1]), dim=-1)
    return [
        [(classnames[c], float(p)) for c, p in zip(idx.tolist(), val.tolist(), strict=True)]
        for val, idx in zip(top.values, top.indices, strict=True)
    ]


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise ClipAdaptError(f"--topk {args.topk}: expected a positive integer")
    config = Path(args.adapter) / "config.json"  # checked before torch and the backbone load
    if not config.is_file():
        raise ClipAdaptError(f"{config}: file not found")
    for path in args.images:
        if not Path(path).is_file():
            raise ClipAdaptError(f"{path}: no such image file")
    method, bb = load_with_backbone(
        args.adapter, args.model, args.pretrained, args.device, args.trust_checkpoint
    )
    for path, ranked in zip(args.images, predict(method, bb, args.images, args.topk), strict=True):
        if args.json:
            print(json.dumps({"image": path, "top": [{"class": c, "p": p} for c, p in ranked]}))
            continue
        print(path)
        for rank, (name, p) in enumerate(ranked, 1):
            print(f"  {rank}. {name:<30} {p:.4f}")
    return 0
