"""Map a fused model's weights onto the user's own deploy-mode architecture, by structure.

Users often have a deploy-mode class of their own (the official RepVGG built with ``deploy=True``
has one ``rbr_reparam`` conv per block). `map_to_deploy` pairs the parameterised layers of that
model with those of repfuse's fused model *by structure, never by name*:

1. both models run once on the same inputs (eval, no_grad) with a forward pre-hook on every module
   that holds persistent parameters or buffers; the order of FIRST calls is each model's layer order;
2. layer i of one is paired with layer i of the other; each pair must agree in kind (same torch.nn
   layer class and the same forward code), in the hyper-parameters that change the computation
   (kernel, stride, padding, dilation, groups, padding mode; eps, affine, … for norms), in tensor
   names, shapes and dtypes, and in how often it is called;
3. the only tolerated difference is a missing ``bias`` of a conv / linear / layer norm: zeros are
   filled in when the deploy layer has a bias and the fused one has none, and an all-zero fused bias
   is dropped when the deploy layer has none (both listed in the key map);
4. the deploy model, loaded (strictly) with the mapped weights, must reproduce the fused model's
   outputs on the inputs; otherwise something between the layers differs (an activation, an SE
   block, the order of two same-shaped layers) and the mapping is refused.

Anything ambiguous or impossible is a `RepfuseError` naming the layer where it failed. Nothing here
mutates either model (training flags are restored, hooks removed; the numerical check runs on a
copy of the deploy model).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import __version__, verify
from .types import RepfuseError

SCHEMA = 1

HINT = ("check that --deploy-model builds the same architecture in deploy mode as the checkpoint (same block "
        "counts, widths, strides, groups, one conv per fused block); layers are paired in the order they run, "
        "so the first mismatch is usually where the two architectures part")

_BIAS_KINDS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.LayerNorm)
_SIMPLE = (bool, int, float, str, type(None))
_SHOWN = 5  # names listed in an error before "… (N in all)"


@dataclass(frozen=True)
class LayerPair:
    """One paired layer: the deploy module, the fused module it takes its tensors from, and how."""

    index: int  # 1-based position in execution order
    deploy: str  # dotted module path in the deploy model ("" for the root)
    fused: str  # dotted module path in the fused model
    kind: str  # "Conv2d", "BatchNorm2d", …, or "container" (a module with children and own tensors)
    deploy_layer: str  # human description: "Conv2d(32→64, 3×3, s2, p1)"
    fused_layer: str
    calls: int  # times the module ran on the inputs (the same on both sides)
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # deploy tensor name → shape
    notes: tuple[str, ...] = ()  # "bias: zeros (the fused layer has none)", …


@dataclass(frozen=True)
class KeyMap:
    """Fused weights under the deploy model's key names; `deploy.load_state_dict(state_dict, strict=True)`."""

    state_dict: dict[str, torch.Tensor]  # fused weights under the DEPLOY model's key names
    mapping: dict[str, str]  # deploy key -> fused key (keys in `filled` have no fused source)
    layers: tuple[LayerPair, ...] = ()
    filled: tuple[str, ...] = ()  # deploy keys filled with zeros (the fused layer has no bias)
    dropped: tuple[str, ...] = ()  # fused keys left out: all-zero biases the deploy layer does not have
    unused_fused: tuple[str, ...] = ()  # fused modules with tensors that never ran (nothing to map)
    max_abs_error: float | None = None  # deploy (mapped) vs fused outputs on the inputs
    tolerance: float | None = None  # the bound max_abs_error was checked against

    def to_json(self) -> str:
        """The mapping as readable JSON (schema 1); keys are only ever added, never renamed."""
        doc = {
            "schema": SCHEMA,
            "tool": {"name": "repfuse", "version": __version__},
            "mapping": dict(self.mapping),
            "filled": {k: "zeros" for k in self.filled},
            "dropped": list(self.dropped),
            "unused_fused": list(self.unused_fused),
            "check": {"max_abs_error": self.max_abs_error, "tolerance": self.tolerance},
        }
        layers = [
            {"index": p.index, "kind": p.kind, "deploy": p.deploy, "fused": p.fused, "deploy_layer": p.deploy_layer,
             "fused_layer": p.fused_layer, "calls": p.calls,
             "tensors": {name: list(shape) for name, shape in p.tensors}, "notes": list(p.notes)}
            for p in self.layers
        ]
        # one line per layer keeps a long model readable; the whole text is still plain JSON
        head = json.dumps(doc, indent=2, ensure_ascii=False).removesuffix("\n}")
        rows = ",\n".join("    " + json.dumps(entry, ensure_ascii=False) for entry in layers)
        return head + (f',\n  "layers": [\n{rows}\n  ]\n}}\n' if rows else ',\n  "layers": []\n}\n')


