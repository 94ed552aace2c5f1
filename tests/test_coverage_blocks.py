"""Whole train-time blocks written the way popular projects write them: each must become exactly one
layer (float64 error < 1e-9, randomised BN statistics), with no stale `skipped[]` entry left behind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models_zoo import fuse_checked
from test_engine import BNAndPadLayer  # DBB's BN, then a pad ring filled with the BN's shift
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_bn(cin: int, cout: int, k: int, stride: int, pad: int, groups: int) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class DiverseBranch(nn.Module):
    """k×k-BN + 1×1-BN + (1×1 → BN-and-pad → avg-pool → BN) + (1×1 → BN-and-pad → k×k → BN), summed in place.

    The avg-pool branch alone is far costlier as one conv than its ops (a dense k×k from a 1×1 and a
    pool): only the block's sum pays, so cost must be judged on the block."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        p = k // 2
        self.dbb_origin = _conv_bn(cin, cout, k, stride, p, groups)
        if groups < cout:
            self.dbb_1x1 = _conv_bn(cin, cout, 1, stride, 0, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(p, cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, p))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        mid = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, mid, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(p, mid))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(mid, cout, k, stride, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))
        self.nonlinear = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(x)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(x)
        out += self.dbb_avg(x)
        out += self.dbb_1x1_kxk(x)
        return self.nonlinear(out)


class DBBNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = DiverseBranch(3, width, 3, stride=2)
        self.body = nn.Sequential(DiverseBranch(width, width), DiverseBranch(width, 2 * width, 3, stride=2),
                                  DiverseBranch(2 * width, 2 * width, 5))
        self.head = nn.Linear(2 * width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("width", [4, 32], ids=["narrow", "wide"])
def test_every_dbb_block_becomes_one_conv(width: int) -> None:
    """Wide channels make each branch's own conv 7–20× costlier than its ops; each block still fuses."""
    model = DBBNet(width)
    res = fuse_checked(model, (2, 3, 31, 29), convs=4, norms=0, dtype=torch.float64, keep=["head"])
    sites = sorted(res.sites, key=lambda s: s.module)  # each block: ReLU(one conv), the conv a new layer in it
    assert [s.module.rpartition(".")[0] for s in sites] == ["body.0", "body.1", "body.2", "stem"]
    assert [s.kernel for s in sites] == [(3, 3), (3, 3), (5, 5), (3, 3)]
    assert res.skipped == [], res.skipped  # nothing stale from the branches analysed on their own


def test_dbb_depthwise_block_becomes_one_conv() -> None:
    model = nn.Sequential(DiverseBranch(16, 16, 3, groups=16), nn.Flatten())
    res = fuse_checked(model, (2, 16, 12, 12), convs=1, norms=0, dtype=torch.float64)
    assert [s.groups for s in res.sites] == [16]


def test_depthwise_then_pointwise_stays_two_layers() -> None:
    """A dense kernel from depthwise → pointwise would cost k² times more: never written."""
    c = 64
    model = nn.Sequential(nn.Conv2d(c, c, 7, padding=3, groups=c), nn.BatchNorm2d(c), nn.Conv2d(c, 4 * c, 1),
                          nn.ReLU())
    res = fuse_checked(model, (1, c, 16, 16), convs=2, norms=0)
    assert all(s.kernel == (1, 1) or s.groups == c for s in res.sites), res.sites


# ------------------------------------------------------------------------------------------------
# Online re-parameterization (OREPA-style): the kernel is computed in forward from parameters


class OnlineKernelConv(nn.Module):
    """One conv whose kernel is built on every forward from several parameter tensors: a scaled k×k, a
    1×1 → k×k product (grouped with shapes read from the parameters), a 1×1 widened to k×k and a
    fixed identity buffer; then BN. Reads `.size()`, `.shape` and `int(...)` of parameter tensors."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.k, self.stride, self.groups = k, stride, groups
        self.w_origin = nn.Parameter(torch.randn(cout, cin // groups, k, k) * 0.2)
        self.w_pw = nn.Parameter(torch.randn(cin, cin // groups, 1, 1) * 0.3)
        self.w_kxk = nn.Parameter(torch.randn(cout, cin // groups, k, k) * 0.2)
        self.w_1x1 = nn.Parameter(torch.randn(cout, cin // groups, 1, 1) * 0.3)
        self.vector = nn.Parameter(torch.rand(3, cout) + 0.5)
        eye = torch.zeros(cin, cin // groups, 1, 1)
        for i in range(cin):
            eye[i, i % (cin // groups), 0, 0] = 1
        self.register_buffer("eye", eye)
        self.bn = nn.BatchNorm2d(cout)

    def kernel(self) -> torch.Tensor:
        origin = torch.einsum("oihw,o->oihw", self.w_origin, self.vector[0, :])
        pw = (self.w_pw + self.eye).squeeze(3).squeeze(2)
        t, ig = pw.size()
        o, tg, h, w = self.w_kxk.shape
        g = self.groups
        chained = torch.einsum("gti,gothw->goihw", pw.view(g, int(t / g), ig),
                               self.w_kxk.view(g, int(o / g), tg, h, w)).reshape(o, ig, h, w)
        chained = chained * self.vector[1, :].view(-1, 1, 1, 1)
        pad = (self.k - 1) // 2
        wide = F.pad(self.w_1x1, [pad, pad, pad, pad]) * self.vector[2, :].view(-1, 1, 1, 1)
        return origin + chained + wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.kernel(), None, self.stride, self.k // 2, 1, self.groups)
        return F.relu(self.bn(out))


@pytest.mark.parametrize("groups", [1, 2])
def test_kernel_computed_in_forward_becomes_a_constant(groups: int) -> None:
    model = nn.Sequential(OnlineKernelConv(8, 16, 3, stride=2, groups=groups), OnlineKernelConv(16, 16, 5),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    res = fuse_checked(model, (2, 8, 17, 15), convs=2, norms=0, dtype=torch.float64)
    assert res.notes == {} and res.skipped == [], (res.notes, res.skipped)
    assert [s.groups for s in res.sites] == [groups, 1]


def test_a_branch_on_an_input_value_still_stops_the_trace() -> None:
    """Only what depends on parameters alone is evaluated while tracing; `if x.sum() > 0` is not."""

    class InputBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.bn(self.conv(x))
            return x

    res = fuse_checked(nn.Sequential(InputBranch(), nn.Flatten()), (2, 4, 8, 8), convs=None, norms=None)
    assert "0" in res.notes and "trace" in res.notes["0"], res.notes


# ------------------------------------------------------------------------------------------------
# What is left says why; the summary counts convs, linears and norms apart


class NormAfterPool(nn.Module):
    """A BN between a max-pool and an activation, and one inside an attention-like product: no conv or
    linear it can fold into."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.gate_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.pool(F.relu(self.conv(x)))))
        y = torch.sigmoid(self.gate_bn(y * y)) * self.mix(y)
        return self.head(y.mean((2, 3)))


def test_every_norm_left_has_a_skipped_entry_and_counts_are_apart() -> None:
    from repfuse import api

    model = NormAfterPool()
    res = fuse_checked(model, (2, 3, 12, 12), convs=2, norms=2, linears=1)
    reasons = {s.module: s.reason for s in res.skipped}
    assert "bn" in reasons and "gate_bn" in reasons, reasons
    assert all("BatchNorm2d left" in reasons[k] for k in ("bn", "gate_bn")), reasons
    report = api._summary(model, res.model, res.sites, res.input_shapes, 0)
    assert (report.convs_before, report.convs_after) == (2, 2)
    assert (report.linears_before, report.linears_after) == (1, 1)
    assert (report.norms_before, report.norms_after) == (3, 2)


# ------------------------------------------------------------------------------------------------
# Ways real projects write the code around their blocks


class RepBlockDropPath(nn.Module):
    """timm's RepVggBlock: the identity BN computed first, the conv sum through a drop-path (nn.Identity
    at inference), then added in place."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv_kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.conv_1x1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x = self.drop_path(x)
        x += identity
        return self.act(x)


class Staged(nn.Module):
    """A parent that looks its norms up by name (`getattr(self, f"norm{i}")`) and only calls them."""

    def __init__(self, c: int, with_norms: bool) -> None:
        super().__init__()
        self.stages = nn.ModuleList([RepBlockDropPath(c), RepBlockDropPath(c)])
        self.with_norms = with_norms
        for i in range(2):
            self.add_module(f"norm{i}", nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.isfinite(x).all()):  # data-dependent: this forward stays Python (not traced)
            raise ValueError("non-finite input")
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.with_norms:
                norm = getattr(self, f"norm{i}")
                outs.append(norm(x))
        return torch.cat(outs, 1) if outs else x


def test_in_place_add_through_an_identity_module_fuses() -> None:
    res = fuse_checked(nn.Sequential(RepBlockDropPath(8), RepBlockDropPath(8)), (2, 8, 9, 9), convs=2, norms=0,
                       dtype=torch.float64)
    assert res.skipped == []


@pytest.mark.parametrize("with_norms", [False, True])
def test_children_named_by_a_dynamic_getattr_and_only_called_still_fuse(with_norms: bool) -> None:
    res = fuse_checked(Staged(8, with_norms), (2, 8, 9, 9), convs=2, norms=2, dtype=torch.float64)
    assert len(res.sites) == 2 and "" in res.notes  # the root was not traced: its Python runs as it is


def test_a_dynamic_getattr_whose_result_is_read_freezes_the_model() -> None:
    class Reads(Staged):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not bool(torch.isfinite(x).all()):
                raise ValueError("non-finite input")
            for i, stage in enumerate(self.stages):
                x = stage(x)
                norm = getattr(self, f"norm{i}")
                x = x * norm.weight.view(1, -1, 1, 1)
            return x

    res = fuse_checked(Reads(8, True), (2, 8, 9, 9), convs=4, norms=None, dtype=torch.float64)
    assert res.sites == []


class PositionalCast(nn.Module):
    """A constant cast to the activation's dtype (`.to(dtype=x.dtype)`), then conv + BN: the fused layer
    keeps the model's float32 (under float64 analysis `x.dtype` reads float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pos = torch.linspace(0, 1, 8)  # a plain tensor attribute (not a buffer), as position tables often are

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos.to(device=x.device, dtype=x.dtype)
        return self.bn(self.conv(x + pos))


def test_casts_to_the_activation_dtype_keep_the_model_dtype() -> None:
    res = fuse_checked(PositionalCast(), (2, 4, 8, 8), convs=1, norms=0)
    assert {p.dtype for p in res.model.parameters()} == {torch.float32}
    with torch.no_grad():
        res.model(torch.randn(1, 4, 8, 8))


class SharedDropMlp(nn.Module):
    """timm's ConvMlp: one Dropout module called after fc1 (4C channels) and after fc2 (C channels)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, 4 * c, 1)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Conv2d(4 * c, c, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.bn(self.drop(self.fc2(x)))


def test_a_child_called_again_on_other_channels_is_not_a_channel_mismatch() -> None:
    res = fuse_checked(nn.Sequential(SharedDropMlp(8), nn.Flatten()), (2, 8, 5, 5), convs=2, norms=None,
                       dtype=torch.float64)
    assert not any("channel mismatch" in s.reason for s in res.skipped), res.skipped
