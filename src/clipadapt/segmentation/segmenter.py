"""SCLIP inference: sliding-window dense CLIP features against text queries, per pixel.

image -> resize (short side, long side capped) -> windows (batched crops) -> dense features
-> cosine logits per query on the patch grid -> bilinear upsample to the crop -> average where
windows overlap -> bilinear resize to the original size -> [optional PAMR] -> softmax(scale *
logits) over all queries -> class probability = max over its synonyms -> [drop classes of small
area] -> argmax -> [pixels whose best probability is under the threshold become class 0].
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from clipadapt.backbones.dense import ATTENTIONS, check_positions, dense_features, patch_size
from clipadapt.errors import ClipAdaptError
from clipadapt.segmentation.pamr import pamr
from clipadapt.segmentation.queries import Template, parse_classes, query_embeddings
from clipadapt.segmentation.windows import axis_map, resized_shape, window_boxes, window_starts

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BAND_ELEMENTS = 1 << 22  # logits per band of rows in predict (16 MB in float32)


class Segmenter:
    """Training-free open-vocabulary segmentation with a frozen CLIP ViT (SCLIP).

    bb: a Backbone (``model``, ``encode_texts``, ``image_size``, ``device``, ``identity``).
    classes: class-name file, packaged benchmark name ("voc21"), or one entry per class
        (synonyms separated by ","). With ``bg_threshold`` class 0 is the background class.
    window, stride: sliding window side and step in pixels (default: the model's input size and
        half of it: 224/112 for a 224-px model).
    short_side, long_side: the image is resized so its short side is ``short_side`` (default
        1.5 x window: 336 for 224-px models) unless its long side would pass ``long_side``.
    scale: softmax temperature on the cosine logits. bg_threshold: pixels whose best class
        probability is under it become class 0. area_threshold: classes other than 0 whose
        predicted area is under this fraction of the predicted foreground are dropped.
    pamr: refine the logits with PAMR before the softmax (slow; off in SCLIP's published
        numbers, on in NACLIP's: its naclip.py:21 defaults to 10 PAMR steps).
    positions: the position embedding at a crop of another size than the model's (an image
        smaller than the window): "exact" resize (default) or "sclip", the reference code's
        rule (backbones/dense.py).
    batch_size: crops per backbone forward. templates: prompt templates (80 OpenAI ones).
    cache_dir: the query embedding cache (default ~/.cache/clipadapt/queries or
        $CLIPADAPT_CACHE/queries).
    """

    def __init__(
        self,
        bb,
        classes: str | os.PathLike | Sequence[str],
        *,
        attention: str = "csa",
        positions: str = "exact",
        window: int | None = None,
        stride: int | None = None,
        short_side: int | None = None,
        long_side: int = 2048,
        scale: float = 40.0,
        bg_threshold: float | None = None,
        area_threshold: float | None = None,
        pamr: bool = False,
        batch_size: int = 16,
        templates: Sequence[Template] | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if attention not in ATTENTIONS:
            raise ClipAdaptError(
                f"attention={attention!r}: expected one of {', '.join(ATTENTIONS)}"
            )
        self.bb = bb
        self.patch = patch_size(bb)  # raises for non-ViT towers
        self.attention = attention
        self.positions = check_positions(positions)
        self.window = int(bb.image_size if window is None else window)
        self.stride = int(max(self.window // 2, 1) if stride is None else stride)
        self.short_side = int(round(1.5 * self.window) if short_side is None else short_side)
        self.long_side = int(long_side)
        self.scale = float(scale)
        self.bg_threshold = bg_threshold
        self.area_threshold = area_threshold
        self.use_pamr = bool(pamr)
        self.batch_size = int(batch_size)
        _check(self)
        self.classes = parse_classes(classes)
        names = [name for synonyms in self.classes for name in synonyms]
        self.query_class = torch.tensor(
            [c for c, synonyms in enumerate(self.classes) for _ in synonyms], device=bb.device
        )
        self.queries = query_embeddings(bb, names, templates, cache_dir, progress)  # [Q, D]
        self.mean = torch.tensor(getattr(bb, "mean", None) or OPENAI_MEAN)
        self.std = torch.tensor(getattr(bb, "std", None) or OPENAI_STD)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """One display name per class (its first synonym)."""
        return [synonyms[0] for synonyms in self.classes]

    def predict(self, image: Image.Image) -> Tensor:
        """PIL image -> LongTensor[H, W] of class indices (H, W: the image's size), on CPU.

        Equal to ``decide(probabilities(image))``, computed a band of rows at a time without
        the full probability maps: softmax is monotonic, so the best class is the class of the
        best query, and its probability is exp(scale * best - logsumexp(scale * logits)).
        """
        if self.use_pamr:
            return self.decide(self.probabilities(image)).cpu()
        grid, rows, cols = self.grid_logits(image)
        stitched = torch.matmul(cols, grid)  # [A, W, Q]: columns resized, rows still on the grid
        need_lse = bool(self.bg_threshold)  # a threshold of 0 changes nothing
        best, query, lse = _best_queries(stitched, rows, self.scale, need_lse=need_lse)
        pred = self.query_class[query]
        if self.area_threshold is not None and self.num_classes > 1:
            area = torch.bincount(pred.flatten(), minlength=self.num_classes)[1:]
            drop = torch.cat(
                [area.new_zeros(1, dtype=torch.bool), area < self.area_threshold * area.sum()]
            )
            if drop[1:].any():
                dropped = drop[self.query_class]
                best, query, _ = _best_queries(stitched, rows, self.scale, dropped=dropped)
                pred = self.query_class[query]
        if need_lse:
            pred[self.scale * best - lse < math.log(self.bg_threshold)] = 0
        return pred.cpu()

    def probabilities(self, image: Image.Image) -> Tensor:
        """PIL image -> Tensor[C, H, W]: per class, the max over its synonyms of the softmax
        (over all queries) of scale * cosine logits."""
        logits = self.logits(image)
        if self.use_pamr:
            logits = pamr(_to_tensor(image).to(logits.device), logits)
        probs = torch.softmax(logits.permute(1, 2, 0).mul_(self.scale), dim=-1)  # [H, W, Q]
        return self._synonym_max(probs).permute(2, 0, 1)

    def logits(self, image: Image.Image) -> Tensor:
        """PIL image -> Tensor[Q, H, W]: window-averaged cosine logits at the original size
        (a view of an [H, W, Q] tensor)."""
        grid, rows, cols = self.grid_logits(image)
        stitched = torch.matmul(cols, grid)  # [A, W, Q]
        logits = rows @ stitched.flatten(1)  # [H, W * Q]
        return logits.view(len(rows), len(cols), -1).permute(2, 0, 1)

    def grid_logits(self, image: Image.Image) -> tuple[Tensor, Tensor, Tensor]:
        """Cosine logits of every window on its patch grid, stitched, and the maps to pixels.

        Returns grid [A, B, Q] (window row i, column j at [i*gh:(i+1)*gh, j*gw:(j+1)*gw]),
        rows [H, A] and cols [W, B] (see windows.axis_map): the published pipeline (upsample
        each window to its crop, average overlaps, resize to the original size) is
        logits[y, x, q] = Σ_ab rows[y, a] grid[a, b, q] cols[x, b].
        """
        image = image.convert("RGB")
        w0, h0 = image.size
        h, w = resized_shape(h0, w0, self.short_side, self.long_side)
        if min(h, w) < self.patch:
            raise ClipAdaptError(
                f"image {w0}x{h0}: resized to {w}x{h}, a side is under one patch "
                f"({self.patch} px); expected a less elongated image or a larger long_side"
            )
        x = _to_tensor(image.resize((w, h), Image.BILINEAR))
        x = ((x - self.mean[:, None, None]) / self.std[:, None, None]).to(self.bb.device)
        boxes = window_boxes(h, w, self.window, self.stride)
        cos = []
        for start in range(0, len(boxes), self.batch_size):
            batch = boxes[start : start + self.batch_size]
            crops = torch.stack(
                [x[:, top:bottom, left:right] for top, left, bottom, right in batch]
            )
            feats = dense_features(self.bb, crops, self.attention, self.positions)
            cos.append(feats @ self.queries.T)
        cos = torch.cat(cos)  # [n, gh, gw, Q], windows row by row
        tops = window_starts(h, self.window, self.stride)
        lefts = window_starts(w, self.window, self.stride)
        _, gh, gw, q = cos.shape
        grid = cos.view(len(tops), len(lefts), gh, gw, q).transpose(1, 2)
        grid = grid.reshape(len(tops) * gh, len(lefts) * gw, q)
        rows = axis_map(tops, min(self.window, h), gh, h, h0).to(cos.device)
        cols = axis_map(lefts, min(self.window, w), gw, w, w0).to(cos.device)
        return grid, rows, cols

    def _synonym_max(self, probs: Tensor) -> Tensor:
        """[..., Q] -> [..., C], max over each class's queries (contiguous in query order)."""
        if probs.shape[-1] == self.num_classes:
            return probs
        out = probs.new_empty(*probs.shape[:-1], self.num_classes)
        start = 0
        for c, synonyms in enumerate(self.classes):
            out[..., c] = probs[..., start : start + len(synonyms)].amax(dim=-1)
            start += len(synonyms)
        return out

    def decide(self, probs: Tensor) -> Tensor:
        """Class probabilities [C, H, W] -> LongTensor[H, W] (area filter, then threshold).

        Modifies ``probs`` in place when the area filter drops classes.
        """
        pred = probs.argmax(dim=0)
        if self.area_threshold is not None and self.num_classes > 1:
            area = torch.bincount(pred.flatten(), minlength=self.num_classes)[1:]
            drop = area < self.area_threshold * area.sum()
            if drop.any():
                probs[1:][drop] = 0
                pred = probs.argmax(dim=0)
        if self.bg_threshold is not None:
            pred[probs.amax(dim=0) < self.bg_threshold] = 0
        return pred


def _best_queries(
    stitched: Tensor,
    rows: Tensor,
    scale: float,
    need_lse: bool = False,
    dropped: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per pixel: best logit, its query and logsumexp(scale * logits), a band of rows at a
    time (the [H, W, Q] logits are never whole in memory). stitched [A, W, Q], rows [H, A];
    queries where ``dropped`` [Q] is true are left out of the best."""
    height, (_, width, queries) = len(rows), stitched.shape
    flat = stitched.flatten(1)
    band = max(1, BAND_ELEMENTS // (width * queries))
    best = flat.new_empty(height, width)
    query = torch.empty(height, width, dtype=torch.long, device=flat.device)
    lse = flat.new_empty(height, width) if need_lse else None
    for top in range(0, height, band):
        logits = (rows[top : top + band] @ flat).view(-1, width, queries)
        if dropped is not None:
            logits[..., dropped] = -torch.inf
        torch.max(logits, dim=-1, out=(best[top : top + band], query[top : top + band]))
        if need_lse:
            torch.logsumexp(logits.mul_(scale), dim=-1, out=lse[top : top + band])
    return best, query, lse


def _to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> float Tensor[3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _check(seg: Segmenter) -> None:
    for name in ("window", "stride", "short_side", "long_side", "batch_size"):
        if getattr(seg, name) < 1:
            raise ClipAdaptError(f"{name}={getattr(seg, name)}: expected a positive integer")
    if seg.window < seg.patch:
        raise ClipAdaptError(f"window={seg.window}: expected at least the patch size ({seg.patch})")
    if seg.stride > seg.window:
        raise ClipAdaptError(f"stride={seg.stride}: expected at most the window ({seg.window})")
    if seg.scale <= 0:
        raise ClipAdaptError(f"scale={seg.scale}: expected a positive number")
    for name in ("bg_threshold", "area_threshold"):
        value = getattr(seg, name)
        if value is not None and not 0 <= value <= 1:
            raise ClipAdaptError(f"{name}={value}: expected a value in [0, 1]")
