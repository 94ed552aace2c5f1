"""Layout-only ops (permute, transpose, flatten) between a per-channel affine and a layer (repfuse.layouts).

A BN, a layer scale or a norm's affine step folds into the conv or Linear on the other side of a layout op
when its channel axis, mapped through the layout op, is the layer's (the last axis for a Linear, axis 1 for
a conv); the layout op stays in the deploy graph, on its side of the fused layer. Where the axis does not
map, the affine is not folded, and the report says why. The deploy model never has more modules or more
multiply-adds than the original.
"""

from __future__ import annotations

import torch
from models_zoo import BNS, ToNCHW, ToNHWC, assert_adds_nothing, count, fuse_checked, skipped_reasons
from torch import nn

D = 8
SHAPE = (2, D, 5, 7)  # odd H ≠ W: a permute that maps the wrong axis cannot pass by accident






class LinearPermuteBN(nn.Module):
    """UniRepLKNet's pwconv2, written flat: Linear on channels-last, permute back, BN2d over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D, bias=False)
        self.bn = nn.BatchNorm2d(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.fc1(x.permute(0, 2, 3, 1)))
        return x + self.bn(self.fc2(y).permute(0, 3, 1, 2))


def test_bn_after_a_permute_folds_into_the_linear_before_it() -> None:
    model = LinearPermuteBN()
    res = fuse_checked(model, SHAPE, convs=0, norms=0, linears=2, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    site = next(s for s in res.sites if s.module.endswith("fused"))
    assert set(site.branches) == {"fc2", "bn"}
    assert "permute" in str(res.model.program)  # the permute stays, after the fused Linear


def test_the_upstream_sequential_form_folds_and_keeps_the_permute_module() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pwconv1 = nn.Sequential(ToNHWC(), nn.Linear(D, 2 * D))
            self.pwconv2 = nn.Sequential(nn.Linear(2 * D, D, bias=False), ToNCHW(), nn.BatchNorm2d(D))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.pwconv2(nn.functional.gelu(self.pwconv1(x)))

    for dtype in (torch.float64, torch.float16):  # fp16: the fused Linear is cast back, the permutes stay
        model = Block()
        res = fuse_checked(model, SHAPE, convs=0, norms=0, linears=2, dtype=dtype)
        assert_adds_nothing(model, res.model, SHAPE)
        assert sum(isinstance(m, ToNCHW) for m in res.model.modules()) == 1
        assert sum(isinstance(m, ToNHWC) for m in res.model.modules()) == 1
        assert {p.dtype for p in res.model.parameters()} == {dtype}


def test_bn_before_a_permute_folds_into_the_linear_after_it() -> None:
    class BNPermuteLinear(nn.Module):  # the mirror: the BN's channels are the Linear's input features
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(D)
            self.fc = nn.Linear(D, 3 * D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(torch.relu(x)).permute(0, 2, 3, 1))

    model = BNPermuteLinear()
    res = fuse_checked(model, SHAPE, convs=0, norms=0, linears=1, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    assert [set(s.branches) for s in res.sites] == [{"bn", "fc"}]


def test_a_channels_first_norm_affine_folds_through_the_permute() -> None:
    class LNAffinePermuteLinear(nn.Module):  # ConvNeXt / UniRepLKNet's channels-first LayerNorm, flat
        def __init__(self) -> None:
            super().__init__()
            self.ln_weight = nn.Parameter(torch.ones(D))
            self.ln_bias = nn.Parameter(torch.zeros(D))
            self.fc = nn.Linear(D, 2 * D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + 1e-6)
            x = self.ln_weight[:, None, None] * x + self.ln_bias[:, None, None]
            return self.fc(x.permute(0, 2, 3, 1))

    model = LNAffinePermuteLinear()
    res = fuse_checked(model, SHAPE, convs=0, norms=0, linears=1, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    keys = set(res.model.state_dict())
    assert "ln_weight" not in keys and "ln_bias" not in keys, keys


def test_transpose_and_flatten_map_the_channel_axis() -> None:
    class PatchTokens(nn.Module):  # conv stem → BN → act → BN → flatten(2).transpose(1, 2) → Linear
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(D, D, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(D)
            self.proj = nn.Linear(D, 2 * D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(self.bn(torch.relu(self.stem(x))).flatten(2).transpose(1, 2))

    model = PatchTokens()
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=1, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)


def test_a_last_axis_scale_after_a_transpose_folds_into_a_conv() -> None:
    class ConvTokens(nn.Module):  # Conv1d on [N, C, L], then tokens [N, L, C] with a layer scale and bias
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(D, D, 3, padding=1)
            self.gamma = nn.Parameter(torch.ones(D))
            self.beta = nn.Parameter(torch.zeros(D))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x).transpose(1, 2) * self.gamma + self.beta)

    model = ConvTokens()
    res = fuse_checked(model, (2, D, 9), convs=1, norms=0, linears=0, dtype=torch.float64)
    assert_adds_nothing(model, res.model, (2, D, 9))
    keys = set(res.model.state_dict())
    assert "gamma" not in keys and "beta" not in keys, keys


def test_a_bn_on_the_wrong_axis_after_the_permute_is_refused() -> None:
    class WrongAxis(nn.Module):  # permute(0, 2, 3, 1) of [N, H, W, C] puts W, not C, on axis 1
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.bn = nn.BatchNorm2d(D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x).permute(0, 2, 3, 1))

    model = WrongAxis()
    shape = (2, 3, D, D)  # [N, H, W, C] with W == C: the BN's channel count fits, its axis does not
    res = fuse_checked(model, shape, convs=0, norms=1, linears=1, dtype=torch.float64, keep=("bn", "fc"))
    assert_adds_nothing(model, res.model, shape)
    assert not res.sites
    reasons = skipped_reasons(res)
    assert any("acts on axis 1" in r and "axis 2" in r for r in reasons.values()), reasons


def test_a_flatten_that_merges_the_channel_axis_is_refused() -> None:
    class MergedChannels(nn.Module):  # BN2d → flatten(1): C·H·W features, no per-feature map of the BN
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(D)
            self.fc = nn.Linear(D * 3 * 3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(torch.relu(x)).flatten(1))

    model = MergedChannels()
    shape = (2, D, 3, 3)
    res = fuse_checked(model, shape, convs=0, norms=1, linears=1, dtype=torch.float64, keep=("bn", "fc"))
    assert_adds_nothing(model, res.model, shape)
    reasons = skipped_reasons(res)
    assert any("merges" in r for r in reasons.values()), reasons


def test_a_shift_before_a_permute_and_a_padded_conv_is_refused() -> None:
    class ShiftPaddedConv(nn.Module):  # [N, L, C] + bias → [N, C, L] → zero-padded Conv1d: not exact at the border
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.beta = nn.Parameter(torch.zeros(D))
            self.conv = nn.Conv1d(D, D, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.fc(x)) + self.beta
            return self.conv(y.transpose(1, 2))

    model = ShiftPaddedConv()
    shape = (2, 9, D)
    res = fuse_checked(model, shape, convs=1, norms=0, linears=1, dtype=torch.float64, keep=("conv",))
    assert_adds_nothing(model, res.model, shape)
    assert not res.sites and "beta" in res.model.state_dict()
    reasons = skipped_reasons(res)
    assert any("padded border" in r for r in reasons.values()), reasons


def test_a_shared_permute_module_stays_for_both_uses() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_nchw = ToNCHW()
            self.fc_a = nn.Linear(D, D)
            self.fc_b = nn.Linear(D, D)
            self.bn_a = nn.BatchNorm2d(D)
            self.bn_b = nn.BatchNorm2d(D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = x.permute(0, 2, 3, 1)
            return self.bn_a(self.to_nchw(self.fc_a(t))) * self.bn_b(self.to_nchw(self.fc_b(torch.relu(t))))

    model = Shared()
    res = fuse_checked(model, SHAPE, convs=0, norms=0, linears=2, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    assert count(res.model, BNS) == 0 and count(res.model, ToNCHW) == 1


def test_a_bn_folds_into_a_child_that_permutes_then_applies_a_linear() -> None:
    class Block(nn.Module):  # BN in the parent, the permute and the Linear in a child (UniRepLKNet's pwconv1)
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm2d(D)
            self.pwconv1 = nn.Sequential(ToNHWC(), nn.Linear(D, 2 * D))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pwconv1(self.norm(torch.relu(x))).permute(0, 3, 1, 2)

    model = Block()
    res = fuse_checked(model, SHAPE, convs=0, norms=0, linears=1, dtype=torch.float32)
    assert_adds_nothing(model, res.model, SHAPE)
    assert count(res.model, ToNHWC) == 1
    assert [set(s.branches) for s in res.sites] == [{"norm", "pwconv1.1"}]
