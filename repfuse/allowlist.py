"""Which globals a checkpoint may name, and the one object each name stands for.

The whole policy, applied to every global a pickle names before ``torch.load(weights_only=True)``
is given the resulting exact set through ``torch.serialization.safe_globals``:

- **Exact names.** ``module.qualname`` stands for the object *defined* there: the module is imported
  by exactly that name, the qualified name is looked up inside it, and the object's own
  ``__module__`` and ``__qualname__`` must equal the two halves. Nothing merely reachable through a
  module's attributes resolves (``models.os.system``, ``torch.nn.modules.module.torch.load``).
- **Without flags**: the globals torch's own weights-only unpickler admits, plus ``nn.Module``
  subclasses defined under ``torch.nn`` or ``repfuse``.
- **``--allow PREFIX``** admits, from modules named ``PREFIX`` or ``PREFIX.*``, ``nn.Module``
  subclasses and *plain data types*: ``enum.Enum`` subclasses, dataclasses, named tuples and
  ``types.SimpleNamespace`` subclasses. Never functions, methods, builtins or any other object.
- **Bound methods.** ``builtins.getattr(obj, name)`` (how pickle stores a bound method, e.g. a
  module attribute holding ``self.act.forward``) is admitted only as `bound_method`: ``obj`` must be
  an ``nn.Module``, ``name`` a public identifier naming a plain function defined on its class, and
  the result is that function bound to ``obj`` — never an instance attribute, submodule or builtin.
- A module is imported only after its name has passed the prefix rule (importing runs its code: the
  user vouches for the packages they name). Modules that can run code or touch the system (``os``,
  ``subprocess``, ``builtins``, …) are never admitted, whatever the flags.
- ``--trust`` skips all of this and runs whatever the file says: only for files the user made.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import os
import pickle
import sys
import types
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from .types import RepfuseError

__all__ = [
    "BUILTIN_MODULE_PREFIXES",
    "DANGEROUS_MODULES",
    "admit_globals",
    "bound_method",
    "check_allow_prefixes",
    "ensure_cwd_importable",
    "is_plain_data_type",
    "resolve_exact",
    "torch_default_names",
]

# nn.Module subclasses defined under these module prefixes are admitted by default.
BUILTIN_MODULE_PREFIXES: tuple[str, ...] = ("torch.nn", "repfuse")

# Modules whose globals can run code or touch the system when called by the unpickler: never
# admitted by a prefix, and a prefix that names one is refused.
DANGEROUS_MODULES = frozenset({
    "__builtin__", "__main__", "_codecs", "_io", "_pickle", "_posixsubprocess", "_thread", "asyncio",
    "builtins", "code", "codeop", "commands", "copyreg", "copy_reg", "ctypes", "functools", "gc",
    "importlib", "io", "marshal", "multiprocessing", "nt", "operator", "os", "pathlib", "pickle",
    "pip", "platform", "posix", "pty", "runpy", "setuptools", "shutil", "signal", "socket",
    "subprocess", "sys", "tempfile", "threading", "types", "webbrowser", "zipimport",
})

_NAMES_SHOWN = 4


def _prefix_match(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def names_list(names: Sequence[str]) -> str:
    """At most a few names, then 'and N more'."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def check_allow_prefixes(allow: Sequence[str] | str) -> tuple[str, ...]:
    """Validate user allow prefixes (dotted module paths); RepfuseError for a bad one."""
    if isinstance(allow, str):  # a common slip: allow="models" instead of ["models"]
        allow = (allow,)
    out: list[str] = []
    for raw in allow:
        prefix = str(raw).strip().strip(".")
        parts = prefix.split(".")
        if not prefix or not all(p.isidentifier() for p in parts):
            raise RepfuseError(
                f"--allow {raw!r} is not a module path",
                "pass a dotted Python module prefix, e.g. --allow models or --allow timm.layers",
            )
        if parts[0] in DANGEROUS_MODULES:
            raise RepfuseError(
                f"--allow {prefix} is refused: globals from {parts[0]} can run arbitrary code while loading",
                "allow only the packages that define your model classes; "
                "--trust loads anything, but only use it for files you made yourself",
            )
        if prefix == "torch":
            raise RepfuseError(
                "--allow torch is too broad: torch defines functions that read and write files",
                "name the sub-package that defines the module classes, e.g. --allow torch.ao.nn "
                "(only nn.Module classes and plain data types defined there are admitted)",
            )
        out.append(prefix)
    return tuple(out)


