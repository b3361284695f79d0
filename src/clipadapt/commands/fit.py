"""`clipadapt fit --method M --data DIR --shots K --seed S --out DIR`: fit a few-shot adapter.

Draws the K-shot train and min(K, 4)-shot validation subsets (CoOp protocol, seeded), caches
their embeddings (plus N augmented views for methods that train on them), fits the method on the
cached features and writes the adapter folder (config.json + model.safetensors) and the drawn
subset (subset.json) into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from clipadapt.commands import add_data_arguments, add_model_arguments, dataset_options
from clipadapt.errors import ClipAdaptError


def add_backbone_options(p: argparse.ArgumentParser) -> None:
    """--model/--pretrained/--device, the feature cache and the extraction options."""
    add_model_arguments(p)
    add_extract_options(p)


def add_extract_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache", default=None, help="feature cache folder (default ~/.cache/clipadapt)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default 64)")
    p.add_argument("--num-workers", type=int, default=None, help="decoding processes")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images")


def add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a hyper-parameter of the method's config (repeatable)",
    )
    p.add_argument(
        "--views",
        type=int,
        default=None,
        metavar="N",
        help="augmented views per training image (default: the method's, 10 for the adapters)",
    )
    p.add_argument("--templates", default=None, help="template set or a template with {}")
    add_fit_threads_option(p)
    add_recipe_option(p)


def add_recipe_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe",
        default="clean",
        choices=["clean", "reference"],
        help="clean (default): choices on validation data only; reference: the authors' "
        "protocol, test-set selection included where they used it (docs/fidelity.md)",
    )


def add_fit_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fit-threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads while a method fits (default: torch's; 1 saves CPU time on small "
        "heads); extraction keeps torch's",
    )


class HelpHparams(argparse.Action):
    """``--help-hparams``: print the hyper-parameters of ``--method`` (given before it; of
    every method without it) with their defaults and help, then exit."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from clipadapt.hparams import help_text
        from clipadapt.methods import get_class, names

        chosen = getattr(namespace, "method", None)
        try:
            classes = [get_class(m) for m in ([chosen] if chosen else names())]
        except ClipAdaptError as e:
            parser.error(str(e))
        for cls in classes:
            print(f"{cls.name} (--hparam KEY=VALUE; default, then help):")
            print(help_text(cls.Config))
        parser.exit()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit a few-shot adapter", description=__doc__)
    p.add_argument("--method", required=True, help="zero-shot, linear-probe, tip-adapter, ...")
    p.add_argument(
        "--help-hparams",
        action=HelpHparams,
        help="list the hyper-parameters of --method (put it after --method) and exit",
    )
    add_data_arguments(p)
    p.add_argument("--shots", type=int, required=True, help="training images per class")
    p.add_argument("--seed", type=int, default=1, help="few-shot draw and training seed")
    p.add_argument("--out", required=True, help="adapter folder to write")
    add_backbone_options(p)
    add_method_options(p)
    p.set_defaults(run=run)


def extract_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from clipadapt.features import default_cache_dir

    return {
        "cache_dir": args.cache or default_cache_dir(),
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "skip_bad": args.skip_bad,
    }


def build_method(
    name: str,
    pairs: list[str],
    *,
    bb,
    dataset: str,
    seed: int,
    device: str,
    recipe: str = "clean",
):
    """The method with --hparam overrides; the backbone's logit scale (methods whose reference
    uses it), the dataset name and the seed fill the config fields of those names unless given.
    ``recipe``: "clean" (validation-only selection) or "reference" (the authors' protocol)."""
    from clipadapt.methods import get, get_class, parse_hparams

    hparams = parse_hparams(name, pairs)
    cls = get_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if not cls.learned_scale:
        fields.discard("scale")
    for key, value in {"scale": bb.logit_scale, "dataset": dataset, "seed": seed}.items():
        if key in fields and key not in hparams:
            hparams[key] = value
    return get(name, device=device, recipe=recipe, **hparams)


