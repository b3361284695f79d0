"""CLIP-MHAdapter (You, Cheng, Zeng, Haworth 2026): self-attention over frozen patch tokens.

    P      = patch tokens [B, T, W]: residual stream after the second-to-last ViT block
             (CLS dropped, before ln_post and the projection)
    h      = LayerNorm(ReLU(ReLU(P W1 + b1) W2 + b2))     W1: W -> hidden, W2: hidden -> D
    a      = MHA(h, h, h)                                  width D, `heads` heads, no residual
    g      = mean over tokens of Dropout(a)                [B, D]
    f      = r · g + (1 - r) · x                           x: the unnormalised image embedding
    logits = s · normalise(f) Wᵀ                           W [C, D]: one template per task

Widths: the token width W and the embedding size D come from the backbone (the cached tokens
and the text classifier); ``hidden`` is a config value whose default is the ViT-B/16 one, so
ViT-B/16 gets 768 -> 256 -> 512 and 1,380,096 trainable parameters whatever the head count
(the attention's projections are D x D for any h). D must be divisible by ``heads``.

Training (the one loop in clipadapt.train): AdamW lr 5e-4, weight decay 5e-4, batch 256, cosine
over 100 epochs after 5 linear warm-up epochs, stepped once per epoch as the reference's Dassl
trainer does (``lr_step``), 4 heads, early stopping on validation accuracy (patience
10), cross-entropy with optional inverse-frequency class weights. Augmentation comes from cached
views: each epoch draws, per image, one of V random-resized-crop + flip views whose embedding
*and* patch tokens were extracted once (``extract(..., views=V, view_tokens=True)``).

``MultiTaskMHAdapter`` (beyond the paper) shares one trunk between several tasks: the same f,
one text classifier per task, the sum over tasks of each task's cross-entropy.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt import train as training
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.hparams import TrainHParams, hp
from clipadapt.methods import register
from clipadapt.methods.base import Method


@dataclass
class MHAdapterConfig(TrainHParams):
    ratio: float = hp(0.2, "r, the adapter's weight in the blend (the paper tries 0.2 and 0.8)")
    heads: int = hp(4, "attention heads (the reference's default; per-task grid 4, 8, 16)")
    hidden: int = hp(256, "bottleneck width (ViT-B/16: 768 -> 256 -> 512)")
    dropout: float = hp(0.1, "dropout on the attention output")
    tokens_layer: int = hp(-2, "block whose output holds the patch tokens (-2: second-to-last)")
    class_weights: bool = hp(False, "inverse-frequency class weights in the cross-entropy")
    scale: float = hp(100.0, "logit scale s; the protocols fill the backbone's exp(logit_scale)")
    # the released recipe: AdamW, 100 epochs, 5 linear warm-up epochs from 1e-5 then cosine,
    # stepped once per epoch (Dassl), early stopping after 10
    epochs: int = 100
    lr: float = 5e-4
    weight_decay: float = 5e-4
    warmup_epochs: float = 5.0
    lr_step: str = "epoch"
    patience: int | None = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ratio <= 1.0:
            raise ClipAdaptError(f"ratio={self.ratio}: expected a value in [0, 1]")
        if not 0.0 <= self.dropout < 1.0:
            raise ClipAdaptError(f"dropout={self.dropout}: expected a value in [0, 1)")
        for key in ("heads", "hidden"):
            if getattr(self, key) < 1:
                raise ClipAdaptError(f"{key}={getattr(self, key)}: expected a positive integer")


class MHAdapterTrunk(nn.Module):
    """Patch tokens [B, T, W] -> g [B, D] (bottleneck MLP, LayerNorm, MHA, dropout, mean)."""

    def __init__(
        self, in_width: int, hidden: int, width: int, heads: int, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if width % heads:
            raise ClipAdaptError(
                f"heads={heads}: the embedding size {width} must be divisible by the head count"
            )
        self.down = nn.Linear(in_width, hidden)  # W1, b1
        self.up = nn.Linear(hidden, width)  # W2, b2
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(F.relu(self.up(F.relu(self.down(tokens.float())))))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.drop(a).mean(dim=1)


class MHAdapterHead(nn.Module):
    """(tokens [B, T, W], x [B, D] unnormalised) -> logits [B, C] = s · normalise(f) Wᵀ."""

    def __init__(self, trunk: MHAdapterTrunk, text_weights: Tensor, ratio: float, scale: float):
        super().__init__()
        self.trunk = trunk
        self.register_buffer("text_weights", text_weights.float())
        self.ratio, self.scale = ratio, scale

    def blend(self, tokens: Tensor, x: Tensor) -> Tensor:
        """f = r · g + (1 - r) · x, [B, D]."""
        return self.ratio * self.trunk(tokens) + (1.0 - self.ratio) * x.float()

    def forward(self, tokens: Tensor, x: Tensor) -> Tensor:
        return self.scale * F.normalize(self.blend(tokens, x), dim=-1) @ self.text_weights.T


def build_head(
    config: MHAdapterConfig, in_width: int, text_weights: Tensor, seed: int | None = None
) -> MHAdapterHead:
    """A fresh head; with ``seed`` its initial weights are drawn from that seed only."""
    width = text_weights.shape[1]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        trunk = MHAdapterTrunk(in_width, config.hidden, width, config.heads, config.dropout)
    return MHAdapterHead(trunk, text_weights, config.ratio, config.scale)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (the text classifier is a buffer, not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def head_forward(head: nn.Module, batch: training.Batch) -> Tensor:
    return head(batch.tokens, batch.features)


def train_head(adapter, train: FeatureSet, loss, **selection: Any) -> dict[str, Any]:
    """Train ``adapter.head`` with the shared loop (model selection by ``val=`` or
    ``evaluate=``); returns what goes in ``adapter.fitted``."""
    config = training.TrainConfig.from_config(
        adapter.config, device=adapter.device, desc=adapter.name
    )
    result = training.train(
        adapter.head, train, config, forward=head_forward, loss_fn=loss, **selection
    )
    return {
        "epoch": result.best_epoch,
        "val_accuracy": result.best_score,
        "parameters": count_parameters(adapter.head),
    }


def inverse_frequency(labels: Tensor, num_classes: int) -> Tensor:
    """[C] weights N / (C · n_c) (1 for a class without samples), labels [N] in 0..C-1."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = len(labels) / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.ones_like(weights))


