"""The engine end to end on train-time blocks written the many ways real projects write them.

Each block is defined here in the style of a public code base (RepVGG, MobileOne, YOLO RepConv, ACNet,
DBB, RepLKNet, UniRepLKNet, FastViT, RepViT, timm, torchvision ResNet), never through repfuse.samples.
Every case randomises all BN statistics, fuses with an odd input size and batch 2, and checks (see
models_zoo.fuse_checked): float64 exactness (< 1e-9 relative, twice), the number of conv / BN / linear
layers left in the deploy model, and that the state_dict entries of untouched layers are unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models_zoo import BNS, CONVS, count, fuse_checked, randomize
from torch import nn

from repfuse import api, rewrite, verify
from repfuse.types import Options

C = 4
SHAPE = (2, C, 9, 11)
SQUARE = (2, C, 13, 13)


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """body → global mean → Linear head (whose keys must survive fusion unchanged)."""

    def __init__(self, *body: nn.Module, channels: int = C, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.head(y.flatten(2).mean(-1))


# ------------------------------------------------------------------------------------------------
# RepVGG (DingXiaoH/RepVGG): conv_bn Sequential built with add_module, `id_out = 0`, SE after the sum


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1, dilation=1, bias=False):
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                        kernel_size=kernel_size, stride=stride, padding=padding,
                                        groups=groups, dilation=dilation, bias=bias))
    result.add_module("bn", nn.BatchNorm2d(num_features=out_channels))
    return result


class SEBlock(nn.Module):
    def __init__(self, input_channels, internal_neurons):
        super().__init__()
        self.down = nn.Conv2d(input_channels, internal_neurons, kernel_size=1, stride=1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, kernel_size=1, stride=1, bias=True)
        self.input_channels = input_channels

    def forward(self, inputs):
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = self.down(x)
        x = F.relu(x)
        x = self.up(x)
        x = torch.sigmoid(x)
        x = x.view(-1, self.input_channels, 1, 1)
        return inputs * x


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, groups=1, use_se=False):
        super().__init__()
        assert padding - kernel_size // 2 >= 0
        padding_11 = padding - kernel_size // 2
        self.nonlinearity = nn.ReLU()
        self.se = SEBlock(out_channels, internal_neurons=out_channels // 2) if use_se else nn.Identity()
        self.rbr_identity = (nn.BatchNorm2d(num_features=in_channels)
                             if out_channels == in_channels and stride == 1 else None)
        self.rbr_dense = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        self.rbr_1x1 = conv_bn(in_channels, out_channels, 1, stride, padding_11, groups=groups)

    def forward(self, inputs):
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


def test_repvgg_stack_with_stride_2_and_head():
    model = Net(RepVGGBlock(C, 8, stride=2), RepVGGBlock(8, 8), RepVGGBlock(8, 8, groups=2), channels=8)
    res = fuse_checked(model, SHAPE, convs=3, norms=0, linears=1, keep=["head"])
    assert [s.stride for s in res.sites] == [(2, 2), (1, 1), (1, 1)]
    assert [s.groups for s in res.sites] == [1, 1, 2]


def test_repvgg_se_after_the_sum_is_kept():
    model = Net(RepVGGBlock(C, C, use_se=True), RepVGGBlock(C, C, use_se=True))
    res = fuse_checked(model, SQUARE, convs=2 + 2 * 2, norms=0, keep=["head", "body.0.se", "body.1.se"])
    assert len(res.sites) == 2


# ------------------------------------------------------------------------------------------------
# k×k + 1×1 + identity, every combination of BN / bias / identity written as BN or as bare `x`


class ThreeBranch(nn.Module):
    def __init__(self, channels, k=3, bn=True, bias=False, identity="bn", groups=1):
        super().__init__()
        self.kxk = nn.Conv2d(channels, channels, k, 1, k // 2, groups=groups, bias=bias)
        self.one = nn.Conv2d(channels, channels, 1, 1, 0, groups=groups, bias=bias)
        self.bn_kxk = nn.BatchNorm2d(channels) if bn else nn.Identity()
        self.bn_one = nn.BatchNorm2d(channels) if bn else nn.Identity()
        self.identity = identity
        if identity == "bn":
            self.bn_id = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = self.bn_kxk(self.kxk(x)) + self.bn_one(self.one(x))
        if self.identity == "bn":
            y = y + self.bn_id(x)
        elif self.identity == "x":
            y = y + x
        return F.relu(y)


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("identity", ["bn", "x", None], ids=["id_bn", "id_x", "no_id"])
def test_kxk_1x1_identity_combinations(bn, bias, identity):
    model = Net(ThreeBranch(C, bn=bn, bias=bias, identity=identity), ThreeBranch(C, bn=bn, bias=bias,
                                                                                 identity=identity))
    res = fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"])
    assert len(res.sites) == 2
    assert all(s.kernel == (3, 3) for s in res.sites)


@pytest.mark.parametrize("groups", [2, C], ids=["groups2", "depthwise"])
@pytest.mark.parametrize("identity", ["bn", "x"])
def test_grouped_and_depthwise_identity(groups, identity):
    model = Net(ThreeBranch(C, groups=groups, identity=identity))
    res = fuse_checked(model, SHAPE, convs=1, norms=0, keep=["head"])
    assert res.sites[0].groups == groups


@pytest.mark.parametrize("k", [3, 5, 7, 13])
def test_odd_kernels(k):
    model = Net(ThreeBranch(C, k=k), ThreeBranch(C, k=k, identity="x"))
    res = fuse_checked(model, SQUARE, convs=2, norms=0, keep=["head"])
    assert all(s.kernel == (k, k) for s in res.sites)


# ------------------------------------------------------------------------------------------------
# MobileOne (apple/ml-mobileone): ModuleList of k×k branches summed in a loop with `out += ...`,
# `identity_out = 0` / `scale_out = 0` defaults, `0 + bn(x)` when there is no scale branch


class MobileOneBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
                 use_act=True, use_scale_branch=True, num_conv_branches=1):
        super().__init__()
        self.groups = groups
        self.stride = stride
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches
        self.se = nn.Identity()
        self.activation = nn.ReLU() if use_act else nn.Identity()
        self.rbr_skip = (nn.BatchNorm2d(num_features=in_channels)
                         if out_channels == in_channels and stride == 1 else None)
        rbr_conv = list()
        for _ in range(self.num_conv_branches):
            rbr_conv.append(self._conv_bn(kernel_size=kernel_size, padding=padding))
        self.rbr_conv = nn.ModuleList(rbr_conv)
        self.rbr_scale = None
        if kernel_size > 1 and use_scale_branch:
            self.rbr_scale = self._conv_bn(kernel_size=1, padding=0)

    def forward(self, x):
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))

    def _conv_bn(self, kernel_size, padding):
        mod_list = nn.Sequential()
        mod_list.add_module("conv", nn.Conv2d(in_channels=self.in_channels, out_channels=self.out_channels,
                                              kernel_size=kernel_size, stride=self.stride, padding=padding,
                                              groups=self.groups, bias=False))
        mod_list.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return mod_list


@pytest.mark.parametrize("branches", [1, 3])
def test_mobileone_dw_pw_pairs(branches):
    model = Net(
        MobileOneBlock(C, C, 3, stride=2, padding=1, groups=C, num_conv_branches=branches),  # dw, stride 2
        MobileOneBlock(C, 8, 1, num_conv_branches=branches),  # pw, no identity
        MobileOneBlock(8, 8, 3, padding=1, groups=8, num_conv_branches=branches),  # dw with identity
        MobileOneBlock(8, 8, 1, num_conv_branches=branches),  # pw: `0 + bn(x)` then `out += conv(x)`
        channels=8)
    res = fuse_checked(model, SHAPE, convs=4, norms=0, keep=["head"])
    assert [s.groups for s in res.sites] == [C, 1, 8, 1]
    assert [s.kernel for s in res.sites] == [(3, 3), (1, 1), (3, 3), (1, 1)]


# ------------------------------------------------------------------------------------------------
# YOLO RepConv (ultralytics): a Conv wrapper (conv, bn, act) with act=False → nn.Identity, the sum
# `conv1(x) + conv2(x) + id_out` with `id_out = 0 if self.bn is None else self.bn(x)`


def autopad(k, p=None, d=1):
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class RepConv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False):
        super().__init__()
        self.g = g
        self.c1 = c1
        self.c2 = c2
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()
        self.bn = nn.BatchNorm2d(num_features=c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=(p - k // 2), g=g, act=False)

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


@pytest.mark.parametrize("bn", [True, False], ids=["bn_identity", "no_identity"])
def test_yolo_repconv_with_conv_wrapper(bn):
    model = Net(Conv(C, 8, 3, 2, act=nn.ReLU()), RepConv(8, 8, bn=bn), RepConv(8, 8, g=2, bn=bn), channels=8)
    res = fuse_checked(model, SHAPE, convs=3, norms=0, keep=["head"])
    assert len(res.sites) == 3
    # the ReLU / SiLU activations stay in the deploy model
    assert count(res.model, nn.ReLU) == 1 and count(res.model, nn.SiLU) >= 1


def test_conv_bn_act_wrapper_act_kept():
    """conv+BN fuse inside a ConvBNAct whose act is ReLU; the ReLU stays (outputs are ≥ 0)."""
    model = Conv(C, 6, 3, 1, act=nn.ReLU())
    res = fuse_checked(model, SHAPE, convs=1, norms=0)
    assert count(res.model, nn.ReLU) == 1
    with torch.no_grad():
        assert float(res.model(torch.randn(SHAPE)).min()) >= 0.0


# ------------------------------------------------------------------------------------------------
# ACNet (DingXiaoH/ACNet): square + vertical (k×1) + horizontal (1×k) with asymmetric paddings,
# BN with affine=False, crop layers when padding < k // 2


class CropLayer(nn.Module):
    # E.g., (-1, 0) means this layer should crop the first and last rows of the feature map.
    def __init__(self, crop_set):
        super().__init__()
        self.rows_to_crop = -crop_set[0]
        self.cols_to_crop = -crop_set[1]
        assert self.rows_to_crop >= 0
        assert self.cols_to_crop >= 0

    def forward(self, input):
        if self.rows_to_crop == 0 and self.cols_to_crop == 0:
            return input
        elif self.rows_to_crop > 0 and self.cols_to_crop == 0:
            return input[:, :, self.rows_to_crop:-self.rows_to_crop, :]
        elif self.rows_to_crop == 0 and self.cols_to_crop > 0:
            return input[:, :, :, self.cols_to_crop:-self.cols_to_crop]
        else:
            return input[:, :, self.rows_to_crop:-self.rows_to_crop, self.cols_to_crop:-self.cols_to_crop]


class ACBlock(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, use_affine=True):
        super().__init__()
        self.square_conv = nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                     kernel_size=(kernel_size, kernel_size), stride=stride,
                                     padding=padding, groups=groups, bias=False)
        self.square_bn = nn.BatchNorm2d(num_features=out_channels, affine=use_affine)
        center_offset_from_origin_border = padding - kernel_size // 2
        ver_pad_or_crop = (padding, center_offset_from_origin_border)
        hor_pad_or_crop = (center_offset_from_origin_border, padding)
        if center_offset_from_origin_border >= 0:
            self.ver_conv_crop_layer = nn.Identity()
            ver_conv_padding = ver_pad_or_crop
            self.hor_conv_crop_layer = nn.Identity()
            hor_conv_padding = hor_pad_or_crop
        else:
            self.ver_conv_crop_layer = CropLayer(crop_set=ver_pad_or_crop)
            ver_conv_padding = (0, 0)
            self.hor_conv_crop_layer = CropLayer(crop_set=hor_pad_or_crop)
            hor_conv_padding = (0, 0)
        self.ver_conv = nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                  kernel_size=(kernel_size, 1), stride=stride, padding=ver_conv_padding,
                                  groups=groups, bias=False)
        self.hor_conv = nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                  kernel_size=(1, kernel_size), stride=stride, padding=hor_conv_padding,
                                  groups=groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(num_features=out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(num_features=out_channels, affine=use_affine)

    def forward(self, input):
        square_outputs = self.square_conv(input)
        square_outputs = self.square_bn(square_outputs)
        vertical_outputs = self.ver_conv_crop_layer(input)
        vertical_outputs = self.ver_conv(vertical_outputs)
        vertical_outputs = self.ver_bn(vertical_outputs)
        horizontal_outputs = self.hor_conv_crop_layer(input)
        horizontal_outputs = self.hor_conv(horizontal_outputs)
        horizontal_outputs = self.hor_bn(horizontal_outputs)
        result = square_outputs + vertical_outputs + horizontal_outputs
        return result


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_acnet_asymmetric_kernels(k, affine):
    model = Net(ACBlock(C, 8, k, stride=1, padding=k // 2, use_affine=affine), nn.ReLU(),
                ACBlock(8, 8, k, stride=2, padding=k // 2, groups=2, use_affine=affine), channels=8)
    res = fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"])
    assert all(s.kernel == (k, k) for s in res.sites)


def test_acnet_crop_layer_padding_0():
    model = Net(ACBlock(C, C, 3, stride=1, padding=0))
    fuse_checked(model, SHAPE, convs=1, norms=0, keep=["head"])


def test_acnet_crop_layer_padding_0_is_left_correct():
    model = Net(ACBlock(C, C, 3, stride=1, padding=0))
    fuse_checked(model, SHAPE, convs=None, norms=None, keep=["head"])


# ------------------------------------------------------------------------------------------------
# Sums written many ways; a sum in the parent's forward over two child branch modules


class Branch(nn.Module):
    def __init__(self, channels, k):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, k, padding=k // 2, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.norm(self.conv(x))


class SumForms(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = Branch(C, 3)
        self.b = Branch(C, 1)
        self.c = nn.BatchNorm2d(C)
        self.branches = nn.ModuleList([self.a, self.b, self.c])

    def forward(self, x):
        a, b, c = self.a, self.b, self.c
        if self.form == "a+b+c":
            return a(x) + b(x) + c(x)
        if self.form == "loop":
            out = 0
            for branch in self.branches:
                out += branch(x)
            return out
        if self.form == "loop_first":
            out = self.branches[0](x)
            for branch in self.branches[1:]:
                out = out + branch(x)
            return out
        if self.form == "id_out":
            id_out = 0
            if self.c is not None:
                id_out = c(x)
            return a(x) + b(x) + id_out
        if self.form == "torch.add":
            return torch.add(torch.add(a(x), b(x)), c(x))
        if self.form == "method":
            return a(x).add(b(x)).add(c(x))
        if self.form == "sum":
            return sum([a(x), b(x), c(x)])
        if self.form == "sum_generator":
            return sum(branch(x) for branch in self.branches)
        if self.form == "stack_sum":
            return torch.stack([a(x), b(x), c(x)]).sum(0)
        raise AssertionError(self.form)


SUM_FORMS = ["a+b+c", "loop", "loop_first", "id_out", "torch.add", "method", "sum", "sum_generator"]


@pytest.mark.parametrize("form", SUM_FORMS)
def test_sum_forms(form):
    model = Net(SumForms(form), nn.ReLU(), SumForms(form))
    res = fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"])
    assert [s.kernel for s in res.sites] == [(3, 3), (3, 3)]


def test_sum_form_stack():
    model = Net(SumForms("stack_sum"))
    fuse_checked(model, SHAPE, convs=1, norms=0, keep=["head"], dtype=torch.float64)


class ParentSum(nn.Module):
    """The sum lives in the parent's forward; the branches are child modules of a child."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, C, 1)
        self.left = Branch(C, 3)
        self.right = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C))
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.head((self.left(x) + self.right(x)).mean((2, 3)))


