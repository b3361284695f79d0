"""The on-disk feature cache: keyed entries of safetensors shards + a JSON manifest.

An entry holds the rows of one stream (eval embeddings, one augmented view, or patch tokens) of
one image list. Its key is the sha256 of what produced it: backbone identity (weights digest),
image-list digest (paths, sizes, mtimes), transform, view/augmentation/seed, library version.
A different key is a different entry: nothing is ever reused across keys.

Layout: ``<cache_dir>/<stream>-<key[:24]>/manifest.json`` + ``shard-00000.safetensors`` ...
Shards cover consecutive row ranges ``[start, stop)`` of ``shard_size`` rows and are written
atomically, each followed by the manifest (with the shard's sha256), so a killed run resumes from
its last complete shard. An entry whose manifest does not match its shard files is discarded and
recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clipadapt.errors import ClipAdaptError
from clipadapt.io import atomic_write, write_json

FORMAT = "clipadapt-cache/1"


def library_version() -> str:
    try:
        return metadata.version("clipadapt")
    except metadata.PackageNotFoundError:
        return "unknown"


def default_cache_dir() -> Path:
    """``$CLIPADAPT_CACHE``, else ``~/.cache/clipadapt``."""
    return Path(os.environ.get("CLIPADAPT_CACHE", "~/.cache/clipadapt")).expanduser()


def stable_repr(obj) -> str:
    """``repr`` without memory addresses (function reprs differ between processes)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def image_list_digest(paths: list[str]) -> str:
    """sha256 over each path with its size and mtime (ns); a missing file counts as such."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MemoryEntry:
    """An entry that keeps its shards in memory (extraction without a cache directory)."""

    def __init__(self, count: int, shard_size: int) -> None:
        self.count, self.shard_size = count, shard_size
        self.done = 0
        self.bad: list[dict] = []
        self._shards: list[torch.Tensor] = []
        self.path = None

    @property
    def complete(self) -> bool:
        return self.done == self.count

    def write_shard(self, start: int, rows: torch.Tensor, bad: list[dict]) -> None:
        assert start == self.done, (start, self.done)
        self._shards.append(rows)
        self.bad += bad
        self.done += rows.shape[0]

    def read(self) -> torch.Tensor:
        return torch.cat(self._shards) if self._shards else torch.zeros(0)


class CacheEntry(MemoryEntry):
    """One keyed entry on disk. ``done`` = rows in complete, verified shards."""

    def __init__(
        self, cache_dir: str | os.PathLike, stream: str, fields: dict, count: int, shard_size: int
    ) -> None:
        super().__init__(count, shard_size)
        self.fields = {"format": FORMAT, "library": library_version(), **fields}
        self.key = cache_key(self.fields)
        self.path = Path(cache_dir).expanduser() / f"{stream}-{self.key[:24]}"
        self.manifest_path = self.path / "manifest.json"
        self.shards: list[dict] = []
        self._loaded: list[torch.Tensor] = []
        self._open()
        if not self.complete:
            self._remove_stale_temporaries()

    def _manifest(self) -> dict:
        return {
            "format": FORMAT,
            "key": self.key,
            "fields": self.fields,
            "count": self.count,
            "shard_size": self.shard_size,
            "complete": self.complete,
            "shards": self.shards,
            "bad": self.bad,
        }

    def _discard(self, why: str) -> None:
        warnings.warn(f"feature cache {self.path}: {why}; recomputing", stacklevel=4)
        for f in self.path.glob("shard-*.safetensors"):
            f.unlink(missing_ok=True)
        self.manifest_path.unlink(missing_ok=True)
        self.shards, self.bad, self.done, self._loaded = [], [], 0, []

    def _open(self) -> None:
        """Load and verify an existing manifest; anything inconsistent discards the entry."""
        if not self.manifest_path.is_file():
            return
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return self._discard("unreadable manifest")
        if manifest.get("key") != self.key or manifest.get("count") != self.count:
            return self._discard("manifest key does not match")
        self.shard_size = int(manifest.get("shard_size", self.shard_size))
        tensors, expected = [], 0
        for shard in manifest.get("shards", []):
            try:
                data = (self.path / shard["file"]).read_bytes()
            except OSError:
                return self._discard(f"missing shard {shard.get('file')}")
            if hashlib.sha256(data).hexdigest() != shard.get("sha256"):
                return self._discard(f"shard {shard['file']} does not match its digest")
            rows = st_load(data)["rows"]
            if shard.get("start") != expected or rows.shape[0] != shard["stop"] - shard["start"]:
                return self._discard(f"shard {shard['file']} has the wrong rows")
            expected = shard["stop"]
            tensors.append(rows)
        self.shards = list(manifest.get("shards", []))
        self.bad = list(manifest.get("bad", []))
        self.done = expected
        self._loaded = tensors

    def write_shard(self, start: int, rows: torch.Tensor, bad: list[dict]) -> None:
        """Write rows [start, start+len) atomically, then the manifest that names them."""
        assert start == self.done, (start, self.done)
        data = st_save({"rows": rows.contiguous()})
        name = f"shard-{start // self.shard_size:05d}.safetensors"

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        atomic_write(self.path / name, write)
        stop = start + rows.shape[0]
        self.shards.append(
            {"file": name, "start": start, "stop": stop, "sha256": hashlib.sha256(data).hexdigest()}
        )
        self.bad += bad
        self.done = stop
        self._loaded.append(rows)
        write_json(self.manifest_path, self._manifest())

    def _remove_stale_temporaries(self) -> None:
        if not self.path.is_dir():
            return
        for f in self.path.glob("*.tmp-*"):
            pid = f.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                f.unlink(missing_ok=True)

    def read(self) -> torch.Tensor:
        return torch.cat(self._loaded) if self._loaded else torch.zeros(0)


def open_entry(
    cache_dir: str | os.PathLike | None, stream: str, fields: dict, count: int, shard_size: int
) -> MemoryEntry:
    """A CacheEntry in ``cache_dir``, or a MemoryEntry when ``cache_dir`` is None."""
    if shard_size < 1:
        raise ClipAdaptError(f"shard_size={shard_size}: expected a positive number of rows")
    if cache_dir is None:
        return MemoryEntry(count, shard_size)
    return CacheEntry(cache_dir, stream, fields, count, shard_size)
