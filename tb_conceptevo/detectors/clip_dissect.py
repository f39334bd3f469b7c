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

Similarity functions (Oikarinen & Weng 2022; vectorised over all neurons x concepts):

* **soft-WPMI** (default)::

      P          = softmax(a * S, over concepts)                       [M, K]
      e_1..e_k   = the top_k images of neuron n (highest activation first)
      p_j        = p_start - (j / top_k) * (p_start - p_end),  j = 0..top_k-1
      log p(d|n) = sum_j log(1 + p_j * (P[e_j, d] - 1) + 1e-7)
      log p(d)   = logsumexp_n log p(d|n) - log N       (over the layer's N neurons)
      sim[n, d]  = log p(d|n) - lambda * log p(d)

  Unbounded and relative to the other neurons of the layer: not a probability.
* **cos^3**: centre ``A`` and ``S`` over images, cube, L2-normalise each column over
  images, dot product: ``sim = A'^T S'`` in [-1, 1].

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
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .base import ChanceLevel, Detection, Detector, null_draws
from .vocabulary import english_vocabulary, resolve_vocabulary

try:
    from ..recording import RecordingConsumer
except ImportError:  # pragma: no cover
    RecordingConsumer = object  # type: ignore

SIMILARITIES = ("soft_wpmi", "cos3")
#: default tau per similarity function (soft-WPMI is in nats: e^2 ~ 7x more likely
#: than for the layer's average neuron; cos^3 lies in [-1, 1])
DEFAULT_THRESHOLDS = {"soft_wpmi": 2.0, "cos3": 0.2}
#: elements of one block of soft-WPMI terms (1 MB float32: stays in a core's cache;
#: 1-4 MB blocks were fastest on the benchmark, larger ones slower)
_WPMI_BLOCK = 1 << 18
#: ... on other devices (GPUs: few large kernels beat many cache-sized ones; 256 MB)
_WPMI_BLOCK_DEVICE = 1 << 26

# In-memory caches shared by all detectors of the process, keyed by content.
_FEATURE_CACHE: Dict[str, torch.Tensor] = {}
_CACHE_LOCK = threading.Lock()


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


# ---------------------------------------------------------------------------- weights
def load_open_clip(model_name: str, pretrained: Optional[str] = None, device=None):
    """An open_clip model in eval mode from a local file, a pretrained tag or random weights.

    Raises:
        ValueError: unknown architecture or tag.
        RuntimeError: the tag's weights cannot be fetched (offline); the message says how
            to pass a local file instead.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {model_name!r}; see open_clip.list_models()")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if pretrained is None:
        warnings.warn(f"CLIPDissect: {model_name} with random weights (pretrained=None): labels are "
                      "meaningless; pass pretrained=<file or tag> for real labels", UserWarning, stacklevel=3)
        model = open_clip.create_model(model_name, pretrained=None, device=device)
    elif os.path.exists(str(pretrained)):
        path = Path(pretrained)
        if not path.is_file():
            raise ValueError(f"pretrained={str(path)!r} is not a file; pass the checkpoint file itself")
        try:
            model = open_clip.create_model(model_name, pretrained=str(path), device=device)
        except Exception as exc:  # any loading failure: wrong architecture or corrupt file
            raise ValueError(
                f"could not load {str(path)!r} as {model_name} weights ({type(exc).__name__}: {exc}); "
                "check that the file is an open_clip/OpenAI checkpoint of this architecture"
            ) from None
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(
                f"pretrained={pretrained!r} is neither an existing file nor an open_clip tag of {model_name} "
                f"(tags: {tags}); pass the path of a local checkpoint file"
            )
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
        except Exception as exc:  # network errors come in many types
            raise RuntimeError(
                f"could not fetch the {model_name} weights {pretrained!r} ({type(exc).__name__}: "
                f"{str(exc)[:200]}). Without network access, download them on a machine with network, e.g. "
                f"python -c \"import open_clip; open_clip.create_model('{model_name}', pretrained='{pretrained}', "
                f"cache_dir='clip_weights')\", copy the checkpoint file (open_clip_pytorch_model.bin or "
                f"*.safetensors / *.pt under clip_weights/) here and pass "
                f"CLIPDissect('{model_name}', pretrained='/path/to/that/file')"
            ) from None
    model.eval()
    return model


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, bytes).

    Cached on the model object: CLIP models are frozen here."""
    cached = getattr(model, "_tb_conceptevo_weights_hash", None)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    value = digest.hexdigest()
    try:
        object.__setattr__(model, "_tb_conceptevo_weights_hash", value)
    except AttributeError:  # pragma: no cover
        pass
    return value


# ----------------------------------------------------------------------- similarities
def soft_wpmi(clip_similarity: torch.Tensor, responses: torch.Tensor, top_k: int = 100, a: float = 10.0,
              lam: float = 1.0, p_start: float = 0.998, p_end: float = 0.97, min_prob: float = 1e-7,
              block_elements: Optional[int] = None) -> torch.Tensor:
    """Soft-WPMI ``[N, K]`` of neurons vs concepts (see the module docstring).

    ``log p(d|n)`` from :func:`soft_wpmi_log_given`, minus ``lam`` times the layer's
    ``log p(d)``; arguments as there."""
    log_given = soft_wpmi_log_given(clip_similarity, responses, top_k, a, p_start, p_end, min_prob, block_elements)
    return log_given - lam * soft_wpmi_log_prior(log_given)


def soft_wpmi_log_prior(log_given: torch.Tensor) -> torch.Tensor:
    """``[1, K]`` ``log p(d) = logsumexp_n log p(d|n) - log N``."""
    return torch.logsumexp(log_given, dim=0, keepdim=True) - math.log(log_given.shape[0])


def soft_wpmi_log_given(clip_similarity: torch.Tensor, responses: torch.Tensor, top_k: int = 100, a: float = 10.0,
                        p_start: float = 0.998, p_end: float = 0.97, min_prob: float = 1e-7,
                        block_elements: Optional[int] = None) -> torch.Tensor:
    """``log p(d|n)`` ``[N, K]`` of soft-WPMI: how well neuron n's top images agree on word d.

    Same value as in :func:`soft_wpmi_plain`, computed faster: the sum of ``top_k`` logs
    is the log of their product, so the terms are multiplied in groups of ``g`` and
    only one log per group is taken (``g`` as large as the dtype allows: every term is
    at least ``1 - p_start + min_prob``, so a product of ``g`` terms stays a normal
    float); and the ``[neurons, top_k, K]`` terms are made in blocks of neurons that
    stay in cache, updated in place.  Computed in the dtype of ``clip_similarity``
    (float32 by default; float64 for exact comparisons).

    Args:
        clip_similarity: ``[M, K]`` image-text cosine similarities.
        responses: ``[M, N]`` neuron responses on the same M images (finite).
        top_k: images per neuron (clipped to M).
        block_elements: elements of one block of terms (default: cache-sized on CPU,
            large on other devices).
    """
    _check_pair(clip_similarity, responses)
    dtype = clip_similarity.dtype if clip_similarity.dtype == torch.float64 else torch.float32
    n_images, n_neurons = responses.shape
    k = int(min(top_k, n_images))
    probs = torch.softmax(a * clip_similarity.to(dtype), dim=1)                      # [M, K]
    n_concepts = probs.shape[1]
    top_images = torch.topk(responses.to(dtype), k, dim=0).indices.t()               # [N, k]
    weights = p_start - torch.arange(k, dtype=torch.float64) / top_k * (p_start - p_end)
    smallest = 1.0 - p_start + min_prob                    # least possible term (P = 0)
    tiny = 1e-30 if dtype == torch.float32 else 1e-290     # well above the dtype's least normal
    group = max(1, min(k, int(math.log(tiny) / math.log(smallest))))
    n_groups = -(-k // group)
    group = -(-k // n_groups)                              # equal groups, the last padded
    pad = n_groups * group - k
    # term = weight * P + offset; padding terms are exactly 1 (weight 0, offset 1)
    scale = torch.cat([weights, torch.zeros(pad, dtype=torch.float64)]).to(device=probs.device, dtype=dtype)
    offset = torch.cat([1.0 - weights + min_prob, torch.ones(pad, dtype=torch.float64)]).to(device=probs.device, dtype=dtype)
    scale, offset = scale.view(1, n_groups, group, 1), offset.view(1, n_groups, group, 1)
    if pad:
        top_images = torch.cat([top_images, top_images[:, :1].expand(-1, pad)], dim=1)
    log_given = torch.empty((n_neurons, n_concepts), dtype=dtype, device=probs.device)
    if block_elements is None:
        block_elements = _WPMI_BLOCK if probs.device.type == "cpu" else _WPMI_BLOCK_DEVICE
    step = max(1, block_elements // max(1, n_groups * group * n_concepts))
    for start in range(0, n_neurons, step):  # blocks of neurons: the terms stay in cache
        terms = probs[top_images[start:start + step]].view(-1, n_groups, group, n_concepts)
        terms.mul_(scale).add_(offset)
        log_given[start:start + step] = terms.prod(dim=2).log_().sum(dim=1)
    return log_given


def soft_wpmi_plain(clip_similarity: torch.Tensor, responses: torch.Tensor, top_k: int = 100, a: float = 10.0,
                    lam: float = 1.0, p_start: float = 0.998, p_end: float = 0.97,
                    min_prob: float = 1e-7) -> torch.Tensor:
    """Soft-WPMI the straightforward way of the public CLIP-Dissect code, on the full
    tensor: one ``[N, top_k, K]`` gather of probabilities, ``torch.log``, a sum.

    The reference that :func:`soft_wpmi` is tested (``tests/test_detectors_clip.py``)
    and benchmarked (``benchmarks/bench_detectors.py``) against; memory O(N x top_k x K).
    """
    _check_pair(clip_similarity, responses)
    n_neurons = responses.shape[1]
    k = int(min(top_k, responses.shape[0]))
    probs = torch.softmax(a * clip_similarity, dim=1)
    top_images = torch.topk(responses, k, dim=0).indices.t()
    weights = (p_start - torch.arange(k, dtype=probs.dtype) / top_k * (p_start - p_end))[None, :, None]
    log_given = torch.log(1 + weights * (probs[top_images] - 1) + min_prob).sum(dim=1)
    log_prior = torch.logsumexp(log_given, dim=0, keepdim=True) - math.log(n_neurons)
    return log_given - lam * log_prior


def cube_normalise(values: torch.Tensor, min_norm: float = 1e-6) -> torch.Tensor:
    """Centre each column over rows (images), cube, L2-normalise each column."""
    centred = values - values.mean(dim=0, keepdim=True)
    cubed = centred ** 3
    return cubed / cubed.norm(dim=0, keepdim=True).clamp(min=min_norm)


def cos_cubed(clip_similarity: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """cos^3 similarity ``[N, K]``: ``cube_normalise(A)^T @ cube_normalise(S)``."""
    _check_pair(clip_similarity, responses)
    return cube_normalise(responses.float()).t() @ cube_normalise(clip_similarity.float())


def _check_pair(clip_similarity: torch.Tensor, responses: torch.Tensor) -> None:
    if clip_similarity.dim() != 2 or responses.dim() != 2:
        raise ValueError("clip_similarity must be [images, concepts] and responses [images, neurons]")
    if clip_similarity.shape[0] != responses.shape[0]:
        raise ValueError(f"{clip_similarity.shape[0]} images of CLIP similarities vs {responses.shape[0]} "
                         "images of neuron responses")


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
        from ..metadata import check_name

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
        with _CACHE_LOCK:
            _FEATURE_CACHE[key] = features
        return features

    def _preprocess_config(self) -> Dict:
        import open_clip

        cfg = dict(open_clip.get_model_preprocess_cfg(self.model) or {})
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        size = (size, size) if isinstance(size, int) else tuple(size)
        return {"size": size, "mean": tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                "std": tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))}

    def image_features(self, probe) -> torch.Tensor:
        """float32 ``[M, D]`` unit image features of the probe set (CPU), cached by
        (probe hash, weights hash, preprocessing)."""
        probe_hash = getattr(probe, "hash", "")
        if not probe_hash:
            raise ValueError("CLIPDissect needs a probe set with a content hash (probe.hash) to cache features")
        cfg = self._preprocess_config()
        key = hashlib.sha256(f"image|{probe_hash}|{self.weights_hash}|{self.model_name}|{cfg}".encode()).hexdigest()
        return self._cached(key, lambda: self._compute_image_features(probe, cfg))

    def _compute_image_features(self, probe, cfg) -> torch.Tensor:
        from tqdm.auto import tqdm

        n = len(probe)
        mean = torch.tensor(cfg["mean"], device=self.device)[None, :, None, None]
        std = torch.tensor(cfg["std"], device=self.device)[None, :, None, None]
        chunks = []
        batches = range(0, n, self.batch_size)
        with torch.no_grad():
            for start in tqdm(batches, desc="CLIP image features", leave=False, disable=not self.progress):
                indices = list(range(start, min(n, start + self.batch_size)))
                images = _load_raw(probe, indices).to(self.device)
                images = _resize_center_crop(images, cfg["size"])
                features = self.model.encode_image((images - mean) / std).float()
                chunks.append(F.normalize(features, dim=1).cpu())
        return torch.cat(chunks)

    def text_features(self, words: Optional[Sequence[str]] = None) -> torch.Tensor:
        """float32 ``[K, D]`` unit text features of ``words`` (default: the concepts), cached."""
        words = list(self.concepts if words is None else words)
        digest = hashlib.sha256("\n".join(words).encode()).hexdigest()
        key = hashlib.sha256(f"text|{digest}|{self.template}|{self.weights_hash}|{self.model_name}".encode()).hexdigest()
        return self._cached(key, lambda: self._compute_text_features(words))

    def _compute_text_features(self, words: List[str]) -> torch.Tensor:
        import open_clip

        tokenizer = open_clip.get_tokenizer(self.model_name)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(words), 256):
                tokens = tokenizer([self.template.format(w) for w in words[start:start + 256]]).to(self.device)
                chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=1).cpu())
        return torch.cat(chunks)

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


def _resize_center_crop(images: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize the shorter side to the target and centre-crop (open_clip's "shortest" mode)."""
    height, width = images.shape[-2:]
    target_h, target_w = size
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False,
                               antialias=new_h < height).clamp(0.0, 1.0)
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return images[..., top:top + target_h, left:left + target_w]
