"""Small train-time reference architectures for the bundled samples, tests and benchmarks.

Each block is written the way its popular public implementation writes it (attribute names,
helper functions, forward-pass style), so that repfuse is tested on the shapes of code it meets
in the wild, not on one uniform style:

- `RepVGGBlock` / `RepVGG`: DingXiaoH/RepVGG (``rbr_dense``, ``rbr_1x1``, ``rbr_identity``).
- `MobileOneBlock` / `MobileOne`: apple/ml-mobileone (``rbr_skip``, ``rbr_scale``,
  ``rbr_conv`` ModuleList, in-place ``out +=``).
- `ACBlock` / `ACNet`: DingXiaoH/ACNet (``square_conv``/``ver_conv``/``hor_conv`` + BNs).

The engine never imports this module. Every network here is plain eager PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "SAMPLE_INPUT_SHAPE",
    "ACBlock",
    "ACNet",
    "MobileOne",
    "MobileOneBlock",
    "RepVGG",
    "RepVGGBlock",
    "acnet_tiny",
    "conv_bn",
    "mobileone_tiny",
    "randomize_bn",
    "repvgg_a0_like",
    "repvgg_tiny",
]

SAMPLE_INPUT_SHAPE: tuple[int, int, int, int] = (1, 3, 32, 32)


# ============================================================================================
# RepVGG (style of DingXiaoH/RepVGG, repvgg.py)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
            groups: int = 1) -> nn.Sequential:
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                        kernel_size=kernel_size, stride=stride, padding=padding,
                                        groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(num_features=out_channels))
    return result


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, padding_mode: str = "zeros",
                 use_se: bool = False) -> None:
        super().__init__()
        self.groups = groups
        self.in_channels = in_channels

        if kernel_size != 3 or padding != 1:  # the reference asserts this
            raise ValueError("RepVGGBlock needs kernel_size=3, padding=1")

        padding_11 = padding - kernel_size // 2

        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()  # the reference uses an SEBlock when use_se; not needed here

        self.rbr_identity = nn.BatchNorm2d(num_features=in_channels) \
            if out_channels == in_channels and stride == 1 else None
        self.rbr_dense = conv_bn(in_channels=in_channels, out_channels=out_channels,
                                 kernel_size=kernel_size, stride=stride, padding=padding, groups=groups)
        self.rbr_1x1 = conv_bn(in_channels=in_channels, out_channels=out_channels, kernel_size=1,
                               stride=stride, padding=padding_11, groups=groups)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)

        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class RepVGG(nn.Module):
    def __init__(self, num_blocks: Sequence[int], num_classes: int = 1000,
                 width_multiplier: Sequence[float] = (0.75, 0.75, 0.75, 2.5),
                 override_groups_map: dict[int, int] | None = None) -> None:
        super().__init__()
        if len(width_multiplier) != 4:
            raise ValueError("width_multiplier needs 4 values")
        self.override_groups_map = dict(override_groups_map or {})
        if 0 in self.override_groups_map:
            raise ValueError("override_groups_map cannot set the stem (layer 0)")

        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(in_channels=3, out_channels=self.in_planes, kernel_size=3,
                                  stride=2, padding=1)
        self.cur_layer_idx = 1
        self.stage1 = self._make_stage(int(64 * width_multiplier[0]), num_blocks[0], stride=2)
        self.stage2 = self._make_stage(int(128 * width_multiplier[1]), num_blocks[1], stride=2)
        self.stage3 = self._make_stage(int(256 * width_multiplier[2]), num_blocks[2], stride=2)
        self.stage4 = self._make_stage(int(512 * width_multiplier[3]), num_blocks[3], stride=2)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(int(512 * width_multiplier[3]), num_classes)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        blocks = []
        for stride in strides:
            cur_groups = self.override_groups_map.get(self.cur_layer_idx, 1)
            blocks.append(RepVGGBlock(in_channels=self.in_planes, out_channels=planes, kernel_size=3,
                                      stride=stride, padding=1, groups=cur_groups))
            self.in_planes = planes
            self.cur_layer_idx += 1
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage0(x)
        out = self.stage1(out)
        out = self.stage2(out)
        out = self.stage3(out)
        out = self.stage4(out)
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def repvgg_tiny(num_classes: int = 10) -> RepVGG:
    """Six RepVGG blocks, widths 16/16/32/64/128; groups=2 on a stride-2 block and on two
    identity blocks (grouped identity kernels). Fine on 3×32×32 inputs."""
    return RepVGG(num_blocks=[1, 2, 2, 1], num_classes=num_classes,
                  width_multiplier=[0.25, 0.25, 0.25, 0.25],
                  override_groups_map={2: 2, 3: 2, 5: 2})


def repvgg_a0_like(num_classes: int = 1000, groups: int = 1) -> RepVGG:
    """RepVGG-A0 layout: 22 blocks (1 + [2, 4, 14, 1]), widths 48/48/96/192/1280, ~9.1M train-time
    parameters. `groups` > 1 applies g2/g4-style groups on the even layers, as RepVGG-B*g2 do."""
    g_map = {layer: groups for layer in range(2, 27, 2)} if groups > 1 else None
    return RepVGG(num_blocks=[2, 4, 14, 1], num_classes=num_classes,
                  width_multiplier=[0.75, 0.75, 0.75, 2.5], override_groups_map=g_map)


# ============================================================================================
# MobileOne (style of apple/ml-mobileone, mobileone.py)


class MobileOneBlock(nn.Module):
    """MobileOne building block: k over-parameterized conv-BN branches, a 1×1 scale branch and
    a BN skip branch, summed, then (SE and) activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, inference_mode: bool = False,
                 use_se: bool = False, num_conv_branches: int = 1) -> None:
        super().__init__()
        self.inference_mode = inference_mode
        self.groups = groups
        self.stride = stride
        self.kernel_size = kernel_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_conv_branches = num_conv_branches

        # Check if SE-ReLU is requested (not used by the samples)
        self.se = nn.Identity()
        self.activation = nn.ReLU()

        # Re-parameterizable skip connection
        self.rbr_skip = nn.BatchNorm2d(num_features=in_channels) \
            if out_channels == in_channels and stride == 1 else None

        # Re-parameterizable conv branches
        rbr_conv = []
        for _ in range(self.num_conv_branches):
            rbr_conv.append(self._conv_bn(kernel_size=kernel_size, padding=padding))
        self.rbr_conv = nn.ModuleList(rbr_conv)

        # Re-parameterizable scale branch
        self.rbr_scale = None
        if kernel_size > 1:
            self.rbr_scale = self._conv_bn(kernel_size=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Multi-branched train-time forward pass.
        # Skip branch output
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)

        # Scale branch output
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)

        # Other branches
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)

        return self.activation(self.se(out))

    def _conv_bn(self, kernel_size: int, padding: int) -> nn.Sequential:
        mod_list = nn.Sequential()
        mod_list.add_module("conv", nn.Conv2d(in_channels=self.in_channels,
                                              out_channels=self.out_channels,
                                              kernel_size=kernel_size, stride=self.stride,
                                              padding=padding, groups=self.groups, bias=False))
        mod_list.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return mod_list