# ------------------------------------------------------------------------------------------------
# one model's parameterised layers


@dataclass
class _Layer:
    module: nn.Module
    names: list[str]  # every path the module is registered under; names[0] is the primary one
    tensors: dict[str, torch.Tensor]  # persistent own parameters and buffers (None entries left out)
    container: bool  # has child modules besides its own tensors
    order: int = -1  # position of its first call; -1: never ran
    calls: int = 0
    desc: str = field(default="")

    @property
    def name(self) -> str:
        return self.names[0]

    def key(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    def quoted(self) -> str:
        return f"'{self.name}' {self.desc}" if self.name else f"the root module {self.desc}"


def _own_tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {n: p for n, p in m._parameters.items() if p is not None}
    for n, b in m._buffers.items():
        if b is not None and n not in m._non_persistent_buffers_set:
            out[n] = b
    return out


def _collect(model: nn.Module) -> list[_Layer]:
    layers: dict[int, _Layer] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in layers:
            layers[id(m)].names.append(name)
            continue
        tensors = _own_tensors(m)
        if tensors:
            container = any(c is not None for c in m._modules.values())
            layers[id(m)] = _Layer(m, [name], tensors, container)
    for layer in layers.values():
        layer.desc = _describe(layer)
    return list(layers.values())


def _cast(inputs: tuple[torch.Tensor, ...], model: nn.Module) -> tuple[Any, ...]:
    dtype = verify.model_dtype(model)
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _run(model: nn.Module, inputs: tuple[Any, ...], which: str) -> list[torch.Tensor]:
    try:
        with torch.no_grad():
            return verify.flat_outputs(model(*inputs))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        shapes = " ".join("x".join(map(str, x.shape)) for x in inputs if isinstance(x, torch.Tensor))
        raise RepfuseError(f"the {which} model does not run on inputs of shape {shapes}: {first}",
                           "pass the input shape both models take (one per model input)") from exc


def _trace(model: nn.Module, inputs: tuple[torch.Tensor, ...], which: str) -> tuple[list[_Layer], list[torch.Tensor]]:
    """The model's parameterised layers (execution order of first calls) and its outputs."""
    layers = _collect(model)
    counter = [0]
    handles: list[RemovableHandle] = []

    def hook_for(layer: _Layer) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if layer.calls == 0:
                layer.order = counter[0]
                counter[0] += 1
            layer.calls += 1
        return hook

    modes = {m: m.training for m in model.modules()}
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_pre_hook(hook_for(layer)))
        model.eval()
        outputs = _run(model, _cast(inputs, model), which)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return layers, outputs


# ------------------------------------------------------------------------------------------------
# kinds, hyper-parameters, descriptions


def _family(m: nn.Module) -> type:
    """The public torch.nn layer class a module is (a subclass counts as its torch.nn base)."""
    for cls in type(m).__mro__:
        if cls is nn.Module:
            break
        if cls.__module__.startswith("torch.nn.") and not cls.__name__.startswith("_"):
            return cls
    return type(m)


def _code(m: nn.Module) -> tuple[Any, ...]:
    cls = type(m)
    return (cls.forward, getattr(cls, "_conv_forward", None))


def _kind(layer: _Layer) -> str:
    return "container" if layer.container else _family(layer.module).__name__


