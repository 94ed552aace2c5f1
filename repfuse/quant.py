"""Quantization readiness of a deploy model: data-free figures of its weights under symmetric INT8.

Pure analysis, never prints, never changes a model. For every fused site (and, for comparison,
every untouched Conv/Linear) the weight W, seen per output channel c (axis 0):

- per-channel range ``a_c = max |W[c]|``; ``range_spread = max_c a_c / min_{c: a_c>0} a_c`` and the
  robust ``range_spread_median = max_c a_c / median_c a_c`` (how many times the median channel the
  largest one is: with one per-tensor scale the median channel keeps ``127 / range_spread_median``
  of the 127 levels);
- symmetric INT8 quantization, narrow range [-127, 127], zero point 0, by torch's own
  ``torch.fake_quantize_per_tensor_affine`` (scale ``max_c a_c / 127``) and
  ``torch.fake_quantize_per_channel_affine`` (scale ``a_c / 127``);
- ``SQNR = 10 log10(Σ W² / Σ (W − Q(W))²)`` in dB, per tensor and per channel; ``channel_sqnr_median_db``
  is the median over output channels of each channel's own SQNR under the one per-tensor scale
  (the whole-tensor figure is dominated by the largest channels; this one shows the crushed ones).
  A lossless quantization (or an all-zero tensor) reads as ``SQNR_CAP_DB``.

A layer is *flagged* when ``min(sqnr_per_tensor_db, channel_sqnr_median_db) < WARN_SQNR_DB`` or
``range_spread_median > WARN_SPREAD``. Its worst channels (largest ``a_c``, the ones that set the
per-tensor scale) carry the cause where the train-time model shows it: per branch b of the site,
``m_b[c] = s_b[c] · max |W_b[c]|`` with ``s_b = |γ| / sqrt(running_var + eps)`` of the branch's BN
(1 without one; an identity BN has ``max |W_b[c]| = 1``); the branch with the largest ``m_b[c]``
dominates the channel, and its BN is the cause when ``s_b[c] ≥ DOMINANT × median_c s_b`` (a tiny
running variance), its conv when ``max |W_b[c]| ≥ DOMINANT × median``. Activations are out of scope:
their ranges need calibration data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .types import Diagnostic, FusionSite

QMAX = 127  # symmetric narrow range [-QMAX, QMAX], zero point 0 (TensorRT / ONNX QDQ weights)
WARN_SQNR_DB = 30.0  # flag below this per-tensor INT8 SQNR (whole tensor, or its median channel)
WARN_SPREAD = 100.0  # flag above this max / median per-channel range
DOMINANT = 10.0  # a BN scale or conv range this many times its layer median is named as the cause
SQNR_CAP_DB = 200.0  # lossless quantization (no noise) or an all-zero tensor
TOP_CHANNELS = 3
CODE = "quant-weight-range"  # Diagnostic code of a flagged fused site
ACTIVATIONS = "not analysed: activation ranges need calibration data; figures are for weights only"


@dataclass(frozen=True)
class ChannelNote:
    """One of a layer's worst output channels (largest range) and, where visible, why."""

    channel: int
    absmax: float  # a_c = max |W[c]|
    ratio: float  # a_c / median_c a_c
    cause: str = ""  # human words; "" when the train-time model shows nothing
    branch: str = ""  # the branch whose contribution m_b[c] is largest
    branch_share: float | None = None  # m_b[c] / Σ_b m_b[c]
    norm: str = ""  # the BN named as the cause
    running_var: float | None = None
    norm_scale: float | None = None  # |γ| / sqrt(running_var + eps)


@dataclass(frozen=True)
class LayerQuant:
    """Data-free INT8 figures of one Conv/Linear weight (formulas in the module docstring)."""

    module: str
    fused: bool  # a fused site (else an untouched layer, for comparison)
    layer: str  # class name
    out_channels: int
    numel: int
    absmax_max: float
    absmax_median: float
    absmax_min: float  # smallest non-zero channel range
    range_spread: float
    range_spread_median: float
    zero_channels: int
    sqnr_per_tensor_db: float
    sqnr_per_channel_db: float
    channel_sqnr_median_db: float
    worst_channels: tuple[ChannelNote, ...] = ()
    reasons: tuple[str, ...] = ()  # why it is flagged; () when it is not

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)

    @property
    def int8_db(self) -> float:
        """The figure thresholds and --strict-quant compare: min(per-tensor, median channel) SQNR."""
        return min(self.sqnr_per_tensor_db, self.channel_sqnr_median_db)


