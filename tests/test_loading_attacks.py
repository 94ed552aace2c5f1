"""Hostile checkpoints: names that reach dangerous objects through attributes, constructors called
with arguments, files that declare more than they hold. Every payload would leave a marker file if
it ran; the tests check that it is refused with a one-line reason and that the marker never appears."""

from __future__ import annotations

import importlib
import inspect
import io
import os
import pickle
import subprocess
import sys
import textwrap
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from repfuse import allowlist
from repfuse import io as rio
from repfuse.pickle_scan import Limits
from repfuse.types import RepfuseError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# ---------------------------------------------------------------------------------------------
# crafting files


def call_global(module: str, name: str, *args: object) -> bytes:
    """A protocol-2 pickle that calls ``module.name(*args)`` when unpickled by a permissive loader."""
    inner = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple, without PROTO and STOP
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + inner + b"R."


def write_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None,
              compression: int = zipfile.ZIP_STORED) -> Path:
    """A torch.save-style zip archive around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def write_legacy(path: Path, body: bytes) -> Path:
    """A legacy (non-zip) torch.save file: magic, protocol and sys_info pickles, then `body`."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, 1001, {"protocol_version": 1001}))
    path.write_bytes(head + body + pickle.dumps([], protocol=2))  # then the (empty) list of storage keys
    return path


