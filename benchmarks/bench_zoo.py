"""Optional benchmark: repfuse against each model zoo's own conversion, on timm's re-parameterizable
families (`timm.utils.model.reparameterize_model`) and on Ultralytics detectors (`model.fuse()`).

Needs timm and/or ultralytics; neither is a dependency of repfuse nor of its tests. A family whose package
is not installed is skipped with a note. Every model is built with random weights (no download, no
network), randomised BN statistics, in eval mode, and for each one it prints:

- Conv and BatchNorm modules (`_ConvNd` / `_BatchNorm` subclasses): original → the project's conversion
  → repfuse's (``api.fuse``);
- max |deploy − original| over every output tensor (outputs flattened), for both conversions, on a
  fresh random float32 input, next to max |original output| for scale (random weights can blow up);
- batch-1 CPU latency of both deploy models (median of ``--repeats`` forwards under ``torch.no_grad``,
  after a warm-up, the two models interleaved so that they share the machine's noise) and their ratio
  repfuse / project (< 1: repfuse's deploy model is faster);
- repfuse's conversion time (tracing, fusing and its own verification).

One line per model as it goes, a Markdown table at the end; a model that fails prints one line and the
run goes on.

    python benchmarks/bench_zoo.py [--models repvgg_a0 yolov8n ...] [--size 320] [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
from bench_timm import randomize_bn  # the same randomised BN statistics as the timm comparison

from repfuse import api
from repfuse.types import Options

TIMM_MODELS = ["repvgg_a0", "repvgg_b1g4", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m1"]
ULTRALYTICS_MODELS = ["yolov8n", "yolov10n", "rtdetr-l"]
Convert = Callable[[nn.Module], nn.Module]


class Skip(Exception):
    """The model cannot be built here (package missing, unknown name); not a failure of either conversion."""


def build_timm(name: str, size: int) -> tuple[nn.Module, Convert, str]:
    try:
        import timm
        from timm.utils.model import reparameterize_model
    except ImportError as exc:
        raise Skip(f"timm is not installed ({exc})") from None
    if name not in timm.list_models():
        raise Skip(f"timm {timm.__version__} has no model {name!r}")
    return timm.create_model(name, pretrained=False), reparameterize_model, f"timm {timm.__version__}"


def build_ultralytics(name: str, size: int) -> tuple[nn.Module, Convert, str]:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="bench_zoo_ultralytics_"))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import ultralytics
            from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel
    except ImportError as exc:
        raise Skip(f"ultralytics is not installed ({exc})") from None
    cls = RTDETRDetectionModel if name.startswith("rtdetr") else DetectionModel
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = cls(f"{name}.yaml", verbose=False)
    except FileNotFoundError as exc:
        raise Skip(f"ultralytics {ultralytics.__version__} has no {name}.yaml ({exc})") from None

    def fuse(m: nn.Module) -> nn.Module:
        with contextlib.redirect_stdout(io.StringIO()):
            return m.fuse(verbose=False, imgsz=size)

    return model, fuse, f"ultralytics {ultralytics.__version__}"


def counts(model: nn.Module) -> str:
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return f"{convs}/{norms}"


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        leaves, _ = tree_flatten(model(x))
    return [t.detach().float() for t in leaves if isinstance(t, torch.Tensor)]


def max_err(ref: list[torch.Tensor], got: list[torch.Tensor]) -> str:
    """Max abs difference over all output tensors; '*' when the outputs differ in structure and only the
    leading tensors of matching shape could be compared (e.g. a head that drops a training-only branch)."""
    pairs = list(zip(ref, got))
    mark = "" if len(ref) == len(got) and all(a.shape == b.shape for a, b in pairs) else "*"
    if mark:
        pairs = [(a, b) for a, b in pairs if a.shape == b.shape][:1]
    if not pairs:
        return "n/a (no matching output)"
    return f"{max(float((a - b).abs().max()) for a, b in pairs):.2e}{mark}"


def latencies(models: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds per forward of each model, timed interleaved (alternating order each round)."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for m in models:
            for _ in range(3):
                m(x)
        for i in range(repeats):
            order = range(len(models)) if i % 2 == 0 else reversed(range(len(models)))
            for j in order:
                t = time.perf_counter()
                models[j](x)
                times[j].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def run_one(name: str, size: int, repeats: int) -> dict[str, str]:
    builder = build_ultralytics if name in ULTRALYTICS_MODELS or name.startswith(("yolo", "rtdetr")) else build_timm
    torch.manual_seed(0)
    model, convert, family = builder(name, size)
    randomize_bn(model, 0)
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(1, 3, size, size)
    ref = outputs(model, x)  # before either conversion, so that one that mutates its input cannot hide it
    project = convert(copy.deepcopy(model)).eval()
    start = time.perf_counter()
    result = api.fuse(model, Options(input_shapes=((1, 3, size, size),)))
    fuse_s = time.perf_counter() - start
    ours = result.model.eval()
    t_project, t_ours = latencies([project, ours], x, repeats)
    return {
        "model": name, "family": family, "conv/BN original": counts(model), "conv/BN project": counts(project),
        "conv/BN repfuse": counts(ours), "max |out|": f"{max(float(t.abs().max()) for t in ref):.2e}",
        "err project": max_err(ref, outputs(project, x)),
        "err repfuse": max_err(ref, outputs(ours, x)), "ms project": f"{t_project * 1e3:.2f}",
        "ms repfuse": f"{t_ours * 1e3:.2f}", "ratio": f"{t_ours / t_project:.2f}×",
        "fuse s": f"{fuse_s:.1f}", "fused/skipped": f"{len(result.sites)}/{len(result.skipped)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=TIMM_MODELS + ULTRALYTICS_MODELS)
    parser.add_argument("--size", type=int, default=320, help="input 1×3×SIZE×SIZE (YOLO's native size is 640)")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per deploy model")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # fused weights can hold denormals; they make CPU convs crawl
    print(f"torch {torch.__version__}, {args.threads} threads, input 1×3×{args.size}×{args.size}, "
          f"{args.repeats} timed forwards")
    rows: list[dict[str, str]] = []
    notes: list[str] = []
    for name in args.models:
        try:
            row = run_one(name, args.size, args.repeats)
        except Skip as exc:
            notes.append(f"{name}: skipped, {exc}")
            print(notes[-1], flush=True)
            continue
        except Exception as exc:  # keep going: one line per failure
            msg = " ".join(str(exc).split())[:300]
            notes.append(f"{name}: FAILED, {type(exc).__name__}: {msg}")
            print(notes[-1], flush=True)
            continue
        rows.append(row)
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if rows:
        keys = list(rows[0])
        print("\n| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            print("| " + " | ".join(row[k] for k in keys) + " |")
    if any("*" in r["err project"] + r["err repfuse"] for r in rows):
        print("\n*: outputs differ in structure from the original's; only the first tensor was compared")
    if notes:
        print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
