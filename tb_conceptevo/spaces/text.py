"""Concept-Monitor's text-anchored space: neurons placed among the words that describe them.

A neuron ``n`` with detector similarities ``sim_n`` (one per concept word ``w_i``) is
embedded as (Concept-Monitor Eq. 1)::

    u_n = sum_i softmax(sim_n / T)_i * f(w_i)

where ``f`` is a frozen text encoder.  Nothing is fitted on the model, so the space
works from step 0 and every run lands in the same coordinates.  Anchors -- any words,
e.g. concepts a good model should learn -- are embedded with the same ``f`` and drawn
as stars; ``d_anchor`` measures how well the neurons cover them.

The 2-D map is a :class:`~tb_conceptevo.spaces.layout.StableLayout` fitted **once** on
the concept and anchor vectors; neurons are only ``transform``\\ ed into it.

Example:
    >>> from tb_conceptevo import probes
    >>> from tb_conceptevo.detectors import NetDissect
    >>> probe = probes.ConceptShapes(n=512)
    >>> space = TextSpace(NetDissect(vocabulary=probe), anchors=["red", "circle", "striped"])
    >>> embedding = space.embed(layer_observation, detection)     # doctest: +SKIP
    >>> embedding.vectors.shape                                     # doctest: +SKIP
    (64, 384)
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..observation import LayerObservation
from .base import Anchors, Embedding, Space

#: version of the file written by :meth:`TextSpace.save`
FILE_VERSION = 1
_KIND = "text"


class TextSpace(Space):
    """Text-anchored space (Concept-Monitor).

    Args:
        detector: a concept detector (:class:`~tb_conceptevo.detectors.NetDissect`,
            :class:`~tb_conceptevo.detectors.CLIPDissect`); the writer runs it at every
            snapshot and hands its detection to :meth:`embed`.
        concepts: the concept words spanning the space (default: all the detector's);
            each must be one of the detector's concepts.
        text_encoder: a :class:`~tb_conceptevo.detectors.text_encoders.TextEncoder`
            (default: the offline MiniLM encoder).
        temperature: softmax temperature T; default: the detector's ``default_temperature``
            (the paper's 0.1 for soft-WPMI and 0.01 for cos^3; 0.02 for NetDissect's IoU,
            whose scores span only ~0-0.3, so that T = 0.1 would weight all concepts
            almost equally and pull every neuron to the centre), else 0.1.
        anchors: anchor words (default: the concepts themselves, as in the paper's A = S).
        name: space name used in tags.
        layout: a :class:`StableLayout` to fit (default ``StableLayout(random_state=0)``).
    """

    def __init__(self, detector, concepts: Optional[Sequence[str]] = None, text_encoder=None,
                 temperature: Optional[float] = None, anchors: Optional[Sequence[str]] = None, name: str = "text",
                 layout=None):
        from ..detectors.vocabulary import make_vocabulary
        from .._names import check_name

        if temperature is None:
            temperature = getattr(detector, "default_temperature", 0.1)
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.name = check_name(name, "space name")
        self.detector = detector
        self.temperature = float(temperature)
        detector_concepts = list(detector.concepts) if detector is not None else None
        detector_categories = list(detector.categories) if detector is not None else None
        if concepts is None:
            if detector_concepts is None:
                raise ValueError("TextSpace needs concepts=... when no detector is given")
            vocabulary = make_vocabulary(detector_concepts, detector_categories, what="TextSpace concepts")
        else:
            categories = None
            if detector_concepts is not None:
                by_word = dict(zip(detector_concepts, detector_categories))
                missing = [w for w in concepts if isinstance(w, str) and w.strip() not in by_word]
                if missing:
                    raise ValueError(
                        f"TextSpace concepts {missing[:10]} are not concepts of detector "
                        f"{detector.name!r}; choose among {detector_concepts[:20]}..."
                    )
                categories = [by_word[w.strip()] for w in concepts]
            vocabulary = make_vocabulary(concepts, categories, what="TextSpace concepts")
        self.concepts: List[str] = list(vocabulary.names)
        self.categories: List[str] = list(vocabulary.categories)
        anchor_words = self.concepts if anchors is None else anchors
        self.anchor_words: List[str] = list(make_vocabulary(anchor_words, what="TextSpace anchors").names)

        if text_encoder is None:
            from ..detectors.text_encoders import MiniLMTextEncoder

            text_encoder = MiniLMTextEncoder()
        self.text_encoder = text_encoder
        self.encoder_spec: Dict = text_encoder.spec()
        self.concept_vectors = text_encoder.encode(self.concepts)      # [C, d]
        self.anchor_vectors = text_encoder.encode(self.anchor_words)   # [A, d]
        self._fit_layout(layout)

    # ----------------------------------------------------------- construction
    def _fit_layout(self, layout) -> None:
        from .layout import StableLayout

        reference = np.concatenate([self.concept_vectors, self._extra_anchor_vectors()])
        self.layout = (layout if layout is not None else StableLayout(random_state=0)).fit(reference)
        self._point_layout = self.layout.transform(self._point_vectors())

    def _extra_anchor_vectors(self) -> np.ndarray:
        concept_set = set(self.concepts)
        keep = [i for i, w in enumerate(self.anchor_words) if w not in concept_set]
        return self.anchor_vectors[keep]

    def _point_words_kinds(self):
        """Anchor points first, then concept points that are not anchors already."""
        anchor_set = set(self.anchor_words)
        words = list(self.anchor_words) + [w for w in self.concepts if w not in anchor_set]
        kinds = ["anchor"] * len(self.anchor_words) + ["concept"] * (len(words) - len(self.anchor_words))
        return words, kinds

    def _point_vectors(self) -> np.ndarray:
        anchor_set = set(self.anchor_words)
        concept_rows = [i for i, w in enumerate(self.concepts) if w not in anchor_set]
        return np.concatenate([self.anchor_vectors, self.concept_vectors[concept_rows]]).astype(np.float32)

    @property
    def dim(self) -> int:
        return int(self.concept_vectors.shape[1])

    # ----------------------------------------------------------------- embed
    def neuron_vectors(self, similarity: np.ndarray) -> np.ndarray:
        """``u_n = softmax(sim_n / T) . f(w)`` for a similarity matrix ``[N, C]`` over
        this space's concepts; NaN entries are ignored, all-NaN rows give NaN rows."""
        sim = np.asarray(similarity, dtype=np.float64)
        finite = np.isfinite(sim)
        placed = finite.any(axis=1)
        logits = np.where(finite, sim / self.temperature, -np.inf)
        logits = logits - np.where(placed, logits.max(axis=1, initial=-np.inf), 0.0)[:, None]
        weights = np.exp(logits)
        weights /= np.where(placed, weights.sum(axis=1), 1.0)[:, None]
        vectors = (weights @ self.concept_vectors.astype(np.float64)).astype(np.float32)
        vectors[~placed] = np.nan
        return vectors

    def _columns(self, detection) -> np.ndarray:
        """Columns of ``detection.similarity`` in this space's concept order."""
        if list(detection.concepts) == self.concepts:
            return np.asarray(detection.similarity)
        index = {w: i for i, w in enumerate(detection.concepts)}
        missing = [w for w in self.concepts if w not in index]
        if missing:
            raise ValueError(
                f"the detection of layer {detection.layer!r} has no similarity for concepts {missing[:10]}; "
                "use the detector this space was built with"
            )
        return np.asarray(detection.similarity)[:, [index[w] for w in self.concepts]]

    def embed(self, observation: LayerObservation, detection=None) -> Embedding:
        """Place every neuron of ``observation`` from its ``detection`` (required).

        Neurons whose similarity row is all NaN, or flagged invalid in the observation,
        are unplaced (NaN vectors and layout)."""
        if detection is None:
            raise ValueError(
                f"TextSpace {self.name!r} needs the detection of its detector for layer "
                f"{observation.layer!r}; run the detector in the same recording pass"
            )
        sim = self._columns(detection)
        if sim.shape[0] != observation.n_neurons:
            raise ValueError(
                f"detection of layer {detection.layer!r} has {sim.shape[0]} neurons but the observation "
                f"of layer {observation.layer!r} has {observation.n_neurons}"
            )
        sim = np.array(sim, dtype=np.float64)
        invalid = np.asarray(observation.invalid, dtype=bool)
        sim[invalid] = np.nan
        vectors = self.neuron_vectors(sim)
        placed = np.isfinite(vectors).all(axis=1)
        layout = self.layout.transform(vectors)
        placed &= np.isfinite(layout).all(axis=1)
        vectors[~placed] = np.nan
        layout[~placed] = np.nan
        index, _ = detection.top()
        groups = np.asarray(index, dtype=np.int32).copy()
        groups[~placed] = -1
        return Embedding(vectors=vectors, layout=layout.astype(np.float32), placed=placed, groups=groups)

    def anchors(self) -> Anchors:
        words, kinds = self._point_words_kinds()
        return Anchors(words=words, vectors=self._point_vectors(), layout=self._point_layout.copy(), kind=kinds)

    # ------------------------------------------------------------- save/load
    def save(self, path) -> None:
        """Write the space (vectors, layout, encoder and detector description) to one file."""
        from .io import save_space_file

        header = {
            "name": self.name, "temperature": self.temperature, "probe_hash": self.probe_hash,
            "concepts": self.concepts, "categories": self.categories, "anchor_words": self.anchor_words,
            "text_encoder": self.encoder_spec, "detector": _detector_config(self.detector),
        }
        arrays = {"concept_vectors": self.concept_vectors, "anchor_vectors": self.anchor_vectors,
                  "point_layout": self._point_layout}
        save_space_file(path, _KIND, FILE_VERSION, header, arrays, layout=self.layout)

    @classmethod
    def load(cls, path, detector=None, text_encoder=None) -> "TextSpace":
        """Read a file written by :meth:`save`.

        Args:
            detector: the detector to run (default: re-created from the stored
                configuration when possible, else None with a warning; then set
                ``space.detector`` before use).
            text_encoder: the text encoder for new words (default: re-created lazily
                from the stored description).  Its dimension must match the stored
                vectors, else ValueError.

        Raises FileNotFoundError / ``spaces.io.SpaceFileError`` (a ValueError) for a
        missing, corrupted, other-kind or other-version file.
        """
        from .io import SpaceFileError, load_space_file, require

        header, arrays, layout = load_space_file(path, _KIND, FILE_VERSION)
        require(arrays, ("concept_vectors", "anchor_vectors", "point_layout"), path)
        if layout is None:
            raise SpaceFileError(f"{path} has no stored layout; re-save the space")
        space = cls.__new__(cls)
        try:
            space.name = header["name"]
            space.temperature = float(header["temperature"])
            space.probe_hash = header.get("probe_hash", "")
            space.concepts = list(header["concepts"])
            space.categories = list(header["categories"])
            space.anchor_words = list(header["anchor_words"])
            space.encoder_spec = dict(header["text_encoder"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SpaceFileError(f"{path} has an incomplete text-space header ({exc!r})") from None
        space.concept_vectors = np.asarray(arrays["concept_vectors"], np.float32)
        space.anchor_vectors = np.asarray(arrays["anchor_vectors"], np.float32)
        space._point_layout = np.asarray(arrays["point_layout"], np.float32)
        if space.concept_vectors.shape[0] != len(space.concepts):
            raise SpaceFileError(f"{path}: {len(space.concepts)} concepts but {space.concept_vectors.shape[0]} vectors")
        space.layout = layout
        space._text_encoder = None
        if text_encoder is not None:
            space.text_encoder = text_encoder
        if detector is None:
            detector = _detector_from_config(header.get("detector"))
        if detector is not None:
            known = set(detector.concepts)
            missing = [w for w in space.concepts if w not in known]
            if missing:
                raise ValueError(f"detector {detector.name!r} lacks the space's concepts {missing[:10]}")
        space.detector = detector
        return space

    # The encoder is only needed to embed new words; a loaded space re-creates it lazily.
    @property
    def text_encoder(self):
        if getattr(self, "_text_encoder", None) is None:
            from ..detectors.text_encoders import encoder_from_spec

            self._text_encoder = encoder_from_spec(self.encoder_spec)
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, encoder) -> None:
        stored = getattr(self, "concept_vectors", None)
        if stored is not None and int(encoder.dim) != stored.shape[1]:
            raise ValueError(
                f"text encoder {encoder.identifier!r} gives {encoder.dim}-d vectors but this space was built "
                f"with {stored.shape[1]}-d vectors ({self.encoder_spec.get('identifier')!r}); use the same "
                "encoder or build a new TextSpace"
            )
        spec = getattr(self, "encoder_spec", None)
        if stored is not None and spec and spec.get("identifier") != encoder.identifier:
            warnings.warn(
                f"text encoder {encoder.identifier!r} differs from the one this space was built with "
                f"({spec.get('identifier')!r}); new words will not be comparable to the stored vectors",
                UserWarning, stacklevel=3,
            )
        self._text_encoder = encoder

    def __repr__(self) -> str:
        return (f"TextSpace(name={self.name!r}, concepts={len(self.concepts)}, anchors={len(self.anchor_words)}, "
                f"temperature={self.temperature}, encoder={self.encoder_spec.get('identifier')!r})")


# ------------------------------------------------------------------ helpers
def _detector_config(detector) -> Optional[Dict]:
    config = getattr(detector, "config", None)
    return config() if callable(config) else None


def _detector_from_config(config: Optional[Dict]):
    if not config:
        return None
    from ..detectors import detector_from_config

    try:
        return detector_from_config(config)
    except (ValueError, RuntimeError, OSError) as exc:
        warnings.warn(f"could not re-create the space's detector ({exc}); pass detector=... to load()",
                      UserWarning, stacklevel=3)
        return None
