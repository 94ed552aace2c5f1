"""Candidate expressions (pass 1): every node's value as ``op(earlier value)``, one per earlier node it
is an affine function of. Reads only.

Each builder here composes the lowered ops of `lowering` with the algebra of `kernels` (parallel sums,
chains, a zero pad whose ring is refilled, reshapes that keep the last axis, constants per channel on
axis 1 or on the last axis, as channels-last layer scales and biases next to a Linear, layout-only steps such
as permutes between an affine op and a layer (`layouts`), a child's affine end (`suffix`)); a composition that is
not exact reports why (`Analysis.skip`). Nothing here knows any architecture.
"""

from __future__ import annotations

import math
from collections import ChainMap
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from . import kernels as K
from . import layouts as Y
from . import lowering as L
from . import suffix as S
from .pads import filled_pad  # noqa: F401  (analysis calls it as candidates.filled_pad)
from .reach import reached
from .regions import folds_layer, site_label

if TYPE_CHECKING:
    from .analysis import Analysis

MAX_BASES = 8  # candidate expressions kept per node: bounds the work on long affine chains
# Cost is judged on the region finally written (`regions`), never on partial sums or chains on the way (DBB's
# 1×1 → avg-pool branch alone costs 9× its ops, the block's sum much less). What bounds the work is size: a
# candidate kernel may hold at most this many times the weights of the model's largest layer, checked before
# it is built, so a depthwise → pointwise chain never builds a dense kernel the model could not fuse anyway
CANDIDATE_WEIGHT_LIMIT = 4


def weight_budget(root: torch.nn.Module) -> int:
    """The most weights one candidate kernel may hold: CANDIDATE_WEIGHT_LIMIT × the largest layer's."""
    largest = max((t.numel() for t in root.parameters() if t.dim() >= 2), default=0)
    return CANDIDATE_WEIGHT_LIMIT * max(largest, 1 << 16)


def through_layout(node: fx.Node, x: fx.Node, values: dict[fx.Node, Any],
                    base_cands: dict[fx.Node, L.Expr]) -> dict[fx.Node, L.Expr]:
    """A reshape that keeps the last axis whole passes the last-axis (nd == 0) expressions through (and
    goes with them); any other layout step a value goes through (`layouts`: a flatten that keeps the
    layer's channel axis whole) stays in the graph, recorded on the expression."""
    a, b = values.get(x), values.get(node)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 or b.dim() < 2:
        return {}
    if not L.layout_is_generic(node):  # a literal size: the same reshape only at the recorded size
        return {}
    keeps_last = a.shape[-1] == b.shape[-1] and a.numel() == b.numel()
    step = Y.step_of(node, x, values, {})
    out = {}
    for base, e in base_cands.items():
        plain = _in_layout(e, 0, _start(e, base, values)) if e.op.is_identity else e
        if keeps_last and plain is not None and plain.op.nd == 0 and not plain.partial and not Y.has_layout(e):
            out[base] = replace(plain, nodes=plain.nodes | {node})
        elif step is not None:
            moved = Y.through(e, step, b)
            if moved is not None:
                out[base] = moved
    return out


def _start(e: L.Expr, base: fx.Node, values: dict[fx.Node, Any]) -> Any:
    """The value `e.op` reads: `base`'s, or that of the last layout step before the op."""
    return values.get(e.pre[-1].node) if e.pre else values.get(base)


def _in_layout(e: L.Expr, nd: int, value: Any) -> L.Expr | None:
    """A node's identity expression on itself, re-expressed for an op with `nd` spatial axes:
    channel-first ([N, C, *S]) for nd ≥ 1, last-axis ([..., C]) for nd == 0."""
    if e.op.nd == nd or not isinstance(value, torch.Tensor):
        return e
    if nd == 0:
        return replace(e, op=K.identity_op(value.shape[-1], 0))
    if value.dim() == nd + 2:
        return replace(e, op=K.identity_op(value.shape[1], nd))
    return None


