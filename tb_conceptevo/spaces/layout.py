"""A 2-D layout fitted once and reused for everything embedded later.

Fitting UMAP independently for every step makes the map flip, rotate and drift from
one step to the next.  :class:`StableLayout` fits UMAP **once** on a space's
reference vectors (ConceptEvo: the base model's neuron embeddings; the text-anchored
space: its concept/anchor vectors) and then only ``transform``\\ s later vectors into
that fixed map, so the same vector always lands at the same place.

Usage (any space)::

    >>> import numpy as np
    >>> from tb_conceptevo.spaces.layout import StableLayout
    >>> reference = np.random.default_rng(0).normal(size=(30, 8)).astype("float32")
    >>> layout = StableLayout(random_state=0).fit(reference)   # n_neighbors clipped to 29
    >>> xy = layout.transform(reference[:5])                    # float32 [5, 2]
    >>> xy.shape
    (5, 2)
    >>> bool(np.isnan(layout.transform(np.full((2, 8), np.nan))).all())  # NaN rows stay NaN
    True

The map is UMAP's fit, run longer than UMAP's default: its 500 SGD epochs stop short of
where each neuron's neighbourhood settles.  Measured on the demo's 176-neuron base maps
(training seeds 0/1/2, 12-16 UMAP seeds each), trustworthiness@10 medians rise from
0.878/0.885/0.873 at 500 epochs to 0.884/0.891/0.873 at 2,000, and the spread narrows
(seed 0: 0.857-0.887 -> 0.870-0.891); on 3,576 synthetic neurons 0.991-0.992 ->
0.9925-0.9927 for 20 s instead of 10.5 s per fit (2 cores).  ``fit_epochs=None`` takes
four times UMAP's own default (2,000 epochs up to 10,000 vectors, 800 beyond).  The
best of three such fits keeps 0.891/0.892/0.883 on those maps, where UMAP's own fits
(five seeds it never tries, default epochs) keep a median 0.878/0.880/0.876 and the
best of three 500-epoch fits kept 0.880/0.890/0.876.

UMAP's fit still varies with its seed, so ``n_init`` fits are made from seeds
``random_state, random_state + 1, ...`` and the one that best keeps each neuron's 10
nearest neighbours (:func:`trustworthiness` at ``SELECTION_NEIGHBORS``, the scale the
map is judged at in ``benchmarks/bench_alignment.py``) is kept, as ``KMeans(n_init=...)``
keeps its best run.

Serialise with :meth:`StableLayout.state` / :meth:`StableLayout.from_state` (what
``spaces.io`` stores inside a space file).

How ``transform`` places a vector (default ``refine=False``): it runs UMAP's own
out-of-sample optimisation (``umap.UMAP.transform``) for that vector alone, against
the fixed fitted map:

1. its ``n_neighbors`` nearest reference vectors (exact distances, ties by index);
2. UMAP's transform memberships ``w_j = exp(-d_j / sigma)`` with ``sigma`` such that
   ``sum_{j >= 2} w_j = log2(n_neighbors)`` (UMAP's ``smooth_knn_dist`` with
   ``local_connectivity - 1 = 0``);
3. start at the membership-weighted mean of the neighbours' fitted positions;
4. ``n_epochs`` (150; UMAP's transform runs 100) epochs of UMAP's edge-sampled SGD on the
   fuzzy cross-entropy: attraction to each neighbour ``n_epochs * w_j`` times,
   ``negative_sample_rate`` repulsions from uniformly drawn reference positions per
   attraction, the learning rate ``1/4`` decaying linearly, gradients clipped at 4 -
   UMAP's ``optimize_layout_euclidean`` with ``move_other=False``;
5. the same SGD again from the fitted positions of the ``n_starts`` (2) nearest
   neighbours, and the run that ends with the lowest *expected* loss is kept: the
   attraction ``-sum_j w_j log q_j`` plus the repulsion the sampling applies on
   average, ``negative_sample_rate * sum_j w_j`` times the mean of ``-log(1 - q_r)``
   over every ``R // 256``-th reference position (``q`` UMAP's low-dimensional
   similarity).

Why several starts: a vector whose neighbours lie in two clusters starts between them
(the weighted mean), and one SGD run from there settles wherever its first random
negatives push it; the loss it is meant to minimise tells the runs apart.  Measured on
the demo's logs (median over the 43 transformed steps of trustworthiness@10, the
logged float16 vectors placed afresh; training seeds 0/1/2): one run of 200 epochs
0.813/0.798/0.771; three runs of 100 epochs 0.819/0.813/0.777, of 150 epochs
0.824/0.820/0.778 (the default); four runs of 100 epochs 0.822/0.817/0.784; beside
``umap.transform`` of the same map 0.817/0.813/0.774 (median over its transform seeds
42-46, which alone move it by up to 0.007).  Three runs of 150 epochs cost 2.25 times
one of 100 (0.8 s for 4,224 neurons on 2 cores, ``benchmarks/bench_alignment.py``).
Running every start for a quarter of the epochs and finishing only the best kept
little of the gain.

Besides the extra starts (which only choose among optima of UMAP's own loss), what
differs from ``umap.transform`` is only what made its result depend on the other
rows of the call: UMAP divides the weights by their maximum over the *batch* (edge
threshold and sampling rate) and picks 100 or 30 epochs from the batch size; here
the maximum is the fixed 1 (the weight of an exact match) and the epochs are fixed;
the negative samples come from a per-row random stream seeded by the row's content
(a splitmix64 hash of its float32 bits and ``transform_seed``), not from the row's
position.  So a row's position is a function of that row alone (one at a time ==
batched, bit for bit; the same vector at two steps lands at the same place), and
a row identical to a reference vector gets exactly that vector's fitted position
(UMAP's own rule for a membership of 1) - the base model sits exactly on the fitted
map.  Distances, memberships and the SGD run per row in one compiled numba kernel
(float64, parallel over rows, cached on disk); the BLAS product only preselects
``n_neighbors + 16`` candidates per row, whose distances are then recomputed
exactly, so the neighbour set does not depend on how BLAS blocks the batch.
``n_starts=0`` is one run from UMAP's start; ``n_epochs=0`` gives the initial
weighted mean only (the former default: a convex combination of base positions, which
shrinks the map and pulls new concepts into existing clusters).  ``refine=True`` runs
``umap.UMAP.transform`` itself (rows then depend on each other; the UMAP object
is pickled into the file).
"""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Dict, Optional, Tuple

