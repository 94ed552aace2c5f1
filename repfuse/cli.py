"""The `repfuse` command: parse flags, call one api function, render the result, map errors to exit codes.

This is the only module that prints (through `cli_output.Ui`): data (the human report, verdict
line first, or exactly one JSON object with --json, also on errors) on stdout; progress, warnings
and errors on stderr; GitHub Actions annotations and step summary when run there.

Exit codes:
    0    ok (convert: written and verified, or written with --force despite a failed verification)
    1    verification failed (convert: nothing written; verify: outputs differ)
    2    usage or input error: one `error:` line and one `hint:` line on stderr
    3    internal error (a bug in repfuse): `error: internal error: <type>: <message>`
    4    not fully deployed under --strict (a site skipped, a norm layer left, nothing fused), or a fused
         site's INT8 weight SQNR below --strict-quant DB; nothing written
    130  interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM): temporary files removed, OUT untouched
A closed stdout (`| head`) does not change the exit code. With REPFUSE_DEBUG=1 the Python traceback
is printed on stderr before the error lines.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from . import __version__, api
from . import cli_common as common
from . import report as rpt
from .cli_common import (
    EXIT_INTERNAL,
    EXIT_NOT_DEPLOYED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    AllowOpt,
    AtolOpt,
    DeployModelArgOpt,
    DeployModelOpt,
    InputShapeOpt,
    JsonOpt,
    MaxInflateOpt,
    MaxModulesOpt,
    ModelArgOpt,
    ModelOpt,
    OpsetOpt,
    QuietOpt,
    ReportOpt,
    RtolOpt,
    SeedOpt,
    StaticOpt,
    StrictOpt,
    ThreadsOpt,
    TrialsOpt,
    TrustOpt,
    VerboseOpt,
)
from .cli_output import Ui, UsageErrorGroup
from .cli_progress import progress_display
from .types import NotFullyDeployed, Options, QuantStrictFailed, RepfuseError, Report, VerificationFailed
from .verify import shape_sets

VerifyShapesOpt = Annotated[list[str] | None, typer.Option(
    "--verify-shapes", metavar="SHAPES", show_default=False,
    help="Also verify at these input shapes (repeatable; the shapes of several inputs separated by ';'), or "
    "'none' for --input-shape only. Default 'auto': one other size of the other parity with batch + 1, "
    "where the model runs on it.")]

QuantReportOpt = Annotated[bool, typer.Option(
    "--quant-report", help="Add INT8 weight-quantization figures per fused site (and per untouched layer) to the "
    "report: range spread, SQNR per tensor / per channel, worst channels and their cause.")]
StrictQuantOpt = Annotated[float | None, typer.Option(
    "--strict-quant", metavar="DB", show_default=False,
    help="Exit 4 (convert: nothing written) when a fused site's INT8 weight SQNR (per tensor, or of its median "
    "channel) is below DB dB, e.g. 30. Implies --quant-report; --strict alone never fails on it.")]


def _quant_options(options: Options, quant_report: bool, strict_quant: float | None) -> Options:
    """--quant-report / --strict-quant DB onto Options (DB: a finite number)."""
    if strict_quant is not None and not abs(strict_quant) < float("inf"):
        raise RepfuseError(f"--strict-quant must be a finite number of dB, got {strict_quant}",
                           "for example --strict-quant 30")
    return replace(options, quant_report=quant_report or strict_quant is not None, strict_quant_db=strict_quant)


def _quant_failed(report: Report, what: str) -> tuple[str, str]:
    q = report.quantization
    failures = q.failures if q is not None else ()
    shown = "; ".join(failures[:3]) + (f"; … {len(failures) - 3} more" if len(failures) > 3 else "")
    return (f"INT8 weights below --strict-quant ({len(failures)} site{'s' if len(failures) != 1 else ''}): {shown}",
            f"{what}; quantize those layers per channel or keep them in higher precision (see the quantization "
            "table); without --strict-quant the report lists the same and the exit code is 0")


_EXIT_CODES = ("Exit codes: 0 ok · 1 verification failed (nothing written) · 2 usage or input error · "
               "3 internal error · 4 not fully deployed under --strict (nothing written) · 130 interrupted "
               "(143 on SIGTERM).")


app = typer.Typer(
    name="repfuse",
    cls=UsageErrorGroup,
    help="Fuse re-parameterizable train-time branches (RepVGG, MobileOne, ACNet, DBB, ...) into one "
    "conv, from dataflow alone, and prove the result equal.",
    epilog=_EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no markup to swallow [onnx], no <bool> beside flags
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

parse_shape = common.parse_shape
build_options = common.build_options


def _run(command: str, *, as_json: bool, quiet: bool, verbose: bool,
         body: Callable[[common.Signals, Ui], int]) -> None:
    """Run a command body with SIGINT/SIGTERM turned into KeyboardInterrupt; map exceptions to
    one-line messages and exit codes; always exits."""
    ui = Ui(command, as_json=as_json, quiet=quiet, verbose=verbose)
    debug = os.environ.get("REPFUSE_DEBUG", "") not in ("", "0")
    signals = common.Signals()
    with signals.installed():
        try:
            code = body(signals, ui)
        except BaseException as e:
            code = _failure(ui, e, signals, debug)
    raise typer.Exit(code)


def _failure(ui: Ui, e: BaseException, signals: common.Signals, debug: bool) -> int:
    if isinstance(e, typer.Exit):
        return e.exit_code
    if signals.received is not None or common.interrupted_in(e):
        if debug:
            traceback.print_exc(file=sys.stderr)
        code = signals.exit_code()
        ui.fail("terminated" if code == common.EXIT_TERMINATED else "interrupted", "", code)
        return code
    if debug:
        traceback.print_exc(file=sys.stderr)
    if isinstance(e, RepfuseError):
        ui.fail(e.message, e.hint or "run the command with --help for usage", EXIT_USAGE)
        return EXIT_USAGE
    if not isinstance(e, Exception):
        raise e
    msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    ui.fail(f"internal error: {msg}", "rerun with REPFUSE_DEBUG=1 for the traceback and report it", EXIT_INTERNAL)
    return EXIT_INTERNAL


def _not_deployed(report: Report, what: str) -> tuple[str, str]:
    gaps = rpt.deployment_gaps(report)
    shown = "; ".join(gaps[:3]) + (f"; … {len(gaps) - 3} more" if len(gaps) > 3 else "")
    return (f"not fully deployed ({len(gaps)} reason{'s' if len(gaps) != 1 else ''}): {shown}",
            f"{what}; without --strict the report lists the same and the exit code is 0")


def _strict_exit(report: Report, strict: bool, what: str) -> tuple[int, tuple[str, str] | None]:
    if strict and rpt.deployment_gaps(report):
        return EXIT_NOT_DEPLOYED, _not_deployed(report, what)
    return EXIT_OK, None


# ---------------------------------------------------------------------------------------------
# commands


def _version(value: bool) -> None:
    if value:
        typer.echo(f"repfuse {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Fuse re-parameterizable branches into one conv and prove the result equal."""


