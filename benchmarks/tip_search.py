"""Tip-Adapter (β, α) search: ``search_hparams`` against the authors' per-point loop.

The baseline is the reference's search (gaopengcuhk/Tip-Adapter utils.py, search_hp) written
out here: for every β of the 200 and every α of the 20, affinity = f @ keysᵀ, cache logits =
exp(-(β - β·affinity)) @ values, clip logits = 100 · f @ W, logits = clip + cache · α, top-1
accuracy, and a point replaces the best only with a strictly higher accuracy, from 0. It runs
in float32 here (the reference runs in CLIP's dtype, fp16 on GPU).

Inputs are Caltech101-sized (1,600 keys = 100 classes × 16 shots, 1,649 validation features,
D = 512), from a synthetic task: class prototypes plus noise, text weights a perturbed copy.
Every reference grid point does the same work, so by default the reference runs on every
10th β (20 × 20 = 400 points, a minute on one thread) and its time is scaled to the 4,000
points; the optimum and correct-counts are compared on those points. ``--full`` runs all 4,000
reference points (about 8 minutes on one thread) and compares the full optimum. Both run in
this process, on the same tensors, with the thread count printed.

    python benchmarks/tip_search.py [--threads 1] [--full] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from clipadapt.methods.tip_adapter import grid_correct_counts, search_grid, search_hparams


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


def reference_search(features, labels, cache_keys, cache_values, clip_weights, betas, alphas):
    """The authors' loop, point by point (cache_keys [D, M], clip_weights [D, C], as theirs).
    Returns ((best_beta, best_alpha, best_acc %), {(i, j): correct count})."""
    best_acc, best_beta, best_alpha = 0, 0, 0
    counts = {}
    for i, beta in betas:
        for j, alpha in alphas:
            affinity = features @ cache_keys
            cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
            clip_logits = 100.0 * features @ clip_weights
            tip_logits = clip_logits + cache_logits * alpha
            pred = tip_logits.topk(1, 1, True, True)[1].t()
            correct = float(pred.eq(labels.view(1, -1)).float().sum())
            acc = 100 * correct / labels.shape[0]
            counts[i, j] = int(correct)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return (best_beta, best_alpha, best_acc), counts


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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--beta-stride", type=int, default=10, help="reference on every k-th beta")
    p.add_argument("--full", action="store_true", help="reference on all 4,000 points")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = (200, 20)
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
        f"D={args.dim}, grid {steps[0]}x{steps[1]}, device={args.device}, "
        f"threads={torch.get_num_threads()}; zero-shot val acc {zero_shot:.4f}"
    )

    t0 = time.perf_counter()
    fast = search_hparams(
        feats, labels, keys, values, text, args.beta_max, args.alpha_max, steps, progress=False
    )
    t_fast = time.perf_counter() - t0
    print(f"clipadapt search_hparams, full grid: {t_fast:8.2f} s  optimum {fast}")

    betas, alphas = search_grid(args.beta_max, args.alpha_max, steps)
    stride = 1 if args.full else args.beta_stride
    ref_betas = list(enumerate(betas))[::stride]
    t0 = time.perf_counter()
    (rb, ra, racc), ref_counts = reference_search(
        feats, labels, keys.T, values, text.T, ref_betas, list(enumerate(alphas))
    )
    t_ref = time.perf_counter() - t0
    points = len(ref_counts)
    t_ref_full = t_ref * (steps[0] * steps[1]) / points
    ours = grid_correct_counts(feats, labels, keys, values, text, betas, alphas)
    same_counts = sum(int(ours[i, j]) == c for (i, j), c in ref_counts.items())
    print(
        f"reference per-point loop: {t_ref:8.2f} s for {points} points "
        f"({1e3 * t_ref / points:.1f} ms/point) -> {t_ref_full:.1f} s for the full grid"
        + ("" if args.full else " (scaled)")
    )
    sub = ours[[i for i, _ in ref_betas]]
    bi, bj = divmod(int(sub.flatten().argmax()), len(alphas))
    sub_opt = (ref_betas[bi][1], alphas[bj], 100 * int(sub[bi, bj]) / len(labels))
    print(f"reference optimum: beta={rb} alpha={ra} acc={racc:.4f}%")
    what = "full grid" if args.full else f"the {points} reference points"
    print(
        f"clipadapt optimum on {what}: beta={sub_opt[0]} alpha={sub_opt[1]} "
        f"acc={sub_opt[2]:.4f}%  same optimum: {(rb, ra) == sub_opt[:2]}; "
        f"identical correct-counts at {same_counts} of {points} points"
    )
    print(
        f"ratio (reference / clipadapt), full 200x20 grid: {t_ref_full / t_fast:.0f}x (goal >= 100)"
    )


if __name__ == "__main__":
    main()
