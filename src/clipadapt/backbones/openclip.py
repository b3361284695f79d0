"""open_clip models by architecture name; weights from a tag, a local file or the embedded one."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import open_clip
import torch
from open_clip import pretrained as registry
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import VisionTransformer

from clipadapt.backbones.base import Backbone
from clipadapt.backbones.checkpoint import load_into, read_checkpoint, sha256_file, sha256_tensors
from clipadapt.errors import ClipAdaptError

EMBEDDED = "tiny-shapes"
ASSETS = Path(__file__).resolve().parents[1] / "assets" / EMBEDDED
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class OpenClipBackbone(Backbone):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` behind the Backbone interface."""

    def __init__(self, model: torch.nn.Module, tokenizer, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.tokenizer = tokenizer

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"text": self.tokenizer(texts)}

    def _text_features(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)

    @property
    def tower(self) -> str:
        """The image tower: "vit" (open_clip's ViT), "timm-vit" (a timm ViT/EVA trunk:
        EVA-CLIP, SigLIP), "resnet" (OpenAI's ModifiedResNet) or "timm-cnn" (ConvNeXt)."""
        return tower_kind(self.model.visual)

    @property
    def capabilities(self) -> dict[str, bool]:
        from clipadapt.backbones.families import model_capabilities

        return model_capabilities(self.model)

    @property
    def prefix_tokens(self) -> int:
        return int(self.model.visual.trunk.num_prefix_tokens) if self.tower == "timm-vit" else 1

    def _no_tokens(self) -> ClipAdaptError:
        kind = {"resnet": "a ResNet", "timm-cnn": "a convolutional"}.get(self.tower, "this")
        return ClipAdaptError(
            f"{self.name}: patch tokens need a ViT image tower, not {kind} one "
            f"({type(getattr(self.model.visual, 'trunk', self.model.visual)).__name__})"
        )

    def _vit(self) -> VisionTransformer:
        if self.tower != "vit":
            raise self._no_tokens()
        return self.model.visual

    def _blocks(self) -> list[torch.nn.Module]:
        if self.tower == "timm-vit":
            return list(self.model.visual.trunk.blocks)
        return list(self._vit().transformer.resblocks)

    def _block_output(self, out) -> torch.Tensor:
        if self.tower == "timm-vit":  # timm blocks are batch-first
            return out
        seq_first = not getattr(self._vit().transformer, "batch_first", False)
        return out.transpose(0, 1) if seq_first else out

    def _hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.tower == "timm-vit":
            return self._timm_hidden_states(x)
        v = self._vit()
        x = v.conv1(x).flatten(2).transpose(1, 2)  # [B, P, W]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        seq_first = not getattr(v.transformer, "batch_first", False)  # [L, B, W] blocks
        states = []
        for block in v.transformer.resblocks:
            x = block(x.transpose(0, 1)).transpose(0, 1) if seq_first else block(x)
            states.append(x)
        return states

    def _timm_hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output, read by hooks while the trunk runs its own forward."""
        states: list[torch.Tensor] = []
        hooks = [
            b.register_forward_hook(lambda _m, _i, out: states.append(out)) for b in self._blocks()
        ]
        try:
            self.model.visual.trunk.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return states


def tower_kind(visual: torch.nn.Module) -> str:
    """ "vit", "timm-vit", "resnet", "timm-cnn" or "other" for an open_clip image tower."""
    if isinstance(visual, VisionTransformer):
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        vit_like = all(hasattr(trunk, a) for a in ("blocks", "patch_embed", "num_prefix_tokens"))
        return "timm-vit" if vit_like else "timm-cnn"
    return "other"


def tokenizer_for(name: str):
    """open_clip's tokenizer for ``name``; a missing package or unreachable Hugging Face
    tokenizer is a one-line error naming what to install or fetch."""
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    source = text_cfg.get("hf_tokenizer_name") or "a Hugging Face tokenizer"
    try:
        return open_clip.get_tokenizer(name)
    except ImportError as e:
        package = e.name or "transformers"
        install = (
            "pip install 'clipadapt[hf]'"
            if package.split(".")[0] in ("transformers", "tokenizers")
            else f"pip install {package.split('.')[0]}"
        )
        raise ClipAdaptError(
            f"{name}: its tokenizer ({source}) needs the {package} package; {install}"
        ) from e
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipAdaptError(
            f"{name}: cannot load its tokenizer {source!r} ({first[:160]}); it is downloaded from "
            "the Hugging Face Hub once, then read from the local cache"
        ) from e


def _embedded_config() -> None:
    """Register the embedded model's architecture with open_clip (again if it changed)."""
    config = ASSETS / f"{EMBEDDED}.json"
    if not config.is_file():
        raise ClipAdaptError(f"{config}: the embedded {EMBEDDED} model config is missing")
    if open_clip.get_model_config(EMBEDDED) != json.loads(config.read_text()):
        open_clip.add_model_config(config)


