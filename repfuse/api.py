"""The whole pipeline as library calls: load → find → fuse → verify → save. Never prints."""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import (
    __version__,
    artifact,
    export,
    factory,
    input_size,
    keymap,
    leftovers,
    programs,
    quant,
    rewrite,
    verify,
    weights,
)
from . import io as rio
from . import report as rpt
from .artifact import Deployed
from .types import (
    Diagnostic,
    FusionSite,
    ModuleInfo,
    NotFullyDeployed,
    Options,
    QuantStrictFailed,
    RepfuseError,
    Report,
    SkippedSite,
    Summary,
    Verification,
    VerificationFailed,
)

Progress = Callable[[str], None]  # receives short messages ("tracing and analysing modules", ...), as `Step`s


class Step(str):
    """A progress message. Still a plain str (so any callable of one argument can be the progress), with
    what a display needs: the stage, modules done / total while they are analysed, and once a stage has
    finished the seconds it took (the same message, sent again)."""

    stage: str
    done: int | None
    total: int | None
    seconds: float | None

    def __new__(cls, message: str, stage: str, done: int | None = None, total: int | None = None,
                seconds: float | None = None) -> Step:
        step = super().__new__(cls, message)
        step.stage, step.done, step.total, step.seconds = stage, done, total, seconds
        return step


@dataclass
class FuseResult:
    """What `fuse` returns: the deploy model and everything the report needs."""

    model: nn.Module
    fused64: nn.Module | None  # the deploy model with float64 weights (for the exactness check)
    sites: list[FusionSite]
    skipped: list[SkippedSite]
    notes: dict[str, str]
    input_shapes: tuple[tuple[int, ...], ...]
    timings: dict[str, float] = field(default_factory=dict)
    input_source: str = "--input-shape"  # where the input size came from (input_size.InputSize.source)
    input_guessed: bool = False  # nothing recorded it: guessed from the first layer
    extra_shapes: tuple[tuple[tuple[int, ...], ...], ...] | None = None  # verified besides (None: not chosen)
    analysed_at: tuple[tuple[int, ...], ...] = ()  # the input shapes of the analysis's recorded forward
    analysed_seed: int = 0  # the seed of its inputs
    runs: verify.Runs = field(default_factory=verify.Runs)  # forwards the verification can reuse


class _Clock:
    def __init__(self, progress: Progress | None) -> None:
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[None]:
        if self.progress:
            self.progress(Step(message, name))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)
        if self.progress:
            self.progress(Step(message, name, seconds=time.perf_counter() - start))

    def count(self, name: str, message: str) -> Callable[[int, int], None] | None:
        """A callback for `done` of `total` work items of the stage running now (None without progress)."""
        progress = self.progress
        if progress is None:
            return None
        return lambda done, total: progress(Step(message, name, done, total))


def resolve_input_size(model: nn.Module, options: Options, runs: verify.Runs | None = None) -> input_size.InputSize:
    """options.input_shapes, else the model's metadata, else a guess (see `input_size`); checked to run
    (that run is kept in `runs`: it is the verification's trial 0)."""
    if options.input_shapes:
        size = input_size.InputSize(tuple(tuple(s) for s in options.input_shapes), "--input-shape", False)
    else:
        size = input_size.infer(model)
    for s in size.shapes:
        if not s or any(d <= 0 for d in s):
            raise RepfuseError(f"invalid input shape {s}", "every dimension must be a positive integer")
    verify.check_runs(model, size.shapes, options.seed, runs)
    return size


def resolve_input_shapes(model: nn.Module, options: Options) -> tuple[tuple[int, ...], ...]:
    return resolve_input_size(model, options).shapes


