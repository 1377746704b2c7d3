"""Where a model's weights come from: a state_dict file, a torchvision weight enum, or random init.

``--weights FILE`` accepts a plain torchvision ``state_dict`` (what
``torch.save(model.state_dict(), f)`` writes, also with a DataParallel
``module.`` prefix), a ``{"state_dict": ...}`` wrapper, or an imgserve
training checkpoint (``best.pt``/``last.pt``, whose class names, resize and
crop come along). Loading is strict: a missing, unexpected or mis-shaped
tensor is an error that names them.

``--weights IMAGENET1K_V1`` (any member of the architecture's torchvision
weight enum, or ``DEFAULT``) loads torchvision's published weights: from the
torch hub cache when they are there, otherwise by downloading them. The
ImageNet class names come from the enum's metadata, which ships inside
torchvision, so labels never need the network. When the file is neither
cached nor downloadable, the error says how to supply it as a file instead.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from export.models import ModelEntry, create_model

DOWNLOAD_TIMEOUT_S = 30.0


class WeightsError(ValueError):
    """The requested weights cannot be loaded; the message says why and what to do instead."""


@dataclass(frozen=True)
class LoadedWeights:
    """A model with its weights in place, and what to serve it with."""

    model: nn.Module
    labels: tuple[str, ...]
    source: str                  # for the model description, e.g. "torchvision ResNet50_Weights.IMAGENET1K_V2"
    random: bool = False         # True when nothing was loaded
    resize: int | None = None    # what the weights were made for, when known
    crop: int | None = None


# ------------------------------------------------------------------ torchvision enums

def _arch(entry: ModelEntry) -> str:
    if entry.torchvision_name is None:
        raise WeightsError(f"{entry.name} is not a torchvision architecture, so it has no torchvision weight names; "
                           f"use --weights FILE")
    return entry.torchvision_name


def weight_enum(entry: ModelEntry) -> Any:
    """The torchvision WeightsEnum class of this architecture (e.g. ResNet50_Weights)."""
    from torchvision.models import get_model_weights

    return get_model_weights(_arch(entry))


def weight_names(entry: ModelEntry) -> list[str]:
    """Accepted enum names for this architecture, DEFAULT included."""
    return list(weight_enum(entry).__members__)


def resolve_enum(entry: ModelEntry, name: str) -> Any:
    """The enum member ``name`` (case-insensitive) names, or a WeightsError listing the valid names."""
    enum = weight_enum(entry)
    members = {key.upper(): member for key, member in enum.__members__.items()}
    member = members.get(name.upper())
    if member is None:
        raise WeightsError(f"{entry.name} has no torchvision weights named {name!r}; "
                           f"choose one of {', '.join(enum.__members__)} or pass a file")
    return member


def imagenet_categories(entry: ModelEntry) -> tuple[str, ...]:
    """The 1000 ImageNet class names of this architecture's default weights (offline: they ship in torchvision)."""
    return tuple(weight_enum(entry).DEFAULT.meta["categories"])


def hub_cache_file(weights: Any) -> Path:
    """Where torch hub keeps (or would keep) the file of ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every blocking socket call of a download, so a black-holed network fails instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _fetch_enum_state(entry: ModelEntry, weights: Any, *, download: bool, progress: bool) -> dict[str, torch.Tensor]:
    cached = hub_cache_file(weights)
    how_to = (f"to use these weights offline, download {weights.url} on a machine with network access and either "
              f"pass it with --weights /path/to/{cached.name}, or copy it to {cached}")
    if not cached.is_file() and not download:
        raise WeightsError(f"{type(weights).__name__}.{weights.name} is not in the torch hub cache ({cached}) and "
                           f"downloads are off; {how_to}")
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return weights.get_state_dict(progress=progress, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError and socket errors are OSErrors
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(f"cannot get {type(weights).__name__}.{weights.name} for {entry.name}: not in the torch "
                           f"hub cache ({cached}) and the download failed ({reason}); {how_to}") from None


def load_enum_weights(entry: ModelEntry, name: str, *, download: bool = True, progress: bool = True) -> LoadedWeights:
    """The model with torchvision's ``name`` weights; labels are the enum's categories."""
    weights = resolve_enum(entry, name)
    state = _fetch_enum_state(entry, weights, download=download, progress=progress)
    categories = tuple(weights.meta["categories"])
    model = create_model(entry.name, len(categories), init=None)
    _load_strict(model, state, f"{type(weights).__name__}.{weights.name}")
    resize, crop = _enum_sizes(weights)
    return LoadedWeights(model, categories, f"torchvision {type(weights).__name__}.{weights.name}",
                         resize=resize, crop=crop)


def _enum_sizes(weights: Any) -> tuple[int | None, int | None]:
    """The evaluation resize/crop torchvision publishes with the weights (e.g. 232/224 for ResNet50 V2)."""
    try:
        preset = weights.transforms()
        resize, crop = preset.resize_size, preset.crop_size
        return int(resize[0] if isinstance(resize, (list, tuple)) else resize), \
            int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    except (AttributeError, TypeError, IndexError, ValueError):
        return None, None


# ------------------------------------------------------------------ files

def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, extra) from the formats --weights FILE accepts."""
    extra: dict[str, Any] = {}
    if isinstance(obj, nn.Module):
        raise WeightsError(f"{path} holds a pickled model, not a state_dict; save model.state_dict() instead")
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} does not hold a state_dict (found {type(obj).__name__})")
    if obj.get("format") == "imgserve-checkpoint-v1":
        extra = dict(obj.get("extra") or {})
        obj = obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    state = {str(k): v for k, v in obj.items()}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state_dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, extra


