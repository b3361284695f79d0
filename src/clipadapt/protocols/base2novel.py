"""Base-to-novel generalisation (CoCoOp's protocol), for any classification dataset.

- Classes: base = the first ⌈C/2⌉ labels (``rule="floor"``: the first ⌊C/2⌋, as the
  Multi-Modal Adapter's code did), novel = the rest; each set is relabelled 0..n-1.
- Training data: ``shots`` (16) train images and ``val_shots`` (16) validation images per base
  class. One ``random.Random(seed)``: ``rng.sample`` over each base class's train images in label
  order, then the same over the validation images (the dataset's val split, or the train images
  not drawn when it has none).
- Evaluation: the test images of base classes scored against the base classes only, those of
  novel classes against the novel classes only; accuracy (%) on each and
  HM = 2·B·N / (B + N). Over seeds and datasets base and novel are averaged first and HM is taken
  of the averages (as the published tables do).

What each method does on novel classes (it was fitted on base classes only), ``NOVEL_RULES``:
- zero-shot: the novel zero-shot classifier;
- mm-adapter: the novel class texts go through the adapter's attention with each image;
- clip-adapter: the adapted image features against the novel zero-shot classifier;
- tip-adapter, tip-adapter-f: the cache holds base classes only, so its term adds nothing to a
  novel class: exactly the zero-shot classifier;
- gda: its own ``novel_logits`` (the authors' main_base2new.py: Gaussians synthesised from each
  novel text and the base samples nearest to it); its base classes use the pooled precision,
  as that script does (``protocol_defaults``);
- linear-probe and any other method: no weights for unseen classes, so the zero-shot classifier
  (a fallback, flagged as such in the table).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from clipadapt.data.dataset import ClassificationDataset, Item
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet, as_features
from clipadapt.metrics import accuracy

PROTOCOL = "base2novel"
RULES = ("ceil", "floor")
ZERO_SHOT = "zero-shot"
DEFAULT_SHOTS = 16


def class_split(num_classes: int, rule: str = "ceil") -> tuple[list[int], list[int]]:
    """(base labels, novel labels): the first ⌈C/2⌉ (or ⌊C/2⌋) labels and the rest."""
    if rule not in RULES:
        raise ClipAdaptError(f"base rule {rule!r}: expected one of {', '.join(RULES)}")
    if num_classes < 2:
        raise ClipAdaptError(f"{num_classes} classes: base-to-novel needs at least 2")
    m = math.ceil(num_classes / 2) if rule == "ceil" else num_classes // 2
    return list(range(m)), list(range(m, num_classes))


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2·B·N / (B + N) (0 when both are 0)."""
    return 2.0 * base * novel / (base + novel) if base + novel > 0 else 0.0


def restrict(ds: ClassificationDataset, labels: Sequence[int], split: str) -> ClassificationDataset:
    """The items of ``ds`` whose label is in ``labels``, relabelled to their position there;
    classnames = those classes'."""
    new = {old: i for i, old in enumerate(labels)}
    names = [ds.classnames[old] for old in labels]
    items = [Item(it.path, new[it.label], it.classname) for it in ds.items if it.label in new]
    return ClassificationDataset(ds.name, ds.root, items, names, split=split, source=ds.source)


