"""Architecture factories: `--model MODULE:CALLABLE` (+ `--model-arg key=value`) builds an nn.Module.

Importing MODULE runs the user's own code; they name it explicitly on the command line. Weights
never come from here: the factory only builds the architecture, the checkpoint is loaded
separately (and safely) by `repfuse.weights`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .io import ensure_cwd_importable
from .types import RepfuseError

__all__ = ["build_model", "parse_model_args", "parse_spec", "parse_value"]

_SPEC_HINT = "write it as MODULE:CALLABLE, e.g. --model timm:create_model or --model mypkg.nets:repvgg_a0"
_NUMBER = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_TRUE, _FALSE, _NONE = {"true", "True"}, {"false", "False"}, {"none", "None", "null"}


def parse_spec(spec: str, flag: str = "--model") -> tuple[str, str]:
    """'pkg.mod:fn' → ('pkg.mod', 'fn'); the callable may be dotted ('mod:Class.build')."""
    text = str(spec).strip()
    module, sep, attr = text.partition(":")
    ok = sep and all(p.isidentifier() for p in module.split(".")) and all(p.isidentifier() for p in attr.split("."))
    if not ok:
        raise RepfuseError(f"malformed {flag} {spec!r}: expected MODULE:CALLABLE", _SPEC_HINT.replace("--model", flag))
    return module, attr


def parse_value(text: str) -> Any:
    """'3' → 3, '0.5' / '1e-3' → float, 'true'/'false' → bool, 'none'/'null' → None; quotes force a
    string ('"3"' → '3'); anything else stays a string."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in _NONE:
        return None
    if _NUMBER.fullmatch(text):
        return float(text) if any(c in text for c in ".eE") else int(text)
    return text


def parse_model_args(items: Sequence[str] | None, flag: str = "--model-arg") -> tuple[tuple[str, Any], ...]:
    """['model_name=repvgg_a0', 'num_classes=10'] → (('model_name', 'repvgg_a0'), ('num_classes', 10))."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise RepfuseError(f"malformed {flag} {item!r}: expected key=value",
                               f"for example {flag} num_classes=1000 (repeat the flag once per argument)")
        if key in out:
            raise RepfuseError(f"{flag} {key} is given twice", f"pass each {flag} key once")
        out[key] = parse_value(value.strip())
    return tuple(out.items())


def _call_text(spec: str, kwargs: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{spec}({args})"


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def build_model(spec: str, args: Sequence[tuple[str, Any]] = (), flag: str = "--model") -> nn.Module:
    """Import MODULE (from the current directory too, as `python -m` does), call CALLABLE(**args)
    and return the nn.Module it builds, in eval mode. RepfuseError for every way this can fail."""
    module_name, attr = parse_spec(spec, flag)
    kwargs = dict(args)
    ensure_cwd_importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise RepfuseError(f"{flag} {spec}: module {missing!r} cannot be imported",
                           "run repfuse from the directory that contains it, add it to PYTHONPATH, "
                           "or install the package") from exc
    except Exception as exc:
        raise RepfuseError(f"{flag} {spec}: importing {module_name} failed ({_first_line(exc)})",
                           "fix the error in that module (REPFUSE_DEBUG=1 shows the traceback)") from exc
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise RepfuseError(f"{flag} {spec}: module {module_name} has no attribute {attr!r}",
                           "check the name after the colon") from exc
    if not callable(obj):
        raise RepfuseError(f"{flag} {spec} is a {type(obj).__name__}, not a callable",
                           "name a function or class that builds the model")
    try:
        model = obj(**kwargs)
    except Exception as exc:
        raise RepfuseError(f"{flag}: {_call_text(spec, kwargs)} failed ({_first_line(exc)})",
                           f"check the {flag}-arg values (REPFUSE_DEBUG=1 shows the traceback)") from exc
    if not isinstance(model, nn.Module):
        raise RepfuseError(f"{flag}: {_call_text(spec, kwargs)} returned a {type(model).__name__}, not an nn.Module",
                           "the callable must build and return the model (architecture only; weights are "
                           "loaded from IN)")
    return model.eval()
