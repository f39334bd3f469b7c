"""Concept detectors: name every neuron with a concept word (similarity ``[neurons, concepts]``).

* :class:`NetDissect` -- IoU with the concept masks of a probe set (ConceptShapes).
* :class:`CLIPDissect` -- open_clip image/text features, soft-WPMI or cos^3.
* Text encoders -- :class:`MiniLMTextEncoder` (offline default), :class:`OpenCLIPTextEncoder`.
* Vocabularies -- :func:`probe_vocabulary`, :func:`english_vocabulary`, :func:`load_words`.

Every detector hands the recorder a consumer (``detector.consumer(probe, layers)``)
and returns ``{layer: Detection}`` from ``consumer.result()``.
"""

from typing import Dict

from .base import Detection, Detector
from .clip_dissect import CLIPDissect
from .netdissect import NetDissect
from .similarity import cos_cubed, soft_wpmi, soft_wpmi_plain
from .text_encoders import MiniLMTextEncoder, OpenCLIPTextEncoder, TextEncoder, encoder_from_spec
from .vocabulary import english_vocabulary, load_words, make_vocabulary, probe_vocabulary


def detector_from_config(config: Dict) -> Detector:
    """Re-create a detector from its ``config()`` (used when loading a space)."""
    kind = config.get("kind")
    params = {k: v for k, v in config.items() if k not in ("kind", "concepts", "categories")}
    if "cache_bytes" in params:  # spaces saved before the parameter was renamed
        params["memory_bytes"] = params.pop("cache_bytes")
    vocabulary = None
    if config.get("concepts") is not None:
        vocabulary = make_vocabulary(config["concepts"], config.get("categories"))
    if kind == "netdissect":
        return NetDissect(vocabulary=vocabulary, **params)
    if kind == "clip_dissect":
        return CLIPDissect(concepts=vocabulary, **params)
    raise ValueError(f"unknown detector kind {kind!r}")


__all__ = [
    "Detection", "Detector", "NetDissect", "CLIPDissect", "soft_wpmi", "soft_wpmi_plain", "cos_cubed",
    "TextEncoder", "MiniLMTextEncoder", "OpenCLIPTextEncoder", "encoder_from_spec",
    "make_vocabulary", "probe_vocabulary", "english_vocabulary", "load_words", "detector_from_config",
]