def _padding(m: nn.modules.conv._ConvNd) -> Any:
    pad = m.padding
    if isinstance(pad, str):
        nd = len(m.kernel_size)
        if pad == "valid":
            return (0,) * nd
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if all(t % 2 == 0 for t in total):
            return tuple(t // 2 for t in total)
    return tuple(pad) if isinstance(pad, (tuple, list)) else pad


def _hyper(m: nn.Module) -> dict[str, Any]:
    """Hyper-parameters that change what the layer computes (in eval mode)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        h = {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": tuple(m.kernel_size),
             "stride": tuple(m.stride), "padding": _padding(m), "dilation": tuple(m.dilation), "groups": m.groups,
             "padding_mode": m.padding_mode, "transposed": m.transposed}
        if m.transposed:
            h["output_padding"] = tuple(m.output_padding)
        return h
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features}
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return {"num_features": m.num_features, "eps": m.eps, "affine": m.affine,
                "track_running_stats": m.track_running_stats}
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        return {"normalized_shape": tuple(m.normalized_shape), "eps": m.eps,
                "elementwise_affine": m.elementwise_affine}
    if isinstance(m, nn.GroupNorm):
        return {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps, "affine": m.affine}
    if isinstance(m, nn.Embedding):
        return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim, "max_norm": m.max_norm,
                "norm_type": m.norm_type}
    # any other layer: every public plain-data attribute counts (strict on purpose)
    out: dict[str, Any] = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, _SIMPLE) or (isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v)):
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def _dims(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return str(v[0]) if len(set(v)) == 1 else "×".join(map(str, v))
    return str(v)


def _describe(layer: _Layer) -> str:
    m = layer.module
    cls = type(m).__name__
    if layer.container:
        shown = ", ".join(f"{n}[{_dims(tuple(t.shape)) if t.dim() else ''}]" for n, t in layer.tensors.items())
        return f"{cls} own tensors ({shown})"
    if isinstance(m, nn.modules.conv._ConvNd):
        parts = [f"{m.in_channels}→{m.out_channels}", "×".join(map(str, m.kernel_size)), f"s{_dims(m.stride)}",
                 f"p{_dims(m.padding)}"]
        if any(d != 1 for d in m.dilation):
            parts.append(f"d{_dims(m.dilation)}")
        if m.groups != 1:
            parts.append(f"g{m.groups}")
        if m.padding_mode != "zeros":
            parts.append(m.padding_mode)
        if m.bias is None:
            parts.append("no bias")
        return f"{cls}({', '.join(parts)})"
    if isinstance(m, nn.Linear):
        return f"{cls}({m.in_features}→{m.out_features}{'' if m.bias is not None else ', no bias'})"
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return f"{cls}({m.num_features}, eps={m.eps:g})"
    shapes = ", ".join(f"{n}{list(t.shape)}" for n, t in layer.tensors.items())
    return f"{cls}({shapes})"


# ------------------------------------------------------------------------------------------------
# pairing


def _bias_rule(d: _Layer, f: _Layer) -> str | None:
    """'fill' / 'drop' when the two tensor sets differ exactly by a tolerated bias; None otherwise."""
    dn, fn = set(d.tensors), set(f.tensors)
    if dn ^ fn != {"bias"} or not isinstance(d.module, _BIAS_KINDS) or d.container:
        return None
    return "fill" if "bias" in dn else "drop"


def _problems(d: _Layer, f: _Layer) -> list[str]:
    """Why deploy layer `d` cannot take the tensors of fused layer `f` (empty: it can)."""
    if d.container != f.container:
        which = "deploy" if d.container else "fused"
        return [f"kind differs (the {which} module also has child modules)"]
    if not d.container:
        fam_d, fam_f = _family(d.module), _family(f.module)
        if fam_d is not fam_f:
            return [f"kind differs ({fam_d.__name__} vs {fam_f.__name__})"]
        if _code(d.module) != _code(f.module):
            names = type(d.module).__name__, type(f.module).__name__
            return [f"kind differs ({names[0]} and {names[1]} run different forward code)"]
        hd, hf = _hyper(d.module), _hyper(f.module)
        differ = [k for k in sorted(set(hd) | set(hf)) if hd.get(k, "<absent>") != hf.get(k, "<absent>")]
        if differ:
            return [f"{', '.join(differ)} {'differs' if len(differ) == 1 else 'differ'}"]
    out: list[str] = []
    rule = _bias_rule(d, f)
    if set(d.tensors) != set(f.tensors) and rule is None:
        only_d, only_f = sorted(set(d.tensors) - set(f.tensors)), sorted(set(f.tensors) - set(d.tensors))
        out.append(f"tensors differ (only in deploy: {only_d or 'none'}; only in fused: {only_f or 'none'})")
    if rule == "drop" and bool(torch.any(f.tensors["bias"] != 0)):
        out.append("the fused layer has a non-zero bias and the deploy layer has none (build it with bias=True)")
    for name in sorted(set(d.tensors) & set(f.tensors)):
        td, tf = d.tensors[name], f.tensors[name]
        if td.shape != tf.shape:
            out.append(f"{name} shape {tuple(td.shape)} vs {tuple(tf.shape)} differs")
        elif td.dtype != tf.dtype:
            out.append(f"{name} dtype {str(td.dtype).removeprefix('torch.')} vs "
                       f"{str(tf.dtype).removeprefix('torch.')} differs")
    if not out and d.calls != f.calls:
        out.append(f"called {d.calls} time(s) in deploy but {f.calls} in fused (shared weights differ)")
    return out


def _listing(layers: list[_Layer]) -> str:
    shown = ", ".join(layer.quoted() for layer in layers[:_SHOWN])
    return shown + (f", … ({len(layers)} in all)" if len(layers) > _SHOWN else "")


def _probe(ds: list[_Layer], fs: list[_Layer], i: int) -> str:
    """At the first mismatch i, whether one layer more or less on one side explains the rest."""
    def fits(a: list[_Layer], b: list[_Layer]) -> bool:
        return len(a) == len(b) and all(not _problems(x, y) for x, y in zip(a, b))

    if i < len(fs) and fits(ds[i:], fs[i + 1:]):
        return f" (the deploy model seems to lack a layer like fused {fs[i].quoted()}: a block missing?)"
    if i < len(ds) and fits(ds[i + 1:], fs[i:]):
        return f" (the deploy model seems to have an extra layer {ds[i].quoted()})"
    return ""


def _pair_all(ds: list[_Layer], fs: list[_Layer]) -> None:
    n = f"of {len(ds)}" if len(ds) == len(fs) else f"(deploy runs {len(ds)} layers, fused {len(fs)})"
    for i, (d, f) in enumerate(zip(ds, fs)):
        problems = _problems(d, f)
        if problems:
            raise RepfuseError(f"layer {i + 1} {n}: deploy {d.quoted()} vs fused {f.quoted()}: "
                               f"{'; '.join(problems)}{_probe(ds, fs, i)}", HINT)
    if len(ds) != len(fs):
        k = min(len(ds), len(fs))
        longer, extra = ("deploy", ds[k:]) if len(ds) > len(fs) else ("fused", fs[k:])
        other = "fused" if longer == "deploy" else "deploy"
        raise RepfuseError(f"the deploy model has {len(ds)} parameterised layers that run, the fused model "
                           f"{len(fs)}: from layer {k + 1} on, {longer} {_listing(extra)} has no counterpart "
                           f"in the {other} model", HINT)


# ------------------------------------------------------------------------------------------------
# the public entry point


def map_to_deploy(deploy: nn.Module, fused: nn.Module, inputs: tuple[torch.Tensor, ...]) -> KeyMap:
    """Put `fused`'s weights under `deploy`'s key names, pairing layers by execution order and structure.

    `inputs` are example inputs both models take (floating tensors are cast to each model's dtype).
    Raises `RepfuseError` naming the first layer that does not pair, the deploy layers that never
    run, or the output difference when the mapped deploy model does not reproduce `fused`.
    """
    ds, _ = _trace(deploy, inputs, "deploy")
    fs, f_out = _trace(fused, inputs, "fused")

    never = [layer for layer in ds if layer.calls == 0]
    if never:
        raise RepfuseError(f"deploy layers with weights never ran on the inputs, so they cannot be paired by "
                           f"execution order: {_listing(never)}",
                           "remove layers the deploy model's forward does not use (a training-only head, the "
                           "train-time branches left next to the reparam conv), or call them in forward")
    ds = sorted(ds, key=lambda layer: layer.order)
    unused = [layer for layer in fs if layer.calls == 0]
    fs = sorted((layer for layer in fs if layer.calls > 0), key=lambda layer: layer.order)
    _pair_all(ds, fs)

    values: dict[str, torch.Tensor] = {}
    mapping: dict[str, str] = {}
    filled: list[str] = []
    dropped: list[str] = []
    pairs: list[LayerPair] = []
    for i, (d, f) in enumerate(zip(ds, fs)):
        rule = _bias_rule(d, f)
        notes: list[str] = []
        if rule == "fill":
            notes.append("bias: zeros (the fused layer has none)")
        elif rule == "drop":
            notes.append("bias: dropped (the fused bias is all zeros; the deploy layer has none)")
            dropped.append(f.key("bias"))
        for local, td in d.tensors.items():
            if local in f.tensors:
                value, source = f.tensors[local].detach().clone(), f.key(local)
            else:  # the tolerated missing bias
                value, source = torch.zeros_like(td, dtype=f.tensors["weight"].dtype,
                                                 device=f.tensors["weight"].device), None
            for alias in d.names:
                key = f"{alias}.{local}" if alias else local
                values[key] = value
                if source is None:
                    filled.append(key)
                else:
                    mapping[key] = source
        pairs.append(LayerPair(i + 1, d.name, f.name, _kind(d), d.desc, f.desc, d.calls,
                               tuple((n, tuple(t.shape)) for n, t in d.tensors.items()), tuple(notes)))

    expected = list(deploy.state_dict().keys())
    missing, unexpected = sorted(set(expected) - set(values)), sorted(set(values) - set(expected))
    if missing or unexpected:
        raise RepfuseError(f"the deploy model's state_dict keys are not its modules' own tensors "
                           f"(not mapped: {missing[:_SHOWN]}; not in its state_dict: {unexpected[:_SHOWN]})",
                           "a module with custom state_dict hooks cannot be mapped by structure")
    state = {k: values[k] for k in expected}

    err, bound = _check(deploy, state, inputs, f_out)
    ordered = {k: mapping[k] for k in expected if k in mapping}
    return KeyMap(state, ordered, tuple(pairs), tuple(filled), tuple(dropped),
                  tuple(layer.name for layer in unused), err, bound)


def _check(deploy: nn.Module, state: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...],
           reference: list[torch.Tensor]) -> tuple[float, float]:
    """Load the mapped weights into a copy of `deploy` and compare its outputs with the fused model's."""
    model = copy.deepcopy(deploy)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RepfuseError(f"the mapped weights do not load into the deploy model: {str(exc).strip()[:300]}",
                           HINT) from exc
    model.eval()
    got = _run(model, _cast(inputs, model), "deploy")
    if len(got) != len(reference) or any(a.shape != b.shape for a, b in zip(got, reference)):
        shapes = ([tuple(t.shape) for t in got], [tuple(t.shape) for t in reference])
        raise RepfuseError(f"the deploy model's outputs {shapes[0]} do not match the fused model's {shapes[1]}", HINT)
    err = scale = 0.0
    for a, b in zip(got, reference):
        if a.numel() == 0:
            continue
        diff = (a.double() - b.double()).abs()
        err = max(err, float("inf") if torch.isnan(diff).any() else float(diff.max()))
        scale = max(scale, float(b.double().abs().max()))
    atol, rtol = verify.default_tolerances(verify.model_dtype(deploy))
    bound = atol + rtol * scale
    if not err <= bound:
        raise RepfuseError(f"every layer pairs, but the deploy model loaded with the mapped weights does not "
                           f"reproduce the fused model: outputs differ by {err:.3g} (> {bound:.3g}); something "
                           f"between the layers differs (an activation, an SE block, a residual add, or the "
                           f"order of two same-shaped layers)", HINT)
    return err, bound
