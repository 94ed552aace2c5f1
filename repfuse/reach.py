"""Which children a module's own Python reaches into — also in code no recorded forward ran.

A module that repfuse leaves as it is keeps running its own `forward`, including branches the
recorded forward never took (``if self.training:``, ``if x.shape[-1] > 64:``). If that code reads
``self.block.conv`` and `block` was replaced by one fused conv, the deploy model raises
AttributeError on exactly those inputs. The rule (DESIGN §3, *Shape-generic* and *Effects*):
a child whose attributes the remaining code can reach is not swapped.

`reached(module)` reads the source of the module's `forward` and of every method and property it
calls through `self`, and returns the dotted paths (relative to the module) that must stay as they
are. It is conservative: where it cannot tell (no source, `self` handed to other code,
`self.modules()`, `getattr(self, name)`), it names whole subtrees.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from torch import nn

from .modules import carried

_TREE_WALKERS = {"modules", "named_modules", "children", "named_children", "apply", "get_submodule",
                 "parameters", "named_parameters", "buffers", "named_buffers", "state_dict", "_modules",
                 "__dict__", "_apply", "to", "cuda", "cpu", "double", "float", "half", "train", "eval"}
_ITER_HELPERS = {"enumerate", "zip", "reversed", "list", "tuple", "iter", "sorted"}


@dataclass
class Reach:
    """keep: paths whose module must stay the same object; subtrees: paths under which nothing may change."""

    keep: set[str] = field(default_factory=set)
    subtrees: set[str] = field(default_factory=set)

    def frozen(self, path: str) -> bool:
        return path in self.keep or any(path == s or path.startswith(f"{s}.") or s == "" for s in self.subtrees)


def reached(module: nn.Module) -> Reach:
    """Paths inside `module` that its own remaining Python code reaches (see the module docstring)."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn.") or cls.__module__.startswith("repfuse."):
        return Reach()  # their code only calls children (Sequential) or reads its own layers
    scanner = _Scanner(module)
    if not scanner.scan_method("forward"):
        return Reach(subtrees={name for name in module._modules})
    return scanner.reach