def fuse(model: nn.Module, options: Options, progress: Progress | None = None,
         clock: _Clock | None = None, references: bool = False) -> FuseResult:
    """Fuse every linear sub-graph of `model` that is exactly one conv. `model` is left untouched.

    Analysis runs on a float64 copy; fused weights are computed in float64 and cast back to the
    dtype of the layers they replace. With `references`, the original's float64 outputs that the
    verification compares with are run on that copy too, before it becomes the fused twin (kept in
    the result's `runs`).
    """
    clock = clock or _Clock(progress)
    model.eval()
    options = with_trials(options, model)
    runs = verify.Runs()
    size = resolve_input_size(model, options, runs)
    shapes = size.shapes
    extra = _extra_shapes(model, shapes, options, runs)
    at, seed = _analysis_run(shapes, extra, options)
    with clock.stage("trace", "tracing and analysing modules"):
        work, dtypes = rewrite.float64_copy(model)
        with verify.seeded(work, seed):
            analysis = rewrite.analyse(work, verify.make_inputs(at, torch.float64, seed), dtypes,
                                       clock.count("trace", "analysing modules"))
        recorded = analysis.records.get(id(work))
        if recorded is not None and recorded.output is not None:  # the original's float64 run at `at`
            runs.put(model, at, seed, recorded.output, float64=True)
    if references:
        with clock.stage("verify", "running the original in float64"):
            for shape_set, trial_seed in _exact_runs(shapes, extra, options):
                if (shape_set, trial_seed) != (at, seed):
                    with verify.seeded(work, trial_seed):
                        out = rewrite.float64_forward(work, verify.make_inputs(shape_set, torch.float64, trial_seed),
                                                      dtypes)
                    runs.put(model, shape_set, trial_seed, out, float64=True)
    with clock.stage("fuse", "fusing"):
        applied = rewrite.apply(work, analysis, dtypes, verify.model_dtype(model))
        analysis.records, analysis.plans, analysis.leaves = {}, {}, {}  # activations, graphs, ops: done with
        _collect(model)  # traced graphs hold reference cycles: free what they held before the deploy copy
        fused64 = applied.model
        deploy = rewrite.cast_copy(fused64, dtypes)
    skipped = leftovers.live_skips(analysis.skipped, applied.sites, applied.model)
    skipped += leftovers.norms_left(applied.model, skipped, analysis.notes)
    return FuseResult(deploy, fused64, applied.sites, skipped, analysis.notes, shapes,
                      clock.timings, size.source, size.guessed, tuple(extra), at, seed, runs)


COLLECT_BYTES = 256 << 20  # a model this large gets an explicit garbage collection where big cycles die


def with_trials(options: Options, model: nn.Module, exact: bool = True) -> Options:
    """`options` with its number of trials settled: the user's, else `verify.default_trials` for the model's dtype."""
    if options.trials is not None:
        return options
    return replace(options, trials=verify.default_trials(verify.model_dtype(model), exact))


@contextmanager
def _collector_spared() -> Iterator[Callable[[], None]]:
    """Python's cyclic collector kept off the objects alive now (torch's, the loaded model's) while the
    pipeline runs (`gc.freeze`), and given them back on exit (`gc.unfreeze`): each full collection would
    rescan them all (1.0 s of a 14 s RepVGG-B3 conversion). What the pipeline makes is collected as usual.
    Yields a callable that spares what was made since (the loaded model, the classes it imported). Nothing
    is done where the caller froze objects itself or turned the collector off."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield lambda: None
        return
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()


def _collect(model: nn.Module) -> None:
    """gc.collect() (a few tenths of a second with torch loaded) where the model is large enough for what it
    frees to matter to peak memory."""
    if sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) >= COLLECT_BYTES:
        gc.collect()


def _extra_shapes(model: nn.Module, shapes: tuple[tuple[int, ...], ...], options: Options,
                  runs: verify.Runs) -> list[tuple[tuple[int, ...], ...]]:
    """The shape sets verified besides `shapes`: --verify-shapes, else one the original runs on (see
    verify.extra_shapes; that run is kept in `runs`)."""
    if options.verify_shapes is not None:
        return [tuple(tuple(s) for s in e) for e in options.verify_shapes]
    return verify.extra_shapes(model, shapes, options.seed + options.trials, runs)[0]


def _analysis_run(shapes: tuple[tuple[int, ...], ...], extra: list[tuple[tuple[int, ...], ...]],
                  options: Options) -> tuple[tuple[tuple[int, ...], ...], int]:
    """(shapes, seed) of the analysis's recorded forward: the cheapest of the runs the verification checks
    for exactness (fewest input elements; the given shapes on a tie). Fusion is shape-generic (DESIGN §3),
    the recorded values are its witness, and the verification checks every shape set end to end, so the
    analysis need not run at the largest one; its float64 forward is then that shape set's reference."""
    return min(_exact_runs(shapes, extra, options), key=lambda run: sum(math.prod(s) for s in run[0]))


def _exact_runs(shapes: tuple[tuple[int, ...], ...], extra: list[tuple[tuple[int, ...], ...]],
                options: Options) -> list[tuple[tuple[tuple[int, ...], ...], int]]:
    """(shapes, seed) of every run the verification checks for exactness."""
    return [(s, seed) for s, seed, checked in verify.trial_runs(shapes, extra, options.trials, options.seed)
            if checked]


