"""Numerical verification: the fused model against the original on seeded random inputs.

Two checks, both on every trial:

- exactness, in float64: a correct fusion agrees to ~1e-12 relative, so anything above
  `EXACT_RTOL` is a wrong fusion, not rounding;
- the deployed dtype: fused vs original, each run in the model's own dtype, must agree within
  ``atol + rtol · max|original|`` (a norm-wise bound, robust where outputs cross zero) — or be no
  further from the float64 reference than the original's own low-precision run is (×2 + atol).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .types import RepfuseError, Verification

EXACT_RTOL = 1e-9

DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # dtype → (atol, rtol)
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def infer_input_shapes(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    """(N, C, *spatial) from the first conv/linear layer, where that makes it obvious."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nd = m.weight.dim() - 2
            size = {1: (64,), 2: (64, 64), 3: (16, 16, 16)}[nd]
            return ((2, m.in_channels, *size),)
        if isinstance(m, nn.Linear):
            return ((2, m.in_features),)
    raise RepfuseError("cannot infer the input shape: the model has no conv or linear layer to read it from",
                       "pass --input-shape, e.g. --input-shape 1,3,224,224")


def make_inputs(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def run(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return flat_outputs(model(*inputs))


def check_runs(model: nn.Module, shapes: Sequence[tuple[int, ...]], seed: int) -> None:
    """Raise a RepfuseError with a hint when the model cannot run on inputs of `shapes`."""
    try:
        run(model, make_inputs(shapes, model_dtype(model), seed))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        shown = " ".join("x".join(map(str, s)) for s in shapes)
        raise RepfuseError(f"the model does not run on input shape {shown}: {first[:200]}",
                           "pass the right --input-shape (one per model input), e.g. "
                           "--input-shape 1,3,224,224") from exc


def _errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float, float]:
    """(max abs error, max |reference|, norm-wise relative error) over all outputs."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf"), 0.0, float("inf")
    err = scale = 0.0
    for x, y in zip(a, b):
        if x.numel() == 0:
            continue
        d = (x.double() - y.double()).abs()
        e = float(d.max()) if not torch.isnan(d).any() else float("inf")
        err = max(err, e)
        scale = max(scale, float(y.double().abs().max()))
    return err, scale, err / scale if scale > 0 else err


def compare(original: nn.Module, fused: nn.Module, shapes: Sequence[tuple[int, ...]], *, atol: float | None,
            rtol: float | None, trials: int, seed: int,
            worst_sites: Sequence[tuple[str, float]] = (), fused64: nn.Module | None = None,
            exact: bool = True) -> Verification:
    """Run both models on `trials` seeded inputs in float64 and in the model's dtype.

    `fused64` is the fused model before its new weights were cast to the model's dtype (the
    exactness check needs float64 weights); without it, `fused` is upcast. With `exact=False`
    (two checkpoints compared as stored) the float64 figure is reported but does not decide.
    """
    dtype = model_dtype(original)
    d_atol, d_rtol = default_tolerances(dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    o64 = copy.deepcopy(original).double().eval()
    f64 = copy.deepcopy(fused64 if fused64 is not None else fused).double().eval()
    exact_abs = exact_rel = max_abs = max_rel = 0.0
    passed, message = True, ""
    for t in range(trials):
        x64 = make_inputs(shapes, torch.float64, seed + t)
        ref64 = run(o64, x64)
        e_abs, _, e_rel = _errors(run(f64, x64), ref64)
        exact_abs, exact_rel = max(exact_abs, e_abs), max(exact_rel, e_rel)
        # the deploy model itself, in its own dtype (for a float64 model too: fused64 is a copy)
        xd = tuple(x.to(dtype) for x in x64)
        ref_d, fused_d = run(original, xd), run(fused, xd)
        a_abs, a_scale, a_rel = _errors(fused_d, ref_d)
        own_err = _errors(ref_d, ref64)[0]
        fused_err = _errors(fused_d, ref64)[0]
        ok = a_abs <= atol + rtol * a_scale or fused_err <= 2 * own_err + atol
        max_abs, max_rel = max(max_abs, a_abs), max(max_rel, a_rel)
        if exact and not (e_rel <= EXACT_RTOL) and passed:
            passed = False
            message = (f"float64 outputs differ by {e_abs:.3g} (relative {e_rel:.3g} > {EXACT_RTOL:g}): "
                       "a fusion is wrong, not just rounded")
        elif not ok and passed:
            passed = False
            message = (f"{dtype} outputs differ by {a_abs:.3g} (> atol {atol:g} + rtol {rtol:g} × "
                       f"{a_scale:.3g})")
    worst = tuple(sorted(worst_sites, key=lambda kv: -kv[1])[:5]) if not passed else ()
    return Verification(passed=passed, max_abs_error=max_abs, max_rel_error=max_rel,
                        exact_max_abs_error=exact_abs, exact_max_rel_error=exact_rel, atol=atol, rtol=rtol,
                        trials=trials, input_shape=tuple(tuple(s) for s in shapes), seed=seed,
                        dtype=str(dtype).removeprefix("torch."), worst_sites=worst, message=message)


def count_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int | None:
    """Multiply-accumulates of one forward (FlopCounterMode flops / 2); None if it cannot count."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
        return int(counter.get_total_flops() // 2)
    except Exception:
        return None
