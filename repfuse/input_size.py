"""The input size to verify and export at: `--input-shape`, else what the model's own ecosystem
recorded about it, else a guess from the first layer (flagged, so the report can warn).

Metadata read (never code run): timm's ``model.pretrained_cfg["input_size"]`` (also
``default_cfg``), Ultralytics' ``model.args["imgsz"]`` (a dict or a namespace; an int or [h, w]),
and Hugging Face transformers' ``model.config.image_size`` / ``num_channels``. Values that are not
plausible sizes (positive integers, at most `MAX_SIDE`) are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import verify

__all__ = ["BATCH", "MAX_SIDE", "InputSize", "infer"]

BATCH = 2  # a batch of two also catches ops that mix samples (BN in train mode)
MAX_SIDE = 4096


@dataclass(frozen=True)
class InputSize:
    shapes: tuple[tuple[int, ...], ...]
    source: str  # where the size came from, in words
    guessed: bool  # True: nothing recorded it; the report warns


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or not value:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE for v in value):
        return None
    return tuple(value)


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None) if obj is not None and not isinstance(obj, (str, bytes, int, float)) else None


def _first_layer_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
    return None


def _timm(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = _ints(_get(cfg, "input_size")) if isinstance(cfg, Mapping) else None
        if size is not None and len(size) >= 2:
            return (BATCH, *size), f"timm {attr}['input_size']"
    return None


def _spatial(size: tuple[int, ...], channels: int | None) -> tuple[int, ...] | None:
    if channels is None:
        return None
    hw = size * 2 if len(size) == 1 else size
    return (BATCH, channels, *hw) if len(hw) == 2 else None


def _ultralytics(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    args = getattr(model, "args", None)
    size = _ints(_get(args, "imgsz"))
    if size is None:
        return None
    yaml = getattr(model, "yaml", None)
    channels = _ints(_get(yaml, "ch"))
    shape = _spatial(size, channels[0] if channels else _first_layer_channels(model))
    return (shape, "Ultralytics args['imgsz']") if shape else None


def _transformers(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    config = getattr(model, "config", None)
    size = _ints(_get(config, "image_size"))
    if size is None:
        return None
    channels = _ints(_get(config, "num_channels"))
    shape = _spatial(size, channels[0] if channels else _first_layer_channels(model))
    return (shape, "transformers config.image_size") if shape else None


def infer(model: nn.Module) -> InputSize:
    """The input shapes for `model` from its metadata, else guessed from its first layer
    (RepfuseError when it has no conv or linear layer to guess from)."""
    for reader in (_timm, _ultralytics, _transformers):
        found = reader(model)
        if found is not None:
            return InputSize((found[0],), found[1], guessed=False)
    shapes = verify.infer_input_shapes(model)
    what = " and ".join("×".join(map(str, s)) for s in shapes)
    return InputSize(tuple(tuple(s) for s in shapes), f"guessed {what} from the first layer", guessed=True)
