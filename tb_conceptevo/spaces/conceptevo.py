"""ConceptEvo's unified semantic space (Park et al., CIKM 2023, Sec. 3.2).

Fit once on a *base* model's observations, then place the neurons of any model at
any training step in the same space:

* Step 1.2: a multiset of co-activated neuron pairs (neurons sharing a stimulus image).
* Step 1.3: neuron embeddings by skip-gram with negative sampling (Eq. 1-3).
* Step 2.1: image embeddings such that a base neuron's embedding is the mean of its
  stimuli's embeddings (Eq. 4-6), plus *indirect* embeddings for images no base
  neuron has among its stimuli.
* Step 2.2 (:meth:`ConceptEvoSpace.embed`): any neuron = mean of its stimuli's image
  embeddings.
* A 2-D :class:`~tb_conceptevo.spaces.layout.StableLayout` fitted once on the base
  neurons' Step 2.2 vectors, applied to everything embedded later (UMAP's transform
  optimisation per neuron: the base sits exactly on its fitted map).

Example::

    >>> space = ConceptEvoSpace(random_state=0).fit(base_observation)   # doctest: +SKIP
    >>> emb = space.embed(observation["features.3"])                     # doctest: +SKIP
    >>> emb.vectors.shape, emb.layout.shape, emb.n_unplaced              # doctest: +SKIP
    ((64, 30), (64, 2), 0)
    >>> space.save("space.npz"); ConceptEvoSpace.load("space.npz")       # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..observation import LayerObservation, Observation
from . import io as space_io
from ._image_embedding import indirect_embeddings, solve_image_embeddings
from ._neuron_embedding import (  # noqa: F401 - cooccurrence_pairs, train_skipgram, _uniform_init: re-exported
    _uniform_init, cooccurrence_pairs, neuron_embeddings, neuron_pairs, sppmi_embeddings, train_skipgram,
)
from ._stimuli import BaseStimuli, _row_ids, base_observations, base_stimuli, stimulus_mask
from .base import Embedding, Space
from .layout import StableLayout

#: version of the file written by ConceptEvoSpace.save (bump on incompatible change)
FILE_VERSION = 1

_Observations = Union[Observation, LayerObservation, Sequence[LayerObservation]]


class ConceptEvoSpace(Space):
    """ConceptEvo's unified semantic space, scikit-learn style.

    Args:
        dim: embedding dimension (paper: 30).
        negatives: negative samples R per neuron of a pair (paper: 3).
        lr_neuron: learning rate of the neuron skip-gram (paper: 0.05).
        lr_image: learning rate of the indirect image skip-gram (paper's Step 2.1
            rate: 0.1).
        neuron_solver: how Step 1.3 finds the neuron embeddings.  ``"sppmi"``
            (default): the factorisation skip-gram with negative sampling converges to
            (Levy and Goldberg 2014; :func:`~tb_conceptevo.spaces._neuron_embedding.sppmi_embeddings`);
            ``"sgd"``: the paper's mini-batched SGD over the Step 1.2 pairs
            (``repetitions``, ``epochs``, ``lr_neuron``).  Measured by
            ``benchmarks/bench_space.py --reference`` (960 neurons, 5,000 images, 60
            concepts, 3 seeds) against the reference procedure compiled with numba (one
            plain SGD update per co-activated pair, 20 epochs, R = 3, dim 30, lr 0.05:
            30,652 pairs, 5-NN concept purity 0.898 in 0.93 s): ``"sppmi"`` 0.034 s
            (27x faster) at purity 0.953; ``"sgd"`` with E = 2, 20 epochs 0.68 s at
            0.957, E = 1 0.34 s at 0.874 (a busy 2-core machine).
        epochs: passes over the pair multisets (paper: ~20), for the image skip-gram of
            Step 2.1 and for ``neuron_solver="sgd"``.
        repetitions: E, how many times the shuffled sliding-window sampling of Step 1.2
            is repeated (the cost of the SGD is linear in E); default 2.
        k: stimuli per neuron (paper: 10).  Observations recorded with more than ``k``
            images per neuron use their first ``k`` as stimuli; the remaining columns
            of the base observation feed the indirect image embeddings.
        sample_fraction: None (all probe images) or a fraction in (0, 1]: only a fixed
            pseudo-random subset of the probe images counts as stimuli, at fit and at
            embed time (the paper's 10 % sampling, which raises the overlap between the
            stimuli of different models).  A neuron's stimuli are then its first ``k``
            images inside the subset, so record with ``k / sample_fraction`` images per
            neuron to keep ``k`` stimuli.
        n_groups: None, or the number of k-means concept groups fitted on the base
            neuron embeddings (``Embedding.groups``).
        umap_kwargs: extra :class:`StableLayout` arguments (``n_neighbors``,
            ``min_dist``, ``metric``, ``refine``, ``n_epochs``).  Default
            ``refine=False``: every neuron is placed from its own embedding only, by
            UMAP's transform optimisation (see ``layout.py``).
        ridge: relative ridge of the Step 2.1 least-squares solve; 0 = the
            minimum-norm solution (see
            :func:`~tb_conceptevo.spaces._image_embedding.solve_image_embeddings`).
        batch_size: skip-gram mini-batch size; None = half the number of rows
            (clipped to [32, 8192]): each row is then touched about 4 times per batch
            (2 + 2R rows per pair), so the summed mini-batch gradient stays close to
            per-pair SGD while the batches are large enough to be efficient.
        random_state: seed of every random choice (pairs, init, negatives, UMAP).
        device: torch device of the skip-gram training (default CPU).
        dtype: ``"float64"``, ``"float32"`` or None (default: float64 on CPU, float32 on
            other devices) for the skip-gram training.  In float32 the vector
            instructions a CPU offers change the last bit of sigmoids and sums, and
            the SGD amplifies it into a different (equally good) space; in float64 the
            same seed gives the same stored float32 space on every machine.
        progress: tqdm progress bars.

    Fitted attributes: ``neuron_ids_``, ``layers_``, ``neuron_embeddings_`` (Step 1.3,
    NaN rows for invalid neurons), ``image_embeddings_`` ``[n_images_, dim]``,
    ``image_status_`` (0 unknown, 1 covered, 2 indirect), ``layout_``,
    ``group_centers_``, ``probe_hash_`` (also read as ``probe_hash``, the :class:`Space`
    interface's name), and the statistics ``n_pairs_``,
    ``n_covered_images_``, ``n_indirect_images_``, ``n_isolated_neurons_``,
    ``reconstruction_error_`` (relative RMS error of Eq. 4 on the base neurons),
    ``timings_`` (seconds per stage of the last ``fit``; not saved).
    """

    name = "conceptevo"

    def __init__(
        self,
        dim: int = 30,
        negatives: int = 3,
        lr_neuron: float = 0.05,
        lr_image: float = 0.1,
        epochs: int = 20,
        repetitions: int = 2,
        neuron_solver: str = "sppmi",
        k: int = 10,
        sample_fraction: Optional[float] = None,
        n_groups: Optional[int] = None,
        umap_kwargs: Optional[Dict] = None,
        ridge: float = 1e-4,
        batch_size: Optional[int] = None,
        random_state: int = 0,
        device=None,
        dtype: Optional[str] = None,
        progress: bool = True,
    ):
        self.dim = dim
        self.negatives = negatives
        self.lr_neuron = lr_neuron
        self.lr_image = lr_image
        self.epochs = epochs
        self.repetitions = repetitions
        self.neuron_solver = neuron_solver
        self.k = k
        self.sample_fraction = sample_fraction
        self.n_groups = n_groups
        self.umap_kwargs = umap_kwargs
        self.ridge = ridge
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.progress = progress

    # ================================================================= fitting
    def fit(self, observations: _Observations, indirect_observations: Sequence = ()) -> "ConceptEvoSpace":
        """Steps 1.2, 1.3 and 2.1 on the base model, then the stable 2-D layout.

        Args:
            observations: the base model: an :class:`Observation` (all its layers form
                one neuron set, ids ``"layer:channel"``) or a list of
                :class:`LayerObservation` of one step.
            indirect_observations: optional further observations (e.g. other logged
                steps of the base run, or other runs) used *only* as extra evidence of
                which images make the same neurons respond, for the indirect image
                embeddings.

        Indirect embeddings (the paper's Step 2.1, last paragraph) pair images through
        the base neurons they activate most.  Observations recorded by
        ``ConceptWriter`` (or with an :class:`~tb_conceptevo.image_links.ImageLinksRecorder`)
        carry ``image_links``, each probe image's most responsive channels per
        layer: an uncovered image is then linked to those neurons and through them
        to their stimuli, from the one base step alone.  The neurons' own top-image
        lists add the inverse links (an image is linked to the neurons that have it
        among their recorded top images: the columns beyond ``k``, and
        ``indirect_observations``); for observations without ``image_links`` (logs
        written before them) these are the only links.  Uncovered images linked to
        no covered image (directly or through other images) stay without embedding;
        neurons whose stimuli are all such images are unplaced.
        """
        self._check_params()
        layers, extra, probe_hash = base_observations(observations, indirect_observations)
        clock = _Clock()
        rng = np.random.default_rng(self.random_state)
        generator = torch.Generator().manual_seed(int(self.random_state))
        device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        skipgram = dict(negatives=self.negatives, epochs=self.epochs, batch_size=self.batch_size,
                        generator=generator, device=device, dtype=self._torch_dtype(device),
                        progress=self.progress)

        base = base_stimuli(layers, extra, self.k, self.sample_fraction, self.random_state)
        # Step 1.2: co-activated neuron pairs (groups = images, members = neurons)
        pairs = neuron_pairs(base.image_of_entry, base.neuron_of_entry, self.repetitions, rng)
        clock.lap("pairs")
        # Step 1.3: skip-gram with negative sampling, or the factorisation it converges to
        if self.neuron_solver == "sppmi":
            neuron_vectors = sppmi_embeddings(base.image_of_entry, base.neuron_of_entry, base.valid_neurons,
                                              self.dim, self.negatives, generator)
        else:
            neuron_vectors = neuron_embeddings(pairs, base.valid_neurons, dim=self.dim, lr=self.lr_neuron, **skipgram)
        clock.lap("skipgram")
        # Step 2.1: image embeddings of the covered images (Eq. 4-6) ...
        image_vectors = np.full((base.n_images, self.dim), np.nan)
        status = np.zeros(base.n_images, dtype=np.int8)
        covered, covered_vectors, error = solve_image_embeddings(
            base.neuron_of_entry, base.image_of_entry, neuron_vectors, base.valid_neurons, self.ridge
        )
        image_vectors[covered] = covered_vectors
        status[covered] = 1
        clock.lap("image_embeddings")
        # ... and indirect embeddings of the uncovered ones
        indirect = indirect_embeddings(
            image_vectors, status, layers + extra, sample_fraction=self.sample_fraction,
            random_state=self.random_state, repetitions=self.repetitions, lr=self.lr_image, rng=rng, **skipgram,
        )
        status[indirect] = 2
        clock.lap("indirect")

        self.neuron_ids_ = [nid for obs in layers for nid in obs.neuron_ids()]
        self.layers_ = [obs.layer for obs in layers]
        self.probe_hash_ = probe_hash
        self.n_images_ = base.n_images
        self.neuron_embeddings_ = neuron_vectors.astype(np.float32)
        self.image_embeddings_ = image_vectors.astype(np.float32)
        self.image_status_ = status
        self._set_statistics(base, pairs, covered, indirect, error)
        self._fit_map(base, clock)
        self.timings_ = clock.laps
        return self

    def _set_statistics(self, base: BaseStimuli, pairs: np.ndarray, covered: np.ndarray,
                        indirect: np.ndarray, error: float) -> None:
        in_pairs = np.zeros(base.valid_neurons.size, dtype=bool)
        in_pairs[pairs.ravel()] = True
        self.n_pairs_ = int(pairs.shape[0])
        self.n_covered_images_ = int(covered.size)
        self.n_indirect_images_ = int(indirect.size)
        self.n_isolated_neurons_ = int((base.valid_neurons & ~in_pairs).sum())
        self.reconstruction_error_ = float(error)

    def _fit_map(self, base: BaseStimuli, clock: "_Clock") -> None:
        """Concept groups and the stable 2-D layout of the fitted space."""
        self.group_centers_ = self._fit_groups(self.neuron_embeddings_[base.valid_neurons])
        layout_params = {"random_state": self.random_state, "refine": False}
        layout_params.update(self.umap_kwargs or {})
        clock.lap("groups")
        # The map is fitted on the base's own Step 2.2 vectors (what ``embed`` logs for
        # it), not on the Step 1.3 ones: the base model then sits exactly on the fitted
        # map at its own step, and every logged vector is placed by the same transform.
        base_vectors, base_placed = self.embed_vectors(base.ids, base.invalid)
        self.layout_ = StableLayout(**layout_params).fit(base_vectors[base_placed])
        clock.lap("layout")

    def _fit_groups(self, vectors: np.ndarray) -> Optional[np.ndarray]:
        if self.n_groups is None:
            return None
        if vectors.shape[0] < self.n_groups:
            raise ValueError(
                f"n_groups={self.n_groups} exceeds the {vectors.shape[0]} base neurons with stimuli"
            )
        from sklearn.cluster import KMeans

        kmeans = KMeans(n_clusters=int(self.n_groups), n_init=10, random_state=self.random_state)
        kmeans.fit(vectors.astype(np.float64))
        return kmeans.cluster_centers_.astype(np.float32)

    # ================================================================ embedding
    def embed(self, observation: LayerObservation, detection=None) -> Embedding:
        """Step 2.2: place every neuron of one layer (any model, any step).

        A neuron's vector is the mean of the embeddings of its stimuli covered by
        the base; if none is covered, the mean of its indirectly embedded stimuli;
        otherwise (or if the observation flags the neuron invalid) it is unplaced:
        ``placed`` False and NaN rows in ``vectors`` and ``layout``.  Deterministic.
        ``detection`` is ignored (this space needs no detector).
        """
        self._check_fitted()
        if isinstance(observation, Observation):
            raise TypeError("embed takes one LayerObservation; call it per layer: space.embed(obs[layer])")
        if not isinstance(observation, LayerObservation):
            raise TypeError(f"embed expects a LayerObservation, got {type(observation).__name__}")
        self.check_probe(observation.probe_hash)
        vectors, placed = self.embed_vectors(_row_ids(observation), observation.invalid)
        layout = self.layout_.transform(vectors)
        groups = None
        if self.group_centers_ is not None:
            groups = np.full(vectors.shape[0], -1, dtype=np.int32)
            if placed.any():
                d2 = ((vectors[placed, None, :] - self.group_centers_[None]) ** 2).sum(-1)
                groups[placed] = d2.argmin(axis=1)
        return Embedding(vectors=vectors, layout=layout, placed=placed, groups=groups)

    def embed_vectors(self, image_ids: np.ndarray, invalid=None) -> Tuple[np.ndarray, np.ndarray]:
        """Step 2.2 without the layout: ``(vectors float32 [N, dim], placed bool [N])``
        from an ``[N, K]`` array of top image ids (highest first, -1 = none)."""
        self._check_fitted()
        ids = np.asarray(image_ids)
        if ids.ndim != 2:
            raise ValueError(f"image_ids must be [N, K], got shape {ids.shape}")
        ids = ids.astype(np.int64)
        stimulus = stimulus_mask(ids, self.k, self.sample_fraction, self.random_state) & (ids < self.n_images_)
        status = np.where(stimulus, self.image_status_[np.clip(ids, 0, self.n_images_ - 1)], 0)
        table = self.image_embeddings_
        gathered = table[np.clip(ids, 0, self.n_images_ - 1)]              # [N, K, d]
        vectors = np.full((ids.shape[0], self.dim), np.nan, dtype=np.float32)
        for level in (2, 1):  # covered (1) overrides indirect (2)
            use = status == level
            count = use.sum(axis=1)
            rows = count > 0
            total = np.where(use[..., None], gathered, 0.0).sum(axis=1, dtype=np.float64)
            vectors[rows] = (total[rows] / count[rows, None]).astype(np.float32)
        placed = np.isfinite(vectors).all(axis=1)
        if invalid is not None:
            invalid = np.asarray(invalid, dtype=bool).reshape(-1)
            if invalid.shape[0] != ids.shape[0]:
                raise ValueError(f"invalid has {invalid.shape[0]} entries for {ids.shape[0]} neurons")
            placed &= ~invalid
        vectors[~placed] = np.nan
        return vectors, placed

    # ================================================================ storage
    def save(self, path) -> None:
        """Write the fitted space (parameters, probe hash, embeddings, layout) to one
        versioned file (see ``spaces.io``)."""
        self._check_fitted()
        header = {
            "probe_hash": self.probe_hash_,
            "params": self.get_params(),
            "neuron_ids": list(self.neuron_ids_),
            "layers": list(self.layers_),
            "stats": {
                "n_pairs": self.n_pairs_,
                "n_covered_images": self.n_covered_images_,
                "n_indirect_images": self.n_indirect_images_,
                "n_isolated_neurons": self.n_isolated_neurons_,
                "reconstruction_error": self.reconstruction_error_,
            },
        }
        arrays = {
            "neuron_embeddings": self.neuron_embeddings_,
            "image_embeddings": self.image_embeddings_,
            "image_status": self.image_status_,
        }
        if self.group_centers_ is not None:
            arrays["group_centers"] = self.group_centers_
        space_io.save_space_file(path, self.name, FILE_VERSION, header, arrays, layout=self.layout_)

    @classmethod
    def load(cls, path) -> "ConceptEvoSpace":
        """Read a file written by :meth:`save`.  FileNotFoundError / ValueError (a
        :class:`~tb_conceptevo.spaces.io.SpaceFileError`) on a missing, corrupted,
        other-kind or other-version file."""
        header, arrays, layout = space_io.load_space_file(path, cls.name, FILE_VERSION)
        space_io.require(arrays, ("neuron_embeddings", "image_embeddings", "image_status"), path)
        if layout is None:
            raise space_io.SpaceFileError(f"{path} has no stored layout; refit the space")
        try:
            # files written before the closed-form Step 1.3 were trained by SGD
            space = cls(**{"neuron_solver": "sgd", **header["params"]})
            stats = header["stats"]
            space.neuron_ids_ = list(header["neuron_ids"])
            space.layers_ = list(header["layers"])
            space.probe_hash_ = str(header["probe_hash"])
            space.n_pairs_ = int(stats["n_pairs"])
            space.n_covered_images_ = int(stats["n_covered_images"])
            space.n_indirect_images_ = int(stats["n_indirect_images"])
            space.n_isolated_neurons_ = int(stats["n_isolated_neurons"])
            space.reconstruction_error_ = float(stats["reconstruction_error"])
        except (KeyError, TypeError, ValueError) as exc:
            raise space_io.SpaceFileError(f"{path} has an incomplete header ({exc!r}); refit the space") from None
        space.neuron_embeddings_ = np.asarray(arrays["neuron_embeddings"], dtype=np.float32)
        space.image_embeddings_ = np.asarray(arrays["image_embeddings"], dtype=np.float32)
        space.image_status_ = np.asarray(arrays["image_status"], dtype=np.int8)
        space.n_images_ = int(space.image_status_.shape[0])
        space.group_centers_ = arrays.get("group_centers")
        space.layout_ = layout
        if space.image_embeddings_.shape != (space.n_images_, space.dim):
            raise space_io.SpaceFileError(f"{path} has inconsistent array shapes; refit the space")
        return space

    # ================================================================ helpers
    @property
    def probe_hash(self) -> str:
        """The :class:`Space` interface's probe hash: the fitted ``probe_hash_`` ("" before
        ``fit``)."""
        return getattr(self, "probe_hash_", "")

    @probe_hash.setter
    def probe_hash(self, value: str) -> None:
        self.probe_hash_ = value

    def __setstate__(self, state: Dict) -> None:
        # spaces pickled before the fitted hash was named probe_hash_
        if "probe_hash" in state:
            state.setdefault("probe_hash_", state.pop("probe_hash"))
        self.__dict__.update(state)

    def get_params(self, deep: bool = True) -> Dict:
        """Hyper-parameters (JSON-able; ``device`` and ``progress`` are not stored).
        ``deep`` is scikit-learn's argument; this space holds no nested estimators."""
        return {
            "dim": int(self.dim), "negatives": int(self.negatives),
            "lr_neuron": float(self.lr_neuron), "lr_image": float(self.lr_image),
            "epochs": int(self.epochs), "repetitions": int(self.repetitions),
            "neuron_solver": str(self.neuron_solver), "k": int(self.k),
            "sample_fraction": None if self.sample_fraction is None else float(self.sample_fraction),
            "n_groups": None if self.n_groups is None else int(self.n_groups),
            "umap_kwargs": dict(self.umap_kwargs) if self.umap_kwargs else None,
            "ridge": float(self.ridge),
            "batch_size": None if self.batch_size is None else int(self.batch_size),
            "random_state": int(self.random_state),
            "dtype": self.dtype,
        }

    def set_params(self, **params) -> "ConceptEvoSpace":
        """Set hyper-parameters by their ``__init__`` names (scikit-learn's
        ``set_params``) and return the space; values are checked by the next ``fit``.

        >>> ConceptEvoSpace().set_params(dim=16, epochs=5).get_params()["dim"]
        16
        """
        valid = [name for name in inspect.signature(type(self).__init__).parameters if name != "self"]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(f"ConceptEvoSpace has no parameter(s) {unknown}; valid parameters: {valid}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def _check_params(self) -> None:
        positive_ints = {"dim": self.dim, "negatives": self.negatives, "epochs": self.epochs,
                         "repetitions": self.repetitions, "k": self.k}
        for name, value in positive_ints.items():
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr_neuron", "lr_image"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.sample_fraction is not None and not 0 < self.sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be None or in (0, 1], got {self.sample_fraction!r}")
        if self.n_groups is not None and (not isinstance(self.n_groups, (int, np.integer)) or self.n_groups < 1):
            raise ValueError(f"n_groups must be None or a positive integer, got {self.n_groups!r}")
        if not self.ridge >= 0:
            raise ValueError(f"ridge must be >= 0 (0 = minimum-norm least squares), got {self.ridge!r}")
        if self.neuron_solver not in ("sppmi", "sgd"):
            raise ValueError(f"neuron_solver must be 'sppmi' or 'sgd', got {self.neuron_solver!r}")
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")

    def _torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is None:
            return torch.float64 if device.type == "cpu" else torch.float32
        return getattr(torch, self.dtype)

    def _check_fitted(self) -> None:
        if not hasattr(self, "image_embeddings_"):
            raise RuntimeError("ConceptEvoSpace is not fitted; call fit(base_observations) or load(path)")

    def __repr__(self) -> str:
        return (f"ConceptEvoSpace(dim={self.dim}, k={self.k}, neuron_solver={self.neuron_solver!r}, "
                f"repetitions={self.repetitions}, random_state={self.random_state})")


class _Clock:
    def __init__(self):
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.laps: Dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._now()
        self.laps[name] = now - self._last
        self._last = now