def _draw(rng: random.Random, ds: ClassificationDataset, pool: list[int], k: int) -> list[int]:
    """``k`` positions of ``pool`` (indices into ``ds``) per class, classes in label order."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in pool:
        by_class[ds.items[i].label].append(i)
    drawn, short = [], []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < k:
            short.append(f"{ds.classnames[label]} ({len(members)})")
        drawn += rng.sample(members, min(k, len(members)))
    if short:
        warnings.warn(
            f"{ds.name} {ds.split}: {len(short)} base classes have fewer than {k} images, "
            "keeping all of them: " + ", ".join(short[:10]),
            stacklevel=3,
        )
    return drawn


@dataclass
class Base2Novel:
    """One draw of the protocol. Every split is relabelled to its own class set."""

    train: ClassificationDataset  # base classes, `shots` per class
    val: ClassificationDataset  # base classes, `val_shots` per class
    test_base: ClassificationDataset  # evaluation images of base classes
    test_novel: ClassificationDataset  # evaluation images of novel classes
    base: list[int]  # original labels of the base classes
    novel: list[int]


def base2novel_split(
    splits: dict[str, ClassificationDataset],
    shots: int = DEFAULT_SHOTS,
    val_shots: int = DEFAULT_SHOTS,
    seed: int = 1,
    rule: str = "ceil",
    eval_split: str = "test",
) -> Base2Novel:
    """Draw the base-class train/val images and split ``splits[eval_split]`` by class set."""
    if shots < 1 or val_shots < 1:
        raise ClipAdaptError(f"shots={shots}, val_shots={val_shots}: expected positive numbers")
    train = splits.get("train")
    if train is None or len(train) == 0:
        raise ClipAdaptError("base-to-novel: the train split is empty")
    evaluation = splits.get(eval_split)
    if evaluation is None or len(evaluation) == 0:
        raise ClipAdaptError(f"{train.name}: the {eval_split} split is empty")
    base, novel = class_split(len(train.classnames), rule)
    base_set = set(base)
    rng = random.Random(seed)
    pool = [i for i, it in enumerate(train.items) if it.label in base_set]
    train_idx = _draw(rng, train, pool, shots)
    val_source = splits.get("val")
    if val_source is not None and len(val_source) > 0 and val_source is not evaluation:
        val_pool = [i for i, it in enumerate(val_source.items) if it.label in base_set]
    else:
        val_source, taken = train, set(train_idx)
        val_pool = [i for i in pool if i not in taken]
    val_idx = _draw(rng, val_source, val_pool, val_shots) if val_pool else []
    return Base2Novel(
        train=restrict(train.subset(train_idx), base, "train"),
        val=restrict(val_source.subset(val_idx), base, "val"),
        test_base=restrict(evaluation, base, f"{eval_split}-base"),
        test_novel=restrict(evaluation, novel, f"{eval_split}-novel"),
        base=base,
        novel=novel,
    )


# -- novel classes: what each method can do with classes it never saw ---------------------------
def novel_rule(method_name: str) -> str:
    """How ``method_name`` is evaluated on novel classes, in words (its ``novel_rule``)."""
    from clipadapt.methods import get_class

    return get_class(method_name).novel_rule


def novel_logits(method, features: Tensor | FeatureSet, novel_weights: Tensor) -> Tensor:
    """[N, D] unnormalised embeddings of novel-class images -> [N, C_novel] logits of a method
    fitted on base classes (its ``novel_logits`` hook); novel_weights [C_novel, D] the novel
    zero-shot classifier."""
    return method.novel_logits(as_features(features), novel_weights)


def score(method, test_base: FeatureSet, test_novel: FeatureSet, novel_weights: Tensor) -> dict:
    """{"base", "novel", "hm"} accuracies (%) of a method fitted on base classes."""
    b = accuracy(method.logits(test_base).cpu(), test_base.labels)
    n = accuracy(novel_logits(method, test_novel, novel_weights).cpu(), test_novel.labels)
    return {"base": b, "novel": n, "hm": harmonic_mean(b, n)}


# -- running methods -------------------------------------------------------------------------------
def _build(
    name: str, overrides: dict, *, bb, dataset: str, seed: int, device: str, recipe: str = "clean"
):
    """The method with ``overrides``; the backbone's logit scale, the dataset name and the seed
    fill the config fields of those names unless given (as `clipadapt fit` does)."""
    from clipadapt.methods import get, get_class

    cls = get_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)} - (
        set() if cls.learned_scale else {"scale"}
    )
    values = {"scale": bb.logit_scale, "dataset": dataset, "seed": seed}
    values.update(getattr(cls, "protocol_defaults", {}).get(PROTOCOL, {}))
    filled = {k: v for k, v in values.items() if k in fields and k not in overrides}
    method = get(name, device=device, recipe=recipe, **filled, **overrides)
    if method.needs_test() or method.val_source() != "fewshot":
        raise ClipAdaptError(
            f"{name} recipe={recipe!r}: the authors' protocol chooses on the test or whole "
            "validation split of a few-shot run; it is not defined for base-to-novel"
        )
    return method


def _subset_doc(draw: Base2Novel, classnames: list[str], shots: int, seed: int, rule: str) -> dict:
    return {
        "protocol": PROTOCOL,
        "rng": "python random.Random(seed)",
        "dataset": draw.train.name,
        "root": draw.train.root,
        "shots": shots,
        "seed": seed,
        "rule": rule,
        "base": [classnames[i] for i in draw.base],
        "novel": [classnames[i] for i in draw.novel],
        "train": [[it.path, it.label] for it in draw.train.items],
        "val": [[it.path, it.label] for it in draw.val.items],
    }


def evaluate_base2novel(
    bb,
    splits: dict[str, ClassificationDataset],
    methods: Sequence[str],
    *,
    seeds: Sequence[int] = (1,),
    shots: int = DEFAULT_SHOTS,
    val_shots: int | None = None,
    rule: str = "ceil",
    eval_split: str = "test",
    templates: Sequence[str] | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
    views: int | None = None,
    extract_kw: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    model: str | None = None,
    device: str = "cpu",
    recipe: str = "clean",
) -> list[dict]:
    """Fit every method on the base classes of ``splits`` (per seed; zero-shot once) and score
    base / novel / HM. Returns one result record per run (see clipadapt.results).

    With ``out_dir``, each record is written to ``out_dir/runs-base2novel/`` (a run whose file
    exists is read instead of rerun) and each drawn subset to ``out_dir/subsets/``.
    """
    from clipadapt.commands.fit import fit_on_subset
    from clipadapt.features import extract
    from clipadapt.io import write_json
    from clipadapt.results import is_finished, make_result, read_result, result_filename
    from clipadapt.templates import get_templates
    from clipadapt.zeroshot import text_weights

    extract_kw = {"cache_dir": None, **(extract_kw or {})}
    hparams = hparams or {}
    model = model or bb.name
    val_shots = shots if val_shots is None else val_shots
    name = splits["train"].name
    classnames = list(splits["train"].classnames)
    templates = list(templates) if templates is not None else get_templates(name)
    plan = [(ZERO_SHOT, 0, None)] if ZERO_SHOT in methods else []
    plan += [(m, shots, seed) for seed in seeds for m in methods if m != ZERO_SHOT]
    runs_dir = Path(out_dir) / "runs-base2novel" if out_dir is not None else None

    def path_of(method: str, k: int, seed: int | None) -> Path | None:
        if runs_dir is None:
            return None
        return runs_dir / result_filename(
            name, model, method, k, seed, recipe if method != ZERO_SHOT else "clean"
        )

    records, pending = [], []
    for run in plan:
        path = path_of(*run)
        if path is not None and is_finished(path, bb.identity):
            records.append(read_result(path))
        else:
            pending.append(run)
    if not pending:
        return records
    weights = text_weights(bb, classnames, templates, extract_kw["cache_dir"])
    first = base2novel_split(splits, shots, val_shots, seeds[0] if seeds else 1, rule, eval_split)
    novel_weights = weights[first.novel]
    tests: dict[str, tuple[FeatureSet, FeatureSet]] = {}
    draws: dict[int, Base2Novel] = {}
    for method_name, k, seed in tqdm(pending, desc=f"base2novel {name}", unit="run"):
        method = _build(
            method_name,
            dict(hparams.get(method_name, {})),
            bb=bb,
            dataset=name,
            seed=seed or 1,
            device=device,
            recipe=recipe,
        )
        extras: dict[str, Any] = {}
        if method_name == ZERO_SHOT:
            method.fit(None, weights[first.base].to(method.device))
        else:
            if seed not in draws:
                draws[seed] = base2novel_split(splits, shots, val_shots, seed, rule, eval_split)
                if out_dir is not None:
                    doc = _subset_doc(draws[seed], classnames, shots, seed, rule)
                    write_json(
                        Path(out_dir) / "subsets" / f"{name}__{PROTOCOL}__{k}shot__seed{seed}.json",
                        doc,
                    )
            draw = draws[seed]
            subset = {"train": draw.train, "val": draw.val}
            fit_on_subset(
                method,
                bb,
                subset,
                templates=templates,
                views=views,
                extract_kw=extract_kw,
            )
            extras = {"fitted": method.fitted, "views": method.meta["views"]}
        options = method.extract_options(train=False)
        key = repr(sorted(options.items()))
        if key not in tests:
            tests[key] = tuple(
                extract(bb, ds, **options, **extract_kw)
                for ds in (first.test_base, first.test_novel)
            )
        test_base, test_novel = tests[key]
        metrics = score(method, test_base, test_novel, novel_weights)
        record = make_result(
            dataset=name,
            model=model,
            pretrained=bb.pretrained,
            method=method_name,
            shots=k,
            seed=seed,
            metrics=metrics,
            protocol=PROTOCOL,
            rule=rule,
            split=eval_split,
            base_classes=len(first.base),
            novel_classes=len(first.novel),
            novel_eval=novel_rule(method_name),
            hparams=dataclasses.asdict(method.config),
            templates=templates,
            backbone=bb.identity,
            recipe=method.recipe,
            selection=method.selection(),
            **extras,
        )
        if out_dir is not None:
            write_json(path_of(method_name, k, seed), record)
        records.append(record)
        tqdm.write(
            f"{name} {method_name} seed {seed}: base {metrics['base']:.2f}, "
            f"novel {metrics['novel']:.2f}, HM {metrics['hm']:.2f}"
        )
    return records


# -- the table -----------------------------------------------------------------------------------
def summarize(records: Sequence[dict]) -> dict[tuple[str, str], tuple[float, float, float, int]]:
    """(method, dataset) -> (mean base, mean novel, HM of those means, number of seeds)."""
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("protocol") == PROTOCOL:
            runs[(r["method"], r["dataset"])].append(r["metrics"])
    out = {}
    for key, ms in runs.items():
        b = statistics.fmean(m["base"] for m in ms)
        n = statistics.fmean(m["novel"] for m in ms)
        out[key] = (b, n, harmonic_mean(b, n), len(ms))
    return out


def markdown_table(records: Sequence[dict], methods: Sequence[str], datasets: Sequence[str]) -> str:
    """One row per method: ``base / novel / HM`` per dataset and the average over datasets
    (base and novel averaged, HM of the averages), plus how novel classes were evaluated."""
    summary = summarize(records)
    lines = [
        "| method | " + " | ".join(datasets) + " | average | novel classes via |",
        "|---|" + "---:|" * (len(datasets) + 1) + "---|",
    ]
    for method in methods:
        cells = []
        for d in datasets:
            s = summary.get((method, d))
            cells.append("–" if s is None else f"{s[0]:.2f} / {s[1]:.2f} / {s[2]:.2f}")
        rows = [summary.get((method, d)) for d in datasets]
        if all(rows):
            b = statistics.fmean(r[0] for r in rows)
            n = statistics.fmean(r[1] for r in rows)
            cells.append(f"{b:.2f} / {n:.2f} / {harmonic_mean(b, n):.2f}")
        else:
            cells.append("–")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {novel_rule(method)} |")
    return "\n".join(lines) + "\n"


def run_bench(args) -> int:
    """`clipadapt bench --protocol base2novel --methods ... --data ... --out DIR`."""
    from clipadapt.backbones import load_backbone
    from clipadapt.commands.bench import method_hparams
    from clipadapt.commands.fit import extract_kwargs
    from clipadapt.data import load_dataset
    from clipadapt.io import write_text
    from clipadapt.methods import parse_hparams
    from clipadapt.templates import require_templates

    shots = args.shots[0] if len(args.shots) == 1 else DEFAULT_SHOTS
    if shots < 1:
        raise ClipAdaptError(f"--shots {shots}: expected a positive number of shots")
    if args.views is not None and args.views < 0:
        raise ClipAdaptError(f"--views {args.views}: expected 0 or more")
    pairs = method_hparams(args.methods, args.hparam)
    hparams = {m: parse_hparams(m, pairs[m]) for m in args.methods}
    templates = require_templates(args.templates) if args.templates else None
    rule = getattr(args, "base_rule", "ceil")
    bb = load_backbone(
        args.model,
        args.pretrained,
        device=args.device,
        trust_checkpoint=getattr(args, "trust_checkpoint", False),
    )
    records, names = [], []
    for dataset_arg in args.datasets:
        splits = load_dataset(dataset_arg, root=args.data_root)
        names.append(splits["train"].name)
        records += evaluate_base2novel(
            bb,
            splits,
            args.methods,
            seeds=args.seeds,
            shots=shots,
            rule=rule,
            eval_split=args.split,
            templates=templates,
            hparams=hparams,
            views=args.views,
            extract_kw=extract_kwargs(args),
            out_dir=args.out,
            model=args.model,
            device=args.device,
            recipe=getattr(args, "recipe", "clean"),
        )
    table = markdown_table(records, args.methods, names)
    title = (
        f"# Base-to-novel: accuracy (%) base / novel / HM, {shots} shots per base class, "
        f"base = {'⌈C/2⌉' if rule == 'ceil' else '⌊C/2⌋'} first labels, seeds {args.seeds}\n\n"
    )
    path = write_text(Path(args.out) / "base2novel.md", title + table)
    print(table)
    print(f"table: {path}")
    return 0
