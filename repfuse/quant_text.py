"""The `quantization` section for people: a short rich table and Markdown of the worst fused sites.
Pure: builds renderables and strings, never prints."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from .quant import WARN_SQNR_DB, LayerQuant, QuantReport

ROWS = 5  # worst fused sites shown


def _cause(layer: LayerQuant) -> str:
    """The worst channel, its range over the median, and its cause in a few words (flagged sites only)."""
    top = layer.worst_channels[0] if layer.worst_channels else None
    if top is None:
        return ""
    short = ""
    if layer.flagged and top.cause.startswith("folded BN") and top.running_var is not None:
        short = f"{top.norm} running_var {top.running_var:.2g}"
    elif layer.flagged and top.cause.startswith("conv "):
        short = f"{top.cause.split(':')[0]} weights"
    elif layer.flagged and top.cause and top.branch_share is not None:
        short = f"{top.branch} {top.branch_share:.0%} of its scale"
    return f"ch {top.channel} {top.ratio:.0f}×" + (f": {short}" if short else "")


def _rows(q: QuantReport, n: int) -> list[tuple[str, str, str, str, str, str]]:
    rows = []
    for layer in [x for x in q.layers if x.fused][:n]:
        rows.append(("⚠" if layer.flagged else "", layer.module, f"{layer.sqnr_per_tensor_db:.1f}",
                     f"{layer.channel_sqnr_median_db:.1f}", f"{layer.sqnr_per_channel_db:.1f}",
                     f"{layer.range_spread_median:.1f}×"))
    return rows


def footer(q: QuantReport) -> str:
    """Flagged count, the end-to-end estimate when there is one, and the activations caveat."""
    parts = [f"{len(q.flagged)} of {sum(x.fused for x in q.layers)} fused sites below {WARN_SQNR_DB:g} dB "
             "or over the range threshold"]
    if q.output is not None:
        parts.append(f"output SQNR with INT8 weights: {q.output.per_tensor_db:.1f} dB per tensor, "
                     f"{q.output.per_channel_db:.1f} dB per channel")
    if q.strict_db is not None:
        parts.append(f"--strict-quant {q.strict_db:g} dB: {len(q.failures)} failing")
    parts.append("activations not analysed (they need calibration data)")
    return " · ".join(parts)


def table(q: QuantReport, n: int = ROWS) -> Table:
    """The `n` worst fused sites (lowest INT8 SQNR first): SQNR per tensor, of the median channel
    under that scale, per channel (dB), max/median channel range, and the worst channel's cause."""
    t = Table(title="INT8 weight quantization (worst fused sites)", title_justify="left", title_style="bold",
              caption=footer(q), caption_justify="left")
    for name, kw in (("", {}), ("site", {"style": "cyan", "overflow": "fold"}), ("tensor dB", {"justify": "right"}),
                     ("med ch dB", {"justify": "right"}), ("chan dB", {"justify": "right"}),
                     ("max/med", {"justify": "right"}), ("worst channel", {"overflow": "fold"})):
        t.add_column(name, **kw)
    for layer, row in zip([x for x in q.layers if x.fused], _rows(q, n)):
        t.add_row(Text(row[0], style="yellow"), *row[1:], _cause(layer))
    return t


def markdown(q: QuantReport, n: int = ROWS, heading: str = "##") -> list[str]:
    """The same table as Markdown lines, under a `heading`-level title."""
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    out = [f"{heading} INT8 weight quantization (worst fused sites)", "",
           "| | site | per tensor dB | median ch dB | per channel dB | range max/med | worst channel |",
           "|---|---|---:|---:|---:|---:|---|"]
    for layer, row in zip([x for x in q.layers if x.fused], _rows(q, n)):
        out.append("| " + " | ".join(cell(c) for c in (*row, _cause(layer))) + " |")
    return [*out, "", cell(footer(q)), ""]
