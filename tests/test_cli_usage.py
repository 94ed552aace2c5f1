"""cli.py: flags, exit codes, stdout/stderr split. Runs the installed command for usage errors and
the typer app in-process (with the api functions monkeypatched) for the exit codes 0/1/2/3, so
nothing here needs the fusion engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from repfuse import __version__, cli
from repfuse.types import (
    FusionSite,
    ModuleInfo,
    Options,
    RepfuseError,
    Report,
    SkippedSite,
    Summary,
    Verification,
    VerificationFailed,
)

REPFUSE = shutil.which("repfuse")
COMMANDS = [
    pytest.param([REPFUSE], id="repfuse"),
    pytest.param([sys.executable, "-m", "repfuse"], id="python-m"),
]


def run(prefix: list[str | None], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    if prefix[0] is None:
        pytest.skip("the repfuse console script is not installed")
    env = {k: v for k, v in os.environ.items() if k != "REPFUSE_DEBUG"}
    return subprocess.run([*prefix, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 2, stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("hint: "), stderr
    for n in needles:
        assert n in lines[0], (n, stderr)


# --------------------------------------------------------------------------- installed command


@pytest.mark.parametrize("prefix", COMMANDS)
def test_version(prefix: list[str]) -> None:
    r = run(prefix, "--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"repfuse {__version__}"


@pytest.mark.parametrize("prefix", COMMANDS)
@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("convert", ["--input-shape", "--allow", "--trust", "--atol", "--rtol", "--seed", "--trials",
                     "--force", "--report", "--json", "--quiet"]),
        ("verify", ["--against", "--input-shape", "--allow", "--trust", "--atol", "--rtol", "--seed",
                    "--trials", "--report", "--json"]),
        ("inspect", ["--input-shape", "--allow", "--trust", "--report", "--json"]),
    ],
)
def test_help(prefix: list[str], command: str, flags: list[str]) -> None:
    r = run(prefix, command, "--help")
    assert r.returncode == 0, r.stderr
    for flag in flags:
        assert flag in r.stdout, flag


@pytest.mark.parametrize("prefix", COMMANDS)
def test_top_level_help(prefix: list[str]) -> None:
    r = run(prefix, "--help")
    assert r.returncode == 0
    for command in ("convert", "verify", "inspect"):
        assert command in r.stdout


@pytest.mark.parametrize("prefix", COMMANDS)
def test_bad_flag_exits_2(prefix: list[str], tmp_path: Path) -> None:
    r = run(prefix, "convert", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--no-such-flag")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("prefix", COMMANDS)
@pytest.mark.parametrize("shape", ["1,3,a,224", "1,3,,224", "0x3x8x8", "", "1;3;8;8", "-1,3,8,8"])
def test_malformed_input_shape(prefix: list[str], tmp_path: Path, shape: str) -> None:
    src = tmp_path / "in.pt"
    src.write_bytes(b"not really a checkpoint")
    dst = tmp_path / "out.pt"
    r = run(prefix, "convert", str(src), str(dst), f"--input-shape={shape}")
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "--input-shape")
    assert not dst.exists()


@pytest.mark.parametrize("prefix", COMMANDS)
@pytest.mark.parametrize("command", ["convert", "verify", "inspect"])
def test_missing_input_file(prefix: list[str], tmp_path: Path, command: str) -> None:
    src = tmp_path / ("a-rather-long-directory-name-" * 4) / "missing.pt"
    dst = tmp_path / "out.pt"
    args = [command, str(src)] + ([str(dst)] if command == "convert" else [])
    r = run(prefix, *args, "--report", str(tmp_path / "r.json"))
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r.stderr, "input file not found", "missing.pt")
    assert r.stdout == ""
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the report


@pytest.mark.parametrize("prefix", COMMANDS)
def test_input_is_a_directory(prefix: list[str], tmp_path: Path) -> None:
    r = run(prefix, "inspect", str(tmp_path))
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "not a file")


@pytest.mark.parametrize("prefix", COMMANDS)
def test_out_equal_to_in_is_refused(prefix: list[str], tmp_path: Path) -> None:
    src = tmp_path / "in.pt"
    src.write_bytes(b"precious")
    r = run(prefix, "convert", "in.pt", str(src), cwd=tmp_path)  # same file, spelled differently
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "same file as IN")
    assert src.read_bytes() == b"precious"


# --------------------------------------------------------------------------- in-process, api faked

runner = CliRunner()


def fusion(module: str) -> FusionSite:
    return FusionSite(module=module, pattern="3×3+1×1+identity, BN×3",
                      branches=(f"{module}.a", f"{module}.b"),
                      kernel=(3, 3), in_channels=8, out_channels=8, groups=1, stride=(1, 1),
                      dilation=(1, 1), params_before=700, params_after=584, max_abs_error=1e-12)


def make_report(command: str = "convert", passed: bool | None = True, **kw: Any) -> Report:
    v = None
    if passed is not None:
        v = Verification(passed=passed, max_abs_error=2e-6 if passed else float("inf"), max_rel_error=1e-6,
                         exact_max_abs_error=1e-12, exact_max_rel_error=1e-13, atol=1e-5, rtol=1e-4,
                         trials=3, input_shape=((1, 3, 16, 16),), seed=0, dtype="float32",
                         worst_sites=() if passed else (("blocks.1.reparam", 0.5),),
                         message="" if passed else "max abs error inf > atol at blocks.1.reparam")
    fields: dict[str, Any] = dict(
        tool={"name": "repfuse", "version": __version__}, command=command, input={"path": "in.pt"},
        output={"path": "out.pt"} if command == "convert" else None,
        fusions=(fusion("blocks.0.reparam"), fusion("blocks.1.reparam")),
        skipped=(SkippedSite("head.bn", "BN in train mode"),),
        summary=Summary(fusions=2, params_before=1400, params_after=1168, macs_before=10**6,
                        macs_after=8 * 10**5),
        verification=v, timings={"load": 0.1, "fuse": 0.2}, warnings=("a warning for stderr",),
    )
    fields.update(kw)
    return Report(**fields)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    return src, tmp_path / "out.pt"


class FakeApi:
    """Stands in for repfuse.api: records calls; `outcome[name]` is returned, or raised if an exception."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.outcome: dict[str, Any] = {}

    def make(self, name: str, command: str) -> Any:
        def f(*args: Any) -> Report:
            self.calls.append((name, args))
            outcome = self.outcome.get(name)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome if outcome is not None else make_report(command)
        return f


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    monkeypatch.setattr(cli.api, "convert_file", fake.make("convert_file", "convert"))
    monkeypatch.setattr(cli.api, "verify_file", fake.make("verify_file", "verify"))
    monkeypatch.setattr(cli.api, "inspect_file", fake.make("inspect_file", "inspect"))
    monkeypatch.delenv("REPFUSE_DEBUG", raising=False)
    return fake


