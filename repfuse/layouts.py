"""Layout-only ops between an affine op and a layer: permutes, transposes, flattens (and modules whose
whole forward is such ops, as UniRepLKNet's NHWCtoNCHW).

A per-channel affine (a BN, a layer scale, a norm's affine step) commutes with any op that only moves
elements around, as long as that op keeps the channel axis whole: every element of channel c stays an
element of channel c, wherever it goes. So `Linear → permute → BN2d` is `permute(Linear'(x))` with the BN
folded into Linear' (the BN's channel axis, mapped back through the permute, is the Linear's feature axis),
and `BN2d → permute → Linear` is `Linear'(permute(x))`. The layout op itself stays in the deploy graph, on
its side of the fused layer (`Expr.pre`, `Expr.post`). Where the channel axis does not map onto the
layer's (a scale on the wrong axis, a flatten that merges the channel axis) the affine is not folded.

Every step here is shape-generic: its arguments are literals (no sizes read from the input), and what it
does to each axis depends only on the rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from . import kernels as K
from . import lowering as L
from .kernels import ConvOp

PERMUTES = {"permute", torch.permute}
TRANSPOSES = {"transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims}
FLATTENS = {"flatten", torch.flatten}


@dataclass(frozen=True, eq=False)
class LayoutStep:
    """One layout-only node: input axis i becomes output axis `axes[i]` (None: merged with others)."""

    node: fx.Node
    axes: tuple[int | None, ...]
    module: Any = None  # the child module a call_module step runs (its whole forward is layout ops)
    # None: `node` is in the graph that uses the step; else the dotted path of the child whose graph holds it
    # (a step of a child's forward, lifted into its parent, which writes it anew: `rewrite`)
    where: str | None = None

    @property
    def rank_in(self) -> int:
        return len(self.axes)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        n = self.node
        if n.op == "call_module":
            return self.module(t)
        if n.op == "call_method":
            return getattr(t, n.target)(*n.args[1:], **n.kwargs)
        return n.target(t, *n.args[1:], **n.kwargs)


def _dims(node: fx.Node, name: str, i: int, default: Any) -> Any:
    return node.kwargs[name] if name in node.kwargs else node.args[i] if len(node.args) > i else default


def _norm(d: Any, rank: int) -> int | None:
    if not isinstance(d, int) or isinstance(d, bool) or not -rank <= d < rank:
        return None
    return d % rank


def axes_of(node: fx.Node, rank: int) -> tuple[int | None, ...] | None:
    """What a permute / transpose / flatten call does to each axis of a rank-`rank` input, or None."""
    key = L.call_key(node)
    if key in PERMUTES:
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        dims = node.kwargs.get("dims", dims)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        perm = [_norm(d, rank) for d in dims]
        if len(perm) != rank or None in perm or sorted(perm) != list(range(rank)):
            return None
        out: list[int | None] = [None] * rank
        for j, p in enumerate(perm):
            out[p] = j
        return tuple(out)
    if key in TRANSPOSES:
        a, b = (_norm(_dims(node, n, i, None), rank) for n, i in (("dim0", 1), ("dim1", 2)))
        if a is None or b is None:
            return None
        swap = list(range(rank))
        swap[a], swap[b] = b, a
        return tuple(swap)
    if key in FLATTENS:
        s, e = (_norm(_dims(node, n, i, dflt), rank) for n, i, dflt in (("start_dim", 1, 0), ("end_dim", 2, -1)))
        if s is None or e is None or s > e:
            return None
        return tuple(i if i < s or (i == s == e) else i - (e - s) if i > e else None for i in range(rank))
    return None


def step_of(node: fx.Node, x: fx.Node, values: dict[fx.Node, Any], plans: dict[int, Any]) -> LayoutStep | None:
    """`node` as a layout step on its one tensor input `x`, checked against the recorded shapes."""
    a, b = values.get(x), values.get(node)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or not node.args or node.args[0] is not x:
        return None
    if L.runtime_value(node.args[1:]) or L.runtime_value(node.kwargs):
        return None  # an argument read from the input's shape: not the same op at every size
    module = None
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        steps = getattr(plans.get(id(module)), "layout", ())
        if len(node.args) != 1 or node.kwargs or not steps or steps[0].rank_in != a.dim():
            return None
        axes = compose_axes(steps)
    else:
        axes = axes_of(node, a.dim())
    if axes is None:
        return None
    step = LayoutStep(node, axes, module)
    try:
        same = step.apply(a).shape == b.shape
    except (RuntimeError, TypeError, ValueError, IndexError):
        same = False
    return step if same else None


def lift(steps: tuple[LayoutStep, ...], child: str) -> tuple[LayoutStep, ...]:
    """The steps of child `child`'s forward, as its parent uses them."""
    return tuple(replace(s, where=f"{child}.{s.where}" if s.where else child) for s in steps)


