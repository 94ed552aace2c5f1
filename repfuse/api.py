"""The whole pipeline as library calls: load → find → fuse → verify → save. Never prints."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, rewrite, verify
from . import io as rio
from .types import (
    FusionSite,
    ModuleInfo,
    Options,
    RepfuseError,
    Report,
    SkippedSite,
    Summary,
    Verification,
    VerificationFailed,
)

Progress = Callable[[str], None]  # receives short stage messages ("tracing", "verifying", ...)


@dataclass
class FuseResult:
    """What `fuse` returns: the deploy model and everything the report needs."""

    model: nn.Module
    fused64: nn.Module  # the deploy model with float64 weights (for the exactness check)
    sites: list[FusionSite]
    skipped: list[SkippedSite]
    notes: dict[str, str]
    input_shapes: tuple[tuple[int, ...], ...]
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    def __init__(self, progress: Progress | None) -> None:
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[None]:
        if self.progress:
            self.progress(message)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)


def resolve_input_shapes(model: nn.Module, options: Options) -> tuple[tuple[int, ...], ...]:
    shapes = options.input_shapes or verify.infer_input_shapes(model)
    for s in shapes:
        if not s or any(d <= 0 for d in s):
            raise RepfuseError(f"invalid input shape {s}", "every dimension must be a positive integer")
    verify.check_runs(model, shapes, options.seed)
    return tuple(tuple(s) for s in shapes)


def fuse(model: nn.Module, options: Options, progress: Progress | None = None,
         clock: _Clock | None = None) -> FuseResult:
    """Fuse every linear sub-graph of `model` that is exactly one conv. `model` is left untouched.

    Analysis runs on a float64 copy; fused weights are computed in float64 and cast back to the
    dtype of the layers they replace.
    """
    clock = clock or _Clock(progress)
    model.eval()
    shapes = resolve_input_shapes(model, options)
    with clock.stage("trace", "tracing and analysing modules"):
        work = copy.deepcopy(model)
        dtypes = rewrite.original_dtypes(work)
        work.double()
        analysis = rewrite.analyse(work, verify.make_inputs(shapes, torch.float64, options.seed))
    with clock.stage("fuse", "fusing"):
        applied = rewrite.apply(work, analysis, dtypes, verify.model_dtype(model))
        fused64 = copy.deepcopy(applied.model)
        rewrite.restore_dtypes(applied.model, dtypes)
    return FuseResult(applied.model, fused64, applied.sites, analysis.skipped, analysis.notes, shapes,
                      clock.timings)


def _summary(original: nn.Module, fused: nn.Module, sites: list[FusionSite],
             shapes: tuple[tuple[int, ...], ...], seed: int) -> Summary:
    inputs = verify.make_inputs(shapes, verify.model_dtype(original), seed)
    convs_b, norms_b = rewrite.count_layers(original)
    convs_a, norms_a = rewrite.count_layers(fused)
    return Summary(
        fusions=len(sites),
        params_before=sum(p.numel() for p in original.parameters()),
        params_after=sum(p.numel() for p in fused.parameters()),
        macs_before=verify.count_macs(original, inputs),
        macs_after=verify.count_macs(fused, inputs),
        convs_before=convs_b, convs_after=convs_a, norms_before=norms_b, norms_after=norms_a,
    )


def _input_info(loaded: rio.LoadedCheckpoint) -> dict[str, Any]:
    return {"path": str(loaded.path), "sha256": loaded.sha256, "dtype": str(loaded.dtype).removeprefix("torch."),
            "container_key": loaded.key, "model_class": type(loaded.model).__qualname__}


def _tool() -> dict[str, str]:
    return {"name": "repfuse", "version": __version__, "torch": torch.__version__}


def _site_errors(result: FuseResult) -> list[tuple[str, float]]:
    return [(s.module, s.max_abs_error or 0.0) for s in result.sites]


def _load(src: Path, options: Options, clock: _Clock) -> rio.LoadedCheckpoint:
    with clock.stage("load", f"loading {src}"):
        return rio.load_checkpoint(src, allow=options.allow, trust=options.trust)


def _warnings(result: FuseResult) -> tuple[str, ...]:
    return tuple(f"{path or '<root>'}: {note}; its children were analysed on their own"
                 for path, note in result.notes.items())


def convert_file(src: Path, dst: Path, options: Options, progress: Progress | None = None) -> Report:
    """Load `src`, fuse, verify, write `dst` atomically. Raises RepfuseError (bad input) or
    VerificationFailed (nothing written unless options.force)."""
    src, dst = Path(src), Path(dst)
    clock = _Clock(progress)
    loaded = _load(src, options, clock)
    result = fuse(loaded.model, options, progress, clock)
    with clock.stage("verify", "verifying on random inputs"):
        ver = verify.compare(loaded.model, result.model, result.input_shapes, atol=options.atol,
                             rtol=options.rtol, trials=options.trials, seed=options.seed,
                             worst_sites=_site_errors(result), fused64=result.fused64)
    summary = _summary(loaded.model, result.model, result.sites, result.input_shapes, options.seed)
    report = Report(tool=_tool(), command="convert", input=_input_info(loaded), output=None,
                    fusions=tuple(result.sites), skipped=tuple(result.skipped), summary=summary,
                    verification=ver, timings=clock.timings, warnings=_warnings(result))
    if not ver.passed and not options.force:
        raise VerificationFailed(report)
    with clock.stage("save", f"writing {dst}"):
        digest = rio.save_checkpoint(loaded, result.model, dst)
        _check_saved(dst, loaded, result.model, result.input_shapes, options.seed)
    output = {"path": str(dst), "sha256": digest, "format": "pt", "verified": ver.passed}
    return Report(tool=report.tool, command="convert", input=report.input, output=output,
                  fusions=report.fusions, skipped=report.skipped, summary=summary, verification=ver,
                  timings=clock.timings, warnings=report.warnings)


def _check_saved(dst: Path, loaded: rio.LoadedCheckpoint, model: nn.Module,
                 shapes: tuple[tuple[int, ...], ...], seed: int) -> None:
    """Load the written file back (same allow-list, no trust) and check it computes what we wrote."""
    again = rio.load_checkpoint(dst, allow=loaded.allow, trust=loaded.trust)
    x = verify.make_inputs(shapes, loaded.dtype, seed)
    a, b = verify.run(model, x), verify.run(again.model.eval(), x)
    if len(a) != len(b) or any(not torch.equal(p, q) for p, q in zip(a, b)):
        dst.unlink(missing_ok=True)
        raise RepfuseError(f"{dst} does not reproduce the converted model after loading it back",
                           "this is a bug in repfuse; please report it with REPFUSE_DEBUG=1 output")


def verify_file(src: Path, options: Options, against: Path | None = None,
                progress: Progress | None = None) -> Report:
    """Fuse in memory and verify (or compare `src` with `against`); writes nothing.
    Returns the report; report.verification.passed tells the outcome."""
    src = Path(src)
    clock = _Clock(progress)
    loaded = _load(src, options, clock)
    if against is None:
        result = fuse(loaded.model, options, progress, clock)
        with clock.stage("verify", "verifying on random inputs"):
            ver = verify.compare(loaded.model, result.model, result.input_shapes, atol=options.atol,
                                 rtol=options.rtol, trials=options.trials, seed=options.seed,
                                 worst_sites=_site_errors(result), fused64=result.fused64)
        summary = _summary(loaded.model, result.model, result.sites, result.input_shapes, options.seed)
        return Report(tool=_tool(), command="verify", input=_input_info(loaded), output=None,
                      fusions=tuple(result.sites), skipped=tuple(result.skipped), summary=summary,
                      verification=ver, timings=clock.timings, warnings=_warnings(result))
    other = _load(Path(against), options, clock)
    loaded.model.eval()
    other.model.eval()
    shapes = resolve_input_shapes(loaded.model, options)
    verify.check_runs(other.model, shapes, options.seed)
    with clock.stage("verify", f"comparing with {against}"):
        ver = _compare_against(loaded.model, other.model, shapes, options)
    summary = _summary(loaded.model, other.model, [], shapes, options.seed)
    return Report(tool=_tool(), command="verify", input=_input_info(loaded),
                  output={"against": _input_info(other)}, fusions=(), skipped=(), summary=summary,
                  verification=ver, timings=clock.timings)


def _compare_against(model: nn.Module, other: nn.Module, shapes: tuple[tuple[int, ...], ...],
                     options: Options) -> Verification:
    """Two checkpoints (e.g. a deploy file and its training checkpoint) on the same inputs.

    The float64 figure compares both models upcast; it is only ~exact when `other` holds float64
    weights, so here the pass/fail decision is made in the models' own dtype alone."""
    ver = verify.compare(model, other, shapes, atol=options.atol, rtol=options.rtol, trials=options.trials,
                         seed=options.seed, exact=False)
    return ver


