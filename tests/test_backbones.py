"""Backbones: one set of tiny weights loaded every way gives the same embeddings."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, TINY_RN, TINY_VIT
from open_clip import factory
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import save_file

import clipadapt as ca
from clipadapt.backbones import openclip as oc_backbone

QG = "tiny-test-vit-quickgelu"
TEXTS = ["a photo of a cat", "a dog", "red car on a road", "sky"]


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the one set of weights, written in every format -------------------------------------------
@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A quick_gelu tiny ViT (fp16-exact weights, so fp16 files are lossless) and its files."""
    cfg = json.loads((CONFIGS / f"{TINY_VIT}.json").read_text())
    d = tmp_path_factory.mktemp("weights")
    (d / f"{QG}.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
    open_clip.add_model_config(d / f"{QG}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(QG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        model.logit_scale.fill_(4.0)
    sd = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, d / "openclip.pt")
    save_file({k: v.half().contiguous() for k, v in sd.items()}, d / "openclip.safetensors")
    torch.save(_to_openai(sd), d / "openai.pt")
    _torchscript(model, d / "openai-jit.pt")
    torch.manual_seed(2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(open_clip.get_tokenizer(TINY_VIT)(TEXTS))
    return {"model": model, "dir": d, "x": x, "img": img, "txt": txt}


def _to_openai(sd: dict) -> dict:
    """OpenAI's layout (which open_clip's CLIP keeps), its metadata scalars, and its dtypes:
    fp16 conv/linear/attention/projection weights, fp32 LayerNorms and embeddings."""
    out = {}
    for k, v in sd.items():
        low = (
            "conv" in k or "attn." in k or "mlp." in k or k.endswith(("proj", "projection"))
        ) and "ln_" not in k
        out[k] = v.half() if low and v.ndim > 0 else v
    out.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16))
    out["vocab_size"] = torch.tensor(49408)
    return out


def _torchscript(model, path, with_metadata: bool = True) -> None:
    """A traced archive like OpenAI's: OpenAI keys and metadata buffers, QuickGELU inside."""
    meta = {"input_resolution": 32, "context_length": 16, "vocab_size": 49408}
    meta = meta if with_metadata else {}
    ints = {k: model.__dict__.pop(k) for k in meta if k in model.__dict__}
    for key, value in meta.items():
        model.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings
        image = torch.zeros(1, 3, 32, 32)
        traced = torch.jit.trace_module(model, {"encode_image": image}, check_trace=False)
    for key in meta:
        delattr(model, key)
    model.__dict__.update(ints)
    traced.save(str(path))


# --- equivalence across formats ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name, file, trust",
    [
        (QG, "openclip.pt", False),
        (QG, "openclip.safetensors", False),
        (TINY_VIT, "openai.pt", False),  # GELU config: OpenAI format must switch to QuickGELU
        (TINY_VIT, "openai-jit.pt", True),
    ],
)
def test_every_format_gives_the_same_embeddings(ref, name, file, trust):
    path = ref["dir"] / file
    bb = ca.load_backbone(name, pretrained=str(path), trust_checkpoint=trust)
    assert bb.identity == {"name": name, "pretrained": str(path), "weights_sha256": _sha256(path)}
    assert torch.allclose(bb.encode_images(ref["x"], normalize=False), ref["img"], atol=1e-4)
    assert torch.allclose(bb.encode_texts(TEXTS, normalize=False), ref["txt"], atol=1e-4)
    assert bb.logit_scale == pytest.approx(float(torch.tensor(4.0).exp()), rel=1e-6)


