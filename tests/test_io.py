"""Loading and saving checkpoints: allow-list, refusal of code-running pickles, containers, atomic writes."""

from __future__ import annotations

import builtins
import os
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from user_code import ExecPayload, SystemPayload

from repfuse import io as rio
from repfuse.io import (
    LoadedCheckpoint,
    admitted_globals,
    check_allow_prefixes,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from repfuse.samples import (
    ACBlock,
    MobileOneBlock,
    RepVGG,
    RepVGGBlock,
    acnet_tiny,
    mobileone_tiny,
    randomize_bn,
    repvgg_tiny,
)
from repfuse.types import RepfuseError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def _model(factory=repvgg_tiny, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(factory(), seed).eval()


def _same_outputs(a: nn.Module, b: nn.Module, shape=(2, 3, 33, 31)) -> None:
    x = torch.randn(*shape)
    torch.testing.assert_close(a.float()(x), b.float()(x), rtol=0, atol=0)


@pytest.fixture
def isolated_imports(monkeypatch):
    """Restore sys.path and sys.modules after a test that imports a temporary package."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("userpkg_"):
            del sys.modules[name]


def _write_user_package(root: Path, name: str) -> None:
    pkg = root / name
    (pkg / "nets").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets" / "__init__.py").write_text("")
    (pkg / "nets" / "blocks.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Branchy(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.a = nn.Conv2d(c, c, 3, padding=1)
                self.b = nn.Conv2d(c, c, 1)

            def forward(self, x):
                return self.a(x) + self.b(x)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Conv2d(3, 8, 3, padding=1)
                self.body = Branchy(8)

            def forward(self, x):
                return self.body(self.stem(x))
    """))


def _user_checkpoint(tmp_path: Path, monkeypatch, name: str) -> Path:
    """Save a model whose classes live in a temporary package `name`, then forget the package
    (module cache and sys.path) so loading must find it through the current directory."""
    _write_user_package(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(f"{name}.nets.blocks", fromlist=["Net"])
    torch.manual_seed(0)
    ckpt = tmp_path / "user.pt"
    torch.save(module.Net(), ckpt)
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != str(tmp_path)]
    return ckpt


# ----------------------------------------------------------------------------- loading


def test_load_whole_model(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, LoadedCheckpoint)
    assert isinstance(loaded.model, RepVGG)
    assert loaded.key is None and loaded.container is loaded.model
    assert loaded.dtype == torch.float32
    assert loaded.sha256 == sha256_file(path)
    assert loaded.path == path
    _same_outputs(model, loaded.model)


@pytest.mark.parametrize("key", ["model", "ema", "net", "module", "weird_key"])
def test_load_dict_container(tmp_path: Path, key: str) -> None:
    model = _model(acnet_tiny)
    path = tmp_path / "c.pt"
    torch.save({"epoch": 7, key: model, "optimizer": {"lr": 0.1}}, path)
    loaded = load_checkpoint(path)
    assert loaded.key == key
    assert isinstance(loaded.model, nn.Module)
    assert loaded.container["epoch"] == 7
    _same_outputs(model, loaded.model)


def test_container_prefers_model_then_ema(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"aaa": nn.Identity(), "ema": _model(acnet_tiny), "model": _model(), "z": 1}, path)
    assert load_checkpoint(path).key == "model"
    torch.save({"aaa": nn.Identity(), "ema": _model(acnet_tiny), "model": None}, path)
    assert load_checkpoint(path).key == "ema"


def test_load_fp16_container(tmp_path: Path) -> None:
    model = _model(mobileone_tiny).half()
    path = tmp_path / "fp16.pt"
    torch.save({"model": model, "epoch": 3, "optimizer": None}, path)
    loaded = load_checkpoint(path)
    assert loaded.dtype == torch.float16
    assert next(loaded.model.parameters()).dtype == torch.float16
    assert isinstance(loaded.model.stage0, MobileOneBlock)


