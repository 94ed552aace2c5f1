"""Recording a forward and replaying one module's graph on what was recorded (see `graph` for tracing).

`record_calls` runs the model once and keeps, per module, its first call's inputs and output (one shared
copy per tensor and version). `node_values` replays a traced graph on those: a child called once is not
run again (its recorded output stands for it), values are kept by reference and copied only before an op
that may write their memory, and what in-place ops did is tracked (`Replay`).
"""

from __future__ import annotations

import weakref
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


class _Snapshots:
    """Copies of the tensors a forward passes between modules, one per tensor and version: a block's
    output is also its parent's output and the next block's input, and is stored once."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}

    def take(self, value: Any) -> Any:
        return tree_map(self._one, value)

    def _one(self, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        hit = self._seen.get(id(v))
        if hit is not None and hit[0]() is v and hit[1] == v._version:
            return hit[2]
        copy = v.detach().clone()
        self._seen[id(v)] = (weakref.ref(v), v._version, copy)
        return copy


def record_calls(model: nn.Module, inputs: tuple[Any, ...]) -> dict[int, CallRecord]:
    """Run `model` once and keep, per module (by id), its first call's inputs and output, whether the
    call changed an input in place and whether its output aliases an input. Records share their copies
    of the same tensor (see `_Snapshots`): they are read-only."""
    records: dict[int, CallRecord] = {}
    pending: dict[int, tuple[Any, Any, list[tuple[torch.Tensor, int]], set[int]]] = {}
    handles = []
    snapshots = _Snapshots()
    _snapshot = snapshots.take

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

    def __init__(self, gm: fx.GraphModule, records: dict[int, CallRecord], shadows: Shadows | None,
                 writes: bool = True, copy_all: bool = False) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.replay = Replay()
        self.records = records
        self.shadows = shadows
        self.storage: dict[fx.Node, int] = {}
        # Values are kept by reference and copied just before an op that may write their memory runs
        # (`live`: the nodes whose kept value is still the tensor itself); a write that no op announced
        # makes node_values replay again with every value copied (`copy_all`).
        self.writes = writes  # the graph has in-place ops or children that write: a recorded output is copied
        self.copy_all = copy_all
        self.live: set[fx.Node] = set()

    def _recorded(self, module: nn.Module) -> CallRecord | None:
        """The record whose output stands for a call of `module`, when it need not run again."""
        rec = self.records.get(id(module))
        if rec is not None and rec.calls == 1 and not rec.mutates and not rec.aliases and rec.output is not None \
                and getattr(module, "inplace", False) is not True:
            return rec
        return None

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        rec = self._recorded(self.fetch_attr(target))
        if rec is not None:
            return _snapshot(rec.output) if self.writes or self.copy_all else rec.output
        return super().call_module(target, args, kwargs)

    def _may_write(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return self._recorded(self.fetch_attr(str(n.target))) is None
        return E.inplace_target(n) is not None

    def run_node(self, n: fx.Node) -> Any:
        inputs = [i for i in n.all_input_nodes if isinstance(self.env.get(i), torch.Tensor)]
        before = {i: self.env[i]._version for i in inputs}
        r = self.replay
        announced = self.copy_all or self._may_write(n)
        if announced and self.live:  # keep what every value sharing the inputs' memory holds now
            hit = {self.storage[i] for i in inputs if i in self.storage}
            for o in [o for o in self.live if self.storage.get(o) in hit]:
                r.values[o] = _snapshot(r.values[o])
                self.live.discard(o)
        value = super().run_node(n)
        if not announced and any(self.env[i]._version != before[i] for i in inputs):
            raise _WritesInPlace  # a write nothing announced: replay again, copying every value
        if self.copy_all:
            r.values[n] = _snapshot(value)
        else:
            r.values[n] = value
            if isinstance(value, torch.Tensor):
                self.live.add(n)
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
            chain = self._through_identity(written[0]) if len(written) == 1 else []
            if len(written) == 1 and set(sharing) == set(chain) and all(
                    self._private(a, b) for a, b in zip(chain, [n, *chain])):
                for a in chain:
                    del self.storage[a]  # superseded by `n`: never read again
            else:
                for other in sharing:  # every earlier value sharing the written memory is now stale
                    if other not in r.mutated:
                        r.initial[other] = r.values[other]
                    r.mutated.add(other)
                    r.values[other] = _snapshot(self.env[other])
                if isinstance(value, torch.Tensor) and self.storage.get(n) in hit:
                    r.mutated.add(n)  # the written value itself: opaque as well
        return value

    def _through_identity(self, node: fx.Node) -> list[fx.Node]:
        """`node`, and while it is the output of an nn.Identity child (which hands its input back), that
        input too: ``x += y`` on ``drop_path(a + b)`` writes the memory of ``a + b``."""
        chain = [node]
        while node.op == "call_module" and type(self.fetch_attr(str(node.target))) is nn.Identity \
                and len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs:
            node = node.args[0]
            chain.append(node)
        return chain

    def _private(self, target: fx.Node, writer: fx.Node) -> bool:
        """A write that nobody else can see (``out = a + b; out += c``): `target` is read by `writer`
        only and is not a value from outside the graph (an input, a tensor of the module, the output of
        a user module, which might keep it)."""
        if any(u is not writer for u in target.users) or target.op in ("placeholder", "get_attr"):
            return False
        if target.op == "call_module":
            module = self.fetch_attr(str(target.target))
            rec = self.records.get(id(module))
            if type(module) is nn.Identity and E.hooks_of(module) is None:  # keeps nothing: as private as its input
                return rec is not None and rec.calls == 1
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
    interp = ValueRecorder(gm, records, shadows, writes=writes)
    try:
        with torch.no_grad():
            try:
                out = interp.run(*args)
            except _WritesInPlace:
                args = list(_snapshot(args))
                interp = ValueRecorder(gm, records, shadows, copy_all=True)
                out = interp.run(*args)
    except Exception:  # an unreplayable graph is simply not analysed
        return None
    if not _same_outputs(out, rec.output):  # the trace took another path than eager Python did
        return None
    return interp.replay


class _WritesInPlace(Exception):
    pass


def release(record: CallRecord) -> None:
    """Drop a record's tensors once nothing replays its module's parent again (its flags stay)."""
    record.args, record.kwargs, record.output = (), {}, None


def _same_outputs(a: Any, b: Any) -> bool:
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor) or x is y:
            continue
        if x.shape != y.shape:
            return False
        if x.dtype == y.dtype and torch.equal(x, y):  # the usual case, at a fraction of allclose's cost
            continue
        if not torch.allclose(x.double(), y.double(), rtol=1e-9, atol=1e-12, equal_nan=True):
            return False
    return True
