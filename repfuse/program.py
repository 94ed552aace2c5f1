"""The closed schema of a GraphBlock program: a stored forward is data, checked before anything runs.

A program is read from a file, so nothing in it is trusted. `check_program` enforces, before torch.fx
generates a line of code from it:

- a list of at most MAX_NODES tuples (name, op, target, args, kwargs); op is one of OPS; placeholders
  first, exactly one output, last;
- names are identifiers (no keywords, no dunders), unique; placeholder targets likewise (they become
  the parameters of the generated forward);
- get_attr / call_module targets are dotted paths (identifier or index parts) that name a *registered*
  parameter or buffer / submodule of the block, found by walking `_modules`, `_parameters` and
  `_buffers` (never getattr), and not shadowed by any other attribute;
- call_function targets are exact names in FUNCTIONS, call_method targets names in METHODS: pure tensor
  maths listed one by one, no namespace admitted whole; nothing listed touches files, imports or
  global settings, or takes a callable; dropout only with its training switch the constant False;
- arguments are tagged data only (TAGS): earlier nodes, bounded None/bool/int/float/str, tuples, lists,
  dicts with identifier keys, slices, Ellipsis, and dtype/device/memory_format/layout from fixed
  tables. `getattr` reads only GETATTR_NAMES; builtins max/min take no `key=`.

Anything else raises `InvalidProgram`, a `RepfuseError` (CLI exit 2).
"""

from __future__ import annotations

import builtins
import keyword
import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import _get_qualified_name

from .types import RepfuseError

MAX_NODES = 20_000
MAX_DEPTH = 12  # nesting of tuples/lists/dicts in one argument
MAX_LEAVES = 4096  # tagged values in one node's args and kwargs
MAX_TOTAL_LEAVES = 1_000_000
MAX_STR = 1024
MAX_NAME = 256
MAX_INT = 2**63
OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")
TAGS = ("N", "V", "T", "L", "D", "S", "E", "dtype", "device", "memory_format", "layout")
_HINT = "the file was not written by repfuse or was altered: convert the training checkpoint again"


class UnsupportedProgram(Exception):
    """The graph uses something a program cannot name safely (a user function, an odd constant)."""


class InvalidProgram(UnsupportedProgram, RepfuseError):
    """A program that does not pass the schema. A RepfuseError, so the CLI exits 2 with its reason."""

    def __init__(self, message: str, hint: str = _HINT) -> None:
        RepfuseError.__init__(self, f"GraphBlock program refused: {message}", hint)


def _names(text: str) -> list[str]:
    return text.split()


_LISTED: dict[Any, list[str]] = {
    torch: _names("""
        _assert abs absolute acos adaptive_avg_pool1d add addcdiv addcmul addmm amax amin argmax argmin
        asin atan atan2 avg_pool1d baddbmm batch_norm bmm broadcast_tensors cat ceil celu channel_shuffle
        chunk clamp clamp_max clamp_min clip concat concatenate conv1d conv2d conv3d conv_transpose1d
        conv_transpose2d conv_transpose3d cos cosh cumprod cumsum div dropout einsum eq erf exp expm1 flatten
        flip floor floor_divide fmod full_like gather ge group_norm gt index_select instance_norm isfinite isinf
        isnan layer_norm le lerp log log10 log1p log2 log_softmax logical_and logical_not logical_or
        logsumexp lt masked_fill matmul max max_pool1d max_pool2d max_pool3d maximum mean min minimum mm
        movedim mul narrow ne neg norm ones_like permute pixel_shuffle pixel_unshuffle pow prod reciprocal
        relu remainder reshape roll round rsqrt select selu sigmoid sign sin sinh softmax split sqrt square
        squeeze stack std sub sum t tan tanh tensor_split transpose tril triu true_divide unbind unflatten
        unsqueeze var where zeros_like"""),
    F: _names("""
        adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
        adaptive_max_pool3d avg_pool1d avg_pool2d avg_pool3d batch_norm celu conv1d conv2d conv3d
        conv_transpose1d conv_transpose2d conv_transpose3d dropout dropout1d dropout2d dropout3d elu fold
        gelu glu group_norm hardsigmoid hardswish hardtanh instance_norm interpolate layer_norm leaky_relu
        linear log_softmax logsigmoid max_pool1d max_pool2d max_pool3d mish normalize pad pixel_shuffle
        pixel_unshuffle prelu relu relu6 rms_norm selu sigmoid silu softmax softmin softplus softsign tanh
        tanhshrink unfold"""),
    operator: _names("""
        abs add and_ eq floordiv ge getitem gt iadd ifloordiv imod imul invert isub itruediv le lshift lt
        matmul mod mul ne neg not_ or_ pos pow rshift setitem sub truediv truth xor"""),
    math: _names("ceil exp fabs floor log log10 log2 pow sqrt trunc"),
    builtins: _names("abs bool float getattr int len max min"),
}
_SPACE = {torch: "torch", F: "torch.nn.functional", operator: "operator", math: "math", builtins: ""}

