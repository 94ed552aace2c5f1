"""Running a model in float64 — and knowing the dtypes it would have had in its own precision.

repfuse analyses and checks exactness on a float64 copy of the model. A forward that casts
(`self.head(out.float())`), builds tensors with an explicit dtype, or opens an autocast region
would then mix dtypes and crash, or silently leave float64. `Float64Mode` is a torch function mode
under which every floating computation runs in float64: casts to other floating dtypes and
floating `dtype=` arguments become float64, floating arguments of other dtypes are upcast, autocast
is off.

With a `Shadows` registry it also tracks, for every tensor it makes, the dtype that tensor has when
the model runs in its own dtypes (its *shadow* dtype): casts, `dtype=` arguments and type promotion
(by running the op on meta tensors where the inputs' shadows differ). The analysis uses it for the
rule "a fused layer computes in the dtype of the values it replaces, or the site is skipped" (a
float64 buffer in a float32 model promotes the output to float64; a single float32 conv would not).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

F64 = torch.float64
_CASTS = {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
          torch.Tensor.bfloat16: torch.bfloat16, torch.Tensor.double: torch.float64}
_TO = {torch.Tensor.to, torch.Tensor.type, torch.Tensor.type_as}
_DTYPE_GET = torch.Tensor.dtype.__get__  # `x.dtype` reaches a torch function mode as this getter (compared with ==)


class Shadows:
    """tensor → the dtype it has in the model's own precision (weakly keyed by identity)."""

    def __init__(self, default: torch.dtype | None = None) -> None:
        self._table: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.default = default  # the model's own floating dtype (what a float64 `dtype=` stands for)

    def set(self, t: torch.Tensor, dtype: torch.dtype) -> None:
        self._table[t] = dtype

    def get(self, t: torch.Tensor) -> torch.dtype:
        return self._table.get(t, t.dtype)

    def of(self, value: Any) -> Any:
        """The shadow dtypes of a value's tensors, in the value's structure (None for non-tensors)."""
        return tree_map(lambda v: self.get(v) if isinstance(v, torch.Tensor) else None, value)

    def mark(self, value: Any, dtypes: Any) -> None:
        """Give the tensors of `value` the dtypes `dtypes` (as returned by `of`) — a snapshot of a value
        keeps the shadows of the original."""
        values, _ = tree_flatten(value)
        kinds, _ = tree_flatten(dtypes)
        if len(values) == len(kinds):
            for v, d in zip(values, kinds):
                if isinstance(v, torch.Tensor) and isinstance(d, torch.dtype):
                    self.set(v, d)


def _floating(d: Any) -> bool:
    return isinstance(d, torch.dtype) and d.is_floating_point


def _inplace(func: Any, kwargs: dict[str, Any]) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("_")) or "out" in kwargs or kwargs.get("inplace") is True


