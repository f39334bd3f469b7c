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

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..observation import LayerObservation, Observation
from . import io as space_io
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
        epochs: passes over the pair multisets (paper: ~20).
        repetitions: E, how many times the shuffled sliding-window sampling of Step 1.2
            is repeated (the cost of Step 1.3 is linear in E).  Default 2, by
            measurement (``benchmarks/bench_space.py --reference``: 960 neurons, 5,000
            images, 60 concepts, 3 seeds): against the reference procedure (one plain
            SGD update per co-activated pair, 20 epochs, R = 3, dim 30, lr 0.05; 30,652
            pairs, 5-NN concept purity 0.902) E = 2 with 20 epochs is 33x faster at
            purity 0.957; E = 10 was 8x faster at 0.970, E = 1 95x at 0.874.
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
            minimum-norm solution (see :meth:`_solve_image_embeddings`).
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
    ``group_centers_``, ``probe_hash``, and the statistics ``n_pairs_``,
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
        layers = _layer_list(observations, "observations")
        probe_hash = _common_probe_hash(layers)
        extra = _layer_list(indirect_observations, "indirect_observations", allow_empty=True)
        for obs in extra:
            if probe_hash and obs.probe_hash and obs.probe_hash != probe_hash:
                raise ValueError(
                    f"indirect observation of layer {obs.layer!r} comes from probe set "
                    f"{obs.probe_hash[:12]}... but the base from {probe_hash[:12]}...; use the same probe set"
                )
        clock = _Clock()
        rng = np.random.default_rng(self.random_state)
        generator = torch.Generator().manual_seed(int(self.random_state))
        device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        dtype = self._torch_dtype(device)

        # ---- stimuli of the base neurons (all layers = one neuron set)
        ids = np.concatenate([_row_ids(obs) for obs in layers], axis=0)
        invalid = np.concatenate([np.asarray(obs.invalid, dtype=bool).reshape(-1) for obs in layers])
        stimulus = self._stimulus_mask(ids) & ~invalid[:, None]
        n_neurons = ids.shape[0]
        valid_neurons = stimulus.any(axis=1)
        if valid_neurons.sum() < 3:
            raise ValueError(
                f"only {int(valid_neurons.sum())} of {n_neurons} base neurons have valid stimuli; "
                "fit needs at least 3 (check the observations' invalid flags and image ids)"
            )
        all_ids = [ids] + [_row_ids(obs) for obs in extra]
        n_images = int(max(int(a.max(initial=-1)) for a in all_ids)) + 1
        # images recorded with links may lie beyond every neuron's top-k
        n_images = max([n_images] + [obs.image_links.shape[0] for obs in layers + extra
                                     if obs.image_links is not None])
        neuron_of_entry, image_of_entry = np.nonzero(stimulus)
        image_of_entry = ids[neuron_of_entry, image_of_entry].astype(np.int64)

        # ---- Step 1.2: co-activated neuron pairs (groups = images, members = neurons)
        pairs = cooccurrence_pairs(image_of_entry, neuron_of_entry, self.repetitions, rng)
        clock.lap("pairs")
        if pairs.shape[0] == 0:
            raise ValueError(
                "no two base neurons share a stimulus image, so there are no co-activated pairs "
                "to learn from; record the base with a smaller probe set, a larger k, or use "
                "sample_fraction"
            )

        # ---- Step 1.3: skip-gram with negative sampling
        table = _uniform_init(n_neurons, self.dim, generator).to(device=device, dtype=dtype)
        pool = torch.as_tensor(np.flatnonzero(valid_neurons), device=device)
        train_skipgram(
            table, torch.as_tensor(pairs, device=device), pool, negatives=self.negatives,
            lr=self.lr_neuron, epochs=self.epochs, batch_size=self._batch_size(len(pool)),
            generator=generator, progress=self.progress, desc="ConceptEvo neurons (step 1.3)",
        )
        clock.lap("skipgram")
        neuron_embeddings = table.cpu().numpy().astype(np.float64)
        neuron_embeddings[~valid_neurons] = np.nan
        in_pairs = np.zeros(n_neurons, dtype=bool)
        in_pairs[pairs.ravel()] = True

        # ---- Step 2.1: image embeddings of the covered images (Eq. 4-6)
        image_embeddings = np.full((n_images, self.dim), np.nan)
        status = np.zeros(n_images, dtype=np.int8)
        covered, covered_vectors, error = self._solve_image_embeddings(
            neuron_of_entry, image_of_entry, neuron_embeddings, valid_neurons
        )
        image_embeddings[covered] = covered_vectors
        status[covered] = 1
        clock.lap("image_embeddings")

        # ---- Step 2.1 (cont.): indirect embeddings of uncovered images
        indirect = self._indirect_embeddings(
            image_embeddings, status, layers, extra, rng, generator, device, dtype
        )
        status[indirect] = 2
        clock.lap("indirect")

        # ---- fitted state
        self.neuron_ids_ = [nid for obs in layers for nid in obs.neuron_ids()]
        self.layers_ = [obs.layer for obs in layers]
        self.probe_hash = probe_hash
        self.n_images_ = n_images
        self.neuron_embeddings_ = neuron_embeddings.astype(np.float32)
        self.image_embeddings_ = image_embeddings.astype(np.float32)
        self.image_status_ = status
        self.n_pairs_ = int(pairs.shape[0])
        self.n_covered_images_ = int(covered.size)
        self.n_indirect_images_ = int(indirect.size)
        self.n_isolated_neurons_ = int((valid_neurons & ~in_pairs).sum())
        self.reconstruction_error_ = float(error)

        self.group_centers_ = self._fit_groups(self.neuron_embeddings_[valid_neurons])
        layout_params = {"random_state": self.random_state, "refine": False}
        layout_params.update(self.umap_kwargs or {})
        clock.lap("groups")
        # The map is fitted on the base's own Step 2.2 vectors (what ``embed`` logs for
        # it), not on the Step 1.3 ones: the base model then sits exactly on the fitted
        # map at its own step, and every logged vector is placed by the same transform.
        base_vectors, base_placed = self.embed_vectors(ids, invalid)
        self.layout_ = StableLayout(**layout_params).fit(base_vectors[base_placed])
        clock.lap("layout")
        self.timings_ = clock.laps
        return self

    def _stimulus_mask(self, ids: np.ndarray) -> np.ndarray:
        """bool ``[N, K]``: the (at most ``k``) first valid ids of each row that lie in
        the sampled image subset."""
        eligible = ids >= 0
        if self.sample_fraction is not None:
            eligible &= _in_sample(ids, self.sample_fraction, self.random_state)
        return eligible & (np.cumsum(eligible, axis=1) <= self.k)

    def _solve_image_embeddings(self, neuron_of_entry, image_of_entry, neuron_embeddings, valid_neurons):
        """Eq. 4-6 as one sparse least-squares problem, solved directly.

        With ``A[n, x] = 1 / |X_n|`` for every stimulus x of base neuron n (rows:
        neurons with stimuli, columns: covered images) and ``U`` the Step 1.3
        embeddings, J2 (Eq. 5) is ``0.5 ||A V - U||^2``.  There are usually more
        covered images than neurons, so J2 has infinitely many minimisers.  The
        paper's gradient descent (Eq. 6) converges to the one nearest its random
        start: the minimum-norm solution ``A^+ U`` plus the start's component in the
        null space of ``A``, i.e. a solution that depends on the initial noise.  We
        solve instead for the start-independent part:

        * ``ridge > 0`` (default 1e-4): ``V = A^T (A A^T + lam I)^-1 U`` with
          ``lam = ridge * mean diag(A A^T)``, one sparse LU of the smaller Gram matrix
          for all ``dim`` right-hand sides; it tends to the minimum-norm solution as
          ``ridge -> 0`` and stays well-posed for near-collinear neurons (almost
          identical stimuli, different embeddings);
        * ``ridge = 0``: the minimum-norm least-squares solution itself (LSMR).

        Measured downstream (``benchmarks/bench_space.py --ridge``: 960 neurons, 5,000
        images, a later model with fresh noise, 3 seeds): ridge 1e-3 / 1e-4 / 0 give
        reconstruction errors 0.0026 / 0.0003 / 0.0000, mean image norms 2.578 /
        2.595 / 2.597 (the 1e-3 ridge shrinks them by 0.7 %; on the demo ~8 %),
        identical 5-NN purity (0.957 base, 0.965 later), evolution speed 0.580 / 0.584
        / 0.585, map entropy 3.320 / 3.301 / 3.328 (seed noise), solve 0.17 / 0.23 /
        2.1 s.  Hence the default 1e-4: within 0.1 % of the minimum-norm solution at a
        tenth of its cost.

        Returns ``(covered image ids, their embeddings, relative RMS error of Eq. 4)``.
        """
        import scipy.sparse as sp
        from scipy.sparse.linalg import splu

        rows_used = np.flatnonzero(valid_neurons)
        row_of_neuron = np.full(valid_neurons.size, -1, dtype=np.int64)
        row_of_neuron[rows_used] = np.arange(rows_used.size)
        covered, column = np.unique(image_of_entry, return_inverse=True)
        row = row_of_neuron[neuron_of_entry]
        stimuli_count = np.bincount(row, minlength=rows_used.size)
        A = sp.csr_matrix(
            (1.0 / stimuli_count[row], (row, column)), shape=(rows_used.size, covered.size)
        )
        U = neuron_embeddings[rows_used]
        lam = self.ridge * float(np.mean(1.0 / stimuli_count))
        if lam == 0.0:
            # minimum-norm least squares (what plain gradient descent on J2 from 0 converges to)
            from scipy.sparse.linalg import lsmr

            V = np.stack([lsmr(A, U[:, j], atol=1e-12, btol=1e-12, maxiter=20 * A.shape[0])[0]
                          for j in range(U.shape[1])], axis=1)
        elif covered.size <= rows_used.size:
            gram = (A.T @ A + lam * sp.identity(covered.size)).tocsc()
            V = splu(gram, permc_spec="MMD_AT_PLUS_A").solve(np.asarray(A.T @ U))
        else:
            gram = (A @ A.T + lam * sp.identity(rows_used.size)).tocsc()
            V = np.asarray(A.T @ splu(gram, permc_spec="MMD_AT_PLUS_A").solve(U))
        residual = A @ V - U
        error = math.sqrt(float((residual ** 2).sum()) / max(float((U ** 2).sum()), 1e-30))
        return covered, V, error

    def _indirect_embeddings(self, image_embeddings, status, layers, extra, rng, generator, device, dtype):
        """Skip-gram over image pairs linked through a shared neuron (Sec. 3.2, Step
        2.1, last paragraph), covered images held fixed.  Returns the ids of the
        uncovered images that received an embedding.

        A neuron groups its recorded top images and, where the observation carries
        ``image_links`` (each probe image's most responsive channels), the uncovered
        images that respond most to it: the paper's link from an uncovered image to
        its most activated neurons, and through them to their covered stimuli."""
        groups, members, offset = [], [], 0
        for obs in list(layers) + list(extra):
            ids = _row_ids(obs)
            invalid = np.asarray(obs.invalid, dtype=bool).reshape(-1)
            usable = (ids >= 0) & ~invalid[:, None]
            if self.sample_fraction is not None:
                usable &= _in_sample(ids, self.sample_fraction, self.random_state)
            neuron, column = np.nonzero(usable)
            groups.append(neuron + offset)
            members.append(ids[neuron, column].astype(np.int64))
            if obs.image_links is not None:
                links = np.asarray(obs.image_links, dtype=np.int64)
                linked = (links >= 0) & (links < ids.shape[0])
                image, column = np.nonzero(linked)
                channel = links[image, column]
                # only uncovered images need the forward links; covered ones are
                # already in their neurons' lists
                keep = (status[image] == 0) & ~invalid[channel]
                if self.sample_fraction is not None:
                    keep &= _in_sample(image, self.sample_fraction, self.random_state)
                groups.append(channel[keep] + offset)
                members.append(image[keep])
            offset += ids.shape[0]
        groups = np.concatenate(groups)
        members = np.concatenate(members)
        # only neurons that link an uncovered image to something else matter
        uncovered_entry = status[members] == 0
        useful_groups = np.unique(groups[uncovered_entry])
        keep = np.isin(groups, useful_groups)
        pairs = cooccurrence_pairs(groups[keep], members[keep], self.repetitions, rng)
        if pairs.shape[0]:
            pairs = pairs[(status[pairs[:, 0]] == 0) | (status[pairs[:, 1]] == 0)]
        if pairs.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        reachable = _reachable_from_covered(pairs, status == 1)
        pairs = pairs[reachable[pairs[:, 0]] & reachable[pairs[:, 1]]]
        targets = np.flatnonzero(reachable & (status == 0))
        if targets.size == 0:
            return targets

        n_images = status.size
        table_np = np.where(np.isnan(image_embeddings), 0.0, image_embeddings)
        table = torch.as_tensor(table_np, device=device, dtype=dtype)
        table[torch.as_tensor(targets, device=device)] = _uniform_init(targets.size, self.dim, generator).to(
            device=device, dtype=dtype)
        trainable = torch.zeros(n_images, dtype=torch.bool, device=device)
        trainable[torch.as_tensor(targets, device=device)] = True
        pool = torch.as_tensor(np.flatnonzero(reachable), device=device)
        train_skipgram(
            table, torch.as_tensor(pairs, device=device), pool, negatives=self.negatives,
            lr=self.lr_image, epochs=self.epochs, batch_size=self._batch_size(targets.size),
            generator=generator, trainable=trainable, progress=self.progress,
            desc="ConceptEvo indirect images (step 2.1)",
        )
        image_embeddings[targets] = table[torch.as_tensor(targets, device=device)].cpu().numpy()
        return targets

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
        stimulus = self._stimulus_mask(ids) & (ids < self.n_images_)
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
            "probe_hash": self.probe_hash,
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
            space = cls(**header["params"])
            stats = header["stats"]
            space.neuron_ids_ = list(header["neuron_ids"])
            space.layers_ = list(header["layers"])
            space.probe_hash = str(header["probe_hash"])
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
    def get_params(self) -> Dict:
        """Hyper-parameters (JSON-able; ``device`` and ``progress`` are not stored)."""
        return {
            "dim": int(self.dim), "negatives": int(self.negatives),
            "lr_neuron": float(self.lr_neuron), "lr_image": float(self.lr_image),
            "epochs": int(self.epochs), "repetitions": int(self.repetitions), "k": int(self.k),
            "sample_fraction": None if self.sample_fraction is None else float(self.sample_fraction),
            "n_groups": None if self.n_groups is None else int(self.n_groups),
            "umap_kwargs": dict(self.umap_kwargs) if self.umap_kwargs else None,
            "ridge": float(self.ridge),
            "batch_size": None if self.batch_size is None else int(self.batch_size),
            "random_state": int(self.random_state),
            "dtype": self.dtype,
        }

    def _batch_size(self, n_rows: int) -> int:
        if self.batch_size is not None:
            return int(self.batch_size)
        return int(min(8192, max(32, n_rows // 2)))

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
        return f"ConceptEvoSpace(dim={self.dim}, k={self.k}, repetitions={self.repetitions}, random_state={self.random_state})"


# ==================================================================== building blocks
def cooccurrence_pairs(groups: np.ndarray, members: np.ndarray, repetitions: int, rng) -> np.ndarray:
    """Step 1.2, vectorised: int64 ``[P, 2]`` pairs of members sharing a group.

    For each repetition and each group (an image, for neuron pairs), the group's
    members are put in random order and consecutive ones are paired (a sliding
    window of length 2).  Implemented as one lexicographic sort of all
    (repetition, group, random key) entries; a pair is two neighbouring entries of the
    same repetition and group.

    >>> pairs = cooccurrence_pairs(np.array([0, 0, 0, 1]), np.array([5, 6, 7, 8]), 2,
    ...                            np.random.default_rng(0))
    >>> pairs.shape   # 2 repetitions x (3 members - 1) for group 0; group 1 is alone
    (4, 2)
    """
    groups = np.asarray(groups, dtype=np.int64)
    members = np.asarray(members, dtype=np.int64)
    n = groups.size
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    repetition = np.repeat(np.arange(repetitions, dtype=np.int64), n)
    all_groups = np.tile(groups, repetitions)
    all_members = np.tile(members, repetitions)
    order = np.lexsort((rng.random(n * repetitions), all_groups, repetition))
    g, r, m = all_groups[order], repetition[order], all_members[order]
    same = (g[1:] == g[:-1]) & (r[1:] == r[:-1])
    return np.stack([m[:-1][same], m[1:][same]], axis=1)


def train_skipgram(
    table: torch.Tensor,
    pairs: torch.Tensor,
    negative_pool: torch.Tensor,
    negatives: int,
    lr: float,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    trainable: Optional[torch.Tensor] = None,
    progress: bool = True,
    desc: str = "skip-gram",
) -> torch.Tensor:
    """Skip-gram with negative sampling (ConceptEvo Eq. 1-3), in place on ``table``.

    For each pair (n, m): ascend ``log s(v_n.v_m) + sum_r log(1 - s(v_n.v_r)) +
    sum_r log(1 - s(v_m.v_r))`` with R = ``negatives`` rows r drawn uniformly from
    ``negative_pool`` separately for n and for m.  The gradients are Eq. 2-3 for
    v_n, v_m plus the (equally part of J1) gradients of the negative rows.
    Mini-batched SGD: the gradients of a batch are computed from the same table and
    summed into it with ``index_put_(accumulate=True)`` (a row occurring several times in a batch
    receives the sum, as with sequential per-pair updates); the learning rate decays
    linearly to 1e-4 * lr as in word2vec.  Runs single-threaded on CPU (tiny tensors).  ``trainable`` (bool per row) freezes the
    other rows (used for the indirect image embeddings).
    """
    n_pairs = int(pairs.shape[0])
    if n_pairs == 0:
        return table
    with _single_thread_on_cpu(table.device):
        _skipgram_epochs(table, pairs, negative_pool, negatives, lr, epochs, batch_size, generator,
                         trainable, progress, desc)
    return table


def _skipgram_epochs(table, pairs, negative_pool, negatives, lr, epochs, batch_size, generator,
                     trainable, progress, desc):
    n_pairs = int(pairs.shape[0])
    pool_size = int(negative_pool.numel())
    dim = table.shape[1]
    device = table.device
    mask = trainable.to(table.dtype).unsqueeze(1) if trainable is not None else None
    batches_per_epoch = math.ceil(n_pairs / batch_size)
    total = epochs * batches_per_epoch
    bar = _progress_bar(total, desc, progress)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n_pairs, generator=generator).to(device)
        # all negatives of the epoch in one draw (indices into the pool)
        negative_index = torch.randint(pool_size, (n_pairs, 2 * negatives), generator=generator).to(device)
        for start in range(0, n_pairs, batch_size):
            batch = order[start:start + batch_size]
            size = batch.numel()
            a, b = pairs[batch, 0], pairs[batch, 1]
            neg = negative_pool[negative_index[start:start + size]]                    # [B, 2R]
            va, vb = table.index_select(0, a), table.index_select(0, b)
            vneg = table.index_select(0, neg.reshape(-1)).view(size, 2 * negatives, dim)
            vna, vnb = vneg[:, :negatives], vneg[:, negatives:]
            positive = 1.0 - torch.sigmoid((va * vb).sum(-1, keepdim=True))          # [B, 1]
            sa = torch.sigmoid(torch.bmm(vna, va.unsqueeze(2)))                        # [B, R, 1]
            sb = torch.sigmoid(torch.bmm(vnb, vb.unsqueeze(2)))
            rate = lr * max(1e-4, 1.0 - step / total)
            grad_a = positive * vb - (sa * vna).sum(1)                                 # Eq. 2
            grad_b = positive * va - (sb * vnb).sum(1)                                 # Eq. 3
            grad_neg = -torch.cat([sa * va.unsqueeze(1), sb * vb.unsqueeze(1)], 1)     # d/dv_r
            # all gradients come from the table before this batch's update
            for rows, grad in ((a, grad_a), (b, grad_b), (neg.reshape(-1), grad_neg.reshape(-1, dim))):
                grad = grad * rate
                if mask is not None:
                    grad = grad * mask[rows]
                table.index_put_((rows,), grad, accumulate=True)
            step += 1
        bar.update(batches_per_epoch)
    bar.close()


class _single_thread_on_cpu:
    """Run small-tensor CPU work on one thread: the per-batch tensors are tiny, so
    intra-op threads only add synchronisation (measured 15x slower with 2 threads
    on a busy 2-core machine)."""

    def __init__(self, device):
        self.active = torch.device(device).type == "cpu"

    def __enter__(self):
        if self.active:
            self.previous = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.previous)


def _uniform_init(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Paper's initialisation: uniform in [-0.5, 0.5)."""
    return torch.rand(rows, dim, generator=generator) - 0.5


def _reachable_from_covered(pairs: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """bool per image: in a connected component (of the pair graph) holding a covered image."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n = covered.size
    graph = sp.coo_matrix((np.ones(pairs.shape[0]), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    good_labels = np.unique(label[covered])
    return np.isin(label, good_labels)


def _in_sample(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic pseudo-random subset of image ids (same at fit and embed time,
    independent of the probe size): a splitmix64 hash of the id compared to fraction."""
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _row_ids(obs: LayerObservation) -> np.ndarray:
    ids = np.asarray(obs.image_ids)
    if ids.ndim != 2:
        raise ValueError(f"layer {obs.layer!r}: image_ids must be [N, k], got shape {ids.shape}")
    return ids.astype(np.int64)


def _layer_list(observations, what: str, allow_empty: bool = False) -> List[LayerObservation]:
    if isinstance(observations, Observation):
        layers = list(observations.layers.values())
    elif isinstance(observations, LayerObservation):
        layers = [observations]
    else:
        try:
            layers = []
            for item in observations:
                if isinstance(item, Observation):
                    layers.extend(item.layers.values())
                else:
                    layers.append(item)
        except TypeError:
            raise TypeError(
                f"{what} must be an Observation, a LayerObservation or a list of them, "
                f"got {type(observations).__name__}"
            ) from None
    for item in layers:
        if not isinstance(item, LayerObservation):
            raise TypeError(f"{what} must contain LayerObservation objects, got {type(item).__name__}")
    if not layers and not allow_empty:
        raise ValueError(f"{what} is empty; pass the base model's observations")
    return layers


def _common_probe_hash(layers: Sequence[LayerObservation]) -> str:
    hashes = {obs.probe_hash for obs in layers if obs.probe_hash}
    if len(hashes) > 1:
        raise ValueError(
            f"the base observations come from {len(hashes)} different probe sets; fit on "
            "observations recorded with one probe set"
        )
    return hashes.pop() if hashes else ""


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


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="batch")
