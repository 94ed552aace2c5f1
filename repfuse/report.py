"""Render a `types.Report`: JSON (schema 1), Markdown, or rich renderables. Pure: never prints.

JSON schema 1 (keys are only ever added, never renamed):

    schema, tool, command, input, output, fusions[], skipped[], summary, verification|null,
    timings, warnings[], modules[] (only when non-empty, i.e. from `inspect`)

Non-finite floats (an `inf` or `nan` error) cannot be written as JSON numbers; they are written
as the strings "inf", "-inf" and "nan", so the value survives and the file stays valid JSON.
Tuples become lists, paths become strings, `None` becomes null.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .types import FusionSite, ModuleInfo, RepfuseError, Report, SkippedSite, Summary, Verification

SCHEMA_VERSION = 1
REPORT_SUFFIXES = {".json": "json", ".md": "markdown"}

# ---------------------------------------------------------------------------------------------
# JSON


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


def to_dict(report: Report) -> dict[str, Any]:
    """The report as a JSON-ready dict (schema 1). Every value is JSON-serialisable."""
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
        "warnings": list(report.warnings),
    }
    if report.modules:
        d["modules"] = [_module_dict(m) for m in report.modules]
    return _jsonable(d)


def to_json(report: Report, indent: int | None = 2) -> str:
    """The report as JSON text (strict: no NaN/Infinity literals)."""
    return json.dumps(to_dict(report), indent=indent, ensure_ascii=False, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# formatting helpers shared by Markdown and rich


def fmt_int(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def fmt_si(n: int | float | None) -> str:
    """1_820_000_000 → '1.82G'."""
    if n is None:
        return "—"
    x = float(n)
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:g}"


def fmt_float(x: float | None) -> str:
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


def fmt_change(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return "—"
    if before == 0:
        return "±0%" if after == 0 else "n/a"
    pct = 100.0 * (after - before) / before
    if pct == 0:
        return "±0%"
    return f"{pct:+.1f}%".replace("-", "−")


def fmt_tuple(t: Sequence[int], sep: str = "×") -> str:
    return sep.join(str(v) for v in t) if len(t) else "—"


def fmt_shapes(shapes: Iterable[Sequence[int]]) -> str:
    return ", ".join(fmt_tuple(s) for s in shapes) or "—"


def _fmt_io(d: Mapping[str, Any] | None) -> str:
    if d is None:
        return "—"
    parts = [str(d["path"])] if "path" in d else []
    for k, v in d.items():
        if k in _IO_DETAIL_ONLY or k == "path":
            continue  # long prose: in the JSON report, not in the header
        if isinstance(v, Mapping):  # a nested file (the --keymap, --against): its path
            if not v:
                continue
            v = v["path"] if "path" in v else " ".join(f"{a}={b!r}" for a, b in v.items())
        parts.append(f"{k}: {v}")
    return ", ".join(parts) or "—"


_IO_DETAIL_ONLY = frozenset({"check"})


def _total_rows(s: Summary) -> list[tuple[str, str, str, str]]:
    rows = [("parameters", fmt_int(s.params_before), fmt_int(s.params_after),
             fmt_change(s.params_before, s.params_after))]
    if s.macs_before is not None or s.macs_after is not None:
        rows.append(("MACs", fmt_si(s.macs_before), fmt_si(s.macs_after),
                     fmt_change(s.macs_before, s.macs_after)))
    if s.convs_before or s.convs_after:
        rows.append(("conv modules", str(s.convs_before), str(s.convs_after),
                     fmt_change(s.convs_before, s.convs_after)))
    if s.norms_before or s.norms_after:
        rows.append(("norm modules", str(s.norms_before), str(s.norms_after),
                     fmt_change(s.norms_before, s.norms_after)))
    return rows


def _timing_rows(timings: Mapping[str, float]) -> list[tuple[str, str]]:
    rows = [(k, f"{v:.3f}") for k, v in timings.items()]
    if timings and "total" not in timings:
        rows.append(("total", f"{sum(timings.values()):.3f}"))
    return rows


def _sites_title(command: str) -> str:
    return {"inspect": "Fusable sites", "verify": "Fused sites (in memory)"}.get(command, "Fused sites")


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def to_markdown(report: Report) -> str:
    """The report as a Markdown document (tables for sites, summary, verification, timings)."""
    tool = report.tool.get("name", "repfuse")
    version = report.tool.get("version", "")
    out = [f"# {tool} {report.command} report", ""]
    out += [f"- tool: {tool} {version}".rstrip(), f"- input: {_fmt_io(report.input)}",
            f"- output: {_fmt_io(report.output)}", ""]

    out += [f"## {_sites_title(report.command)} ({len(report.fusions)})", ""]
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

    out += [f"## Skipped sites ({len(report.skipped)})", ""]
    if report.skipped:
        out += _md_table(["module", "reason"], [(f"`{s.module}`", s.reason) for s in report.skipped])
    else:
        out += ["none", ""]

    out += ["## Summary", ""]
    out += _md_table(["", "before", "after", "change"],
                     [("fusions", "", str(report.summary.fusions), ""), *_total_rows(report.summary)])

    out += ["## Verification", ""]
    v = report.verification
    if v is None:
        out += ["not run", ""]
    else:
        out += _md_table(["", "value"], _verification_rows(v))
        if v.worst_sites:
            out += ["### Worst sites (float64 error)", ""]
            out += _md_table(["module", "max abs error"],
                             [(f"`{m}`", fmt_float(e)) for m, e in v.worst_sites])

    if report.timings:
        out += ["## Timings (s)", ""]
        out += _md_table(["stage", "seconds"], _timing_rows(report.timings))
    if report.warnings:
        out += ["## Warnings", ""]
        out += [f"- {w}" for w in report.warnings] + [""]
    if report.modules:
        out += ["## Modules", ""]
        out += _md_table(["path", "class", "params", "note"],
                         [(f"`{m.path or '(root)'}`", m.kind, fmt_int(m.params), m.note)
                          for m in report.modules])
    return "\n".join(out)


def _verification_rows(v: Verification) -> list[tuple[str, str]]:
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


# ---------------------------------------------------------------------------------------------
# writing


def report_format(path: Path) -> str:
    """'json' or 'markdown' from the suffix; RepfuseError otherwise. Cheap: call it before a long run."""
    fmt = REPORT_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise RepfuseError(
            f"unknown report format: {path}",
            "name the report file *.json (machine-readable, schema 1) or *.md (Markdown)",
        )
    return fmt


def write_report(report: Report, path: Path) -> None:
    """Write the report as JSON or Markdown (by suffix), atomically (see `writing.atomic_write`:
    a locked temporary file, then os.replace; mode 0644 under the usual umask)."""
    from .writing import atomic_write

    path = Path(path)
    text = to_json(report) if report_format(path) == "json" else to_markdown(report)
    data = (text if text.endswith("\n") else text + "\n").encode("utf-8")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise RepfuseError(f"cannot write report {path}: directory {parent} does not exist",
                           "create the directory first or choose another --report path")
    if path.is_dir():
        raise RepfuseError(f"cannot write report {path}: it is a directory",
                           "give --report a file name ending in .json or .md")
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


# ---------------------------------------------------------------------------------------------
# rich


def _header(report: Report) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold")
    grid.add_column()
    tool = report.tool.get("name", "repfuse")
    grid.add_row("command", escape(f"{tool} {report.command}"))
    grid.add_row("input", escape(_fmt_io(report.input)))
    if report.command == "convert" or report.output is not None:
        grid.add_row("output", escape(_fmt_io(report.output)))
    return grid


def _conv_geometry(s: FusionSite) -> str:
    """'3×3 s2 g4 d2': the kernel plus whatever is not the default (compact layout)."""
    parts = [fmt_tuple(s.kernel)]
    if any(v != 1 for v in s.stride):
        parts.append("s" + fmt_tuple(s.stride))
    if s.groups != 1:
        parts.append(f"g{s.groups}")
    if any(v != 1 for v in s.dilation):
        parts.append("d" + fmt_tuple(s.dilation))
    return " ".join(parts)


def fusions_table(report: Report, compact: bool = False) -> Table:
    """Fused sites. `compact` (for narrow consoles) merges kernel/stride/groups/dilation into one
    column ('3×3 s2 g4') and leaves out the branch list."""
    show_err = any(s.max_abs_error is not None for s in report.fusions)
    t = Table(title=f"{_sites_title(report.command)} ({len(report.fusions)})", title_justify="left")
    t.add_column("module", style="cyan", overflow="fold", ratio=1)
    t.add_column("pattern" if compact else "pattern / branches", overflow="fold", ratio=1)
    if compact:
        t.add_column("conv")
    else:
        t.add_column("kernel", justify="center")
    t.add_column("channels", justify="right")
    if not compact:
        t.add_column("groups", justify="right")
        t.add_column("stride", justify="center")
    t.add_column("params", justify="right")
    if show_err:
        t.add_column("max err", justify="right")
    for s in report.fusions:
        pattern = Text(s.pattern)
        if s.branches and not compact:
            pattern.append("\n" + ", ".join(s.branches), style="dim")
        row: list[RenderableType] = [escape(s.module), pattern]
        if compact:
            row += [_conv_geometry(s), f"{s.in_channels}→{s.out_channels}"]
        else:
            kernel = fmt_tuple(s.kernel)
            if any(d != 1 for d in s.dilation):
                kernel += f" (dil {fmt_tuple(s.dilation)})"
            row += [kernel, f"{s.in_channels}→{s.out_channels}", str(s.groups), fmt_tuple(s.stride)]
        row.append(f"{fmt_int(s.params_before)} → {fmt_int(s.params_after)}")
        if show_err:
            row.append(fmt_float(s.max_abs_error))
        t.add_row(*row)
    return t


def skipped_table(report: Report) -> Table:
    t = Table(title=f"Skipped sites ({len(report.skipped)})", title_justify="left")
    t.add_column("module", style="cyan", overflow="fold")
    t.add_column("reason", style="yellow", overflow="fold")
    for s in report.skipped:
        t.add_row(escape(s.module), escape(s.reason))
    return t


def totals_table(report: Report) -> Table:
    t = Table(title="Totals", title_justify="left")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("change", justify="right")
    t.add_row("fusions", "", str(report.summary.fusions), "")
    for row in _total_rows(report.summary):
        t.add_row(*row)
    return t


def verification_table(v: Verification) -> RenderableType:
    t = Table(title="Verification", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for name, value in _verification_rows(v):
        if name == "result":
            t.add_row(name, Text(value, style="bold green" if v.passed else "bold red"))
        else:
            t.add_row(escape(name), escape(value))
    if v.passed or not v.worst_sites:
        return t
    w = Table(title="Worst sites (float64)", title_justify="left")
    w.add_column("module", style="cyan", overflow="fold")
    w.add_column("max abs error", justify="right", style="red")
    for m, e in v.worst_sites:
        w.add_row(escape(m), fmt_float(e))
    return Group(t, w)


def timings_table(timings: Mapping[str, float]) -> Table:
    t = Table(title="Timings", title_justify="left")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for stage, secs in _timing_rows(timings):
        t.add_row(escape(stage), secs)
    return t


def _note_style(note: str) -> str:
    if note.startswith("fused") or note.startswith("would fuse"):
        return "green"
    if note.startswith("skipped"):
        return "yellow"
    if note.startswith("opaque"):
        return "magenta"
    return ""


def _parent(path: str, known: Mapping[str, ModuleInfo]) -> str:
    """Nearest ancestor of `path` that is in `known` ("" is the root)."""
    while path:
        path = path.rpartition(".")[0]
        if path in known:
            return path
    return ""


def module_tree(modules: Sequence[ModuleInfo], full_limit: int = 60) -> Tree:
    """The module tree of `inspect`.

    Up to `full_limit` modules every module is shown. Beyond that, to stay readable for models
    with hundreds of modules, only the root's direct children, the modules that carry a note
    (fused / skipped / opaque), and the ancestors of those are shown; every other subtree is
    collapsed into one dim "… N more modules (P params)" line under its parent.
    """
    by_path = {m.path: m for m in modules}
    root_info = by_path.get("") or ModuleInfo(path="", kind="(model)", params=0)
    children: dict[str, list[str]] = {}
    for m in modules:
        if m.path:
            children.setdefault(_parent(m.path, by_path), []).append(m.path)

    if len(modules) <= full_limit:
        keep = set(by_path) | {""}
    else:
        keep = {""} | set(children.get("", []))
        for m in modules:
            if m.note:
                p = m.path
                keep.add(p)
                while p:
                    p = _parent(p, by_path)
                    keep.add(p)

    def subtree_size(path: str) -> int:
        return sum(1 + subtree_size(c) for c in children.get(path, []))

    def label(m: ModuleInfo, parent: str) -> Text:
        name = m.path[len(parent) + 1:] if parent else m.path
        t = Text(name or "(root)", style="bold")
        t.append(f"  {m.kind}", style="cyan")
        t.append(f"  {fmt_si(m.params)} params", style="dim")
        if m.note:
            t.append(f"  {m.note}", style=_note_style(m.note))
        return t

    tree = Tree(label(root_info, ""))

    def add(node: Tree, path: str) -> None:
        hidden_n, hidden_p = 0, 0
        for c in children.get(path, []):
            if c in keep:
                add(node.add(label(by_path[c], path)), c)
            else:
                hidden_n += 1 + subtree_size(c)
                hidden_p += by_path[c].params  # a module's params already cover its children
        if hidden_n:
            node.add(Text(f"… {hidden_n} more module{'s' if hidden_n != 1 else ''} "
                          f"({fmt_si(hidden_p)} params), nothing to report", style="dim"))

    add(tree, "")
    return tree


def render(report: Report, console: Console) -> None:
    """Print the human report on `console` (warnings are not included: see `render_warnings`)."""
    console.print(_header(report))
    console.print()
    if report.modules:
        console.print(Text("Modules", style="bold italic"))
        console.print(module_tree(report.modules))
        console.print()
    if report.fusions:
        console.print(fusions_table(report, compact=console.width < 110))
    else:
        console.print(Text(f"{_sites_title(report.command)}: none", style="bold"))
    if report.skipped:
        console.print(skipped_table(report))
    console.print(totals_table(report))
    if report.verification is not None:
        console.print(verification_table(report.verification))
    if report.timings:
        console.print(timings_table(report.timings))


def render_warnings(report: Report, console: Console) -> None:
    """One `warning: …` line per report warning (the CLI sends these to stderr)."""
    for w in report.warnings:
        console.print(Text("warning: ", style="bold yellow") + Text(w), soft_wrap=True)
