"""What a deploy model still holds: its layers by kind, the norm layers left in it and why, and which
skipped places are still there after the rewrite. Reads only."""

from __future__ import annotations

from torch import nn

from .types import FusionSite, SkippedSite

CONVS = nn.modules.conv._ConvNd
NORMS = nn.modules.batchnorm._NormBase


def count_kinds(model: nn.Module) -> dict[str, int]:
    """How many conv, linear and norm (BatchNorm/InstanceNorm) layers a model holds."""
    mods = list(model.modules())
    return {"convs": sum(isinstance(m, CONVS) for m in mods), "linears": sum(isinstance(m, nn.Linear) for m in mods),
            "norms": sum(isinstance(m, NORMS) for m in mods)}


def live_skips(skipped: list[SkippedSite], sites: list[FusionSite], deployed: nn.Module) -> list[SkippedSite]:
    """The skipped places that are still there: an entry recorded inside a module that a fused site folded
    in whole after all (DBB's avg-pool branch, too costly alone, fused with the block) is dropped."""
    if any(s.module == "<root>" for s in sites):
        return []  # the whole model is one layer
    whole = tuple(f"{s.module}." for s in sites if any(b.startswith(f"{s.module}.") for b in s.branches))
    folded = {b for s in sites for b in s.branches}
    alive = {p for p, _ in deployed.named_modules()}

    def stale(path: str) -> bool:
        owner = path.rpartition(".")[0]
        return path.startswith(whole) or (bool(owner) and owner not in alive and any(
            b == owner or b.startswith(f"{owner}.") for b in folded))
    return [s for s in skipped if not stale(s.module)]


def norms_left(deployed: nn.Module, skipped: list[SkippedSite], notes: dict[str, str]) -> list[SkippedSite]:
    """A `skipped` entry for every norm layer with running statistics left in `deployed` that has none yet
    (at its own path or a module around it): the deploy model still normalises there, and says why."""
    named = {s.module for s in skipped}
    out = []
    for path, m in deployed.named_modules():
        if not isinstance(m, NORMS) or getattr(m, "running_mean", None) is None:
            continue
        parts = path.split(".")
        owners = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # the norm and every module around it
        if named & owners or "<root>" in named:
            continue
        opaque = next((o for o in sorted(owners | {""}, key=len, reverse=True) if o in notes), None)
        if opaque is not None:
            reason = (f"{type(m).__name__} left: it is inside '{opaque or '<root>'}', which could not be analysed "
                      f"({notes[opaque]})")
        else:
            reason = (f"{type(m).__name__} left: not folded into a conv or linear (none is next to it, past "
                      "pooling, activations or attention, or folding it would not be exact: see the entries near it)")
        out.append(SkippedSite(path, reason))
    return out