def inspect_file(src: Path, options: Options, progress: Progress | None = None) -> Report:
    """Find the sites that would be fused and why others would not; no verification, nothing written.
    report.modules holds the module tree."""
    src = Path(src)
    clock = _Clock(progress)
    loaded = _load(src, options, clock)
    result = fuse(loaded.model, options, progress, clock)
    summary = _summary(loaded.model, result.model, result.sites, result.input_shapes, options.seed)
    modules = _module_tree(loaded.model, result)
    return Report(tool=_tool(), command="inspect", input=_input_info(loaded), output=None,
                  fusions=tuple(result.sites), skipped=tuple(result.skipped), summary=summary,
                  verification=None, timings=clock.timings, warnings=_warnings(result), modules=modules)


def _module_tree(model: nn.Module, result: FuseResult) -> tuple[ModuleInfo, ...]:
    """The original module tree, each module annotated with what fusion would do to it."""
    notes: dict[str, list[str]] = {}
    existing = {path for path, _ in model.named_modules()}
    for site in result.sites:
        for leaf in site.branches:
            notes.setdefault(leaf, []).append(f"folded into {site.module}")
        if site.module in existing or site.module == "<root>":  # the module itself becomes the layer
            notes.setdefault("" if site.module == "<root>" else site.module, []).append(
                f"becomes one layer: {site.pattern}")
        else:  # a new layer inside a rewritten module
            owner, _, name = site.module.rpartition(".")
            notes.setdefault(owner, []).append(f"new layer '{name}': {site.pattern}")
    for s in result.skipped:
        notes.setdefault(s.module, []).append(f"skipped: {s.reason}")
    for path, note in result.notes.items():
        notes.setdefault(path, []).append(f"opaque: {note}")
    rows = []
    for path, m in model.named_modules():
        params = sum(p.numel() for p in m.parameters(recurse=False))
        rows.append(ModuleInfo(path, type(m).__name__, params, "; ".join(dict.fromkeys(notes.get(path, [])))))
    known = {r.path for r in rows}
    for path, ns in notes.items():  # sites named after graph nodes rather than modules
        if path not in known:
            rows.append(ModuleInfo(path, "(node)", 0, "; ".join(dict.fromkeys(ns))))
    return tuple(rows)