def test_convert_ok_renders_to_stdout_and_warnings_to_stderr(files, fake) -> None:
    src, dst = files
    r = runner.invoke(cli.app, ["convert", str(src), str(dst)])
    assert r.exit_code == 0, r.output
    assert "blocks.0.reparam" in r.stdout and "head.bn" in r.stdout and "PASSED" in r.stdout
    assert "a warning for stderr" in r.stderr and "a warning for stderr" not in r.stdout
    (name, (a_src, a_dst, options, progress)), = fake.calls
    assert name == "convert_file" and a_src == src and a_dst == dst
    assert options == Options()
    assert callable(progress)  # no spinner when stderr is not a terminal, only the check for signals
    progress("loading")


def test_convert_flags_map_to_options(files, fake) -> None:
    src, dst = files
    r = runner.invoke(cli.app, [
        "convert", str(src), str(dst), "--input-shape", "1,3,224,224", "-s", "2x3x8x9", "--allow", "models",
        "--allow", "mypkg.nets", "--trust", "--atol", "1e-4", "--rtol", "0.001", "--seed", "5",
        "--trials", "7", "--force", "--quiet",
    ])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["PASSED · out.pt · 2 fused · 1 skipped · max err 2e-06"]  # --quiet: the verdict
    options = fake.calls[0][1][2]
    assert options == Options(input_shapes=((1, 3, 224, 224), (2, 3, 8, 9)), allow=("models", "mypkg.nets"),
                              trust=True, atol=1e-4, rtol=1e-3, seed=5, trials=7, force=True)


