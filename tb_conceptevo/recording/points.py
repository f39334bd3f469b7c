"""Which units a layer name stands for, and where they are read.

:func:`resolve_layers` turns names / modules into modules (default: every conv, or a
transformer's MLP hidden units); :func:`resolve_points` finds each one's
:class:`HookPoint`: a conv or linear layer is read after the normalisation and
activation that directly follow it (found with ``torch.fx``, or from one executed
forward pass for untraceable models); ``"name.raw"`` reads the module's own output.
:func:`point_hooks` hooks those points for the duration of a block.
"""

from __future__ import annotations

import contextlib
import difflib
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._torch import hooks_on, inference_mode_of

LayerSpec = Union[str, nn.Module]

# ----------------------------------------------------------------------------- layers

def list_layers(model: nn.Module, conv_only: bool = False) -> List[str]:
    """Names of the model's modules as accepted by ``layers=`` (``"layer4.1.conv2"``).

    >>> import torchvision
    >>> list_layers(torchvision.models.resnet18(), conv_only=True)[:2]
    ['conv1', 'layer1.0.conv1']
    """
    return [name for name, module in model.named_modules()
            if name and (not conv_only or isinstance(module, nn.Conv2d))]


#: Suffix asking for a module's own output where the default would read further on:
#: ``"layer1.0.conv1.raw"`` is the raw conv output, before its BatchNorm and ReLU.
RAW_SUFFIX = ".raw"

# Modules whose output is a unit's response, and what may follow them directly.
_SOURCES = (nn.Conv2d, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LayerNorm, nn.LocalResponseNorm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
                nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink)


def _is_norm(module: nn.Module) -> bool:
    # torchvision's FrozenBatchNorm2d (detection backbones) is not an nn.BatchNorm subclass
    return isinstance(module, _NORMS) or type(module).__name__ == "FrozenBatchNorm2d"


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACTIVATIONS)


def _base_name(spec: str, named: Dict[str, nn.Module]) -> Tuple[str, bool]:
    """``(module name, raw?)``: a real module of that name wins over the suffix."""
    if spec not in named and spec.endswith(RAW_SUFFIX) and spec[: -len(RAW_SUFFIX)] in named:
        return spec[: -len(RAW_SUFFIX)], True
    return spec, False


def _default_layers(model: nn.Module, named: Dict[str, nn.Module]) -> List[Tuple[str, nn.Module]]:
    """Every ``nn.Conv2d``; for a model with at most one (none, or a transformer's patch
    embedding) also the hidden units of every MLP: each ``nn.Linear`` directly followed
    by an activation."""
    chosen = [(n, m) for n, m in named.items() if n and isinstance(m, nn.Conv2d)]
    if len(chosen) >= 2:
        return chosen
    chains = _chains(model, None)
    if chains is None:  # not traceable and no example input: registration order
        order = [(n, m) for n, m in named.items() if n]
        mlp = [n for (n, m), (_, nxt) in zip(order, order[1:]) if isinstance(m, nn.Linear) and _is_activation(nxt)]
    else:
        mlp = [n for n, (_, after) in chains.items() if isinstance(named[n], nn.Linear) and "activation" in after]
    return chosen + [(n, named[n]) for n in mlp]


