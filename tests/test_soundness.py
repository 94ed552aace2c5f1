"""A deploy model equals the original on every input the original accepts (issue 8), one idiom per test.

Every model here is fused at one input shape and then compared with the original at OTHER shapes (odd and
even sizes, other batch sizes), in float64, with randomised BN statistics — so a decision taken at the
recorded shape, a dropped effect or a changed dtype shows up as a number, not as a passing report.
"""

from __future__ import annotations

import copy
from collections import namedtuple
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from models_zoo import BNS, CONVS, count, flat, randomize, state
from torch import nn

from repfuse import api, verify
from repfuse.types import Options

C = 4
pytestmark = pytest.mark.usefixtures("one_thread")


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int | None = None) -> nn.Sequential:
    p = k // 2 if padding is None else padding
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, p, bias=False), nn.BatchNorm2d(cout))


class RepBlock(nn.Module):
    """3×3-BN + 1×1-BN + BN identity: fuses to one conv."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.dense = conv_bn(c, c, 3)
        self.one = conv_bn(c, c, 1)
        self.ident = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.one(x) + self.ident(x)


def fuse(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, **opts):
    randomize(model)
    model.to(dtype).eval()
    return api.fuse(model, Options(input_shapes=(shape,), **opts))


def same_everywhere(original: nn.Module, deploy: nn.Module, shapes: list[tuple[int, ...]], *, scale: float = 1.0,
                    rtol: float = 1e-9) -> None:
    """float64 copies of both models agree on every shape (structure, shape and value)."""
    a, b = copy.deepcopy(original).double(), copy.deepcopy(deploy).double()
    for i, shape in enumerate(shapes):
        x = scale * torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        ra = verify.outputs(a, (x,), float64=True)
        rb = verify.outputs(b, (x,), float64=True)
        assert verify.interface_difference(ra, rb) is None, (shape, verify.interface_difference(ra, rb))
        for p, q in zip(flat(ra), flat(rb)):
            err = float((p - q).abs().max())
            assert err <= rtol * max(float(p.abs().max()), 1e-30), (shape, err)


def reasons(result) -> str:
    return " | ".join(f"{s.module}: {s.reason}" for s in result.skipped)


# ------------------------------------------------------------------------------------------------
# Decisions taken at the one recorded shape


class CeilPoolChain(nn.Module):
    """1×1 (no bias) → AvgPool(3, 2, 1, ceil_mode=True) → BN: ceil has no effect at odd sizes, adds a
    window at even ones."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(C, C, 1, bias=False)
        self.pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return self.bn(self.pool(self.pw(x)))


def test_pool_ceil_mode_without_effect_at_the_recorded_size_is_not_fused():
    model = CeilPoolChain()
    res = fuse(model, (2, C, 15, 15))
    assert "ceil_mode" in reasons(res)
    same_everywhere(model, res.fused64, [(2, C, 15, 15), (1, C, 16, 16), (3, C, 10, 9)])


class LiteralSlice(nn.Module):
    def __init__(self, index: tuple) -> None:
        super().__init__()
        self.block = conv_bn(C, C, 3)
        self.bn = nn.BatchNorm2d(C)
        self.index = index

    def forward(self, x):
        return self.bn(self.block(x)[self.index])


@pytest.mark.parametrize("index, size", [((slice(None), slice(None), slice(None, 16), slice(None, 16)), 16),
                                         ((slice(None), slice(None), slice(1, 17), slice(1, 17)), 18)],
                         ids=["head", "offset"])
def test_literal_slice_is_not_a_crop(index, size):
    model = LiteralSlice(index)
    res = fuse(model, (2, C, size, size))
    same_everywhere(model, res.fused64, [(2, C, size, size), (1, C, size + 5, size + 5), (2, C, size + 2, size + 3)])


def test_relative_crop_still_fuses():
    """The control: `x[:, :, 1:-1, 1:-1]` is the same crop at every size and still fuses (ACNet)."""
    model = LiteralSlice((slice(None), slice(None), slice(1, -1), slice(1, -1)))
    res = fuse(model, (2, C, 12, 12))
    assert count(res.model, BNS) == 0, reasons(res)
    same_everywhere(model, res.fused64, [(2, C, 12, 12), (1, C, 9, 11)])


