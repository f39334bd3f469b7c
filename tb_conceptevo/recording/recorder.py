"""Streaming top-k stimuli of every neuron: one forward pass over the probe set.

Forward hooks at each chosen layer's hook point (for a conv: after the normalisation
and activation that directly follow it; see :func:`~.points.resolve_points`) reduce each
batch's activation maps (token outputs are first placed on their patch grid) to one
response per (image, channel) and merge them into a running per-neuron top-k with
tensor ops on the model's device, so memory is O(neurons x k + one batch).  Hooks
exist only inside :func:`record`, which always removes them and restores the
model's train/eval mode, whatever happens.

Ties are broken by the lower probe index, so the result is exact and independent of
the batch size or of how the probe set is sharded across distributed ranks.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .._compiled import torch_threads_kept
from .._torch import inference_mode_of, model_device_dtype, rank_and_world
from ..observation import LayerObservation, Observation
from .points import HookPoint, LayerSpec, point_hooks, resolve_points
from .responses import _BatchResponses, _reduce
from .tokens import TokenLayout, _Layout, _detect_layout, _token_model_options
from .topk import _all_gather_topk


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

    A consumer that needs only the responses implements ``update_batch`` instead of
    ``update``: it is called once per batch of pass 0, after the forward pass, with the
    ``[B, N]`` responses of every layer side by side (``columns[layer]`` the slice of
    each; the tensor is reused for the next batch, so copy what must be kept), so it
    costs nothing per layer::

        update_batch(pass_index, responses, columns, indices)
    When ``torch.distributed`` is initialised each rank sees only its shard; a
    consumer that supports this implements ``all_reduce()``, called after the last pass.
    """

    passes: int = 1

    def begin_pass(self, pass_index: int, shapes: Dict[str, Tuple[int, int, int]], probe) -> None:
        pass

    def update(self, pass_index: int, layer: str, fmap: torch.Tensor, response: torch.Tensor,
               indices: torch.Tensor) -> None:
        pass

    def update_batch(self, pass_index: int, responses: torch.Tensor, columns: Dict[str, slice],
                     indices: torch.Tensor) -> None:
        pass

    def end_pass(self, pass_index: int) -> None:
        pass

    def result(self):
        return None


def _reads_maps(consumer: RecordingConsumer) -> bool:
    """Whether ``consumer`` implements the per-layer ``update`` (it then gets every map)."""
    return type(consumer).update is not RecordingConsumer.update


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
            raise _rejects_probe_images(model, image, exc) from exc
    missing = [p.layer for p in points if p.layer not in shapes]
    if missing:
        raise ValueError(f"layers {missing} were not called in the forward pass; choose layers the model uses")
    return shapes


def _rejects_probe_images(model: nn.Module, image: torch.Tensor, exc: Exception) -> ValueError:
    return ValueError(
        f"{type(model).__name__} cannot take the probe images of shape "
        f"{tuple(image.shape[1:])}: {type(exc).__name__}: {exc}. Resize the probe "
        "images (e.g. ConceptShapes(size=...)) or give a transform that matches the model")


class _StaleShapes(Exception):
    """A layer's map differs from the shapes remembered for this model: measure again."""


#: model -> (structure key, shapes, calls, layouts) of its last :func:`layer_shapes`.
#: Measuring costs a forward pass of one image (measured: 16 ms per ``add_concepts`` on
#: mobilenet_v3_small, 4 % of the pass over 1,024 images), the same at every snapshot.
_MEASURED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _structure_key(model: nn.Module, points: Sequence[HookPoint], image: torch.Tensor,
                   tokens: Optional[TokenLayout]) -> Optional[tuple]:
    """What the measured shapes depend on: the points, the input, every module (identity,
    type and settings such as a conv's stride) and every tensor's shape; None when that
    cannot be read (an uninitialised lazy parameter, a failing ``extra_repr``): then
    nothing is remembered.  What this cannot see (a patched ``forward``, data-dependent
    control flow) shows as a map of another shape during the pass, which then measures
    again (:class:`_StaleShapes`)."""
    try:
        modules = tuple((name, id(module), type(module), module.extra_repr())
                        for name, module in model.named_modules())
        tensors = tuple((name, tuple(t.shape), t.dtype, t.device)
                        for name, t in list(model.named_parameters()) + list(model.named_buffers()))
    except Exception:  # noqa: BLE001 - any failure only means "do not remember"
        return None
    return (tuple(points), tuple(image.shape[1:]), image.dtype, image.device,
            _token_model_options(model, tokens), modules, tensors)


