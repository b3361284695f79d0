"""`clipadapt zeroshot --model M --data DIR --split test --out results.json`: zero-shot CLIP.

Under `torchrun` the feature extraction is sharded by rank and rank 0 writes the result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clipadapt.commands import dataset_options
from clipadapt.commands.extract import add_backbone_options


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "zeroshot",
        help="evaluate zero-shot CLIP on a dataset split",
        description=__doc__,
    )
    add_backbone_options(p)
    p.add_argument(
        "--templates",
        default=None,
        help="dataset name, imagenet-select, openai-80, or a template with {} "
        "(default: the dataset's)",
    )
    p.add_argument(
        "--cache",
        default=None,
        help="feature cache folder (default $CLIPADAPT_CACHE or ~/.cache/clipadapt)",
    )
    p.add_argument("--out", required=True, help="result JSON to write")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from clipadapt.data import load_split

    dataset = load_split(args.data, args.split, **dataset_options(args))  # before torch loads
    from clipadapt import distributed
    from clipadapt.backbones import load_backbone
    from clipadapt.features import default_cache_dir
    from clipadapt.io import make_dirs
    from clipadapt.results import write_result
    from clipadapt.templates import get_templates, require_templates
    from clipadapt.zeroshot import evaluate_zero_shot

    rank, _, device = distributed.init(args.device)
    if rank == 0:
        make_dirs(Path(args.out).parent)  # an unwritable --out fails now, not after the work
    templates = require_templates(args.templates) if args.templates else get_templates(dataset.name)
    bb = load_backbone(
        args.model, args.pretrained, device=device, trust_checkpoint=args.trust_checkpoint
    )
    stats: dict = {}
    metrics = evaluate_zero_shot(
        bb,
        dataset,
        templates=templates,
        cache_dir=args.cache or default_cache_dir(),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        skip_bad=args.skip_bad,
        progress=rank == 0,
        stats=stats,
    )
    if rank != 0:
        return 0
    write_result(
        args.out,
        dataset=dataset.name,
        model=args.model,
        pretrained=bb.pretrained,
        method="zero-shot",
        shots=0,
        seed=None,
        metrics=metrics,
        selection="none",
        split=args.split,
        templates=templates,
        skipped=[{"path": b["path"], "reason": b["reason"]} for b in stats["bad"]],
    )
    print(
        f"{dataset.name} {args.split} zero-shot: top1 {metrics['top1']:.2f}  "
        f"top5 {metrics['top5']:.2f}  mean per-class recall "
        f"{metrics['mean_per_class_recall']:.2f}  -> {args.out}"
    )
    return 0
