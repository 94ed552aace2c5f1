"""Fuzz the loader: random and mutated checkpoints either load or are refused with a RepfuseError, and
nothing outside the lists ever runs. An audit hook watches for process, file-writing, network and
code-execution events while the loader works, so a payload that slipped through would be caught
even if it left no marker."""

from __future__ import annotations

import io
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_loading_attacks import call_global, write_legacy, write_zip
from torch import nn

from repfuse import io as rio
from repfuse.samples import randomize_bn, repvgg_tiny
from repfuse.types import RepfuseError

_WATCHING = False
_EVENTS: list[str] = []
_FLAGGED = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.remove", "os.rename",
            "os.unlink", "os.rmdir", "os.mkdir", "subprocess.Popen", "socket.", "ctypes.", "shutil.", "exec",
            "compile", "builtins.input", "webbrowser.open", "pty.spawn")


# importing modules of torch, repfuse and the standard library is fine (zipfile decodes names with encodings.*)
_TRUSTED_CODE = tuple(str(Path(m.__file__).parent) for m in (torch, rio, os))


def _hook(event: str, args: tuple) -> None:
    if not _WATCHING:
        return
    if event in ("exec", "compile"):
        filename = getattr(args[0], "co_filename", None) if event == "exec" else args[1]
        if not str(filename).startswith(_TRUSTED_CODE):
            _EVENTS.append(f"{event}: {filename}")
    elif event.startswith(_FLAGGED):
        _EVENTS.append(event)
    elif event == "open" and len(args) >= 2:
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes:
            _EVENTS.append(f"open for writing: {args[0]}")


sys.addaudithook(_hook)

POOL = [("posix", "system"), ("os", "system"), ("builtins", "exec"), ("builtins", "eval"),
        ("subprocess", "Popen"), ("torch", "save"), ("torch", "load"), ("torch.nn.modules.module", "torch.save"),
        ("repfuse.writing", "os.system"), ("torch.nn.modules.conv", "F.torch.save"), ("_io", "FileIO"),
        ("io", "open"), ("torch.nn.modules.linear", "Linear"), ("repfuse.modules", "GraphBlock"),
        ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"), ("torch.serialization", "os.system"),
        ("copyreg", "_reconstructor"), ("operator", "attrgetter"), ("torch.nn.functional", "relu")]


def _base_pickle() -> tuple[bytes, dict[str, bytes]]:
    buf = io.BytesIO()
    model = randomize_bn(repvgg_tiny(), 0).eval()
    torch.save({"model": model, "epoch": 3, "n": nn.ReLU()}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        records = {n.rsplit("/data/", 1)[1]: z.read(n) for n in z.namelist() if "/data/" in n}
        return z.read(pkl), records


BASE, RECORDS = _base_pickle()
GLOBAL_LINES = [i for i in range(len(BASE)) if BASE[i:i + 1] == b"c" and b"\n" in BASE[i:i + 200]]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(BASE)
    for _ in range(draw(st.integers(1, 4))):
        if len(data) < 4:
            break
        kind = draw(st.sampled_from(["flip", "insert", "delete", "global", "truncate", "payload"]))
        if kind == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "delete":
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 16))]
        elif kind == "global":  # rename one GLOBAL to a dangerous or aliased name
            start = draw(st.sampled_from(GLOBAL_LINES))
            end = data.find(b"\n", data.find(b"\n", start) + 1)
            if end > start:
                module, name = draw(st.sampled_from(POOL))
                data[start:end + 1] = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        elif kind == "truncate":
            del data[draw(st.integers(1, len(data) - 1)):]
        else:  # a whole payload in place of the file's object
            module, name = draw(st.sampled_from(POOL))
            return call_global(module, name, "touch PWNED")
    return bytes(data)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(pkl=mutated(), legacy=st.booleans())
def test_mutated_checkpoints_load_or_are_refused(workdir: Path, pkl: bytes, legacy: bool) -> None:
    global _WATCHING
    path = workdir / "f.pt"
    if legacy:
        write_legacy(path, pkl)
    else:
        write_zip(path, pkl, RECORDS)
    _EVENTS.clear()
    _WATCHING = True
    try:
        rio.load_checkpoint(path)
    except RepfuseError as exc:
        assert exc.message and "\n" not in exc.message
    finally:
        _WATCHING = False
    assert _EVENTS == []
    assert not (workdir / "PWNED").exists() and not Path("PWNED").exists()


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=st.binary(min_size=0, max_size=300), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02",
                                                                          b"\x10\x00\x00\x00\x00\x00\x00\x00{"]))
def test_random_bytes_are_refused(workdir: Path, blob: bytes, prefix: bytes) -> None:
    global _WATCHING
    path = workdir / "r.pt"
    path.write_bytes(prefix + blob)
    _EVENTS.clear()
    _WATCHING = True
    try:
        with pytest.raises(RepfuseError):
            rio.load_checkpoint(path)
    finally:
        _WATCHING = False
    assert _EVENTS == []


def test_the_audit_hook_sees_a_payload(tmp_path: Path) -> None:
    """The watcher is live: unpickling a payload with plain pickle is flagged."""
    global _WATCHING
    marker = tmp_path / "PWNED"
    _EVENTS.clear()
    _WATCHING = True
    try:
        pickle.loads(call_global("os", "system", f"true {marker}"))
    finally:
        _WATCHING = False
    assert _EVENTS and _EVENTS[0] == "os.system"
