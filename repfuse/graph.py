"""torch.fx plumbing: record how each module is called, trace it, and lower nodes to affine ops.

Every module is analysed on its own, deepest first, with its children as leaves: a child whose
whole forward is one affine op (its *summary*) then acts as that op in its parent's graph. So a
sum written inside a block, in a parent's forward, or over a ModuleList in a loop is found the
same way, and a module that cannot be traced still has its children fused.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from . import kernels as K
from .kernels import ConvOp

# ----------------------------------------------------------------------------------------------
# Recording calls


@dataclass
class CallRecord:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    calls: int = 1


def record_calls(model: nn.Module, inputs: tuple[Any, ...]) -> dict[int, CallRecord]:
    """Run `model` once and keep, per module (by id), its first call's inputs and output."""
    records: dict[int, CallRecord] = {}
    handles = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        rec = records.get(id(module))
        if rec is None:  # copies: a later in-place op (ReLU(inplace=True), `x += y`) must not change them
            records[id(module)] = CallRecord(_snapshot(args), _snapshot(kwargs), _snapshot(output))
        else:
            rec.calls += 1

    for m in model.modules():
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
# Expressions: a value as an affine op of an earlier value


@dataclass(frozen=True)
class Expr:
    """`op` applied to the value of node `base` gives this node's value.

    nodes: the graph nodes folded in (the would-be region); ops: how many runtime ops they are;
    terms: the summed branches in words ("3×3", "1×1", "identity"); norms: BNs folded in.
    """

    op: ConvOp
    nodes: frozenset[fx.Node]
    ops: int
    terms: tuple[str, ...]
    norms: int = 0
    scales: int = 0
    leaves: tuple[str, ...] = ()  # dotted paths of the layers folded in
    cost: float = 0.0  # multiply-adds per position of `base` of the ops folded in (see op_cost)
    # ends inside a child (its affine prefix), not at this node's value: may end a region, never extend
    partial: bool = False


def op_cost(op: ConvOp) -> float:
    """Multiply-adds of `op` per position of its input: weight taps per output position / stride."""
    return op.weight.numel() / math.prod(op.stride)


@dataclass
class LeafInfo:
    """What one module (or functional call) is as an op, in words and maths."""

    op: ConvOp | None
    kind: str  # "conv", "bn", "linear", "identity", "avgpool", "pad", "scale", ...
    reason: str | None = None  # why it is not an affine op, when it looked like one
    ops: int = 1
    terms: tuple[str, ...] = ()
    norms: int = 0
    scales: int = 0
    leaves: tuple[str, ...] = ()
    cost: float | None = None  # per input position; None: that of `op` itself
    partial: bool = False  # only the child's affine prefix (see analysis.Prefix), not its whole forward

    def input_cost(self) -> float:
        return self.cost if self.cost is not None else op_cost(self.op) if self.op is not None else 0.0


# ----------------------------------------------------------------------------------------------
# Lowering torch.nn layers


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _same_forward(m: nn.Module, base: type) -> bool:
    """m behaves as `base` (its class does not override the forward that matters)."""
    cls = type(m)
    if cls.forward is not base.forward:
        return False
    return not (issubclass(base, nn.modules.conv._ConvNd) and cls._conv_forward is not base._conv_forward)


