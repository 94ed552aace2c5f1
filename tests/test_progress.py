"""Progress people can read (issue 10): per-stage lines with durations without a terminal, module counts
while analysing, nothing with --quiet, and --threads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from repfuse import api, cli, cli_progress
from repfuse.cli_common import Signals, set_threads
from repfuse.samples import randomize_bn, repvgg_tiny
from repfuse.types import Options

runner = CliRunner()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "in.pt"
    torch.save(randomize_bn(repvgg_tiny(), 0).eval(), path)
    return path


def test_without_a_terminal_each_stage_is_one_line_with_its_duration(src: Path, tmp_path: Path) -> None:
    r = runner.invoke(cli.app, ["convert", str(src), str(tmp_path / "out.pt"), "-s", "1,3,32,32", "--threads", "1"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("repfuse: ")]
    stages = [re.sub(r" \([0-9.]+ s\)$", "", ln) for ln in lines]
    assert all(re.search(r" \([0-9.]+ s\)$", ln) for ln in lines), lines
    assert stages[0].startswith("repfuse: loading ") and "repfuse: tracing and analysing modules" in stages
    assert "repfuse: verifying on random inputs" in stages and stages[-1].startswith("repfuse: writing ")
    assert len(stages) == len(set(stages))  # one line per stage


def test_quiet_prints_no_progress(src: Path, tmp_path: Path) -> None:
    r = runner.invoke(cli.app, ["convert", str(src), str(tmp_path / "out.pt"), "-s", "1,3,32,32", "-q"])
    assert r.exit_code == 0, r.output
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("repfuse: ")]


def test_the_library_reports_modules_analysed_of_total(src: Path, tmp_path: Path) -> None:
    seen: list[api.Step] = []
    api.convert_file(src, tmp_path / "out.pt", Options(input_shapes=((1, 3, 32, 32),)), seen.append)
    counts = [(s.done, s.total) for s in seen if isinstance(s, api.Step) and s.total]
    assert counts and counts[0][0] == 0 and all(d < t for d, t in counts)
    assert [d for d, _ in counts] == sorted(d for d, _ in counts) and len({t for _, t in counts}) == 1
    finished = [s for s in seen if isinstance(s, api.Step) and s.seconds is not None]
    assert {s.stage for s in finished} >= {"load", "trace", "fuse", "verify", "save"}


def test_a_long_stage_prints_a_heartbeat(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(record=True, force_terminal=False, width=200)
    monkeypatch.setattr(cli_progress, "HEARTBEAT_S", 0.0)
    with cli_progress.progress_display(console, False, Signals()) as update:
        update(api.Step("analysing modules", "trace", 3, 10))
    assert "repfuse: analysing modules 3/10" in console.export_text()


def test_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        assert 1 <= set_threads(None) <= max(before, 1)
    finally:
        torch.set_num_threads(before)
