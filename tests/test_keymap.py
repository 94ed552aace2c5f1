"""repfuse.keymap: fused weights mapped onto the user's own deploy-mode class, by structure.

The deploy classes below are written the way the official code bases write them (DingXiaoH/RepVGG
with ``deploy=True`` → ``rbr_reparam``; apple/ml-mobileone with ``inference_mode=True`` →
``reparam_conv``), never through repfuse. Every case randomises BN statistics, fuses with repfuse,
maps, loads with ``strict=True`` and compares outputs numerically on fresh inputs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repfuse import api, samples
from repfuse.keymap import KeyMap, map_to_deploy
from repfuse.types import Options, RepfuseError

SHAPE = (2, 3, 32, 32)


# ------------------------------------------------------------------------------------------------
# official-style RepVGG (DingXiaoH/RepVGG, repvgg.py), train and deploy mode in one class


def conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1):
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                        kernel_size=kernel_size, stride=stride, padding=padding,
                                        groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(num_features=out_channels))
    return result


class SEBlock(nn.Module):
    def __init__(self, input_channels, internal_neurons):
        super().__init__()
        self.down = nn.Conv2d(in_channels=input_channels, out_channels=internal_neurons, kernel_size=1, stride=1,
                              bias=True)
        self.up = nn.Conv2d(in_channels=internal_neurons, out_channels=input_channels, kernel_size=1, stride=1,
                            bias=True)
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
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros", deploy=False, use_se=False):
        super().__init__()
        self.deploy = deploy
        self.groups = groups
        self.in_channels = in_channels

        assert kernel_size == 3
        assert padding == 1

        padding_11 = padding - kernel_size // 2

        self.nonlinearity = nn.ReLU()

        if use_se:
            self.se = SEBlock(out_channels, internal_neurons=out_channels // 4)
        else:
            self.se = nn.Identity()

        if deploy:
            self.rbr_reparam = nn.Conv2d(in_channels=in_channels, out_channels=out_channels,
                                         kernel_size=kernel_size, stride=stride, padding=padding,
                                         dilation=dilation, groups=groups, bias=True, padding_mode=padding_mode)
        else:
            self.rbr_identity = nn.BatchNorm2d(num_features=in_channels) \
                if out_channels == in_channels and stride == 1 else None
            self.rbr_dense = conv_bn(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                                     stride=stride, padding=padding, groups=groups)
            self.rbr_1x1 = conv_bn(in_channels=in_channels, out_channels=out_channels, kernel_size=1,
                                   stride=stride, padding=padding_11, groups=groups)

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))

        if self.rbr_identity is None:
            id_out = 0
        else:
            id_out = self.rbr_identity(inputs)

        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class RepVGG(nn.Module):
    def __init__(self, num_blocks, num_classes=10, width_multiplier=None, override_groups_map=None, deploy=False,
                 use_se=False):
        super().__init__()
        assert len(width_multiplier) == 4
        self.deploy = deploy
        self.override_groups_map = override_groups_map or dict()
        self.use_se = use_se

        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(in_channels=3, out_channels=self.in_planes, kernel_size=3, stride=2, padding=1,
                                  deploy=self.deploy, use_se=self.use_se)
        self.cur_layer_idx = 1
        self.stage1 = self._make_stage(int(64 * width_multiplier[0]), num_blocks[0], stride=2)
        self.stage2 = self._make_stage(int(128 * width_multiplier[1]), num_blocks[1], stride=2)
        self.stage3 = self._make_stage(int(256 * width_multiplier[2]), num_blocks[2], stride=2)
        self.stage4 = self._make_stage(int(512 * width_multiplier[3]), num_blocks[3], stride=2)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(int(512 * width_multiplier[3]), num_classes)

    def _make_stage(self, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        blocks = []
        for stride in strides:
            cur_groups = self.override_groups_map.get(self.cur_layer_idx, 1)
            blocks.append(RepVGGBlock(in_channels=self.in_planes, out_channels=planes, kernel_size=3,
                                      stride=stride, padding=1, groups=cur_groups, deploy=self.deploy,
                                      use_se=self.use_se))
            self.in_planes = planes
            self.cur_layer_idx += 1
        return nn.Sequential(*blocks)

    def forward(self, x):
        out = self.stage0(x)
        out = self.stage1(out)
        out = self.stage2(out)
        out = self.stage3(out)
        out = self.stage4(out)
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


TINY = {"num_blocks": [1, 2, 2, 1], "width_multiplier": [0.25] * 4, "override_groups_map": {2: 2, 3: 2, 5: 2}}


def repvgg(deploy: bool, **kw) -> RepVGG:
    return RepVGG(**{**TINY, **kw}, deploy=deploy).eval()


# ------------------------------------------------------------------------------------------------
# official-style MobileOne deploy block (apple/ml-mobileone, inference_mode=True), laid out like
# repfuse.samples.MobileOne (stage0, stages, gap, linear)


class MobileOneBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, inference_mode: bool = True) -> None:
        super().__init__()
        self.inference_mode = inference_mode
        self.se = nn.Identity()
        self.activation = nn.ReLU()
        self.reparam_conv = nn.Conv2d(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                                      stride=stride, padding=padding, dilation=dilation, groups=groups, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        raise NotImplementedError


class MobileOneDeploy(nn.Module):
    def __init__(self, widths: Sequence[int] = (16, 32), strides: Sequence[int] = (1, 2), stem_width: int = 16,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = stem_width
        self.stage0 = MobileOneBlock(3, stem_width, kernel_size=3, stride=2, padding=1)
        stages = []
        for planes, stride in zip(widths, strides):
            stages.append(nn.Sequential(
                MobileOneBlock(self.in_planes, self.in_planes, 3, stride=stride, padding=1, groups=self.in_planes),
                MobileOneBlock(self.in_planes, planes, 1, stride=1, padding=0)))
            self.in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stage0(x))
        return self.linear(self.gap(x).view(x.size(0), -1))


# ------------------------------------------------------------------------------------------------
# helpers


def fuse(model: nn.Module, shape: tuple[int, ...] = SHAPE) -> nn.Module:
    samples.randomize_bn(model.eval(), seed=1)
    return api.fuse(model, Options(input_shapes=(shape,))).model


def inputs(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)


def load_and_compare(deploy: nn.Module, km: KeyMap, *references: nn.Module, shape: tuple[int, ...] = SHAPE) -> None:
    """strict load, then the deploy model equals every reference on a fresh input (float32)."""
    deploy.load_state_dict(km.state_dict, strict=True)
    deploy.eval()
    x = inputs(shape, seed=7)
    with torch.no_grad():
        got = deploy(*x)
        for ref in references:
            want = ref.eval()(*x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def fused_tiny() -> nn.Module:
    """The official-style train RepVGG (TINY), fused once for every mismatch test (none mutates it)."""
    return fuse(repvgg(deploy=False))


def error_of(deploy: nn.Module, fused: nn.Module, shape: tuple[int, ...] = SHAPE) -> RepfuseError:
    with pytest.raises(RepfuseError) as info:
        map_to_deploy(deploy, fused, inputs(shape))
    assert info.value.hint, "every mapping error carries a hint"
    return info.value


# ------------------------------------------------------------------------------------------------
# RepVGG onto the official deploy class


@pytest.mark.parametrize("use_se", [False, True], ids=["plain", "se"])
def test_repvgg_official_deploy_class(use_se: bool) -> None:
    train = repvgg(deploy=False, use_se=use_se)
    fused = fuse(train)
    deploy = repvgg(deploy=True, use_se=use_se)
    km = map_to_deploy(deploy, fused, inputs())

    assert set(km.state_dict) == set(deploy.state_dict())
    assert list(km.state_dict) == list(deploy.state_dict())  # the deploy model's own key order
    assert km.mapping["stage0.rbr_reparam.weight"] == "stage0.fused.weight"
    assert km.mapping["stage2.1.rbr_reparam.bias"] == "stage2.1.fused.bias"
    assert km.mapping["linear.weight"] == "linear.weight"
    assert km.filled == () and km.dropped == () and km.unused_fused == ()
    if use_se:
        assert km.mapping["stage3.0.se.up.weight"] == "stage3.0.se.up.weight"
    assert km.max_abs_error is not None and km.max_abs_error <= 1e-5

    load_and_compare(deploy, km, fused, train)


def test_samples_repvgg_onto_official_class_and_json() -> None:
    train = samples.repvgg_tiny()
    fused = fuse(train)
    deploy = repvgg(deploy=True)
    km = map_to_deploy(deploy, fused, inputs())
    load_and_compare(deploy, km, fused, train)

    text = km.to_json()
    doc = json.loads(text)
    assert '"stage2.0.rbr_reparam.weight": "stage2.0.fused.weight"' in text  # readable, one entry a line
    assert doc["schema"] == 1
    assert doc["tool"]["name"] == "repfuse"
    assert doc["mapping"] == km.mapping
    assert len(doc["mapping"]) == len(deploy.state_dict()) == 16
    assert doc["filled"] == {} and doc["dropped"] == [] and doc["unused_fused"] == []
    layers = doc["layers"]
    assert [entry["index"] for entry in layers] == list(range(1, 9))
    assert [entry["kind"] for entry in layers] == ["Conv2d"] * 7 + ["Linear"]
    third = layers[2]
    assert third["deploy"] == "stage2.0.rbr_reparam" and third["fused"] == "stage2.0.fused"
    assert third["deploy_layer"] == "Conv2d(16→32, 3×3, s2, p1, g2)"
    assert third["tensors"] == {"weight": [32, 8, 3, 3], "bias": [32]}
    assert third["calls"] == 1 and third["notes"] == []
    assert doc["check"]["max_abs_error"] <= doc["check"]["tolerance"]


def test_mobileone_official_style_deploy() -> None:
    train = samples.mobileone_tiny()
    fused = fuse(train)
    deploy = MobileOneDeploy().eval()
    km = map_to_deploy(deploy, fused, inputs())
    assert km.mapping["stages.1.0.reparam_conv.weight"] == "stages.1.0.fused.weight"
    assert km.state_dict["stages.0.0.reparam_conv.weight"].shape == (16, 1, 3, 3)  # depthwise
    assert [p.kind for p in km.layers] == ["Conv2d"] * 5 + ["Linear"]
    load_and_compare(deploy, km, fused, train)


def test_deploy_model_left_untouched(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    deploy = repvgg(deploy=True).train()
    before = {k: v.clone() for k, v in deploy.state_dict().items()}
    map_to_deploy(deploy, fused, inputs())
    assert all(m.training for m in deploy.modules())
    assert not any(m._forward_pre_hooks for m in deploy.modules())
    assert not any(m._forward_pre_hooks for m in fused.modules())
    assert all(torch.equal(before[k], v) for k, v in deploy.state_dict().items())


# ------------------------------------------------------------------------------------------------
# mismatched deploy models: a RepfuseError naming the layer, never a guess


def test_stride_differs(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    deploy = repvgg(deploy=True)
    deploy.stage2[0].rbr_reparam = nn.Conv2d(16, 32, 3, stride=1, padding=1, groups=2)
    err = error_of(deploy, fused)
    assert err.message == ("layer 3 of 8: deploy 'stage2.0.rbr_reparam' Conv2d(16→32, 3×3, s1, p1, g2) vs fused "
                           "'stage2.0.fused' Conv2d(16→32, 3×3, s2, p1, g2): stride differs")
    assert "--deploy-model" in err.hint


def test_missing_block(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    # stage2 has one block instead of two; groups follow the blocks that remain
    deploy = repvgg(deploy=True, num_blocks=[1, 1, 2, 1], override_groups_map={2: 2, 4: 2})
    err = error_of(deploy, fused)
    assert err.message.startswith("layer 4 (deploy runs 7 layers, fused 8): deploy 'stage3.0.rbr_reparam'")
    assert "fused 'stage2.1.fused'" in err.message
    assert "seems to lack a layer like fused 'stage2.1.fused'" in err.message


def test_missing_block_without_a_clean_realignment(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    deploy = repvgg(deploy=True, num_blocks=[1, 1, 2, 1])
    err = error_of(deploy, fused)
    assert err.message.startswith("layer 4 (deploy runs 7 layers, fused 8): deploy 'stage3.0.rbr_reparam'")
    assert "vs fused 'stage2.1.fused'" in err.message


def test_extra_block(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    deploy = repvgg(deploy=True, num_blocks=[1, 2, 3, 1])
    err = error_of(deploy, fused)
    assert err.message.startswith("layer 7 (deploy runs 9 layers, fused 8): deploy 'stage3.2.rbr_reparam'")
    assert "seems to have an extra layer 'stage3.2.rbr_reparam'" in err.message


def test_width_differs(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    deploy = repvgg(deploy=True, width_multiplier=[0.5, 0.25, 0.25, 0.25])
    err = error_of(deploy, fused)
    assert err.message.startswith("layer 1 of 8: deploy 'stage0.rbr_reparam' Conv2d(3→32, 3×3, s2, p1) vs fused "
                                  "'stage0.fused' Conv2d(3→16, 3×3, s2, p1): out_channels differs")


def test_head_missing_is_a_count_error(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    deploy = repvgg(deploy=True)
    deploy.linear = nn.Identity()
    err = error_of(deploy, fused)
    assert "deploy model has 7 parameterised layers that run, the fused model 8" in err.message
    assert "fused 'linear' Linear(128→10) has no counterpart" in err.message


def test_kind_differs(fused_tiny: nn.Module) -> None:
    class ConvHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = repvgg(deploy=True)
            self.body.linear = nn.Identity()
            self.head = nn.Conv1d(128, 10, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x)[..., None])[..., 0]

    fused = fused_tiny
    err = error_of(ConvHead().eval(), fused)
    assert err.message.startswith("layer 8 of 8: deploy 'head' Conv1d(128→10, 1, s1, p0) vs fused 'linear'")
    assert "kind differs (Conv1d vs Linear)" in err.message


def test_train_branches_left_in_deploy_model_never_run(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    deploy = repvgg(deploy=True)
    deploy.stage1[0].rbr_dense = conv_bn(16, 16, 3, 2, 1)  # defined, not used by the deploy forward
    err = error_of(deploy, fused)
    assert "never ran" in err.message
    assert "'stage1.0.rbr_dense.conv' Conv2d(16→16, 3×3, s2, p1, no bias)" in err.message
    assert "'stage1.0.rbr_dense.bn' BatchNorm2d(16, eps=1e-05)" in err.message


def test_different_activation_fails_the_numerical_check(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    deploy = repvgg(deploy=True)
    deploy.stage3[1].nonlinearity = nn.SiLU()
    err = error_of(deploy, fused)
    assert "does not reproduce the fused model" in err.message


def test_dtype_differs(fused_tiny: nn.Module) -> None:
    fused = copy.deepcopy(fused_tiny).double()
    err = error_of(repvgg(deploy=True), fused)
    assert err.message.startswith("layer 1 of 8")
    assert "weight dtype float32 vs float64 differs" in err.message


def test_deploy_model_that_does_not_run(fused_tiny: nn.Module) -> None:
    fused = fused_tiny
    deploy = repvgg(deploy=True)
    with pytest.raises(RepfuseError, match="the deploy model does not run on inputs of shape 2x5x32x32"):
        map_to_deploy(deploy, fused, (torch.randn(2, 5, 32, 32),))


# ------------------------------------------------------------------------------------------------
# biases, leftover norms, shared modules, padding spellings


class Chain(nn.Module):
    """conv → ReLU → BN (not fusable: BN after a nonlinearity) → conv, under arbitrary names."""

    def __init__(self, names: tuple[str, str, str], bias: tuple[bool, bool] = (True, True)) -> None:
        super().__init__()
        self.names = names
        self.add_module(names[0], nn.Conv2d(3, 8, 3, padding=1, bias=bias[0]))
        self.add_module(names[1], nn.BatchNorm2d(8))
        self.add_module(names[2], nn.Conv2d(8, 4, 1, bias=bias[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = (getattr(self, n) for n in self.names)
        return c(b(torch.relu(a(x))))


def test_leftover_batchnorm_buffers_are_mapped() -> None:
    fused = samples.randomize_bn(Chain(("conv", "bn", "proj")).eval(), seed=3)
    deploy = Chain(("first", "norm", "last")).eval()
    km = map_to_deploy(deploy, fused, inputs())
    assert km.mapping["norm.running_var"] == "bn.running_var"
    assert km.mapping["norm.num_batches_tracked"] == "bn.num_batches_tracked"
    assert torch.equal(km.state_dict["norm.running_mean"], fused.bn.running_mean)
    assert km.state_dict["norm.running_mean"].data_ptr() != fused.bn.running_mean.data_ptr()  # a copy
    load_and_compare(deploy, km, fused)


def test_bias_filled_with_zeros() -> None:
    fused = samples.randomize_bn(Chain(("conv", "bn", "proj"), bias=(False, True)).eval(), seed=3)
    deploy = Chain(("first", "norm", "last"), bias=(True, True)).eval()
    km = map_to_deploy(deploy, fused, inputs())
    assert km.filled == ("first.bias",)
    assert "first.bias" not in km.mapping
    assert torch.equal(km.state_dict["first.bias"], torch.zeros(8))
    doc = json.loads(km.to_json())
    assert doc["filled"] == {"first.bias": "zeros"}
    assert doc["layers"][0]["notes"] == ["bias: zeros (the fused layer has none)"]
    load_and_compare(deploy, km, fused)


def test_zero_bias_dropped_nonzero_bias_refused() -> None:
    fused = samples.randomize_bn(Chain(("conv", "bn", "proj")).eval(), seed=3)
    deploy = Chain(("first", "norm", "last"), bias=(True, False)).eval()
    err = error_of(deploy, fused)
    assert err.message.startswith("layer 3 of 3: deploy 'last' Conv2d(8→4, 1×1, s1, p0, no bias) vs fused 'proj'")
    assert "non-zero bias" in err.message

    with torch.no_grad():
        fused.proj.bias.zero_()
    km = map_to_deploy(deploy, fused, inputs())
    assert km.dropped == ("proj.bias",)
    assert "bias: dropped" in km.layers[2].notes[0]
    load_and_compare(deploy, km, fused)


class Twice(nn.Module):
    """One conv applied twice (shared weights), or two convs, around a BN."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.b = self.a if shared else nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.bn(torch.relu(self.a(x)))))


