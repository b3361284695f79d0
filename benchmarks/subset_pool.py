"""A benchmark's few-shot subsets: one extraction of their union against one per subset.

    python benchmarks/subset_pool.py [--task tones] [--shots 1,2,4,8,16] [--seeds 1,2,3]

Draws every (shots, seed) subset of a generated ShapesWorld task (train 32 and val 16 images
per class, as the demo writes) and extracts the train images with 10 augmented views and the
val images with the eval transform, for every subset: once per subset (how `bench` worked
before features/pool.py), then through a SubsetPool (what `bench` does now), in the same
process, with the embedded `tiny-shapes` model and no cache on disk. Prints both times, their
ratio, the images sent through the backbone each way, and checks that both give the same rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import clipadapt as ca
from clipadapt.data import few_shot, load_dataset
from clipadapt.data.shapesworld_write import write_classification
from clipadapt.features import extract
from clipadapt.features.pool import SubsetPool


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="tones")
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shots = [int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    common = {"num_workers": 0, "progress": False}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_classification(tmp, args.task, per_class=(32, 16, 1), progress=False)
        splits = load_dataset(folder)
        draws = [few_shot(splits, k, s) for k in shots for s in seeds]
        bb = ca.load_backbone("tiny-shapes")

        t0 = time.perf_counter()
        separate = [
            (extract(bb, d["train"], views=args.views, **common), extract(bb, d["val"], **common))
            for d in draws
        ]
        t_separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool = SubsetPool(bb, splits, draws, common)
        pooled = [
            (pool.features(d["train"], {"views": args.views}), pool.features(d["val"], {}))
            for d in draws
        ]
        t_pooled = time.perf_counter() - t0
    per_train = 1 + args.views  # the eval transform and the views
    n_separate = sum(len(d["train"]) * per_train + len(d["val"]) for d in draws)
    n_pooled = sum(
        len(index) * (per_train if split == "train" else 1)
        for (_, split), index in pool.union.items()
    )

    for (a_train, a_val), (b_train, b_val) in zip(separate, pooled, strict=True):
        torch.testing.assert_close(a_train.views, b_train.views, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a_val.features, b_val.features, rtol=1e-4, atol=1e-4)
    print(
        f"ShapesWorld {args.task}, {len(draws)} subsets (shots {args.shots} x seeds "
        f"{args.seeds}), {args.views} views, threads={torch.get_num_threads()}; images "
        "through the backbone (train x (1 + views) + val):"
    )
    print(f"one extraction per subset: {t_separate:7.2f} s, {n_separate} images")
    print(f"SubsetPool (their union):  {t_pooled:7.2f} s, {n_pooled} images")
    print(f"speed-up {t_separate / t_pooled:.2f}x; the same rows (checked)")


if __name__ == "__main__":
    main()
