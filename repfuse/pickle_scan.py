"""Read a torch.save file's pickle as inert data, before anything is loaded, and bound what it declares.

The pickle is replayed by Python's own unpickler with two hooks replaced: every global becomes an
inert stub (nothing is imported, nothing is called) and every storage becomes a record of its
declared size. What comes out is a graph of plain containers and stubs, from which repfuse reads:

- the exact ``(module, qualname)`` of every global the file names (for `allowlist.admit_globals`);
- declared tensor sizes, checked against the bytes the file really holds: a storage may not declare
  more than its archive entry stores, a tensor may not reach past its storage, and tensors larger
  than their storage (broadcast views) may add at most ``limits.max_inflate_bytes`` in all;
- compressed archive entries may not inflate past the same allowance (zip bombs);
- nesting depth, module count, module nesting and modules that contain themselves are bounded;
- meta tensors (no data) are refused: such a model cannot run.

Each violation is a RepfuseError with a cause and a hint. The stubs never execute anything, so a
hostile file costs at most a pass over its own bytes.
"""

from __future__ import annotations

import enum
import io
import math
import pickle
import types
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .types import RepfuseError

__all__ = ["Limits", "PickleFacts", "check_structure", "scan_checkpoint"]

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_REBUILD_TENSOR = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
                   "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_qtensor"}
_META = {"torch._utils._rebuild_meta_tensor_no_storage"}
_MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Bounds on what a checkpoint may declare; each has a CLI flag to raise it."""

    max_inflate_bytes: int = 1 << 30  # --max-inflate: bytes beyond what the file stores (views, compression)
    max_modules: int = 10_000  # --max-modules
    max_depth: int = 2_000  # nesting of containers and objects in the pickle
    max_module_depth: int = 100  # modules inside modules (deep-copying a model recurses per level)


@dataclass
class PickleFacts:
    """What a checkpoint's pickle names and declares, read without running it."""

    globals: set[tuple[str, str]] = field(default_factory=set)
    root: Any = None  # the inert object graph
    stored_bytes: int = 0
    declared_bytes: int = 0
    foreign_ids: set[str] = field(default_factory=set)  # persistent ids other than storages


