"""`clipadapt eval --adapter DIR --data DIR --split test`: evaluate a saved adapter.

The backbone is the one recorded in the adapter (``--model``/``--pretrained`` override it; an
adapter refuses a backbone other than the one it was fitted on). Under `torchrun` the feature
extraction is sharded by rank (--cache must be shared by all) and rank 0 prints and writes.
"""

from __future__ import annotations

import argparse

from clipadapt.commands import add_data_arguments, dataset_options
from clipadapt.commands.fit import add_extract_options, extract_kwargs
from clipadapt.errors import ClipAdaptError


def add_adapter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="adapter folder written by `clipadapt fit`")
    p.add_argument("--model", default=None, help="backbone (default: the adapter's)")
    p.add_argument("--pretrained", default=None, help="weights (default: the adapter's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow a TorchScript or pickled --pretrained file (it can run code when loaded)",
    )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a saved adapter", description=__doc__)
    add_adapter_options(p)
    add_data_arguments(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default=None, help="also write the result JSON here")
    add_extract_options(p)
    p.set_defaults(run=run)


def load_with_backbone(
    directory: str,
    model: str | None,
    pretrained: str | None,
    device: str,
    trust_checkpoint: bool = False,
):
    """(method, backbone): the adapter and the backbone it names, checked against each other."""
    from clipadapt.backbones import load_backbone
    from clipadapt.methods import load_adapter

    method = load_adapter(directory, device=device)
    identity = method.meta.get("backbone") or {}
    name = model or identity.get("name")
    if not name:
        raise ClipAdaptError(f"{directory}: the adapter names no backbone; pass --model")
    if model is None and pretrained is None:
        pretrained = identity.get("pretrained")
    bb = load_backbone(name, pretrained, device=device, trust_checkpoint=trust_checkpoint)
    method.check_backbone(bb.identity, bb.embed_dim)
    return method, bb


def run(args: argparse.Namespace) -> int:
    from clipadapt.data import load_split

    dataset = load_split(args.data, args.split, **dataset_options(args))  # before torch loads
    from clipadapt import distributed
    from clipadapt.features import extract
    from clipadapt.metrics import classification_metrics
    from clipadapt.results import write_result

    rank, _, device = distributed.init(args.device)
    method, bb = load_with_backbone(
        args.adapter, args.model, args.pretrained, device, args.trust_checkpoint
    )
    classnames = method.meta.get("classnames")
    if classnames is not None and list(classnames) != list(dataset.classnames):
        raise ClipAdaptError(
            f"{args.data}: its {len(dataset.classnames)} classes differ from the "
            f"{len(classnames)} classes the adapter {args.adapter} was fitted on"
        )
    stats: dict = {}
    feats = extract(
        bb,
        dataset,
        **method.extract_options(train=False),
        **extract_kwargs(args),
        progress=rank == 0,
        stats=stats,
    )
    if not distributed.is_main():
        return 0
    metrics = classification_metrics(method.logits(feats).cpu(), feats.labels)
    print(
        f"{method.name} on {dataset.name} {args.split} ({len(feats)} images): "
        + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    )
    if args.out:
        write_result(
            args.out,
            dataset=dataset.name,
            model=bb.name,
            pretrained=bb.pretrained,
            method=method.name,
            shots=method.meta.get("shots"),
            seed=method.meta.get("seed"),
            metrics=metrics,
            recipe=method.recipe,
            selection=method.meta.get("selection", method.selection()),
            split=args.split,
            adapter=str(args.adapter),
            skipped=[{"path": b["path"], "reason": b["reason"]} for b in stats.get("bad", [])],
        )
    return 0