def _summary(original: nn.Module, fused: nn.Module, sites: list[FusionSite],
             shapes: tuple[tuple[int, ...], ...], seed: int, runs: verify.Runs | None = None) -> Summary:
    inputs = verify.make_inputs(shapes, verify.model_dtype(original), seed)
    before, after = leftovers.count_kinds(original), leftovers.count_kinds(fused)

    def macs(model: nn.Module) -> int | None:  # counted on the verification's trial 0 where it ran
        counted = runs.macs(model, shapes, seed) if runs is not None else verify.UNCOUNTED
        return verify.count_macs(model, inputs) if counted is verify.UNCOUNTED else counted

    return Summary(
        fusions=len(sites),
        params_before=sum(p.numel() for p in original.parameters()),
        params_after=sum(p.numel() for p in fused.parameters()),
        macs_before=macs(original),
        macs_after=macs(fused),
        convs_before=before["convs"], convs_after=after["convs"], linears_before=before["linears"],
        linears_after=after["linears"], norms_before=before["norms"], norms_after=after["norms"],
    )


def _input_info(loaded: rio.LoadedCheckpoint) -> dict[str, Any]:
    info: dict[str, Any] = {
        "path": str(loaded.path), "sha256": loaded.sha256, "dtype": str(loaded.dtype).removeprefix("torch."),
        "container_key": loaded.key, "model_class": type(loaded.model).__qualname__,
        "kind": loaded.kind, "format": loaded.file_format,
    }
    with contextlib.suppress(OSError):
        info["size_bytes"] = loaded.path.stat().st_size
    if loaded.factory is not None:
        info["factory"] = loaded.factory
        info["factory_args"] = dict(loaded.factory_args)
    if loaded.prefix:
        info["prefix_stripped"] = loaded.prefix
    return info


def _tool() -> dict[str, str]:
    return {"name": "repfuse", "version": __version__, "torch": torch.__version__}


def _site_errors(result: FuseResult) -> list[tuple[str, float]]:
    return [(s.module, s.max_abs_error or 0.0) for s in result.sites]


def limits(options: Options) -> rio.Limits:
    """The loading bounds of `options` (--max-inflate, --max-modules); the defaults where unset."""
    bounds = {k: v for k, v in (("max_inflate_bytes", options.max_inflate_bytes),
                                ("max_modules", options.max_modules)) if v is not None}
    return replace(rio.Limits(), **bounds)


def _load(src: Path, options: Options, clock: _Clock) -> rio.LoadedCheckpoint:
    """The train-time model: a whole pickled model, or a state_dict put into the --model factory.
    Weights with NaN or Inf are refused here."""
    with clock.stage("load", f"loading {src}"):
        if options.model:
            return weights.load_into_factory(src, options.model, options.model_args, allow=options.allow,
                                             trust=options.trust, limits=limits(options))
        loaded = rio.load_checkpoint(src, allow=options.allow, trust=options.trust, limits=limits(options))
        weights.check_finite(weights.model_tensors(loaded.model), src.name)
        return loaded


def _diagnostics(result: FuseResult) -> tuple[Diagnostic, ...]:
    """Untraceable modules (a warning only where a norm layer is left beneath them; else a note),
    and a guessed input size."""
    out = []
    modules = dict(result.model.named_modules())
    for path, note in result.notes.items():
        sub = modules.get(path, result.model if not path else None)
        left = rewrite.count_layers(sub)[1] if sub is not None else 1
        level = "warning" if left else "info"
        tail = (f"; {left} norm layer{'s' if left != 1 else ''} left beneath it" if left
                else "; everything beneath it was fused or needs no fusing")
        out.append(Diagnostic("untraced-module", f"{path or '<root>'}: {note}; its children were analysed on "
                              f"their own{tail}", level, path))
    if result.input_guessed:
        out.append(Diagnostic("input-shape-guessed", f"input size {result.input_source} (the model records none): "
                              "verification and exports use it; pass --input-shape, e.g. --input-shape 1,3,224,224"))
    return tuple(out)