def test_load_legacy_format_container_and_refuse_legacy_module(tmp_path: Path) -> None:
    legacy_sd = tmp_path / "legacy_sd.pt"
    torch.save(_model().state_dict(), legacy_sd, _use_new_zipfile_serialization=False)
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(legacy_sd)
    assert "state_dict" in err.value.message and "architecture" in err.value.hint

    legacy_model = tmp_path / "legacy_model.pt"
    torch.save(_model(), legacy_model, _use_new_zipfile_serialization=False)
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(legacy_model)
    assert "legacy" in err.value.message


@pytest.mark.parametrize("name", ["repvgg_tiny.pt", "mobileone_tiny.pt", "acnet_tiny.pt"])
def test_bundled_samples_load_without_trust(name: str) -> None:
    path = SAMPLES / name
    if not path.exists():
        pytest.skip("run sample_checkpoints/make_samples.py")
    loaded = load_checkpoint(path)
    assert any(isinstance(m, RepVGGBlock | MobileOneBlock | ACBlock) for m in loaded.model.modules())
    assert not loaded.model.training
    if name == "mobileone_tiny.pt":
        assert loaded.key == "model" and loaded.dtype == torch.float16
        assert loaded.container["epoch"] == 3
    else:
        assert loaded.key is None and loaded.dtype == torch.float32


def test_allow_prefixes_are_checked() -> None:
    for bad in (["os"], ["builtins"], ["subprocess.run"], ["torch"], [""], ["a b"]):
        with pytest.raises(RepfuseError):
            check_allow_prefixes(bad)


def test_allowed_globals_for_lists_classes(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(_model(), path)
    pairs = admitted_globals(path)
    names = {name for _, name in pairs}
    assert "repfuse.samples.RepVGGBlock" in names
    assert "torch.nn.modules.conv.Conv2d" in names
    assert all(isinstance(obj, type) for obj, _ in pairs)
    assert dict((n, o) for o, n in pairs)["repfuse.samples.RepVGGBlock"] is RepVGGBlock


def test_torch_nn_functions_are_not_allowed_by_default(tmp_path: Path) -> None:
    path = tmp_path / "f.pt"
    torch.save({"model": nn.Identity(), "fn": torch.nn.functional.relu}, path)
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(path)
    assert "torch.nn.functional.relu" in err.value.message


def test_refuses_unknown_module_then_allow_loads_it(tmp_path: Path, monkeypatch, isolated_imports) -> None:
    ckpt = _user_checkpoint(tmp_path, monkeypatch, "userpkg_a")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(ckpt)
    msg, hint = err.value.message, err.value.hint
    assert "userpkg_a.nets.blocks.Net" in msg and "userpkg_a.nets.blocks.Branchy" in msg
    assert "2 globals" in msg
    assert "--allow userpkg_a" in hint and "--trust" in hint
    assert "userpkg_a" not in sys.modules  # refusing imported nothing

    loaded = load_checkpoint(ckpt, allow=["userpkg_a"])  # found through the current directory
    assert type(loaded.model).__name__ == "Net"
    assert type(loaded.model).__module__ == "userpkg_a.nets.blocks"
    assert loaded.model(torch.randn(1, 3, 9, 7)).shape == (1, 8, 9, 7)


def test_narrow_allow_prefix_and_missing_package(tmp_path: Path, monkeypatch, isolated_imports) -> None:
    ckpt = _user_checkpoint(tmp_path, monkeypatch, "userpkg_b")
    monkeypatch.chdir(tmp_path)
    assert type(load_checkpoint(ckpt, allow=["userpkg_b.nets"]).model).__name__ == "Net"
    with pytest.raises(RepfuseError):
        load_checkpoint(ckpt, allow=["userpkg_b.other"])
    # allowed, but the package cannot be found from this directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for mod in [m for m in sys.modules if m.startswith("userpkg_b")]:
        del sys.modules[mod]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != str(tmp_path)]
    monkeypatch.chdir(elsewhere)
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(ckpt, allow=["userpkg_b"])
    assert "cannot be imported" in err.value.message and "userpkg_b" in err.value.hint