def self_cands(node: fx.Node, values: dict[fx.Node, Any]) -> dict[fx.Node, L.Expr]:
    shape = L._tensor_shape(values.get(node))
    if shape is None or len(shape) < 2:
        return {}
    op = K.identity_op(shape[1], len(shape) - 2)
    return {node: L.Expr(op, frozenset(), 0, ("identity",))}


def is_sum(node: fx.Node) -> bool:
    key = L.call_key(node)
    return key in L._ADD or key in L._SUB


def sum_cands(node: fx.Node, operands: list[fx.Node], cands: dict[fx.Node, dict[fx.Node, L.Expr]],
               result: Analysis, path: str, values: dict[fx.Node, Any]) -> dict[fx.Node, L.Expr]:
    """`a + b`, `a - b`, `torch.add(a, b, alpha=k)`."""
    u, v = node.args[0], node.args[1]
    if not (isinstance(u, fx.Node) and isinstance(v, fx.Node)):
        return {}
    alpha = node.kwargs.get("alpha", 1)
    if len(node.args) > 2 or not isinstance(alpha, (int, float)):
        return {}
    sign = -1.0 if L.call_key(node) in L._SUB else 1.0
    return _sum_terms(node, [(u, 1.0), (v, sign * alpha)], frozenset(), cands, result, path, values)


def stacked_sum(node: fx.Node, cands: dict[fx.Node, dict[fx.Node, L.Expr]], result: Analysis, path: str,
                 values: dict[fx.Node, Any]) -> dict[fx.Node, L.Expr]:
    """`torch.stack([a, b, c]).sum(0)` (or `torch.sum(torch.stack(...), dim=0)`)."""
    stack = node.args[0] if node.args else None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not (isinstance(stack, fx.Node) and L.call_key(stack) is torch.stack and dim in (0, (0,))
            and len(stack.users) == 1 and not node.kwargs.get("keepdim", False)):
        return {}
    items = stack.args[0]
    stack_dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    if stack_dim != 0 or not isinstance(items, (list, tuple)) or not all(isinstance(n, fx.Node) for n in items):
        return {}
    return _sum_terms(node, [(n, 1.0) for n in items], frozenset({stack}), cands, result, path, values)


def _sum_terms(node: fx.Node, terms: list[tuple[fx.Node, float]], extra: frozenset[fx.Node],
               cands: dict[fx.Node, dict[fx.Node, L.Expr]], result: Analysis, path: str,
               values: dict[fx.Node, Any]) -> dict[fx.Node, L.Expr]:
    """Σ coeff · term as one op, for every base all terms share."""
    per_term = [cands.get(t, {}) for t, _ in terms]
    out: dict[fx.Node, L.Expr] = {}
    first_reason = None
    for base in set.intersection(*(set(c) for c in per_term)):
        exprs = [c[base] for c in per_term]
        if any(e.partial for e in exprs):
            continue
        if any(Y.has_layout(e) or e.strips is not None for e in exprs):
            continue  # a term that goes through a layout op is no conv of the base on its own
        layout = next((e.op.nd for e in exprs if not e.op.is_identity), exprs[0].op.nd)
        exprs = [_in_layout(e, layout, values.get(base)) if e.op.is_identity else e for e in exprs]
        if any(e is None for e in exprs):
            continue
        op, reason = K.parallel_sum([K.scale_op(e.op, k) if k != 1 else e.op for e, (_, k) in zip(exprs, terms)])
        if op is None:
            first_reason = first_reason or reason
            continue
        cost = sum(e.cost for e in exprs)
        if op.num_weights > result.weight_budget:
            first_reason = first_reason or _too_large(op.num_weights, result)
            continue
        out[base] = L.Expr(op, frozenset().union(*(e.nodes for e in exprs)) | extra | {node},
                           sum(e.ops for e in exprs) + len(exprs) - 1, sum((e.terms for e in exprs), ()),
                           sum(e.norms for e in exprs), sum(e.scales for e in exprs) + sum(k != 1 for _, k in terms),
                           sum((e.leaves for e in exprs), ()), cost)
    if not out and first_reason:
        result.skip(site_label(path, node), first_reason)
    return _cap(out)