def test_sum_in_parent_forward():
    res = fuse_checked(ParentSum(), SHAPE, convs=2, norms=0, keep=["head", "stem"])
    assert sum(s.kernel == (3, 3) for s in res.sites) == 1


# ------------------------------------------------------------------------------------------------
# Plain conv→BN pairs: torchvision BasicBlock (inplace ReLU called twice, `out += identity`),
# a Sequential stem, BN before an unpadded conv


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        if self.inplace:  # torchvision
            out += identity
        else:
            out = out + identity
        out = self.relu(out)
        return out


def resnet_like(inplace):
    down = nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    return Net(nn.Conv2d(C, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace),
               BasicBlock(8, 8, inplace=inplace), BasicBlock(8, 16, 2, down, inplace=inplace),
               channels=16)


def test_resnet_basic_blocks():
    res = fuse_checked(resnet_like(inplace=False), SHAPE, convs=6, norms=0, keep=["head"])
    assert len(res.sites) == 6


def test_resnet_basic_blocks_torchvision_inplace():
    """`out += identity` and nn.ReLU(inplace=True) mutate, in the real forward, values analysis records."""
    res = fuse_checked(resnet_like(inplace=True), SHAPE, convs=6, norms=0, keep=["head"])
    assert len(res.sites) == 6


