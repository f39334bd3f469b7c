"""Streaming top-k stimuli of every neuron: one forward pass over the probe set.

Forward hooks at each chosen layer's hook point (for a conv: after the normalisation
and activation that directly follow it; see :func:`resolve_points`) reduce each
batch's activation maps (token outputs are first placed on their patch grid) to one
response per (image, channel) and merge them into a running per-neuron top-k with
tensor ops on the model's device, so memory is O(neurons x k + one batch).  Hooks
exist only inside :func:`record`, which always removes them and restores the
model's train/eval mode, whatever happens.

Ties are broken by the lower probe index, so the result is exact and independent of
the batch size or of how the probe set is sharded across distributed ranks.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .observation import LayerObservation, Observation

LayerSpec = Union[str, nn.Module]


class RecordingConsumer:
    """Something fed by the recording pass (e.g. a concept detector).

    ``passes`` is how many passes over the probe set the consumer needs; the
    recorder runs extra passes (without top-k bookkeeping) only when one asks for
    them.  Methods are called in this order for each pass::

        begin_pass(pass_index, shapes, probe)      # shapes: {layer: (C, H, W)}
        update(pass_index, layer, fmap, response, indices)   # per batch and layer
        end_pass(pass_index)

    and ``result()`` once at the end.  ``fmap`` is the detached float activation map
    ``[B, C, H, W]`` on the model's device, ``response`` the ``[B, C]`` reduced
    response (NaN where non-finite), ``indices`` the probe indices ``[B]``.
    When ``torch.distributed`` is initialised each rank sees only its shard; a
    consumer that supports this implements ``all_reduce()``, called after the last pass.
    """

    passes: int = 1

    def begin_pass(self, pass_index: int, shapes: Dict[str, Tuple[int, int, int]], probe) -> None:
        pass

    def update(self, pass_index: int, layer: str, fmap: torch.Tensor, response: torch.Tensor,
               indices: torch.Tensor) -> None:
        pass

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self):
        return None


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


def model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where, and in which float dtype, inputs for ``model`` must live: those of its
    first floating parameter or buffer (CPU and the default dtype for a model without)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    return model_device_dtype(model)[0]


@contextlib.contextmanager
def hooks_on(modules: Sequence[Tuple[str, nn.Module]], make_hook):
    """Register ``make_hook(name)`` as forward hook on each module; always removed."""
    handles = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def inference_mode_of(model: nn.Module):
    """Eval mode and no grad inside; the model's previous mode restored whatever happens."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training


# ----------------------------------------------------------------------------- top-k

class _TopK:
    """Running per-neuron top-k of one layer (values desc, ties by lower probe index)."""

    def __init__(self, channels: int, k: int, device):
        self.k = k
        self.values = torch.full((channels, k), -math.inf, device=device)
        self.ids = torch.full((channels, k), -1, dtype=torch.int64, device=device)
        self.positions = torch.zeros((channels, k), dtype=torch.int64, device=device)
        self.invalid = torch.zeros(channels, dtype=torch.bool, device=device)

    def merge(self, values: torch.Tensor, indices: torch.Tensor, fmap: Optional[torch.Tensor],
              positions: Optional[torch.Tensor] = None) -> None:
        """Merge one batch: ``values`` ``[B, C]``, ``indices`` ``[B]`` ascending and larger
        than every index merged before (so a stable sort keeps the tie order); argmax
        positions from ``fmap`` ``[B, C, H, W]``, or given as ``positions`` ``[B, C]``.

        Only channels where some image beats the current k-th value are re-sorted, and
        the argmax position is computed only for images that enter a top-k: after the
        first batches almost nothing enters, so the merge costs little next to the
        forward pass.
        """
        # Strictly greater: on a tie the earlier (lower) index already in the list wins.
        enters = values.t() > self.values[:, -1:]
        rows = enters.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        batch = values.t()[rows]
        cand_values = torch.cat([self.values[rows], batch], dim=1)
        order = torch.sort(cand_values, dim=1, descending=True, stable=True).indices[:, : self.k]
        from_batch = order >= self.k
        batch_pos = (order - self.k).clamp(min=0)
        new_ids = torch.where(from_batch, indices[batch_pos], torch.gather(self.ids[rows], 1, order.clamp(max=self.k - 1)))
        old_pos = torch.gather(self.positions[rows], 1, order.clamp(max=self.k - 1))
        entrant_rows, entrant_slots = from_batch.nonzero(as_tuple=True)
        new_pos = old_pos.clone()
        if entrant_rows.numel() and positions is not None:
            new_pos[entrant_rows, entrant_slots] = positions[batch_pos[entrant_rows, entrant_slots], rows[entrant_rows]]
        elif entrant_rows.numel():
            batch_size, channels = fmap.shape[:2]
            flat = fmap.reshape(batch_size * channels, -1)
            picked = batch_pos[entrant_rows, entrant_slots] * channels + rows[entrant_rows]
            new_pos[entrant_rows, entrant_slots] = torch.index_select(flat, 0, picked).argmax(dim=1)
        self.values[rows] = torch.gather(cand_values, 1, order)
        self.ids[rows] = new_ids
        self.positions[rows] = new_pos


