"""`clipadapt <command>`: parse, call the library, print. Commands live in clipadapt.commands."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from clipadapt.errors import ClipAdaptError

# One module per command in clipadapt/commands/, each with add_parser(subparsers) and run(args).
COMMANDS = [
    "demo",
    "segment",
    "seg_eval",
    "extract",
    "zeroshot",
    "fit",
    "eval",
    "predict",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipadapt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"clipadapt.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            return int(args.run(args) or 0)
        except ClipAdaptError as e:
            if not (getattr(e, "all_ranks", False) and _rank() != 0):  # one copy of a shared error
                print(f"clipadapt: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("clipadapt: interrupted; finished work is kept, rerun to resume", file=sys.stderr)
            return 130
        finally:
            if "clipadapt.distributed" in sys.modules:  # a command joined a torchrun group
                sys.modules["clipadapt.distributed"].shutdown()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings reach the user as ``clipadapt: warning: ...``, without a source path."""
    text = " ".join(str(message).split())
    print(f"clipadapt: warning: {text}", file=sys.stderr if file is None else file)


def _rank() -> int:
    module = sys.modules.get("clipadapt.distributed")
    return module.rank_world()[0] if module is not None else 0


if __name__ == "__main__":
    sys.exit(main())