def payload_args(module: str, name: str, marker: Path) -> tuple[object, ...]:
    """Arguments that make the named callable leave `marker` behind."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("system", "popen"):
        return (f"touch {marker}",)
    if leaf in ("Popen", "run", "call", "check_call", "check_output"):
        return (["touch", str(marker)],)
    if leaf in ("save",):
        return (1, str(marker))
    return (str(marker), "w")  # open, FileIO, ZipFile, Path.write_text-like callables


def load_refused(path: Path, marker: Path, **kw: object) -> RepfuseError:
    with pytest.raises(RepfuseError) as err:
        rio.load_object(path, **kw)
    assert not marker.exists()
    assert "\n" not in err.value.message and err.value.hint
    return err.value


def test_crafted_files_are_valid_torch_files(tmp_path: Path) -> None:
    """The crafting helpers make files torch itself reads: the refusals below are not format errors."""
    benign = pickle.dumps({"a": [1, 2.5, "x"]}, protocol=2)
    for path in (write_zip(tmp_path / "z.pt", benign), write_legacy(tmp_path / "l.pt", benign)):
        assert torch.load(path, weights_only=True) == {"a": [1, 2.5, "x"]}
        assert rio.load_object(path)[0] == {"a": [1, 2.5, "x"]}


# ---------------------------------------------------------------------------------------------
# globals resolve exactly


ALIASES = [  # reachable through an admitted module's attributes, defined elsewhere
    ("torch.nn.modules.module", "torch.save"),
    ("torch.nn.modules.module", "torch.serialization.os.system"),
    ("torch.nn.modules.conv", "F.torch.save"),
    ("repfuse.writing", "os.system"),
    ("repfuse.loading", "zipfile.ZipFile"),
    ("repfuse.pickle_scan", "io.FileIO"),
    ("repfuse.api", "subprocess.Popen"),
    ("repfuse.writing.os", "system"),
    ("torch.nn.modules.module.torch", "save"),
    ("torch.nn", "functional.torch.save"),
]


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(("module", "name"), ALIASES)
def test_names_reachable_through_attributes_are_refused(tmp_path: Path, module: str, name: str,
                                                        legacy: bool) -> None:
    marker = tmp_path / "PWNED"
    body = call_global(module, name, *payload_args(module, name, marker))
    path = (write_legacy if legacy else write_zip)(tmp_path / "evil.pt", body)
    err = load_refused(path, marker)
    assert f"{module}.{name}" in err.message


def _aliases_of(module_name: str) -> list[tuple[str, str]]:
    """Every (module, name) one or two attribute steps below `module_name` that is not defined there."""
    module = importlib.import_module(module_name)
    out = []
    for attr, value in vars(module).items():
        if attr.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            out += [(module_name, f"{attr}.{sub}") for sub, v in list(vars(value).items())[:40]
                    if not sub.startswith("__") and callable(v)]
        elif callable(value) and (getattr(value, "__module__", None), getattr(value, "__qualname__", None)) \
                != (module_name, attr):
            out.append((module_name, attr))
    return out


@pytest.mark.parametrize("module_name", ["torch.nn.modules.module", "torch.nn.modules.conv", "repfuse.loading",
                                         "repfuse.writing", "repfuse.modules", "repfuse.samples"])
def test_the_policy_refuses_every_alias_and_function(module_name: str) -> None:
    """The rule, not a list: nothing under an admitted prefix is admitted unless it is a module class
    (or plain data type, under --allow) defined exactly there."""
    names = _aliases_of(module_name)
    module = importlib.import_module(module_name)
    names += [(module_name, n) for n, v in vars(module).items()
              if inspect.isfunction(v) and v.__module__ == module_name]
    assert len(names) > 5
    for pair in names:
        with pytest.raises(RepfuseError):
            allowlist.admit_globals("f.pt", [pair], allow=(module_name,))


def test_module_classes_are_admitted_exactly() -> None:
    pairs = allowlist.admit_globals("f.pt", [("torch.nn.modules.conv", "Conv2d"), ("repfuse.modules", "GraphBlock")])
    assert dict((n, o) for o, n in pairs) == {"torch.nn.modules.conv.Conv2d": nn.Conv2d,
                                              "repfuse.modules.GraphBlock": sys.modules["repfuse.modules"].GraphBlock}
    for bad in [("torch.nn", "Conv2d"), ("torch.nn.modules", "conv.Conv2d"), ("torch.nn.functional", "relu"),
                ("torch.nn.modules.conv", "F"), ("torch", "load"), ("torch.nn.modules.module", "Module.__init__")]:
        with pytest.raises(RepfuseError):
            allowlist.admit_globals("f.pt", [bad])


EVIL_PACKAGE = textwrap.dedent('''
    import os
    import subprocess
    import dataclasses
    import enum
    import types
    import torch
    from torch import nn
    from . import sub

    MARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "PWNED")

    class Net(nn.Module):
        def __init__(self, *args):
            super().__init__()
            open(MARK, "w").close()

    def build(*args):
        open(MARK, "w").close()

    class Plain:
        def __init__(self, *args):
            open(MARK, "w").close()

    @dataclasses.dataclass
    class Cfg:
        a: object = None
        def __post_init__(self):
            open(MARK, "w").close()

    class Mode(enum.Enum):
        A = "a"

    class Args(types.SimpleNamespace):
        pass
''')


@pytest.fixture
def evil_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    name = f"evilpkg{os.getpid()}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(EVIL_PACKAGE)
    (pkg / "sub.py").write_text("import torch\nimport os\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_allow_prefix_admits_only_classes_defined_there(tmp_path: Path, evil_package: str) -> None:
    marker = tmp_path / "PWNED"
    calls = [("os.system", (f"touch {marker}",)), ("subprocess.Popen", (["touch", str(marker)],)),
             ("sub.torch.save", (1, str(marker))), ("sub.os.system", (f"touch {marker}",)),
             ("build", ()), ("Plain", ()), ("Cfg", (1,)), ("Net", (1,))]
    for name, args in calls:
        path = write_zip(tmp_path / "evil.pt", call_global(evil_package, name, *args))
        err = load_refused(path, marker, allow=(evil_package,))
        assert evil_package in err.message
    # the same names split at another dot: the module part must be importable as such
    path = write_zip(tmp_path / "evil.pt", call_global(f"{evil_package}.os", "system", f"touch {marker}"))
    load_refused(path, marker, allow=(evil_package,))


def test_allow_prefix_admits_module_classes_and_plain_data(tmp_path: Path, evil_package: str) -> None:
    """Saved by torch.save (no constructor call): module classes and plain data types load."""
    pkg = importlib.import_module(evil_package)
    marker = tmp_path / "PWNED"
    net = pkg.Net.__new__(pkg.Net)
    nn.Module.__init__(net)
    net.lin = nn.Linear(2, 2)
    cfg = pkg.Cfg.__new__(pkg.Cfg)
    cfg.a = 3
    assert not marker.exists()
    path = tmp_path / "ok.pt"
    torch.save({"model": net, "cfg": cfg, "mode": pkg.Mode.A, "args": pkg.Args(x=1)}, path)
    obj, _ = rio.load_object(path, allow=(evil_package,))
    assert isinstance(obj["model"], pkg.Net) and obj["cfg"].a == 3 and obj["mode"] is pkg.Mode.A
    assert obj["args"].x == 1 and not marker.exists()
    with pytest.raises(RepfuseError) as err:
        rio.load_object(path)
    assert f"--allow {evil_package}" in err.value.hint


def test_refusal_hints_are_safe_to_follow(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = write_zip(tmp_path / "e.pt", call_global("torch.ao.nn.quantized.modules", "torch.save", 1, str(marker)))
    err = load_refused(path, marker)
    hint = err.hint
    if "--allow" in hint:  # following the hint must not admit the payload either
        prefix = hint.split("--allow ", 1)[1].split()[0]
        load_refused(path, marker, allow=(prefix,))
    with pytest.raises(RepfuseError) as err2:
        allowlist.check_allow_prefixes(["torch"])
    load_refused(path, marker, allow=(err2.value.hint.split("--allow ", 1)[1].split()[0],))


# ---------------------------------------------------------------------------------------------
# bounded


class _StorageRef:
    pass


def _tensor_pickle(numel_declared: int, size: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """data.pkl of one float tensor over storage '0' declaring `numel_declared` elements."""
    ref = _StorageRef()

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (ref, 0, size, stride, False, OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel_declared) if obj is ref else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": Tensor()})
    return buf.getvalue()


def test_crafted_tensor_files_are_read_by_torch(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "t.pt", _tensor_pickle(4, (2, 2), (2, 1)), {"0": bytes(16)})
    assert torch.load(path, weights_only=True)["w"].shape == (2, 2)
    assert rio.load_object(path)[0]["w"].shape == (2, 2)


def test_stride_zero_tensor_declaring_gigabytes(tmp_path: Path) -> None:
    path = tmp_path / "bcast.pt"
    torch.save({"w": torch.zeros(1).expand(10_000_000_000)}, path)
    assert path.stat().st_size < 10_000
    with pytest.raises(RepfuseError) as err:
        rio.load_object(path)
    assert "larger than the data it stores" in err.value.message and "--max-inflate" in err.value.hint
    obj, _ = rio.load_object(path, limits=Limits(max_inflate_bytes=50 << 30))  # raised: loads as a view
    assert obj["w"].stride() == (0,)


@pytest.mark.parametrize(("numel", "size", "stride"), [
    (10**12, (4,), (1,)),  # the storage declares more than its record holds
    (4, (5,), (1,)),  # the tensor reaches past its storage
    (4, (2,), (-1,)),  # negative stride
])
def test_declared_sizes_are_checked_against_the_file(tmp_path: Path, numel: int, size: tuple, stride: tuple) -> None:
    path = write_zip(tmp_path / "t.pt", _tensor_pickle(numel, size, stride), {"0": bytes(16)})
    with pytest.raises(RepfuseError):
        rio.load_object(path)


def test_deep_nesting(tmp_path: Path) -> None:
    depth = 200_000
    path = write_zip(tmp_path / "deep.pt", b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    with pytest.raises(RepfuseError) as err:
        rio.load_object(path)
    assert "nested" in err.value.message


def test_module_that_contains_itself(tmp_path: Path) -> None:
    seq = nn.Sequential(nn.ReLU())
    seq._modules["me"] = seq
    path = tmp_path / "loop.pt"
    torch.save(seq, path)
    with pytest.raises(RepfuseError) as err:
        rio.load_checkpoint(path)
    assert "contains itself" in err.value.message


def test_too_many_modules(tmp_path: Path) -> None:
    path = tmp_path / "many.pt"
    torch.save(nn.Sequential(*[nn.ReLU() for _ in range(12_000)]), path)
    with pytest.raises(RepfuseError) as err:
        rio.load_checkpoint(path)
    assert "--max-modules" in err.value.hint
    assert len(rio.load_checkpoint(path, limits=Limits(max_modules=20_000)).model) == 12_000


def test_meta_tensors(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save(nn.Linear(3, 3, device="meta"), path)
    with pytest.raises(RepfuseError) as err:
        rio.load_checkpoint(path)
    assert "meta" in err.value.message


def test_zip_bomb(tmp_path: Path) -> None:
    body = pickle.dumps({"a": 1}, protocol=2)
    path = write_zip(tmp_path / "bomb.pt", body, {"0": bytes(8 << 20)}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000
    with pytest.raises(RepfuseError) as err:
        rio.load_object(path, limits=Limits(max_inflate_bytes=1 << 20))
    assert "zip bomb" in err.value.message


def test_constructor_called_with_arguments(tmp_path: Path) -> None:
    """torch.nn classes are admitted, but calling one with arguments would run its __init__ (allocating)."""
    path = write_zip(tmp_path / "alloc.pt", call_global("torch.nn.modules.linear", "Linear", 100_000, 100_000))
    with pytest.raises(RepfuseError) as err:
        rio.load_object(path)
    assert "calls torch.nn.modules.linear.Linear with arguments" in err.value.message


def test_limits_are_exit_2_from_the_cli_within_seconds(tmp_path: Path) -> None:
    path = tmp_path / "bcast.pt"
    torch.save({"model": nn.Conv2d(1, 1, 1), "w": torch.zeros(1).expand(10_000_000_000)}, path)
    r = subprocess.run([sys.executable, "-m", "repfuse", "inspect", str(path)], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "larger than the data" in r.stderr


# ---------------------------------------------------------------------------------------------
# sniffing


def test_every_safetensors_header_length_is_recognised(tmp_path: Path) -> None:
    """A header whose length has low byte 0x80 (the pickle opcode PROTO) is still safetensors."""
    from safetensors.torch import save_file

    seen = set()
    for pad in range(0, 400, 3):
        path = tmp_path / f"w{pad}.safetensors"
        save_file({"w": torch.ones(2)}, str(path), metadata={"p": "x" * pad})
        low = path.read_bytes()[0]
        seen.add(low)
        assert rio.file_kind(path) == "safetensors", low
    assert 0x80 in seen


# ---------------------------------------------------------------------------------------------
# bound methods (pickled as getattr(obj, name))


def test_bound_method_of_a_module_loads(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model.act = model[0].forward  # what mmpretrain-style blocks store
    path = tmp_path / "bm.pt"
    torch.save({"model": model}, path)
    loaded = rio.load_checkpoint(path).model
    assert loaded.act.__self__ is loaded[0] and loaded.act.__func__ is nn.Linear.forward


@pytest.mark.parametrize(("target", "name"), [
    ("torch.nn.modules.linear", "__init__"),  # not public
    ("torch.nn.modules.linear", "_apply"),
    ("torch.nn.modules.linear", "training"),  # an attribute, not a method
    ("torch.nn.modules.linear", "weight"),
])
def test_getattr_is_restricted_to_public_module_methods(tmp_path: Path, target: str, name: str) -> None:
    lin = nn.Linear(2, 2)

    class Ref:
        def __reduce__(self):
            return (getattr, (lin, name))

    path = tmp_path / "ga.pt"
    torch.save({"model": nn.Identity(), "x": Ref()}, path)
    with pytest.raises(RepfuseError):
        rio.load_object(path)
    for obj, attr in [("x", "upper"), (OrderedDict(), "clear"), (torch.ones(1), "numpy")]:
        class Other:
            def __reduce__(self, obj=obj, attr=attr):
                return (getattr, (obj, attr))

        torch.save({"x": Other()}, path)
        with pytest.raises(RepfuseError):
            rio.load_object(path)


def test_bound_method_hooks_are_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model.register_forward_pre_hook(model[0].extra_repr)
    path = tmp_path / "hook.pt"
    torch.save(model, path)
    with pytest.raises(RepfuseError) as err:
        rio.load_checkpoint(path)
    assert "hook" in err.value.message


@pytest.mark.parametrize("command", ["convert", "verify", "verify --against", "inspect"])
def test_alias_payload_is_refused_by_every_command(tmp_path: Path, command: str) -> None:
    """Every command loads through the same checks: the payload never runs, exit 2, nothing written."""
    marker = tmp_path / "PWNED"
    evil = write_zip(tmp_path / "evil.pt", call_global("torch.nn.modules.module", "torch.save", 1, str(marker)))
    good = tmp_path / "good.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), good)
    args = {"convert": ["convert", str(evil), str(tmp_path / "o.pt")], "verify": ["verify", str(evil)],
            "verify --against": ["verify", str(good), "--against", str(evil)], "inspect": ["inspect", str(evil)]}
    before = sorted(p.name for p in tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "repfuse", *args[command]], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "torch.nn.modules.module.torch.save" in r.stderr
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
