"""Benchmark: `repfuse convert` on a RepVGG-A0-sized model, and batch-1 CPU latency before/after.

Everything is measured in one run as ratios against a baseline of the same run:

(a) conversion wall time (load, trace, fuse, verify, save — the whole `repfuse convert`, run as
    the installed command) against the floor of loading and saving the same checkpoint with
    plain torch (`torch.load` + `torch.save`, also in a fresh process, so both pay the start-up);
(b) CPU latency at batch 1 (224×224) of the deploy model against the train-time model.

    python benchmarks/bench_convert.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from repfuse.samples import randomize_bn, repvgg_a0_like

FLOOR = """
import sys, torch
m = torch.load(sys.argv[1], weights_only=False)
torch.save(m, sys.argv[2])
"""


def wall(cmd: list[str], threads: int) -> float:
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # both sides use the same thread count
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def latency(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    """Median seconds per forward."""
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repfuse = shutil.which("repfuse") or sys.exit("install repfuse first (pip install -e .)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        torch.manual_seed(0)
        model = randomize_bn(repvgg_a0_like(), seed=0).eval()
        src = tmp_path / "repvgg_a0.pt"
        torch.save(model, src)
        params = sum(p.numel() for p in model.parameters())
        blocks = sum(type(m).__name__ == "RepVGGBlock" for m in model.modules())
        print(f"model: RepVGG-A0-like, {params / 1e6:.2f}M params, {blocks} blocks, "
              f"checkpoint {src.stat().st_size / 2**20:.1f} MiB")

        floor, conv = [], []
        for i in range(args.repeats):
            floor.append(wall([sys.executable, "-c", FLOOR, str(src), str(tmp_path / f"floor{i}.pt")], args.threads))
            conv.append(wall([repfuse, "convert", str(src), str(tmp_path / f"deploy{i}.pt"),
                              "--input-shape", "1,3,224,224", "--trials", "1", "--quiet"], args.threads))
        f, c = statistics.median(floor), statistics.median(conv)
        print(f"(a) convert: {c:.2f} s  vs  torch load+save floor: {f:.2f} s  →  ratio {c / f:.2f}×")

        deploy = torch.load(tmp_path / "deploy0.pt", weights_only=False).eval()
        x = torch.randn(1, 3, 224, 224)
        t_train = latency(model, x, args.iters)
        t_deploy = latency(deploy, x, args.iters)
        print(f"(b) batch-1 CPU latency ({args.threads} threads): train {t_train * 1e3:.2f} ms, "
              f"deploy {t_deploy * 1e3:.2f} ms  →  speed-up {t_train / t_deploy:.2f}×")
        with torch.inference_mode():
            err = (model(x) - deploy(x)).abs().max().item()
        print(f"    max |train − deploy| on this input: {err:.3g}")


if __name__ == "__main__":
    main()