class ShapeArithmetic(nn.Module):
    """Pads by the input's parity, reshapes to a literal batch size and interpolates to a literal size:
    each is the identity at the recorded shape (2×C×8×8) and something else at others."""

    def __init__(self) -> None:
        super().__init__()
        self.block = conv_bn(C, C, 3)
        self.bn = nn.BatchNorm2d(C)
        self.lin = nn.Linear(C, C)
        self.bn1 = nn.BatchNorm1d(C)

    def forward(self, x):
        y = self.block(x)
        y = self.bn(F.pad(y, (0, y.shape[-1] % 2, 0, y.shape[-2] % 2)))
        t = y.flatten(2).transpose(1, 2)  # [B, HW, C]
        z = self.bn1(t.reshape(-1, C)).reshape(2, -1, C)
        return self.lin(z), self.bn(F.interpolate(self.block(x), size=(8, 8)))


def test_shape_arithmetic_and_literal_sizes():
    model = ShapeArithmetic()
    res = fuse(model, (2, C, 8, 8))
    same_everywhere(model, res.fused64, [(2, C, 8, 8), (4, C, 9, 7), (3, C, 12, 12)])


class StridedMisaligned(nn.Module):
    """A 2×2/stride 2 branch beside a 3×3/stride 2 one: equal outputs at even sizes only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(C, C, 3, 2, 1)
        self.b = conv_bn(C, C, 2, 2, 0)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_branches_equal_only_at_some_sizes_are_refused():
    model = StridedMisaligned()
    res = fuse(model, (2, C, 8, 8))
    assert "aligned" in reasons(res)


# ------------------------------------------------------------------------------------------------
# Side effects


class InPlaceClamp(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.block = RepBlock()
        self.how = how
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        out = self.block.dense(x) + self.block.one(x) + self.bn(x)
        if self.how == "method":
            out.clamp_(-0.5, 0.5)
        elif self.how == "function":
            torch.clamp_(out, -0.5, 0.5)
        elif self.how == "module":
            self.act(out)
        else:
            F.relu(out, inplace=True)
        return out


@pytest.mark.parametrize("how", ["method", "function", "module", "functional"])
def test_inplace_op_called_for_its_effect_is_kept(how):
    model = InPlaceClamp(how)
    res = fuse(model, (2, C, 9, 9))
    same_everywhere(model, res.fused64, [(2, C, 9, 9), (3, C, 10, 12)], scale=20.0)
    assert res.sites, reasons(res)  # the sum itself still fuses: the in-place op acts on its output


class UpdatesInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        x += self.bn(self.conv(x))
        return 2 * x


class UsesUpdatedInput(nn.Module):
    """The parent reads `x` after its child changed it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = UpdatesInput()
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        y = self.inner(x)
        return self.bn(x) + y


@pytest.mark.parametrize("cls", [UpdatesInput, UsesUpdatedInput])
def test_inplace_update_of_the_input_verifies_and_keeps_its_effect(cls):
    model = randomize(cls()).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    ver = verify.compare(model, res.model, res.input_shapes, atol=None, rtol=None, trials=2, seed=0,
                         fused64=res.fused64)
    assert ver.passed, ver.message
    x = torch.randn(2, C, 9, 9)
    xa, xb = x.clone(), x.clone()
    with torch.no_grad():
        ya, yb = model(xa), res.model(xb)
    assert torch.allclose(xa, xb, atol=1e-5) and torch.allclose(ya, yb, atol=1e-5)  # the caller sees the change


class Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.other = RepBlock()

    def forward(self, x):
        return self.other(self.block(x))


def test_hooks_on_the_model_and_on_replaced_modules_keep_firing():
    model = randomize(Hooked()).eval()
    calls: list[str] = []
    model.register_forward_hook(lambda m, a, o: o * 2)
    model.block.register_forward_pre_hook(lambda m, a: (a[0] + 1,))
    model.other.dense.register_forward_hook(lambda m, a, o: calls.append("dense"))
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    assert "hook" in reasons(res)
    same_everywhere(model, res.fused64, [(2, C, 9, 9), (1, C, 12, 10)])
    calls.clear()
    with torch.no_grad():
        res.model(torch.randn(1, C, 9, 9))
    assert calls == ["dense"]


