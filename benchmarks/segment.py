"""SCLIP per image and its peak memory against the reference's slide inference, on an 81-class
(COCO-Object names, one query per synonym) 640x480 image.

The baseline is the reference (wangf3014/SCLIP clip_segmentor.py, forward_slide and
postprocess_result) written out here: the image resized to short side 336, windows of 224 px
at stride 112, each window's CSA patch logits upsampled bilinearly to its 224 px crop and
padded to a full [Q, H, W] canvas, averaged by a count map, resized to 640x480, then
scale · logits -> softmax over queries -> a [C, Q, H, W] product with the one-hot synonym
index -> max over queries -> argmax, threshold. Both use the same backbone forward
(``bb.dense_features(crops, "csa")``); clipadapt's ``Segmenter.predict`` batches the windows
and never forms full-size maps. The script prints ms per image of each, their ratio, the
share of pixels where both predict the same class, and the peak memory of one image of each
in a fresh process. The reference's [C, Q, H, W] tensor is about 11 GB at this size: its
memory child runs only when MemAvailable holds it with 2 GB to spare (else its size is
printed). Random-init weights (no download), queries from one template.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/segment.py [--model ViT-B-16] [--device cpu]
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
import torch.nn.functional as F
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
    return ca.segmentation.Segmenter(
        bb,
        "coco_object",
        templates=["a photo of a {}."],
        cache_dir=cache,
        batch_size=args.batch_size,
        progress=False,
    )


def reference_slide(bb, seg, image: Image.Image) -> torch.Tensor:
    """The reference's slide inference and post-processing, step by step -> [H0, W0] classes."""
    w0, h0 = image.size
    h, w = resized_shape(h0, w0, seg.short_side, seg.long_side)
    x = torch.from_numpy(np.array(image.convert("RGB").resize((w, h), Image.BILINEAR)))
    x = x.permute(2, 0, 1).float().div(255)
    img = ((x - seg.mean[:, None, None]) / seg.std[:, None, None])[None].to(bb.device)
    stride, crop, queries = seg.stride, seg.window, seg.queries
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, len(queries), h, w))
    count_mat = img.new_zeros((1, 1, h, w))
    with torch.no_grad():
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y1, x1 = h_idx * stride, w_idx * stride
                y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                crop_img = img[:, :, y1:y2, x1:x2]
                feats = bb.dense_features(crop_img, "csa")  # [1, gh, gw, D]
                feats = feats / feats.norm(dim=-1, keepdim=True)
                logits = (feats @ queries.T).permute(0, 3, 1, 2)  # [1, Q, gh, gw]
                logits = F.interpolate(logits, size=crop_img.shape[-2:], mode="bilinear")
                preds += F.pad(logits, (x1, w - x2, y1, h - y2))
                count_mat[:, :, y1:y2, x1:x2] += 1
        preds = preds / count_mat
        logits = F.interpolate(preds, size=(h0, w0), mode="bilinear")[0]
        probs = (logits * seg.scale).softmax(0)  # [Q, H, W]
        num_cls, num_queries = seg.num_classes, len(queries)
        if num_cls != num_queries:
            cls_index = F.one_hot(seg.query_class.to(bb.device)).T.view(num_cls, num_queries, 1, 1)
            probs = (probs.unsqueeze(0) * cls_index).max(1)[0]  # [C, Q, H, W] -> [C, H, W]
        pred = probs.argmax(0)
        if seg.bg_threshold is not None:
            pred[probs.max(0)[0] < seg.bg_threshold] = 0
    return pred.cpu()


def reference_bytes(seg, image: Image.Image) -> int:
    w0, h0 = image.size
    return 4 * seg.num_classes * len(seg.queries) * h0 * w0


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: the model, the cached queries, then one image -> JSON on stdout."""
    torch.manual_seed(0)
    bb = ca.load_backbone(args.model, None, device=args.device)
    seg = segmenter(bb, args, args.cache)
    image = test_image()
    peak_reset(bb.device)
    _, before = peak_bytes(bb.device)
    if args.memory_child == "reference":
        reference_slide(bb, seg, image)
    else:
        seg.predict(image)
    peak, _ = peak_bytes(bb.device)
    print(json.dumps({"peak": peak, "before": before}))


def child_memory(args: argparse.Namespace, cache: str, which: str) -> tuple[int, int]:
    child = [sys.executable, __file__, "--memory-child", which, "--cache", cache]
    child += ["--model", args.model, "--device", args.device, "--batch-size", str(args.batch_size)]
    done = subprocess.run(child, capture_output=True, text=True, check=True)
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    return memory["peak"], memory["before"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (median)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-reference-memory", action="store_true")
    parser.add_argument("--memory-child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)

    torch.manual_seed(0)
    bb = ca.load_backbone(args.model, None, device=args.device)
    device = bb.device
    cache = tempfile.TemporaryDirectory()
    seg = segmenter(bb, args, cache.name)
    image = test_image()
    h, w = resized_shape(480, 640, seg.short_side, seg.long_side)
    boxes = window_boxes(h, w, seg.window, seg.stride)
    print(
        f"model {args.model} (random init) on {device}, {torch.get_num_threads()} threads; "
        f"{seg.num_classes} classes, {len(seg.queries)} queries; image 640x480 -> {w}x{h}, "
        f"{len(boxes)} windows of {seg.window} px"
    )
    ours_pred = seg.predict(image)  # warm-up
    start = time.perf_counter()
    ref_pred = reference_slide(bb, seg, image)  # once: about a minute on CPU
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ref_time = time.perf_counter() - start
    runs = {"reference": [ref_time], "ours": []}
    for _ in range(args.repeats):
        runs["ours"].append(timed(lambda: seg.predict(image), device))
    med = {k: statistics.median(v) for k, v in runs.items()}
    same = float((ours_pred == ref_pred).float().mean())
    print(f"reference slide inference: {med['reference'] * 1000:8.1f} ms/image (baseline)")
    print(f"Segmenter.predict:         {med['ours'] * 1000:8.1f} ms/image")
    print(
        f"ratio (reference / clipadapt): {med['reference'] / med['ours']:.2f}x; same class at "
        f"{100 * same:.2f}% of pixels"
    )

    what = "CUDA allocated" if device.type == "cuda" else "resident set (VmHWM)"
    peak, before = child_memory(args, cache.name, "ours")
    print(
        f"clipadapt, one image in a fresh process: peak {what} {(peak - before) / 2**30:.2f} GB "
        f"above the {before / 2**30:.2f} GB held before it"
    )
    need = reference_bytes(seg, image)
    if args.skip_reference_memory or (device.type == "cpu" and mem_available() < need + (2 << 30)):
        print(
            f"reference: its [C, Q, H, W] product alone is {need / 2**30:.2f} GB; "
            f"not run ({mem_available() / 2**30:.1f} GB available)"
        )
    else:
        ref_peak, ref_before = child_memory(args, cache.name, "reference")
        print(
            f"reference, one image in a fresh process: peak {what} "
            f"{(ref_peak - ref_before) / 2**30:.2f} GB above the {ref_before / 2**30:.2f} GB "
            f"held before it ({need / 2**30:.2f} GB of it the [C, Q, H, W] product); "
            f"memory ratio {(ref_peak - ref_before) / max(peak - before, 1):.0f}x"
        )
    cache.cleanup()


if __name__ == "__main__":
    main()