def _cap(c: dict[fx.Node, L.Expr]) -> dict[fx.Node, L.Expr]:
    if len(c) <= MAX_BASES:
        return c
    keep = sorted(c.items(), key=lambda kv: len(kv[1].nodes))[:MAX_BASES]
    return dict(keep)


def unary_info(node: fx.Node, x: fx.Node, values: dict[fx.Node, Any], constants: set[fx.Node],
                result: Analysis, prefix: str) -> L.LeafInfo | None:
    """The op that `node` applies to its one non-constant input `x`."""
    shape = L._tensor_shape(values.get(x))
    if node.op == "call_module":
        child = node.graph.owning_module.get_submodule(node.target)
        if node.args != (x,) or node.kwargs:
            return None
        info = result.leaves.get(id(child))
        if info is None:
            return _layout_info(node, x, values, result)
        if info.op is None:
            return info
        if shape is not None and len(shape) >= 2 and info.op.in_channels != shape[1 if info.op.nd else -1]:
            return None  # a child called again on other channels (one Dropout after fc1 and fc2): not this op
        return info
    if shape is None or len(shape) < 2:
        return None
    key = L.call_key(node)
    args = [values[a] if isinstance(a, fx.Node) and a in constants else a for a in node.args]
    kwargs = {k: values[a] if isinstance(a, fx.Node) and a in constants else a for k, a in node.kwargs.items()}
    nd = len(shape) - 2
    other = [a for a in args if not (isinstance(a, fx.Node) and a is x)]
    if key in L._MUL and len(args) == 2 and len(other) == 1:
        return _affine_info(other[0], shape, lambda s: (s, torch.zeros_like(s)), "scale", 1)
    if key in L._DIV and len(args) == 2 and args[0] is x:
        return _affine_info(args[1], shape, lambda s: (1.0 / s, torch.zeros_like(s)), "scale", 1, nonzero=True)
    if (key in L._ADD or key in L._SUB) and len(args) == 2 and len(other) == 1 and not kwargs:
        if key in L._SUB and args[1] is x:  # c − x
            return _affine_info(other[0], shape, lambda c: (-torch.ones_like(c), c), "bias", 1)
        sign = -1.0 if key in L._SUB else 1.0
        return _affine_info(other[0], shape, lambda c: (torch.ones_like(c), sign * c), "bias", 0)
    if key in L._NEG:
        last = K.scale_op(K.identity_op(shape[-1], 0), -1.0) if nd else None
        return L.LeafInfo(K.scale_op(K.identity_op(shape[1], nd), -1.0), "scale", scales=1,
                          terms=("identity",), last_axis=last)
    if key in Y.PERMUTES or key in Y.TRANSPOSES:
        return _layout_info(node, x, values, result)
    if args and args[0] is x:
        info = L.lower_function(node, args, kwargs, shape)
        if info is not None:
            return replace(info, leaves=(f"{prefix}{node.name}",))
    return None


def _layout_info(node: fx.Node, x: fx.Node, values: dict[fx.Node, Any], result: Analysis) -> L.LeafInfo | None:
    """A layout-only op (`layouts`), with an identity placeholder as its op; or a child whose whole forward
    is one op with layout steps around it, which the parent writes anew (`layouts.lift`)."""
    step = Y.step_of(node, x, values, result.plans)
    shape = values[x].shape
    if step is None and node.op == "call_module":
        plan = result.plans.get(id(node.graph.owning_module.get_submodule(node.target)))
        e = getattr(plan, "layout_summary", None)
        if e is None or node.args != (x,) or node.kwargs or (e.pre and e.pre[0].rank_in != len(shape)) \
                or (not e.pre and e.op.in_channels != shape[1 if e.op.nd else -1]):
            return None
        return L.LeafInfo(e.op, "block", ops=e.ops, terms=e.terms, norms=e.norms, scales=e.scales, leaves=e.leaves,
                          cost=e.cost, pre=Y.lift(e.pre, node.target), post=Y.lift(e.post, node.target))
    if step is None:
        return None
    return L.LeafInfo(K.identity_op(shape[1], len(shape) - 2), "layout", ops=0, terms=("identity",), layout=step)


