"""The on-disk feature cache: keyed entries of safetensors shards + a JSON manifest.

An entry holds the rows of one stream (eval embeddings, one augmented view, or patch tokens) of
one image list. Its key is the sha256 of what produced it: backbone identity (weights digest),
image-list digest (paths, sizes, mtimes), transform, view/augmentation/seed, library version.
A different key is a different entry: nothing is ever reused across keys.

Layout: ``<cache_dir>/<stream>-<key[:24]>/manifest.json`` + ``shard-00000.safetensors`` ...
Shard k holds rows ``[k * shard_size, min((k + 1) * shard_size, count))``. Each shard is written
atomically, then the document that lists it with its sha256, so a killed run resumes from its
complete shards. One process writes ``manifest.json``; under torch.distributed each rank lists
its shards in its own ``part-<rank>.json`` and rank 0 folds the parts into the manifest.
A document (manifest or part) that does not match its shard files is discarded with its shards
and they are recomputed.
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
from clipadapt.io import (
    atomic_write,
    default_cache_dir,  # noqa: F401 (re-exported)
    make_dirs,
    write_json,
)

FORMAT = "clipadapt-cache/1"
MANIFEST = "manifest.json"


def library_version() -> str:
    try:
        return metadata.version("clipadapt")
    except metadata.PackageNotFoundError:
        return "unknown"


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


def shard_file(start: int, shard_size: int) -> str:
    return f"shard-{start // shard_size:05d}.safetensors"


def _is_bad_record(b) -> bool:
    return (
        isinstance(b, dict)
        and isinstance(b.get("index"), int)
        and isinstance(b.get("path"), str)
        and isinstance(b.get("reason"), str)
    )


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

    path: Path | None = None

    def __init__(self, count: int, shard_size: int) -> None:
        self.count, self.shard_size = count, shard_size
        self.rows: dict[int, torch.Tensor] = {}  # shard start -> rows [stop - start, ...]
        self.bad: list[dict] = []

    def ranges(self) -> list[tuple[int, int]]:
        """Every shard's rows ``(start, stop)``."""
        size = self.shard_size
        return [(s, min(s + size, self.count)) for s in range(0, self.count, size)]

    def missing(self) -> list[tuple[int, int]]:
        """The shards not stored yet."""
        return [(a, b) for a, b in self.ranges() if a not in self.rows]

    @property
    def complete(self) -> bool:
        return not self.missing()

    @property
    def done(self) -> int:
        """Rows in stored shards."""
        return sum(t.shape[0] for t in self.rows.values())

    def _check(self, start: int, rows: torch.Tensor) -> int:
        stop = min(start + self.shard_size, self.count)
        if start % self.shard_size or not 0 <= start < self.count or rows.shape[0] != stop - start:
            raise ValueError(f"rows {start}+{rows.shape[0]} are not a shard of {self.shard_size}")
        return stop

    def write_shard(self, start: int, rows: torch.Tensor, bad: list[dict]) -> None:
        self._check(start, rows)
        self.rows[start] = rows
        self.bad += bad

    def read(self) -> torch.Tensor:
        """All rows [count, ...] in order (the entry must be complete)."""
        if not self.complete:
            raise ValueError(f"entry {self.path}: {len(self.missing())} shards missing")
        return torch.cat([self.rows[a] for a, _ in self.ranges()])


