"""The `repfuse` command: parse flags, call one api function, render the report, map errors to exit codes.

This is the only module that prints. Data (the rich report, or JSON with --json) goes to stdout;
progress, warnings and errors go to stderr.

Exit codes:
    0    ok (convert: written and verified, or written with --force despite a failed verification)
    1    verification failed (convert: nothing written; verify: outputs differ)
    2    usage or input error: one `error:` line and one `hint:` line on stderr
    3    internal error (a bug in repfuse): `error: internal error: <type>: <message>`
    130  interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM): temporary files removed, OUT untouched
With REPFUSE_DEBUG=1 the Python traceback is printed on stderr before the error lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from . import __version__, api
from . import cli_common as common
from . import report as rpt
from .cli_common import (
    EXIT_INTERNAL,
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
    QuietOpt,
    ReportOpt,
    RtolOpt,
    SeedOpt,
    TrialsOpt,
    TrustOpt,
)
from .types import RepfuseError, Report, VerificationFailed
from .verify import shape_sets

VerifyShapesOpt = Annotated[list[str] | None, typer.Option(
    "--verify-shapes", metavar="SHAPES", show_default=False,
    help="Also verify at these input shapes (repeatable; the shapes of several inputs separated by ';'), or "
    "'none' for --input-shape only. Default 'auto': one other size of the other parity with batch + 1, "
    "where the model runs on it.")]

app = typer.Typer(
    name="repfuse",
    help="Fuse re-parameterizable train-time branches (RepVGG, MobileOne, ACNet, DBB, ...) into one "
    "conv, from dataflow alone, and prove the result equal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

parse_shape = common.parse_shape
build_options = common.build_options


# ---------------------------------------------------------------------------------------------
# output


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text).strip())


def _print_error(err: Console, message: str, hint: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(_one_line(message)), soft_wrap=True)
    err.print(Text("hint: ", style="bold") + Text(_one_line(hint)), soft_wrap=True)


@contextlib.contextmanager
def _progress(err: Console, quiet: bool, signals: common.Signals) -> Iterator[api.Progress]:
    """The api's progress callback: a spinner on stderr (only on a terminal, never with --quiet),
    and at every stage boundary a check for a signal that a library may have swallowed."""
    if quiet or not err.is_terminal:
        def check(message: str) -> None:
            signals.check()

        yield check
        return
    with err.status("repfuse: starting") as status:

        def update(message: str) -> None:
            signals.check()
            status.update(f"repfuse: {escape(str(message))}")

        yield update


def _emit(report: Report, out: Console, err: Console, *, as_json: bool, quiet: bool,
          report_path: Path | None) -> None:
    """Write --report (always, it is the evidence), then stdout, then warnings on stderr."""
    if report_path is not None:
        rpt.write_report(report, report_path)
    if as_json:
        out.file.write(rpt.to_json(report) + "\n")
        out.file.flush()
    elif not quiet:
        rpt.render(report, out)
    rpt.render_warnings(report, err)
    if report_path is not None and not quiet:
        err.print(Text(f"report written to {report_path}", style="dim"), soft_wrap=True)


def _consoles() -> tuple[Console, Console]:
    return Console(), Console(stderr=True)


def _guard(err: Console, body: Callable[[common.Signals], int]) -> None:
    """Run a command body with SIGINT/SIGTERM turned into KeyboardInterrupt; map exceptions to
    one-line messages and exit codes; always exits."""
    debug = os.environ.get("REPFUSE_DEBUG", "") not in ("", "0")
    signals = common.Signals()
    with signals.installed():
        try:
            code = body(signals)
        except BaseException as e:
            code = _failure(err, e, signals, debug)
    raise typer.Exit(code)


def _failure(err: Console, e: BaseException, signals: common.Signals, debug: bool) -> int:
    if isinstance(e, typer.Exit):
        return e.exit_code
    if signals.received is not None or common.interrupted_in(e):
        if debug:
            traceback.print_exc(file=sys.stderr)
        name = "terminated" if signals.exit_code() == common.EXIT_TERMINATED else "interrupted"
        err.print(Text(f"error: {name}", style="bold red"), soft_wrap=True)
        return signals.exit_code()
    if debug:
        traceback.print_exc(file=sys.stderr)
    if isinstance(e, RepfuseError):
        _print_error(err, e.message, e.hint or "run the command with --help for usage")
        return EXIT_USAGE
    if not isinstance(e, Exception):
        raise e
    msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    _print_error(err, f"internal error: {msg}", "rerun with REPFUSE_DEBUG=1 for the traceback and report it")
    return EXIT_INTERNAL


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


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Train-time checkpoint or pickled model.")],
    dst: Annotated[Path, typer.Argument(metavar="OUT", help="Where to write the deploy checkpoint.")],
    input_shape: InputShapeOpt = None,
    allow: AllowOpt = None,
    trust: TrustOpt = False,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = 0,
    trials: TrialsOpt = 3,
    verify_shapes: VerifyShapesOpt = None,
    max_inflate: MaxInflateOpt = common.DEFAULT_MAX_INFLATE_MIB,
    max_modules: MaxModulesOpt = common.DEFAULT_MAX_MODULES,
    force: Annotated[bool, typer.Option("--force", help="Write OUT even if verification fails.")] = False,
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    deploy_model: DeployModelOpt = None,
    deploy_model_arg: DeployModelArgOpt = None,
    keymap: Annotated[
        Path | None,
        typer.Option("--keymap", metavar="FILE.json", dir_okay=False,
                     help="With --deploy-model: also write the key mapping (deploy key → fused key) as JSON."),
    ] = None,
    report_path: ReportOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fuse IN, verify the result numerically, and write the deploy artifact OUT.

    OUT's extension picks the format: .pt/.pth/.bin/.ckpt (torch.save), .safetensors (weights and
    metadata), .pt2 (torch.export program), .onnx (needs repfuse[onnx])."""
    out, err = _consoles()

    def body(signals: common.Signals) -> int:
        options = build_options(input_shape, allow, trust, atol, rtol, seed, trials, force, model=model,
                                model_arg=model_arg, deploy_model=deploy_model, deploy_model_arg=deploy_model_arg,
                                keymap=keymap, max_inflate=max_inflate, max_modules=max_modules)
        options = replace(options, verify_shapes=shape_sets(verify_shapes, parse_shape))
        common.existing_file(src, "input file")
        if common.same_path(src, dst):
            raise RepfuseError(f"OUT is the same file as IN: {dst}",
                               "choose a different OUT path; repfuse never overwrites its input")
        if dst.is_dir():
            raise RepfuseError(f"OUT is a directory: {dst}", "give OUT as a file path, e.g. model_deploy.pt")
        api.check_outputs(src, dst, options)
        common.check_keymap_path(keymap, dst)
        common.check_report_path(report_path, (src,), (dst, *([keymap] if keymap is not None else [])))

        failed = False
        with _progress(err, quiet, signals) as progress:
            try:
                report = api.convert_file(src, dst, options, progress)
            except VerificationFailed as e:
                report, failed = e.report, True
        _emit(report, out, err, as_json=as_json, quiet=quiet, report_path=report_path)

        v = report.verification
        if failed:
            why = v.message if v and v.message else "the fused model's outputs differ from the original's"
            _print_error(err, f"verification failed: {why}",
                         f"nothing was written to {dst}; --force writes it anyway")
            return EXIT_VERIFY_FAILED
        if v is not None and not v.passed:  # only reachable with --force
            err.print(Text("warning: ", style="bold yellow")
                      + Text(f"verification FAILED; {dst} was written anyway because of --force"),
                      soft_wrap=True)
        return EXIT_OK

    _guard(err, body)