def check_outputs(src: Path, dst: Path, options: Options) -> str:
    """Everything about the outputs that can be refused before any work: OUT's format (and its
    optional packages), OUT equal to IN, a missing directory, the --keymap path. Returns the format."""
    fmt = export.output_format(dst)
    export.check_available(fmt)
    rio.check_destination(dst, src)
    if options.keymap is not None:
        path = Path(options.keymap)
        if not options.deploy_model:
            raise RepfuseError("--keymap needs --deploy-model", "the key map pairs repfuse's fused layers with "
                               "the layers of your deploy model: pass --deploy-model MODULE:CALLABLE")
        if path.suffix.lower() != ".json":
            raise RepfuseError(f"--keymap {path} must be a .json file", "for example --keymap keymap.json")
        rio.check_destination(path, src)
    return fmt


def map_to_deploy_model(result: FuseResult, dtype: torch.dtype, options: Options) -> Deployed:
    """Build the user's --deploy-model, map the fused weights onto it by structure (keymap), and
    load them strictly. RepfuseError naming the layer where the mapping fails."""
    if not options.deploy_model:
        return Deployed(result.model, result.fused64)
    user = factory.build_model(options.deploy_model, options.deploy_model_args, "--deploy-model")
    user = user.to(dtype).eval()
    inputs = verify.make_inputs(result.input_shapes, dtype, options.seed)
    km = keymap.map_to_deploy(user, result.model, inputs)
    user.load_state_dict(km.state_dict, strict=True)
    # the float64 twin: the same mapping applied to the fused model's float64 weights
    f64 = result.fused64.state_dict() if result.fused64 is not None else {}
    user64: nn.Module | None = None
    if f64 and all(v in f64 for v in km.mapping.values()):
        user64 = copy.deepcopy(user).double()
        state64 = {k: (f64[km.mapping[k]] if k in km.mapping else torch.zeros_like(t))
                   for k, t in user64.state_dict().items()}
        user64.load_state_dict(state64, strict=True)
    return Deployed(user, user64, km, options.deploy_model)


def _fuse_and_verify(loaded: rio.LoadedCheckpoint, options: Options, command: str, clock: _Clock,
                     progress: Progress | None) -> tuple[Report, FuseResult, Deployed]:
    """fuse → verify (→ map onto --deploy-model → verify that). The report has output=None."""
    options = with_trials(options, loaded.model)
    result = fuse(loaded.model, options, progress, clock, references=True)
    with clock.stage("verify", "verifying on random inputs"):
        ver = verify.compare(loaded.model, result.model, result.input_shapes, atol=options.atol,
                             rtol=options.rtol, trials=options.trials, seed=options.seed,
                             worst_sites=_site_errors(result), fused64=result.fused64,
                             extra=result.extra_shapes, runs=result.runs)
    summary = _summary(loaded.model, result.model, result.sites, result.input_shapes, options.seed, result.runs)
    report = Report(tool=_tool(), command=command,
                    input={**_input_info(loaded), "input_shape_source": result.input_source}, output=None,
                    fusions=tuple(result.sites), skipped=tuple(result.skipped), summary=summary,
                    verification=ver, timings=clock.timings, diagnostics=_diagnostics(result))
    report = _quantization(report, loaded.model, result, options, clock)
    deployed = Deployed(result.model, result.fused64)
    if options.deploy_model and (ver.passed or options.force):
        with clock.stage("map", f"mapping the fused weights onto {options.deploy_model}"):
            deployed = map_to_deploy_model(result, loaded.dtype, options)
        with clock.stage("verify", f"verifying {options.deploy_model} with the mapped weights"):
            mapped = verify.compare(loaded.model, deployed.model, result.input_shapes, atol=options.atol,
                                    rtol=options.rtol, trials=options.trials, seed=options.seed,
                                    worst_sites=_site_errors(result), fused64=deployed.model64,
                                    exact=deployed.model64 is not None, extra=result.extra_shapes,
                                    runs=result.runs)
        report = replace(report, verification=mapped if ver.passed else ver)
    return report, result, deployed


def _quantization(report: Report, original: nn.Module, result: FuseResult, options: Options,
                  clock: _Clock) -> Report:
    """With options.quant_report or options.strict_quant_db: the INT8 weight analysis of repfuse's deploy
    model (`quant.report`: every fused site, with causes from `original`, and the untouched layers; the
    end-to-end output SQNR on the verification inputs), its warnings added to the diagnostics."""
    if not options.quant_report and options.strict_quant_db is None:
        return report
    with clock.stage("quant", "analysing INT8 weight quantization"):
        inputs = verify.make_inputs(result.input_shapes, torch.float32, options.seed)
        q = quant.report(result.model, result.sites, original, inputs, options.strict_quant_db)
    return replace(report, quantization=q, diagnostics=(*report.diagnostics, *quant.diagnostics(q)))