import numpy as np

#: smallest reference set UMAP can lay out meaningfully
MIN_REFERENCE = 4
#: SGD epochs of each run of the per-row transform (UMAP's transform runs 100; see the
#: module docstring for what runs of 100, 150 and 200 epochs kept)
TRANSFORM_EPOCHS = 150
#: UMAP fit epochs as a multiple of UMAP's own default (500 up to 10,000 vectors, 200
#: beyond) when ``fit_epochs=None`` (see the module docstring for the measurements)
FIT_EPOCHS_FACTOR = 4
#: extra starts of the per-row transform (the nearest neighbours' positions, besides
#: UMAP's weighted-mean start); the run that ends with the lowest expected loss is kept
TRANSFORM_STARTS = 2
#: about this many reference positions (every ``R // LOSS_REFERENCES``-th) estimate the
#: repulsive part of the loss that picks a start
LOSS_REFERENCES = 256
#: neighbourhood size of the score that picks the best of ``n_init`` fits
SELECTION_NEIGHBORS = 10
#: UMAP's defaults for the rest of the transform optimisation (``umap.UMAP``:
#: learning_rate, repulsion_strength, negative_sample_rate)
LEARNING_RATE = 1.0
REPULSION_STRENGTH = 1.0
NEGATIVE_SAMPLE_RATE = 5
#: extra BLAS-preselected candidates per row beyond n_neighbors (their distances are
#: recomputed exactly, so rounding in the blocked product cannot change the neighbours
#: unless more than this many reference vectors tie at rounding level)
CANDIDATE_MARGIN = 16