def resolve_layers(model: nn.Module, layers: Optional[Iterable[LayerSpec]] = None) -> List[Tuple[str, nn.Module]]:
    """Turn layer names / modules into ``(name, module)``.

    Default: every ``nn.Conv2d`` (for a model with at most one conv, e.g. a vision
    transformer, also every MLP's hidden ``nn.Linear``).  A name ending in ``".raw"``
    (``"layer1.0.conv1.raw"``) stands for that module's own output (see
    :func:`resolve_points`); it keeps the suffix as its name."""
    named = dict(model.named_modules())
    if layers is None:
        chosen = _default_layers(model, named)
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no nn.Conv2d layers and no MLP (nn.Linear followed by an "
                "activation); pass layers=[...] with the names of modules whose output is a [B, C, H, W] "
                "feature map, [B, T, C] tokens or [B, C] (tb_conceptevo.list_layers(model) lists them all)"
            )
        return chosen
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_identity = {id(m): n for n, m in named.items()}
    chosen = []
    for spec in layers:
        if isinstance(spec, nn.Module):
            name = by_identity.get(id(spec))
            if name is None:
                raise ValueError(f"module {type(spec).__name__} is not a submodule of the model")
            if name == "":
                raise ValueError("pass submodules, not the model itself, as layers")
            chosen.append((name, spec))
        elif isinstance(spec, str):
            base, _ = _base_name(spec, named)
            if base not in named or base == "":
                close = difflib.get_close_matches(spec, [n for n in named if n], n=5, cutoff=0.5)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(
                    f"unknown layer {spec!r} in {type(model).__name__}.{hint} "
                    "tb_conceptevo.list_layers(model) lists every layer name."
                )
            chosen.append((spec, named[base]))
        else:
            raise TypeError(f"layers must be names or nn.Module objects, got {type(spec).__name__}")
    names = [n for n, _ in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"layer listed twice in {names}")
    return chosen


# ----------------------------------------------------------------------------- hook points

@dataclass(frozen=True)
class HookPoint:
    """Where a layer's units are read: the output of ``module`` at its ``call``-th call
    in one forward pass (``None``: every call).  ``layer`` is the user's name (what is
    logged); ``after`` lists what the point adds after the layer itself: ``"norm"``
    and/or ``"activation"``."""

    layer: str
    module: str
    call: Optional[int] = None
    after: Tuple[str, ...] = ()

    def describe(self) -> Dict:
        """The ``hook`` field of the stimuli payload (docs/FORMAT.md)."""
        return {"module": self.module, "call": self.call, "after": list(self.after)}


class _LeafTracer(torch.fx.Tracer):
    """Keeps sources, normalisations and activations as single graph nodes (e.g.
    torchvision's ``LayerNorm2d`` would otherwise be traced into its permutes)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, _SOURCES) or _is_norm(module) or _is_activation(module)
                or super().is_leaf_module(module, qualified_name))


_Chain = Tuple[Tuple[str, Optional[int]], Tuple[str, ...]]   # ((module, call), after)


def _follow(start, modules, next_of) -> _Chain:
    """Walk ``source -> [norm] -> [activation]``; ``next_of(step)`` gives the single
    consumer of a step's output as ``(step, module name, call)`` or None."""
    point, after, current = None, [], start
    for kind, accepts in (("norm", _is_norm), ("activation", _is_activation)):
        found = next_of(current)
        if found is None:
            break
        step, name, call = found
        if not accepts(modules[name]):
            if kind == "norm":
                continue  # no normalisation: an activation may still follow directly
            break
        current, point = step, (name, call)
        after.append(kind)
    return point, tuple(after)


def _fx_chains(model: nn.Module) -> Dict[str, _Chain]:
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    counts: Dict[str, int] = {}
    call_of = {}
    for node in graph.nodes:
        if node.op == "call_module":
            call_of[node] = counts.get(node.target, 0)
            counts[node.target] = call_of[node] + 1

    def next_of(node):
        users = list(node.users)
        if len(users) != 1:  # the output also goes elsewhere: the next module is not all that reads it
            return None
        user = users[0]
        if user.op != "call_module" or not user.args or user.args[0] is not node:
            return None
        return user, user.target, call_of[user] if counts[user.target] > 1 else None

    chains = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], _SOURCES) and counts[node.target] == 1:
            chains[node.target] = _follow(node, modules, next_of)
    return chains


def _executed_chains(model: nn.Module, example: torch.Tensor) -> Dict[str, _Chain]:
    """Fallback for models torch.fx cannot trace: one forward pass of ``example``
    logging every leaf module's call; a module follows another when its first input
    *is* the other's output tensor.  Unlike fx this cannot see a non-module consumer of
    the same tensor (e.g. a residual add that also reads the conv output)."""
    modules = dict(model.named_modules())
    leaves = [(n, m) for n, m in modules.items() if n and (isinstance(m, _SOURCES) or _is_norm(m)
                                                             or _is_activation(m) or next(m.children(), None) is None)]
    log: List[Tuple[str, int, object, object]] = []
    counts: Dict[str, int] = {}

    def make_hook(name):
        def hook(_module, inputs, output):
            call = counts.get(name, 0)
            counts[name] = call + 1
            log.append((name, call, inputs[0] if inputs else None, output))
        return hook

    with inference_mode_of(model), hooks_on(leaves, make_hook):
        model(example)

    def next_of(index):
        output = log[index][3]
        for later in range(index + 1, len(log)):
            if log[later][2] is output:
                name = log[later][0]
                return later, name, log[later][1] if counts[name] > 1 else None
        return None

    return {name: _follow(i, modules, next_of) for i, (name, _, _, _) in enumerate(log)
            if isinstance(modules[name], _SOURCES) and counts[name] == 1}