def require_tokens(data: FeatureSet | Tensor | None, what: str, name: str) -> FeatureSet:
    if not isinstance(data, FeatureSet) or data.tokens is None:
        raise ClipAdaptError(
            f"{name}: the {what} features carry no patch tokens; extract them with "
            "tokens_layer=-2 (method.extract_options(...) says what to extract)"
        )
    return data


def token_batches(data: FeatureSet, batch_size: int, device) -> Iterator[tuple[Tensor, Tensor]]:
    """(tokens [b, T, W], x [b, D]) of the eval-transform features, in order."""
    for start in range(0, len(data), batch_size):
        stop = start + batch_size
        yield (
            data.tokens[start:stop].to(device),
            data.features[start:stop].to(device, torch.float32),
        )


@register
class MHAdapter(Method):
    name = "mh-adapter"
    Config = MHAdapterConfig
    default_views = 4  # cached random-resized-crop + flip views (embedding + patch tokens)

    def extract_options(self, train: bool) -> dict[str, Any]:
        options: dict[str, Any] = {"tokens_layer": self.config.tokens_layer}
        if train:
            options.update(views=self.default_views, view_tokens=True)
        return options

    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None):
        c = self.config
        train = require_tokens(train, "train", self.name)
        if val is not None:
            val = require_tokens(val, "validation", self.name)
        if train.features.shape[1] != text_weights.shape[1]:
            raise ClipAdaptError(
                f"{self.name}: image embeddings have size {train.features.shape[1]} but the "
                f"text classifier {text_weights.shape[1]} (expected the same backbone)"
            )
        self.head = build_head(c, train.tokens.shape[-1], text_weights.detach().cpu(), c.seed)
        self.head.to(self.device)
        weight = None
        if c.class_weights:
            weight = inverse_frequency(train.labels, text_weights.shape[0]).to(self.device)

        def loss(logits: Tensor, labels: Tensor) -> Tensor:
            return F.cross_entropy(logits, labels, weight=weight)

        self.fitted = train_head(self, train, loss, val=val)
        return self

    @torch.no_grad()
    def logits(self, features: FeatureSet, batch_size: int = 256) -> Tensor:
        """A FeatureSet with ``tokens`` [N, T, W] and features [N, D] -> [N, C]."""
        if not hasattr(self, "head"):
            raise ClipAdaptError(f"{self.name}: call fit(...) or load_adapter(...) first")
        features = require_tokens(features, "given", self.name)
        self.head.eval()
        out = [self.head(t, x) for t, x in token_batches(features, batch_size, self.device)]
        return torch.cat(out) if out else torch.zeros(0, self.head.text_weights.shape[0])

    def state_tensors(self) -> dict[str, Tensor]:
        return dict(self.head.state_dict())

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        in_width = tensors["trunk.down.weight"].shape[1]
        self.head = build_head(self.config, in_width, tensors["text_weights"]).to(self.device)
        self.head.load_state_dict(tensors)
        self.head.eval()


