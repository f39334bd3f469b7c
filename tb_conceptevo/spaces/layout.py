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

Determinism: UMAP's ``transform`` draws its negative samples from ``transform_seed``
(fixed here) and runs single-threaded once ``random_state`` is set, so identical input
gives identical output (checked in tests).  Two caveats of UMAP's own ``transform``:
(1) a point's position depends slightly on the other rows transformed in the same
call (shared random stream and a batch-relative edge threshold), and (2) transforming
exactly the training matrix returns the fitted embedding.  ``refine=False`` avoids
(1): each point is placed at the membership-weighted mean of its reference
neighbours' positions (UMAP's own transform initialisation), which depends on that
point alone and is much faster, at the price of less local spreading.
"""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Dict, Optional, Tuple

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
        refine: True = UMAP's full ``transform`` (initialisation + a few optimisation
            epochs against the fixed map); False = initialisation only (per-point,
            independent of the other rows, fast).

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
        refine: bool = True,
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
        reference = _as_matrix(reference_vectors, "reference_vectors")
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
        matrix = _as_matrix(vectors, "vectors")
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
                placed = self.umap_.transform(rows)
            else:
                placed = self._initial_positions(rows)
        out[finite] = placed
        return out

    def _initial_positions(self, rows: np.ndarray) -> np.ndarray:
        """Membership-weighted mean of the reference neighbours' positions, per row
        (UMAP's transform initialisation; independent of the other rows)."""
        from sklearn.neighbors import NearestNeighbors
        from umap.umap_ import smooth_knn_dist, compute_membership_strengths

        if not hasattr(self, "_neighbors_index"):
            self._neighbors_index = NearestNeighbors(
                n_neighbors=self.n_neighbors_, metric=self.metric
            ).fit(self.umap_._raw_data)
        dists, indices = self._neighbors_index.kneighbors(rows)
        dists = dists.astype(np.float32)
        # same bandwidth as UMAP's transform (local_connectivity - 1 neighbours at 0)
        sigmas, rhos = smooth_knn_dist(
            dists, float(self.n_neighbors_), local_connectivity=self.umap_.local_connectivity - 1
        )
        _, _, weights, _ = compute_membership_strengths(indices, dists, sigmas, rhos)
        weights = weights.reshape(indices.shape).astype(np.float64)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        positions = np.einsum("nk,nkc->nc", weights, self.reference_layout_[indices].astype(np.float64))
        return positions.astype(np.float32)

    # ---------------------------------------------------------- serialisation
    def state(self) -> Tuple[Dict, Dict[str, np.ndarray]]:
        """``(header, arrays)`` for storage: JSON-able parameters plus the pickled UMAP
        model as a uint8 array (loading it runs pickle: only load trusted files)."""
        self._check_fitted()
        import umap

        buffer = io.BytesIO()
        pickle.dump(self.umap_, buffer, protocol=pickle.HIGHEST_PROTOCOL)
        header = {
            "params": self.get_params(),
            "n_features_in": int(self.n_features_in_),
            "n_neighbors_fitted": int(self.n_neighbors_),
            "umap_version": getattr(umap, "__version__", "unknown"),
        }
        arrays = {
            "umap_pickle": np.frombuffer(buffer.getvalue(), dtype=np.uint8),
            "reference_layout": self.reference_layout_,
        }
        return header, arrays

    @classmethod
    def from_state(cls, header: Dict, arrays: Dict[str, np.ndarray]) -> "StableLayout":
        """Inverse of :meth:`state`; ValueError if the stored UMAP cannot be restored."""
        try:
            layout = cls(**header["params"])
            blob = arrays["umap_pickle"].tobytes()
            reference_layout = np.asarray(arrays["reference_layout"], dtype=np.float32)
            n_features = int(header["n_features_in"])
            n_neighbors = int(header["n_neighbors_fitted"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"stored layout is incomplete or malformed ({exc!r})") from None
        try:
            model = pickle.loads(blob)
        except Exception as exc:  # any unpickling failure means the same thing to the user
            import umap

            raise ValueError(
                "could not restore the stored UMAP layout (saved with umap-learn "
                f"{header.get('umap_version', '?')}, installed {getattr(umap, '__version__', '?')}): "
                f"{exc!r}; refit the space with the installed versions"
            ) from None
        layout.umap_ = model
        layout.reference_layout_ = reference_layout
        layout.n_features_in_ = n_features
        layout.n_neighbors_ = n_neighbors
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

    def _check_fitted(self) -> None:
        if not hasattr(self, "umap_"):
            raise RuntimeError("StableLayout is not fitted; call fit(reference_vectors) first")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"StableLayout({params})"


def _as_matrix(values, what: str) -> np.ndarray:
    try:
        matrix = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a numeric [N, d] array ({exc})") from None
    if matrix.ndim != 2:
        raise ValueError(f"{what} must be a 2-D [N, d] array, got shape {matrix.shape}")
    return matrix