_chain_cache: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Dict[str, _Chain]]]" = weakref.WeakKeyDictionary()


def _chains(model: nn.Module, example: Optional[torch.Tensor]) -> Optional[Dict[str, _Chain]]:
    """``{source module: ((module, call), after)}`` for every conv/linear called once per
    forward pass: from torch.fx where the model traces, else from one executed forward
    pass of ``example``; None when neither is possible.  Cached per model (and its
    module structure)."""
    signature = tuple((n, type(m)) for n, m in model.named_modules())
    cached = _chain_cache.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    try:
        chains = _fx_chains(model)
    except Exception:  # data-dependent control flow, untraceable ops, ...
        if example is None:
            return None
        chains = _executed_chains(model, example)
    _chain_cache[model] = (signature, chains)
    return chains


def resolve_points(model: nn.Module, layers: Optional[Iterable[LayerSpec]] = None,
                   example: Optional[torch.Tensor] = None) -> List[HookPoint]:
    """The :class:`HookPoint` of each layer (names as in :func:`resolve_layers`).

    An ``nn.Conv2d`` or ``nn.Linear`` is read where the next layer reads it: after the
    normalisation (BatchNorm, GroupNorm, LayerNorm, ...) and the activation that
    directly follow it, each only when it is the sole consumer of the previous output
    (found with ``torch.fx``; for untraceable models from one forward pass of
    ``example``, see :func:`_executed_chains`; with neither, the module's own output).
    Any other module, a source called several times per forward pass, or a name with
    the ``".raw"`` suffix is read at its own output.
    """
    named = dict(model.named_modules())
    chosen = resolve_layers(model, layers)
    chains = None
    points = []
    for name, module in chosen:
        base, raw = _base_name(name, named)
        if not raw and isinstance(module, _SOURCES):
            if chains is None:
                chains = _chains(model, example) or {}
            (target, after) = chains.get(base, (None, ()))
            if target is not None:
                points.append(HookPoint(name, target[0], target[1], after))
                continue
        points.append(HookPoint(name, base))
    return points


def register_point_hooks(model: nn.Module, points: Sequence[HookPoint], make_hook) -> List:
    """Register ``make_hook(point)`` to see the output of ``point.module`` at its
    ``point.call``-th call of each forward pass of ``model`` (every call when None).
    A hook's non-None return value replaces the output (as for forward hooks).
    Returns the handles; the caller removes them (:func:`point_hooks` does)."""
    modules = dict(model.named_modules())
    groups: Dict[str, List[Tuple[Optional[int], object]]] = {}
    for point in points:
        groups.setdefault(point.module, []).append((point.call, make_hook(point)))
    counts: Dict[str, int] = {}

    def dispatch(module_name, entries):
        def hook(module, inputs, output):
            call = counts.get(module_name, 0)
            counts[module_name] = call + 1
            replaced = None
            for wanted, fn in entries:
                if wanted is None or wanted == call:
                    new = fn(module, inputs, output if replaced is None else replaced)
                    if new is not None:
                        replaced = new
            return replaced
        return hook

    handles = [model.register_forward_pre_hook(lambda *_: counts.clear())]
    try:
        for name, entries in groups.items():
            handles.append(modules[name].register_forward_hook(dispatch(name, entries)))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@contextlib.contextmanager
def point_hooks(model: nn.Module, points: Sequence[HookPoint], make_hook):
    """:func:`register_point_hooks` for the duration of a block (always removed)."""
    handles = register_point_hooks(model, points, make_hook)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
