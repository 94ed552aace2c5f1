"""`GraphBlock`: what a rewritten module becomes when only part of its forward was fused.

A GraphBlock keeps the original children (so the state_dict keys of every untouched layer stay as
they were) and stores its forward as a *program*: the traced fx graph written as plain data
(strings, numbers, tuples). It is run by a small interpreter that only resolves functions from
torch, operator and math. Nothing in a deploy file is code, so it loads with
``torch.load(weights_only=True)`` once this class is allow-listed, and with plain pickle wherever
repfuse is importable.
"""

from __future__ import annotations

import builtins
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import _get_qualified_name

_SAFE_BUILTINS = {"getattr", "len", "int", "float", "bool", "tuple", "list", "slice", "range", "max", "min",
                  "abs", "isinstance"}
_ENUMS: dict[str, Callable[[str], Any]] = {
    "dtype": lambda s: getattr(torch, s),
    "device": torch.device,
    "memory_format": lambda s: getattr(torch, s),
    "layout": lambda s: getattr(torch, s),
}


class UnsupportedProgram(Exception):
    """The graph uses something a program cannot name safely (a user function, an odd constant)."""


def function_name(fn: Callable[..., Any]) -> str:
    """Qualified name of a call_function target, checked against the safe roots."""
    if getattr(builtins, getattr(fn, "__name__", ""), None) is fn and fn.__name__ in _SAFE_BUILTINS:
        return fn.__name__
    name = _get_qualified_name(fn)
    try:
        resolved = resolve_function(name)
    except UnsupportedProgram as exc:
        raise UnsupportedProgram(f"the forward calls {name}, which a deploy file cannot name safely") from exc
    if resolved is not fn and not (name.startswith("torch.") and getattr(resolved, "__name__", None) == fn.__name__):
        raise UnsupportedProgram(f"{name} does not name the function the forward calls")
    return name


def resolve_function(name: str) -> Callable[..., Any]:
    """Inverse of `function_name`: only tensor maths from a fixed set of namespaces resolves, so a
    program read from a file can never reach torch.load, importlib, attrgetter & co."""
    if "." not in name:
        if name not in _SAFE_BUILTINS:
            raise UnsupportedProgram(f"builtin {name} is not allowed in a program")
        return _safe_getattr if name == "getattr" else getattr(builtins, name)
    namespace, _, attr = name.rpartition(".")
    root = _namespaces().get(namespace)
    private = attr.startswith("_") and attr not in _ALLOWED_PRIVATE
    if root is None or private or attr in _DENIED.get(namespace, ()) or attr.startswith("set_"):
        raise UnsupportedProgram(f"{name} is not allowed in a program")
    obj = getattr(root, attr, None)
    if not callable(obj) or isinstance(obj, type):
        raise UnsupportedProgram(f"cannot resolve {name}")
    if namespace == "torch" and getattr(obj, "__module__", None) not in (None, "torch", "torch.functional",
                                                                        "torch._C._VariableFunctions"):
        raise UnsupportedProgram(f"{name} is not a tensor operation")
    return obj


_ALLOWED_PRIVATE = {"_assert"}  # torch._assert: the traceable assert timm's layers use
_DENIED = {
    "torch": {"compile", "manual_seed", "seed", "initial_seed", "use_deterministic_algorithms", "load", "save",
              "export", "cond", "while_loop", "vmap", "func"},
    "operator": {"attrgetter", "methodcaller", "call"},
    "_operator": {"attrgetter", "methodcaller", "call"},
}


def _namespaces() -> dict[str, Any]:
    import math
    import operator

    import torch.nn.functional as F

    return {"torch": torch, "torch.functional": torch.functional, "torch.nn.functional": F,
            "torch._C._nn": torch._C._nn, "torch.fft": torch.fft, "torch.linalg": torch.linalg,
            "torch.special": torch.special, "operator": operator, "_operator": operator, "math": math}


def _safe_getattr(obj: Any, name: str, *default: Any) -> Any:
    """getattr for programs: public attributes only (x.shape, x.ndim), never dunders."""
    if not isinstance(name, str) or name.startswith("_"):
        raise UnsupportedProgram(f"attribute {name!r} is not allowed in a program")
    return getattr(obj, name, *default)


