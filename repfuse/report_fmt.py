"""Formatting and derived facts shared by every rendering of a report (JSON, Markdown, rich). Pure.

`deployment_gaps` is the `--strict` rule: why a model is not fully deployed (any skipped site, any
norm layer left, nothing fused at all); `verdict` is the one line every human rendering starts with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .types import Report, Summary

__all__ = [
    "deployment_gaps",
    "fmt_bytes",
    "fmt_change",
    "fmt_float",
    "fmt_int",
    "fmt_shapes",
    "fmt_si",
    "fmt_tuple",
    "is_against",
    "sites_title",
    "timing_rows",
    "total_rows",
    "verdict",
    "verdict_word",
]


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


def fmt_bytes(n: int | None) -> str:
    """493_855 → '482.3 KiB'."""
    if n is None:
        return "—"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"  # pragma: no cover


def fmt_float(x: float | str | None) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):  # "inf" / "nan" from a JSON round trip
        return x
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


def is_against(report: Report) -> bool:
    """`verify --against`: two files compared, nothing fused by this run."""
    return report.command == "verify" and isinstance(report.output, Mapping) and "against" in report.output


def total_rows(s: Summary, *, fusions: bool = False) -> list[tuple[str, str, str, str]]:
    rows = [("fusions", "", str(s.fusions), "")] if fusions else []
    rows.append(("parameters", fmt_int(s.params_before), fmt_int(s.params_after),
                 fmt_change(s.params_before, s.params_after)))
    if s.macs_before is not None or s.macs_after is not None:
        rows.append(("MACs", fmt_si(s.macs_before), fmt_si(s.macs_after), fmt_change(s.macs_before, s.macs_after)))
    if s.convs_before or s.convs_after:
        rows.append(("conv modules", str(s.convs_before), str(s.convs_after),
                     fmt_change(s.convs_before, s.convs_after)))
    if s.linears_before or s.linears_after:
        rows.append(("linear modules", str(s.linears_before), str(s.linears_after),
                     fmt_change(s.linears_before, s.linears_after)))
    if s.norms_before or s.norms_after:
        rows.append(("norm modules", str(s.norms_before), str(s.norms_after),
                     fmt_change(s.norms_before, s.norms_after)))
    return rows


def timing_rows(timings: Mapping[str, float]) -> list[tuple[str, str]]:
    rows = [(k, f"{v:.3f}") for k, v in timings.items()]
    if timings and "total" not in timings:
        rows.append(("total", f"{sum(timings.values()):.3f}"))
    return rows


def sites_title(command: str) -> str:
    return {"inspect": "Fusable sites", "verify": "Fused sites (in memory)"}.get(command, "Fused sites")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def deployment_gaps(report: Report) -> list[str]:
    """Why the model is not fully deployed, one reason per line; [] when it is. For `verify
    --against` only the compared file's own state counts (norm layers left in it)."""
    s = report.summary
    if is_against(report):
        return [f"{_plural(s.norms_after, 'norm layer')} left in the deploy model"] if s.norms_after else []
    gaps = [f"skipped {site.module}: {site.reason}" for site in report.skipped]
    if s.norms_after:
        gaps.append(f"{_plural(s.norms_after, 'norm layer')} left (of {s.norms_before})")
    if not report.fusions:
        gaps.append("nothing was fused")
    return gaps


def verdict_word(report: Report, exit_code: int | None = None) -> str:
    v = report.verification
    if v is not None and not v.passed:
        return "FAILED"
    if exit_code == 4 or (report.strict and deployment_gaps(report)):
        return "NOT DEPLOYED"
    if v is None:
        return "INSPECTED"
    return "PASSED"


def verdict(report: Report, exit_code: int | None = None) -> str:
    """One line: PASSED/FAILED, OUT and its size, N fused, norms before → after, skipped, max error."""
    s, v = report.summary, report.verification
    parts = [verdict_word(report, exit_code)]
    out: Mapping[str, Any] | None = report.output
    if report.command == "convert":
        if out and out.get("path"):
            size = f" ({fmt_bytes(out['size_bytes'])})" if out.get("size_bytes") is not None else ""
            parts.append(f"{out['path']}{size}")
        else:
            parts.append("nothing written")
    if is_against(report):
        against = report.output["against"] if report.output else {}
        parts.append(f"{against.get('path', 'OTHER')} against {report.input.get('path', 'IN')}")
    else:
        word = "fusable" if report.command == "inspect" else "fused"
        parts.append(f"{s.fusions} {word}")
    if s.norms_before or s.norms_after:
        parts.append(f"norms {s.norms_before} → {s.norms_after}")
    if not is_against(report):
        parts.append(f"{len(report.skipped)} skipped")
    if v is not None:
        parts.append(f"max err {fmt_float(v.max_abs_error)}")
    return " · ".join(parts)