def fit_on_subset(
    method,
    bb,
    subset: dict,
    *,
    templates: list[str],
    views: int | None,
    extract_kw: dict[str, Any],
    seconds: dict[str, float] | None = None,
    pool=None,
    splits: dict | None = None,
):
    """Extract (cached) the subset's embeddings, fit ``method`` and fill its ``meta``.

    Returns the text weights [C, D] used. ``seconds``, if given, receives the wall-clock
    seconds of the extraction (text and images, cached or not) and of the fit. ``pool``, a
    features.pool.SubsetPool, serves the subset's rows from one extraction of many subsets.
    ``splits``, the reader's {"train", "val", "test"}: the whole validation or test split for
    a method whose recipe fits on them (``method.val_source()``, ``method.needs_test()``)."""
    from clipadapt import train as training
    from clipadapt.features import extract
    from clipadapt.zeroshot import text_weights

    def features(part, options):
        if pool is not None:
            return pool.features(part, options)
        return extract(bb, part, **options, **extract_kw)

    start = time.perf_counter()
    train, val = subset["train"], subset.get("val")
    weights = text_weights(bb, train.classnames, templates, extract_kw["cache_dir"])
    fit_weights = weights
    if not method.unit_text:  # the class prototypes as the reference trains from them
        fit_weights = text_weights(bb, train.classnames, templates, extract_kw["cache_dir"], False)
    options = method.extract_options(train=True)
    if views is not None:
        options["views"] = views
    train_fs = features(train, options)
    val = reference_split(method.val_source(), splits, val, method)
    val_fs = None
    if val is not None and len(val) > 0:
        val_fs = features(val, method.extract_options(train=False))
    extra = {}
    if method.needs_test():
        test = reference_split("test", splits, None, method)
        extra["test"] = features(test, method.extract_options(train=False))
    fit_start = time.perf_counter()
    with training.fit_threads():
        method.fit(train_fs, fit_weights.to(method.device), val=val_fs, **extra)
    if seconds is not None:
        seconds.update(extract=fit_start - start, fit=time.perf_counter() - fit_start)
    method.meta = {
        "classnames": list(train.classnames),
        "templates": list(templates),
        "backbone": dict(bb.identity),
        "embed_dim": bb.embed_dim,
        "dataset": train.name,
        "views": options.get("views", 0),
        "train_images": len(train_fs),
        "val_images": 0 if val_fs is None else len(val_fs),
        "recipe": method.recipe,
        "selection": method.selection(),
    }
    return weights


def reference_split(source: str, splits: dict | None, fewshot, method):
    """The split ``method`` fits on: the few-shot draw, or the whole "val" / "test" split."""
    if source == "fewshot":
        return fewshot
    split = (splits or {}).get(source)
    if split is None or len(split) == 0:
        raise ClipAdaptError(
            f"{method.name} recipe={method.recipe!r}: needs the dataset's {source} split, "
            "which is missing or empty"
        )
    return split


def run(args: argparse.Namespace) -> int:
    from clipadapt.data import few_shot, load_dataset, save_subset

    if args.views is not None and args.views < 0:
        raise ClipAdaptError(f"--views {args.views}: expected 0 or more")
    splits = load_dataset(args.data, **dataset_options(args))  # checked before torch loads
    from clipadapt.backbones import load_backbone
    from clipadapt.templates import get_templates, require_templates
    from clipadapt.train import set_fit_threads

    set_fit_threads(args.fit_threads)
    name = splits["train"].name
    subset = few_shot(splits, args.shots, args.seed)
    templates = require_templates(args.templates) if args.templates else get_templates(name)
    bb = load_backbone(
        args.model, args.pretrained, device=args.device, trust_checkpoint=args.trust_checkpoint
    )
    method = build_method(
        args.method,
        args.hparam,
        bb=bb,
        dataset=name,
        seed=args.seed,
        device=args.device,
        recipe=args.recipe,
    )
    fit_on_subset(
        method,
        bb,
        subset,
        templates=templates,
        views=args.views,
        extract_kw=extract_kwargs(args),
        splits=splits,
    )
    method.meta.update(shots=args.shots, seed=args.seed)
    out = Path(args.out)
    method.save(out)
    save_subset(out / "subset.json", subset, args.shots, args.seed)
    print(f"{method.name} on {name}, {args.shots} shots, seed {args.seed} -> {out}")
    print("  " + describe_fitted(method.fitted))
    if method.selection() == "test":
        print(
            "  note: the test set chose this model (recipe 'reference'): its test accuracy "
            "is not a held-out estimate"
        )
    return 0


def describe_fitted(fitted: dict) -> str:
    parts = []
    for key, value in fitted.items():
        if value is None:
            continue
        if "accuracy" in key:
            parts.append(f"{key.replace('_', ' ')} {100 * value:.2f}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts) or "fitted"
