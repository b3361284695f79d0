"""Class names, synonyms and the text query embeddings (computed once, cached on disk).

A class is a list of synonyms; each synonym is one query. A query embedding is
normalise(mean over templates of normalise(encode_text(template(name)))), with the 80 OpenAI
ImageNet templates by default. Embeddings are cached as safetensors keyed by the backbone's
identity, the names and the templates; a key mismatch recomputes, never reuses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from clipadapt.data.mmseg import LAYOUTS, class_file, read_class_lines
from clipadapt.errors import ClipAdaptError
from clipadapt.io import atomic_write

Template = str | Callable[[str], str]
NAMES_PER_BATCH = 8


def default_templates() -> list[str]:
    """The 80 OpenAI ImageNet templates, as format strings."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def parse_classes(classes: str | os.PathLike | Sequence[str]) -> list[list[str]]:
    """Classes as lists of synonyms.

    classes: a class-name file (one class per line, synonyms separated by ","), the name of a
    packaged benchmark file ("voc21", ...), or a list with one entry per class (an entry may
    itself hold comma-separated synonyms).
    """
    if isinstance(classes, str | os.PathLike):
        path = Path(classes)
        if not path.is_file() and str(classes) in LAYOUTS:
            path = class_file(str(classes))
        lines = read_class_lines(path)
        where = str(path)
    else:
        lines, where = list(classes), "classes"
    parsed = [[n.strip() for n in str(line).split(",") if n.strip()] for line in lines]
    if not parsed:
        raise ClipAdaptError(f"{where}: no classes; expected at least one class name")
    for i, synonyms in enumerate(parsed):
        if not synonyms:
            raise ClipAdaptError(f"{where}: class {i} has no name; expected at least one")
    return parsed


def default_cache_dir() -> Path:
    """$CLIPADAPT_CACHE/queries, else ~/.cache/clipadapt/queries."""
    root = os.environ.get("CLIPADAPT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "clipadapt"
    return base / "queries"


def cache_key(identity: dict, names: Sequence[str], templates: Sequence[str]) -> str:
    blob = json.dumps(
        {"backbone": identity, "names": list(names), "templates": list(templates)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def query_embeddings(
    bb,
    names: Sequence[str],
    templates: Sequence[Template] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Tensor:
    """Text query embeddings -> Tensor[Q, D] (L2-normalised, float32, on ``bb.device``).

    Cached under ``cache_dir`` (default: default_cache_dir()) when the backbone's identity names
    its weights (``identity["weights_sha256"]``); without that digest nothing is cached.
    """
    formats = [t("{}") if callable(t) else str(t) for t in (templates or default_templates())]
    identity = dict(getattr(bb, "identity", None) or {})
    path = None
    if identity.get("weights_sha256"):
        key = cache_key(identity, names, formats)
        path = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
        cached = _load(path, key)
        if cached is not None:
            return cached.to(bb.device)
    queries = encode_queries(bb, names, formats, progress)
    if path is not None:
        tensors = {"queries": queries.cpu().contiguous()}
        meta = {"key": key, "names": json.dumps(list(names))}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return queries


def encode_queries(bb, names: Sequence[str], templates: Sequence[str], progress: bool = True):
    """normalise(mean_t normalise(encode_text(t.format(name)))) per name -> Tensor[Q, D]."""
    out = []
    steps = range(0, len(names), NAMES_PER_BATCH)
    bar = tqdm(steps, desc="text queries", unit="batch", disable=not progress, leave=False)
    for start in bar:
        batch = names[start : start + NAMES_PER_BATCH]
        texts = [t.format(name) for name in batch for t in templates]
        with torch.no_grad():
            emb = F.normalize(bb.encode_texts(texts).float(), dim=-1)
        emb = emb.reshape(len(batch), len(templates), -1).mean(dim=1)
        out.append(F.normalize(emb, dim=-1))
    return torch.cat(out).to(bb.device)


def _load(path: Path, key: str) -> Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
        return load_file(str(path))["queries"].float()
    except (SafetensorError, OSError, KeyError):
        return None
