"""Cost of SCLIP inference per image, as a ratio to the bare backbone forward on the same crops,
and its peak memory, on an 81-class / 113-query (COCO-Object names) 640x480 image.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/segment.py [--model ViT-B-16] [--device cpu]

Random-init weights (no download). Queries are built once before timing (the cached path); the
per-image cost does not depend on how many templates built them, so one template is used here
unless --templates 80. The memory of one predict is measured in a fresh process. Goals: ratio
<= 1.15, peak memory <= 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import clipadapt as ca
from clipadapt.segmentation.windows import resized_shape, window_boxes


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (Linux)
            f.write("5")


def peak_bytes(device: torch.device) -> tuple[int, int]:
    """(peak, current) memory: CUDA allocations, or the process's resident set on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmHWM"].split()[0]) * 1024, int(status["VmRSS"].split()[0]) * 1024


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def test_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))


def segmenter(bb, args: argparse.Namespace, cache: str):
    templates = None if args.templates == 80 else ["a photo of a {}."]
    return ca.segmentation.Segmenter(
        bb,
        "coco_object",
        templates=templates,
        cache_dir=cache,
        batch_size=args.batch_size,
        progress=False,
    )


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: the model, the cached queries, then one predict -> JSON on stdout."""
    torch.manual_seed(0)
    bb = ca.load_backbone(args.model, None, device=args.device)
    seg = segmenter(bb, args, args.cache)
    image = test_image()
    peak_reset(bb.device)
    _, before = peak_bytes(bb.device)
    seg.predict(image)
    peak, _ = peak_bytes(bb.device)
    print(json.dumps({"peak": peak, "before": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--templates", type=int, default=1, choices=[1, 80])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)

    torch.manual_seed(0)
    bb = ca.load_backbone(args.model, None, device=args.device)
    device = bb.device
    cache = tempfile.TemporaryDirectory()
    t0 = time.perf_counter()
    seg = segmenter(bb, args, cache.name)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    segmenter(bb, args, cache.name)
    cached = time.perf_counter() - t0
    print(
        f"model {args.model} (random init) on {device}; {seg.num_classes} classes, "
        f"{len(seg.queries)} queries; queries built in {build:.1f} s "
        f"({args.templates} template(s)), loaded from cache in {cached * 1000:.0f} ms"
    )

    image = test_image()
    h, w = resized_shape(480, 640, seg.short_side, seg.long_side)
    boxes = window_boxes(h, w, seg.window, seg.stride)
    x = torch.randn(3, h, w, generator=torch.Generator().manual_seed(0))
    crops = torch.stack([x[:, t:b, c:r] for t, c, b, r in boxes]).to(device)
    crops = crops.to(next(bb.model.parameters()).dtype)
    print(f"image 640x480 -> {w}x{h}, {len(boxes)} windows of {seg.window} px")

    def backbone():
        with torch.no_grad():
            for start in range(0, len(crops), args.batch_size):
                bb.model.visual(crops[start : start + args.batch_size])

    def dense():
        for start in range(0, len(crops), args.batch_size):
            bb.dense_features(crops[start : start + args.batch_size], "csa")

    def predict():
        seg.predict(image)

    fns = {"backbone": backbone, "dense": dense, "predict": predict}
    runs = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved, so a change of machine load hits all three
        for name, fn in fns.items():
            runs[name].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["backbone"]
    print(f"bare backbone forward on the crops: {base * 1000:8.1f} ms (baseline)")
    print(
        f"CSA dense features on the crops:    {med['dense'] * 1000:8.1f} ms  "
        f"ratio {med['dense'] / base:.3f}"
    )
    print(
        f"Segmenter.predict (whole image):    {med['predict'] * 1000:8.1f} ms  "
        f"ratio {med['predict'] / base:.3f}  (goal <= 1.15)"
    )

    child = [
        sys.executable,
        __file__,
        "--memory-child",
        "--cache",
        cache.name,
        "--model",
        args.model,
        "--device",
        args.device,
        "--templates",
        str(args.templates),
        "--batch-size",
        str(args.batch_size),
    ]
    done = subprocess.run(child, capture_output=True, text=True, check=True)
    cache.cleanup()
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    peak, before = memory["peak"], memory["before"]
    what = "CUDA allocated" if device.type == "cuda" else "resident set (VmHWM)"
    print(
        f"one predict in a fresh process, peak {what}: {(peak - before) / 2**30:.2f} GB above "
        f"the {before / 2**30:.2f} GB held before it (libraries, weights, queries); "
        f"{peak / 2**30:.2f} GB in all  (goal <= 1.5 GB)"
    )


if __name__ == "__main__":
    main()
