"""`clipadapt segment IMAGE --classes "road, car, sky" --out overlay.png`: segment one image."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipadapt.backbones.modes import ATTENTIONS
from clipadapt.commands import add_deprecated, add_model_arguments
from clipadapt.errors import ClipAdaptError


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Backbone and inference options shared by `segment` and `seg-eval`."""
    add_model_arguments(parser)
    parser.add_argument(
        "--attention",
        default="csa",
        choices=ATTENTIONS,
        help="last-block attention: csa is SCLIP (default)",
    )
    parser.add_argument("--window", type=int, help="window side in pixels (default: model input)")
    parser.add_argument("--stride", type=int, help="window step in pixels (default: window/2)")
    parser.add_argument("--short-side", type=int, help="resize the short side to this")
    parser.add_argument("--scale", type=float, help="softmax scale on cosine logits")
    parser.add_argument(
        "--bg-threshold",
        type=float,
        help="pixels whose best class probability is below this become class 0",
    )
    parser.add_argument(
        "--area-threshold",
        type=float,
        help="drop classes under this fraction of the predicted foreground",
    )
    parser.add_argument("--pamr", action="store_true", help="refine with PAMR (slower)")
    parser.add_argument(
        "--positions",
        choices=["exact", "sclip"],
        help="position embedding at a crop smaller than the window: exact resize (default) or "
        "sclip, the reference code's bicubic scale factor (grid + 0.1) / native grid",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="crops per forward")
    parser.add_argument(
        "--cache",
        dest="cache_dir",
        help="query embedding cache (default $CLIPADAPT_CACHE/queries or ~/.cache/clipadapt)",
    )
    add_deprecated(parser, "--cache-dir", "--cache", dest="cache_dir")


def segmenter_kwargs(args: argparse.Namespace, defaults: dict | None = None) -> dict:
    """Segmenter keyword arguments: ``defaults`` overridden by the options given."""
    kwargs = dict(defaults or {})
    given = {
        "attention": args.attention,
        "window": args.window,
        "stride": args.stride,
        "short_side": args.short_side,
        "scale": args.scale,
        "bg_threshold": args.bg_threshold,
        "area_threshold": args.area_threshold,
        "pamr": args.pamr,
        "positions": args.positions,
        "batch_size": args.batch_size,
        "cache_dir": args.cache_dir,
    }
    kwargs.update({k: v for k, v in given.items() if v is not None})
    return kwargs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="open-vocabulary segmentation of one image (SCLIP)",
        description="Segment IMAGE into the given classes; writes an overlay PNG with a legend "
        "and a mask PNG of class indices.",
    )
    p.add_argument("image", help="image file")
    p.add_argument("--classes", help='comma-separated class names, e.g. "road, car, sky"')
    p.add_argument("--class-file", help="class-name file: one class per line, synonyms by ', '")
    p.add_argument("--out", required=True, help="overlay PNG to write")
    p.add_argument("--mask", help="mask PNG to write (default: <out>_mask.png)")
    add_model_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import clipadapt as ca
    from clipadapt.data.mmseg import read_image
    from clipadapt.segmentation.overlay import mask_image, overlay_image, save_png

    if bool(args.classes) == bool(args.class_file):
        raise ClipAdaptError("segment: give exactly one of --classes or --class-file")
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    else:
        classes = args.class_file
    out = Path(args.out)
    mask_path = Path(args.mask) if args.mask else out.with_name(f"{out.stem}_mask.png")
    image = read_image(args.image)
    bb = ca.load_backbone(
        args.model, args.pretrained, device=args.device, trust_checkpoint=args.trust_checkpoint
    )
    seg = ca.segmentation.Segmenter(bb, classes, **segmenter_kwargs(args))
    pred = seg.predict(image)
    save_png(mask_image(pred, seg.num_classes), mask_path)
    save_png(overlay_image(image, pred, seg.names), out)
    area = torch.bincount(pred.flatten(), minlength=seg.num_classes).double() / pred.numel()
    for c in area.argsort(descending=True).tolist():
        if area[c] > 0:
            print(f"{seg.names[c]:<24} {100 * area[c]:6.2f}% of pixels")
    print(f"wrote {out} and {mask_path}")
    return 0
