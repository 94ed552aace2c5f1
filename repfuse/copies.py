"""Working copies of a model for the rewrite: float64 for the analysis and the exactness check, and back
in each tensor's own dtype for the deploy model. Split from `rewrite`."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .leftovers import count_kinds

DtypeMap = dict[tuple[int, str], torch.dtype]  # (id(module), tensor name) → dtype (as analysis.DtypeMap)


def float64_copy(model: nn.Module) -> tuple[nn.Module, DtypeMap]:
    """A deep copy of `model` whose floating parameters and buffers are float64 (what
    ``deepcopy(model).double()`` gives, without the intermediate copy in the model's own dtype), and the
    dtype every tensor of the copy had before, keyed by its owner module in the copy and its name (ids of
    tensors do not survive the rewrite, which replaces modules)."""
    memo: dict[int, Any] = {}
    for m in model.modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None and p.is_floating_point() and id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach().double(), requires_grad=p.requires_grad)
        for b in m._buffers.values():
            if b is not None and b.is_floating_point() and id(b) not in memo:
                memo[id(b)] = b.double()
    work = copy.deepcopy(model, memo)
    dtypes = {(id(w), name): t.dtype
              for o, w in zip(model.modules(remove_duplicate=False), work.modules(remove_duplicate=False))
              for store in (o._parameters, o._buffers) for name, t in store.items() if t is not None}
    return work, dtypes


def cast_copy(model: nn.Module, dtypes: DtypeMap) -> nn.Module:
    """A deep copy of the float64 `model` with every tensor back in the dtype it had before the float64
    working copy (`dtypes`); `model` itself stays float64 (the twin the exactness check runs)."""
    memo: dict[int, Any] = {}
    for m in model.modules(remove_duplicate=False):
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                dtype = dtypes.get((id(m), name))
                if t is None or dtype is None or t.dtype == dtype or id(t) in memo:
                    continue
                cast = t.detach().to(dtype)
                memo[id(t)] = nn.Parameter(cast, requires_grad=t.requires_grad) if store is m._parameters else cast
    return copy.deepcopy(model, memo)


def count_layers(model: nn.Module) -> tuple[int, int]:
    """(conv and linear layers, normalisation layers) in a model (see leftovers.count_kinds)."""
    kinds = count_kinds(model)
    return kinds["convs"] + kinds["linears"], kinds["norms"]