def is_torch_builtin(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn.")


def lower_module(m: nn.Module, rec: CallRecord | None) -> LeafInfo | None:
    """A module as an affine op, or None when it must be traced (user code / containers).

    Returns LeafInfo(op=None) for layers that are not affine (activations, max pools, ...).
    """
    shape = _tensor_shape(rec.args[0]) if rec and rec.args else None
    for base in _CONVS:
        if isinstance(m, base) and _same_forward(m, base):
            return _lower_conv(m, shape)
    for base in _BNS:
        if isinstance(m, base) and _same_forward(m, base):
            return _lower_bn(m, shape)
    if isinstance(m, nn.Linear) and _same_forward(m, nn.Linear):
        if shape is None or len(shape) < 2:
            return LeafInfo(None, "linear")
        # an nd == 0 op acts on the LAST axis ([N, C], or [B, L, C] as in LeViT); BatchNorm1d on
        # [N, C, L] is nd == 1 and acts on axis 1, so the two never compose by mistake
        return LeafInfo(K.linear_op(m.weight, m.bias), "linear", terms=("linear",))
    if isinstance(m, _IDENTITIES) and _same_forward(m, type(m)):
        if shape is None or len(shape) < 2:
            return LeafInfo(None, "identity")
        return LeafInfo(K.identity_op(shape[1], len(shape) - 2), "identity", ops=0, terms=("identity",))
    for base in _POOLS:
        if isinstance(m, base) and _same_forward(m, base):
            nd = len(shape) - 2 if shape else 0
            return _lower_avgpool(shape, nd, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                  m.count_include_pad, getattr(m, "divisor_override", None))
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return None
    if is_torch_builtin(m):
        return LeafInfo(None, type(m).__name__)
    return None


def _lower_conv(m: nn.modules.conv._ConvNd, shape: tuple[int, ...] | None) -> LeafInfo:
    nd = m.weight.dim() - 2
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * nd
        else:  # "same": symmetric only when every axis has an even total padding
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            if any(t % 2 for t in total):
                return LeafInfo(None, "conv", "padding='same' with an even kernel pads asymmetrically")
            padding = tuple(t // 2 for t in total)
    op = K.conv_op(m.weight, m.bias, m.stride, padding, m.dilation, m.groups, m.padding_mode)
    if m.padding_mode != "zeros" and not any(padding):
        op = K.ConvOp(op.weight, op.bias, op.stride, op.padding, op.dilation, op.groups, "zeros")
    return LeafInfo(op, "conv", terms=(K.describe_kernel(op.kernel_size),))


def _lower_bn(m: nn.modules.batchnorm._BatchNorm, shape: tuple[int, ...] | None) -> LeafInfo:
    if m.running_mean is None or m.running_var is None or not m.track_running_stats:
        return LeafInfo(None, "bn", f"{type(m).__name__} has no running statistics "
                        "(track_running_stats=False): it normalises with batch statistics even in eval")
    if m.training:
        return LeafInfo(None, "bn", "BatchNorm is in training mode")
    nd = len(shape) - 2 if shape else _bn_nd(m)
    return LeafInfo(K.fold_bn(m.running_mean, m.running_var, m.weight if m.affine else None,
                              m.bias if m.affine else None, m.eps, nd), "bn", norms=1, terms=("identity",))


def _bn_nd(m: nn.Module) -> int:
    return {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(m), 2)


def _lower_avgpool(shape: tuple[int, ...] | None, nd: int, kernel: Any, stride: Any, padding: Any,
                   ceil_mode: bool, count_include_pad: bool, divisor_override: Any) -> LeafInfo:
    if shape is None or nd < 1:
        return LeafInfo(None, "avgpool")
    k = K._tup(kernel, nd)
    s = K._tup(stride if stride not in (None, ()) else kernel, nd)
    p = K._tup(padding, nd)
    if divisor_override:
        return LeafInfo(None, "avgpool", "AvgPool with divisor_override is not a plain mean")
    if any(p) and not count_include_pad:
        return LeafInfo(None, "avgpool", "AvgPool with padding and count_include_pad=False divides "
                        "border windows by fewer taps: not one conv")
    if ceil_mode:
        for size, kk, ss, pp in zip(shape[2:], k, s, p):
            floor_out = (size + 2 * pp - kk) // ss + 1
            ceil_out = -(-(size + 2 * pp - kk) // ss) + 1
            if ceil_out != floor_out:
                return LeafInfo(None, "avgpool", "AvgPool ceil_mode=True changes the output size here")
    op = K.avgpool_op(shape[1], k, s, p)
    return LeafInfo(op, "avgpool", terms=(f"avgpool {K.describe_kernel(k)}",))


def _tensor_shape(v: Any) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


# ----------------------------------------------------------------------------------------------
# Tracing


class _AssignableProxy(fx.Proxy):
    """fx's Proxy refuses `t[idx] = v`; DBB writes pad rings that way. Record it as operator.setitem."""

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class LeafTracer(fx.Tracer):
    """Traces one module's own forward; every submodule call stays a call_module leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AssignableProxy(node, self)


def mutations(node: fx.Node) -> list[fx.Node]:
    """Users that change `node`'s tensor in place (`t[i] = v`, `t.add_(u)`)."""
    return [u for u in node.users if u.args and u.args[0] is node and (
        u.target is operator.setitem or (u.op == "call_method" and u.target.endswith("_")
                                         and not u.target.startswith("_")))]


def border_fill(node: fx.Node, pads: tuple[int, ...], values: dict[fx.Node, Any]) -> torch.Tensor | None:
    """If the in-place writes on `node` (a zero-padded tensor) fill exactly its padded border with
    one per-channel constant, that constant as a [C] vector (DBB's BNAndPadLayer); else None."""
    value = values.get(node)
    writes = mutations(node)
    if not isinstance(value, torch.Tensor) or not writes or any(w.target is not operator.setitem for w in writes):
        return None
    mask = torch.zeros(value.shape, dtype=torch.bool)
    fill: torch.Tensor | None = None
    for w in writes:
        v = values.get(w.args[2]) if isinstance(w.args[2], fx.Node) else w.args[2]
        c = channel_constant(v, tuple(value.shape))
        if c is None or (fill is not None and not torch.equal(c, fill)):
            return None
        fill = c
        try:
            mask[w.args[1]] = True
        except (IndexError, TypeError):
            return None
    ring = torch.ones(value.shape, dtype=torch.bool)
    ring[(slice(None), slice(None), *(slice(p, size - p) for p, size in zip(pads, value.shape[2:])))] = False
    return fill if torch.equal(mask, ring) else None


def trace(module: nn.Module) -> tuple[fx.GraphModule | None, str | None]:
    """fx-trace `module` with its children as leaves; (None, reason) when it cannot be traced."""
    try:
        graph = LeafTracer().trace(module)
        return fx.GraphModule(module, graph, class_name=type(module).__name__), None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"could not trace ({type(exc).__name__}: {first[:160]})"


class ValueRecorder(fx.Interpreter):
    """Runs a traced graph on recorded inputs and keeps every node's value.

    A child called exactly once in the whole forward is not run again: its recorded output is
    reused, so analysing every level of the tree costs about one forward, not one per level.
    """

    def __init__(self, gm: fx.GraphModule, records: dict[int, CallRecord]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[fx.Node, Any] = {}
        self.records = records
        self.mutating = {m for n in gm.graph.nodes for m in mutations(n)}

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        rec = self.records.get(id(self.fetch_attr(target)))
        if rec is not None and rec.calls == 1:
            return _snapshot(rec.output)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n] = _snapshot(value)
        if n in self.mutating:  # `t[i] = v`: t's recorded value is the one after the write
            target = n.args[0]
            self.values[target] = _snapshot(self.env[target])
        return value


def node_values(gm: fx.GraphModule, rec: CallRecord, records: dict[int, CallRecord],
                ) -> dict[fx.Node, Any] | None:
    """Every node's value for the recorded call (shapes, constants); None if it cannot be replayed."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = list(rec.args)
    for ph in placeholders[len(args):]:
        if ph.target in rec.kwargs:
            args.append(rec.kwargs[ph.target])
        elif ph.args:
            args.append(ph.args[0])
        else:
            return None
    interp = ValueRecorder(gm, records)
    try:
        with torch.no_grad():
            out = interp.run(*args)
    except Exception:  # an unreplayable graph is simply not analysed
        return None
    if not _same_outputs(out, rec.output):  # the trace took another path than eager Python did
        return None
    return interp.values


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


# ----------------------------------------------------------------------------------------------
# Lowering functional calls


_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, torch.div, "div", "truediv"}
_NEG = {operator.neg, torch.neg, "neg"}
_IDENTITY_CALLS = {"contiguous", "clone", torch.clone}
# reshapes that keep the last axis whole: they commute with any op acting on the last axis (nd == 0)
LAYOUT_CALLS = {"flatten", "reshape", "view", "reshape_as", "view_as", "unflatten", torch.flatten, torch.reshape,
                torch.unflatten}
_FCONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_FAVG = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, torch.avg_pool1d: 1}


def call_key(node: fx.Node) -> Any:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return node.target
    return None


def lower_function(node: fx.Node, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...] | None,
                   ) -> LeafInfo | None:
    """A unary functional call on one tensor (other arguments constant) as an affine op."""
    key = call_key(node)
    if shape is None or len(shape) < 2:
        return None
    nd = len(shape) - 2
    if key in (F.linear, torch._C._nn.linear):
        nd = 0
    try:
        if key in _FCONV:
            w = _arg(args, kwargs, 1, "weight")
            b = _arg(args, kwargs, 2, "bias")
            stride = _arg(args, kwargs, 3, "stride", 1)
            padding = _arg(args, kwargs, 4, "padding", 0)
            dilation = _arg(args, kwargs, 5, "dilation", 1)
            groups = _arg(args, kwargs, 6, "groups", 1)
            if isinstance(padding, str):
                if padding != "valid":
                    return None
                padding = 0
            op = K.conv_op(w, b, K._tup(stride, nd), K._tup(padding, nd), K._tup(dilation, nd), groups)
            return LeafInfo(op, "conv", terms=(K.describe_kernel(op.kernel_size),))
        if key in (F.batch_norm, torch.batch_norm):
            mean, var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
            training = _arg(args, kwargs, 5, "training", False)
            if training or mean is None or var is None:
                return LeafInfo(None, "bn", "functional batch_norm uses batch statistics (training=True "
                                "or no running stats)")
            w, b = _arg(args, kwargs, 3, "weight", None), _arg(args, kwargs, 4, "bias", None)
            eps = _arg(args, kwargs, 7, "eps", 1e-5)
            return LeafInfo(K.fold_bn(mean, var, w, b, eps, nd), "bn", norms=1, terms=("identity",))
        if key in (F.linear, torch._C._nn.linear):
            return LeafInfo(K.linear_op(_arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias", None)),
                            "linear", terms=("linear",))
        if key in _FAVG:
            kernel = _arg(args, kwargs, 1, "kernel_size")
            return _lower_avgpool(shape, nd, kernel, _arg(args, kwargs, 2, "stride", None),
                                  _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "ceil_mode", False),
                                  _arg(args, kwargs, 5, "count_include_pad", True),
                                  _arg(args, kwargs, 6, "divisor_override", None))
        if key in (F.pad, torch._C._nn.pad):
            pads = list(_arg(args, kwargs, 1, "pad"))
            mode = _arg(args, kwargs, 2, "mode", "constant")
            value = _arg(args, kwargs, 3, "value", None)
            if mode != "constant" or (value not in (None, 0, 0.0)) or len(pads) != 2 * nd:
                return None
            per_axis = [(pads[2 * i], pads[2 * i + 1]) for i in range(nd)][::-1]
            if any(lo != hi or lo < 0 for lo, hi in per_axis):
                return LeafInfo(None, "pad", "asymmetric or negative padding is not a conv padding")
            return LeafInfo(K.pad_op(shape[1], tuple(lo for lo, _ in per_axis)), "pad", terms=("identity",))
        if key in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
            if _arg(args, kwargs, 2, "training", True):
                return None
            return LeafInfo(K.identity_op(shape[1], nd), "identity", ops=0, terms=("identity",))
        if key is operator.getitem:
            return _lower_crop(args[1], shape)
        if key in _IDENTITY_CALLS:
            return LeafInfo(K.identity_op(shape[1], nd), "identity", ops=0, terms=("identity",))
    except (TypeError, ValueError, IndexError, RuntimeError):
        return None
    return None


def _lower_crop(index: Any, shape: tuple[int, ...]) -> LeafInfo | None:
    """``x[:, :, c:-c, ...]``: a symmetric crop of the spatial axes, as padding −c."""
    index = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in index) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (len(shape) - len(index))
    if len(index) != len(shape) or any(i != slice(None) for i in index[:2]):
        return None
    crops = []
    for sl, size in zip(index[2:], shape[2:]):
        if sl.step not in (None, 1):
            return None
        start, stop, _ = sl.indices(size)
        if stop - start <= 0 or start != size - stop:
            return None
        crops.append(-start)
    return LeafInfo(K.pad_op(shape[1], tuple(crops)), "crop", terms=("identity",))


def _arg(args: list[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if i < len(args):
        return args[i]
    return default


def channel_constant(value: Any, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A constant that broadcasts as one value per channel of a [N, C, ...] tensor, as a [C] vector."""
    c = shape[1]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((c,), float(value), dtype=K.DT)
    if not isinstance(value, torch.Tensor) or (not value.is_floating_point() and value.dtype != torch.int64):
        return None
    if value.dim() > len(shape):
        return None
    full = (1,) * (len(shape) - value.dim()) + tuple(value.shape)
    if full[0] != 1 or any(s != 1 for s in full[2:]) or full[1] not in (1, c):
        return None
    return value.detach().to(K.DT).reshape(-1).expand(c).clone()
