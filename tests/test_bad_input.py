"""Bad input through the command: exit 2, one `error:` and one `hint:` line on stderr, no traceback,
nothing written, and no code run (neither the file's pickle payload nor the --model module)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner
from user_code import ExecPayload, SystemPayload, files_in

from repfuse import cli, factory
from repfuse.samples import acnet_tiny, randomize_bn, repvgg_tiny
from repfuse.types import RepfuseError

runner = CliRunner()
REPFUSE = shutil.which("repfuse")
SAMPLE = "repfuse.samples:repvgg_tiny"


def invoke(*args: object):
    return runner.invoke(cli.app, [str(a) for a in args])


def sample_model(factory_fn=repvgg_tiny, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(factory_fn(), seed).eval()


def assert_refused(r, directory: Path, before: set[str], *needles: str) -> str:
    """Exit 2, `error:` + `hint:` lines, no traceback, no new file in `directory`; returns the error line."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert files_in(directory) == before
    return lines[0]


# ------------------------------------------------------------------------------------------------
# broken files


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("with_model", [False, True])
def test_truncated_checkpoint(tmp_path: Path, legacy: bool, with_model: bool) -> None:
    full = tmp_path / "full.pt"
    obj = sample_model().state_dict() if with_model else sample_model(acnet_tiny)
    torch.save(obj, full, _use_new_zipfile_serialization=not legacy)
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    full.unlink()
    before = files_in(tmp_path)
    extra = ["--model", SAMPLE] if with_model else []
    assert_refused(invoke("convert", bad, tmp_path / "out.pt", *extra), tmp_path, before, "trunc.pt")


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sample_model().state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    before = files_in(tmp_path)
    line = assert_refused(invoke("convert", path, tmp_path / "o.pt", "--model", SAMPLE), tmp_path, before)
    assert "truncated or corrupt" in line


@pytest.mark.parametrize("head", [b"", b"\x80\x02", b"PK\x03\x04", b"\x10\x00\x00\x00\x00\x00\x00\x00{", b"\x00"])
@pytest.mark.parametrize("with_model", [False, True])
def test_random_bytes(tmp_path: Path, head: bytes, with_model: bool) -> None:
    gen = torch.Generator().manual_seed(len(head))
    noise = bytes(torch.randint(0, 256, (2048,), generator=gen, dtype=torch.uint8).tolist())
    path = tmp_path / "noise.safetensors"
    path.write_bytes(head + (noise if head else b""))
    before = files_in(tmp_path)
    extra = ["--model", SAMPLE] if with_model else []
    assert_refused(invoke("convert", path, tmp_path / "o.pt2", *extra), tmp_path, before)


# ------------------------------------------------------------------------------------------------
# pickles that would run code




