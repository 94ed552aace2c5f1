"""Optional benchmark: repfuse against timm's own `reparameterize_model` on timm's
re-parameterizable families (needs timm; it is not a dependency of repfuse).

For each model (random weights, randomised BN statistics, eval), in one run:
faithfulness (max |deploy − train| on the same inputs, float32), Conv and BatchNorm module counts,
and batch-1 CPU latency, for timm's deploy model and for repfuse's.

    python benchmarks/bench_timm.py [--models repvgg_a0 mobileone_s0 ...] [--size 224]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

try:
    import timm
    from timm.utils.model import reparameterize_model
except ImportError:  # pragma: no cover - optional
    sys.exit("timm is not installed: pip install timm (it needs torchvision) to run this benchmark")

from repfuse import api
from repfuse.types import Options

DEFAULT_MODELS = ["repvgg_a0", "repvgg_b1g4", "mobileone_s0", "fastvit_t8", "fastvit_sa12", "repghostnet_050",
                  "repvit_m0_9", "levit_128s", "efficientvit_m0", "gernet_s"]


def randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)


def counts(model: nn.Module) -> tuple[int, int]:
    convs = sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in model.modules())
    norms = sum(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    return convs, norms


def fmt(model: nn.Module) -> str:
    convs, norms = counts(model)
    return f"{convs}/{norms}"


def latency(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    with torch.inference_mode():
        for _ in range(10):
            model(x)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def max_err(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((a(x) - b(x)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # fused weights can hold denormals; they make CPU convs crawl
    print(f"timm {timm.__version__}, torch {torch.__version__}, {args.threads} threads, "
          f"input 1×3×{args.size}×{args.size}")
    header = (f"{'model':<18} {'err timm':>9} {'err repfuse':>11} {'conv/BN train':>13} {'conv/BN timm':>12} "
              f"{'conv/BN repfuse':>15} {'ms train':>8} {'ms timm':>8} {'ms repfuse':>10} {'fused':>5}")
    print(header)
    for name in args.models:
        torch.manual_seed(0)
        try:
            model = timm.create_model(name, pretrained=False)
        except Exception as exc:
            print(f"{name:<18} cannot build: {exc}")
            continue
        randomize_bn(model, 0)
        model.eval()
        x = torch.randn(1, 3, args.size, args.size)
        timm_deploy = reparameterize_model(copy.deepcopy(model))
        start = time.perf_counter()
        result = api.fuse(model, Options(input_shapes=((1, 3, args.size, args.size),)))
        fuse_s = time.perf_counter() - start
        ours = result.model.eval()
        row = (f"{name:<18} {max_err(model, timm_deploy, x):>9.2e} {max_err(model, ours, x):>11.2e} "
               f"{fmt(model):>13} {fmt(timm_deploy):>12} {fmt(ours):>15} "
               f"{latency(model, x, args.iters) * 1e3:>8.2f} {latency(timm_deploy, x, args.iters) * 1e3:>8.2f} "
               f"{latency(ours, x, args.iters) * 1e3:>10.2f} {len(result.sites):>5}")
        print(row, f"(fuse {fuse_s:.1f}s, {len(result.skipped)} skipped)", flush=True)


if __name__ == "__main__":
    main()
