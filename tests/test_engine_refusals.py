"""The engine's refusals: places that look fusable but are not exactly one conv.

For each one: the refusal is reported in `FuseResult.skipped` (the module path and a non-empty reason
that names the cause), the refused layers are still in the deploy model, and the deploy model computes
exactly what the original does (float64, < 1e-9 relative; see models_zoo.fuse_checked).

Models run in float64 where a BatchNorm stays unfused (see test_engine.test_unfused_bn_keeps_model_dtype).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models_zoo import BNS, CONVS, EXACT, count, float64_rel_error, fuse_checked
from torch import nn

C = 4
SHAPE = (2, C, 9, 11)
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1, dilation=1, padding_mode="zeros"):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False,
                                   padding_mode=padding_mode), nn.BatchNorm2d(cout))


def reason_for(result, module: str, *words: str) -> str:
    """The reason recorded for `module` (exact path), which must mention every one of `words`."""
    reasons = {s.module: s.reason for s in result.skipped}
    assert module in reasons, f"no refusal recorded for {module!r}: {result.skipped}"
    reason = reasons[module]
    assert reason.strip(), f"empty reason for {module}"
    for w in words:
        assert w.lower() in reason.lower(), f"reason for {module} does not mention {w!r}: {reason!r}"
    return reason


def all_reasons(result) -> str:
    return " | ".join(f"{s.module}: {s.reason}" for s in result.skipped)


# ------------------------------------------------------------------------------------------------
# BN without running statistics


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C, track_running_stats=False)
        self.one = conv_bn(C, C, 1)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.one(x)


def test_bn_without_running_stats():
    res = fuse_checked(NoRunningStats(), SHAPE, convs=None, norms=None, dtype=F64)
    reason_for(res, "bn", "running")
    assert isinstance(res.model.bn, nn.BatchNorm2d) and not res.model.bn.track_running_stats
    assert count(res.model, CONVS) >= 1 and "conv.weight" in res.model.state_dict()


# ------------------------------------------------------------------------------------------------
# Branches that add but are not centre-aligned / have different strides


class Misaligned(nn.Module):
    """3×3 p1 s2 and 2×2 p1 s2 give the same 5×6 output on 9×11, but sample different centres."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(C, C, 3, stride=2, padding=1)
        self.b = conv_bn(C, C, 2, stride=2, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_misaligned_branches():
    res = fuse_checked(Misaligned(), SHAPE, convs=2, norms=0, dtype=F64)
    reason_for(res, "add", "aligned")
    assert {s.module for s in res.sites} == {"a", "b"}  # each conv+BN still folds on its own


class StrideMismatch(nn.Module):
    """Two branches whose outputs have the same shape (so they add) but whose strides differ (2 vs 3)."""

    def __init__(self, pooled):
        super().__init__()
        if pooled:  # on 7×9: 3×3 s2 p0 → 3×4; 1×1 conv → AvgPool2d(2, stride 3, padding 1) → 3×4
            self.a = conv_bn(C, C, 3, stride=2, padding=0)
            self.b = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.AvgPool2d(2, stride=3, padding=1),
                                   nn.BatchNorm2d(C))
        else:  # on 9×11: 3×3 s2 p1 → 5×6; 1×1 s3 p3 → 5×6
            self.a = conv_bn(C, C, 3, stride=2, padding=1)
            self.b = conv_bn(C, C, 1, stride=3, padding=3)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(("pooled", "shape"), [(False, SHAPE), (True, (2, C, 7, 9))],
                         ids=["conv_stride3", "conv_then_avgpool_stride3"])
def test_mismatched_strides(pooled, shape):
    model = StrideMismatch(pooled)
    with torch.no_grad():
        assert model.a(torch.randn(shape)).shape == model.b(torch.randn(shape)).shape
    res = fuse_checked(model, shape, convs=2, norms=0, dtype=F64)
    reason_for(res, "add", "stride")


