"""Many traces in a row (graph.batched_tracing): a trace inside it assigns nothing to nn.Module, gives the
same graph as a trace outside it, and leaves nn.Module as it was — also when a trace fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repfuse import graph

ORIGINAL_CALL, ORIGINAL_GETATTR = nn.Module.__call__, nn.Module.__getattr__
seen: list[object] = []


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen.append(nn.Module.__dict__["__call__"])  # what nn.Module holds while this trace runs
        return self.bn(self.conv(x)) + x * self.conv.weight.shape[0]


class Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # input-dependent control flow
            return x
        return -x


def _code(module: nn.Module) -> str:
    traced = graph.trace(module)
    assert traced.gm is not None
    return traced.gm.code


def test_a_batched_trace_assigns_nothing_to_nn_module_and_gives_the_same_graph() -> None:
    block = Block()
    seen.clear()
    plain = _code(block)
    assert seen and seen[-1] is not ORIGINAL_CALL  # fx patched nn.Module itself for that trace
    seen.clear()
    with graph.batched_tracing():
        batched = [_code(block), _code(Block())]
    assert seen and all(s is graph._forward_call for s in seen) == graph._BATCHING
    assert batched[0] == plain and batched[1] == plain
    assert nn.Module.__call__ is ORIGINAL_CALL and nn.Module.__getattr__ is ORIGINAL_GETATTR


def test_a_failing_trace_or_an_error_leaves_nn_module_as_it_was() -> None:
    block, x = Block().eval(), torch.randn(1, 4, 5, 5)
    outside = block(x)
    with graph.batched_tracing():
        assert graph.trace(Untraceable()).gm is None
        assert graph._SLOTS == {"__getattr__": None, "__call__": None}
        assert torch.equal(block(x), outside)  # modules still run eagerly, through the forwarding functions
    with pytest.raises(RuntimeError), graph.batched_tracing():
        raise RuntimeError("boom")
    assert nn.Module.__call__ is ORIGINAL_CALL and nn.Module.__getattr__ is ORIGINAL_GETATTR
    assert graph._SLOTS == {"__getattr__": None, "__call__": None}


class ReadsChild(nn.Module):
    """Its graph depends on a child's plain attribute, a child's tensor shape and a value of its own."""

    def __init__(self, k: int, c: int = 4, sign: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, c, k, padding=k // 2)
        self.sign = nn.Parameter(torch.tensor(sign))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.conv.kernel_size[0] > 1:  # a child's attribute
            y = y * 2
        if self.conv.weight.shape[0] > 4:  # a child's tensor shape
            y = y[:, :4]
        if self.sign > 0:  # a value of its own tensor
            y = -y
        return y + x


@pytest.mark.parametrize("other", [dict(k=1), dict(k=3, c=8), dict(k=3, sign=-1.0)])
def test_modules_traced_once_per_build_not_per_class(other: dict) -> None:
    """A trace is reused only for a module built alike: another child setting, child shape or value read in
    Python gives its own graph, the same as a trace outside the batch."""
    first, second = ReadsChild(3), ReadsChild(**other)
    with graph.batched_tracing():
        codes = [_code(first), _code(second), _code(ReadsChild(3))]
    assert codes[0] == _code(first) and codes[1] == _code(second) and codes[2] == codes[0]
    assert codes[1] != codes[0]
    x = torch.randn(2, 4, 5, 5)
    with graph.batched_tracing():
        traced = graph.trace(second).gm
    assert traced is not None and torch.equal(traced(x), second(x))
