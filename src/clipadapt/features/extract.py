"""Run the frozen backbone over a dataset once: parallel decode, batched forward, cached, resumable.

One pass over the images decodes each file once and feeds every stream that is not cached yet:
view 0 (the eval transform ``bb.preprocess``), augmented views 1..V (``bb.train_transform``,
seeded per (view, image) by the image's path relative to the dataset root, so a view does not
depend on batch size, workers, resumption or the other images in the list: a few-shot subset's
views are rows of its parent split's),
and optional patch tokens (fp16). DataLoader workers decode while the main process runs the
model. Each stream is a cache entry (features/cache.py); only its missing shards are computed,
in batches aligned to ``index // batch_size`` so that a resumed or sharded run encodes every
image exactly as a one-process run does. Under torch.distributed each rank computes the shards
that start in its block of the images (clipadapt.distributed) and rank 0 writes the manifests.
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

from clipadapt import distributed
from clipadapt.data.dataset import ClassificationDataset, upright
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
    """Decode an image file fully and convert it to RGB.

    An image over ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 megapixels unless changed) is refused
    before it is decoded (ValueError), not decoded with a warning as PIL would.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                image.load()
                return to_rgb(upright(image))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"too large to decode safely: {e}") from None


def view_seed(seed: int, view: int, key: str) -> int:
    """The seed of augmented view ``view`` of the image ``key`` (64 bits of sha256)."""
    digest = hashlib.sha256(f"{seed}:{view}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def image_keys(dataset: ClassificationDataset) -> list[str]:
    """Each image's view-seeding key: its path relative to the dataset root, with "/"."""
    root = os.path.abspath(dataset.root) if dataset.root else ""
    keys = []
    for path in dataset.paths:
        full = os.path.abspath(path)
        inside = root and os.path.commonpath([root, full]) == root
        keys.append((os.path.relpath(full, root) if inside else full).replace(os.sep, "/"))
    return keys


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator and Python's inside, restore them after.

    Only the CPU generator (what the transforms draw from), which gives the same stream as
    ``torch.manual_seed``: that also seeds every other device type, lazily where CUDA is not
    initialised, recording the caller's stack each time (about 160 µs per call on this
    project's CPU machines against about 1 µs, once per augmented view)."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class _Images(Dataset):
    """Image ``i`` -> (i, [one tensor per input] or None, error or None)."""

    def __init__(
        self, paths: list[str], keys: list[str], inputs: list[tuple[Callable, int]], seed: int
    ) -> None:
        self.paths, self.keys, self.inputs, self.seed = paths, keys, inputs, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.paths[i])
        except Exception as e:  # any decoder failure is a bad image, reported with its path
            return i, None, f"{type(e).__name__}: {e}"
        xs = []
        for transform, view in self.inputs:
            if view == 0:
                xs.append(transform(image))
            else:
                with _seeded(view_seed(self.seed, view, self.keys[i])):
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
    """Rows of one cache entry, produced from one input by ``compute``, written per shard."""

    name: str
    fields: dict
    shard_size: int
    input: int
    # [B,3,H,W] on device -> rows on CPU; None for a stream that only a joint pass serves
    compute: Callable[[torch.Tensor], torch.Tensor] | None
    dtype: torch.dtype = torch.float32
    # Streams of one input that one forward pass serves (embeddings and patch tokens): the
    # pass ``joint`` returns a tuple and this stream's rows are item ``part`` of it.
    joint: Callable[[torch.Tensor], tuple] | None = None
    part: int = 0
    entry: MemoryEntry | None = None
    todo: dict[int, int] = field(default_factory=dict)  # shards to compute: start -> stop
    pending: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    bad: dict[int, list[dict]] = field(default_factory=dict)
    row_shape: tuple | None = None
    computed: int = 0

    def wants(self, i: int) -> bool:
        return i // self.entry.shard_size * self.entry.shard_size in self.todo

    def add(self, index: list[int], rows: torch.Tensor, bad: list[dict]) -> None:
        """Rows for images ``index`` (ascending); keep those of shards to compute, write the
        shards that are complete."""
        size = self.entry.shard_size
        starts = [i // size * size for i in index]
        for start in dict.fromkeys(starts):
            if start not in self.todo:
                continue
            keep = [k for k, s in enumerate(starts) if s == start]
            self.pending.setdefault(start, []).append(rows[keep])
            mine = [b for b in bad if b["index"] // size * size == start]
            self.bad.setdefault(start, []).extend(mine)
            self.computed += len(keep) - len(mine)  # images encoded, not the unreadable ones
            if sum(t.shape[0] for t in self.pending[start]) == self.todo[start] - start:
                shard = torch.cat(self.pending.pop(start))
                self.entry.write_shard(start, shard, self.bad.pop(start))
                del self.todo[start]


class _AlignedBatches:
    """The rows of ``spans`` (``[a, b)`` ranges) in batches grouped by ``row // batch_size``: an
    image is encoded in the same batch as in a one-process run from scratch, whatever was
    cached or which rank runs (so the features are bitwise the same)."""

    def __init__(self, spans: list[tuple[int, int]], batch_size: int) -> None:
        merged: list[list[int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.spans, self.batch_size = merged, batch_size
        self.rows = sum(b - a for a, b in merged)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for a, b in self.spans:
            while a < b:
                k = a // self.batch_size
                if batch and batch[-1] // self.batch_size != k:
                    yield batch
                    batch = []
                stop = min(b, (k + 1) * self.batch_size)
                batch.extend(range(a, stop))
                a = stop
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _run(
    bb,
    paths: list[str],
    keys: list[str],
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
    """Decode + forward the images of every stream's ``todo`` shards; feed every stream."""
    batches = _AlignedBatches([span for s in streams for span in s.todo.items()], batch_size)
    if not batches.rows:
        return
    batch_bytes = len(inputs) * batch_size * 3 * bb.image_size**2 * 4
    prefetch = max(1, min(4, PREFETCH_BYTES // max(1, num_workers * batch_bytes)))
    loader = DataLoader(
        _Images(paths, keys, inputs, seed),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers else None,
        pin_memory=bb.device.type == "cuda",
        prefetch_factor=prefetch if num_workers else None,
    )
    bar = tqdm(total=batches.rows, unit="img", desc=desc, disable=not progress)
    with bar, torch.no_grad():
        for index, ok, xs, errors in loader:
            bad = [{"index": i, "path": paths[i], "reason": r} for i, r in errors]
            if bad and not skip_bad:
                raise ClipAdaptError(_bad_message(bad[0]))
            index_list, n = index.tolist(), len(index)
            joint: dict[int, tuple] = {}  # input -> the one pass's outputs, this batch
            for s in streams:
                if not any(s.wants(i) for i in index_list):
                    continue
                out = None if xs is None else _rows(s, xs[s.input].to(bb.device), joint)
                if out is not None:
                    s.row_shape = tuple(out.shape[1:])
                elif s.row_shape is None:
                    probe = torch.zeros(1, 3, bb.image_size, bb.image_size, device=bb.device)
                    s.row_shape = tuple(_rows(s, probe, {}).shape[1:])
                if out is not None and out.shape[0] == n:
                    rows_out = out
                else:
                    rows_out = torch.zeros((n, *s.row_shape), dtype=s.dtype)
                    if out is not None:
                        rows_out[ok] = out
                s.add(index_list, rows_out, bad)
            bar.update(n)


def _rows(s: _Stream, x: torch.Tensor, joint: dict[int, tuple]) -> torch.Tensor:
    """Stream ``s``'s rows for input batch ``x``; a joint pass runs once per input."""
    if s.joint is None:
        return s.compute(x)
    if s.input not in joint:
        joint[s.input] = s.joint(x)
    return joint[s.input][s.part]


def _bad_message(b: dict) -> str:
    return (
        f"{b['path']}: cannot read image ({b['reason']}); "
        "pass --skip-bad (skip_bad=True) to skip unreadable images"
    )


def _sharded_size(shard_size: int, n: int, world: int, batch_size: int) -> int:
    """Shard size for ``world`` ranks: at most one rank's share, rounded up to whole batches."""
    share = -(-n // world)
    return max(1, min(shard_size, -(-share // batch_size) * batch_size))


def _open_entries(streams: list[_Stream], cache_dir, n: int, rank: int | None) -> None:
    for s in streams:
        s.entry = open_entry(cache_dir, s.name, s.fields, n, s.shard_size, rank)


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
    view_tokens: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    shard_size: int = 2048,
    tokens_shard_size: int = 256,
    stats: dict | None = None,
) -> FeatureSet:
    """Image embeddings of ``dataset`` through ``bb``, computed once and cached.

    Returns a FeatureSet: features [N, D] float32 unnormalised (eval transform), views
    [V, N, D] (V = ``views`` augmented passes with ``bb.train_transform(augment)``; view v of
    image i is seeded by ``view_seed(seed, v, image_keys(dataset)[i])``), tokens [N, P, W] fp16 when
    ``tokens_layer`` is set (``bb.patch_tokens(x, tokens_layer)``), and view_tokens
    [V, N, P, W] fp16 of the augmented views too when ``view_tokens``. N excludes unreadable
    images, which raise ClipAdaptError unless ``skip_bad`` (then they are left out and listed
    in the cache manifest and in ``stats["bad"]``).
    cache_dir None computes in memory. ``stats``, if given, receives per-stream counts of rows
    computed and the cache entry folders.

    Inside a torch.distributed process group (``clipadapt.distributed.init``) with a cache
    folder that every rank sees, each rank computes the shards that start in its block of the
    images and rank 0 writes the manifests; every rank returns the whole FeatureSet, equal to a
    one-process run. Without a cache folder every rank computes everything.
    """
    if batch_size < 1:
        raise ClipAdaptError(f"batch_size={batch_size}: expected a positive integer")
    if views < 0:
        raise ClipAdaptError(f"views={views}: expected 0 or more augmented views")
    if shard_size < 1 or tokens_shard_size < 1:
        raise ClipAdaptError(
            f"shard_size={shard_size}, tokens_shard_size={tokens_shard_size}: "
            "expected positive numbers of rows"
        )
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
    both = None
    if tokens_layer is not None:

        def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z, t = bb.encode_images_and_tokens(x, tokens_layer, normalize=False)
            return z.cpu(), t.half().cpu()

    streams = [
        _Stream(
            "embed-v0",
            {**common, "stream": "image-embeddings", "view": 0, "transform": stable_repr(eval_tf)},
            shard_size,
            0,
            lambda x: bb.encode_images(x, normalize=False).float().cpu(),
            joint=both,
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
                fields,
                tokens_shard_size,
                0,
                None,  # patch tokens always come with the embedding, from one pass
                torch.float16,
                joint=both,
                part=1,
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
                "seeded_by": "image-path",  # was the index in the list: not the same views
                "transform": stable_repr(train_tf),
            }
            inputs.append((train_tf, v))
            with_tokens = view_tokens and tokens_layer is not None
            streams.append(
                _Stream(
                    f"embed-v{v}",
                    fields,
                    shard_size,
                    len(inputs) - 1,
                    streams[0].compute,
                    joint=both if with_tokens else None,
                )
            )
            if with_tokens:  # the same view's patch tokens, from the same forward pass
                token_fields = {**fields, "stream": "patch-tokens", "layer": tokens_layer}
                streams.append(
                    _Stream(
                        f"tokens-l{tokens_layer}-v{v}",
                        {**token_fields, "dtype": "float16"},
                        tokens_shard_size,
                        len(inputs) - 1,
                        None,
                        torch.float16,
                        joint=both,
                        part=1,
                    )
                )
    rank, world = distributed.rank_world()
    sharded = world > 1 and cache_dir is not None
    if sharded:
        for s in streams:
            s.shard_size = _sharded_size(s.shard_size, n, world, batch_size)
        if rank == 0:  # alone: fold the parts of an interrupted run, start the manifests
            _open_entries(streams, cache_dir, n, None)
            for s in streams:
                s.entry.fold()
                s.entry.rank = 0
        distributed.barrier()
        if rank != 0:
            _open_entries(streams, cache_dir, n, rank)
    else:
        _open_entries(streams, cache_dir, n, None)
    for s in streams:
        s.todo = dict(s.entry.missing())
        if sharded:
            s.todo = {a: b for a, b in s.todo.items() if distributed.owner(a, n, world) == rank}
    todo = [s for s in streams if s.todo]
    error = None
    if todo:
        used = sorted({s.input for s in todo})
        for s in todo:
            s.input = used.index(s.input)
        try:
            _run(
                bb,
                paths,
                image_keys(dataset),
                todo,
                [inputs[k] for k in used],
                seed=seed,
                batch_size=batch_size,
                num_workers=default_num_workers() if num_workers is None else num_workers,
                skip_bad=skip_bad,
                progress=progress and rank == 0,
                desc=f"extract {dataset.name}" + (f" [rank {rank}/{world}]" if sharded else ""),
            )
        except ClipAdaptError as e:
            if not sharded:
                raise
            error = str(e)
    if sharded:
        _gather(streams, cache_dir, n, rank, error)
    return _assemble(dataset, streams, skip_bad, stats)


def _gather(streams: list[_Stream], cache_dir, n: int, rank: int, error: str | None) -> None:
    """After every rank wrote its shards: rank 0 folds the parts into the manifests, then every
    rank reads the complete entries. A user error on any rank is raised on every rank."""
    distributed.raise_if_any(error)
    if rank == 0:
        for s in streams:
            s.entry.reload()
            s.entry.fold()
    distributed.barrier()
    if rank != 0:
        _open_entries(streams, cache_dir, n, rank)
    missing = next((s.entry.path for s in streams if not s.entry.complete), None)
    distributed.raise_if_any(
        None
        if missing is None
        else f"{missing}: incomplete after a sharded extraction; "
        "every rank needs the same cache folder (a shared file system)"
    )
    computed = distributed.all_sum(torch.tensor([s.computed for s in streams]))
    for s, c in zip(streams, computed.tolist(), strict=True):
        s.computed = int(c)


def _assemble(
    dataset: ClassificationDataset, streams: list[_Stream], skip_bad: bool, stats: dict | None
) -> FeatureSet:
    bad = {b["index"]: b for s in streams for b in s.entry.bad}
    if bad and not skip_bad:
        raise ClipAdaptError(_bad_message(bad[min(bad)]))
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
    tokens_name = next((s.name for s in streams if s.name.startswith("tokens-")), None)
    tokens = rows[tokens_name] if tokens_name else None
    # tokens-l<layer>-v<v> holds the patch tokens of augmented view embed-v<v>
    view_tokens = [rows.get(f"{tokens_name}-{k[len('embed-') :]}") for k in view_names]
    labels = torch.tensor(dataset.labels, dtype=torch.long)[keep]
    return FeatureSet(
        features=rows["embed-v0"],
        labels=labels,
        classnames=list(dataset.classnames),
        paths=[dataset.paths[i] for i in keep.tolist()],
        views=torch.stack([rows[k] for k in view_names]) if view_names else None,
        tokens=tokens,
        view_tokens=torch.stack(view_tokens) if view_tokens and None not in view_tokens else None,
    )