METHODS = frozenset(_names("""
    abs add add_ addcmul addmm all amax amin any argmax argmin baddbmm bfloat16 bmm bool ceil chunk clamp
    clamp_ clamp_max clamp_min clip contiguous cos cpu cumsum detach dim div div_ double eq erf exp expand
    expand_as flatten flip float floor gather ge gt half index_select int is_contiguous is_floating_point
    item le log log_softmax long lt masked_fill masked_fill_ matmul max maximum mean min minimum mm movedim
    mul mul_ narrow ndimension ne neg norm numel permute pow prod reciprocal relu relu_ repeat reshape
    reshape_as roll round rsqrt select sigmoid sigmoid_ sign sin size softmax split sqrt square squeeze std
    sub sub_ sum t tanh tanh_ tensor_split to transpose tril triu type_as unbind unflatten unsqueeze var
    view view_as where zero_"""))
GETATTR_NAMES = frozenset(_names("shape ndim dtype device layout T mT real imag is_cuda"))
_NO_KWARGS = {"max", "min"}  # builtins.max/min: `key=` would call a value
_NO_RANDOM = {  # name → (position, keyword, default) of the switch that must be the constant False
    "torch.dropout": (2, "train", None),
    **{f"torch.nn.functional.{f}": (2, "training", True) for f in ("dropout", "dropout1d", "dropout2d", "dropout3d")},
}


def _function_table() -> tuple[dict[str, Callable[..., Any]], dict[int, str]]:
    """name → function, from the fixed lists above; every object is also found by the name fx records
    for it (`_operator.add`, `torch._C._nn.gelu`)."""
    table: dict[str, Callable[..., Any]] = {}
    by_id: dict[int, str] = {}
    for space, names in _LISTED.items():
        for attr in names:
            fn = getattr(space, attr, None)
            if fn is None:  # not in this torch version
                continue
            listed = f"{_SPACE[space]}.{attr}".lstrip(".")
            table[listed] = fn
            recorded = _get_qualified_name(fn)
            if table.setdefault(recorded, fn) is not fn:
                recorded = listed
            by_id.setdefault(id(fn), recorded)
    return table, by_id


FUNCTIONS: Mapping[str, Callable[..., Any]]  # every function a program may call, by stored name
FUNCTIONS, _NAME_OF = _function_table()
_ENUM_TYPES = (("dtype", torch.dtype), ("memory_format", torch.memory_format), ("layout", torch.layout))
_ENUMS: dict[str, dict[str, Any]] = {  # fixed tables, built from torch itself, never from a file
    kind: {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, cls)}
    for kind, cls in _ENUM_TYPES
}
_DEVICE = re.compile(r"(cpu|cuda|meta|mps|xpu)(:[0-9]{1,4})?")
_RESERVED = {"self", "torch", "device", "inf", "nan", "NoneType", "fx_pytree", "pytree", "getattr"}


def _show(x: Any) -> str:
    """A value from a file, for a message: never its own str/repr, which could be huge."""
    return repr(x[:60]) if type(x) is str else f"a {type(x).__name__}"


def _is(x: Any, s: str) -> bool:
    return type(x) is str and x == s


def resolve_function(name: str) -> Callable[..., Any]:
    """The listed function a program names; InvalidProgram for any other name."""
    fn = FUNCTIONS.get(name) if type(name) is str else None
    if fn is None:
        raise InvalidProgram(f"{_show(name)} is not a listed tensor function")
    return fn


def function_name(fn: Callable[..., Any]) -> str:
    """The name a program stores for a traced call_function target; UnsupportedProgram if unlisted."""
    name = _NAME_OF.get(id(fn))
    if name is None or FUNCTIONS.get(name) is not fn:
        try:
            label = _get_qualified_name(fn)
        except Exception:  # any odd callable: name it by repr
            label = repr(fn)[:80]
        raise UnsupportedProgram(f"the forward calls {label}, which a deploy file cannot name safely")
    return name


