"""Pass 1 of the engine: find every linear sub-graph that is exactly one conv. Never changes a model.

Deepest modules first: lower each module to an affine op where it is one (a *summary*), else trace
it and, in its graph, give every node its candidate expressions ``value = op(earlier value)``
(`candidates`), then choose the largest valid regions (`regions`). A module whose forward *starts*
affine gets a `Prefix` its parent may fold in.

The forward is recorded once, in float64 (`dtypes.Float64Mode`, which also tracks each value's dtype
in the model's own precision), on the model copy the rewrite will change; every buffer and attribute
is put back afterwards (`effects.preserved_state`), so the deploy model starts from the state the
user's model had. A module whose effects a rewrite would drop (hooks, grad-mode or autocast regions,
random numbers, updates of its own tensors or attributes) is left as it is, with the reason in
`skipped`; its children are still analysed on their own.

New kinds of branch go in `lowering` (a layer as a `ConvOp`) or in `kernels` (how ops combine);
nothing here knows any architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import candidates as C
from . import effects as E
from . import graph as G
from . import kernels as K
from . import lowering as L
from . import regions as R
from .dtypes import Float64Mode, Shadows
from .regions import COST_SLACK, ModulePlan, Prefix, Region, site_label
from .types import SkippedSite

__all__ = ["COST_SLACK", "Analysis", "ModulePlan", "Prefix", "Region", "analyse", "site_label"]

DtypeMap = dict[tuple[int, str], torch.dtype]  # (id(module), tensor name) → dtype before float64


@dataclass
class Analysis:
    plans: dict[int, ModulePlan] = field(default_factory=dict)
    leaves: dict[int, L.LeafInfo] = field(default_factory=dict)  # module id → as an op (for parents)
    records: dict[int, G.CallRecord] = field(default_factory=dict)
    skipped: list[SkippedSite] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # module path → why it was not analysed
    prefix_values: dict[int, torch.Tensor] = field(default_factory=dict)  # module id → its prefix's value
    kept: dict[int, str] = field(default_factory=dict)  # module id → why it must stay exactly as it is
    weight_budget: int = 1 << 62  # the most weights one candidate kernel may hold (candidates.weight_budget)

    def skip(self, module: str, reason: str) -> None:
        if all(s.module != module for s in self.skipped):  # the first (deepest) reason per place
            self.skipped.append(SkippedSite(module, reason))


# ----------------------------------------------------------------------------------------------
# Pass 1: analysis


def analyse(root: nn.Module, inputs: tuple[Any, ...], dtypes: DtypeMap | None = None,
            progress: Callable[[int, int], None] | None = None) -> Analysis:
    """Record one forward of `root` (a float64 copy, in eval) and analyse every called module.

    `dtypes` gives each parameter's and buffer's dtype before the float64 copy was made (see
    rewrite.float64_copy); the inputs count as the first floating dtype among them. `progress`
    receives (modules analysed, modules to analyse) as the work goes."""
    shadows = _shadows(root, inputs, dtypes)
    mode = Float64Mode(shadows)
    with E.preserved_state(root):
        with mode:
            result = Analysis(records=G.record_calls(root, inputs), weight_budget=C.weight_budget(root))
        todo = [(path, m) for path, m in reversed(list(root.named_modules())) if id(m) in result.records]
        with G.batched_tracing():
            _analyse_all(todo, result, mode, progress)
    return result


def float64_forward(root: nn.Module, inputs: tuple[Any, ...], dtypes: DtypeMap | None = None) -> Any:
    """`root(*inputs)` on the float64 copy as `analyse` runs it (dtypes read in the model's own precision,
    its state left as it was, no gradients): the original's float64 output, without the copy of every
    weight at every call that running the original itself in float64 costs (a third of such a forward)."""
    mode = Float64Mode(_shadows(root, inputs, dtypes))
    with E.preserved_state(root), torch.no_grad(), mode:
        return root(*inputs)


def _analyse_all(todo: list[tuple[str, nn.Module]], result: Analysis, mode: Float64Mode,
                 progress: Callable[[int, int], None] | None) -> None:
    for done, (path, m) in enumerate(todo):  # children before parents
        if progress is not None:
            progress(done, len(todo))
        _analyse_module(path, m, result.records[id(m)], result, mode)
        for child in m.children():  # its parent has replayed it: what it recorded is no longer needed
            if id(child) in result.records:
                G.release(result.records[id(child)])
            result.prefix_values.pop(id(child), None)
            _release_kernels(result, child)


def _release_kernels(result: Analysis, child: nn.Module) -> None:
    """A child's kernels built on demand (kernels.ScaledOp): its parent has taken them in, so they are
    dropped (and built again only if the rewrite writes the child after all)."""
    leaf = result.leaves.get(id(child))
    if leaf is not None:
        K.release(leaf.op)
    plan = result.plans.get(id(child))
    if plan is not None:
        for region in plan.regions:
            K.release(region.expr.op)
        if plan.summary is not None:
            K.release(plan.summary.op)


def _shadows(root: nn.Module, inputs: tuple[Any, ...], dtypes: DtypeMap | None) -> Shadows:
    shadows = Shadows()
    if not dtypes:
        return shadows
    order = []  # parameters first, then buffers: the model's dtype as verify.model_dtype reads it
    for store in ("_parameters", "_buffers"):
        for m in root.modules():
            for name, t in getattr(m, store).items():
                if t is not None and (id(m), name) in dtypes:
                    shadows.set(t, dtypes[(id(m), name)])
                    order.append(dtypes[(id(m), name)])
    first = next((d for d in order if d.is_floating_point), torch.float32)
    shadows.default = first
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            shadows.set(x, first)
    return shadows


def _analyse_module(path: str, m: nn.Module, rec: G.CallRecord, result: Analysis, mode: Float64Mode) -> None:
    hooks = E.hooks_of(m)
    if hooks:  # never replaced, consumed or rewritten: its hooks must keep firing on it
        result.kept[id(m)] = f"it has {hooks}, which replacing it would drop: left as it is"
        result.skip(path or "<root>", result.kept[id(m)])
        return
    shape = L._tensor_shape(rec.args[0]) if rec.args else None
    leaf = L.lower_module(m, shape)
    if leaf is not None:
        if leaf.op is not None:
            result.leaves[id(m)] = replace(leaf, leaves=(path,))
        elif leaf.reason:
            result.skip(path, leaf.reason)
        return
    traced = G.trace(m)
    if traced.gm is None:
        result.notes[path] = traced.reason or "could not trace"
        return
    if traced.effect:
        result.kept[id(m)] = traced.effect
        result.skip(path or "<root>", traced.effect)
        return
    with mode:
        replay = G.node_values(traced.gm, rec, result.records, mode.shadows)
    if replay is None:
        result.notes[path] = "traced, but the traced graph does not reproduce the eager forward"
        return
    plan = _analyse_graph(path, m, traced.gm, replay, rec, result)
    result.plans[id(m)] = plan
    if plan.summary is not None:
        s = plan.summary
        result.leaves[id(m)] = L.LeafInfo(s.op, "block", ops=s.ops, terms=s.terms, norms=s.norms,
                                          scales=s.scales, leaves=s.leaves, cost=s.cost)
    elif plan.prefix is not None:
        s = plan.prefix.expr
        result.leaves[id(m)] = L.LeafInfo(s.op, "prefix", ops=s.ops, terms=s.terms, norms=s.norms,
                                          scales=s.scales, leaves=s.leaves, cost=s.cost, partial=True)
        result.prefix_values[id(m)] = plan.prefix.value


def _constant(node: fx.Node, constants: set[fx.Node], replay: G.Replay) -> bool:
    """A value computed from parameters and literals only (evaluated once, folded into the layer); never
    one that changes, draws random numbers or is changed in place."""
    if node in replay.mutated:
        return False
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method") or E.is_impure(node):
        return False
    inputs = node.all_input_nodes
    return all(i in constants for i in inputs) and (bool(inputs) or node.op == "call_function")


def _analyse_graph(path: str, module: nn.Module, gm: fx.GraphModule, replay: G.Replay, rec: G.CallRecord,
                   result: Analysis) -> ModulePlan:
    plan = ModulePlan(path, module, gm)
    values = replay.values
    constants: set[fx.Node] = set()
    cands: R.Cands = {}
    out_only: R.Cands = {}  # changed in place later: may end a region, never extend one or be its base
    prefix = f"{path}." if path else ""

    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op != "placeholder" and _constant(node, constants, replay):
            constants.add(node)
            continue
        own = C.self_cands(node, values)
        if node in replay.mutated:
            x = next((i for i in node.all_input_nodes if i not in constants), None)
            filled = C.filled_pad(node, x, values, cands.get(x, {}), result, path) if x is not None else {}
            if filled:  # a zero pad whose ring is refilled: its value IS the filled one, writes included
                cands[node] = filled
                replay.mutated.discard(node)
                replay.initial.pop(node, None)
                continue
            cands[node] = {}  # changed later: nothing may read it as part of a sub-graph
            if node.op != "placeholder" and E.fresh(node):
                found = _node_cands(node, own, cands, constants, replay, result, path, prefix)
                out_only[node] = {b: e for b, e in found.items() if b is not node}
            continue
        cands[node] = own if node.op == "placeholder" else _node_cands(node, own, cands, constants, replay,
                                                                          result, path, prefix)

    ctx = R.Context(replay, constants, result.records, result.prefix_values, result.skip)
    R.choose_regions(plan, {**cands, **{n: c for n, c in out_only.items() if c}}, ctx)
    R.summarise(plan, cands, ctx, rec)
    return plan


def _node_cands(node: fx.Node, own: dict[fx.Node, L.Expr], cands: R.Cands, constants: set[fx.Node],
                replay: G.Replay, result: Analysis, path: str, prefix: str) -> dict[fx.Node, L.Expr]:
    values = replay.values
    inputs = node.all_input_nodes
    tensor_inputs = [i for i in inputs if i not in constants]
    key = L.call_key(node)
    if key in ("reshape_as", "view_as") and isinstance(node.args[0], fx.Node):
        tensor_inputs = [node.args[0]]  # the other argument only lends its shape
    if key in ("sum", torch.sum) and tensor_inputs:
        stacked = C.stacked_sum(node, cands, result, path, values)
        if stacked:
            return own | stacked
    if len(tensor_inputs) == 2 and C.is_sum(node):
        return own | C.sum_cands(node, tensor_inputs, cands, result, path, values)
    if len(tensor_inputs) != 1:
        return own
    x = tensor_inputs[0]
    if key in L.LAYOUT_CALLS:
        return own | C.through_layout(node, x, values, cands.get(x, {}))
    info = C.unary_info(node, x, values, constants, result, prefix)
    if info is None or info.op is None:
        if info is not None and info.reason and x in cands and len(cands[x]) > 1:
            result.skip(site_label(path, node), info.reason)
        return own
    if L._tensor_shape(values.get(node)) is None:
        return own
    return own | C.extend(node, x, info, cands.get(x, {}), result, path, values)
