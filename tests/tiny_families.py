"""Tiny stand-ins for every backbone family, registered offline (imported by conftest).

Each tiny open_clip config in tests/configs keeps its family's structure and changes only sizes:
same tower type, pooling, projection, activation, text pooling and logit bias. The timm towers
are registered here under tiny names, built by the same timm constructor as the full model with
the full model's arguments and smaller widths, depths and input size. SigLIP's tokenizer (a
Hugging Face tokenizer downloaded from the Hub) is replaced by a word-level tokenizer written to
a local folder, so the text path runs offline through open_clip's HFTokenizer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# Family label -> (full open_clip architecture, tiny test architecture).
FAMILIES = {
    "RN50": ("RN50", "tiny-test-rn"),
    "ViT-B-16": ("ViT-B-16", "tiny-test-vit"),
    "ViT-B-16-quickgelu": ("ViT-B-16-quickgelu", "tiny-test-vit-quickgelu"),
    "EVA02-B-16": ("EVA02-B-16", "tiny-test-eva02"),
    "ViT-B-16-SigLIP": ("ViT-B-16-SigLIP", "tiny-test-siglip"),
    "ViT-B-16-SigLIP2": ("ViT-B-16-SigLIP2", "tiny-test-siglip2"),
    "convnext_base": ("convnext_base", "tiny-test-convnext"),
}

# The timm constructor arguments the tiny towers change; everything else is the full model's.
TINY_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
TINY_TOKENIZER = "tiny-test-tokenizer"  # hf_tokenizer_name in the tiny SigLIP configs
WORDS = (
    "a photo of the an this is red green blue cat dog car road sky tree person building "
    "bird , . small large good bad centered cropped close-up itap"
).split()


def register_timm_towers() -> None:
    from timm.models import register_model
    from timm.models.convnext import _create_convnext
    from timm.models.eva import _create_eva
    from timm.models.vision_transformer import _create_vision_transformer

    @register_model
    def tiny_test_eva02(pretrained: bool = False, **kwargs):
        # eva02_base_patch16_clip_224's arguments with tiny sizes (rope grid = patch grid)
        args = dict(
            qkv_fused=False,
            mlp_ratio=4 * 2 / 3,
            swiglu_mlp=True,
            scale_mlp=True,
            scale_attn_inner=True,
            use_rot_pos_emb=True,
            ref_feat_shape=(4, 4),
            global_pool=kwargs.pop("global_pool", "token"),
            **TINY_VIT_ARGS,
        )
        return _create_eva("eva02_base_patch16_clip_224", pretrained=False, **{**args, **kwargs})

    @register_model
    def tiny_test_siglip(pretrained: bool = False, **kwargs):
        # vit_base_patch16_siglip_224's: no class token, attention-pool ("map") head
        args = dict(class_token=False, global_pool="map", **TINY_VIT_ARGS)
        return _create_vision_transformer(
            "vit_base_patch16_siglip_224", pretrained=False, **{**args, **kwargs}
        )

    @register_model
    def tiny_test_convnext(pretrained: bool = False, **kwargs):
        args = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
        return _create_convnext("convnext_base", pretrained=False, **{**args, **kwargs})


def write_tokenizer(folder: Path) -> Path:
    """A word-level Hugging Face tokenizer (T5-style: </s> appended, <pad> = 0) in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"unk_token": "<unk>", "pad_token": "<pad>", "eos_token": "</s>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def register_configs(configs: Path) -> None:
    """Register every tests/configs/*.json with open_clip; a config whose text tower names
    ``TINY_TOKENIZER`` gets the local tokenizer folder (written once per process)."""
    import open_clip

    tokenizer = None
    out = Path(tempfile.mkdtemp(prefix="clipadapt-configs-"))
    for path in sorted(configs.glob("*.json")):
        cfg = json.loads(path.read_text())
        if cfg.get("text_cfg", {}).get("hf_tokenizer_name") == TINY_TOKENIZER:
            tokenizer = tokenizer or write_tokenizer(out / TINY_TOKENIZER)
            cfg["text_cfg"]["hf_tokenizer_name"] = str(tokenizer)
        (out / path.name).write_text(json.dumps(cfg))
        open_clip.add_model_config(out / path.name)
