"""A zero pad whose border is then refilled in place with a per-channel constant (DBB's BNAndPadLayer):
``pad0(y − c) + c``, exact after any op whose shift is c. Split from `candidates` (pass 1)."""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from . import effects as E
from . import kernels as K
from . import layouts as Y
from . import lowering as L
from .regions import site_label

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["border_fill", "filled_pad"]


def filled_pad(node: fx.Node, x: fx.Node, values: dict[fx.Node, Any], base_cands: dict[fx.Node, L.Expr],
                result: Analysis, path: str) -> dict[fx.Node, L.Expr]:
    """`F.pad(y)` whose border is then overwritten in place with a per-channel constant c (DBB's
    BNAndPadLayer) is ``pad0(y − c) + c``: exact after any op whose shift is c (a BN). Any other
    in-place write makes the node opaque."""
    shape = L._tensor_shape(values.get(x))
    info = L.lower_function(node, list(node.args), dict(node.kwargs), shape) if shape else None
    if info is None or info.kind != "pad" or info.op is None:
        return {}
    writes = [u for u in node.users if E.inplace_target(u) is node]
    fill = border_fill(node, writes, info.op.padding, values)
    if fill is None:
        return {}
    nd = info.op.nd
    out: dict[fx.Node, L.Expr] = {}
    for base, e in base_cands.items():
        if e.partial or base is x or Y.has_layout(e) or e.strips is not None:
            continue
        shifted, _ = K.compose(e.op, K.channel_affine(torch.ones_like(fill), -fill, nd))
        tiny = shifted.bias.abs() <= 1e-12 * torch.maximum(fill.abs(), e.op.bias.abs()).clamp_min(1e-300)
        shifted = replace(shifted, bias=torch.where(tiny, torch.zeros_like(shifted.bias), shifted.bias))
        padded, reason = K.compose(shifted, info.op)
        if padded is None:
            result.skip(site_label(path, node), f"the pad ring is filled with a value that is not the shift before it "
                                            f"({reason})")
            continue
        op, _ = K.compose(padded, K.channel_affine(torch.ones_like(fill), fill, nd))
        out[base] = replace(e, op=op, nodes=e.nodes | {node} | set(writes), ops=e.ops + 1 + len(writes))
    return out


def border_fill(node: fx.Node, writes: list[fx.Node], pads: tuple[int, ...], values: dict[fx.Node, Any],
                ) -> torch.Tensor | None:
    """If the in-place `writes` on `node` (a zero-padded tensor) fill exactly its padded border with one
    per-channel constant, at every input size, that constant as a [C] vector (DBB's BNAndPadLayer); else
    None. Each write must index relative to the ends (`t[:, :, :p]`, `t[..., -p:]`), and the rings it fills
    must match at the recorded size and one larger size (with such indices, then at every size)."""
    value = values.get(node)
    if not isinstance(value, torch.Tensor) or not writes or any(w.target is not operator.setitem for w in writes):
        return None
    fill: torch.Tensor | None = None
    indices = []
    for w in writes:
        v = values.get(w.args[2]) if isinstance(w.args[2], fx.Node) else w.args[2]
        c = L.channel_constant(v, tuple(value.shape))
        if c is None or (fill is not None and not torch.equal(c, fill)):
            return None
        fill = c
        index = L.full_index(w.args[1], value.dim())
        if index is None or any(L.slice_form(sl) is None for sl in index):
            return None
        indices.append(index)
    for grow in (0, 1):
        shape = (1, 1, *(n + grow for n in value.shape[2:]))
        mask = torch.zeros(shape, dtype=torch.bool)
        try:
            for index in indices:
                mask[(slice(None), slice(None), *index[2:])] = True
        except (IndexError, TypeError):
            return None
        ring = torch.ones(shape, dtype=torch.bool)
        ring[(slice(None), slice(None), *(slice(p, size - p) for p, size in zip(pads, shape[2:])))] = False
        if not torch.equal(mask, ring):
            return None
    return fill