# ------------------------------------------------------------------------------------------------
# A value inside the would-be sub-graph is used outside it


class UsedOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(C)
        self.one = conv_bn(C, C, 1)
        self.idbn = nn.BatchNorm2d(C)

    def forward(self, x):
        c = self.conv(x)
        y = self.bn(c) + self.one(x) + self.idbn(x)
        return F.relu(y) + torch.sigmoid(c)  # the conv output is also used here


def test_intermediate_value_used_outside():
    model = UsedOutside()
    res = fuse_checked(model, SHAPE, convs=None, norms=None, dtype=F64)
    refusal = [s for s in res.skipped if "outside" in s.reason]
    assert refusal, all_reasons(res)
    assert refusal[0].module.startswith("add") and "conv" in refusal[0].reason
    # the conv whose output escapes is kept exactly as it was
    assert torch.equal(res.model.state_dict()["conv.weight"], model.conv.weight)


class ReturnsBranch(nn.Module):
    """The block returns a branch output next to the sum (a feature used by a neck / auxiliary loss)."""

    def __init__(self):
        super().__init__()
        self.a = conv_bn(C, C, 3, padding=1)
        self.b = conv_bn(C, C, 1)

    def forward(self, x):
        a = self.a(x)
        return a + self.b(x), a


def test_branch_output_also_returned():
    res = fuse_checked(ReturnsBranch(), SHAPE, convs=2, norms=0, dtype=F64)
    reason_for(res, "add", "outside")


# ------------------------------------------------------------------------------------------------
# Sequential compositions that are not exact at the border




class BNBeforePaddedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.BatchNorm2d(C)
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.post = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.post(self.conv(self.pre(x)))


def test_bn_before_zero_padded_conv():
    res = fuse_checked(BNBeforePaddedConv(), SHAPE, convs=1, norms=1, dtype=F64)
    assert isinstance(res.model.pre, nn.BatchNorm2d)  # the pre-BN stays; conv+post fold


def test_bn_before_zero_padded_conv_reason():
    res = fuse_checked(BNBeforePaddedConv(), SHAPE, convs=1, norms=1, dtype=F64)
    reason_for(res, "conv", "pad")


class BiasedPointwiseThenPaddedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(C, 8, 1, bias=True)
        self.conv = nn.Conv2d(8, C, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(self.pw(x))


def test_biased_1x1_then_zero_padded_conv():
    res = fuse_checked(BiasedPointwiseThenPaddedConv(), SHAPE, convs=2, norms=0)
    assert res.sites == []


def test_biased_1x1_then_zero_padded_conv_reason():
    res = fuse_checked(BiasedPointwiseThenPaddedConv(), SHAPE, convs=2, norms=0)
    reason_for(res, "conv", "bias", "pad")


def test_unbiased_1x1_then_zero_padded_conv_fuses():
    """The control: the same chain without the 1×1 bias is exact."""
    model = BiasedPointwiseThenPaddedConv()
    model.pw.bias = None
    res = fuse_checked(model, SHAPE, convs=1, norms=0)
    assert res.skipped == []


# ------------------------------------------------------------------------------------------------
# AvgPool that is not one conv


class AvgBranch(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv = conv_bn(C, C, 3, padding=1)
        self.pool = pool
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.conv(x) + self.bn(self.pool(x))


def test_avgpool_count_include_pad_false():
    res = fuse_checked(AvgBranch(nn.AvgPool2d(3, 1, 1, count_include_pad=False)), SHAPE, convs=1, norms=1,
                       dtype=F64)
    reason_for(res, "pool", "count_include_pad")
    assert isinstance(res.model.pool, nn.AvgPool2d)


def test_avgpool_divisor_override():
    res = fuse_checked(AvgBranch(nn.AvgPool2d(3, 1, 1, divisor_override=4)), SHAPE, convs=1, norms=1, dtype=F64)
    reason_for(res, "pool", "divisor_override")


class CeilPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = conv_bn(C, C, 1)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)  # 9×11 → 5×6 with ceil, 4×5 without
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.pool(self.pw(x)))