@app.command()
def verify(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Checkpoint or pickled model.")],
    against: Annotated[
        Path | None,
        typer.Option("--against", metavar="OTHER",
                     help="Compare IN with this model instead of with IN fused in memory."),
    ] = None,
    input_shape: InputShapeOpt = None,
    allow: AllowOpt = None,
    trust: TrustOpt = False,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    seed: SeedOpt = 0,
    trials: TrialsOpt = 3,
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
) -> None:
    """Check that fusing IN (or the model OTHER) gives the same outputs as IN. Writes no model.

    OTHER may be a whole model, or a state_dict / .safetensors file: it is loaded into --deploy-model
    when given, else into repfuse's deploy model rebuilt from IN."""
    out, err = _consoles()

    def body(signals: common.Signals) -> int:
        options = build_options(input_shape, allow, trust, atol, rtol, seed, trials, model=model,
                                model_arg=model_arg, deploy_model=deploy_model, deploy_model_arg=deploy_model_arg,
                                max_inflate=max_inflate, max_modules=max_modules)
        options = replace(options, verify_shapes=shape_sets(verify_shapes, parse_shape))
        common.existing_file(src, "input file")
        if against is not None:
            common.existing_file(against, "--against file")
        common.check_report_path(report_path, tuple(p for p in (src, against) if p is not None))

        with _progress(err, quiet, signals) as progress:
            try:
                report = api.verify_file(src, options, against, progress)
            except VerificationFailed as e:
                report = e.report
        _emit(report, out, err, as_json=as_json, quiet=quiet, report_path=report_path)

        v = report.verification
        if v is None:
            _print_error(err, "verification did not run", "rerun with REPFUSE_DEBUG=1 and report it")
            return EXIT_VERIFY_FAILED
        if not v.passed:
            why = v.message or "outputs differ beyond the tolerance"
            _print_error(err, f"verification failed: {why}",
                         "see the worst sites above; loosen --atol/--rtol only if the error is rounding")
            return EXIT_VERIFY_FAILED
        return EXIT_OK

    _guard(err, body)


@app.command()
def inspect(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Checkpoint or pickled model.")],
    input_shape: InputShapeOpt = None,
    allow: AllowOpt = None,
    trust: TrustOpt = False,
    max_inflate: MaxInflateOpt = common.DEFAULT_MAX_INFLATE_MIB,
    max_modules: MaxModulesOpt = common.DEFAULT_MAX_MODULES,
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    report_path: ReportOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show which sites would be fused and why others would not. Converts and writes nothing."""
    out, err = _consoles()

    def body(signals: common.Signals) -> int:
        options = build_options(input_shape, allow, trust, model=model, model_arg=model_arg,
                                max_inflate=max_inflate, max_modules=max_modules)
        common.existing_file(src, "input file")
        common.check_report_path(report_path, (src,))
        with _progress(err, quiet, signals) as progress:
            report = api.inspect_file(src, options, progress)
        _emit(report, out, err, as_json=as_json, quiet=quiet, report_path=report_path)
        return EXIT_OK

    _guard(err, body)


def main() -> None:
    """Entry point for `python -m repfuse`."""
    app(prog_name="repfuse")