@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("allow", [(), ("tests",)])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path: Path, payload, legacy: bool,
                                                       allow: tuple[str, ...]) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    obj = {"model": _model(acnet_tiny), "extra": payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(path, allow=allow)
    assert not marker.exists()
    func = os.system if payload is SystemPayload else builtins.exec
    assert f"{func.__module__}.{func.__name__}" in err.value.message
    assert "arbitrary code" in err.value.message
    assert "--allow" not in err.value.hint
    # even asking to allow the module that holds the function is refused
    with pytest.raises(RepfuseError):
        load_checkpoint(path, allow=[func.__module__])
    assert not marker.exists()


def test_main_module_classes_get_a_specific_hint(tmp_path: Path) -> None:
    path = tmp_path / "main.pt"
    cls = type("ScriptNet", (nn.Module,), {"__module__": "__main__"})
    sys.modules["__main__"].ScriptNet = cls  # so pickle can find it while saving
    try:
        torch.save(cls(), path)
    finally:
        del sys.modules["__main__"].ScriptNet
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(path)
    assert "__main__.ScriptNet" in err.value.message and "importable module" in err.value.hint


# ----------------------------------------------------------------------------- bad input


def _assert_one_line(err: RepfuseError) -> None:
    assert err.message and "\n" not in err.message
    assert err.hint and "\n" not in err.hint


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(tmp_path / "nope.pt")
    _assert_one_line(err.value)
    assert "no such file" in err.value.message
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(tmp_path)
    _assert_one_line(err.value)
    assert "directory" in err.value.message


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path: Path, cut: float, legacy: bool) -> None:
    full = tmp_path / "full.pt"
    torch.save(_model(acnet_tiny), full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(bad, trust=legacy)  # trust too: no raw traceback either way
    _assert_one_line(err.value)


@pytest.mark.parametrize("head", [b"", b"\x80", b"PK\x03\x04", b"\x00\x01"])
def test_random_bytes_and_empty(tmp_path: Path, head: bytes) -> None:
    gen = torch.Generator().manual_seed(len(head))
    noise = bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist())
    path = tmp_path / "noise.pt"
    path.write_bytes(head + (noise if head else b""))
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(path)
    _assert_one_line(err.value)


def test_state_dict_only_is_refused_with_hint(tmp_path: Path) -> None:
    for obj in (_model().state_dict(), {"state_dict": _model().state_dict(), "epoch": 1}):
        path = tmp_path / "sd.pt"
        torch.save(obj, path)
        with pytest.raises(RepfuseError) as err:
            load_checkpoint(path)
        assert "state_dict" in err.value.message
        assert "architecture" in err.value.hint and "--model" in err.value.hint


def test_no_module_in_dict_and_non_module(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"epoch": 1, "note": "hi"}, path)
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(path)
    assert "no nn.Module" in err.value.message
    torch.save([1, 2, 3], path)
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(path)
    assert "list" in err.value.message


def test_safetensors_file_is_refused_with_hint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(path)
    assert "safetensors" in err.value.message and "architecture" in err.value.hint


def test_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(nn.Conv2d(3, 3, 1)), str(path))
    with pytest.raises(RepfuseError) as err:
        load_checkpoint(path)
    assert "TorchScript" in err.value.message


def test_trust_loads_what_allow_refuses(tmp_path: Path, monkeypatch, isolated_imports) -> None:
    ckpt = _user_checkpoint(tmp_path, monkeypatch, "userpkg_c")
    monkeypatch.chdir(tmp_path)
    loaded = load_checkpoint(ckpt, trust=True)
    assert type(loaded.model).__name__ == "Net" and loaded.trust


# ----------------------------------------------------------------------------- saving


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_save_whole_model_roundtrip(tmp_path: Path) -> None:
    src = tmp_path / "in.pt"
    torch.save(_model(), src)
    loaded = load_checkpoint(src)
    dst = tmp_path / "out.pt"
    digest = save_checkpoint(loaded, loaded.model, dst)
    assert digest == sha256_file(dst)
    again = load_checkpoint(dst)  # no trust
    assert again.key is None
    _same_outputs(loaded.model, again.model)
    plain = torch.load(dst, weights_only=False)
    _same_outputs(loaded.model, plain)
    assert _no_temp_files(tmp_path)


