"""Quantization readiness through the pipeline: `Options.quant_report` / `strict_quant_db` in
`api.convert_file`, the JSON `quantization` section, and `python -m repfuse convert --quant-report
--json` / `--strict-quant DB` (exit 4, nothing written)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_quant import SHAPE, hostile

from repfuse import api, quant, report
from repfuse.types import Options, QuantStrictFailed


def test_api_is_off_by_default_and_adds_the_section_when_asked(tmp_path: Path) -> None:
    src = tmp_path / "hostile.pt"
    torch.save(hostile(0), src)
    options = Options(input_shapes=(SHAPE,), verify_shapes=(), trials=1)
    plain = api.convert_file(src, tmp_path / "plain.pt", options)
    assert plain.quantization is None and "quant" not in plain.timings
    assert "quantization" not in report.to_dict(plain)
    asked = api.convert_file(src, tmp_path / "asked.pt", replace(options, quant_report=True))
    assert [x.module for x in asked.quantization.flagged] == ["1.fused"]
    assert [d.module for d in asked.diagnostics if d.code == quant.CODE] == ["1.fused"]
    assert "quant" in asked.timings and report.to_dict(asked)["quantization"]["flagged"] == ["1.fused"]
    assert "INT8 weight quantization" in report.to_markdown(asked)
    with pytest.raises(QuantStrictFailed) as e:
        api.convert_file(src, tmp_path / "strict.pt", replace(options, strict_quant_db=30.0))
    assert not (tmp_path / "strict.pt").exists() and "1.fused" in e.value.reasons[0]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120", "REPFUSE_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "repfuse", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_quant_report_json_and_strict_quant(tmp_path: Path) -> None:
    torch.save(hostile(1, block=2, channel=11), tmp_path / "hostile.pt")
    shape = "2,3,33,33"
    # --strict passes (fully deployed) whatever the quantization figures say
    run = _cli("convert", "hostile.pt", "out.pt", "-s", shape, "--quant-report", "--strict", "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    d = json.loads(run.stdout)
    with contextlib.suppress(ImportError):
        import jsonschema

        jsonschema.validate(d, report.schema())
    section = d["quantization"]
    assert section["flagged"] == ["2.fused"] and section["failures"] == [] and section["strict_db"] is None
    row = next(r for r in section["layers"] if r["module"] == "2.fused")
    assert row["worst_channels"][0]["channel"] == 11 and row["worst_channels"][0]["norm"] == "2.rbr_dense.bn"
    assert section["output"]["per_channel_db"] > section["output"]["per_tensor_db"]
    assert [x["code"] for x in d["diagnostics"] if x["module"] == "2.fused"] == [quant.CODE]
    assert (tmp_path / "out.pt").exists()
    # --strict-quant DB: exit 4 like --strict, nothing written, the failing site named
    run = _cli("convert", "hostile.pt", "out2.pt", "-s", shape, "--strict-quant", "30", cwd=tmp_path)
    assert run.returncode == 4, run.stderr
    assert not (tmp_path / "out2.pt").exists()
    assert "--strict-quant" in run.stderr and "2.fused" in run.stderr and "INT8 weight quantization" in run.stdout
