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
    >>> np.isnan(layout.transform(np.full((2, 8), np.nan))).all()  # NaN rows stay NaN
    True

Serialise with :meth:`StableLayout.state` / :meth:`StableLayout.from_state` (what
``spaces.io`` stores inside a space file).

How ``transform`` places a vector (default ``refine=False``): at the
membership-weighted mean of the fitted positions of its ``n_neighbors`` nearest
reference vectors, with UMAP's own out-of-sample weights ``exp(-d / sigma)`` (this is
the initialisation step of UMAP's ``transform``).  It depends on that vector alone
(not on the other rows of the call), is exactly deterministic, takes a few
milliseconds per thousand rows, and needs no pickled UMAP model (only the reference
vectors and their positions are stored).  ``refine=True`` runs UMAP's full
``transform`` instead (a further 100 epochs of negative-sampling SGD against the fixed
map): deterministic for identical input (fixed ``transform_seed``, single-threaded),
but a point then depends slightly on the other rows of the call (shared random
stream, batch-relative edge threshold: up to ~0.5 map units measured), it takes
seconds for 4,000 rows, and the UMAP object is pickled into the file.
"""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Dict, Tuple

import numpy as np

#: smallest reference set UMAP can lay out meaningfully
MIN_REFERENCE = 4


class StableLayout:
    """UMAP fitted once on reference vectors, then ``transform`` for everything else.

    Args:
        n_neighbors: UMAP neighbourhood size; clipped to ``n_reference - 1`` for small
            reference sets (e.g. 30 concept vectors).
        min_dist: UMAP ``min_dist``.
        metric: distance in the input space (``"euclidean"`` or ``"cosine"``...).
        random_state: seed of the fit; also makes UMAP single-threaded and hence
            deterministic.
        transform_seed: seed of the negative sampling in ``transform``.
        refine: False (default) = per-point placement from the reference neighbours
            (see above); True = UMAP's full ``transform``.

    Attributes (after ``fit``):
        umap_: the fitted ``umap.UMAP``.
        reference_layout_: float32 ``[R, 2]`` positions of the reference vectors.
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
    ):
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.metric = metric
        self.random_state = random_state
        self.transform_seed = transform_seed
        self.refine = refine

    # ------------------------------------------------------------------ fitting
    def fit(self, reference_vectors) -> "StableLayout":
        """Fit UMAP on the finite rows of ``reference_vectors`` ``[R, d]`` (NaN rows are
        ignored).  Needs at least 4 finite rows."""
        reference = as_matrix(reference_vectors, "reference_vectors")
        finite = np.isfinite(reference).all(axis=1)
        reference = reference[finite]
        n = reference.shape[0]
        if n < MIN_REFERENCE:
            raise ValueError(
                f"StableLayout.fit needs at least {MIN_REFERENCE} finite reference vectors, "
                f"got {n}; fit on more neurons/concepts"
            )
        import umap  # heavy import (numba): only when fitting

        n_neighbors = int(max(2, min(self.n_neighbors, n - 1)))
        model = umap.UMAP(
            n_components=2,
            n_neighbors=n_neighbors,
            min_dist=self.min_dist,
            metric=self.metric,
            random_state=self.random_state,
            transform_seed=self.transform_seed,
            # spectral initialisation fails on tiny or disconnected graphs
            init="spectral" if n > 3 * n_neighbors else "random",
        )
        with warnings.catch_warnings():
            # "n_jobs overridden by setting random_state": expected, that is the point
            warnings.simplefilter("ignore", UserWarning)
            layout = model.fit_transform(reference)
        if not np.isfinite(layout).all():
            raise RuntimeError("UMAP produced non-finite positions for the reference set")
        self.umap_ = model
        self.reference_vectors_ = np.ascontiguousarray(reference)
        self.reference_layout_ = layout.astype(np.float32)
        self.n_features_in_ = reference.shape[1]
        self.n_neighbors_ = n_neighbors
        return self

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
                placed = self.umap_.transform(rows)
            else:
                placed = self._initial_positions(rows)
        out[finite] = placed
        return out

    def _initial_positions(self, rows: np.ndarray) -> np.ndarray:
        """Membership-weighted mean of the reference neighbours' positions, per row
        (UMAP's out-of-sample initialisation; independent of the other rows).

        Weights follow UMAP's transform: ``exp(-d_j / sigma)`` over the
        ``n_neighbors`` nearest reference vectors, ``sigma`` found by bisection so
        that the weights sum to ``log2(n_neighbors)``."""
        dists, indices = self._neighbors(rows)
        weights = membership_weights(dists, float(np.log2(self.n_neighbors_)))
        positions = np.einsum("nk,nkc->nc", weights, self.reference_layout_[indices].astype(np.float64))
        return positions.astype(np.float32)

    def _neighbors(self, rows: np.ndarray):
        """``(distances, indices)`` ``[n, n_neighbors]`` of the nearest reference vectors.

        Euclidean and cosine: exact brute force with one BLAS product per chunk of
        rows (no per-call thread-pool start-up, which dominated for small layers);
        other metrics: scikit-learn."""
        reference = self.reference_vectors_.astype(np.float64)
        queries = rows.astype(np.float64)
        if self.metric not in ("euclidean", "cosine"):
            from sklearn.neighbors import NearestNeighbors

            if getattr(self, "_neighbors_index", None) is None:
                self._neighbors_index = NearestNeighbors(
                    n_neighbors=self.n_neighbors_, metric=self.metric, algorithm="brute"
                ).fit(reference)
            return self._neighbors_index.kneighbors(queries)
        if self.metric == "cosine":
            reference = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
            queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        k = self.n_neighbors_
        reference_sq = (reference ** 2).sum(axis=1)
        dists = np.empty((queries.shape[0], k))
        indices = np.empty((queries.shape[0], k), dtype=np.int64)
        for start in range(0, queries.shape[0], 2048):  # bounds memory to 2048 x R
            chunk = queries[start:start + 2048]
            squared = (chunk ** 2).sum(axis=1)[:, None] + reference_sq[None] - 2.0 * chunk @ reference.T
            nearest = np.argpartition(squared, k - 1, axis=1)[:, :k]
            part = np.take_along_axis(squared, nearest, axis=1)
            order = np.lexsort((nearest, part), axis=1)  # by distance, ties by index: deterministic
            indices[start:start + chunk.shape[0]] = np.take_along_axis(nearest, order, axis=1)
            dists[start:start + chunk.shape[0]] = np.sqrt(np.maximum(np.take_along_axis(part, order, axis=1), 0.0))
        if self.metric == "cosine":
            dists = dists ** 2 / 2.0  # 1 - cos for unit vectors
        return dists, indices

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
            layout = cls(**header["params"])
            layout.reference_vectors_ = np.ascontiguousarray(arrays["reference_vectors"], dtype=np.float32)
            layout.reference_layout_ = np.asarray(arrays["reference_layout"], dtype=np.float32)
            layout.n_features_in_ = int(header["n_features_in"])
            layout.n_neighbors_ = int(header["n_neighbors_fitted"])
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
        }

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_neighbors_index", None)  # cache, rebuilt on demand
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _check_fitted(self) -> None:
        if not hasattr(self, "reference_layout_"):
            raise RuntimeError("StableLayout is not fitted; call fit(reference_vectors) first")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"StableLayout({params})"