def ensure_cwd_importable() -> None:
    """Make the current directory importable, as `python -m` does (so --allow models finds ./models)."""
    cwd = os.getcwd()
    if cwd not in (os.path.abspath(p or os.curdir) for p in sys.path):
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()


def torch_default_names() -> frozenset[str]:
    """Dotted names torch's weights-only unpickler admits by itself (rebuild functions, dtypes, …)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
    except ImportError:  # pragma: no cover - private API moved: admit nothing extra by name
        return frozenset()
    return frozenset(_get_allowed_globals())


def is_plain_data_type(obj: Any) -> bool:
    """An Enum, dataclass, named tuple or SimpleNamespace subclass: state only, no behaviour on load."""
    if not isinstance(obj, type):
        return False
    if issubclass(obj, enum.Enum) or issubclass(obj, types.SimpleNamespace):
        return True
    if issubclass(obj, tuple) and isinstance(getattr(obj, "_fields", None), tuple):
        return True
    return dataclasses.is_dataclass(obj)


def _is_module_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


class _Refused(Exception):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(why)
        self.name = name
        self.why = why


def _import_exact(module_name: str, name: str) -> types.ModuleType | None:
    """The module named exactly `module_name`, or None when there is no such module."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not _prefix_match(module_name, exc.name):
            raise RepfuseError(  # the module exists but one of its own imports is missing
                f"the checkpoint needs {name}, but importing {module_name} failed: {exc}",
                "install what that module imports, or run repfuse in the environment the model was trained in",
            ) from exc
        return None
    except Exception as exc:  # the module exists but raised while importing
        raise RepfuseError(
            f"the checkpoint needs {name}, but importing {module_name} failed: {type(exc).__name__}: {exc}",
            "fix the import error in that module (run with REPFUSE_DEBUG=1 for the traceback)",
        ) from exc


def resolve_exact(module_name: str, qualname: str) -> Any:
    """The object defined in module `module_name` under `qualname`; `_Refused` when the name is only
    reachable there (an import, an alias) or does not exist. Imports `module_name`: check the policy first."""
    full = f"{module_name}.{qualname}"
    parts = qualname.split(".")
    if not all(p.isidentifier() for p in parts) or not all(p.isidentifier() for p in module_name.split(".")):
        raise _Refused(full, "is not a dotted Python name")
    module = _import_exact(module_name, full)
    if module is None:
        raise _Refused(full, f"module {module_name} cannot be imported")
    obj: Any = module
    for attr in parts:  # only class namespaces are walked (nested classes); checked exactly below
        namespace = getattr(obj, "__dict__", {})
        if attr not in namespace:
            raise _Refused(full, f"{module_name} defines no {qualname}")
        obj = namespace[attr]
        if not isinstance(obj, type) and attr != parts[-1]:
            raise _Refused(full, f"{qualname} does not name a class defined in {module_name}")
    if getattr(obj, "__module__", None) != module_name or getattr(obj, "__qualname__", None) != qualname:
        where = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
        raise _Refused(full, f"is only an alias of {where}, not an object defined there")
    return obj


def bound_method(obj: Any, name: Any, *default: Any) -> types.MethodType:
    """``getattr(obj, name)`` for unpickling, restricted to a public method of an nn.Module's class."""
    if default or not isinstance(obj, nn.Module) or not isinstance(name, str) or not name.isidentifier() \
            or name.startswith("_"):
        raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not a public module method")
    func = inspect.getattr_static(type(obj), name, None)
    if not inspect.isfunction(func):
        raise pickle.UnpicklingError(f"{type(obj).__name__}.{name} is not a method defined on the class")
    return types.MethodType(func, obj)


_GETATTR = ("builtins", "getattr")


def _kind(obj: Any) -> str:
    if isinstance(obj, type):
        return "a class that is neither an nn.Module nor a plain data type"
    if callable(obj):
        return "a function (only classes are ever admitted)"
    return f"a {type(obj).__name__} object, not a class"