class _Stub:
    """An inert stand-in for whatever a global would have built: records its arguments and state."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        # NEWOBJ on something that is not a class (a stub instance) still builds an inert stub
        obj = object.__new__(cls if isinstance(cls, type) else _Stub)
        obj.__dict__.update(args=args, kwargs=kwargs, state=[], items=[], called=False)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["called"] = True  # built by calling the global (REDUCE), not by NEWOBJ

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub(self, *args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"].append(state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__["items"].append((key, value))

    def append(self, value: Any) -> None:
        self.__dict__["items"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["items"].extend(values)

    def add(self, value: Any) -> None:
        self.__dict__["items"].append(value)


@dataclass(frozen=True)
class _Storage:
    key: str
    type_name: str
    location: str
    numel: int


def _element_size(type_name: str) -> int:
    name = type_name.rpartition(".")[2]
    if name == "UntypedStorage":
        return 1
    with warnings.catch_warnings():  # TypedStorage classes warn that they are deprecated
        warnings.simplefilter("ignore")
        storage_class = getattr(torch, name, None) if name.endswith("Storage") else None
        dtype = getattr(storage_class, "dtype", None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 1


class _InertUnpickler(pickle._Unpickler):  # type: ignore[misc, name-defined]
    def __init__(self, file: io.BufferedIOBase, facts: PickleFacts, storages: list[_Storage]) -> None:
        super().__init__(file, encoding="utf-8")
        self.facts = facts
        self.storages = storages
        self.stub_types: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> type:
        from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # the renames torch's own unpickler applies

        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        self.facts.globals.add((module, name))
        stub = self.stub_types.get((module, name))
        if stub is None:
            stub = type("Stub", (_Stub,), {"global_name": f"{module}.{name}"})
            self.stub_types[(module, name)] = stub
        return stub

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            # the legacy format stores whole modules as ('module', class, file, source): judged by the loader
            self.facts.foreign_ids.add(str(pid[0]) if isinstance(pid, tuple) and pid else type(pid).__name__)
            return _Stub()
        _, storage_type, key, location, numel = pid[:5]
        if not isinstance(numel, int) or numel < 0 or not isinstance(location, str):
            raise pickle.UnpicklingError(f"storage {key!r} declares an invalid size {numel!r}")
        record = _Storage(str(key), getattr(storage_type, "global_name", "?"), location, numel)
        self.storages.append(record)
        return record


def _replay(data: io.BufferedIOBase, facts: PickleFacts, storages: list[_Storage]) -> Any:
    return _InertUnpickler(data, facts, storages).load()


def _zip_entries(path: Path, limits: Limits) -> tuple[bytes, dict[str, int], int]:
    """data.pkl, the size of each ``data/KEY`` record and the bytes stored, checking inflation."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        inflate = sum(max(0, i.file_size - i.compress_size) for i in infos)
        if inflate > limits.max_inflate_bytes:
            raise RepfuseError(
                f"{path.name} is a compressed archive that would inflate by {inflate / _MIB:,.0f} MiB "
                "(a zip bomb, or not a torch.save file: torch never compresses)",
                f"re-save it with torch.save; or raise the allowance with --max-inflate (now "
                f"{limits.max_inflate_bytes / _MIB:,.0f} MiB) if you made this file",
            )
        if any(i.filename.endswith(("/constants.pkl", "/code/")) or "/code/" in i.filename for i in infos):
            raise RepfuseError(
                f"{path.name} is a TorchScript archive, not a torch.save checkpoint",
                "repfuse converts eager nn.Module checkpoints; pass the checkpoint the scripted model was made from",
            )
        pickles = [i for i in infos if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise RepfuseError(f"{path.name} is a zip file but not a torch.save checkpoint (no data.pkl)",
                               "pass a file written by torch.save")
        prefix = pickles[0].filename[: -len("data.pkl")]
        records = {i.filename[len(prefix) + 5:]: i.file_size for i in infos
                   if i.filename.startswith(prefix + "data/")}
        stored = sum(records.values())
        return archive.read(pickles[0]), records, stored


def _legacy_pickle(path: Path) -> tuple[io.BufferedIOBase, int]:
    f = open(path, "rb")  # handed to the caller, closed there
    try:
        magic = pickle._Unpickler(f).load()  # type: ignore[attr-defined]  # a plain int: no globals
        if magic != _TORCH_LEGACY_MAGIC:
            raise RepfuseError(f"{path.name} is a plain Python pickle, not a torch.save checkpoint",
                               "load it in your own code and re-save it with torch.save(model, path)")
        for _ in range(2):  # protocol version and sys_info: plain data, replayed inertly below
            _replay(f, PickleFacts(), [])
    except BaseException:
        f.close()
        raise
    return f, path.stat().st_size


def scan_checkpoint(path: Path, kind: str, limits: Limits) -> PickleFacts:
    """Replay the checkpoint's pickle inertly (``kind`` is 'zip' or 'pickle') and check its declared
    sizes against the file. Raises RepfuseError on a violation, pickle errors for malformed files."""
    facts = PickleFacts()
    storages: list[_Storage] = []
    if kind == "zip":
        data, records, stored = _zip_entries(path, limits)
        facts.root = _replay(io.BytesIO(data), facts, storages)
    else:
        f, stored = _legacy_pickle(path)
        with f:
            facts.root = _replay(f, facts, storages)
        records = {}
    facts.stored_bytes = stored
    by_key = _check_storages(path, storages, records, stored, kind)
    facts.declared_bytes = _check_tensors(path, facts.root, by_key, limits)
    return facts


def _check_storages(path: Path, storages: list[_Storage], records: dict[str, int], stored: int,
                    kind: str) -> dict[int, int]:
    """Bytes of each storage (by object id), refusing declarations the file cannot back."""
    sizes: dict[int, int] = {}
    total = 0
    for s in storages:
        if s.location.startswith("meta"):
            raise RepfuseError(f"{path.name} holds meta tensors, which have no data",
                               "save the model after its weights are materialised (not on the meta device)")
        nbytes = s.numel * _element_size(s.type_name)
        if kind == "zip":
            have = records.get(s.key)
            if have is None or nbytes > have:
                raise RepfuseError(
                    f"{path.name} declares {nbytes:,} bytes for storage {s.key} but holds "
                    f"{'none' if have is None else f'{have:,}'}",
                    "the file is corrupt or was crafted; re-save it with torch.save",
                )
        sizes[id(s)] = nbytes
        total += nbytes
    if kind != "zip" and total > stored:
        raise RepfuseError(f"{path.name} declares {total:,} bytes of tensor data but is only {stored:,} bytes long",
                           "the file is truncated, corrupt or crafted; re-save it with torch.save")
    return sizes


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, _Stub) and value.global_name == "torch.Size":  # torch.Size((…)) via REDUCE
        value = value.args[0] if value.args else ()
    if isinstance(value, (tuple, list)) and all(type(v) is int for v in value):
        return tuple(value)
    return None


