"""Deploy artifacts other than `.pt`: `.safetensors` (weights + metadata), `.pt2` (torch.export
program) and `.onnx` (optional extra ``repfuse[onnx]``).

Every writer goes through `io.atomic_write`: it writes a temporary file, loads that file back and
checks it (tensors bit for bit; programs by running them on the verification inputs), and only
then renames it over the destination. Never prints.
"""

from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io as rio
from . import programs, verify
from .types import RepfuseError

__all__ = [
    "FORMATS",
    "check_available",
    "output_format",
    "safetensors_bytes",
    "write_onnx",
    "write_pt2",
    "write_safetensors",
]

export_program = programs.export_program  # kept here for callers of the old name

FORMATS: dict[str, str] = {  # OUT suffix → format
    ".pt": "pt", ".pth": "pt", ".bin": "pt", ".ckpt": "pt",
    ".safetensors": "safetensors",
    ".pt2": "pt2",
    ".onnx": "onnx",
}
ONNX_MODULES = ("onnx", "onnxscript")  # torch.onnx.export (dynamo) needs both; onnxruntime only checks
_BUG_HINT = "this is a bug in repfuse or in the exporter; please report it (REPFUSE_DEBUG=1 shows the details)"


def output_format(path: Path | str) -> str:
    """'pt', 'safetensors', 'pt2' or 'onnx' from OUT's suffix; RepfuseError for anything else."""
    suffix = Path(path).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        known = ", ".join(FORMATS)
        raise RepfuseError(f"unknown output format {suffix or '(no extension)'!r} for {Path(path).name}",
                           f"name OUT with one of: {known}")
    return fmt


def check_available(fmt: str) -> None:
    """RepfuseError naming the extra to install when a format's optional packages are missing."""
    if fmt != "onnx":
        return
    missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise RepfuseError(f".onnx output needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                           "not installed",
                           'install the extra: pip install "repfuse[onnx]" (onnx, onnxscript, onnxruntime)')


# ------------------------------------------------------------------------------------------------
# checks shared by the writers


def _close(reference: list[torch.Tensor], got: list[torch.Tensor], what: str, dst: Path) -> float:
    """Max abs difference of `got` from `reference`; RepfuseError beyond the dtype's tolerance."""
    if len(reference) != len(got) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(reference, got)):
        raise RepfuseError(f"{dst.name}: {what} gives outputs of other shapes than the deploy model", _BUG_HINT)
    err = scale = 0.0
    for a, b in zip(reference, got):
        if a.numel() == 0:
            continue
        d = (a.double() - b.double()).abs()
        err = max(err, float("inf") if torch.isnan(d).any() else float(d.max()))
        scale = max(scale, float(a.double().abs().max()))
    atol, rtol = verify.default_tolerances(reference[0].dtype if reference else torch.float32)
    if not err <= atol + rtol * scale:
        raise RepfuseError(f"{dst.name}: {what} does not reproduce the deploy model (outputs differ by {err:.3g}, "
                           f"tolerance {atol + rtol * scale:.3g}); nothing was written", _BUG_HINT)
    return err


# ------------------------------------------------------------------------------------------------
# .safetensors