def test_shared_module_pairs_with_shared_module() -> None:
    fused = samples.randomize_bn(Twice(shared=True).eval(), seed=4)
    deploy = Twice(shared=True).eval()
    km = map_to_deploy(deploy, fused, inputs())
    assert [p.calls for p in km.layers] == [2, 1]
    assert km.mapping["b.weight"] == "a.weight"  # both names of the shared conv are in the state_dict
    load_and_compare(deploy, km, fused)


def test_shared_module_against_two_modules_is_refused() -> None:
    fused = samples.randomize_bn(Twice(shared=True).eval(), seed=4)
    err = error_of(Twice(shared=False).eval(), fused)
    assert err.message.startswith("layer 1 (deploy runs 3 layers, fused 2): "
                                  "deploy 'a' Conv2d(3→3, 3×3, s1, p1) vs fused 'a'")
    assert "called 1 time(s) in deploy but 2 in fused" in err.message


def test_padding_same_pairs_with_explicit_padding() -> None:
    fused = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 5, padding=2, dilation=1)).eval()
    deploy = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(), nn.Conv2d(4, 2, 5, padding="same")).eval()
    km = map_to_deploy(deploy, fused, inputs())
    load_and_compare(deploy, km, fused)
    with pytest.raises(RepfuseError, match="padding differs"):
        map_to_deploy(nn.Sequential(nn.Conv2d(3, 4, 3, padding="valid")).eval(),
                      nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval(), inputs())


