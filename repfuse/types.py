"""Frozen dataclasses passed between the stages (find → fuse → verify → save → report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .quant import QuantReport


@dataclass(frozen=True)
class FusionSite:
    """One linear sub-graph that was replaced by a single conv (or linear) layer."""

    module: str  # dotted path of the new layer in the deploy model
    pattern: str  # human words: "3×3+1×1+identity, BN×3"
    branches: tuple[str, ...]  # dotted paths (or node names) of the ops that were folded in
    kernel: tuple[int, ...]  # kernel size of the fused layer (() for Linear)
    in_channels: int
    out_channels: int
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    params_before: int
    params_after: int
    max_abs_error: float | None = None  # float64 error of this site, filled by verify


@dataclass(frozen=True)
class SkippedSite:
    """A place that looked fusable but is not exactly one conv; `reason` says why."""

    module: str
    reason: str


@dataclass(frozen=True)
class Verification:
    passed: bool
    max_abs_error: float  # in the deployed dtype
    max_rel_error: float
    exact_max_abs_error: float  # float64 run: separates a wrong fusion from rounding
    exact_max_rel_error: float
    atol: float
    rtol: float
    trials: int
    input_shape: tuple[tuple[int, ...], ...]
    seed: int
    dtype: str
    worst_sites: tuple[tuple[str, float], ...] = ()  # (module, float64 error) largest first
    message: str = ""
    # every input shape set checked, the given one first (then other sizes / batch sizes, see Options)
    shapes_checked: tuple[tuple[tuple[int, ...], ...], ...] = ()


@dataclass(frozen=True)
class Summary:
    fusions: int
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    convs_before: int = 0  # ConvNd modules
    convs_after: int = 0
    norms_before: int = 0  # BatchNorm / InstanceNorm modules (those that may hold running statistics)
    norms_after: int = 0
    linears_before: int = 0  # Linear modules
    linears_after: int = 0


@dataclass(frozen=True)
class Report:
    """Everything a run did; report.py renders it as JSON (schema 1), Markdown or rich."""

    tool: dict[str, str]
    command: str
    input: dict[str, Any]
    output: dict[str, Any] | None
    fusions: tuple[FusionSite, ...]
    skipped: tuple[SkippedSite, ...]
    summary: Summary
    verification: Verification | None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    modules: tuple[ModuleInfo, ...] = ()  # filled by inspect only
    diagnostics: tuple[Diagnostic, ...] = ()  # warnings and notes with a stable code
    strict: bool = False  # --strict: anything not fully deployed is a failure (exit 4)
    quantization: QuantReport | None = None  # --quant-report / --strict-quant: INT8 weight figures (repfuse.quant)


@dataclass(frozen=True)
class Diagnostic:
    """A warning (`level="warning"`) or a note (`"info"`, shown with -v) with a stable `code`
    (lower-case words joined by '-', e.g. "input-shape-guessed"); `module` where it applies."""

    code: str
    message: str
    level: str = "warning"
    module: str = ""


class RepfuseError(Exception):
    """A user-facing error: bad input or usage. The CLI prints `message` and `hint`, exit 2."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class NotFullyDeployed(Exception):
    """--strict: the model is not fully deployed (CLI exit 4); nothing was written."""

    def __init__(self, report: Report, reasons: tuple[str, ...] = ()) -> None:
        super().__init__("not fully deployed: " + "; ".join(reasons))
        self.report = report
        self.reasons = reasons


class QuantStrictFailed(NotFullyDeployed):
    """--strict-quant DB: a fused site's INT8 weight SQNR is below DB (CLI exit 4); nothing was written."""


class VerificationFailed(Exception):
    """The fused model does not match the original (CLI exit 1)."""

    def __init__(self, report: Report) -> None:
        super().__init__(report.verification.message if report.verification else "verification failed")
        self.report = report


@dataclass(frozen=True)
class ModuleInfo:
    """One row of `repfuse inspect`'s module tree."""

    path: str  # "" for the root
    kind: str  # class name
    params: int
    note: str = ""  # "fused → stem.fused", "skipped: …", "opaque: could not trace (…)"


@dataclass(frozen=True)
class Options:
    """What the user asked for; every CLI flag maps to one field."""

    input_shapes: tuple[tuple[int, ...], ...] | None = None  # None: infer from the first layer
    allow: tuple[str, ...] = ()  # module prefixes whose classes may be unpickled
    trust: bool = False  # full (unsafe) unpickling
    atol: float | None = None  # None: default for the model's dtype
    rtol: float | None = None
    seed: int = 0
    trials: int | None = None  # seeded inputs at the given shapes; None: verify.default_trials
    force: bool = False  # write even when verification fails
    model: str | None = None  # "MODULE:CALLABLE" building the architecture of a state_dict / safetensors input
    model_args: tuple[tuple[str, Any], ...] = ()  # keyword arguments of `model` (parsed --model-arg key=value)
    deploy_model: str | None = None  # "MODULE:CALLABLE" building the user's own deploy-mode model
    deploy_model_args: tuple[tuple[str, Any], ...] = ()  # keyword arguments of `deploy_model`
    keymap: str | None = None  # convert: write the deploy-model key mapping (JSON) to this path
    # verification at other input shapes, each a shape set (one shape per input): None checks one other
    # spatial size of the other parity with batch + 1 where the model accepts it; () checks none
    verify_shapes: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    max_inflate_bytes: int | None = None  # bound: bytes tensors may declare beyond the file size (None: default)
    max_modules: int | None = None  # bound: modules a pickled model may hold (None: default)
    strict: bool = False  # convert: write nothing (NotFullyDeployed) unless every site fused and no norm is left
    static: bool = False  # .pt2 / .onnx: static shapes (default: dynamic batch and spatial dims where possible)
    opset: int | None = None  # .onnx: the ONNX opset (None: the exporter's default)
    quant_report: bool = False  # convert / verify: add the INT8 weight analysis (repfuse.quant) to the report
    strict_quant_db: float | None = None  # fail (QuantStrictFailed, exit 4) when a fused site's INT8 SQNR is below
