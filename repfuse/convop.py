"""`ConvOp`: an affine conv operator in float64, the value every lowering and composition works on
(`kernels` holds the maths on it, `lazy_kernels` the ops whose kernel is built when read)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Ints = tuple[int, ...]
DT = torch.float64


@dataclass(frozen=True)
class ConvOp:
    """An affine operator ``y = conv(x; weight, bias, ...)`` in float64.

    weight: [C_out, C_in / groups, *kernel]; bias: [C_out]. `nd == 0` is a Linear layer.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    stride: Ints
    padding: Ints
    dilation: Ints
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def weight_shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def nd(self) -> int:
        return len(self.weight_shape) - 2

    @property
    def kernel_size(self) -> Ints:
        return tuple(self.weight_shape[2:])

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.groups

    @property
    def is_pointwise(self) -> bool:
        """1×…×1 kernel, stride 1, no padding: acts on each position independently."""
        return all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride) and not any(
            self.padding
        )

    @property
    def is_identity(self) -> bool:
        """y = x: diagonal with unit weights and no bias (nn.Identity, a dropout in eval)."""
        return self.is_diagonal and bool(torch.all(self.weight == 1)) and not bool(torch.any(self.bias))

    @property
    def is_diagonal(self) -> bool:
        """A per-channel affine map (BN, scale, identity): pointwise and depthwise with C_in == C_out."""
        return self.is_pointwise and self.groups == self.out_channels == self.in_channels

    @property
    def num_weights(self) -> int:
        """weight.numel(), without building a ScaledOp's kernel."""
        return math.prod(self.weight_shape)

    def num_params(self, with_bias: bool = True) -> int:
        return self.num_weights + (self.bias.numel() if with_bias else 0)
