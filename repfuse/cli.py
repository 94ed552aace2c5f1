"""The `repfuse` command: parse flags, call one api function, render the report, map errors to exit codes.

This is the only module that prints. Data (the rich report, or JSON with --json) goes to stdout;
progress, warnings and errors go to stderr.

Exit codes:
    0    ok (convert: written and verified, or written with --force despite a failed verification)
    1    verification failed (convert: nothing written; verify: outputs differ)
    2    usage or input error: one `error:` line and one `hint:` line on stderr
    3    internal error (a bug in repfuse): `error: internal error: <type>: <message>`
    130  interrupted (Ctrl-C)
With REPFUSE_DEBUG=1 the Python traceback is printed on stderr before the error lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from . import __version__, api, factory
from . import report as rpt
from .types import Options, RepfuseError, Report, VerificationFailed

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    name="repfuse",
    help="Fuse re-parameterizable train-time branches (RepVGG, MobileOne, ACNet, DBB, ...) into one "
    "conv, from dataflow alone, and prove the result equal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---------------------------------------------------------------------------------------------
# shared options

InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape", "-s", metavar="SHAPE",
        help="Input shape, e.g. 1,3,224,224 or 1x3x224x224; repeat once per model input. "
        "Default: inferred from the first layer.",
    ),
]
AllowOpt = Annotated[
    list[str] | None,
    typer.Option("--allow", metavar="PREFIX",
                 help="Module prefix whose classes may be unpickled (repeatable), e.g. --allow models."),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust", help="Allow full, UNSAFE unpickling (runs code from the file).")
]
AtolOpt = Annotated[
    float | None, typer.Option("--atol", metavar="F", help="Absolute tolerance. Default: by model dtype.")
]
RtolOpt = Annotated[
    float | None, typer.Option("--rtol", metavar="F", help="Relative tolerance. Default: by model dtype.")
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the random test inputs.")]
TrialsOpt = Annotated[int, typer.Option("--trials", metavar="N", help="Number of random test batches.")]
ReportOpt = Annotated[
    Path | None,
    typer.Option("--report", metavar="FILE", dir_okay=False,
                 help="Also write the report to FILE.json (schema 1) or FILE.md."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the JSON report on stdout instead of the tables.")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No report and no progress; errors and warnings only.")
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", metavar="MODULE:CALLABLE",
                 help="Build the architecture for a state_dict / .safetensors IN, e.g. timm:create_model "
                 "(imports MODULE: your own code)."),
]
ModelArgOpt = Annotated[
    list[str] | None,
    typer.Option("--model-arg", metavar="KEY=VALUE",
                 help="Keyword argument for --model (repeatable); values parse as int, float, bool, None or str."),
]
DeployModelOpt = Annotated[
    str | None,
    typer.Option("--deploy-model", metavar="MODULE:CALLABLE",
                 help="Your own deploy-mode architecture: the fused weights are mapped onto it by structure, "
                 "verified, and written under its key names."),
]
DeployModelArgOpt = Annotated[
    list[str] | None,
    typer.Option("--deploy-model-arg", metavar="KEY=VALUE", help="Keyword argument for --deploy-model (repeatable)."),
]

_SHAPE_HINT = "write each shape as 1,3,224,224 or 1x3x224x224, one --input-shape per model input"


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' / '1x3x224x224' / '(1, 3, 224, 224)' → (1, 3, 224, 224); RepfuseError otherwise."""
    body = text.strip().strip("()[]").strip()
    parts = [p.strip() for p in re.split(r"[,x×X]", body)] if body else []
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise RepfuseError(f"malformed --input-shape {text!r}: expected positive integers", _SHAPE_HINT)
    return tuple(int(p) for p in parts)


def _tolerance(name: str, value: float | None) -> float | None:
    if value is not None and not (value >= 0 and value != float("inf")):
        raise RepfuseError(f"--{name} must be a finite number >= 0, got {value}",
                           f"for example --{name} 1e-4; omit it to use the default for the model dtype")
    return value


def _factory(flag: str, spec: str | None, args: list[str] | None) -> tuple[str | None, tuple[tuple[str, object], ...]]:
    if spec is None:
        if args:
            raise RepfuseError(f"{flag}-arg given without {flag}",
                               f"pass {flag} MODULE:CALLABLE that takes the arguments")
        return None, ()
    module, attr = factory.parse_spec(spec, flag)
    return f"{module}:{attr}", factory.parse_model_args(args, f"{flag}-arg")