@dataclass(frozen=True)
class OutputSQNR:
    """End-to-end: the model with fake-quantized weights (every Conv/Linear) against the float model,
    ``10 log10(Σ y² / Σ (y − ŷ)²)`` over all outputs, on the verification inputs."""

    per_tensor_db: float
    per_channel_db: float
    input_shape: tuple[tuple[int, ...], ...]
    layers: int  # how many weights were quantized


@dataclass(frozen=True)
class QuantReport:
    layers: tuple[LayerQuant, ...]  # fused sites first (worst first), then untouched layers (worst first)
    output: OutputSQNR | None = None
    scheme: str = f"INT8 symmetric weights, range [-{QMAX}, {QMAX}], zero point 0"
    activations: str = ACTIVATIONS
    thresholds: tuple[tuple[str, float], ...] = (("sqnr_db", WARN_SQNR_DB), ("range_spread_median", WARN_SPREAD),
                                                 ("dominant", DOMINANT))
    strict_db: float | None = None  # --strict-quant DB: fused sites whose int8_db is below it fail

    @property
    def flagged(self) -> tuple[LayerQuant, ...]:
        """Flagged fused sites, worst first."""
        return tuple(q for q in self.layers if q.fused and q.flagged)

    @property
    def failures(self) -> tuple[str, ...]:
        """`strict_failures` at `strict_db`; () without it."""
        return strict_failures(self, self.strict_db) if self.strict_db is not None else ()


# ----------------------------------------------------------------------------------------------
# figures


def sqnr_db(signal: torch.Tensor, noisy: torch.Tensor) -> float:
    """``10 log10(Σ x² / Σ (x − x̂)²)`` in float64; SQNR_CAP_DB where the noise (or the signal) is 0."""
    x = signal.detach().double()
    s = float((x * x).sum())
    n = float(((x - noisy.detach().double()) ** 2).sum())
    if s == 0.0 or n <= s * 10 ** (-SQNR_CAP_DB / 10):
        return SQNR_CAP_DB
    return 10.0 * math.log10(s / n)


