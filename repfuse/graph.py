"""torch.fx plumbing: record how each module is called, trace it, and replay its graph.

Every module is analysed on its own, deepest first, with its children as leaves: a child whose
whole forward is one affine op (its *summary*) then acts as that op in its parent's graph. So a
sum written inside a block, in a parent's forward, or over a ModuleList in a loop is found the
same way, and a module that cannot be traced still has its children fused.

A trace must say everything the forward does (DESIGN §3, *Effects*). fx records tensor
operations; it does not record `torch.no_grad()` / autocast regions, operations on real tensors
(`self.calls.add_(1)` runs once, at trace time) or attribute writes, and it turns ``t += u``
into an out-of-place add. So the tracer here records augmented assignments as in-place ops and
notes the grad/autocast mode of every node, and `trace` watches the module's state: a forward
whose trace would lose an effect is reported (`Traced.effect`) and its module is left as it is.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from . import effects as E
from .dtypes import Shadows

# ----------------------------------------------------------------------------------------------
# Recording calls


@dataclass
class CallRecord:
    args: tuple[Any, ...]  # copies taken before the call (a forward may change its input in place)
    kwargs: dict[str, Any]
    output: Any
    calls: int = 1
    mutates: tuple[int, ...] = ()  # positional tensor arguments the call changed in place
    aliases: bool = False  # the output shares memory with an input (nn.Identity, a view)


def _versions(value: Any) -> list[tuple[torch.Tensor, int]]:
    return [(t, t._version) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _storages(value: Any) -> set[int]:
    out = set()
    for t in tree_flatten(value)[0]:
        if isinstance(t, torch.Tensor):
            try:
                out.add(t.untyped_storage().data_ptr())
            except RuntimeError:
                pass
    return out


def record_calls(model: nn.Module, inputs: tuple[Any, ...]) -> dict[int, CallRecord]:
    """Run `model` once and keep, per module (by id), its first call's inputs and output, whether the
    call changed an input in place and whether its output aliases an input."""
    records: dict[int, CallRecord] = {}
    pending: dict[int, tuple[Any, Any, list[tuple[torch.Tensor, int]], set[int]]] = {}
    handles = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(module) not in records and id(module) not in pending:
            pending[id(module)] = (_snapshot(args), _snapshot(kwargs), _versions(args), _storages((args, kwargs)))

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        rec = records.get(id(module))
        if rec is not None:
            rec.calls += 1
            return
        if id(module) not in pending:
            return
        a, k, versions, storages = pending.pop(id(module))
        positional = [i for i, v in enumerate(args) if isinstance(v, torch.Tensor)]
        changed = {id(t) for t, v in versions if t._version != v}
        mutates = tuple(i for i in positional if id(args[i]) in changed)
        records[id(module)] = CallRecord(a, k, _snapshot(output), mutates=mutates,
                                         aliases=bool(_storages(output) & storages))

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return records


def _snapshot(value: Any) -> Any:
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


# ----------------------------------------------------------------------------------------------
# Tracing

_INPLACE = {"__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
            "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
            "__ipow__": operator.ipow, "__iand__": operator.iand, "__ior__": operator.ior, "__ixor__": operator.ixor,
            "__ilshift__": operator.ilshift, "__irshift__": operator.irshift, "__imatmul__": operator.imatmul}


class _AssignableProxy(fx.Proxy):
    """fx's Proxy refuses `t[idx] = v` (DBB writes pad rings that way) and turns `t += u` into `t = t + u`,
    which drops the change to `t` that every other holder of it sees. Record both as what they are.

    A value computed from the module's parameters and buffers alone is known while tracing (see
    `LeafTracer.create_proxy`): its shape and Python conversions (``o, i, h, w = self.weight.size()``,
    ``int(t / g)``) are those fixed numbers, so code that builds a kernel in forward still traces."""

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, k: str) -> Any:
        value = getattr(self.tracer, "known", {}).get(self.node, _UNKNOWN)
        if k in _SHAPE_ATTRS and isinstance(value, torch.Tensor):
            return getattr(value, k)
        return super().__getattr__(k)

    def _known(self, what: str) -> Any:
        value = getattr(self.tracer, "known", {}).get(self.node, _UNKNOWN)
        if value is _UNKNOWN:
            raise fx.proxy.TraceError(f"{what} of a value that depends on the input cannot be traced")
        return value

    def __bool__(self) -> bool:
        return bool(self._known("bool()"))

    def __int__(self) -> int:
        return int(self._known("int()"))

    def __float__(self) -> float:
        return float(self._known("float()"))

    def __index__(self) -> int:
        return self._known("an index").__index__()


_UNKNOWN = object()
_SHAPE_ATTRS = frozenset({"shape", "ndim"})
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "__len__"})


def _inplace_method(fn: Any) -> Any:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", fn, (self, other), {})
    return method


for _name, _fn in _INPLACE.items():
    setattr(_AssignableProxy, _name, _inplace_method(_fn))


def _mode() -> tuple[Any, ...]:
    """The grad / inference / autocast state that changes what an op computes."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))


