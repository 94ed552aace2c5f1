"""A report as rich renderables for a terminal or a CI log. Pure: draws on the console it is given.

The output starts with the verdict line, then the files, the sites, what is not deployed, the
totals and the verification. Module names and other identifiers are never broken: below
`WIDE` columns the tables become name/detail lists (the detail wraps at spaces), and a name too
long to share a line gets a line of its own. Hashes, factory arguments, branch lists, the full
verification table and the timings are shown with `verbose` only (all of it is in the JSON).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .report_fmt import (
    deployment_gaps,
    fmt_float,
    fmt_int,
    fmt_si,
    fmt_tuple,
    is_against,
    sites_title,
    timing_rows,
    total_rows,
    verdict,
    verdict_word,
)
from .report_md import fmt_io, verification_rows
from .types import FusionSite, ModuleInfo, Report, Verification

__all__ = ["WIDE", "fusions_table", "module_list", "module_tree", "render", "render_warnings", "verdict_text"]

WIDE = 110  # from this width on, full tables
_DETAIL_MIN = 28  # a name/detail list keeps at least this much room for the detail


def verdict_text(report: Report, exit_code: int | None = None) -> Text:
    word = verdict_word(report, exit_code)
    style = {"PASSED": "bold green", "FAILED": "bold red", "NOT DEPLOYED": "bold yellow"}.get(word, "bold")
    line = verdict(report, exit_code)
    return Text(word, style=style) + Text(line[len(word):])


class Stacked(Group):
    """Names on lines of their own, each detail indented below its name. `show` prints a name with
    soft_wrap=True, so one wider than the console is neither cropped nor folded (the terminal wraps
    it, if it must); the details wrap at spaces."""

    def __init__(self, head: Text, rows: Sequence[tuple[Text, Text]]) -> None:
        super().__init__(head, *(r for pair in rows for r in pair))
        self.head, self.rows = head, list(rows)


def show(console: Console, renderable: RenderableType) -> None:
    if not isinstance(renderable, Stacked):
        console.print(renderable)
        return
    console.print(renderable.head)
    for name, detail in renderable.rows:
        console.print(name, soft_wrap=True)
        console.print(Padding(detail, (0, 0, 0, 4)))


def _name_detail(title: str, rows: Sequence[tuple[str, Text]], width: int, name_style: str = "cyan") -> Group:
    """A list of (identifier, detail): side by side while the longest name leaves room for the
    detail, else each name on its own line with the detail indented below it."""
    head = Text(title, style="bold")
    longest = max((len(n) for n, _ in rows), default=0)
    if longest + 2 + _DETAIL_MIN <= width:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True, style=name_style)
        grid.add_column(overflow="fold")
        for name, detail in rows:
            grid.add_row(Text(name), detail)
        return Group(head, grid)
    return Stacked(head, [(Text(name, style=name_style), detail) for name, detail in rows])


def _conv_geometry(s: FusionSite) -> str:
    """'3×3 s2 g4 d2': the kernel plus whatever is not the default (compact layout)."""
    def short(t: Sequence[int]) -> str:
        return str(t[0]) if len(set(t)) == 1 else fmt_tuple(t)

    parts = [fmt_tuple(s.kernel)]
    if any(v != 1 for v in s.stride):
        parts.append("s" + short(s.stride))
    if s.groups != 1:
        parts.append(f"g{s.groups}")
    if any(v != 1 for v in s.dilation):
        parts.append("d" + short(s.dilation))
    return " ".join(parts)


def fusions_table(report: Report, compact: bool = False, width: int = WIDE, verbose: bool = False) -> RenderableType:
    """Fused sites: a full table, or (`compact`, for narrow consoles) a name/detail list."""
    title = f"{sites_title(report.command)} ({len(report.fusions)})"
    if compact:
        rows = []
        for s in report.fusions:
            detail = Text(f"{s.pattern} · {_conv_geometry(s)} · {s.in_channels}→{s.out_channels} · "
                          f"params {fmt_int(s.params_before)} → {fmt_int(s.params_after)}")
            if s.max_abs_error is not None:
                detail.append(f" · err {fmt_float(s.max_abs_error)}")
            if verbose and s.branches:
                detail.append(f" · from {', '.join(s.branches)}", style="dim")
            rows.append((s.module, detail))
        return _name_detail(title, rows, width)
    show_err = any(s.max_abs_error is not None for s in report.fusions)
    t = Table(title=title, title_justify="left")
    t.add_column("module", style="cyan", no_wrap=True)
    t.add_column("pattern / branches" if verbose else "pattern", ratio=1)
    for name in ("kernel", "channels", "groups", "stride", "params"):
        t.add_column(name, justify="right", no_wrap=True)
    if show_err:
        t.add_column("max err", justify="right", no_wrap=True)
    for s in report.fusions:
        pattern = Text(s.pattern)
        if s.branches and verbose:
            pattern.append("\n" + ", ".join(s.branches), style="dim")
        kernel = fmt_tuple(s.kernel) + (f" (dil {fmt_tuple(s.dilation)})" if any(d != 1 for d in s.dilation) else "")
        row: list[RenderableType] = [escape(s.module), pattern, kernel, f"{s.in_channels}→{s.out_channels}",
                                     str(s.groups), fmt_tuple(s.stride),
                                     f"{fmt_int(s.params_before)} → {fmt_int(s.params_after)}"]
        if show_err:
            row.append(fmt_float(s.max_abs_error))
        t.add_row(*row)
    return t


def skipped_table(report: Report, width: int = WIDE) -> RenderableType:
    rows = [(s.module, Text(s.reason, style="yellow")) for s in report.skipped]
    return _name_detail(f"Skipped sites ({len(report.skipped)})", rows, width)


def totals_table(report: Report) -> Table:
    t = Table(title="Totals", title_justify="left")
    t.add_column("", no_wrap=True)
    for name in ("before", "after", "change"):
        t.add_column(name, justify="right", no_wrap=True)
    for row in total_rows(report.summary, fusions=not is_against(report)):
        t.add_row(*row)
    return t


def verification_table(v: Verification, verbose: bool = True) -> RenderableType:
    t = Table(title="Verification", title_justify="left", show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    rows = verification_rows(v)
    if not verbose:  # the verdict line has the rest
        keep = {"result", f"max abs error ({v.dtype})", "max abs error (float64, exact)", "tolerance", "input shape",
                "message"}
        rows = [r for r in rows if r[0] in keep]
    for name, value in rows:
        if name == "result":
            t.add_row(name, Text(value, style="bold green" if v.passed else "bold red"))
        else:
            t.add_row(escape(name), escape(value))
    if v.passed or not v.worst_sites:
        return t
    w = Table(title="Worst sites (float64)", title_justify="left")
    w.add_column("module", style="cyan", no_wrap=True)
    w.add_column("max abs error", justify="right", style="red", no_wrap=True)
    for m, e in v.worst_sites:
        w.add_row(escape(m), fmt_float(e))
    return Group(t, w)


def timings_line(timings: Mapping[str, float]) -> Text:
    return Text("timings: " + " · ".join(f"{k} {v}s" for k, v in timing_rows(timings)), style="dim")


def _note_style(note: str) -> str:
    if note.startswith(("fused", "would fuse", "becomes", "new layer")):
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


def _is_block_note(note: str) -> bool:
    """A note about the module itself (not only 'folded into …' as a branch of another)."""
    return any(not part.startswith("folded into") for part in note.split("; ") if part)


def module_list(modules: Sequence[ModuleInfo], width: int = WIDE) -> RenderableType:
    """inspect's default: one line per block, what would fuse or why not."""
    rows = []
    for m in modules:
        if m.note and _is_block_note(m.note):
            note = "; ".join(p for p in m.note.split("; ") if not p.startswith("folded into"))
            rows.append((m.path or "(root)", Text(f"{m.kind}: {note}", style=_note_style(note))))
    if not rows:
        return Text("Blocks: nothing would change", style="bold")
    return _name_detail(f"Blocks ({len(rows)})", rows, width)


