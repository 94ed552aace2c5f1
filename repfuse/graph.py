"""torch.fx plumbing: trace one module with its children as leaves (`recording` records and replays).

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

import contextlib
import copy
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _sfx
from torch import nn

from . import effects as E
from .recording import CallRecord, Replay, node_values, record_calls, release

__all__ = ["CallRecord", "LeafTracer", "Replay", "Traced", "batched_tracing", "node_values", "record_calls", "release",
           "trace"]

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
        if k in _SHAPE_ATTRS:
            value = getattr(self.tracer, "known", {}).get(self.node, _UNKNOWN)
            if isinstance(value, torch.Tensor):
                return getattr(value, k)
        return super().__getattr__(k)

    def _known(self, what: str) -> Any:
        value = getattr(self.tracer, "known", {}).get(self.node, _UNKNOWN)
        if value is _UNKNOWN:
            raise fx.proxy.TraceError(f"{what} of a value that depends on the input cannot be traced")
        self.tracer.read_values = True  # the graph now depends on the module's tensor values
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
        self.read_values = False  # a Python value was read from such a node (bool(), int(), ...)

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
        for i in node.all_input_nodes:
            if i not in self.known and i.op == "get_attr":  # a tensor constant: a get_attr node without a proxy
                value = self._evaluate(i)
                if value is _UNKNOWN:
                    return _UNKNOWN
                self.known[i] = value
            elif i not in self.known:
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
    """fx-trace `module` with its children as leaves, and check that the graph keeps every effect. Inside
    `batched_tracing`, a module built like one traced before (see `_signature`) gets a copy of that graph."""
    key = _signature(module) if _TRACES is not None else None
    if key is not None and key in _TRACES:  # type: ignore[operator]
        graph, effect = _TRACES[key]  # type: ignore[index]
        return Traced(fx.GraphModule(module, copy.deepcopy(graph), class_name=type(module).__name__), effect=effect)
    tracer = LeafTracer()
    try:
        with E.state_watch(module) as changed:
            graph = tracer.trace(module)
        gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Traced(None, f"could not trace ({type(exc).__name__}: {first[:160]})")
    traced = Traced(gm, effect=_trace_effect(gm, tracer, changed))
    if key is not None and not tracer.read_values and _own_targets(module, gm.graph):
        _TRACES[key] = (copy.deepcopy(gm.graph), traced.effect)  # type: ignore[index]
    return traced


# A module's trace is a function of its code and of what its forward can read without an input: its plain
# attributes, its children's names and classes, its tensors' names, shapes and dtypes — not their values
# unless a Python value was read from one (LeafTracer.read_values), and not a tensor fx stored on the module
# as a constant while tracing (`_own_targets`). Modules built alike (46 ConvNormAct in one model) trace once.
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_TRACES: dict[tuple[Any, ...], tuple[fx.Graph, str | None]] | None = None


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, frozenset)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN) or (callable(value) and hasattr(value, "__qualname__") and not isinstance(
        value, nn.Module) and _hashable(value))


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _signature(module: nn.Module) -> tuple[Any, ...] | None:
    """What the trace of `module` depends on, or None where that cannot be told (see above): its own
    attributes and tensors and those of every module under it (a forward may read `self.conv.groups`)."""
    own = _own_signature(module)
    if own is None:
        return None
    children = []
    for name, child in module._modules.items():
        sub = None if child is None else _signature(child)
        if sub is None and child is not None:
            return None
        children.append((name, sub))
    return (own, tuple(children))


def _own_signature(module: nn.Module) -> tuple[Any, ...] | None:
    attrs = []
    for name, value in vars(module).items():
        if name in ("_parameters", "_buffers", "_modules"):
            continue
        if name.startswith("_") and isinstance(value, (dict, set)):
            if value and name != "_non_persistent_buffers_set":  # hooks
                return None
            attrs.append((name, tuple(sorted(value)) if isinstance(value, set) else ()))
            continue
        if not _plain(value):
            return None
        attrs.append((name, value))
    tensors = tuple((store, name, None if t is None else (tuple(t.shape), t.dtype, t.requires_grad))
                    for store in ("_parameters", "_buffers") for name, t in getattr(module, store).items())
    return (type(module), tuple(attrs), tensors)


def _own_targets(module: nn.Module, graph: fx.Graph) -> bool:
    """Every get_attr of the graph names a parameter or buffer the module itself holds (none added by fx)."""
    for node in graph.nodes:
        if node.op == "get_attr":
            path, _, name = str(node.target).rpartition(".")
            try:
                owner = module.get_submodule(path)
            except AttributeError:
                return False
            if name not in owner._parameters and name not in owner._buffers:
                return False
    return True


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
# Many traces in a row

# Every fx trace sets nn.Module.__getattr__ and __call__ and sets them back: two assignments to a class with
# thousands of subclasses each way (each invalidates every subclass's method cache), which made up half of
# tracing a timm model module by module. `batched_tracing` installs two forwarding functions once; a trace
# inside it points their slot at its own wrappers instead of assigning to nn.Module. Without the fx
# internals it relies on (another torch version), every trace patches nn.Module as usual.

_SLOTS: dict[str, Any] = {"__getattr__": None, "__call__": None}
_BATCHING = all(hasattr(_sfx, name) for name in ("_new_patcher", "_Patcher", "_PatchedFn", "_orig_module_call",
                                                 "_orig_module_getattr", "CURRENT_PATCHER"))


def _forward_getattr(mod: nn.Module, attr: str) -> Any:
    wrapper = _SLOTS["__getattr__"]
    return _sfx._orig_module_getattr(mod, attr) if wrapper is None else wrapper(mod, attr)


def _forward_call(mod: nn.Module, *args: Any, **kwargs: Any) -> Any:
    wrapper = _SLOTS["__call__"]
    return _sfx._orig_module_call(mod, *args, **kwargs) if wrapper is None else wrapper(mod, *args, **kwargs)


if _BATCHING:
    class _SlotPatch(_sfx._PatchedFn):  # type: ignore[misc, valid-type]
        def revert(self) -> None:
            _SLOTS[self.fn_name] = self.orig_fn

        def patch(self) -> None:
            _SLOTS[self.fn_name] = self.new_fn

    class _SlotPatcher(_sfx._Patcher):  # type: ignore[misc, valid-type]
        def patch_method(self, cls: type, name: str, new_fn: Any, deduplicate: bool = True) -> None:
            if cls is not nn.Module or name not in _SLOTS:
                return super().patch_method(cls, name, new_fn, deduplicate)
            new_fn.__fx_already_patched = deduplicate
            self.patches_made.append(_SlotPatch(_SLOTS, name, _SLOTS[name], new_fn))
            self.patches_made[-1].patch()
            return None

    @contextlib.contextmanager
    def _slot_patcher() -> Iterator[Any]:  # fx's _new_patcher, with a _SlotPatcher
        prior = _sfx.CURRENT_PATCHER
        try:
            _sfx.CURRENT_PATCHER = patcher = _SlotPatcher()
            yield patcher
        finally:
            patcher.revert_all_patches()
            _sfx.CURRENT_PATCHER = prior


@contextlib.contextmanager
def batched_tracing() -> Iterator[None]:
    """Inside, `trace` does not assign to nn.Module (see above); outside, everything is as it was."""
    if not _BATCHING or nn.Module.__call__ is not _sfx._orig_module_call \
            or nn.Module.__getattr__ is not _sfx._orig_module_getattr:  # someone else patches: leave it be
        yield
        return
    global _TRACES
    new_patcher = _sfx._new_patcher
    nn.Module.__getattr__ = _forward_getattr  # type: ignore[method-assign]
    nn.Module.__call__ = _forward_call  # type: ignore[method-assign]
    _sfx._new_patcher = _slot_patcher
    _TRACES = {}
    try:
        yield
    finally:
        _TRACES = None
        _sfx._new_patcher = new_patcher
        nn.Module.__getattr__ = _sfx._orig_module_getattr  # type: ignore[method-assign]
        nn.Module.__call__ = _sfx._orig_module_call  # type: ignore[method-assign]
        _SLOTS.update({"__getattr__": None, "__call__": None})
