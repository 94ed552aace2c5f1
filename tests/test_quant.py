"""Quantization readiness (repfuse.quant): data-free INT8 figures of the deploy weights.

Fixtures are small RepVGG-style nets with randomised BN statistics; the hostile ones get one BN
channel with a tiny running variance. Figures are checked against an independent computation
(explicit round-and-clamp, not torch's fake-quantize kernels)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from repfuse import api, quant, verify
from repfuse.samples import RepVGGBlock, acnet_tiny, randomize_bn
from repfuse.types import Options

SHAPE = (2, 3, 33, 33)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread: None) -> None:
    return None


def net(seed: int) -> nn.Module:
    """Three RepVGG blocks without identity (3×3+1×1, BN×2), an untouched conv, a linear head."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        RepVGGBlock(3, 16, stride=2), RepVGGBlock(16, 32, stride=2), RepVGGBlock(32, 24, stride=2),
        nn.Conv2d(24, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    )
    return randomize_bn(model, seed + 100).eval()


def hostile(seed: int, block: int = 1, channel: int = 7, var: float = 1e-6) -> nn.Module:
    model = net(seed)
    with torch.no_grad():
        model[block].rbr_dense.bn.running_var[channel] = var
    return model


def fused(model: nn.Module) -> api.FuseResult:
    return api.fuse(model, Options(input_shapes=(SHAPE,), verify_shapes=()))


def by_module(q: quant.QuantReport) -> dict[str, quant.LayerQuant]:
    return {layer.module: layer for layer in q.layers}


# -- independent reference ---------------------------------------------------------------------


def ref_quant(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    x = w.detach().double().reshape(w.shape[0], -1)
    amax = x.abs().amax(dim=1, keepdim=True) if per_channel else x.abs().max().expand(x.shape[0], 1)
    scale = (amax.float() / 127).double()  # torch keeps the scale in float32
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(x.float().double() / scale), -127, 127) * scale).reshape(w.shape)


def ref_sqnr(x: torch.Tensor, q: torch.Tensor) -> float:
    x = x.double().flatten()
    return 10 * math.log10(float(x.pow(2).sum()) / float((x - q.double().flatten()).pow(2).sum()))


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hostile_bn_channel_is_found_with_its_cause(seed: int) -> None:
    block, channel = 1, 5 + seed
    model = hostile(seed, block, channel)
    result = fused(model)
    q = quant.analyse(result.model, result.sites, model)
    flagged = [layer.module for layer in q.flagged]
    site = next(s for s in result.sites if s.module.startswith(f"{block}."))
    assert flagged == [site.module], flagged
    layer = by_module(q)[site.module]
    top = layer.worst_channels[0]
    assert top.channel == channel
    assert top.norm == f"{block}.rbr_dense.bn"
    assert top.running_var == pytest.approx(1e-6)
    bn = model[block].rbr_dense.bn
    scale = float(bn.weight.detach()[channel].abs() / torch.sqrt(bn.running_var[channel].double() + bn.eps))
    assert top.norm_scale == pytest.approx(scale, rel=1e-9)
    assert f"{block}.rbr_dense.bn" in top.cause and "running_var" in top.cause
    assert top.branch == f"{block}.rbr_dense" and top.branch_share > 0.5
    # per-channel quantization repairs what one per-tensor scale breaks
    assert layer.sqnr_per_channel_db >= quant.WARN_SQNR_DB > layer.int8_db
    diags = quant.diagnostics(q)
    assert [(d.code, d.module, d.level) for d in diags] == [(quant.CODE, site.module, "warning")]
    assert f"channel {channel}" in diags[0].message and "per channel" in diags[0].message
    assert quant.strict_failures(q, quant.WARN_SQNR_DB) and site.module in quant.strict_failures(q, 30)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_friendly_models_get_no_warning(seed: int) -> None:
    for model in (net(seed), randomize_bn(acnet_tiny(), seed).eval()):
        result = fused(model)
        q = quant.analyse(result.model, result.sites, model)
        assert result.sites and all(layer.module for layer in q.layers)
        assert q.flagged == () and quant.diagnostics(q) == ()
        assert quant.strict_failures(q, quant.WARN_SQNR_DB) == ()
        assert all(layer.range_spread_median < 10 for layer in q.layers)


