"""What convert writes and verify reads back (issue 11): the input size from the model's metadata,
dynamic .pt2/.onnx exports checked at another batch and size, --static, verify --against every
format convert writes, a state_dict input written to .pt as the deploy module, sizes in the report."""

from __future__ import annotations

import importlib.util
import json
import os
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from repfuse import api, cli, input_size
from repfuse.samples import randomize_bn, repvgg_tiny
from repfuse.types import Options, RepfuseError

runner = CliRunner()
HAVE_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
SAMPLE = "repfuse.samples:repvgg_tiny"


def invoke(*args: object):
    """The CLI, allowed to unpickle this file's classes (Tiny)."""
    return runner.invoke(cli.app, [*(str(a) for a in args), "--allow", "test_outputs"])


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.a(x) + self.b(x))))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Tiny(), 0).eval()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.save(tiny(), path)
    return path


# --------------------------------------------------------------------------- input size


def test_input_size_from_metadata() -> None:
    m = tiny()
    m.pretrained_cfg = {"input_size": (3, 40, 48), "mean": (0.5,)}  # timm
    assert input_size.infer(m) == input_size.InputSize(((2, 3, 40, 48),), "timm pretrained_cfg['input_size']", False)
    u = tiny()
    u.args = types.SimpleNamespace(imgsz=32)  # Ultralytics (a namespace or a dict)
    u.yaml = {"ch": 3}
    assert input_size.infer(u).shapes == ((2, 3, 32, 32),) and "imgsz" in input_size.infer(u).source
    h = tiny()
    h.config = types.SimpleNamespace(image_size=24, num_channels=3)  # transformers
    assert input_size.infer(h).shapes == ((2, 3, 24, 24),)
    for bad in (0, -3, True, "224", [224, 0], 10**6):
        u.args = {"imgsz": bad}
        assert input_size.infer(u).guessed, bad
    guess = input_size.infer(tiny())
    assert guess.guessed and guess.shapes == ((2, 3, 64, 64),) and "guessed" in guess.source
    with pytest.raises(RepfuseError):
        input_size.infer(nn.ReLU())


