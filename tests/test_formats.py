"""Output formats (.pt, .safetensors, .pt2, .onnx), state_dict inputs with --model, the user's own
deploy model (--deploy-model, --keymap), atomic writes and reproducible bytes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner
from user_code import files_in

from repfuse import __version__, api, cli, export, verify
from repfuse import io as rio
from repfuse.samples import mobileone_tiny, randomize_bn, repvgg_tiny
from repfuse.types import Options, RepfuseError

runner = CliRunner()
REPFUSE = shutil.which("repfuse")
HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
SAMPLE = "repfuse.samples:repvgg_tiny"
SHAPE = (2, 3, 32, 32)


def invoke(*args: object):
    return runner.invoke(cli.app, [str(a) for a in args])


def sample_model(factory=repvgg_tiny, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(factory(), seed).eval()


def outputs(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def ddp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """repvgg_tiny's state_dict as DistributedDataParallel saves it, inside a training container."""
    path = tmp_path_factory.mktemp("ckpt") / "train.pth"
    state = {f"module.{k}": v for k, v in sample_model().state_dict().items()}
    torch.save({"state_dict": state, "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    return path


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# every format from a state_dict + --model


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "pt2",
                                 pytest.param("onnx", marks=pytest.mark.skipif(not HAVE_ORT,
                                                                               reason="repfuse[onnx] not installed"))])
def test_state_dict_input_to_each_format(ddp_checkpoint: Path, tmp_path: Path, fmt: str) -> None:
    out, rep = tmp_path / f"deploy.{fmt}", tmp_path / "r.json"
    r = invoke("convert", ddp_checkpoint, out, "--model", SAMPLE, "--input-shape", "2,3,32,32", "--report", rep)
    assert r.exit_code == 0, r.output
    data = _report(rep)
    assert data["input"]["kind"] == "state_dict" and data["input"]["factory"] == SAMPLE
    assert data["input"]["prefix_stripped"] == "module." and data["input"]["container_key"] == "state_dict"
    assert data["input"]["sha256"] == rio.sha256_file(ddp_checkpoint)
    o = data["output"]
    assert o["path"] == str(out) and o["format"] == fmt and o["verified"] is True
    assert o["sha256"] == rio.sha256_file(out)
    assert data["verification"]["passed"] and data["summary"]["norms_after"] == 0
    assert files_in(tmp_path) == {out.name, rep.name}  # no temporary file left

    train = sample_model()
    x = torch.randn(3, 3, 32, 32)  # another batch size than the export inputs
    expected = outputs(train, x)
    deploy = api.fuse(train, Options(input_shapes=(SHAPE,))).model  # repfuse's deploy structure
    if fmt == "pt":  # the deploy module, in the training container in place of the weights
        obj = torch.load(out, weights_only=False)
        assert set(obj) == {"state_dict", "epoch", "optimizer"} and obj["epoch"] == 7
        assert o["content"] == "model" and isinstance(obj["state_dict"], nn.Module)
        got = outputs(obj["state_dict"].eval(), x)
    elif fmt == "safetensors":
        deploy.load_state_dict(load_file(out), strict=True)
        got = outputs(deploy, x)
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        assert meta["repfuse_version"] == __version__ and meta["format"] == "pt"
        assert meta["input_sha256"] == data["input"]["sha256"]
        assert json.loads(meta["input_shape"]) == [[2, 3, 32, 32]]
        embedded = json.loads(meta["report"])
        assert embedded["schema"] == 1 and embedded["fusions"] == data["fusions"]
        assert embedded["timings"] == {} and embedded["output"] == {"format": "safetensors"}
    elif fmt == "pt2":
        assert o["dynamic_batch"] is True
        got = outputs(torch.export.load(str(out)).module(), x)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert o["runtime"].startswith("onnxruntime") and o["opset"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_whole_model_fp16_container_to_safetensors_and_pt2(tmp_path: Path) -> None:
    src = tmp_path / "m.pt"
    torch.save({"model": sample_model(mobileone_tiny).half(), "epoch": 3}, src)
    for fmt in ("safetensors", "pt2"):
        out = tmp_path / f"o.{fmt}"
        r = invoke("convert", src, out, "-s", "2,3,32,32", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["output"]["sha256"] == rio.sha256_file(out)
    tensors = load_file(tmp_path / "o.safetensors")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    program = torch.export.load(str(tmp_path / "o.pt2")).module()
    x = torch.randn(2, 3, 32, 32).half()
    ref = outputs(sample_model(mobileone_tiny).half(), x)
    torch.testing.assert_close(outputs(program, x), ref, rtol=1e-2, atol=1e-2)


def test_safetensors_input_and_lightning_prefix(tmp_path: Path) -> None:
    train = sample_model()
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in train.state_dict().items()}, str(st))
    lightning = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in train.state_dict().items()}, "global_step": 9},
               lightning)
    for src in (st, lightning):
        out = tmp_path / f"{src.stem}.deploy.pt"
        r = invoke("convert", src, out, "--model", SAMPLE, "-s", "2,3,32,32", "--json")
        assert r.exit_code == 0, r.output
        info = json.loads(r.stdout)["input"]
        assert info["format"] == ("safetensors" if src == st else "torch")
        assert info.get("prefix_stripped", "") == ("" if src == st else "model.")
    assert torch.load(tmp_path / "epoch=3.deploy.pt", weights_only=False)["global_step"] == 9


