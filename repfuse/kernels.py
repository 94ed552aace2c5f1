"""Pure tensor maths on weights: an algebra of affine conv operators.

Every op repfuse fuses is lowered to a `ConvOp`, ``y = conv(x; W, b, stride, padding, dilation,
groups, padding_mode)``; `nd` spatial axes (0 for Linear). Two ops compose:

- `parallel_sum(ops)`: ops on the same input, outputs added → one op;
- `compose(a, b)`:     b applied after a → one op.

Both return ``(op, None)`` or ``(None, reason)`` when the result would not be exactly one conv.
Everything is float64; the caller casts back to the model's dtype at the very end.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import reduce

import torch
import torch.nn.functional as F

from .convop import DT, ConvOp, Ints
from .lazy_kernels import LAZY_NUMEL, ScaledOp, SumOp, per_output, release, rows

__all__ = ["DT", "LAZY_NUMEL", "ConvOp", "Ints", "ScaledOp", "SumOp", "compose", "parallel_sum", "per_output",
           "release", "rows"]

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# ----------------------------------------------------------------------------------------------
# Constructors: lowering of single layers


def _t(x: torch.Tensor | None, n: int) -> torch.Tensor:
    """`x` as a float64 CPU tensor. A float64 CPU `x` (the analysis's working copy) is shared, not copied: ops
    are never changed in place, and a module whose forward changes its own tensors is never lowered."""
    return torch.zeros(n, dtype=DT) if x is None else x.detach().to(device="cpu", dtype=DT)


def conv_op(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Ints,
    padding: Ints,
    dilation: Ints,
    groups: int,
    padding_mode: str = "zeros",
) -> ConvOp:
    """A ConvNd layer as an op (padding given as explicit per-axis ints)."""
    w = _t(weight, 0)
    nd = w.dim() - 2
    return ConvOp(w, _t(bias, w.shape[0]), _tup(stride, nd), _tup(padding, nd), _tup(dilation, nd), groups,
                  padding_mode)


def linear_op(weight: torch.Tensor, bias: torch.Tensor | None) -> ConvOp:
    """nn.Linear on a [N, C] input: a conv with no spatial axes."""
    w = _t(weight, 0)
    return ConvOp(w, _t(bias, w.shape[0]), (), (), (), 1)


def channel_affine(scale: torch.Tensor, shift: torch.Tensor, nd: int) -> ConvOp:
    """``y[:, c] = scale[c] · x[:, c] + shift[c]`` as a depthwise 1×…×1 conv."""
    s = _t(scale, 0).reshape(-1)
    c = s.numel()
    return ConvOp(s.reshape(c, 1, *([1] * nd)), _t(shift, c).reshape(c).clone(), (1,) * nd, (0,) * nd,
                  (1,) * nd, c)


def identity_op(channels: int, nd: int) -> ConvOp:
    """The identity on `channels` channels: W[c, 0, centre] = 1 with groups = C."""
    return channel_affine(torch.ones(channels, dtype=DT), torch.zeros(channels, dtype=DT), nd)


def fold_bn(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    nd: int,
) -> ConvOp:
    """Eval BatchNorm as a channel affine: s = γ / √(σ² + ε), t = β − μ·s (γ=1, β=0 when affine=False)."""
    mean, var = _t(running_mean, 0), _t(running_var, 0)
    gamma = torch.ones_like(mean) if weight is None else _t(weight, 0)
    beta = torch.zeros_like(mean) if bias is None else _t(bias, 0)
    s = gamma / torch.sqrt(var + eps)
    return channel_affine(s, beta - mean * s, nd)


def pad_op(channels: int, pads: Ints) -> ConvOp:
    """Zero padding by `pads[i]` on both sides of axis i: the identity with padding. A negative pad
    crops (``x[..., c:-c]`` is padding −c); a fused layer must end with padding ≥ 0."""
    op = identity_op(channels, len(pads))
    return replace(op, padding=tuple(pads))


def avgpool_op(channels: int, kernel: Ints, stride: Ints, padding: Ints) -> ConvOp:
    """AvgPool (count_include_pad=True or no padding): a depthwise conv with weights 1/∏k."""
    w = torch.full((channels, 1, *kernel), 1.0 / math.prod(kernel), dtype=DT)
    nd = len(kernel)
    return ConvOp(w, torch.zeros(channels, dtype=DT), tuple(stride), tuple(padding), (1,) * nd, channels)


def _tup(v: int | Ints, nd: int) -> Ints:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * nd


# ----------------------------------------------------------------------------------------------
# Reshaping helpers: groups and dilation


def regroup(op: ConvOp, groups: int) -> ConvOp:
    """Re-express `op` with fewer groups (`groups` must divide op.groups): block-diagonal kernel."""
    if groups == op.groups:
        return op
    g, c_out, c_in = op.groups, op.out_channels, op.in_channels
    w = op.weight.new_zeros((c_out, c_in // groups, *op.kernel_size))
    out_per, in_per, new_out_per, new_in_per = c_out // g, c_in // g, c_out // groups, c_in // groups
    for j in range(g):
        rows = slice(j * out_per, (j + 1) * out_per)
        new_group = (j * out_per) // new_out_per
        start = j * in_per - new_group * new_in_per
        w[rows, start:start + in_per] = op.weight[rows]
    return replace(op, weight=w, groups=groups)


def densify_axis(op: ConvOp, axis: int) -> ConvOp:
    """Turn dilation d on spatial `axis` into a dense kernel of size d(k−1)+1 (taps every d-th)."""
    d, k = op.dilation[axis], op.kernel_size[axis]
    if d == 1 or k == 1:
        return replace(op, dilation=_set(op.dilation, axis, 1))
    shape = list(op.weight.shape)
    shape[2 + axis] = d * (k - 1) + 1
    w = op.weight.new_zeros(shape)
    index = [slice(None)] * len(shape)
    index[2 + axis] = slice(None, None, d)
    w[tuple(index)] = op.weight
    return replace(op, weight=w, dilation=_set(op.dilation, axis, 1))


def embed_kernel(weight: torch.Tensor, size: Ints, offset: Ints) -> torch.Tensor:
    """Place `weight` inside a zero kernel of spatial `size`, its first tap at `offset`."""
    out = weight.new_zeros((*weight.shape[:2], *size))
    index = [slice(None), slice(None)] + [slice(o, o + k) for o, k in zip(offset, weight.shape[2:])]
    out[tuple(index)] = weight
    return out


def _set(t: Ints, i: int, v: int) -> Ints:
    return t[:i] + (v,) + t[i + 1:]


def _normalise_dilation(op: ConvOp) -> ConvOp:
    """A size-1 kernel axis has no dilation; call it 1 so it never blocks a merge."""
    dilation = tuple(1 if k == 1 else d for k, d in zip(op.kernel_size, op.dilation))
    return op if dilation == op.dilation else replace(op, dilation=dilation)


# ----------------------------------------------------------------------------------------------
# Parallel composition


def parallel_sum(ops: list[ConvOp]) -> tuple[ConvOp | None, str | None]:
    """Σ opᵢ(x) as one op.

    Conditions: same channels and stride; per axis, every branch centred on the same output
    position (2p − d(k−1) equal); padding modes agree for every padded branch. Different dilations
    are densified first, different groups are brought to their gcd (block-diagonal kernels).
    """
    if len(ops) == 1:
        return ops[0], None
    first = ops[0]
    for op in ops[1:]:
        if op.nd != first.nd:
            return None, "branches have different dimensionality"
        if (op.in_channels, op.out_channels) != (first.in_channels, first.out_channels):
            return None, (f"branch channels differ ({first.in_channels}→{first.out_channels} vs "
                          f"{op.in_channels}→{op.out_channels})")
        if op.stride != first.stride:
            return None, f"branch strides differ ({_fmt(first.stride)} vs {_fmt(op.stride)})"
    modes = {op.padding_mode for op in ops if any(op.padding)}
    if len(modes) > 1:
        return None, f"padded branches use different padding modes ({', '.join(sorted(modes))})"
    mode = modes.pop() if modes else "zeros"

    ops = [_normalise_dilation(op) for op in ops]
    for axis in range(first.nd):
        if len({op.dilation[axis] for op in ops if op.kernel_size[axis] > 1}) > 1:
            ops = [densify_axis(op, axis) for op in ops]
        d = max(op.dilation[axis] for op in ops)
        ops = [op if op.dilation[axis] == d else replace(op, dilation=_set(op.dilation, axis, d)) for op in ops]
        reach = {2 * op.padding[axis] - d * (op.kernel_size[axis] - 1) for op in ops}
        if len(reach) > 1:
            return None, (f"branches are not centre-aligned on axis {axis} (kernel/padding "
                          f"{', '.join(f'{op.kernel_size[axis]}/{op.padding[axis]}' for op in ops)})")
        big_p = max(op.padding[axis] for op in ops)
        if any((big_p - op.padding[axis]) % d for op in ops):  # offsets fall between taps: go dense
            ops = [replace(densify_axis(op, axis), dilation=_set(op.dilation, axis, 1)) for op in ops]

    groups = reduce(math.gcd, (op.groups for op in ops))
    ops = [regroup(op, groups) for op in ops]
    nd = first.nd
    big_p = tuple(max(op.padding[a] for op in ops) for a in range(nd))
    dil = ops[0].dilation
    size = tuple(max(op.kernel_size[a] + 2 * (big_p[a] - op.padding[a]) // dil[a] for op in ops)
                 for a in range(nd))
    # built when read (lazy_kernels.SumOp): a sum that a larger sum takes in is written once, into that one
    shape = (first.out_channels, first.in_channels // groups, *size)
    parts = tuple((op, tuple((big_p[a] - op.padding[a]) // dil[a] for a in range(nd))) for op in ops)
    bias = torch.zeros(first.out_channels, dtype=DT)
    for op in ops:
        bias += op.bias
    return SumOp.of(parts, shape, bias, first.stride, big_p, dil, groups, mode), None


def scale_op(op: ConvOp, factor: float) -> ConvOp:
    """factor · op(x) (negation is factor −1)."""
    return replace(op, weight=op.weight * factor, bias=op.bias * factor)


# ----------------------------------------------------------------------------------------------
# Sequential composition


def compose(a: ConvOp, b: ConvOp) -> tuple[ConvOp | None, str | None]:
    """b(a(x)) as one op.

    Always exact when b is a channel affine. Otherwise b's zero padding must see zeros: on each
    axis b pads, a must be pointwise there and have zero bias (else the padded ring would hold a's
    bias); with a non-zero padding mode, a must be pointwise (then padding commutes with a).
    """
    if a.nd != b.nd:
        return None, "ops have different dimensionality"
    if a.out_channels != b.in_channels:
        return None, f"channel mismatch ({a.out_channels} → {b.in_channels})"
    if b.is_identity:  # nn.Identity, a dropout in eval: nothing to build
        return a, None
    if a.is_identity:
        return b, None
    if b.is_diagonal:
        s = b.weight.reshape(-1)
        if math.prod(a.weight_shape) >= LAZY_NUMEL:  # the kernel is built when read (see ScaledOp)
            base, scale = (a.base, a.scale * s) if isinstance(a, ScaledOp) else (a.weight, s)
            return ScaledOp.of(base, scale, a.bias * s + b.bias, a), None
        w = a.weight * per_output(s, a.weight)
        return replace(a, weight=w, bias=a.bias * s + b.bias), None

    padded_axes = [i for i, p in enumerate(b.padding) if p > 0]
    if padded_axes:
        if b.padding_mode == "zeros":
            for i in padded_axes:
                if a.kernel_size[i] != 1 or a.stride[i] != 1 or a.padding[i] != 0:
                    return None, (f"a zero-padded {_fmt(b.kernel_size)} conv follows a "
                                  f"{_fmt(a.kernel_size)} op with its own window or padding: the "
                                  "padded border is not exact")
            if bool(torch.any(a.bias != 0)):
                return None, (f"a zero-padded {_fmt(b.kernel_size)} conv follows an op with a non-zero "
                              "bias/shift: the padded border would see the shift (pad before it instead)")
        else:
            if not a.is_pointwise:
                return None, (f"padding mode '{b.padding_mode}' after a {_fmt(a.kernel_size)} op does "
                              "not commute with it")
    if any(a.padding) and padded_axes and a.padding_mode != b.padding_mode:
        return None, "the two ops pad with different padding modes"
    mode = b.padding_mode if padded_axes else a.padding_mode

    if a.is_diagonal:
        s = a.weight.reshape(-1)
        w = b.weight * _per_input_channel(s, b)
        bias = b.bias + (b.weight * _per_input_channel(a.bias, b)).flatten(1).sum(1)
        return replace(b, weight=w, bias=bias, padding_mode=mode), None

    nd = a.nd
    stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride))
    padding = tuple(pa + sa * pb for pa, sa, pb in zip(a.padding, a.stride, b.padding))
    if nd and _is_window_free(b):  # b mixes channels only: b's matrix times a's kernel
        weight = _mix_after(a, b)
        return ConvOp(weight, b.bias + _apply_weight_to_vector(b, a.bias), stride, padding, a.dilation,
                      math.gcd(a.groups, b.groups), mode), None
    if nd and a.is_pointwise:  # a mixes channels only: b's kernel times a's matrix
        weight = _mix_before(a, b)
        return ConvOp(weight, b.bias + _apply_weight_to_vector(b, a.bias), stride, padding, b.dilation,
                      math.gcd(a.groups, b.groups), mode), None
    if nd == 0:
        groups = math.gcd(a.groups, b.groups)
        w = regroup(b, groups).weight.reshape(b.out_channels, -1)  # [O, M/g]
        wa = regroup(a, groups).weight  # [M, I/g]
        og, mg, ig = b.out_channels // groups, b.in_channels // groups, a.in_channels // groups
        w = torch.einsum("gom,gmi->goi", w.reshape(groups, og, mg), wa.reshape(groups, mg, ig))
        weight = w.reshape(b.out_channels, ig)
        bias = b.bias + _apply_weight_to_vector(b, a.bias)
        return ConvOp(weight, bias, (), (), (), groups, "zeros"), None

    # per axis: keep a dilation where one side is a single tap, else densify
    a2, b2 = a, b
    a_dil_param, dil = [], []
    for i in range(nd):
        ka, kb = a.kernel_size[i], b.kernel_size[i]
        if ka == 1:
            a_dil_param.append(1)
            dil.append(b.dilation[i] * a.stride[i])
        elif kb == 1:
            a_dil_param.append(1)
            dil.append(a.dilation[i])
        else:
            b2 = _spread_axis(b2, i, b.dilation[i] * a.stride[i])
            a_dil_param.append(a.dilation[i])
            dil.append(1)
    groups = math.gcd(a.groups, b.groups)
    a2, b2 = regroup(a2, groups), regroup(b2, groups)
    # conv_transpose(input=b [O/g, M, kb], weight=a [M, I/g, ka], groups=g) is the full convolution
    # Σ_m b[o, m] ∗ a[m, i]: the kernel of b∘a.
    og = b.out_channels // groups
    inp = b2.weight.reshape(groups, og, b.in_channels // groups, *b2.kernel_size)
    inp = inp.transpose(0, 1).reshape(og, b.in_channels, *b2.kernel_size)
    out = _CONV_TRANSPOSE[nd](inp, a2.weight, groups=groups, dilation=tuple(a_dil_param))
    ig = a.in_channels // groups
    weight = out.reshape(og, groups, ig, *out.shape[2:]).transpose(0, 1).reshape(b.out_channels, ig,
                                                                               *out.shape[2:])
    bias = b.bias + _apply_weight_to_vector(b, a.bias)
    return ConvOp(weight, bias, stride, padding, tuple(dil), groups, mode), None


def _is_window_free(op: ConvOp) -> bool:
    """A 1×…×1 kernel without padding (any stride): it reads one position of its input per output."""
    return all(k == 1 for k in op.kernel_size) and not any(op.padding)


def _mix_after(a: ConvOp, b: ConvOp) -> torch.Tensor:
    """The kernel of b∘a for a window-free b: Σ_m b[o, m] · a[m, i, taps], grouped as gcd(groups).

    Kept in a's own grouping (a depthwise a is never made dense), so the work is that of the result."""
    g, ga = math.gcd(a.groups, b.groups), a.groups
    wb = regroup(b, g).weight.reshape(g, b.out_channels // g, ga // g, a.out_channels // ga)
    wa = a.weight.reshape(g, ga // g, a.out_channels // ga, a.in_channels // ga, *a.kernel_size)
    out = torch.einsum("gorm,grmj...->gorj...", wb, wa)
    return out.reshape(b.out_channels, a.in_channels // g, *a.kernel_size)


def _mix_before(a: ConvOp, b: ConvOp) -> torch.Tensor:
    """The kernel of b∘a for a pointwise a: Σ_m b[o, m, taps] · a[m, i], grouped as gcd(groups)."""
    g, gb = math.gcd(a.groups, b.groups), b.groups
    wa = regroup(a, g).weight.reshape(gb, b.in_channels // gb, a.in_channels // g)
    wb = b.weight.reshape(gb, b.out_channels // gb, b.in_channels // gb, -1)
    out = torch.einsum("qomk,qmj->qojk", wb, wa)
    return out.reshape(b.out_channels, a.in_channels // g, *b.kernel_size)


def composed_numel(a: ConvOp, b: ConvOp) -> int:
    """How many weights the kernel of b∘a will have, without building it (the same cases as `compose`)."""
    if b.is_diagonal:
        return a.num_weights
    if a.is_diagonal:
        return b.num_weights
    if a.nd == 0 or _is_window_free(b):
        size = a.kernel_size
    elif a.is_pointwise:
        size = b.kernel_size
    else:
        size = tuple(ka if kb == 1 else kb if ka == 1 else da * (ka - 1) + db * sa * (kb - 1) + 1
                     for ka, kb, da, db, sa in zip(a.kernel_size, b.kernel_size, a.dilation, b.dilation, a.stride))
    return b.out_channels * (a.in_channels // math.gcd(a.groups, b.groups)) * math.prod(size)


def _spread_axis(op: ConvOp, axis: int, step: int) -> ConvOp:
    """Insert step−1 zeros between taps along `axis` (a kernel seen on a finer grid)."""
    if step == 1:
        return op
    return densify_axis(replace(op, dilation=_set(op.dilation, axis, step)), axis)


def _per_input_channel(v: torch.Tensor, b: ConvOp) -> torch.Tensor:
    """Broadcast a per-input-channel vector of b onto b.weight's [O, C_in/g, ...] layout."""
    g, per = b.groups, b.in_channels // b.groups
    out_per = b.out_channels // g
    idx = (torch.arange(b.out_channels) // out_per * per).unsqueeze(1) + torch.arange(per).unsqueeze(0)
    return v.reshape(-1)[idx].reshape(b.out_channels, per, *([1] * b.nd))


def _apply_weight_to_vector(b: ConvOp, v: torch.Tensor) -> torch.Tensor:
    """Σ over b's window of b.weight · v[input channel]: b applied to a constant image v."""
    return (b.weight * _per_input_channel(v, b)).flatten(1).sum(1)


# ----------------------------------------------------------------------------------------------
# Applying and formatting


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def apply_op(op: ConvOp, x: torch.Tensor) -> torch.Tensor:
    """Run `op` on `x` ([N, C, *spatial], or [N, C] for nd == 0) with torch.nn.functional."""
    w, b = op.weight.to(x.dtype), op.bias.to(x.dtype)
    if op.nd == 0:
        dense = regroup(op, 1) if op.groups > 1 else op
        return F.linear(x, dense.weight.to(x.dtype), b)
    padding: Ints = op.padding
    if any(p < 0 for p in padding):  # a crop: cut the border first
        for axis, p in enumerate(padding):
            if p < 0:
                x = x.narrow(2 + axis, -p, x.shape[2 + axis] + 2 * p)
        padding = tuple(max(p, 0) for p in padding)
        op = replace(op, padding=padding)
    if op.padding_mode != "zeros" and any(op.padding):
        pads = [p for p in reversed(op.padding) for _ in (0, 1)]
        x = F.pad(x, pads, mode=op.padding_mode)
        padding = (0,) * op.nd
    return _CONV[op.nd](x, w, b, op.stride, padding, op.dilation, op.groups)


def _fmt(t: Ints) -> str:
    return "×".join(str(x) for x in t) if t else "1"


def describe_kernel(kernel: Ints) -> str:
    """(3, 3) → "3×3"; () → "linear"."""
    return _fmt(kernel) if kernel else "linear"
