"""Scalar metrics of concept maps (logged as ordinary TensorBoard scalars)."""

from .evolution import differential_entropy, evolution_speed

__all__ = ["differential_entropy", "evolution_speed"]