def test_bn_before_unpadded_conv_and_linear_bn1d():
    """BN → 1×1 conv is exact (no padding); Linear + BatchNorm1d on [N, C] fuse into one Linear."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.BatchNorm2d(C)
            self.pw = nn.Conv2d(C, 8, 1)
            self.fc1 = nn.Linear(8, 16)
            self.bn1 = nn.BatchNorm1d(16)
            self.fc2 = nn.Linear(16, 5, bias=False)
            self.bn2 = nn.BatchNorm1d(5)

        def forward(self, x):
            y = F.relu(self.pw(self.pre(x))).mean((2, 3))
            return self.bn2(self.fc2(F.relu(self.bn1(self.fc1(y)))))

    fuse_checked(Model(), SHAPE, convs=1, norms=0, linears=2)


def test_linear_bn1d_mlp():
    model = nn.Sequential(nn.BatchNorm1d(12), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(16, 4), nn.BatchNorm1d(4))
    res = fuse_checked(model, (2, 12), convs=0, norms=0, linears=2)
    assert len(res.sites) == 2


# ------------------------------------------------------------------------------------------------
# A top level that cannot be traced (data-dependent control flow): its blocks are still fused


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = RepVGGBlock(C, C)
        self.b2 = MobileOneBlock(C, C, 3, padding=1, num_conv_branches=2)
        self.head = nn.Linear(C, 3)

    def forward(self, x):
        y = self.b2(self.b1(x))
        if y.sum() > 0:  # data-dependent: torch.fx cannot trace this
            y = y * 0.5
        return self.head(y.mean((2, 3)))


def test_untraceable_top_level_blocks_still_fused():
    res = fuse_checked(Untraceable(), SHAPE, convs=2, norms=0, keep=["head"])
    assert "trace" in res.notes.get("", "")  # the root is reported as opaque, with the reason
    assert len(res.sites) == 2


# ------------------------------------------------------------------------------------------------
# Half precision models


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models(dtype):
    model = Net(RepVGGBlock(C, 8, stride=2), RepVGGBlock(8, 8, groups=2),
                MobileOneBlock(8, 8, 3, padding=1, groups=8, num_conv_branches=2), channels=8)
    res = fuse_checked(model, SHAPE, convs=3, norms=0, keep=["head"], dtype=dtype)
    tensors = list(res.model.parameters()) + list(res.model.buffers())
    assert tensors and all(t.dtype == dtype for t in tensors if t.is_floating_point())
    ver = verify.compare(model, res.model, res.input_shapes, atol=None, rtol=None, trials=2, seed=0,
                         fused64=res.fused64)
    assert ver.passed and ver.dtype == str(dtype).removeprefix("torch.")
    with torch.no_grad():
        assert res.model(torch.randn(SHAPE, dtype=dtype)).dtype == dtype


# ------------------------------------------------------------------------------------------------
# Conv1d and Conv3d


class RepBlockNd(nn.Module):
    def __init__(self, channels, nd, k=3):
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[nd]
        bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[nd]
        self.dense = nn.Sequential(conv(channels, channels, k, padding=k // 2, bias=False), bn(channels))
        self.pw = nn.Sequential(conv(channels, channels, 1, bias=False), bn(channels))
        self.skip = bn(channels)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.dense(x) + self.pw(x) + self.skip(x))


@pytest.mark.parametrize(("nd", "shape"), [(1, (2, C, 11)), (3, (2, C, 5, 7, 9))], ids=["conv1d", "conv3d"])
def test_conv1d_and_conv3d(nd, shape):
    model = Net(RepBlockNd(C, nd), RepBlockNd(C, nd, k=5))
    res = fuse_checked(model, shape, convs=2, norms=0, keep=["head"])
    assert [s.kernel for s in res.sites] == [(3,) * nd, (5,) * nd]


# ------------------------------------------------------------------------------------------------
# DBB (DingXiaoH/DiverseBranchBlock): avg-pool branches, 1×1→k×k chains, F.pad then BN


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1×1 conv initialised as identity: the kernel is weight + a fixed identity buffer."""

    def __init__(self, channels, groups=1):
        super().__init__(in_channels=channels, out_channels=channels, kernel_size=1, stride=1, padding=0,
                         groups=groups, bias=False)
        assert channels % groups == 0
        input_dim = channels // groups
        id_value = torch.zeros((channels, input_dim, 1, 1))
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.register_buffer("id_tensor", id_value)
        nn.init.normal_(self.weight, std=0.3)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device).type_as(self.weight)
        result = F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)
        return result


