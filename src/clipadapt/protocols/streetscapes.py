"""The StreetScapes protocol (CLIP-MHAdapter): one classifier per attribute task, full supervision.

For each seed and each task of a manual-labels root: the train CSV is split 80/20 (stratified,
seeded) into train/val, every method is fitted on train (epoch or hyper-parameters selected on
val) and scored on test: accuracy, macro-F1, weighted-F1 and adjusted balanced accuracy (%).
``mh-adapter-mt`` (beyond the paper) fits one MultiTaskMHAdapter on all tasks at once and is
scored per task beside the per-task adapters. The table carries the published MaxViT-T test
accuracies (trained per attribute) as a reference column.

The backbone runs once per image, whatever the seeds (a view is seeded by its image; the seed
splits train/val and seeds training): the images of all tasks' train CSVs form one pool (eval view,
V augmented views, and the patch tokens of each view when an mh-adapter is requested), those of
the test CSVs another (eval view and its tokens); every task's sets are rows of these pools.
Cached per view as fp16 safetensors shards (benchmarks/mh_tokens.py: reading cached tokens is
far cheaper than running the backbone again, see docs/mh-adapter.md).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clipadapt import recipes
from clipadapt.data.dataset import ClassificationDataset, Item
from clipadapt.data.streetscapes import StreetTask, find_tasks, manual_labels_root, read_task
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.features.pool import rows_for, select
from clipadapt.methods import get, get_class
from clipadapt.methods.mh_adapter import MHAdapter, MHAdapterConfig
from clipadapt.metrics import balanced_accuracy, confusion_matrix, macro_f1, weighted_f1
from clipadapt.results import make_result, read_result, write_result
from clipadapt.train import fit_threads

MULTI_TASK = "mh-adapter-mt"
DEFAULT_METHODS = ("zero-shot", "linear-probe", "clip-adapter", "mh-adapter", MULTI_TASK)
# The protocol selects every trained method's epoch on its validation split.
PROTOCOL_HPARAMS = {"clip-adapter": {"select_epoch": "val"}}
METRICS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "weighted_f1": "weighted-F1",
    "adjusted_balanced_accuracy": "adj. bal. acc.",
}
# MaxViT-T, trained per attribute, test accuracy (%) as published with CLIP-MHAdapter
MAXVIT_ACCURACY = {
    "pano_status": 99.9,
    "lighting_condition": 96.2,
    "glare": 94.1,
    "view_direction": 87.4,
    "quality": 79.9,
    "reflection": 78.7,
    "weather": 75.5,
    "platform": 68.3,
}
TOKEN_METHODS = ("mh-adapter", MULTI_TASK)


def street_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """logits [N, C], labels [N] -> the four protocol metrics in %."""
    confusion = confusion_matrix(logits.argmax(dim=1), labels, logits.shape[1])
    return {
        "accuracy": 100.0 * float(confusion.diagonal().sum()) / max(1, int(confusion.sum())),
        "macro_f1": macro_f1(confusion),
        "weighted_f1": weighted_f1(confusion),
        "adjusted_balanced_accuracy": balanced_accuracy(confusion, adjusted=True),
    }


def image_pool(
    name: str, root: str, split: str, datasets: Sequence[ClassificationDataset]
) -> ClassificationDataset:
    """The distinct images of ``datasets``, sorted by path (so the pool, and its cache entries,
    do not depend on how a seed split train/val), as one unlabelled dataset."""
    paths = sorted({p for ds in datasets for p in ds.paths})
    return ClassificationDataset(name, root, [Item(p, 0, "image") for p in paths], ["image"], split)


def multiselect(pool: FeatureSet, sets: list[ClassificationDataset], views: bool):
    """Rows of ``pool`` for the union of ``sets`` (one per task); labels [N, T], -1 where an
    image is not in that task's set."""
    per_task = [rows_for(pool, ds) for ds in sets]
    rows = sorted({r for task_rows, _ in per_task for r in task_rows})
    index = {r: i for i, r in enumerate(rows)}
    labels = torch.full((len(rows), len(sets)), -1, dtype=torch.long)
    for t, ((task_rows, pos), ds) in enumerate(zip(per_task, sets, strict=True)):
        for r, i in zip(task_rows, pos, strict=True):
            labels[index[r], t] = ds.items[i].label
    if not views:
        pool = dataclasses.replace(pool, views=None, view_tokens=None)
    names = [f"{ds.name}:{c}" for ds in sets for c in ds.classnames]
    return dataclasses.replace(pool.subset(rows), labels=labels, classnames=names)