def convert_file(src: Path, dst: Path, options: Options, progress: Progress | None = None) -> Report:
    """Load `src`, fuse, verify, write `dst` atomically in the format its suffix names (.pt,
    .safetensors, .pt2, .onnx), loading the written file back to check it. With
    options.deploy_model the fused weights are mapped onto the user's deploy model first, verified
    again, and written under its key names (options.keymap: the mapping as JSON).

    Raises RepfuseError (bad input: before any work where it can), VerificationFailed (nothing
    written unless options.force) or, with options.strict, NotFullyDeployed (nothing written)."""
    src, dst = Path(src), Path(dst)
    fmt = check_outputs(src, dst, options)
    with _collector_spared() as spare:
        clock = _Clock(progress)
        loaded = _load(src, options, clock)
        spare()
        return _convert_loaded(loaded, dst, fmt, options, clock, progress)


def _convert_loaded(loaded: rio.LoadedCheckpoint, dst: Path, fmt: str, options: Options, clock: _Clock,
                    progress: Progress | None) -> Report:
    options = with_trials(options, loaded.model)
    report, result, deployed = _fuse_and_verify(loaded, options, "convert", clock, progress)
    deployed = replace(deployed, model64=None)  # the float64 twins served the verification: not kept to the end
    result = replace(result, fused64=None)
    _collect(loaded.model)  # modules hold reference cycles: free the twin's memory now, not at a later collection
    report = replace(report, strict=options.strict)
    if not report.verification or (not report.verification.passed and not options.force):
        raise VerificationFailed(report)
    gaps = rpt.deployment_gaps(report)
    if options.strict and gaps:
        raise NotFullyDeployed(replace(report, timings=clock.timings), tuple(gaps))
    if report.quantization is not None and report.quantization.failures:
        raise QuantStrictFailed(replace(report, timings=clock.timings), report.quantization.failures)
    weights.check_finite(weights.model_tensors(deployed.model), "the converted model",
                         f"a fused weight overflows {str(loaded.dtype).removeprefix('torch.')}; nothing was written "
                         "(convert a float32 copy of the checkpoint instead)")
    inputs = verify.make_inputs(result.input_shapes, loaded.dtype, options.seed)
    # the written file must reproduce the deploy model on the cheapest run the verification made with it
    at, seed = result.analysed_at, result.analysed_seed
    with clock.stage("save", f"writing {dst}"):
        reference = result.runs.get(deployed.model, at, seed)
        output = artifact.write(fmt, dst, loaded, deployed, report, inputs, limits(options), options,
                                verify.flat_outputs(reference), (verify.make_inputs(at, loaded.dtype, seed), seed))
        if options.keymap is not None and deployed.keymap is not None:
            text = deployed.keymap.to_json().encode("utf-8")
            output["keymap"] = {"path": str(options.keymap),
                                "sha256": rio.atomic_write(Path(options.keymap), lambda tmp: tmp.write_bytes(text))}
    output = {"path": str(dst), **output, "format": fmt, "verified": report.verification.passed}
    with contextlib.suppress(OSError):
        output["size_bytes"] = dst.stat().st_size
    return replace(report, output=output, timings=clock.timings)


def verify_file(src: Path, options: Options, against: Path | None = None,
                progress: Progress | None = None) -> Report:
    """Fuse in memory and verify (or compare `src` with `against`); writes nothing.
    Returns the report; report.verification.passed tells the outcome.

    With options.deploy_model, the fused weights are also mapped onto the user's deploy model and
    that is verified. `against` may be a whole-model checkpoint, or a state_dict / .safetensors
    file: loaded into options.deploy_model when given, else into repfuse's deploy model rebuilt
    from `src`."""
    src = Path(src)
    with _collector_spared() as spare:
        clock = _Clock(progress)
        loaded = _load(src, options, clock)
        spare()
        return _verify_loaded(loaded, options, against, clock, progress)


