"""Load checkpoints without running code from them: sniffing, inert scanning, safe unpickling.

Every torch.save file goes through three steps, and nothing from the file runs before the last:

1. `file_kind` recognises the format from its bytes (a safetensors header is parsed, not guessed);
2. `pickle_scan.scan_checkpoint` replays the pickle inertly: it lists the exact globals the file
   names and bounds the sizes, depth and module count it declares against the file itself;
3. `allowlist.admit_globals` resolves each global to the one object defined under that exact name
   and policy, and ``torch.load(weights_only=True)`` runs with exactly that set
   (``torch.serialization.safe_globals``): torch's own unpickler enforces it.

``trust=True`` (the CLI's ``--trust``) replaces all of this by full unpickling, which runs
whatever code the file holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.serialization
from torch import nn

from . import pickle_scan
from .allowlist import admit_globals, check_allow_prefixes, ensure_cwd_importable, names_list
from .pickle_scan import Limits
from .types import RepfuseError

__all__ = [
    "CONTAINER_KEYS",
    "Limits",
    "LoadedCheckpoint",
    "admitted_globals",
    "file_kind",
    "find_model",
    "load_checkpoint",
    "load_object",
    "sha256_file",
]

# Keys under which training frameworks store the model in a dict checkpoint, most preferred first.
CONTAINER_KEYS: tuple[str, ...] = (
    "model",
    "ema",
    "model_ema",
    "ema_model",
    "module",
    "net",
    "network",
    "state",
)

_CHUNK = 1 << 20
_SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors format's own limit


@dataclass
class LoadedCheckpoint:
    """A model loaded from a checkpoint file, with what is needed to write it back the same way."""

    path: Path
    model: nn.Module
    container: Any  # the top-level object torch.load returned
    key: str | None  # where the model sits in a dict container; None when the file IS the model
    sha256: str  # of the file bytes
    dtype: torch.dtype  # dtype of the model's first floating parameter (or buffer)
    allow: tuple[str, ...] = ()  # the allow prefixes the file was loaded with
    trust: bool = False  # whether it was loaded with full (unsafe) unpickling
    kind: str = "model"  # "model": the file holds the module; "state_dict": weights put into a factory model
    file_format: str = "torch"  # "torch" (torch.save, zip or legacy) or "safetensors"
    prefix: str = ""  # key prefix stripped from a state_dict ("module." of DistributedDataParallel)
    factory: str | None = None  # the --model MODULE:CALLABLE that built the architecture
    factory_args: tuple[tuple[str, Any], ...] = ()  # its keyword arguments




def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()




def _check_readable(path: Path) -> None:
    if not path.exists():
        raise RepfuseError(f"{path}: no such file", "check the path of the checkpoint")
    if path.is_dir():
        raise RepfuseError(f"{path} is a directory, not a checkpoint file",
                           "pass the checkpoint file itself (.pt / .pth)")
    if not os.access(path, os.R_OK):
        raise RepfuseError(f"{path}: permission denied", "make the file readable")


def _corrupt(path: Path, exc: BaseException) -> RepfuseError:
    text = str(exc).strip()
    detail = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
    return RepfuseError(
        f"{path.name} is truncated or corrupt and could not be read ({detail[:120]})",
        "check that the file was copied completely (compare its size or checksum with the original)",
    )


_MODEL_HINT = ("pass --model MODULE:CALLABLE that builds the architecture (with --model-arg key=value for its "
               "arguments), e.g. --model timm:create_model --model-arg model_name=repvgg_a0")


def _is_safetensors(path: Path, head: bytes, size: int) -> bool:
    """Parse the safetensors header: an 8-byte little-endian length, then a JSON object of tensor
    entries whose data offsets lie inside the file."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    if not 2 <= length <= min(size - 8, _SAFETENSORS_MAX_HEADER):
        return False
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    if not isinstance(header, dict):
        return False
    data = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                return False
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data or not isinstance(entry.get("dtype"), str)
                or not isinstance(entry.get("shape"), list)):
            return False
    return True