def test_a_guessed_input_size_is_a_warning_with_a_code(tmp_path: Path) -> None:
    m = tiny()
    src = tmp_path / "m.pt"
    torch.save(m, src)
    r = invoke("verify", src, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [x["code"] for x in d["diagnostics"] if x["level"] == "warning"] == ["input-shape-guessed"]
    assert "--input-shape" in r.stderr and "[input-shape-guessed]" in r.stderr
    assert d["input"]["input_shape_source"].startswith("guessed 2×3×64×64")
    r = invoke("verify", src, "--json", "-s", "1,3,8,8")
    d = json.loads(r.stdout)
    assert d["diagnostics"] == [] and d["input"]["input_shape_source"] == "--input-shape"


def test_metadata_size_is_used_by_api(tmp_path: Path) -> None:
    m = tiny()
    m.pretrained_cfg = {"input_size": (3, 12, 10)}
    result = api.fuse(m, Options())
    assert result.input_shapes == ((2, 3, 12, 10),) and not result.input_guessed


# --------------------------------------------------------------------------- dynamic exports


def test_pt2_is_dynamic_in_batch_and_size_and_checked_there(tiny_file: Path, tmp_path: Path) -> None:
    out, rep = tmp_path / "d.pt2", tmp_path / "r.json"
    r = invoke("convert", tiny_file, out, "-s", "1,3,16,16", "--report", rep)
    assert r.exit_code == 0, r.output
    o = json.loads(rep.read_text())["output"]
    assert o["dynamic_batch"] is True and o["dynamic_dims"] == [[0, 2, 3]]
    assert o["checked_shapes"][0] == [[1, 3, 16, 16]] and len(o["checked_shapes"]) == 2
    assert o["checked_shapes"][1] != o["checked_shapes"][0] and o["size_bytes"] == os.path.getsize(out)
    program = torch.export.load(str(out)).module()
    x = torch.randn(5, 3, 21, 13)
    torch.testing.assert_close(run(program, x), run(tiny(), x), rtol=1e-4, atol=1e-5)

    static = tmp_path / "s.pt2"
    r = invoke("convert", tiny_file, static, "-s", "1,3,16,16", "--static", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output"]["dynamic_dims"] == [[]]
    with pytest.raises(Exception):  # noqa: B017  (a guard error of torch's choosing)
        run(torch.export.load(str(static)).module(), x)


@pytest.mark.skipif(not HAVE_ORT, reason="repfuse[onnx] not installed")
def test_onnx_is_dynamic_and_takes_an_opset(tiny_file: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "d.onnx"
    r = invoke("convert", tiny_file, out, "-s", "1,3,16,16", "--opset", "18", "--json")
    assert r.exit_code == 0, r.output
    o = json.loads(r.stdout)["output"]
    assert o["opset"] == 18 and o["dynamic_dims"] == [[0, 2, 3]] and len(o["checked_shapes"]) == 2
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 20, 12)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, run(tiny(), x), rtol=1e-4, atol=1e-5)


def test_opset_is_bounded(tiny_file: Path, tmp_path: Path) -> None:
    r = invoke("convert", tiny_file, tmp_path / "d.onnx", "--opset", "3")
    assert r.exit_code == 2 and "--opset" in r.stderr


# --------------------------------------------------------------------------- verify --against every format


def test_verify_against_each_format(tiny_file: Path, tmp_path: Path) -> None:
    sd = tmp_path / "sd.pt"
    torch.save(repvgg_tiny().state_dict(), sd)
    written = {}
    for ext in ("pt", "safetensors", "pt2", *(["onnx"] if HAVE_ORT else [])):
        written[ext] = tmp_path / f"deploy.{ext}"
        r = invoke("convert", tiny_file, written[ext], "-s", "2,3,16,16", "-q")
        assert r.exit_code == 0, r.output
    for ext, path in written.items():
        extra = {"pt2": ["--trust"]}.get(ext, [])
        if ext == "safetensors":  # weights only: into repfuse's deploy model rebuilt from IN
            r = invoke("verify", tiny_file, "--against", path, "-s", "2,3,16,16", "--json")
        else:
            r = invoke("verify", tiny_file, "--against", path, "-s", "2,3,16,16", "--json", *extra)
        assert r.exit_code == 0, (ext, r.output)
        d = json.loads(r.stdout)
        assert d["verification"]["passed"] and d["output"]["against"]["path"] == str(path)
    r = invoke("verify", tiny_file, "--against", written["pt2"], "-s", "2,3,16,16")
    assert r.exit_code == 2 and "--trust" in r.stderr  # loading a .pt2 runs pickles stored in it


def test_verify_against_a_different_model_fails_with_a_useful_hint(tiny_file: Path, tmp_path: Path) -> None:
    other = tiny()
    with torch.no_grad():
        other.head.weight.mul_(1.5)
    path = tmp_path / "other.pt"
    torch.save(other, path)
    r = invoke("verify", tiny_file, "--against", path, "-s", "2,3,16,16")
    assert r.exit_code == 1
    assert "see the worst sites above" not in r.stderr and "converted from IN" in r.stderr
    assert "fusions" not in r.stdout.split("Totals")[1].split("Verification")[0]


# --------------------------------------------------------------------------- every OUT loads into something runnable


def test_state_dict_input_to_pt_holds_the_deploy_module(tmp_path: Path) -> None:
    train = randomize_bn(repvgg_tiny(), 0).eval()
    src, out, st = tmp_path / "sd.pt", tmp_path / "deploy.pt", tmp_path / "deploy.safetensors"
    torch.save(train.state_dict(), src)
    r = invoke("convert", src, out, "--model", SAMPLE, "-s", "2,3,16,16", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output"]["content"] == "model"
    deploy = torch.load(out, weights_only=False)
    assert isinstance(deploy, nn.Module) and not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(run(deploy.eval(), x), run(train, x), rtol=1e-4, atol=1e-5)
    r = invoke("verify", out, "-s", "2,3,16,16", "-q")  # loads again without --trust
    assert r.exit_code == 0, r.output
    r = invoke("convert", src, st, "--model", SAMPLE, "-s", "2,3,16,16", "-q")  # weights only: asked for
    assert r.exit_code == 0 and set(load_file(st)) == set(api.fuse(train, Options(input_shapes=((2, 3, 16, 16),)))
                                                           .model.state_dict())
