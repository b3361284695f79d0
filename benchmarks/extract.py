"""Extraction throughput against the bare model forward, measured in one process.

Writes N JPEG files to a temporary folder, then times
  (a) the baseline written out here: decode + forward, one batch after another in this
      process (PIL open, the model's preprocessing, ``bb.encode_images``), and
  (b) ``clipadapt.features.extract`` from the JPEG files (decode in DataLoader workers, forward,
      fresh cache folder so nothing is reused, shards and manifest written),
with the same batch size, alternating (a) and (b) for --rounds and keeping the best time of each,
and prints images/s of both and the ratio b/a; the bare forward on preloaded tensors is printed
too (the ceiling when decoding costs nothing).

    python benchmarks/extract.py --model tiny-test-vit
    python benchmarks/extract.py --model ViT-B-16 --n 24 --batch-size 8   # random init
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipadapt as ca
from clipadapt.data.dataset import ClassificationDataset, Item
from clipadapt.features import extract
from clipadapt.features.extract import default_num_workers, load_rgb

TEST_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "configs"


def write_jpegs(folder: Path, n: int, width: int, height: int) -> list[str]:
    """n smooth random JPEGs (quality 90) of width x height."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(str(path))
    return paths


def bare_forward(bb, x: torch.Tensor, batch_size: int) -> float:
    """Seconds for encode_images over x in batches (tensors already in memory)."""
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            bb.encode_images(x[i : i + batch_size], normalize=False)
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_and_forward(bb, paths: list[str], batch_size: int) -> float:
    """Seconds to decode and embed every file, batch by batch, in this process."""
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([bb.preprocess(load_rgb(q)) for q in paths[i : i + batch_size]])
            bb.encode_images(x, normalize=False)
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-test-vit")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--n", type=int, default=512, help="number of JPEG files")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--width", type=int, default=400)
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2, help="alternating repetitions (best kept)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if (TEST_CONFIGS / f"{args.model}.json").is_file():
        import open_clip

        open_clip.add_model_config(TEST_CONFIGS)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    bb = ca.load_backbone(args.model, args.pretrained, device=args.device)
    workers = default_num_workers() if args.num_workers is None else args.num_workers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        paths = write_jpegs(tmp / "images", args.n, args.width, args.height)
        dataset = ClassificationDataset("bench", str(tmp), [Item(q, 0, "x") for q in paths], ["x"])
        x = torch.stack([bb.preprocess(load_rgb(q)) for q in paths])

        bare_forward(bb, x[: args.batch_size], args.batch_size)  # warm-up
        t_model, t_base, t_extract = [], [], []
        for r in range(args.rounds):  # alternate, keep the best of each: robust to load spikes
            t_model.append(bare_forward(bb, x, args.batch_size))
            t_base.append(decode_and_forward(bb, paths, args.batch_size))
            start = time.perf_counter()
            fs = extract(
                bb,
                dataset,
                batch_size=args.batch_size,
                num_workers=workers,
                cache_dir=tmp / f"cache{r}",
                progress=False,
            )
            t_extract.append(time.perf_counter() - start)
            assert fs.features.shape[0] == args.n
        t_model, t_base, t_extract = min(t_model), min(t_base), min(t_extract)

    a, base, b = args.n / t_model, args.n / t_base, args.n / t_extract
    print(
        f"model {args.model} on {bb.device}, {args.n} JPEGs {args.width}x{args.height}, "
        f"batch {args.batch_size}, {workers} decode workers, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"baseline: decode + forward, in turn:  {base:9.1f} images/s")
    print(f"extract (JPEG files, fresh cache):    {b:9.1f} images/s")
    print(f"bare forward (preloaded tensors):     {a:9.1f} images/s (ceiling)")
    print(
        f"ratio extract / (decode + forward): {b / base:.2f}x; extract / bare forward {b / a:.2f}"
    )


if __name__ == "__main__":
    main()
