"""A module's affine *suffix*: the mirror of `regions.Prefix`.

A module whose forward ENDS in a per-channel affine step (a GRN's trailing ``+ beta``, a scale) after
something that is not affine hands that step to its parent: when the parent's next op is a layer that
reads the module's output and nothing else does, the parent folds the step into that layer (the GRN's
bias becomes part of the next Linear's bias, as UniRepLKNet's own `reparameterize` does by hand), and
the module loses the step (`ModulePlan.strip_suffix`). A module whose forward ends in a call of such a
child (``Sequential(GELU(), GRN())``) hands on its child's suffix (`ModulePlan.tail`).

Only a per-channel affine with no zero scale is a suffix: the parent's self-check recovers the value
before it from the module's recorded output (`unapply`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from . import layouts as Y
from . import lowering as L
from .kernels import ConvOp
from .modules import UnsupportedProgram, graph_to_program


@dataclass
class Suffix:
    start: fx.Node  # the node whose value the module returns once the suffix is stripped
    expr: L.Expr  # relative to `start`: a per-channel affine


def find_suffix(plan: Any, cands: dict[fx.Node, dict[fx.Node, L.Expr]], ctx: Any, rec: Any,
                outside_reader: Callable[..., str | None]) -> None:
    """Set plan.suffix (the module's own) or plan.tail (a last child call that may have one)."""
    nodes = list(plan.gm.graph.nodes)
    output = nodes[-1]
    if rec.calls != 1 or rec.mutates or len(output.args) != 1 or not isinstance(output.args[0], fx.Node):
        return
    y = output.args[0]
    if y.op == "placeholder" or len(y.users) != 1 or y in ctx.replay.mutated:
        return
    if y.op == "call_module":
        child_rec = ctx.records.get(id(plan.gm.get_submodule(y.target)))
        if child_rec is not None and child_rec.calls == 1 and not any(r.output is y for r in plan.regions):
            plan.tail = y
        return
    if plan.prefix is not None:  # its parent may strip that (at its own visit): never both ends of one module
        return
    taken = set().union(*(r.expr.nodes for r in plan.regions)) if plan.regions else set()
    options = sorted(((z, e) for z, e in cands.get(y, {}).items() if z is not y), key=lambda ze: -len(ze[1].nodes))
    for z, e in options:
        if (z.op == "placeholder" or not e.op.is_diagonal or e.partial or e.strips is not None or Y.has_layout(e)
                or e.ops < 1 or e.nodes & taken or e.nodes & ctx.replay.mutated or z in ctx.replay.mutated
                or bool(torch.any(e.op.weight == 0)) or not isinstance(ctx.values.get(z), torch.Tensor)):
            continue
        if any(u not in e.nodes for n in e.nodes - {y} for u in n.users):
            continue
        if any(outside_reader(plan.gm.graph, n.target, e.nodes, ctx.constants) for n in e.nodes
               if n.op == "call_module"):
            continue
        try:
            graph_to_program(plan.gm.graph)  # the stripped module must be storable as a GraphBlock
        except UnsupportedProgram:
            return
        plan.suffix = Suffix(z, e)
        return


def chain(module: Any, plans: dict[int, Any]) -> tuple[list[tuple[str, Any]], Suffix] | None:
    """The plans a suffix is handed through, from `module` down (relative dotted path, plan), and the suffix."""
    path, out = "", []
    plan = plans.get(id(module))
    while plan is not None and plan.gm is not None and not plan.consumed:
        out.append((path, plan))
        if plan.suffix is not None:
            return out, plan.suffix
        if plan.tail is None:
            return None
        path = f"{path}.{plan.tail.target}" if path else str(plan.tail.target)
        plan = plans.get(id(plan.gm.get_submodule(plan.tail.target)))
    return None


def unapply(op: ConvOp, value: torch.Tensor) -> torch.Tensor:
    """The value before the per-channel affine `op` (channels on axis 1, or the last axis for nd == 0)."""
    axis = 1 if op.nd else value.dim() - 1
    shape = [1] * value.dim()
    shape[axis] = -1
    w, b = op.weight.reshape(shape), op.bias.reshape(shape)
    return (value.double() - b) / w
