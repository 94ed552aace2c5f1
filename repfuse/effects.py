"""Effects: what a forward does besides computing its output, and how repfuse keeps it.

DESIGN §3, *Effects*: in-place ops on live values, hooks, grad-mode and autocast regions, buffer
updates and random numbers are part of a model's semantics. The rule this module supplies the
facts for:

- an in-place op is either *functional* (it changes a fresh value that nothing else reads, as in
  ``out = a + b; out += c``) and then fuses like its out-of-place twin, or it is kept, in order,
  in the deploy model, and the value it changes is opaque to the analysis (never a constant, a
  base or an inner node of a fused sub-graph);
- a node with an effect is never dropped as dead code (`is_impure`);
- a module with hooks, whose forward switches grad mode or autocast, draws random numbers or
  updates its own tensors or attributes is left exactly as it is (its children are still fused);
- repfuse never changes the user's model: every run repfuse makes on a model happens under
  `preserved_state`, which puts buffers, parameters and plain attributes back afterwards.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .types import RepfuseError

INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                     operator.irshift, operator.imatmul}

_RNG_NAMES = {"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
              "multinomial", "normal", "poisson", "uniform_", "normal_", "bernoulli_", "random_", "exponential_",
              "geometric_", "cauchy_", "log_normal_", "rrelu", "rrelu_", "gumbel_softmax", "native_dropout"}
# functions that draw random numbers only when their `training` argument is true (F.dropout's default)
_RNG_WHEN_TRAINING = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                      "feature_dropout", "rrelu"}


@lru_cache(maxsize=512)
def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _bound(node: fx.Node, name: str, default: Any = None) -> Any:
    """The value of argument `name` of a call_function node (positional or keyword)."""
    if name in node.kwargs:
        return node.kwargs[name]
    sig = _signature(node.target) if callable(node.target) else None
    if sig is None:
        return default
    try:
        bound = sig.bind_partial(*node.args, **node.kwargs)
    except TypeError:
        return default
    return bound.arguments.get(name, sig.parameters[name].default if name in sig.parameters else default)


def inplace_target(node: fx.Node) -> fx.Node | None:
    """The node whose tensor `node` changes in place: ``t.add_(u)``, ``torch.clamp_(t)``, ``t += u``,
    ``t[i] = v``, ``F.relu(t, inplace=True)``, ``out=t``, a call of a module built with inplace=True."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.startswith("_") else None
    if node.op == "call_function":
        out = node.kwargs.get("out")
        if isinstance(out, fx.Node):
            return out
        if node.target is operator.setitem or node.target in INPLACE_OPERATORS:
            return first
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return first
        return first if _bound(node, "inplace", False) is True else None
    if node.op == "call_module" and node.graph.owning_module is not None:
        try:
            module = node.graph.owning_module.get_submodule(str(node.target))
        except AttributeError:
            return None
        return first if getattr(module, "inplace", False) is True else None
    return None


def draws_random(node: fx.Node) -> bool:
    """Does `node` use the random number generator (torch.randn_like, x.uniform_(), F.dropout in training)?"""
    if node.op not in ("call_function", "call_method"):
        return False
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in _RNG_NAMES:
        return True
    if name in _RNG_WHEN_TRAINING and node.op == "call_function":
        return _bound(node, "training", True) is not False
    return False


def is_impure(node: fx.Node) -> bool:
    """Must `node` stay in the graph although nothing reads its value? (for dead-code elimination)"""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module":  # a module call may have effects of its own (hooks, state): keep it
        return True
    return node.is_impure() or inplace_target(node) is not None or draws_random(node)


# ----------------------------------------------------------------------------------------------
# Module-level effects


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def hooks_of(module: nn.Module) -> str | None:
    """Which hooks `module` carries ('forward hooks', ...), or None. Replacing or removing such a module
    would silently drop them."""
    found = [name.strip("_").replace("_", " ") for name in _HOOKS if getattr(module, name, None)]
    return ", ".join(found) if found else None


def tensor_versions(module: nn.Module) -> dict[tuple[int, str], tuple[int, torch.Tensor]]:
    """(owner id, name) → (version counter, tensor) of every parameter and buffer under `module`."""
    return {(id(m), name): (t._version, t) for m in module.modules()
            for store in (m._parameters, m._buffers) for name, t in store.items() if t is not None}


def changed_tensors(module: nn.Module, before: dict[tuple[int, str], tuple[int, torch.Tensor]]) -> list[str]:
    """Names of the parameters/buffers under `module` changed in place or replaced since `before`."""
    names = {(id(m), n): f"{path}.{n}" if path else n for path, m in module.named_modules()
             for store in (m._parameters, m._buffers) for n in store}
    now = tensor_versions(module)
    return [names.get(key, key[1]) for key, (v, t) in before.items()
            if key not in now or now[key][1] is not t or now[key][0] != v]


_MISSING = object()
_FX_CONSTANT = "_tensor_constant"  # torch.fx stores tensors a trace computed as attributes of this name


def _plain_state(module: nn.Module) -> dict[int, tuple[nn.Module, dict[str, Any]]]:
    """Every module's __dict__ (shallow copies), its registries included."""
    state = {}
    for m in module.modules():
        d = {k: v for k, v in vars(m).items() if not k.startswith(_FX_CONSTANT)}
        for key in ("_modules", "_parameters", "_buffers"):
            d[key] = dict(d.get(key, {}))
        state[id(m)] = (m, d)
    return state


