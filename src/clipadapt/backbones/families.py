"""The backbone families users run, and what each one's towers support.

Every family loads through ``load_backbone(name, pretrained)``; what it can do follows from its
image tower (``openclip.tower_kind``): open_clip's ViT and timm's ViT/EVA trunks have patch
tokens, ResNets and ConvNeXts classify only. ``capability_table()`` builds each family's full
architecture on the meta device (no weights, no memory) and asks the same functions the
backbone uses, so the README table cannot drift from the code (tests/test_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass

CAPABILITIES = ("classification", "patch_tokens", "dense_features", "torchrun")
TABLE_BEGIN = "<!-- capability-table:begin (scripts/capability_table.py writes this) -->"
TABLE_END = "<!-- capability-table:end -->"


@dataclass(frozen=True)
class Family:
    label: str  # what users call it
    name: str  # the open_clip architecture
    tags: str  # open_clip pretrained tags users load it with


FAMILIES = (
    Family("OpenAI CLIP ResNet", "RN50", "openai, yfcc15m, cc12m"),
    Family(
        "OpenAI CLIP / OpenCLIP ViT", "ViT-B-16", "openai, laion2b_s34b_b88k, datacomp_xl_s13b_b90k"
    ),
    Family("MetaCLIP, DFN", "ViT-B-16-quickgelu", "metaclip_400m, metaclip_fullcc, dfn2b"),
    Family("EVA-CLIP", "EVA02-B-16", "merged2b_s8b_b131k"),
    Family("SigLIP", "ViT-B-16-SigLIP", "webli"),
    Family("SigLIP 2", "ViT-B-16-SigLIP2", "webli"),
    Family("ConvNeXt CLIP", "convnext_base", "laion400m_s13b_b51k"),
)


def model_capabilities(model) -> dict[str, bool]:
    """{capability: supported} for an open_clip CLIP model (any device, meta included)."""
    from clipadapt.backbones.dense import supports_dense
    from clipadapt.backbones.openclip import tower_kind

    return {
        "classification": True,
        "patch_tokens": tower_kind(model.visual) in ("vit", "timm-vit"),
        "dense_features": supports_dense(model),
        "torchrun": True,  # sharded extraction runs any backbone (features/extract.py)
    }


def scoring(model) -> str:
    """ "sigmoid" (scale·cos + bias: SigLIP) or "softmax" (scale·cos) for an open_clip model."""
    return "sigmoid" if getattr(model, "logit_bias", None) is not None else "softmax"


def tokenizer_note(name: str) -> str:
    """Which tokenizer the family's text tower uses, and the extra it needs."""
    import open_clip

    source = (open_clip.get_model_config(name) or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    return f"`{source}` (`clipadapt[hf]`)" if source else "open_clip's (built in)"


def capability_rows() -> list[dict]:
    """One row per family: label, name, tower, tags, tokenizer, scoring, capabilities."""
    import open_clip
    import torch

    from clipadapt.backbones.openclip import tower_kind

    rows = []
    for fam in FAMILIES:
        with torch.device("meta"):
            model = open_clip.create_model(fam.name, pretrained=None, device="meta")
        kind = tower_kind(model.visual)
        trunk = getattr(model.visual, "trunk", model.visual)
        rows.append(
            {
                "family": fam.label,
                "name": fam.name,
                "tags": fam.tags,
                "tower": f"{kind} ({type(trunk).__name__})",
                "tokenizer": tokenizer_note(fam.name),
                "scoring": scoring(model),
                **model_capabilities(model),
            }
        )
    return rows


def capability_table(rows: list[dict] | None = None) -> str:
    """The README's markdown table of families × capabilities."""
    rows = capability_rows() if rows is None else rows
    head = ["family", "`--model` / `--pretrained`", "image tower", "tokenizer", "zero-shot scoring"]
    head += [c.replace("_", " ") for c in CAPABILITIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tags = ", ".join(f"`{t}`" for t in r["tags"].split(", "))
        cells = [r["family"], f"`{r['name']}` / {tags}", r["tower"], r["tokenizer"], _scoring(r)]
        cells += ["yes" if r[c] else "no" for c in CAPABILITIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scoring(row: dict) -> str:
    return "s·cos + b (sigmoid)" if row["scoring"] == "sigmoid" else "s·cos (softmax)"


def readme_block(rows: list[dict] | None = None) -> str:
    """The text between (and including) the README markers."""
    return f"{TABLE_BEGIN}\n{capability_table(rows)}\n{TABLE_END}"
