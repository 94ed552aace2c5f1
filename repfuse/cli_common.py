"""What every `repfuse` command shares: flag declarations, their validation into `types.Options`,
checks of the output paths before any work, and signal handling. Never prints (see `cli`).

Bounds on what a user may ask for (each violation is exit 2 with a cause and a hint, at once):
`--trials` at most `MAX_TRIALS`; each `--input-shape` at most `MAX_INPUT_ELEMENTS` elements;
`--max-inflate` and `--max-modules` positive.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from . import factory, writing
from . import report as rpt
from .types import Options, RepfuseError

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_NOT_DEPLOYED = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM

MAX_TRIALS = 1000
MAX_INPUT_ELEMENTS = 1 << 26  # per input: 512 MiB in float64, where verification runs
DEFAULT_MAX_INFLATE_MIB = 1024
DEFAULT_MAX_MODULES = 10_000
MIN_OPSET, MAX_OPSET = 7, 30

# ---------------------------------------------------------------------------------------------
# flag declarations (typer Annotated types)

InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape", "-s", metavar="SHAPE", show_default=False,
        help="Input shape, e.g. 1,3,224,224 or 1x3x224x224; repeat once per model input. "
        "Default: the model's own metadata (timm's pretrained_cfg, Ultralytics' imgsz), else 2×C×64×64 "
        "from the first layer, with a warning.",
    ),
]
AllowOpt = Annotated[
    list[str] | None,
    typer.Option("--allow", metavar="PREFIX", show_default=False,
                 help="Module prefix whose nn.Module classes may be unpickled (repeatable), e.g. --allow models."),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust", help="Allow full, UNSAFE unpickling (runs code from the file).")
]
AtolOpt = Annotated[
    float | None, typer.Option("--atol", metavar="F", show_default=False,
                               help="Absolute tolerance. Default: by model dtype (float32: 1e-5).")
]
RtolOpt = Annotated[
    float | None, typer.Option("--rtol", metavar="F", show_default=False,
                               help="Relative tolerance. Default: by model dtype (float32: 1e-4).")
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the random test inputs.")]
TrialsOpt = Annotated[int | None, typer.Option(
    "--trials", metavar="N", show_default=False,
    help=f"Random test batches at the given shape (1 to {MAX_TRIALS}). Default: 1 where the float64 check "
    "decides (float32/float64 models), 3 for float16/bfloat16 models and for verify --against.")]
MaxInflateOpt = Annotated[
    int, typer.Option("--max-inflate", metavar="MIB",
                      help="Bytes (in MiB) a file's tensors may declare beyond the file's own size "
                      "(broadcast views, compressed entries).")
]
MaxModulesOpt = Annotated[
    int, typer.Option("--max-modules", metavar="N", help="Most modules a pickled model may hold.")
]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Fail (exit 4, nothing written) unless the model is fully deployed: no site "
                       "skipped, no norm layer left, something fused.")
]
StaticOpt = Annotated[
    bool, typer.Option("--static", help=".pt2/.onnx: export with the static input shape (default: batch and "
                       "spatial sizes dynamic where the model allows it).")
]
OpsetOpt = Annotated[
    int | None, typer.Option("--opset", metavar="N", show_default=False,
                             help="The ONNX opset of an .onnx OUT. Default: the exporter's own.")
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Also show hashes, factory arguments, branches, all verification "
                       "figures, timings and notes.")
]
ReportOpt = Annotated[
    Path | None,
    typer.Option("--report", metavar="FILE", dir_okay=False, show_default=False,
                 help="Also write the report to FILE.json (schema 1) or FILE.md."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the JSON report (one object, also on errors) on stdout.")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No report and no progress; the verdict line, errors and warnings only.")
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", metavar="MODULE:CALLABLE", show_default=False,
                 help="Build the architecture for a state_dict / .safetensors IN, e.g. timm:create_model "
                 "(imports MODULE: your own code)."),
]
ModelArgOpt = Annotated[
    list[str] | None,
    typer.Option("--model-arg", metavar="KEY=VALUE", show_default=False,
                 help="Keyword argument for --model (repeatable); values parse as int, float, bool, None or str."),
]
DeployModelOpt = Annotated[
    str | None,
    typer.Option("--deploy-model", metavar="MODULE:CALLABLE", show_default=False,
                 help="Your own deploy-mode architecture: the fused weights are mapped onto it by structure, "
                 "verified, and written under its key names."),
]
DeployModelArgOpt = Annotated[
    list[str] | None,
    typer.Option("--deploy-model-arg", metavar="KEY=VALUE", show_default=False,
                 help="Keyword argument for --deploy-model (repeatable)."),
]

# ---------------------------------------------------------------------------------------------
# flag values → Options

_SHAPE_HINT = "write each shape as 1,3,224,224 or 1x3x224x224, one --input-shape per model input"


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' / '1x3x224x224' / '(1, 3, 224, 224)' → (1, 3, 224, 224); RepfuseError otherwise."""
    body = text.strip().strip("()[]").strip()
    parts = [p.strip() for p in re.split(r"[,x×X]", body)] if body else []
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise RepfuseError(f"malformed --input-shape {text!r}: expected positive integers", _SHAPE_HINT)
    shape = tuple(int(p) for p in parts)
    elements = 1
    for d in shape:
        elements *= d
    if elements > MAX_INPUT_ELEMENTS:
        raise RepfuseError(f"--input-shape {text} has {elements:,} elements, more than the {MAX_INPUT_ELEMENTS:,} "
                           "repfuse verifies with", "use a batch of 1 or 2 at the model's own resolution, "
                           "e.g. --input-shape 1,3,224,224")
    return shape


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


