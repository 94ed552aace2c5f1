"""A `types.Report` as JSON (schema 1, validated by the shipped `report_schema.json`), and the
facade over its other renderings: Markdown (`report_md`) and rich (`report_text`). Pure: never prints.

JSON schema 1 (keys are only ever added, never renamed):

    schema, tool, command, input, output, fusions[], skipped[], summary, verification|null,
    timings, warnings[], diagnostics[] ({level, code, message, module}), deployment
    ({fully_deployed, reasons[], strict}), error|null ({message, hint, exit_code}),
    modules[] (only when non-empty, i.e. from `inspect`), quantization (only with --quant-report /
    --strict-quant: `repfuse.quant.to_dict`)

A run that fails before there is a report prints `error_document`: schema, tool, command, error.
Non-finite floats (an `inf` or `nan` error) cannot be written as JSON numbers; they are written
as the strings "inf", "-inf" and "nan", so the value survives and the file stays valid JSON.
Tuples become lists, paths become strings, `None` becomes null.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .report_fmt import (
    deployment_gaps,
    fmt_bytes,
    fmt_change,
    fmt_float,
    fmt_int,
    fmt_shapes,
    fmt_si,
    fmt_tuple,
    verdict,
)
from .report_md import error_markdown, summary_markdown, to_markdown
from .report_text import fusions_table, module_list, module_tree, render, render_warnings, verdict_text
from .types import Diagnostic, FusionSite, ModuleInfo, RepfuseError, Report, SkippedSite, Verification

__all__ = [
    "REPORT_SUFFIXES",
    "SCHEMA_VERSION",
    "deployment_gaps",
    "error_document",
    "error_markdown",
    "fmt_bytes",
    "fmt_change",
    "fmt_float",
    "fmt_int",
    "fmt_shapes",
    "fmt_si",
    "fmt_tuple",
    "fusions_table",
    "module_list",
    "module_tree",
    "render",
    "render_warnings",
    "report_format",
    "schema",
    "summary_markdown",
    "to_dict",
    "to_json",
    "to_markdown",
    "verdict",
    "verdict_text",
    "write_report",
]

SCHEMA_VERSION = 1
REPORT_SUFFIXES = {".json": "json", ".md": "markdown"}


@cache
def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) every report and error document conforms to."""
    return json.loads(resources.files("repfuse").joinpath("report_schema.json").read_text(encoding="utf-8"))


def _jsonable(value: Any) -> Any:
    """Recursively turn a value into something `json.dumps(allow_nan=False)` accepts."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors / numpy scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def _fusion_dict(site: FusionSite) -> dict[str, Any]:
    return {
        "module": site.module,
        "pattern": site.pattern,
        "branches": list(site.branches),
        "kernel": list(site.kernel),
        "in_channels": site.in_channels,
        "out_channels": site.out_channels,
        "groups": site.groups,
        "stride": list(site.stride),
        "dilation": list(site.dilation),
        "params_before": site.params_before,
        "params_after": site.params_after,
        "max_abs_error": site.max_abs_error,
    }


def _skipped_dict(site: SkippedSite) -> dict[str, Any]:
    return {"module": site.module, "reason": site.reason}


def _verification_dict(v: Verification) -> dict[str, Any]:
    d = asdict(v)
    d["input_shape"] = [list(s) for s in v.input_shape]
    d["worst_sites"] = [{"module": m, "max_abs_error": e} for m, e in v.worst_sites]
    return d


def _module_dict(m: ModuleInfo) -> dict[str, Any]:
    return {"path": m.path, "kind": m.kind, "params": m.params, "note": m.note}


def _diagnostics(report: Report) -> list[dict[str, Any]]:
    legacy = [Diagnostic("unclassified", w) for w in report.warnings]
    return [{"level": d.level, "code": d.code, "message": d.message, "module": d.module}
            for d in (*legacy, *report.diagnostics)]


def to_dict(report: Report, error: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict (schema 1); `error` ({message, hint, exit_code}) when the
    command exits non-zero. Every value is JSON-serialisable."""
    gaps = deployment_gaps(report)
    d: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "tool": dict(report.tool),
        "command": report.command,
        "input": dict(report.input),
        "output": dict(report.output) if report.output is not None else None,
        "fusions": [_fusion_dict(s) for s in report.fusions],
        "skipped": [_skipped_dict(s) for s in report.skipped],
        "summary": asdict(report.summary),
        "verification": _verification_dict(report.verification) if report.verification else None,
        "timings": dict(report.timings),
        "warnings": [*report.warnings, *(x.message for x in report.diagnostics if x.level == "warning")],
        "diagnostics": _diagnostics(report),
        "deployment": {"fully_deployed": not gaps, "reasons": gaps, "strict": report.strict},
        "error": dict(error) if error else None,
    }
    if report.modules:
        d["modules"] = [_module_dict(m) for m in report.modules]
    if report.quantization is not None:
        from . import quant

        d["quantization"] = quant.to_dict(report.quantization)
    return _jsonable(d)


def error_document(command: str, message: str, hint: str, exit_code: int) -> dict[str, Any]:
    """What --json prints when a command fails before there is a report (schema 1)."""
    import torch

    return {"schema": SCHEMA_VERSION, "tool": {"name": "repfuse", "version": __version__, "torch": torch.__version__},
            "command": command, "error": {"message": message, "hint": hint, "exit_code": exit_code}}


def to_json(report: Report, indent: int | None = 2, error: Mapping[str, Any] | None = None) -> str:
    """The report as JSON text (strict: no NaN/Infinity literals)."""
    return json.dumps(to_dict(report, error), indent=indent, ensure_ascii=False, allow_nan=False)


def report_format(path: Path) -> str:
    """'json' or 'markdown' from the suffix; RepfuseError otherwise. Cheap: call it before a long run."""
    fmt = REPORT_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise RepfuseError(
            f"unknown report format: {path}",
            "name the report file *.json (machine-readable, schema 1) or *.md (Markdown)",
        )
    return fmt


def write_report(report: Report, path: Path, error: Mapping[str, Any] | None = None) -> None:
    """Write the report as JSON or Markdown (by suffix), atomically (see `writing.atomic_write`:
    a locked temporary file, then os.replace; mode 0644 under the usual umask)."""
    from .writing import atomic_write

    path = Path(path)
    text = to_json(report, error=error) if report_format(path) == "json" else to_markdown(report, error)
    data = (text if text.endswith("\n") else text + "\n").encode("utf-8")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise RepfuseError(f"cannot write report {path}: directory {parent} does not exist",
                           "create the directory first or choose another --report path")
    if path.is_dir():
        raise RepfuseError(f"cannot write report {path}: it is a directory",
                           "give --report a file name ending in .json or .md")
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
