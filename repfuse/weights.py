"""state_dict inputs: read the weights (torch.save or safetensors, without running code), find them
inside a training container, strip a DistributedDataParallel ``module.`` prefix, and fit them
*strictly* into the architecture a `--model` factory builds. Also: the NaN / Inf guard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import factory
from . import io as rio
from .types import RepfuseError

__all__ = [
    "STATE_DICT_KEYS",
    "check_finite",
    "find_state_dict",
    "fit_state_dict",
    "load_into_factory",
    "model_tensors",
    "read_weights",
    "strip_prefix",
]

# Where training frameworks keep the weights in a checkpoint dict, most preferred first.
STATE_DICT_KEYS: tuple[str, ...] = (
    "state_dict", "model_state_dict", *rio.CONTAINER_KEYS, "state_dict_ema", "params", "weights",
)
_SHOWN = 4
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)  # counters older checkpoints lack; never used in eval


def _names(items: Sequence[str], shown: int = _SHOWN) -> str:
    more = len(items) - shown
    text = ", ".join(items[:shown])
    return f"{text} and {more} more" if more > 0 else text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('h') else 's'}"


def _shape(t: torch.Tensor | torch.Size) -> str:
    dims = tuple(t.shape if isinstance(t, torch.Tensor) else t)
    return "×".join(map(str, dims)) or "scalar"


# ------------------------------------------------------------------------------------------------
# reading


def read_weights(path: Path | str, *, allow: Sequence[str] = (), trust: bool = False,
                 limits: rio.Limits | None = None) -> tuple[Any, str, str]:
    """(object, sha256, file format) of a torch.save file or a .safetensors file, loaded on the CPU
    without running code (torch files: `io.load_object`'s rules, within `limits`)."""
    path = Path(path)
    kind = rio.file_kind(path)
    if kind != "safetensors":
        obj, digest = rio.load_object(path, allow=allow, trust=trust, limits=limits)
        return obj, digest, "torch"
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise RepfuseError(f"{path.name} is a truncated or corrupt safetensors file ({detail})",
                           "check that the file was copied completely (compare its size or checksum)") from exc
    return tensors, rio.sha256_file(path), "safetensors"


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def find_state_dict(obj: Any, path: Path | str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The weights in a loaded checkpoint and the container key they sit under (None: top level).

    Accepts a state_dict, a dict holding one under a usual key (`STATE_DICT_KEYS`, then any other
    key), or a module (its state_dict). RepfuseError naming the keys when there is none.
    """
    name = Path(path).name
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict()), None
    if _is_state_dict(obj):
        return dict(obj), None
    if isinstance(obj, Mapping):
        candidates = [k for k in STATE_DICT_KEYS if k in obj]
        candidates += [k for k in obj if isinstance(k, str) and k not in candidates]
        for key in candidates:
            value = obj[key]
            if _is_state_dict(value):
                return dict(value), key
            if isinstance(value, nn.Module):
                return dict(value.state_dict()), key
        keys = [repr(k) for k in obj]
        raise RepfuseError(
            f"{name} holds no state_dict (a dict of tensors); its keys: {_names(keys) or 'none'}",
            f"repfuse looks for the weights at the top level or under {', '.join(STATE_DICT_KEYS[:6])}, …",
        )
    raise RepfuseError(f"{name} holds a {type(obj).__name__}, not a state_dict",
                       "pass the file written by torch.save(model.state_dict(), path) or a .safetensors file")


def strip_prefix(state: Mapping[str, torch.Tensor], expected: Iterable[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Drop a key prefix every key shares (DistributedDataParallel's ``module.``, torch.compile's
    ``_orig_mod.``, a Lightning module's ``model.``) while that makes the keys fit `expected` better.
    Returns (state, the prefix removed)."""
    want = set(expected)
    keys = list(state)
    if not keys or set(keys) <= want:
        return dict(state), ""
    # every prefix of dotted components all keys share; take the one that fits `expected` best
    best, best_score = "", len(set(keys) & want)
    prefix = ""
    while True:
        heads = {k[len(prefix):].split(".", 1)[0] for k in keys}
        if len(heads) != 1 or any("." not in k[len(prefix):] for k in keys):
            break
        prefix += heads.pop() + "."
        score = len({k[len(prefix):] for k in keys} & want)
        if score > best_score:
            best, best_score = prefix, score
    if not best:
        return dict(state), ""
    return {k[len(best):]: v for k, v in state.items()}, best


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, spec: str) -> None:
    """Load `state` into `model` strictly, keeping the checkpoint's dtypes (``assign=True``).

    Missing keys, unexpected keys and shape mismatches are one RepfuseError that names a few of
    each and counts them. Only ``num_batches_tracked`` counters may be missing (eval ignores them).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} (checkpoint {_shape(state[k])}, model {_shape(expected[k])})"
                  for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{_plural(len(missing), 'missing key')}: {_names(missing)}")
    if unexpected:
        problems.append(f"{_plural(len(unexpected), 'unexpected key')}: {_names(unexpected)}")
    if mismatched:
        problems.append(f"{_plural(len(mismatched), 'shape mismatch')}: {_names(mismatched, 3)}")
    if problems:
        raise RepfuseError(
            f"the weights in {source} do not fit the model {spec} builds: {'; '.join(problems)}",
            "check that --model and its --model-arg values (e.g. num_classes, width) build the architecture "
            "the checkpoint was trained with; repfuse never loads a partial state_dict",
        )
    full = dict(state)
    for k in expected:
        if k not in full:  # an optional counter: keep the model's own
            full[k] = expected[k]
    try:
        model.load_state_dict(full, strict=True, assign=True)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RepfuseError(f"the weights in {source} do not load into the model {spec} builds: {first}",
                           "check --model and --model-arg") from exc


def _float_dtype(model: nn.Module) -> torch.dtype:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def load_into_factory(path: Path | str, spec: str, args: Sequence[tuple[str, Any]] = (), *,
                      allow: Sequence[str] = (), trust: bool = False, flag: str = "--model",
                      limits: rio.Limits | None = None) -> rio.LoadedCheckpoint:
    """Read the state_dict in `path` (safely), build the architecture with `spec(**args)`, and load
    the weights into it strictly. The file is read and checked before the factory's module is
    imported, so a bad file never runs user code."""
    path = Path(path)
    allow = rio.check_allow_prefixes(allow)
    obj, digest, fmt = read_weights(path, allow=allow, trust=trust, limits=limits)
    state, key = find_state_dict(obj, path)
    check_finite(state.items(), f"{path.name}")
    model = factory.build_model(spec, args, flag)
    state, prefix = strip_prefix(state, model.state_dict().keys())
    fit_state_dict(model, state, path.name, spec)
    return rio.LoadedCheckpoint(path=path, model=model.eval(), container=obj, key=key, sha256=digest,
                                dtype=_float_dtype(model), allow=allow, trust=trust, kind="state_dict",
                                file_format=fmt, prefix=prefix, factory=spec,
                                factory_args=tuple(args))


# ------------------------------------------------------------------------------------------------
# NaN / Inf


def model_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter and buffer, duplicates (shared tensors) once."""
    seen: set[int] = set()
    out = []
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def check_finite(named: Iterable[tuple[str, torch.Tensor]], where: str,
                 hint: str = "the checkpoint is damaged or training diverged; repfuse converts only finite weights"
                 ) -> None:
    """RepfuseError naming the tensors (a few, then a count) that hold NaN or Inf."""
    bad = []
    for name, t in named:
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        if t.numel() and bool(torch.isfinite(t.detach().sum())):  # a finite sum: no NaN or Inf in it
            continue
        finite = torch.isfinite(t.detach())  # element by element (a sum of finite values may overflow)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(t.detach()).sum())
        inf = t.numel() - int(finite.sum()) - nan
        what = " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if p)
        bad.append(f"{name} ({what})")
    if bad:
        raise RepfuseError(f"{where} has weights that are NaN or Inf: {_names(bad)}", hint)