def channel_sqnr_db(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`sqnr_db` of every output channel ``W[c]`` against ``Q[c]`` (float64, capped like `sqnr_db`)."""
    x = w.detach().double().reshape(w.shape[0], -1)
    s = (x * x).sum(dim=1)
    n = ((x - q.detach().double().reshape(w.shape[0], -1)) ** 2).sum(dim=1)
    floor = s * 10 ** (-SQNR_CAP_DB / 10)
    db = 10.0 * torch.log10(s / torch.maximum(n, floor).clamp_min(torch.finfo(torch.float64).tiny))
    return torch.where(s > 0, db, torch.full_like(db, SQNR_CAP_DB))


def channel_ranges(w: torch.Tensor) -> torch.Tensor:
    """``a_c = max |W[c]|`` over every axis but the first (float64)."""
    return w.detach().double().abs().reshape(w.shape[0], -1).amax(dim=1)


def fake_quant(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Symmetric INT8 fake quantization of `w` (float32) by torch's primitives: scale max|W|/127 per
    tensor, or a_c/127 per output channel (1 for an all-zero channel, which stays exactly zero)."""
    x = w.detach().float()
    if x.numel() == 0:
        return x
    if per_channel:
        scale = (channel_ranges(x) / QMAX).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.zeros(x.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(x, scale, zero, 0, -QMAX, QMAX)
    amax = float(x.abs().max())
    return torch.fake_quantize_per_tensor_affine(x, amax / QMAX if amax > 0 else 1.0, 0, -QMAX, QMAX)


def _median(t: torch.Tensor) -> float:
    """The lower median (torch's): an element of `t`, so ratios to it are exact."""
    return float(t.median()) if t.numel() else 0.0


def layer_figures(module: str, w: torch.Tensor, *, fused: bool, layer: str = "", top: int = TOP_CHANNELS,
                  causes: Mapping[int, ChannelNote] | None = None) -> LayerQuant:
    """Every figure of one weight (formulas in the module docstring); `causes` fills the worst channels."""
    if w.dim() < 1 or w.shape[0] == 0:
        raise ValueError(f"{module}: weight has no output channels")
    a = channel_ranges(w)
    nz = a[a > 0]
    amax = float(a.max())
    med = _median(nz)
    amin = float(nz.min()) if nz.numel() else 0.0
    spread = amax / amin if amin > 0 else 1.0
    spread_med = amax / med if med > 0 else 1.0
    x = w.detach().float()
    qt, qc = fake_quant(x, False), fake_quant(x, True)
    ch_med = _median(channel_sqnr_db(x, qt)[a > 0]) if nz.numel() else SQNR_CAP_DB
    worst = [int(c) for c in torch.argsort(a, descending=True, stable=True)[:top]]
    notes = tuple((causes or {}).get(c) or ChannelNote(c, float(a[c]), float(a[c]) / med if med > 0 else 1.0)
                  for c in worst)
    q = LayerQuant(module, fused, layer, int(w.shape[0]), int(w.numel()), amax, med, amin, spread, spread_med,
                   int((a == 0).sum()), sqnr_db(x, qt), sqnr_db(x, qc), ch_med, notes)
    reasons = []
    if q.sqnr_per_tensor_db < WARN_SQNR_DB:
        reasons.append(f"per-tensor INT8 SQNR {q.sqnr_per_tensor_db:.1f} dB < {WARN_SQNR_DB:g} dB")
    if q.channel_sqnr_median_db < WARN_SQNR_DB:
        reasons.append(f"median channel's INT8 SQNR {q.channel_sqnr_median_db:.1f} dB < {WARN_SQNR_DB:g} dB "
                       "under one per-tensor scale")
    if spread_med > WARN_SPREAD:
        reasons.append(f"largest channel range {spread_med:.0f}× the median > {WARN_SPREAD:g}×")
    return _with(q, reasons=tuple(reasons))


def _with(q: LayerQuant, **changes: Any) -> LayerQuant:
    return LayerQuant(**{**{f: getattr(q, f) for f in q.__dataclass_fields__}, **changes})


# ----------------------------------------------------------------------------------------------
# causes, from the train-time model


def _weighted(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(m, "transposed", False)


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``|γ| / sqrt(running_var + eps)`` per channel (γ = 1 without affine), float64."""
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double().abs() if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


@dataclass(frozen=True)
class _Branch:
    name: str
    conv: nn.Module | None
    bn: nn.modules.batchnorm._BatchNorm | None
    bn_path: str = ""
    conv_path: str = ""


def site_branches(original: nn.Module, site: FusionSite, channels: int) -> list[_Branch]:
    """The site's branches in the train-time model: each conv (out = `channels`) paired with the first
    BN of `channels` features after it in `site.branches`; a BN with no conv before it is an identity
    branch. Paths that are graph nodes, not modules, are ignored."""
    modules = dict(original.named_modules())
    out: list[_Branch] = []
    pending: tuple[str, nn.Module] | None = None
    for path in site.branches:
        m = modules.get(path)
        if _weighted(m) and _out_channels(m) == channels:
            if pending is not None:
                out.append(_Branch(pending[0], pending[1], None, conv_path=pending[0]))
            pending = (path, m)
        elif (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
              and m.running_var is not None and m.num_features == channels):
            if pending is not None:
                out.append(_Branch(pending[0].rpartition(".")[0] or pending[0], pending[1], m, path, pending[0]))
                pending = None
            else:
                out.append(_Branch(path, None, m, path))
    if pending is not None:
        out.append(_Branch(pending[0], pending[1], None, conv_path=pending[0]))
    parents = [b.conv_path.rpartition(".")[0] for b in out if b.conv_path]
    return [_Branch(b.conv_path if parents.count(b.name) > 1 or not b.name else b.name, b.conv, b.bn, b.bn_path,
                    b.conv_path) for b in out]


def _out_channels(m: nn.Module) -> int:
    return int(m.weight.shape[0])


def channel_causes(branches: Sequence[_Branch], channels: Sequence[int], a: torch.Tensor) -> dict[int, ChannelNote]:
    """For each channel: the dominant branch by ``m_b[c] = s_b[c] · max|W_b[c]|`` and the cause (see the
    module docstring)."""
    if not branches:
        return {}
    med_a = _median(a[a > 0])
    rows = []
    for b in branches:
        s = bn_scale(b.bn) if b.bn is not None else None
        r = channel_ranges(b.conv.weight) if b.conv is not None else None
        n = int(a.shape[0])
        s_ = s if s is not None else torch.ones(n, dtype=torch.float64)
        r_ = r if r is not None else torch.ones(n, dtype=torch.float64)
        rows.append((b, s, r, s_ * r_))
    out = {}
    for c in channels:
        total = sum(float(m[c]) for *_, m in rows)
        b, s, r, m = max(rows, key=lambda row: float(row[3][c]))
        share = float(m[c]) / total if total > 0 else None
        ratio = float(a[c]) / med_a if med_a > 0 else 1.0
        note = ChannelNote(c, float(a[c]), ratio, branch=b.name, branch_share=share)
        if s is not None:
            note = ChannelNote(**{**asdict(note), "norm": b.bn_path, "running_var": float(b.bn.running_var[c]),
                                  "norm_scale": float(s[c])})
        cause = ""
        s_ratio = float(s[c]) / _median(s) if s is not None and _median(s) > 0 else 0.0
        r_ratio = float(r[c]) / _median(r) if r is not None and _median(r) > 0 else 0.0
        if s_ratio >= DOMINANT:
            cause = (f"folded BN {b.bn_path}: running_var[{c}] = {float(b.bn.running_var[c]):.3g} gives "
                     f"|γ|/√(var+ε) = {float(s[c]):.3g}, {s_ratio:.0f}× that BN's median")
        elif r_ratio >= DOMINANT:
            cause = f"conv {b.conv_path}: channel {c}'s weights span {r_ratio:.0f}× its median range"
        elif share is not None and share >= 0.8 and len(rows) > 1:
            cause = f"branch {b.name} dominates ({share:.0%} of the channel's scale)"
        out[c] = ChannelNote(**{**asdict(note), "cause": cause})
    return out


# ----------------------------------------------------------------------------------------------
# whole model


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    if path in ("", "<root>"):
        return model
    return dict(model.named_modules()).get(path)


def analyse(deploy: nn.Module, sites: Sequence[FusionSite], original: nn.Module | None = None, *,
            untouched: bool = True, top: int = TOP_CHANNELS) -> QuantReport:
    """Figures of every fused site's weight in `deploy` (sites whose layer is not a Conv/Linear are
    left out) and, with `untouched`, of every other Conv/Linear. With the train-time `original`, the
    worst channels of each fused site carry their cause (see `channel_causes`). Layers are ordered
    worst `int8_db` first, fused sites before untouched ones."""
    fused_rows, seen = [], set()
    for site in sites:
        m = _module_at(deploy, site.module)
        if m is None or not _weighted(m):
            continue
        seen.add(id(m))
        w = m.weight.detach()
        causes: dict[int, ChannelNote] = {}
        if original is not None:
            a = channel_ranges(w)
            worst = [int(c) for c in torch.argsort(a, descending=True, stable=True)[:top]]
            causes = channel_causes(site_branches(original, site, int(w.shape[0])), worst, a)
        fused_rows.append(layer_figures(site.module, w, fused=True, layer=type(m).__name__, top=top, causes=causes))
    other_rows = []
    if untouched:
        for path, m in deploy.named_modules():
            if _weighted(m) and id(m) not in seen and m.weight.numel():
                seen.add(id(m))
                other_rows.append(layer_figures(path or "<root>", m.weight, fused=False, layer=type(m).__name__,
                                                top=top))

    def key(q: LayerQuant) -> float:
        return q.int8_db

    return QuantReport(tuple(sorted(fused_rows, key=key)) + tuple(sorted(other_rows, key=key)))


def output_sqnr(deploy: nn.Module, inputs: tuple[torch.Tensor, ...]) -> OutputSQNR:
    """Run float32 copies of `deploy` with every Conv/Linear weight fake-quantized (per tensor, then per
    channel) against the float32 model on `inputs` (biases and activations stay float)."""
    from . import verify

    base = copy.deepcopy(deploy).float().eval()
    xs = tuple(x.float() if x.is_floating_point() else x for x in inputs)
    ref = verify.run(base, xs)
    figures = []
    count = 0
    for per_channel in (False, True):
        model = copy.deepcopy(base)
        count = 0
        with torch.no_grad():
            for m in model.modules():
                if _weighted(m) and m.weight.numel():
                    m.weight.copy_(fake_quant(m.weight, per_channel))
                    count += 1
        got = verify.run(model, xs)
        s = sum(float((r.double() ** 2).sum()) for r in ref)
        n = sum(float(((r.double() - g.double()) ** 2).sum()) for r, g in zip(ref, got))
        figures.append(SQNR_CAP_DB if s == 0 or n <= s * 10 ** (-SQNR_CAP_DB / 10) else 10 * math.log10(s / n))
    return OutputSQNR(figures[0], figures[1], tuple(tuple(x.shape) for x in inputs), count)


# ----------------------------------------------------------------------------------------------
# what the rest of repfuse reads


def diagnostics(q: QuantReport) -> tuple[Diagnostic, ...]:
    """One warning (code CODE) per flagged fused site, naming its worst channel and cause."""
    out = []
    for layer in q.flagged:
        top = layer.worst_channels[0] if layer.worst_channels else None
        where = ""
        if top and (top.ratio >= 4 or top.cause):
            where = f"; channel {top.channel} spans {top.ratio:.0f}× the median channel range"
            where += f" ({top.cause})" if top.cause else ""
        if layer.sqnr_per_channel_db >= WARN_SQNR_DB:
            advice = (f"per-channel quantization gives {layer.sqnr_per_channel_db:.1f} dB: quantize it per channel "
                      "or keep it in higher precision")
        else:
            advice = (f"even per channel only {layer.sqnr_per_channel_db:.1f} dB (a few taps dominate each kernel): "
                      "keep it in higher precision or retrain with quantization-aware re-parameterization")
        out.append(Diagnostic(CODE, f"{layer.module}: INT8 weights lose accuracy: {'; '.join(layer.reasons)}"
                              f"{where}; {advice}", "warning", layer.module))
    return tuple(out)


def strict_failures(q: QuantReport, min_db: float) -> tuple[str, ...]:
    """--strict-quant DB: each fused site whose `int8_db` is below `min_db`, in words."""
    return tuple(f"{layer.module}: INT8 weight SQNR {layer.int8_db:.1f} dB < {min_db:g} dB"
                 for layer in q.layers if layer.fused and layer.int8_db < min_db)


def to_dict(q: QuantReport) -> dict[str, Any]:
    """The JSON `quantization` section (plain types; floats are finite)."""
    def layer(x: LayerQuant) -> dict[str, Any]:
        d = asdict(x)
        d["flagged"] = x.flagged
        d["int8_db"] = x.int8_db
        return d

    return {
        "scheme": q.scheme,
        "activations": q.activations,
        "thresholds": dict(q.thresholds),
        "flagged": [x.module for x in q.flagged],
        "layers": [layer(x) for x in q.layers],
        "output": ({**asdict(q.output), "input_shape": [list(s) for s in q.output.input_shape]}
                   if q.output else None),
        "strict_db": q.strict_db,
        "failures": list(q.failures),
    }


def report(deploy: nn.Module, sites: Sequence[FusionSite], original: nn.Module | None = None,
           inputs: tuple[torch.Tensor, ...] | None = None, strict_db: float | None = None) -> QuantReport:
    """`analyse`, plus `output_sqnr` on `inputs` when given, with --strict-quant's `strict_db`."""
    q = analyse(deploy, sites, original)
    out = output_sqnr(deploy, inputs) if inputs is not None else None
    return QuantReport(q.layers, out, strict_db=strict_db)