def _measured_shapes(model: nn.Module, probe, points: List[HookPoint], device, tokens: Optional[TokenLayout],
                     image: torch.Tensor, fresh: bool = False):
    """``(shapes, calls, layouts, remembered)`` of :func:`layer_shapes`, remembered per
    model while its structure and the probe's image size stay the same; ``image`` is one
    probe image as the model takes it."""
    key = _structure_key(model, points, image, tokens)
    known = None if fresh or key is None else _MEASURED.get(model)
    if known is not None and known[0] == key:
        return dict(known[1]), dict(known[2]), dict(known[3]), True
    calls: Dict[str, int] = {}
    layouts: Dict[str, _Layout] = {}
    shapes = layer_shapes(model, probe, points, device, calls, layouts, tokens)
    # measured after the pass: it may have initialised lazy parameters
    key = _structure_key(model, points, image, tokens)
    if key is None:
        _MEASURED.pop(model, None)
    else:
        _MEASURED[model] = (key, dict(shapes), dict(calls), dict(layouts))
    return shapes, calls, layouts, False


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
    points = _points_or_clear_error(model, probe, layers, device, dtype)
    rank, world = rank_and_world()
    _check_mergeable(consumers, world)
    # once: the nested blocks below then cost nothing (the compiled loops are called
    # hundreds of times per pass)
    image = _load(probe, torch.arange(1), device, dtype)
    input_size = tuple(int(s) for s in image.shape[-2:])
    with inference_mode_of(model), torch_threads_kept():
        fresh = False
        while True:
            shapes, calls, layouts, remembered = _measured_shapes(model, probe, points, device, tokens, image, fresh)
            if not fresh:
                _warn_repeated(calls)
            responses = _BatchResponses([(p.layer, shapes[p.layer][0]) for p in points], k, device, reduce)
            run = _Run(model, probe, points, layouts, shapes, list(consumers), torch.arange(rank, n, world, device=device),
                       batch_size, device, dtype, reduce, progress and rank == 0, remembered)
            try:
                _run_passes(run, responses)
                break
            except _StaleShapes:  # the model changed in a way its structure key cannot see
                fresh = True   # (never raised for fresh shapes: the pass then has clear errors)
    if world > 1:
        _all_gather_topk(responses.top)
        for consumer in consumers:
            if hasattr(consumer, "all_reduce"):
                consumer.all_reduce()
    observation, n_bad = _observation(run, responses, input_size, step)
    if n_bad:
        warnings.warn(
            f"{n_bad} neurons produced NaN/Inf activations at step {step}; they are flagged "
            "as invalid and ranked on their finite responses only", RuntimeWarning, stacklevel=2,
        )
    return observation


def _points_or_clear_error(model: nn.Module, probe, layers, device, dtype) -> List[HookPoint]:
    try:
        return _points_for(model, probe, layers, device, dtype)
    except ValueError:
        raise
    except Exception as exc:  # the untraceable-model fallback ran the model on a probe image
        raise _rejects_probe_images(model, _load(probe, torch.arange(1), "cpu"), exc) from exc


def _check_mergeable(consumers: Sequence[RecordingConsumer], world: int) -> None:
    unmergeable = [type(c).__name__ for c in consumers if world > 1 and not hasattr(c, "all_reduce")]
    if unmergeable:
        # Each rank would see only its shard: a silently partial result is worse than none.
        raise ValueError(
            f"{', '.join(unmergeable)} cannot merge results across torch.distributed ranks yet; "
            "record detectors/text spaces in a single process (e.g. only on rank 0 without "
            "distributed initialised), or leave them out under distributed training"
        )


def _warn_repeated(calls: Dict[str, int]) -> None:
    repeated = {name: count for name, count in calls.items() if count > 1}
    if repeated:
        warnings.warn(  # stacklevel 3: the caller of record()
            f"layers {dict(list(repeated.items())[:5])} run several times per forward pass (shared or reused "
            "modules): a neuron's response to an image is the largest over the calls, at the position of "
            "that call; detectors see each layer's first call", RuntimeWarning, stacklevel=3)


@dataclass
class _Run:
    """What every pass over the probe set shares."""

    model: nn.Module
    probe: object
    points: List[HookPoint]
    layouts: Dict[str, _Layout]
    shapes: Dict[str, Tuple[int, int, int]]
    consumers: List[RecordingConsumer]
    shard: torch.Tensor          # this rank's probe indices
    batch_size: int
    device: torch.device
    dtype: torch.dtype
    reduce: str
    show_progress: bool
    remembered: bool = False     # shapes from an earlier pass (_MEASURED): a mismatch measures again


class _Batch:
    """The batch in flight, as the hooks see it."""

    def __init__(self):
        self.indices: Optional[torch.Tensor] = None
        self.feed = True     # False while a batch is redone: consumers already saw it
        self.seen: set = set()   # layers already called in this forward pass

    def start(self, indices: torch.Tensor) -> None:
        self.indices, self.feed = indices, True
        self.seen.clear()


