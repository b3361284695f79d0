"""Every backbone family through ``load_backbone``: RN50, ViT-B-16, ViT-B-16-quickgelu
(MetaCLIP/DFN), EVA02-B-16, ViT-B-16-SigLIP, SigLIP2 and convnext_base.

Each family runs as a tiny random-init stand-in (tests/tiny_families.py: same tower type,
pooling, activation, text pooling and logit bias; only sizes differ, checked against the full
open_clip config built on the meta device). Per family: embeddings, text classifier, patch
tokens (or the one-line refusal where the tower has none), save/load of an adapter, and one
`clipadapt bench` run. The README's capability table is generated from the same code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import write_colour_dataset
from tiny_families import FAMILIES

import clipadapt as ca
from clipadapt import cli
from clipadapt.backbones import families
from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet
from clipadapt.methods import load_adapter

README = Path(__file__).resolve().parents[1] / "README.md"
LABELS = list(FAMILIES)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40)}


@pytest.fixture(scope="module", params=LABELS)
def family(request):
    full, tiny = FAMILIES[request.param]
    torch.manual_seed(0)
    return full, tiny, ca.load_backbone(tiny, pretrained=None)


def _images(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _one_line(err) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


# -- the stand-ins are their families -------------------------------------------------------------
SIZES = {
    "image_size", "layers", "width", "heads", "head_width", "patch_size", "context_length",
    "vocab_size", "embed_dim", "timm_model_name", "hf_tokenizer_name", "mlp_ratio",
}  # fmt: skip


def _structure(cfg):
    if isinstance(cfg, dict):
        return {k: _structure(v) for k, v in cfg.items() if k not in SIZES}
    return cfg


@pytest.mark.parametrize("label", LABELS)
def test_tiny_stand_in_has_its_familys_structure(label):
    full, tiny = FAMILIES[label]
    assert _structure(open_clip.get_model_config(tiny)) == _structure(
        open_clip.get_model_config(full)
    )
    with torch.device("meta"):  # no weights, no initialisation
        big = open_clip.create_model(full, pretrained=None, device="meta")
        small = open_clip.create_model(tiny, pretrained=None, device="meta")
    assert {type(m) for m in small.modules()} == {type(m) for m in big.modules()}
    assert families.model_capabilities(small) == families.model_capabilities(big)
    assert families.scoring(small) == families.scoring(big)


def test_families_cover_the_table():
    assert [f.name for f in families.FAMILIES] == [full for full, _ in FAMILIES.values()]


# -- per family -----------------------------------------------------------------------------------
def test_embeddings(family):
    _, tiny, bb = family
    x = _images()
    z = bb.encode_images(x)
    assert z.shape == (3, open_clip.get_model_config(tiny)["embed_dim"]) == (3, bb.embed_dim)
    assert torch.allclose(z, F.normalize(bb.model.encode_image(x), dim=-1), atol=1e-6)
    assert torch.allclose(z.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_text_classifier(family):
    _, tiny, bb = family
    classes, templates = ["red car", "blue_sky"], ["a photo of a {}.", "this is a {}"]
    w = bb.text_classifier(classes, templates)
    tokenizer = open_clip.get_tokenizer(tiny)
    with torch.no_grad():
        plain = []
        for c in ("red car", "blue sky"):
            t = F.normalize(
                bb.model.encode_text(tokenizer([s.format(c) for s in templates])), dim=-1
            )
            plain.append(F.normalize(t.mean(dim=0), dim=-1))
    assert torch.allclose(w, torch.stack(plain), atol=1e-5)
    assert not torch.allclose(w[0], w[1], atol=1e-3)  # the text reaches the tower


@pytest.mark.parametrize("layer", [-1, 0])
def test_patch_tokens(family, layer):
    _, _, bb = family
    x = _images()
    if not bb.capabilities["patch_tokens"]:
        with pytest.raises(ClipAdaptError, match="patch tokens need a ViT image tower"):
            bb.patch_tokens(x)
        with pytest.raises(ClipAdaptError, match="patch tokens need a ViT image tower"):
            bb.encode_images_and_tokens(x)
        return
    tokens = bb.patch_tokens(x, layer)
    with torch.no_grad():
        ref = bb.model.visual.forward_intermediates(
            x, indices=[layer % len(bb._blocks())], intermediates_only=True, output_fmt="NLC"
        )["image_intermediates"][0]
    assert tokens.shape == (3, 16, ref.shape[-1])  # 32 px / patch 8: a 4 x 4 grid, no CLS
    assert torch.allclose(tokens, ref, atol=1e-5)
    z, both = bb.encode_images_and_tokens(x, layer)
    assert torch.allclose(z, bb.encode_images(x), atol=1e-6)
    assert torch.allclose(both, tokens, atol=1e-6)


def test_dense_features_where_supported(family):
    _, _, bb = family
    x = _images(2)
    if not bb.capabilities["dense_features"]:
        with pytest.raises(ClipAdaptError) as err:
            bb.dense_features(x)
        assert "dense features" in _one_line(err)
        return
    d = bb.dense_features(x, "vanilla")
    assert d.shape == (2, 4, 4, bb.embed_dim)
    assert torch.allclose(d.norm(dim=-1), torch.ones(2, 4, 4), atol=1e-5)


def test_adapter_save_and_load(family, tmp_path):
    _, _, bb = family
    feats = bb.encode_images(_images(6, seed=2), normalize=False)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    train = FeatureSet(features=feats, labels=labels, classnames=["red", "green"])
    weights = bb.text_classifier(["red", "green"], ["a {}."])
    method = ca.methods.get("tip-adapter", alpha=1.0, beta=2.0, search=False)
    method.meta = {"backbone": bb.identity, "embed_dim": bb.embed_dim}
    method.fit(train, weights).save(tmp_path / "tip")
    loaded = load_adapter(tmp_path / "tip", backbone=bb)
    query = bb.encode_images(_images(4, seed=3), normalize=False)
    assert torch.equal(loaded.logits(query), method.logits(query))


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    write_colour_dataset(root / "toy", "Toy", COLOURS, per_split=(2, 1, 2))
    return root


def test_bench_runs(family, toy_root, tmp_path):
    _, tiny, bb = family
    out = tmp_path / "bench"
    argv = ["bench", "--methods", "zero-shot,tip-adapter", "--datasets", "toy"]
    argv += ["--data-root", str(toy_root), "--shots", "1", "--seeds", "1", "--views", "1"]
    argv += ["--out", str(out), "--hparam", "tip-adapter:steps=4,2", "--model", tiny]
    argv += ["--num-workers", "0", "--cache", str(tmp_path / "cache")]
    assert cli.main(argv) == 0
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert sorted(r["method"] for r in records) == ["tip-adapter", "zero-shot"]
    assert all(r["model"] == tiny and 0 <= r["metrics"]["top1"] <= 100 for r in records)
    assert "| tip-adapter | 1 |" in (out / "results.md").read_text()


# -- tokenizers that need an optional package ---------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-test-siglip", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2"])
def test_missing_transformers_names_the_extra(name, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(ClipAdaptError) as err:
        ca.load_backbone(name)
    msg = _one_line(err)
    assert msg.startswith(f"{name}: its tokenizer") and "pip install 'clipadapt[hf]'" in msg


def test_missing_transformers_on_the_command_line(monkeypatch, toy_root, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    argv = ["extract", "--model", "ViT-B-16-SigLIP", "--data", str(toy_root / "toy")]
    argv += ["--out", str(tmp_path / "cache")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'clipadapt[hf]'" in err and "Traceback" not in err


def test_unreachable_hub_tokenizer_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipAdaptError) as err:
        ca.load_backbone("ViT-B-16-SigLIP")
    msg = _one_line(err)
    assert "timm/ViT-B-16-SigLIP" in msg and "Hugging Face Hub" in msg


# -- the README's table ---------------------------------------------------------------------------
def test_readme_table_is_the_generated_one():
    text = README.read_text()
    begin, end = text.find(families.TABLE_BEGIN), text.find(families.TABLE_END)
    assert 0 <= begin < end, "README.md lacks the capability table markers"
    block = text[begin : end + len(families.TABLE_END)]
    assert block == families.readme_block(), "run: python scripts/capability_table.py"
