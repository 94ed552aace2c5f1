"""Real-world coverage (issue 9): models written the way their projects write them."""

from __future__ import annotations

import copy
import io

import torch
from models_zoo import BNS, count, randomize
from torch import nn

from repfuse import api
from repfuse.modules import GraphBlock
from repfuse.types import Options

C = 4


class YConv(nn.Module):
    """Ultralytics' Conv: conv → BN → activation, fused by its own `fuse()` into `forward_fuse`."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class RepDW(nn.Module):
    """RepVGGDW-style: two depthwise conv+BN branches summed, then an activation."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = YConv(c, c, 3, act=False)
        self.conv1 = YConv(c, c, 1, act=False)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x) + self.conv1(x))


class Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class Routed(nn.Module):
    """A YOLOv5-lineage parent: each layer says where its input comes from (`m.f`), its index (`m.i`),
    its kind (`m.type`, shadowing nn.Module.type as Ultralytics does) and its parameter count (`m.np`)."""

    def __init__(self) -> None:
        super().__init__()
        spec = [(-1, YConv(C, C, 3)), (-1, RepDW(C)), (-1, YConv(C, C, 1, act=False)), ([-1, 1], Concat()),
                (-1, YConv(2 * C, C, 3))]
        layers = []
        for i, (f, m) in enumerate(spec):
            m.f, m.i, m.type, m.np = f, i, type(m).__name__, sum(p.numel() for p in m.parameters())
            layers.append(m)
        self.model = nn.Sequential(*layers)
        self.save = [1]

    def forward(self, x, profile=False):
        y, dt = [], []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if profile:
                self._profile_one_layer(m, x, dt)
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def _profile_one_layer(self, m, x, dt):
        device = next(self.parameters()).device
        dt.append((m.type, m.np, str(device)))
        m(x)


def test_routing_parent_keeps_working_and_everything_fuses():
    model = randomize(Routed()).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    assert res.sites
    assert count(res.model, BNS) == 0, [(s.module, s.reason) for s in res.skipped]
    assert sum(isinstance(m, nn.Conv2d) for m in res.model.modules()) == 4  # RepDW's branches are one conv
    for old, new in zip(model.model, res.model.model):
        assert (new.f, new.i, new.type, new.np) == (old.f, old.i, old.type, old.np)
    a, b = copy.deepcopy(model).double(), res.fused64  # float64 weights: compared to 1e-9
    for shape in [(2, C, 9, 9), (1, C, 12, 7)]:
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(shape[2]))
        assert torch.allclose(a(x), b(x), rtol=1e-9, atol=1e-10)
        res.model(x.float(), profile=True)  # the branch no recorded forward took still finds its attributes


def test_routing_attributes_survive_saving_and_weights_only_loading():
    model = randomize(Routed()).eval()
    res = api.fuse(model, Options(input_shapes=((1, C, 8, 8),)))
    blocks = [m for m in res.model.modules() if isinstance(m, GraphBlock)]
    assert blocks and all(hasattr(m, "f") and isinstance(m.type, str) for m in blocks)
    buf = io.BytesIO()
    torch.save(res.model, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([Routed, YConv, RepDW, Concat, GraphBlock, nn.Sequential, nn.Conv2d,
                                           nn.SiLU, nn.Identity]):
        again = torch.load(buf, weights_only=True)
    x = torch.randn(1, C, 8, 8)
    assert torch.equal(again(x), res.model(x))


def test_a_helper_reading_a_layers_child_still_keeps_it():
    class ReadsChild(Routed):
        def _profile_one_layer(self, m, x, dt):
            dt.append(m.conv)  # not a plain attribute: that layer stays what it is

    class Parent(Routed):
        def forward(self, x):
            for m in self.model:
                _ = m.conv if m.i == 0 else None
            return super().forward(x)

    model = randomize(Parent()).eval()
    res = api.fuse(model, Options(input_shapes=((1, C, 8, 8),)))
    assert hasattr(res.model.model[0], "conv")  # read through the element: every element stays
    assert res.sites