def _verify_loaded(loaded: rio.LoadedCheckpoint, options: Options, against: Path | None, clock: _Clock,
                   progress: Progress | None) -> Report:
    if against is None:
        report, _, _ = _fuse_and_verify(loaded, options, "verify", clock, progress)
        return replace(report, timings=clock.timings)
    options = with_trials(options, loaded.model, exact=False)
    other = _load_against(Path(against), loaded, options, progress, clock)
    loaded.model.eval()
    other.model.eval()
    size = resolve_input_size(loaded.model, options)
    shapes = size.shapes
    verify.check_runs(other.model, shapes, options.seed)
    if isinstance(other.model, programs.OnnxModule) and options.verify_shapes is None:
        options = replace(options, verify_shapes=())  # no autograd in onnxruntime: the given shapes only
    with clock.stage("verify", f"comparing with {against}"):
        ver = _compare_against(loaded.model, other.model, shapes, options)
    summary = _summary(loaded.model, other.model, [], shapes, options.seed)
    diagnostics = ((Diagnostic("input-shape-guessed", f"input size {size.source} (the model records none): pass "
                               "--input-shape, e.g. --input-shape 1,3,224,224"),) if size.guessed else ())
    return Report(tool=_tool(), command="verify", input={**_input_info(loaded), "input_shape_source": size.source},
                  output={"against": _input_info(other)}, fusions=(), skipped=(), summary=summary,
                  verification=ver, timings=clock.timings, diagnostics=diagnostics)


def _load_against(path: Path, loaded: rio.LoadedCheckpoint, options: Options, progress: Progress | None,
                  clock: _Clock) -> rio.LoadedCheckpoint:
    """`verify --against`: a whole model, a .pt2 / .onnx program, or weights put into the deploy
    structure they belong to."""
    fmt = programs.program_format(path)
    if fmt is not None:
        with clock.stage("load", f"loading {path}"):
            module, digest = programs.load_program(path, fmt, trust=options.trust)
        return rio.LoadedCheckpoint(path=path, model=module, container=None, key=None, sha256=digest,
                                    dtype=loaded.dtype, allow=loaded.allow, trust=loaded.trust, file_format=fmt)
    with clock.stage("load", f"loading {path}"):
        obj, digest, fmt = weights.read_weights(path, allow=options.allow, trust=options.trust,
                                                limits=limits(options))
        model, key = rio.find_model(obj)
        if model is not None and not options.deploy_model:
            weights.check_finite(weights.model_tensors(model), path.name)
            return rio.LoadedCheckpoint(path=path, model=model, container=obj, key=key, sha256=digest,
                                        dtype=verify.model_dtype(model), allow=loaded.allow, trust=loaded.trust,
                                        file_format=fmt)
        state, key = weights.find_state_dict(obj, path)
        weights.check_finite(state.items(), path.name)
    if options.deploy_model:
        spec = options.deploy_model
        target = factory.build_model(spec, options.deploy_model_args, "--deploy-model")
    else:  # repfuse's own deploy structure, rebuilt by fusing IN again
        spec = "repfuse (rebuilt from IN)"
        target = fuse(loaded.model, options, progress, clock).model
    state, prefix = weights.strip_prefix(state, target.state_dict().keys())
    weights.fit_state_dict(target, state, path.name, spec)
    return rio.LoadedCheckpoint(path=path, model=target.eval(), container=obj, key=key, sha256=digest,
                                dtype=verify.model_dtype(target), allow=loaded.allow, trust=loaded.trust,
                                kind="state_dict", file_format=fmt, prefix=prefix, factory=spec,
                                factory_args=options.deploy_model_args if options.deploy_model else ())


def _compare_against(model: nn.Module, other: nn.Module, shapes: tuple[tuple[int, ...], ...],
                     options: Options) -> Verification:
    """Two checkpoints (e.g. a deploy file and its training checkpoint) on the same inputs.

    The float64 figure compares both models upcast; it is only ~exact when `other` holds float64
    weights, so here the pass/fail decision is made in the models' own dtype alone."""
    ver = verify.compare(model, other, shapes, atol=options.atol, rtol=options.rtol, trials=options.trials,
                         seed=options.seed, exact=False, extra=options.verify_shapes)
    return ver


def inspect_file(src: Path, options: Options, progress: Progress | None = None) -> Report:
    """Find the sites that would be fused and why others would not; no verification, nothing written.
    report.modules holds the module tree."""
    src = Path(src)
    with _collector_spared() as spare:
        clock = _Clock(progress)
        loaded = _load(src, options, clock)
        spare()
        result = fuse(loaded.model, options, progress, clock)
        summary = _summary(loaded.model, result.model, result.sites, result.input_shapes, options.seed)
    modules = _module_tree(loaded.model, result)
    return Report(tool=_tool(), command="inspect",
                  input={**_input_info(loaded), "input_shape_source": result.input_source}, output=None,
                  fusions=tuple(result.sites), skipped=tuple(result.skipped), summary=summary,
                  verification=None, timings=clock.timings, diagnostics=_diagnostics(result), modules=modules)


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
