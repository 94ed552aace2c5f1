"""Deploy programs: `torch.export` with dynamic batch and spatial sizes, the other-size inputs they
are checked at, and loading a written `.pt2` / `.onnx` back as something `verify` can run. Never prints.

Dynamic by default: the batch dimension and, for inputs of 3 or more dimensions (N, C, *spatial),
every spatial dimension are `Dim.AUTO`: dynamic where the model allows it, specialised (static)
where it does not. The sample batch is made at least 2 for the export (torch specialises a size
of 1). A dynamic program is checked at the verification inputs and at a batch one larger with
every dynamic spatial size doubled (doubling keeps whatever divisibility the model needs).

Loading a `.pt2` runs pickles inside it (`torch.export.load` uses ``torch.load(weights_only=False)``
for weights and constants), so it needs ``trust=True`` (`--trust`). An `.onnx` runs in onnxruntime.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .types import RepfuseError

__all__ = ["OnnxModule", "ProgramModule", "checked_shapes", "dynamic_dims", "export_program", "load_program",
           "other_sizes", "program_format", "quiet"]

Dims = list[list[int]]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' own warnings and log lines (library code never prints)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx",
                                             "torch._dynamo", "onnxscript", "torch._export.non_strict_utils")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _takes_var_positional(model: nn.Module) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].kind is inspect.Parameter.VAR_POSITIONAL


def _wanted(x: torch.Tensor) -> list[int]:
    """The dimensions asked to be dynamic: the batch, and the spatial ones of an (N, C, *spatial) input."""
    if x.dim() == 0:
        return []
    return [0, *range(2, x.dim())] if x.dim() >= 3 else [0]


def _sample(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs with a batch of at least 2 (torch.export specialises a dimension of size 1)."""
    return tuple(torch.cat([x, x]) if x.dim() > 0 and x.shape[0] == 1 else x for x in inputs)