def test_avgpool_ceil_mode_changes_size():
    res = fuse_checked(CeilPool(), SHAPE, convs=1, norms=1, dtype=F64)
    reason_for(res, "pool", "ceil_mode")
    assert isinstance(res.model.pool, nn.AvgPool2d)


def test_avgpool_ceil_mode_without_effect_here_is_still_refused():
    """On 10×12 ceil_mode changes nothing, but on 9×11 it adds a window: a recorded shape is a witness,
    never a proof, so the pool is not fused (issue 8) and the deploy model is right at both sizes."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(C, C, 1, bias=False)
            self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)
            self.bn = nn.BatchNorm2d(C)

        def forward(self, x):
            return self.bn(self.pool(self.pw(x)))

    model = Model()
    res = fuse_checked(model, (2, C, 10, 12), convs=1, norms=1)
    reason_for(res, "pool", "ceil_mode")
    assert float64_rel_error(model, res.fused64, (3, C, 9, 11)) < EXACT


# ------------------------------------------------------------------------------------------------
# Padding modes


class MixedPaddingModes(nn.Module):
    def __init__(self):
        super().__init__()
        self.reflect = conv_bn(C, C, 3, padding=1, padding_mode="reflect")
        self.zeros = conv_bn(C, C, 3, padding=1)

    def forward(self, x):
        return self.reflect(x) + self.zeros(x)


def test_mixed_padding_modes():
    res = fuse_checked(MixedPaddingModes(), SHAPE, convs=2, norms=0, dtype=F64)
    reason_for(res, "add", "padding mode")
    modes = sorted(m.padding_mode for m in res.model.modules() if isinstance(m, CONVS))
    assert modes == ["reflect", "zeros"]


class ReflectAfterConv(nn.Module):
    """A reflect-padded 3×3 after a 3×3: reflecting the first conv's output ≠ one conv on reflected input."""

    def __init__(self):
        super().__init__()
        self.first = conv_bn(C, C, 3, padding=1)
        self.second = conv_bn(C, C, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return self.second(self.first(x))


def test_reflect_padding_after_a_window():
    res = fuse_checked(ReflectAfterConv(), SHAPE, convs=2, norms=0, dtype=F64)
    assert sorted(s.module for s in res.sites) == ["first", "second"]


def test_reflect_padding_after_a_window_reason():
    res = fuse_checked(ReflectAfterConv(), SHAPE, convs=2, norms=0, dtype=F64)
    reason_for(res, "second", "reflect")


# ------------------------------------------------------------------------------------------------
# A module called twice (shared weights)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(C)
        self.bn2 = nn.BatchNorm2d(C)

    def forward(self, x):
        y = F.relu(self.bn1(self.shared(x)))
        return self.bn2(self.shared(y))


def test_module_called_twice():
    res = fuse_checked(Shared(), SHAPE, convs=1, norms=2, dtype=F64)
    reasons = all_reasons(res)
    assert "more than once" in reasons and "shared" in reasons, reasons
    assert isinstance(res.model.shared, nn.Conv2d)
    assert count(res.model, BNS) == 2


class SharedBranch(nn.Module):
    """The same conv_bn summed twice: mathematically 2·op, but folding it would delete a shared layer."""

    def __init__(self):
        super().__init__()
        self.branch = conv_bn(C, C, 3, padding=1)
        self.one = conv_bn(C, C, 1)

    def forward(self, x):
        return F.relu(self.branch(x) + self.one(x)) + self.branch(x)


def test_shared_branch_in_a_sum():
    res = fuse_checked(SharedBranch(), SHAPE, convs=None, norms=None, dtype=F64)
    assert "more than once" in all_reasons(res), all_reasons(res)