def test_quick_gelu_detection(ref):
    openai = ca.load_backbone(TINY_VIT, ref["dir"] / "openai.pt")
    plain = ca.load_backbone(TINY_VIT, ref["dir"] / "openclip.pt")  # no OpenAI evidence: GELU
    assert isinstance(openai.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not isinstance(plain.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    gap = (plain.encode_images(ref["x"], False) - ref["img"]).abs().max()
    assert gap > 1e-3  # the activation matters at this size, so the equivalence test can fail


def test_torchscript_activation_is_read_from_the_archive(ref, tmp_path):
    _torchscript(ref["model"], tmp_path / "quick.pt", with_metadata=False)
    bb = ca.load_backbone(TINY_VIT, tmp_path / "quick.pt", trust_checkpoint=True)
    assert torch.allclose(bb.encode_images(ref["x"], normalize=False), ref["img"], atol=1e-4)
    gelu = open_clip.create_model(TINY_VIT).eval()
    gelu.load_state_dict(ref["model"].state_dict())
    _torchscript(gelu, tmp_path / "gelu.pt", with_metadata=False)
    bb = ca.load_backbone(QG, tmp_path / "gelu.pt", trust_checkpoint=True)  # archive wins
    with torch.no_grad():
        assert torch.allclose(bb.encode_images(ref["x"], False), gelu.encode_image(ref["x"]))


def test_tag_path_uses_the_tag_activation_and_file_digest(ref, monkeypatch):
    from open_clip import pretrained as registry

    path = ref["dir"] / "openclip.pt"  # what a download would have left in the cache
    cfg = {"file": str(path), "quick_gelu": True, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    monkeypatch.setitem(registry._PRETRAINED, TINY_VIT, {"fake_openai": cfg})
    bb = ca.load_backbone(TINY_VIT, "fake_openai")
    assert bb.identity["weights_sha256"] == _sha256(path)
    assert bb.mean == (0.5,) * 3 and bb.preprocess.transforms[-1].std == (0.25,) * 3
    assert torch.allclose(bb.encode_images(ref["x"], normalize=False), ref["img"], atol=1e-4)


def test_openai_fp16_state_dict_without_metadata_warns(ref, tmp_path):
    sd = torch.load(ref["dir"] / "openai.pt", weights_only=True)
    for key in ("input_resolution", "context_length", "vocab_size"):
        del sd[key]
    torch.save(sd, tmp_path / "gpu-saved.pt")
    with pytest.warns(UserWarning, match="quickgelu"):
        ca.load_backbone(TINY_VIT, str(tmp_path / "gpu-saved.pt"))


def test_openai_layout_into_custom_text_model(ref, tmp_path):
    cfg = json.loads((CONFIGS / f"{TINY_VIT}.json").read_text())
    (tmp_path / "tiny-test-vit-ct.json").write_text(json.dumps({**cfg, "custom_text": True}))
    open_clip.add_model_config(tmp_path / "tiny-test-vit-ct.json")
    bb = ca.load_backbone("tiny-test-vit-ct", str(ref["dir"] / "openai.pt"))
    assert "text.token_embedding.weight" in bb.model.state_dict()
    assert torch.allclose(bb.encode_texts(TEXTS, normalize=False), ref["txt"], atol=1e-4)


# --- the hf: path --------------------------------------------------------------------------------
def _hf_block(prefix: str, sd: dict, out: str) -> dict:
    q, k, v = sd[f"{prefix}attn.in_proj_weight"].chunk(3)
    qb, kb, vb = sd[f"{prefix}attn.in_proj_bias"].chunk(3)
    pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
    pairs |= {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    m = {f"{out}self_attn.{n}_proj.weight": w for n, w in zip("qkv", (q, k, v), strict=True)}
    m |= {f"{out}self_attn.{n}_proj.bias": b for n, b in zip("qkv", (qb, kb, vb), strict=True)}
    for a, b in pairs.items():
        m |= {f"{out}{b}.{p}": sd[f"{prefix}{a}.{p}"] for p in ("weight", "bias")}
    return m


def _to_hf(sd: dict, vision_layers: int, text_layers: int) -> dict:
    """open_clip CLIP keys -> transformers CLIPModel keys (in_proj split into q/k/v)."""
    vm, tm = "vision_model.", "text_model."
    m = {
        f"{vm}embeddings.class_embedding": sd["visual.class_embedding"],
        f"{vm}embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        f"{vm}embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].T,
        f"{tm}embeddings.token_embedding.weight": sd["token_embedding.weight"],
        f"{tm}embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_projection.weight": sd["text_projection"].T,
        "logit_scale": sd["logit_scale"],
    }
    for a, b in (("visual.ln_pre", f"{vm}pre_layrnorm"), ("visual.ln_post", f"{vm}post_layernorm")):
        m |= {f"{b}.{p}": sd[f"{a}.{p}"] for p in ("weight", "bias")}
    m |= {f"{tm}final_layer_norm.{p}": sd[f"ln_final.{p}"] for p in ("weight", "bias")}
    for i in range(vision_layers):
        m |= _hf_block(f"visual.transformer.resblocks.{i}.", sd, f"{vm}encoder.layers.{i}.")
    for i in range(text_layers):
        m |= _hf_block(f"transformer.resblocks.{i}.", sd, f"{tm}encoder.layers.{i}.")
    return {k: v.contiguous() for k, v in m.items()}


def _save_hf_tokenizer(transformers, folder) -> None:
    """A CLIPTokenizer over open_clip's BPE files (special tokens renamed to HF's)."""
    tok = open_clip.tokenizer.SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in tok.encoder.items()}
    merges = [" ".join(m) for m in sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=16).save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_folder(ref, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    act = {"hidden_act": "quick_gelu"}
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=128,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=16,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **act,
        ),  # fmt: skip
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
            **act,
        ),  # fmt: skip
        projection_dim=32,
    )
    model = transformers.CLIPModel(config)
    missing, unexpected = model.load_state_dict(
        _to_hf(ref["model"].state_dict(), 2, 1), strict=False
    )
    assert not unexpected and all("position_ids" in k for k in missing)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    _save_hf_tokenizer(transformers, folder)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=list(mean), image_std=list(std),
    ).save_pretrained(folder)  # fmt: skip
    return folder


