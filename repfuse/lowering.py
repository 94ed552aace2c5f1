"""Lowering: a layer or a functional call as an affine conv operator (`ConvOp`), or a reason why not.

Every lowering here is shape-generic (DESIGN §3): it depends on the input only through its rank and
channel count, which the layers' weights fix. Where an op's effect depends on the input size — a
literal slice (`x[:, :, :64]`), a pool whose `ceil_mode` adds a window at some sizes, an argument
computed from the input's shape (`F.pad(x, (0, w % 2))`), a reshape with literal sizes — the op is
not lowered: it stays in the deploy model as it was, and where it looked fusable the reason is
reported. The recorded shape only ever serves as a witness (the self-check), never as the proof.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import kernels as K
from .kernels import ConvOp

if TYPE_CHECKING:
    from .layouts import LayoutStep

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
    # layout-only ops (permutes, flattens) the value goes through before / after `op` (`layouts`): they stay
    # in the deploy graph, on their side of the fused layer: value = post(op(pre(base)))
    pre: tuple[LayoutStep, ...] = ()
    post: tuple[LayoutStep, ...] = ()
    # `base` is a child call whose affine suffix (`suffix.Suffix`, a GRN's trailing bias) `op` takes over:
    # `op` reads the child's value without it (this op), and the rewrite strips it from the child
    strips: ConvOp | None = None


def op_cost(op: ConvOp) -> float:
    """Multiply-adds of `op` per position of its input: weight taps per output position / stride."""
    return op.num_weights / math.prod(op.stride)


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
    # the same op on the LAST axis (nd == 0), where a constant broadcasts both ways (a scalar on [N, H, W, C]):
    # the layout of the op before it decides which one composes
    last_axis: ConvOp | None = None
    layout: LayoutStep | None = None  # a layout-only op (kind "layout"; `op` is an identity placeholder)
    # a child whose whole forward is pre-steps, `op`, post-steps (UniRepLKNet's Linear → NHWCtoNCHW → BN)
    pre: tuple[LayoutStep, ...] = ()
    post: tuple[LayoutStep, ...] = ()

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


def lower_module(m: nn.Module, shape: tuple[int, ...] | None) -> LeafInfo | None:
    """A module (called on an input of `shape`) as an affine op, or None when it must be traced (user
    code / containers). Returns LeafInfo(op=None) for layers that are not affine (activations, ...).
    """
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
    if ceil_mode and any(ss > 1 for ss in s):
        # with stride > 1 there are input sizes where ceil adds a last, partial window (whether or not
        # the recorded size is one of them): only stride 1 makes ceil_mode a no-op at every size
        return LeafInfo(None, "avgpool", "AvgPool ceil_mode=True with stride > 1 adds a partial window at "
                        "some input sizes: not one conv at every size")
    op = K.avgpool_op(shape[1], k, s, p)
    return LeafInfo(op, "avgpool", terms=(f"avgpool {K.describe_kernel(k)}",))


def _tensor_shape(v: Any) -> tuple[int, ...] | None:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


# ----------------------------------------------------------------------------------------------
# Lowering functional calls


_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_", "truediv"}
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
    if runtime_value(args[1:]) or runtime_value(kwargs):
        # an argument computed while the forward runs (from the input's shape: `F.pad(x, (0, w % 2))`,
        # `x[:, :, :h // 2]`): what the op does depends on the input size, so it is never lowered
        return LeafInfo(None, "call", "an argument of this op is computed from the input (its shape): "
                        "not the same op at every input size")
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
            if not all(isinstance(q, int) for q in pads):
                return None
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
    """``x[:, :, c:-c, ...]``: a symmetric crop of the spatial axes, as padding −c.

    Only a crop written relative to both ends is the same crop at every size; `x[:, :, :64]` or
    `x[:, :, 1:65]` keep a fixed size (a crop at one input size only) and stay as they are."""
    index = full_index(index, len(shape))
    if index is None or any(i != slice(None) for i in index[:2]):
        return None
    crops = []
    for sl, size in zip(index[2:], shape[2:]):
        if sl.step not in (None, 1):
            return None
        form = slice_form(sl)
        if form is not None and form[0] == "crop" and form[1] == form[2]:
            crops.append(-form[1])
            continue
        start, stop, _ = sl.indices(size)
        if stop - start > 0 and start == size - stop:  # a symmetric crop here, but not at other sizes
            return LeafInfo(None, "crop", f"the slice {_fmt_slice(sl)} is a symmetric crop only at size {size}: "
                            "it keeps a fixed size (or offset) at other input sizes")
        return None
    return LeafInfo(K.pad_op(shape[1], tuple(crops)), "crop", terms=("identity",))


def full_index(index: Any, rank: int) -> tuple[slice, ...] | None:
    """An indexing tuple with the Ellipsis expanded and trailing axes filled, if it holds only slices."""
    index = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in index) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in index):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1:]
    index = index + (slice(None),) * (rank - len(index))
    return index if len(index) == rank else None


def slice_form(sl: slice) -> tuple[str, int, int] | None:
    """A slice with unit step as the same interval at every axis size n, or None when it depends on n:
    ("crop", a, b) is [a, n − b) (`a:`, `a:-b`, `:`); ("head", 0, p) is [0, p) (`:p`); ("tail", p, 0) is
    [n − p, n) (`-p:`)."""
    start, stop = sl.start, sl.stop
    if sl.step not in (None, 1) or not all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                                           for v in (start, stop)):
        return None
    if start is None or start >= 0:
        a = start or 0
        if stop is None:
            return ("crop", a, 0)
        if stop < 0:
            return ("crop", a, -stop)
        return ("head", 0, stop) if a == 0 else None
    if stop is None:
        return ("tail", -start, 0)
    return None


def _fmt_slice(sl: slice) -> str:
    return f"{'' if sl.start is None else sl.start}:{'' if sl.stop is None else sl.stop}"


def runtime_value(value: Any) -> bool:
    """Does `value` (an op's arguments) hold a graph node, i.e. something computed while the forward runs?"""
    def walk(v: Any) -> bool:
        if isinstance(v, fx.Node):
            return True
        if isinstance(v, slice):
            return walk((v.start, v.stop, v.step))
        if isinstance(v, (tuple, list)):
            return any(walk(u) for u in v)
        if isinstance(v, dict):
            return any(walk(u) for u in v.values())
        return False

    return walk(value)


def layout_is_generic(node: fx.Node) -> bool:
    """A reshape whose sizes are the same at every input size: `flatten(a, b)`, `reshape_as(t)`, or sizes
    read from the input's shape (graph nodes) and -1 — never a literal size (`view(2, 64, C)`)."""
    key = call_key(node)
    if key in ("flatten", torch.flatten, "reshape_as", "view_as"):
        return True
    sizes: list[Any] = []
    if key in ("unflatten", torch.unflatten):
        raw = node.args[2] if len(node.args) > 2 else node.kwargs.get("sizes", node.kwargs.get("unflattened_size"))
        sizes = list(raw) if isinstance(raw, (tuple, list)) else [raw]
    elif key in ("reshape", "view", torch.reshape):
        rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k in ("shape", "size")]
        for r in rest:
            sizes.extend(r if isinstance(r, (tuple, list)) else [r])
    else:
        return False
    return all(isinstance(v, fx.Node) or v == -1 for v in sizes)


def _arg(args: list[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if i < len(args):
        return args[i]
    return default


def channel_constant(value: Any, shape: tuple[int, ...], axis: int = 1) -> torch.Tensor | None:
    """A constant that broadcasts as one value per channel of a [N, C, ...] tensor, as a [C] vector; with
    axis=-1, one value per entry of the LAST axis (a layer scale or bias of shape [C] or [1, 1, 1, C] on a
    channels-last [N, H, W, C] tensor, as a Linear's features)."""
    axis %= len(shape)
    c = shape[axis]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((c,), float(value), dtype=K.DT)
    if not isinstance(value, torch.Tensor) or (not value.is_floating_point() and value.dtype != torch.int64):
        return None
    if value.dim() > len(shape):
        return None
    full = (1,) * (len(shape) - value.dim()) + tuple(value.shape)
    if any(s != 1 for i, s in enumerate(full) if i != axis) or full[axis] not in (1, c):
        return None
    return value.detach().to(K.DT).reshape(-1).expand(c).clone()