class GradAndAutocast(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.block = RepBlock()
        self.bn = nn.BatchNorm2d(C)
        self.conv = nn.Conv2d(C, C, 1)
        self.kind = kind

    def forward(self, x):
        if self.kind == "no_grad":
            with torch.no_grad():
                y = self.bn(self.conv(x))
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.bn(self.conv(x)) + self.conv(x)
        return self.block(x) + y


@pytest.mark.parametrize("kind", ["no_grad", "autocast"])
def test_grad_mode_and_autocast_regions_are_kept(kind):
    model = randomize(GradAndAutocast(kind)).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    assert "grad or autocast" in reasons(res)
    x = torch.randn(2, C, 11, 10, requires_grad=True)
    ya, yb = model(x), res.model(x)
    assert ya.dtype == yb.dtype and ya.requires_grad == yb.requires_grad
    ga, = torch.autograd.grad(ya.float().sum(), x)
    gb, = torch.autograd.grad(yb.float().sum(), x)
    assert torch.allclose(ga, gb, atol=1e-3, rtol=1e-2)
    ver = verify.compare(model, res.model, res.input_shapes, atol=None, rtol=None, trials=1, seed=0,
                         fused64=res.fused64)
    assert ver.passed, ver.message


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("stat", torch.zeros(C))

    def forward(self, x):
        self.calls.add_(1)
        out = self.block(x)
        self.stat.copy_(out.mean((0, 2, 3)))
        return out * (1 + self.calls)


def test_buffer_updates_are_kept_and_nothing_changes_the_users_model(tmp_path):
    model = randomize(Counting()).eval()
    before = state(model)
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(model, src)
    report = api.convert_file(src, dst, Options(input_shapes=((2, C, 9, 9),), allow=("test_soundness",)))
    assert report.verification.passed, report.verification.message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = torch.load(dst, weights_only=False)
    saved = out.state_dict()
    assert int(saved["calls"]) == 0 and torch.equal(saved["stat"], before["stat"])  # as IN, not as after a run
    for name, value in saved.items():  # every buffer not folded is IN's
        if name in before:
            assert torch.equal(value, before[name]), name
    x = torch.randn(2, C, 9, 9)
    with torch.no_grad():
        ya, yb = model(x), out(x)
    assert torch.allclose(ya, yb, atol=1e-5) and int(out.calls) == 1 and torch.allclose(out.stat, model.stat)


def test_api_fuse_and_compare_leave_the_model_untouched():
    model = randomize(Counting()).eval()
    before = state(model)
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    verify.compare(model, res.model, res.input_shapes, atol=None, rtol=None, trials=2, seed=0, fused64=res.fused64)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert int(res.model.calls) == 0


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.head = RepBlock()

    def forward(self, x):
        y = self.block(x)
        return self.head(y + 0.1 * torch.randn_like(y))


def test_random_numbers_are_drawn_the_same_way():
    model = randomize(Noisy()).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    assert "random" in reasons(res)
    torch.manual_seed(5)
    ya = model(torch.ones(2, C, 9, 9))
    after_a = torch.rand(1)
    torch.manual_seed(5)
    yb = res.model(torch.ones(2, C, 9, 9))
    after_b = torch.rand(1)
    assert torch.allclose(ya, yb, atol=1e-5) and torch.equal(after_a, after_b)
    assert count(res.model, BNS) == 0  # the children still fuse


class AssignsAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        out = self.bn(self.block(x))
        self.last_mean = out.mean()
        return out


def test_attribute_writes_in_forward_are_kept():
    model = randomize(AssignsAttribute()).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    assert not hasattr(model, "last_mean") and not hasattr(res.model, "last_mean")
    with torch.no_grad():
        res.model(torch.randn(1, C, 9, 9))
    assert hasattr(res.model, "last_mean")


# ------------------------------------------------------------------------------------------------
# Types, structure, casts


class Float64Buffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.bn = nn.BatchNorm2d(C)
        self.register_buffer("scale64", torch.rand(C, 1, 1, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return self.bn(self.block(x)) * self.scale64


def test_a_float64_buffer_keeps_the_output_float64():
    model = randomize(Float64Buffer()).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    x = torch.randn(2, C, 9, 9)
    with torch.no_grad():
        assert model(x).dtype == res.model(x).dtype == torch.float64
    ver = verify.compare(model, res.model, res.input_shapes, atol=None, rtol=None, trials=1, seed=0,
                         fused64=res.fused64)
    assert ver.passed, ver.message


Pair = namedtuple("Pair", ["main", "aux"])


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.block = RepBlock()
        self.other = RepBlock()
        self.kind = kind

    def forward(self, x):
        a, b = self.block(x), self.other(x)
        if self.kind == "dict":
            return {"main": a, "aux": [b, 3]}
        return Pair(a, b)


@pytest.mark.parametrize("kind", ["dict", "namedtuple"])
def test_output_structure_is_kept(kind):
    model = randomize(Structured(kind)).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    assert count(res.model, BNS) == 0
    x = torch.randn(1, C, 10, 9)
    with torch.no_grad():
        assert verify.interface_difference(model(x), res.model(x)) is None


class Casts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.head = nn.Conv2d(C, C, 1)

    def forward(self, x):
        out = self.block(x)
        return self.head(out.float()), out.to(torch.float16)


def test_casts_inside_forward_do_not_crash_and_stay():
    model = randomize(Casts()).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    ver = verify.compare(model, res.model, res.input_shapes, atol=None, rtol=None, trials=1, seed=0,
                         fused64=res.fused64)
    assert ver.passed, ver.message
    with torch.no_grad():
        assert [t.dtype for t in res.model(torch.randn(1, C, 9, 9))] == [torch.float32, torch.float16]


# ------------------------------------------------------------------------------------------------
# Code the recorded forward did not run


class ReachesOnLargeInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.tail = RepBlock()

    def forward(self, x):
        y = self.tail(self.block(x))
        if x.shape[-1] > 16:  # not traceable: the parent stays Python
            y = y + self.block.dense[0](x)
        return y


class ReachesInTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.tail = RepBlock()

    def forward(self, x):
        y = self.tail(self.block(x))
        if self.training:
            return y + self.block.ident.weight.view(1, -1, 1, 1)
        return y


def test_code_not_run_at_the_recorded_shape_still_finds_its_children():
    model = randomize(ReachesOnLargeInputs()).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    same_everywhere(model, res.fused64, [(2, C, 9, 9), (1, C, 20, 21)])
    assert isinstance(res.model.tail, nn.Conv2d)  # what the code does not reach still fuses


def test_code_for_training_mode_still_finds_its_children():
    model = randomize(ReachesInTraining()).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    res.model.train()
    res.model(torch.randn(2, C, 9, 9))  # no AttributeError
    assert isinstance(res.model.tail, nn.Conv2d)


def run_all(modules: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for m in modules.children():
        x = m(x)
    return x


class TimmLikeRoot(nn.Module):
    """Code that hands a container to a helper (timm's checkpoint_seq) or calls layers by a computed
    name: the children stay callable under their names, so they still fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(RepBlock(), nn.ReLU(), RepBlock())
        self.layer0 = RepBlock()
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.layer0(x)
        for i in range(1):
            x = getattr(self, f"layer{i}")(x)
        if self.grad_checkpointing and x.shape[0] > 1:
            return run_all(self.stages, x)
        return self.stages(x)


def test_children_handed_to_helpers_still_fuse():
    model = randomize(TimmLikeRoot()).eval()
    res = api.fuse(model, Options(input_shapes=((2, C, 9, 9),)))
    assert count(res.model, BNS) == 0, reasons(res)
    model.grad_checkpointing = res.fused64.grad_checkpointing = True  # the branch no recorded forward took
    same_everywhere(model, res.fused64, [(2, C, 9, 9), (3, C, 8, 11)])


# ------------------------------------------------------------------------------------------------
# Verification at more than one shape


class Crop(nn.Module):
    def __init__(self, block: RepBlock, index: tuple) -> None:
        super().__init__()
        self.block = block
        self.index = index

    def forward(self, x):
        return self.block(x)[self.index]


def test_verification_checks_other_sizes_and_catches_a_size_dependent_model():
    """`x[..., 1:15, 1:15]` and `x[..., 1:-1, 1:-1]` agree at 16×16 only."""
    block = randomize(RepBlock()).eval()
    original = Crop(block, (Ellipsis, slice(1, 15), slice(1, 15)))
    wrong = Crop(block, (Ellipsis, slice(1, -1), slice(1, -1)))
    ver = verify.compare(original, wrong, [(2, C, 16, 16)], atol=None, rtol=None, trials=1, seed=0)
    assert not ver.passed and "shape" in ver.message
    assert len(ver.shapes_checked) == 2 and ver.shapes_checked[0] == ((2, C, 16, 16),)
    other = ver.shapes_checked[1][0]
    assert other[0] == 3 and other[2] % 2 == 1
    off = verify.compare(original, wrong, [(2, C, 16, 16)], atol=None, rtol=None, trials=1, seed=0, extra=())
    assert off.passed and off.shapes_checked == (((2, C, 16, 16),),)


def test_verification_skips_shapes_the_original_rejects():
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * 16, 3))
    assert verify.extra_shapes(model, ((2, C, 4, 4),), 0)[0] == [((3, C, 4, 4),)]


def test_convert_report_lists_the_shapes_checked(tmp_path):
    model = randomize(RepBlock()).eval()
    src = tmp_path / "in.pt"
    torch.save(model, src)
    opts = Options(input_shapes=((1, C, 20, 20),), allow=("test_soundness",))
    report = api.convert_file(src, tmp_path / "out.pt", opts)
    assert report.verification.shapes_checked == (((1, C, 20, 20),), ((2, C, 19, 19),))
    chosen = api.convert_file(src, tmp_path / "out2.pt", replace(opts, verify_shapes=(((2, C, 7, 9),),)))
    assert chosen.verification.shapes_checked == (((1, C, 20, 20),), ((2, C, 7, 9),))


# ------------------------------------------------------------------------------------------------
# Deployment paths


class Partial(nn.Module):
    """A RepBlock then a ReLU: becomes a GraphBlock."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepBlock()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + self.block.dense(x))


@pytest.mark.parametrize("path", ["jit.trace", "export", "compile"])
def test_deploy_models_keep_working_on_deployment_paths(path):
    model = randomize(nn.Sequential(RepBlock(), nn.ReLU(), Partial())).eval()
    res = api.fuse(model, Options(input_shapes=((1, C, 9, 9),)))
    assert count(res.model, CONVS) < count(model, CONVS)
    x = torch.randn(2, C, 11, 10)
    with torch.no_grad():
        want = res.model(x)
        if path == "jit.trace":
            got = torch.jit.trace(res.model, torch.randn(1, C, 9, 9))(x)
        elif path == "export":
            dim = torch.export.Dim("h", min=4, max=64)
            prog = torch.export.export(res.model, (torch.randn(2, C, 9, 9),), dynamic_shapes=({2: dim, 3: dim},))
            x = torch.randn(2, C, 11, 11)
            want, got = res.model(x), prog.module()(x)
        else:
            got = torch.compile(res.model, backend="eager")(x)
    assert torch.allclose(want, got, atol=1e-5)


def test_cli_verify_shapes_option(tmp_path):
    import json

    from typer.testing import CliRunner

    from repfuse.cli import app

    model = randomize(RepBlock()).eval()
    src = tmp_path / "in.pt"
    torch.save(model, src)
    base = ["verify", str(src), "--allow", "test_soundness", "--input-shape", f"1,{C},12,12", "--json"]
    runner = CliRunner()
    for extra, want in ([], 2), (["--verify-shapes", "none"], 1), (["--verify-shapes", f"3,{C},7,9"], 2):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 0, res.output
        checked = json.loads(res.stdout)["verification"]["shapes_checked"]
        assert len(checked) == want and checked[0] == [[1, C, 12, 12]], checked
        if extra[-1:] == [f"3,{C},7,9"]:
            assert checked[1] == [[3, C, 7, 9]]
    bad = runner.invoke(app, base + ["--verify-shapes", "auto", "--verify-shapes", "1,2"])
    assert bad.exit_code == 2
