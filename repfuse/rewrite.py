"""Pass 2 of the engine: replace what `analysis` found. The only code that mutates a model.

Top-down: a module whose whole forward is one op becomes one conv in its parent (which keeps its
class); a module with fused regions becomes a `GraphBlock` (its untouched children keep their
names); a module whose prefix a parent folded in loses that prefix; one whose suffix a parent folded
in loses it as the parent is written (`suffix`); a child whose whole forward a parent took in keeps only
the layout modules the parent's graph still calls (`rewrite_steps`); everything else is left exactly as
it was.

Code that stays decides what else must stay (DESIGN §3, *Effects*): a module left as Python keeps
running all of its forward, also the branches no recorded forward took, so every child that code
reaches into (`self.block.conv`, see `reach`) is left exactly as it is; so is everything a
rewritten graph still reads (`self.branch.conv(x)` in a GraphBlock). A node with an effect
(`out.clamp_(-4, 4)`, `self.act(out)` with an in-place activation) is never removed as dead code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import effects as E
from . import kernels as K
from . import layouts as Y
from . import lowering as L
from . import rewrite_steps as W
from . import suffix as S
from .analysis import COST_SLACK, Analysis, DtypeMap, ModulePlan, Region, analyse, float64_forward, site_label
from .copies import cast_copy, count_layers, float64_copy
from .kernels import ConvOp
from .modules import SHADOWABLE, GraphBlock, UnsupportedProgram, carried, graph_to_program
from .reach import reached
from .regions import adds_layer
from .types import FusionSite

__all__ = ["Applied", "DtypeMap", "analyse", "apply", "cast_copy", "count_layers", "float64_copy", "float64_forward",
           "materialise"]


# ----------------------------------------------------------------------------------------------
# Pass 2: apply


@dataclass
class Applied:
    model: nn.Module
    sites: list[FusionSite]


def apply(root: nn.Module, analysis: Analysis, dtypes: DtypeMap, default: torch.dtype) -> Applied:
    """Rewrite `root` in place per `analysis`; `dtypes` maps tensors to their original dtype and learns
    those of the new layers; `default` is the model's dtype, for layers whose sources held no weights."""
    sites: list[FusionSite] = []
    holder = nn.Module()
    holder.add_module("root", root)
    seen: set[int] = set()
    frozen = Frozen()

    def visit(parent: nn.Module, name: str, path: str) -> None:
        m = parent._modules[name]
        if m is None or id(m) in seen:
            return
        seen.add(id(m))
        plan = analysis.plans.get(id(m))
        if plan is not None and plan.consumed:  # a parent took its forward in: only its layout modules are left
            return
        stays = frozen.holds(path)
        if plan is not None and plan.gm is not None:  # what its graph reads inside its children stays
            frozen.graph_reads(path, plan.gm.graph)
        if (not stays and plan is not None and plan.summary is not None and plan.summary.ops >= 2
                and L.op_cost(plan.summary.op) <= plan.summary.cost * COST_SLACK and adds_layer(plan.summary) is None
                and all(p >= 0 for p in plan.summary.op.padding)):
            dtype, device = _dtype_of([m], dtypes, default)
            layer = materialise(plan.summary.op, (plan.summary_dtype or dtype, device), dtypes)
            keep_attributes(m, layer)
            setattr(parent, name, layer)
            before = _count_params(m)
            sites.append(_site(path, plan.summary, layer, before, plan.summary_error))
            return
        rewritten = False
        if not stays and plan is not None and (plan.regions or plan.strip_prefix or plan.strip_suffix):
            try:
                m = _to_graph_block(plan, path, analysis, dtypes, default, sites, frozen)
            except UnsupportedProgram as exc:
                for r in plan.regions:
                    analysis.skip(site_label(path, r.output), f"not rewritten: {exc}")
            else:
                setattr(parent, name, m)
                rewritten = True
        elif stays and plan is not None and (plan.regions or plan.summary is not None):
            analysis.skip(path or "<root>", f"left as it is: {frozen.why(path)}")
        if not rewritten:  # its own Python keeps running: what that code reaches stays too
            frozen.code_reads(path, m)
        for child_name in list(m._modules):
            visit(m, child_name, f"{path}.{child_name}" if path else child_name)

    visit(holder, "root", "")
    return Applied(holder._modules["root"], sites)