def test_figures_match_an_independent_computation() -> None:
    model = hostile(3, block=2, channel=3, var=1e-5)
    result = fused(model)
    q = quant.analyse(result.model, result.sites, model)
    modules = dict(result.model.named_modules())
    assert {layer.module for layer in q.layers if layer.fused} == {s.module for s in result.sites}
    assert {layer.module for layer in q.layers if not layer.fused} == {"3", "6"}  # untouched conv, linear
    for layer in q.layers:
        w = modules[layer.module].weight.detach()
        a = w.double().abs().reshape(w.shape[0], -1).amax(dim=1)
        assert layer.absmax_max == pytest.approx(float(a.max()))
        assert layer.range_spread == pytest.approx(float(a.max() / a.min()))
        assert layer.range_spread_median == pytest.approx(float(a.max() / a.median()))
        qt, qc = ref_quant(w, False), ref_quant(w, True)
        assert layer.sqnr_per_tensor_db == pytest.approx(ref_sqnr(w, qt), abs=1e-4)
        assert layer.sqnr_per_channel_db == pytest.approx(ref_sqnr(w, qc), abs=1e-4)
        per = sorted(ref_sqnr(w[c], qt[c]) for c in range(w.shape[0]))
        assert layer.channel_sqnr_median_db == pytest.approx(per[(len(per) - 1) // 2], abs=1e-4)
        assert [c.channel for c in layer.worst_channels] == [int(i) for i in a.argsort(descending=True)[:3]]
    worst = by_module(q)[next(s.module for s in result.sites if s.module.startswith("2."))]
    assert worst.flagged and worst.worst_channels[0].channel == 3


def test_fake_quant_uses_torch_primitives_and_keeps_zero_channels() -> None:
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w[2] = 0
    for per_channel in (False, True):
        got = quant.fake_quant(w, per_channel)
        assert torch.equal(got[2], torch.zeros_like(got[2]))
        assert torch.allclose(got.double(), ref_quant(w, per_channel), atol=0, rtol=1e-7)
    layer = quant.layer_figures("x", w, fused=False)
    assert layer.zero_channels == 1 and math.isfinite(layer.range_spread)
    assert quant.layer_figures("z", torch.zeros(3, 2), fused=False).sqnr_per_tensor_db == quant.SQNR_CAP_DB


def test_dominant_identity_branch_is_named() -> None:
    """RepVGG's identity branch (a BN, scale ~1) next to kaiming-initialised 3×3 weights (~0.04): every
    kernel is one large centre tap over small ones, which even per-channel INT8 keeps badly."""
    torch.manual_seed(5)
    model = randomize_bn(nn.Sequential(RepVGGBlock(3, 64, stride=2), RepVGGBlock(64, 64, stride=1)), 6).eval()
    result = api.fuse(model, Options(input_shapes=((2, 3, 17, 17),), verify_shapes=()))
    q = quant.analyse(result.model, result.sites, model)
    site = next(s.module for s in result.sites if s.module.startswith("1."))
    layer = by_module(q)[site]
    assert [x.module for x in q.flagged] == [site]
    assert layer.sqnr_per_channel_db < quant.WARN_SQNR_DB and layer.range_spread_median < 10
    for c in layer.worst_channels:
        assert c.branch == "1.rbr_identity" and c.branch_share > 0.8 and "1.rbr_identity dominates" in c.cause
    assert "even per channel" in quant.diagnostics(q)[0].message


def test_linear_bn_site_and_no_original_model() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(8, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))
    randomize_bn(model, 8)
    with torch.no_grad():
        model[1].running_var[4] = 1e-7
    model.eval()
    result = api.fuse(model, Options(input_shapes=((3, 8),), verify_shapes=()))
    assert result.sites
    q = quant.analyse(result.model, result.sites)  # no train-time model: figures, no cause
    layer = q.flagged[0]
    assert layer.module == result.sites[0].module and layer.worst_channels[0].channel == 4
    assert layer.worst_channels[0].cause == "" and layer.worst_channels[0].norm == ""
    with_cause = quant.analyse(result.model, result.sites, model).flagged[0].worst_channels[0]
    assert with_cause.norm == "1" and "running_var[4]" in with_cause.cause


def test_output_sqnr_against_an_independent_run() -> None:
    model = hostile(4, block=1, channel=2)
    result = fused(model)
    inputs = verify.make_inputs(result.input_shapes, torch.float32, 0)
    o = quant.output_sqnr(result.model, inputs)
    assert o.layers == 5 and o.input_shape == (SHAPE,)
    ref = verify.run(result.model, inputs)
    for per_channel, got_db in ((False, o.per_tensor_db), (True, o.per_channel_db)):
        m = __import__("copy").deepcopy(result.model)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    mod.weight.copy_(ref_quant(mod.weight, per_channel).float())
        out = verify.run(m, inputs)
        assert got_db == pytest.approx(ref_sqnr(ref[0], out[0]), abs=1e-4)
    assert o.per_channel_db > o.per_tensor_db  # the crushed channels come back per channel


def test_json_section_is_plain_and_finite() -> None:
    model = hostile(0)
    result = fused(model)
    q = quant.analyse(result.model, result.sites, model)
    q = quant.QuantReport(q.layers, quant.output_sqnr(result.model, verify.make_inputs((SHAPE,), torch.float32, 0)))
    d = json.loads(json.dumps(quant.to_dict(q), allow_nan=False))
    assert d["flagged"] == [x.module for x in q.flagged] and len(d["flagged"]) == 1
    assert "calibration" in d["activations"] and d["thresholds"]["sqnr_db"] == quant.WARN_SQNR_DB
    row = next(r for r in d["layers"] if r["module"] == d["flagged"][0])
    assert row["flagged"] and row["worst_channels"][0]["channel"] == 7 and row["fused"]
    assert d["output"]["input_shape"] == [list(SHAPE)]