def build_options(
    input_shape: list[str] | None = None, allow: list[str] | None = None, trust: bool = False,
    atol: float | None = None, rtol: float | None = None, seed: int = 0, trials: int = 3,
    force: bool = False, *, model: str | None = None, model_arg: list[str] | None = None,
    deploy_model: str | None = None, deploy_model_arg: list[str] | None = None, keymap: Path | None = None,
) -> Options:
    """Map CLI flag values onto `types.Options` (validating what the parser cannot)."""
    if trials < 1:
        raise RepfuseError(f"--trials must be at least 1, got {trials}", "for example --trials 3")
    if seed < 0:
        raise RepfuseError(f"--seed must be >= 0, got {seed}", "for example --seed 0")
    for prefix in allow or ():
        if not prefix.strip() or any(c.isspace() for c in prefix):
            raise RepfuseError(f"malformed --allow {prefix!r}",
                               "give a dotted module prefix, e.g. --allow models or --allow mypkg.nets")
    model_spec, model_args = _factory("--model", model, model_arg)
    deploy_spec, deploy_args = _factory("--deploy-model", deploy_model, deploy_model_arg)
    return Options(
        input_shapes=tuple(parse_shape(s) for s in input_shape) if input_shape else None,
        allow=tuple(p.strip() for p in allow or ()),
        trust=trust,
        atol=_tolerance("atol", atol),
        rtol=_tolerance("rtol", rtol),
        seed=seed,
        trials=trials,
        force=force,
        model=model_spec,
        model_args=model_args,
        deploy_model=deploy_spec,
        deploy_model_args=deploy_args,
        keymap=str(keymap) if keymap is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# path checks (cheap, before anything slow runs)


def _same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        with contextlib.suppress(OSError):
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _existing_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise RepfuseError(f"{what} not found: {path}", "check the path (and the current directory)")
    if not path.is_file():
        raise RepfuseError(f"{what} is not a file: {path}", "give the path of a checkpoint file")
    return path


def _check_report_path(report_path: Path | None, *others: Path) -> None:
    if report_path is None:
        return
    rpt.report_format(report_path)
    for other in others:
        if _same_path(report_path, other):
            raise RepfuseError(f"--report would overwrite {other}", "choose another --report path")


# ---------------------------------------------------------------------------------------------
# output


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text).strip())


def _print_error(err: Console, message: str, hint: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(_one_line(message)), soft_wrap=True)
    err.print(Text("hint: ", style="bold") + Text(_one_line(hint)), soft_wrap=True)


@contextlib.contextmanager
def _progress(err: Console, quiet: bool) -> Iterator[api.Progress | None]:
    """A spinner on stderr fed by the api's progress callback (only on a terminal, never with --quiet)."""
    if quiet or not err.is_terminal:
        yield None
        return
    with err.status("repfuse: starting") as status:

        def update(message: str) -> None:
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


def _guard(err: Console, body: Callable[[], int]) -> None:
    """Run a command body; map exceptions to one-line messages and exit codes; always exits."""
    debug = os.environ.get("REPFUSE_DEBUG", "") not in ("", "0")
    try:
        code = body()
    except RepfuseError as e:
        if debug:
            traceback.print_exc(file=sys.stderr)
        _print_error(err, e.message,
                     e.hint or "run the command with --help for usage")
        code = EXIT_USAGE
    except KeyboardInterrupt:
        err.print(Text("error: interrupted", style="bold red"))
        code = EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc(file=sys.stderr)
        msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        _print_error(err, f"internal error: {msg}",
                     "rerun with REPFUSE_DEBUG=1 for the traceback and report it")
        code = EXIT_INTERNAL
    raise typer.Exit(code)


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

    def body() -> int:
        options = build_options(input_shape, allow, trust, atol, rtol, seed, trials, force, model=model,
                                model_arg=model_arg, deploy_model=deploy_model, deploy_model_arg=deploy_model_arg,
                                keymap=keymap)
        _existing_file(src, "input file")
        if _same_path(src, dst):
            raise RepfuseError(f"OUT is the same file as IN: {dst}",
                               "choose a different OUT path; repfuse never overwrites its input")
        if dst.is_dir():
            raise RepfuseError(f"OUT is a directory: {dst}", "give OUT as a file path, e.g. model_deploy.pt")
        api.check_outputs(src, dst, options)
        _check_report_path(report_path, src, dst, *([keymap] if keymap is not None else []))

        failed = False
        with _progress(err, quiet) as progress:
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

    def body() -> int:
        options = build_options(input_shape, allow, trust, atol, rtol, seed, trials, model=model,
                                model_arg=model_arg, deploy_model=deploy_model, deploy_model_arg=deploy_model_arg)
        _existing_file(src, "input file")
        if against is not None:
            _existing_file(against, "--against file")
        _check_report_path(report_path, *(p for p in (src, against) if p is not None))

        with _progress(err, quiet) as progress:
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
    model: ModelOpt = None,
    model_arg: ModelArgOpt = None,
    report_path: ReportOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show which sites would be fused and why others would not. Converts and writes nothing."""
    out, err = _consoles()

    def body() -> int:
        options = build_options(input_shape, allow, trust, model=model, model_arg=model_arg)
        _existing_file(src, "input file")
        _check_report_path(report_path, src)
        with _progress(err, quiet) as progress:
            report = api.inspect_file(src, options, progress)
        _emit(report, out, err, as_json=as_json, quiet=quiet, report_path=report_path)
        return EXIT_OK

    _guard(err, body)


def main() -> None:
    """Entry point for `python -m repfuse`."""
    app(prog_name="repfuse")
