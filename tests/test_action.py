"""The composite GitHub Action (action.yml at the repository root): its steps run as the runner would
run them (bash, inputs passed as environment variables, GITHUB_OUTPUT / GITHUB_STEP_SUMMARY files,
GITHUB_ACTIONS=true). The install step runs with a stand-in interpreter that records what it would install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from repfuse.samples import randomize_bn

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "action.yml"
BASH = shutil.which("bash")


def load_action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def run_step(step: dict, inputs: dict[str, str], cwd: Path, github: dict[str, str]) -> subprocess.CompletedProcess[str]:
    def expand(value: str) -> str:
        value = re.sub(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: inputs[m.group(1)], value)
        return re.sub(r"\$\{\{\s*github\.action_path\s*\}\}", str(ROOT), value)

    assert step["shell"] == "bash"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "REPFUSE_"))}
    env.update(github)
    env.update({k: expand(str(v)) for k, v in step.get("env", {}).items()})
    assert "${{" not in step["run"], "inputs reach the script through env only"
    return subprocess.run([BASH, "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def outputs_of(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    torch.manual_seed(0)
    ok = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), 0).eval()
    left = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
                                      nn.Conv2d(8, 8, 3, padding=1)), 0).eval()
    torch.save(ok, tmp_path / "ok.pt")
    torch.save(left, tmp_path / "left.pt")
    github = {"GITHUB_ACTIONS": "true", "GITHUB_OUTPUT": str(tmp_path / "out.env"),
              "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    return tmp_path, github


def defaults(**given: str) -> dict[str, str]:
    inputs = {k: str(v.get("default", "")) for k, v in load_action()["inputs"].items()}
    inputs.update(given)
    return inputs


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_action_metadata() -> None:
    action = load_action()
    assert action["runs"]["using"] == "composite"
    assert {s["id"] for s in action["runs"]["steps"]} == {"install", "convert"}
    assert {"checkpoint", "output", "args", "strict", "report"} <= set(action["inputs"])
    assert action["inputs"]["checkpoint"]["required"] is True and action["inputs"]["strict"]["default"] == "true"


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_install_step_installs_this_source_by_default(work) -> None:
    tmp, github = work
    recorder = tmp / "python"
    recorder.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/pip-args"\n')
    recorder.chmod(0o755)
    install = next(s for s in load_action()["runs"]["steps"] if s["id"] == "install")
    r = run_step(install, defaults(python=str(recorder), checkpoint="ok.pt", output="d.pt"), tmp, github)
    assert r.returncode == 0, r.stderr
    assert (tmp / "pip-args").read_text().split() == ["-m", "pip", "install", "--quiet", str(ROOT)]
    r = run_step(install, defaults(python=str(recorder), install="repfuse[onnx] onnx", checkpoint="x", output="y"),
                 tmp, github)
    assert (tmp / "pip-args").read_text().split()[-2:] == ["repfuse[onnx]", "onnx"]


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_convert_step_passes_and_fails_the_job(work) -> None:
    tmp, github = work
    convert = next(s for s in load_action()["runs"]["steps"] if s["id"] == "convert")
    inputs = defaults(python=sys.executable, checkpoint="ok.pt", output="deploy/ok.pt2",
                      args="--input-shape 1,3,16,16 --trials 2")
    (tmp / "deploy").mkdir()
    r = run_step(convert, inputs, tmp, github)
    assert r.returncode == 0, r.stderr
    assert (tmp / "deploy" / "ok.pt2").exists() and (tmp / "repfuse-report.json").exists()
    assert outputs_of(tmp / "out.env") == {"report": "repfuse-report.json", "exit-code": "0"}
    assert "### repfuse convert: PASSED · deploy/ok.pt2" in (tmp / "summary.md").read_text()

    (tmp / "out.env").unlink()
    r = run_step(convert, {**inputs, "checkpoint": "left.pt", "output": "deploy/left.pt"}, tmp, github)
    assert r.returncode == 4, r.stderr
    assert "::error title=repfuse convert::not fully deployed" in r.stderr
    assert not (tmp / "deploy" / "left.pt").exists()
    assert outputs_of(tmp / "out.env")["exit-code"] == "4"
    assert "### repfuse convert: NOT DEPLOYED" in (tmp / "summary.md").read_text()

    r = run_step(convert, {**inputs, "checkpoint": "left.pt", "output": "deploy/left.pt", "strict": "false"}, tmp,
                 github)
    assert r.returncode == 0, r.stderr
    assert "::warning title=repfuse convert::not fully deployed" in r.stderr and (tmp / "deploy" / "left.pt").exists()
