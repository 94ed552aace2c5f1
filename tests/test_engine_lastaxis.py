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