def _walk(root: Any) -> Iterator[Any]:
    """Every object of the inert graph once (iterative: deep nesting cannot exhaust the stack)."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        todo.extend(_children(obj))


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, _Stub):
        d = obj.__dict__
        return [*d["args"], *d["kwargs"].values(), *d["state"], *d["items"]]
    return []


def _check_tensors(path: Path, root: Any, storage_bytes: dict[int, int], limits: Limits) -> int:
    excess = 0
    declared = 0
    for obj in _walk(root):
        if not isinstance(obj, _Stub):
            continue
        if obj.global_name in _META:
            raise RepfuseError(f"{path.name} holds meta tensors, which have no data",
                               "save the model after its weights are materialised (not on the meta device)")
        if obj.global_name not in _REBUILD_TENSOR:
            continue
        args = obj.args
        storage = args[0] if args else None
        offset = args[1] if len(args) > 1 else None
        size, stride = (_ints(args[2]), _ints(args[3])) if len(args) > 3 else (None, None)
        if not isinstance(storage, _Storage) or type(offset) is not int or size is None or stride is None \
                or len(size) != len(stride) or offset < 0 or min((*size, *stride, 0)) < 0:
            raise RepfuseError(f"{path.name} holds a tensor record torch.save does not write",
                               "the file is corrupt or was crafted; re-save it with torch.save")
        numel = math.prod(size)
        element = _element_size(storage.type_name)
        extent = 0 if numel == 0 else offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if extent > storage.numel:
            raise RepfuseError(f"{path.name} holds a tensor that reaches past the end of its storage "
                               f"({extent:,} > {storage.numel:,} elements)",
                               "the file is corrupt or was crafted; re-save it with torch.save")
        nbytes = numel * element
        declared += nbytes
        excess += max(0, nbytes - storage_bytes.get(id(storage), 0))
    if excess > limits.max_inflate_bytes:
        raise RepfuseError(
            f"{path.name} declares tensors {excess / _MIB:,.0f} MiB larger than the data it stores "
            "(broadcast views of small storages)",
            f"re-save the model with real (contiguous) tensors; or raise the allowance with --max-inflate "
            f"(now {limits.max_inflate_bytes / _MIB:,.0f} MiB) if you made this file",
        )
    return declared


def _check_construction(path: Path, stub: _Stub, cls: type) -> None:
    """torch.save builds objects of non-torch classes by ``cls.__new__(cls)`` then state: refuse a file
    that *calls* an admitted class with arguments (that would run its constructor: a model's
    ``__init__`` allocating, downloading, opening files)."""
    args = stub.args
    if not stub.called and not args:
        return
    if issubclass(cls, enum.Enum) and stub.called and len(args) == 1 and not stub.kwargs:
        return  # Enum(value): a lookup
    if issubclass(cls, types.SimpleNamespace) and stub.called and not args and not stub.kwargs:
        return  # SimpleNamespace.__reduce__: cls(), then its state
    if issubclass(cls, tuple) and not stub.called:
        return  # a named tuple: tuple.__new__(cls, *fields)
    raise RepfuseError(
        f"{path.name} calls {stub.global_name} with arguments while loading, which torch.save never does",
        "the file was crafted or written by other means; re-save the model with torch.save",
    )


def _check_hooks(path: Path, module: _Stub) -> None:
    """A module's hook tables hold only callables; from a file, the only callables are bound methods
    (`allowlist.bound_method`): refuse them there, where they would run on every forward."""
    for state in module.state:
        if not isinstance(state, dict):
            continue
        for key, table in state.items():
            if isinstance(key, str) and "hook" in key and any(
                    isinstance(v, _Stub) and v.global_name == "builtins.getattr" for v in _walk(table)):
                raise RepfuseError(f"{path.name} registers a method as a {key} hook of {module.global_name}",
                                   "save the model without hooks (remove them before torch.save)")


def check_structure(path: Path, root: Any, admitted: dict[str, type], limits: Limits) -> None:
    """Bound nesting depth, module count and module nesting, refuse modules that contain themselves
    and admitted classes called with arguments; `admitted` maps dotted names to the classes the
    allow-list admitted beyond torch's defaults."""
    module_classes = {name for name, cls in admitted.items()
                      if isinstance(cls, type) and issubclass(cls, torch.nn.Module)}
    for obj in _walk(root):
        if isinstance(obj, _Stub) and obj.global_name in admitted and isinstance(admitted[obj.global_name], type):
            _check_construction(path, obj, admitted[obj.global_name])
        if isinstance(obj, _Stub) and obj.global_name in module_classes:
            _check_hooks(path, obj)
    modules = 0
    # iterative DFS with an explicit path: (object, depth, module depth, children iterator)
    on_path: set[int] = set()
    done: set[int] = set()
    stack: list[tuple[Any, int, int, Iterator[Any]]] = [(root, 1, 0, iter(_children(root)))]
    on_path.add(id(root))
    while stack:
        obj, depth, mdepth, it = stack[-1]
        child = next(it, _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(obj))
            done.add(id(obj))
            continue
        is_module = isinstance(child, _Stub) and child.global_name in module_classes
        if id(child) in on_path:
            if is_module:
                raise RepfuseError(f"{path.name} holds a module that contains itself ({child.global_name})",
                                   "the file is corrupt or was crafted; a model's modules form a tree")
            continue
        if id(child) in done:
            continue
        cdepth, cmdepth = depth + 1, mdepth + (1 if is_module else 0)
        if is_module:
            modules += 1
        if cdepth > limits.max_depth or cmdepth > limits.max_module_depth:
            deep_modules = cmdepth > limits.max_module_depth
            what = (f"modules nested {cmdepth} deep (limit {limits.max_module_depth})" if deep_modules
                    else f"objects nested {cdepth} deep (limit {limits.max_depth})")
            raise RepfuseError(f"{path.name} holds {what}",
                               "no real model nests that deep; the file is corrupt or was crafted")
        if modules > limits.max_modules:
            raise RepfuseError(f"{path.name} holds more than {limits.max_modules:,} modules",
                               "raise the limit with --max-modules if the model is really that large")
        on_path.add(id(child))
        stack.append((child, cdepth, cmdepth, iter(_children(child))))


_END = object()
