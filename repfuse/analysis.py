"""Pass 1 of the engine: find every linear sub-graph that is exactly one conv. Reads, never mutates.

Deepest modules first: lower each module to an affine op where it is one (a *summary*), else trace
it and, in its graph, give every node its candidate expressions ``value = op(earlier value)`` (one
per earlier node it is an affine function of), then choose the largest valid regions. A module
whose forward *starts* affine gets a `Prefix` its parent may fold in.

New kinds of branch go in `graph.lower_module` / `graph.lower_function` (a layer as a `ConvOp`) or
in `kernels` (how ops combine); nothing here knows any architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import graph as G
from . import kernels as K
from .kernels import ConvOp
from .modules import UnsupportedProgram, graph_to_program
from .types import SkippedSite

MAX_BASES = 8  # candidate expressions kept per node: bounds the work on long affine chains
COST_SLACK = 1.0 + 1e-9  # a fused layer may not cost more multiply-adds than the ops it replaces
# ... but a partial sum or chain may (3×3 d2 + 3×3 is a 5×5 before the 5×5 branch joins); beyond this
# factor a candidate is dropped at once, so that a depthwise → pointwise chain never builds a dense kernel
CANDIDATE_COST_LIMIT = 4.0


def _costlier(op: ConvOp, parts: float) -> str:
    return (f"one {K.describe_kernel(op.kernel_size)} conv with groups={op.groups} would cost "
            f"{G.op_cost(op) / max(parts, 1e-30):.1f}× the multiply-adds of the ops it replaces")


SELF_CHECK_RTOL = 1e-9  # a fused op must reproduce its sub-graph's recorded float64 output to this


@dataclass
class Region:
    base: fx.Node
    output: fx.Node
    expr: G.Expr
    error: float  # max |fused op(base) − sub-graph output| on the recorded float64 forward


@dataclass
class Prefix:
    """The affine start of a module's forward (conv → BN before an activation): a parent may fold
    it into the ops before the call, leaving the module to do only the rest."""

    output: fx.Node  # last node of the prefix, in the module's own graph
    expr: G.Expr  # relative to the module's input
    value: torch.Tensor  # its recorded float64 value (for the parent's self-check)


@dataclass
class ModulePlan:
    path: str
    module: nn.Module
    gm: fx.GraphModule | None = None
    summary: G.Expr | None = None  # the whole forward as one op of its single input
    summary_error: float = 0.0
    regions: list[Region] = field(default_factory=list)
    prefix: Prefix | None = None
    strip_prefix: bool = False  # set by apply when the parent folded the prefix in
    note: str = ""


@dataclass
class Analysis:
    plans: dict[int, ModulePlan] = field(default_factory=dict)
    leaves: dict[int, G.LeafInfo] = field(default_factory=dict)  # module id → as an op (for parents)
    records: dict[int, G.CallRecord] = field(default_factory=dict)
    skipped: list[SkippedSite] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # module path → why it was not analysed
    prefix_values: dict[int, torch.Tensor] = field(default_factory=dict)  # module id → its prefix's value

    def skip(self, module: str, reason: str) -> None:
        if all(s.module != module for s in self.skipped):  # the first (deepest) reason per place
            self.skipped.append(SkippedSite(module, reason))


# ----------------------------------------------------------------------------------------------
# Pass 1: analysis


def analyse(root: nn.Module, inputs: tuple[Any, ...]) -> Analysis:
    """Record one forward of `root` (float64, eval) and analyse every called module."""
    result = Analysis(records=G.record_calls(root, inputs))
    modules = list(root.named_modules())
    for path, m in reversed(modules):  # children before parents
        rec = result.records.get(id(m))
        if rec is None:
            continue
        leaf = G.lower_module(m, rec)
        if leaf is not None:
            if leaf.op is not None:
                result.leaves[id(m)] = replace(leaf, leaves=(path,))
            elif leaf.reason:
                result.skip(path, leaf.reason)
            continue
        gm, reason = G.trace(m)
        if gm is None:
            result.notes[path] = reason or "could not trace"
            continue
        values = G.node_values(gm, rec, result.records)
        if values is None:
            result.notes[path] = "traced, but the traced graph does not reproduce the eager forward"
            continue
        plan = _analyse_graph(path, m, gm, values, result)
        result.plans[id(m)] = plan
        if plan.summary is not None:
            s = plan.summary
            result.leaves[id(m)] = G.LeafInfo(s.op, "block", ops=s.ops, terms=s.terms, norms=s.norms,
                                              scales=s.scales, leaves=s.leaves, cost=s.cost)
        elif plan.prefix is not None:
            s = plan.prefix.expr
            result.leaves[id(m)] = G.LeafInfo(s.op, "prefix", ops=s.ops, terms=s.terms, norms=s.norms,
                                              scales=s.scales, leaves=s.leaves, cost=s.cost, partial=True)
            result.prefix_values[id(m)] = plan.prefix.value
    return result


def site_label(path: str, node: fx.Node) -> str:
    label = node.target if node.op == "call_module" else node.name
    return f"{path}.{label}" if path else str(label)


def _analyse_graph(path: str, module: nn.Module, gm: fx.GraphModule, values: dict[fx.Node, Any],
                   result: Analysis) -> ModulePlan:
    plan = ModulePlan(path, module, gm)
    constants: set[fx.Node] = set()
    cands: dict[fx.Node, dict[fx.Node, G.Expr]] = {}
    prefix = f"{path}." if path else ""

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            if node.op == "placeholder":
                cands[node] = _self_cands(node, values)
            continue
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (node.op in ("call_function", "call_method") and inputs
                                     and all(i in constants for i in inputs)):
            constants.add(node)
            continue
        if node.op == "call_function" and not inputs:
            constants.add(node)
            continue
        own = _self_cands(node, values)
        tensor_inputs = [i for i in inputs if i not in constants]
        shape = G._tensor_shape(values.get(node))
        if G.call_key(node) in ("reshape_as", "view_as") and isinstance(node.args[0], fx.Node):
            tensor_inputs = [node.args[0]]  # the other argument only lends its shape
        if G.call_key(node) in ("sum", torch.sum) and tensor_inputs:
            stacked = _stacked_sum(node, cands, result, path, values)
            if stacked:
                cands[node] = own | stacked
                continue
        if len(tensor_inputs) == 2 and _is_sum(node):
            cands[node] = own | _sum_cands(node, tensor_inputs, cands, result, path, values)
            continue
        if len(tensor_inputs) != 1:
            cands[node] = own
            continue
        x = tensor_inputs[0]
        if G.mutations(node):
            cands[node] = _filled_pad(node, x, values, cands.get(x, {}), result, path)
            continue
        if G.call_key(node) in G.LAYOUT_CALLS:
            cands[node] = own | _through_layout(node, x, values, cands.get(x, {}))
            continue
        info = _unary_info(node, x, values, constants, result, prefix)
        if info is None or info.op is None:
            if info is not None and info.reason and x in cands and len(cands[x]) > 1:
                result.skip(site_label(path, node), info.reason)
            cands[node] = own
            continue
        if shape is None:
            cands[node] = own
            continue
        cands[node] = own | _extend(node, x, info, cands.get(x, {}), result, path, values)

    _choose_regions(plan, cands, values, result, constants)
    _summarise(plan, cands, constants, values)
    return plan


def _filled_pad(node: fx.Node, x: fx.Node, values: dict[fx.Node, Any], base_cands: dict[fx.Node, G.Expr],
                result: Analysis, path: str) -> dict[fx.Node, G.Expr]:
    """`F.pad(y)` whose border is then overwritten in place with a per-channel constant c (DBB's
    BNAndPadLayer) is ``pad0(y − c) + c``: exact after any op whose shift is c (a BN). Any other
    in-place write makes the node opaque."""
    shape = G._tensor_shape(values.get(x))
    info = G.lower_function(node, list(node.args), dict(node.kwargs), shape) if shape else None
    if info is None or info.kind != "pad" or info.op is None:
        return {}
    fill = G.border_fill(node, info.op.padding, values)
    if fill is None:
        return {}
    nd = info.op.nd
    writes = frozenset(G.mutations(node))
    out: dict[fx.Node, G.Expr] = {}
    for base, e in base_cands.items():
        if e.partial or base is x:
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
        out[base] = replace(e, op=op, nodes=e.nodes | {node} | writes, ops=e.ops + 1 + len(writes))
    return out


def _through_layout(node: fx.Node, x: fx.Node, values: dict[fx.Node, Any],
                    base_cands: dict[fx.Node, G.Expr]) -> dict[fx.Node, G.Expr]:
    """A reshape that keeps the last axis whole passes the last-axis (nd == 0) expressions through."""
    a, b = values.get(x), values.get(node)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 or b.dim() < 2:
        return {}
    if a.shape[-1] != b.shape[-1] or a.numel() != b.numel():
        return {}
    out = {}
    for base, e in base_cands.items():
        e = _in_layout(e, 0, values.get(base)) if _is_identity(e.op) else e
        if e is not None and e.op.nd == 0 and not e.partial:
            out[base] = replace(e, nodes=e.nodes | {node})
    return out


def _is_identity(op: ConvOp) -> bool:
    return op.is_diagonal and bool(torch.all(op.weight == 1)) and not bool(torch.any(op.bias))


def _in_layout(e: G.Expr, nd: int, value: Any) -> G.Expr | None:
    """A node's identity expression on itself, re-expressed for an op with `nd` spatial axes:
    channel-first ([N, C, *S]) for nd ≥ 1, last-axis ([..., C]) for nd == 0."""
    if e.op.nd == nd or not isinstance(value, torch.Tensor):
        return e
    if nd == 0:
        return replace(e, op=K.identity_op(value.shape[-1], 0))
    if value.dim() == nd + 2:
        return replace(e, op=K.identity_op(value.shape[1], nd))
    return None


def _self_cands(node: fx.Node, values: dict[fx.Node, Any]) -> dict[fx.Node, G.Expr]:
    shape = G._tensor_shape(values.get(node))
    if shape is None or len(shape) < 2:
        return {}
    op = K.identity_op(shape[1], len(shape) - 2)
    return {node: G.Expr(op, frozenset(), 0, ("identity",))}


def _is_sum(node: fx.Node) -> bool:
    key = G.call_key(node)
    return key in G._ADD or key in G._SUB


def _sum_cands(node: fx.Node, operands: list[fx.Node], cands: dict[fx.Node, dict[fx.Node, G.Expr]],
               result: Analysis, path: str, values: dict[fx.Node, Any]) -> dict[fx.Node, G.Expr]:
    """`a + b`, `a - b`, `torch.add(a, b, alpha=k)`."""
    u, v = node.args[0], node.args[1]
    if not (isinstance(u, fx.Node) and isinstance(v, fx.Node)):
        return {}
    alpha = node.kwargs.get("alpha", 1)
    if len(node.args) > 2 or not isinstance(alpha, (int, float)):
        return {}
    sign = -1.0 if G.call_key(node) in G._SUB else 1.0
    return _sum_terms(node, [(u, 1.0), (v, sign * alpha)], frozenset(), cands, result, path, values)


def _stacked_sum(node: fx.Node, cands: dict[fx.Node, dict[fx.Node, G.Expr]], result: Analysis, path: str,
                 values: dict[fx.Node, Any]) -> dict[fx.Node, G.Expr]:
    """`torch.stack([a, b, c]).sum(0)` (or `torch.sum(torch.stack(...), dim=0)`)."""
    stack = node.args[0] if node.args else None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not (isinstance(stack, fx.Node) and G.call_key(stack) is torch.stack and dim in (0, (0,))
            and len(stack.users) == 1 and not node.kwargs.get("keepdim", False)):
        return {}
    items = stack.args[0]
    stack_dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    if stack_dim != 0 or not isinstance(items, (list, tuple)) or not all(isinstance(n, fx.Node) for n in items):
        return {}
    return _sum_terms(node, [(n, 1.0) for n in items], frozenset({stack}), cands, result, path, values)


def _sum_terms(node: fx.Node, terms: list[tuple[fx.Node, float]], extra: frozenset[fx.Node],
               cands: dict[fx.Node, dict[fx.Node, G.Expr]], result: Analysis, path: str,
               values: dict[fx.Node, Any]) -> dict[fx.Node, G.Expr]:
    """Σ coeff · term as one op, for every base all terms share."""
    per_term = [cands.get(t, {}) for t, _ in terms]
    out: dict[fx.Node, G.Expr] = {}
    first_reason = None
    for base in set.intersection(*(set(c) for c in per_term)):
        exprs = [c[base] for c in per_term]
        if any(e.partial for e in exprs):
            continue
        layout = next((e.op.nd for e in exprs if not _is_identity(e.op)), exprs[0].op.nd)
        exprs = [_in_layout(e, layout, values.get(base)) if _is_identity(e.op) else e for e in exprs]
        if any(e is None for e in exprs):
            continue
        op, reason = K.parallel_sum([K.scale_op(e.op, k) if k != 1 else e.op for e, (_, k) in zip(exprs, terms)])
        if op is None:
            first_reason = first_reason or reason
            continue
        cost = sum(e.cost for e in exprs)
        if G.op_cost(op) > cost * CANDIDATE_COST_LIMIT:
            first_reason = first_reason or _costlier(op, cost)
            continue
        out[base] = G.Expr(op, frozenset().union(*(e.nodes for e in exprs)) | extra | {node},
                           sum(e.ops for e in exprs) + len(exprs) - 1, sum((e.terms for e in exprs), ()),
                           sum(e.norms for e in exprs), sum(e.scales for e in exprs) + sum(k != 1 for _, k in terms),
                           sum((e.leaves for e in exprs), ()), cost)
    if not out and first_reason:
        result.skip(site_label(path, node), first_reason)
    return _cap(out)


def _cap(c: dict[fx.Node, G.Expr]) -> dict[fx.Node, G.Expr]:
    if len(c) <= MAX_BASES:
        return c
    keep = sorted(c.items(), key=lambda kv: len(kv[1].nodes))[:MAX_BASES]
    return dict(keep)


def _unary_info(node: fx.Node, x: fx.Node, values: dict[fx.Node, Any], constants: set[fx.Node],
                result: Analysis, prefix: str) -> G.LeafInfo | None:
    """The op that `node` applies to its one non-constant input `x`."""
    shape = G._tensor_shape(values.get(x))
    if node.op == "call_module":
        child = node.graph.owning_module.get_submodule(node.target)
        if node.args != (x,) or node.kwargs:
            return None
        info = result.leaves.get(id(child))
        if info is None:
            return None
        return info
    if shape is None or len(shape) < 2:
        return None
    key = G.call_key(node)
    args = [values[a] if isinstance(a, fx.Node) and a in constants else a for a in node.args]
    kwargs = {k: values[a] if isinstance(a, fx.Node) and a in constants else a for k, a in node.kwargs.items()}
    nd = len(shape) - 2
    other = [a for a in args if not (isinstance(a, fx.Node) and a is x)]
    if key in G._MUL and len(args) == 2 and len(other) == 1:
        s = G.channel_constant(other[0], shape)
        return None if s is None else G.LeafInfo(K.channel_affine(s, torch.zeros_like(s), nd), "scale",
                                                 scales=1, terms=("identity",))
    if key in G._DIV and len(args) == 2 and args[0] is x:
        s = G.channel_constant(args[1], shape)
        return None if s is None or bool(torch.any(s == 0)) else G.LeafInfo(
            K.channel_affine(1.0 / s, torch.zeros_like(s), nd), "scale", scales=1, terms=("identity",))
    if (key in G._ADD or key in G._SUB) and len(args) == 2 and len(other) == 1 and not kwargs:
        c = G.channel_constant(other[0], shape)
        if c is None:
            return None
        sign = -1.0 if key in G._SUB else 1.0
        if key in G._SUB and args[1] is x:  # c − x
            return G.LeafInfo(K.channel_affine(-torch.ones_like(c), c, nd), "bias", scales=1,
                              terms=("identity",))
        return G.LeafInfo(K.channel_affine(torch.ones_like(c), sign * c, nd), "bias", terms=("identity",))
    if key in G._NEG:
        return G.LeafInfo(K.scale_op(K.identity_op(shape[1], nd), -1.0), "scale", scales=1,
                          terms=("identity",))
    if args and args[0] is x:
        info = G.lower_function(node, args, kwargs, shape)
        if info is not None:
            return replace(info, leaves=(f"{prefix}{node.name}",))
    return None


def _extend(node: fx.Node, x: fx.Node, info: G.LeafInfo, base_cands: dict[fx.Node, G.Expr],
            result: Analysis, path: str, values: dict[fx.Node, Any]) -> dict[fx.Node, G.Expr]:
    """Candidates of `node = info(x)`: info composed after each candidate of x."""
    out: dict[fx.Node, G.Expr] = {}
    for base, e in base_cands.items():
        if e.partial or (info.partial and base is x):  # base x alone: the child's own business
            continue
        if _is_identity(e.op):  # an identity takes the layout of the op applied to it
            e = _in_layout(e, info.op.nd, values.get(base))
            if e is None:
                continue
        op, reason = K.compose(e.op, info.op)
        cost = e.cost + info.input_cost() / math.prod(e.op.stride)
        if op is not None and G.op_cost(op) > cost * CANDIDATE_COST_LIMIT:
            op, reason = None, _costlier(op, cost)
        if op is None:
            if base is not x:
                result.skip(site_label(path, node), reason or "not exact")
            continue
        out[base] = G.Expr(op, e.nodes | {node}, e.ops + info.ops, _chain_terms(e.terms, info),
                           e.norms + info.norms, e.scales + info.scales, e.leaves + info.leaves, cost,
                           partial=info.partial)
    return _cap(out)


def _chain_terms(terms: tuple[str, ...], info: G.LeafInfo) -> tuple[str, ...]:
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


def _choose_regions(plan: ModulePlan, cands: dict[fx.Node, dict[fx.Node, G.Expr]],
                    values: dict[fx.Node, Any], result: Analysis, constants: set[fx.Node]) -> None:
    consumed: set[fx.Node] = set()
    for y in reversed(list(plan.gm.graph.nodes)):
        if y in consumed or y not in cands:
            continue
        options = sorted(((b, e) for b, e in cands[y].items() if b is not y),
                         key=lambda be: (-len(be[1].nodes), be[1].ops))
        for i, (base, expr) in enumerate(options):
            if expr.ops < 2 or _single_child(expr):
                continue
            problem = _region_problem(expr.nodes, y, consumed, result, constants)
            if problem is None and G.op_cost(expr.op) > expr.cost * COST_SLACK:
                problem = _costlier(expr.op, expr.cost)
            if problem is None and any(p < 0 for p in expr.op.padding):
                problem = "the sub-graph crops more than it pads: not one conv on its own"
            error = 0.0
            if problem is None:
                target = values.get(y)
                if expr.partial:
                    target = result.prefix_values.get(id(plan.gm.get_submodule(y.target)))
                error, problem = _self_check(expr, values.get(base), target)
            if problem:
                if i == 0:
                    result.skip(site_label(plan.path, y), problem)
                continue
            plan.regions.append(Region(base, y, expr, error))
            consumed |= expr.nodes
            break


def _single_child(expr: G.Expr) -> bool:
    """The region is one child call: the child is collapsed in place instead (its parent keeps its class)."""
    return len(expr.nodes) == 1 and next(iter(expr.nodes)).op == "call_module"


def _self_check(expr: G.Expr, x: Any, y: Any) -> tuple[float, str | None]:
    """Run the fused op on the recorded input of the sub-graph and compare with its recorded output."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return float("inf"), "the sub-graph's input or output is not a single tensor"
    try:
        out = K.apply_op(expr.op, x.double())
    except RuntimeError as exc:
        return float("inf"), f"internal self-check failed: the fused layer does not run ({exc})"
    if out.shape != y.shape:
        return float("inf"), (f"internal self-check failed: fused output shape {tuple(out.shape)} differs "
                              f"from {tuple(y.shape)}")
    err = float((out - y.double()).abs().max()) if out.numel() else 0.0
    scale = float(y.double().abs().max()) if y.numel() else 0.0
    if not err <= SELF_CHECK_RTOL * max(scale, 1e-30) + 1e-300:
        return err, (f"internal self-check failed: the fused op is off by {err:.3g} (scale {scale:.3g}); "
                     "left unfused")
    return err, None