def _embedded_weights() -> Path:
    weights = ASSETS / "model.safetensors"
    if not weights.is_file():
        raise ClipAdaptError(
            f"{weights}: the embedded {EMBEDDED} weights are missing; "
            "reinstall clipadapt or pass --pretrained"
        )
    return weights


def _is_file(pretrained: str) -> bool:
    return (
        os.path.exists(pretrained) or pretrained.endswith(WEIGHT_SUFFIXES) or os.sep in pretrained
    )


def _from_tag(name: str, tag: str) -> tuple[torch.nn.Module, str]:
    cfg = registry.get_pretrained_cfg(name, tag)
    if not cfg:
        known = ", ".join(registry.list_pretrained_tags_by_model(name)) or "none"
        raise ClipAdaptError(
            f"pretrained {tag!r}: not a file nor an open_clip tag for {name} (tags: {known})"
        )
    try:
        path = registry.download_pretrained(cfg)
    except Exception as e:
        raise ClipAdaptError(
            f"pretrained {tag!r} for {name}: download failed ({type(e).__name__}); "
            "no network? pass a local weights file instead"
        ) from e
    quick_gelu = bool(cfg.get("quick_gelu", False))  # open_clip only warns on a mismatch
    model = open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu)
    return model, sha256_file(path)


def _from_file(name: str, path: str, trust: bool) -> tuple[torch.nn.Module, str]:
    ckpt = read_checkpoint(path, trust_checkpoint=trust)
    act = {} if ckpt.quick_gelu is None else {"quick_gelu": ckpt.quick_gelu}
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip's "initialized randomly": the weights come next
    try:
        model = open_clip.create_model(name, pretrained=None, **act)
    finally:
        logging.disable(previous)
    load_into(model, ckpt, name)
    return model, ckpt.sha256


def load_openclip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    trust_checkpoint: bool = False,
) -> OpenClipBackbone:
    """See :func:`clipadapt.load_backbone`."""
    if name == EMBEDDED:
        _embedded_config()
    if open_clip.get_model_config(name) is None:
        raise ClipAdaptError(
            f"model {name!r}: not an open_clip architecture (see open_clip.list_models()) "
            f"nor {EMBEDDED!r}"
        )
    tokenizer = tokenizer_for(name)  # before building the model: its errors are the cheap ones
    if pretrained is None and name == EMBEDDED:
        model, digest = _from_file(name, str(_embedded_weights()), trust_checkpoint)
    elif pretrained is None:
        model = open_clip.create_model(name, pretrained=None)
        digest = sha256_tensors(model.state_dict())
    elif _is_file(pretrained):
        model, digest = _from_file(name, pretrained, trust_checkpoint)
    else:
        model, digest = _from_tag(name, pretrained)
    pp = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    size = pp.size if isinstance(pp.size, int) else pp.size[0]
    return OpenClipBackbone(
        model,
        tokenizer,
        name=name,
        pretrained=pretrained,
        weights_sha256=digest,
        embed_dim=open_clip.get_model_config(name)["embed_dim"],
        image_size=size,
        preprocess=image_transform_v2(pp, is_train=False),
        mean=pp.mean,
        std=pp.std,
        device=device,
    )
