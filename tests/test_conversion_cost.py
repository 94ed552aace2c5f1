"""Conversion cost without timing (issue 10): the work a conversion does, counted — forwards of the original
at the given input size, the shape the analysis records at — and that sharing runs between stages changes
no figure: the summary's MACs equal an independent count, the exactness reference is the original's.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from repfuse import api, verify
from repfuse.samples import randomize_bn, repvgg_tiny
from repfuse.types import Options

MAIN = (1, 3, 64, 64)  # its extra shape set, 2×3×33×33, has fewer elements


class Counted(nn.Module):
    """A RepVGG-like model that logs its forwards as (instance, input shape), copies included."""

    calls: ClassVar[list[tuple[int, tuple[int, ...]]]] = []

    def __init__(self) -> None:
        super().__init__()
        self.body = repvgg_tiny()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Counted.calls.append((id(self), tuple(x.shape)))
        return self.body(x)


def _macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(shape))
    return int(counter.get_total_flops() // 2)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "in.pt"
    torch.save(randomize_bn(Counted(), 3).eval(), path)
    return path


def test_the_original_runs_once_per_trial_at_the_given_size(src: Path, tmp_path: Path) -> None:
    """Checking that it runs is trial 0 (its MACs counted on it); the analysis records at the smaller extra
    size, on a float64 copy, and that copy also gives the float64 reference at the given size before it
    becomes the fused twin. The deploy side at the given size: its float64 twin once and each trial; the
    written file is loaded back and run at the smaller size."""
    Counted.calls = []
    trials = 3
    report = api.convert_file(src, tmp_path / "out.pt", Options(input_shapes=(MAIN,), trials=trials,
                                                                   allow=(__name__,)))
    assert report.verification is not None and report.verification.passed
    original = Counted.calls[0][0]  # the loaded model: the first to run (the check that it runs)
    at_main = [who for who, shape in Counted.calls if shape == MAIN]
    assert at_main.count(original) == trials, Counted.calls
    assert len(at_main) - at_main.count(original) == 1 + 1 + trials, Counted.calls  # reference, twin, trials
    extra = report.verification.shapes_checked[1][0]
    assert extra != MAIN
    assert Counted.calls[-1][1] == extra  # the last run: the written file, loaded back


def test_the_analysis_records_at_the_cheapest_verified_shape_set() -> None:
    torch.manual_seed(0)
    model = randomize_bn(repvgg_tiny(), 1).eval()
    result = api.fuse(model, Options(input_shapes=(MAIN,)))
    assert result.extra_shapes and result.analysed_at == result.extra_shapes[0]
    alone = api.fuse(model, Options(input_shapes=(MAIN,), verify_shapes=()))
    assert alone.analysed_at == (MAIN,) and alone.extra_shapes == ()
    larger = api.fuse(model, Options(input_shapes=(MAIN,), verify_shapes=(((2, 3, 48, 48),),)))
    assert larger.analysed_at == (MAIN,)


def test_summary_macs_equal_an_independent_count(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    report = api.convert_file(src, out, Options(input_shapes=(MAIN,), allow=(__name__,)))
    original = torch.load(src, weights_only=False).eval()
    deploy = torch.load(out, weights_only=False).eval()
    assert report.summary.macs_before == _macs(original, MAIN)
    assert report.summary.macs_after == _macs(deploy, MAIN) < report.summary.macs_before


def test_the_reference_of_the_analysed_shape_is_the_original_in_float64() -> None:
    """The analysis's recorded output, kept as the float64 reference of its shape set, is the original's
    own float64 output on the same seeded input."""
    torch.manual_seed(0)
    model = randomize_bn(repvgg_tiny(), 2).eval()
    result = api.fuse(model, Options(input_shapes=(MAIN,), seed=5))
    at = result.analysed_at
    seed = next(s for shapes, s, _ in verify.trial_runs((MAIN,), result.extra_shapes, 3, 5) if shapes == at)
    kept = verify.flat_outputs(result.runs.get(model, at, seed, float64=True))
    fresh = verify.run(model.double(), verify.make_inputs(at, torch.float64, seed), seed=seed)
    assert len(kept) == len(fresh) == 1 and torch.allclose(kept[0], fresh[0], rtol=1e-12, atol=0)


def test_a_fusion_wrong_only_at_the_given_size_still_fails(src: Path) -> None:
    """The analysis records at the smaller size; verification still checks the given one end to end."""
    torch.manual_seed(0)
    model = randomize_bn(repvgg_tiny(), 4).eval()
    result = api.fuse(model, Options(input_shapes=(MAIN,)))

    class WrongAtMain(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            return y * 1.001 if tuple(x.shape) == MAIN else y

    ver = verify.compare(model, WrongAtMain(result.model), (MAIN,), atol=None, rtol=None, trials=1, seed=0,
                         fused64=WrongAtMain(result.fused64), extra=result.extra_shapes)
    assert not ver.passed and "float64" in ver.message


class ConvBN(nn.Sequential):
    def __init__(self, c: int, k: int) -> None:
        super().__init__(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c))


class RepBlock(nn.Module):
    """conv3×3-BN + conv1×1-BN + BN, then ReLU; wide enough that its conv → BN kernel is built on demand."""

    def __init__(self, c: int = 384) -> None:
        super().__init__()
        self.dense, self.point, self.identity = ConvBN(c, 3), ConvBN(c, 1), nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x) + self.point(x) + self.identity(x))


def test_a_wide_conv_bn_kernel_is_built_on_demand_and_dropped_once_its_parent_took_it_in() -> None:
    from repfuse import kernels, rewrite

    c = 384
    assert c * c * 9 >= kernels.LAZY_NUMEL
    model = randomize_bn(RepBlock(c), 5).eval()
    work, dtypes = rewrite.float64_copy(model)
    analysis = rewrite.analyse(work, verify.make_inputs(((1, c, 6, 6),), torch.float64, 0), dtypes)
    op = analysis.leaves[id(work.dense)].op
    assert isinstance(op, kernels.ScaledOp) and op.__dict__["built"] is None  # released: no kernel held
    expected = work.dense[0].weight * (work.dense[1].weight / (work.dense[1].running_var + 1e-5).sqrt()
                                       ).reshape(-1, 1, 1, 1)
    assert torch.allclose(op.weight, expected, rtol=1e-12, atol=0)  # built again on reading it
    result = api.fuse(model, Options(input_shapes=((1, c, 6, 6),)))
    x = torch.randn(2, c, 7, 7)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), rtol=1e-4, atol=1e-4)
    assert sum(isinstance(m, nn.Conv2d) for m in result.model.modules()) == 1


def test_a_dropped_kernel_is_built_again_when_the_child_itself_is_written() -> None:
    """The parent stays as it is (a forward hook): each conv → BN child is then written on its own, from a
    kernel its parent's analysis had dropped."""
    c = 384
    model = randomize_bn(RepBlock(c), 6).eval()
    model.register_forward_hook(lambda mod, args, out: None)
    result = api.fuse(model, Options(input_shapes=((1, c, 6, 6),)))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in result.model.dense.modules()) == 0
    x = torch.randn(2, c, 7, 7)
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), rtol=1e-4, atol=1e-4)
    ver = verify.compare(model, result.model, ((1, c, 6, 6),), atol=None, rtol=None, trials=1, seed=0,
                         fused64=result.fused64)
    assert ver.passed and ver.exact_max_rel_error < 1e-12