@pytest.mark.parametrize(
    "shape", ["1,3,224,224", "1x3x224x224", "1×3×224×224", " (1, 3, 224, 224) ", "1X3X224X224"]
)
def test_parse_shape_forms(shape: str) -> None:
    assert cli.parse_shape(shape) == (1, 3, 224, 224)


@pytest.mark.parametrize("args", [["--trials", "0"], ["--atol", "-1"], ["--rtol", "nan"], ["--atol", "inf"],
                                  ["--seed", "-3"]])
def test_bad_option_values_exit_2(files, fake, args: list[str]) -> None:
    src, dst = files
    r = runner.invoke(cli.app, ["convert", str(src), str(dst), *args])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr)
    assert fake.calls == []


def test_convert_json_and_report(files, fake, tmp_path: Path) -> None:
    src, dst = files
    rep = tmp_path / "r.md"
    r = runner.invoke(cli.app, ["convert", str(src), str(dst), "--json", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["schema"] == 1 and d["command"] == "convert"
    assert [f["module"] for f in d["fusions"]] == ["blocks.0.reparam", "blocks.1.reparam"]
    assert "blocks.1.reparam" in rep.read_text() and "BN in train mode" in rep.read_text()


def test_convert_verification_failed_exits_1_and_writes_report(files, fake, tmp_path: Path) -> None:
    src, dst = files
    fake.outcome["convert_file"] = VerificationFailed(make_report(passed=False))
    rep = tmp_path / "evidence.json"
    r = runner.invoke(cli.app, ["convert", str(src), str(dst), "--report", str(rep)])
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.stdout and "blocks.1.reparam" in r.stdout
    assert "nothing was written" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr
    assert not dst.exists()
    assert json.loads(rep.read_text())["verification"]["passed"] is False
    assert json.loads(rep.read_text())["verification"]["max_abs_error"] == "inf"


def test_convert_verification_failed_json(files, fake) -> None:
    src, dst = files
    fake.outcome["convert_file"] = VerificationFailed(make_report(passed=False))
    r = runner.invoke(cli.app, ["convert", str(src), str(dst), "--json"])
    assert r.exit_code == 1
    assert json.loads(r.stdout)["verification"]["passed"] is False


def test_convert_force_with_failed_verification_exits_0_with_warning(files, fake) -> None:
    src, dst = files
    fake.outcome["convert_file"] = make_report(passed=False)
    r = runner.invoke(cli.app, ["convert", str(src), str(dst), "--force"])
    assert r.exit_code == 0
    assert "written anyway" in r.stderr


def test_repfuse_error_exits_2_with_message_and_hint(files, fake) -> None:
    src, dst = files
    fake.outcome["convert_file"] = RepfuseError("file needs global models.RepVGG", "pass --allow models")
    r = runner.invoke(cli.app, ["convert", str(src), str(dst)])
    assert r.exit_code == 2
    assert r.stderr.splitlines() == ["error: file needs global models.RepVGG", "hint: pass --allow models"]
    assert r.stdout == ""


def test_repfuse_error_multiline_message_stays_one_line(files, fake) -> None:
    src, _ = files
    fake.outcome["inspect_file"] = RepfuseError("needs:\n  a.B\n  c.D", "")
    r = runner.invoke(cli.app, ["inspect", str(src)])
    assert r.exit_code == 2
    assert r.stderr.splitlines()[0] == "error: needs: a.B c.D"
    assert_one_line_error(r.stderr)


def test_internal_error_exits_3(files, fake) -> None:
    src, dst = files
    fake.outcome["convert_file"] = ValueError("boom")
    r = runner.invoke(cli.app, ["convert", str(src), str(dst)])
    assert r.exit_code == 3
    assert r.stderr.splitlines() == ["error: internal error: ValueError: boom",
                                     "hint: rerun with REPFUSE_DEBUG=1 for the traceback and report it"]


def test_debug_prints_traceback(files, fake, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = files
    monkeypatch.setenv("REPFUSE_DEBUG", "1")
    fake.outcome["convert_file"] = RepfuseError("bad input", "fix it")
    r = runner.invoke(cli.app, ["convert", str(src), str(dst)])
    assert r.exit_code == 2
    assert "Traceback" in r.stderr and "error: bad input" in r.stderr


def test_bad_report_suffix_refused_before_running(files, fake, tmp_path: Path) -> None:
    src, dst = files
    r = runner.invoke(cli.app, ["convert", str(src), str(dst), "--report", str(tmp_path / "r.txt")])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "report")
    assert fake.calls == []


def test_report_may_not_overwrite_input(files, fake) -> None:
    src, _ = files
    r = runner.invoke(cli.app, ["verify", str(src), "--report", str(src)])
    assert r.exit_code == 2
    assert fake.calls == []


def test_out_is_directory_refused(files, fake, tmp_path: Path) -> None:
    src, _ = files
    r = runner.invoke(cli.app, ["convert", str(src), str(tmp_path)])
    assert r.exit_code == 2
    assert fake.calls == []


def test_verify_passed_and_failed(files, fake, tmp_path: Path) -> None:
    src, _ = files
    other = tmp_path / "other.pt"
    other.write_bytes(b"y")
    r = runner.invoke(cli.app, ["verify", str(src), "--against", str(other), "--seed", "3"])
    assert r.exit_code == 0, r.output
    name, (a_src, options, against, _progress) = fake.calls[0]
    assert (name, a_src, against, options.seed) == ("verify_file", src, other, 3)

    fake.outcome["verify_file"] = make_report("verify", passed=False)
    rep = tmp_path / "v.json"
    r = runner.invoke(cli.app, ["verify", str(src), "--report", str(rep)])
    assert r.exit_code == 1
    assert "verification failed" in r.stderr
    assert json.loads(rep.read_text())["verification"]["passed"] is False


def test_verify_against_missing(files, fake, tmp_path: Path) -> None:
    src, _ = files
    r = runner.invoke(cli.app, ["verify", str(src), "--against", str(tmp_path / "nope.pt")])
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "--against file not found")
    assert fake.calls == []


def test_inspect_renders_module_tree_and_json(files, fake) -> None:
    src, _ = files
    mods = (ModuleInfo("", "Net", 1400), ModuleInfo("blocks", "Sequential", 1400),
            ModuleInfo("blocks.0", "RepBlock", 700, "fused → blocks.0.reparam"),
            ModuleInfo("head", "BatchNorm2d", 16, "skipped: BN in train mode"))
    fake.outcome["inspect_file"] = make_report("inspect", passed=None, modules=mods)
    r = runner.invoke(cli.app, ["inspect", str(src), "--allow", "models"])
    assert r.exit_code == 0, r.output
    assert "RepBlock" in r.stdout and "fused → blocks.0.reparam" in r.stdout
    assert fake.calls[0][1][1] == Options(allow=("models",))
    r = runner.invoke(cli.app, ["inspect", str(src), "--json"])
    assert json.loads(r.stdout)["modules"][2]["note"] == "fused → blocks.0.reparam"


def test_no_args_shows_help() -> None:
    r = runner.invoke(cli.app, [])
    assert "convert" in r.output
