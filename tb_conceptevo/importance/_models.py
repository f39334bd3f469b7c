"""Model plumbing of the importance computation: layer names, architecture checks,
eval state, hooks at the recorder's points, logits and output checks."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..recording import _base_name, _detect_layout, _token_model_options, point_hooks, resolve_points


def _layer_names(model: nn.Module, layers=None) -> List[str]:
    """Module names to analyse, resolved exactly like the recorder does (default every
    ``nn.Conv2d``; names or submodules; unknown names -> error with close matches)."""
    from ..recording import resolve_layers

    return [name for name, _ in resolve_layers(model, layers)]


def check_same_architecture(model_from: nn.Module, model_to: nn.Module, layers: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the first layer whose parameters/buffers or module type
    differ between the two snapshots."""
    if not isinstance(model_from, nn.Module) or not isinstance(model_to, nn.Module):
        raise TypeError(
            f"model_from and model_to must be torch.nn.Module, got "
            f"{type(model_from).__name__} and {type(model_to).__name__}"
        )
    state_from, state_to = model_from.state_dict(), model_to.state_dict()
    for key in state_from:
        if key not in state_to:
            raise ValueError(
                f"snapshots differ in architecture: layer {key.rpartition('.')[0] or key!r} has "
                f"{key!r} in model_from but not in model_to"
            )
        shape_from, shape_to = tuple(state_from[key].shape), tuple(state_to[key].shape)
        if shape_from != shape_to:
            raise ValueError(
                f"snapshots differ in architecture: layer {key.rpartition('.')[0]!r} has "
                f"{key.rpartition('.')[2]} of shape {list(shape_from)} in model_from but "
                f"{list(shape_to)} in model_to"
            )
    for key in state_to:
        if key not in state_from:
            raise ValueError(
                f"snapshots differ in architecture: layer {key.rpartition('.')[0] or key!r} has "
                f"{key!r} in model_to but not in model_from"
            )
    modules_to = dict(model_to.named_modules())
    modules_from = dict(model_from.named_modules())
    for name in layers:
        name = _base_name(name, modules_from)[0]  # "conv1.raw" -> "conv1"
        if name not in modules_to:
            raise ValueError(f"snapshots differ in architecture: layer {name!r} is missing in model_to")
        if type(modules_to[name]) is not type(modules_from[name]):
            raise ValueError(
                f"snapshots differ in architecture: layer {name!r} is a "
                f"{type(modules_from[name]).__name__} in model_from but a "
                f"{type(modules_to[name]).__name__} in model_to"
            )


@contextlib.contextmanager
def _evaluation_state(model: nn.Module):
    """Eval mode and frozen parameters inside the block; every module's training flag and
    every parameter's ``requires_grad`` restored afterwards, also on exceptions.

    Freezing the parameters means the backward pass computes activation gradients only.
    """
    training = [(module, module.training) for module in model.modules()]
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    try:
        model.eval()
        for param, _ in requires_grad:
            param.requires_grad_(False)
        yield
    finally:
        for module, flag in training:
            module.training = flag
        for param, flag in requires_grad:
            param.requires_grad_(flag)


def _forward_hooks(model: nn.Module, hooks: Mapping[str, Callable], example: torch.Tensor):
    """Register ``{layer name: hook}`` at each layer's hook point, the same point the
    recorder reads (:func:`tb_conceptevo.recording.resolve_points`: a conv after its
    normalisation and activation), so importance and revert act on what the next layer
    sees.  ``example`` (one input) locates the points of models torch.fx cannot trace.
    Always removed when the block ends."""
    points = resolve_points(model, list(hooks), example)
    return point_hooks(model, points, lambda point: hooks[point.layer])


def _as_logits(output, class_index: int) -> torch.Tensor:
    """The ``[B, K]`` logits of a model output (tensor, tuple/list -> first, ``.logits``)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TypeError(f"the model must return class logits of shape [batch, classes], got {shape}")
    n_classes = output.shape[1]
    if not 0 <= class_index < n_classes:
        raise ValueError(
            f"class index {class_index} is out of range: the model has {n_classes} outputs "
            f"(valid: 0..{n_classes - 1})"
        )
    return output


def _check_output(name: str, output) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        raise TypeError(
            f"layer {name!r} must output a tensor [batch, channels, ...] to be analysed, got "
            f"{type(output).__name__ if not isinstance(output, torch.Tensor) else list(output.shape)}"
        )
    return output


def _unit_axis(model: nn.Module, name: str, module: nn.Module, output: torch.Tensor, images: torch.Tensor) -> int:
    """The channel axis of a layer's output, as the recorder reads it (1 for
    ``[B, C, H, W]``, -1 for tokens ``[B, T, C]`` and Swin's ``[B, H, W, C]``)."""
    options = _token_model_options(model, None)
    return _detect_layout(name, module, output, tuple(images.shape[-2:]), options).channel_axis


def _check_all_ran(layers: Sequence[str], store: Mapping[str, torch.Tensor], model: str) -> None:
    missing = [name for name in layers if name not in store]
    if missing:
        raise ValueError(f"layer(s) {missing} did not run in the forward pass of {model}")


class _ForwardComplete(Exception):
    """Raised by a capture hook to end a forward pass whose remaining output is unused."""


def _check_first_call(name: str, seen: Mapping) -> None:
    """A hooked layer must run once per forward pass (its units are one Z per image)."""
    if name in seen:
        raise ValueError(f"layer {name!r} ran twice in one forward pass; importance needs each "
                         f"analysed module to run once per pass (pick another layer)")


def _capture_hooks(store: Dict[str, torch.Tensor], stop_when_complete: Optional[int] = None
                   ) -> Callable[[str], Callable]:
    """Forward hooks that keep a copy of each layer's output (a copy because in-place
    modules after the layer, e.g. ``ReLU(inplace=True)``, would overwrite it).  With
    ``stop_when_complete=n`` the hook raises :class:`_ForwardComplete` once ``n`` layers
    are stored."""

    def make(name: str):
        def hook(module, inputs, output):
            _check_first_call(name, store)
            store[name] = _check_output(name, output).detach().clone()
            if stop_when_complete is not None and len(store) == stop_when_complete:
                raise _ForwardComplete

        return hook

    return make