def _run_passes(run: _Run, responses: _BatchResponses) -> None:
    """Pass 0 fills the top-k and feeds the consumers; later passes only feed the
    consumers that ask for them.  ``passes`` is re-read after every pass: a consumer may
    find during pass 0 that it needs no second one (e.g. NetDissect when the maps fit in
    its cache)."""
    pass_index = 0
    while True:
        active = [c for c in run.consumers if pass_index < int(getattr(c, "passes", 1))]
        if pass_index > 0 and not active:
            break
        n_passes = max([pass_index + 1] + [int(getattr(c, "passes", 1)) for c in run.consumers])
        for consumer in active:
            consumer.begin_pass(pass_index, dict(run.shapes), run.probe)
        label = "recording" if pass_index == 0 else f"recording (pass {pass_index + 1}/{n_passes})"
        _one_pass(run, pass_index, active, responses, label)
        for consumer in active:
            consumer.end_pass(pass_index)
        pass_index += 1


def _one_pass(run: _Run, pass_index: int, active: List[RecordingConsumer], responses: _BatchResponses,
              label: str) -> None:
    from tqdm.auto import tqdm

    batch = _Batch()
    make_hook = _hook_maker(run, pass_index, [c for c in active if _reads_maps(c)], responses, batch)
    batches = torch.split(run.shard, run.batch_size)
    with inference_mode_of(run.model), point_hooks(run.model, run.points, make_hook):
        for indices in tqdm(batches, desc=label, disable=not run.show_progress, leave=False):
            batch.start(indices)
            responses.start_batch(len(indices))
            images = _load(run.probe, indices, run.device, run.dtype)
            run.model(images)
            if run.remembered and len(batch.seen) != len(run.points):
                raise _StaleShapes()  # a layer was not called: the remembered shapes are out of date
            if pass_index > 0:
                continue
            if responses.newly_non_finite():  # rare: redo this batch with the exact path for those layers
                batch.feed = False
                batch.seen.clear()
                responses.start_batch(len(indices))
                run.model(images)
            responses.merge(indices)
            if active:
                all_responses = responses.responses()
                for consumer in active:
                    consumer.update_batch(pass_index, all_responses, responses.rows, indices)


def _hook_maker(run: _Run, pass_index: int, active: List[RecordingConsumer], responses: _BatchResponses,
                batch: _Batch):
    """``make_hook(point)`` for :func:`~.points.point_hooks`: each call's output as a float
    ``[B, C, H, W]`` map, reduced into ``responses`` in pass 0 and fed to the consumers at
    the layer's first call in a forward pass."""
    def make_hook(point: HookPoint):
        name = point.layer
        layout = run.layouts[name]
        shape = run.shapes[name]

        def hook(_module, _inputs, output):
            fmap, extra = layout.to_map(output.detach())
            if fmap.shape[0] != len(batch.indices) or tuple(fmap.shape[1:]) != shape:
                if run.remembered and fmap.shape[0] == len(batch.indices):
                    raise _StaleShapes()
                # the buffers (and the compiled loops writing them) are sized from the first pass
                raise ValueError(
                    f"layer {name!r} gave a map of shape {tuple(fmap.shape)} for a batch of {len(batch.indices)} "
                    f"images, but {shape} per image when the layers were measured; record layers whose output "
                    "shape does not depend on the batch")
            if fmap.dtype != torch.float32:
                fmap = fmap.float()
                extra = None if extra is None else extra.float()
            first_call = name not in batch.seen
            batch.seen.add(name)
            feed = first_call and batch.feed and bool(active)
            response = responses.add(name, fmap, extra, first_call, feed) if pass_index == 0 else None
            if feed:
                if response is None:
                    response = _reduce(fmap, run.reduce, extra)[0]
                for consumer in active:
                    consumer.update(pass_index, name, fmap, response, batch.indices)
        return hook
    return make_hook


def _observation(run: _Run, responses: _BatchResponses, input_size: Tuple[int, int],
                 step: Optional[int]) -> Tuple[Observation, int]:
    """The merged top-k as an :class:`Observation` (one layer after the other), and how
    many neurons met NaN/Inf."""
    top = responses.top
    all_values = top.values.cpu().numpy().astype(np.float32)
    all_ids = top.ids.cpu().numpy().astype(np.int32)
    all_positions = top.positions.cpu().numpy().astype(np.int32)
    all_invalid = top.invalid.cpu().numpy()
    probe_hash = _probe_hash(run.probe)
    observation = Observation(step=step, probe_hash=probe_hash)
    n_bad_total = 0
    for point in run.points:
        name = point.layer
        rows = responses.rows[name]
        values, ids = all_values[rows].copy(), all_ids[rows].copy()
        missing = ~np.isfinite(values)
        ids[missing] = -1
        values[missing] = np.nan
        invalid = all_invalid[rows].copy()
        n_bad_total += int(invalid.sum())
        observation.layers[name] = LayerObservation(
            layer=name, image_ids=ids, activations=values,
            positions=all_positions[rows].copy(), invalid=invalid,
            map_size=tuple(run.shapes[name][1:]), input_size=input_size,
            probe_hash=probe_hash, step=step, reduce=run.reduce,
            hook={**point.describe(), **run.layouts[name].describe()},
        )
    return observation, n_bad_total
