"""A transformers ``CLIPModel`` ("hf:<folder-or-hub-id>") behind the Backbone interface."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torchvision import transforms as T

from clipadapt.backbones.base import Backbone, to_rgb
from clipadapt.errors import ClipAdaptError


def _features(out) -> torch.Tensor:
    """transformers < 5 returns the projected tensor, >= 5 a ModelOutput holding it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFBackbone(Backbone):
    def __init__(self, model: torch.nn.Module, tokenizer, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.tokenizer = tokenizer
        self.context_length = model.config.text_config.max_position_embeddings

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=x))

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        t = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}

    def _text_features(self, **tokens: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_text_features(**tokens))

    @property
    def capabilities(self) -> dict[str, bool]:
        return {**super().capabilities, "patch_tokens": True}

    def _blocks(self) -> list[torch.nn.Module]:
        return list(self.model.vision_model.encoder.layers)

    def _block_output(self, out) -> torch.Tensor:
        return out[0] if isinstance(out, tuple) else out  # transformers < 5 return a tuple

    def _hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.model.vision_model(pixel_values=x, output_hidden_states=True)
        return list(out.hidden_states[1:])  # [0] is the input to the first block


def _weights_digest(source: str) -> str:
    """SHA-256 over the folder's weight files (safetensors, else .bin), in name order."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, local_files_only=True))
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def _preprocess(processor) -> tuple[T.Compose, int]:
    """Resize the short side, centre-crop, normalise: from preprocessor_config.json."""
    size, crop = processor.size, processor.crop_size
    short = size.get("shortest_edge") or size["height"]
    side = crop["height"] if crop else short
    return T.Compose(
        [
            to_rgb,
            T.Resize(short, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(side),
            T.ToTensor(),
            T.Normalize(processor.image_mean, processor.image_std),
        ]
    ), side


def load_hf(name: str, pretrained: str, device: str | torch.device = "cpu") -> HFBackbone:
    """``pretrained`` = "hf:<folder-or-hub-id>"; ``name`` is only a label."""
    try:
        import transformers
    except ImportError as e:
        raise ClipAdaptError(
            f"{pretrained}: transformers is not installed; pip install clipadapt[hf]"
        ) from e
    source = pretrained.removeprefix("hf:")
    try:
        model = transformers.CLIPModel.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        processor = transformers.CLIPImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipAdaptError(f"{pretrained}: cannot load a transformers CLIPModel ({first})") from e
    preprocess, side = _preprocess(processor)
    return HFBackbone(
        model.float(),
        tokenizer,
        name=name,
        pretrained=pretrained,
        weights_sha256=_weights_digest(source),
        embed_dim=model.config.projection_dim,
        image_size=side,
        preprocess=preprocess,
        mean=processor.image_mean,
        std=processor.image_std,
        device=device,
    )
