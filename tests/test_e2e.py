"""End to end: the installed `repfuse` command on every bundled sample checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "sample_checkpoints").glob("*.pt"))
REPFUSE = shutil.which("repfuse")

pytestmark = pytest.mark.skipif(REPFUSE is None, reason="the repfuse console script is not installed")


def repfuse(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REPFUSE_DEBUG"}
    return subprocess.run([REPFUSE, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


def test_samples_exist() -> None:
    assert {p.name for p in SAMPLES} >= {"repvgg_tiny.pt", "mobileone_tiny.pt", "acnet_tiny.pt"}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_convert_verify_inspect(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy.pt"
    report = tmp_path / "report.json"
    r = repfuse("convert", str(sample), str(out), "--report", str(report), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    data = json.loads(report.read_text())
    assert data["schema"] == 1
    assert data["verification"]["passed"] is True
    assert data["verification"]["exact_max_abs_error"] < 1e-9 * max(1.0, data["verification"]["max_abs_error"])
    assert data["summary"]["fusions"] == len(data["fusions"]) > 0
    assert data["summary"]["norms_after"] == 0
    assert data["summary"]["params_after"] < data["summary"]["params_before"]
    assert data["output"]["sha256"]
    for site in data["fusions"]:
        assert site["module"] and site["pattern"] and site["branches"]
        assert site["max_abs_error"] < 1e-9

    # the deploy file loads with plain torch.load (repfuse importable, no code stored in the file)
    obj = torch.load(out, weights_only=False)
    original = torch.load(sample, weights_only=False)
    if isinstance(original, dict):
        assert set(obj) == set(original)
        assert obj["epoch"] == original["epoch"]
        model, train = obj["model"], original["model"]
    else:
        model, train = obj, original
    assert _norms(model) == 0
    assert next(model.parameters()).dtype == next(train.parameters()).dtype

    # ... and with repfuse itself without --trust; verifying a deploy model fuses nothing more
    r = repfuse("verify", str(out), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["fusions"] == 0

    r = repfuse("verify", str(sample), "--against", str(out), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verification"]["passed"] is True

    r = repfuse("inspect", str(sample), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tree = json.loads(r.stdout)["modules"]
    assert any("folded into" in m["note"] for m in tree)


def test_against_a_different_model_fails(tmp_path: Path) -> None:
    from repfuse.samples import randomize_bn

    sample = ROOT / "sample_checkpoints" / "repvgg_tiny.pt"
    other = torch.load(sample, weights_only=False)
    randomize_bn(other, seed=123)
    torch.save(other, tmp_path / "other.pt")
    r = repfuse("verify", str(sample), "--against", str(tmp_path / "other.pt"), cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr


def test_convert_markdown_report_and_human_output(tmp_path: Path) -> None:
    sample = ROOT / "sample_checkpoints" / "acnet_tiny.pt"
    r = repfuse("convert", str(sample), str(tmp_path / "o.pt"), "--report", str(tmp_path / "r.md"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "r.md").read_text()
    assert "features.0" in md
    assert "PASSED" in r.stdout.upper()


def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(2048))
    out = tmp_path / "out.pt"
    r = repfuse("convert", str(bad), str(out), cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error:") and "hint:" in r.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bad]


def test_wrong_input_shape_is_a_usage_error(tmp_path: Path) -> None:
    sample = ROOT / "sample_checkpoints" / "repvgg_tiny.pt"
    r = repfuse("convert", str(sample), str(tmp_path / "o.pt"), "--input-shape", "1,5,32,32", cwd=tmp_path)
    assert r.returncode == 2
    assert "input-shape" in r.stderr
    assert not (tmp_path / "o.pt").exists()
