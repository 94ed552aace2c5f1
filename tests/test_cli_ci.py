"""The CLI as a CI step (issue 11): --strict, one JSON object also on errors, stdout/stderr and a
closed stdout, GitHub Actions annotations and step summary, --help, inspect's compact view.
In-process with the api faked where the engine is not the point; real runs on tiny models where it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli_usage import FakeApi, make_report
from torch import nn
from typer.testing import CliRunner

from repfuse import api, cli
from repfuse import report as rpt
from repfuse.samples import randomize_bn
from repfuse.types import ModuleInfo, NotFullyDeployed, Options, Report, SkippedSite

jsonschema = pytest.importorskip("jsonschema")
runner = CliRunner()
CI_ENV = ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "REPFUSE_DEBUG")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    for name, command in (("convert_file", "convert"), ("verify_file", "verify"), ("inspect_file", "inspect")):
        monkeypatch.setattr(cli.api, name, fake.make(name, command))
    for var in CI_ENV:
        monkeypatch.delenv(var, raising=False)
    return fake


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "in.pt"
    path.write_bytes(b"x")
    return path


def one_json(stdout: str) -> dict[str, Any]:
    """stdout is exactly one JSON object, valid against the shipped schema."""
    doc = json.loads(stdout)
    assert isinstance(doc, dict)
    jsonschema.validate(doc, rpt.schema())
    return doc


def not_deployed_report(command: str = "convert") -> Report:
    r = make_report(command, output=None)
    return Report(**{**r.__dict__, "strict": True})


# --------------------------------------------------------------------------- --strict


def test_strict_convert_exits_4_lists_the_reasons_and_writes_nothing(fake, src: Path, tmp_path: Path) -> None:
    fake.outcome["convert_file"] = NotFullyDeployed(not_deployed_report(), ("skipped head.bn: BN in train mode",))
    rep = tmp_path / "r.json"
    r = runner.invoke(cli.app, ["convert", str(src), str(tmp_path / "out.pt"), "--strict", "--report", str(rep)])
    assert r.exit_code == 4, r.output
    assert fake.calls[0][1][2].strict is True
    assert r.stdout.startswith("NOT DEPLOYED · nothing written · 2 fused")
    error = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert error == ["error: not fully deployed (1 reason): skipped head.bn: BN in train mode"]
    assert "nothing was written" in r.stderr
    assert not (tmp_path / "out.pt").exists()
    doc = one_json(rep.read_text())  # the evidence is written
    assert doc["error"]["exit_code"] == 4 and doc["deployment"]["reasons"] == ["skipped head.bn: BN in train mode"]


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_strict_verify_and_inspect(fake, src: Path, command: str) -> None:
    r = runner.invoke(cli.app, [command, str(src)])
    assert r.exit_code == 0, r.output  # a skipped site is fine without --strict
    r = runner.invoke(cli.app, [command, str(src), "--strict", "--json"])
    assert r.exit_code == 4, r.output
    doc = one_json(r.stdout)
    assert doc["error"]["exit_code"] == 4 and doc["deployment"] == {
        "fully_deployed": False, "strict": True, "reasons": ["skipped head.bn: BN in train mode"]}


def test_strict_with_a_real_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)), 0).eval()
    src, out = tmp_path / "m.pt", tmp_path / "d.pt"
    torch.save(model, src)
    with pytest.raises(NotFullyDeployed) as e:
        api.convert_file(src, out, Options(input_shapes=((1, 3, 8, 8),), strict=True))
    assert any(g.startswith("skipped 4: ") for g in e.value.reasons) and "1 norm layer left (of 2)" in e.value.reasons
    assert not out.exists()
    r = runner.invoke(cli.app, ["convert", str(src), str(out), "-s", "1,3,8,8", "--strict"])
    assert r.exit_code == 4 and not out.exists()
    r = runner.invoke(cli.app, ["convert", str(src), str(out), "-s", "1,3,8,8", "-q"])
    assert r.exit_code == 0 and out.exists()
    assert r.stdout.startswith("PASSED · ") and "2 skipped" in r.stdout  # conv 4's refusal, and BN 3 left


# --------------------------------------------------------------------------- one JSON object, always


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["convert", "{tmp}/missing.pt", "{tmp}/o.pt", "--json"], 2, "input file not found"),
    (["convert", "{src}", "{tmp}/o.pt", "--json", "--no-such-flag"], 2, "No such option"),
    (["verify", "{src}", "--json", "--trials", "0"], 2, "--trials"),
    (["inspect", "--json"], 2, "Missing argument"),
])
def test_json_errors_are_one_object(fake, src: Path, tmp_path: Path, args: list[str], code: int, needle: str) -> None:
    r = runner.invoke(cli.app, [a.format(tmp=tmp_path, src=src) for a in args])
    assert r.exit_code == code, r.output
    doc = one_json(r.stdout)
    assert doc["error"]["exit_code"] == code and needle in doc["error"]["message"] and doc["error"]["hint"]
    assert needle in r.stderr and "Traceback" not in r.stderr  # the diagnostics stay on stderr
    assert fake.calls == []


def test_json_internal_error_and_verification_failure(fake, src: Path, tmp_path: Path) -> None:
    fake.outcome["inspect_file"] = ValueError("boom")
    r = runner.invoke(cli.app, ["inspect", str(src), "--json"])
    assert r.exit_code == 3 and one_json(r.stdout)["error"]["message"] == "internal error: ValueError: boom"
    fake.outcome["verify_file"] = make_report("verify", passed=False)
    r = runner.invoke(cli.app, ["verify", str(src), "--json"])
    doc = one_json(r.stdout)
    assert r.exit_code == 1 and doc["error"]["exit_code"] == 1 and doc["verification"]["passed"] is False
    r = runner.invoke(cli.app, ["convert", str(src), str(tmp_path / "o.pt"), "--json"])
    doc = one_json(r.stdout)
    assert r.exit_code == 0 and doc["error"] is None
    assert {d["code"] for d in doc["diagnostics"]} == {"unclassified"}


def test_errors_leave_stdout_empty_without_json(fake, tmp_path: Path) -> None:
    r = runner.invoke(cli.app, ["verify", str(tmp_path / "missing.pt")])
    assert r.exit_code == 2 and r.stdout == ""


# --------------------------------------------------------------------------- GitHub Actions


def test_github_annotations_and_step_summary(fake, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    r = runner.invoke(cli.app, ["convert", str(src), str(tmp_path / "o.pt"), "--json"])
    assert r.exit_code == 0
    one_json(r.stdout)  # no workflow command on stdout
    assert "::warning title=repfuse convert::a warning for stderr" in r.stderr
    assert "::warning title=repfuse convert::not fully deployed: skipped head.bn: BN in train mode" in r.stderr
    text = summary.read_text()
    assert text.startswith("# earlier step\n### repfuse convert: PASSED · out.pt · 2 fused")  # appended
    assert "| `blocks.0.reparam` |" in text
    r = runner.invoke(cli.app, ["convert", str(tmp_path / "nope.pt"), str(tmp_path / "o.pt")])
    assert r.exit_code == 2
    assert "::error title=repfuse convert::input file not found" in r.stderr
    assert "### repfuse convert: error (exit 2)" in summary.read_text()


def test_no_annotations_outside_github(fake, src: Path, tmp_path: Path) -> None:
    r = runner.invoke(cli.app, ["convert", str(src), str(tmp_path / "o.pt")])
    assert r.exit_code == 0 and "::" not in r.stderr


# --------------------------------------------------------------------------- help, inspect views, -v


@pytest.mark.parametrize("command", ["convert", "verify", "inspect"])
def test_help_is_complete(command: str) -> None:
    r = runner.invoke(cli.app, [command, "--help"], terminal_width=100)
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    assert "<bool>" not in text and "Exit codes: 0 ok" in text and "4 not fully deployed" in text
    assert f"repfuse {command} " in text.split("Example")[1]  # an example of this command
    assert ("--strict" in text and "Default: 1 where the float64 check decides" in text) or command == "inspect"
    if command == "convert":
        assert "repfuse[onnx]" in text and "--static" in text and "--opset" in text and "2×C×64×64" in text


def test_inspect_is_compact_by_default(fake, src: Path) -> None:
    mods = (ModuleInfo("", "Net", 1400), ModuleInfo("blocks", "Sequential", 1400),
            ModuleInfo("blocks.0", "RepBlock", 700, "becomes one layer: 3×3+1×1"),
            ModuleInfo("blocks.0.conv", "Conv2d", 600, "folded into blocks.0"),
            ModuleInfo("blocks.0.conv.inner", "Identity", 0),
            ModuleInfo("head", "BatchNorm2d", 16, "skipped: BN in train mode"))
    fake.outcome["inspect_file"] = make_report("inspect", passed=None, modules=mods)
    compact = runner.invoke(cli.app, ["inspect", str(src)]).stdout
    assert "Blocks (2)" in compact and "RepBlock: becomes one layer" in compact and "folded into" not in compact
    depth = runner.invoke(cli.app, ["inspect", str(src), "--depth", "1"]).stdout
    assert "blocks" in depth and "more modules" in depth and "inner" not in depth
    full = runner.invoke(cli.app, ["inspect", str(src), "--all"]).stdout
    assert "inner" in full and "folded into blocks.0" in full
    assert runner.invoke(cli.app, ["inspect", str(src), "--depth", "-1"]).exit_code == 2


def test_verbose_shows_hashes_and_notes(fake, src: Path, tmp_path: Path) -> None:
    report = make_report(input={"path": "in.pt", "sha256": "ab" * 32})
    fake.outcome["convert_file"] = report
    plain = runner.invoke(cli.app, ["convert", str(src), str(tmp_path / "o.pt")])
    verbose = runner.invoke(cli.app, ["convert", str(src), str(tmp_path / "o.pt"), "-v"])
    assert "abab" not in plain.stdout and "abab" in verbose.stdout and "timings:" in verbose.stdout


def test_report_file_mode_follows_the_umask(fake, src: Path, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        r = runner.invoke(cli.app, ["verify", str(src), "--report", str(tmp_path / "r.md")])
    finally:
        os.umask(umask)
    assert r.exit_code == 0
    assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- a closed stdout


def _closed_stdout(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    read, write = os.pipe()
    os.close(read)  # every write to stdout fails with EPIPE
    env = {k: v for k, v in os.environ.items() if k not in CI_ENV}
    try:
        return subprocess.run([sys.executable, "-m", "repfuse", *args], stdout=write, stderr=subprocess.PIPE,
                              cwd=cwd, env=env, timeout=300)
    finally:
        os.close(write)


def test_a_closed_stdout_keeps_the_exit_code_of_the_work(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), 0).eval(),
               tmp_path / "in.pt")
    r = _closed_stdout(["convert", "in.pt", "out.pt", "-s", "1,3,8,8"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.pt").exists() and b"Traceback" not in r.stderr and b"Exception ignored" not in r.stderr
    r = _closed_stdout(["inspect", "in.pt", "-s", "1,3,8,8", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    r = _closed_stdout(["verify", "missing.pt"], tmp_path)
    assert r.returncode == 2 and b"input file not found" in r.stderr


# --------------------------------------------------------------------------- skipped sites in every view


def test_skipped_and_reasons_reach_every_rendering() -> None:
    r = make_report(skipped=(SkippedSite("a.very.long.module.name.that.should.never.be.folded", "why not"),))
    r = Report(**{**r.__dict__, "strict": True})
    md = rpt.to_markdown(r)
    assert "skipped a.very.long.module.name.that.should.never.be.folded: why not" in md
