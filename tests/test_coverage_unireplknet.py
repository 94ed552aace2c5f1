"""UniRepLKNet-style blocks (dwconv → norm → Linear → GELU → GRN → Linear → layer scale, residual).

repfuse never adds a layer: the deploy model has no more modules of any kind and no more multiply-adds
(torch.utils.flop_counter) than the original. A standalone per-channel affine (a channels-first
LayerNorm's weight and bias, a scale module after an activation, BN → scale) stays as it is instead of
becoming a new depthwise 1×1 conv; a layer scale or a GRN's trailing bias next to a Linear, in the
channels-last layout the Linears work in, folds into that Linear.
"""

from __future__ import annotations

import torch
from models_zoo import ToNCHW, ToNHWC, assert_adds_nothing, fuse_checked, macs, skipped_reasons
from torch import nn

D = 8
SHAPE = (2, D, 6, 6)




class GRN(nn.Module):
    """Global response normalisation on [N, H, W, C], as UniRepLKNet's GRNwithNHWC."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return (self.gamma * nx + 1) * x + self.beta


class LayerNormChannelsFirst(nn.Module):
    """UniRepLKNet's LayerNorm(data_format="channels_first"): normalise over axis 1, then weight·x + bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class UniRepLKNetBlock(nn.Module):
    """The upstream block's structure: pwconv1 = (NCHW→NHWC, Linear), act = (GELU, GRN),
    pwconv2 = (Linear, NHWC→NCHW, BN), then the layer scale and the residual."""

    def __init__(self, norm: str = "bn") -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(D, D, 3, padding=1, groups=D, bias=False)
        self.norm = nn.BatchNorm2d(D) if norm == "bn" else LayerNormChannelsFirst(D)
        self.pwconv1 = nn.Sequential(ToNHWC(), nn.Linear(D, 4 * D))
        self.act = nn.Sequential(nn.GELU(), GRN(4 * D))
        self.pwconv2 = nn.Sequential(nn.Linear(4 * D, D, bias=False), ToNCHW(), nn.BatchNorm2d(D))
        self.gamma = nn.Parameter(torch.ones(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma.view(1, -1, 1, 1) * y


class FlatChannelsLastBlock(nn.Module):
    """The same block written flat, channels-last between the permutes: the GRN's `+ beta` before
    pwconv2 and the layer scale after it (`gamma` of shape [C] or [1, 1, 1, C]) are per-channel
    affines on the Linear's input and output features."""

    def __init__(self, gamma_shape: tuple[int, ...] = (D,)) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(D, D, 3, padding=1, groups=D)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.pwconv1 = nn.Linear(D, 4 * D)
        self.grn_gamma = nn.Parameter(torch.zeros(1, 1, 1, 4 * D))
        self.grn_beta = nn.Parameter(torch.zeros(1, 1, 1, 4 * D))
        self.pwconv2 = nn.Linear(4 * D, D)
        self.gamma = nn.Parameter(torch.ones(gamma_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = nn.functional.gelu(self.pwconv1(y))
        gx = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        y = (self.grn_gamma * nx + 1) * y + self.grn_beta
        y = self.pwconv2(y) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Affine(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, 1, 1))
        self.bias = nn.Parameter(torch.zeros(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias




def test_channels_first_layernorm_affine_is_not_a_new_conv_and_folds_into_pwconv1() -> None:
    # once: the LayerNorm's `weight * x + bias` became a depthwise 1×1 conv (one more conv, more MACs); then it
    # stayed; now, the affine end of the `norm` module, it folds through pwconv1's permute into its Linear
    model = UniRepLKNetBlock(norm="ln")
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=2, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    keys = set(res.model.state_dict())
    assert "norm.weight" not in keys and "norm.bias" not in keys, keys
    assert sum(isinstance(m, ToNHWC) for m in res.model.modules()) == 1


def test_bn_block_fuses_dwconv_and_norm_and_adds_nothing() -> None:
    # dwconv + BN fold into one conv; pwconv2's Linear → permute → BN folds into one Linear, the permute
    # module staying after it (before: the BN stayed, as the rewrite could not write "Linear, then permute")
    model = UniRepLKNetBlock(norm="bn")
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=2, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    assert len(list(res.model.modules())) < len(list(model.modules()))
    assert isinstance(res.model.pwconv2.get_submodule("1"), ToNCHW)


def test_grn_bias_and_layer_scale_fold_into_the_linears() -> None:
    for gamma_shape in ((D,), (1, 1, 1, D)):
        model = FlatChannelsLastBlock(gamma_shape)
        res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=2, dtype=torch.float64)
        assert_adds_nothing(model, res.model, SHAPE)
        keys = set(res.model.state_dict())
        # before: neither broadcasts over axis 1, so both stayed as parameters of the deploy model
        assert "gamma" not in keys and "grn_beta" not in keys, (gamma_shape, keys)
        assert "grn_gamma" in keys  # the GRN itself is not affine
        assert macs(res.model, SHAPE) == macs(model, SHAPE)


def test_layer_scale_after_a_conv_folds_channels_first() -> None:
    class ConvScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(D, D, 1)
            self.gamma = nn.Parameter(torch.ones(D, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) * self.gamma

    model = ConvScale()
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=0, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    assert "gamma" not in res.model.state_dict()


def test_a_scalar_and_a_bias_after_a_last_axis_linear_fold() -> None:
    class Tokens(nn.Module):  # [B, L, C]: a scalar broadcasts over L as well as C
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.beta = nn.Parameter(torch.zeros(D))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x) * 0.5 + self.beta)

    model = Tokens()
    res = fuse_checked(model, (2, 5, D), convs=0, norms=0, linears=1, dtype=torch.float64)
    assert_adds_nothing(model, res.model, (2, 5, D))
    assert "beta" not in res.model.state_dict()  # before: the scalar was taken as a per-L scale


def test_a_lone_affine_module_stays_as_it_is() -> None:
    class AfterAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(D, D, 3, padding=1)
            self.affine = Affine(D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.affine(torch.relu(self.conv(x)))

    # before: the affine module was collapsed into a depthwise 1×1 conv (more MACs)
    model = AfterAct()
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=0, dtype=torch.float64, keep=("affine",))
    assert_adds_nothing(model, res.model, SHAPE)
    assert not res.sites


def test_bn_then_scale_alone_is_not_a_new_conv() -> None:
    class BNScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(D)
            self.gamma = nn.Parameter(torch.ones(1, D, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) + self.bn(torch.relu(x)) * self.gamma

    model = BNScale()
    res = fuse_checked(model, SHAPE, convs=0, norms=1, linears=0, dtype=torch.float64, keep=("bn",))
    assert_adds_nothing(model, res.model, SHAPE)
    assert any("would add a layer" in r for r in skipped_reasons(res).values())


def test_an_affine_module_next_to_a_conv_still_folds() -> None:
    model = nn.Sequential(nn.Conv2d(D, D, 3, padding=1), Affine(D), nn.BatchNorm2d(D))
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=0, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)


def test_grn_bias_and_layer_scale_in_other_modules_fold_into_pwconv2() -> None:
    # the upstream layout: the GRN's `+ beta` ends `act` (a child's child), the layer scale is in the parent's
    # forward after `pwconv2` (Linear → NHWCtoNCHW → BN): all of them go into one Linear, as upstream's
    # reparameterize does by hand (before: both stayed, as parameters of the deploy model)
    model = UniRepLKNetBlock(norm="bn")
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=2, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    keys = set(res.model.state_dict())
    assert "gamma" not in keys and "act.1.beta" not in keys, keys
    assert "act.1.gamma" in keys  # the GRN itself is not affine
    assert sum(isinstance(m, ToNCHW) for m in res.model.modules()) == 1


def test_a_grn_read_twice_keeps_its_bias() -> None:
    class ReadTwice(UniRepLKNetBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.pwconv1(self.norm(self.dwconv(x))))
            return x + self.gamma.view(1, -1, 1, 1) * self.pwconv2(h) + h.mean(-1).unsqueeze(1)

    model = ReadTwice(norm="bn")
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=2, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    keys = set(res.model.state_dict())
    assert "act.1.beta" in keys and "gamma" not in keys, keys


def test_a_suffix_inside_a_child_whose_code_reads_it_stays() -> None:
    class Act(nn.Module):  # its Python reads inside its GRN: the GRN must stay exactly as it is
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.grn = GRN(dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:  # never taken in eval, but this code stays and reads the GRN's bias
                return self.grn(x) - self.grn.beta
            return self.grn(nn.functional.gelu(x))

    model = UniRepLKNetBlock(norm="bn")
    model.act = Act(4 * D)
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=2, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    keys = set(res.model.state_dict())
    assert "act.grn.beta" in keys and "gamma" not in keys, keys  # the layer scale still folds
    reasons = skipped_reasons(res)
    assert any("affine end of 'act' stays" in r for r in reasons.values()), reasons


def test_grn_bias_folds_into_pwconv2_without_a_layer_scale() -> None:
    class NoScale(UniRepLKNetBlock):  # layer_scale_init_value=None upstream: the region is pwconv2 alone
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))

    model = NoScale(norm="bn")
    res = fuse_checked(model, SHAPE, convs=1, norms=0, linears=2, dtype=torch.float64)
    assert_adds_nothing(model, res.model, SHAPE)
    assert "act.1.beta" not in set(res.model.state_dict())