def _classifier_key(entry: ModelEntry) -> str:
    """The state_dict key of the last Linear layer's weight (its rows are the classes)."""
    probe = create_model(entry.name, 2, init=None)
    linears = [name for name, module in probe.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise WeightsError(f"{entry.name} has no Linear classifier to read the class count from; pass --num-classes")
    return f"{linears[-1]}.weight"


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                shown = ", ".join(items[:5]) + (f" ... ({len(items)} in all)" if len(items) > 5 else "")
                parts.append(f"{title}: {shown}")
        raise WeightsError(f"{source} does not fit this architecture ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


def load_file_weights(entry: ModelEntry, path: Path, *, num_classes: int | None = None,
                      labels: tuple[str, ...] | None = None) -> LoadedWeights:
    """The model with the weights in ``path``; the class count comes from the file's classifier."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file is not what we accept
        raise WeightsError(f"cannot read {path} as a PyTorch state_dict: {exc}") from None
    state, extra = _unwrap(obj, path)
    key = _classifier_key(entry)
    if key not in state:
        raise WeightsError(f"{path} has no {key!r}: it is not a {entry.name} state_dict "
                           f"(its first keys: {', '.join(list(state)[:4])})")
    file_classes = int(state[key].shape[0])
    if num_classes is not None and num_classes != file_classes:
        raise WeightsError(f"--num-classes {num_classes} but {path} has {file_classes} classes")
    model = create_model(entry.name, file_classes, init=None)
    _load_strict(model, state, str(path))
    if labels is None and extra.get("classes"):
        labels = tuple(str(c) for c in extra["classes"])
    if labels is None:
        labels = default_labels(entry, file_classes)
    if len(labels) != file_classes:
        raise WeightsError(f"{len(labels)} labels for the {file_classes} classes in {path}")
    resize = int(extra["resize"]) if "resize" in extra else None
    crop = int(extra["crop"]) if "crop" in extra else None
    return LoadedWeights(model, tuple(labels), f"weights from {path.name}", resize=resize, crop=crop)


# ------------------------------------------------------------------ random

def default_labels(entry: ModelEntry, num_classes: int) -> tuple[str, ...]:
    """ImageNet class names for a 1000-class torchvision model, otherwise class0..classK-1."""
    if num_classes == 1000 and entry.torchvision_name is not None:
        return imagenet_categories(entry)
    return tuple(f"class{i}" for i in range(num_classes))


def random_weights(entry: ModelEntry, num_classes: int, *, seed: int = 0,
                   labels: tuple[str, ...] | None = None) -> LoadedWeights:
    """A seeded, He-initialised model: for plumbing tests and benchmarks, never for predictions."""
    if num_classes < 2:
        raise WeightsError(f"--num-classes must be >= 2, got {num_classes}")
    torch.manual_seed(seed)
    model = create_model(entry.name, num_classes)
    labels = labels or default_labels(entry, num_classes)
    if len(labels) != num_classes:
        raise WeightsError(f"{len(labels)} labels for {num_classes} classes")
    return LoadedWeights(model, tuple(labels), f"random weights (seed {seed})", random=True)


def looks_like_file(spec: str) -> bool:
    """Whether a --weights value names a file rather than an enum member."""
    return os.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".ckpt")) or Path(spec).exists()