class LeafTracer(fx.Tracer):
    """Traces one module's own forward; every submodule call stays a call_module leaf. Notes the nodes
    created under another grad or autocast mode than the trace started in (a `torch.no_grad()` or
    `torch.autocast` region, which the graph itself would not keep)."""

    def __init__(self) -> None:
        super().__init__()
        self.start_mode = _mode()
        self.moded: list[fx.Node] = []
        self.known: dict[fx.Node, Any] = {}  # node computed from the module's state alone → its value

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     *rest: Any, **more: Any) -> Any:
        """Also evaluate what depends on parameters, buffers and literals alone (pure ops only): a shape
        query of such a value returns the plain number instead of a node."""
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        node = getattr(proxy, "node", None)
        if node is None:
            return proxy
        value = self._evaluate(node)
        if value is _UNKNOWN:
            return proxy
        if kind == "call_method" and target in _SHAPE_METHODS and not node.users:
            self.graph.erase_node(node)
            return value
        self.known[node] = value
        return proxy

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            try:
                return _fetch(self.root, str(node.target))
            except (AttributeError, KeyError):
                return _UNKNOWN
        if node.op not in ("call_function", "call_method") or not node.all_input_nodes or E.is_impure(node):
            return _UNKNOWN
        for i in node.all_input_nodes:  # tensor constants become get_attr nodes without a proxy
            if i not in self.known and i.op == "get_attr" and self._evaluate(i) is not _UNKNOWN:
                self.known[i] = self._evaluate(i)
        if any(i not in self.known for i in node.all_input_nodes):
            return _UNKNOWN
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.known[n])
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
                return node.target(*args, **kwargs)
        except Exception:  # not evaluable here: it stays a node like any other
            return _UNKNOWN

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AssignableProxy(node, self)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if _mode() != self.start_mode:
            self.moded.append(node)
        return node


def _fetch(root: nn.Module, target: str) -> Any:
    """The tensor at `target` under `root`, read from the module dicts (nn.Module.__getattr__ is patched
    while tracing)."""
    *path, name = target.split(".")
    m = root
    for part in path:
        m = m._modules[part]
    for store in (m._parameters, m._buffers, m.__dict__):
        if name in store:
            return store[name]
    raise AttributeError(target)


@dataclass
class Traced:
    gm: fx.GraphModule | None
    reason: str | None = None  # why it could not be traced
    effect: str | None = None  # why the module must stay as it is although it traced


def trace(module: nn.Module) -> Traced:
    """fx-trace `module` with its children as leaves, and check that the graph keeps every effect."""
    tracer = LeafTracer()
    try:
        with E.state_watch(module) as changed:
            graph = tracer.trace(module)
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Traced(None, f"could not trace ({type(exc).__name__}: {first[:160]})")
    return Traced(gm, effect=_trace_effect(gm, tracer, changed))


def _trace_effect(gm: fx.GraphModule, tracer: LeafTracer, changed: dict[str, list[str]]) -> str | None:
    if tracer.moded:
        return (f"its forward runs '{tracer.moded[0].name}' under another grad or autocast mode "
                "(torch.no_grad / torch.autocast), which a rewritten forward would lose: left as it is")
    if changed.get("tensors"):
        return f"its forward changes its tensors in place ({', '.join(changed['tensors'][:3])}): left as it is"
    if changed.get("attributes"):
        return f"its forward assigns attributes ({', '.join(changed['attributes'][:3])}): left as it is"
    state = _state_derived(gm.graph)
    for node in gm.graph.nodes:
        if E.draws_random(node):
            return f"its forward draws random numbers ('{node.name}'): left as it is"
        target = E.inplace_target(node)
        if target is not None and target in state:
            return f"its forward updates its tensor '{target.name}' in place ('{node.name}'): left as it is"
    return None


