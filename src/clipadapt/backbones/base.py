"""The Backbone interface: one frozen CLIP model behind one API, whatever library built it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision import transforms as T
from tqdm import tqdm

from clipadapt.errors import ClipAdaptError

Template = str | Callable[[str], str]


def to_rgb(image):
    return image.convert("RGB")


class Backbone:
    """A frozen CLIP model. Subclasses implement the four ``_``-prefixed hooks.

    Attributes: ``model``, ``name``, ``pretrained``, ``identity`` ({"name", "pretrained",
    "weights_sha256"}), ``embed_dim``, ``logit_scale`` (exp of the learned scale),
    ``logit_bias`` (a sigmoid-loss model's learned bias, None for softmax CLIPs), ``image_size``
    (input side in pixels), ``preprocess`` (eval transform PIL.Image -> Tensor[3,H,W]),
    ``mean``/``std`` (normalisation), ``device``.
    """

    text_batch_size = 256
    prefix_tokens = 1  # tokens before the patches in the residual stream (CLS)

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        pretrained: str | None,
        weights_sha256: str,
        embed_dim: int,
        image_size: int,
        preprocess: Callable,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.name = name
        self.pretrained = pretrained
        self.identity = {"name": name, "pretrained": pretrained, "weights_sha256": weights_sha256}
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.preprocess = preprocess
        self.mean, self.std = tuple(mean), tuple(std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, pretrained={self.pretrained!r})"

    # --- hooks -------------------------------------------------------------------------------
    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] on device -> [B,D] unnormalised embeddings."""
        raise NotImplementedError

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> keyword tensors for ``_text_features``."""
        raise NotImplementedError

    def _text_features(self, **tokens: torch.Tensor) -> torch.Tensor:
        """Tokens on device -> [N,D] unnormalised embeddings."""
        raise NotImplementedError

    def _hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B,3,H,W] on device -> per block, the residual stream [B,prefix+P,W] (CLS first)."""
        raise ClipAdaptError(f"{self.name}: patch tokens need a ViT image tower")

    def _blocks(self) -> list[torch.nn.Module]:
        """The image tower's transformer blocks, in order (for one-pass token capture)."""
        raise ClipAdaptError(f"{self.name}: patch tokens need a ViT image tower")

    def _block_output(self, out) -> torch.Tensor:
        """A block's forward output -> its residual stream [B,prefix+P,W] (CLS first)."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        """exp of the model's learned logit scale (100 for OpenAI weights)."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> float | None:
        """A sigmoid-loss model's learned logit bias (SigLIP); None for a softmax CLIP."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach())

    @property
    def capabilities(self) -> dict[str, bool]:
        """What this backbone's towers support: classification, patch tokens, dense features,
        torchrun (sharded extraction; model-independent)."""
        return {
            "classification": True,
            "patch_tokens": False,
            "dense_features": False,
            "torchrun": True,
        }

    # --- public API ----------------------------------------------------------------------------
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ClipAdaptError(f"{self.name}: expected images [B,3,H,W], got {tuple(x.shape)}")
        dtype = next(self.model.parameters()).dtype
        return x.to(self.device, dtype)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images [B,3,H,W] (already preprocessed) -> embeddings [B,D] float32."""
        self.model.eval()
        z = self._image_features(self._input(x)).float()
        return F.normalize(z, dim=-1) if normalize else z

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Texts (N strings) -> embeddings [N,D] float32, in batches of ``text_batch_size``."""
        self.model.eval()
        texts = list(texts)
        starts = range(0, len(texts), self.text_batch_size)
        chunks = []
        for i in tqdm(starts, desc="text", disable=len(starts) < 4, leave=False):
            tokens = self._tokenize(texts[i : i + self.text_batch_size])
            chunks.append(self._text_features(**{k: v.to(self.device) for k, v in tokens.items()}))
        z = torch.cat(chunks).float() if chunks else torch.zeros(0, self.embed_dim)
        return F.normalize(z, dim=-1) if normalize else z

    def text_classifier(
        self, classnames: Sequence[str], templates: Sequence[Template], normalize: bool = True
    ) -> torch.Tensor:
        """Zero-shot weights [C,D]: per class, the mean of its L2-normalised template
        embeddings, re-normalised. ``_`` in class names becomes a space; a template is
        ``"a {}."`` or a callable. ``normalize=False``: the mean of the *unnormalised* template
        embeddings, not normalised (the class prototypes CLAP and TaskRes train from).
        """
        if not templates:
            raise ClipAdaptError("text_classifier: expected at least one template")
        names = [c.replace("_", " ") for c in classnames]
        texts = [t(c) if callable(t) else t.format(c) for c in names for t in templates]
        z = self.encode_texts(texts, normalize=normalize).reshape(len(names), len(templates), -1)
        return F.normalize(z.mean(dim=1), dim=-1) if normalize else z.mean(dim=1)

    @torch.no_grad()
    def patch_tokens(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Images [B,3,H,W] -> residual-stream patch tokens [B,P,W] (CLS dropped) after block
        ``layer`` (python indexing: -1 the last block, -2 the one before), before ln_post."""
        self.model.eval()
        states = self._hidden_states(self._input(x))
        self._check_layer(layer, len(states))
        return states[layer][:, self.prefix_tokens :].float()

    def _check_layer(self, layer: int, blocks: int) -> None:
        if not -blocks <= layer < blocks:
            raise ClipAdaptError(f"{self.name}: layer {layer} out of range for {blocks} blocks")

    @torch.no_grad()
    def encode_images_and_tokens(
        self, x: torch.Tensor, layer: int = -1, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: ``encode_images(x, normalize)`` and ``patch_tokens(x, layer)``,
        the tokens read by a hook on block ``layer`` while the model computes the embedding."""
        self.model.eval()
        blocks = self._blocks()
        self._check_layer(layer, len(blocks))
        seen: list[torch.Tensor] = []
        hook = blocks[layer].register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            z = self._image_features(self._input(x)).float()
        finally:
            hook.remove()
        tokens = self._block_output(seen[-1])[:, self.prefix_tokens :].float()
        return (F.normalize(z, dim=-1) if normalize else z), tokens

    def dense_features(
        self, x: torch.Tensor, attention: str = "csa", positions: str = "exact"
    ) -> torch.Tensor:
        """Images [B,3,H,W] -> per-patch joint-space embeddings [B,h,w,D] (backbones/dense.py)."""
        from clipadapt.backbones.dense import dense_features

        return dense_features(self, x, attention, positions)

    def train_transform(self, kind: str = "rrc-flip") -> Callable:
        """Augmentation for cached views. ``rrc-flip`` (Tip-Adapter's): RandomResizedCrop
        (scale 0.5-1, bicubic) + horizontal flip + this model's normalisation.
        Draws from torch's global RNG: seed it (torch.manual_seed) for reproducible views."""
        if kind != "rrc-flip":
            raise ClipAdaptError(f"train_transform: unknown kind {kind!r}; expected 'rrc-flip'")
        return T.Compose(
            [
                to_rgb,
                T.RandomResizedCrop(
                    self.image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC
                ),
                T.RandomHorizontalFlip(p=0.5),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )
