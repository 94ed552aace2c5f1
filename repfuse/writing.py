"""Atomic writes and saving checkpoints: nothing half-written, never the input overwritten.

Rules: every output is written to a fresh temporary file next to the destination, checked (loaded
back) and only then renamed over the destination; on any error the temporary file is removed and an
existing destination is left as it was. Unless the input was loaded with trust, a checkpoint that
would not load again without running code is not written.

Temporary files are named ``.NAME.repfuse-PID-HEX.tmp`` and hold an exclusive ``flock`` while they
exist. A process killed outright (``kill -9``) cannot remove its own; the next write to, or check
of, the same destination removes every such file whose lock is free and whose PID is gone
(`sweep_stale`). A full disk or a file-size limit while writing is a `RepfuseError` (the CLI's
exit 2); a KeyboardInterrupt that torch's writers turn into a RuntimeError is raised again as
KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import os
import pickle
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allowlist import check_allow_prefixes
from .loading import Limits, LoadedCheckpoint, admitted_globals, sha256_file
from .types import RepfuseError

try:  # POSIX; elsewhere a temporary file counts as in use while its PID lives
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_write",
    "check_destination",
    "replace_in_container",
    "save_checkpoint",
    "save_object",
    "sweep_stale",
    "write_failure",
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


_TEMP_TAG = ".repfuse-"


def _temp_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(f".{name}{_TEMP_TAG}") + r"(?P<pid>[0-9]+)-[0-9a-f]{12}\.tmp")


def _lock(fd: int) -> bool:
    """Take an exclusive lock on `fd` without waiting; False when another process holds one."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or not a PID we can ask about): leave its file alone
    return True


def sweep_stale(dst: Path | str) -> list[Path]:
    """Remove the temporary files of `dst` that runs killed outright left behind: those whose lock
    is free and whose PID no longer runs. Returns the paths removed. Never raises for I/O."""
    dst = Path(dst)
    directory = dst.parent if str(dst.parent) else Path(os.curdir)
    pattern = _temp_pattern(dst.name)
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(directory) if pattern.fullmatch(e.name)]
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                if _lock(fd):  # nobody writes it: a leftover
                    os.unlink(path)
                    removed.append(path)
            finally:
                os.close(fd)
    return removed


def _open_temp(directory: Path, name: str) -> tuple[int, Path]:
    """Create a fresh temp file next to the destination (umask-respecting permissions), locked
    (see `sweep_stale`). The caller closes the returned descriptor when the file is gone or renamed."""
    for _ in range(100):
        tmp = directory / f".{name}{_TEMP_TAG}{os.getpid()}-{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        try:
            _lock(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, tmp
    raise FileExistsError(f"could not create a temporary file in {directory}")


_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and not any(e is s for s in seen) and len(seen) < 20:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def write_failure(exc: BaseException, dst: Path | str) -> RepfuseError | None:
    """The user-facing error for an OSError anywhere in `exc`'s chain (torch's writers wrap it in a
    RuntimeError), naming `dst`; None when the chain holds no OSError."""
    os_err = next((e for e in _chain(exc) if isinstance(e, OSError)), None)
    if os_err is None:
        return None
    dst = Path(dst)
    what = os_err.strerror or str(os_err) or type(os_err).__name__
    if os_err.errno == errno.EFBIG:
        hint = (f"{dst.name} is larger than the file-size limit of this process (ulimit -f): raise the "
                "limit or write it elsewhere")
    elif os_err.errno in _SPACE_ERRNOS:
        hint = f"the disk holding {dst.parent or '.'} is full: free some space or write {dst.name} elsewhere"
    else:
        hint = "check that the directory is writable and the disk has space"
    return RepfuseError(f"could not write {dst}: {what}; nothing was written there "
                        "(an existing file is unchanged)", hint)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_destination(dst: Path | str, *inputs: Path | str) -> Path:
    """Refuse (RepfuseError) an output path that is one of the input files, a directory, or in a
    directory that does not exist or is not writable; remove its stale temporary files
    (`sweep_stale`). Cheap: call it before any work."""
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
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RepfuseError(f"output directory {directory} is not writable", "choose a directory you can write to")
    sweep_stale(dst)
    return dst


def atomic_write(dst: Path | str, write: Callable[[Path], str | None],
                 check: Callable[[Path], None] | None = None) -> str:
    """Write `dst` atomically; return the sha256 of the written bytes.

    `write(tmp)` writes a fresh temporary file next to `dst` (and may return the sha256 of what it
    wrote, else the file is read again for it); `check(tmp)` (when given) loads it
    back and raises if it is wrong; only then is the temporary file renamed over `dst`. On any
    error, including KeyboardInterrupt, the temporary file is removed and an existing `dst` is left
    as it was. An OSError (also one that torch wrapped in a RuntimeError: a full disk, a file-size
    limit) becomes RepfuseError; an interrupt that torch wrapped is raised as KeyboardInterrupt.
    """
    dst = Path(dst)
    directory = dst.parent if str(dst.parent) else Path(os.curdir)
    sweep_stale(dst)
    tmp: Path | None = None
    fd: int | None = None
    try:
        fd, tmp = _open_temp(directory, dst.name)
        written = write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        digest = written if isinstance(written, str) else sha256_file(tmp)
        os.replace(tmp, dst)
        tmp = None
    except (RepfuseError, KeyboardInterrupt):
        raise
    except BaseException as exc:
        if any(isinstance(e, KeyboardInterrupt) for e in _chain(exc)):
            raise KeyboardInterrupt from exc
        failure = write_failure(exc, dst)
        if failure is None:
            raise
        raise failure from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _fsync_dir(directory)
    return digest


class _HashingFile:
    """A binary file that hashes what is written to it (no second read of a large file for its sha256)."""

    def __init__(self, f: Any) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _torch_save_to(obj: Any) -> Callable[[Path], str]:
    def write(tmp: Path) -> str:
        # through a file object: torch.save(obj, path) would record the (temporary) file name in the
        # zip archive, so the same model would give different bytes at every run
        with open(tmp, "wb") as f:
            hashing = _HashingFile(f)
            torch.save(obj, hashing)
        return hashing.digest.hexdigest()
    return write


def save_object(obj: Any, dst: Path | str, *, inputs: Sequence[Path | str] = (), allow: Sequence[str] = (),
                trust: bool = False, check: Callable[[Path], None] | None = None,
                limits: Limits | None = None) -> str:
    """`torch.save(obj)` to `dst` atomically (see `atomic_write`); return the sha256 of the file.

    Refuses to overwrite any of `inputs`. Unless `trust`, also refuses to write a file that would
    not load again with ``weights_only=True`` under the `allow` prefixes (and `limits`). `check(tmp)`
    runs on the written temporary file before it replaces `dst`.
    """
    dst = check_destination(dst, *inputs)
    allow = check_allow_prefixes(allow)

    def full_check(tmp: Path) -> None:
        if not trust:
            _check_reloadable(tmp, dst, allow, limits)
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
                    check: Callable[[Path], None] | None = None, limits: Limits | None = None) -> str:
    """Write `loaded`'s container with only the model replaced by `model` (or `model` alone when
    the file was the model) to `dst`, atomically; return the sha256 of the written file.

    Refuses (RepfuseError) to overwrite the input file. Unless the input was loaded with trust,
    also refuses to write a file that would not load again under the same allow-list. `check(tmp)`
    runs on the written temporary file before it replaces `dst`. On any error, including
    KeyboardInterrupt, no temporary file is left behind and `dst` is untouched.
    """
    obj = _replace_model(loaded.container, loaded.key, model)
    return save_object(obj, dst, inputs=(loaded.path,), allow=loaded.allow, trust=loaded.trust, check=check,
                       limits=limits)


def _check_reloadable(tmp: Path, dst: Path, allow: Sequence[str], limits: Limits | None = None) -> None:
    try:
        admitted_globals(tmp, allow, limits)
    except RepfuseError as exc:
        raise RepfuseError(
            f"refusing to write {dst.name}: it would not load again without running code "
            f"({exc.message.split(': ', 1)[-1]})",
            "the converted model contains classes outside torch.nn, repfuse and the --allow prefixes",
        ) from exc