def test_hf_gives_the_same_embeddings_tokens_and_preprocess(ref, hf_folder):
    bb = ca.load_backbone("tiny", pretrained=f"hf:{hf_folder}")
    oc = ca.load_backbone(QG, str(ref["dir"] / "openclip.pt"))
    assert bb.identity["pretrained"] == f"hf:{hf_folder}"
    assert bb.identity["weights_sha256"] != oc.identity["weights_sha256"]
    assert (bb.embed_dim, bb.image_size) == (32, 32)
    tokens, oc_ids = bb._tokenize(TEXTS), oc.tokenizer(TEXTS)
    ids, mask = tokens["input_ids"], tokens["attention_mask"].bool()
    assert torch.equal(ids[mask], oc_ids[:, : ids.shape[1]][mask])
    assert not oc_ids[:, ids.shape[1] :].any()
    assert torch.allclose(bb.encode_images(ref["x"], normalize=False), ref["img"], atol=1e-4)
    assert torch.allclose(bb.encode_texts(TEXTS, normalize=False), ref["txt"], atol=1e-4)
    assert bb.logit_scale == pytest.approx(oc.logit_scale, rel=1e-6)
    for layer in (-1, -2):
        assert torch.allclose(bb.patch_tokens(ref["x"], layer), oc.patch_tokens(ref["x"], layer),
                              atol=1e-4)  # fmt: skip
        z, tokens = bb.encode_images_and_tokens(ref["x"], layer, normalize=False)
        assert torch.allclose(tokens, bb.patch_tokens(ref["x"], layer), atol=1e-6)
        assert torch.allclose(z, bb.encode_images(ref["x"], normalize=False), atol=1e-6)
    image = Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8).numpy())
    assert torch.allclose(bb.preprocess(image), oc.preprocess(image), atol=1e-6)


def test_hf_load_is_equivalent_to_name_prefix(hf_folder):
    bb = ca.load_backbone(f"hf:{hf_folder}")
    assert bb.pretrained == f"hf:{hf_folder}"


def test_hf_missing_transformers_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ca.ClipAdaptError) as e:
        ca.load_backbone("x", pretrained=f"hf:{tmp_path}")
    assert "pip install clipadapt[hf]" in _one_line(e)


def test_hf_folder_without_model_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ca.ClipAdaptError) as e:
        ca.load_backbone("x", pretrained=f"hf:{tmp_path}")
    assert str(tmp_path) in _one_line(e)


# --- the interface ---------------------------------------------------------------------------
def test_text_classifier_matches_the_plain_formula(tiny_vit_backbone):
    bb = tiny_vit_backbone
    classes, templates = ["red_car", "dog"], ["a photo of a {}.", "{}", lambda c: f"art of {c}"]
    tok = open_clip.get_tokenizer(TINY_VIT)
    rows = []
    with torch.no_grad():
        for c in ("red car", "dog"):
            texts = [t(c) if callable(t) else t.format(c) for t in templates]
            z = F.normalize(bb.model.encode_text(tok(texts)), dim=-1)
            rows.append(F.normalize(z.mean(0), dim=-1))
    assert torch.allclose(bb.text_classifier(classes, templates), torch.stack(rows), atol=1e-6)