class DBBLike(nn.Module):
    """origin k×k-BN + 1×1-BN + avgpool(count_include_pad=True) [→ BN] + 1×1 (no bias) → F.pad → BN →
    unpadded k×k → BN + 1×1 (no bias) → padded k×k → BN."""

    def __init__(self, channels, k=3, avg_bn=True, identity_1x1=False, inplace=False):
        super().__init__()
        p = k // 2
        self.inplace = inplace
        self.k = k
        self.dbb_origin = conv_bn(channels, channels, k, 1, p)
        self.dbb_1x1 = conv_bn(channels, channels, 1, 1, 0)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=k, stride=1, padding=p, count_include_pad=True))
        if avg_bn:
            self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(channels))
        self.idconv1 = (IdentityBasedConv1x1(channels) if identity_1x1
                        else nn.Conv2d(channels, channels, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, k, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.chain = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                   nn.Conv2d(channels, channels, k, 1, p, bias=False), nn.BatchNorm2d(channels))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs):
        t = self.idconv1(inputs)
        t = self.bn1(F.pad(t, [self.k // 2] * 4))
        if self.inplace:  # as in DiverseBranchBlock.forward
            out = self.dbb_origin(inputs)
            out += self.dbb_1x1(inputs)
            out += self.dbb_avg(inputs)
            out += self.bn2(self.conv2(t))
            out += self.chain(inputs)
        else:
            out = self.dbb_origin(inputs) + self.dbb_1x1(inputs) + self.dbb_avg(inputs)
            out = out + self.bn2(self.conv2(t)) + self.chain(inputs)
        return self.nonlinear(out)


@pytest.mark.parametrize("avg_bn", [True, False], ids=["avg_bn", "avg_only"])
@pytest.mark.parametrize("identity_1x1", [False, True], ids=["conv1x1", "identity_based_1x1"])
def test_dbb_branches(avg_bn, identity_1x1):
    model = Net(DBBLike(C, avg_bn=avg_bn, identity_1x1=identity_1x1),
                DBBLike(C, k=5, avg_bn=avg_bn, identity_1x1=identity_1x1))
    res = fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"])
    assert [s.kernel for s in res.sites] == [(3, 3), (5, 5)]


def test_dbb_branches_inplace_sum():
    model = Net(DBBLike(C, inplace=True), DBBLike(C, k=5, inplace=True))
    fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"])


class BNAndPadLayer(nn.Module):
    """DBB's own BN-then-pad-with-the-BN-shift layer (in-place slice assignment)."""

    def __init__(self, pad_pixels, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.bn.affine:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                    self.bn.running_var + self.bn.eps)
            else:
                pad_values = - self.bn.running_mean / torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


class DBBFaithful(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.dbb_origin = conv_bn(channels, channels, 3, 1, 1)
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(channels))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=1, num_features=channels))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(channels, channels, 3, 1, 0, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(channels))

    def forward(self, inputs):
        return F.relu(self.dbb_origin(inputs) + self.dbb_1x1_kxk(inputs))


def test_dbb_bn_and_pad_layer_is_left_correct():
    """In-place slice assignment after F.pad: whatever the engine does, the numbers must hold."""
    # float64: a BN is left unfused here (see test_unfused_bn_keeps_model_dtype)
    fuse_checked(Net(DBBFaithful(C)), SHAPE, convs=None, norms=None, keep=["head"], dtype=torch.float64)


def test_dbb_bn_and_pad_layer_fuses():
    fuse_checked(Net(DBBFaithful(C)), SHAPE, convs=1, norms=0, keep=["head"], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# RepLKNet (large + small depthwise kernels, `out += small_conv(x)`), UniRepLKNet dilated branches


class ReparamLargeKernelConv(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, groups, small_kernel, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        padding = kernel_size // 2
        self.lkb_origin = conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        if small_kernel is not None:
            self.small_conv = conv_bn(in_channels, out_channels, small_kernel, stride, small_kernel // 2,
                                      groups=groups)

    def forward(self, inputs):
        if hasattr(self, "lkb_reparam"):
            out = self.lkb_reparam(inputs)
        else:
            out = self.lkb_origin(inputs)
            if hasattr(self, "small_conv") and self.inplace:  # as in RepLKNet
                out += self.small_conv(inputs)
            elif hasattr(self, "small_conv"):
                out = out + self.small_conv(inputs)
        return out


class RepLKBlock(nn.Module):
    def __init__(self, in_channels, dw_channels, block_lk_size, small_kernel, inplace=False, pre_bn=True):
        super().__init__()
        self.pw1 = nn.Sequential(conv_bn(in_channels, dw_channels, 1, 1, 0), nn.ReLU())
        self.pw2 = conv_bn(dw_channels, in_channels, 1, 1, 0)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, dw_channels, block_lk_size, stride=1,
                                                   groups=dw_channels, small_kernel=small_kernel,
                                                   inplace=inplace)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = nn.BatchNorm2d(in_channels) if pre_bn else nn.Identity()
        self.drop_path = nn.Identity()

    def forward(self, x):
        out = self.prelkb_bn(x)
        out = self.pw1(out)
        out = self.large_kernel(out)
        out = self.lk_nonlinear(out)
        out = self.pw2(out)
        return x + self.drop_path(out)


@pytest.mark.parametrize(("lk", "sk"), [(13, 5), (31, 5), (7, 3)])
def test_replknet_large_and_small_depthwise(lk, sk):
    # pw1 conv+BN, lk+sk (one depthwise conv), pw2 conv+BN (+ drop_path): three convs.
    res = fuse_checked(Net(RepLKBlock(C, 8, lk, sk, pre_bn=False)), SHAPE, convs=3, norms=0, keep=["head"])
    dw = [s for s in res.sites if s.groups == 8]
    assert len(dw) == 1 and dw[0].kernel == (lk, lk)


def test_replknet_inplace_sum():
    res = fuse_checked(Net(RepLKBlock(C, 8, 13, 5, inplace=True, pre_bn=False)), SHAPE, convs=3, norms=0,
                       keep=["head"])
    assert [s.kernel for s in res.sites if s.groups == 8] == [(13, 13)]


def test_replknet_prelkb_bn_folded_into_pw1():
    model = randomize(Net(RepLKBlock(C, 8, 13, 5, pre_bn=True)))
    res = api.fuse(model, Options(input_shapes=(SHAPE,)))
    assert count(res.model, BNS) == 0, res.model


class DilatedReparamBlock(nn.Module):
    """UniRepLKNet: a depthwise large kernel + parallel dilated small kernels, looked up by attribute name."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.lk_origin = nn.Conv2d(channels, channels, kernel_size, stride=1, padding=kernel_size // 2,
                                   dilation=1, groups=channels, bias=False)
        if kernel_size == 7:
            self.kernel_sizes = [5, 3, 3]
            self.dilates = [1, 2, 3]
        elif kernel_size == 5:
            self.kernel_sizes = [3, 3]
            self.dilates = [1, 2]
        else:
            raise ValueError(kernel_size)
        self.origin_bn = nn.BatchNorm2d(channels)
        for k, r in zip(self.kernel_sizes, self.dilates):
            self.__setattr__(f"dil_conv_k{k}_{r}",
                             nn.Conv2d(in_channels=channels, out_channels=channels, kernel_size=k, stride=1,
                                       padding=(r * (k - 1) + 1) // 2, dilation=r, groups=channels, bias=False))
            self.__setattr__(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.origin_bn(self.lk_origin(x))
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = self.__getattr__(f"dil_conv_k{k}_{r}")
            bn = self.__getattr__(f"dil_bn_k{k}_{r}")
            out = out + bn(conv(x))
        return out


@pytest.mark.parametrize("k", [5, 7])
def test_unireplknet_dilated_branches(k):
    res = fuse_checked(Net(DilatedReparamBlock(C, k)), SHAPE, convs=1, norms=0, keep=["head"])
    assert res.sites[0].kernel == (k, k) and res.sites[0].dilation == (1, 1)


class DilatedMix(nn.Module):
    """3×3 dilation 2 + 3×3 dilation 1 + 5×5 (all dense, with BN)."""

    def __init__(self, channels):
        super().__init__()
        self.d2 = conv_bn(channels, channels, 3, 1, 2, dilation=2)
        self.d1 = conv_bn(channels, channels, 3, 1, 1)
        self.k5 = conv_bn(channels, channels, 5, 1, 2)

    def forward(self, x):
        return self.d2(x) + self.d1(x) + self.k5(x)


def test_dilated_dense_branches():
    res = fuse_checked(Net(DilatedMix(C)), SHAPE, convs=1, norms=0, keep=["head"])
    assert res.sites[0].kernel == (5, 5)


def test_dilated_only_branches_keep_dilation():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(C, C, 3, 1, 2, dilation=2)
            self.b = conv_bn(C, C, 5, 1, 4, dilation=2)

        def forward(self, x):
            return self.a(x) + self.b(x) + x

    res = fuse_checked(Net(Model()), SHAPE, convs=1, norms=0, keep=["head"])
    assert res.sites[0].kernel == (5, 5) and res.sites[0].dilation == (2, 2)


# ------------------------------------------------------------------------------------------------
# FastViT RepMixer (layer scale, subtraction), RepViT (BN after the sum), `x + dwconv_bn(x)`


class RepMixer(nn.Module):
    def __init__(self, dim, kernel_size=3, use_layer_scale=True, layer_scale_init_value=1e-5):
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.norm = MobileOneBlock(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, use_act=False,
                                   use_scale_branch=False, num_conv_branches=0)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, use_act=False)
        self.use_layer_scale = use_layer_scale
        if use_layer_scale:
            self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x):
        if self.use_layer_scale:
            x = x + self.layer_scale * (self.mixer(x) - self.norm(x))
        else:
            x = x + self.mixer(x) - self.norm(x)
        return x


@pytest.mark.parametrize("layer_scale", [True, False], ids=["layer_scale", "no_layer_scale"])
def test_fastvit_repmixer(layer_scale):
    model = Net(RepMixer(C, use_layer_scale=layer_scale), nn.GELU(), RepMixer(C, 5, use_layer_scale=layer_scale))
    res = fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"])
    assert [s.groups for s in res.sites] == [C, C]
    assert not any("layer_scale" in k for k in res.model.state_dict())


class Conv2d_BN(nn.Sequential):
    def __init__(self, a, b, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)


class RepVGGDW(nn.Module):
    """RepViT: bn((dw3×3-BN(x) + dw1×1-with-bias(x)) + x)."""

    def __init__(self, ed):
        super().__init__()
        self.conv = Conv2d_BN(ed, ed, 3, 1, 1, groups=ed)
        self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
        self.dim = ed
        self.bn = nn.BatchNorm2d(ed)

    def forward(self, x):
        return self.bn((self.conv(x) + self.conv1(x)) + x)


class Residual(nn.Module):
    def __init__(self, m, drop=0.0):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x):
        if self.training and self.drop > 0:
            return x + self.m(x) * torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop)
        else:
            return x + self.m(x)


def test_repvit_bn_after_sum_and_residual_dwconv_bn():
    model = Net(RepVGGDW(C), nn.Hardswish(), Residual(Conv2d_BN(C, C, 5, 1, 2, groups=C)), nn.Hardswish(),
                Residual(Conv2d_BN(C, C, 1), drop=0.1))
    res = fuse_checked(model, SHAPE, convs=3, norms=0, keep=["head"])
    assert [s.kernel for s in res.sites] == [(3, 3), (5, 5), (1, 1)]


# ------------------------------------------------------------------------------------------------
# Negation and subtraction of branches


class Signs(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.a = conv_bn(C, C, 3, 1, 1)
        self.b = conv_bn(C, C, 1, 1, 0)
        self.c = nn.BatchNorm2d(C)

    def forward(self, x):
        a, b, c = self.a, self.b, self.c
        if self.form == "a-b":
            return a(x) - b(x) - c(x)
        if self.form == "-a+b":
            return -a(x) + b(x) + c(x)
        if self.form == "torch.sub":
            return torch.sub(a(x), b(x), alpha=2) + c(x)
        if self.form == "neg":
            return torch.neg(a(x)).sub(b(x)) - x
        if self.form == "scaled":
            return 0.5 * a(x) - b(x) / 4 + 2 * c(x)
        raise AssertionError(self.form)


@pytest.mark.parametrize("form", ["a-b", "-a+b", "torch.sub", "neg", "scaled"])
def test_negation_and_subtraction(form):
    res = fuse_checked(Net(Signs(form)), SHAPE, convs=1, norms=0, keep=["head"])
    assert res.sites[0].kernel == (3, 3)


# ------------------------------------------------------------------------------------------------
# timm BatchNormAct2d: a BatchNorm2d subclass whose forward also applies drop and act


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class BatchNormAct2dNoAssert(BatchNormAct2d):
    """Older timm: the same forward without the shape assertion."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or self.running_mean is None, 0.0 if self.momentum is None else self.momentum,
                         self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class ConvNormAct(nn.Module):
    def __init__(self, cin, cout, k, apply_act, norm=BatchNormAct2d, inplace=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = norm(cout, apply_act=apply_act, drop_layer=nn.Dropout, inplace=inplace)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_timm_batchnormact_identity_act_is_a_bn_without_assert():
    model = Net(ConvNormAct(C, 8, 3, apply_act=False, norm=BatchNormAct2dNoAssert), nn.ReLU(),
                ConvNormAct(8, 8, 1, apply_act=False, norm=BatchNormAct2dNoAssert), channels=8)
    fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"])


def test_timm_batchnormact_identity_act_is_a_bn():
    model = Net(ConvNormAct(C, 8, 3, apply_act=False), nn.ReLU(), ConvNormAct(8, 8, 1, apply_act=False),
                channels=8)
    fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"])


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace_relu", "relu"])
@pytest.mark.parametrize("norm", [BatchNormAct2d, BatchNormAct2dNoAssert], ids=["timm", "no_assert"])
def test_timm_batchnormact_relu_is_not_a_plain_bn(norm, inplace):
    model = ConvNormAct(C, 8, 3, apply_act=True, norm=norm, inplace=inplace)
    # float64: the BN may be left unfused (see test_unfused_bn_keeps_model_dtype)
    dtype = torch.float64
    res = fuse_checked(model, SHAPE, convs=None, norms=None, dtype=dtype)
    assert count(res.model, nn.ReLU) == 1
    with torch.no_grad():
        out = res.model(torch.randn(SHAPE, dtype=dtype))
    assert float(out.min()) >= 0.0 and float((out == 0).double().mean()) > 0.1  # the ReLU still acts


@pytest.mark.parametrize("norm", [BatchNormAct2d, BatchNormAct2dNoAssert], ids=["timm", "no_assert"])
def test_timm_batchnormact_relu_conv_bn_folded(norm):
    # with timm's torch._assert too: the stripped BatchNormAct2d must still be storable as a program
    model = ConvNormAct(C, 8, 3, apply_act=True, norm=norm, inplace=False)
    res = fuse_checked(model, SHAPE, convs=1, norms=0, dtype=torch.float64)
    assert count(res.model, nn.ReLU) == 1


# ------------------------------------------------------------------------------------------------
# dtype: layers left unfused keep the model's dtype


class KeepsBN(nn.Module):
    """Six BNs that cannot be fused (each follows a ReLU and feeds a tanh)."""

    def __init__(self, n=6):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bns = nn.ModuleList(nn.BatchNorm2d(C) for _ in range(n))

    def forward(self, x):
        x = self.conv(x)
        for bn in self.bns:
            x = torch.tanh(bn(F.relu(x)))
        return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unfused_bn_keeps_model_dtype(dtype):
    model = randomize(KeepsBN()).to(dtype)
    res = api.fuse(model, Options(input_shapes=(SHAPE,)))
    bad = {k: v.dtype for k, v in res.model.state_dict().items() if v.is_floating_point() and v.dtype != dtype}
    assert not bad, f"deploy tensors with the wrong dtype: {bad}"
    with torch.no_grad():
        assert res.model(torch.randn(SHAPE, dtype=dtype)).dtype == dtype


class DropPathResidual(nn.Module):
    """timm style: relu(x + drop_path(conv_bn(x))) with drop_path an nn.Identity in eval."""

    def __init__(self):
        super().__init__()
        self.drop_path = nn.Identity()
        self.mlp = conv_bn(C, C, 3, 1, 1)

    def forward(self, x):
        return F.relu(x + self.drop_path(self.mlp(x)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_region_layer_dtype(dtype):
    model = Net(DropPathResidual(), DropPathResidual())
    res = fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"], dtype=dtype)
    assert all(p.dtype == dtype for p in res.model.parameters())


def test_region_layer_dtype_float32():
    fuse_checked(Net(DropPathResidual(), DropPathResidual()), SHAPE, convs=2, norms=0, keep=["head"])


def test_verify_runs_the_deploy_model_for_float64_models():
    model = randomize(Net(RepVGGBlock(C, C))).double()
    res = api.fuse(model, Options(input_shapes=(SHAPE,)))
    broken = copy.deepcopy(res.model)
    with torch.no_grad():
        for m in broken.modules():
            if isinstance(m, CONVS):
                m.weight.zero_()
    ver = verify.compare(model, broken, res.input_shapes, atol=None, rtol=None, trials=2, seed=0,
                         fused64=res.fused64)
    assert not ver.passed


def test_unfused_bn_is_correct_in_float64():
    fuse_checked(KeepsBN(), SHAPE, convs=1, norms=6, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Padding modes: centre-aligned branches all merge into the padded conv's mode


class ReflectBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(C, C, 3, 1, 1, padding_mode="reflect", bias=False), nn.BatchNorm2d(C))
        self.k1 = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C))
        self.id = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.k3(x) + self.k1(x) + self.id(x)


def test_reflect_padding_centred_branches_fuse():
    res = fuse_checked(Net(ReflectBlock()), SHAPE, convs=1, norms=0, keep=["head"])
    fused = [m for m in res.model.modules() if isinstance(m, CONVS)]
    assert fused[0].padding_mode == "reflect"


# ------------------------------------------------------------------------------------------------
# The summary counters agree with isinstance counts


def test_count_layers_matches_isinstance_counts():
    model = Net(RepVGGBlock(C, C), RepVGGBlock(C, C))
    res = fuse_checked(model, SHAPE, convs=2, norms=0, keep=["head"])
    assert count(model, CONVS) == 4 and count(model, BNS) == 6
    assert rewrite.count_layers(model) == (5, 6)  # 4 convs + the Linear head
    assert rewrite.count_layers(res.model) == (3, 0)