def _region_problem(nodes: frozenset[fx.Node], y: fx.Node, consumed: set[fx.Node],
                    result: Analysis, constants: set[fx.Node]) -> str | None:
    """Why these nodes cannot become one layer (an inner value used outside, a shared module)."""
    for n in nodes:
        if n in consumed:
            return f"'{n.name}' is already part of another fused site"
        if n is not y:
            outside = [u.name for u in n.users if u not in nodes]
            if outside:
                return (f"intermediate value '{n.name}' is also used by '{outside[0]}' outside the linear "
                        "sub-graph")
        if n.op == "call_module":
            child = n.graph.owning_module.get_submodule(n.target)
            rec = result.records.get(id(child))
            if rec is not None and rec.calls > 1:
                return f"module '{n.target}' is called more than once (shared weights)"
            reader = _outside_reader(n.graph, n.target, nodes, constants)
            if reader is not None:
                return f"the weights of '{n.target}' are also read by '{reader}' outside the sub-graph"
    return None


def _outside_reader(graph: fx.Graph, target: str, nodes: frozenset[fx.Node], constants: set[fx.Node],
                    ) -> str | None:
    """A node outside `nodes` that reads a tensor of module `target` (directly or through constant
    arithmetic), which would break once the module is removed with the region."""
    todo = [n for n in graph.nodes if n.op == "get_attr" and n.target.startswith(f"{target}.")]
    seen: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in nodes or u in seen:
                continue
            seen.add(u)
            if u in constants:
                todo.append(u)  # still constant arithmetic: follow it
            else:
                return u.name
    return None


