"""The Method interface: a dataclass config, ``fit`` on cached features, ``logits``, save/load.

An adapter on disk is a folder with two files:
- ``config.json``: {"format", "method", "config", "meta", "fitted"} where ``meta`` carries the
  class names, templates and the backbone identity, and ``fitted`` what ``fit`` chose
  (searched hyper-parameters, selected epoch, validation accuracy);
- ``model.safetensors``: the tensors of ``state_tensors()``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from clipadapt.errors import ClipAdaptError
from clipadapt.features.featureset import FeatureSet, as_features
from clipadapt.hparams import one_line
from clipadapt.io import atomic_write, first_line, read_json, write_json
from clipadapt.recipes import check_recipe
from clipadapt.zeroshot import zero_shot_logits

FORMAT = "clipadapt-adapter/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class Method:
    """A few-shot classifier on top of frozen CLIP embeddings.

    Subclasses set ``name`` and ``Config`` (a dataclass whose defaults are the published values)
    and implement ``fit``, ``logits``, ``state_tensors`` and ``load_state_tensors``.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    default_views: ClassVar[int] = 0  # augmented views per training image that fit() draws from
    # Whether a protocol fills ``config.scale`` with the backbone's learned exp(logit_scale), as
    # the reference code does; False keeps the config's constant (Tip-Adapter's 100).
    learned_scale: ClassVar[bool] = True
    # False: ``fit`` takes each class's mean of *unnormalised* template embeddings as its text
    # weights (CLAP, TaskRes train from those), not the unit-norm zero-shot classifier.
    unit_text: ClassVar[bool] = True
    # How ``novel_logits`` scores classes the method was not fitted on, in words (tables).
    novel_rule: ClassVar[str] = "zero-shot fallback (no weights for unseen classes)"
    # True for a method fitted on several tasks at once (labels [N, T], one classifier per task)
    multi_task: ClassVar[bool] = False

    def __init__(
        self, device: str | torch.device = "cpu", recipe: str = "clean", **hparams: Any
    ) -> None:
        allowed = [f.name for f in dataclasses.fields(self.Config)]
        unknown = sorted(set(hparams) - set(allowed))
        if unknown:
            raise ClipAdaptError(
                f"unknown hyper-parameter {unknown[0]!r} for method {self.name!r} "
                f"(expected one of: {', '.join(allowed)})"
            )
        self.config = self.Config(**hparams)
        self.device = torch.device(device)
        # "clean": validation-only selection; "reference": the authors' protocol, test-set
        # selection included where they used it (clipadapt.recipes, docs/fidelity.md)
        self.recipe = check_recipe(recipe)
        self.meta: dict[str, Any] = {}
        self.fitted: dict[str, Any] = {}

    # -- the method proper -------------------------------------------------------------------
    def fit(self, train: FeatureSet, text_weights: Tensor, val: FeatureSet | None = None) -> Method:
        """Fit on cached train features; ``text_weights`` [C, D] rows L2-normalised."""
        raise NotImplementedError

    def logits(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] unnormalised embeddings (or a FeatureSet) -> [N, C] logits."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, Tensor]:
        """The tensors that go in model.safetensors."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore from ``state_tensors()`` output (shapes come from the tensors)."""
        raise NotImplementedError

    # -- what fit() is given (the recipe decides; docs/fidelity.md) --------------------------
    def val_source(self) -> str:
        """The images ``fit(val=...)`` should get: "fewshot" (the min(K, 4)-shot draw of the
        CoOp protocol, the default), "val" (the whole validation split) or "test"."""
        return "fewshot"

    def needs_test(self) -> bool:
        """Whether ``fit`` takes ``test=`` (a FeatureSet of the test split) and chooses with it:
        the reference recipe of a method whose authors selected on the test set."""
        return False

    def selection(self) -> str:
        """What chose among candidates while fitting: "test" when test data did (then the
        reported accuracy is not a held-out estimate), else "val"."""
        return "test" if self.needs_test() or self.val_source() == "test" else "val"

    def novel_logits(self, features: Tensor | FeatureSet, weights: Tensor) -> Tensor:
        """Logits [N, C'] for classes the method was not fitted on (base-to-novel), given their
        zero-shot classifier ``weights`` [C', D]. Default: the zero-shot classifier alone, at
        the method's logit scale; a method that can adapt to new class texts overrides it."""
        return zero_shot_logits(
            as_features(features).to(self.device), weights.to(self.device), self.config.scale
        )

    def extract_options(self, train: bool) -> dict[str, Any]:
        """Keyword arguments for ``clipadapt.features.extract``: what this method needs cached
        for its training set (``train=True``) or for the images it classifies."""
        return {"views": self.default_views} if train else {}

    # -- helpers for subclasses --------------------------------------------------------------
    def _inputs(self, features: Tensor | FeatureSet) -> Tensor:
        """[N, D] L2-normalised float32 embeddings on the method's device."""
        return F.normalize(as_features(features).to(self.device, torch.float32), dim=-1)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write config.json + model.safetensors into ``directory`` (atomic per file)."""
        directory = Path(directory)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_tensors().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
        write_json(
            directory / CONFIG_FILE,
            {
                "format": FORMAT,
                "method": self.name,
                "recipe": self.recipe,
                "config": _jsonable(dataclasses.asdict(self.config)),
                "meta": self.meta,
                "fitted": self.fitted,
            },
        )
        return directory

    def check_backbone(self, identity: dict[str, Any], embed_dim: int | None = None) -> None:
        """Raise ClipAdaptError if ``identity`` is not the backbone this adapter was fitted on."""
        mine = self.meta.get("backbone")
        if not mine:
            return
        # the weights digest identifies the weights wherever the file lives; without one, the tag
        keys = ["name", "weights_sha256" if mine.get("weights_sha256") else "pretrained"]
        if any(mine.get(k) != identity.get(k) for k in keys):
            want = ", ".join(f"{k}={mine.get(k)!r}" for k in keys)
            got = ", ".join(f"{k}={identity.get(k)!r}" for k in keys)
            where = self.meta.get("directory", "this adapter")
            raise ClipAdaptError(
                f"{where}: adapter was fitted on backbone ({want}) but got ({got}); "
                "load the same model and weights"
            )
        dim = self.meta.get("embed_dim")
        if embed_dim is not None and dim is not None and int(dim) != int(embed_dim):
            raise ClipAdaptError(f"adapter expects embed_dim {dim}, backbone has {embed_dim}")


def load_adapter(directory: str | Path, backbone: Any = None, device: str = "cpu") -> Method:
    """Load a saved adapter; if ``backbone`` is given, refuse one that does not match it."""
    from clipadapt import methods

    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise ClipAdaptError(f"{cfg_path}: file not found (expected an adapter folder)")
    doc = read_json(cfg_path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ClipAdaptError(f"{cfg_path}: not a clipadapt adapter (expected format {FORMAT!r})")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ClipAdaptError(f"{weights}: file not found")
    name, config = doc.get("method"), doc.get("config") or {}
    if not isinstance(name, str) or not isinstance(config, dict):
        raise ClipAdaptError(f"{cfg_path}: expected a method name and a config object")
    recipe = doc.get("recipe", "clean")
    method = methods.get(
        name, device=device, recipe=recipe, **_from_json(methods.get_class(name), config)
    )
    for key in ("meta", "fitted"):
        if not isinstance(doc.get(key) or {}, dict):
            raise ClipAdaptError(f"{cfg_path}: {key!r} must be a JSON object, not {doc[key]!r}")
    method.meta = dict(doc.get("meta") or {})
    method.fitted = dict(doc.get("fitted") or {})
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise ClipAdaptError(f"{weights}: cannot read safetensors ({e})") from e
    try:
        method.load_state_tensors({k: v.to(device) for k, v in tensors.items()})
    except (KeyError, RuntimeError) as e:
        raise ClipAdaptError(f"{weights}: tensors do not fit method {name!r} ({e})") from e
    _check_shapes(method, weights)
    method.meta["directory"] = str(directory)
    if backbone is not None:
        method.check_backbone(backbone.identity, getattr(backbone, "embed_dim", None))
    return method


def _check_shapes(method: Method, weights: Path) -> None:
    """Classify a zero embedding once: tensors that do not fit the config (or the recorded
    embedding size and classes) fail here, naming the file, not later at eval."""
    dim, classes = method.meta.get("embed_dim"), method.meta.get("classnames")
    if not isinstance(dim, int) or "tokens_layer" in method.extract_options(train=False):
        return
    try:
        with torch.no_grad():
            out = method.logits(torch.zeros(1, dim, device=method.device))
    except (RuntimeError, ValueError, IndexError) as e:
        raise ClipAdaptError(
            f"{weights}: tensors do not fit the config of {method.name!r} ({first_line(e)})"
        ) from e
    if isinstance(classes, list) and out.shape[-1] != len(classes):
        raise ClipAdaptError(
            f"{weights}: gives {out.shape[-1]} classes but the config names {len(classes)}"
        )


def parse_hparams(method_name: str, pairs: list[str]) -> dict[str, Any]:
    """``["alpha=2", "steps=200,20"]`` -> typed values for the method's Config fields."""
    from clipadapt import methods

    cls = methods.get_class(method_name)
    hints = typing.get_type_hints(cls.Config)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in hints:
            raise ClipAdaptError(
                f"--hparam {pair!r}: expected key=value, the keys of {method_name} (default, "
                f"help): {one_line(cls.Config)}"
            )
        try:
            out[key] = _coerce(hints[key], text.strip())
        except ValueError as e:
            raise ClipAdaptError(f"--hparam {pair!r}: {e}") from e
    return out


def _coerce(tp: Any, text: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, text)
            except ValueError:
                continue
        raise ValueError(f"cannot read {text!r} as {tp}")
    if origin is tuple:
        item = args[0] if args else str
        return tuple(_coerce(item, t.strip()) for t in text.split(",") if t.strip())
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if tp in (int, float, str):
        return tp(text)
    raise ValueError(f"unsupported type {tp}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple | list):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def _from_json(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to tuples where the Config field is a tuple."""
    hints = typing.get_type_hints(cls.Config)
    out = {}
    for key, value in config.items():
        if isinstance(value, list) and typing.get_origin(hints.get(key)) is tuple:
            value = tuple(value)
        out[key] = value
    return out
