"""Graph surgery for regions with layout steps (`layouts`) and taken-over children, for `rewrite`.

A region with layout steps is written ``post(layer(pre(base)))`` with every step written anew right
after the region's output (a step of a child's forward that the parent took in calls the child's
remaining layout module by its dotted path, as ``pwconv2.1``); the region's own nodes, steps included,
are then erased as usual. A child whose whole forward a parent took in keeps only the modules those
steps still call (`prune`).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from .layouts import LayoutStep


def write_with_layout(graph: fx.Graph, pre: tuple[LayoutStep, ...], post: tuple[LayoutStep, ...],
                      output: fx.Node, name: str, base: fx.Node) -> fx.Node:
    """Write ``post(name(pre(base)))`` after `output` and give it `output`'s users; returns the last node."""
    anchor = output.next
    source = base
    with graph.inserting_before(anchor):  # each node goes before `anchor`, so after the one written before it
        for s in pre:
            source = _emit(graph, s, source)
        source = graph.create_node("call_module", name, (source,))
        for s in post:
            source = _emit(graph, s, source)
    output.replace_all_uses_with(source)
    return source


def _emit(graph: fx.Graph, step: LayoutStep, source: fx.Node) -> fx.Node:
    n = step.node
    if n.op == "call_module":
        target = f"{step.where}.{n.target}" if step.where else n.target
        return graph.create_node("call_module", target, (source,))
    return graph.create_node(n.op, n.target, (source, *n.args[1:]), dict(n.kwargs))


def step_modules(steps: tuple[LayoutStep, ...]) -> set[str]:
    """Dotted paths (in the graph that uses them) of the modules the steps of a child call."""
    return {f"{s.where}.{s.node.target}" for s in steps if s.where and s.node.op == "call_module"}


def prune(root: nn.Module, target: str, keep: set[str], plans: dict[int, Any]) -> None:
    """Child `target` of `root`, taken in by its parent, keeps only the modules in `keep` (and the path to
    them); every plan in what it loses, and its own, is marked consumed (`ModulePlan.consumed`)."""
    module = root.get_submodule(target)
    for m in module.modules():
        plan = plans.get(id(m))
        if plan is not None:
            plan.consumed = True
    _prune(module, target, keep)


def _prune(module: nn.Module, path: str, keep: set[str]) -> None:
    module._parameters.clear()
    module._buffers.clear()
    for name in list(module._modules):
        full = f"{path}.{name}"
        if full in keep:
            continue
        if any(k.startswith(f"{full}.") for k in keep):
            _prune(module._modules[name], full, keep)
        else:
            del module._modules[name]


def set_submodule(root: nn.Module, target: str, new: nn.Module) -> None:
    owner, _, leaf = target.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, new)