class Frozen:
    """Paths of modules that must stay exactly as they are, and why."""

    def __init__(self) -> None:
        self.keep: dict[str, str] = {}
        self.trees: dict[str, str] = {}

    def holds(self, path: str) -> bool:
        return path in self.keep or any(path == t or path.startswith(f"{t}.") or t == "" for t in self.trees)

    def why(self, path: str) -> str:
        if path in self.keep:
            return self.keep[path]
        return next((w for t, w in self.trees.items() if path == t or path.startswith(f"{t}.") or t == ""), "")

    def graph_reads(self, path: str, graph: fx.Graph) -> None:
        """`self.a.b(x)` / `self.a.weight` in a graph: `a` (and `a.b` for a tensor of it) must keep them."""
        for n in graph.nodes:
            if n.op not in ("call_module", "get_attr"):
                continue
            parts = str(n.target).split(".")
            for i in range(1, len(parts)):
                self.keep.setdefault(_join(path, ".".join(parts[:i])),
                                     f"'{_join(path, str(n.target))}' is read by the forward of "
                                     f"'{path or '<root>'}'")

    def code_reads(self, path: str, module: nn.Module) -> None:
        """A module left as Python: every child its code can reach (in any branch) stays."""
        r = reached(module)
        for rel in r.keep:
            self.keep.setdefault(_join(path, rel), f"the Python forward of '{path or '<root>'}' reads inside it")
        for rel in r.subtrees:
            self.trees.setdefault(_join(path, rel) if rel else path,
                                  f"the Python forward of '{path or '<root>'}' hands it to other code")
        if "" in r.subtrees and path == "":
            self.trees[""] = "the Python forward of '<root>' hands the model to other code"


def _join(path: str, rel: str) -> str:
    return f"{path}.{rel}" if path and rel else path or rel


def keep_attributes(old: nn.Module, layer: nn.Module) -> None:
    """Every plain attribute of the replaced module (`use_act`, `deploy`, Ultralytics' routing `f`, `i`,
    `type`, `np`) stays readable on its replacement, for parents whose forward reads them. Never one the
    new layer has itself (a child, tensor, setting or method of its class)."""
    own = vars(layer)
    for name, value in vars(old).items():
        if (carried(name, value) and name not in own
                and not any(name in own.get(k, {}) for k in ("_parameters", "_buffers", "_modules"))
                and (not hasattr(type(layer), name) or name in SHADOWABLE)):
            setattr(layer, name, value)


def _dtype_of(sources: list[nn.Module], dtypes: DtypeMap, default: torch.dtype,
              ) -> tuple[torch.dtype, torch.device]:
    """Original dtype and device of the first floating tensor held by `sources` (their weights)."""
    for source in sources:
        for m in source.modules():
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is not None and t.is_floating_point():
                        return dtypes.get((id(m), name), t.dtype), t.device
    return default, torch.device("cpu")


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def materialise(op: ConvOp, dtype_device: tuple[torch.dtype, torch.device], dtypes: DtypeMap) -> nn.Module:
    """A ConvOp as a fresh nn.ConvNd (or nn.Linear) in float64; `dtypes` learns the dtype each new
    tensor is cast to at the very end (by `cast_copy`)."""
    target, device = dtype_device
    dtype = torch.float64
    has_bias = bool(torch.any(op.bias != 0))
    if op.nd == 0:
        op = K.regroup(op, 1)
        layer: nn.Module = nn.Linear(op.in_channels, op.out_channels, bias=has_bias, device="meta")
    else:  # on the meta device: no initial weights drawn (and allocated) only to be replaced
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[op.nd]
        layer = cls(op.in_channels, op.out_channels, op.kernel_size, op.stride, op.padding, op.dilation,
                    op.groups, bias=has_bias, padding_mode=op.padding_mode, device="meta")
    with torch.no_grad():
        layer.weight = nn.Parameter(op.weight.to(dtype=dtype, device=device))
        if has_bias:
            layer.bias = nn.Parameter(op.bias.to(dtype=dtype, device=device))
    for name in layer._parameters:
        dtypes[(id(layer), name)] = target
    return layer


def _site(path: str, expr: L.Expr, layer: nn.Module, params_before: int, error: float) -> FusionSite:
    op = expr.op if expr.op.nd else K.regroup(expr.op, 1)
    extras = []
    if expr.norms:
        extras.append(f"BN×{expr.norms}")
    if expr.scales:
        extras.append(f"scale×{expr.scales}")
    if op.groups > 1:
        extras.append("depthwise" if op.groups == op.in_channels == op.out_channels else f"groups={op.groups}")
    pattern = "+".join(expr.terms) + (", " + ", ".join(extras) if extras else "")
    return FusionSite(module=path or "<root>", pattern=pattern, branches=expr.leaves, kernel=op.kernel_size,
                      in_channels=op.in_channels, out_channels=op.out_channels, groups=op.groups,
                      stride=op.stride, dilation=op.dilation, params_before=params_before,
                      params_after=_count_params(layer), max_abs_error=error)


