"""fp16 models in trainer-style containers ({"model": None, "ema": <model .half()>, ...}): repfuse must fuse
them in the dtypes they compute in. The rule under test: a value cast with `.to(x.dtype)` takes x's dtype
in the model's own precision (fp16), not the float64 that x has in repfuse's analysis copy, so a float32
constant cast to the activation's dtype leaves the following fused layers in fp16."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from repfuse import api
from repfuse.samples import randomize_bn
from repfuse.types import Options


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PosAdd(nn.Module):
    """Adds a position table built in float32 and cast to the input's dtype (`.to(x.dtype)`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        like = x.new_zeros(1, dtype=torch.float32)
        grid = torch.arange(h * w).type_as(like).reshape(1, 1, h, w) / (h * w)
        return x + torch.sin(grid).to(x.dtype)


class PosNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.pos = PosAdd()
        self.body = nn.Sequential(conv_bn(8, 8), conv_bn(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.pos(self.stem(x)))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(PosNet(), seed).eval()


def _floating_dtypes(m: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()}


def test_fp16_ema_in_trainer_dict_converts_and_stays_fp16(tmp_path: Path) -> None:
    model = _model()
    src, out = tmp_path / "last.pt", tmp_path / "deploy.pt"
    torch.save({"model": None, "ema": _model().half(), "epoch": 3, "updates": 10}, src)
    report = api.convert_file(src, out, Options(input_shapes=((2, 3, 12, 10),), allow=(__name__,)))
    assert report.verification is not None and report.verification.passed
    written = torch.load(out, weights_only=False)
    assert isinstance(written, dict) and written["epoch"] == 3 and written["updates"] == 10
    deploy = written["ema"]
    assert _floating_dtypes(deploy) == {torch.float16}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in deploy.modules()) == 3
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad():
        got = deploy(x.half())
        ref = model.half()(x.half())  # the original in its own precision
        ref32 = _model().float()(x)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got.float(), ref32, rtol=2e-2, atol=2e-2)


def test_fp16_cast_to_activation_dtype_keeps_fused_layers_fp16() -> None:
    half = _model(1).half()
    result = api.fuse(half, Options(input_shapes=((1, 3, 9, 11),)))
    for name, m in result.model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert _floating_dtypes(m) == {torch.float16}, name
    assert not result.skipped or all("dtype" not in s.reason for s in result.skipped)