def encode(value: Any) -> Any:
    """fx argument → plain data: every value becomes a (tag, payload) tuple."""
    if isinstance(value, fx.Node):
        return ("N", value.name)
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("V", value)
    if isinstance(value, torch.Size):
        return ("T", [encode(v) for v in value])
    if isinstance(value, tuple):
        return ("T", [encode(v) for v in value])
    if isinstance(value, list):
        return ("L", [encode(v) for v in value])
    if isinstance(value, dict):
        return ("D", [(k, encode(v)) for k, v in value.items()])
    if isinstance(value, slice):
        return ("S", [encode(value.start), encode(value.stop), encode(value.step)])
    if value is Ellipsis:
        return ("E", None)
    if isinstance(value, torch.dtype):
        return ("dtype", str(value).removeprefix("torch."))
    if isinstance(value, torch.device):
        return ("device", str(value))
    if isinstance(value, torch.memory_format):
        return ("memory_format", str(value).removeprefix("torch."))
    if isinstance(value, torch.layout):
        return ("layout", str(value).removeprefix("torch."))
    raise UnsupportedProgram(f"constant of type {type(value).__name__} cannot be stored in a program")


def _decoder(enc: Any) -> Callable[[dict[str, Any]], Any]:
    """Plain data → a function of the environment (node name → value)."""
    tag, payload = enc
    if tag == "N":
        return lambda env: env[payload]
    if tag == "V":
        return lambda env: payload
    if tag in ("T", "L"):
        parts = [_decoder(p) for p in payload]
        if all(p[0] == "V" for p in payload):
            const = tuple(p[1] for p in payload) if tag == "T" else None
            if const is not None:
                return lambda env: const
        make = tuple if tag == "T" else list
        return lambda env: make(p(env) for p in parts)
    if tag == "D":
        items = [(k, _decoder(v)) for k, v in payload]
        return lambda env: {k: v(env) for k, v in items}
    if tag == "S":
        a, b, c = (_decoder(p) for p in payload)
        return lambda env: slice(a(env), b(env), c(env))
    if tag == "E":
        return lambda env: Ellipsis
    if tag in _ENUMS:
        value = _ENUMS[tag](payload)
        return lambda env: value
    raise UnsupportedProgram(f"unknown tag {tag!r} in program")


def graph_to_program(graph: fx.Graph) -> list[tuple[str, str, str, Any, Any]]:
    """An fx graph as a list of (name, op, target, args, kwargs) in plain data."""
    program = []
    for node in graph.nodes:
        if node.op == "call_function":
            target = function_name(node.target)
        elif isinstance(node.target, str):
            target = node.target
        else:
            raise UnsupportedProgram(f"node {node.name} has a non-string target")
        program.append((node.name, node.op, target, encode(node.args), encode(node.kwargs)))
    return program


class GraphBlock(nn.Module):
    """A module whose forward is a stored program over its own children, parameters and buffers.

    `source_class` records what the module was before repfuse rewrote it (for reports only).
    """

    def __init__(self, program: list[tuple[str, str, str, Any, Any]], source_class: str = "") -> None:
        super().__init__()
        self.program = program
        self.source_class = source_class
        self._steps: fx.GraphModule | None = None

    def extra_repr(self) -> str:
        ops = sum(1 for p in self.program if p[1].startswith("call"))
        return f"was={self.source_class}, ops={ops}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_steps"] = None  # the compiled forward is rebuilt after loading, never stored
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "_steps":
            self.__dict__["_steps"] = None  # a changed child or tensor: compile again
        super().__setattr__(name, value)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> GraphBlock:
        self.__dict__["_steps"] = None  # .to()/.double() replace buffers the compiled copy would still hold
        return super()._apply(fn, *args, **kwargs)

    def _compile(self) -> fx.GraphModule:
        """Rebuild the fx graph from the program (every function checked by `resolve_function`) and let
        torch.fx generate its forward: as fast as hand-written code, and nothing read from the file runs."""
        graph = fx.Graph()
        env: dict[str, Any] = {}
        for name, op, target, args, kwargs in self.program:
            a, k = _decoder(args)(env), _decoder(kwargs)(env)
            if op == "placeholder":
                env[name] = graph.placeholder(target, default_value=a[0] if a else inspect.Signature.empty)
            elif op == "get_attr":
                env[name] = graph.get_attr(target)
            elif op == "call_module":
                env[name] = graph.call_module(target, a, k)
            elif op == "call_function":
                env[name] = graph.call_function(resolve_function(target), a, k)
            elif op == "call_method":
                if target.startswith("_"):
                    raise UnsupportedProgram(f"method {target} is not allowed in a program")
                env[name] = graph.call_method(target, a, k)
            elif op == "output":
                graph.output(a[0])
                break
            else:
                raise UnsupportedProgram(f"unknown op {op!r} in program")
        return fx.GraphModule(self, graph, class_name=f"{self.source_class or 'GraphBlock'}Program")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self.__dict__.get("_steps")
        if compiled is None:
            compiled = self._compile()
            self.__dict__["_steps"] = compiled  # plain attribute: not a registered submodule
        return compiled(*args, **kwargs)
