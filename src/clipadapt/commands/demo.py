"""`clipadapt demo [--out DIR]`: every method on the embedded tiny-shapes model and ShapesWorld."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole tool offline on the embedded model and ShapesWorld",
        description="Generates the ShapesWorld datasets, runs zero-shot, the few-shot adapters, "
        "base-to-novel, scene attributes and SCLIP segmentation with the embedded tiny-shapes "
        "CLIP, and writes DIR/results.json, DIR/report.md and PNG figures.",
    )
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--model", default="tiny-shapes", help="backbone (default tiny-shapes)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seeds", default="1,2,3", help="few-shot seeds (default 1,2,3)")
    p.add_argument("--shots", default="1,2,4,8,16", help="few-shot shots (default 1,2,4,8,16)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from clipadapt.demo import run_demo
    from clipadapt.errors import ClipAdaptError

    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
        shots = tuple(int(s) for s in args.shots.split(","))
    except ValueError as e:
        raise ClipAdaptError(
            f"--seeds {args.seeds!r} / --shots {args.shots!r}: expected comma-separated integers"
        ) from e
    run_demo(args.out, model=args.model, device=args.device, seeds=seeds, shots=shots)
    return 0