def test_subclass_with_its_own_forward_is_a_different_kind() -> None:
    class SameConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # e.g. timm's dynamic "same" padding
            return super().forward(F.pad(x, (0, 0, 0, 0)))

    class PlainSubclass(nn.Conv2d):
        pass

    fused = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    with pytest.raises(RepfuseError, match="run different forward code"):
        map_to_deploy(nn.Sequential(SameConv(3, 4, 3, padding=1)).eval(), fused, inputs())
    deploy = nn.Sequential(PlainSubclass(3, 4, 3, padding=1)).eval()
    load_and_compare(deploy, map_to_deploy(deploy, fused, inputs()), fused)


# ------------------------------------------------------------------------------------------------
# property: any plain conv stack maps onto the same stack under other names and nesting


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]), st.sampled_from([1, 2]),
                          st.booleans()), min_size=1, max_size=4),
       st.integers(0, 2**16))
def test_property_conv_stacks(spec: list[tuple[int, int, int, bool]], seed: int) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = 4
    for k, stride, groups, bn in spec:
        layers += [nn.Conv2d(c, 4 * groups, k, stride=stride, padding=k // 2, groups=groups), nn.ReLU()]
        c = 4 * groups
        if bn:
            layers.append(nn.BatchNorm2d(c))
    fused = samples.randomize_bn(nn.Sequential(*layers).eval(), seed=seed)
    deploy = nn.Sequential(nn.Sequential(*copy.deepcopy(layers[:2])), *copy.deepcopy(layers[2:])).eval()
    for m in deploy.modules():  # fresh, different weights: the map must bring the fused ones
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    km = map_to_deploy(deploy, fused, inputs((2, 4, 17, 17)))
    assert len(km.layers) == sum(2 if bn else 1 for *_, bn in spec)
    load_and_compare(deploy, km, fused, shape=(2, 4, 17, 17))


def test_fused_layers_that_never_run_are_listed_not_mapped() -> None:
    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = repvgg(deploy=False)
            self.aux = nn.Linear(64, 10)  # a training-only head, unused in forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    train = WithAux()
    fused = fuse(train)
    deploy = repvgg(deploy=True)
    km = map_to_deploy(deploy, fused, inputs())
    assert km.unused_fused == ("aux",)
    assert json.loads(km.to_json())["unused_fused"] == ["aux"]
    assert not any(v.startswith("aux.") for v in km.mapping.values())
    load_and_compare(deploy, km, fused, train)