def test_save_container_keeps_other_values(tmp_path: Path) -> None:
    src = tmp_path / "in.pt"
    container = OrderedDict(epoch=3, model=_model(mobileone_tiny).half(), optimizer=None,
                            note="hello", stats={"acc": torch.tensor([0.5, 0.7])})
    torch.save(container, src)
    loaded = load_checkpoint(src)
    replacement = _model(acnet_tiny).half()
    dst = tmp_path / "out.pt"
    save_checkpoint(loaded, replacement, dst)
    again = load_checkpoint(dst)
    assert list(again.container.keys()) == list(container.keys())
    assert type(again.container) is OrderedDict
    assert again.key == "model" and again.dtype == torch.float16
    assert again.container["epoch"] == 3 and again.container["note"] == "hello"
    assert again.container["optimizer"] is None
    torch.testing.assert_close(again.container["stats"]["acc"], container["stats"]["acc"])
    _same_outputs(replacement, again.model)
    assert loaded.container["model"] is loaded.model  # the input container was not mutated


def test_save_refuses_input_path(tmp_path: Path) -> None:
    src = tmp_path / "in.pt"
    torch.save(_model(acnet_tiny), src)
    before = sha256_file(src)
    loaded = load_checkpoint(src)
    for dst in (src, tmp_path / "." / "in.pt", tmp_path / "sub" / ".." / "in.pt"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(RepfuseError) as err:
            save_checkpoint(loaded, loaded.model, dst)
        assert "input" in err.value.message
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    with pytest.raises(RepfuseError):
        save_checkpoint(loaded, loaded.model, link)
    hard = tmp_path / "hard.pt"
    os.link(src, hard)
    with pytest.raises(RepfuseError):
        save_checkpoint(loaded, loaded.model, hard)
    assert sha256_file(src) == before
    assert _no_temp_files(tmp_path)


def test_save_bad_destination(tmp_path: Path) -> None:
    src = tmp_path / "in.pt"
    torch.save(_model(acnet_tiny), src)
    loaded = load_checkpoint(src)
    with pytest.raises(RepfuseError):
        save_checkpoint(loaded, loaded.model, tmp_path / "missing_dir" / "out.pt")
    with pytest.raises(RepfuseError):
        save_checkpoint(loaded, loaded.model, tmp_path)
    assert _no_temp_files(tmp_path)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_save_leaves_no_temp_file_on_error(tmp_path: Path, monkeypatch, exc) -> None:
    src = tmp_path / "in.pt"
    torch.save(_model(acnet_tiny), src)
    loaded = load_checkpoint(src)
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"previous output")
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # a partial file exists, then the failure
        raise exc

    monkeypatch.setattr(torch, "save", failing_save)
    expected = KeyboardInterrupt if exc is KeyboardInterrupt else RepfuseError
    with pytest.raises(expected):
        save_checkpoint(loaded, loaded.model, dst)
    assert _no_temp_files(tmp_path)
    assert dst.read_bytes() == b"previous output"


def test_save_refuses_output_that_would_need_trust(tmp_path: Path) -> None:
    src = tmp_path / "in.pt"
    torch.save(_model(acnet_tiny), src)
    loaded = load_checkpoint(src)
    dst = tmp_path / "out.pt"
    bad = nn.Sequential(nn.Identity())
    bad.fn = torch.nn.functional.relu  # a function global: not allowed by default
    with pytest.raises(RepfuseError) as err:
        save_checkpoint(loaded, bad, dst)
    assert "would not load again" in err.value.message
    assert not dst.exists() and _no_temp_files(tmp_path)


def test_save_with_user_classes_reloads_with_same_allow(tmp_path: Path, monkeypatch,
                                                        isolated_imports) -> None:
    ckpt = _user_checkpoint(tmp_path, monkeypatch, "userpkg_d")
    monkeypatch.chdir(tmp_path)
    loaded = load_checkpoint(ckpt, allow=["userpkg_d"])
    dst = tmp_path / "out.pt"
    save_checkpoint(loaded, loaded.model, dst)
    again = load_checkpoint(dst, allow=["userpkg_d"])
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(again.model(x), loaded.model(x), rtol=0, atol=0)
    with pytest.raises(RepfuseError):
        load_checkpoint(dst)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ----------------------------------------------------------------------------- state_dict inputs