def _affine_info(value: Any, shape: tuple[int, ...], affine: Any, kind: str, scales: int,
                 nonzero: bool = False) -> L.LeafInfo | None:
    """``scale · x + shift`` with a constant per channel (axis 1, as a BN) or per entry of the last axis (a
    channels-last layer scale or bias, as a Linear's output); a scalar gives both (`last_axis`)."""
    ops = []
    for c, nd in ((L.channel_constant(value, shape), len(shape) - 2),
                  (L.channel_constant(value, shape, -1) if len(shape) > 2 else None, 0)):
        if c is None or (nonzero and bool(torch.any(c == 0))):
            continue
        scale, shift = affine(c)
        ops.append(K.channel_affine(scale, shift, nd))
    if not ops:
        return None
    return L.LeafInfo(ops[0], kind, scales=scales, terms=("identity",), last_axis=ops[1] if len(ops) > 1 else None)


def extend(node: fx.Node, x: fx.Node, info: L.LeafInfo, base_cands: dict[fx.Node, L.Expr],
            result: Analysis, path: str, values: Any, rank: int | None = None) -> dict[fx.Node, L.Expr]:
    """Candidates of `node = info(x)`: info composed after each candidate of x (`rank`: that of the value
    info reads, when not x's own: after a child's layout steps). Where info is a layer and x a child call
    with an affine end (`suffix`), the layer takes that end in, when it composes."""
    out = _around(node, x, info, base_cands, result, path, values) if info.pre or info.post else \
        _extend(node, x, info, base_cands, result, path, values, rank)
    layer = info.layout is None and not info.op.is_diagonal and folds_layer(info.terms)
    stripped = _stripped(node, x, result, path, values) if layer and rank is None and x in base_cands else None
    if stripped is not None:
        taken = _around(node, x, info, {x: stripped}, result, path, values) if info.pre or info.post else \
            _extend(node, x, info, {x: stripped}, result, path, values, rank)
        if x in taken:
            out[x] = taken[x]
    return out


def _extend(node: fx.Node, x: fx.Node, info: L.LeafInfo, base_cands: dict[fx.Node, L.Expr],
            result: Analysis, path: str, values: Any, rank: int | None) -> dict[fx.Node, L.Expr]:
    out: dict[fx.Node, L.Expr] = {}
    for base, e in base_cands.items():
        if e.partial or (info.partial and base is x):  # base x alone: the child's own business
            continue
        step = info
        if info.layout is not None:
            moved = Y.through(e, info.layout, values.get(node))
            if moved is not None:
                out[base] = moved
            continue
        if e.post:
            _after_layout(node, base, e, info, out, result, path, rank or values[x].dim())
            continue
        if e.op.is_identity:  # an identity takes the layout of the op applied to it
            e = _in_layout(e, info.op.nd, _start(e, base, values))
            if e is None:
                continue
        elif info.last_axis is not None and e.op.nd == 0 and info.op.nd != 0:  # a scalar after a last-axis op
            step = replace(info, op=info.last_axis, last_axis=None)
        elif e.op.nd != info.op.nd and info.kind in ("scale", "bias"):
            continue  # a constant on the other layout's channel axis (a per-width scale after a conv): opaque
        fits = e.op.nd == step.op.nd and e.op.out_channels == step.op.in_channels
        size = K.composed_numel(e.op, step.op) if fits else 0
        too_large = size > result.weight_budget
        op, reason = (None, None) if too_large else K.compose(e.op, step.op)
        cost = e.cost + step.input_cost() / math.prod(e.op.stride)
        if op is None:
            if base is not x and not too_large:  # a kernel not worth building is no site that was missed
                result.skip(site_label(path, node), reason or "not exact")
            continue
        out[base] = L.Expr(op, e.nodes | {node}, e.ops + info.ops, _chain_terms(e.terms, info),
                           e.norms + info.norms, e.scales + info.scales, e.leaves + info.leaves, cost,
                           partial=info.partial, pre=e.pre, strips=e.strips)
    return _cap(out)