@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("kind", ["model", "state_dict"])
def test_code_running_pickle_never_runs(tmp_path: Path, payload, legacy: bool, kind: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    weights = sample_model().state_dict() if kind == "state_dict" else sample_model(acnet_tiny)
    torch.save({"model": weights, "extra": payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()  # saving did not run it
    before = files_in(tmp_path)
    extra = ["--model", SAMPLE] if kind == "state_dict" else []
    for out in ("o.pt", "o.safetensors", "o.pt2"):
        line = assert_refused(invoke("convert", path, tmp_path / out, *extra), tmp_path, before, "arbitrary code")
        assert ("system" in line) if payload is SystemPayload else ("exec" in line)
    assert not marker.exists()  # ... and loading did not either


@pytest.mark.skipif(REPFUSE is None, reason="the repfuse console script is not installed")
def test_code_running_pickle_installed_command(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": sample_model().state_dict(), "x": SystemPayload(marker)}, path)
    env = {k: v for k, v in os.environ.items() if k != "REPFUSE_DEBUG"}
    r = subprocess.run([REPFUSE, "convert", str(path), str(tmp_path / "o.safetensors"), "--model", SAMPLE],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "arbitrary code" in r.stderr
    assert not marker.exists() and files_in(tmp_path) == {"evil.pth"}


def test_bad_file_never_imports_the_model_module(user_env, tmp_path: Path) -> None:
    """The checkpoint is read and checked before --model's module is imported."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04garbage" * 10)
    before = files_in(tmp_path)
    assert_refused(invoke("convert", bad, tmp_path / "o.pt", "--model", f"{user_env.name}.touch:build"),
                   tmp_path, before)
    assert not user_env.marker.exists()
    # with a good file the module is imported (the user asked for it), proving the marker works
    good = tmp_path / "good.pt"
    torch.save(user_env.train_model().state_dict(), good)
    r = invoke("convert", good, tmp_path / "o.pt", "--model", f"{user_env.name}.touch:build", "-s", "1,3,8,8", "-q")
    assert r.exit_code == 0, r.output
    assert user_env.marker.exists()


# ------------------------------------------------------------------------------------------------
# paths


def test_missing_input(tmp_path: Path) -> None:
    assert_refused(invoke("convert", tmp_path / "nope.pth", tmp_path / "o.pt", "--model", SAMPLE), tmp_path,
                   set(), "input file not found")


@pytest.mark.parametrize("out", ["o.json", "o", "o.tflite", "o.pt.bak"])
def test_unknown_output_extension_before_any_work(tmp_path: Path, out: str) -> None:
    src = tmp_path / "in.pt"
    src.write_bytes(b"random bytes that would fail to load")  # the extension is refused first
    assert_refused(invoke("convert", src, tmp_path / out), tmp_path, {"in.pt"}, "unknown output format")


@pytest.mark.parametrize("name", ["in.pt", "in.safetensors"])
def test_out_equal_to_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    src = tmp_path / name
    src.write_bytes(b"precious")
    for spelled in (name, f"./{name}", str(src)):
        assert_refused(invoke("convert", name, spelled, "--model", SAMPLE), tmp_path, {name}, "same file as IN")
    assert src.read_bytes() == b"precious"


# ------------------------------------------------------------------------------------------------
# content


def test_state_dict_that_does_not_fit_the_factory(tmp_path: Path) -> None:
    state = sample_model().state_dict()
    cases = {
        "missing": {k: v for k, v in state.items() if not k.startswith("stage3.")},
        "unexpected": {**state, "extra.weight": torch.zeros(1), "extra.bias": torch.zeros(1)},
        "shape": {**state, "linear.weight": torch.zeros(11, 128), "linear.bias": torch.zeros(11)},
    }
    for case, sd in cases.items():
        path = tmp_path / f"{case}.pt"
        torch.save(sd, path)
    before = files_in(tmp_path)
    line = assert_refused(invoke("convert", tmp_path / "missing.pt", tmp_path / "o.pt", "--model", SAMPLE),
                          tmp_path, before, "missing keys", "stage3.0.rbr_dense.conv.weight")
    n_missing = sum(k.startswith("stage3.") and not k.endswith("num_batches_tracked") for k in state)
    assert f"{n_missing} missing keys" in line and f"and {n_missing - 4} more" in line
    assert_refused(invoke("convert", tmp_path / "unexpected.pt", tmp_path / "o.pt", "--model", SAMPLE),
                   tmp_path, before, "2 unexpected keys: extra.weight, extra.bias")
    assert_refused(invoke("convert", tmp_path / "shape.pt", tmp_path / "o.pt", "--model", SAMPLE),
                   tmp_path, before, "2 shape mismatches", "linear.weight (checkpoint 11×128, model 10×128)")


def test_whole_pickled_model_of_user_classes_needs_allow(user_env, tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(user_env.train_model(), path)
    before = files_in(tmp_path)
    r = invoke("convert", path, tmp_path / "o.pt")
    assert_refused(r, tmp_path, before, f"{user_env.name}.nets.TrainNet")
    assert f"--allow {user_env.name}" in r.stderr and "--trust" in r.stderr
    r = invoke("convert", path, tmp_path / "o.pt", "--allow", user_env.name, "-s", "1,3,8,8", "-q")
    assert r.exit_code == 0, r.output


def test_state_dict_or_safetensors_without_model_flag(tmp_path: Path) -> None:
    torch.save({"state_dict": sample_model().state_dict()}, tmp_path / "sd.pt")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    before = files_in(tmp_path)
    for name in ("sd.pt", "w.safetensors"):
        r = invoke("convert", tmp_path / name, tmp_path / "o.pt")
        assert_refused(r, tmp_path, before)
        assert "--model MODULE:CALLABLE" in r.stderr


def test_no_state_dict_in_container(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "c.pt")
    assert_refused(invoke("convert", tmp_path / "c.pt", tmp_path / "o.pt", "--model", SAMPLE), tmp_path,
                   {"c.pt"}, "no state_dict", "'epoch'")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["model", "state_dict", "safetensors"])
def test_nonfinite_input_weights(tmp_path: Path, value: float, kind: str) -> None:
    model = sample_model()
    with torch.no_grad():
        model.stage2[1].rbr_dense.bn.running_var[3] = value
    if kind == "model":
        path, extra = tmp_path / "m.pt", []
        torch.save(model, path)
    elif kind == "state_dict":
        path, extra = tmp_path / "m.pt", ["--model", SAMPLE]
        torch.save(model.state_dict(), path)
    else:
        path, extra = tmp_path / "m.safetensors", ["--model", SAMPLE]
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    before = files_in(tmp_path)
    for out in ("o.pt", "o.safetensors"):
        line = assert_refused(invoke("convert", path, tmp_path / out, *extra), tmp_path, before, "NaN or Inf")
        assert "stage2.1.rbr_dense.bn.running_var (1 " + ("NaN" if value != value else "Inf") + ")" in line
    assert_refused(invoke("verify", path, *extra), tmp_path, before, "NaN or Inf")


# ------------------------------------------------------------------------------------------------
# --model / --model-arg


@pytest.mark.parametrize(("spec", "args", "needle"), [
    ("nocolon", [], "malformed --model"),
    ("a b:c", [], "malformed --model"),
    ("no_such_module_xyz:build", [], "cannot be imported"),
    ("{pkg}.nets:nope", [], "has no attribute 'nope'"),
    ("{pkg}.nets:SIZE", [], "not a callable"),
    ("{pkg}.nets:not_a_model", [], "not an nn.Module"),
    ("{pkg}.nets:broken", [], "factory exploded"),
    ("{pkg}.nets:build", ["--model-arg", "depth=3"], "unexpected keyword argument 'depth'"),
    ("{pkg}.nets:build", ["--model-arg", "width"], "malformed --model-arg"),
    ("{pkg}.nets:build", ["--model-arg", "w=1", "--model-arg", "w=2"], "given twice"),
])
def test_model_factory_errors(user_env, tmp_path: Path, spec: str, args: list[str], needle: str) -> None:
    src = tmp_path / "sd.pt"
    torch.save(user_env.train_model().state_dict(), src)
    before = files_in(tmp_path)
    r = invoke("convert", src, tmp_path / "o.pt", "--model", spec.format(pkg=user_env.name), *args)
    assert_refused(r, tmp_path, before, needle)


def test_model_arg_without_model(tmp_path: Path) -> None:
    (tmp_path / "in.pt").write_bytes(b"x")
    assert_refused(invoke("convert", tmp_path / "in.pt", tmp_path / "o.pt", "--model-arg", "a=1"), tmp_path,
                   {"in.pt"}, "--model-arg given without --model")


@pytest.mark.parametrize(("text", "value"), [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3), ("true", True), ("False", False), ("None", None),
    ("null", None), ("repvgg_a0", "repvgg_a0"), ("'3'", "3"), ('"true"', "true"), ("", ""), ("1,2", "1,2"),
])
def test_model_arg_values(text: str, value: object) -> None:
    parsed = factory.parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_model_args_and_spec() -> None:
    assert factory.parse_model_args(["model_name=repvgg_a0", "num_classes=10", "drop= 0.1"]) == (
        ("model_name", "repvgg_a0"), ("num_classes", 10), ("drop", 0.1))
    assert factory.parse_spec("timm:create_model") == ("timm", "create_model")
    assert factory.parse_spec("a.b:C.build") == ("a.b", "C.build")
    for bad in ("timm", ":f", "m:", "m:f:g", "1m:f"):
        with pytest.raises(RepfuseError):
            factory.parse_spec(bad)
