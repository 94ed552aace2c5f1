"""Candidate expressions (pass 1): every node's value as ``op(earlier value)``, one per earlier node it
is an affine function of. Reads only.

Each builder here composes the lowered ops of `lowering` with the algebra of `kernels` (parallel sums,
chains, a zero pad whose ring is refilled, reshapes that keep the last axis, constants per channel on
axis 1 or on the last axis, as channels-last layer scales and biases next to a Linear); a composition that is not
exact reports why (`Analysis.skip`). Nothing here knows any architecture.
"""

from __future__ import annotations

import math
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
        if e.partial or base is x or Y.has_layout(e):
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
        if any(Y.has_layout(e) for e in exprs):
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
        if op.weight.numel() > result.weight_budget:
            first_reason = first_reason or _too_large(op.weight.numel(), result)
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
    """A layout-only op (`layouts`), with an identity placeholder as its op."""
    step = Y.step_of(node, x, values, result.plans)
    if step is None:
        return None
    shape = values[x].shape
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
            result: Analysis, path: str, values: dict[fx.Node, Any]) -> dict[fx.Node, L.Expr]:
    """Candidates of `node = info(x)`: info composed after each candidate of x."""
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
            _after_layout(node, x, base, e, info, out, result, path, values)
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
                           partial=info.partial, pre=e.pre)
    return _cap(out)


def _after_layout(node: fx.Node, x: fx.Node, base: fx.Node, e: L.Expr, info: L.LeafInfo,
                  out: dict[fx.Node, L.Expr], result: Analysis, path: str, values: dict[fx.Node, Any]) -> None:
    """`info` after `e`, which ends in layout steps (a Linear → permute, then a BN2d)."""
    if info.partial:
        return
    op, pre, post, reason = Y.compose_after(e, info.op, info.last_axis, values[x].dim())
    if op is None:
        if reason and not e.op.is_identity:
            result.skip(site_label(path, node), reason)
        return
    if op.weight.numel() > result.weight_budget:
        return
    cost = e.cost + info.input_cost() / math.prod(e.op.stride)
    out[base] = L.Expr(op, e.nodes | {node}, e.ops + info.ops, _chain_terms(e.terms, info), e.norms + info.norms,
                       e.scales + info.scales, e.leaves + info.leaves, cost, pre=pre, post=post)


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