def _check_one(module_name: str, qualname: str, allow: Sequence[str]) -> Any:
    full = f"{module_name}.{qualname}"
    if (module_name, qualname) == _GETATTR:
        return bound_method
    if _top(module_name) in DANGEROUS_MODULES:
        raise _Refused(full, "can run arbitrary code while loading")
    builtin = any(_prefix_match(module_name, p) for p in BUILTIN_MODULE_PREFIXES)
    user = any(_prefix_match(module_name, p) for p in allow)
    if not builtin and not user:
        raise _Refused(full, "is not allow-listed")
    obj = resolve_exact(module_name, qualname)
    if _is_module_class(obj) or (user and is_plain_data_type(obj)):
        return obj
    raise _Refused(full, f"is {_kind(obj)}")


def _refusal(file: str, refused: list[_Refused]) -> RepfuseError:
    dangerous = [r.name for r in refused if _top(r.name) in DANGEROUS_MODULES and _top(r.name) != "__main__"]
    if dangerous:
        return RepfuseError(
            f"{file} would call {names_list(sorted(dangerous))} while loading, which can run arbitrary code; "
            "refusing to load it",
            "do not load this file unless you made it yourself; --trust would run that code",
        )
    main = [r.name for r in refused if _top(r.name) == "__main__"]
    if main:
        return RepfuseError(
            f"{file} needs {names_list(sorted(main))}: classes defined in the training script itself "
            "(__main__), which cannot be imported",
            "move those classes into an importable module and re-save the checkpoint, or save a state_dict instead",
        )
    missing = [r.name for r in refused if r.why.endswith("cannot be imported")]
    if missing:
        pkg = _top(missing[0])
        return RepfuseError(
            f"{file} needs {names_list(sorted(missing))}, which cannot be imported",
            f"run repfuse from the directory that contains the '{pkg}' package, or add it to PYTHONPATH",
        )
    unlisted = sorted({_top(r.name) for r in refused if r.why == "is not allow-listed"})
    detail = names_list([f"{r.name} ({r.why})" if r.why != "is not allow-listed" else r.name for r in refused])
    count = len(refused)
    if unlisted and len(unlisted) == len({_top(r.name) for r in refused}):
        flags = " ".join(f"--allow {t}" for t in unlisted)
        return RepfuseError(
            f"{file} needs {count} global{'s' if count != 1 else ''} that "
            f"{'are' if count != 1 else 'is'} not allow-listed: {detail}",
            f"if you trust the code in {', '.join(unlisted)}, pass {flags} (admits only nn.Module classes and "
            "plain data types defined there; --trust allows everything and can run code hidden in the file)",
        )
    return RepfuseError(
        f"{file} names {detail}, which safe loading never admits",
        "only nn.Module classes and plain data types load without --trust; pass --trust only if you made "
        "this file yourself",
    )


def admit_globals(file: str, globals_needed: Iterable[tuple[str, str]],
                  allow: Sequence[str] = ()) -> list[tuple[Any, str]]:
    """``(object, "module.qualname")`` pairs for ``torch.serialization.safe_globals``: every global in
    `globals_needed` that torch does not admit itself, resolved exactly under the policy above.

    Raises RepfuseError naming every refused global, why, and a hint that is itself safe to follow.
    """
    allow = check_allow_prefixes(allow)
    defaults = torch_default_names()
    wanted = sorted({(m, q) for m, q in globals_needed if f"{m}.{q}" not in defaults})
    if any(_prefix_match(m, p) for m, _ in wanted for p in allow):
        ensure_cwd_importable()
    pairs: list[tuple[Any, str]] = []
    refused: list[_Refused] = []
    by_name: dict[str, Any] = {}
    for module_name, qualname in wanted:
        try:
            obj = _check_one(module_name, qualname, allow)
        except _Refused as exc:
            refused.append(exc)
            continue
        full = f"{module_name}.{qualname}"
        if full in by_name and by_name[full] is not obj:  # "a.b" + "C" and "a" + "b.C": ambiguous
            refused.append(_Refused(full, "names two different objects"))
            continue
        by_name[full] = obj
        pairs.append((obj, full))
    if refused:
        raise _refusal(file, refused)
    return pairs