def changed_attributes(module: nn.Module, before: dict[int, tuple[nn.Module, dict[str, Any]]]) -> list[str]:
    """Attributes (plain, submodule, parameter or buffer slots) assigned since `before`."""
    changed = []
    for m, d in before.values():
        now = vars(m)
        for key in set(d) | set(now):
            if key.startswith(_FX_CONSTANT):
                continue
            if key in ("_modules", "_parameters", "_buffers"):
                old, new = d.get(key, {}), now.get(key, {})
                changed += [f"{type(m).__name__}.{k}" for k in set(old) | set(new) if old.get(k) is not new.get(k)]
            elif not key.startswith("__") and d.get(key, _MISSING) is not now.get(key, _MISSING):
                changed.append(f"{type(m).__name__}.{key}")
    return changed


def _restore_attributes(before: dict[int, tuple[nn.Module, dict[str, Any]]], private: bool = True) -> None:
    """Put attributes back. With private=False, an existing private attribute keeps its new value (a
    cache such as GraphBlock's compiled forward); new ones are still removed."""
    for m, d in before.values():
        now = vars(m)
        for key in [k for k in now if k not in d and not k.startswith(_FX_CONSTANT)]:
            del now[key]
        for key, value in d.items():
            if key in ("_modules", "_parameters", "_buffers"):
                registry = now.setdefault(key, {})
                if registry.keys() != value.keys() or any(registry[k] is not v for k, v in value.items()):
                    registry.clear()
                    registry.update(value)
            elif (private or not key.startswith("_")) and now.get(key, _MISSING) is not value:
                now[key] = value



@contextmanager
def state_watch(module: nn.Module) -> Iterator[dict[str, list[str]]]:
    """Watch a block of code (a trace of `module`'s forward) for changes to `module`'s tensors and
    attributes; yields a dict that receives {'tensors': [...], 'attributes': [...]} afterwards, and puts
    the attributes back (a trace must not leave Proxy objects in the model)."""
    versions = tensor_versions(module)
    attrs = _plain_state(module)
    found: dict[str, list[str]] = {}
    try:
        yield found
    finally:
        found["tensors"] = changed_tensors(module, versions)
        found["attributes"] = changed_attributes(module, attrs)
        _restore_attributes(attrs)


@contextmanager
def preserved_state(*models: nn.Module) -> Iterator[None]:
    """Run code on `models` and leave them as they were: buffers (values and objects), parameters
    (objects), every module's attributes and training flag. A parameter changed in place cannot be
    restored without a copy of every weight, so that is refused with a RepfuseError instead."""
    saved = []
    attrs: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
    for model in models:
        attrs.update(_plain_state(model))
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    saved.append((m, name, b, b._version, b.detach().clone()))
            for name, p in m._parameters.items():
                if p is not None:
                    saved.append((m, name, p, p._version, None))
    try:
        yield
    finally:
        _restore_attributes(attrs, private=False)
        changed_params = []
        for m, name, t, version, copy in saved:
            if t._version == version:
                continue
            if copy is None:
                changed_params.append(f"{type(m).__name__}.{name}")
                continue
            with torch.no_grad():
                t.copy_(copy)
        if changed_params:
            raise RepfuseError(f"the model's forward changes its parameters in place ({', '.join(changed_params[:3])})",
                               "repfuse converts models whose weights are constant while they run")


# ----------------------------------------------------------------------------------------------
# Fresh values: in-place ops on them are private to the sub-graph


def _fresh_functions() -> set[Any]:
    import torch.nn.functional as F

    return {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
            torch.mul, torch.div, torch.neg, torch.cat, torch.stack, torch.sum, torch.clone, F.conv1d, F.conv2d,
            F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, F.batch_norm, torch.batch_norm, F.linear,
            F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.pad, torch.relu, F.relu, torch.sigmoid, F.silu, F.gelu}


_FRESH_FUNCTIONS = _fresh_functions()
_FRESH_METHODS = {"add", "sub", "mul", "div", "neg", "sum", "clone", "relu", "sigmoid"}
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear, nn.modules.pooling._AvgPoolNd)


def fresh(node: fx.Node) -> bool:
    """Does `node` make a new tensor that shares memory with no other value (a sum, a conv's output)?
    A positive list: views, identity-like calls and user modules (which may return their input) are not."""
    if inplace_target(node) is not None:
        return functional_inplace(node)
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    if node.op == "call_module" and node.graph.owning_module is not None:
        try:
            m = node.graph.owning_module.get_submodule(str(node.target))
        except AttributeError:
            return False
        return any(isinstance(m, base) and type(m).forward is _builtin_forward(m, base) for base in _FRESH_MODULES) \
            or (type(m).__module__ == "torch.nn.modules.activation" and getattr(m, "inplace", False) is not True)
    return False


def _builtin_forward(m: nn.Module, base: type) -> Any:
    for klass in type(m).__mro__:
        if klass.__module__.startswith("torch.nn.") and "forward" in vars(klass) and issubclass(klass, base):
            return klass.forward
    return None


def functional_inplace(node: fx.Node) -> bool:
    """An in-place op on a fresh value that nothing but it reads (``out = a + b; out += c``): it behaves
    exactly as its out-of-place twin, and its change is seen by no other value."""
    t = inplace_target(node)
    return t is not None and fresh(t) and all(u is node for u in t.users)
