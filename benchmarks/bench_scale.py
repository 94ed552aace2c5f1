"""Benchmark: how `repfuse convert` scales with depth and with model size (no extra packages needed).

Each model is a whole pickled `repfuse.samples.RepVGG` (random weights, randomised BN statistics). Both
sides run as fresh processes with the same interpreter and thread settings, alternating, and each
process's own peak RSS is read from `os.wait4`:

- repfuse: ``python -m repfuse convert IN OUT --input-shape 1,3,S,S`` (everything, verification included);
- floor:   one process that imports torch, loads IN, runs a forward and saves the model.

Depth: the RepVGG-A0 layout with every stage 1×, 2× and 4× as deep — time and memory should grow
linearly (the report gives seconds per block above the floor). `--large`: a RepVGG-B3 layout about
1.8× as wide (≈ 400M train-time parameters, a 1.6 GB file): it must convert on a 24 GiB machine.

    python benchmarks/bench_scale.py [--depths 1 2 4] [--large] [--size 224] [--repeats 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_floor import run

MAKE = """
import sys, json, torch
from repfuse.samples import RepVGG, randomize_bn
blocks, widths = json.loads(sys.argv[2]), json.loads(sys.argv[3])
torch.manual_seed(0)
m = RepVGG(num_blocks=blocks, num_classes=1000, width_multiplier=widths).eval()
randomize_bn(m, 0)
torch.save(m, sys.argv[1])
print(sum(p.numel() for p in m.parameters()), sum(blocks) + 1)
"""

FLOOR = """
import sys, torch
size = int(sys.argv[3])
m = torch.load(sys.argv[1], weights_only=False).eval()
with torch.no_grad():
    m(torch.randn(1, 3, size, size))
torch.save(m, sys.argv[2])
"""

A0_BLOCKS, A0_WIDTHS = [2, 4, 14, 1], [0.75, 0.75, 0.75, 2.5]
LARGE_BLOCKS, LARGE_WIDTHS = [4, 6, 16, 1], [5.5, 5.5, 5.5, 9.0]  # B3 is [4, 6, 16, 1] × (3, 3, 3, 5)


def measure(name: str, blocks: list[int], widths: list[float], args: argparse.Namespace, env: dict[str, str],
            tmp: Path) -> dict[str, float | str]:
    py = sys.executable
    src = tmp / f"{name}.pt"
    made = subprocess.run([py, "-c", MAKE, str(src), json.dumps(blocks), json.dumps(widths)], check=True, env=env,
                          capture_output=True, text=True)
    params, n_blocks = (int(v) for v in made.stdout.split())
    rep, flo, stages = [], [], {}
    for i in range(args.repeats):
        for side in ("repfuse", "floor") if i % 2 == 0 else ("floor", "repfuse"):
            out = tmp / f"{name}.{side}.pt"
            if side == "floor":
                flo.append(run([py, "-c", FLOOR, str(src), str(out), str(args.size)], env))
            else:
                report = tmp / f"{name}.json"
                rep.append(run([py, "-m", "repfuse", "convert", str(src), str(out), "--input-shape",
                                f"1,3,{args.size},{args.size}", "--report", str(report)], env))
                stages = json.loads(report.read_text()).get("timings", {})
            out.unlink(missing_ok=True)
    src.unlink()
    row: dict[str, float | str] = {
        "model": name, "blocks": n_blocks, "params_m": params / 1e6, "file_mb": params * 4 / 2**20,
        "repfuse_s": statistics.median(w for w, _ in rep), "floor_s": statistics.median(w for w, _ in flo),
        "repfuse_mib": statistics.median(m for _, m in rep), "floor_mib": statistics.median(m for _, m in flo),
        "stages": ", ".join(f"{k} {v:.1f}" for k, v in stages.items() if isinstance(v, (int, float))),
    }
    print(f"{name}: {n_blocks} blocks, {params / 1e6:.0f}M params | repfuse {row['repfuse_s']:.1f} s "
          f"{row['repfuse_mib']:.0f} MiB | floor {row['floor_s']:.1f} s {row['floor_mib']:.0f} MiB | {row['stages']}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--large", action="store_true", help="also the ≈400M-parameter model")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.depths:
            rows.append(measure(f"a0-depth{k}x", [b * k for b in A0_BLOCKS], A0_WIDTHS, args, env, Path(tmp)))
        if args.large:
            rows.append(measure("large-400m", LARGE_BLOCKS, LARGE_WIDTHS, args, env, Path(tmp)))
    print("\n| model | blocks | params (M) | repfuse s | floor s | time ratio | s/block above floor | repfuse MiB "
          "| floor MiB | memory ratio | stages (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_block = (float(r["repfuse_s"]) - float(r["floor_s"])) / float(r["blocks"])
        print(f"| {r['model']} | {r['blocks']} | {float(r['params_m']):.0f} | {float(r['repfuse_s']):.1f} | "
              f"{float(r['floor_s']):.1f} | {float(r['repfuse_s']) / float(r['floor_s']):.2f}× | {per_block:.3f} | "
              f"{float(r['repfuse_mib']):.0f} | {float(r['floor_mib']):.0f} | "
              f"{float(r['repfuse_mib']) / float(r['floor_mib']):.2f}× | {r['stages']} |")


if __name__ == "__main__":
    main()
