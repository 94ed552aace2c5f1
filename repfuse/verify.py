"""Numerical verification: the fused model against the original on seeded random inputs.

Every shape is checked twice — the given (or inferred) one on every trial, and by default one
other input size of the other parity with another batch size, wherever the original accepts it
(a decision taken at one recorded shape shows up at another) — and each run gets its own fresh
inputs, a seeded random generator and leaves the model as it was (`outputs`). Outputs must agree
in structure, dtype and device, and in value, by two checks:

- exactness, in float64: a correct fusion agrees to ~1e-12 relative, so anything above
  `EXACT_RTOL` is a wrong fusion, not rounding;
- the deployed dtype: fused vs original, each run in the model's own dtype, must agree within
  ``atol + rtol · max|original|`` (a norm-wise bound, robust where outputs cross zero) — or be no
  further from the float64 reference than the original's own low-precision run is (×2 + atol).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from . import effects as E
from .dtypes import Float64Mode
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


def default_trials(dtype: torch.dtype, exact: bool = True) -> int:
    """Seeded inputs per verification at the given shapes when --trials is not given. Where the float64
    check decides (`exact`) one input per shape set is enough: a wrong fusion is off by far more than
    rounding on any input, and float32/float64 rounding sits two orders under the tolerance, so more inputs
    of the same kind only repeat the answer at two full forwards each. Half precision, whose rounding comes
    within a factor of ten of its tolerance, and two checkpoints compared in their own dtype alone get 3."""
    return 1 if exact and dtype in (torch.float32, torch.float64) else 3


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


def outputs(model: Any, inputs: tuple[torch.Tensor, ...], *, float64: bool = False, seed: int = 0,
            grad: bool = False) -> Any:
    """`model(*inputs)` as repfuse runs every model: without gradients (unless `grad`), on its own fresh
    copy of every input (a forward may change its input in place), with the random generator seeded (and
    the caller's state kept), and leaving the model exactly as it was (buffers a forward updates,
    attributes it sets). With `float64`, every floating computation is float64 (casts included)."""
    fresh = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    guard = E.preserved_state(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    mode = Float64Mode() if float64 else contextlib.nullcontext()
    with guard, seeded(model, seed), torch.set_grad_enabled(grad), mode:
        return model(*fresh)


@contextlib.contextmanager
def seeded(model: Any, seed: int) -> Iterator[None]:
    """The random generators seeded with `seed` (those of `model`'s CUDA devices too) inside, and as they
    were outside: every forward repfuse compares draws the same random numbers."""
    devices = sorted({t.device.index or 0 for t in _tensors(model) if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _tensors(model: Any) -> list[torch.Tensor]:
    if not isinstance(model, nn.Module):
        return []
    return [*model.parameters(), *model.buffers()]


def run(model: Any, inputs: tuple[torch.Tensor, ...], *, float64: bool = False, seed: int = 0) -> list[torch.Tensor]:
    """The output tensors of `outputs(model, inputs)`, flattened."""
    return flat_outputs(outputs(model, inputs, float64=float64, seed=seed))


class Runs:
    """Forwards already made on verification's seeded inputs, for the stage that needs the same run
    again: `outputs(model, make_inputs(shapes, dtype, seed), seed=seed)`, in the model's own dtype or in
    float64. The check that the model runs is trial 0 of the original; the analysis's float64 forward is
    the exactness reference of its shape set; the deploy model's trial 0 is what the written file must
    reproduce; a model-dtype run counted with FlopCounterMode gives the summary's MACs. A stored run is
    handed out once (`keep` stores it again), so nothing outlives the stage that needs it."""

    def __init__(self) -> None:
        self._out: dict[tuple[Any, ...], tuple[nn.Module, Any]] = {}
        self._macs: dict[tuple[Any, ...], tuple[nn.Module, int | None]] = {}

    @staticmethod
    def _key(model: Any, shapes: Sequence[tuple[int, ...]], seed: int, float64: bool) -> tuple[Any, ...]:
        return id(model), tuple(tuple(s) for s in shapes), seed, float64

    def put(self, model: Any, shapes: Sequence[tuple[int, ...]], seed: int, out: Any, *,
            float64: bool = False) -> None:
        self._out[self._key(model, shapes, seed, float64)] = (model, out)

    def get(self, model: Any, shapes: Sequence[tuple[int, ...]], seed: int, *, float64: bool = False,
            count: bool = False, keep: bool = False) -> Any:
        """The run's outputs: a stored one (removed unless `keep`), else a fresh run (stored with `keep`).
        `count`: also count its MACs (model dtype only), unless they are counted already."""
        key = self._key(model, shapes, seed, float64)
        hit = self._out.get(key)
        if hit is not None and hit[0] is model:
            if not keep:
                del self._out[key]
            return hit[1]
        x = make_inputs(shapes, torch.float64 if float64 else model_dtype(model), seed)
        counting = count and not float64 and self.macs(model, shapes, seed) is UNCOUNTED
        out = self._counted(model, x, seed, key) if counting else outputs(model, x, float64=float64, seed=seed)
        if keep:
            self._out[key] = (model, out)
        return out

    def _counted(self, model: Any, x: tuple[torch.Tensor, ...], seed: int, key: tuple[Any, ...]) -> Any:
        try:
            out, macs = _counted_run(model, x, seed)
        except Exception:  # a forward the counter cannot follow: run it plainly (its own errors surface)
            self._macs[key] = (model, None)
            return outputs(model, x, seed=seed)
        self._macs[key] = (model, macs)
        return out

    def macs(self, model: Any, shapes: Sequence[tuple[int, ...]], seed: int) -> Any:
        """The MACs counted on a run of `model` at `shapes` (None: it could not be counted), else UNCOUNTED."""
        hit = self._macs.get(self._key(model, shapes, seed, False))
        return hit[1] if hit is not None and hit[0] is model else UNCOUNTED


UNCOUNTED = object()


def check_runs(model: nn.Module, shapes: Sequence[tuple[int, ...]], seed: int, runs: Runs | None = None) -> None:
    """Raise a RepfuseError with a hint when the model cannot run on inputs of `shapes` (with `runs`, the
    run is kept there, its MACs counted: it is trial 0 of the verification)."""
    try:
        (runs or Runs()).get(model, shapes, seed, count=runs is not None, keep=True)
    except RepfuseError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        shown = " ".join("x".join(map(str, s)) for s in shapes)
        raise RepfuseError(f"the model does not run on input shape {shown}: {first[:200]}",
                           "pass the right --input-shape (one per model input), e.g. "
                           "--input-shape 1,3,224,224") from exc


# ----------------------------------------------------------------------------------------------
# Which shapes to check


Shapes = tuple[tuple[int, ...], ...]


def _other_size(n: int) -> int:
    """A smaller size of the other parity (about a quarter for large sizes, never below 33 or 1)."""
    t = max(n // 4, min(n - 1, 33))
    if t % 2 == n % 2:
        t += 1
    return t if 1 <= t != n else n + 1


def candidate_shapes(shapes: Shapes) -> list[Shapes]:
    """Other input shapes worth checking, cheapest first: batch + 1 with every spatial axis (axes ≥ 2)
    resized to the other parity, smaller, then larger; token inputs [B, L, C] with axis 1 resized; and
    batch + 1 alone. The caller keeps the first one the original model accepts."""
    def each(f: Any) -> Shapes:
        return tuple(f(s) for s in shapes)

    out: list[Shapes] = []
    if any(len(s) > 2 for s in shapes):
        out.append(each(lambda s: (s[0] + 1, *s[1:2], *(_other_size(n) for n in s[2:]))))
        out.append(each(lambda s: (s[0] + 1, *s[1:2], *(n + 1 for n in s[2:]))))
    if any(len(s) == 3 for s in shapes):
        out.append(each(lambda s: (s[0] + 1, _other_size(s[1]), *s[2:]) if len(s) == 3 else (s[0] + 1, *s[1:])))
    out.append(each(lambda s: (s[0] + 1, *s[1:]) if s else s))
    return [c for i, c in enumerate(out) if c != tuple(shapes) and c not in out[:i]]


def shape_sets(values: Sequence[str] | None, parse: Callable[[str], tuple[int, ...]]) -> tuple[Shapes, ...] | None:
    """`--verify-shapes` values as `Options.verify_shapes`: nothing or 'auto' → None (chosen by
    `extra_shapes`); 'none' → () (the given shapes only); else one shape set per value, the shapes of
    several model inputs separated by ';' (each parsed by `parse`)."""
    words = [v.strip().lower() for v in values or ()]
    if not words or words == ["auto"]:
        return None
    if words in (["none"], ["off"]):
        return ()
    if any(w in ("auto", "none", "off") for w in words):
        raise RepfuseError(f"--verify-shapes {' '.join(values or ())}: 'auto' and 'none' stand alone",
                           "give either 'auto', 'none', or shapes such as --verify-shapes 2,3,57,57")
    return tuple(tuple(parse(part) for part in v.split(";") if part.strip()) for v in values or ())


def extra_shapes(model: nn.Module, shapes: Shapes, seed: int, runs: Runs | None = None,
                 ) -> tuple[list[Shapes], list[Shapes]]:
    """(extra shapes to check, candidates the original rejects): the first candidate (see
    `candidate_shapes`) that the original model runs on — a model that accepts one size only is then
    checked at another batch size at least, where it accepts that. With `runs`, the accepted run is kept
    there (on inputs of `seed`: pass the seed verification gives that shape set)."""
    rejected = []
    for cand in candidate_shapes(shapes):
        try:
            (runs or Runs()).get(model, cand, seed, keep=True)
        except RepfuseError:
            raise
        except Exception:
            rejected.append(cand)
            continue
        return [cand], rejected
    return [], rejected


# ----------------------------------------------------------------------------------------------
# Comparing


def _errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float, float]:
    """(max abs error, max |reference|, norm-wise relative error) over all outputs."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf"), 0.0, float("inf")
    err = scale = 0.0
    for x, y in zip(a, b):
        if x.numel() == 0:
            continue
        d = (x.detach().double() - y.detach().double()).abs()
        e = float(d.max()) if not torch.isnan(d).any() else float("inf")
        err = max(err, e)
        scale = max(scale, float(y.detach().double().abs().max()))
    return err, scale, err / scale if scale > 0 else err


