"""Multi-Modal Adapter (Seputis, Mihailov, Chatterjee, Xiao 2024): attention over text and image.

Both encoders stay frozen. For each image b the L2-normalised embeddings form a sequence of
C + 1 tokens, the class texts first and the image last, [t_1, ..., t_C, v_b]. One adapter,
shared by every token (no internal residual):

    Down(x) = (x W_d1 + b_d1) W_d2 + b_d2              D -> 32 -> 128, no activation
    o       = MultiHeadAttention(Down(sequence))        width 128, 4 heads, pattern below
    Up(o)   = GELU(o W_u1 + b_u1) W_u2 + b_u2           128 -> 32 -> GELU -> D
    v'_b    = normalise((1 - λ) v_b + λ normalise(Up(o)_image))
    t'_cb   = normalise((1 - λ) t_c + λ normalise(Up(o)_text c))
    logits[b, c] = s ⟨v'_b, t'_cb⟩                      λ = 0.2

Attention pattern (``mask``): "bias" (the released code's default) adds +1 to the scaled scores
of text→image and image→text pairs; "hard" allows only text→image and image→text. 107,712
trainable parameters at D = 512. Training: Adam lr 5e-3, weight decay 1e-4, batch 256, up to
200 epochs, early stopping on validation accuracy (patience 20), no augmentation, a constant
learning rate: the authors' runs (their scheduler call is commented out).

The adapter is class-agnostic: ``logits(features, text_weights=...)`` classifies against any
class set, which is what the base-to-novel protocol evaluates.

Batched computation, never one sequence per image. The text tokens are the same for every
image, so per attention head (head width e = d / H, scores scaled by 1/√e plus the pattern's
bias):
- text queries: each text c attends to the C texts (scores S [C, C], shared by the batch) and
  to its own image's token (one score a_bc). With L_c = logsumexp_c' S_cc' and
  Ō_c = softmax(S_c) · V_text, the softmax over the C + 1 keys is exactly
      o_bc = σ(L_c - a_bc) · Ō_c + σ(a_bc - L_c) · V_image_b;
- the image query attends to the C texts and itself: a softmax over C + 1 scores per image.
The text side of the logits is never built as a [B, C, D] tensor either: with
h_bc = [GELU(o_bc W_u1 + b_u1), 1] and U = [W_u2; b_u2] ((32 + 1) x D), Up(o)_bc = h_bc U, so
⟨x, Up(o)_bc⟩ = h_bc · (U xᵀ) and ‖Up(o)_bc‖² = h_bc (U Uᵀ) h_bcᵀ, and for unit vectors a, u
‖(1 - λ) a + λ u‖² = (1 - λ)² + λ² + 2 λ (1 - λ) ⟨a, u⟩.
Memory per batch: O(B·C·d + H·C² + B·D) (the [B, C, d] attention outputs, B·C·H gate scalars,
the shared C x C scores per head, the image-side vectors); nothing of size B·C·D or B·C²·d.
At λ = 0 every blend is the identity (t'_cb = t_c, v'_b = v_b bit for bit), so the logits are
exactly zero-shot CLIP's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt import train as training
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet, as_features
from clipadapt.hparams import TrainHParams, hp
from clipadapt.methods import register
from clipadapt.methods.base import Method

# Additive score bias per (query, key) kind; -inf = not allowed.
MASKS: dict[str, dict[str, float]] = {
    "bias": {"text_text": 0.0, "text_image": 1.0, "image_text": 1.0, "image_image": 0.0},
    "hard": {
        "text_text": -math.inf,
        "text_image": 0.0,
        "image_text": 0.0,
        "image_image": -math.inf,
    },
}


@dataclass
class MMAdapterConfig(TrainHParams):
    blend: float = hp(0.2, "λ: weight of the adapter's output in the blend")
    mask: str = hp("bias", "attention pattern: bias (+1 on text<->image) or hard")
    hidden: int = hp(32, "down/up projection bottleneck")
    width: int = hp(128, "attention width d")
    heads: int = hp(4, "attention heads")
    scale: float = hp(100.0, "logit scale s; the protocols fill the backbone's exp(logit_scale)")
    # the released runs: Adam, 200 epochs, early stopping after 20, no augmentation, and a
    # constant lr (the scheduler call is commented out, mm_adapter/pipelines/train.py:208)
    epochs: int = 200
    optimizer: str = "adam"
    lr: float = 5e-3
    weight_decay: float = 1e-4
    schedule: str = "constant"
    patience: int | None = 20
    use_views: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.blend <= 1.0:
            raise ClipAdaptError(f"blend={self.blend}: expected a value in [0, 1]")
        if self.mask not in MASKS:
            raise ClipAdaptError(f"mask={self.mask!r}: expected one of {', '.join(MASKS)}")
        for key in ("hidden", "width", "heads"):
            if getattr(self, key) < 1:
                raise ClipAdaptError(f"{key}={getattr(self, key)}: expected a positive integer")
        if self.width % self.heads:
            raise ClipAdaptError(
                f"width={self.width}, heads={self.heads}: expected width divisible by heads"
            )


def unit_blend_norm(lam: float, cos: Tensor) -> Tensor:
    """‖(1 - λ) a + λ u‖ for unit vectors a, u with ⟨a, u⟩ = ``cos`` (any shape)."""
    return ((1 - lam) ** 2 + lam**2 + 2 * lam * (1 - lam) * cos).clamp_min(1e-24).sqrt()


def check_unit_rows(text_weights: Tensor, what: str = "text_weights") -> None:
    """The blend's closed-form norms assume L2-normalised class embeddings."""
    norms = text_weights.detach().float().norm(dim=-1)
    if text_weights.ndim != 2 or not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
        raise ClipAdaptError(f"{what}: expected a [C, D] tensor with L2-normalised rows")