def export_program(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                   dynamic: bool = True) -> torch.export.ExportedProgram:
    """`torch.export` the deploy model (non-strict): dynamic batch and spatial sizes where the model
    allows it (see the module docstring), static with `dynamic=False`. RepfuseError when it cannot."""
    auto = getattr(torch.export.Dim, "AUTO", None)  # torch < 2.6: a static program
    spec: Any = None
    sample = inputs
    if dynamic and auto is not None:
        sample = _sample(inputs)
        spec = tuple({d: auto for d in _wanted(x)} or None for x in sample)
        if _takes_var_positional(model):  # forward(*args) (a GraphBlock): one entry, for `args`
            spec = (spec,)
    try:
        with quiet(), torch.no_grad():
            return torch.export.export(model.eval(), sample, dynamic_shapes=spec, strict=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RepfuseError(f"torch.export could not export the deploy model: {type(exc).__name__}: {first}",
                           "the model's forward is not exportable as it is (data-dependent control flow, "
                           "Python side effects); write a .pt or .safetensors file instead") from exc


def dynamic_dims(ep: torch.export.ExportedProgram) -> Dims:
    """Per user input (tensors), the dimensions that are symbolic in the program."""
    names = set(ep.graph_signature.user_inputs)
    dims: Dims = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                dims.append([i for i, d in enumerate(val.shape) if not isinstance(d, int)])
    return dims


def _resized(inputs: tuple[torch.Tensor, ...], dims: Dims, spatial: Any, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, x in enumerate(inputs):
        d = dims[i] if i < len(dims) else []
        shape = [(n + 1 if k == 0 else (spatial(n) if spatial else n)) if k in d else n for k, n in enumerate(x.shape)]
        out.append(torch.randn(shape, generator=g, dtype=torch.float64).to(x.dtype) if d else x)
    return tuple(out)


_SPATIAL = (lambda n: 2 * n, lambda n: n + n // 2, lambda n: max(1, n // 2), lambda n: n - 1 if n > 2 else n + 1, None)


def other_sizes(inputs: tuple[torch.Tensor, ...], dims: Dims) -> Iterator[tuple[torch.Tensor, ...]]:
    """Candidate inputs at another size (seeded): a batch one larger, with each dynamic spatial size
    doubled, ×1.5, halved, one smaller, or as it was; nothing when no dimension is dynamic."""
    if not any(dims):
        return
    seen: set[tuple[tuple[int, ...], ...]] = set()
    for spatial in _SPATIAL:
        x = _resized(inputs, dims, spatial, 1234)
        key = tuple(tuple(t.shape) for t in x)
        if key not in seen and key != tuple(tuple(t.shape) for t in inputs):
            seen.add(key)
            yield x


def program_format(path: Path | str) -> str | None:
    """'pt2' (a torch.export archive) or 'onnx' from the suffix, or for a zip holding an exported
    program; None for anything else."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt2", ".onnx"):
        return suffix[1:]
    with contextlib.suppress(OSError, zipfile.BadZipFile):
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(("serialized_exported_program.json", "models/model.json")) for n in z.namelist()):
                    return "pt2"
    return None


class OnnxModule(nn.Module):
    """An ONNX model run by onnxruntime, as a module: inputs are cast to the dtypes the model
    declares, outputs come back as tensors in the first input's dtype."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self._dtypes = [_ORT_DTYPES.get(i.type, torch.float32) for i in self._session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> Any:
        feed = {i.name: x.detach().to(dt).cpu().numpy()
                for i, x, dt in zip(self._session.get_inputs(), inputs, self._dtypes)}
        out_dtype = inputs[0].dtype if inputs else torch.float32
        outs = [torch.from_numpy(a).to(out_dtype) for a in self._session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxModule:
        return self  # the session holds no state the verification could change


class ProgramModule(nn.Module):
    """A loaded torch.export program as a module `verify` can treat like any other: `.eval()` and
    `.double()` leave it as it is (an exported program supports neither); inputs are cast to the
    program's dtype and floating outputs back to the first input's."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_program", program)  # not a child: .eval()/.double() must not reach it
        floats = [t.dtype for t in (*program.parameters(), *program.buffers()) if t.is_floating_point()]
        self._dtype = floats[0] if floats else torch.float32

    def forward(self, *inputs: torch.Tensor) -> Any:
        from torch.utils._pytree import tree_map

        out_dtype = inputs[0].dtype if inputs else self._dtype
        cast = tuple(x.to(self._dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
        out = self._program(*cast)
        return tree_map(lambda t: t.to(out_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)

    def __deepcopy__(self, memo: dict[int, Any]) -> ProgramModule:
        return self


_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
               "tensor(bfloat16)": torch.bfloat16}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_program(path: Path | str, fmt: str, *, trust: bool = False) -> tuple[nn.Module, str]:
    """(a runnable module, sha256) for a written `.pt2` (needs `trust`, see the module docstring) or
    `.onnx` (needs onnxruntime); RepfuseError with a hint otherwise."""
    path = Path(path)
    if fmt == "pt2":
        if not trust:
            raise RepfuseError(f"{path.name} is a torch.export program, and loading one runs pickles stored in it "
                               "(torch.export.load uses torch.load(weights_only=False))",
                               "pass --trust if you made this file (e.g. with repfuse convert), or compare the .pt "
                               "or .safetensors output instead")
        try:
            with quiet():
                module = ProgramModule(torch.export.load(str(path)).module())
        except Exception as exc:
            raise RepfuseError(f"{path.name} is not a readable torch.export program ({type(exc).__name__})",
                               "check that the file was copied completely") from exc
        return module, _sha256(path)
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise RepfuseError(f"comparing with {path.name} needs onnxruntime, which is not installed",
                           'install the extra: pip install "repfuse[onnx]"') from exc
    try:
        module = OnnxModule(path)
    except Exception as exc:
        raise RepfuseError(f"{path.name} is not an ONNX model onnxruntime can run ({type(exc).__name__})",
                           "check that the file was copied completely") from exc
    return module, _sha256(path)


def checked_shapes(batches: Sequence[tuple[torch.Tensor, ...]]) -> list[list[list[int]]]:
    return [[list(x.shape) for x in b] for b in batches]