class _Scanner:
    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.reach = Reach()
        self.done: set[str] = set()

    def scan_method(self, name: str) -> bool:
        """Scan method `name` of the module's class (and every method it calls); False without source."""
        if name in self.done:
            return True
        self.done.add(name)
        attr = inspect.getattr_static(type(self.module), name, None)
        fn = attr.fget if isinstance(attr, property) else getattr(attr, "__func__", attr)
        if isinstance(attr, (staticmethod, classmethod)):
            fn = attr.__func__
        if fn is None or not callable(fn):
            return True
        if getattr(fn, "__module__", "").startswith("torch."):
            return True
        try:
            tree = _parsed(fn)
        except (OSError, TypeError, SyntaxError, IndentationError):
            return False
        func = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
        if func is None or not func.args.args:
            return True
        _FunctionScan(self, func.args.args[0].arg).visit(func)
        return True

    # facts found by _FunctionScan ---------------------------------------------------------------

    def child_path(self, chain: list[str]) -> list[str]:
        """The prefixes of `chain` that name submodules, as dotted paths."""
        paths = []
        m: nn.Module | None = self.module
        for i, part in enumerate(chain):
            nxt = m._modules.get(part) if m is not None else None
            if nxt is None:
                break
            paths.append(".".join(chain[:i + 1]))
            m = nxt
        return paths

    def attribute_chain(self, chain: list[str], called: bool) -> None:
        """`self.a.b.c` (called or not): every submodule on the chain that something is read from stays."""
        if not chain:
            return
        if chain[0] in _TREE_WALKERS and chain[0] not in self.module._modules:
            self.reach.subtrees.add("")
            return
        mods = self.child_path(chain)
        if not mods:  # a method, property or plain attribute of the module itself: its code runs too
            attr = inspect.getattr_static(type(self.module), chain[0], None)
            if (callable(attr) or isinstance(attr, (property, staticmethod, classmethod))) \
                    and not self.scan_method(chain[0]):
                self.reach.subtrees.add("")
            return
        plain = len(chain) == len(mods) + 1 and _carried_by(self.module.get_submodule(mods[-1]), chain[-1])
        for i, path in enumerate(mods):
            last = i == len(mods) - 1
            if not last or (len(chain) > len(mods) and not plain):  # something is read from this module
                self.reach.keep.add(path)
        if len(chain) > len(mods) and chain[len(mods)] in _TREE_WALKERS:
            self.reach.subtrees.add(mods[-1])

    def handed_out(self, chain: list[str]) -> None:
        """`self.a` passed to other code (`checkpoint_seq(self.stages, x)`): that code gets the module
        itself, which stays the same object; its children stay callable under their names (a fused child
        computes what it did and keeps its plain attributes), which is all code that runs a module or its
        children relies on."""
        mods = self.child_path(chain)
        if mods:
            self.reach.keep.add(mods[-1])

    def self_handed_out(self) -> None:
        """`self` passed to other code (`v8DetectionLoss(self)`): the module stays itself (it is left as
        Python), its containers stay the same objects (that code may index or iterate them), and every
        other child stays callable under its name with its plain attributes."""
        self.reach.keep.update(name for name, m in self.module._modules.items() if _container(m))

    def elements_read(self, chain: list[str], attr: str | None = None) -> None:
        """An element of container `self.a` has an attribute read: the container stays, and so do its
        items, unless `attr` is a plain attribute every item carries over to its replacement (`m.f`)."""
        mods = self.child_path(chain)
        if not mods:
            return
        self.reach.keep.add(mods[-1])
        container = self.module.get_submodule(mods[-1])
        if attr is not None and all(_carried_by(m, attr) for m in container._modules.values() if m is not None):
            return
        self.reach.keep.update(f"{mods[-1]}.{name}" for name in container._modules)

    def element_handed_out(self, chain: list[str]) -> None:
        """An element of container `self.a` passed to other code (`profile(m, x)`): like a child handed
        out, except that a layer computing the same with the same plain attributes may stand in for an
        item that is not itself a container."""
        mods = self.child_path(chain)
        if not mods:
            return
        self.reach.keep.add(mods[-1])
        container = self.module.get_submodule(mods[-1])
        self.reach.keep.update(f"{mods[-1]}.{name}" for name, m in container._modules.items() if _container(m))


def _container(m: nn.Module | None) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def _carried_by(m: nn.Module | None, attr: str) -> bool:
    """`attr` is a plain instance attribute of `m` that a replacement of `m` keeps (`rewrite.keep_attributes`)."""
    return m is not None and attr in vars(m) and carried(attr, vars(m)[attr])


@lru_cache(maxsize=1024)
def _parsed(fn: Any) -> ast.Module:
    """The syntax tree of a function's source (cached: every instance of a class shares its code)."""
    return ast.parse(textwrap.dedent(inspect.getsource(fn)))


