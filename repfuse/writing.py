"""Atomic writes and saving checkpoints: nothing half-written, never the input overwritten.

Rules: every output is written to a fresh temporary file next to the destination, checked (loaded
back) and only then renamed over the destination; on any error the temporary file is removed and an
existing destination is left as it was. Unless the input was loaded with trust, a checkpoint that
would not load again without running code is not written.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allowlist import check_allow_prefixes
from .loading import LoadedCheckpoint, admitted_globals, sha256_file
from .types import RepfuseError

__all__ = [
    "atomic_write",
    "check_destination",
    "replace_in_container",
    "save_checkpoint",
    "save_object",
]


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
        admitted_globals(tmp, allow)
    except RepfuseError as exc:
        raise RepfuseError(
            f"refusing to write {dst.name}: it would not load again without running code "
            f"({exc.message.split(': ', 1)[-1]})",
            "the converted model contains classes outside torch.nn, repfuse and the --allow prefixes",
        ) from exc