def file_kind(path: Path | str) -> str:
    """'zip' (torch >= 1.6 format), 'pickle' (legacy torch.save) or 'safetensors', from the file's
    bytes (a safetensors header is parsed); RepfuseError for an empty or unrecognised file. Runs nothing."""
    path = Path(path)
    _check_readable(path)
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        raise RepfuseError(f"{path.name} is empty", "check that the file was written completely")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if _is_safetensors(path, head, size):
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    if head[8:9] == b"{":  # a safetensors header whose tensors lie past the end of the file
        raise RepfuseError(
            f"{path.name} is a truncated or corrupt safetensors file (its header does not match its size)",
            "check that the file was copied completely (compare its size or checksum with the original)",
        )
    raise RepfuseError(
        f"{path.name} is not a PyTorch checkpoint (unrecognised file format)",
        "pass a file written by torch.save (.pt / .pth / .bin / .ckpt) or a .safetensors file",
    )


def _sniff(path: Path) -> str:
    """'zip' or 'pickle'; RepfuseError for anything else (a safetensors file needs --model)."""
    kind = file_kind(path)
    if kind == "safetensors":
        raise RepfuseError(
            f"{path.name} is a safetensors file: it holds weights but no model architecture", _MODEL_HINT,
        )
    return kind


def _unpickling_detail(exc: BaseException) -> str:
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _legacy_module_error(path: Path) -> RepfuseError:
    return RepfuseError(
        f"{path.name} is a whole model saved in the legacy (pre-1.6, non-zip) torch.save "
        "format, which stores module source code and cannot be loaded safely",
        "re-save it with a current torch.save(model, path) where you trust it, "
        "or pass --trust if you made this file",
    )


