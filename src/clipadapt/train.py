"""The one training loop every trainable method uses, on cached tensors.

The backbone never runs here: each epoch draws, per sample, one of the V augmented views that
were extracted once (``FeatureSet.views`` [V, N, D]), falling back to the eval-transform
features when there are none. Learning rate: linear warm-up then cosine to zero, per iteration
(``lr_step="epoch"``: Dassl's per-epoch schedule, ``dassl_lr``; ``schedule="constant"``: none).
After every epoch ``evaluate`` scores the module (validation accuracy by default); the best
state is kept and restored at the end, and training stops early after ``patience`` epochs
without improvement. With ``score_initial`` the untrained module is a candidate too (epoch 0),
for methods whose initial state is already a model (Tip-Adapter-F starts as Tip-Adapter).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.hparams import TrainHParams


@dataclass
class TrainConfig(TrainHParams):
    """What ``train`` runs with: the training hyper-parameters (clipadapt.hparams) of a method's
    Config, plus where and how it reports."""

    epochs: int = 20
    device: str | torch.device = "cpu"
    progress: bool | None = None  # tqdm bar; None: only on a terminal
    desc: str = "train"

    @classmethod
    def from_config(cls, method_config, **overrides) -> TrainConfig:
        """The fields of a method's Config that share a name with TrainConfig, plus overrides."""
        names = {f.name for f in fields(cls)}
        values = {k: getattr(method_config, k) for k in names if hasattr(method_config, k)}
        return cls(**{**values, **overrides})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs is None:
            raise ClipAdaptError("epochs=None: expected a positive integer")


_fit_threads: int | None = None


def set_fit_threads(n: int | None) -> None:
    """torch's intra-op CPU threads while a method fits (``fit_threads``), process-wide;
    None: torch's own. Set by `--fit-threads`. The heads train on cached tensors of a few
    hundred numbers per sample: on a small machine one thread fits as fast as two, at half
    the CPU time."""
    global _fit_threads
    if n is not None and n < 1:
        raise ClipAdaptError(f"--fit-threads {n}: expected a positive number of threads")
    _fit_threads = n


