"""CLIP-Dissect: label neurons by comparing their activations with CLIP image-text similarities.

For probe images ``x_1..x_M``, concept words ``w_1..w_K`` and a layer's neurons:

* ``S[m, k] = cos(I(x_m), T(w_k))`` -- open_clip image and text features (computed
  once per probe set and weights, with a progress bar, and cached on disk under
  :func:`default_cache_dir` by probe hash + weights hash: later processes and runs
  read them back);
* ``A[m, n]`` -- neuron ``n``'s spatial-mean (or max) activation on image ``m``, gathered
  during the recording pass.  Keeping this ``[images, neurons]`` response matrix is
  inherent to CLIP-Dissect (both similarity functions need every image's response),
  e.g. 2,048 x 4,096 floats = 32 MB.

Similarity functions (:mod:`.similarity`, vectorised over all neurons x concepts):
**soft-WPMI** (default; unbounded and relative to the other neurons of the layer) and
**cos^3** (in [-1, 1]).

Chance level (:meth:`CLIPDissect.chance_levels`): the same scores with the text
features randomly rotated; a neuron is interpretable when its top score beats both
tau and that level (with random weights about 0.5 % of the neurons do).

Weights come from a local checkpoint file (``pretrained="/path/to/open_clip_model.bin"``),
any open_clip pretrained tag (downloaded by open_clip when online) or ``None``
(random weights, for tests).

Example:
    >>> detector = CLIPDissect("ViT-B-32", pretrained="/models/ViT-B-32-openai.bin")  # doctest: +SKIP
    >>> consumer = detector.consumer(probe, ["layer4"])                               # doctest: +SKIP
    >>> record(model, probe, ["layer4"], consumers=[consumer])                        # doctest: +SKIP
    >>> consumer.result()["layer4"].similarity.shape                                  # doctest: +SKIP
    (512, 1024)
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _open_clip
from ._open_clip import load_open_clip, weights_hash
from .base import ChanceLevel, Detection, Detector, null_draws
from .similarity import (cos_cubed, cube_normalise, soft_wpmi, soft_wpmi_log_given, soft_wpmi_log_prior,
                         soft_wpmi_plain)
from .vocabulary import english_vocabulary, resolve_vocabulary

try:
    from ..recording import RecordingConsumer
except ImportError:  # pragma: no cover
    RecordingConsumer = object  # type: ignore

SIMILARITIES = ("soft_wpmi", "cos3")
#: default tau per similarity function (soft-WPMI is in nats: e^2 ~ 7x more likely
#: than for the layer's average neuron; cos^3 lies in [-1, 1])
DEFAULT_THRESHOLDS = {"soft_wpmi": 2.0, "cos3": 0.2}

# In-memory cache shared by all detectors of the process, keyed by content; least
# recently used matrices are dropped beyond FEATURE_CACHE_BYTES (a training script that
# logs many probe sets or vocabularies must not grow without bound; the disk cache keeps
# them).
_FEATURE_CACHE: "OrderedDict[str, torch.Tensor]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
#: in-memory CLIP feature cache budget
FEATURE_CACHE_BYTES = 512 * 2 ** 20


def _remember(key: str, features: torch.Tensor) -> None:
    with _CACHE_LOCK:
        _FEATURE_CACHE[key] = features
        _FEATURE_CACHE.move_to_end(key)
        total = sum(t.numel() * t.element_size() for t in _FEATURE_CACHE.values())
        while total > FEATURE_CACHE_BYTES and len(_FEATURE_CACHE) > 1:
            _, dropped = _FEATURE_CACHE.popitem(last=False)
            total -= dropped.numel() * dropped.element_size()


def default_cache_dir() -> Path:
    """Where CLIP features are cached on disk by default: ``$TB_CONCEPTEVO_CACHE``, else
    ``$XDG_CACHE_HOME/tb_conceptevo``, else ``~/.cache/tb_conceptevo``.

    Files are named by a hash of (probe hash, weights hash, preprocessing / words), so
    one directory serves every probe set, model and run; delete it to free the space."""
    explicit = os.environ.get("TB_CONCEPTEVO_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tb_conceptevo"


# ----------------------------------------------------------------------- detector
class CLIPDissect(Detector):
    """CLIP-Dissect detector (open_clip image/text features, soft-WPMI or cos^3).

    Args:
        model_name: open_clip architecture.
        pretrained: local checkpoint file, open_clip pretrained tag, or None (random).
        similarity: ``"soft_wpmi"`` (default) or ``"cos3"``.
        concepts: concept words: None / ``"english"`` (the shipped ~1k-word list), a
            list of words, a :class:`ConceptVocabulary` or a word file.
        categories: categories of a plain word list (default "other").
        threshold: tau (default: 2.0 for soft-WPMI, 0.2 for cos^3).
        device: device of the CLIP model (default CPU or ``clip_model``'s).
        cache_dir: directory of the image/text feature caches on disk, shared by every
            process and run (default :func:`default_cache_dir`; ``False`` = memory only).
        clip_model: an already built open_clip model (shares weights, skips loading).
        reduce: spatial reduction of the activation maps, ``"mean"`` (CLIP-Dissect's
            default) or ``"max"``.
        top_k, a, lam, p_start, p_end: soft-WPMI parameters (CLIP-Dissect defaults).
        template: text prompt format (``"{}"`` = the bare word, as CLIP-Dissect).
        batch_size: images per CLIP forward pass.
        name: detector name used in tags.
        progress: tqdm bars for computing image features.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: Optional[str] = None,
                 similarity: str = "soft_wpmi", concepts=None, categories=None,
                 threshold: Optional[float] = None, device=None, cache_dir=None, clip_model=None,
                 reduce: str = "mean", top_k: int = 100, a: float = 10.0, lam: float = 1.0,
                 p_start: float = 0.998, p_end: float = 0.97, template: str = "{}", batch_size: int = 64,
                 name: str = "clip_dissect", progress: bool = True):
        from .._names import check_name

        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 < p_end <= p_start < 1.0:
            raise ValueError(f"need 0 < p_end <= p_start < 1, got p_start={p_start}, p_end={p_end}")
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}', got {template!r}")
        self.name = check_name(name, "detector name")
        self.model_name = model_name
        self.pretrained = str(pretrained) if pretrained is not None else None
        self.similarity = similarity
        self.threshold = float(DEFAULT_THRESHOLDS[similarity] if threshold is None else threshold)
        self.reduce = reduce
        self.top_k, self.a, self.lam, self.p_start, self.p_end = int(top_k), float(a), float(lam), float(p_start), float(p_end)
        self.template = template
        self.batch_size = int(batch_size)
        self.cache_dir = None if cache_dir is False else Path(cache_dir if cache_dir is not None else default_cache_dir())
        self.progress = bool(progress)
        vocabulary = resolve_vocabulary(concepts, categories, fallback=english_vocabulary)
        self.concepts: List[str] = list(vocabulary.names)
        self.categories: List[str] = list(vocabulary.categories)
        if clip_model is None and self.pretrained is None:
            self.unlabelled_reason = f"{self.name} has random CLIP weights (no pretrained= file or tag)"
        if clip_model is not None:
            self.model = clip_model.eval()
        else:
            self.model = load_open_clip(model_name, self.pretrained, device=device)
        self.device = next(self.model.parameters()).device
        self.weights_hash = weights_hash(self.model)

    # ------------------------------------------------------------- config
    def config(self) -> Dict:
        if self.pretrained is None:
            pretrained = None
        elif os.path.exists(self.pretrained):
            pretrained = os.path.abspath(self.pretrained)
        else:
            pretrained = self.pretrained
        return {"kind": "clip_dissect", "name": self.name, "model_name": self.model_name,
                "pretrained": pretrained, "similarity": self.similarity, "threshold": self.threshold,
                "reduce": self.reduce, "top_k": self.top_k, "a": self.a, "lam": self.lam,
                "p_start": self.p_start, "p_end": self.p_end, "template": self.template,
                "cache_dir": str(self.cache_dir) if self.cache_dir else False,
                "concepts": self.concepts, "categories": self.categories}

    # ------------------------------------------------------------- features
    def _cached(self, key: str, compute) -> torch.Tensor:
        """Feature matrix by content key: memory, then disk (``cache_dir``), else computed."""
        with _CACHE_LOCK:
            if key in _FEATURE_CACHE:
                _FEATURE_CACHE.move_to_end(key)
                return _FEATURE_CACHE[key]
        path = self.cache_dir / f"clip_features_{key[:40]}.npy" if self.cache_dir is not None else None
        features = None
        if path is not None and path.is_file():
            try:
                features = torch.from_numpy(np.load(path, allow_pickle=False))
            except (OSError, ValueError):
                warnings.warn(f"ignoring unreadable feature cache {path}", UserWarning, stacklevel=3)
        if features is None:
            features = compute()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
                with open(tmp, "wb") as handle:
                    np.save(handle, features.numpy())
                os.replace(tmp, path)
        _remember(key, features)
        return features

    def preprocess_config(self) -> Dict:
        """The CLIP model's image preprocessing: ``{"size", "mean", "std"}``."""
        return _open_clip.preprocess_config(self.model)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """float32 unit features ``[B, D]`` (on the CLIP model's device) of images
        ``[B, 3, H, W]`` in [0, 1], preprocessed as the model expects."""
        with torch.no_grad():
            return _open_clip.encode_images(self.model, images.to(self.device), self.preprocess_config())

    def image_features(self, probe) -> torch.Tensor:
        """float32 ``[M, D]`` unit image features of the probe set (CPU), cached by
        (probe hash, weights hash, preprocessing)."""
        probe_hash = getattr(probe, "hash", "")
        if not probe_hash:
            raise ValueError("CLIPDissect needs a probe set with a content hash (probe.hash) to cache features")
        cfg = self.preprocess_config()
        key = hashlib.sha256(f"image|{probe_hash}|{self.weights_hash}|{self.model_name}|{cfg}".encode()).hexdigest()
        return self._cached(key, lambda: self._compute_image_features(probe, cfg))

    def _compute_image_features(self, probe, cfg) -> torch.Tensor:
        from tqdm.auto import tqdm

        n = len(probe)
        chunks = []
        batches = range(0, n, self.batch_size)
        with torch.no_grad():
            for start in tqdm(batches, desc="CLIP image features", leave=False, disable=not self.progress):
                indices = list(range(start, min(n, start + self.batch_size)))
                images = _load_raw(probe, indices).to(self.device)
                chunks.append(_open_clip.encode_images(self.model, images, cfg).cpu())
        return torch.cat(chunks)

    def text_features(self, words: Optional[Sequence[str]] = None) -> torch.Tensor:
        """float32 ``[K, D]`` unit text features of ``words`` (default: the concepts), cached."""
        words = list(self.concepts if words is None else words)
        digest = hashlib.sha256("\n".join(words).encode()).hexdigest()
        key = hashlib.sha256(f"text|{digest}|{self.template}|{self.weights_hash}|{self.model_name}".encode()).hexdigest()
        return self._cached(key, lambda: self._compute_text_features(words))

    def _compute_text_features(self, words: List[str]) -> torch.Tensor:
        return _open_clip.encode_texts(self.model, _open_clip.tokenizer(self.model_name),
                                       [self.template.format(w) for w in words], self.device, 256, normalise=True)

    def clip_similarity(self, probe) -> torch.Tensor:
        """``[M, K]`` cosine similarity of every probe image with every concept."""
        return self.image_features(probe) @ self.text_features().t()

    def similarity_from_responses(self, clip_similarity: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` similarity of neurons (responses ``[M, N]``) to concepts; NaN rows
        for neurons with any non-finite response."""
        return self._scores(clip_similarity, responses)[0]

    def _scores(self, clip_similarity: torch.Tensor, responses: torch.Tensor):
        """``(similarity, evidence)``, both ``[N, K]`` with NaN rows for non-finite neurons.

        ``evidence`` is what the chance level tests: for soft-WPMI ``log p(d|n)`` (the
        score minus ``lam log p(d)``, which depends only on the other neurons of the
        layer and saturates at ``log N`` for a word no other neuron has, real or not);
        for cos^3 the similarity itself."""
        bad = ~torch.isfinite(responses).all(dim=0)
        clean = torch.where(torch.isfinite(responses), responses, torch.zeros((), device=responses.device))
        clip_similarity = clip_similarity.to(clean.device)
        if self.similarity == "soft_wpmi":
            evidence = soft_wpmi_log_given(clip_similarity, clean, self.top_k, self.a, self.p_start, self.p_end)
            sim = evidence - self.lam * soft_wpmi_log_prior(evidence)
        else:
            sim = evidence = cos_cubed(clip_similarity, clean)
        sim[bad] = float("nan")
        evidence[bad] = float("nan")
        return sim, evidence

    def chance_levels(self, responses: torch.Tensor, image_features: torch.Tensor,
                      text_features: torch.Tensor) -> np.ndarray:
        """float32 ``[N]`` chance level of each neuron's top similarity (see
        :class:`~tb_conceptevo.detectors.base.ChanceLevel`).

        What is tested is the evidence of :meth:`_scores` (for soft-WPMI ``log p(d|n)``
        of the top word); its level is given back in similarity units, as the score the
        top word would have with its evidence exactly at chance, so ``similarity >
        null_similarity`` is the test.

        Null: the same similarity with the text features rotated by a random orthogonal
        matrix.  A rotation keeps everything about the words except how they line up
        with the images: their norms, their similarities to each other, the spread of
        the softmax over them.  With unrelated towers (random weights: the text
        projection is an i.i.d. Gaussian matrix, so its rotation has the same
        distribution) the real words are exactly one more draw of this null, so about
        0.5 % of the neurons pass; permuting images instead would keep the accidental but
        real link between a random image tower and the neurons (both see brightness and
        colour) and mark most neurons of a random CLIP model interpretable.  Draws are
        seeded, so the levels are reproducible.
        """
        generator = torch.Generator().manual_seed(0)
        level = ChanceLevel()
        dim = text_features.shape[1]
        for _ in range(null_draws(responses.shape[1])):
            rotation, upper = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
            rotation = rotation * torch.sign(torch.diagonal(upper))[None, :]   # Haar-distributed
            rotated = text_features.double() @ rotation
            null_similarity = (image_features.double() @ rotated.t()).float()
            level.add(self._scores(null_similarity, responses)[1].cpu().numpy())
        sim, evidence = self._scores(image_features @ text_features.t(), responses)
        sim, evidence = sim.double().cpu().numpy(), evidence.double().cpu().numpy()
        top = np.nan_to_num(sim, nan=-np.inf).argmax(axis=1)
        rows = np.arange(sim.shape[0])
        # similarity = evidence + (similarity - evidence) for the top word
        return (level.levels() + (sim[rows, top] - evidence[rows, top])).astype(np.float32)

    def consumer(self, probe, layers: Sequence[str]) -> "CLIPDissectConsumer":
        return CLIPDissectConsumer(self, probe, list(layers))

    @property
    def default_temperature(self) -> float:
        """The paper's T: 0.1 for soft-WPMI scores, 0.01 for cos^3."""
        return 0.1 if self.similarity == "soft_wpmi" else 0.01

    def __repr__(self) -> str:
        return (f"CLIPDissect({self.model_name!r}, pretrained={self.pretrained!r}, similarity={self.similarity!r}, "
                f"concepts={len(self.concepts)})")


class CLIPDissectConsumer(RecordingConsumer):
    """Gathers the ``[images, neurons]`` responses of each layer; ``result()`` -> Detections."""

    passes = 1

    def __init__(self, detector: CLIPDissect, probe, layers: List[str]):
        if len(probe) < 2:
            raise ValueError("CLIPDissect needs at least 2 probe images")
        self.detector = detector
        self.probe = probe
        self.layers = list(layers)
        self.responses: Dict[str, torch.Tensor] = {}

    def begin_pass(self, pass_index: int, shapes: Dict[str, Tuple[int, int, int]], probe) -> None:
        self.shapes = shapes
        self.responses = {}
        self._seen: Dict[str, torch.Tensor] = {}   # [images] rows this rank filled

    def update(self, pass_index: int, layer: str, fmap: torch.Tensor, response: torch.Tensor,
               indices: torch.Tensor) -> None:
        if layer not in self.layers:
            return
        store = self.responses.get(layer)
        if store is None:
            store = torch.full((len(self.probe), fmap.shape[1]), float("nan"), device=fmap.device)
            self.responses[layer] = store
            self._seen[layer] = torch.zeros(len(self.probe), dtype=torch.bool, device=fmap.device)
        self._seen[layer][indices] = True
        reduced = fmap.mean(dim=(2, 3)) if self.detector.reduce == "mean" else fmap.amax(dim=(2, 3))
        # the recorder's response is NaN wherever the map had NaN/Inf
        store[indices] = torch.where(torch.isnan(response), response, reduced)

    def all_reduce(self) -> None:
        """Under torch.distributed each rank filled the rows of its shard: add them up
        (the other ranks contribute exact zeros, so the sum is each rank's own value)."""
        dist = torch.distributed
        for layer, store in self.responses.items():
            # NaN rows of a rank's own non-finite responses must survive the sum; others are zeros
            mine = torch.where(self._seen[layer][:, None], store, torch.zeros_like(store))
            seen = self._seen[layer].to(torch.int32)
            dist.all_reduce(mine, op=dist.ReduceOp.SUM)
            dist.all_reduce(seen, op=dist.ReduceOp.SUM)
            if not bool((seen == 1).all()):
                raise RuntimeError("CLIPDissect: the ranks' probe shards do not cover every image exactly once")
            self.responses[layer] = mine

    def result(self) -> Dict[str, Detection]:
        if not self.responses:
            raise RuntimeError("CLIPDissect: result() called before the recording pass ran")
        image_features = self.detector.image_features(self.probe)
        text_features = self.detector.text_features()
        clip_similarity = image_features @ text_features.t()
        detections = {}
        for layer in self.layers:
            responses = self.responses[layer]
            sim = self.detector.similarity_from_responses(clip_similarity, responses)
            detections[layer] = Detection(layer=layer, similarity=sim.float().cpu().numpy(),
                                          concepts=list(self.detector.concepts),
                                          categories=list(self.detector.categories),
                                          threshold=self.detector.threshold,
                                          null_similarity=self.detector.chance_levels(
                                              responses, image_features, text_features))
        return detections


# ----------------------------------------------------------------------- images
def _load_raw(probe, indices: List[int]) -> torch.Tensor:
    """float ``[B, 3, H, W]`` in [0, 1]: untransformed images when the probe has them
    (CLIP has its own normalisation), else the probe's tensors."""
    try:
        raw = probe.raw_images(indices)
    except NotImplementedError:
        raw = None
    if raw is not None:
        return torch.from_numpy(np.ascontiguousarray(raw)).permute(0, 3, 1, 2).float() / 255.0
    return torch.stack([torch.as_tensor(probe[i][0]).float() for i in indices])


__all__ = ["CLIPDissect", "CLIPDissectConsumer", "SIMILARITIES", "DEFAULT_THRESHOLDS", "default_cache_dir",
           # re-exported from their rooms (older imports name this module)
           "load_open_clip", "weights_hash", "soft_wpmi", "soft_wpmi_log_given", "soft_wpmi_log_prior",
           "soft_wpmi_plain", "cos_cubed", "cube_normalise"]
