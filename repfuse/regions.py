"""Region choice (pass 1, second half): which candidate expressions become one layer. Reads only.

A candidate ``value = op(base)`` becomes a region when it is exact and self-contained: no inner
value is read outside it, no module in it is shared or read elsewhere, it pays (never more
multiply-adds than the ops it replaces), it adds no layer (it folds at least one conv or linear: a
norm's affine step or a lone scale stays as it is, never a new depthwise 1×1, see `adds_layer`), it
computes in ONE dtype (the fused layer runs in the dtype of the values it replaces — a float64 buffer
in a float32 model makes the original float64, and a float32 conv would not be), and it reproduces
its recorded output (the witness; the proof is the shape-generic lowering, see `lowering`). Values
changed in place are never inside a region or its base; a changed *output* is allowed when it is a
fresh tensor: the in-place op stays in the deploy model and changes the fused layer's output just as
it changed the original's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import effects as E
from . import kernels as K
from . import layouts as Y
from . import lowering as L
from . import suffix as S
from .graph import CallRecord, Replay
from .kernels import ConvOp
from .modules import UnsupportedProgram, graph_to_program

COST_SLACK = 1.0 + 1e-9  # a fused layer may not cost more multiply-adds than the ops it replaces
SELF_CHECK_RTOL = 1e-9  # a fused op must reproduce its sub-graph's recorded float64 output to this


def costlier(op: ConvOp, parts: float) -> str:
    return (f"one {K.describe_kernel(op.kernel_size)} conv with groups={op.groups} would cost "
            f"{L.op_cost(op) / max(parts, 1e-30):.1f}× the multiply-adds of the ops it replaces")


@dataclass
class Region:
    base: fx.Node
    output: fx.Node
    expr: L.Expr
    error: float  # max |fused op(base) − sub-graph output| on the recorded float64 forward
    dtype: torch.dtype | None = None  # the dtype every value of the sub-graph has in the model's precision


@dataclass
class Prefix:
    """The affine start of a module's forward (conv → BN before an activation): a parent may fold
    it into the ops before the call, leaving the module to do only the rest."""

    output: fx.Node  # last node of the prefix, in the module's own graph
    expr: L.Expr  # relative to the module's input
    value: torch.Tensor  # its recorded float64 value (for the parent's self-check)


@dataclass
class ModulePlan:
    path: str
    module: nn.Module
    gm: fx.GraphModule | None = None
    summary: L.Expr | None = None  # the whole forward as one op of its single input
    summary_error: float = 0.0
    summary_dtype: torch.dtype | None = None
    regions: list[Region] = field(default_factory=list)
    prefix: Prefix | None = None
    strip_prefix: bool = False  # set by apply when the parent folded the prefix in
    note: str = ""
    layout: tuple[Y.LayoutStep, ...] = ()  # the whole forward is these layout-only ops (a permute module)
    layout_summary: L.Expr | None = None  # the whole forward is one op with layout steps around it
    suffix: S.Suffix | None = None  # its affine end, which a parent may fold into the op after the call
    tail: fx.Node | None = None  # its forward ends in this child call (whose suffix it hands on)
    strip_suffix: bool = False  # set by apply when a parent folded the suffix in
    consumed: bool = False  # set by apply when a parent took in its whole forward (layout_summary)


Cands = dict[fx.Node, dict[fx.Node, L.Expr]]


class Context:
    """What region choice needs from the analysis of one module's graph."""

    def __init__(self, replay: Replay, constants: set[fx.Node], records: dict[int, CallRecord],
                 prefix_values: dict[int, torch.Tensor], skip: Any) -> None:
        self.replay = replay
        self.values = replay.values
        self.constants = constants
        self.records = records
        self.prefix_values = prefix_values
        self.skip = skip  # (module path, reason) → None

    def output_value(self, node: fx.Node) -> Any:
        """The value `node` had when it was computed (before any later in-place change)."""
        return self.replay.initial.get(node, self.values.get(node))