class CacheEntry(MemoryEntry):
    """One keyed entry on disk.

    rank None: this process is the only writer: it lists shards in manifest.json, folds any
    part files it finds into it and removes temporaries of dead processes. rank r: one of several
    writers: it lists its shards in part-<r>.json and touches no other file.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        stream: str,
        fields: dict,
        count: int,
        shard_size: int,
        rank: int | None = None,
    ) -> None:
        super().__init__(count, shard_size)
        self.fields = {"format": FORMAT, "library": library_version(), **fields}
        self.key = cache_key(self.fields)
        self.path = Path(cache_dir).expanduser() / f"{stream}-{self.key[:24]}"
        self.manifest_path = self.path / MANIFEST
        self.rank = rank
        self.records: dict[int, dict] = {}  # shard start -> {"file", "start", "stop", "sha256"}
        self.mine: set[int] = set()  # shard starts this process wrote
        self.parts: list[Path] = []  # part files read
        self.sized = False  # shard_size comes from a document on disk
        self._open()
        if rank is None and not self.complete:
            self._remove_stale_temporaries()
            make_dirs(self.path)  # an unwritable cache fails now, not after the first shard

    def _document(self, starts: list[int]) -> dict:
        spans = [(s, self.records[s]["stop"]) for s in starts]
        return {
            "format": FORMAT,
            "key": self.key,
            "fields": self.fields,
            "count": self.count,
            "shard_size": self.shard_size,
            "complete": self.complete,
            "shards": [self.records[s] for s in starts],
            "bad": sorted(
                (b for b in self.bad if any(a <= b["index"] < z for a, z in spans)),
                key=lambda b: b["index"],
            ),
        }

    def _open(self) -> None:
        """Read manifest.json, then every part-*.json; each must match its shard files."""
        if not self.path.is_dir():
            return
        self._read_document(self.manifest_path)
        for part in sorted(self.path.glob("part-*.json")):
            self._read_document(part)
            self.parts.append(part)

    def _read_document(self, doc_path: Path) -> None:
        if not doc_path.is_file():
            return
        try:
            doc = json.loads(doc_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return self._reject(doc_path, [], "unreadable")
        if not isinstance(doc, dict) or doc.get("key") != self.key:
            return self._reject(doc_path, [], "key does not match")
        if doc.get("count") != self.count:
            return self._reject(doc_path, [], f"count {doc.get('count')!r} is not {self.count}")
        size = doc.get("shard_size")
        if not isinstance(size, int) or size < 1:
            return self._reject(doc_path, [], f"shard_size {size!r} is not a positive integer")
        if self.sized and size != self.shard_size:
            return self._reject(doc_path, [], f"shard_size {size} differs from {self.shard_size}")
        shards = doc.get("shards", [])
        bad = doc.get("bad", [])
        if not isinstance(shards, list) or not isinstance(bad, list):
            return self._reject(doc_path, [], "shards or bad is not a list")
        loaded: dict[int, tuple[dict, torch.Tensor]] = {}
        for shard in shards:
            found = self._verify(shard, size)
            if isinstance(found, str):
                return self._reject(doc_path, shards, found)
            loaded[shard["start"]] = (shard, found)
        if not all(_is_bad_record(b) for b in bad):
            return self._reject(doc_path, shards, "bad images are not [index, path, reason]")
        self.shard_size, self.sized = size, True
        known = {b["index"] for b in self.bad}
        for start, (shard, rows) in loaded.items():
            if start not in self.records:
                self.records[start], self.rows[start] = dict(shard), rows
                ours = range(start, shard["stop"])
                self.bad += [b for b in bad if b["index"] in ours and b["index"] not in known]

    def _verify(self, shard, size: int) -> torch.Tensor | str:
        """The rows of a listed shard, or why it does not match."""
        if not isinstance(shard, dict):
            return f"shard entry {shard!r} is not an object"
        start, stop = shard.get("start"), shard.get("stop")
        if not isinstance(start, int) or not 0 <= start < self.count or start % size:
            return f"shard start {start!r} is not a multiple of {size} below {self.count}"
        if stop != min(start + size, self.count) or shard.get("file") != shard_file(start, size):
            return f"shard {shard.get('file')!r} has the wrong name or rows"
        try:
            data = (self.path / shard["file"]).read_bytes()
        except OSError:
            return f"missing shard {shard['file']}"
        if hashlib.sha256(data).hexdigest() != shard.get("sha256"):
            return f"shard {shard['file']} does not match its digest"
        try:
            rows = st_load(data)["rows"]
        except Exception:  # the digest matched, so this is a file clipadapt did not write
            return f"shard {shard['file']} is not a safetensors file of rows"
        if rows.shape[0] != stop - start:
            return f"shard {shard['file']} has {rows.shape[0]} rows, expected {stop - start}"
        return rows

    def _reject(self, doc_path: Path, shards: list, why: str) -> None:
        """Discard a document; as the only writer also delete it and the shards it lists."""
        warnings.warn(f"feature cache {doc_path}: {why}; recomputing", stacklevel=5)
        if self.rank is not None:
            return
        for shard in shards:
            name = shard.get("file") if isinstance(shard, dict) else None
            start = shard.get("start") if isinstance(shard, dict) else None
            if isinstance(name, str) and re.fullmatch(r"shard-\d{5,}\.safetensors", name):
                if start not in self.records or self.records[start]["file"] != name:
                    (self.path / name).unlink(missing_ok=True)
        doc_path.unlink(missing_ok=True)

    def write_shard(self, start: int, rows: torch.Tensor, bad: list[dict]) -> None:
        """Write a shard atomically, then the document that lists it (with its sha256)."""
        stop = self._check(start, rows)
        data = st_save({"rows": rows.contiguous()})
        name = shard_file(start, self.shard_size)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        atomic_write(self.path / name, write)
        digest = hashlib.sha256(data).hexdigest()
        self.records[start] = {"file": name, "start": start, "stop": stop, "sha256": digest}
        self.rows[start] = rows
        self.bad += bad
        self.mine.add(start)
        if self.rank is None:
            self.fold()
        else:
            part = self.path / f"part-{self.rank:05d}.json"
            write_json(part, self._document(sorted(self.mine)))

    def fold(self) -> None:
        """Write manifest.json listing every verified shard; remove the part files read."""
        write_json(self.manifest_path, self._document(sorted(self.records)))
        for part in self.parts:
            part.unlink(missing_ok=True)
        self.parts = []

    def reload(self) -> None:
        """Forget what is in memory and read the folder again (after other ranks wrote)."""
        self.rows, self.records, self.bad, self.parts = {}, {}, [], []
        self.sized = False
        self._open()

    def _remove_stale_temporaries(self) -> None:
        if not self.path.is_dir():
            return
        for f in self.path.glob("*.tmp-*"):
            pid = f.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                f.unlink(missing_ok=True)


def open_entry(
    cache_dir: str | os.PathLike | None,
    stream: str,
    fields: dict,
    count: int,
    shard_size: int,
    rank: int | None = None,
) -> MemoryEntry:
    """A CacheEntry in ``cache_dir`` (see its ``rank``), or a MemoryEntry when it is None."""
    if shard_size < 1:
        raise ClipAdaptError(f"shard_size={shard_size}: expected a positive number of rows")
    if cache_dir is None:
        return MemoryEntry(count, shard_size)
    return CacheEntry(cache_dir, stream, fields, count, shard_size, rank)
