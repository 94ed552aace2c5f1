"""`GraphBlock`: what a rewritten module becomes when only part of its forward was fused.

A GraphBlock keeps the original children (so the state_dict keys of every untouched layer stay as
they were) and stores its forward as a *program*: the traced fx graph written as plain data
(strings, numbers, tuples). The program is checked against the closed schema of `repfuse.program`
(listed tensor functions and methods, registered targets, tagged constants) when the block is built,
when it is unpickled and before fx generates its forward, so nothing in a deploy file is code: it
loads with ``torch.load(weights_only=True)`` once this class is allow-listed, and a tampered program
is refused there with `InvalidProgram` before anything runs.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .program import (
    MAX_STR,
    InvalidProgram,
    UnsupportedProgram,
    check_program,
    decode,
    encode,
    function_name,
    resolve_function,
)

__all__ = ["GraphBlock", "InvalidProgram", "UnsupportedProgram", "graph_to_program", "resolve_function"]

Program = list[tuple[str, str, str, Any, Any]]
_MODULE_STATE = frozenset(vars(nn.Module()))  # the attributes nn.Module.__init__ sets
_STATE = _MODULE_STATE | {"program", "source_class", "_steps"}
_PLAIN = (type(None), bool, int, float, str)
# nn.Module's user-called casts: torch reaches them only through `_apply`, never by name on a child, so a
# plain label of the same name (Ultralytics' `m.type = "Conv"`) can shadow them on a rewritten layer.
SHADOWABLE = frozenset({"type", "float", "double", "half", "bfloat16", "cpu", "cuda"})


def plain_value(value: Any, depth: int = 0) -> bool:
    """Data a rewritten layer carries over from the one it replaces (`m.f = [-1, 6]`, `m.i = 4`): scalars
    and strings, or short lists and tuples of them."""
    if type(value) in _PLAIN:
        return not isinstance(value, str) or len(value) <= MAX_STR
    return (type(value) in (list, tuple) and depth < 2 and len(value) <= 64
            and all(plain_value(v, depth + 1) for v in value))


def carried(name: str, value: Any) -> bool:
    """Whether a layer's instance attribute `name` survives its replacement (see `rewrite.keep_attributes`)."""
    return (type(name) is str and name.isidentifier() and not name.startswith("_")
            and name not in _STATE and (not hasattr(GraphBlock, name) or name in SHADOWABLE)
            and plain_value(value))


def graph_to_program(graph: fx.Graph) -> Program:
    """An fx graph as a list of (name, op, target, args, kwargs) in plain data; UnsupportedProgram
    when the graph needs anything the schema of `repfuse.program` does not admit."""
    program = []
    for node in graph.nodes:
        if node.op == "call_function":
            target = function_name(node.target)
        elif isinstance(node.target, str):
            target = node.target
        else:
            raise UnsupportedProgram(f"node {node.name} has a non-string target")
        program.append((node.name, node.op, target, encode(node.args), encode(node.kwargs)))
    try:
        check_program(program)
    except InvalidProgram as exc:
        raise UnsupportedProgram(f"the forward cannot be stored as a checked program: {exc.message}") from exc
    return program


def _check_state(state: Any) -> None:
    """An unpickled GraphBlock has the attributes a GraphBlock has, and nothing callable of its own."""
    if type(state) is not dict or "program" not in state:
        raise InvalidProgram("the state of a GraphBlock is a dict that holds its program")
    for key, value in state.items():
        if type(key) is not str:
            raise InvalidProgram("a GraphBlock attribute name is not a string")
        if key not in _STATE:
            if not carried(key, value):
                raise InvalidProgram(f"a GraphBlock does not have an attribute {key[:80]!r}")
        elif "hook" in key and not (value is None or type(value) is bool if key == "_is_full_backward_hook"
                                    else isinstance(value, dict) and not value):
            raise InvalidProgram(f"the GraphBlock carries {key}: hooks are code, a deploy file holds none")
    kinds = {"_parameters": nn.Parameter, "_buffers": torch.Tensor, "_modules": nn.Module}
    for key, kind in kinds.items():
        entries = state.get(key, {})
        if not isinstance(entries, dict) or not all(
                type(k) is str and (v is None or isinstance(v, kind)) for k, v in entries.items()):
            raise InvalidProgram(f"{key} of the GraphBlock must map names to {kind.__name__} objects")
    source = state.get("source_class", "")
    if type(source) is not str or len(source) > MAX_STR or state.get("_steps") is not None \
            or type(state.get("training", False)) is not bool:
        raise InvalidProgram("the GraphBlock's source_class, training or _steps attribute is malformed")


class GraphBlock(nn.Module):
    """A module whose forward is a stored program over its own children, parameters and buffers.

    `source_class` records what the module was before repfuse rewrote it (for reports only). The
    program is checked by `repfuse.program.check_program` here, on unpickling (`__setstate__`) and
    before each compilation (then also that every target is registered in the block).
    """

    def __init__(self, program: Program, source_class: str = "") -> None:
        super().__init__()
        check_program(program)
        if type(source_class) is not str or len(source_class) > MAX_STR:
            raise InvalidProgram("source_class must be a short string")
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

    def __setstate__(self, state: Any) -> None:
        """Unpickling (torch.load with or without weights_only, copy.deepcopy): refuse a state or a
        program outside the schema before the block is handed out, so a bare weights-only load raises."""
        _check_state(state)
        super().__setstate__(state)
        self.__dict__["_steps"] = None
        self.__dict__.setdefault("source_class", "")
        check_program(self.program, self)

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "_steps":
            self.__dict__["_steps"] = None  # a changed child or tensor: compile again
        super().__setattr__(name, value)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> GraphBlock:
        self.__dict__["_steps"] = None  # .to()/.double() replace buffers the compiled copy would still hold
        return super()._apply(fn, *args, **kwargs)

    def _compile(self) -> fx.GraphModule:
        """Check the program against the block, rebuild it as an fx graph and let torch.fx generate its
        forward: as fast as hand-written code, and every string fx pastes into it was checked."""
        graph = fx.Graph()
        env: dict[str, Any] = {}
        for name, op, target, args, kwargs in check_program(self.program, self):
            a, k = decode(args, env), decode(kwargs, env)
            if op == "placeholder":
                env[name] = graph.placeholder(target, default_value=a[0] if a else inspect.Signature.empty)
            elif op == "get_attr":
                env[name] = graph.get_attr(target)
            elif op == "call_module":
                env[name] = graph.call_module(target, a, k)
            elif op == "call_function":
                env[name] = graph.call_function(resolve_function(target), a, k)
            elif op == "call_method":
                env[name] = graph.call_method(target, a, k)
            else:
                graph.output(a[0])
        name = re.sub(r"\W", "_", self.source_class.rpartition(".")[2]) or "GraphBlock"
        try:
            return fx.GraphModule(self, graph, class_name=f"{name}Program")
        except Exception as exc:  # a checked program that fx still cannot build: refuse it
            raise InvalidProgram(f"its forward could not be generated ({type(exc).__name__})") from exc

    def __prepare_scriptable__(self) -> fx.GraphModule:
        """For ``torch.jit.script``: the compiled program (an fx GraphModule with a fixed signature,
        sharing this block's parameters and children), which TorchScript can compile."""
        return self._compile()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self.__dict__.get("_steps")
        if compiled is None:
            compiled = self._compile()
            self.__dict__["_steps"] = compiled  # plain attribute: not a registered submodule
        return compiled(*args, **kwargs)
