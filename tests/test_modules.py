"""GraphBlock programs are data: a program read from a file may only name tensor maths."""

from __future__ import annotations

import pytest
import torch

from repfuse.modules import GraphBlock, UnsupportedProgram, resolve_function


def program(target: str, op: str = "call_function", args: tuple = ()) -> list:
    return [
        ("x", "placeholder", "x", ("T", []), ("D", [])),
        ("y", op, target, ("T", [("N", "x"), *args]), ("D", [])),
        ("output", "output", "output", ("T", [("N", "y")]), ("D", [])),
    ]


@pytest.mark.parametrize("name", ["torch.relu", "torch.nn.functional.relu", "_operator.add", "math.sqrt",
                                  "torch.add", "torch._C._nn.linear", "getattr", "torch._assert"])
def test_tensor_maths_resolves(name: str) -> None:
    assert callable(resolve_function(name))


@pytest.mark.parametrize("name", ["torch.load", "torch.save", "torch.hub.load", "importlib.import_module",
                                  "os.system", "operator.attrgetter", "_operator.methodcaller", "builtins.eval",
                                  "eval", "exec", "__import__", "torch.serialization.load", "torch.compile",
                                  "torch.set_default_dtype", "torch._C._set_grad_enabled", "torch.Tensor",
                                  "torch.jit.load", "subprocess.run"])
def test_anything_else_is_refused(name: str) -> None:
    with pytest.raises(UnsupportedProgram):
        resolve_function(name)


def test_a_crafted_program_is_refused_before_anything_runs(tmp_path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(UnsupportedProgram):  # refused when the block is built, before any forward
        GraphBlock(program("torch.save", args=(("V", str(marker)),)))(torch.zeros(1))
    assert not marker.exists()


def test_private_methods_and_dunder_attributes_are_refused() -> None:
    with pytest.raises(UnsupportedProgram):
        GraphBlock(program("__reduce_ex__", op="call_method", args=(("V", 2),)))(torch.zeros(1))
    with pytest.raises(UnsupportedProgram):
        GraphBlock(program("getattr", args=(("V", "__class__"),)))(torch.zeros(1))


def test_a_plain_program_runs_and_survives_pickling(tmp_path) -> None:
    block = GraphBlock(program("torch.relu"))
    x = torch.randn(5)
    torch.testing.assert_close(block(x), torch.relu(x))
    torch.save(block, tmp_path / "b.pt")
    with torch.serialization.safe_globals([GraphBlock]):
        again = torch.load(tmp_path / "b.pt", weights_only=True)
    torch.testing.assert_close(again(x), torch.relu(x))


def test_compiled_forward_follows_dtype_changes_and_new_children() -> None:
    prog = [
        ("x", "placeholder", "x", ("T", []), ("D", [])),
        ("s", "get_attr", "scale", ("T", []), ("D", [])),
        ("y", "call_function", "_operator.mul", ("T", [("N", "x"), ("N", "s")]), ("D", [])),
        ("z", "call_module", "act", ("T", [("N", "y")]), ("D", [])),
        ("output", "output", "output", ("T", [("N", "z")]), ("D", [])),
    ]
    block = GraphBlock(prog)
    block.register_buffer("scale", torch.full((3,), 2.0))
    block.act = torch.nn.ReLU()
    x = torch.randn(4, 3)
    torch.testing.assert_close(block(x), torch.relu(2 * x))
    block.double()  # replaces the buffer: the compiled forward must not keep the old one
    assert block(x.double()).dtype == torch.float64
    block.act = torch.nn.Identity()  # a new child is used at once
    torch.testing.assert_close(block(x.double()), 2 * x.double())
