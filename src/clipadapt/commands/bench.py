"""`clipadapt bench --methods a,b --data d1,d2 --shots 1,2,4,8,16 --seeds 1,2,3 --out DIR`.

Every (method, dataset, shots, seed) is one run and one JSON in DIR/runs/; a run whose JSON
exists is skipped, so an interrupted benchmark resumes where it stopped. Zero-shot runs once per
dataset (0 shots). The drawn few-shot subsets go to DIR/subsets/, the table of mean ± std over
seeds (and the average over datasets) to DIR/results.md, few-shot curves to DIR/curves/*.png.
Backbone outputs are cached and a dataset's subsets are extracted together (features/pool.py),
so each image goes through the backbone once per view, however many subsets draw it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from clipadapt.commands import add_data_arguments, csv_list, dataset_options
from clipadapt.commands.fit import (
    add_backbone_options,
    add_fit_threads_option,
    add_recipe_option,
    build_method,
    extract_kwargs,
    fit_on_subset,
)
from clipadapt.errors import ClipAdaptError

ZERO_SHOT = "zero-shot"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark methods x datasets x shots x seeds", description=__doc__
    )
    p.add_argument(
        "--methods", type=csv_list(str), required=True, help="e.g. zero-shot,tip-adapter"
    )
    add_data_arguments(p, many=True)
    p.add_argument(
        "--shots", type=csv_list(int), default=[1, 2, 4, 8, 16], help="default 1,2,4,8,16"
    )
    p.add_argument("--seeds", type=csv_list(int), default=[1, 2, 3], help="default 1,2,3")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--split", default="test", choices=["val", "test"], help="evaluation split")
    p.add_argument("--metric", default="top1", help="metric of the table and curves")
    p.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="[METHOD:]KEY=VALUE",
        help="override a hyper-parameter of one method, or of every method that has it",
    )
    p.add_argument("--views", type=int, default=None, metavar="N", help="augmented views")
    p.add_argument("--templates", default=None, help="template set (default: each dataset's)")
    p.add_argument(
        "--protocol",
        default="fewshot",
        choices=["fewshot", "streetscapes", "base2novel"],
        help="fewshot (default) or streetscapes: full-data attribute tasks, --data are "
        "manual-labels folders (protocols/streetscapes.py); base2novel: train on the base "
        "classes, report base / novel / HM (16 shots unless --shots is one number; "
        "protocols/base2novel.py)",
    )
    p.add_argument("--tasks", type=csv_list(str), default=None, help="streetscapes: tasks to run")
    p.add_argument(
        "--base-rule",
        default="ceil",
        choices=["ceil", "floor"],
        help="base2novel: base = the first ceil(C/2) (default) or floor(C/2) labels",
    )
    add_fit_threads_option(p)
    add_recipe_option(p)
    add_backbone_options(p)
    p.set_defaults(run=run)


def method_hparams(methods: list[str], pairs: list[str]) -> dict[str, list[str]]:
    """Split ``[method:]key=value`` overrides per method (unprefixed: every method with key)."""
    from clipadapt.methods import get_class

    fields = {m: {f.name for f in dataclasses.fields(get_class(m).Config)} for m in methods}
    out: dict[str, list[str]] = {m: [] for m in methods}
    for pair in pairs:
        target, sep, rest = pair.partition(":")
        if sep and "=" not in target:
            if target not in out:
                raise ClipAdaptError(f"--hparam {pair!r}: {target!r} is not one of --methods")
            out[target].append(rest)
            continue
        key = pair.partition("=")[0].strip().replace("-", "_")
        takers = [m for m in methods if key in fields[m]]
        if not takers:
            raise ClipAdaptError(f"--hparam {pair!r}: no method in --methods has {key!r}")
        for m in takers:
            out[m].append(pair)
    return out


def run(args: argparse.Namespace) -> int:
    from clipadapt.data import few_shot, load_dataset, save_subset

    if args.protocol == "fewshot":  # every dataset is checked before torch and the model load
        if any(s < 1 for s in args.shots):
            raise ClipAdaptError(f"--shots {args.shots}: expected positive numbers of shots")
        loaded = {d: load_dataset(d, **dataset_options(args)) for d in args.datasets}
    from tqdm.auto import tqdm

    from clipadapt.backbones import load_backbone
    from clipadapt.features import extract
    from clipadapt.features.pool import SubsetPool
    from clipadapt.metrics import classification_metrics
    from clipadapt.report import write_report
    from clipadapt.results import is_finished, read_results, result_filename, write_result
    from clipadapt.templates import get_templates, require_templates
    from clipadapt.train import set_fit_threads
    from clipadapt.zeroshot import text_weights

    set_fit_threads(args.fit_threads)
    if args.protocol == "streetscapes":
        from clipadapt.protocols.streetscapes import run_bench

        return run_bench(args)
    if args.protocol == "base2novel":
        from clipadapt.protocols.base2novel import run_bench

        return run_bench(args)
    out = Path(args.out)
    runs_dir, subsets_dir = out / "runs", out / "subsets"
    hparams = method_hparams(args.methods, args.hparam)
    kw = extract_kwargs(args)
    # Loaded up front: a stored run is reused only if the same weights produced it.
    bb = load_backbone(
        args.model, args.pretrained, device=args.device, trust_checkpoint=args.trust_checkpoint
    )
    done = skipped = 0
    names = []
    for dataset_arg in args.datasets:
        splits = loaded[dataset_arg]
        name = splits["train"].name
        names.append(name)
        plan = [(ZERO_SHOT, 0, None)] if ZERO_SHOT in args.methods else []
        plan += [
            (m, shots, seed)
            for shots in args.shots
            for seed in args.seeds
            for m in args.methods
            if m != ZERO_SHOT
        ]

        def result_path(method, shots, seed, name=name):
            recipe = args.recipe if method != ZERO_SHOT else "clean"
            return runs_dir / result_filename(name, args.model, method, shots, seed, recipe)

        pending = [p for p in plan if not is_finished(result_path(*p), bb.identity)]
        skipped += len(plan) - len(pending)
        if not pending:
            continue
        templates = require_templates(args.templates) if args.templates else get_templates(name)
        weights = text_weights(bb, splits["train"].classnames, templates, kw["cache_dir"])
        test_sets: dict[str, object] = {}

        def evaluate(method, split=splits[args.split], test_sets=test_sets, bb=bb):
            options = method.extract_options(train=False)
            key = repr(sorted(options.items()))
            if key not in test_sets:
                test_sets[key] = extract(bb, split, **options, **kw)
            feats = test_sets[key]
            return classification_metrics(method.logits(feats).cpu(), feats.labels)

        # Every subset this dataset needs, drawn up front: their images are extracted once.
        draws = {
            (shots, seed): few_shot(splits, shots, seed)
            for method_name, shots, seed in pending
            if method_name != ZERO_SHOT
        }
        pool = SubsetPool(bb, splits, draws.values(), kw)
        bar = tqdm(pending, desc=f"bench {name}", unit="run")
        saved = set()
        for method_name, shots, seed in bar:
            bar.set_postfix_str(f"{method_name} {shots}-shot seed {seed}")
            method = build_method(
                method_name,
                hparams[method_name],
                bb=bb,
                dataset=name,
                seed=seed if seed is not None else 1,
                device=args.device,
                recipe=args.recipe,
            )
            extras, seconds = {}, {}
            if method_name == ZERO_SHOT:
                method.fit(None, weights.to(method.device))
            else:
                subset = draws[shots, seed]
                if (shots, seed) not in saved:
                    save_subset(
                        subsets_dir / f"{name}__{shots}shot__seed{seed}.json", subset, shots, seed
                    )
                    saved.add((shots, seed))
                fit_on_subset(
                    method,
                    bb,
                    subset,
                    templates=templates,
                    views=args.views,
                    extract_kw=kw,
                    seconds=seconds,
                    pool=pool,
                    splits=splits,
                )
                extras = {"fitted": method.fitted, "views": method.meta["views"]}
            eval_start = time.perf_counter()
            metrics = evaluate(method)
            seconds["eval"] = time.perf_counter() - eval_start
            write_result(
                result_path(method_name, shots, seed),
                dataset=name,
                model=args.model,
                pretrained=bb.pretrained,
                method=method_name,
                shots=shots,
                seed=seed,
                metrics=metrics,
                split=args.split,
                hparams=dataclasses.asdict(method.config),
                templates=templates,
                backbone=bb.identity,
                seconds={k: round(v, 3) for k, v in seconds.items()},
                recipe=method.recipe,
                selection=method.selection(),
                **extras,
            )
            done += 1
            tqdm.write(
                f"{name} {method_name} {shots}-shot seed {seed}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
            )
    wanted = {(m, s if m != ZERO_SHOT else 0) for m in args.methods for s in args.shots}
    records = [
        r
        for r in (read_results(runs_dir) if runs_dir.is_dir() else [])
        if r["dataset"] in names
        and r["model"] == args.model
        and (r["method"], int(r["shots"] or 0)) in wanted
        and (r["seed"] in args.seeds or r["method"] == ZERO_SHOT)
        and (r.get("recipe", "clean") == args.recipe or r["method"] == ZERO_SHOT)
    ]
    if not records:
        raise ClipAdaptError(f"{runs_dir}: no results to report")
    table, curves = write_report(records, out, args.metric, args.methods, names)
    print(f"{done} runs done, {skipped} skipped (already finished); {len(records)} results")
    print(table.read_text())
    shown = ", ".join(str(c) for c in curves) or "none (a curve needs two or more --shots)"
    print(f"table: {table}\ncurves: {shown}")
    return 0