def _positive(flag: str, value: int, example: str) -> int:
    if value < 1:
        raise RepfuseError(f"{flag} must be at least 1, got {value}", f"for example {flag} {example}")
    return value


def _check_trials(trials: int) -> None:
    _positive("--trials", trials, "3")
    if trials > MAX_TRIALS:
        raise RepfuseError(f"--trials {trials} is more than the {MAX_TRIALS} repfuse runs",
                           f"one batch finds a wrong fusion (it is off by far more than rounding); "
                           f"use --trials 1 to {MAX_TRIALS}")


def build_options(
    input_shape: list[str] | None = None, allow: list[str] | None = None, trust: bool = False,
    atol: float | None = None, rtol: float | None = None, seed: int = 0, trials: int | None = None,
    force: bool = False, *, model: str | None = None, model_arg: list[str] | None = None,
    deploy_model: str | None = None, deploy_model_arg: list[str] | None = None, keymap: Path | None = None,
    max_inflate: int = DEFAULT_MAX_INFLATE_MIB, max_modules: int = DEFAULT_MAX_MODULES,
    strict: bool = False, static: bool = False, opset: int | None = None,
) -> Options:
    """Map CLI flag values onto `types.Options` (validating what the parser cannot)."""
    if trials is not None:
        _check_trials(trials)
    if seed < 0:
        raise RepfuseError(f"--seed must be >= 0, got {seed}", "for example --seed 0")
    _positive("--max-inflate", max_inflate, str(DEFAULT_MAX_INFLATE_MIB))
    _positive("--max-modules", max_modules, str(DEFAULT_MAX_MODULES))
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise RepfuseError(f"--opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}",
                           "omit it for the exporter's default, or give e.g. --opset 18")
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
        max_inflate_bytes=None if max_inflate == DEFAULT_MAX_INFLATE_MIB else max_inflate << 20,
        max_modules=None if max_modules == DEFAULT_MAX_MODULES else max_modules,
        strict=strict,
        static=static,
        opset=opset,
    )


# ---------------------------------------------------------------------------------------------
# path checks (cheap, before anything slow runs)


def same_path(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        with contextlib.suppress(OSError):
            return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def existing_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise RepfuseError(f"{what} not found: {path}", "check the path (and the current directory)")
    if not path.is_file():
        raise RepfuseError(f"{what} is not a file: {path}", "give the path of a checkpoint file")
    return path


def check_report_path(report_path: Path | None, inputs: tuple[Path, ...], outputs: tuple[Path, ...] = ()) -> None:
    """--report: a known suffix, in a writable directory, neither an input nor another output."""
    if report_path is None:
        return
    rpt.report_format(report_path)
    for other in (*inputs, *outputs):
        if same_path(report_path, other):
            raise RepfuseError(f"--report would overwrite {other}", "choose another --report path")
    try:
        writing.check_destination(report_path, *inputs)
    except RepfuseError as e:
        raise RepfuseError(f"--report {report_path}: {e.message}", e.hint) from None


def check_keymap_path(keymap: Path | None, dst: Path) -> None:
    if keymap is not None and same_path(keymap, dst):
        raise RepfuseError(f"--keymap would overwrite OUT {dst}", "choose another --keymap path")


# ---------------------------------------------------------------------------------------------
# signals


class Signals:
    """SIGINT and SIGTERM raise KeyboardInterrupt (so every `finally` cleans up) and are remembered:
    torch turns an interrupt inside its C++ writers into a RuntimeError, and `received` still tells
    the CLI that the run was interrupted. SIGXFSZ is ignored, so a write beyond the file-size limit
    fails with EFBIG (exit 2) instead of killing the process."""

    def __init__(self) -> None:
        self.received: int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt when a signal came in (for stage boundaries: an interrupt that a
        library swallowed still stops the run)."""
        if self.received is not None:
            raise KeyboardInterrupt

    def exit_code(self) -> int:
        return EXIT_TERMINATED if self.received == signal.SIGTERM else EXIT_INTERRUPTED

    @contextlib.contextmanager
    def installed(self) -> Iterator[Signals]:
        wanted = [signal.SIGINT, signal.SIGTERM]
        previous: dict[int, object] = {}
        try:
            for sig in wanted:
                with contextlib.suppress(ValueError, OSError):  # not the main thread: leave them
                    previous[sig] = signal.signal(sig, self._handle)
            if hasattr(signal, "SIGXFSZ"):
                with contextlib.suppress(ValueError, OSError):
                    previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            yield self
        finally:
            for sig, handler in previous.items():
                with contextlib.suppress(ValueError, OSError, TypeError):
                    signal.signal(sig, handler)  # type: ignore[arg-type]


def interrupted_in(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is anywhere in `exc`'s cause/context chain."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 20:
        if isinstance(e, KeyboardInterrupt):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", metavar="N", min=1, show_default=False,
                 help="CPU threads for torch. Default: OMP_NUM_THREADS if set, else the cores left idle by the "
                 "machine's load (at least 1, at most torch's own default)."),
]


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads`, else OMP_NUM_THREADS's choice, else the idle cores (cores
    minus the 1-minute load average, at least 1): on a busy machine more threads only contend."""
    import torch

    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        threads = max(1, min(torch.get_num_threads(), cores - int(load + 0.5)))
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