def test_model_args_reach_the_factory(user_env, tmp_path: Path) -> None:
    src = tmp_path / "sd.pt"
    torch.save(user_env.train_model(width=12, num_classes=4, groups=3).state_dict(), src)
    out = tmp_path / "o.pt2"
    r = invoke("convert", src, out, "--model", user_env.spec(), "--model-arg", "width=12",
               "--model-arg", "num_classes=4", "--model-arg", "groups=3", "-s", "1,3,16,16", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["input"]["factory_args"] == {"width": 12, "num_classes": 4, "groups": 3}


def test_verify_against_safetensors_rebuilds_the_deploy_structure(ddp_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.safetensors"
    assert invoke("convert", ddp_checkpoint, out, "--model", SAMPLE, "-s", "2,3,32,32", "-q").exit_code == 0
    r = invoke("verify", ddp_checkpoint, "--model", SAMPLE, "-s", "2,3,32,32", "--against", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["verification"]["passed"] and data["output"]["against"]["factory"].startswith("repfuse")
    # a damaged deploy file is caught
    tensors = load_file(out)
    name = next(k for k in tensors if k.endswith("fused.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    r = invoke("verify", ddp_checkpoint, "--model", SAMPLE, "-s", "2,3,32,32", "--against",
               tmp_path / "bad.safetensors")
    assert r.exit_code == 1


# ------------------------------------------------------------------------------------------------
# .pt2 runs where neither the user's code nor repfuse can be imported


BLOCKER = textwrap.dedent('''
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    import torch
    program = torch.export.load(sys.argv[1]).module()
    x, expected = torch.load(sys.argv[2])
    got = program(x)
    assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED], "imported blocked code"
    print("MAXERR", float((got - expected).abs().max()))
''')


@pytest.mark.skipif(REPFUSE is None, reason="the repfuse console script is not installed")
def test_pt2_runs_without_user_code_or_repfuse(user_env, tmp_path: Path) -> None:
    src = tmp_path / "train.pt"
    model = user_env.train_model()
    torch.save({"model": model.state_dict()}, src)
    env = {k: v for k, v in os.environ.items() if k not in ("REPFUSE_DEBUG", "PYTHONPATH")}
    r = subprocess.run([REPFUSE, "convert", "train.pt", "deploy.pt2", "--model", user_env.spec(),
                        "-s", "2,3,20,20", "-q"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    x = torch.randn(5, 3, 20, 20)
    torch.save((x, outputs(model, x)), tmp_path / "io.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = f"BLOCKED = {{'repfuse', {user_env.name!r}}}\n" + BLOCKER
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "deploy.pt2"), str(tmp_path / "io.pt")],
                       cwd=elsewhere, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split("MAXERR")[1]) < 1e-4


# ------------------------------------------------------------------------------------------------
# onnx


def test_onnx_missing_extra_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "m.pt"
    torch.save(sample_model(), src)
    real = importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnx", "onnxscript") else real(name, *a))

    def no_work(*args, **kwargs):
        raise AssertionError("loaded the checkpoint before refusing the output format")

    monkeypatch.setattr(api.rio, "load_checkpoint", no_work)
    r = invoke("convert", src, tmp_path / "m.onnx")
    assert r.exit_code == 2
    assert "onnx" in r.stderr and 'pip install "repfuse[onnx]"' in r.stderr and "Traceback" not in r.stderr
    assert files_in(tmp_path) == {"m.pt"}


# ------------------------------------------------------------------------------------------------
# the user's own deploy model


def test_deploy_model_and_keymap(user_env, tmp_path: Path) -> None:
    src = tmp_path / "train.pth"
    train = user_env.train_model()
    torch.save({"state_dict": train.state_dict(), "epoch": 1}, src)
    out, km, rep = tmp_path / "deploy.pth", tmp_path / "km.json", tmp_path / "r.json"
    r = invoke("convert", src, out, "--model", user_env.spec(), "--deploy-model", user_env.spec("build_deploy"),
               "--keymap", km, "-s", "2,3,16,16", "--report", rep)
    assert r.exit_code == 0, r.output
    mapping = json.loads(km.read_text())["mapping"]
    assert mapping["stage0.rbr_reparam.weight"].endswith("fused.weight")
    assert mapping["classifier.weight"] == "head.weight"
    data = _report(rep)
    assert data["output"]["deploy_model"] == user_env.spec("build_deploy")
    assert data["output"]["keymap"]["sha256"] == rio.sha256_file(km)
    assert data["verification"]["passed"] and data["verification"]["exact_max_rel_error"] < 1e-9

    state = torch.load(out, weights_only=True)["state_dict"]
    deploy = user_env.nets().build_deploy()
    deploy.load_state_dict(state, strict=True)  # the user's own key names
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(outputs(deploy.eval(), x), outputs(train, x), rtol=1e-4, atol=1e-5)

    st = tmp_path / "deploy.safetensors"
    r = invoke("convert", src, st, "--model", user_env.spec(), "--deploy-model", user_env.spec("build_deploy"),
               "-s", "2,3,16,16", "-q")
    assert r.exit_code == 0, r.output
    assert set(load_file(st)) == set(state)
    with safe_open(str(st), framework="pt") as f:
        assert json.loads(f.metadata()["keymap"]) == mapping
    r = invoke("verify", src, "--model", user_env.spec(), "--against", st, "--deploy-model",
               user_env.spec("build_deploy"), "-s", "2,3,16,16", "-q")
    assert r.exit_code == 0, r.output


def test_mismatched_deploy_model_exits_2_naming_the_layer(user_env, tmp_path: Path) -> None:
    src = tmp_path / "train.pt"
    torch.save(user_env.train_model().state_dict(), src)
    before = files_in(tmp_path)
    r = invoke("convert", src, tmp_path / "d.pt", "--model", user_env.spec(), "--deploy-model",
               user_env.spec("build_deploy"), "--deploy-model-arg", "groups=1", "--keymap", tmp_path / "k.json",
               "-s", "2,3,16,16")
    assert r.exit_code == 2, r.output
    first = next(ln for ln in r.stderr.splitlines() if not ln.startswith("repfuse: "))  # after progress lines
    assert first.startswith("error: ") and "stage1.rbr_reparam" in first and "groups" in first
    assert "Traceback" not in r.stderr
    assert files_in(tmp_path) == before


@pytest.mark.parametrize(("args", "needle"), [
    (["--keymap", "k.json"], "--keymap needs --deploy-model"),
    (["--deploy-model", "x:y", "--keymap", "k.txt"], ".json"),
    (["--deploy-model-arg", "a=1"], "--deploy-model-arg given without --deploy-model"),
])
def test_keymap_and_deploy_flag_errors_before_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   args: list[str], needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    Path("in.pt").write_bytes(b"not read")
    r = invoke("convert", "in.pt", "d.pt", *args)
    assert r.exit_code == 2
    assert needle in r.stderr.splitlines()[0], r.stderr
    assert files_in(tmp_path) == {"in.pt"}


# ------------------------------------------------------------------------------------------------
# atomic writes


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "pt2", "state.pt"])
def test_interrupted_write_keeps_the_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    src = tmp_path / "in.pt"
    model = sample_model()
    torch.save(model.state_dict() if fmt == "state.pt" else model, src)
    dst = tmp_path / f"out.{fmt.split('.')[-1]}"
    dst.write_bytes(b"previous output")
    real = os.replace

    def interrupted(path, target):  # after the temp file is written and checked: the rename
        if str(path).endswith(".tmp"):
            raise KeyboardInterrupt
        return real(path, target)

    monkeypatch.setattr(os, "replace", interrupted)
    options = Options(input_shapes=(SHAPE,), model=SAMPLE if fmt == "state.pt" else None)
    with pytest.raises(KeyboardInterrupt):
        api.convert_file(src, dst, options)
    assert dst.read_bytes() == b"previous output"
    assert files_in(tmp_path) == {"in.pt", dst.name}


def test_nonfinite_fused_weights_are_refused_even_with_force(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():  # folding scales the weights by 300/sqrt(1e-5): beyond float16's range
        model[1].running_var.fill_(0.0)
        model[1].weight.fill_(300.0)
        model[0].weight.fill_(0.7)
    src = tmp_path / "in.pt"
    torch.save(model.half(), src)
    for extra in ([], ["--force"]):
        r = invoke("convert", src, tmp_path / "out.pt", *extra)
        assert r.exit_code == 2, r.output
        assert "NaN or Inf" in r.stderr and "overflows float16" in r.stderr
        assert files_in(tmp_path) == {"in.pt"}


# ------------------------------------------------------------------------------------------------
# reproducible bytes


REPRO = textwrap.dedent('''
    import sys
    from pathlib import Path
    from repfuse import api
    from repfuse.types import Options
    src, whole, out, stem = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    options = Options(input_shapes=((2, 3, 32, 32),), model="repfuse.samples:repvgg_tiny")
    for ext in (".pt", ".safetensors"):
        print(ext, api.convert_file(src, out / (stem + ext), options).output["sha256"])
    report = api.convert_file(whole, out / (stem + ".whole.pt"), Options(input_shapes=((2, 3, 32, 32),)))
    print(".whole.pt", report.output["sha256"])
''')


def test_same_input_gives_identical_bytes(ddp_checkpoint: Path, tmp_path: Path) -> None:
    """Two processes, other directories and file names (torch.save(obj, path) would record the
    file name in the zip archive; the safetensors library orders its header from a hash map)."""
    whole = tmp_path / "whole.pt"
    torch.save(sample_model(), whole)
    env = {k: v for k, v in os.environ.items() if k != "REPFUSE_DEBUG"}
    digests = []
    for run, stem in (("one", "first"), ("two", "second_name")):
        (tmp_path / run).mkdir()
        r = subprocess.run([sys.executable, "-c", REPRO, str(ddp_checkpoint), str(whole), str(tmp_path / run), stem],
                           capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        digests.append(dict(line.split() for line in r.stdout.splitlines()))
    assert digests[0] == digests[1]
    for ext in (".pt", ".safetensors", ".whole.pt"):
        one = (tmp_path / "one" / f"first{ext}").read_bytes()
        assert one == (tmp_path / "two" / f"second_name{ext}").read_bytes(), ext
        assert digests[0][ext] == rio.sha256_file(tmp_path / "one" / f"first{ext}")


def test_safetensors_header_is_canonical() -> None:
    state = {"b": torch.zeros(3), "a": torch.ones(2, dtype=torch.float16)}
    one = export.safetensors_bytes(state, {"z": "1", "a": "2", "format": "pt"})
    two = export.safetensors_bytes(dict(reversed(state.items())), {"format": "pt", "a": "2", "z": "1"})
    assert one == two
    n = int.from_bytes(one[:8], "little")
    assert (8 + n) % 8 == 0 and json.loads(one[8:8 + n])["__metadata__"] == {"a": "2", "format": "pt", "z": "1"}


def test_output_format_by_extension() -> None:
    for name, fmt in (("a.pt", "pt"), ("a.PTH", "pt"), ("a.bin", "pt"), ("a.ckpt", "pt"),
                      ("a.safetensors", "safetensors"), ("a.pt2", "pt2"), ("a.onnx", "onnx")):
        assert export.output_format(name) == fmt
    for name in ("a.json", "a", "a.pt.tmp", "a.tflite"):
        with pytest.raises(RepfuseError) as err:
            export.output_format(name)
        assert ".safetensors" in err.value.hint


def test_api_verify_in_memory_with_deploy_model(user_env) -> None:
    train = user_env.train_model()
    src = user_env.root / "m.pt"
    torch.save(train.state_dict(), src)
    options = Options(input_shapes=((2, 3, 16, 16),), model=user_env.spec(),
                      deploy_model=user_env.spec("build_deploy"))
    report = api.verify_file(src, options)
    assert report.verification is not None and report.verification.passed
    assert verify.model_dtype(train) == torch.float32
