"""`clipadapt seg-eval --data voc21 --data-root DIR`: mIoU of SCLIP on a benchmark.

Uses the published settings of the dataset (scaled to the model's input size); options given
on the command line override them. Under `torchrun` the images are sharded by rank.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from clipadapt.commands import add_deprecated
from clipadapt.commands.segment import add_model_options, segmenter_kwargs
from clipadapt.data.mmseg import SEG_DATASETS

METHOD_NAMES = {"csa": "sclip", "vanilla": "clip"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "seg-eval",
        help="mIoU of training-free segmentation on an mmseg-layout benchmark",
        description=__doc__.splitlines()[0],
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--data", dest="dataset", choices=SEG_DATASETS, help="the benchmark")
    add_deprecated(group, "--dataset", "--data", dest="dataset", choices=SEG_DATASETS)
    p.add_argument(
        "--data-root",
        required=True,
        help="folder holding VOCdevkit/, coco_stuff164k/, cityscapes/ or ade/",
    )
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument(
        "--out", help="results JSON (default runs/seg-eval/<dataset>-<model>-<method>.json)"
    )
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import clipadapt as ca
    from clipadapt import distributed
    from clipadapt.data.mmseg import load_segmentation
    from clipadapt.results import write_result
    from clipadapt.segmentation import evaluate, segmenter_options

    dataset = load_segmentation(args.dataset, args.data_root, args.split)
    rank, _, device = distributed.init(args.device)
    bb = ca.load_backbone(
        args.model, args.pretrained, device=device, trust_checkpoint=args.trust_checkpoint
    )
    options = segmenter_kwargs(args, segmenter_options(args.dataset, bb.image_size))
    seg = ca.segmentation.Segmenter(bb, dataset.classnames, progress=rank == 0, **options)
    names = seg.names
    if options.get("bg_threshold") is not None:
        names[0] = "background"  # class 0 is a line of stuff words that stands for it
    metrics = evaluate(seg, dataset, limit=args.limit, progress=rank == 0, names=names)
    if rank != 0:
        return 0
    width = max(len(name) for name in names)
    print(f"{'class':<{width}}  IoU")
    for name, iou in metrics["per_class_iou"].items():
        print(f"{name:<{width}}  {'  n/a' if iou is None else f'{iou:5.2f}'}")
    print(f"mIoU {metrics['mIoU']:.2f}  aAcc {metrics['aAcc']:.2f}  ({metrics['images']} images)")
    method = METHOD_NAMES.get(args.attention, args.attention)
    out = Path(args.out or f"runs/seg-eval/{args.dataset}-{_slug(args.model)}-{method}.json")
    write_result(
        out,
        dataset=args.dataset,
        model=bb.name,
        pretrained=bb.pretrained,
        method=method,
        shots=None,
        seed=None,
        metrics={"mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"]},
        selection="none",
        per_class_iou=metrics["per_class_iou"],
        images=metrics["images"],
        split=args.split,
        hparams={k: v for k, v in options.items() if k != "cache_dir"},
    )
    print(f"wrote {out}")
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
