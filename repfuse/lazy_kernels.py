"""Ops whose kernel is built when first read, and kept until `release`.

A wide layer's kernel costs a pass over fresh memory (page faults: about 1 s per GB here) each time
it is written. Two cases are written once instead:

- `ScaledOp`: conv → per-channel scale (conv → BN); ``base · scale[c_out]``. A child's summary that
  its parent has taken in holds no kernel of its own (the conv's weight is the model's).
- `SumOp`: a parallel sum's parts placed in one kernel. ``a + b + c`` is two sums: the inner one is
  never built, its parts are written straight into the outer one's kernel.

Everything else about them is a ConvOp's; `replace` on one gives a plain ConvOp (built). `rows` reads
some output channels of any op without building it.
"""

from __future__ import annotations

from typing import Any

import torch

from .convop import DT, ConvOp, Ints

LAZY_NUMEL = 1 << 20  # a conv → scale kernel of at least this many weights (8 MiB in float64) is a ScaledOp


class _Lazy(ConvOp):
    """The shared mechanics: `weight` builds the kernel (the subclass's `_write`) once and caches it;
    `release` drops the cache. `_add` and `_rows` read the kernel without building it."""

    def __new__(cls, *args: object, **kwargs: object) -> ConvOp:  # type: ignore[misc]
        return ConvOp(*args, **kwargs)  # type: ignore[arg-type]  # dataclasses.replace builds one this way

    @classmethod
    def _make(cls, like: ConvOp | None, **fields: Any) -> Any:
        op = object.__new__(cls)
        if like is not None:
            fields = {"stride": like.stride, "padding": like.padding, "dilation": like.dilation,
                      "groups": like.groups, "padding_mode": like.padding_mode, **fields}
        for name, value in {**fields, "built": None}.items():
            object.__setattr__(op, name, value)
        return op

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        built = self.__dict__["built"]
        if built is None:
            built = torch.empty(self.weight_shape, dtype=DT)
            write_into(self, built)
            object.__setattr__(self, "built", built)
        return built

    @property
    def unbuilt(self) -> bool:
        return self.__dict__["built"] is None

    def release(self) -> None:
        object.__setattr__(self, "built", None)

    def _write(self, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _add(self, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


class ScaledOp(_Lazy):
    """A conv followed by a per-channel scale: weight ``base · scale[c_out]`` (see the module docstring)."""

    @classmethod
    def of(cls, base: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, like: ConvOp) -> ScaledOp:
        return cls._make(like, bias=bias, base=base, scale=scale)

    @property
    def weight_shape(self) -> torch.Size:
        return self.base.shape

    def _write(self, out: torch.Tensor) -> None:
        torch.mul(self.base, per_output(self.scale, self.base), out=out)

    def _add(self, out: torch.Tensor) -> None:
        out.addcmul_(self.base, per_output(self.scale, self.base))

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.base[index] * per_output(self.scale[index], self.base)

    def __repr__(self) -> str:
        return f"ScaledOp({tuple(self.base.shape)}, stride={self.stride}, padding={self.padding}, groups={self.groups})"


class SumOp(_Lazy):
    """Σ parts in one kernel of `shape` (see the module docstring). Each part is an op in this sum's
    groups and dilation and the offset of its first tap in the kernel."""

    @classmethod
    def of(cls, parts: tuple[tuple[ConvOp, Ints], ...], shape: tuple[int, ...], bias: torch.Tensor,
           stride: Ints, padding: Ints, dilation: Ints, groups: int, padding_mode: str) -> SumOp:
        return cls._make(None, parts=parts, shape=torch.Size(shape), bias=bias, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, padding_mode=padding_mode)

    @property
    def weight_shape(self) -> torch.Size:
        return self.shape

    def _write(self, out: torch.Tensor) -> None:
        size = tuple(out.shape[2:])
        full = next((i for i, (part, _) in enumerate(self.parts) if tuple(part.kernel_size) == size), None)
        if full is None:
            out.zero_()
        else:
            write_into(self.parts[full][0], out)
        for i, (part, offset) in enumerate(self.parts):
            if i != full:
                add_into(part, _window(out, offset, part.kernel_size))

    def _add(self, out: torch.Tensor) -> None:
        for part, offset in self.parts:
            add_into(part, _window(out, offset, part.kernel_size))

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((len(index), *self.shape[1:]), dtype=DT)
        for part, offset in self.parts:
            _window(out, offset, part.kernel_size).add_(rows(part, index))
        return out

    def __repr__(self) -> str:
        return f"SumOp({tuple(self.shape)}, {len(self.parts)} parts, stride={self.stride}, padding={self.padding})"


def _window(kernel: torch.Tensor, offset: Ints, size: Ints) -> torch.Tensor:
    return kernel[(slice(None), slice(None), *(slice(o, o + k) for o, k in zip(offset, size)))]


def write_into(op: ConvOp, out: torch.Tensor) -> None:
    """out[...] = op's kernel (`out` may hold anything before), without building a lazy op's own kernel."""
    if isinstance(op, _Lazy) and op.unbuilt:
        op._write(out)
    else:
        out.copy_(op.weight)


def add_into(op: ConvOp, out: torch.Tensor) -> None:
    """out += op's kernel, without building a lazy op's own kernel."""
    if isinstance(op, _Lazy) and op.unbuilt:
        op._add(out)
    else:
        out += op.weight


def per_output(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`scale` [C_out] shaped to multiply `weight` [C_out, ...] output channel by output channel."""
    return scale.reshape(-1, *([1] * (weight.dim() - 1)))


def rows(op: ConvOp, index: torch.Tensor) -> torch.Tensor:
    """op.weight[index] (output channels), without building a lazy op's whole kernel."""
    return op._rows(index) if isinstance(op, _Lazy) and op.unbuilt else op.weight[index]


def release(op: ConvOp | None) -> None:
    """Drop the built kernel of a lazy op (see there); nothing for any other op."""
    if isinstance(op, _Lazy):
        op.release()