def test_a_sum_with_a_scaled_kernel_writes_it_straight_in_and_never_builds_it() -> None:
    from repfuse import kernels as K

    g = torch.Generator().manual_seed(7)
    c = 384
    dense = K.conv_op(torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64), None, 1, (1, 1), 1, 1)
    scale = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(c, generator=g, dtype=torch.float64)
    scaled, _ = K.compose(dense, K.channel_affine(scale, shift, 2))
    point = K.conv_op(torch.randn(c, c, 1, 1, generator=g, dtype=torch.float64), None, 1, (0, 0), 1, 1)
    assert isinstance(scaled, K.ScaledOp)
    total, reason = K.parallel_sum([scaled, point])
    assert reason is None and total is not None and scaled.__dict__["built"] is None
    expected = dense.weight * scale.reshape(-1, 1, 1, 1)
    index = torch.tensor([0, 17, c - 1])
    assert torch.equal(K.rows(scaled, index), expected[index]) and scaled.__dict__["built"] is None
    expected[:, :, 1:2, 1:2] += point.weight
    assert torch.allclose(total.weight, expected, rtol=1e-14, atol=0) and torch.equal(total.bias, shift)


def test_a_sum_that_a_larger_sum_takes_in_is_never_built() -> None:
    """`a + b + c` is two sums: the inner one's parts go straight into the outer kernel (also at an offset,
    inside a wider kernel), and sampled rows of either equal the built kernel's."""
    from repfuse import kernels as K

    g = torch.Generator().manual_seed(11)
    c = 24

    def conv(k: int) -> K.ConvOp:
        return K.conv_op(torch.randn(c, c, k, k, generator=g, dtype=torch.float64),
                         torch.randn(c, generator=g, dtype=torch.float64), 1, (k // 2, k // 2), 1, 1)

    dense, point, wide = conv(3), conv(1), conv(5)
    inner, _ = K.parallel_sum([point, dense])
    outer, _ = K.parallel_sum([inner, K.identity_op(c, 2)])
    widest, _ = K.parallel_sum([inner, wide])
    assert isinstance(inner, K.SumOp) and isinstance(outer, K.SumOp) and isinstance(widest, K.SumOp)
    expected = dense.weight.clone()
    expected[:, :, 1:2, 1:2] += point.weight
    with_identity = expected.clone()
    with_identity[:, :, 1, 1] += torch.eye(c, dtype=torch.float64)
    with_wide = wide.weight.clone()
    with_wide[:, :, 1:4, 1:4] += expected
    index = torch.tensor([0, 7, c - 1])
    for op, kernel, bias in ((outer, with_identity, dense.bias + point.bias),
                             (widest, with_wide, dense.bias + point.bias + wide.bias)):
        assert torch.allclose(K.rows(op, index), kernel[index], rtol=1e-14, atol=1e-15)
        assert op.__dict__["built"] is None
        assert torch.allclose(op.weight, kernel, rtol=1e-14, atol=1e-15) and torch.allclose(op.bias, bias)
    assert inner.__dict__["built"] is None  # written twice into larger kernels, never on its own
    K.release(outer)
    assert outer.__dict__["built"] is None and torch.allclose(outer.weight, with_identity, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype, trials", [(torch.float32, 1), (torch.float64, 1), (torch.float16, 3),
                                           (torch.bfloat16, 3)])
def test_trials_default_to_one_where_the_float64_check_decides(tmp_path: Path, dtype: torch.dtype,
                                                               trials: int) -> None:
    """One seeded input per shape set decides exactness; half precision, whose rounding is within a factor
    of ten of its tolerance, and two checkpoints compared as stored get three. A given number is kept."""
    torch.manual_seed(0)
    model = randomize_bn(repvgg_tiny(), 6).eval().to(dtype)
    src = tmp_path / "in.pt"
    torch.save(model, src)
    report = api.verify_file(src, Options(input_shapes=((1, 3, 32, 32),)))
    assert report.verification is not None and report.verification.passed
    assert report.verification.trials == trials
    chosen = api.verify_file(src, Options(input_shapes=((1, 3, 32, 32),), trials=2))
    assert chosen.verification is not None and chosen.verification.trials == 2
    if dtype == torch.float32:
        out = tmp_path / "out.pt"
        api.convert_file(src, out, Options(input_shapes=((1, 3, 32, 32),)))
        against = api.verify_file(src, Options(input_shapes=((1, 3, 32, 32),)), against=out)
        assert against.verification is not None and against.verification.trials == 3
