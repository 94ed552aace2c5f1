"""GraphBlock programs are validated data: every payload below would create a marker file if it ran
(code pasted into fx's generated source, dunder chains, callables smuggled in as arguments, listed-
looking functions that write files). Each is refused with `InvalidProgram` (a RepfuseError: CLI exit
2) when a block is built, before it compiles, when a file holding it is unpickled by a bare
``torch.load(weights_only=True)``, by repfuse's loader and by every CLI command, and no marker appears.
The injection payloads are shown to be live: with the check switched off they do create the marker."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from repfuse import api, cli
from repfuse import io as rio
from repfuse import program as P
from repfuse.modules import GraphBlock, InvalidProgram
from repfuse.types import Options, RepfuseError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_checkpoints" / "repvgg_tiny.pt"
E: tuple = ("D", [])


def V(v: Any) -> tuple:
    return ("V", v)


def N(name: str) -> tuple:
    return ("N", name)


def T(*items: tuple) -> tuple:
    return ("T", list(items))


def code(marker: Path) -> str:
    """A Python expression without dots that creates `marker` (attribute paths are split on dots)."""
    path = ", ".join(str(b) for b in f"touch {marker}".encode())
    return f'getattr(__import__("os"), "system")(str(bytes([{path}]), "ascii"))'


def prog(*body: tuple, out: str | None = None) -> list:
    nodes = [("x", "placeholder", "x", T(), E), *body]
    return [*nodes, ("output", "output", "output", T(N(out or nodes[-1][0])), E)]




def weird(marker: Path, base: str = "self", attr: str = "training") -> str:
    """A target that breaks out of the `getattr(base, "...")` fx writes for a non-identifier name."""
    return f'{attr}"), {code(marker)}, getattr({base}, "{attr}'


INJECTIONS: dict[str, Callable[[Path], tuple[list, dict[str, Any]]]] = {
    "placeholder": lambda m: ([("x", "placeholder", f"x={code(m)}", T(), E),
                               ("output", "output", "output", T(N("x")), E)], {}),
    "call_method": lambda m: (prog(("y", "call_method", weird(m, "x", "relu"), T(N("x")), E)), {}),
    "get_attr": lambda m: (prog(("w", "get_attr", weird(m), T(), E)), {"_buffers": weird(m)}),
    "call_module": lambda m: (prog(("y", "call_module", weird(m), T(N("x")), E)), {"_modules": weird(m)}),
    "kwarg_name": lambda m: (prog(("y", "call_function", "torch.nn.functional.relu", T(N("x")),
                                   ("D", [(f"inplace=({code(m)}) == 1) or dict(a", V(1))]))), {}),
}
OTHERS: dict[str, Callable[[Path], list]] = {
    "from_file": lambda m: prog(("y", "call_function", "torch.from_file", T(V(str(m)), V(True), V(16)), E)),
    "tofile": lambda m: prog(("a", "call_method", "numpy", T(N("x")), E),
                             ("b", "call_method", "tofile", T(N("a"), V(str(m))), E)),
    "torch_save": lambda m: prog(("y", "call_function", "torch.save", T(N("x"), V(str(m))), E)),
    "os_system": lambda m: prog(("y", "call_function", "os.system", T(V(f"touch {m}")), E)),
    "eval": lambda m: prog(("y", "call_function", "eval", T(V(code(m))), E)),
    "torch_ops": lambda m: prog(("y", "call_function", "torch.ops.aten.from_file", T(V(str(m))), E)),
    "dunder_chain": lambda m: prog(("g", "get_attr", "_compile.__globals__", T(), E),
                                   ("i", "call_function", "_operator.getitem", T(N("g"), V("inspect")), E),
                                   ("o", "call_function", "getattr", T(N("i"), V("os")), E),
                                   ("y", "call_method", "system", T(N("o"), V(f"touch {m}")), E)),
    "max_key": lambda m: prog(("i", "get_attr", "forward.__globals__", T(), E),
                              ("o", "call_function", "getattr", T(N("i"), V("os")), E),
                              ("s", "call_function", "getattr", T(N("o"), V("system")), E),
                              ("y", "call_function", "max", T(T(V(f"touch {m}"))), ("D", [("key", N("s"))]))),
    "enum_callable": lambda m: prog(("y", "call_function", "max", T(T(V(str(m)))),
                                     ("D", [("key", ("dtype", "from_file"))]))),
    "getattr_method": lambda m: prog(("a", "call_function", "getattr", T(N("x"), V("numpy")), E),
                                     ("b", "call_function", "operator.getitem", T(N("a"), V(0)), E)),
    "type_import": lambda m: prog(("y", "call_method", "type", T(N("x"), V("os.system")), E)),
}
ALL = sorted([*INJECTIONS, *OTHERS])


def payload(name: str, marker: Path) -> tuple[list, dict[str, Any]]:
    if name in INJECTIONS:
        return INJECTIONS[name](marker)
    return OTHERS[name](marker), {}


def plant(block: GraphBlock, name: str, marker: Path) -> GraphBlock:
    """Give an existing block the payload, bypassing every check (as a crafted file would)."""
    program, extra = payload(name, marker)
    if "_buffers" in extra:
        block._buffers[extra["_buffers"]] = torch.zeros(1)
    if "_modules" in extra:
        block._modules[extra["_modules"]] = nn.Identity()
    block.__dict__["program"] = program
    block.__dict__["_steps"] = None
    return block


def plain_block() -> GraphBlock:
    return GraphBlock(prog(("y", "call_function", "torch.relu", T(N("x")), E)))


@pytest.mark.parametrize("name", ALL)
def test_refused_when_built(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    with pytest.raises(InvalidProgram):
        GraphBlock(payload(name, marker)[0])
    assert not marker.exists()


@pytest.mark.parametrize("name", ALL)
def test_refused_before_compiling(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    block = plant(plain_block(), name, marker)
    with pytest.raises(InvalidProgram) as info:
        block(torch.zeros(()))
    assert "GraphBlock program refused" in info.value.message and "\n" not in info.value.message
    assert isinstance(info.value, RepfuseError)
    assert not marker.exists()


@pytest.mark.parametrize("name", sorted(INJECTIONS))
def test_injections_are_live_without_the_check(name: str, tmp_path: Path, monkeypatch) -> None:
    """Proves the payloads are real: fx itself would run them."""
    import repfuse.modules as modules

    monkeypatch.setattr(modules, "check_program", lambda program, root=None: tuple(program))
    marker = tmp_path / "MARKER"
    block = plant(plain_block(), name, marker)
    try:
        block(torch.zeros(()))
    except Exception:  # the payload ran while fx built the forward; what follows may fail
        pass
    assert marker.exists()


def test_file_writing_payloads_are_live(tmp_path: Path) -> None:
    torch.from_file(str(tmp_path / "a"), True, 16)
    torch.zeros(2).numpy().tofile(tmp_path / "b")
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ALL)
def test_bare_weights_only_load_raises(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "block.pt"
    torch.save(plant(plain_block(), name, marker), path)
    with torch.serialization.safe_globals([GraphBlock, nn.Identity]), pytest.raises(InvalidProgram):
        torch.load(path, weights_only=True)
    assert not marker.exists()


# --------------------------------------------------------------------------- real deploy files


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "deploy.pt"
    api.convert_file(SAMPLE, out, Options())
    return out


def tamper(deploy: Path, name: str, marker: Path, dst: Path) -> Path:
    obj = torch.load(deploy, weights_only=False)
    model = obj if isinstance(obj, nn.Module) else rio.find_model(obj)[0]
    block = next(m for m in model.modules() if isinstance(m, GraphBlock))
    plant(block, name, marker)
    torch.save(obj, dst)
    return dst


def test_the_deploy_file_holds_checked_graph_blocks(deploy: Path) -> None:
    loaded = rio.load_checkpoint(deploy)
    blocks = [m for m in loaded.model.modules() if isinstance(m, GraphBlock)]
    assert blocks
    for b in blocks:
        P.check_program(b.program, b)


@pytest.mark.parametrize("name", ALL)
def test_repfuse_loader_refuses(name: str, deploy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    bad = tamper(deploy, name, marker, tmp_path / "bad.pt")
    with pytest.raises(RepfuseError, match="GraphBlock program refused"):
        rio.load_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["placeholder", "call_method", "get_attr", "from_file", "max_key"])
@pytest.mark.parametrize("command", ["verify", "against", "convert", "inspect"])
def test_every_command_exits_2(name: str, command: str, deploy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    bad = str(tamper(deploy, name, marker, tmp_path / "bad.pt"))
    out = tmp_path / "out.pt"
    args = {"verify": ["verify", bad], "against": ["verify", str(SAMPLE), "--against", bad],
            "convert": ["convert", bad, str(out)], "inspect": ["inspect", bad]}[command]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 2, r.output
    assert "GraphBlock program refused" in r.output
    assert not marker.exists() and not out.exists()


@pytest.mark.skipif(shutil.which("repfuse") is None, reason="the repfuse console script is not installed")
def test_installed_command_verify_against_a_tampered_file(deploy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    bad = tamper(deploy, "call_method", marker, tmp_path / "bad.pt")
    r = subprocess.run([shutil.which("repfuse"), "verify", str(SAMPLE), "--against", str(bad)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "GraphBlock program refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------- the state around the program


def _reload(block: GraphBlock, tmp_path: Path) -> Any:
    torch.save(block, tmp_path / "b.pt")
    with torch.serialization.safe_globals([GraphBlock, nn.Identity, nn.ReLU]):
        return torch.load(tmp_path / "b.pt", weights_only=True)


def test_a_pickled_hook_is_refused(tmp_path: Path) -> None:
    block = plain_block()
    block.register_forward_pre_hook(nn.Identity)  # a callable weights_only admits
    with pytest.raises(InvalidProgram, match="hooks"):
        _reload(block, tmp_path)


@pytest.mark.parametrize("attr", ["forward", "_compile", "__call__", "extra_repr"])
def test_an_attribute_shadowing_a_method_is_refused(attr: str, tmp_path: Path) -> None:
    block = plain_block()
    block.__dict__[attr] = nn.Identity()
    with pytest.raises(InvalidProgram, match="attribute"):
        _reload(block, tmp_path)


def test_a_stored_compiled_forward_is_refused(tmp_path: Path) -> None:
    block = plain_block()
    block.__dict__["program"] = prog(("y", "call_module", "act", T(N("x")), E))
    block._modules["act"] = nn.ReLU()
    state = block.__getstate__()
    state["_steps"] = nn.Identity()
    with pytest.raises(InvalidProgram):
        GraphBlock.__new__(GraphBlock).__setstate__(state)


@pytest.mark.parametrize("change", [{"program": None}, {"_modules": [1]}, {"training": 1}, {"source_class": 7},
                                    {"_forward_hooks": torch.ones(2)}, {"_parameters": {"w": torch.ones(1)}}])
def test_a_malformed_state_is_refused(change: dict) -> None:
    state = {**plain_block().__getstate__(), **change}
    if change == {"program": None}:
        del state["program"]
    with pytest.raises(InvalidProgram):
        GraphBlock.__new__(GraphBlock).__setstate__(state)


@pytest.mark.parametrize("target, register", [
    ("forward", "_modules"),  # registered, but getattr would find the method
    ("program", "_modules"),  # registered, but the instance attribute shadows it
    ("act", None),  # not registered at all
    ("act.inner", "_modules"),  # a path below a leaf
])
def test_call_module_targets_must_be_registered_and_unshadowed(target: str, register: str | None) -> None:
    block = GraphBlock(prog(("y", "call_module", target, T(N("x")), E)))
    if register:
        block._modules[target.split(".")[0]] = nn.ReLU()
    with pytest.raises(InvalidProgram, match="registered submodule"):
        block(torch.zeros(3))


def test_get_attr_walks_registration_not_getattr() -> None:
    block = GraphBlock(prog(("w", "get_attr", "lin.weight", T(), E),
                            ("y", "call_function", "operator.mul", T(N("x"), N("w")), E)))
    block.lin = nn.Linear(3, 3)
    block(torch.zeros(3))  # registered parameter of a registered child: fine
    block.lin.__dict__["extra"] = torch.zeros(3)  # a plain attribute, not registered
    block.program = prog(("w", "get_attr", "lin.extra", T(), E))  # (setattr: compiles again)
    with pytest.raises(InvalidProgram, match="registered parameter or buffer"):
        block(torch.zeros(3))


# --------------------------------------------------------------------------- the rules, one by one


def test_the_lists_name_no_file_import_rng_or_settings_function() -> None:
    exact = {"compile", "exec", "eval", "system", "open", "attrgetter", "methodcaller", "itemgetter", "call",
             "vmap", "cond", "bernoulli", "multinomial", "normal", "tofile", "numpy", "storage", "type", "apply_",
             "map_", "register_hook", "backward", "share_memory_", "cuda", "tolist", "untyped_storage",
             "data_ptr", "pin_memory", "scaled_dot_product_attention", "rrelu", "alpha_dropout"}
    prefixes = ("load", "save", "from_", "manual_seed", "seed", "set_", "new_", "rand", "import", "__")
    for name in [*P.FUNCTIONS, *P.METHODS]:
        leaf = name.rpartition(".")[2]
        assert leaf not in exact and not leaf.startswith(prefixes), name
        assert not leaf.startswith("_") or name == "torch._assert", name
        assert not {"ops", "jit", "hub", "serialization", "_dynamo"} & set(name.split(".")[:-1]), name
    classes = {name for name, f in P.FUNCTIONS.items() if isinstance(f, type)}
    assert classes == {"bool", "float", "int"}  # plain conversions; no other class can be constructed


def bad(program: list) -> str:
    with pytest.raises(InvalidProgram) as info:
        P.check_program(program)
    return info.value.message


@pytest.mark.parametrize("node, reason", [
    (("class", "call_function", "torch.relu", T(N("x")), E), "not a plain identifier"),
    (("__y", "call_function", "torch.relu", T(N("x")), E), "not a plain identifier"),
    (("y", "call_function", "torch.relu", T(N("later")), E), "not an earlier node"),
    (("y", "call_function", "torch.relu", ("T", [N("x")]), ("D", [("not a name", V(1))])), "not a plain identifier"),
    (("y", "call_function", "torch.relu", T(("V", 10**30)), E), "not a plain bounded value"),
    (("y", "call_function", "torch.relu", T(V("s" * 5000)), E), "not a plain bounded value"),
    (("y", "call_function", "torch.relu", T(("V", b"bytes")), E), "not a plain bounded value"),
    (("y", "call_function", "torch.relu", T(("X", 1)), E), "not a tagged value"),
    (("y", "call_function", "torch.relu", T((torch.ones(2), 1)), E), "not a tagged value"),
    (("y", "call_function", "torch.relu", T(("V", torch.ones(2))), E), "not a plain bounded value"),
    (("y", torch.ones(2), "torch.relu", T(N("x")), E), "unknown op"),
    (("y", "call_function", "torch.relu", T(("dtype", "load")), E), "not a known dtype"),
    (("y", "call_function", "torch.relu", T(("layout", "from_file")), E), "not a known layout"),
    (("y", "call_function", "torch.relu", T(("device", "cpu'); print('x")), E), "not a plain device name"),
    (("y", "call_function", "max", T(N("x"), V(1)), ("D", [("key", V(None))])), "no keyword arguments"),
    (("y", "call_function", "getattr", T(N("x"), V("__class__")), E), "getattr may only read"),
    (("y", "call_function", "getattr", T(N("x"), V("shape"), V(None)), E), "getattr may only read"),
    (("y", "call_function", "torch.nn.functional.dropout", T(N("x"), V(0.5)), E), "draws random numbers"),
    (("y", "call_method", "__reduce_ex__", T(N("x"), V(2)), E), "not a listed tensor method"),
    (("y", "call_method", "relu", T(), E), "needs the object"),
    (("y", "get_attr", "a.__dict__", T(), E), "not a plain identifier"),
    (("y", "get_attr", "a..b", T(), E), "not a plain identifier"),
    (("y", "placeholder", "self", T(), E), "plain parameter name"),
    (("y", "placeholder", "y", T(N("x")), E), "plain parameter name"),
    (("y", "output", "output", T(N("x")), E), "output node must be the last"),
    (("x", "call_function", "torch.relu", T(N("x")), E), "used twice"),
])
def test_schema_rules(node: tuple, reason: str) -> None:
    assert reason in bad(prog(node, out="x"))


def test_structure_rules() -> None:
    out = ("output", "output", "output", T(N("self")), E)
    assert "plain parameter name" in bad([("self", "placeholder", "self", T(), E), out])
    late = ("z", "placeholder", "z", T(), E)
    assert "placeholders must come first" in bad(prog(("y", "call_function", "torch.relu", T(N("x")), E), late))
    assert "ends with its output" in bad([("x", "placeholder", "x", T(), E)])
    assert "1 to" in bad([])
    assert "list of nodes" in bad("not a list")  # type: ignore[arg-type]
    deep: tuple = V(1)
    for _ in range(P.MAX_DEPTH + 2):
        deep = T(deep)
    assert "too deep" in bad(prog(("y", "call_function", "torch.relu", T(N("x"), deep), E)))
    many = [("x", "placeholder", "x", T(), E)] + [(f"n{i}", "call_function", "torch.relu", T(N("x")), E)
                                                   for i in range(P.MAX_NODES)]
    assert "nodes" in bad([*many, ("output", "output", "output", T(N("x")), E)])


def test_what_the_engine_emits_runs() -> None:
    block = GraphBlock(prog(("n", "call_function", "getattr", T(N("x"), V("ndim")), E),
                            ("c", "call_function", "_operator.eq", T(N("n"), V(2)), E),
                            ("a", "call_function", "torch._assert", T(N("c"), V("2-d")), E),
                            ("s", "call_function", "getattr", T(N("x"), V("shape")), E),
                            ("i", "call_function", "_operator.getitem", T(N("s"), ("S", [V(None), V(1), V(None)])), E),
                            ("m", "call_function", "max", T(N("i"), T(V(1))), E),
                            ("d", "call_function", "torch.nn.functional.dropout", T(N("x"), V(0.5)),
                             ("D", [("training", V(False))])),
                            ("y", "call_method", "to", T(N("d")), ("D", [("dtype", ("dtype", "float64"))])),
                            ("z", "call_function", "torch.cat", T(("L", [N("y"), N("y")]), V(-1)), E),
                            out="z"))
    x = torch.randn(2, 3)
    torch.testing.assert_close(block(x), torch.cat([x.double(), x.double()], -1))
