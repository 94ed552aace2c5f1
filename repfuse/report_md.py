"""A report as Markdown: the `--report FILE.md` document and the GitHub step summary. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .report_fmt import (
    deployment_gaps,
    fmt_bytes,
    fmt_float,
    fmt_int,
    fmt_shapes,
    fmt_tuple,
    is_against,
    sites_title,
    timing_rows,
    total_rows,
    verdict,
)
from .types import Report, Verification

__all__ = ["error_markdown", "fmt_io", "summary_markdown", "to_markdown", "verification_rows"]

_IO_DETAIL_ONLY = frozenset({"check"})


def _md_cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def fmt_io(d: Mapping[str, Any] | None, verbose: bool = True) -> str:
    """A file's line: its path, then (verbose) every other key, nested files by their path."""
    if d is None:
        return "—"
    parts = [str(d["path"])] if "path" in d else []
    if not verbose:
        extra = [str(d[k]) for k in ("format", "dtype", "content") if d.get(k)]
        if d.get("size_bytes") is not None:
            extra.insert(0, fmt_bytes(d["size_bytes"]))
        return ", ".join(parts + extra) or "—"
    for k, v in d.items():
        if k in _IO_DETAIL_ONLY or k == "path":
            continue  # long prose: in the JSON report, not in the header
        if isinstance(v, Mapping):  # a nested file (the --keymap, --against): its path
            if not v:
                continue
            v = v["path"] if "path" in v else " ".join(f"{a}={b!r}" for a, b in v.items())
        parts.append(f"{k}: {v}")
    return ", ".join(parts) or "—"


def verification_rows(v: Verification) -> list[tuple[str, str]]:
    rows = [
        ("result", "PASSED" if v.passed else "FAILED"),
        (f"max abs error ({v.dtype})", fmt_float(v.max_abs_error)),
        (f"max rel error ({v.dtype})", fmt_float(v.max_rel_error)),
        ("max abs error (float64, exact)", fmt_float(v.exact_max_abs_error)),
        ("max rel error (float64, exact)", fmt_float(v.exact_max_rel_error)),
        ("tolerance", f"atol={fmt_float(v.atol)}, rtol={fmt_float(v.rtol)}"),
        ("trials", str(v.trials)),
        ("input shape", fmt_shapes(v.input_shape)),
        ("seed", str(v.seed)),
    ]
    if v.message:
        rows.append(("message", v.message))
    return rows


def _sites(report: Report, heading: str) -> list[str]:
    if is_against(report):
        return []
    out = [f"{heading} {sites_title(report.command)} ({len(report.fusions)})", ""]
    if report.fusions:
        out += _md_table(
            ["module", "pattern", "branches", "kernel", "channels", "groups", "stride", "dilation",
             "params before → after", "max abs error"],
            [(f"`{s.module}`", s.pattern, ", ".join(s.branches), fmt_tuple(s.kernel),
              f"{s.in_channels} → {s.out_channels}", s.groups, fmt_tuple(s.stride),
              fmt_tuple(s.dilation), f"{fmt_int(s.params_before)} → {fmt_int(s.params_after)}",
              fmt_float(s.max_abs_error)) for s in report.fusions])
    else:
        out += ["none", ""]
    out += [f"{heading} Skipped sites ({len(report.skipped)})", ""]
    if report.skipped:
        out += _md_table(["module", "reason"], [(f"`{s.module}`", s.reason) for s in report.skipped])
    else:
        out += ["none", ""]
    return out


def _deployment(report: Report, heading: str) -> list[str]:
    gaps = deployment_gaps(report)
    if not gaps:
        return []
    title = "Not fully deployed" + (" (--strict: nothing written)" if report.strict and report.command == "convert"
                                    else "")
    return [f"{heading} {title}", "", *(f"- {_md_cell(g)}" for g in gaps), ""]


def to_markdown(report: Report, error: Mapping[str, Any] | None = None) -> str:
    """The report as a Markdown document: the verdict, then tables for sites, summary,
    verification, timings, warnings and (inspect) modules."""
    tool = report.tool.get("name", "repfuse")
    version = report.tool.get("version", "")
    out = [f"# {tool} {report.command} report", "", f"**{_md_cell(verdict(report))}**", ""]
    if error:
        out += [f"**error** (exit {error.get('exit_code')}): {_md_cell(error.get('message', ''))}", "",
                f"hint: {_md_cell(error.get('hint', ''))}", ""]
    out += [f"- tool: {tool} {version}".rstrip(), f"- input: {fmt_io(report.input)}",
            f"- output: {fmt_io(report.output)}", ""]
    out += _sites(report, "##")
    out += _deployment(report, "##")
    out += ["## Summary", ""]
    out += _md_table(["", "before", "after", "change"], total_rows(report.summary, fusions=not is_against(report)))

    out += ["## Verification", ""]
    v = report.verification
    if v is None:
        out += ["not run", ""]
    else:
        out += _md_table(["", "value"], verification_rows(v))
        if v.worst_sites:
            out += ["### Worst sites (float64 error)", ""]
            out += _md_table(["module", "max abs error"], [(f"`{m}`", fmt_float(e)) for m, e in v.worst_sites])

    if report.quantization is not None:  # --quant-report / --strict-quant
        from .quant_text import markdown as quant_markdown

        out += quant_markdown(report.quantization, heading="##")
    if report.timings:
        out += ["## Timings (s)", ""]
        out += _md_table(["stage", "seconds"], timing_rows(report.timings))
    warnings = [*report.warnings, *(d.message for d in report.diagnostics if d.level == "warning")]
    if warnings:
        out += ["## Warnings", ""]
        out += [f"- {_md_cell(w)}" for w in warnings] + [""]
    if report.modules:
        out += ["## Modules", ""]
        out += _md_table(["path", "class", "params", "note"],
                         [(f"`{m.path or '(root)'}`", m.kind, fmt_int(m.params), m.note) for m in report.modules])
    return "\n".join(out)


def summary_markdown(report: Report, error: Mapping[str, Any] | None = None) -> str:
    """The GitHub step summary: the verdict as a heading, then what a reviewer needs (sites,
    what is not deployed, totals); the full document is the --report."""
    out = [f"### repfuse {report.command}: {_md_cell(verdict(report, error.get('exit_code') if error else None))}", ""]
    if error:
        out += [f"**error** (exit {error.get('exit_code')}): {_md_cell(error.get('message', ''))}", "",
                f"hint: {_md_cell(error.get('hint', ''))}", ""]
    out += _deployment(report, "####")
    out += _sites(report, "####")
    out += _md_table(["", "before", "after", "change"], total_rows(report.summary, fusions=not is_against(report)))
    return "\n".join(out) + "\n"


def error_markdown(command: str, message: str, hint: str, exit_code: int) -> str:
    """The step summary of a run that failed before there was a report."""
    return (f"### repfuse {command}: error (exit {exit_code})\n\n{_md_cell(message)}\n\n"
            f"hint: {_md_cell(hint)}\n")
