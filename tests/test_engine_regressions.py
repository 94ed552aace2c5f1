"""Shapes of real models that once broke the rewrite (each found on a timm family)."""

from __future__ import annotations

import torch
from models_zoo import fuse_checked
from torch import nn

C = 8


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class GhostModule(nn.Module):
    """RepGhost: a 1×1 primary conv, then a depthwise 3×3 plus re-parameterizable 1×1 branches on it."""

    def __init__(self, cin: int, cout: int, relu: bool) -> None:
        super().__init__()
        self.primary_conv = conv_bn(cin, cout, 1, act=relu)
        self.cheap_operation = conv_bn(cout, cout, 3, groups=cout)
        self.fusion_conv = nn.ModuleList([nn.Conv2d(cout, cout, 1, groups=cout, bias=False)])
        self.fusion_bn = nn.ModuleList([nn.BatchNorm2d(cout)])
        self.relu = nn.ReLU(inplace=False) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            x2 = x2 + bn(conv(x1))
        return self.relu(x2)


class GhostBottleneck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ghost1 = GhostModule(C, 2 * C, relu=True)
        self.conv_dw = nn.Conv2d(2 * C, 2 * C, 3, 2, 1, groups=2 * C, bias=False)
        self.bn_dw = nn.BatchNorm2d(2 * C)
        self.ghost2 = GhostModule(2 * C, C, relu=False)
        self.shortcut = conv_bn(C, C, 3, stride=2, groups=C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ghost2(self.bn_dw(self.conv_dw(self.ghost1(x))))
        return y + self.shortcut(x)


def test_ghost_bottleneck_prefix_then_region_on_the_prefix_output() -> None:
    # ghost2's 1×1 primary conv is folded into conv_dw/bn_dw of the parent (its prefix), while ghost2's
    # own region (depthwise 3×3 + 1×1 branches) starts right at that prefix's output
    res = fuse_checked(GhostBottleneck(), (2, C, 9, 11), norms=0)
    assert len(res.sites) >= 3