def compose_axes(steps: tuple[LayoutStep, ...]) -> tuple[int | None, ...]:
    return tuple(map_axis(steps, i) for i in range(steps[0].rank_in))


def map_axis(steps: tuple[LayoutStep, ...], axis: int | None) -> int | None:
    for s in steps:
        if axis is None:
            return None
        axis = s.axes[axis]
    return axis


def feature_axis(op: ConvOp, rank: int) -> int:
    """The axis an op's channels are on: 1 for a conv or a BN ([N, C, *S]), the last for a Linear."""
    return 1 if op.nd >= 1 else rank - 1


def apply_expr(expr: L.Expr, x: torch.Tensor) -> torch.Tensor:
    for s in expr.pre:
        x = s.apply(x)
    x = K.apply_op(expr.op, x)
    for s in expr.post:
        x = s.apply(x)
    return x


def has_layout(expr: L.Expr) -> bool:
    return bool(expr.pre or expr.post)


def layout_nodes(expr: L.Expr) -> set[fx.Node]:
    """The nodes of `expr`'s own graph that are layout steps (not those of a child it took in)."""
    return {s.node for s in (*expr.pre, *expr.post) if s.where is None}


def through(e: L.Expr, step: LayoutStep, value: Any) -> L.Expr | None:
    """`e` followed by the layout `step` (whose output is `value`). An identity turns into a layout before
    whatever op comes next; after any other op the step stays after it (where it merges the op's channel
    axis with others, nothing after it folds in: `compose_after` says why)."""
    if e.partial or not isinstance(value, torch.Tensor) or value.dim() < 2:
        return None
    nodes = e.nodes | {step.node} if step.where is None else e.nodes  # (a child's step: its call is the node)
    if e.op.is_identity and not e.post:
        return replace(e, op=K.identity_op(value.shape[1], value.dim() - 2), nodes=nodes, pre=(*e.pre, step))
    return replace(e, nodes=nodes, post=(*e.post, step))


def _what(op: ConvOp) -> str:
    return "linear" if op.nd == 0 else f"{K.describe_kernel(op.kernel_size)} conv"


def compose_after(e: L.Expr, op: ConvOp, alt: ConvOp | None, rank: int,
                  ) -> tuple[ConvOp | None, tuple[LayoutStep, ...], tuple[LayoutStep, ...], str | None]:
    """`op` (or `alt`, the same constant on the last axis) applied after `e`, which ends in layout steps;
    `rank` is the rank of the value `op` reads. Returns (op, pre, post, None) or (None, (), (), reason);
    a reason of None means the two simply do not compose (two layers with a layout op between them)."""
    lands = map_axis(e.post, feature_axis(e.op, e.post[0].rank_in))
    names = ", ".join(s.node.name for s in e.post)
    if lands is None and (op.is_diagonal or e.op.is_diagonal):
        return None, (), (), (f"the layout op ({names}) merges the {_what(e.op) if not e.op.is_diagonal else 'affine'}"
                              "'s channel axis with other axes: a per-channel affine does not map through it")
    if op.is_diagonal:  # a per-channel affine after the layout op: folds into e's op, the steps stay after
        for c in (op, alt):
            if c is not None and c.is_diagonal and feature_axis(c, rank) == lands \
                    and c.in_channels == e.op.out_channels:
                folded, reason = K.compose(e.op, K.channel_affine(c.weight.reshape(-1), c.bias, e.op.nd))
                return folded, e.pre, e.post, reason
        return None, (), (), (f"the per-channel affine after the layout op ({names}) acts on axis "
                               f"{feature_axis(op, rank)} of its input, but the {_what(e.op)}'s channels are on "
                               f"axis {lands} there: not folded")
    if e.op.is_diagonal and not e.pre:  # an affine before the layout op: folds into the layer after it
        if feature_axis(op, rank) == lands and op.in_channels == e.op.out_channels:
            folded, reason = K.compose(K.channel_affine(e.op.weight.reshape(-1), e.op.bias, op.nd), op)
            return folded, e.post, (), reason
        return None, (), (), (f"the per-channel affine before the layout op ({names}) has its channels on axis "
                               f"{lands} after it, but the {_what(op)} after it reads axis "
                               f"{feature_axis(op, rank)}: not folded")
    return None, (), (), None