def _to_graph_block(plan: ModulePlan, path: str, analysis: Analysis, dtypes: DtypeMap, default: torch.dtype,
                    sites: list[FusionSite], frozen: Frozen) -> GraphBlock:
    """Replace each region of plan's graph by one layer; the module becomes a GraphBlock.

    A region that ends in a child's affine prefix feeds the new layer to that child, whose prefix
    is then stripped when the child is visited (`strip_prefix`).
    """
    m, gm = plan.module, plan.gm
    graph = gm.graph
    graph_to_program(graph)  # raises UnsupportedProgram before anything is changed
    consumed_modules: list[str] = []
    regions = plan.regions
    replaced: dict[fx.Node, fx.Node] = {}  # a node gone from the graph → the node that now holds its value
    if plan.strip_prefix and plan.prefix is not None:
        inner = plan.prefix.expr.nodes
        regions = [r for r in regions if not (r.expr.nodes & inner)]
        placeholder = next(n for n in graph.nodes if n.op == "placeholder")
        plan.prefix.output.replace_all_uses_with(placeholder)
        replaced[plan.prefix.output] = placeholder
        for n in sorted(inner, key=_order(graph), reverse=True):
            graph.erase_node(n)
        consumed_modules.extend(sorted({n.target for n in inner if n.op == "call_module"}))
    if plan.strip_suffix and plan.suffix is not None:  # a parent folded it into the op after the call
        end = plan.suffix.expr.nodes
        out = next(n for n in graph.nodes if n.op == "output")
        out.replace_input_with(out.args[0], plan.suffix.start)
        for n in sorted(end, key=_order(graph), reverse=True):
            graph.erase_node(n)
        consumed_modules.extend(sorted({n.target for n in end if n.op == "call_module"}))
        gone = {site_label(path, n) for n in end}  # no longer "left as it is": the parent folded it
        analysis.skipped[:] = [s for s in analysis.skipped if s.module not in gone]
    regions = [r for r in regions if not _touches_frozen(r, path, frozen, analysis)]
    suffixed: list[tuple[str, ModulePlan, str]] = []  # children whose suffix a region takes over (and its layer)
    names = _fused_names(m, len(regions))
    strips: list[ModulePlan] = []  # children whose prefix a region takes over (marked once the block exists)
    new_layers: list[tuple[str, nn.Module, Region, int]] = []
    keep: set[str] = set()  # modules of children taken in that the new graph still calls (their layout steps)
    for region, name in zip(regions, names):
        base = region.base
        while base in replaced:
            base = replaced[base]
        kept = region.output if region.expr.partial else None  # the child that keeps its suffix
        steps = Y.layout_nodes(region.expr)  # layout-only ops: they stay, on their side of the new layer
        targets = sorted({n.target for n in region.expr.nodes
                          if n.op == "call_module" and n is not kept and n not in steps})
        keep |= W.step_modules((*region.expr.pre, *region.expr.post))
        if region.expr.strips is not None:
            links, _ = S.chain(m.get_submodule(region.base.target), analysis.plans)
            suffixed.append((_join(str(region.base.target), links[-1][0]), links[-1][1], name))
        sources = [m.get_submodule(t) for t in targets]
        if kept is not None:
            sources.append(m.get_submodule(kept.target))
        dtype, device = _dtype_of(sources, dtypes, default)
        layer = materialise(region.expr.op, (region.dtype or dtype, device), dtypes)
        before = sum(_count_params(m.get_submodule(t)) for t in targets)
        gm.add_submodule(name, layer)  # so fx's lint sees the target
        if Y.has_layout(region.expr):
            replaced[region.output] = W.write_with_layout(graph, region.expr.pre, region.expr.post, region.output,
                                                          name, base)
        elif kept is None:
            with graph.inserting_after(region.output):
                new = graph.create_node("call_module", name, (base,))
            region.output.replace_all_uses_with(new)
            new.args = (base,)
            replaced[region.output] = new
        else:
            child = m.get_submodule(kept.target)
            strips.append(analysis.plans[id(child)])
            before += sum(p.numel() for n in analysis.plans[id(child)].prefix.expr.nodes if n.op == "call_module"
                          for p in child.get_submodule(n.target).parameters())
            with graph.inserting_before(kept):
                new = graph.create_node("call_module", name, (base,))
            kept.args = (new,)
        for n in sorted(region.expr.nodes - {kept}, key=_order(graph), reverse=True):
            graph.erase_node(n)
        consumed_modules.extend(targets)
        new_layers.append((name, layer, region, before))
    attrs_before = {n.target for n in graph.nodes if n.op == "get_attr"}
    graph.eliminate_dead_code(is_impure_node=E.is_impure)
    still_used = {n.target for n in graph.nodes if n.op == "get_attr"}
    consumed_attrs = attrs_before - still_used
    graph.lint()
    # the only step that may still refuse (UnsupportedProgram): nothing outside the graph has changed yet
    block = GraphBlock(graph_to_program(graph), source_class=type(m).__qualname__)
    # children that lose their suffix: written (and checked storable) before anything outside changes
    stripped, suffix_params = [], {}
    try:
        for target, child_plan, layer_name in suffixed:
            child_plan.strip_suffix = True
            had = _count_params(child_plan.module)
            new_child = _to_graph_block(child_plan, _join(path, target), analysis, dtypes, default, sites, frozen)
            stripped.append((target, new_child))
            suffix_params[layer_name] = suffix_params.get(layer_name, 0) + had - _count_params(new_child)
    except UnsupportedProgram:
        for _, child_plan, _ in suffixed:
            child_plan.strip_suffix = False
        raise
    for target, new_child in stripped:
        W.set_submodule(m, target, new_child)
    for child_plan in strips:
        child_plan.strip_prefix = True
    attr_params = 0
    for t in consumed_attrs:
        owner, _, leaf = t.rpartition(".")
        holder = m.get_submodule(owner) if owner else m
        value = getattr(holder, leaf, None)
        if isinstance(value, nn.Parameter):
            attr_params += value.numel()
        if leaf in holder._parameters:
            del holder._parameters[leaf]
        elif leaf in holder._buffers:
            del holder._buffers[leaf]
    for name, child in m._modules.items():
        block.add_module(name, child)
    for t in consumed_modules:
        if any(k.startswith(f"{t}.") for k in keep):  # a child taken in whose layout modules stay
            W.prune(block, t, keep, analysis.plans)
        else:
            _delete_module(block, t)
    for name, p in m._parameters.items():
        block.register_parameter(name, p)
    for name, b in m._buffers.items():
        block.register_buffer(name, b, persistent=name not in m._non_persistent_buffers_set)
    for name in [*m._parameters, *m._buffers]:
        if (id(m), name) in dtypes:
            dtypes[(id(block), name)] = dtypes[(id(m), name)]
    for t in still_used:
        if "." not in t and not hasattr(block, t):
            value = getattr(m, t)
            if isinstance(value, torch.Tensor):
                block.register_buffer(t, value)
    prefix = f"{path}." if path else ""
    for i, (name, layer, region, before) in enumerate(new_layers):
        block.add_module(name, layer)
        sites.append(_site(prefix + name, region.expr, layer,
                           before + (attr_params if i == 0 else 0) + suffix_params.get(name, 0), region.error))
    keep_attributes(m, block)
    return block


