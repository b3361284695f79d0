"""One module per `clipadapt` command: ``add_parser(subparsers)`` and ``run(args)``.

One flag vocabulary across commands: ``--data`` names the dataset(s) (a folder, a file, or a
name looked up in ``--data-root``), ``--data-root`` the folder holding datasets by name,
``--cache`` the cache folder, ``--split-ratios`` the split drawn for a dataset without one.
Older spellings (``--datasets``, ``--dataset``, ``--cache-dir``) still work and say so.
Command modules import nothing heavy at import time: ``--help`` and argument errors return
before torch loads.
"""

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


class _Deprecated(argparse.Action):
    """An old spelling of a flag: stores into the new flag's destination and says so once."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from clipadapt.errors import warn

        warn(f"{option_string} is deprecated; use {self.new}")
        setattr(namespace, self.dest, values)


def add_deprecated(parser, old: str, new: str, *, dest: str, **kwargs) -> None:
    """Accept ``old`` as a hidden alias of ``new`` (same destination, same type/choices)."""
    parser.add_argument(
        old, dest=dest, new=new, action=_Deprecated, help=argparse.SUPPRESS, **kwargs
    )


def add_data_arguments(parser, *, many: bool = False, help: str | None = None) -> None:
    """--data (one dataset, or with ``many`` a comma-separated list), --data-root and
    --split-ratios."""
    group = parser.add_mutually_exclusive_group(required=True)
    kind = {"type": csv_list(str), "dest": "datasets"} if many else {"dest": "data"}
    group.add_argument(
        "--data",
        help=help
        or (
            "dataset folders, files or names (comma-separated)"
            if many
            else "dataset folder, "
            "CSV or split json file, or a name in --data-root (CoOp layout, ImageFolder, ...)"
        ),
        **kind,
    )
    if many:
        add_deprecated(group, "--datasets", "--data", **kind)
    parser.add_argument(
        "--data-root", default=None, help="folder holding the datasets by name (CoOp's $DATA)"
    )
    parser.add_argument(
        "--split-ratios",
        default=None,
        metavar="TRAIN,VAL,TEST",
        help="a dataset without splits (plain ImageFolder or one CSV) is split per class with a "
        "seed; default 0.5,0.2,0.3 (CoOp's rule)",
    )


def csv_list(kind):
    """An argparse type: "a,b,c" -> [kind(a), kind(b), kind(c)]."""

    def parse(text: str) -> list:
        try:
            values = [kind(t.strip()) for t in text.split(",") if t.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list") from e
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def dataset_options(args) -> dict:
    """load_dataset's keywords from the parsed --data-root/--split-ratios/--cache."""
    return {
        "root": getattr(args, "data_root", None),
        "split_ratios": getattr(args, "split_ratios", None),
        "cache_dir": getattr(args, "cache", None),
    }
