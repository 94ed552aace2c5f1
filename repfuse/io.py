"""Load and save checkpoints safely: allow-listed unpickling, container handling, atomic writes.

Loading never runs code from the file unless the caller passes ``trust=True``: every file goes
through ``torch.load(weights_only=True)``, and the classes it needs are allow-listed first from a
static scan of the pickle (``torch.serialization.get_unsafe_globals_in_checkpoint`` for zip
checkpoints, an equivalent opcode scan for legacy ones). Allowed by default: classes under
``torch.nn``, repfuse's own classes, and every module prefix the caller names in ``allow``.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import copy
import hashlib
import importlib
import os
import pickle
import pickletools
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.serialization
from torch import nn

from .types import RepfuseError

__all__ = [
    "CONTAINER_KEYS",
    "LoadedCheckpoint",
    "allowed_globals_for",
    "atomic_write",
    "check_allow_prefixes",
    "check_destination",
    "ensure_cwd_importable",
    "file_kind",
    "find_model",
    "is_allowed_name",
    "load_checkpoint",
    "load_object",
    "needed_globals",
    "resolve_global",
    "save_checkpoint",
    "save_object",
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

# Classes under these prefixes are always allowed (classes only, never functions).
_BUILTIN_CLASS_PREFIXES: tuple[str, ...] = ("torch.nn", "repfuse")

# Modules whose globals can run code or touch the system when called by the unpickler. They are
# never allowed by an --allow prefix; only --trust loads a file that needs them.
_DANGEROUS_MODULES = frozenset({
    "__builtin__", "__main__", "_io", "_pickle", "_posixsubprocess", "_thread", "asyncio",
    "builtins", "code", "codeop", "commands", "ctypes", "functools", "importlib", "io",
    "marshal", "multiprocessing", "nt", "operator", "os", "pathlib", "pickle", "pip",
    "platform", "posix", "pty", "runpy", "setuptools", "shutil", "signal", "socket",
    "subprocess", "sys", "tempfile", "threading", "types", "webbrowser",
})

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_NAMES_SHOWN = 4
_CHUNK = 1 << 20


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


# --------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# the allow-list


def _prefix_match(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def check_allow_prefixes(allow: Sequence[str]) -> tuple[str, ...]:
    """Validate user allow prefixes (dotted module paths); raise RepfuseError for a bad one."""
    if isinstance(allow, str):  # a common slip: allow="models" instead of ["models"]
        allow = (allow,)
    out: list[str] = []
    for raw in allow:
        prefix = str(raw).strip().strip(".")
        parts = prefix.split(".")
        if not prefix or not all(p.isidentifier() for p in parts):
            raise RepfuseError(
                f"--allow {raw!r} is not a module path",
                "pass a dotted Python module prefix, e.g. --allow models or --allow timm.layers",
            )
        if parts[0] in _DANGEROUS_MODULES:
            raise RepfuseError(
                f"--allow {prefix} is refused: globals from {parts[0]} can run arbitrary code while loading",
                "allow only the packages that define your model classes; "
                "--trust loads anything, but only use it for files you made yourself",
            )
        if prefix == "torch":
            raise RepfuseError(
                "--allow torch is too broad: it would let the file call any torch function while loading",
                "name the sub-package that holds the classes, e.g. --allow torch.ao.nn",
            )
        out.append(prefix)
    return tuple(out)


def is_allowed_name(name: str, allow: Sequence[str] = ()) -> bool:
    """Whether the dotted global `name` (``module.qualname``) passes the allow policy by name.

    ``torch.nn.*`` and ``repfuse.*`` pass here but must also resolve to a class
    (see `allowed_globals_for`); user prefixes allow any global under them.
    """
    if _top(name) in _DANGEROUS_MODULES:
        return False
    if any(_prefix_match(name, p) for p in _BUILTIN_CLASS_PREFIXES):
        return True
    return any(_prefix_match(name, p) for p in allow)


def resolve_global(name: str) -> Any:
    """Import the object named by the dotted `name` (longest importable module prefix, then
    attributes). Raises RepfuseError when it cannot. Only call for names that passed the policy:
    importing a module runs its code."""
    parts = name.split(".")
    error: BaseException | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            error = exc  # the last (shortest) failure names the missing package
            continue
        except Exception as exc:  # the module exists but raised while importing
            raise RepfuseError(
                f"the checkpoint needs {name}, but importing {module_name} failed: "
                f"{type(exc).__name__}: {exc}",
                "fix the import error in that module (run with REPFUSE_DEBUG=1 for the traceback)",
            ) from exc
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError as exc:
            raise RepfuseError(
                f"the checkpoint needs {name}, but module {module_name} has no "
                f"{'.'.join(parts[cut:])}",
                "the code on your path differs from the code that saved the checkpoint; "
                "use the matching version of the package",
            ) from exc
        return obj
    pkg = _top(name)
    raise RepfuseError(
        f"the checkpoint needs {name}, but it cannot be imported ({error})",
        f"run repfuse from the directory that contains the '{pkg}' package, or add it to PYTHONPATH",
    ) from error


def ensure_cwd_importable() -> None:
    """Make the current directory importable, as `python -m` does (so --allow models finds ./models)."""
    cwd = os.getcwd()
    if cwd not in (os.path.abspath(p or os.curdir) for p in sys.path):
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _refusal(path: Path, refused: list[str]) -> RepfuseError:
    dangerous = sorted(n for n in refused if _top(n) in _DANGEROUS_MODULES and _top(n) != "__main__")
    if dangerous:
        return RepfuseError(
            f"{path.name} would call {_names(dangerous)} while loading, which can run arbitrary code; "
            "refusing to load it",
            "do not load this file unless you made it yourself; --trust would run that code",
        )
    main = sorted(n for n in refused if _top(n) == "__main__")
    if main:
        return RepfuseError(
            f"{path.name} needs {_names(main)}: classes defined in the training script itself "
            "(__main__), which cannot be imported",
            "move those classes into an importable module and re-save the checkpoint, "
            "or save a state_dict instead",
        )
    tops = sorted({_top(n) for n in refused})
    flags = " ".join(f"--allow {t}" for t in tops)
    count = len(refused)
    return RepfuseError(
        f"{path.name} needs {count} global{'s' if count != 1 else ''} that "
        f"{'are' if count != 1 else 'is'} not allow-listed: {_names(refused)}",
        f"if you trust the code in {', '.join(tops)}, pass {flags} "
        "(or --trust to allow everything, which can run code hidden in the file)",
    )


def allowed_globals_for(path: Path | str, allow: Sequence[str] = ()) -> list[tuple[Any, str]]:
    """The globals `path` needs beyond torch's defaults, imported, as ``(object, name)`` pairs
    ready for ``torch.serialization.safe_globals``.

    Raises RepfuseError naming the globals the allow policy refuses (torch.nn and repfuse
    classes, plus anything under the `allow` prefixes, are allowed) and the flag that would
    allow them. The current directory is made importable first.
    """
    path = Path(path)
    allow = check_allow_prefixes(allow)
    needed = needed_globals(path)
    refused = [n for n in needed if not is_allowed_name(n, allow)]
    if refused:
        raise _refusal(path, refused)
    if any(not _is_builtin_class_name(n) for n in needed):
        ensure_cwd_importable()
    pairs: list[tuple[Any, str]] = []
    not_classes: list[str] = []
    for name in needed:
        obj = resolve_global(name)
        user_allowed = any(_prefix_match(name, p) for p in allow)
        if not user_allowed and not isinstance(obj, type):
            not_classes.append(name)  # torch.nn / repfuse functions are not allowed by default
            continue
        pairs.append((obj, name))
    if not_classes:
        raise _refusal(path, not_classes)
    return pairs


def _is_builtin_class_name(name: str) -> bool:
    return any(_prefix_match(name, p) for p in _BUILTIN_CLASS_PREFIXES)


# --------------------------------------------------------------------------------------------
# scanning a checkpoint's pickle without running it


def _default_safe_names() -> set[str] | None:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals
    except ImportError:  # pragma: no cover - private API moved; torch's unpickler still enforces
        return None
    return set(_get_allowed_globals()) | set(_get_user_allowed_globals())


def _map_py2(module: str, name: str) -> tuple[str, str]:
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _pickle_ops(f: BinaryIO) -> Iterator[tuple[str, Any]]:
    """Opcodes (name, arg) of the next pickle in `f`, up to its STOP."""
    for op, arg, _pos in pickletools.genops(f):
        yield op.name, arg


def _globals_in_pickle(f: BinaryIO) -> set[str]:
    found: set[str] = set()
    strings: list[str] = []
    for name, arg in _pickle_ops(f):
        if name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            module, attr = _map_py2(module, attr)
            found.add(f"{module}.{attr}")
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings = [*strings[-1:], str(arg)]
        elif name == "STACK_GLOBAL":  # protocol 4+: module and name were pushed as strings
            found.add(".".join(strings[-2:]) if len(strings) == 2 else "<unknown STACK_GLOBAL>")
    return found


def _scan_legacy(path: Path) -> set[str]:
    """All globals in a legacy (non-zip) torch.save file: magic, protocol, sys_info, then the object."""
    with open(path, "rb") as f:
        first = list(_pickle_ops(f))
        if not any(n in ("LONG1", "LONG4") and a == _TORCH_LEGACY_MAGIC for n, a in first):
            raise RepfuseError(
                f"{path.name} is a plain Python pickle, not a torch.save checkpoint",
                "load it in your own code and re-save it with torch.save(model, path)",
            )
        for _ in range(2):  # protocol version, sys_info: plain ints and dicts
            list(_pickle_ops(f))
        return _globals_in_pickle(f)


def _is_legacy(path: Path) -> bool:
    return _sniff(path) == "pickle"


def needed_globals(path: Path | str) -> list[str]:
    """Sorted dotted names of the globals in the checkpoint that torch does not allow by default.

    Reads the pickle statically; runs nothing. Raises RepfuseError for a file that is not a
    readable torch.save checkpoint.
    """
    path = Path(path)
    _check_readable(path)
    kind = _sniff(path)
    try:
        if kind == "zip":
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        found = _scan_legacy(path)
    except RepfuseError:
        raise
    except pickle.UnpicklingError as exc:
        raise RepfuseError(
            f"{path.name} uses pickle features that safe loading does not support ({exc})",
            "re-save it with a plain torch.save(model, path), or pass --trust if you made this file",
        ) from exc
    except ValueError as exc:
        if "torchscript" in str(exc).lower():
            raise RepfuseError(
                f"{path.name} is a TorchScript archive, not a torch.save checkpoint",
                "repfuse converts eager nn.Module checkpoints; pass the checkpoint the scripted "
                "model was made from",
            ) from exc
        raise _corrupt(path, exc) from exc
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    safe = _default_safe_names()
    if safe is None:
        return sorted(n for n in found if _top(n) not in ("torch", "collections", "builtins", "_codecs")
                      or _is_builtin_class_name(n))
    return sorted(found - safe)


# --------------------------------------------------------------------------------------------
# loading


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


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    return len(head) >= 10 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def file_kind(path: Path | str) -> str:
    """'zip' (torch >= 1.6 format), 'pickle' (legacy torch.save) or 'safetensors', from the first
    bytes; RepfuseError for an empty or unrecognised file. Reads 16 bytes, runs nothing."""
    path = Path(path)
    _check_readable(path)
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        raise RepfuseError(f"{path.name} is empty", "check that the file was written completely")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if _looks_like_safetensors(head, size):
        return "safetensors"
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


def _torch_load(path: Path, trust: bool, pairs: list[tuple[Any, str]]) -> Any:
    legacy = _is_legacy(path)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(pairs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickling_detail(exc)
        if legacy and "persistent_load" in detail:
            raise RepfuseError(
                f"{path.name} is a whole model saved in the legacy (pre-1.6, non-zip) torch.save "
                "format, which stores module source code and cannot be loaded safely",
                "re-save it with a current torch.save(model, path) where you trust it, "
                "or pass --trust if you made this file",
            ) from exc
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
            f"{path.name} is a dict with no nn.Module in it (keys: {_names(keys) or 'none'})",
            f"repfuse looks for a model under one of the keys {', '.join(CONTAINER_KEYS)} "
            "or any top-level value that is an nn.Module",
        )
    return RepfuseError(
        f"{path.name} holds a {type(obj).__name__}, not an nn.Module",
        "pass a checkpoint made with torch.save(model, path) or a dict holding the model",
    )


def load_object(path: Path | str, *, allow: Sequence[str] = (), trust: bool = False) -> tuple[Any, str]:
    """`torch.load` a torch.save file on the CPU without running code; return (object, sha256).

    Uses ``torch.load(weights_only=True)`` with torch.nn classes, repfuse's classes and the
    `allow` module prefixes allow-listed; `trust=True` switches to full unpickling, which can run
    arbitrary code from the file. Raises RepfuseError (one-line message and hint) for any bad
    input: missing, unreadable, truncated or foreign files, refused globals.
    """
    path = Path(path)
    _check_readable(path)
    allow = check_allow_prefixes(allow)
    if trust:
        _sniff(path)
        ensure_cwd_importable()
        pairs: list[tuple[Any, str]] = []
    else:
        pairs = allowed_globals_for(path, allow)
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise RepfuseError(f"{path}: cannot read ({exc.strerror})", "check the file") from exc
    return _torch_load(path, trust, pairs), digest


def load_checkpoint(path: Path | str, *, allow: Sequence[str] = (), trust: bool = False) -> LoadedCheckpoint:
    """Load a whole-model checkpoint (or a dict holding one) on the CPU, without running code.

    See `load_object` for the safety rules. RepfuseError also when the file holds no model (a
    state_dict needs an architecture: `repfuse.weights.load_into_factory`).
    """
    path = Path(path)
    allow = check_allow_prefixes(allow)
    obj, digest = load_object(path, allow=allow, trust=trust)
    model, key = find_model(obj)
    if model is None:
        raise _no_module_error(path, obj)
    return LoadedCheckpoint(
        path=path, model=model, container=obj, key=key, sha256=digest,
        dtype=_first_float_dtype(model), allow=allow, trust=trust,
    )


# --------------------------------------------------------------------------------------------
# saving


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _replace_model(container: Any, key: str | None, model: nn.Module) -> Any:
    if key is None:
        return model
    if not isinstance(container, Mapping):
        raise TypeError("a container key was given but the container is not a mapping")
    try:
        new = copy.copy(container)
        new[key] = model
    except Exception:
        new = dict(container)
        new[key] = model
    return new


def _open_temp(directory: Path, name: str) -> tuple[int, Path]:
    """Create a fresh temp file next to the destination (umask-respecting permissions)."""
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file in {directory}")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_destination(dst: Path | str, *inputs: Path | str) -> Path:
    """Refuse (RepfuseError) an output path that is one of the input files, a directory, or in a
    directory that does not exist. Cheap: call it before any work."""
    dst = Path(dst)
    for src in inputs:
        if _same_file(Path(src), dst):
            raise RepfuseError(
                f"output {dst} is the input file; refusing to overwrite it",
                "write the converted checkpoint to a different path",
            )
    if dst.is_dir():
        raise RepfuseError(f"output {dst} is a directory", "pass a file path for the output, e.g. out.pt")
    directory = dst.parent if str(dst.parent) else Path(os.curdir)
    if not directory.is_dir():
        raise RepfuseError(f"output directory {directory} does not exist", "create it first")
    return dst


def atomic_write(dst: Path | str, write: Callable[[Path], None],
                 check: Callable[[Path], None] | None = None) -> str:
    """Write `dst` atomically; return the sha256 of the written bytes.

    `write(tmp)` writes a fresh temporary file next to `dst`; `check(tmp)` (when given) loads it
    back and raises if it is wrong; only then is the temporary file renamed over `dst`. On any
    error, including KeyboardInterrupt, the temporary file is removed and an existing `dst` is left
    as it was. OSError becomes RepfuseError.
    """
    dst = Path(dst)
    directory = dst.parent if str(dst.parent) else Path(os.curdir)
    tmp: Path | None = None
    try:
        fd, tmp = _open_temp(directory, dst.name)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        digest = sha256_file(tmp)
        os.replace(tmp, dst)
        tmp = None
    except OSError as exc:
        raise RepfuseError(
            f"could not write {dst}: {exc.strerror or exc}",
            "check the directory is writable and the disk has space",
        ) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(directory)
    return digest


def _torch_save_to(obj: Any) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        # through a file object: torch.save(obj, path) would record the (temporary) file name in the
        # zip archive, so the same model would give different bytes at every run
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return write


def save_object(obj: Any, dst: Path | str, *, inputs: Sequence[Path | str] = (), allow: Sequence[str] = (),
                trust: bool = False, check: Callable[[Path], None] | None = None) -> str:
    """`torch.save(obj)` to `dst` atomically (see `atomic_write`); return the sha256 of the file.

    Refuses to overwrite any of `inputs`. Unless `trust`, also refuses to write a file that would
    not load again with ``weights_only=True`` under the `allow` prefixes. `check(tmp)` runs on the
    written temporary file before it replaces `dst`.
    """
    dst = check_destination(dst, *inputs)
    allow = check_allow_prefixes(allow)

    def full_check(tmp: Path) -> None:
        if not trust:
            _check_reloadable(tmp, dst, allow)
        if check is not None:
            check(tmp)

    try:
        return atomic_write(dst, _torch_save_to(obj), full_check)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise RepfuseError(
            f"the converted model cannot be saved: {type(exc).__name__}: {exc}",
            "the model holds an object that cannot be pickled (a lambda, a local class, a hook)",
        ) from exc


def replace_in_container(container: Any, key: str | None, value: Any) -> Any:
    """A shallow copy of `container` with `container[key]` replaced by `value` (`value` itself when
    `key` is None). The input container is not mutated."""
    return _replace_model(container, key, value)


def save_checkpoint(loaded: LoadedCheckpoint, model: nn.Module, dst: Path | str,
                    check: Callable[[Path], None] | None = None) -> str:
    """Write `loaded`'s container with only the model replaced by `model` (or `model` alone when
    the file was the model) to `dst`, atomically; return the sha256 of the written file.

    Refuses (RepfuseError) to overwrite the input file. Unless the input was loaded with trust,
    also refuses to write a file that would not load again under the same allow-list. `check(tmp)`
    runs on the written temporary file before it replaces `dst`. On any error, including
    KeyboardInterrupt, no temporary file is left behind and `dst` is untouched.
    """
    obj = _replace_model(loaded.container, loaded.key, model)
    return save_object(obj, dst, inputs=(loaded.path,), allow=loaded.allow, trust=loaded.trust, check=check)


def _check_reloadable(tmp: Path, dst: Path, allow: Sequence[str]) -> None:
    try:
        allowed_globals_for(tmp, allow)
    except RepfuseError as exc:
        raise RepfuseError(
            f"refusing to write {dst.name}: it would not load again without running code "
            f"({exc.message.split(': ', 1)[-1]})",
            "the converted model contains classes outside torch.nn, repfuse and the --allow prefixes",
        ) from exc
