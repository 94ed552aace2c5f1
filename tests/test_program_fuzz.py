"""Fuzz: random programs and mutations of the programs the engine writes (targets swapped for random
strings, payloads and other listed names, random tags and argument structures, nodes renamed, moved,
dropped). Each one is either refused with `InvalidProgram` (nothing else may escape the check), or it
compiles to an fx graph that calls only listed functions and methods and reaches only registered
children and tensors; running it then raises or not, but never opens, writes, spawns or execs anything
(an audit hook watches), and the marker file never appears."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from repfuse import api, samples
from repfuse import program as P
from repfuse.modules import GraphBlock, InvalidProgram, graph_to_program
from repfuse.types import Options

MARKER = Path(__file__).resolve().parent / "FUZZ_MARKER_MUST_NOT_EXIST"
FUNCTION_IDS = {id(f) for f in P.FUNCTIONS.values()}
_WATCHED = ("open", "exec", "os.", "subprocess.", "socket.", "shutil.", "ctypes.", "mmap.",
            "pty.", "webbrowser.", "urllib.", "sys._getframe")
_events: list[str] | None = None


def _linecache(event: str, args: tuple) -> bool:
    """Reading a .py source to format a traceback (fx prints the generated code on an error)."""
    return event == "open" and str(args[0]).endswith(".py") and args[1] in ("r", "rb")


def _audit(event: str, args: tuple) -> None:
    if _events is not None and event.startswith(_WATCHED) and not _linecache(event, args):
        _events.append(f"{event} {str(args)[:120]}")


sys.addaudithook(_audit)  # cannot be removed; inert unless `watched` is active


@contextmanager
def watched() -> Iterator[list[str]]:
    global _events
    _events = []
    try:
        yield _events
    finally:
        _events = None


PAYLOADS = ["os.system", "builtins.exec", "eval", "exec", "__import__", "torch.load", "torch.save",
            "torch.from_file", "torch.ops.aten.from_file", "operator.attrgetter", "operator.methodcaller",
            "torch.manual_seed", "torch.set_default_dtype", "numpy", "tofile", "type", "apply_", "register_hook",
            "__class__", "__reduce_ex__", "_compile.__globals__", "forward.__globals__", "training",
            "x=__import__('os').system('touch FUZZ_MARKER_MUST_NOT_EXIST')",
            f"relu(), open({str(MARKER)!r}, 'w'), x.relu", "torch.nn.functional.dropout", "importlib.import_module",
            "subprocess.run", "torch._C._set_grad_enabled", "getattr", "max", "min", "0", "a.0.b", "self", "class"]
NAMES = sorted(P.FUNCTIONS)
ATTR_PATHS = ["act", "scale", "fused", "fused.weight", "fused.bias", "rbr_dense.conv", "0", "nonlinearity"]
idents = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)
targets = st.one_of(st.sampled_from(PAYLOADS), st.sampled_from(NAMES), st.sampled_from(sorted(P.METHODS)),
                    st.sampled_from(ATTR_PATHS), st.text(max_size=12), idents)
plain = st.one_of(st.none(), st.booleans(), st.integers(-3, 8), st.floats(-4, 4), st.text(max_size=8),
                  st.sampled_from(PAYLOADS), st.just(torch.ones(3)))
leaves = st.one_of(
    plain.map(lambda v: ("V", v)),
    st.one_of(idents, st.sampled_from(["x", "input", "self", "__class__"])).map(lambda n: ("N", n)),
    st.just(("E", None)),
    st.tuples(st.sampled_from(["dtype", "device", "memory_format", "layout"]),
              st.one_of(st.sampled_from(["float32", "float64", "cpu", "channels_last", "strided", "load",
                                         "from_file", "save", "cuda:0", "meta"]), st.text(max_size=8))),
    st.tuples(st.text(max_size=3), plain),  # unknown tags
    plain,  # untagged junk
    st.just((torch.ones(2), torch.ones(2))),  # a tensor where a tag belongs: compared, never truth-tested
)
tagged = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4).map(lambda v: ("T", v)),
    st.lists(inner, max_size=4).map(lambda v: ("L", v)),
    st.lists(st.tuples(st.one_of(idents, st.text(max_size=6)), inner), max_size=3).map(lambda v: ("D", v)),
    st.lists(inner, min_size=3, max_size=3).map(lambda v: ("S", v)),
), max_leaves=12)
args_values = st.one_of(st.lists(tagged, max_size=4).map(lambda v: ("T", v)), tagged)
kwargs_values = st.one_of(st.lists(st.tuples(st.one_of(idents, st.sampled_from(["key", "default", "inplace"]),
                                                       st.text(max_size=6)), tagged), max_size=3)
                          .map(lambda v: ("D", v)), tagged)
ops = st.one_of(st.sampled_from(P.OPS), st.text(max_size=8))
random_nodes = st.one_of(
    st.tuples(idents, ops, targets, args_values, kwargs_values),
    st.tuples(idents, st.just("call_function"), st.sampled_from(NAMES),  # plausible: listed, on the input
              st.lists(tagged, max_size=2).map(lambda v: ("T", [("N", "x"), *v])), st.just(("D", []))),
    st.tuples(idents, st.just("call_method"), st.sampled_from(sorted(P.METHODS)),
              st.lists(tagged, max_size=2).map(lambda v: ("T", [("N", "x"), *v])), st.just(("D", []))),
)


@st.composite
def mutated(draw: st.DrawFn, program: list) -> list:
    """1-3 mutations; half the time only ones that keep the schema (listed names swapped, arguments
    replaced by earlier nodes and plain values), so that what then runs is exercised too."""
    prog = [tuple(n) for n in program]
    gentle = draw(st.booleans())
    calls = [j for j, n in enumerate(prog) if n[1] in ("call_function", "call_method")]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["name", "args"]) if gentle else st.sampled_from(ROUGH))
        i = draw(st.sampled_from(calls)) if gentle and calls else draw(st.integers(0, len(prog) - 1))
        name, op, target, args, kwargs = prog[i]
        if kind == "name" and op in ("call_function", "call_method"):
            target = draw(st.sampled_from(NAMES if op == "call_function" else sorted(P.METHODS)))
        elif kind == "args" and 0 < i < len(prog) - 1:
            earlier = ("N", draw(st.sampled_from([n[0] for n in prog[:i]])))
            rest = st.lists(plain.map(lambda v: ("V", v)) if gentle else tagged, max_size=2)
            args = ("T", [earlier, *draw(rest)])
        elif kind == "target":
            target = draw(targets)
        elif kind == "op":
            op = draw(ops)
        elif kind == "all_args":
            args = draw(args_values)
        elif kind == "kwargs":
            kwargs = draw(kwargs_values)
        elif kind == "rename":
            name = draw(st.one_of(idents, st.sampled_from([n[0] for n in prog]), st.text(max_size=6)))
        elif kind == "leaf" and type(args) is tuple and type(args[1]) is list and args[1]:
            items = list(args[1])
            items[draw(st.integers(0, len(items) - 1))] = draw(tagged)
            args = ("T", items)
        elif kind == "swap":
            j = draw(st.integers(0, len(prog) - 1))
            prog[i], prog[j] = prog[j], prog[i]
        elif kind == "drop" and len(prog) > 1:
            del prog[i]
        elif kind == "insert":
            prog.insert(i, draw(random_nodes))
        if kind not in ("swap", "drop", "insert"):
            prog[i] = (name, op, target, args, kwargs)
    return prog


ROUGH = ["name", "args", "target", "op", "all_args", "kwargs", "rename", "leaf", "swap", "drop", "insert"]


def _registered(block: nn.Module, target: str, kinds: tuple[str, ...]) -> bool:
    holder: Any = block
    *path, leaf = target.split(".")
    for part in path:
        holder = vars(holder).get("_modules", {}).get(part)
        if not isinstance(holder, nn.Module):
            return False
    return any(leaf in vars(holder).get(k, {}) for k in kinds)


def exercise(block: GraphBlock, program: Any, inputs: list[torch.Tensor]) -> str:
    """'refused', or 'ran' after checking the compiled graph and watching the run."""
    block.__dict__["program"] = program
    block.__dict__["_steps"] = None
    try:
        gm = block._compile()
    except InvalidProgram:
        return "refused"
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert id(node.target) in FUNCTION_IDS, node.target
        elif node.op == "call_method":
            assert node.target in P.METHODS, node.target
        elif node.op == "get_attr":
            assert _registered(block, node.target, ("_parameters", "_buffers")), node.target
        elif node.op == "call_module":
            assert _registered(block, node.target, ("_modules",)), node.target
        else:
            assert node.op in ("placeholder", "output")
    with watched() as events, torch.no_grad():
        try:
            gm.forward(*[a.clone() for a in inputs])  # the generated code itself (fx's error printer is slow)
        except Exception:  # a wrong but listed call may fail: only what it calls matters
            pass
    assert not events, events
    return "ran"


class Mixed(nn.Module):
    """A forward with the kinds of node the engine keeps around a fused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("scale", torch.rand(4, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "a 4-d input")
        y = self.conv(x) * self.scale
        a, b = torch.chunk(y, 2, dim=1)
        z = torch.cat([F.relu(a), b.sigmoid()], dim=1).view(x.shape[0], -1)
        return z.mean(-1, keepdim=True) + y.shape[1]


def mixed_seed() -> tuple[GraphBlock, list, list[torch.Tensor]]:
    model = Mixed().eval()
    block = GraphBlock(graph_to_program(torch.fx.symbolic_trace(model).graph), "Mixed")
    block.conv = model.conv
    block.register_buffer("scale", model.scale)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(block(x), model(x))
    return block, list(block.program), [x]


@pytest.fixture(scope="module")
def seeds() -> list[tuple[GraphBlock, list, list[torch.Tensor]]]:
    """Every GraphBlock the engine writes for the bundled sample families, with a real input each."""
    found = [mixed_seed()]
    for make in (samples.repvgg_tiny, samples.mobileone_tiny, samples.acnet_tiny):
        torch.manual_seed(0)
        model = samples.randomize_bn(make(), 0).eval()
        deployed = api.fuse(model, Options(input_shapes=((1, 3, 8, 8),))).model
        captured: dict[int, list[torch.Tensor]] = {}

        def keep(m: nn.Module, a: tuple, captured: dict = captured) -> None:
            captured.setdefault(id(m), list(a))

        hooks = [m.register_forward_pre_hook(keep) for m in deployed.modules() if isinstance(m, GraphBlock)]
        with torch.no_grad():
            deployed(torch.randn(1, 3, 8, 8))
        for h in hooks:
            h.remove()
        for m in deployed.modules():
            if isinstance(m, GraphBlock) and id(m) in captured:
                P.check_program(m.program, m)
                found.append((copy.deepcopy(m), list(m.program), captured[id(m)]))
    assert len(found) >= 4
    return found


FUZZ = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def test_engine_programs_still_run(seeds) -> None:
    for block, program, inputs in seeds:
        assert exercise(block, program, inputs) == "ran"


@FUZZ
@given(data=st.data())
def test_mutated_engine_programs(seeds, data: st.DataObject) -> None:
    block, program, inputs = data.draw(st.sampled_from(seeds))
    try:
        GraphBlock(data.draw(mutated(program)))  # construction: InvalidProgram or fine, nothing else
    except InvalidProgram:
        pass
    exercise(block, data.draw(mutated(program)), inputs)
    assert not MARKER.exists()


@FUZZ
@given(body=st.lists(random_nodes, max_size=6), out=tagged)
def test_random_programs(body: list, out: Any) -> None:
    program = [("x", "placeholder", "x", ("T", []), ("D", [])), *body, ("output", "output", "output", ("T", [out]),
                                                                         ("D", []))]
    block = GraphBlock([("x", "placeholder", "x", ("T", []), ("D", [])),
                        ("output", "output", "output", ("T", [("N", "x")]), ("D", []))])
    block.act = nn.ReLU()
    block.register_buffer("scale", torch.full((3,), 2.0))
    exercise(block, program, [torch.randn(2, 3)])
    assert not MARKER.exists()


@FUZZ
@given(key=st.one_of(idents, st.text(max_size=8), st.sampled_from(["forward", "__call__", "_compile", "training",
                                                                     "_forward_hooks", "_modules", "program"])),
       value=st.one_of(plain, st.just(nn.Identity()), st.just({1: nn.Identity()}), st.just([])))
def test_unpickled_state_is_checked(seeds, key: str, value: Any) -> None:
    """A state with any extra or replaced attribute either loads into a block whose program still
    checks, or is refused with InvalidProgram."""
    block = seeds[0][0]
    state = block.__getstate__()
    state[key] = value
    fresh = GraphBlock.__new__(GraphBlock)
    try:
        fresh.__setstate__(state)
    except InvalidProgram:
        return
    P.check_program(fresh.program, fresh)
    assert type(fresh).forward is GraphBlock.forward and "forward" not in vars(fresh)
