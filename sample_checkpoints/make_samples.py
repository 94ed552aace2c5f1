"""Write the bundled sample checkpoints, deterministically.

    python sample_checkpoints/make_samples.py [OUT_DIR]

Builds tiny train-time RepVGG (with groups), MobileOne and ACNet nets from repfuse.samples with
fixed seeds, gives every BatchNorm random statistics, puts them in eval mode and saves:

- repvgg_tiny.pt     the whole model, ``torch.save(model)``
- mobileone_tiny.pt  a training-style dict ``{"model": <fp16 model>, "epoch": 3, "optimizer": None,
                     "note": ...}``
- acnet_tiny.pt      the whole model

Then checks that each file loads with repfuse.io.load_checkpoint without --trust or --allow.
Running it twice writes byte-identical files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from repfuse.io import load_checkpoint, sha256_file
from repfuse.samples import acnet_tiny, mobileone_tiny, randomize_bn, repvgg_tiny

HERE = Path(__file__).resolve().parent


def _build(factory: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = factory()
    randomize_bn(model, seed=seed + 1)
    return model.eval()


def make(out_dir: Path = HERE) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "repvgg_tiny": out_dir / "repvgg_tiny.pt",
        "mobileone_tiny": out_dir / "mobileone_tiny.pt",
        "acnet_tiny": out_dir / "acnet_tiny.pt",
    }
    torch.save(_build(repvgg_tiny, 0), paths["repvgg_tiny"])
    container = {
        "model": _build(mobileone_tiny, 1).half(),
        "epoch": 3,
        "optimizer": None,
        "note": "repfuse sample: MobileOne-style net saved fp16 inside a training-style dict",
    }
    torch.save(container, paths["mobileone_tiny"])
    torch.save(_build(acnet_tiny, 2), paths["acnet_tiny"])
    return paths


def main() -> int:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    paths = make(out_dir)
    for name, path in paths.items():
        loaded = load_checkpoint(path)  # no trust, no allow: repfuse.samples is allow-listed
        x = torch.randn(2, 3, 32, 32, dtype=loaded.dtype)
        if loaded.dtype == torch.float16:
            y = loaded.model.float()(x.float())
        else:
            y = loaded.model(x)
        print(f"{path.name:20s} {path.stat().st_size:8d} B  key={loaded.key!s:6s} "
              f"dtype={loaded.dtype!s:14s} out={tuple(y.shape)}  sha256={sha256_file(path)[:16]}  ({name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