def _touches_frozen(region: Region, path: str, frozen: Frozen, analysis: Analysis) -> bool:
    """Does the region remove (or strip the prefix of) a module something else still reads?"""
    steps = Y.layout_nodes(region.expr)
    for n in region.expr.nodes:
        if n.op == "call_module" and n not in steps and frozen.holds(_join(path, str(n.target))):
            analysis.skip(site_label(path, region.output), f"'{n.target}' must stay as it is: "
                          f"{frozen.why(_join(path, str(n.target)))}")
            return True
    if region.expr.strips is not None:
        return _suffix_frozen(region, path, frozen, analysis)
    return False


def _suffix_frozen(region: Region, path: str, frozen: Frozen, analysis: Analysis) -> bool:
    """Can the children a region's suffix comes through not change (kept, or read by code that stays)?"""
    owner = region.base.graph.owning_module
    found = S.chain(owner.get_submodule(region.base.target), analysis.plans)
    why = None if found is not None else "its affine end is no longer there"
    for i, (rel, link) in enumerate(found[0] if found is not None else []):
        where = _join(path, _join(str(region.base.target), rel))
        if why is None and frozen.holds(where):
            why = frozen.why(where)
        if why is None and i + 1 < len(found[0]) and reached(link.module).keep | reached(link.module).subtrees:
            why = f"the Python forward of '{where}' reads inside it"
    if why is not None:
        analysis.skip(site_label(path, region.output), f"the affine end of '{region.base.target}' must stay: {why}")
    return why is not None


def _order(graph: fx.Graph) -> Any:
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]


def _fused_names(m: nn.Module, count: int) -> list[str]:
    taken = set(m._modules) | set(m._parameters) | set(m._buffers) | set(vars(m))
    names, i = [], 0
    while len(names) < count:
        name = "fused" if i == 0 else f"fused{i}"
        if name not in taken:
            names.append(name)
        i += 1
    return names


def _delete_module(root: nn.Module, target: str) -> None:
    """Remove a consumed layer, then any container left empty by it."""
    parts = target.split(".")
    chain = [root]
    for p in parts[:-1]:
        nxt = chain[-1]._modules.get(p)
        if nxt is None:
            return
        chain.append(nxt)
    chain[-1]._modules.pop(parts[-1], None)
    for depth in range(len(parts) - 1, 0, -1):
        container = chain[depth]
        if not container._modules and not container._parameters and not container._buffers:
            chain[depth - 1]._modules.pop(parts[depth - 1], None)
        else:
            break