def _self_chain(node: ast.AST, self_name: str) -> list[str] | None:
    """`self.a.b` → ['a', 'b']; None if `node` is not an attribute chain on self."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == self_name:
        return parts[::-1]
    return None


class _FunctionScan(ast.NodeVisitor):
    def __init__(self, scanner: _Scanner, self_name: str) -> None:
        self.s = scanner
        self.self_name = self_name
        self.aliases: dict[str, list[str]] = {}  # name → chain of the container it iterates over / indexes
        self.same: dict[str, list[str]] = {}  # name → chain it is bound to (`blk = self.block`)
        self.dynamic: set[str] = set()  # names bound to `getattr(self, f"norm{i}")`: fine only when called

    # uses of `self` ------------------------------------------------------------------------------

    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Load):
            return
        if node.id == self.self_name:  # `self` itself handed to other code
            self.s.self_handed_out()
        elif node.id in self.aliases:  # an element of a container handed to other code
            self.s.element_handed_out(self.aliases[node.id])
        elif node.id in self.same:
            self.s.handed_out(self.same[node.id])
        elif node.id in self.dynamic:  # any attribute of self, used otherwise than called
            self.s.reach.subtrees.add("")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        chain = _self_chain(func, self.self_name)
        if chain is not None:  # self.a(...), self.a.b(...), self.method(...)
            self.s.attribute_chain(chain, called=True)
        elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)
              and isinstance(func.value.func, ast.Name) and func.value.func.id == "super"):
            for klass in type(self.s.module).__mro__[1:]:  # super().forward(x): the base's code runs too
                if func.attr in vars(klass) and not klass.__module__.startswith("torch."):
                    _scan_class_method(self.s, klass, func.attr)
        elif isinstance(func, ast.Name) and func.id in ("getattr", "hasattr", "setattr", "delattr", "vars"):
            if node.args and _self_chain(node.args[0], self.self_name) is not None:
                base = _self_chain(node.args[0], self.self_name) or []
                name = node.args[1] if len(node.args) > 1 else None
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    self.s.attribute_chain([*base, name.value], called=False)
                else:
                    mods = self.s.child_path(base)
                    self.s.reach.subtrees.add(mods[-1] if mods else "")
                for arg in node.args[1:]:
                    self.visit(arg)
                return
        elif isinstance(func, ast.Name) and func.id in (*self.same, *self.aliases, *self.dynamic):
            pass  # calling an alias of a child (or of whichever child a dynamic getattr named): fine
        elif (isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and func.func.id == "getattr"
              and func.args and _self_chain(func.args[0], self.self_name) == []):
            if len(func.args) > 1 and isinstance(func.args[1], ast.Constant) and isinstance(func.args[1].value, str):
                self.s.attribute_chain([func.args[1].value], called=True)
            # getattr(self, f"layer{i}")(x): some child is called, which any fused child still allows
        elif isinstance(func, ast.Name) and func.id in ("len", "isinstance", "type", "id", "callable"):
            for arg in node.args:  # the child is inspected, not handed out: it must stay what it is
                chain = _self_chain(arg, self.self_name)
                mods = self.s.child_path(chain) if chain is not None else []
                if mods:
                    self.s.reach.keep.add(mods[-1])
                else:
                    self.visit(arg)
            return
        else:
            self.visit(func)
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            self._value_use(arg)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in ("device", "dtype") and self._first_tensor(node.value):
            return  # next(self.parameters()).device: a replacement keeps every tensor's device and dtype
        chain = _self_chain(node, self.self_name)
        if chain is not None:
            self.s.attribute_chain(chain, called=False)
            return
        if isinstance(node.value, ast.Name):  # alias.attr
            if node.value.id in self.dynamic:
                self.s.reach.subtrees.add("")
            elif node.value.id in self.aliases:
                self.s.elements_read(self.aliases[node.value.id], node.attr)
            elif node.value.id in self.same:
                self.s.attribute_chain([*self.same[node.value.id], node.attr], called=False)
            return
        self.generic_visit(node)

    def _first_tensor(self, node: ast.AST) -> bool:
        """`next(self.parameters())` / `next(iter(self.buffers()))`."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "next"
                and len(node.args) == 1):
            return False
        arg = node.args[0]
        if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "iter" and arg.args:
            arg = arg.args[0]
        return (isinstance(arg, ast.Call) and not arg.args
                and _self_chain(arg.func, self.self_name) in (["parameters"], ["buffers"])
                and not any(n in self.s.module._modules for n in ("parameters", "buffers")))

    def visit_Subscript(self, node: ast.Subscript) -> None:
        chain = _self_chain(node.value, self.self_name)
        if chain is not None:  # self.blocks[i]: the container stays indexable
            mods = self.s.child_path(chain)
            if mods:
                self.s.reach.keep.add(mods[-1])
            self.s.attribute_chain(chain, called=False)
            self.visit(node.slice)
            return
        self.generic_visit(node)

    def _value_use(self, arg: ast.AST) -> None:
        """`f(self.block)`: the child is handed to other code."""
        chain = _self_chain(arg, self.self_name)
        if chain is not None and self.s.child_path(chain):
            self.s.handed_out(chain)
        else:
            self.visit(arg)

    # bindings ------------------------------------------------------------------------------------

    def visit_For(self, node: ast.For) -> None:
        self._bind_iteration(node.target, node.iter)
        self._visit_iter(node.iter)
        for stmt in [*node.body, *node.orelse]:
            self.visit(stmt)

    def _visit_comp(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        for gen in node.generators:  # bind the loop names before the element reads them
            self.visit(gen)
        for part in ("elt", "key", "value"):
            if hasattr(node, part):
                self.visit(getattr(node, part))

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _visit_comp

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self._bind_iteration(node.target, node.iter)
        self._visit_iter(node.iter)
        for cond in node.ifs:
            self.visit(cond)

    def _bind_iteration(self, target: ast.AST, it: ast.AST) -> None:
        containers = self._iterated(it)
        names = [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
        for chain in containers:
            mods = self.s.child_path(chain)
            if mods:
                self.s.reach.keep.add(mods[-1])
            for name in names:
                self.aliases[name] = chain

    def _visit_iter(self, it: ast.AST) -> None:
        """The iterable of a loop: self containers in it are iterated (see _bind_iteration), not handed out."""
        if _self_chain(it, self.self_name) is not None:
            return
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in _ITER_HELPERS:
            for a in it.args:
                self._visit_iter(a)
            return
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr in ("values", "items") \
                and _self_chain(it.func.value, self.self_name) is not None:
            return
        self.visit(it)

    def _iterated(self, it: ast.AST) -> list[list[str]]:
        chain = _self_chain(it, self.self_name)
        if chain is not None:
            return [chain]
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id in _ITER_HELPERS:
            return [c for a in it.args for c in self._iterated(a)]
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr in ("values", "items"):
            inner = _self_chain(it.func.value, self.self_name)
            return [inner] if inner is not None else []
        return []

    def visit_Assign(self, node: ast.Assign) -> None:
        value = node.value
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "getattr"
                and len(value.args) == 2 and _self_chain(value.args[0], self.self_name) == []
                and not isinstance(value.args[1], ast.Constant) and all(isinstance(t, ast.Name) for t in node.targets)):
            # norm = getattr(self, f"norm{i}"): some attribute of self, which is fine while it is only called
            self.dynamic.update(t.id for t in node.targets)
            self.visit(value.args[1])
            return
        chain = _self_chain(node.value, self.self_name)
        if chain is not None and self.s.child_path(chain) and all(isinstance(t, ast.Name) for t in node.targets):
            for t in node.targets:
                self.same[t.id] = chain  # blk = self.block: uses of blk are uses of self.block
            return
        if isinstance(node.value, ast.Subscript):
            inner = _self_chain(node.value.value, self.self_name)
            if inner is not None and self.s.child_path(inner):
                self.s.reach.keep.add(self.s.child_path(inner)[-1])
                for t in node.targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            self.aliases[n.id] = inner
                self.visit(node.value.slice)
                return
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        # `self.block is None` / `is not None`: true of any replacement too
        if all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops) and all(
                isinstance(c, ast.Constant) and c.value is None for c in node.comparators):
            if _self_chain(node.left, self.self_name) is not None:
                return
        self.generic_visit(node)


def _scan_class_method(scanner: _Scanner, klass: type, name: str) -> None:
    fn = vars(klass)[name]
    fn = getattr(fn, "__func__", fn)
    try:
        tree = _parsed(fn)
    except (OSError, TypeError, SyntaxError, IndentationError):
        scanner.reach.subtrees.add("")
        return
    func = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if func is not None and func.args.args:
        _FunctionScan(scanner, func.args.args[0].arg).visit(func)