class MMAdapterHead(nn.Module):
    """[B, D] unnormalised image embeddings -> [B, C] logits against ``text_weights`` [C, D]."""

    def __init__(
        self,
        text_weights: Tensor,
        hidden: int = 32,
        width: int = 128,
        heads: int = 4,
        blend: float = 0.2,
        mask: str = "bias",
        scale: float = 100.0,
    ) -> None:
        super().__init__()
        dim = text_weights.shape[1]
        self.down = nn.Sequential(nn.Linear(dim, hidden), nn.Linear(hidden, width))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.up = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.register_buffer("text_weights", text_weights.float())
        self.heads, self.blend, self.mask, self.scale = heads, blend, mask, scale

    def attend(self, zt: Tensor, zv: Tensor) -> tuple[Tensor, Tensor]:
        """Multi-head attention over every sequence [zt_1..zt_C, zv_b] at once.

        zt [C, d] text tokens (shared), zv [B, d] image tokens ->
        (text outputs [B, C, d], image outputs [B, d]), after the output projection."""
        bias, heads = MASKS[self.mask], self.heads
        w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.attn.in_proj_bias.chunk(3)

        def split(x: Tensor) -> Tensor:  # [N, d] -> [H, N, e]
            return x.unflatten(-1, (heads, -1)).transpose(0, 1)

        e = zt.shape[-1] // heads
        qt, kt, vt = (split(F.linear(zt, w, b)) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
        qv, kv, vv = (split(F.linear(zv, w, b)) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
        qt, qv = qt / math.sqrt(e), qv / math.sqrt(e)
        # Scores. text->text [H, C, C] (shared); text->own image, image->text [H, B, C];
        # image->itself [H, B, 1].
        text_image = torch.einsum("hce,hbe->hbc", qt, kv) + bias["text_image"]
        image_text = torch.einsum("hbe,hce->hbc", qv, kt) + bias["image_text"]
        image_image = (qv * kv).sum(-1, keepdim=True) + bias["image_image"]
        # Text queries: softmax over [C texts, own image] = a gate between the shared text-only
        # attention output and the image's value.
        if math.isinf(bias["text_text"]):
            out_t = vv[:, :, None, :].expand(-1, -1, zt.shape[0], -1)  # only the image is allowed
        else:
            text_text = qt @ kt.transpose(1, 2) + bias["text_text"]
            lse = text_text.logsumexp(-1)[:, None, :]  # [H, 1, C]
            shared = text_text.softmax(-1) @ vt  # Ō [H, C, e]
            to_texts = torch.sigmoid(lse - text_image)[..., None]  # [H, B, C, 1]
            to_image = torch.sigmoid(text_image - lse)[..., None]
            out_t = to_texts * shared[:, None] + to_image * vv[:, :, None, :]  # [H, B, C, e]
        # Image query: softmax over [C texts, itself].
        p = torch.cat([image_text, image_image], dim=-1).softmax(-1)  # [H, B, C + 1]
        out_v = torch.einsum("hbc,hce->hbe", p[..., :-1], vt) + p[..., -1:] * vv  # [H, B, e]
        out_t = out_t.permute(1, 2, 0, 3).flatten(2)  # [B, C, d]
        out_v = out_v.transpose(0, 1).flatten(1)  # [B, d]
        return self.attn.out_proj(out_t), self.attn.out_proj(out_v)

    def forward(self, x: Tensor, text_weights: Tensor | None = None) -> Tensor:
        """x [B, D] unnormalised; text_weights [C, D] L2-normalised rows (default: the fitted
        class set) -> logits [B, C]."""
        lam, s = self.blend, self.scale
        t = self.text_weights if text_weights is None else text_weights.float()
        v = F.normalize(x.float(), dim=-1)
        out_t, out_v = self.attend(self.down(t), self.down(v))
        # Image side: v' = normalise((1 - λ) v + λ normalise(Up(o_image))).
        u = F.normalize(self.up(out_v), dim=-1)
        v_new = ((1 - lam) * v + lam * u) / unit_blend_norm(lam, (v * u).sum(-1))[:, None]
        # Text side, through the augmented up-projection U [k + 1, D] (see the module doc).
        h = self.up[1](self.up[0](out_t))  # [B, C, k]
        h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
        last = self.up[2]
        u_mat = torch.cat([last.weight.T, last.bias[None]])  # U [k + 1, D]
        gram = torch.einsum("bck,kl,bcl->bc", h, u_mat @ u_mat.T, h)
        up_norm = gram.clamp_min(1e-24).sqrt()  # ‖Up(o)_bc‖ [B, C], floored as F.normalize
        cos_t = torch.einsum("bck,ck->bc", h, t @ u_mat.T) / up_norm  # ⟨t_c, u_bc⟩
        cos_v = torch.einsum("bck,bk->bc", h, v_new @ u_mat.T) / up_norm  # ⟨v'_b, u_bc⟩
        # ⟨v', t'⟩ = ((1 - λ) ⟨v', t⟩ + λ ⟨v', u⟩) / ‖(1 - λ) t + λ u‖
        zero_shot = (s * v_new) @ t.T
        return ((1 - lam) * zero_shot + lam * s * cos_v) / unit_blend_norm(lam, cos_t)


@register
class MMAdapter(Method):
    name = "mm-adapter"
    novel_rule = "adapted: novel texts in the attention sequence"
    Config = MMAdapterConfig

    def _head(self, text_weights: Tensor) -> MMAdapterHead:
        c = self.config
        return MMAdapterHead(text_weights, c.hidden, c.width, c.heads, c.blend, c.mask, c.scale)

    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None):
        check_unit_rows(text_weights)
        with torch.random.fork_rng(devices=[]):  # seeded init, global state untouched
            torch.manual_seed(self.config.seed)
            self.head = self._head(text_weights.detach().cpu()).to(self.device)
        config = training.TrainConfig.from_config(self.config, device=self.device, desc=self.name)
        result = training.train(self.head, train, config, val=val)
        self.fitted = {"epoch": result.best_epoch, "val_accuracy": result.best_score}
        return self

    @torch.no_grad()
    def novel_logits(self, features: Tensor | FeatureSet, weights: Tensor) -> Tensor:
        """The novel class texts go through the attention with each image."""
        return self.logits(features, text_weights=weights)

    def logits(self, features: Tensor | FeatureSet, text_weights: Tensor | None = None) -> Tensor:
        """[N, D] unnormalised embeddings -> [N, C]; ``text_weights`` [C', D] (L2-normalised
        rows) puts another class set in the sequence, e.g. unseen classes -> [N, C']."""
        if not hasattr(self, "head"):
            raise ClipAdaptError("mm-adapter: call fit(...) or load_adapter(...) first")
        if text_weights is not None:
            check_unit_rows(text_weights)
            text_weights = text_weights.to(self.device, torch.float32)
        x = as_features(features).to(self.device, torch.float32)
        step = self.config.batch_size
        chunks = [self.head(x[i : i + step], text_weights) for i in range(0, len(x), step)]
        if not chunks:
            c = len(self.head.text_weights) if text_weights is None else len(text_weights)
            return x.new_zeros(0, c)
        return torch.cat(chunks)

    def state_tensors(self) -> dict[str, Tensor]:
        return dict(self.head.state_dict())

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.head = self._head(tensors["text_weights"]).to(self.device)
        self.head.load_state_dict(tensors)
        self.head.eval()
