"""Outputs of every shape as ``[B, C, H, W]`` maps, so consumers see one shape.

A hooked output is a map already, Swin's channels-last ``[B, H, W, C]``, a
transformer's ``[B, T, C]`` tokens (class/register tokens, then the patch grid,
see :class:`TokenLayout`) or a ``[B, C]`` vector (a 1 x 1 map);
:func:`_detect_layout` tells which, or says clearly why a layer cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn


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