def test_encode_texts_batches_and_normalizes(tiny_vit_backbone, monkeypatch):
    bb = tiny_vit_backbone
    whole = bb.encode_texts(TEXTS + ["x"])
    monkeypatch.setattr(bb, "text_batch_size", 2)
    assert torch.allclose(bb.encode_texts(TEXTS + ["x"]), whole, atol=1e-6)
    assert torch.allclose(whole.norm(dim=-1), torch.ones(5), atol=1e-6)
    assert bb.encode_texts([]).shape == (0, 32)


def test_encode_images_is_the_model_under_no_grad(tiny_vit_backbone):
    bb, x = tiny_vit_backbone, torch.randn(2, 3, 32, 32, requires_grad=True)
    z = bb.encode_images(x, normalize=False)
    assert not z.requires_grad
    with torch.no_grad():
        assert torch.allclose(z, bb.model.encode_image(x), atol=1e-6)
    assert torch.allclose(bb.encode_images(x), F.normalize(z, dim=-1), atol=1e-6)


@pytest.mark.parametrize("layer, index", [(-1, 1), (-2, 0), (0, 0), (1, 1)])
def test_patch_tokens_match_open_clip_intermediates(tiny_vit_backbone, layer, index):
    bb, x = tiny_vit_backbone, torch.randn(2, 3, 32, 32)
    tokens = bb.patch_tokens(x, layer)
    assert tokens.shape == (2, 16, 64)  # (32/8)^2 patches, width 64, no CLS
    with torch.no_grad():
        out = bb.model.visual.forward_intermediates(
            x, indices=[index], intermediates_only=True, output_fmt="NLC"
        )
    assert torch.allclose(tokens, out["image_intermediates"][0], atol=1e-5)
    with pytest.raises(ca.ClipAdaptError):
        bb.patch_tokens(x, layer=2)


@pytest.mark.parametrize("layer", [-1, -2, 0])
def test_one_pass_embeddings_and_tokens_equal_the_separate_ones(tiny_vit_backbone, layer):
    bb, x = tiny_vit_backbone, torch.randn(3, 3, 32, 32)
    z, tokens = bb.encode_images_and_tokens(x, layer, normalize=False)
    torch.testing.assert_close(z, bb.encode_images(x, normalize=False), atol=1e-6, rtol=0)
    torch.testing.assert_close(tokens, bb.patch_tokens(x, layer), atol=1e-6, rtol=0)
    z1, _ = bb.encode_images_and_tokens(x, layer)
    torch.testing.assert_close(z1, bb.encode_images(x))
    with pytest.raises(ca.ClipAdaptError, match="out of range"):
        bb.encode_images_and_tokens(x, layer=2)


def test_patch_tokens_on_a_resnet_is_a_user_error():
    bb = ca.load_backbone(TINY_RN)
    with pytest.raises(ca.ClipAdaptError) as e:
        bb.patch_tokens(torch.randn(1, 3, 32, 32))
    assert "ViT" in _one_line(e)
    assert bb.encode_images(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_preprocess_and_train_transform(tiny_vit_backbone):
    bb = tiny_vit_backbone
    image = Image.new("L", (50, 40), 128)
    assert bb.preprocess(image).shape == (3, 32, 32)
    aug = bb.train_transform("rrc-flip")
    torch.manual_seed(0)
    a = aug(image.convert("RGB").rotate(10))
    torch.manual_seed(0)
    assert torch.equal(a, aug(image.convert("RGB").rotate(10))) and a.shape == (3, 32, 32)
    names = [type(t).__name__ for t in aug.transforms]
    assert names[1:3] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert aug.transforms[1].scale == (0.5, 1.0) and aug.transforms[-1].mean == bb.mean
    with pytest.raises(ca.ClipAdaptError):
        bb.train_transform("mixup")


def test_random_init_identity_is_a_digest_of_the_weights():
    torch.manual_seed(0)
    a = ca.load_backbone(TINY_VIT)
    torch.manual_seed(0)
    b = ca.load_backbone(TINY_VIT)
    torch.manual_seed(1)
    c = ca.load_backbone(TINY_VIT)
    assert a.identity == b.identity and a.identity["pretrained"] is None
    assert a.identity["weights_sha256"] != c.identity["weights_sha256"]


# --- errors ----------------------------------------------------------------------------------
def test_shape_mismatch_names_file_key_and_shapes(ref, tmp_path):
    sd = dict(ref["model"].state_dict())
    sd["text_projection"] = torch.zeros(32, 16)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ca.ClipAdaptError) as e:
        ca.load_backbone(QG, str(tmp_path / "bad.safetensors"))
    msg = _one_line(e)
    assert all(s in msg for s in ("bad.safetensors", "text_projection", "(32, 16)", "(32, 32)"))