def module_tree(modules: Sequence[ModuleInfo], full_limit: int = 60, depth: int | None = None) -> Tree:
    """The module tree of `inspect --all` (every module) or `--depth N` (modules at most N levels
    below the root). Without `depth`: up to `full_limit` modules every module; beyond that only the
    root's children, the modules with a note and their ancestors; the rest collapse into one dim
    "… N more modules" line under their parent."""
    by_path = {m.path: m for m in modules}
    root_info = by_path.get("") or ModuleInfo(path="", kind="(model)", params=0)
    children: dict[str, list[str]] = {}
    for m in modules:
        if m.path:
            children.setdefault(_parent(m.path, by_path), []).append(m.path)

    if depth is not None:
        keep = {""} | {p for p in by_path if p and p.count(".") < depth}
    elif len(modules) <= full_limit:
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
                hidden_p += by_path[c].params
        if hidden_n:
            node.add(Text(f"… {hidden_n} more module{'s' if hidden_n != 1 else ''} "
                          f"({fmt_si(hidden_p)} params)", style="dim"))

    add(tree, "")
    return tree


def render(report: Report, console: Console, *, verbose: bool = False, exit_code: int | None = None,
           depth: int | None = None, all_modules: bool = False) -> None:
    """Print the human report on `console`, verdict first (warnings: see `render_warnings`)."""
    width = console.width
    longest = max((len(s.module) for s in report.fusions), default=0)
    compact = width < WIDE or longest + 90 > width  # the full table's other columns take ~90
    console.print(verdict_text(report, exit_code), soft_wrap=True)
    console.print()
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("input", escape(fmt_io(report.input, verbose)))
    if report.output is not None:
        out = dict(report.output)
        against = out.pop("against", None)
        if against is not None:
            grid.add_row("against", escape(fmt_io(against, verbose)))
        if out:
            grid.add_row("output", escape(fmt_io(out, verbose)))
    console.print(grid)
    console.print()
    if report.modules:
        if all_modules or depth is not None:
            console.print(Text("Modules", style="bold"))
            console.print(module_tree(report.modules, full_limit=10**9 if all_modules else 60, depth=depth))
        else:
            show(console, module_list(report.modules, width))
        console.print()
    if not is_against(report):
        if report.fusions:
            show(console, fusions_table(report, compact=compact, width=width, verbose=verbose))
        else:
            console.print(Text(f"{sites_title(report.command)}: none", style="bold"))
        console.print()
        if report.skipped:
            show(console, skipped_table(report, width))
            console.print()
    gaps = deployment_gaps(report)
    if gaps and report.strict:
        show(console, _name_detail("Not fully deployed (--strict)", [("·", Text(g)) for g in gaps], width, "yellow"))
        console.print()
    console.print(totals_table(report))
    if report.verification is not None:
        console.print(verification_table(report.verification, verbose))
    if report.quantization is not None:  # --quant-report / --strict-quant
        from .quant_text import table as quant_table

        console.print(quant_table(report.quantization))
    if report.timings and verbose:
        console.print(timings_line(report.timings))


def render_warnings(report: Report, console: Console, verbose: bool = False) -> None:
    """One `warning: …` line per report warning (the CLI sends these to stderr); `note: …` lines
    for info diagnostics with `verbose`."""
    for w in report.warnings:
        console.print(Text("warning: ", style="bold yellow") + Text(w), soft_wrap=True)
    for d in report.diagnostics:
        if d.level == "warning":
            console.print(Text("warning: ", style="bold yellow") + Text(f"{d.message} [{d.code}]"), soft_wrap=True)
        elif verbose:
            console.print(Text("note: ", style="dim") + Text(f"{d.message} [{d.code}]", style="dim"), soft_wrap=True)
