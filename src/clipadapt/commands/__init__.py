"""One module per `clipadapt` command: ``add_parser(subparsers)`` and ``run(args)``."""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "tiny-shapes"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --pretrained, --device and --trust-checkpoint: how a command loads its backbone."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"open_clip architecture or tiny-shapes (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="open_clip tag, weights file or hf:<folder> (default: the model's)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow a TorchScript or pickled --pretrained file (it can run code when loaded)",
    )