def site_label(path: str, node: fx.Node) -> str:
    label = node.target if node.op == "call_module" else node.name
    return f"{path}.{label}" if path else str(label)


def choose_regions(plan: ModulePlan, cands: Cands, ctx: Context) -> None:
    consumed: set[fx.Node] = set()
    for y in reversed(list(plan.gm.graph.nodes)):
        if y in consumed or y not in cands:
            continue
        options = sorted(((b, e) for b, e in cands[y].items() if b is not y),
                         key=lambda be: (-len(be[1].nodes), be[1].ops))
        for i, (base, expr) in enumerate(options):
            if expr.ops < 2 or _single_child(expr):
                continue
            problem = region_problem(expr.nodes, y, consumed, ctx, Y.layout_nodes(expr))
            dtype, dtype_problem = common_dtype(expr.nodes | {base}, ctx.replay)
            problem = problem or dtype_problem
            if problem is None and L.op_cost(expr.op) > expr.cost * COST_SLACK:
                problem = costlier(expr.op, expr.cost)
            if problem is None and any(p < 0 for p in expr.op.padding):
                problem = "the sub-graph crops more than it pads: not one conv on its own"
            problem = problem or adds_layer(expr)
            error = 0.0
            if problem is None:
                target = ctx.output_value(y)
                if expr.partial:
                    target = ctx.prefix_values.get(id(plan.gm.get_submodule(y.target)))
                x = ctx.values.get(base)
                if expr.strips is not None and isinstance(x, torch.Tensor):
                    x = S.unapply(expr.strips, x)
                error, problem = self_check(expr, x, target)
            if problem:
                if i == 0:
                    ctx.skip(site_label(plan.path, y), problem)
                continue
            plan.regions.append(Region(base, y, expr, error, dtype))
            consumed |= expr.nodes
            break


_POOL_TERM = re.compile(r"avgpool [0-9×]+")


def folds_layer(terms: tuple[str, ...]) -> bool:
    """Do these branch terms hold a conv or linear layer (a kernel size or "linear")? BNs, scales, biases,
    identities, pads and crops are "identity"; an average pool is "avgpool k×k" and is no layer."""
    return any(re.search(r"[0-9]|linear", _POOL_TERM.sub("", t)) for t in terms)


def adds_layer(expr: L.Expr) -> str | None:
    """Why writing `expr` as one conv would ADD a layer: it replaces no conv or linear (a norm's affine
    step, a lone scale or bias, an average pool with a BN). repfuse never adds one; these stay as they are."""
    if folds_layer(expr.terms):
        return None
    parts = [f"BN×{expr.norms}" if expr.norms else "", f"scale×{expr.scales}" if expr.scales else "",
             ", ".join(t for t in expr.terms if t != "identity")]
    what = ", ".join(p for p in parts if p) or "per-channel affine ops"
    layer = "linear" if expr.op.nd == 0 else f"{K.describe_kernel(expr.op.kernel_size)} conv"
    return (f"one fused {layer} would add a layer: the sub-graph ({what}, per-channel affine) replaces no conv "
            "or linear; left as it is")


def common_dtype(nodes: set[fx.Node] | frozenset[fx.Node], replay: Replay,
                 ) -> tuple[torch.dtype | None, str | None]:
    """The one dtype all tensor values of `nodes` have in the model's own precision, or a reason."""
    kinds = {replay.dtypes[n] for n in nodes if n in replay.dtypes}
    if len(kinds) > 1:
        names = ", ".join(sorted(str(k).removeprefix("torch.") for k in kinds))
        return None, (f"the sub-graph computes in more than one dtype ({names}): one fused layer would change "
                      "the dtype of its output")
    return (kinds.pop() if kinds else None), None


def _single_child(expr: L.Expr) -> bool:
    """The region is one child call: the child is collapsed in place instead (its parent keeps its class),
    unless the region also takes in the affine end of the child before it (`suffix`)."""
    return len(expr.nodes) == 1 and next(iter(expr.nodes)).op == "call_module" and expr.strips is None