def merge_topk(values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, k: int):
    """Exact top-k of candidate rows ``[C, M]`` in any order: values desc, then id asc."""
    by_id = torch.sort(torch.where(ids < 0, torch.iinfo(torch.int64).max, ids), dim=1, stable=True).indices
    values, ids, positions = (torch.gather(t, 1, by_id) for t in (values, ids, positions))
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return tuple(torch.gather(t, 1, order) for t in (values, ids, positions))


def _lazy_positions(device) -> bool:
    return torch.device(device).type == "cpu"


def _response(fmap: torch.Tensor, reduce: str, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``[B, C]`` response, NaN/Inf propagated (see :func:`_reduce`)."""
    if extra is None:
        return fmap.amax(dim=(2, 3)) if reduce == "max" else fmap.mean(dim=(2, 3))
    flat = torch.cat([fmap.flatten(2), extra], dim=2)
    return flat.amax(dim=2) if reduce == "max" else flat.mean(dim=2)


def _fast_reduce(fmap: torch.Tensor, reduce: str, extra: Optional[torch.Tensor] = None):
    """``(response [B, C], argmax position [B, C])`` without any device sync; NaN and
    +Inf propagate into the response (the caller checks once per batch, see
    :func:`_reduce` for the exact path)."""
    flat = fmap.flatten(2)
    if reduce == "max" and extra is None:
        return flat.max(dim=2)
    positions = flat.argmax(dim=2)
    if extra is not None:
        flat = torch.cat([flat, extra], dim=2)
    return (flat.amax(dim=2) if reduce == "max" else flat.mean(dim=2)), positions


def _reduce(fmap: torch.Tensor, reduce: str, extra: Optional[torch.Tensor] = None):
    """``(response [B, C] with NaN where non-finite, sortable values, bad [C])``.

    ``extra`` ``[B, C, P]``: values outside the map that count in the response (a
    transformer's class/register tokens when asked for).  Non-finite values are
    detected from the reduction itself (max and mean propagate NaN and +Inf; mean also
    -Inf), so the common all-finite case costs one pass over the map.  With
    ``reduce="max"`` a -Inf that never reaches a channel's max changes nothing recorded
    and is not flagged.  When something is non-finite, a slow exact path ranks on the
    finite values only.
    """
    if extra is None:
        response = fmap.amax(dim=(2, 3)) if reduce == "max" else fmap.mean(dim=(2, 3))
    else:
        flat = torch.cat([fmap.flatten(2), extra], dim=2)
        response = flat.amax(dim=2) if reduce == "max" else flat.mean(dim=2)
    if bool(torch.isfinite(response).all()):  # one sync per batch and layer, not per neuron
        return response, response, torch.zeros(fmap.shape[1], dtype=torch.bool, device=fmap.device)
    flat = fmap.flatten(2) if extra is None else torch.cat([fmap.flatten(2), extra], dim=2)
    finite = torch.isfinite(flat)
    bad_pairs = (~finite).any(dim=2)
    minus_inf = torch.tensor(-math.inf, device=flat.device)
    if reduce == "max":
        sortable = torch.where(finite, flat, minus_inf).amax(dim=2)
    else:
        count = finite.sum(dim=2)
        sortable = torch.where(finite, flat, torch.zeros((), device=flat.device)).sum(dim=2) / count.clamp(min=1)
        sortable = torch.where(count > 0, sortable, minus_inf)
    shown = torch.where(bad_pairs, torch.tensor(math.nan, device=flat.device), sortable)
    return shown, sortable, bad_pairs.any(dim=0)


# ----------------------------------------------------------------------------- record

def _check_inputs(probe, k: int, batch_size: int, reduce: str) -> int:
    n = len(probe)
    if n == 0:
        raise ValueError("the probe set is empty; give at least k images")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} is larger than the probe set ({n} images); lower k or add images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    return n


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world size)`` under ``torch.distributed``, ``(0, 1)`` without it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _probe_hash(probe) -> str:
    return getattr(probe, "hash", "") or ""


def _load(probe, indices: torch.Tensor, device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Probe images ``indices`` on ``device``; floating images in ``dtype`` (the model's:
    a float64 or bfloat16 model gets float64 or bfloat16 inputs)."""
    loader = getattr(probe, "load_batch", None)
    if loader is not None:
        images = loader(indices.tolist())
    else:
        images = torch.stack([torch.as_tensor(probe[i][0]) for i in indices.tolist()])
    if dtype is not None and images.is_floating_point():
        return images.to(device=device, dtype=dtype, non_blocking=True)
    return images.to(device=device, non_blocking=True)


@dataclass(frozen=True)
class TokenLayout:
    """How token outputs map onto the image, for layers whose output is ``[B, T, C]``.

    Attributes:
        grid: ``(h, w)`` patch grid of the non-prefix tokens; None infers it from T and
            the input's aspect ratio (``T - prefix = h * w`` with ``h : w = H : W``).
        prefix: class/register tokens before the grid tokens; None infers the smallest
            count (0-8) that leaves such a grid (ViT: 1 class token).
        include_prefix: whether those tokens count in a unit's response (max or mean
            over tokens).  They have no place on the grid: the position is always the
            best grid token.

    Pass it as ``record(..., tokens=TokenLayout(...))``, or set
    ``model.conceptevo_tokens = TokenLayout(...)`` so that ConceptWriter and
    importance use it too.
    """

    grid: Optional[Tuple[int, int]] = None
    prefix: Optional[int] = None
    include_prefix: bool = False


@dataclass(frozen=True)
class _Layout:
    """How a hooked output becomes a ``[B, C, H, W]`` map: ``"map"`` (already is),
    ``"channels_last"`` (``[B, H, W, C]``, e.g. Swin), ``"tokens"`` (``[B, T, C]``:
    ``prefix`` tokens, then an ``h x w`` grid) or ``"vector"`` (``[B, C]``: a 1 x 1 map)."""

    kind: str
    prefix: int = 0
    grid: Tuple[int, int] = (1, 1)
    include_prefix: bool = False

    @property
    def channel_axis(self) -> int:
        return 1 if self.kind in ("map", "vector") else -1

    def describe(self) -> Dict:
        out = {"layout": self.kind}
        if self.kind == "tokens":
            out.update(prefix_tokens=self.prefix, prefix_in_response=self.include_prefix)
        return out

    def to_map(self, output: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(map [B, C, H, W], prefix tokens [B, C, P] counted in the response or None)``."""
        if self.kind == "map":
            return output, None
        if self.kind == "vector":
            return output[:, :, None, None], None
        if self.kind == "channels_last":
            return output.permute(0, 3, 1, 2).contiguous(), None
        grid = output[:, self.prefix:].transpose(1, 2).reshape(output.shape[0], output.shape[2], *self.grid)
        extra = output[:, : self.prefix].transpose(1, 2) if self.include_prefix and self.prefix else None
        return grid, extra


def _token_model_options(model: nn.Module, tokens: Optional[TokenLayout]) -> TokenLayout:
    tokens = tokens if tokens is not None else getattr(model, "conceptevo_tokens", None)
    if tokens is None:
        return TokenLayout()
    if not isinstance(tokens, TokenLayout):
        raise TypeError(f"tokens must be a tb_conceptevo.recording.TokenLayout, got {type(tokens).__name__}")
    return tokens


def _channel_last_module(module: nn.Module) -> bool:
    # nn.Linear and nn.LayerNorm act on the last dimension (torchvision's LayerNorm2d
    # permutes around it and returns [B, C, H, W]).
    return isinstance(module, nn.Linear) or (type(module) is nn.LayerNorm)


def _token_grid(name: str, tokens: int, input_size: Tuple[int, int], options: TokenLayout) -> Tuple[int, Tuple[int, int]]:
    hint = ("pass tokens=TokenLayout(grid=(h, w), prefix=n) to record (or set model.conceptevo_tokens), "
            "or record a module whose output is a [B, C, H, W] map")
    prefixes = [options.prefix] if options.prefix is not None else range(0, 9)
    for prefix in prefixes:
        n = tokens - prefix
        if n <= 0:
            continue
        if options.grid is not None:
            if int(options.grid[0]) * int(options.grid[1]) == n:
                return prefix, (int(options.grid[0]), int(options.grid[1]))
            continue
        height, width = input_size
        for h in range(1, n + 1):
            if n % h == 0 and h * width == (n // h) * height:
                return prefix, (h, n // h)
    given = f"grid {tuple(options.grid)} " if options.grid is not None else ""
    given += f"with {options.prefix} prefix tokens" if options.prefix is not None else ""
    raise ValueError(
        f"layer {name!r} returns {tokens} tokens ([B, T, C]), which do not form {given or 'a patch grid'} "
        f"with the input's aspect ratio {input_size[0]}:{input_size[1]} after 0-8 class/register tokens; {hint}")


def _detect_layout(name: str, module: nn.Module, output, input_size: Tuple[int, int],
                   options: TokenLayout) -> _Layout:
    """The layout of a hooked output, or a clear error naming the layer."""
    if isinstance(output, (tuple, list, dict)) or not isinstance(output, torch.Tensor):
        kind = type(output).__name__
        raise ValueError(
            f"layer {name!r} returns a {kind}, not a tensor; record a module inside it that returns one "
            f"tensor (tb_conceptevo.list_layers(model) lists them, e.g. its linear or conv layers), or "
            "the block around it")
    if not output.is_floating_point():
        raise ValueError(f"layer {name!r} returns a {output.dtype} tensor; record a layer with float activations")
    if output.dim() == 2:
        return _Layout("vector")
    if output.dim() == 3:
        prefix, grid = _token_grid(name, output.shape[1], input_size, options)
        return _Layout("tokens", prefix, grid, options.include_prefix)
    if output.dim() == 4:
        height, width = input_size

        def spatial(h, w):  # a grid no larger than the image, with about its aspect ratio
            return h <= height and w <= width and abs(h * width - w * height) <= max(width, height)
        first, last = spatial(*output.shape[2:4]), spatial(*output.shape[1:3])
        if last and not first:
            return _Layout("channels_last")
        if first and not last:
            return _Layout("map")
        return _Layout("channels_last" if _channel_last_module(module) else "map")
    raise ValueError(
        f"layer {name!r} returns a {output.dim()}-d tensor {list(output.shape)}: no channel axis found (units "
        "are read from [B, C, H, W] maps, [B, H, W, C] (Swin), [B, T, C] tokens or [B, C]); record another "
        "module (tb_conceptevo.list_layers(model) lists them)")


def _points_for(model: nn.Module, probe, layers, device, dtype) -> List[HookPoint]:
    if layers is not None and not isinstance(layers, (str, nn.Module)):
        layers = list(layers)
        if layers and all(isinstance(p, HookPoint) for p in layers):
            return layers
    return resolve_points(model, layers, example=_load(probe, torch.arange(1), device, dtype))


def layer_shapes(model: nn.Module, probe, layers, device=None, calls: Optional[Dict[str, int]] = None,
                 layouts: Optional[Dict[str, "_Layout"]] = None, tokens: Optional[TokenLayout] = None
                 ) -> Dict[str, Tuple[int, int, int]]:
    """``{layer: (C, H, W)}`` of each layer's map at its hook point from one forward
    pass of a single probe image; ``layers`` are names/modules or :class:`HookPoint`;
    ``calls`` (a dict) receives how many times each point was reached in that pass,
    ``layouts`` how each output becomes a map (tokens, channels-last, ...)."""
    model_at, dtype = model_device_dtype(model)
    device = device or model_at
    points = _points_for(model, probe, layers, device, dtype)
    options = _token_model_options(model, tokens)
    shapes: Dict[str, Tuple[int, int, int]] = {}
    counts: Dict[str, int] = {} if calls is None else calls
    found: Dict[str, _Layout] = {} if layouts is None else layouts
    image = _load(probe, torch.arange(1), device, dtype)
    input_size = tuple(int(v) for v in image.shape[-2:])

    def make_hook(point):
        name = point.layer

        def hook(module, _inputs, output):
            layout = _detect_layout(name, module, output, input_size, options)
            shape = tuple(layout.to_map(output)[0].shape[1:])
            if name in shapes and shapes[name] != shape:
                # positions are cells of one map size: calls at other sizes cannot share them
                raise ValueError(
                    f"layer {name!r} runs several times per forward pass with different output shapes "
                    f"({shapes[name]} and {shape}); record the modules around it instead")
            shapes.setdefault(name, shape)
            found.setdefault(name, layout)
            counts[name] = counts.get(name, 0) + 1
        return hook

    with inference_mode_of(model), point_hooks(model, points, make_hook):
        try:
            model(image)
        except ValueError:
            raise
        except Exception as exc:  # the model rejects the probe images
            raise ValueError(
                f"{type(model).__name__} cannot take the probe images of shape "
                f"{tuple(image.shape[1:])}: {type(exc).__name__}: {exc}. Resize the probe "
                "images (e.g. ConceptShapes(size=...)) or give a transform that matches the model"
            ) from exc
    missing = [p.layer for p in points if p.layer not in shapes]
    if missing:
        raise ValueError(f"layers {missing} were not called in the forward pass; choose layers the model uses")
    return shapes


def record(
    model: nn.Module,
    probe,
    layers: Optional[Iterable[LayerSpec]] = None,
    k: int = 10,
    batch_size: int = 64,
    reduce: str = "max",
    consumers: Sequence[RecordingConsumer] = (),
    step: Optional[int] = None,
    progress: bool = True,
    tokens: Optional[TokenLayout] = None,
) -> Observation:
    """Top-k stimuli of every channel of ``layers`` over ``probe``, in one pass.

    Args:
        model: any ``nn.Module``; it runs on its own device, in eval mode, without grad.
        probe: a :class:`~tb_conceptevo.probes.ProbeSet` (or any dataset of
            ``(image, label)`` with a ``hash`` attribute).
        layers: module names (``"features.10"``), modules, or None for every ``nn.Conv2d``
            (for a model with at most one conv, e.g. a ViT, also every MLP's hidden
            units).  A conv or linear layer is read after the normalisation and
            activation that directly follow it (:func:`resolve_points`); ``"name.raw"``
            reads its own output.  Outputs may be ``[B, C, H, W]``, ``[B, H, W, C]``
            (Swin), ``[B, T, C]`` tokens or ``[B, C]``; consumers always get the
            ``[B, C, H, W]`` map (tokens on their patch grid).
        k: stimuli kept per neuron.
        reduce: ``"max"`` (ConceptEvo) or ``"mean"`` spatial reduction.
        consumers: extra :class:`RecordingConsumer` fed by the same pass (detectors).
        step: stored in the observation.
        tokens: :class:`TokenLayout` for token outputs (default
            ``model.conceptevo_tokens``, else inferred; class/register tokens left out).

    Returns:
        :class:`~tb_conceptevo.observation.Observation` with one
        :class:`~tb_conceptevo.observation.LayerObservation` per layer.  Neurons with
        NaN/Inf activations are flagged in ``invalid`` (with a warning) and ranked on
        their finite responses only.  A layer that runs several times per forward pass
        (a shared or reused module) counts each image once: its response is the largest
        over the calls, at that call's position (with a warning); consumers see the
        layer's first call.

    Example:
        >>> import torchvision
        >>> from tb_conceptevo import probes, record
        >>> obs = record(torchvision.models.resnet18(), probes.ConceptShapes(n=64), k=5)
        >>> obs["layer1.0.conv1"].image_ids.shape
        (64, 5)
    """
    n = _check_inputs(probe, k, batch_size, reduce)
    device, dtype = model_device_dtype(model)
    try:
        points = _points_for(model, probe, layers, device, dtype)
    except ValueError:
        raise
    except Exception as exc:  # the untraceable-model fallback ran the model on a probe image
        image = _load(probe, torch.arange(1), "cpu")
        raise ValueError(
            f"{type(model).__name__} cannot take the probe images of shape {tuple(image.shape[1:])}: "
            f"{type(exc).__name__}: {exc}. Resize the probe images (e.g. ConceptShapes(size=...)) or "
            "give a transform that matches the model") from exc
    rank, world = rank_and_world()
    unmergeable = [type(c).__name__ for c in consumers if world > 1 and not hasattr(c, "all_reduce")]
    if unmergeable:
        # Each rank would see only its shard: a silently partial result is worse than none.
        raise ValueError(
            f"{', '.join(unmergeable)} cannot merge results across torch.distributed ranks yet; "
            "record detectors/text spaces in a single process (e.g. only on rank 0 without "
            "distributed initialised), or leave them out under distributed training"
        )
    calls: Dict[str, int] = {}
    layouts: Dict[str, _Layout] = {}
    shapes = layer_shapes(model, probe, points, device, calls, layouts, tokens)
    repeated = {name: count for name, count in calls.items() if count > 1}
    if repeated:
        warnings.warn(
            f"layers {dict(list(repeated.items())[:5])} run several times per forward pass (shared or reused "
            "modules): a neuron's response to an image is the largest over the calls, at the position of "
            "that call; detectors see each layer's first call", RuntimeWarning, stacklevel=2)
    shard = torch.arange(rank, n, world, device=device)
    names = [p.layer for p in points]
    # One top-k over the channels of every layer (layer after layer): a batch's
    # responses of all layers are merged at once, after its forward pass, so the cost
    # per layer is its reduction only, with no per-layer merge or device sync.
    offsets = dict(zip(names, np.cumsum([0] + [shapes[nm][0] for nm in names])[:-1].tolist()))
    top = _TopK(int(sum(shapes[nm][0] for nm in names)), k, device)
    # Layers seen producing NaN/Inf: from then on ranked by the exact (slower) path.
    exact_layers: set = set()
    # On a CPU a sync costs nothing and a pass over a map is dear: one small sync per
    # layer and batch lets the argmax run only for channels that may enter the top-k.
    # On an accelerator syncs stall the pipeline and passes are cheap: max with indices
    # for every channel, and one sync per batch.  Both give the same result.
    lazy_positions = _lazy_positions(device)
    input_size = tuple(int(s) for s in _load(probe, torch.arange(1), "cpu").shape[-2:])

    from tqdm.auto import tqdm

    pass_index = 0
    # ``passes`` is re-read after every pass: a consumer may find during pass 0 that it
    # needs no second one (e.g. NetDissect when the maps fit in its cache).
    while True:
        active = [c for c in consumers if pass_index < int(getattr(c, "passes", 1))]
        if pass_index > 0 and not active:
            break
        n_passes = max([pass_index + 1] + [int(getattr(c, "passes", 1)) for c in consumers])
        for consumer in active:
            consumer.begin_pass(pass_index, dict(shapes), probe)
        state = {"indices": None, "feed": True}
        # Per layer, this batch's [sortable, positions, finite flag, bad]: the best over
        # the calls of a layer that runs several times per forward pass.
        pending: Dict[str, List] = {}
        seen: set = set()   # layers already called in this forward pass

        def make_hook(point):
            name = point.layer
            layout = layouts[name]

            def hook(_module, _inputs, output):
                fmap, extra = layout.to_map(output.detach())
                if fmap.dtype != torch.float32:
                    fmap = fmap.float()
                    extra = None if extra is None else extra.float()
                first_call = name not in seen
                seen.add(name)
                response = None
                if pass_index == 0:
                    if name in exact_layers:
                        response, sortable, bad = _reduce(fmap, reduce, extra)
                        # Argmax among finite values only: NaN would win torch's argmax.
                        safe = fmap if not bool(bad.any()) else torch.nan_to_num(fmap, nan=-math.inf, posinf=-math.inf)
                        positions = safe.flatten(2).argmax(dim=2)
                        finite = None
                    elif lazy_positions:
                        sortable = _response(fmap, reduce, extra)
                        # One sync: all finite? may anything enter the top-k?  Argmax
                        # positions are then computed only for the channels that may.
                        enters = sortable > top.values[offsets[name]: offsets[name] + sortable.shape[1], -1]
                        finite_all, any_enters = torch.stack([torch.isfinite(sortable).all(), enters.any()]).tolist()
                        if not finite_all:  # rare: this layer takes the exact path from now on
                            exact_layers.add(name)
                            response, sortable, bad = _reduce(fmap, reduce, extra)
                            safe = torch.nan_to_num(fmap, nan=-math.inf, posinf=-math.inf)
                            positions, finite = safe.flatten(2).argmax(dim=2), None
                        else:
                            positions = torch.zeros(sortable.shape, dtype=torch.int64, device=sortable.device)
                            if any_enters:  # only the (image, channel) pairs above the k-th value
                                b, c = enters.nonzero(as_tuple=True)
                                positions[b, c] = fmap[b, c].flatten(1).argmax(dim=1)
                            finite, bad = None, None
                            response = sortable
                    else:
                        sortable, positions = _fast_reduce(fmap, reduce, extra)
                        finite, bad = torch.isfinite(sortable), None
                    if first_call:
                        pending[name] = [sortable, positions, finite, bad]
                    else:
                        best = pending[name]
                        better = sortable > best[0]
                        best[0] = torch.where(better, sortable, best[0])
                        best[1] = torch.where(better, positions, best[1])
                        if finite is not None:
                            best[2] = finite if best[2] is None else best[2] & finite
                        if bad is not None:
                            best[3] = bad if best[3] is None else best[3] | bad
                    if response is None and first_call and state["feed"] and active:
                        response = torch.where(finite, sortable, torch.tensor(math.nan, device=sortable.device))
                if first_call and state["feed"] and active:
                    if response is None:
                        response = _reduce(fmap, reduce, extra)[0]
                    for consumer in active:
                        consumer.update(pass_index, name, fmap, response, state["indices"])
            return hook

        batches = torch.split(shard, batch_size)
        label = "recording" if pass_index == 0 else f"recording (pass {pass_index + 1}/{n_passes})"
        with inference_mode_of(model), point_hooks(model, points, make_hook):
            for indices in tqdm(batches, desc=label, disable=not progress or rank != 0, leave=False):
                state["indices"], state["feed"] = indices, True
                pending.clear()
                seen.clear()
                images = _load(probe, indices, device, dtype)
                model(images)
                if pass_index > 0:
                    continue
                fast = [nm for nm in names if pending[nm][2] is not None]  # eager mode only
                if fast:
                    flags = torch.stack([pending[nm][2].all() for nm in fast]).tolist()  # one sync per batch
                    newly = [nm for nm, ok in zip(fast, flags) if not ok]
                    if newly:  # rare: redo this batch with the exact path for those layers
                        exact_layers.update(newly)
                        state["feed"] = False  # consumers already saw this batch
                        pending.clear()
                        seen.clear()
                        model(images)
                for nm in names:
                    if pending[nm][3] is not None:
                        top.invalid[offsets[nm]: offsets[nm] + shapes[nm][0]] |= pending[nm][3]
                top.merge(torch.cat([pending[nm][0] for nm in names], dim=1), indices, None,
                          positions=torch.cat([pending[nm][1] for nm in names], dim=1))
        for consumer in active:
            consumer.end_pass(pass_index)
        pass_index += 1

    if world > 1:
        _all_gather_topk(top)
        for consumer in consumers:
            if hasattr(consumer, "all_reduce"):
                consumer.all_reduce()

    all_values = top.values.cpu().numpy().astype(np.float32)
    all_ids = top.ids.cpu().numpy().astype(np.int32)
    all_positions = top.positions.cpu().numpy().astype(np.int32)
    all_invalid = top.invalid.cpu().numpy()
    probe_hash = _probe_hash(probe)
    observation = Observation(step=step, probe_hash=probe_hash)
    n_bad_total = 0
    for point in points:
        name = point.layer
        rows = slice(offsets[name], offsets[name] + shapes[name][0])
        values, ids = all_values[rows].copy(), all_ids[rows].copy()
        missing = ~np.isfinite(values)
        ids[missing] = -1
        values[missing] = np.nan
        invalid = all_invalid[rows].copy()
        n_bad_total += int(invalid.sum())
        observation.layers[name] = LayerObservation(
            layer=name, image_ids=ids, activations=values,
            positions=all_positions[rows].copy(), invalid=invalid,
            map_size=tuple(shapes[name][1:]), input_size=input_size,
            probe_hash=probe_hash, step=step, reduce=reduce, hook={**point.describe(), **layouts[name].describe()},
        )
    if n_bad_total:
        warnings.warn(
            f"{n_bad_total} neurons produced NaN/Inf activations at step {step}; they are flagged "
            "as invalid and ranked on their finite responses only", RuntimeWarning, stacklevel=2,
        )
    return observation


def _all_gather_topk(top: _TopK) -> None:
    """Merge every rank's top-k into the exact global top-k (same on all ranks)."""
    dist = torch.distributed
    world = dist.get_world_size()
    parts = {}
    for field in ("values", "ids", "positions"):
        tensor = getattr(top, field).contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(gathered, tensor)
        parts[field] = torch.cat(gathered, dim=1)
    top.values, top.ids, top.positions = merge_topk(parts["values"], parts["ids"], parts["positions"], top.k)
    invalid = top.invalid.to(torch.uint8)
    dist.all_reduce(invalid, op=dist.ReduceOp.MAX)
    top.invalid = invalid.bool()