def run_filename(
    dataset: str, task: str, model: str, method: str, seed: int, recipe: str = "clean"
) -> str:
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)) for p in (dataset, task, model, method)]
    if recipe != "clean":
        parts[3] += f"@{recipe}"
    return "__".join([*parts, f"seed{seed}"]) + ".json"


def build_method(
    name: str,
    hparams: dict[str, Any],
    *,
    scale: float,
    seed: int,
    device,
    recipe: str = "clean",
    task: str | None = None,
) -> Any:
    """A registered method or mh-adapter-mt; the logit scale, the seed and PROTOCOL_HPARAMS
    fill the config fields of those names unless ``hparams`` sets them. With the "reference"
    recipe the mh-adapter takes the authors' per-task setting (class weighting, blend ratio,
    heads; ``recipes.MH_TASK_RECIPES``, run-comparison.sh) for a task the authors ran."""
    cls = get_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if not cls.learned_scale:
        fields.discard("scale")
    options = {k: v for k, v in (("scale", scale), ("seed", seed)) if k in fields}
    options |= PROTOCOL_HPARAMS.get(name, {})
    if recipe == "reference" and name == "mh-adapter" and task in recipes.MH_TASK_RECIPES:
        options |= dataclasses.asdict(recipes.MH_TASK_RECIPES[task])
    options |= hparams
    return get(name, device=device, recipe=recipe, **options)


def run_streetscapes(
    bb,
    root: str | Path,
    *,
    out_dir: str | Path,
    methods: Sequence[str] = DEFAULT_METHODS,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] = (1,),
    views: int = 4,
    hparams: dict[str, dict[str, Any]] | None = None,
    extract_kw: dict[str, Any] | None = None,
    val_fraction: float = 0.2,
    device: str | torch.device = "cpu",
    model: str | None = None,
    recipe: str = "clean",
) -> list[dict]:
    """Fit and score every (task, method, seed); one result JSON per run in ``out_dir/runs``
    (a run whose JSON exists and names the same backbone weights is read back, not redone; one
    made with other weights is redone). Returns the records.

    bb: the Backbone; methods: registered method names and/or ``mh-adapter-mt``; hparams:
    per method, Config overrides (mh-adapter-mt takes mh-adapter's fields); views: augmented
    views of each train image (embedding, and patch tokens for the MH-Adapters); recipe:
    "clean" or "reference" (the mh-adapter's per-task setting from the authors' grid).
    """
    root = manual_labels_root(root)
    tasks = list(tasks) if tasks else find_tasks(root)
    if not tasks:
        raise ClipAdaptError(f"{root}: no task has both train/<task>.csv and test/<task>.csv")
    run = _Run(
        bb=bb,
        root=root,
        dataset=root.parent.name if root.name == "manual_labels" else root.name,
        model=model or bb.name,
        methods=list(methods),
        tasks=tasks,
        views=views,
        hparams=hparams or {},
        extract_kw=dict(extract_kw or {}),
        val_fraction=val_fraction,
        device=device,
        runs_dir=Path(out_dir) / "runs",
        recipe=recipes.check_recipe(recipe),
    )
    return [r for seed in seeds for r in run.seed(seed)]