def encode(value: Any) -> Any:
    """fx argument → plain data: every value becomes a (tag, payload) tuple."""
    if isinstance(value, torch.fx.Node):
        return ("N", value.name)
    if value is None:
        return ("V", None)
    for base in (bool, int, float, str):  # subclasses (IntEnum, ...) are stored as their plain value
        if isinstance(value, base):
            return ("V", base(value))
    if isinstance(value, (tuple, list)):
        return ("L" if isinstance(value, list) else "T", [encode(v) for v in value])
    if isinstance(value, dict):
        return ("D", [(k, encode(v)) for k, v in value.items()])
    if isinstance(value, slice):
        return ("S", [encode(value.start), encode(value.stop), encode(value.step)])
    if value is Ellipsis:
        return ("E", None)
    for kind, cls in _ENUM_TYPES:
        if isinstance(value, cls):
            return (kind, str(value).removeprefix("torch."))
    if isinstance(value, torch.device):
        return ("device", str(value))
    raise UnsupportedProgram(f"constant of type {type(value).__name__} cannot be stored in a program")


def decode(enc: Any, env: Mapping[str, Any]) -> Any:
    """Checked plain data → the value (fx nodes from `env` for "N")."""
    tag, payload = enc
    if tag == "N":
        return env[payload]
    if tag == "V":
        return payload
    if tag in ("T", "L"):
        items = [decode(p, env) for p in payload]
        return tuple(items) if tag == "T" else items
    if tag == "D":
        return {k: decode(v, env) for k, v in payload}
    if tag == "S":
        return slice(*(decode(p, env) for p in payload))
    if tag == "E":
        return Ellipsis
    if tag == "device":
        return torch.device(payload)
    return _ENUMS[tag][payload]


def _identifier(s: Any, what: str) -> str:
    if type(s) is not str or not s.isidentifier() or keyword.iskeyword(s) or s.startswith("__") \
            or len(s) > MAX_NAME:
        raise InvalidProgram(f"{what} {_show(s)} is not a plain identifier")
    return s


def _path(target: Any, what: str) -> list[str]:
    if type(target) is not str or len(target) > MAX_NAME:
        raise InvalidProgram(f"{what} target {_show(target)} is not a dotted path")
    parts = target.split(".")
    for p in parts:
        if not (p.isascii() and p.isdigit()):
            _identifier(p, f"{what} target part")
    return parts


def _registered(root: nn.Module, parts: list[str], leaf: str) -> None:
    """Walk the registration dicts (never getattr): each part must be registered exactly once, and not
    be shadowed by an instance or class attribute; the last one must be a tensor or a module."""
    holder: Any = root
    for i, part in enumerate(parts):
        d = vars(holder) if isinstance(holder, nn.Module) else {}
        found = [(k, d[k][part]) for k in ("_parameters", "_buffers", "_modules")
                 if isinstance(d.get(k), dict) and part in d[k]]
        want = ("_parameters", "_buffers") if i == len(parts) - 1 and leaf == "tensor" else ("_modules",)
        value = found[0][1] if len(found) == 1 and found[0][0] in want else None
        ok = isinstance(value, torch.Tensor) if want[0] == "_parameters" else isinstance(value, nn.Module)
        if not ok or part in d or hasattr(type(holder), part):
            what = "parameter or buffer" if leaf == "tensor" else "submodule"
            raise InvalidProgram(f"{'.'.join(parts)!r} is not a registered {what} of the block")
        holder = value