class StableLayout:
    """UMAP fitted once on reference vectors, then ``transform`` for everything else.

    Args:
        n_neighbors: UMAP neighbourhood size; clipped to ``n_reference - 1`` for small
            reference sets (e.g. 30 concept vectors).
        min_dist: UMAP ``min_dist``.
        metric: distance in the input space (``"euclidean"`` or ``"cosine"``...).
        random_state: seed of the fit; also makes UMAP single-threaded and hence
            deterministic.
        transform_seed: mixed into every row's negative-sampling seed in ``transform``.
        refine: False (default) = per-row UMAP transform optimisation (see above);
            True = ``umap.UMAP.transform`` itself.
        n_init: UMAP fits from consecutive seeds; the one with the highest
            :func:`trustworthiness` is kept (1: UMAP's single fit).
        n_epochs: SGD epochs of each run of the per-row transform (``TRANSFORM_EPOCHS``,
            150; UMAP's transform runs 100); 0 = the membership-weighted mean of the
            neighbours' positions only.
        n_starts: extra runs of the transform from the nearest neighbours' positions
            (``TRANSFORM_STARTS``); the lowest expected loss is kept; 0 = one run
            from UMAP's start.
        fit_epochs: SGD epochs of each UMAP fit; None = ``FIT_EPOCHS_FACTOR`` times
            UMAP's default (2,000 up to 10,000 reference vectors, 800 beyond).

    Attributes (after ``fit``):
        umap_: the fitted ``umap.UMAP``.
        reference_vectors_: float32 ``[R, d]`` the distinct finite reference vectors.
        reference_layout_: float32 ``[R, 2]`` their fitted positions.
        curve_: ``(a, b)`` of UMAP's low-dimensional similarity ``1 / (1 + a d^(2b))``.
        trustworthiness_: the kept fit's :func:`trustworthiness` (NaN when ``n_init=1``).
        n_features_in_: input dimensionality.
    """

    def __init__(
        self,
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        metric: str = "euclidean",
        random_state: int = 0,
        transform_seed: int = 42,
        refine: bool = False,
        n_epochs: int = TRANSFORM_EPOCHS,
        n_init: int = 3,
        fit_epochs: Optional[int] = None,
        n_starts: int = TRANSFORM_STARTS,
    ):
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.metric = metric
        self.random_state = random_state
        self.transform_seed = transform_seed
        self.refine = refine
        self.n_epochs = n_epochs
        self.n_init = n_init
        self.fit_epochs = fit_epochs
        self.n_starts = n_starts

    # ------------------------------------------------------------------ fitting
    def fit(self, reference_vectors) -> "StableLayout":
        """Fit UMAP on the distinct finite rows of ``reference_vectors`` ``[R, d]`` (NaN
        rows are ignored, repeated rows kept once).  Needs at least 4 distinct rows."""
        reference = as_matrix(reference_vectors, "reference_vectors")
        finite = np.isfinite(reference).all(axis=1)
        reference = reference[finite]
        # Identical vectors must share one position (transform places a vector by its
        # content): UMAP is fitted on the distinct rows, in order of first occurrence.
        _, first = np.unique(reference, axis=0, return_index=True)
        reference = reference[np.sort(first)]
        n = reference.shape[0]
        if n < MIN_REFERENCE:
            raise ValueError(
                f"StableLayout.fit needs at least {MIN_REFERENCE} distinct finite reference vectors, "
                f"got {n}; fit on more neurons/concepts"
            )
        import umap  # heavy import (numba): only when fitting

        from .._compiled import torch_threads_kept

        cache_umap_on_disk()

        n_neighbors = int(max(2, min(self.n_neighbors, n - 1)))
        if not 1 <= int(self.n_init) <= 100:
            raise ValueError(f"n_init must be in [1, 100], got {self.n_init!r}")
        fit_epochs = self._fit_epochs(n)
        best = None
        for attempt in range(int(self.n_init)):
            model = umap.UMAP(
                n_components=2,
                n_neighbors=n_neighbors,
                min_dist=self.min_dist,
                metric=self.metric,
                random_state=int(self.random_state) + attempt,
                transform_seed=self.transform_seed,
                n_epochs=fit_epochs,
                # spectral initialisation fails on tiny or disconnected graphs
                init="spectral" if n > 3 * n_neighbors else "random",
            )
            with warnings.catch_warnings(), torch_threads_kept():
                # "n_jobs overridden by setting random_state": expected, that is the point
                warnings.simplefilter("ignore", UserWarning)
                layout = model.fit_transform(reference)
            if not np.isfinite(layout).all():
                raise RuntimeError("UMAP produced non-finite positions for the reference set")
            # one fit needs no score; ties keep the earlier seed
            score_k = min(SELECTION_NEIGHBORS, (n - 1) // 2)
            score = trustworthiness(reference, layout, score_k) if self.n_init > 1 and score_k >= 1 else float("nan")
            if best is None or score > best[0]:  # NaN scores never replace the first fit
                best = (score, model, layout)
        self.trustworthiness_, model, layout = best
        self.umap_ = model
        self.reference_vectors_ = np.ascontiguousarray(reference)
        self.reference_layout_ = layout.astype(np.float32)
        self.n_features_in_ = reference.shape[1]
        self.n_neighbors_ = n_neighbors
        self.curve_ = (float(model._a), float(model._b))
        return self

    def _fit_epochs(self, n_reference: int) -> int:
        if self.fit_epochs is None:
            return FIT_EPOCHS_FACTOR * (500 if n_reference <= 10000 else 200)
        if not 1 <= int(self.fit_epochs) <= 100000:
            raise ValueError(f"fit_epochs must be None or in [1, 100000], got {self.fit_epochs!r}")
        return int(self.fit_epochs)

    # --------------------------------------------------------------- transform
    def transform(self, vectors) -> np.ndarray:
        """float32 ``[N, 2]`` positions of ``vectors`` ``[N, d]`` in the fitted map.

        Rows containing NaN/Inf come back as NaN rows (never the origin).  Identical
        input gives identical output."""
        self._check_fitted()
        matrix = as_matrix(vectors, "vectors")
        if matrix.shape[1] != self.n_features_in_:
            raise ValueError(
                f"vectors have {matrix.shape[1]} dimensions but the layout was fitted on "
                f"{self.n_features_in_}"
            )
        out = np.full((matrix.shape[0], 2), np.nan, dtype=np.float32)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.any():
            return out
        rows = np.ascontiguousarray(matrix[finite])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if self.refine:
                if self.umap_ is None:
                    raise RuntimeError("refine=True needs the fitted UMAP model, which this layout lacks")
                from .._compiled import torch_threads_kept

                with torch_threads_kept():
                    placed = self.umap_.transform(rows)
            else:
                placed = self._optimised_positions(rows)
        out[finite] = placed
        return out

    def _optimised_positions(self, rows: np.ndarray) -> np.ndarray:
        """UMAP's transform optimisation, row by row (see the module docstring)."""
        if not 0 <= int(self.n_epochs) <= 10000:
            raise ValueError(f"n_epochs must be in [0, 10000], got {self.n_epochs!r}")
        if not 0 <= int(self.n_starts) <= 64:
            raise ValueError(f"n_starts must be in [0, 64], got {self.n_starts!r}")
        from ._layout_kernels import place_rows, row_seeds

        k = self.n_neighbors_
        n_candidates = min(self.reference_layout_.shape[0], k + CANDIDATE_MARGIN)
        candidates, given = self._candidates(rows, n_candidates)
        a, b = self._curve()
        return place_rows(
            np.ascontiguousarray(rows, dtype=np.float64),
            np.ascontiguousarray(candidates, dtype=np.int64),
            np.ascontiguousarray(given, dtype=np.float64),
            {"euclidean": 0, "cosine": 1}.get(self.metric, 2),
            self._reference64(),
            np.ascontiguousarray(self.reference_layout_, dtype=np.float64),
            row_seeds(rows, self.transform_seed),
            k, int(self.n_epochs), a, b, REPULSION_STRENGTH, LEARNING_RATE / 4.0, NEGATIVE_SAMPLE_RATE,
            int(self.n_starts), max(1, self.reference_layout_.shape[0] // LOSS_REFERENCES),
        ).astype(np.float32)

    def _reference64(self) -> np.ndarray:
        cached = getattr(self, "_reference64_cache", None)
        if cached is None:
            cached = self._reference64_cache = np.ascontiguousarray(self.reference_vectors_, dtype=np.float64)
        return cached

    def _candidate_index(self):
        """``(reference^T float32 [d, R], offsets [R])`` for the candidate search:
        euclidean ``|r|^2``, cosine unit vectors and zero offsets."""
        cached = getattr(self, "_candidate_cache", None)
        if cached is None:
            reference = self._reference64()
            if self.metric == "cosine":
                reference = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
                offsets = np.zeros(reference.shape[0], dtype=np.float32)
            else:
                offsets = (reference ** 2).sum(axis=1).astype(np.float32)
            cached = self._candidate_cache = (np.ascontiguousarray(reference.T, dtype=np.float32), offsets)
        return cached

    def _curve(self) -> Tuple[float, float]:
        """UMAP's ``(a, b)`` for ``min_dist`` (recomputed for layouts stored without it)."""
        if getattr(self, "curve_", None) is None:
            from umap.umap_ import find_ab_params

            a, b = find_ab_params(1.0, float(self.min_dist))
            self.curve_ = (float(a), float(b))
        return self.curve_

    def _candidates(self, rows: np.ndarray, n_candidates: int):
        """``(indices [n, c], distances [n, c])``: a superset of each row's nearest
        reference vectors.  Euclidean/cosine: by one BLAS product per chunk (the kernel
        recomputes their distances exactly, so only membership in the candidate set
        comes from BLAS; distances returned as zeros); other metrics: scikit-learn's
        neighbours and distances, used as given."""
        from ._layout_kernels import smallest_columns

        reference = self._reference64()
        queries = rows.astype(np.float64)
        if self.metric not in ("euclidean", "cosine"):
            from sklearn.neighbors import NearestNeighbors

            if getattr(self, "_neighbors_index", None) is None:
                self._neighbors_index = NearestNeighbors(
                    n_neighbors=n_candidates, metric=self.metric, algorithm="brute"
                ).fit(reference)
            dists, indices = self._neighbors_index.kneighbors(queries, n_neighbors=n_candidates)
            return indices, dists
        # float32 product in row chunks into one reused buffer: only the candidate
        # set comes from it, and large float64 temporaries cost more than the product
        transposed, offsets = self._candidate_index()
        queries = queries.astype(np.float32)
        if self.metric == "cosine":
            queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        indices = np.empty((queries.shape[0], n_candidates), dtype=np.int64)
        if n_candidates >= transposed.shape[1]:
            indices[:] = np.arange(n_candidates)[None]
            return indices, np.zeros(indices.shape)
        buffer = np.empty((min(512, queries.shape[0]), transposed.shape[1]), dtype=np.float32)
        for start in range(0, queries.shape[0], 512):
            chunk = queries[start:start + 512]
            products = buffer[:chunk.shape[0]]
            np.matmul(chunk, transposed, out=products)
            indices[start:start + chunk.shape[0]] = smallest_columns(products, offsets, n_candidates)
        return indices, np.zeros(indices.shape)

    # ---------------------------------------------------------- serialisation
    def state(self) -> Tuple[Dict, Dict[str, np.ndarray]]:
        """``(header, arrays)`` for storage: JSON-able parameters, the reference vectors
        and their fitted positions.  Only with ``refine=True`` is the UMAP model itself
        needed; it is then pickled into a uint8 array (unpickling runs code: only load
        trusted files)."""
        self._check_fitted()
        import umap

        header = {
            "params": self.get_params(),
            "n_features_in": int(self.n_features_in_),
            "n_neighbors_fitted": int(self.n_neighbors_),
            "curve": [float(v) for v in self._curve()],
            "umap_version": getattr(umap, "__version__", "unknown"),
        }
        arrays = {
            "reference_vectors": self.reference_vectors_,
            "reference_layout": self.reference_layout_,
        }
        if self.refine:
            buffer = io.BytesIO()
            pickle.dump(self.umap_, buffer, protocol=pickle.HIGHEST_PROTOCOL)
            arrays["umap_pickle"] = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
        return header, arrays

    @classmethod
    def from_state(cls, header: Dict, arrays: Dict[str, np.ndarray]) -> "StableLayout":
        """Inverse of :meth:`state`; ValueError if the stored layout cannot be restored."""
        try:
            # layouts stored before the extra starts keep their one run from UMAP's start
            # (only the draw of its negatives has changed since)
            layout = cls(**{"n_starts": 0, **header["params"]})
            layout.reference_vectors_ = np.ascontiguousarray(arrays["reference_vectors"], dtype=np.float32)
            layout.reference_layout_ = np.asarray(arrays["reference_layout"], dtype=np.float32)
            layout.n_features_in_ = int(header["n_features_in"])
            layout.n_neighbors_ = int(header["n_neighbors_fitted"])
            # layouts stored before the per-row optimisation lack the curve: recomputed
            curve = header.get("curve")
            layout.curve_ = (float(curve[0]), float(curve[1])) if curve is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"stored layout is incomplete or malformed ({exc!r})") from None
        if (
            layout.reference_vectors_.ndim != 2
            or layout.reference_vectors_.shape != (layout.reference_layout_.shape[0], layout.n_features_in_)
            or layout.reference_layout_.shape[1:] != (2,)
        ):
            raise ValueError("stored layout has inconsistent array shapes")
        layout.umap_ = None
        if layout.refine:
            if "umap_pickle" not in arrays:
                raise ValueError("stored layout (refine=True) lacks its UMAP model")
            try:
                layout.umap_ = pickle.loads(arrays["umap_pickle"].tobytes())
            except Exception as exc:  # any unpickling failure means the same thing to the user
                import umap

                raise ValueError(
                    "could not restore the stored UMAP model (saved with umap-learn "
                    f"{header.get('umap_version', '?')}, installed {getattr(umap, '__version__', '?')}): "
                    f"{exc!r}; refit the space with the installed versions, or use refine=False"
                ) from None
        return layout

    def get_params(self) -> Dict:
        return {
            "n_neighbors": int(self.n_neighbors),
            "min_dist": float(self.min_dist),
            "metric": str(self.metric),
            "random_state": int(self.random_state),
            "transform_seed": int(self.transform_seed),
            "refine": bool(self.refine),
            "n_epochs": int(self.n_epochs),
            "n_init": int(self.n_init),
            "fit_epochs": None if self.fit_epochs is None else int(self.fit_epochs),
            "n_starts": int(self.n_starts),
        }

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_neighbors_index", None)  # caches, rebuilt on demand
        state.pop("_reference64_cache", None)
        state.pop("_candidate_cache", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _check_fitted(self) -> None:
        if not hasattr(self, "reference_layout_"):
            raise RuntimeError("StableLayout is not fitted; call fit(reference_vectors) first")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"StableLayout({params})"


def cache_umap_on_disk() -> int:
    """Turn on numba's disk cache for umap-learn's compiled functions (umap compiles
    them without ``cache=True``, which cost most of the first fit in every process:
    measured 60 s -> 22 s for import + first fit of 1,000 points on a busy 2-core
    machine, see ``benchmarks/bench_space.py --cold``).  Nothing is compiled here:
    each function is compiled (or loaded from the cache) when UMAP first uses it.
    Only changes where compiled code is kept; returns how many functions it enabled."""
    import numba

    enabled = 0
    try:
        import umap.distances
        import umap.layouts
        import umap.sparse
        import umap.spectral
        import umap.umap_
        import umap.utils

        modules = (umap.umap_, umap.layouts, umap.utils, umap.spectral, umap.distances, umap.sparse)
        for module in modules:
            for value in vars(module).values():
                if isinstance(value, numba.core.registry.CPUDispatcher) and \
                        type(getattr(value, "_cache", None)).__name__ == "NullCache":
                    value.enable_caching()
                    enabled += 1
    except Exception:  # an optimisation only: never let it break a fit
        pass
    return enabled


def trustworthiness(vectors, layout, n_neighbors: int = 10, queries: int = 2000, chunk: int = 256) -> float:
    """How well ``layout`` ``[n, 2]`` keeps the neighbours of ``vectors`` ``[n, d]``
    (Venna and Kaski's trustworthiness, as ``sklearn.manifold.trustworthiness``: 1 when
    each point's ``n_neighbors`` nearest in the layout are its nearest in the vectors).

    Exact over at most ``queries`` points (evenly spaced rows; all rows when there are
    fewer), each ranked against all ``n`` points in chunks of ``chunk`` rows: time
    O(queries x n log n), memory O(chunk x n), never O(n^2).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 5))
    >>> trustworthiness(x, x[:, :2], 5) < trustworthiness(x, x, 5) == 1.0
    True
    """
    high = as_matrix(vectors, "vectors", np.float64)
    low = as_matrix(layout, "layout", np.float64)
    n = high.shape[0]
    k = int(n_neighbors)
    if low.shape[0] != n or not 1 <= k < n / 2:
        raise ValueError(f"trustworthiness needs as many layout rows as vectors ({low.shape[0]} vs {n}) "
                         f"and 1 <= n_neighbors < n/2 (got {k})")
    rows = np.unique(np.linspace(0, n - 1, min(n, int(queries))).round().astype(np.int64))
    squared_high, squared_low = (high ** 2).sum(1), (low ** 2).sum(1)
    penalty = 0.0
    for start in range(0, rows.size, chunk):
        q = rows[start:start + chunk]
        own = (np.arange(q.size), q)
        d_high = squared_high[q, None] - 2.0 * high[q] @ high.T + squared_high[None, :]
        d_low = squared_low[q, None] - 2.0 * low[q] @ low.T + squared_low[None, :]
        d_high[own] = -np.inf  # each point is its own rank 0, as in scikit-learn
        d_low[own] = -np.inf
        ranks = np.empty(d_high.shape, dtype=np.int64)
        np.put_along_axis(ranks, np.argsort(d_high, axis=1, kind="stable"), np.arange(n)[None, :], axis=1)
        nearest_low = np.argsort(d_low, axis=1, kind="stable")[:, 1:k + 1]
        penalty += float(np.maximum(np.take_along_axis(ranks, nearest_low, axis=1) - k, 0).sum())
    return 1.0 - penalty * 2.0 / (rows.size * k * (2.0 * n - 3.0 * k - 1.0))


def as_matrix(values, what: str, dtype=np.float32) -> np.ndarray:
    """``values`` as a 2-D numeric array, or a clear error naming ``what``."""
    try:
        matrix = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a numeric [N, d] array ({exc})") from None
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [N, d] array, got shape {matrix.shape}")
    return matrix