def _summarise(plan: ModulePlan, cands: dict[fx.Node, dict[fx.Node, G.Expr]], constants: set[fx.Node],
               values: dict[fx.Node, Any]) -> None:
    """Set plan.summary when the whole forward is one op of its single tensor input."""
    nodes = list(plan.gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    used = [p for p in placeholders if p.users]
    output = nodes[-1]
    if len(used) != 1 or len(output.args) != 1 or not isinstance(output.args[0], fx.Node):
        return
    x, y = used[0], output.args[0]
    if used[0] is not placeholders[0]:
        return
    # nodes that yield no tensor (shape queries, `_assert`) are checks, not computation
    compute = {n for n in nodes if n.op not in ("placeholder", "output") and n not in constants
               and isinstance(values.get(n), torch.Tensor)}
    if y is x:
        plan.summary = cands[x].get(x)
        return
    expr = cands.get(y, {}).get(x)
    if expr is not None and not expr.partial and compute <= expr.nodes:
        error, problem = _self_check(expr, values.get(x), values.get(y))
        if problem is None:
            plan.summary, plan.summary_error = expr, error
            return
    plan.prefix = _find_prefix(plan, cands, x, values, constants)


def _find_prefix(plan: ModulePlan, cands: dict[fx.Node, dict[fx.Node, G.Expr]], x: fx.Node,
                 values: dict[fx.Node, Any], constants: set[fx.Node]) -> Prefix | None:
    """The largest affine sub-graph that starts at the input `x` and through which `x` flows entirely."""
    best: Prefix | None = None
    for y, c in cands.items():
        expr = c.get(x)
        if y is x or expr is None or expr.partial or expr.ops < 1 or not y.users:
            continue
        if best is not None and len(expr.nodes) <= len(best.expr.nodes):
            continue
        inside = expr.nodes | {x}
        value = values.get(y)
        if any(_outside_reader(plan.gm.graph, n.target, expr.nodes, constants)
               for n in expr.nodes if n.op == "call_module"):
            continue
        same_shape = isinstance(value, torch.Tensor) and value.shape == getattr(values.get(x), "shape", None)
        # checks on the input (`_assert(x.ndim == 4)`) still hold when the prefix keeps the shape
        if any(u not in inside and not (n is x and same_shape and not isinstance(values.get(u), torch.Tensor))
               for n in inside - {y} for u in n.users):
            continue
        if not isinstance(value, torch.Tensor) or _self_check(expr, values.get(x), value)[1]:
            continue
        best = Prefix(y, expr, value)
    if best is not None:
        try:
            graph_to_program(plan.gm.graph)  # the stripped module must be storable as a GraphBlock
        except UnsupportedProgram:
            return None
    return best