@contextlib.contextmanager
def fit_threads():
    """Inside: torch uses the threads ``set_fit_threads`` chose (unchanged if none); restored
    after."""
    if _fit_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(_fit_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Batch:
    """One mini-batch: ``features`` [B, D] (a random view per sample), ``labels`` [B],
    ``index`` [B] (rows of the FeatureSet), ``tokens`` [B, P, W] when the set has them."""

    features: Tensor
    labels: Tensor
    index: Tensor
    tokens: Tensor | None = None


@dataclass
class TrainResult:
    best_epoch: int  # 1-based (0: the initial state); the last epoch when there is no validation
    best_score: float | None
    history: list[dict] = field(default_factory=list)


class BatchProvider:
    """Shuffled mini-batches over a FeatureSet; each epoch draws one view per sample."""

    def __init__(
        self,
        data: FeatureSet,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device,
        use_views: bool = True,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.generator = generator
        self.device = device
        self.views = data.views if use_views and data.views is not None else None
        # patch tokens of the same augmented views, when they were cached (mh-adapter)
        self.view_tokens = data.view_tokens if self.views is not None else None

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def epoch(self) -> Iterator[Batch]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator)
        view = None
        if self.views is not None:
            view = torch.randint(self.views.shape[0], (n,), generator=self.generator)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            if view is None:
                feats = self.data.features[index]
            else:
                feats = self.views[view[index], index]
            if self.view_tokens is not None:
                tokens = self.view_tokens[view[index], index]
            elif self.data.tokens is not None:
                tokens = self.data.tokens[index]
            else:
                tokens = None
            yield Batch(
                features=feats.to(self.device, torch.float32),
                labels=self.data.labels[index].to(self.device),
                index=index,
                tokens=None if tokens is None else tokens.to(self.device),
            )


def default_forward(module: nn.Module, batch: Batch) -> Tensor:
    return module(batch.features)


def batches_in_order(data: FeatureSet, batch_size: int, device: torch.device) -> Iterator[Batch]:
    """Eval-transform features in order (no views, no shuffling)."""
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        yield Batch(
            features=data.features[index].to(device, torch.float32),
            labels=data.labels[index].to(device),
            index=index,
            tokens=None if data.tokens is None else data.tokens[index].to(device),
        )


@torch.no_grad()
def accuracy_on(
    module: nn.Module,
    data: FeatureSet,
    forward: Callable[[nn.Module, Batch], Tensor] = default_forward,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy in [0, 1] of ``forward`` on the eval-transform features of ``data``."""
    was_training = module.training
    module.eval()
    correct = 0
    for batch in batches_in_order(data, batch_size, torch.device(device)):
        correct += int((forward(module, batch).argmax(-1) == batch.labels).sum())
    module.train(was_training)
    return correct / max(1, len(data))


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr before iteration ``step`` (0-based): linear warm-up over
    ``warmup`` iterations, then a cosine from 1 to 0 over the remaining ones."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def dassl_lr(epoch: int, base_lr: float, max_epoch: int, warmup: int, kind: str, low: float):
    """The lr of epoch ``epoch`` (0-based) under Dassl's cosine scheduler stepped once per epoch
    (Dassl.pytorch dassl/optim/lr_scheduler.py, as patched in CLIP-MHAdapter
    patches/lr_scheduler.py:26-165, WARMUP_RECOUNT True). With ``warmup`` > 0 epochs:
    "constant" gives ``low`` for epochs < warmup; "linear" gives ``low`` at epoch 0 and
    base_lr · e / warmup for 0 < e < warmup. Then cosine restarted at the warm-up's end but
    with the full period: base_lr · (1 + cos(π (e - warmup) / max_epoch)) / 2."""
    if epoch < warmup:
        if kind == "constant" or epoch == 0:
            return low
        return base_lr * epoch / warmup
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch - warmup) / max_epoch))


def _scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    """A LambdaLR stepped every iteration; per-epoch schedules hold their value for an epoch."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if config.lr_step == "epoch":
        warmup = round(config.warmup_epochs)

        def factor(step: int) -> float:
            epoch = min(step // steps_per_epoch, config.epochs - 1)
            lr = dassl_lr(
                epoch, config.lr, config.epochs, warmup, config.warmup_type, config.warmup_lr
            )
            return lr / config.lr

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


def train(
    module: nn.Module,
    data: FeatureSet,
    config: TrainConfig,
    *,
    val: FeatureSet | None = None,
    forward: Callable[[nn.Module, Batch], Tensor] = default_forward,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    evaluate: Callable[[nn.Module], float] | None = None,
    params: list[nn.Parameter] | None = None,
    score_initial: bool = False,
) -> TrainResult:
    """Train ``module`` in place and leave it in its best state (by ``evaluate``, higher is
    better; default: accuracy of ``forward`` on ``val``). Returns the epoch and score chosen.

    forward(module, batch) -> logits [B, C]; loss_fn(logits, labels) -> scalar.
    score_initial: score the module before training too; if no epoch beats it, it is kept
    unchanged (best_epoch 0).
    Deterministic for a given ``config.seed`` (no global RNG is touched outside this call).
    """
    device = torch.device(config.device)
    module.to(device)
    params = [p for p in (params or module.parameters()) if p.requires_grad]
    if not params:
        raise ClipAdaptError("train: the module has no trainable parameters")
    if len(data) == 0:
        raise ClipAdaptError("train: the training set is empty")
    if evaluate is None and val is not None:

        def evaluate(m: nn.Module) -> float:
            return accuracy_on(m, val, forward, device=device)

    generator = torch.Generator().manual_seed(config.seed)
    provider = BatchProvider(data, config.batch_size, generator, device, config.use_views)
    optimizer = make_optimizer(params, config)
    scheduler = _scheduler(optimizer, config, len(provider))

    result = TrainResult(best_epoch=config.epochs, best_score=None)
    best_state = None
    bar = tqdm(
        range(1, config.epochs + 1),
        desc=config.desc,
        disable=(not config.progress) if config.progress is not None else None,
        leave=False,
    )
    if score_initial and evaluate is not None:
        result.best_score, result.best_epoch = float(evaluate(module)), 0
        best_state = copy.deepcopy(module.state_dict())
        result.history.append({"epoch": 0, "val": result.best_score})
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)  # dropout and the like, without leaking global state
        for epoch in bar:
            module.train()
            loss_sum, seen = 0.0, 0
            for batch in provider.epoch():
                loss = loss_fn(forward(module, batch), batch.labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach()) * len(batch.labels)
                seen += len(batch.labels)
            record = {"epoch": epoch, "loss": loss_sum / seen, "lr": scheduler.get_last_lr()[0]}
            if evaluate is not None:
                score = float(evaluate(module))
                record["val"] = score
                if result.best_score is None or score > result.best_score:
                    result.best_score, result.best_epoch = score, epoch
                    best_state = copy.deepcopy(module.state_dict())
            result.history.append(record)
            bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
            if (
                config.patience is not None
                and result.best_score is not None
                and epoch - result.best_epoch >= config.patience
            ):
                break
    if best_state is not None:
        module.load_state_dict(best_state)
    elif evaluate is None:
        result.best_epoch = len(result.history)
    module.eval()
    return result