def _state_derived(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from parameters and buffers alone (views of the module's state among them)."""
    state: set[fx.Node] = set()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (node.op in ("call_function", "call_method") and inputs
                                     and all(i in state for i in inputs)):
            state.add(node)
    return state


# ----------------------------------------------------------------------------------------------
# Replaying a graph on the recorded inputs


@dataclass
class Replay:
    """Every node's value for the recorded call, and what in-place ops did to them.

    values: after the last write; initial: the value a later write changed, as first computed;
    mutated: nodes whose memory a later op (or a child) changed in place; dtypes: every node's
    dtype in the model's own precision (see dtypes.Shadows).
    """

    values: dict[fx.Node, Any] = field(default_factory=dict)
    initial: dict[fx.Node, Any] = field(default_factory=dict)
    mutated: set[fx.Node] = field(default_factory=set)
    dtypes: dict[fx.Node, Any] = field(default_factory=dict)


class ValueRecorder(fx.Interpreter):
    """Runs a traced graph on recorded inputs and keeps every node's value.

    A child called exactly once in the whole forward is not run again: its recorded output is
    reused, so analysing every level of the tree costs about one forward, not one per level — except
    a child that changes its input in place or returns (a view of) it, which runs for real so that
    the replay sees the same memory effects as the forward did.
    """

    def __init__(self, gm: fx.GraphModule, records: dict[int, CallRecord], shadows: Shadows | None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.replay = Replay()
        self.records = records
        self.shadows = shadows
        self.storage: dict[fx.Node, int] = {}

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        rec = self.records.get(id(module))
        if rec is not None and rec.calls == 1 and not rec.mutates and not rec.aliases \
                and getattr(module, "inplace", False) is not True:
            return _snapshot(rec.output)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        inputs = [i for i in n.all_input_nodes if isinstance(self.env.get(i), torch.Tensor)]
        before = {i: self.env[i]._version for i in inputs}
        value = super().run_node(n)
        r = self.replay
        r.values[n] = _snapshot(value)
        if isinstance(value, torch.Tensor):
            try:
                self.storage[n] = value.untyped_storage().data_ptr()
            except RuntimeError:
                pass
            if self.shadows is not None:
                r.dtypes[n] = self.shadows.get(value)
        written = [i for i in inputs if self.env[i]._version != before[i]]
        if written:
            hit = {self.storage[i] for i in written if i in self.storage}
            sharing = [o for o, ptr in self.storage.items() if ptr in hit and o is not n]
            if len(written) == 1 and sharing == written and self._private(written[0], n):
                del self.storage[written[0]]  # superseded by `n`: never read again
            else:
                for other in sharing:  # every earlier value sharing the written memory is now stale
                    if other not in r.mutated:
                        r.initial[other] = r.values[other]
                    r.mutated.add(other)
                    r.values[other] = _snapshot(self.env[other])
                if isinstance(value, torch.Tensor) and self.storage.get(n) in hit:
                    r.mutated.add(n)  # the written value itself: opaque as well
        return value

    def _private(self, target: fx.Node, writer: fx.Node) -> bool:
        """A write that nobody else can see (``out = a + b; out += c``): `target` is read by `writer`
        only and is not a value from outside the graph (an input, a tensor of the module, the output of
        a user module, which might keep it)."""
        if any(u is not writer for u in target.users) or target.op in ("placeholder", "get_attr"):
            return False
        if target.op == "call_module":
            module = self.fetch_attr(str(target.target))
            rec = self.records.get(id(module))
            return rec is not None and not rec.aliases and not rec.mutates
        return True


def node_values(gm: fx.GraphModule, rec: CallRecord, records: dict[int, CallRecord],
                shadows: Shadows | None = None) -> Replay | None:
    """The replay of the recorded call (shapes, constants, in-place effects); None if it cannot be replayed."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # the replay must not change the records (other modules' analyses read them): copy the inputs
    # when something in the graph writes in place
    writes = any(E.inplace_target(n) is not None or (n.op == "call_module" and getattr(
        records.get(id(gm.get_submodule(str(n.target)))), "mutates", ())) for n in gm.graph.nodes)
    copy = _snapshot if writes else (lambda v: v)
    args = list(copy(rec.args))
    for ph in placeholders[len(args):]:
        if ph.target in rec.kwargs:
            args.append(copy(rec.kwargs[ph.target]))
        elif ph.args:
            args.append(ph.args[0])
        else:
            return None
    interp = ValueRecorder(gm, records, shadows)
    try:
        with torch.no_grad():
            out = interp.run(*args)
    except Exception:  # an unreplayable graph is simply not analysed
        return None
    if not _same_outputs(out, rec.output):  # the trace took another path than eager Python did
        return None
    return interp.replay


def _same_outputs(a: Any, b: Any) -> bool:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or not torch.allclose(
                x.double(), y.double(), rtol=1e-9, atol=1e-12, equal_nan=True)):
            return False
    return True
