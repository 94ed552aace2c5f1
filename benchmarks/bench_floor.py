"""Benchmark: `repfuse convert` against the floor of a plain load, forward, hand-written
re-parameterization, forward and save, in time and in peak memory (needs timm; not a dependency).

For each model (timm, random weights, randomised BN statistics, a whole pickled model), both sides run
as fresh processes with the same interpreter, thread settings and input size, alternating, and each
process's own peak RSS is read from `os.wait4`:

- repfuse:  ``python -m repfuse convert IN OUT --allow timm --input-shape 1,3,S,S`` (everything,
  including its verification);
- floor:    one process that imports torch and timm, loads IN, runs a forward, runs timm's
  ``reparameterize_model``, runs a forward and saves the result.

Reports the median wall time and peak RSS of each, their ratios (the target is ≤ 1.5× in both), and
repfuse's own stage timings from its JSON report.

    python benchmarks/bench_floor.py [--models repvgg_b3 fastvit_t8 repvgg_a0] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR = """
import sys, torch, timm
from timm.utils.model import reparameterize_model
size = int(sys.argv[3])
m = torch.load(sys.argv[1], weights_only=False).eval()
x = torch.randn(1, 3, size, size)
with torch.no_grad():
    m(x)
    d = reparameterize_model(m)
    d(x)
torch.save(d, sys.argv[2])
"""

MAKE = """
import sys, torch, timm
sys.path.insert(0, sys.argv[3])
from bench_timm import randomize_bn  # the same randomised BN statistics as the timm comparison
torch.manual_seed(0)
m = timm.create_model(sys.argv[1], pretrained=False).eval()
randomize_bn(m, 0)
torch.save(m, sys.argv[2])
"""


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["repvgg_b3", "fastvit_t8", "repvgg_a0"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra flags for repfuse convert")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            src = Path(tmp) / f"{name}.pt"
            subprocess.run([py, "-c", MAKE, name, str(src), str(Path(__file__).parent)], check=True, env=env)
            mb = src.stat().st_size / 2**20
            rep, flo, stages = [], [], {}
            for i in range(args.repeats):
                for side in ("repfuse", "floor") if i % 2 == 0 else ("floor", "repfuse"):
                    out = Path(tmp) / f"{name}.{side}.{i}.pt"
                    if side == "floor":
                        flo.append(run([py, "-c", FLOOR, str(src), str(out), str(args.size)], env))
                    else:
                        report = Path(tmp) / f"{name}.{i}.json"
                        rep.append(run([py, "-m", "repfuse", "convert", str(src), str(out), "--allow", "timm",
                                        "--input-shape", f"1,3,{args.size},{args.size}",
                                        "--report", str(report), *args.extra], env))
                        stages = json.loads(report.read_text()).get("timings", {})
                    out.unlink(missing_ok=True)
            t_r, t_f = statistics.median(w for w, _ in rep), statistics.median(w for w, _ in flo)
            m_r, m_f = statistics.median(m for _, m in rep), statistics.median(m for _, m in flo)
            rows.append((name, mb, t_r, t_f, m_r, m_f, stages))
            print(f"{name}: {mb:.0f} MB file | repfuse {t_r:.1f} s {m_r:.0f} MiB | floor {t_f:.1f} s {m_f:.0f} MiB "
                  f"| ratio time {t_r / t_f:.2f}× memory {m_r / m_f:.2f}×", flush=True)
    print("\n| model | file MB | repfuse s | floor s | time ratio | repfuse MiB | floor MiB | memory ratio "
          "| stages (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, mb, t_r, t_f, m_r, m_f, stages in rows:
        st = ", ".join(f"{k} {v:.1f}" for k, v in stages.items() if isinstance(v, (int, float)))
        print(f"| {name} | {mb:.0f} | {t_r:.1f} | {t_f:.1f} | {t_r / t_f:.2f}× | {m_r:.0f} | {m_f:.0f} | "
              f"{m_r / m_f:.2f}× | {st} |")


if __name__ == "__main__":
    main()