class Float64Mode(TorchFunctionMode):
    """Every floating computation in float64 (see the module docstring); `shadows` tracks the dtypes
    the same computation has in the model's own precision."""

    def __init__(self, shadows: Shadows | None = None) -> None:
        super().__init__()
        self.shadows = shadows

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if self.shadows is not None and func == _DTYPE_GET and len(args) == 1 and isinstance(args[0], torch.Tensor):
            # `x.dtype` reads x's dtype in the model's own precision: `y.to(x.dtype)`, `dtype=x.dtype` and
            # `x.dtype == torch.float16` then mean what they mean in the original (a float32 table cast to
            # an fp16 activation's dtype is fp16 there, not float32 because x is float64 here)
            return self.shadows.get(args[0])
        target: torch.dtype | None = None  # the dtype a cast asks for, in the model's own precision
        if func in _CASTS:
            target = _CASTS[func]
            func = torch.Tensor.double
        elif func in _TO:
            args, kwargs, target = self._cast_args(func, args, kwargs)
        elif _floating(kwargs.get("dtype")):
            target = kwargs["dtype"]
            kwargs["dtype"] = F64
            if target is F64 and self.shadows is not None:  # see _cast_args: `dtype=x.dtype` reads float64
                target = None if any(isinstance(t, torch.Tensor) and t.is_floating_point()
                                     for t in tree_flatten((args, kwargs))[0]) else self.shadows.default
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if any(t.is_floating_point() and t.dtype != F64 for t in tensors):
            keep = args[0] if args and _inplace(func, kwargs) else None
            def up(t: Any) -> Any:
                upcast = isinstance(t, torch.Tensor) and t is not keep and t.is_floating_point() and t.dtype != F64
                return t.double() if upcast else t

            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if target is not None and args and out is args[0] and self.shadows is not None \
                and self.shadows.get(out) != target:
            out = out.clone()  # a real cast copies: the source keeps its own dtype
        if self.shadows is not None:
            self._track(func, args, kwargs, tensors, out, target)
        return out

    def _cast_args(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                   ) -> tuple[tuple[Any, ...], dict[str, Any], torch.dtype | None]:
        """x.to(dtype) / x.to(other) / x.type(dtype) / x.type_as(other): the floating target becomes float64."""
        target = None
        new_args = list(args)
        # without shadows a float64 dtype object is what `x.dtype` reads whatever x's own dtype is (and a dtype
        # read before the mode may be one of the float64 copy's), so a cast to it keeps the source's dtype
        # (only .double() or a "torch.DoubleTensor" name is explicit)
        for i, a in enumerate(args[1:], 1):
            if _floating(a):
                target, new_args[i] = (None if a is F64 else a), F64
            elif isinstance(a, str) and func is torch.Tensor.type and a in _TYPE_NAMES:
                target, new_args[i] = _TYPE_NAMES[a], "torch.DoubleTensor"
            elif isinstance(a, torch.Tensor) and func in (torch.Tensor.to, torch.Tensor.type_as):
                if a.is_floating_point() and self.shadows is not None:
                    target = self.shadows.get(a)
        if _floating(kwargs.get("dtype")):
            target, kwargs["dtype"] = (None if kwargs["dtype"] is F64 else kwargs["dtype"]), F64
        other = kwargs.get("other")
        if isinstance(other, torch.Tensor) and other.is_floating_point() and self.shadows is not None:
            target = self.shadows.get(other)
        return tuple(new_args), kwargs, target

    def _track(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[torch.Tensor],
               out: Any, target: torch.dtype | None) -> None:
        shadows = self.shadows
        assert shadows is not None
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not outs:
            return
        if args and len(outs) == 1 and outs[0] is args[0] and _inplace(func, kwargs):
            return  # in place: self keeps its dtype
        if target is not None:
            for t in outs:
                shadows.set(t, target)
            return
        kinds = {shadows.get(t) for t in inputs if t.is_floating_point()}
        if len(kinds) <= 1:  # one floating dtype in (or none): dtype-preserving, or a fresh default-dtype tensor
            kind = kinds.pop() if kinds else None
            for t in outs:
                shadows.set(t, kind if kind is not None and t.dtype == F64 else t.dtype)
            return
        for t, d in zip(outs, _promoted(func, args, kwargs, shadows, len(outs))):
            shadows.set(t, d)


_TYPE_NAMES = {"torch.FloatTensor": torch.float32, "torch.HalfTensor": torch.float16,
               "torch.BFloat16Tensor": torch.bfloat16, "torch.DoubleTensor": torch.float64}


def _promoted(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], shadows: Shadows, n: int,
              ) -> list[torch.dtype]:
    """Output dtypes of `func` when its inputs have their shadow dtypes: the op run on meta tensors."""
    def meta(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.empty(v.shape, dtype=shadows.get(v), device="meta")
        return v

    try:
        res = func(*tree_map(meta, args), **tree_map(meta, kwargs))
        dts = [t.dtype for t in tree_flatten(res)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if len(dts) == n:
            return dts
    except Exception:  # an op without a meta kernel: fall back to plain promotion
        pass
    flat = [shadows.get(t) for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.is_floating_point()]
    kind = flat[0]
    for d in flat[1:]:
        kind = torch.promote_types(kind, d)
    return [kind] * n