class MobileOne(nn.Module):
    """MobileOne-style net: a stride-2 stem, then stages of depthwise 3×3 + pointwise 1×1 blocks."""

    def __init__(self, num_blocks_per_stage: Sequence[int] = (1, 1), num_classes: int = 10,
                 widths: Sequence[int] = (16, 32), strides: Sequence[int] = (1, 2),
                 stem_width: int = 16, num_conv_branches: int = 3) -> None:
        super().__init__()
        self.num_conv_branches = num_conv_branches
        self.in_planes = stem_width
        self.stage0 = MobileOneBlock(in_channels=3, out_channels=self.in_planes, kernel_size=3,
                                     stride=2, padding=1)
        stages = []
        for planes, num_blocks, stride in zip(widths, num_blocks_per_stage, strides, strict=True):
            stages.append(self._make_stage(planes, num_blocks, stride))
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(widths[-1], num_classes)

    def _make_stage(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        blocks = []
        for stride in strides:
            # Depthwise conv
            blocks.append(MobileOneBlock(in_channels=self.in_planes, out_channels=self.in_planes,
                                         kernel_size=3, stride=stride, padding=1,
                                         groups=self.in_planes,
                                         num_conv_branches=self.num_conv_branches))
            # Pointwise conv
            blocks.append(MobileOneBlock(in_channels=self.in_planes, out_channels=planes,
                                         kernel_size=1, stride=1, padding=0, groups=1,
                                         num_conv_branches=self.num_conv_branches))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage0(x)
        x = self.stages(x)
        x = self.gap(x)
        x = x.view(x.size(0), -1)
        x = self.linear(x)
        return x


def mobileone_tiny(num_classes: int = 10) -> MobileOne:
    """Stem 3→16 (stride 2), stage 1 at 16 channels (depthwise + pointwise, both with skip BN),
    stage 2 at 32 channels with a stride-2 depthwise block; 3 conv branches per block."""
    return MobileOne(num_blocks_per_stage=(1, 1), num_classes=num_classes, widths=(16, 32),
                     strides=(1, 2), stem_width=16, num_conv_branches=3)


# ============================================================================================
# ACNet (style of DingXiaoH/ACNet, acnet/acb.py)


class ACBlock(nn.Module):
    """Asymmetric convolution block: k×k + k×1 + 1×k convs, each followed by its own BN, summed."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, padding_mode: str = "zeros",
                 use_affine: bool = True) -> None:
        super().__init__()
        self.square_conv = nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                     kernel_size=(kernel_size, kernel_size), stride=stride,
                                     padding=padding, dilation=dilation, groups=groups, bias=False,
                                     padding_mode=padding_mode)
        self.square_bn = nn.BatchNorm2d(num_features=out_channels, affine=use_affine)

        if padding - kernel_size // 2 >= 0:
            #   Common use case. E.g., k=3, p=1 or k=5, p=2
            self.crop = 0
            #   Compared to the KxK layer, the padding of the 1xK layer and Kx1 layer should be
            #   adjusted to align the sliding windows (Fig 2 in the paper)
            hor_padding = [padding - kernel_size // 2, padding]
            ver_padding = [padding, padding - kernel_size // 2]
        else:
            #   A negative "padding" (padding - kernel_size//2 < 0, which is not a common use case)
            #   is cropping. Since nn.Conv2d does not support negative padding, crop manually.
            self.crop = kernel_size // 2 - padding
            hor_padding = [0, 0]
            ver_padding = [0, 0]

        self.ver_conv = nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                  kernel_size=(kernel_size, 1), stride=stride, padding=ver_padding,
                                  dilation=dilation, groups=groups, bias=False,
                                  padding_mode=padding_mode)
        self.hor_conv = nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                  kernel_size=(1, kernel_size), stride=stride, padding=hor_padding,
                                  dilation=dilation, groups=groups, bias=False,
                                  padding_mode=padding_mode)
        self.ver_bn = nn.BatchNorm2d(num_features=out_channels, affine=use_affine)
        self.hor_bn = nn.BatchNorm2d(num_features=out_channels, affine=use_affine)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        square_outputs = self.square_conv(input)
        square_outputs = self.square_bn(square_outputs)
        if self.crop > 0:
            ver_input = input[:, :, :, self.crop:-self.crop]
            hor_input = input[:, :, self.crop:-self.crop, :]
        else:
            ver_input = input
            hor_input = input
        vertical_outputs = self.ver_conv(ver_input)
        vertical_outputs = self.ver_bn(vertical_outputs)
        horizontal_outputs = self.hor_conv(hor_input)
        horizontal_outputs = self.hor_bn(horizontal_outputs)
        result = torch.add(square_outputs, vertical_outputs) + horizontal_outputs
        return result


class ACNet(nn.Module):
    """A small ACNet-style classifier: ACBlocks, each followed by nn.ReLU, then pool + Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ACBlock(3, 16, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            ACBlock(16, 32, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            ACBlock(32, 32, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            ACBlock(32, 32, kernel_size=3, stride=1, padding=1, groups=4, use_affine=False),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def acnet_tiny(num_classes: int = 10) -> ACNet:
    """Four ACBlocks: 3×3, 3×3 stride 2, 5×5, and a grouped 3×3 with affine-free BNs."""
    return ACNet(num_classes=num_classes)


# ============================================================================================
# helpers


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (in place; returns model).

    running_var in [0.5, 2], running_mean in [-0.5, 0.5], weight ±[0.5, 1.5], bias in
    [-0.5, 0.5]. Default statistics (γ=1, β=0, μ=0, σ²=1) would hide a wrong fusion.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=gen, dtype=torch.float64) * (high - low) + low

    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        n = module.num_features
        if module.running_mean is not None and module.running_var is not None:
            module.running_mean.copy_(uniform(n, -0.5, 0.5))
            module.running_var.copy_(uniform(n, 0.5, 2.0))
        if module.weight is not None and module.bias is not None:
            sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
            module.weight.copy_(sign * uniform(n, 0.5, 1.5))
            module.bias.copy_(uniform(n, -0.5, 0.5))
    return model
