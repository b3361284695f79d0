"""`clipadapt extract --model M --data DIR --split test --out CACHE`: cache image embeddings.

Under `torchrun --nproc_per_node=N -m clipadapt extract ...` the images are sharded by rank:
each rank writes its own cache shards and rank 0 the manifests (--out must be shared by all).
"""

from __future__ import annotations

import argparse

from clipadapt.commands import add_data_arguments, add_model_arguments, dataset_options


def add_backbone_options(parser: argparse.ArgumentParser) -> None:
    """--model/--pretrained/--device and the extraction options shared with `zeroshot`."""
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="which split (default test)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="decoding processes (default: cores - 1)"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip unreadable images (listed in the cache manifest)",
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="compute and cache image embeddings of a dataset split",
        description=__doc__,
    )
    add_backbone_options(p)
    p.add_argument("--out", required=True, help="feature cache folder")
    p.add_argument(
        "--augment-views",
        type=int,
        default=0,
        metavar="N",
        help="also cache N augmented views (random-resized-crop + flip)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the augmented views")
    p.add_argument(
        "--tokens-layer",
        type=int,
        default=None,
        help="also cache patch tokens after this block (e.g. -2)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from clipadapt.data import load_split

    dataset = load_split(args.data, args.split, **dataset_options(args))  # before torch loads
    from clipadapt import distributed
    from clipadapt.backbones import load_backbone
    from clipadapt.features import extract

    rank, _, device = distributed.init(args.device)
    bb = load_backbone(
        args.model, args.pretrained, device=device, trust_checkpoint=args.trust_checkpoint
    )
    stats: dict = {}
    feats = extract(
        bb,
        dataset,
        views=args.augment_views,
        seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        cache_dir=args.out,
        tokens_layer=args.tokens_layer,
        skip_bad=args.skip_bad,
        stats=stats,
        progress=rank == 0,
    )
    if rank != 0:
        return 0
    computed = stats["computed"]
    print(
        f"{dataset.name} {args.split}: {len(feats)} images x {feats.features.shape[1]} dims, "
        f"{computed['embed-v0']} computed, {len(feats) - computed['embed-v0']} reused, "
        f"{len(stats['bad'])} skipped"
    )
    for name, path in stats["entries"].items():  # each stream (views, tokens) is cached apart
        print(f"  {name}: {computed[name]} computed, {len(feats) - computed[name]} reused: {path}")
    for b in stats["bad"]:
        print(f"  skipped {b['path']}: {b['reason']}")
    return 0
