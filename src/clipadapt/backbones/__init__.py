"""Backbones: one frozen CLIP model behind one interface, whatever library built it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from clipadapt.backbones.base import Backbone


def load_backbone(
    name: str,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    trust_checkpoint: bool = False,
) -> Backbone:
    """Load a frozen CLIP model.

    name: an open_clip architecture ("ViT-B-16", "RN50", any registered config) or "tiny-shapes"
        (the embedded model, whose weights are its default).
    pretrained: None (random init, or the name's default), an open_clip tag ("openai",
        "laion2b_s34b_b88k"), a local file (.pt/.pth/.bin/.safetensors: open_clip or OpenAI
        state dict; a TorchScript archive or pickled objects need ``trust_checkpoint=True``), or
        "hf:<folder-or-hub-id>" for a transformers CLIPModel (``name`` is then a label;
        ``load_backbone("hf:...")`` also works).
    """
    if pretrained is None and name.startswith("hf:"):
        pretrained = name
    pretrained = os.fspath(pretrained) if pretrained is not None else None
    if pretrained is not None and pretrained.startswith("hf:"):
        from clipadapt.backbones.hf import load_hf

        return load_hf(name, pretrained, device)
    from clipadapt.backbones.openclip import load_openclip

    return load_openclip(name, pretrained, device, trust_checkpoint)


__all__ = ["load_backbone"]
