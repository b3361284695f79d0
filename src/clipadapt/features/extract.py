"""Run the frozen backbone over a dataset once: parallel decode, batched forward, cached, resumable.

One pass over the images decodes each file once and feeds every stream that is not cached yet:
view 0 (the eval transform ``bb.preprocess``), augmented views 1..V (``bb.train_transform``,
seeded per (view, image) so the result does not depend on batch size, workers or resumption),
and optional patch tokens (fp16). DataLoader workers decode while the main process runs the
model. Each stream is a cache entry (features/cache.py).
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipadapt.data.dataset import ClassificationDataset
from clipadapt.errors import ClipAdaptError
from clipadapt.features.cache import MemoryEntry, image_list_digest, open_entry, stable_repr
from clipadapt.features.featureset import FeatureSet

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
PREFETCH_BYTES = 2 << 30  # decoded batches waiting in workers: at most about 2 GiB


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images -> 8-bit RGB."""
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        a = np.asarray(image).astype(np.float32)
        if image.mode in _SIXTEEN_BIT or a.max() > 255:
            a = a / 257.0
        image = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        a = np.asarray(image, dtype=np.float32)
        a = a * 255.0 if a.max() <= 1.0 else a
        image = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully and convert it to RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def view_seed(seed: int, view: int, index: int) -> int:
    """The seed of augmented view ``view`` of image ``index`` (64 bits of sha256)."""
    digest = hashlib.sha256(f"{seed}:{view}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's and Python's global generators inside, restore them after."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class _Images(Dataset):
    """Image ``start + j`` -> (index, [one tensor per input] or None, error or None)."""

    def __init__(
        self, paths: list[str], inputs: list[tuple[Callable, int]], seed: int, start: int
    ) -> None:
        self.paths, self.inputs, self.seed, self.start = paths, inputs, seed, start

    def __len__(self) -> int:
        return len(self.paths) - self.start

    def __getitem__(self, j: int):
        i = self.start + j
        try:
            image = load_rgb(self.paths[i])
        except Exception as e:  # any decoder failure is a bad image, reported with its path
            return i, None, f"{type(e).__name__}: {e}"
        xs = []
        for transform, view in self.inputs:
            if view == 0:
                xs.append(transform(image))
            else:
                with _seeded(view_seed(self.seed, view, i)):
                    xs.append(transform(image))
        return i, xs, None


def _collate(samples):
    index = torch.tensor([s[0] for s in samples], dtype=torch.long)
    ok = torch.tensor([s[1] is not None for s in samples], dtype=torch.bool)
    good = [s[1] for s in samples if s[1] is not None]
    xs = [torch.stack(t) for t in zip(*good, strict=True)] if good else None
    errors = [(s[0], s[2]) for s in samples if s[1] is None]
    return index, ok, xs, errors


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def default_num_workers() -> int:
    """All cores but one for decoding (at least one worker)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


@dataclass
class _Stream:
    """Rows of one cache entry, produced from one input by ``compute``, flushed per shard."""

    name: str
    entry: MemoryEntry
    input: int
    compute: Callable[[torch.Tensor], torch.Tensor]  # [B,3,H,W] on device -> rows on CPU
    dtype: torch.dtype = torch.float32
    pos: int = 0
    buffer: list[torch.Tensor] = field(default_factory=list)
    bad: list[dict] = field(default_factory=list)
    row_shape: tuple | None = None
    computed: int = 0

    def __post_init__(self) -> None:
        self.pos = self.entry.done

    def add(self, i0: int, rows: torch.Tensor, bad: list[dict]) -> None:
        """Rows for images [i0, i0 + len(rows)); keep the ones not stored yet, flush shards."""
        skip = self.pos - i0
        if skip >= rows.shape[0]:
            return
        rows = rows[max(skip, 0) :]
        self.buffer.append(rows)
        self.bad += [b for b in bad if b["index"] >= self.pos]
        self.pos += rows.shape[0]
        self.computed += rows.shape[0]
        entry = self.entry
        while self.pos > entry.done and (
            self.pos - entry.done >= entry.shard_size or self.pos == entry.count
        ):
            stop = min(entry.done + entry.shard_size, entry.count)
            pending = torch.cat(self.buffer)
            n = stop - entry.done
            shard_bad = [b for b in self.bad if b["index"] < stop]
            entry.write_shard(entry.done, pending[:n].clone(), shard_bad)
            self.buffer = [pending[n:]] if pending.shape[0] > n else []
            self.bad = [b for b in self.bad if b["index"] >= stop]


def _run(
    bb,
    paths: list[str],
    streams: list[_Stream],
    inputs: list,
    *,
    seed: int,
    batch_size: int,
    num_workers: int,
    skip_bad: bool,
    progress: bool,
    desc: str,
) -> None:
    """Decode + forward the images from the earliest unfinished row; feed every stream."""
    start = min(s.pos for s in streams)
    batch_bytes = len(inputs) * batch_size * 3 * bb.image_size**2 * 4
    prefetch = max(1, min(4, PREFETCH_BYTES // max(1, num_workers * batch_bytes)))
    loader = DataLoader(
        _Images(paths, inputs, seed, start),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers else None,
        pin_memory=bb.device.type == "cuda",
        prefetch_factor=prefetch if num_workers else None,
    )
    bar = tqdm(total=len(paths), initial=start, unit="img", desc=desc, disable=not progress)
    with bar, torch.no_grad():
        for index, ok, xs, errors in loader:
            bad = [{"index": i, "path": paths[i], "reason": r} for i, r in errors]
            if bad and not skip_bad:
                b = bad[0]
                raise ClipAdaptError(
                    f"{b['path']}: cannot read image ({b['reason']}); "
                    "pass --skip-bad (skip_bad=True) to skip unreadable images"
                )
            i0, n = int(index[0]), len(index)
            for s in streams:
                if i0 + n <= s.pos:
                    continue
                out = None if xs is None else s.compute(xs[s.input].to(bb.device))
                if out is not None:
                    s.row_shape = tuple(out.shape[1:])
                elif s.row_shape is None:
                    probe = torch.zeros(1, 3, bb.image_size, bb.image_size, device=bb.device)
                    s.row_shape = tuple(s.compute(probe).shape[1:])
                if out is not None and out.shape[0] == n:
                    rows = out
                else:
                    rows = torch.zeros((n, *s.row_shape), dtype=s.dtype)
                    if out is not None:
                        rows[ok] = out
                s.add(i0, rows, bad)
            bar.update(n)


def extract(
    bb,
    dataset: ClassificationDataset,
    *,
    views: int = 0,
    augment: str = "rrc-flip",
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    tokens_layer: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    shard_size: int = 2048,
    tokens_shard_size: int = 256,
    stats: dict | None = None,
) -> FeatureSet:
    """Image embeddings of ``dataset`` through ``bb``, computed once and cached.

    Returns a FeatureSet: features [N, D] float32 unnormalised (eval transform), views
    [V, N, D] (V = ``views`` augmented passes with ``bb.train_transform(augment)``; view v of
    image i is seeded by ``view_seed(seed, v, i)``), tokens [N, P, W] fp16 when
    ``tokens_layer`` is set (``bb.patch_tokens(x, tokens_layer)``). N excludes unreadable
    images, which raise ClipAdaptError unless ``skip_bad`` (then they are left out and listed
    in the cache manifest and in ``stats["bad"]``).
    cache_dir None computes in memory. ``stats``, if given, receives per-stream counts of rows
    computed and the cache entry folders.
    """
    if batch_size < 1:
        raise ClipAdaptError(f"batch_size={batch_size}: expected a positive integer")
    if views < 0:
        raise ClipAdaptError(f"views={views}: expected 0 or more augmented views")
    paths = dataset.paths
    if not paths:
        raise ClipAdaptError(f"{dataset.name}: the {dataset.split or 'given'} split is empty")
    n = len(paths)
    common = {
        "backbone": bb.identity,
        "images": {"count": n, "digest": image_list_digest(paths)},
    }
    eval_tf = bb.preprocess
    inputs: list[tuple[Callable, int]] = [(eval_tf, 0)]
    streams = [
        _Stream(
            "embed-v0",
            open_entry(
                cache_dir,
                "embed-v0",
                {
                    **common,
                    "stream": "image-embeddings",
                    "view": 0,
                    "transform": stable_repr(eval_tf),
                },
                n,
                shard_size,
            ),
            0,
            lambda x: bb.encode_images(x, normalize=False).float().cpu(),
        )
    ]
    if tokens_layer is not None:
        fields = {
            **common,
            "stream": "patch-tokens",
            "layer": tokens_layer,
            "dtype": "float16",
            "transform": stable_repr(eval_tf),
        }
        streams.append(
            _Stream(
                f"tokens-l{tokens_layer}",
                open_entry(cache_dir, f"tokens-l{tokens_layer}", fields, n, tokens_shard_size),
                0,
                lambda x: bb.patch_tokens(x, tokens_layer).half().cpu(),
                torch.float16,
            )
        )
    if views:
        train_tf = bb.train_transform(augment)
        for v in range(1, views + 1):
            fields = {
                **common,
                "stream": "image-embeddings",
                "view": v,
                "augment": augment,
                "seed": seed,
                "transform": stable_repr(train_tf),
            }
            inputs.append((train_tf, v))
            streams.append(
                _Stream(
                    f"embed-v{v}",
                    open_entry(cache_dir, f"embed-v{v}", fields, n, shard_size),
                    len(inputs) - 1,
                    streams[0].compute,
                )
            )
    todo = [s for s in streams if not s.entry.complete]
    if todo:
        used = sorted({s.input for s in todo})
        for s in todo:
            s.input = used.index(s.input)
        _run(
            bb,
            paths,
            todo,
            [inputs[k] for k in used],
            seed=seed,
            batch_size=batch_size,
            num_workers=default_num_workers() if num_workers is None else num_workers,
            skip_bad=skip_bad,
            progress=progress,
            desc=f"extract {dataset.name}",
        )
    return _assemble(dataset, streams, skip_bad, stats)


def _assemble(
    dataset: ClassificationDataset, streams: list[_Stream], skip_bad: bool, stats: dict | None
) -> FeatureSet:
    bad = {b["index"]: b for s in streams for b in s.entry.bad}
    if bad and not skip_bad:
        b = bad[min(bad)]
        raise ClipAdaptError(
            f"{b['path']}: cannot read image ({b['reason']}); "
            "pass --skip-bad (skip_bad=True) to skip unreadable images"
        )
    if bad:
        first = bad[min(bad)]
        warnings.warn(
            f"skipped {len(bad)} unreadable images (first: {first['path']}: {first['reason']})",
            stacklevel=3,
        )
    keep = torch.tensor([i for i in range(len(dataset)) if i not in bad], dtype=torch.long)
    rows = {s.name: s.entry.read()[keep] for s in streams}
    view_names = sorted(
        (k for k in rows if k.startswith("embed-v") and k != "embed-v0"),
        key=lambda k: int(k[len("embed-v") :]),
    )
    if stats is not None:
        stats.update(
            computed={s.name: s.computed for s in streams},
            entries={s.name: None if s.entry.path is None else str(s.entry.path) for s in streams},
            bad=[bad[i] for i in sorted(bad)],
        )
    tokens = next((rows[s.name] for s in streams if s.name.startswith("tokens-")), None)
    labels = torch.tensor(dataset.labels, dtype=torch.long)[keep]
    return FeatureSet(
        features=rows["embed-v0"],
        labels=labels,
        classnames=list(dataset.classnames),
        paths=[dataset.paths[i] for i in keep.tolist()],
        views=torch.stack([rows[k] for k in view_names]) if view_names else None,
        tokens=tokens,
    )
