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


@pytest.mark.parametrize("build", ["repvgg_tiny", "acnet_tiny", "mobileone_tiny"])
def test_deploy_models_script_where_the_original_scripts(build: str) -> None:
    """torch.jit.script (LibTorch, mobile) works on a deploy model holding GraphBlocks wherever it
    works on the original, and the scripted model computes the same at another size and batch."""
    import warnings

    from repfuse import api, samples
    from repfuse.types import Options

    torch.manual_seed(0)
    model = samples.randomize_bn(getattr(samples, build)(), 0).float().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.jit.script(model)
        except Exception:
            pytest.skip("the original does not script")
        deploy = api.fuse(model, Options(input_shapes=((2, 3, 32, 32),))).model
        assert build != "repvgg_tiny" or any(isinstance(m, GraphBlock) for m in deploy.modules())
        scripted = torch.jit.script(deploy)
    x = torch.randn(3, 3, 37, 41)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)