KeymapOpt = Annotated[
    Path | None,
    typer.Option("--keymap", metavar="FILE.json", dir_okay=False, show_default=False,
                 help="With --deploy-model: also write the key mapping (deploy key → fused key) as JSON."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Write OUT even if verification fails (never with --strict).")]


@app.command(epilog="\b\nExample:\n  repfuse convert train.pt deploy.pt2 -s 1,3,224,224 --strict --report r.json\n\n"
             + _EXIT_CODES)
def convert(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Train-time checkpoint or pickled model.")],
    dst: Annotated[Path, typer.Argument(metavar="OUT", help="Where to write the deploy artifact.")],
    input_shape: InputShapeOpt = None,
    strict: StrictOpt = False,
    quant_report: QuantReportOpt = False,
    strict_quant: StrictQuantOpt = None,
    static: StaticOpt = False,
    opset: OpsetOpt = None,
    allow: AllowOpt = None,
    trust: TrustOpt = False,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = 0,
    trials: TrialsOpt = None,
    verify_shapes: VerifyShapesOpt = None,
    max_inflate: MaxInflateOpt = common.DEFAULT_MAX_INFLATE_MIB,
    max_modules: MaxModulesOpt = common.DEFAULT_MAX_MODULES,
    force: ForceOpt = False,
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    deploy_model: DeployModelOpt = None,
    deploy_model_arg: DeployModelArgOpt = None,
    keymap: KeymapOpt = None,
    report_path: ReportOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Fuse IN, verify the result numerically, and write the deploy artifact OUT.

    OUT's extension picks the format: .pt/.pth/.bin/.ckpt (torch.save: the deploy model),
    .safetensors (weights and metadata), .pt2 (torch.export program), .onnx (needs the extra
    repfuse[onnx]). .pt2 and .onnx have dynamic batch and spatial sizes where the model allows it."""

    def body(signals: common.Signals, ui: Ui) -> int:
        common.set_threads(threads)
        options = build_options(input_shape, allow, trust, atol, rtol, seed, trials, force, model=model,
                                model_arg=model_arg, deploy_model=deploy_model, deploy_model_arg=deploy_model_arg,
                                keymap=keymap, max_inflate=max_inflate, max_modules=max_modules, strict=strict,
                                static=static, opset=opset)
        options = replace(options, verify_shapes=shape_sets(verify_shapes, parse_shape))
        options = _quant_options(options, quant_report, strict_quant)
        common.existing_file(src, "input file")
        if common.same_path(src, dst):
            raise RepfuseError(f"OUT is the same file as IN: {dst}",
                               "choose a different OUT path; repfuse never overwrites its input")
        if dst.is_dir():
            raise RepfuseError(f"OUT is a directory: {dst}", "give OUT as a file path, e.g. model_deploy.pt")
        api.check_outputs(src, dst, options)
        common.check_keymap_path(keymap, dst)
        common.check_report_path(report_path, (src,), (dst, *([keymap] if keymap is not None else [])))

        code, error = EXIT_OK, None
        with progress_display(ui.err, quiet, signals) as progress:
            try:
                report = api.convert_file(src, dst, options, progress)
            except VerificationFailed as e:
                report, code = e.report, EXIT_VERIFY_FAILED
                v = report.verification
                why = v.message if v and v.message else "the fused model's outputs differ from the original's"
                error = (f"verification failed: {why}", f"nothing was written to {dst}; --force writes it anyway")
            except QuantStrictFailed as e:
                report, code = e.report, EXIT_NOT_DEPLOYED
                error = _quant_failed(report, f"nothing was written to {dst}")
            except NotFullyDeployed as e:
                report, code = e.report, EXIT_NOT_DEPLOYED
                error = _not_deployed(report, f"nothing was written to {dst}")
        v = report.verification
        if code == EXIT_OK and v is not None and not v.passed:  # only reachable with --force
            ui.warning(f"verification FAILED; {dst} was written anyway because of --force", "verification-forced")
        ui.result(report, code, error=error, report_path=report_path)
        return code

    _run("convert", as_json=as_json, quiet=quiet, verbose=verbose, body=body)


@app.command(epilog="\b\nExamples:\n  repfuse verify train.pt --strict\n"
             "  repfuse verify train.pt --against deploy.onnx --input-shape 1,3,224,224\n\n" + _EXIT_CODES)
def verify(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Checkpoint or pickled model.")],
    against: Annotated[
        Path | None,
        typer.Option("--against", metavar="OTHER", show_default=False,
                     help="Compare IN with this file instead of with IN fused in memory: any format convert "
                     "writes (.pt, .safetensors with --model, .pt2, .onnx)."),
    ] = None,
    input_shape: InputShapeOpt = None,
    strict: StrictOpt = False,
    quant_report: QuantReportOpt = False,
    strict_quant: StrictQuantOpt = None,
    allow: AllowOpt = None,
    trust: TrustOpt = False,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = 0,
    trials: TrialsOpt = None,
    verify_shapes: VerifyShapesOpt = None,
    max_inflate: MaxInflateOpt = common.DEFAULT_MAX_INFLATE_MIB,
    max_modules: MaxModulesOpt = common.DEFAULT_MAX_MODULES,
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    deploy_model: DeployModelOpt = None,
    deploy_model_arg: DeployModelArgOpt = None,
    report_path: ReportOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Check that fusing IN (or the file OTHER) gives the same outputs as IN. Writes no model.

    OTHER may be a whole model, a torch.export .pt2, an .onnx (needs onnxruntime), or a state_dict /
    .safetensors file: loaded into --deploy-model when given, else into repfuse's deploy model
    rebuilt from IN."""

    def body(signals: common.Signals, ui: Ui) -> int:
        common.set_threads(threads)
        options = build_options(input_shape, allow, trust, atol, rtol, seed, trials, model=model,
                                model_arg=model_arg, deploy_model=deploy_model, deploy_model_arg=deploy_model_arg,
                                max_inflate=max_inflate, max_modules=max_modules, strict=strict)
        options = replace(options, verify_shapes=shape_sets(verify_shapes, parse_shape))
        options = _quant_options(options, quant_report, strict_quant)
        common.existing_file(src, "input file")
        if against is not None:
            common.existing_file(against, "--against file")
        common.check_report_path(report_path, tuple(p for p in (src, against) if p is not None))

        with progress_display(ui.err, quiet, signals) as progress:
            try:
                report = api.verify_file(src, options, against, progress)
            except VerificationFailed as e:
                report = e.report
        report = replace(report, strict=strict)
        v = report.verification
        if v is None:
            raise RuntimeError("verification did not run")
        if not v.passed:
            why = v.message or "outputs differ beyond the tolerance"
            hint = ("check that OTHER was converted from IN (and the same --input-shape); loosen --atol/--rtol "
                    "only if the error is rounding" if against is not None else
                    "the report names the worst sites; loosen --atol/--rtol only if the error is rounding")
            code, error = EXIT_VERIFY_FAILED, (f"verification failed: {why}", hint)
        else:
            code, error = _strict_exit(report, strict, "verify writes nothing")
            if code == EXIT_OK and report.quantization is not None and report.quantization.failures:
                code, error = EXIT_NOT_DEPLOYED, _quant_failed(report, "verify writes nothing")
        ui.result(report, code, error=error, report_path=report_path)
        return code

    _run("verify", as_json=as_json, quiet=quiet, verbose=verbose, body=body)


@app.command(epilog="\b\nExamples:\n  repfuse inspect train.pt\n  repfuse inspect train.pt --depth 2\n\n"
             + _EXIT_CODES)
def inspect(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Checkpoint or pickled model.")],
    input_shape: InputShapeOpt = None,
    depth: Annotated[int | None, typer.Option("--depth", metavar="N", show_default=False,
                                              help="Show the module tree down to N levels below the root.")] = None,
    all_modules: Annotated[bool, typer.Option("--all", help="Show the whole module tree.")] = False,
    strict: StrictOpt = False,
    allow: AllowOpt = None,
    trust: TrustOpt = False,
    max_inflate: MaxInflateOpt = common.DEFAULT_MAX_INFLATE_MIB,
    max_modules: MaxModulesOpt = common.DEFAULT_MAX_MODULES,
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    report_path: ReportOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Show which blocks would be fused and why others would not (one line per block; the tree with
    --depth N or --all). Converts and writes nothing."""

    def body(signals: common.Signals, ui: Ui) -> int:
        common.set_threads(threads)
        if depth is not None and depth < 0:
            raise RepfuseError(f"--depth must be >= 0, got {depth}", "for example --depth 2")
        options = build_options(input_shape, allow, trust, model=model, model_arg=model_arg,
                                max_inflate=max_inflate, max_modules=max_modules)
        common.existing_file(src, "input file")
        common.check_report_path(report_path, (src,))
        with progress_display(ui.err, quiet, signals) as progress:
            report = replace(api.inspect_file(src, options, progress), strict=strict)
        code, error = _strict_exit(report, strict, "inspect writes nothing")
        ui.result(report, code, error=error, report_path=report_path, depth=depth, all_modules=all_modules)
        return code

    _run("inspect", as_json=as_json, quiet=quiet, verbose=verbose, body=body)


def main() -> None:
    """Entry point of the `repfuse` command and of `python -m repfuse`. Once the command is done (its
    files written and synced, its output flushed, exit handlers run), the process ends without tearing
    the interpreter down: freeing every object of torch, timm and the traced graphs one by one took
    1.5-2 s, longer than many conversions' own stages."""
    code = app(prog_name="repfuse", standalone_mode=False)
    code = code if isinstance(code, int) else 0
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(code)