@register
class MultiTaskMHAdapter(MHAdapter):
    """One MH-Adapter trunk shared by T tasks, each with its own text classifier.

    fit(train, text_weights, val): ``train.labels`` [N, T] with -1 where an image has no label
    for a task; ``text_weights`` a list of T [C_t, D] classifiers. Because f does not depend on
    the task, the head is an MHAdapterHead over the stacked classifiers [ΣC_t, D]; task t's
    logits are its column block. Loss: the sum over tasks of each task's mean cross-entropy on
    its labelled images. Model selection: mean validation accuracy over tasks.
    """

    name = "mh-adapter-mt"
    multi_task = True  # beyond the paper: no reference recipe of its own

    def selection(self) -> str:
        return "val"

    def _blocks(self) -> list[slice]:
        edges = [0, *itertools.accumulate(self.sizes)]
        return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def fit(self, train: FeatureSet, text_weights: list[Tensor], val: FeatureSet | None = None):
        c = self.config
        train = require_tokens(train, "train", self.name)
        if train.labels.ndim != 2 or train.labels.shape[1] != len(text_weights):
            raise ClipAdaptError(
                f"{self.name}: expected labels [N, {len(text_weights)}] (one column per task), "
                f"got {tuple(train.labels.shape)}"
            )
        self.sizes = [w.shape[0] for w in text_weights]
        stacked = torch.cat([w.detach().cpu() for w in text_weights])
        self.head = build_head(c, train.tokens.shape[-1], stacked, c.seed).to(self.device)
        blocks = self._blocks()
        weights = [None] * len(blocks)
        if c.class_weights:
            weights = [
                inverse_frequency(train.labels[:, t][train.labels[:, t] >= 0], n).to(self.device)
                for t, n in enumerate(self.sizes)
            ]

        def loss(logits: Tensor, labels: Tensor) -> Tensor:
            total = logits.new_zeros(())
            for t, block in enumerate(blocks):
                mask = labels[:, t] >= 0
                if mask.any():
                    total = total + F.cross_entropy(
                        logits[mask, block], labels[mask, t], weight=weights[t]
                    )
            return total

        evaluate = None
        if val is not None:
            val = require_tokens(val, "validation", self.name)

            def evaluate(_: nn.Module) -> float:
                return sum(self.accuracies(val)) / len(blocks)

        self.fitted = train_head(self, train, loss, evaluate=evaluate)
        return self

    @torch.no_grad()
    def logits(self, features: FeatureSet, batch_size: int = 256) -> list[Tensor]:
        """A FeatureSet with tokens -> one [N, C_t] logits tensor per task."""
        features = require_tokens(features, "given", self.name)
        was_training = self.head.training
        self.head.eval()
        out = torch.cat(
            [self.head(t, x) for t, x in token_batches(features, batch_size, self.device)]
        )
        self.head.train(was_training)
        return [out[:, block] for block in self._blocks()]

    def novel_logits(self, features: FeatureSet, weights: Tensor) -> Tensor:
        raise ClipAdaptError(f"{self.name}: a multi-task method has no single class set")

    def state_tensors(self) -> dict[str, Tensor]:
        return {**self.head.state_dict(), "task_sizes": torch.tensor(self.sizes)}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        self.sizes = [int(n) for n in tensors.pop("task_sizes")]
        super().load_state_tensors(tensors)

    def accuracies(self, data: FeatureSet) -> list[float]:
        """Per task, top-1 accuracy in [0, 1] over the rows labelled for it (labels [N, T])."""
        scores = []
        for t, logits in enumerate(self.logits(data)):
            labels = data.labels[:, t].to(logits.device)
            mask = labels >= 0
            hits = (logits[mask].argmax(-1) == labels[mask]).float()
            scores.append(float(hits.mean()) if mask.any() else 0.0)
        return scores