class _Checker:
    def __init__(self) -> None:
        self.defined: set[str] = set()
        self.leaves = 0
        self.total = 0

    def value(self, enc: Any, depth: int = 0) -> None:
        self.leaves += 1
        self.total += 1
        if depth > MAX_DEPTH or self.leaves > MAX_LEAVES or self.total > MAX_TOTAL_LEAVES:
            raise InvalidProgram("an argument is nested too deep or too large")
        if type(enc) not in (tuple, list) or len(enc) != 2 or type(enc[0]) is not str or enc[0] not in TAGS:
            raise InvalidProgram(f"argument {_show(enc)} is not a tagged value")
        tag, p = enc
        if tag == "N":
            if type(p) is not str or p not in self.defined:
                raise InvalidProgram(f"argument refers to {_show(p)}, which is not an earlier node")
        elif tag == "V":
            if type(p) not in (type(None), bool, int, float, str) or (type(p) is int and abs(p) > MAX_INT) \
                    or (type(p) is str and len(p) > MAX_STR):
                raise InvalidProgram(f"constant {_show(p)} is not a plain bounded value")
        elif tag in ("T", "L", "S"):
            if type(p) not in (tuple, list) or (tag == "S" and len(p) != 3):
                raise InvalidProgram(f"malformed {tag} value")
            for item in p:
                self.value(item, depth + 1)
        elif tag == "D":
            if type(p) not in (tuple, list):
                raise InvalidProgram("malformed D value")
            for item in p:
                if type(item) not in (tuple, list) or len(item) != 2:
                    raise InvalidProgram("malformed D item")
                _identifier(item[0], "keyword")
                self.value(item[1], depth + 1)
        elif tag == "E":
            if p is not None:
                raise InvalidProgram("malformed E value")
        elif tag == "device":
            if type(p) is not str or not _DEVICE.fullmatch(p):
                raise InvalidProgram(f"device {_show(p)} is not a plain device name")
        elif type(p) is not str or p not in _ENUMS[tag]:
            raise InvalidProgram(f"{tag} {_show(p)} is not a known {tag}")

    def node(self, i: int, node: Any, root: nn.Module | None, placeholders_done: bool) -> None:
        if type(node) not in (tuple, list) or len(node) != 5:
            raise InvalidProgram(f"node {i} is not a (name, op, target, args, kwargs) tuple")
        name, op, target, args, kwargs = node
        _identifier(name, "node name")
        if name in self.defined:
            raise InvalidProgram(f"node name {name!r} is used twice")
        if type(op) is not str or op not in OPS:
            raise InvalidProgram(f"node {name}: unknown op {_show(op)}")
        if op == "placeholder" and placeholders_done:
            raise InvalidProgram(f"node {name}: placeholders must come first")
        for enc, tag in ((args, "T"), (kwargs, "D")):
            if type(enc) not in (tuple, list) or len(enc) != 2 or not _is(enc[0], tag):
                raise InvalidProgram(f"node {name}: args must be a T value and kwargs a D value")
        self.leaves = 0
        self.value(args)
        self.value(kwargs)
        n_args, kw = len(args[1]), [k for k, _ in kwargs[1]]
        if op == "placeholder":
            if _identifier(target, "placeholder") in _RESERVED or n_args > 1 or kw \
                    or not all(_is(a[0], "V") for a in args[1]):
                raise InvalidProgram(f"placeholder {_show(target)} must be a plain parameter name")
        elif op in ("get_attr", "call_module"):
            parts = _path(target, op)
            if root is not None:
                _registered(root, parts, "tensor" if op == "get_attr" else "module")
            if op == "get_attr" and (n_args or kw):
                raise InvalidProgram(f"node {name}: get_attr takes no arguments")
        elif op == "call_function":
            resolve_function(target)
            if target in _NO_KWARGS and kw:
                raise InvalidProgram(f"node {name}: {target}() takes no keyword arguments in a program")
            if target in _NO_RANDOM:
                index, key, default = _NO_RANDOM[target]
                enc = args[1][index] if n_args > index else dict(kwargs[1]).get(key, ("V", default))
                if not _is(enc[0], "V") or enc[1] is not False:
                    raise InvalidProgram(f"node {name}: {target} draws random numbers unless {key}=False")
            if target == "getattr" and (n_args != 2 or kw or not _is(args[1][0][0], "N")
                                        or not _is(args[1][1][0], "V") or args[1][1][1] not in GETATTR_NAMES):
                raise InvalidProgram(f"node {name}: getattr may only read {', '.join(sorted(GETATTR_NAMES))}")
        elif op == "call_method":
            if type(target) is not str or target not in METHODS:
                raise InvalidProgram(f"node {name}: {_show(target)} is not a listed tensor method")
            if n_args < 1:
                raise InvalidProgram(f"node {name}: call_method needs the object it is called on")
        elif not _is(target, "output") or n_args != 1 or kw:
            raise InvalidProgram(f"node {name}: output must be output(value)")
        self.defined.add(name)


def check_program(program: Any, root: nn.Module | None = None) -> tuple[tuple[Any, ...], ...]:
    """Check `program` against the schema (with `root`: also that targets are registered in it) and
    return it as a tuple of nodes; InvalidProgram with a one-line reason otherwise."""
    if type(program) not in (list, tuple):
        raise InvalidProgram(f"a program is a list of nodes, not {type(program).__name__}")
    if not 1 <= len(program) <= MAX_NODES:
        raise InvalidProgram(f"a program has 1 to {MAX_NODES} nodes, this one {len(program)}")
    checker = _Checker()
    placeholders_done = False
    for i, node in enumerate(program):
        checker.node(i, node, root, placeholders_done)
        placeholders_done = placeholders_done or node[1] != "placeholder"
        if node[1] == "output" and i != len(program) - 1:
            raise InvalidProgram("the output node must be the last one")
    if program[-1][1] != "output":
        raise InvalidProgram("a program ends with its output node")
    return tuple(tuple(node) for node in program)
