"""Interrupted and failing writes, output paths checked before any work, and bounded counts.

A driver script runs the real CLI in a subprocess with one hook: at a chosen stage it sends itself a
signal (SIGINT, SIGTERM, SIGKILL) or lowers its own file-size limit (RLIMIT_FSIZE, so the next write
fails with EFBIG). The 'write' hook fires inside torch.save's C++ writer, after its first chunk, where
torch turns an interrupt into a RuntimeError."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner
from user_code import files_in, write_user_package

from repfuse import cli, writing
from repfuse.samples import randomize_bn
from repfuse.types import Options, RepfuseError

runner = CliRunner()

DRIVER = textwrap.dedent('''
    import os, resource, signal, sys
    import torch
    from repfuse import api, cli, loading, rewrite, verify, writing
    from repfuse import io as rio
    from repfuse import report as rpt

    stage, action, *argv = sys.argv[1:]

    def fire():
        if action.startswith("FSIZE="):
            limit = int(action.split("=")[1])
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        else:
            os.kill(os.getpid(), getattr(signal, action))

    def hook(module, name, when=lambda *a, **k: True):
        original = getattr(module, name)
        def wrapped(*args, **kwargs):
            if when(*args, **kwargs):
                fire()
            return original(*args, **kwargs)
        setattr(module, name, wrapped)

    class Chunked:  # a file whose second write fires: inside torch.save, half-way
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            self.n += 1
            if self.n == 2:
                fire()
            return self.f.write(b)
        def flush(self):
            self.f.flush()

    def save_to(obj):
        def write(tmp):
            with open(tmp, "wb") as f:
                torch.save(obj, Chunked(f))
        return write

    if stage == "start":
        fire()
    elif stage == "load":
        hook(loading, "_torch_load")
    elif stage == "trace":
        hook(rewrite, "analyse")
    elif stage == "verify":
        hook(verify, "compare")
    elif stage == "write":
        writing._torch_save_to = save_to
    elif stage == "json":  # the keymap or the report: just before its write
        for module in (writing, rio):
            hook(module, "atomic_write", lambda dst, *a, **k: str(dst).endswith((".json", ".md")))
    sys.argv = ["repfuse", *argv]
    cli.main()
''')


def small_model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
    return randomize_bn(m, 0).eval()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    torch.save(small_model(), tmp_path / "in.pt")
    (tmp_path / "driver.py").write_text(DRIVER)
    return tmp_path


def drive(cwd: Path, stage: str, action: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REPFUSE_DEBUG", "GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing but the outputs is written under the file-size limit
    return subprocess.run([sys.executable, "driver.py", stage, action, *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("stage", ["load", "trace", "verify", "write"])
def test_sigint_at_any_stage_exits_130_and_leaves_out_intact(work: Path, stage: str) -> None:
    (work / "out.pt").write_bytes(b"previous output")
    r = drive(work, stage, "SIGINT", "convert", "in.pt", "out.pt", "-s", "1,3,8,8", "--report", "r.json")
    assert r.returncode == 130, r.stderr
    # progress lines (`repfuse: <stage> (<seconds> s)`, without a terminal) may come first; then only the error
    assert [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("repfuse: ")] == [
        "error: interrupted"]
    assert (work / "out.pt").read_bytes() == b"previous output"
    assert files_in(work) == {"in.pt", "driver.py", "out.pt"}  # no temp file, no report


def test_sigterm_during_the_write_exits_143_and_removes_the_temp_file(work: Path) -> None:
    r = drive(work, "write", "SIGTERM", "convert", "in.pt", "out.pt", "-s", "1,3,8,8")
    assert r.returncode == 143, r.stderr
    assert "error: terminated" in r.stderr and "Traceback" not in r.stderr
    assert files_in(work) == {"in.pt", "driver.py"}


def test_kill_9_leftover_is_removed_by_the_next_run(work: Path) -> None:
    (work / "out.pt").write_bytes(b"previous output")
    r = drive(work, "write", "SIGKILL", "convert", "in.pt", "out.pt", "-s", "1,3,8,8")
    assert r.returncode == -signal.SIGKILL
    leftovers = temp_files(work)
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.pt.repfuse-"), leftovers
    assert (work / "out.pt").read_bytes() == b"previous output"
    r = drive(work, "none", "-", "convert", "in.pt", "out.pt", "-s", "1,3,8,8", "-q")
    assert r.returncode == 0, r.stderr
    assert temp_files(work) == []
    assert isinstance(torch.load(work / "out.pt", weights_only=False), nn.Module)


def test_a_killed_runs_leftover_goes_even_when_the_next_run_fails(work: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = work / f".out.pt.repfuse-{int(dead.stdout)}-0123456789ab.tmp"
    leftover.write_bytes(b"half a model")
    r = runner.invoke(cli.app, ["convert", str(work / "missing.pt"), str(work / "out.pt")])
    assert r.exit_code == 2
    r = runner.invoke(cli.app, ["convert", str(work / "in.pt"), str(work / "out.pt"), "--trials", "0"])
    assert r.exit_code == 2
    assert leftover.exists()  # nothing was checked yet: bad flags come first
    r = runner.invoke(cli.app, ["convert", str(work / "in.pt"), str(work / "out.unknown")])
    assert r.exit_code == 2
    with pytest.MonkeyPatch.context() as mp:  # the output checks run, the work does not
        mp.setattr(cli.api, "convert_file", lambda *a: (_ for _ in ()).throw(RepfuseError("stop", "here")))
        r = runner.invoke(cli.app, ["convert", str(work / "in.pt"), str(work / "out.pt")])
    assert r.exit_code == 2 and "stop" in r.stderr
    assert not leftover.exists()


def test_sweep_leaves_files_in_use_alone(tmp_path: Path) -> None:
    dst = tmp_path / "m.pt"
    fd, mine = writing._open_temp(tmp_path, dst.name)  # this process: alive and locked
    try:
        holder = subprocess.Popen(  # another live process holds the lock of a file named after a dead PID
            [sys.executable, "-c", textwrap.dedent('''
                import fcntl, os, sys
                fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("locked", flush=True)
                sys.stdin.read()
            '''), str(tmp_path / ".m.pt.repfuse-999999999-0123456789ab.tmp")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            assert writing.sweep_stale(dst) == []
            assert len(temp_files(tmp_path)) == 2
        finally:
            holder.communicate("", timeout=60)
        removed = writing.sweep_stale(dst)
        assert [p.name for p in removed] == [".m.pt.repfuse-999999999-0123456789ab.tmp"]
        assert temp_files(tmp_path) == [mine.name]
        other = tmp_path / ".other.pt.repfuse-999999999-0123456789ab.tmp"
        other.write_bytes(b"")
        assert writing.sweep_stale(dst) == [] and other.exists()  # another destination's file
    finally:
        os.close(fd)
        mine.unlink()


# --------------------------------------------------------------------------- full disk / size limit


def _assert_write_failed(r: subprocess.CompletedProcess[str], name: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    error = next(ln for ln in lines if ln.startswith("error: "))
    assert "could not write" in error and name in error and "File too large" in error, r.stderr
    hint = lines[lines.index(error) + 1]
    assert hint.startswith("hint: ") and "ulimit" in hint, r.stderr


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "pt2"])
def test_file_size_limit_during_the_output_write_exits_2(work: Path, fmt: str) -> None:
    torch.save(small_model().state_dict(), work / "sd.pt")
    (work / f"out.{fmt}").write_bytes(b"previous output")
    # the outputs are well over 4 KiB; the limit is set at the start, and nothing else is written
    r = drive(work, "start", "FSIZE=4096", "convert", "in.pt", f"out.{fmt}", "-s", "1,3,8,8")
    _assert_write_failed(r, f"out.{fmt}")
    assert (work / f"out.{fmt}").read_bytes() == b"previous output"
    assert temp_files(work) == []


def test_file_size_limit_during_the_report_write_exits_2(work: Path) -> None:
    r = drive(work, "json", "FSIZE=200", "verify", "in.pt", "-s", "1,3,8,8", "--report", "r.json")
    _assert_write_failed(r, "r.json")
    assert files_in(work) == {"in.pt", "driver.py"}


def test_file_size_limit_during_the_keymap_write_exits_2(work: Path) -> None:
    write_user_package(work, "userpkg_writes")
    net = __import__("user_code").UserEnv(work, "userpkg_writes")
    sys.path.insert(0, str(work))
    try:
        torch.save(net.train_model().state_dict(), work / "sd.pt")
    finally:
        sys.path.remove(str(work))
        for mod in [m for m in sys.modules if m.startswith("userpkg_writes")]:
            del sys.modules[mod]
    r = drive(work, "json", "FSIZE=100", "convert", "sd.pt", "d.pt", "--model", net.spec(),
              "--deploy-model", net.spec("build_deploy"), "--keymap", "k.json", "-s", "2,3,16,16", "-q")
    _assert_write_failed(r, "k.json")
    assert not (work / "k.json").exists() and temp_files(work) == []


def test_write_failure_names_the_cause() -> None:
    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from e
    except RuntimeError as wrapped:
        err = writing.write_failure(wrapped, Path("/data/out.pt"))
    assert err is not None and "No space left on device" in err.message and "/data/out.pt" in err.message
    assert "full" in err.hint
    assert writing.write_failure(RuntimeError("no OSError in here"), Path("x")) is None


# --------------------------------------------------------------------------- checked before any work


class _NoWork:
    calls = 0

    def __call__(self, *args: object) -> None:
        type(self).calls += 1
        raise AssertionError("the work ran")


@pytest.mark.parametrize(("flags", "needle"), [
    (["--report", "missing/r.json"], "does not exist"),
    (["--report", "."], "report"),
    (["--report", "out.json", "--keymap", "out.json", "--deploy-model", "x:y"], "overwrite"),
    (["--deploy-model", "x:y", "--keymap", "missing/k.json"], "does not exist"),
    (["--deploy-model", "x:y", "--keymap", "out.pt"], "--keymap"),
])
def test_output_paths_are_checked_before_any_work(work: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                                  needle: str) -> None:
    monkeypatch.chdir(work)
    monkeypatch.setattr(cli.api, "convert_file", _NoWork())
    r = runner.invoke(cli.app, ["convert", "in.pt", "out.pt", *flags])
    assert r.exit_code == 2, r.output
    assert needle in r.stderr, r.stderr
    assert files_in(work) == {"in.pt", "driver.py"}


def test_verify_report_dir_is_checked_before_any_work(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.api, "verify_file", _NoWork())
    r = runner.invoke(cli.app, ["verify", str(work / "in.pt"), "--report", str(work / "no" / "r.md")])
    assert r.exit_code == 2 and "does not exist" in r.stderr


# --------------------------------------------------------------------------- bounded counts


@pytest.mark.parametrize(("flags", "needle"), [
    (["--trials", "1000000000"], "--trials 1000000000 is more than the 1000"),
    (["--trials", "1001"], "--trials"),
    (["--input-shape", "100000,3,224,224"], "elements"),
    (["--max-modules", "0"], "--max-modules"),
    (["--max-inflate", "0"], "--max-inflate"),
])
def test_counts_are_bounded(work: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], needle: str) -> None:
    monkeypatch.setattr(cli.api, "convert_file", _NoWork())
    r = runner.invoke(cli.app, ["convert", str(work / "in.pt"), str(work / "out.pt"), *flags])
    assert r.exit_code == 2, r.output
    lines = r.stderr.splitlines()
    assert needle in lines[0] and lines[1].startswith("hint: "), r.stderr


def test_trials_bound_with_the_installed_command(work: Path) -> None:
    r = drive(work, "none", "-", "verify", "in.pt", "--trials", "1000000000")
    assert r.returncode == 2 and "--trials" in r.stderr and "hint:" in r.stderr


def test_limits_flags_map_to_options_and_reach_the_loader(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Options] = []
    monkeypatch.setattr(cli.api, "inspect_file", lambda src, options, progress: seen.append(options) or 1 / 0)
    runner.invoke(cli.app, ["inspect", str(work / "in.pt"), "--max-inflate", "5", "--max-modules", "7"])
    assert seen[0].max_inflate_bytes == 5 << 20 and seen[0].max_modules == 7
    monkeypatch.undo()
    r = runner.invoke(cli.app, ["inspect", str(work / "in.pt"), "--max-modules", "3"])
    assert r.exit_code == 2, r.output
    assert "module" in r.stderr.splitlines()[0] and "--max-modules" in r.stderr, r.stderr
    r = runner.invoke(cli.app, ["inspect", str(work / "in.pt"), "--max-modules", "6", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["command"] == "inspect"