def test_missing_keys_and_wrong_architecture(ref, tmp_path):
    sd = dict(ref["model"].state_dict())
    del sd["ln_final.bias"]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(ca.ClipAdaptError) as e:
        ca.load_backbone(QG, str(tmp_path / "short.pt"))
    assert "ln_final.bias" in _one_line(e)
    with pytest.raises(ca.ClipAdaptError) as e:
        ca.load_backbone(TINY_RN, str(ref["dir"] / "openclip.pt"))
    assert "openclip.pt" in _one_line(e)


def test_torchscript_needs_trust(ref):
    with pytest.raises(ca.ClipAdaptError) as e:
        ca.load_backbone(TINY_VIT, str(ref["dir"] / "openai-jit.pt"))
    assert "--trust-checkpoint" in _one_line(e)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "cfg": object()}, tmp_path / "pickle.pt")
    with pytest.raises(ca.ClipAdaptError) as e:
        ca.load_backbone(TINY_VIT, str(tmp_path / "pickle.pt"))
    assert "weights_only" in _one_line(e)


@pytest.mark.parametrize(
    "name, pretrained, expect",
    [
        ("RN50", "openai", "'openai'"),  # a real tag, offline: the download fails
        (TINY_VIT, "laion2b_s34b_b88k", "'laion2b_s34b_b88k'"),  # not a tag of this model
        (TINY_VIT, "missing/weights.pt", "not found"),
        ("ViT-Q-99", None, "'ViT-Q-99'"),
    ],
)
def test_bad_names_and_tags_are_one_line(name, pretrained, expect):
    with pytest.raises(ca.ClipAdaptError) as e:
        ca.load_backbone(name, pretrained)
    assert expect in _one_line(e)


# --- the embedded model ------------------------------------------------------------------------
@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))


def test_embedded_model_loads_through_the_local_file_path(ref, tmp_path, monkeypatch,
                                                           isolated_registry):  # fmt: skip
    cfg = json.loads((CONFIGS / f"{TINY_VIT}.json").read_text())
    (tmp_path / "tiny-shapes.json").write_text(json.dumps({**cfg, "quick_gelu": True}))
    monkeypatch.setattr(oc_backbone, "ASSETS", tmp_path)
    with pytest.raises(ca.ClipAdaptError) as e:
        ca.load_backbone("tiny-shapes")
    assert "embedded" in _one_line(e)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((ref["dir"] / "openclip.safetensors").read_bytes())
    bb = ca.load_backbone("tiny-shapes")
    assert bb.identity == {"name": "tiny-shapes", "pretrained": None,
                           "weights_sha256": _sha256(weights)}  # fmt: skip
    assert torch.allclose(bb.encode_images(ref["x"], normalize=False), ref["img"], atol=1e-4)


def test_shipped_embedded_model_if_present():
    if not (oc_backbone.ASSETS / "model.safetensors").is_file():
        pytest.skip("the embedded tiny-shapes weights are not trained yet")
    bb = ca.load_backbone("tiny-shapes")
    z = bb.encode_images(torch.zeros(1, 3, bb.image_size, bb.image_size))
    assert z.shape == (1, bb.embed_dim) and torch.isfinite(z).all()


def test_import_is_light_and_versioned():
    code = "import sys, clipadapt; print(clipadapt.__version__, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from importlib.metadata import version

    assert out.stdout.split() == [version("clipadapt"), "False"]