@dataclasses.dataclass
class _Run:
    """The fixed inputs of a protocol run; ``seed(s)`` does one seed."""

    bb: Any
    root: Path
    dataset: str
    model: str
    methods: list[str]
    tasks: list[str]
    views: int
    hparams: dict[str, dict[str, Any]]
    extract_kw: dict[str, Any]
    val_fraction: float
    device: str | torch.device
    runs_dir: Path
    recipe: str = "clean"

    def path(self, task: str, method: str, seed: int) -> Path:
        recipe = self.recipe if method != "zero-shot" else "clean"
        return self.runs_dir / run_filename(self.dataset, task, self.model, method, seed, recipe)

    def features(self, street: dict[str, StreetTask]) -> tuple[FeatureSet | None, FeatureSet]:
        """(train pool with views, test pool): every task's images through the backbone once
        (for every seed: views are seeded by the image, the seed only splits train/val). With
        zero-shot alone nothing trains: the train images are not extracted (None)."""
        from clipadapt.features import extract

        tokens = any(m in TOKEN_METHODS for m in self.methods)
        mh = self.hparams.get("mh-adapter", self.hparams.get(MULTI_TASK, {}))
        layer = MHAdapterConfig(**mh).tokens_layer if tokens else None
        train = [s.splits[k] for s in street.values() for k in ("train", "val")]
        test = [s.splits["test"] for s in street.values()]
        root, name = str(self.root), self.dataset
        trains = any(m != "zero-shot" for m in self.methods)
        return (
            extract(
                self.bb,
                image_pool(f"{name}-train", root, "train", train),
                views=self.views,
                tokens_layer=layer,
                view_tokens=tokens,
                **self.extract_kw,
            )
            if trains
            else None,
            extract(
                self.bb,
                image_pool(f"{name}-test", root, "test", test),
                tokens_layer=layer,
                **self.extract_kw,
            ),
        )

    def finished(self, task: str, method: str, seed: int) -> dict | None:
        """The stored result of a run, if it was made with this backbone and these weights."""
        path = self.path(task, method, seed)
        if not path.is_file():
            return None
        record = read_result(path)
        return record if record.get("backbone") == self.bb.identity else None

    def seed(self, seed: int) -> list[dict]:
        from clipadapt.zeroshot import text_weights

        runs = [(t, m) for t in self.tasks for m in self.methods]
        done = {run: self.finished(*run, seed) for run in runs}
        done = {run: record for run, record in done.items() if record is not None}
        if len(done) == len(runs):
            return [done[run] for run in runs]
        street = {
            t: read_task(self.root, t, val_fraction=self.val_fraction, seed=seed)
            for t in self.tasks
        }
        train_pool, test_pool = self.features(street)
        sets = {
            t: {
                "train": None
                if train_pool is None
                else select(train_pool, s.splits["train"], True),
                "val": None if train_pool is None else select(train_pool, s.splits["val"], False),
                "test": select(test_pool, s.splits["test"], views=False),
            }
            for t, s in street.items()
        }
        cache_dir = self.extract_kw.get("cache_dir")
        weights = {
            t: text_weights(self.bb, s.classnames, [s.template], cache_dir)
            for t, s in street.items()
        }

        def save(task: str, method: str, metrics: dict, fitted: dict, config, m) -> None:
            s = street[task]
            fields = dict(
                dataset=self.dataset,
                model=self.model,
                pretrained=self.bb.pretrained,
                backbone=self.bb.identity,
                method=method,
                shots=None,
                seed=seed,
                metrics=metrics,
                protocol="streetscapes",
                task=task,
                split="test",
                template=s.template,
                labels=s.labels,
                classnames=s.classnames,
                sizes={k: len(v if v is not None else s.splits[k]) for k, v in sets[task].items()},
                reference={"MaxViT-T accuracy": MAXVIT_ACCURACY.get(task) if s.builtin else None},
                views=self.views,
                hparams=dataclasses.asdict(config),
                fitted=fitted,
                recipe=m.recipe,
                selection=m.selection(),
            )
            write_result(self.path(task, method, seed), **fields)
            done[(task, method)] = make_result(**fields)

        todo = [(t, m) for t, m in runs if (t, m) not in done and m != MULTI_TASK]
        for task, method in tqdm(todo, desc=f"streetscapes seed {seed}", unit="run"):
            m = build_method(
                method,
                self.hparams.get(method, {}),
                scale=self.bb.logit_scale,
                seed=seed,
                device=self.device,
                recipe=self.recipe,
                task=task,
            )
            data = sets[task]
            with fit_threads():
                m.fit(
                    None if method == "zero-shot" else data["train"],
                    weights[task].to(m.device),
                    val=data["val"],
                )
            metrics = street_metrics(m.logits(data["test"]).cpu(), data["test"].labels)
            save(task, method, metrics, m.fitted, m.config, m)
        if any((t, MULTI_TASK) not in done for t, m in runs if m == MULTI_TASK):
            mt = build_method(
                MULTI_TASK,
                self.hparams.get(MULTI_TASK, {}),
                scale=self.bb.logit_scale,
                seed=seed,
                device=self.device,
                recipe=self.recipe,
            )
            splits = {k: [street[t].splits[k] for t in self.tasks] for k in ("train", "val")}
            with fit_threads():
                mt.fit(
                    multiselect(train_pool, splits["train"], views=True),
                    [weights[t].to(mt.device) for t in self.tasks],
                    val=multiselect(train_pool, splits["val"], views=False),
                )
            for i, task in enumerate(self.tasks):
                test = sets[task]["test"]
                metrics = street_metrics(mt.logits(test)[i].cpu(), test.labels)
                save(task, MULTI_TASK, metrics, mt.fitted, mt.config, mt)
        return [done[run] for run in runs]


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown_table(records: list[dict], methods: Sequence[str] | None = None) -> str:
    """Rows (task, method), columns the four metrics (mean ± std over seeds) and MaxViT-T's
    published accuracy (the records' ``reference``: built-in tasks only); a final block
    averages each method's per-task means over the tasks, when it has them all."""
    several = len({r["dataset"] for r in records}) > 1

    def task_of(r: dict) -> str:
        return f"{r['dataset']}/{r['task']}" if several else r["task"]

    tasks = list(dict.fromkeys(task_of(r) for r in records))
    reference = {task_of(r): (r.get("reference") or {}).get("MaxViT-T accuracy") for r in records}
    order = list(methods or []) + sorted({r["method"] for r in records} - set(methods or []))
    values: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        for key in METRICS:
            values.setdefault((task_of(r), r["method"], key), []).append(r["metrics"][key])
    header = ["task", "method", *METRICS.values(), "MaxViT-T acc. (ref.)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(METRICS) + 1)]
    for task in tasks:
        ref = reference[task]
        for method in order:
            if (task, method, "accuracy") not in values:
                continue
            cells = [_cell(values[(task, method, k)]) for k in METRICS]
            ref_cell = "–" if ref is None else f"{ref:.1f}"
            lines.append("| " + " | ".join([task, method, *cells, ref_cell]) + " |")
    for method in order:
        means = {
            k: [statistics.fmean(values[(t, method, k)]) for t in tasks if (t, method, k) in values]
            for k in METRICS
        }
        if len(means["accuracy"]) != len(tasks) or len(tasks) < 2:
            continue
        refs = [reference[t] for t in tasks if reference[t] is not None]
        ref_cell = f"{statistics.fmean(refs):.1f}" if len(refs) == len(tasks) else "–"
        cells = [f"{statistics.fmean(v):.2f}" for v in means.values()]
        lines.append("| " + " | ".join(["mean over tasks", method, *cells, ref_cell]) + " |")
    return "\n".join(lines) + "\n"


def run_bench(args) -> int:
    """`clipadapt bench --protocol streetscapes --data ROOT[,ROOT] --methods ... --out DIR`."""
    from clipadapt.backbones import load_backbone
    from clipadapt.commands.bench import method_hparams
    from clipadapt.commands.fit import extract_kwargs
    from clipadapt.io import write_text
    from clipadapt.methods import parse_hparams

    methods = list(args.methods)
    takers = [m for m in methods if m != MULTI_TASK]
    if MULTI_TASK in methods and "mh-adapter" not in takers:
        takers.append("mh-adapter")
    pairs = method_hparams(takers, args.hparam)
    hparams = {m: parse_hparams(m, pairs[m]) for m in takers}
    if MULTI_TASK in methods:
        hparams[MULTI_TASK] = hparams["mh-adapter"]
    views = MHAdapter.default_views if args.views is None else args.views
    if views < 0:
        raise ClipAdaptError(f"--views {views}: expected 0 or more")
    bb = load_backbone(
        args.model,
        args.pretrained,
        device=args.device,
        trust_checkpoint=getattr(args, "trust_checkpoint", False),
    )
    records = []
    for name in args.datasets:
        root = Path(name).expanduser()
        if not root.exists() and args.data_root:
            root = Path(args.data_root).expanduser() / name
        records += run_streetscapes(
            bb,
            root,
            out_dir=args.out,
            methods=methods,
            tasks=args.tasks,
            seeds=args.seeds,
            views=views,
            hparams=hparams,
            extract_kw=extract_kwargs(args),
            device=args.device,
            model=args.model,
            recipe=getattr(args, "recipe", "clean"),
        )
    table = markdown_table(records, methods)
    title = f"# StreetScapes protocol: test metrics (%), mean ± std over seeds {args.seeds}\n\n"
    path = write_text(Path(args.out) / "results.md", title + table)
    print(table)
    print(f"table: {path}")
    return 0
