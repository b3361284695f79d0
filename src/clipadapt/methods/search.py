"""Grid searches over cached affinities, chunked over validation rows under a memory budget.

The training-free heads (Tip-Adapter and its successors) choose hyper-parameters by accuracy on
the validation set over a grid: an outer sharpness β of a kernel exp(-β (1 - A)) on the
affinities A = f keysᵀ, and an inner weight α of a scaled add, logits = base + α · extra(β).
Written plainly, each grid point recomputes everything; here

- A and the base logits are computed once per chunk of rows and reused for every β;
- the kernel exp(-β (1 - A)) once per β, and the head's ``extra`` (Tip-Adapter: a class sum of
  the kernel) once per β;
- each α is a scaled add on the fixed logits, and only the label's logit and the best other
  logit are compared (a tie goes to the first maximiser, as argmax breaks it).

Every floating-point value compared is computed by the same operations as the plain
formulation, so the correct-count at every grid point, hence the optimum, is identical bit for
bit. Rows are processed in chunks whose working memory stays under ``budget`` bytes (default
1 GiB) whatever the number of rows N and keys M; chunks hold at least ``MIN_CHUNK_ROWS`` rows
(BLAS rounds products of 1-3 rows differently from the same rows inside a larger product).

The optimum follows the reference's rule (gaopengcuhk/Tip-Adapter utils.py, search_hp): β
outer, α inner, a point replaces the best only with a strictly higher accuracy, and the best
starts at accuracy 0, so when no point classifies any row correctly the reference's initial
(β, α) = (0, 0) is returned (``first_maximiser`` gives None).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clipadapt.errors import ClipAdaptError

DEFAULT_BUDGET = 1 << 30  # bytes of working memory for a search, beyond its inputs
MIN_CHUNK_ROWS = 32
_FLOAT_BYTES = 4


def search_bytes_per_row(num_keys: int, num_classes: int, num_alphas: int) -> int:
    """Working bytes one validation row costs in ``affinity_grid_counts``: 1 - A and the kernel
    ([M] each), base, extra, their masked and mixed copies and temporaries ([C] each, counted
    ten times), the α sweep ([A] each)."""
    return _FLOAT_BYTES * (2 * num_keys + 10 * num_classes + 4 * num_alphas)


def usable_bytes(budget: int) -> int:
    """The part of a budget the per-row working arrays may take."""
    return budget * 3 // 4


def row_chunks(num_rows: int, bytes_per_row: int, budget: int = DEFAULT_BUDGET) -> list[slice]:
    """Equal consecutive slices of ``range(num_rows)`` whose rows fit in ``budget`` bytes.

    A quarter of the budget is left to what is not counted per row (BLAS packing buffers, the
    allocator): the largest chunk holds at most (3/4 budget) // bytes_per_row rows. Slices differ
    in size by at most one, so the last is not a sliver. Raises when ``MIN_CHUNK_ROWS`` rows do
    not fit (the budget needed is in the message)."""
    if num_rows <= 0:
        return []
    fit = usable_bytes(budget) // max(bytes_per_row, 1)
    need = min(num_rows, MIN_CHUNK_ROWS)
    if fit < need:
        raise ClipAdaptError(
            f"search memory budget {budget} bytes: expected at least "
            f"{-(-need * bytes_per_row * 4 // 3)} ({need} rows of {bytes_per_row} bytes, "
            "and a quarter for buffers)"
        )
    count = math.ceil(num_rows / fit)
    size, extra = divmod(num_rows, count)
    bounds, start = [], 0
    for k in range(count):
        stop = start + size + (k < extra)
        bounds.append(slice(start, stop))
        start = stop
    return bounds


def scaled_add_correct(base: Tensor, extra: Tensor, labels: Tensor, alphas: Tensor) -> Tensor:
    """[A] int64: for each α in ``alphas`` (float tensor [A]), the number of rows whose first
    argmax of ``extra * α + base`` ([N, C], in that order of operations) is the label [N].

    Only the label's logit and the best other logit are formed per α; a row where they tie is
    settled by the first maximiser of its full row, as argmax settles it."""
    labels = labels.long()[:, None]
    alpha_col = alphas.to(extra.dtype)[:, None]
    label_logit = torch.mul(extra.gather(1, labels).T, alpha_col).add_(base.gather(1, labels).T)
    base_others = base.scatter(1, labels, float("-inf"))  # the label column masked out
    mixed = torch.empty_like(base)
    others = torch.empty_like(label_logit)
    for j in range(len(alphas)):
        torch.mul(extra, alpha_col[j], out=mixed).add_(base_others)
        torch.amax(mixed, dim=1, out=others[j])
    hits = label_logit > others
    tied = label_logit == others
    for j in tied.any(dim=1).nonzero().flatten().tolist():  # one α at a time: memory [n, C]
        n = tied[j].nonzero().flatten()
        rows = torch.mul(extra[n], alpha_col[j]).add_(base[n])
        hits[j, n] = rows.argmax(dim=1) == labels[n, 0]
    return hits.sum(dim=1)


def first_maximiser(counts: Tensor) -> tuple[int, int] | None:
    """(i, j) of the first strict maximum of ``counts`` [B, A] in the order i outer, j inner:
    the reference's `if acc > best_acc` from best_acc = 0. None when every count is 0 (the
    reference then keeps its initial β = α = 0)."""
    if counts.numel() == 0 or int(counts.max()) <= 0:
        return None
    flat = int(counts.flatten().argmax())  # argmax returns the first maximal index
    return divmod(flat, counts.shape[1])


@torch.no_grad()
def affinity_grid_counts(
    feats: Tensor,
    labels: Tensor,
    keys: Tensor,
    base: Callable[[Tensor], Tensor],
    extra: Callable[[Tensor, int], Tensor],
    betas: Sequence[float],
    alphas: Sequence[float],
    *,
    num_classes: int,
    budget: int = DEFAULT_BUDGET,
    progress: bool | None = None,
) -> Tensor:
    """[len(betas), len(alphas)] int64 correct-counts of logits = extra(kernel, i) * α + base(f)
    where kernel = exp(-β_i (1 - f keysᵀ)), on (feats [N, D], labels [N]).

    ``base(f_chunk)`` -> [n, C] and ``extra(kernel_chunk [n, M], i)`` -> [n, C] are the head's
    two terms (Tip-Adapter: s · f Wᵀ and the class sum of the kernel). The kernel is computed as
    ``(1 - f keysᵀ) * -β`` then exp, as ``torch.exp(-beta * (1.0 - f @ keys.T))`` computes it.
    Rows go in chunks under ``budget`` bytes (``row_chunks``); the counts add up."""
    n, m = feats.shape[0], keys.shape[0]
    alpha_t = torch.tensor(list(alphas), dtype=feats.dtype, device=feats.device)
    per_row = search_bytes_per_row(m, num_classes, len(alphas))
    chunks = row_chunks(n, per_row, budget)
    counts = torch.zeros(len(betas), len(alphas), dtype=torch.long)
    labels = labels.to(feats.device).long()
    bar = tqdm(
        total=len(chunks) * len(betas),
        desc="search",
        leave=False,
        disable=(not progress) if progress is not None else None,
    )
    with bar:
        for rows in chunks:
            f = feats[rows]
            base_logits = base(f)
            one_minus_affinity = (f @ keys.T).neg_().add_(1.0)  # 1 - A, bit for bit
            kernel = torch.empty_like(one_minus_affinity)
            for i, beta in enumerate(betas):
                torch.mul(one_minus_affinity, -beta, out=kernel).exp_()
                counts[i] += scaled_add_correct(
                    base_logits, extra(kernel, i), labels[rows], alpha_t
                ).cpu()
                bar.update()
            del one_minus_affinity, kernel
    return counts
