"""Writing the deploy artifact OUT in the format its suffix names, each checked by loading it back
(the api's last stage). Never prints."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, export, keymap, verify
from . import io as rio
from . import report as rpt
from .types import Options, RepfuseError, Report


@dataclass
class Deployed:
    """What gets written: the deploy model (repfuse's, or the user's --deploy-model with the fused
    weights mapped onto it), its float64 twin for the exactness check, and the key map if any."""

    model: nn.Module
    model64: nn.Module | None  # None: no float64 twin, the float64 figure is reported but does not decide
    keymap: keymap.KeyMap | None = None
    spec: str | None = None  # the --deploy-model MODULE:CALLABLE


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def write(fmt: str, dst: Path, loaded: rio.LoadedCheckpoint, deployed: Deployed, report: Report,
           inputs: tuple[torch.Tensor, ...], bounds: rio.Limits | None = None,
           options: Options | None = None, reference: list[torch.Tensor] | None = None,
           check: tuple[tuple[torch.Tensor, ...], int] | None = None) -> dict[str, Any]:
    """Write OUT in `fmt` (a program is exported on `inputs`); every writer checks the written file
    before it replaces `dst`. A `.pt` holds the deploy model (in the input's container) unless the
    weights go into the user's --deploy-model: then its state_dict, under its key names. The model
    loaded back from a `.pt` must reproduce the deploy model exactly on `check` (inputs, seed; default:
    `inputs` and the options' seed): `reference` is the deploy model's output tensors there (computed
    here when not given)."""
    options = options or Options()
    check_inputs, seed = check if check is not None else (inputs, options.seed)
    extra: dict[str, Any] = {}
    if deployed.spec:
        extra["deploy_model"] = deployed.spec
    if fmt == "safetensors":
        state = _state_dict(deployed.model)
        return {**export.write_safetensors(state, dst, _metadata(loaded, deployed, report, inputs),
                                           inputs=(loaded.path,)), **extra}
    if fmt == "pt2":
        return {**export.write_pt2(deployed.model, inputs, dst, (loaded.path,), dynamic=not options.static),
                **extra}
    if fmt == "onnx":
        return {**export.write_onnx(deployed.model, inputs, dst, (loaded.path,), dynamic=not options.static,
                                    opset=options.opset), **extra}
    given = reference

    def reproduces(got: list[torch.Tensor]) -> None:  # a given reference may come from a counted run
        if given is None or not _equal(given, got):
            _same(verify.run(deployed.model, check_inputs, seed=seed), got, dst)

    if deployed.keymap is None:  # the input's container, the model (or the weights) replaced by the deploy model
        if loaded.kind == "state_dict":  # its classes come from the --model the user named: they load with it
            loaded = replace(loaded, allow=(*loaded.allow, *_class_modules(deployed.model)))

        def check_model(tmp: Path) -> None:
            again = rio.load_checkpoint(tmp, allow=loaded.allow, trust=loaded.trust, limits=bounds)
            reproduces(verify.run(again.model.eval(), check_inputs, seed=seed))

        digest = rio.save_checkpoint(loaded, deployed.model, dst, check=check_model, limits=bounds)
        return {"sha256": digest, "content": "model", **extra,
                "check": "reloaded with torch.load(weights_only=True); outputs identical"}
    # a state_dict in, or the user's deploy model: the input's container, the state_dict replaced
    state = _state_dict(deployed.model)

    def check_state(tmp: Path) -> None:
        obj, _ = rio.load_object(tmp, allow=loaded.allow, trust=loaded.trust, limits=bounds)
        again = obj if loaded.key is None else obj[loaded.key]
        if set(again) != set(state) or any(again[k].dtype != v.dtype or not torch.equal(again[k], v)
                                           for k, v in state.items()):
            raise RepfuseError(f"{dst.name} does not hold the deploy state_dict after writing it", _BUG_HINT)
        model = copy.deepcopy(deployed.model)
        model.load_state_dict(again, strict=True)
        reproduces(verify.run(model.eval(), check_inputs, seed=seed))

    obj = rio.replace_in_container(loaded.container, loaded.key, state)
    digest = rio.save_object(obj, dst, inputs=(loaded.path,), allow=loaded.allow, trust=loaded.trust,
                             check=check_state, limits=bounds)
    return {"sha256": digest, "content": "state_dict", "container_key": loaded.key, **extra,
            "check": "reloaded with torch.load(weights_only=True); every tensor identical; outputs identical"}


_BUG_HINT = "this is a bug in repfuse; please report it with REPFUSE_DEBUG=1 output"


def _class_modules(model: nn.Module) -> tuple[str, ...]:
    """The modules defining `model`'s classes, outside torch and repfuse (allowed by default)."""
    names = {type(m).__module__ for m in model.modules()}
    return tuple(sorted(n for n in names if n.split(".")[0] not in ("torch", "repfuse", "builtins", "__main__")))


def _equal(reference: list[torch.Tensor], got: list[torch.Tensor]) -> bool:
    """The same tensors bit for bit, a NaN matching a NaN in the same place (torch.equal says NaN ≠ NaN:
    a model whose outputs hold NaN would never reproduce itself)."""
    return len(reference) == len(got) and all(_bitwise(p, q) for p, q in zip(reference, got))


def _bitwise(p: torch.Tensor, q: torch.Tensor) -> bool:
    if p.dtype != q.dtype or p.shape != q.shape or p.device != q.device:
        return False
    if not p.is_floating_point() and not p.is_complex():
        return torch.equal(p, q)
    nan = p.isnan()
    return torch.equal(nan, q.isnan()) and torch.equal(p.masked_fill(nan, 0), q.masked_fill(nan, 0))


def _same(reference: list[torch.Tensor], got: list[torch.Tensor], dst: Path) -> None:
    if not _equal(reference, got):
        raise RepfuseError(f"{dst.name} does not reproduce the converted model after loading it back; "
                           "nothing was written", _BUG_HINT)


def _metadata(loaded: rio.LoadedCheckpoint, deployed: Deployed, report: Report,
              inputs: tuple[torch.Tensor, ...]) -> dict[str, str]:
    """safetensors metadata (strings only). Everything in it is reproducible: the embedded report
    leaves out the timings and the output (whose checksum cannot be inside the file)."""
    embedded = replace(report, output={"format": "safetensors"}, timings={})
    meta = {
        "format": "pt",
        "repfuse_version": __version__,
        "report": rpt.to_json(embedded, indent=None),
        "input_shape": json.dumps([list(x.shape) for x in inputs]),
        "input_sha256": loaded.sha256,
        "keys": (f"deploy model {deployed.spec}" if deployed.spec else
                 "repfuse deploy model (GraphBlock structure is not stored: rebuild it with repfuse)"),
    }
    if loaded.factory:
        meta["model"] = loaded.factory
    if deployed.keymap is not None:
        meta["deploy_model"] = deployed.spec or ""
        meta["keymap"] = json.dumps(deployed.keymap.mapping)
    return meta