def _torch_load(path: Path, trust: bool, pairs: list[tuple[Any, str]]) -> Any:
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(pairs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(exc)  # legacy whole-module files were refused by the scan already
        raise RepfuseError(
            f"{path.name} could not be loaded safely: {detail}",
            "pass --allow <package> for the package that defines the model classes, "
            "or --trust if you made this file",
        ) from exc
    except ModuleNotFoundError as exc:  # only reachable with trust
        raise RepfuseError(
            f"{path.name} needs module {exc.name!r}, which cannot be imported",
            "run repfuse from the directory that contains the model's code, or add it to PYTHONPATH",
        ) from exc
    except RepfuseError:
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc


def _first_float_dtype(model: nn.Module) -> torch.dtype:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def find_model(obj: Any) -> tuple[nn.Module | None, str | None]:
    if isinstance(obj, nn.Module):
        return obj, None
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            value = obj.get(key)
            if isinstance(value, nn.Module):
                return value, key
        for key, value in obj.items():
            if isinstance(value, nn.Module) and isinstance(key, str):
                return value, key
    return None, None


def _looks_like_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return True
    return any(_looks_like_state_dict(obj.get(k)) for k in ("state_dict", *CONTAINER_KEYS))


def _no_module_error(path: Path, obj: Any) -> RepfuseError:
    if _looks_like_state_dict(obj):
        return RepfuseError(
            f"{path.name} holds a state_dict (tensors only), not a model", _MODEL_HINT,
        )
    if isinstance(obj, Mapping):
        keys = [repr(k) for k in list(obj.keys())]
        return RepfuseError(
            f"{path.name} is a dict with no nn.Module in it (keys: {names_list(keys) or 'none'})",
            f"repfuse looks for a model under one of the keys {', '.join(CONTAINER_KEYS)} "
            "or any top-level value that is an nn.Module",
        )
    return RepfuseError(
        f"{path.name} holds a {type(obj).__name__}, not an nn.Module",
        "pass a checkpoint made with torch.save(model, path) or a dict holding the model",
    )


def _scan(path: Path, kind: str, limits: Limits) -> pickle_scan.PickleFacts:
    try:
        return pickle_scan.scan_checkpoint(path, kind, limits)
    except RepfuseError:
        raise
    except RecursionError as exc:
        raise RepfuseError(f"{path.name} nests objects too deeply to be read",
                           "the file is corrupt or was crafted") from exc
    except MemoryError as exc:
        raise RepfuseError(f"{path.name} declares more data than this machine can hold",
                           "the file is corrupt or was crafted") from exc
    except Exception as exc:  # the replay runs nothing from the file: any other error is a malformed file
        text = str(exc).lower()
        if "torchscript" in text or "constants.pkl" in text:
            raise RepfuseError(
                f"{path.name} is a TorchScript archive, not a torch.save checkpoint",
                "repfuse converts eager nn.Module checkpoints; pass the checkpoint the scripted model was made from",
            ) from exc
        raise _corrupt(path, exc) from exc


def admitted_globals(path: Path | str, allow: Sequence[str] = (),
                     limits: Limits | None = None) -> list[tuple[Any, str]]:
    """Scan `path` inertly, check its declared sizes and structure, and return the exact
    ``(object, name)`` pairs it may load with (see `allowlist`); RepfuseError otherwise."""
    path = Path(path)
    limits = limits or Limits()
    kind = _sniff(path)
    facts = _scan(path, kind, limits)
    pairs = admit_globals(path.name, facts.globals, allow)
    if facts.foreign_ids:
        raise _legacy_module_error(path) if "module" in facts.foreign_ids else _corrupt(
            path, ValueError(f"persistent objects of kind {names_list(sorted(facts.foreign_ids))}"))
    pickle_scan.check_structure(path, facts.root, {name: obj for obj, name in pairs}, limits)
    return pairs


def load_object(path: Path | str, *, allow: Sequence[str] = (), trust: bool = False,
                limits: Limits | None = None) -> tuple[Any, str]:
    """`torch.load` a torch.save file on the CPU without running code; return (object, sha256).

    Uses ``torch.load(weights_only=True)`` with exactly the globals `admitted_globals` resolves;
    `trust=True` switches to full unpickling, which can run arbitrary code from the file. Raises
    RepfuseError (one-line message and hint) for any bad input: missing, unreadable, truncated,
    oversized or foreign files, refused globals.
    """
    path = Path(path)
    _check_readable(path)
    allow = check_allow_prefixes(allow)
    if trust:
        _sniff(path)
        ensure_cwd_importable()
        pairs: list[tuple[Any, str]] = []
    else:
        pairs = admitted_globals(path, allow, limits)
    with ThreadPoolExecutor(max_workers=1) as pool:  # hashing releases the GIL: it overlaps the load
        hashing = pool.submit(sha256_file, path)
        obj = _torch_load(path, trust, pairs)
        try:
            digest = hashing.result()
        except OSError as exc:
            raise RepfuseError(f"{path}: cannot read ({exc.strerror})", "check the file") from exc
    return obj, digest


def load_checkpoint(path: Path | str, *, allow: Sequence[str] = (), trust: bool = False,
                    limits: Limits | None = None) -> LoadedCheckpoint:
    """Load a whole-model checkpoint (or a dict holding one) on the CPU, without running code.

    See `load_object` for the safety rules. RepfuseError also when the file holds no model (a
    state_dict needs an architecture: `repfuse.weights.load_into_factory`).
    """
    path = Path(path)
    allow = check_allow_prefixes(allow)
    obj, digest = load_object(path, allow=allow, trust=trust, limits=limits)
    model, key = find_model(obj)
    if model is None:
        raise _no_module_error(path, obj)
    return LoadedCheckpoint(
        path=path, model=model, container=obj, key=key, sha256=digest,
        dtype=_first_float_dtype(model), allow=allow, trust=trust,
    )


