"""Last-axis (nn.Linear) chains on tokens [B, N, C] as transformers write them (LeViT, RepMLP)."""

from __future__ import annotations

import torch
from models_zoo import fuse_checked
from torch import nn

C, N = 8, 7


class LinearNorm(nn.Module):
    """LeViT: Linear on [B, N, C], BatchNorm1d over the flattened tokens, shape restored."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = LinearNorm(C, 2 * C)
        self.act = nn.Hardswish()
        self.drop = nn.Dropout(0.1)
        self.ln2 = LinearNorm(2 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ln2(self.drop(self.act(self.ln1(x))))


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Mlp(), Mlp())
        self.head_bn = nn.BatchNorm1d(C)
        self.head = nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x).mean(1)
        return self.head(self.head_bn(x))


def test_levit_linear_norm_on_tokens() -> None:
    # every LinearNorm → one Linear; the head's BN (on [B, C]) folds into the head Linear
    res = fuse_checked(Tokens(), (2, N, C), convs=0, norms=0, linears=5)
    assert any("linear" in s.pattern for s in res.sites)


def test_linear_residual_on_tokens() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(C, C)
            self.bn = nn.BatchNorm1d(C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, N, C]
            y = self.bn(self.fc(x).flatten(0, 1)).view_as(x)
            return torch.relu(x + y)

    fuse_checked(Residual(), (3, N, C), convs=0, norms=0, linears=1)


def test_batchnorm1d_on_channel_axis_is_not_a_last_axis_op() -> None:
    # BatchNorm1d on [N, C, L] normalises axis 1; a Linear on the same tensor acts on axis 2 (L):
    # they must not be fused into one Linear.
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(C)
            self.fc = nn.Linear(N, N)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, N]
            return self.fc(self.bn(x))

    fuse_checked(Mixed(), (2, C, N), convs=0, norms=1, linears=1)


def test_crop_then_conv_merges_with_an_unpadded_square_branch() -> None:
    # ACNet's crop path written with plain slicing: x[:, :, 1:-1, :] → 1×3 conv, summed with a 3×3 p0
    class Crop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.square = nn.Sequential(nn.Conv2d(C, C, 3, bias=False), nn.BatchNorm2d(C))
            self.hor = nn.Sequential(nn.Conv2d(C, C, (1, 3), bias=False), nn.BatchNorm2d(C))
            self.ver = nn.Sequential(nn.Conv2d(C, C, (3, 1), bias=False), nn.BatchNorm2d(C))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.square(x) + self.hor(x[:, :, 1:-1, :]) + self.ver(x[..., 1:-1]))

    res = fuse_checked(Crop(), (2, C, 9, 11), convs=1, norms=0)
    assert res.sites[0].kernel == (3, 3)


def test_a_crop_alone_stays_outside_the_fused_layer() -> None:
    class CropOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x[:, :, 1:-1, 2:-2]) * 2

    # the crop cannot be part of a fused layer (padding < 0), and BN → scale alone folds no conv: a
    # depthwise 1×1 in their place would ADD a layer (and multiply-adds), so both stay as they are
    res = fuse_checked(CropOnly(), (2, C, 9, 11), convs=0, norms=1)
    assert not res.sites
    assert any("crops" in s.reason for s in res.skipped)
