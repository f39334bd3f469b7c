"""Recording: the top-k stimuli of every neuron in one forward pass over the probe set.

Rooms: :mod:`.points` (layer names -> the points their units are read at),
:mod:`.tokens` (any output shape -> ``[B, C, H, W]`` maps), :mod:`.responses` (a batch's
maps -> responses and argmax positions), :mod:`.topk` (the streaming top-k merge),
:mod:`.recorder` (:func:`record` and the :class:`RecordingConsumer` protocol).  The
torch plumbing they share (hooks, eval mode, device, rank) is in ``tb_conceptevo._torch``.
"""

from .._torch import hooks_on, inference_mode_of, model_device, model_device_dtype, rank_and_world
from .points import (RAW_SUFFIX, HookPoint, LayerSpec, _base_name, list_layers, point_hooks, register_point_hooks,
                     resolve_layers, resolve_points)
from .recorder import RecordingConsumer, layer_shapes, record
from .tokens import TokenLayout, _detect_layout, _Layout, _token_model_options
from .topk import merge_topk

__all__ = [
    "HookPoint", "LayerSpec", "RAW_SUFFIX", "RecordingConsumer", "TokenLayout", "hooks_on", "inference_mode_of",
    "layer_shapes", "list_layers", "merge_topk", "model_device", "model_device_dtype", "point_hooks",
    "rank_and_world", "record", "register_point_hooks", "resolve_layers", "resolve_points",
]
