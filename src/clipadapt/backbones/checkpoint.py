"""A user's weights file -> a checked state dict: safetensors, torch.load(weights_only=True);
TorchScript archives and pickled objects only behind ``trust_checkpoint=True``. Detects OpenAI
weights (QuickGELU)."""

from __future__ import annotations

import functools
import hashlib
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from clipadapt.errors import ClipAdaptError

# Scalars OpenAI's CLIP archives carry in their state dict; no open_clip model has them.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]
    sha256: str
    quick_gelu: bool | None  # True: OpenAI weights; False: archive uses GELU; None: no evidence


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_tensors(state_dict: dict[str, torch.Tensor]) -> str:
    """Digest of names, dtypes, shapes and bytes, in key order (for weights that have no file)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.cache
def _openai_release_digests() -> frozenset[str]:
    """SHA-256 of OpenAI's released CLIP files: their download URLs embed it."""
    from open_clip import pretrained as registry

    urls = (
        registry.get_pretrained_url(m, "openai")
        for m in registry.list_pretrained_models_by_tag("openai")
    )
    return frozenset(u.split("/")[-2] for u in urls if "openaipublic" in u)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())


def _load_torchscript(path: Path, trust: bool) -> tuple[dict, bool | None]:
    """State dict and activation (True: QuickGELU, False: GELU, None: unknown) of an archive."""
    if not trust:
        raise ClipAdaptError(
            f"{path}: is a TorchScript archive, which can run code when loaded; "
            "pass --trust-checkpoint (trust_checkpoint=True) if you trust its source"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript itself
        module = torch.jit.load(str(path), map_location="cpu")
    kinds = {getattr(m, "original_name", type(m).__name__) for m in module.modules()}
    activation = True if "QuickGELU" in kinds else False if "GELU" in kinds else None
    return dict(module.state_dict()), activation


def _load_tensors(path: Path, trust: bool) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise ClipAdaptError(
                f"{path}: not a plain tensor checkpoint (torch.load(weights_only=True) refused "
                "its pickled objects, which can run code when loaded); pass --trust-checkpoint "
                "(trust_checkpoint=True) if you trust its source, or re-save its state_dict as "
                ".safetensors"
            ) from e
    return torch.load(path, map_location="cpu", weights_only=False)  # the user vouched for it


def read_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> Checkpoint:
    """Read ``path`` into a flat state dict: unwraps {"state_dict": ...}, strips ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise ClipAdaptError(f"{path}: weights file not found")
    quick_gelu = None
    try:
        if _is_torchscript(path):
            sd, quick_gelu = _load_torchscript(path, trust_checkpoint)
        else:
            sd = _load_tensors(path, trust_checkpoint)
    except ClipAdaptError:
        raise
    except Exception as e:
        raise ClipAdaptError(f"{path}: cannot read weights ({str(e).splitlines()[0]})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ClipAdaptError(f"{path}: expected a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    digest = sha256_file(path)
    openai_meta = [sd.pop(k) for k in OPENAI_META_KEYS if k in sd]
    if quick_gelu is None and (openai_meta or digest in _openai_release_digests()):
        quick_gelu = True
    return Checkpoint(path, sd, digest, quick_gelu)


def _looks_like_openai_fp16(sd: dict[str, torch.Tensor]) -> bool:
    """OpenAI's convert_weights signature: fp16 linear/conv weights, fp32 LayerNorms."""
    conv, norm = sd.get("visual.conv1.weight"), sd.get("ln_final.weight")
    return (
        conv is not None
        and norm is not None
        and (conv.dtype, norm.dtype)
        == (
            torch.float16,
            torch.float32,
        )
    )


def load_into(model: torch.nn.Module, ckpt: Checkpoint, name: str) -> None:
    """Copy ``ckpt`` into an open_clip ``model``; ClipAdaptError naming the first misfit key."""
    from open_clip.model import convert_to_custom_text_state_dict

    sd = dict(ckpt.state_dict)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)  # OpenAI layout -> CustomTextCLIP's text.*
    expected = model.state_dict()
    transient = {n for n, _ in model.named_buffers()} - expected.keys()  # e.g. a traced attn_mask
    sd = {k: v for k, v in sd.items() if k not in transient}
    if "logit_scale" in sd and "logit_scale" in expected:
        sd["logit_scale"] = sd["logit_scale"].reshape(expected["logit_scale"].shape)
    misfit = f"{ckpt.path}: weights do not fit {name}"
    for key, value in sd.items():
        if key in expected and value.shape != expected[key].shape:
            raise ClipAdaptError(
                f"{misfit}: {key} is {tuple(value.shape)} in the file, "
                f"{tuple(expected[key].shape)} in the model"
            )
    for keys, what in ((expected.keys() - sd.keys(), "missing"), (sd.keys() - expected, "extra")):
        if keys:
            first = sorted(keys)[0]
            raise ClipAdaptError(f"{misfit}: {len(keys)} {what} keys, e.g. {first!r}")
    if ckpt.quick_gelu is None and _looks_like_openai_fp16(sd):
        warnings.warn(
            f"{ckpt.path}: fp16 weights with fp32 LayerNorms look like OpenAI CLIP weights, which "
            f"need QuickGELU; if so load them as '{name}-quickgelu'",
            stacklevel=3,
        )
    model.load_state_dict(sd)
