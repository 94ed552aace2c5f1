"""Helpers shared by the engine tests: randomise a train-time model, fuse it, and check the result.

Every fixture goes through `randomize` (BN statistics and affine parameters, layer scales: never the
defaults, which would hide a wrong fusion) and every check compares numbers in float64 twice: once with
`repfuse.verify.compare` and once independently, here, on inputs verify never sees.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from repfuse import api, verify
from repfuse.api import FuseResult
from repfuse.samples import randomize_bn
from repfuse.types import Options

CONVS = nn.modules.conv._ConvNd
BNS = nn.modules.batchnorm._BatchNorm
EXACT = 1e-9  # float64 relative error of a correct fusion is ~1e-15; a wrong one is ~1e-1


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics / affine params via `randomize_bn`; every other parameter that is not a conv or
    linear weight (layer scales, learnable gains) gets random non-trivial values. Returns model.eval()."""
    randomize_bn(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, (CONVS, nn.Linear, BNS)):
            continue
        for p in m.parameters(recurse=False):
            sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
            p.copy_((sign * (0.5 + torch.rand(p.shape, generator=gen))).to(p.dtype))
    assert_not_default(model)
    return model.eval()


def assert_not_default(model: nn.Module) -> None:
    """No BN of `model` keeps γ=1, β=0, μ=0, σ²=1."""
    for name, m in model.named_modules():
        if not isinstance(m, BNS):
            continue
        if m.running_var is not None:
            assert not torch.allclose(m.running_var.float(), torch.ones_like(m.running_var.float())), name
            assert not torch.allclose(m.running_mean.float(), torch.zeros_like(m.running_mean.float())), name
        if m.weight is not None:
            assert not torch.allclose(m.weight.float(), torch.ones_like(m.weight.float())), name
            assert not torch.allclose(m.bias.float(), torch.zeros_like(m.bias.float())), name


def count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def flat(out: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def float64_rel_error(original: nn.Module, fused64: nn.Module, shape: tuple[int, ...], seed: int = 1234) -> float:
    """Independent float64 check: max |fused − original| / max |original| on a fresh random input."""
    a, b = copy.deepcopy(original).double().eval(), copy.deepcopy(fused64).double().eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        ra, rb = flat(a(x)), flat(b(x))
    assert len(ra) == len(rb)
    err = scale = 0.0
    for p, q in zip(ra, rb):
        assert p.shape == q.shape
        err = max(err, float((p - q).abs().max()))
        scale = max(scale, float(p.abs().max()))
    return err / max(scale, 1e-300)


def assert_deploy_runs(original: nn.Module, deploy: nn.Module, shape: tuple[int, ...], seed: int = 4321) -> None:
    """The deploy model itself (not its float64 twin) runs in the model's dtype, returns that dtype, and agrees
    with the original within the dtype's default tolerances (verify.compare never runs it for float64 models)."""
    dtype = verify.model_dtype(original)
    atol, rtol = verify.default_tolerances(dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        ref, out = flat(original(x)), flat(deploy(x))
    assert len(ref) == len(out)
    for r, o in zip(ref, out):
        assert o.dtype == r.dtype and o.shape == r.shape
        scale = float(r.double().abs().max())
        assert float((o.double() - r.double()).abs().max()) <= atol + 2 * rtol * scale


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fuse_checked(model: nn.Module, shape: tuple[int, ...], *, convs: int | None = None, norms: int | None = 0,
                 linears: int | None = None, keep: Iterable[str] = (), randomise: bool = True,
                 dtype: torch.dtype | None = None, seed: int = 0) -> FuseResult:
    """Randomise, (cast), fuse with input shape `shape`, and check:

    - verify.compare passes and its float64 relative error is < 1e-9; the same holds independently;
    - the deploy model has `convs` ConvNd, `norms` BatchNorm, `linears` Linear modules (None: unchecked);
    - every state_dict entry of the original under a prefix in `keep` is in the deploy model, unchanged;
    - the original model itself is left untouched.
    """
    if randomise:
        randomize(model, seed)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    before = state(model)
    result = api.fuse(model, Options(input_shapes=(shape,)))
    ver = verify.compare(model, result.model, result.input_shapes, atol=None, rtol=None, trials=2, seed=0,
                         fused64=result.fused64)
    assert ver.passed, f"{ver.message}; sites={result.sites}; skipped={result.skipped}"
    assert ver.exact_max_rel_error < EXACT, ver
    assert float64_rel_error(model, result.fused64, shape) < EXACT
    assert_deploy_runs(model, result.model, shape)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), \
        "api.fuse modified the original model"
    deploy = result.model
    got = {"convs": count(deploy, CONVS), "norms": count(deploy, BNS), "linears": count(deploy, nn.Linear)}
    want = {"convs": convs, "norms": norms, "linears": linears}
    for what, n in want.items():
        assert n is None or got[what] == n, (f"expected {n} {what} in the deploy model, got {got[what]}; "
                                             f"sites={result.sites}; skipped={result.skipped}; "
                                             f"notes={result.notes}\n{deploy}")
    assert_kept(before, deploy, keep)
    return result


def assert_kept(before: dict[str, torch.Tensor], deploy: nn.Module, prefixes: Iterable[str]) -> None:
    """Every original state_dict entry under each prefix is in the deploy model with the same key and value."""
    after = deploy.state_dict()
    for prefix in prefixes:
        keys = [k for k in before if k.startswith(prefix + ".")]
        assert keys, f"no state_dict keys under {prefix!r} in the original model"
        for k in keys:
            assert k in after, f"key {k} of an untouched layer is missing from the deploy model: {list(after)}"
            assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k


def skipped_reasons(result: FuseResult) -> dict[str, str]:
    return {s.module: s.reason for s in result.skipped}


class ToNHWC(nn.Module):
    """A layout-only module, as UniRepLKNet's NCHWtoNHWC."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToNCHW(nn.Module):
    """A layout-only module, as UniRepLKNet's NHWCtoNCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """FLOPs of one forward on a random input of `shape` (torch.utils.flop_counter)."""
    x = torch.randn(shape, dtype=next(model.parameters()).dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def assert_adds_nothing(original: nn.Module, deploy: nn.Module, shape: tuple[int, ...]) -> None:
    """repfuse never adds a layer: no more modules of any kind, and no more FLOPs, than the original."""
    assert len(list(deploy.modules())) <= len(list(original.modules())), deploy
    assert macs(deploy, shape) <= macs(original, shape), deploy