SELF_CHECK_CHANNELS = 16  # output channels (or groups) a self-check computes; the end-to-end check sees all


def self_check(expr: L.Expr, x: Any, y: Any) -> tuple[float, str | None]:
    """Run the fused op on the recorded input of the sub-graph and compare with its recorded output.

    On a wide layer it computes an evenly spaced sample of output channels (whole groups for a grouped
    op), at every position: a wrong window, padding, stride or branch shows in every channel, and the
    verification afterwards compares every output of the whole model in float64."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return float("inf"), "the sub-graph's input or output is not a single tensor"
    if Y.has_layout(expr):  # the layout steps move the channels: run the whole fused op
        op = expr.op
    else:
        op, x, y = _sampled(expr.op, x, y)
    try:
        out = Y.apply_expr(replace(expr, op=op), x.double())
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


def _sampled(op: ConvOp, x: torch.Tensor, y: torch.Tensor) -> tuple[ConvOp, torch.Tensor, torch.Tensor]:
    """`op` restricted to a sample of its output channels (for a grouped op: whole groups, with the input
    channels they read), and the matching channels of its input `x` and expected output `y` ([N, C, ...])."""
    g = op.groups
    small = op.out_channels <= SELF_CHECK_CHANNELS if g == 1 else g <= SELF_CHECK_CHANNELS
    if op.nd == 0 or small or y.dim() < 2 or y.shape[1] != op.out_channels or x.dim() < 2 \
            or x.shape[1] != op.in_channels:
        return op, x, y
    keep = torch.linspace(0, (g if g > 1 else op.out_channels) - 1, SELF_CHECK_CHANNELS).round().long().unique()
    if g == 1:
        return replace(op, weight=K.rows(op, keep), bias=op.bias[keep]), x, y[:, keep]
    out_per, in_per = op.out_channels // g, op.in_channels // g
    rows = (keep[:, None] * out_per + torch.arange(out_per)).reshape(-1)
    cols = (keep[:, None] * in_per + torch.arange(in_per)).reshape(-1)
    return replace(op, weight=K.rows(op, rows), bias=op.bias[rows], groups=len(keep)), x[:, cols], y[:, rows]


def region_problem(nodes: frozenset[fx.Node], y: fx.Node, consumed: set[fx.Node], ctx: Context,
                   kept: set[fx.Node] | frozenset[fx.Node] = frozenset()) -> str | None:
    """Why these nodes cannot become one layer (an inner value used outside, a shared module, an
    effect on a value the sub-graph would no longer compute). The layout steps in `kept` stay in the
    graph: a module they call may be shared."""
    for n in nodes:
        if n in consumed:
            return f"'{n.name}' is already part of another fused site"
        if n is not y:
            outside = [u.name for u in n.users if u not in nodes]
            if outside:
                return (f"intermediate value '{n.name}' is also used by '{outside[0]}' outside the linear "
                        "sub-graph")
            if n in ctx.replay.mutated:
                return f"'{n.name}' is changed in place inside the sub-graph"
        elif n in ctx.replay.mutated and not E.fresh(n):
            return f"'{n.name}' is changed in place and shares memory with another value"
        if n.op == "call_module" and n not in kept:
            child = n.graph.owning_module.get_submodule(n.target)
            rec = ctx.records.get(id(child))
            if rec is not None and rec.calls > 1:
                return f"module '{n.target}' is called more than once (shared weights)"
            reader = outside_reader(n.graph, n.target, nodes, ctx.constants)
            if reader is not None:
                return f"the weights of '{n.target}' are also read by '{reader}' outside the sub-graph"
    return None


def outside_reader(graph: fx.Graph, target: str, nodes: frozenset[fx.Node], constants: set[fx.Node],
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


def summarise(plan: ModulePlan, cands: Cands, ctx: Context, rec: CallRecord) -> None:
    """Set plan.summary when the whole forward is one op of its single tensor input."""
    nodes = list(plan.gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    used = [p for p in placeholders if p.users]
    output = nodes[-1]
    if len(used) != 1 or len(output.args) != 1 or not isinstance(output.args[0], fx.Node):
        return
    x, y = used[0], output.args[0]
    if used[0] is not placeholders[0] or rec.mutates or x in ctx.replay.mutated:
        return
    # nodes that yield no tensor (shape queries, `_assert`) are checks, not computation
    compute = {n for n in nodes if n.op not in ("placeholder", "output") and n not in ctx.constants
               and isinstance(ctx.values.get(n), torch.Tensor)}
    if y is x:
        plan.summary = cands[x].get(x)
        plan.summary_dtype = ctx.replay.dtypes.get(x)
        return
    expr = cands.get(y, {}).get(x)
    if expr is not None and Y.has_layout(expr):  # never one op: the layout steps stay
        whole = compute <= expr.nodes and not rec.mutates and not (expr.nodes & ctx.replay.mutated)
        if whole and expr.op.is_identity and not expr.post:
            plan.layout = expr.pre  # a module that only moves axes (NHWCtoNCHW): a layout step for its parent
            return
        if whole and not expr.partial and expr.strips is None \
                and common_dtype(expr.nodes | {x}, ctx.replay)[1] is None \
                and self_check(expr, ctx.values.get(x), ctx.values.get(y))[1] is None:
            plan.layout_summary = expr  # Linear → NHWCtoNCHW → BN: one op and steps, for its parent
            return
        expr = None
    if expr is not None and not expr.partial and compute <= expr.nodes and not (expr.nodes & ctx.replay.mutated):
        dtype, problem = common_dtype(expr.nodes | {x}, ctx.replay)
        error, problem = self_check(expr, ctx.values.get(x), ctx.values.get(y)) if problem is None else (0.0, problem)
        if problem is None:  # (a summary that folds no conv or linear is never collapsed in place: rewrite.apply)
            plan.summary, plan.summary_error, plan.summary_dtype = expr, error, dtype
            return
    plan.prefix = find_prefix(plan, cands, x, ctx)
    S.find_suffix(plan, cands, ctx, rec, outside_reader)


def find_prefix(plan: ModulePlan, cands: Cands, x: fx.Node, ctx: Context) -> Prefix | None:
    """The largest affine sub-graph that starts at the input `x` and through which `x` flows entirely."""
    best: Prefix | None = None
    values = ctx.values
    order = {n: i for i, n in enumerate(cands)}
    options = [(y, c[x]) for y, c in cands.items() if x in c]  # largest first: the first that holds is the one
    for y, expr in sorted(options, key=lambda ye: (-len(ye[1].nodes), order[ye[0]])):
        if y is x or expr.partial or expr.ops < 1 or not y.users or Y.has_layout(expr):
            continue
        if best is not None:
            break
        if expr.nodes & ctx.replay.mutated or common_dtype(expr.nodes | {x}, ctx.replay)[1]:
            continue
        inside = expr.nodes | {x}
        value = values.get(y)
        if any(outside_reader(plan.gm.graph, n.target, expr.nodes, ctx.constants)
               for n in expr.nodes if n.op == "call_module"):
            continue
        same_shape = isinstance(value, torch.Tensor) and value.shape == getattr(values.get(x), "shape", None)
        # checks on the input (`_assert(x.ndim == 4)`) still hold when the prefix keeps the shape
        if any(u not in inside and not (n is x and same_shape and not isinstance(values.get(u), torch.Tensor))
               for n in inside - {y} for u in n.users):
            continue
        if not isinstance(value, torch.Tensor) or self_check(expr, values.get(x), value)[1]:
            continue
        best = Prefix(y, expr, value)
    if best is not None:
        try:
            graph_to_program(plan.gm.graph)  # the stripped module must be storable as a GraphBlock
        except UnsupportedProgram:
            return None
    return best