def _canonical_safetensors(raw: bytes) -> bytes:
    """Rewrite a safetensors header in a fixed order (metadata keys sorted, tensors by offset).

    The safetensors library serialises the metadata from a hash map, so its order (and the file's
    bytes) can change from one process to the next; the data section is untouched.
    """
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered: dict[str, Any] = {}
    if meta is not None:
        ordered["__metadata__"] = dict(sorted(meta.items()))
    for name, info in sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])):
        ordered[name] = info
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def safetensors_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors encoding of `state` (tensors copied to contiguous CPU memory, so shared or
    strided tensors are fine) with `metadata`, byte-for-byte reproducible."""
    from safetensors.torch import save

    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise RepfuseError(f"the deploy state_dict holds non-tensor values ({', '.join(bad[:4])}), which "
                           "safetensors cannot store", "write a .pt file instead")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    return _canonical_safetensors(save(tensors, metadata=dict(metadata)))


def write_safetensors(state: Mapping[str, torch.Tensor], dst: Path | str, metadata: Mapping[str, str],
                      inputs: Sequence[Path | str] = ()) -> dict[str, Any]:
    """Write `state` and `metadata` to `dst` atomically; load it back and compare every tensor bit
    for bit (and the metadata) before it replaces `dst`. Returns the report's output fields."""
    from safetensors import safe_open

    dst = rio.check_destination(dst, *inputs)
    data = safetensors_bytes(state, metadata)

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    def check(tmp: Path) -> None:
        with safe_open(str(tmp), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(state) or (f.metadata() or {}) != dict(metadata):
                raise RepfuseError(f"{dst.name} does not hold the deploy state_dict after writing it", _BUG_HINT)
            for k in keys:
                t, ref = f.get_tensor(k), state[k]
                if t.dtype != ref.dtype or not torch.equal(t, ref.detach().cpu()):
                    raise RepfuseError(f"{dst.name}: tensor {k} differs after loading it back", _BUG_HINT)

    digest = rio.atomic_write(dst, write, check)
    return {"sha256": digest, "tensors": len(state), "check": "reloaded with safetensors; every tensor identical"}


# ------------------------------------------------------------------------------------------------
# torch.export (.pt2) and ONNX


def _reference(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> list[list[torch.Tensor]]:
    return [verify.run(model, x) for x in batches]


def _batches(model: nn.Module, ep: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...],
             dims: programs.Dims) -> list[tuple[torch.Tensor, ...]]:
    """The verification inputs, and (a dynamic program) the first inputs at another size that both
    the deploy model and the program run on (a program may bound a size the model's ops need)."""
    if not any(dims):
        return [inputs]
    with programs.quiet():
        program = ep.module()
    for other in programs.other_sizes(inputs, dims):
        try:
            verify.run(model, other)
            with programs.quiet():
                verify.run(program, other)
        except Exception:
            continue
        return [inputs, other]
    return [inputs]


def _shape_fields(dims: programs.Dims, batches: list[tuple[torch.Tensor, ...]]) -> dict[str, Any]:
    return {"dynamic_batch": any(0 in d for d in dims), "dynamic_dims": dims,
            "checked_shapes": programs.checked_shapes(batches)}


def write_pt2(model: nn.Module, inputs: tuple[torch.Tensor, ...], dst: Path | str,
              sources: Sequence[Path | str] = (), dynamic: bool = True) -> dict[str, Any]:
    """Export `model` with torch.export (dynamic batch and spatial sizes unless `dynamic=False`, see
    `programs`) and save the program to `dst` atomically. The written file is loaded back with
    `torch.export.load` and run on `inputs` and, when dynamic, at another batch and size, against
    the deploy model, before it replaces `dst`. Returns the report's output fields."""
    dst = rio.check_destination(dst, *sources)
    ep = programs.export_program(model, inputs, dynamic)
    dims = programs.dynamic_dims(ep)
    batches = _batches(model, ep, inputs, dims)
    refs = _reference(model, batches)
    errors: list[float] = []

    def write(tmp: Path) -> None:
        # into memory first: torch's zip writer, when a write to the file fails (a full disk, a size
        # limit), throws again from its destructor later and aborts the process
        buffer = io.BytesIO()
        with programs.quiet():
            torch.export.save(ep, buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())

    def check(tmp: Path) -> None:
        with programs.quiet():
            loaded = torch.export.load(str(tmp)).module()
        errors.extend(_close(ref, verify.run(loaded, x), "the exported program", dst) for ref, x in zip(refs, batches))

    digest = rio.atomic_write(dst, write, check)
    return {"sha256": digest, **_shape_fields(dims, batches), "max_abs_error": max(errors, default=0.0),
            "check": "reloaded with torch.export.load and run on the verification inputs"
            + (" and at another batch and size" if len(batches) > 1 else "")}


def _onnx_feed(session: Any, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    return {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}


def write_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], dst: Path | str,
               sources: Sequence[Path | str] = (), dynamic: bool = True, opset: int | None = None) -> dict[str, Any]:
    """Export `model` to ONNX (torch.onnx, dynamo exporter, from the torch.export program: dynamic
    sizes as for `write_pt2`; `opset` or the exporter's default) and save it to `dst` atomically, as
    one file. Checked before it replaces `dst`: `onnx.checker`, then, when onnxruntime is installed,
    run on `inputs` (and at another batch and size when dynamic) and compared with the deploy model."""
    check_available("onnx")
    dst = rio.check_destination(dst, *sources)
    ep = programs.export_program(model, inputs, dynamic)
    dims = programs.dynamic_dims(ep)
    try:
        with programs.quiet():
            kwargs: dict[str, Any] = {"dynamo": True, "verbose": False, "optimize": True}
            if opset is not None:
                kwargs["opset_version"] = opset
            program = torch.onnx.export(ep, _sample_for(ep, inputs), **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RepfuseError(f"torch.onnx could not export the deploy model: {type(exc).__name__}: {first}",
                           "write a .pt2 (torch.export) or .safetensors file instead"
                           + ("; or try another --opset" if opset is not None else "")) from exc
    runtime = importlib.util.find_spec("onnxruntime") is not None
    bf16 = any(x.dtype == torch.bfloat16 for x in inputs)
    batches = _batches(model, ep, inputs, dims) if runtime and not bf16 else [inputs]
    info: dict[str, Any] = {"opset": None, "runtime": None, **_shape_fields(dims, batches)}

    def write(tmp: Path) -> None:
        with programs.quiet():
            program.save(str(tmp), external_data=False)

    def check(tmp: Path) -> None:
        import onnx

        try:
            onnx.checker.check_model(str(tmp))
            proto = onnx.load(str(tmp), load_external_data=False)
        except Exception as exc:
            raise RepfuseError(f"{dst.name}: the exported ONNX model does not pass onnx.checker: {exc}",
                               _BUG_HINT) from exc
        info["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if not runtime or bf16:
            return
        import onnxruntime as ort

        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        errors = []
        for x in batches:
            got = [torch.from_numpy(a) for a in session.run(None, _onnx_feed(session, x))]
            errors.append(_close(verify.run(model, x), got, "onnxruntime", dst))
        info["max_abs_error"] = max(errors, default=0.0)
        info["runtime"] = f"onnxruntime {ort.__version__}"

    digest = rio.atomic_write(dst, write, check)
    if info["runtime"]:
        how = f"onnx.checker, then run with {info['runtime']} on the verification inputs"
        how += " and at another batch and size" if len(batches) > 1 else ""
    elif bf16:
        how = "onnx.checker only (bfloat16 inputs cannot be fed to onnxruntime from numpy)"
    else:
        how = "onnx.checker only (onnxruntime is not installed)"
    return {"sha256": digest, **info, "check": how}


def _sample_for(ep: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return programs._sample(inputs) if any(programs.dynamic_dims(ep)) else inputs