def membership_weights(dists: np.ndarray, target: float, iterations: int = 64) -> np.ndarray:
    """Row-normalised UMAP membership weights ``exp(-d / sigma)`` of ``[n, k]`` neighbour
    distances, ``sigma`` per row found by vectorised bisection so that the raw weights
    sum to ``target`` (UMAP: ``log2(k)``)."""
    dists = np.asarray(dists, dtype=np.float64)
    low = np.zeros(dists.shape[0])
    high = np.full(dists.shape[0], np.inf)
    sigma = np.ones(dists.shape[0])
    for _ in range(iterations):
        total = np.exp(-dists / sigma[:, None]).sum(axis=1)
        too_wide = total > target
        high = np.where(too_wide, sigma, high)
        low = np.where(too_wide, low, sigma)
        sigma = np.where(np.isinf(high), sigma * 2.0, (low + high) / 2.0)
    # UMAP's floor on the bandwidth, relative to the mean neighbour distance
    sigma = np.maximum(sigma, 1e-3 * dists.mean(axis=1) + 1e-12)
    weights = np.exp(-dists / sigma[:, None])
    return weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)


def as_matrix(values, what: str, dtype=np.float32) -> np.ndarray:
    """``values`` as a 2-D numeric array, or a clear error naming ``what``."""
    try:
        matrix = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a numeric [N, d] array ({exc})") from None
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [N, d] array, got shape {matrix.shape}")
    return matrix
