"""kernels.py: the algebra of affine conv operators, checked against torch.nn.functional in float64.

Positive side: random branch sets / op chains that are exactly one conv fuse, and the fused op equals the
reference to ~1e-10. Negative side: every refusal reason is exercised, and for each one the naive fusion
(ignoring the condition) is shown to be wrong, so the condition is real. "Never wrong": for arbitrary random
op pairs/triples, whatever parallel_sum/compose accept matches the reference.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import reduce

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from repfuse.kernels import (
    ConvOp,
    avgpool_op,
    channel_affine,
    compose,
    composed_numel,
    conv_op,
    densify_axis,
    embed_kernel,
    fold_bn,
    identity_op,
    linear_op,
    pad_op,
    parallel_sum,
    regroup,
    scale_op,
)

DT = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MODES = ("zeros", "reflect", "replicate", "circular")
NON_ZERO_MODES = ("reflect", "replicate", "circular")

PROPS = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MANY = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------------------------
# Reference and helpers


def apply(op: ConvOp, x: torch.Tensor) -> torch.Tensor:
    """Run `op` on `x` with torch.nn.functional (the reference every fused op is checked against)."""
    if op.nd == 0:
        op = regroup(op, 1) if op.groups != 1 else op
        return F.linear(x, op.weight, op.bias)
    pad = op.padding
    if op.padding_mode != "zeros" and any(pad):
        x = F.pad(x, [p for p in reversed(pad) for _ in range(2)], mode=op.padding_mode)
        pad = (0,) * op.nd
    return CONV[op.nd](x, op.weight, op.bias, op.stride, pad, op.dilation, op.groups)


def run_chain(ops: list[ConvOp], x: torch.Tensor) -> torch.Tensor:
    for op in ops:
        x = apply(op, x)
    return x


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * scale)


def matches(got: torch.Tensor, want: torch.Tensor) -> bool:
    if got.shape != want.shape:
        return False
    scale = max(1.0, want.abs().max().item())
    return bool(torch.allclose(got, want, rtol=1e-9, atol=1e-9 * scale))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rnd(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DT)


def rand_bn(g: torch.Generator, c: int, nd: int, eps: float = 1e-5) -> ConvOp:
    """Eval BN with random statistics (never the defaults)."""
    mean = rnd(g, c)
    var = 0.5 + 1.5 * torch.rand(c, generator=g, dtype=DT)
    gamma = rnd(g, c)
    beta = rnd(g, c)
    return fold_bn(mean, var, gamma, beta, eps, nd)


def make_conv(g, c_in, c_out, k, s=None, p=None, d=None, groups=1, bias=True, mode="zeros") -> ConvOp:
    nd = len(k)
    w = rnd(g, c_out, c_in // groups, *k)
    b = rnd(g, c_out) if bias else None
    return conv_op(w, b, s or (1,) * nd, p or (0,) * nd, d or (1,) * nd, groups, mode)


def divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def dense(op: ConvOp) -> torch.Tensor:
    """The full [C_out, C_in, *k] kernel of a grouped op (independent of regroup)."""
    out = op.weight.new_zeros((op.out_channels, op.in_channels, *op.kernel_size))
    out_per, in_per = op.out_channels // op.groups, op.in_channels // op.groups
    for o in range(op.out_channels):
        j = o // out_per
        out[o, j * in_per:(j + 1) * in_per] = op.weight[o]
    return out


def out_len(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def chain_sizes(ops: list[ConvOp], sizes: tuple[int, ...]) -> tuple[int, ...] | None:
    """Spatial sizes after running `ops`, or None if some stage is invalid for these sizes."""
    for op in ops:
        new = []
        for a in range(op.nd):
            n, p = sizes[a], op.padding[a]
            if p and op.padding_mode == "reflect" and p >= n:
                return None
            if p and op.padding_mode == "circular" and p > n:
                return None
            o = out_len(n, op.kernel_size[a], op.stride[a], p, op.dilation[a])
            if o < 1:
                return None
            new.append(o)
        sizes = tuple(new)
    return sizes


def fit_sizes(chains: list[list[ConvOp]], base: tuple[int, ...]) -> tuple[int, ...]:
    """Grow odd `base` sizes (by 2) until every chain is valid on them."""
    sizes = tuple(base)
    for _ in range(40):
        if all(chain_sizes(c, sizes) is not None for c in chains):
            return sizes
        sizes = tuple(s + 2 for s in sizes)
    raise AssertionError(f"no valid input size for {chains}")


def naive_compose(a: ConvOp, b: ConvOp) -> ConvOp:
    """b∘a ignoring b's padding condition: compose with b unpadded, then move b's padding onto x."""
    c, reason = compose(a, replace(b, padding=(0,) * b.nd))
    assert c is not None, reason
    padding = tuple(pc + sa * pb for pc, sa, pb in zip(c.padding, a.stride, b.padding))
    mode = b.padding_mode if any(b.padding) else c.padding_mode
    return replace(c, padding=padding, padding_mode=mode)


def naive_sum(ops: list[ConvOp], stride, padding, mode) -> ConvOp:
    """Σ ops as one op, ignoring alignment: every kernel centred in a common window (same dilation)."""
    groups = reduce(math.gcd, (op.groups for op in ops))
    ops = [regroup(op, groups) for op in ops]
    nd = ops[0].nd
    size = tuple(max(op.kernel_size[a] for op in ops) for a in range(nd))
    w = sum(embed_kernel(op.weight, size, tuple((size[a] - op.kernel_size[a]) // 2 for a in range(nd)))
            for op in ops)
    b = sum(op.bias for op in ops)
    return ConvOp(w, b, stride, padding, ops[0].dilation, groups, mode)


# ----------------------------------------------------------------------------------------------
# The reference itself and the constructors (lowering of single layers) against torch modules


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_conv_op_and_reference_match_torch_module(nd, mode):
    g = gen(nd * 10 + MODES.index(mode))
    conv_cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[nd]
    k = (3, 1, 5)[:nd]
    m = conv_cls(4, 6, k, stride=(2, 1, 1)[:nd], padding=(1, 0, 2)[:nd], dilation=(2, 1, 1)[:nd],
                 groups=2, bias=True, padding_mode=mode).to(DT)
    with torch.no_grad():
        m.weight.copy_(rnd(g, *m.weight.shape))
        m.bias.copy_(rnd(g, 6))
    op = conv_op(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
    assert (op.in_channels, op.out_channels, op.kernel_size, op.groups) == (4, 6, k, 2)
    x = rnd(g, 2, 4, *(9, 7, 11)[:nd])
    assert_close(apply(op, x), m(x).detach())


def test_conv_op_accepts_int_hyperparameters_and_no_bias():
    g = gen(0)
    w = rnd(g, 3, 2, 3, 3)
    op = conv_op(w, None, 2, 1, 1, 1)
    assert op.stride == (2, 2) and op.padding == (1, 1) and op.dilation == (1, 1)
    assert op.bias.dtype == DT and torch.equal(op.bias, torch.zeros(3, dtype=DT))
    x = rnd(g, 2, 2, 7, 9)
    assert_close(apply(op, x), F.conv2d(x, w, None, 2, 1))


def test_constructors_cast_to_float64_and_detach():
    w = torch.randn(4, 3, 3, requires_grad=True)
    op = conv_op(w.half(), torch.randn(4).bfloat16(), (1,), (1,), (1,), 1)
    assert op.weight.dtype == DT and op.bias.dtype == DT and not op.weight.requires_grad
    assert linear_op(torch.randn(3, 2), None).bias.dtype == DT


@pytest.mark.parametrize("nd", [0, 1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_bn_matches_eval_batchnorm(nd, affine):
    g = gen(nd + 7 * affine)
    c = 5
    mean, var = rnd(g, c), 0.5 + 1.5 * torch.rand(c, generator=g, dtype=DT)
    gamma, beta = (rnd(g, c), rnd(g, c)) if affine else (None, None)
    eps = 1e-3
    op = fold_bn(mean, var, gamma, beta, eps, nd)
    assert op.is_diagonal and op.nd == nd
    x = rnd(g, 2, c, *(7, 9, 5)[:nd])
    want = F.batch_norm(x, mean, var, gamma, beta, training=False, eps=eps)
    assert_close(apply(op, x), want)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_identity_pad_affine_scale(nd):
    g = gen(nd)
    c = 3
    x = rnd(g, 2, c, *(7, 9, 5)[:nd])
    assert_close(apply(identity_op(c, nd), x), x)
    pads = (1, 2, 0)[:nd]
    assert_close(apply(pad_op(c, pads), x), F.pad(x, [p for p in reversed(pads) for _ in range(2)]))
    s, t = rnd(g, c), rnd(g, c)
    shape = (1, c) + (1,) * nd
    assert_close(apply(channel_affine(s, t, nd), x), x * s.reshape(shape) + t.reshape(shape))
    op = make_conv(g, c, 4, (3,) * nd, p=(1,) * nd)
    assert_close(apply(scale_op(op, -0.5), x), -0.5 * apply(op, x))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize(("k", "s", "p"), [(3, 1, 1), (3, 2, 1), (2, 2, 0), (3, 3, 0), (5, 2, 2)])
def test_avgpool_op_matches_avg_pool(nd, k, s, p):
    g = gen(nd * 100 + k * 10 + s)
    c = 3
    x = rnd(g, 2, c, *(9, 7, 11)[:nd])
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    want = pool(x, k, s, p, count_include_pad=True)
    assert_close(apply(avgpool_op(c, (k,) * nd, (s,) * nd, (p,) * nd), x), want)


def test_linear_op_matches_linear():
    g = gen(1)
    w, b = rnd(g, 5, 3), rnd(g, 5)
    x = rnd(g, 2, 3)
    op = linear_op(w, b)
    assert op.nd == 0 and op.kernel_size == () and op.in_channels == 3 and op.out_channels == 5
    assert_close(apply(op, x), F.linear(x, w, b))


# ----------------------------------------------------------------------------------------------
# regroup, densify_axis, embed_kernel


@FEW
@given(seed=seeds, nd=st.sampled_from([0, 1, 2]), g_=st.sampled_from([1, 2, 3, 4, 6]),
       in_per=st.sampled_from([1, 2, 3]), out_per=st.sampled_from([1, 2]), data=st.data())
def test_regroup_is_block_diagonal_and_exact(seed, nd, g_, in_per, out_per, data):
    g = gen(seed)
    c_in, c_out = g_ * in_per, g_ * out_per
    k = tuple(data.draw(st.sampled_from([1, 2, 3])) for _ in range(nd))
    op = ConvOp(rnd(g, c_out, in_per, *k), rnd(g, c_out), (1,) * nd, tuple(x // 2 for x in k), (1,) * nd, g_)
    full = dense(op)
    x = rnd(g, 2, c_in, *(7,) * nd)
    want = apply(op, x)
    for groups in divisors(g_):
        r = regroup(op, groups)
        assert r.groups == groups
        assert r.weight.shape == (c_out, c_in // groups, *k)
        assert (r.in_channels, r.out_channels) == (c_in, c_out)
        assert torch.equal(dense(r), full)  # same operator, zeros off the original blocks
        assert torch.equal(r.bias, op.bias)
        assert_close(apply(r, x), want)
    assert regroup(op, g_) is op


def test_regroup_explicit_block_layout():
    # 2 groups, 2 in / 1 out per group → dense [2, 4] with the blocks on the diagonal
    w = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]], dtype=DT)  # [2, 2, 1]
    op = ConvOp(w, torch.zeros(2, dtype=DT), (1,), (0,), (1,), 2)
    r = regroup(op, 1)
    assert torch.equal(r.weight[..., 0], torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 4.0]], dtype=DT))


@FEW
@given(seed=seeds, nd=st.sampled_from([1, 2, 3]), data=st.data())
def test_densify_axis(seed, nd, data):
    g = gen(seed)
    k = tuple(data.draw(st.sampled_from([1, 2, 3])) for _ in range(nd))
    d = tuple(data.draw(st.sampled_from([1, 2, 3])) for _ in range(nd))
    p = tuple(data.draw(st.integers(0, 3)) for _ in range(nd))
    axis = data.draw(st.integers(0, nd - 1))
    op = make_conv(g, 2, 3, k, p=p, d=d)
    r = densify_axis(op, axis)
    kd = d[axis] * (k[axis] - 1) + 1
    assert r.dilation[axis] == 1
    assert r.dilation[:axis] + r.dilation[axis + 1:] == d[:axis] + d[axis + 1:]
    assert r.kernel_size[axis] == kd
    idx = [slice(None)] * (nd + 2)
    idx[2 + axis] = slice(None, None, d[axis])
    assert torch.equal(r.weight[tuple(idx)], op.weight)
    assert int((r.weight != 0).sum()) == int((op.weight != 0).sum())  # zeros between the taps
    sizes = fit_sizes([[op]], (9,) * nd)
    x = rnd(g, 2, 2, *sizes)
    assert_close(apply(r, x), apply(op, x))


def test_densify_axis_explicit():
    w = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=DT)
    op = ConvOp(w, torch.zeros(1, dtype=DT), (1,), (2,), (2,), 1)
    r = densify_axis(op, 0)
    assert r.dilation == (1,) and r.padding == (2,)
    assert torch.equal(r.weight, torch.tensor([[[1.0, 0.0, 2.0, 0.0, 3.0]]], dtype=DT))


def test_embed_kernel_explicit():
    w = torch.arange(1.0, 13.0, dtype=DT).reshape(2, 1, 2, 3)
    out = embed_kernel(w, (5, 7), (1, 2))
    assert out.shape == (2, 1, 5, 7)
    assert torch.equal(out[:, :, 1:3, 2:5], w)
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[:, :, 1:3, 2:5] = False
    assert not out[mask].any()


@FEW
@given(seed=seeds, nd=st.sampled_from([1, 2, 3]), data=st.data())
def test_embed_kernel_with_compensating_padding_is_exact(seed, nd, data):
    """Embedding a kernel at offset o in a bigger window K with padding p + o·d is the same conv."""
    g = gen(seed)
    k = tuple(data.draw(st.sampled_from([1, 2, 3])) for _ in range(nd))
    extra = tuple(data.draw(st.integers(0, 2)) for _ in range(nd))
    d = tuple(data.draw(st.sampled_from([1, 2])) for _ in range(nd))
    s = tuple(data.draw(st.sampled_from([1, 2])) for _ in range(nd))
    p = tuple(data.draw(st.integers(0, 2)) for _ in range(nd))
    mode = data.draw(st.sampled_from(MODES))
    op = make_conv(g, 2, 3, k, s=s, p=p, d=d, mode=mode)
    size = tuple(ki + 2 * e for ki, e in zip(k, extra))
    big = replace(op, weight=embed_kernel(op.weight, size, extra),
                  padding=tuple(pi + e * di for pi, e, di in zip(p, extra, d)))
    sizes = fit_sizes([[op], [big]], (7,) * nd)
    x = rnd(g, 2, 2, *sizes)
    assert_close(apply(big, x), apply(op, x))


# ----------------------------------------------------------------------------------------------
# parallel_sum: positive side


@st.composite
def aligned_branch_sets(draw):
    """1–4 centre-aligned branches on one input (RepVGG / ACNet / MobileOne / RepLKNet shapes)."""
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    ks = (1, 3, 5, 7) if nd < 3 else (1, 3)
    ds = (1, 2, 3) if nd < 3 else (1, 2)
    c_in = draw(st.sampled_from([1, 2, 3, 4, 6]))
    c_out = c_in if draw(st.booleans()) else draw(st.sampled_from([1, 2, 3, 4, 6]))
    stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(nd))
    mode = draw(st.sampled_from(MODES))
    g = gen(draw(seeds))
    kinds = ["conv", "conv", "conv", "conv_bn"]
    if c_in == c_out and all(s == 1 for s in stride):
        kinds += ["identity", "bn", "affine"]
    branches = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(kinds))
        if kind in ("conv", "conv_bn"):
            k = tuple(draw(st.sampled_from(ks)) for _ in range(nd))
            d = tuple(draw(st.sampled_from(ds)) for _ in range(nd))
            p = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
            groups = draw(st.sampled_from(divisors(math.gcd(c_in, c_out))))
            op = make_conv(g, c_in, c_out, k, stride, p, d, groups, draw(st.booleans()), mode)
            if kind == "conv_bn":
                op, reason = compose(op, rand_bn(g, c_out, nd))
                assert op is not None, reason
        elif kind == "identity":
            op = identity_op(c_in, nd)
        elif kind == "bn":
            op = rand_bn(g, c_in, nd)
        else:
            op = channel_affine(rnd(g, c_in), rnd(g, c_in), nd)
        if draw(st.integers(0, 4)) == 0:
            op = scale_op(op, draw(st.sampled_from([-1.0, 0.5, -2.25])))
        branches.append(op)
    base = tuple(draw(st.sampled_from((7, 9, 11) if nd < 3 else (5, 7))) for _ in range(nd))
    sizes = fit_sizes([[b] for b in branches], base)
    x = rnd(g, 2, c_in, *sizes)
    return branches, x, mode


@MANY
@given(aligned_branch_sets())
def test_parallel_sum_of_aligned_branches_is_exact(case):
    branches, x, mode = case
    fused, reason = parallel_sum(branches)
    assert reason is None and fused is not None
    want = sum(apply(b, x) for b in branches)
    got = apply(fused, x)
    assert got.shape == want.shape
    assert_close(got, want)
    assert fused.groups == reduce(math.gcd, (b.groups for b in branches))
    padded = any(any(b.padding) for b in branches)
    assert fused.padding_mode == (mode if padded else "zeros") or len(branches) == 1
    assert fused.stride == branches[0].stride
    assert (fused.in_channels, fused.out_channels) == (branches[0].in_channels, branches[0].out_channels)
    assert fused.weight.dtype == DT and fused.bias.dtype == DT


def test_parallel_sum_repvgg_block():
    """3×3+BN, 1×1+BN, identity BN, groups 2 → one 3×3 conv with groups 2."""
    g = gen(3)
    c = 4
    dense3 = compose(make_conv(g, c, c, (3, 3), p=(1, 1), groups=2, bias=False), rand_bn(g, c, 2))[0]
    dense1 = compose(make_conv(g, c, c, (1, 1), groups=2, bias=False), rand_bn(g, c, 2))[0]
    ident = rand_bn(g, c, 2)
    fused, reason = parallel_sum([dense3, dense1, ident])
    assert reason is None
    assert fused.kernel_size == (3, 3) and fused.padding == (1, 1) and fused.groups == 2
    x = rnd(g, 2, c, 7, 9)
    assert_close(apply(fused, x), apply(dense3, x) + apply(dense1, x) + apply(ident, x))


def test_parallel_sum_acnet_and_mixed_dilation():
    """3×3 + 1×3 + 3×1 (ACNet) plus a dilated 3×3 d=2: densified into a 5×5."""
    g = gen(4)
    ops = [make_conv(g, 3, 5, (3, 3), p=(1, 1)), make_conv(g, 3, 5, (1, 3), p=(0, 1)),
           make_conv(g, 3, 5, (3, 1), p=(1, 0)), make_conv(g, 3, 5, (3, 3), p=(2, 2), d=(2, 2))]
    fused, reason = parallel_sum(ops)
    assert reason is None
    assert fused.kernel_size == (5, 5) and fused.dilation == (1, 1) and fused.padding == (2, 2)
    x = rnd(g, 2, 3, 9, 11)
    assert_close(apply(fused, x), sum(apply(o, x) for o in ops))


def test_parallel_sum_keeps_common_dilation():
    g = gen(5)
    ops = [make_conv(g, 2, 2, (3, 3), p=(3, 3), d=(3, 3)), identity_op(2, 2)]
    fused, reason = parallel_sum(ops)
    assert reason is None and fused.dilation == (3, 3) and fused.kernel_size == (3, 3)
    x = rnd(g, 2, 2, 11, 9)
    assert_close(apply(fused, x), apply(ops[0], x) + x)


def test_parallel_sum_linear_residual():
    g = gen(6)
    lin = linear_op(rnd(g, 4, 4), rnd(g, 4))
    bn = rand_bn(g, 4, 0)
    fused, reason = parallel_sum([lin, bn, identity_op(4, 0)])
    assert reason is None and fused.nd == 0 and fused.groups == 1
    x = rnd(g, 3, 4)
    assert_close(apply(fused, x), apply(lin, x) + apply(bn, x) + x)


def test_parallel_sum_repmixer_difference():
    """x + s·(A(x) − B(x)) with A a depthwise 3×3+BN and B a BN (RepMixer)."""
    g = gen(7)
    c = 3
    a = compose(make_conv(g, c, c, (3, 3), p=(1, 1), groups=c), rand_bn(g, c, 2))[0]
    b = rand_bn(g, c, 2)
    s = rnd(g, c)
    a_s = compose(a, channel_affine(s, torch.zeros(c, dtype=DT), 2))[0]
    b_s = compose(b, channel_affine(-s, torch.zeros(c, dtype=DT), 2))[0]
    fused, reason = parallel_sum([identity_op(c, 2), a_s, b_s])
    assert reason is None and fused.groups == c
    x = rnd(g, 2, c, 9, 7)
    shape = (1, c, 1, 1)
    assert_close(apply(fused, x), x + s.reshape(shape) * (apply(a, x) - apply(b, x)))


# ----------------------------------------------------------------------------------------------
# compose: positive side


def _conv(draw, g, nd, c_in, c_out, *, ks, strides=(1,), dils=(1,), pads=(0,), modes=("zeros",),
          bias=None, groups=None):
    k = tuple(draw(st.sampled_from(ks)) for _ in range(nd))
    s = tuple(draw(st.sampled_from(strides)) for _ in range(nd))
    d = tuple(draw(st.sampled_from(dils)) for _ in range(nd))
    p = tuple(draw(st.sampled_from(pads)) for _ in range(nd))
    grp = groups if groups is not None else draw(st.sampled_from(divisors(math.gcd(c_in, c_out))))
    b = draw(st.booleans()) if bias is None else bias
    return make_conv(g, c_in, c_out, k, s, p, d, grp, b, draw(st.sampled_from(modes)))


CHANS = st.sampled_from([1, 2, 3, 4, 6])


@st.composite
def exact_chains(draw, kind):
    """Chains of 2–3 ops (5 for the DBB avg branch) whose composite is exactly one conv."""
    g = gen(draw(seeds))
    if kind.startswith(("linear", "bn_linear")):
        c0, c1, c2 = draw(CHANS), draw(CHANS), draw(CHANS)
        lin1 = linear_op(rnd(g, c1, c0), rnd(g, c1) if draw(st.booleans()) else None)
        if kind == "linear_bn":
            ops = [lin1, rand_bn(g, c1, 0)]
        elif kind == "bn_linear":
            ops = [rand_bn(g, c0, 0), lin1]
        else:
            ops = [lin1, linear_op(rnd(g, c2, c1), rnd(g, c2))]
        return ops, rnd(g, 2, c0), kind

    nd = draw(st.sampled_from([1, 2, 2, 3]))
    small = nd == 3
    ks = (1, 2, 3) if small else (1, 2, 3, 5)
    c0, c1, c2 = draw(CHANS), draw(CHANS), draw(CHANS)
    if kind == "conv_bn":
        a = _conv(draw, g, nd, c0, c1, ks=ks, strides=(1, 2), dils=(1, 2), pads=(0, 1, 2), modes=MODES)
        ops = [a, rand_bn(g, c1, nd)]
    elif kind == "bn_conv":
        # BN before an unpadded conv, or before a conv padded with a non-zero mode: both exact
        padded = draw(st.booleans())
        b = _conv(draw, g, nd, c0, c1, ks=ks, strides=(1, 2), dils=(1, 2),
                  pads=(1, 2) if padded else (0,), modes=NON_ZERO_MODES if padded else MODES)
        ops = [rand_bn(g, c0, nd), b]
    elif kind == "conv_conv":
        a = _conv(draw, g, nd, c0, c1, ks=ks, strides=(1, 2), dils=(1, 2), pads=(0, 1, 2), modes=MODES)
        b = _conv(draw, g, nd, c1, c2, ks=(1, 2, 3), strides=(1, 2), dils=(1, 2), pads=(0,), modes=MODES)
        ops = [a, b]
    elif kind == "pw_kxk":
        a = _conv(draw, g, nd, c0, c1, ks=(1,), bias=False)
        b = _conv(draw, g, nd, c1, c2, ks=ks, strides=(1, 2), dils=(1, 2), pads=(0, 1, 2, 3))
        ops = [a, b]
    elif kind == "pw_pw_kxk":
        a = _conv(draw, g, nd, c0, c1, ks=(1,), bias=False)
        b = _conv(draw, g, nd, c1, c1, ks=(1,), bias=False)
        c = _conv(draw, g, nd, c1, c2, ks=ks, strides=(1, 2), dils=(1, 2), pads=(1, 2))
        ops = [a, b, c]
    elif kind == "dbb":
        k = tuple(draw(st.sampled_from(ks)) for _ in range(nd))
        pads = tuple((ki - 1) // 2 for ki in k)
        b = _conv(draw, g, nd, c0, c1, ks=(1,), strides=(1, 2))  # only to draw stride/groups/bias
        conv = make_conv(g, c0, c1, k, b.stride, None, None, b.groups, bool(b.bias.any()))
        ops = [pad_op(c0, pads), rand_bn(g, c0, nd), conv]
    elif kind == "dbb_avg":
        # DBB avg branch: 1×1 conv → BN → pad (with the BN value) → AvgPool(p=0) → BN
        k = draw(st.sampled_from([2, 3]))
        s = draw(st.sampled_from([1, 2]))
        ops = [_conv(draw, g, nd, c0, c1, ks=(1,), bias=False), pad_op(c1, ((k - 1) // 2,) * nd),
               rand_bn(g, c1, nd), avgpool_op(c1, (k,) * nd, (s,) * nd, (0,) * nd), rand_bn(g, c1, nd)]
        # pad→BN is the BNAndPad layer; fold the 1×1 conv in first (zero bias, pointwise)
    elif kind == "conv_scale":
        a = _conv(draw, g, nd, c0, c1, ks=ks, strides=(1, 2), dils=(1, 2), pads=(0, 1, 2), modes=MODES)
        shift = rnd(g, c1) if draw(st.booleans()) else torch.zeros(c1, dtype=DT)
        ops = [a, channel_affine(rnd(g, c1), shift, nd)]
    elif kind == "pw_avgpool":
        a = _conv(draw, g, nd, c0, c1, ks=(1,), bias=False)
        k = draw(st.sampled_from([2, 3]))
        ops = [a, avgpool_op(c1, (k,) * nd, (draw(st.sampled_from([1, 2])),) * nd, (k // 2,) * nd)]
    elif kind == "conv_avgpool":
        a = _conv(draw, g, nd, c0, c1, ks=ks, strides=(1, 2), dils=(1, 2), pads=(0, 1), modes=MODES)
        k = draw(st.sampled_from([2, 3]))
        ops = [a, avgpool_op(c1, (k,) * nd, (draw(st.sampled_from([1, 2])),) * nd, (0,) * nd)]
    else:  # conv_bn_conv
        a = _conv(draw, g, nd, c0, c1, ks=ks, strides=(1, 2), dils=(1, 2), pads=(0, 1), modes=MODES)
        b = _conv(draw, g, nd, c1, c2, ks=(1, 2, 3), strides=(1, 2), dils=(1, 2), pads=(0,))
        ops = [a, rand_bn(g, c1, nd), b]
    base = tuple(draw(st.sampled_from((9, 11, 13) if not small else (7, 9))) for _ in range(nd))
    sizes = fit_sizes([ops], base)
    return ops, rnd(g, 2, ops[0].in_channels, *sizes), kind


def fold_left(ops: list[ConvOp]) -> tuple[ConvOp | None, str | None]:
    acc = ops[0]
    for op in ops[1:]:
        predicted = composed_numel(acc, op)  # the size the engine checks before building a kernel
        acc, reason = compose(acc, op)
        if acc is None:
            return None, reason
        assert acc.weight.numel() == predicted, (tuple(acc.weight.shape), predicted)
    return acc, None


def fold_right(ops: list[ConvOp]) -> tuple[ConvOp | None, str | None]:
    acc = ops[-1]
    for op in reversed(ops[:-1]):
        acc, reason = compose(op, acc)
        if acc is None:
            return None, reason
    return acc, None


CHAIN_KINDS = ["conv_bn", "bn_conv", "conv_conv", "pw_kxk", "dbb", "dbb_avg", "conv_scale", "pw_avgpool",
               "conv_avgpool", "conv_bn_conv", "pw_pw_kxk", "linear_bn", "bn_linear", "linear_linear"]


@pytest.mark.parametrize("kind", CHAIN_KINDS)
@settings(PROPS, max_examples=25)
@given(data=st.data())
def test_compose_exact_chains(kind, data):
    ops, x, _ = data.draw(exact_chains(kind))
    want = run_chain(ops, x)
    fused, reason = fold_left(ops)
    assert reason is None and fused is not None, f"{kind}: {reason}"
    got = apply(fused, x)
    assert got.shape == want.shape
    assert_close(got, want)
    assert fused.in_channels == ops[0].in_channels and fused.out_channels == ops[-1].out_channels
    if kind in ("dbb", "conv_bn_conv", "pw_pw_kxk", "dbb_avg"):
        # also right-associated (BN folded into the following conv first)
        fused_r, reason_r = fold_right(ops)
        assert fused_r is not None, f"{kind} right-associated: {reason_r}"
        assert_close(apply(fused_r, x), want)


def test_compose_dbb_both_associations():
    g = gen(8)
    c = 3
    ops = [pad_op(c, (1, 1)), rand_bn(g, c, 2), make_conv(g, c, 4, (3, 3), groups=1)]
    x = rnd(g, 2, c, 7, 9)
    want = run_chain(ops, x)
    for fused, reason in (fold_left(ops), fold_right(ops)):
        assert reason is None
        assert fused.kernel_size == (3, 3) and fused.padding == (1, 1)
        assert_close(apply(fused, x), want)


def test_compose_conv_bn_keeps_hyperparameters():
    g = gen(9)
    a = make_conv(g, 4, 6, (3, 5), s=(2, 1), p=(1, 2), d=(1, 2), groups=2, mode="reflect")
    fused, reason = compose(a, rand_bn(g, 6, 2))
    assert reason is None
    assert (fused.stride, fused.padding, fused.dilation, fused.groups, fused.padding_mode) == (
        (2, 1), (1, 2), (1, 2), 2, "reflect")


# ----------------------------------------------------------------------------------------------
# Negative side: every refusal reason, and proof that the naive fusion would be wrong


def _assert_refused(result):
    op, reason = result
    assert op is None
    assert isinstance(reason, str) and reason.strip()
    return reason


def test_refuse_parallel_not_centre_aligned():
    g = gen(10)
    a = make_conv(g, 2, 3, (3, 3), p=(1, 1))
    b = make_conv(g, 2, 3, (3, 3), p=(0, 0))
    reason = _assert_refused(parallel_sum([a, b]))
    assert "align" in reason
    x = rnd(g, 2, 2, 9, 9)
    assert apply(a, x).shape != apply(b, x).shape  # the sum is not even defined
    # stride 3 on 9×9: both give 3×3 outputs, still not one conv
    a3, b3 = replace(a, stride=(3, 3)), replace(b, stride=(3, 3))
    _assert_refused(parallel_sum([a3, b3]))
    want = apply(a3, x) + apply(b3, x)
    for p in ((0, 0), (1, 1)):
        assert not matches(apply(naive_sum([a3, b3], (3, 3), p, "zeros"), x), want)


def test_refuse_parallel_misaligned_even_kernel():
    """3×3 p=1 and 2×2 p=0 at stride 2: equal output shapes on even inputs only.

    On 10×10 the 2×2 happens to sit at offset (1, 1) of the 3×3 window, so *that* input size has a
    single-conv sum; on 9×9 the branch outputs differ in shape. A fused op must serve every input
    size, so the refusal is warranted; the centred naive embedding is wrong even on 10×10.
    """
    g = gen(11)
    a = make_conv(g, 2, 2, (3, 3), s=(2, 2), p=(1, 1))
    b = make_conv(g, 2, 2, (2, 2), s=(2, 2), p=(0, 0))
    reason = _assert_refused(parallel_sum([a, b]))
    assert "align" in reason
    x9 = rnd(g, 2, 2, 9, 9)
    assert apply(a, x9).shape != apply(b, x9).shape
    x10 = rnd(g, 2, 2, 10, 10)
    want = apply(a, x10) + apply(b, x10)
    for p in ((0, 0), (1, 1)):
        assert not matches(apply(naive_sum([a, b], (2, 2), p, "zeros"), x10), want)


def test_refuse_parallel_different_strides():
    g = gen(12)
    a = make_conv(g, 2, 3, (3,), s=(1,), p=(0,))
    b = make_conv(g, 2, 3, (3,), s=(2,), p=(1,))
    reason = _assert_refused(parallel_sum([a, b]))
    assert "stride" in reason
    x = rnd(g, 2, 2, 5)  # both outputs have length 3
    want = apply(a, x) + apply(b, x)
    for s, p in (((1,), (0,)), ((2,), (1,)), ((1,), (1,)), ((2,), (0,))):
        assert not matches(apply(naive_sum([a, b], s, p, "zeros"), x), want)
    # an identity branch next to a strided conv
    c = make_conv(g, 3, 3, (3, 3), s=(2, 2), p=(1, 1))
    _assert_refused(parallel_sum([c, identity_op(3, 2)]))
    x2 = rnd(g, 2, 3, 7, 7)
    assert apply(c, x2).shape != x2.shape


def test_refuse_parallel_different_channels():
    g = gen(13)
    a = make_conv(g, 3, 4, (3, 3), p=(1, 1))
    b = make_conv(g, 3, 2, (3, 3), p=(1, 1))
    reason = _assert_refused(parallel_sum([a, b]))
    assert "channel" in reason
    x = rnd(g, 2, 3, 7, 7)
    assert apply(a, x).shape != apply(b, x).shape
    c = make_conv(g, 2, 4, (3, 3), p=(1, 1))  # different input channels: not the same input
    _assert_refused(parallel_sum([a, c]))
    _assert_refused(parallel_sum([a, identity_op(3, 2)]))


def test_refuse_parallel_different_dimensionality():
    g = gen(14)
    _assert_refused(parallel_sum([make_conv(g, 2, 2, (3,), p=(1,)), make_conv(g, 2, 2, (3, 3), p=(1, 1))]))


@pytest.mark.parametrize("other", ["reflect", "replicate", "circular"])
def test_refuse_parallel_mixed_padding_modes(other):
    g = gen(15)
    a = make_conv(g, 2, 3, (3, 3), p=(1, 1), mode=other)
    b = make_conv(g, 2, 3, (3, 3), p=(1, 1), mode="zeros")
    reason = _assert_refused(parallel_sum([a, b]))
    assert "mode" in reason
    x = rnd(g, 2, 2, 7, 9)
    want = apply(a, x) + apply(b, x)
    for mode in ("zeros", other):
        assert not matches(apply(naive_sum([a, b], (1, 1), (1, 1), mode), x), want)


def test_conservative_refusal_parallel_even_dilated_kernel():
    """2-tap kernel at dilation 2 (p=1) + a 1×1: the sum is the dense 3-tap conv [w0, v, w1] with p=1,
    but parallel_sum gives the 1×1 branch the dilation 2 instead of densifying, and refuses
    ("padding difference not a multiple of the dilation"). A missed fusion, never a wrong one."""
    g = gen(26)
    a = make_conv(g, 2, 2, (2,), p=(1,), d=(2,))
    b = make_conv(g, 2, 2, (1,))
    x = rnd(g, 2, 2, 9)
    want = apply(a, x) + apply(b, x)
    dense_w = embed_kernel(densify_axis(a, 0).weight, (3,), (0,)) + embed_kernel(b.weight, (3,), (1,))
    assert matches(apply(ConvOp(dense_w, a.bias + b.bias, (1,), (1,), (1,), 1), x), want)
    fused, reason = parallel_sum([a, b])
    if fused is not None:
        assert_close(apply(fused, x), want)
    else:
        assert "dilation" in reason


def test_parallel_unpadded_branch_mode_is_ignored():
    """A 1×1 branch with padding_mode 'zeros' next to a reflect 3×3: fine, the 1×1 never pads."""
    g = gen(16)
    a = make_conv(g, 2, 2, (3, 3), p=(1, 1), mode="reflect")
    b = make_conv(g, 2, 2, (1, 1))
    fused, reason = parallel_sum([a, b, identity_op(2, 2)])
    assert reason is None and fused.padding_mode == "reflect"
    x = rnd(g, 2, 2, 7, 9)
    assert_close(apply(fused, x), apply(a, x) + apply(b, x) + x)


def test_refuse_bn_before_zero_padded_conv():
    g = gen(17)
    bn = rand_bn(g, 3, 2)
    conv = make_conv(g, 3, 4, (3, 3), p=(1, 1))
    reason = _assert_refused(compose(bn, conv))
    assert "shift" in reason or "bias" in reason
    x = rnd(g, 2, 3, 7, 9)
    want = run_chain([bn, conv], x)
    assert not matches(apply(naive_compose(bn, conv), x), want)
    # the same chain with a reflect-padded conv is exact (padding commutes with a per-channel map)
    fused, reason = compose(bn, replace(conv, padding_mode="reflect"))
    assert reason is None
    assert_close(apply(fused, x), run_chain([bn, replace(conv, padding_mode="reflect")], x))
    # and with a zero shift the BN is a pure scale: exact again
    scale = channel_affine(rnd(g, 3), torch.zeros(3, dtype=DT), 2)
    fused, reason = compose(scale, conv)
    assert reason is None
    assert_close(apply(fused, x), run_chain([scale, conv], x))


def test_refuse_pointwise_with_bias_before_zero_padded_conv():
    g = gen(18)
    pw = make_conv(g, 3, 5, (1, 1), bias=True)
    conv = make_conv(g, 5, 4, (3, 3), p=(1, 1))
    _assert_refused(compose(pw, conv))
    x = rnd(g, 2, 3, 9, 7)
    assert not matches(apply(naive_compose(pw, conv), x), run_chain([pw, conv], x))
    pw0 = replace(pw, bias=torch.zeros(5, dtype=DT))
    fused, reason = compose(pw0, conv)
    assert reason is None
    assert_close(apply(fused, x), run_chain([pw0, conv], x))


@pytest.mark.parametrize(("ka", "pa"), [((3, 3), (1, 1)), ((3, 3), (0, 0)), ((3, 1), (1, 0)),
                                       ((2, 2), (0, 0)), ((5, 5), (3, 3))])
def test_refuse_window_op_before_zero_padded_conv(ka, pa):
    """A k×k (k>1) op before a zero-padded conv (zero bias everywhere): the border sees a(x), not 0."""
    g = gen(19)
    a = make_conv(g, 3, 3, ka, p=pa, bias=False)
    b = make_conv(g, 3, 2, (3, 3), p=(1, 1), bias=False)
    reason = _assert_refused(compose(a, b))
    assert "border" in reason
    x = rnd(g, 2, 3, 9, 11)
    assert not matches(apply(naive_compose(a, b), x), run_chain([a, b], x))


@pytest.mark.parametrize(("ka", "sa", "pa"), [((1, 1), (2, 2), (0, 0)), ((1, 1), (1, 1), (1, 1)),
                                              ((2, 2), (1, 1), (1, 1)), ((3, 3), (1, 1), (2, 2))])
def test_conservative_refusals_before_zero_padded_conv(ka, sa, pa):
    """Cases compose refuses although b∘a is one conv (zero bias; the padded ring only ever reads
    a's own zero padding, or a strided 1×1 whose composite is a dilated conv). Refusing is allowed
    (a missed fusion, never a wrong one); if compose learns them, the result must be exact."""
    g = gen(25)
    a = make_conv(g, 3, 3, ka, s=sa, p=pa, bias=False)
    b = make_conv(g, 3, 2, (3, 3), p=(1, 1), bias=False)
    for size in ((9, 11), (10, 8)):
        x = rnd(g, 2, 3, *size)
        want = run_chain([a, b], x)
        assert matches(apply(naive_compose(a, b), x), want)
        fused, reason = compose(a, b)
        if fused is not None:
            assert_close(apply(fused, x), want)
        else:
            assert reason


def test_window_op_before_conv_padded_on_other_axis_is_exact():
    """3×1 conv then 1×3 conv padded only along the width: a is pointwise there, exact."""
    g = gen(20)
    a = make_conv(g, 3, 3, (3, 1), p=(1, 0), bias=False)
    b = make_conv(g, 3, 2, (1, 3), p=(0, 1))
    fused, reason = compose(a, b)
    assert reason is None and fused.kernel_size == (3, 3) and fused.padding == (1, 1)
    x = rnd(g, 2, 3, 9, 7)
    assert_close(apply(fused, x), run_chain([a, b], x))


@pytest.mark.parametrize("mode", NON_ZERO_MODES)
def test_refuse_non_zero_padded_conv_after_window_op(mode):
    g = gen(21)
    a = make_conv(g, 3, 3, (3, 3), bias=False)
    b = make_conv(g, 3, 2, (3, 3), p=(1, 1), mode=mode)
    reason = _assert_refused(compose(a, b))
    assert mode in reason
    x = rnd(g, 2, 3, 9, 11)
    assert not matches(apply(naive_compose(a, b), x), run_chain([a, b], x))
    # after a pointwise op with a bias the same conv is exact
    pw = make_conv(g, 3, 3, (1, 1), bias=True)
    fused, reason = compose(pw, b)
    assert reason is None and fused.padding_mode == mode
    assert_close(apply(fused, x), run_chain([pw, b], x))


def test_refuse_mixed_padding_modes_in_chain():
    """reflect-padded 3×1 then zero-padded 1×3 (a pointwise on the padded axis, zero bias)."""
    g = gen(22)
    a = make_conv(g, 2, 2, (3, 1), p=(1, 0), bias=False, mode="reflect")
    b = make_conv(g, 2, 2, (1, 3), p=(0, 1))
    reason = _assert_refused(compose(a, b))
    assert "mode" in reason
    x = rnd(g, 2, 2, 9, 7)
    want = run_chain([a, b], x)
    naive = naive_compose(a, b)
    for mode in ("zeros", "reflect"):
        assert not matches(apply(replace(naive, padding_mode=mode), x), want)


def test_refuse_avgpool_padded_after_bn():
    g = gen(23)
    bn = rand_bn(g, 3, 2)
    pool = avgpool_op(3, (3, 3), (2, 2), (1, 1))
    _assert_refused(compose(bn, pool))
    x = rnd(g, 2, 3, 9, 9)
    assert not matches(apply(naive_compose(bn, pool), x), run_chain([bn, pool], x))


def test_refuse_compose_channel_mismatch_and_dims():
    g = gen(24)
    _assert_refused(compose(make_conv(g, 2, 3, (3, 3)), make_conv(g, 4, 2, (1, 1))))
    _assert_refused(compose(make_conv(g, 2, 3, (3,)), make_conv(g, 3, 2, (1, 1))))
    _assert_refused(compose(linear_op(rnd(g, 3, 2), None), linear_op(rnd(g, 2, 2), None)))


@FEW
@given(seed=seeds, nd=st.sampled_from([1, 2]), data=st.data())
def test_refusals_random_border_cases(seed, nd, data):
    """Random instances of the three compose border refusals; the naive composite is always wrong."""
    g = gen(seed)
    c0, c1, c2 = (data.draw(CHANS) for _ in range(3))
    case = data.draw(st.sampled_from(["bn", "pw_bias", "window"]))
    kb = tuple(data.draw(st.sampled_from([3, 5])) for _ in range(nd))
    pb = tuple(data.draw(st.integers(1, 2)) for _ in range(nd))
    b = make_conv(g, c1, c2, kb, p=pb, groups=data.draw(st.sampled_from(divisors(math.gcd(c1, c2)))))
    if case == "bn":
        a = rand_bn(g, c1, nd)
    elif case == "pw_bias":
        a = make_conv(g, c0, c1, (1,) * nd, bias=True)
    else:
        # pa < k − 1: a's output on b's padded ring would read real pixels (pa = k − 1 would be exact)
        ka = tuple(data.draw(st.sampled_from([2, 3, 5])) for _ in range(nd))
        pa = tuple(data.draw(st.integers(0, k - 2)) for k in ka)
        a = make_conv(g, c0, c1, ka, p=pa, bias=data.draw(st.booleans()))
    _assert_refused(compose(a, b))
    sizes = fit_sizes([[a, b]], (9,) * nd)
    x = rnd(g, 2, a.in_channels, *sizes)
    assert not matches(apply(naive_compose(a, b), x), run_chain([a, b], x))


# ----------------------------------------------------------------------------------------------
# "Never wrong": arbitrary configurations; whatever is accepted is exact


def _any_op(draw, g, nd, c_in, c_out, stride=None):
    kinds = ["conv"] * 4
    if c_in == c_out:
        kinds += ["identity", "bn", "affine", "pad", "avgpool"]
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        k = tuple(draw(st.integers(1, 4)) for _ in range(nd))
        d = tuple(draw(st.sampled_from([1, 2])) for _ in range(nd))
        s = stride or tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(nd))
        if draw(st.booleans()):
            p = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
        else:
            p = tuple(draw(st.integers(0, 3)) for _ in range(nd))
        groups = draw(st.sampled_from(divisors(math.gcd(c_in, c_out))))
        mode = draw(st.sampled_from(MODES))
        return make_conv(g, c_in, c_out, k, s, p, d, groups, draw(st.booleans()), mode)
    if kind == "identity":
        return identity_op(c_in, nd)
    if kind == "bn":
        return rand_bn(g, c_in, nd)
    if kind == "affine":
        shift = rnd(g, c_in) if draw(st.booleans()) else torch.zeros(c_in, dtype=DT)
        return channel_affine(rnd(g, c_in), shift, nd)
    if kind == "pad":
        return pad_op(c_in, tuple(draw(st.integers(0, 2)) for _ in range(nd)))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    return avgpool_op(c_in, k, stride or tuple(draw(st.sampled_from([1, 2])) for _ in range(nd)),
                      tuple(draw(st.integers(0, ki // 2)) for ki in k))


def _any_linear(draw, g, c_in, c_out):
    """nd == 0: a Linear, a BN1d, or a grouped linear map (ConvOp with groups and no spatial axes)."""
    kinds = ["lin", "grouped"] + (["bn"] if c_in == c_out else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "bn":
        return rand_bn(g, c_in, 0)
    if kind == "lin":
        return linear_op(rnd(g, c_out, c_in), rnd(g, c_out) if draw(st.booleans()) else None)
    groups = draw(st.sampled_from(divisors(math.gcd(c_in, c_out))))
    return ConvOp(rnd(g, c_out, c_in // groups), rnd(g, c_out), (), (), (), groups)


@st.composite
def any_parallel(draw):
    nd = draw(st.sampled_from([0, 1, 2, 2, 3]))
    g = gen(draw(seeds))
    c_in, c_out = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2, 3, 4]))
    # a third of the cases: every window op at stride 2 on even sizes, where misaligned branches can
    # still produce equal output shapes
    strided = nd > 0 and draw(st.integers(0, 2)) == 0
    ops = []
    for _ in range(draw(st.integers(2, 3))):
        ci, co = c_in, c_out
        if draw(st.integers(0, 9)) == 0:
            co = draw(st.sampled_from([1, 2, 3, 4]))
        if nd == 0:
            ops.append(_any_linear(draw, g, ci, co))
        else:
            ops.append(_any_op(draw, g, nd, ci, co, (2,) * nd if strided else None))
    if nd == 0:
        return ops, rnd(g, 2, c_in)
    choices = ([8, 10] if strided else [7, 9, 10, 11]) if nd < 3 else [6, 7]
    sizes = fit_sizes([[o] for o in ops], tuple(draw(st.sampled_from(choices)) for _ in range(nd)))
    return ops, rnd(g, 2, c_in, *sizes)


@MANY
@given(any_parallel())
def test_parallel_sum_never_wrong(case):
    ops, x = case
    fused, reason = parallel_sum(ops)
    outs = [apply(o, x) for o in ops]
    if len({o.shape for o in outs}) > 1:
        event("output shapes differ")
        assert fused is None and reason, "branches with different output shapes were fused"
        return
    event("fused" if fused is not None else "refused (same shapes)")
    if fused is None:
        assert reason
        return
    assert_close(apply(fused, x), sum(outs))


@st.composite
def any_chain(draw):
    nd = draw(st.sampled_from([0, 1, 2, 2, 3]))
    g = gen(draw(seeds))
    n = draw(st.integers(2, 3))
    chans = [draw(st.sampled_from([1, 2, 3, 4])) for _ in range(n + 1)]
    ops = []
    for i in range(n):
        if nd == 0:
            ops.append(_any_linear(draw, g, chans[i], chans[i + 1]))
        else:
            if draw(st.booleans()):
                chans[i + 1] = chans[i]  # make the per-channel kinds reachable
            ops.append(_any_op(draw, g, nd, chans[i], chans[i + 1]))
    if nd == 0:
        return ops, rnd(g, 2, chans[0])
    base = (9, 11) if nd < 3 else (7,)
    sizes = fit_sizes([ops], tuple(draw(st.sampled_from(base)) for _ in range(nd)))
    return ops, rnd(g, 2, chans[0], *sizes)


@MANY
@given(any_chain())
def test_compose_never_wrong(case):
    ops, x = case
    want = run_chain(ops, x)
    for side, (fused, reason) in zip(("left", "right"), (fold_left(ops), fold_right(ops))):
        event(f"{side}: {'fused' if fused is not None else 'refused'}")
        if fused is None:
            assert reason
            continue
        got = apply(fused, x)
        assert got.shape == want.shape
        assert_close(got, want)


@FEW
@given(seed=seeds, nd=st.sampled_from([1, 2]), data=st.data())
def test_compose_channel_mismatch_never_fuses(seed, nd, data):
    g = gen(seed)
    c0, c1, c2 = (data.draw(st.sampled_from([1, 2, 3])) for _ in range(3))
    a = _any_op(data.draw, g, nd, c0, c0)
    b = _any_op(data.draw, g, nd, c1 + 3, c2)
    _assert_refused(compose(a, b))


@PROPS
@given(any_chain(), st.sampled_from([torch.float64, torch.float32]))
def test_library_apply_op_matches_reference(case, dtype):
    """kernels.apply_op (used by the library) agrees with this file's reference, and casts to x's dtype."""
    from repfuse.kernels import apply_op

    ops, x = case
    x = x.to(dtype)
    for op in ops:
        got, want = apply_op(op, x), apply(replace(op, weight=op.weight.to(dtype), bias=op.bias.to(dtype)), x)
        assert got.dtype == dtype
        if dtype == torch.float64:
            assert_close(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()))
        x = got


@pytest.mark.parametrize("seed", range(4))
def test_compose_with_a_pointwise_side_keeps_groups_exact(seed):
    """1×1 on either side of a grouped or depthwise k×k (any stride): the kernel is built in the grouping of
    the result (a depthwise op is never made dense first), exact against running the two ops."""
    g = gen(100 + seed)
    for _ in range(40):
        ga, gb = (int(v) for v in torch.randint(0, 3, (2,), generator=g).tolist())
        ga, gb = 2 ** ga, 2 ** gb
        c0, c1, c2 = (4 * int(v) for v in torch.randint(1, 4, (3,), generator=g).tolist())
        if torch.rand((), generator=g) < 0.3:
            c1, ga = c0, c0  # depthwise
        k = int(torch.randint(0, 2, (), generator=g)) * 2 + 1
        sa, sb = (int(v) for v in torch.randint(1, 3, (2,), generator=g).tolist())
        if torch.rand((), generator=g) < 0.5:  # k×k then 1×1
            a = make_conv(g, c0, c1, (k, k), s=(sa, sa), p=(k // 2, k // 2), groups=ga)
            b = make_conv(g, c1, c2, (1, 1), s=(sb, sb), groups=gb)
        else:  # 1×1 then k×k
            a = make_conv(g, c0, c1, (1, 1), groups=ga)
            b = make_conv(g, c1, c2, (k, k), s=(sb, sb), p=(k // 2, k // 2), groups=gb)
            a = replace(a, bias=torch.zeros_like(a.bias))  # b's zero padding must see zeros
        fused, reason = compose(a, b)
        assert reason is None and fused.groups == math.gcd(ga, gb)
        assert fused.weight.numel() == composed_numel(a, b)
        x = rnd(g, 2, c0, 13, 11)
        assert_close(apply(fused, x), apply(b, apply(a, x)))


@pytest.mark.parametrize("groups", [1, 4, 64])
def test_a_sampled_self_check_still_catches_a_wrong_kernel(groups):
    """The self-check computes a sample of a wide layer's output channels (whole groups when grouped): an
    error in the window, the bias or a sampled channel is caught; a correct op passes."""
    from repfuse import lowering as L
    from repfuse import regions as R

    g = gen(7)
    c = 64
    op = make_conv(g, c, c, (3, 3), p=(1, 1), groups=groups)
    x = rnd(g, 2, c, 9, 9)
    y = apply(op, x)
    expr = L.Expr(op, frozenset(), 2, ("3×3",), 0, 0, (), 1.0)
    assert R.self_check(expr, x, y)[1] is None
    shifted = replace(op, padding=(0, 1), weight=torch.cat([op.weight[:, :, 1:], op.weight[:, :, :1]], 2))
    bad_bias = replace(op, bias=op.bias + 1e-3)
    bad_channel = replace(op, weight=op.weight.clone())
    bad_channel.weight[0] += 1e-3  # channel 0 (group 0) is always in the sample
    for wrong in (shifted, bad_bias, bad_channel):
        assert R.self_check(replace(expr, op=wrong), x, y)[1] is not None