from repfuse import weights  # noqa: E402


def test_find_state_dict_in_containers() -> None:
    sd = _model().state_dict()
    assert weights.find_state_dict(sd, "x.pt")[1] is None
    for key in ("state_dict", "model", "ema", "model_state_dict", "state_dict_ema", "odd_key"):
        found, where = weights.find_state_dict({"epoch": 1, key: sd, "optimizer": {"lr": 0.1}}, "x.pt")
        assert where == key and found.keys() == sd.keys()
    # the usual keys win over an unusual one; a module is taken as its state_dict
    assert weights.find_state_dict({"aaa": {"w": torch.zeros(1)}, "state_dict": sd}, "x.pt")[1] == "state_dict"
    assert weights.find_state_dict({"ema": _model()}, "x.pt")[0].keys() == sd.keys()
    with pytest.raises(RepfuseError) as err:
        weights.find_state_dict({"epoch": 1, "cfg": {"lr": 0.1}}, "x.pt")
    assert "'epoch'" in err.value.message and "state_dict" in err.value.hint
    with pytest.raises(RepfuseError):
        weights.find_state_dict([1, 2], "x.pt")


def test_strip_prefix_only_when_it_helps() -> None:
    sd = _model().state_dict()
    expected = sd.keys()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "model."):
        state, removed = weights.strip_prefix({prefix + k: v for k, v in sd.items()}, expected)
        assert removed == prefix and state.keys() == sd.keys()
    assert weights.strip_prefix(sd, expected) == (dict(sd), "")
    other = {"module.x.weight": torch.zeros(1), "module.y.weight": torch.zeros(1)}
    assert weights.strip_prefix(other, expected)[1] == ""  # stripping would match nothing either


def test_fit_state_dict_keeps_dtype_and_tolerates_missing_counters() -> None:
    source = _model(mobileone_tiny).half()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = mobileone_tiny()
    weights.fit_state_dict(target, state, "ckpt.pt", "repfuse.samples:mobileone_tiny")
    assert next(target.parameters()).dtype == torch.float16
    x = torch.randn(2, 3, 16, 16).half()
    torch.testing.assert_close(target.eval()(x), source(x), rtol=0, atol=0)


def test_check_finite_names_tensors_and_counts() -> None:
    named = [(f"t{i}", torch.tensor([1.0, float("nan"), float("inf"), float("-inf")])) for i in range(6)]
    with pytest.raises(RepfuseError) as err:
        weights.check_finite([("ok", torch.ones(2)), ("ints", torch.arange(3)), *named], "ckpt.pt")
    assert "t0 (1 NaN and 2 Inf)" in err.value.message and "and 2 more" in err.value.message
    assert "ok" not in err.value.message.split(":", 1)[1].split(",")[0]
    weights.check_finite([("ok", torch.ones(2))], "ckpt.pt")


def test_file_kind(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.save({"w": torch.zeros(1)}, tmp_path / "a.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "b.pt", _use_new_zipfile_serialization=False)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "c.safetensors"))
    assert [rio.file_kind(tmp_path / n) for n in ("a.pt", "b.pt", "c.safetensors")] == ["zip", "pickle", "safetensors"]


def test_atomic_write_check_failure_keeps_existing(tmp_path: Path) -> None:
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"new but wrong")

    def check(tmp: Path) -> None:
        assert tmp.read_bytes() == b"new but wrong" and tmp.parent == dst.parent
        raise RepfuseError("does not load back", "bug")

    with pytest.raises(RepfuseError):
        rio.atomic_write(dst, write, check)
    assert dst.read_bytes() == b"old" and _no_temp_files(tmp_path)
    assert rio.atomic_write(dst, write) == sha256_file(dst) and dst.read_bytes() == b"new but wrong"
