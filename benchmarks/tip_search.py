"""Tip-Adapter (β, α) search: ``search_hparams`` against the naive 200 × 20 loop.

Caltech101-sized inputs (1,600 keys = 100 classes × 16 shots, 1,649 validation features,
D = 512) from a synthetic task: class prototypes plus noise, with text weights a perturbed copy
of the prototypes. Both searches run in this process on the same tensors; the script prints
both optima, the times and their ratio, and whether the correct-counts agree at every point.

    python benchmarks/tip_search.py [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from clipadapt.methods.tip_adapter import grid_correct_counts, search_hparams, tip_logits


def synthetic_task(classes, shots, n_val, dim, noise, text_noise, seed, device):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)

    def sample(labels):
        eps = F.normalize(torch.randn(len(labels), dim, generator=g), dim=-1)
        return F.normalize(protos[labels] + noise * eps, dim=-1)

    key_labels = torch.arange(classes).repeat_interleave(shots)
    keys = sample(key_labels)
    values = F.one_hot(key_labels, classes).float()
    text = F.normalize(
        protos + text_noise * F.normalize(torch.randn(classes, dim, generator=g), dim=-1), dim=-1
    )
    val_labels = torch.randint(classes, (n_val,), generator=g)
    feats = sample(val_labels)
    return [t.to(device) for t in (feats, val_labels, keys, values, text)]


def naive_search(feats, labels, keys, values, text, beta_max, alpha_max, steps, scale):
    """The published loop: every (β, α) recomputes the full Tip-Adapter logits."""
    best, counts = (-1, None, None), []
    for i in tqdm(range(steps[0]), desc="naive", leave=False):
        beta = 0.1 + i * (beta_max - 0.1) / steps[0]
        for j in range(steps[1]):
            alpha = 0.1 + j * (alpha_max - 0.1) / steps[1]
            logits = tip_logits(feats, keys, values, text, alpha, beta, scale)
            correct = int((logits.argmax(dim=1) == labels).sum())
            counts.append(correct)
            if correct > best[0]:
                best = (correct, beta, alpha)
    return (best[1], best[2], best[0] / len(labels)), counts


def optimum(result) -> str:
    beta, alpha, acc = result
    return f"beta={beta:.4f} alpha={alpha:.4f} acc={acc:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--val", type=int, default=1649)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--noise", type=float, default=3.0)
    p.add_argument("--text-noise", type=float, default=3.0)
    p.add_argument("--beta-max", type=float, default=12.0)  # Caltech101's published range
    p.add_argument("--alpha-max", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, scale = (200, 20), 100.0
    feats, labels, keys, values, text = synthetic_task(
        args.classes,
        args.shots,
        args.val,
        args.dim,
        args.noise,
        args.text_noise,
        args.seed,
        args.device,
    )
    zero_shot = float(((feats @ text.T).argmax(1) == labels).float().mean())
    print(
        f"inputs: {len(keys)} keys, {len(feats)} val features, {args.classes} classes, "
        f"D={args.dim}, device={args.device}, threads={torch.get_num_threads()}; "
        f"zero-shot val acc {zero_shot:.4f}"
    )

    t0 = time.perf_counter()
    fast = search_hparams(
        feats, labels, keys, values, text, args.beta_max, args.alpha_max, steps, scale
    )
    t_fast = time.perf_counter() - t0
    print(f"search_hparams: {t_fast:8.2f} s  optimum {optimum(fast)}")

    t0 = time.perf_counter()
    naive, naive_counts = naive_search(
        feats, labels, keys, values, text, args.beta_max, args.alpha_max, steps, scale
    )
    t_naive = time.perf_counter() - t0
    print(f"naive loop:     {t_naive:8.2f} s  optimum {optimum(naive)}")

    betas = [0.1 + i * (args.beta_max - 0.1) / steps[0] for i in range(steps[0])]
    alphas = [0.1 + j * (args.alpha_max - 0.1) / steps[1] for j in range(steps[1])]
    counts = grid_correct_counts(feats, labels, keys, values, text, betas, alphas, scale)
    same_counts = counts.flatten().tolist() == naive_counts
    print(
        f"speed-up: {t_naive / t_fast:.1f}x   same optimum: {fast == naive}   "
        f"identical correct-counts at all {len(naive_counts)} points: {same_counts}"
    )


if __name__ == "__main__":
    main()