def interface_difference(ref: Any, got: Any) -> str | None:
    """How `got` differs from `ref` in structure (tuple/list/dict/namedtuple), shapes, dtypes or devices."""
    la, sa = tree_flatten(ref)
    lb, sb = tree_flatten(got)
    if sa != sb:
        return f"the output structure differs ({type(ref).__name__} vs {type(got).__name__}: {sa} vs {sb})"
    for i, (x, y) in enumerate(zip(la, lb)):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return f"output {i} is {type(x).__name__} in the original, {type(y).__name__} in the deploy model"
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return f"output {i} has shape {tuple(x.shape)} in the original, {tuple(y.shape)} in the deploy model"
            if x.dtype != y.dtype or x.device != y.device:
                return (f"output {i} is {x.dtype} on {x.device} in the original, {y.dtype} on {y.device} in "
                        "the deploy model")
        elif x != y:
            return f"output {i} is {x!r} in the original, {y!r} in the deploy model"
    return None


def compare(original: nn.Module, fused: nn.Module, shapes: Sequence[tuple[int, ...]], *, atol: float | None,
            rtol: float | None, trials: int, seed: int,
            worst_sites: Sequence[tuple[str, float]] = (), fused64: nn.Module | None = None,
            exact: bool = True, extra: Sequence[Shapes] | None = None, runs: Runs | None = None) -> Verification:
    """Run both models on `trials` seeded inputs in float64 and in the model's dtype, at `shapes`, and
    once more at every shape of `extra` (None: one other size and batch the original accepts, chosen by
    `extra_shapes`; (): none). Outputs must also agree in structure, dtype and device.

    `fused64` is the fused model before its new weights were cast to the model's dtype (the
    exactness check needs float64 weights); without it, `fused` is upcast. With `exact=False`
    (two checkpoints compared as stored) the float64 figure is reported but does not decide. `runs`
    holds forwards made already (see `Runs`); the deploy model's first run at every shape set is left
    there, and the MACs of both models at `shapes` are counted there.
    """
    dtype = model_dtype(original)
    d_atol, d_rtol = default_tolerances(dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    shapes = tuple(tuple(s) for s in shapes)
    runs = Runs() if runs is None else runs
    others = (extra_shapes(original, shapes, seed + trials, runs)[0] if extra is None
              else [tuple(map(tuple, e)) for e in extra])
    # float64 runs use the models as they are, under Float64Mode (which upcasts every weight as it is used,
    # exactly): no float64 copy of either model is held; `outputs` leaves each model as it was
    twin = fused64 if fused64 is not None else fused
    exact_abs = exact_rel = max_abs = max_rel = 0.0
    passed, message = True, ""
    for shape_set, trial_seed, exact_run in trial_runs(shapes, others, trials, seed):
        where = "" if shape_set == shapes else f" at input shape {_fmt_shapes(shape_set)}"
        e_abs = e_rel = 0.0
        ref64 = None  # the original in float64: for exactness, and for the fallback of the dtype check

        def reference(shape_set: Shapes = shape_set, trial_seed: int = trial_seed) -> list[torch.Tensor]:
            return flat_outputs(runs.get(original, shape_set, trial_seed, float64=True))

        if exact_run:
            ref64 = reference()
            x64 = make_inputs(shape_set, torch.float64, trial_seed)
            e_abs, _, e_rel = _errors(flat_outputs(outputs(twin, x64, float64=True, seed=trial_seed)), ref64)
        exact_abs, exact_rel = max(exact_abs, e_abs), max(exact_rel, e_rel)
        # the deploy model itself, in its own dtype (for a float64 model too: fused64 is a copy)
        first = trial_seed == seed
        out_ref = runs.get(original, shape_set, trial_seed, count=first)
        out_fused = runs.get(fused, shape_set, trial_seed, count=first, keep=exact_run)
        ref_d, fused_d = flat_outputs(out_ref), flat_outputs(out_fused)
        a_abs, a_scale, a_rel = _errors(fused_d, ref_d)
        ok = a_abs <= atol + rtol * a_scale
        if not ok:  # or no further from the float64 reference than the original's own rounding (×2 + atol)
            ref64 = reference() if ref64 is None else ref64
            ok = _errors(fused_d, ref64)[0] <= 2 * _errors(ref_d, ref64)[0] + atol
        max_abs, max_rel = max(max_abs, a_abs), max(max_rel, a_rel)
        interface = interface_difference(out_ref, out_fused)
        if interface and passed:
            passed, message = False, f"{interface}{where}"
        elif exact and not (e_rel <= EXACT_RTOL) and passed:
            passed = False
            message = (f"float64 outputs differ by {e_abs:.3g} (relative {e_rel:.3g} > {EXACT_RTOL:g}){where}: "
                       "a fusion is wrong, not just rounded")
        elif not ok and passed:
            passed = False
            message = (f"{dtype} outputs differ by {a_abs:.3g} (> atol {atol:g} + rtol {rtol:g} × "
                       f"{a_scale:.3g}){where}")
    worst = tuple(sorted(worst_sites, key=lambda kv: -kv[1])[:5]) if not passed else ()
    return Verification(passed=passed, max_abs_error=max_abs, max_rel_error=max_rel,
                        exact_max_abs_error=exact_abs, exact_max_rel_error=exact_rel, atol=atol, rtol=rtol,
                        trials=trials, input_shape=shapes, seed=seed,
                        dtype=str(dtype).removeprefix("torch."), worst_sites=worst, message=message,
                        shapes_checked=(shapes, *others))


def trial_runs(shapes: Shapes, others: Sequence[Shapes], trials: int, seed: int) -> list[tuple[Shapes, int, bool]]:
    """(shape set, seed of its inputs, checked for exactness) of every run `compare` makes: `trials` at
    `shapes`, then one per extra shape set. Exactness is maths: one input per shape set decides it."""
    main = [(shapes, seed + t, t == 0) for t in range(trials)]
    return main + [(tuple(s), seed + trials + i, True) for i, s in enumerate(others)]


def _fmt_shapes(shapes: Shapes) -> str:
    return " ".join("x".join(map(str, s)) for s in shapes)


def count_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int | None:
    """Multiply-accumulates of one forward (FlopCounterMode flops / 2); None if it cannot count."""
    try:
        return _counted_run(model, inputs, 0)[1]
    except Exception:
        return None


def _counted_run(model: Any, inputs: tuple[torch.Tensor, ...], seed: int) -> tuple[Any, int]:
    """`outputs(model, inputs, seed=seed)` and its multiply-accumulates (FlopCounterMode flops / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = outputs(model, inputs, seed=seed)
    return out, int(counter.get_total_flops() // 2)