def _stripped(node: fx.Node, x: fx.Node, result: Analysis, path: str, values: Any) -> L.Expr | None:
    """x's affine suffix as an expression of x's value without it, when `node` is x's only reader."""
    if x.op != "call_module" or set(x.users) != {node} or not isinstance(values.get(x), torch.Tensor):
        return None
    found = S.chain(x.graph.owning_module.get_submodule(x.target), result.plans)
    if found is None:
        return None
    for rel, link in found[0][:-1]:  # a module its suffix comes through, left as Python, must not read inside
        r = reached(link.module)
        if r.keep or r.subtrees:
            where = f"{x.target}.{rel}" if rel else str(x.target)
            result.skip(site_label(path, node), f"the affine end of '{x.target}' stays: the Python forward of "
                        f"'{where}' reads inside its children")
            return None
    e = found[1].expr
    return L.Expr(e.op, frozenset(), e.ops, ("identity",), e.norms, e.scales, e.leaves, e.cost, strips=e.op)


def _around(node: fx.Node, x: fx.Node, info: L.LeafInfo, base_cands: dict[fx.Node, L.Expr], result: Analysis,
            path: str, values: Any) -> dict[fx.Node, L.Expr]:
    """A child that is steps, an op, steps (`_layout_info`): each candidate of x through all three."""
    value, seen = values.get(x), {}
    for s in info.pre:  # the values the child's steps had (for the identity's channels)
        value = seen[s.node] = s.apply(value)
    view = ChainMap(seen, values)
    exprs = dict(base_cands)
    for s in info.pre:
        exprs = {b: m for b, e in exprs.items() if not e.partial and (m := Y.through(e, s, view[s.node])) is not None}
    exprs = _extend(node, x, replace(info, pre=(), post=()), exprs, result, path, view, value.dim())
    for s in info.post:
        exprs = {b: m for b, e in exprs.items() if (m := Y.through(e, s, values.get(node))) is not None}
    return exprs


def _after_layout(node: fx.Node, base: fx.Node, e: L.Expr, info: L.LeafInfo, out: dict[fx.Node, L.Expr],
                  result: Analysis, path: str, rank: int) -> None:
    """`info` after `e`, which ends in layout steps (a Linear → permute, then a BN2d)."""
    if info.partial:
        return
    op, pre, post, reason = Y.compose_after(e, info.op, info.last_axis, rank)
    if op is None:
        if reason and not e.op.is_identity:
            result.skip(site_label(path, node), reason)
        return
    if op.num_weights > result.weight_budget:
        return
    cost = e.cost + info.input_cost() / math.prod(e.op.stride)
    out[base] = L.Expr(op, e.nodes | {node}, e.ops + info.ops, _chain_terms(e.terms, info), e.norms + info.norms,
                       e.scales + info.scales, e.leaves + info.leaves, cost, pre=pre, post=post, strips=e.strips)


def _too_large(size: int, result: Analysis) -> str:
    return (f"one fused kernel would hold {size:,} weights, over {CANDIDATE_WEIGHT_LIMIT}× the model's largest "
            "layer: not built")


def _chain_terms(terms: tuple[str, ...], info: L.LeafInfo) -> tuple[str, ...]:
    if info.terms == ("identity",):  # BN, scale, bias, identity: the branches stay as they were
        return terms
    if info.kind == "block" and len(info.terms) > 1:
        inner = "+".join(info.terms)
        return (inner,) if terms == ("identity",) else (f"({'+'.join(terms)})→({inner})",)
    after = "+".join(info.terms)
    if terms == ("identity",):
        return (after,)
    before = terms[0] if len(terms) == 1 else f"({'+'.join(terms)})"
    return (f"{before}→{after}",)
