"""StableLayout.transform: UMAP's transform optimisation, row by row.

Exact comparisons are made only where the computation is per row by construction (the
kernel computes everything a row depends on inside that row's loop iteration); the
closeness to ``umap.transform`` is checked with margins relative to the map width.
"""

import numpy as np
import pytest

from tb_conceptevo.spaces.layout import StableLayout


def _clusters(seed, n_clusters=6, per_cluster=40, dim=8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim)) * 6.0
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    return (centers[labels] + rng.normal(size=(labels.size, dim))).astype(np.float32), centers, labels


@pytest.fixture(scope="module")
def fitted():
    reference, centers, labels = _clusters(0)
    layout = StableLayout(random_state=0).fit(reference)
    rng = np.random.default_rng(1)
    moved = (reference + 0.5 * rng.normal(size=reference.shape)).astype(np.float32)
    return layout, reference, moved, centers, labels


def test_rows_are_placed_independently_bit_for_bit(fitted):
    layout, reference, moved, _, _ = fitted
    batch = layout.transform(moved)
    one_by_one = np.concatenate([layout.transform(moved[i:i + 1]) for i in range(moved.shape[0])])
    np.testing.assert_array_equal(one_by_one, batch)
    order = np.random.default_rng(2).permutation(moved.shape[0])
    np.testing.assert_array_equal(layout.transform(moved[order]), batch[order])
    # other rows in the same call (reference rows, NaN rows, duplicates) change nothing
    mixed = np.concatenate([reference[:50], moved[:20], np.full((3, moved.shape[1]), np.nan), moved[:20]])
    placed = layout.transform(mixed)
    np.testing.assert_array_equal(placed[50:70], batch[:20])
    np.testing.assert_array_equal(placed[73:], batch[:20])
    assert np.isnan(placed[70:73]).all()


def test_deterministic_and_restored_from_state(fitted):
    layout, _, moved, _, _ = fitted
    first = layout.transform(moved)
    np.testing.assert_array_equal(layout.transform(moved), first)
    restored = StableLayout.from_state(*layout.state())
    np.testing.assert_array_equal(restored.transform(moved), first)
    # a layout stored before the per-row optimisation (no curve, no n_epochs, no
    # n_starts) still loads, and keeps one run from UMAP's start
    header, arrays = layout.state()
    header = {**header, "params": {k: v for k, v in header["params"].items() if k not in ("n_epochs", "n_starts")}}
    header.pop("curve")
    old = StableLayout.from_state(header, arrays)
    assert old.n_starts == 0
    single = StableLayout.from_state(*layout.state())
    single.n_starts = 0
    np.testing.assert_allclose(old.transform(moved), single.transform(moved), rtol=0, atol=1e-3 * _width(layout))


def test_reference_vectors_sit_at_their_fitted_positions(fitted):
    layout, reference, _, _, _ = fitted
    np.testing.assert_array_equal(layout.transform(reference), layout.reference_layout_)
    np.testing.assert_array_equal(layout.transform(reference[::-1]), layout.reference_layout_[::-1])


def test_repeated_reference_vectors_share_one_position():
    reference, _, _ = _clusters(3, per_cluster=20)
    with_repeats = np.concatenate([reference, reference[:7]])
    layout = StableLayout(random_state=0).fit(with_repeats)
    assert layout.reference_vectors_.shape[0] == reference.shape[0]
    placed = layout.transform(with_repeats)
    np.testing.assert_array_equal(placed[-7:], placed[:7])
    np.testing.assert_array_equal(placed[:reference.shape[0]], layout.reference_layout_)


def test_unchanged_vector_does_not_move(fitted):
    layout, reference, moved, _, _ = fitted
    rng = np.random.default_rng(4)
    step_a = moved.copy()
    step_b = (moved + rng.normal(size=moved.shape)).astype(np.float32)
    unchanged = rng.random(moved.shape[0]) < 0.3
    step_b[unchanged] = step_a[unchanged]
    a, b = layout.transform(step_a), layout.transform(step_b)
    np.testing.assert_array_equal(a[unchanged], b[unchanged])
    assert (np.abs(a[~unchanged] - b[~unchanged]).max(axis=1) > 0).all()


@pytest.mark.parametrize("seed", [0, 5, 9])
def test_close_to_umap_transform_and_not_shrunk(seed):
    reference, centers, labels = _clusters(seed)
    layout = StableLayout(random_state=seed).fit(reference)
    rng = np.random.default_rng(seed + 100)
    queries = (reference + 0.7 * rng.normal(size=reference.shape)).astype(np.float32)
    ours = layout.transform(queries)
    theirs = layout.umap_.transform(queries)
    mean_only = StableLayout.from_state(*layout.state())
    mean_only.n_epochs = 0
    initial = mean_only.transform(queries)
    width = _width(layout)
    ours_gap = np.linalg.norm(ours - theirs, axis=1).mean()
    initial_gap = np.linalg.norm(initial - theirs, axis=1).mean()
    # same optimisation, other random negatives: a small fraction of the width, and
    # closer to UMAP than the starting point (the weighted mean) is
    assert ours_gap < 0.05 * width
    assert ours_gap < initial_gap
    # each point stays with its cluster: its nearest fitted position is of its label
    nearest = ((ours[:, None] - layout.reference_layout_[None]) ** 2).sum(-1).argmin(1)
    assert (labels[nearest] == labels).mean() > 0.95


def test_weighted_mean_only_is_a_convex_combination(fitted):
    layout, _, moved, _, _ = fitted
    mean_only = StableLayout.from_state(*layout.state())
    mean_only.n_epochs = 0
    placed = mean_only.transform(moved).astype(np.float64)
    low, high = layout.reference_layout_.min(0), layout.reference_layout_.max(0)
    assert ((placed >= low - 1e-4) & (placed <= high + 1e-4)).all()


def test_bad_parameters_and_input(fitted):
    layout, reference, _, _, _ = fitted
    with pytest.raises(ValueError, match="dimensions"):
        layout.transform(np.zeros((2, 3)))
    broken = StableLayout.from_state(*layout.state())
    broken.n_epochs = -1
    with pytest.raises(ValueError, match="n_epochs"):
        broken.transform(reference[:2])
    with pytest.raises(ValueError, match="at least 4 distinct"):
        StableLayout().fit(np.repeat(reference[:1], 10, axis=0))
    assert layout.transform(np.zeros((0, reference.shape[1]))).shape == (0, 2)


def _width(layout):
    return float(np.ptp(layout.reference_layout_, axis=0).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trustworthiness_equals_scikit_learns(seed):
    from sklearn.manifold import trustworthiness as reference_trustworthiness

    from tb_conceptevo.spaces.layout import trustworthiness

    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(240, 12))
    layout = vectors[:, :2] + 0.5 * rng.normal(size=(240, 2))
    expected = reference_trustworthiness(vectors, layout, n_neighbors=10)
    # float64 on continuous random data: no tied distances, so the ranks agree exactly
    # and only the summation order differs
    assert trustworthiness(vectors, layout, 10) == pytest.approx(expected, abs=1e-12)
    # chunking does not change the result; a query subset estimates it
    assert trustworthiness(vectors, layout, 10, chunk=7) == pytest.approx(expected, abs=1e-12)
    assert trustworthiness(vectors, layout, 10, queries=120) == pytest.approx(expected, abs=0.05)
    assert trustworthiness(vectors, vectors, 10) == 1.0
    with pytest.raises(ValueError, match="n_neighbors"):
        trustworthiness(vectors, layout, 200)


def test_n_init_keeps_the_most_trustworthy_of_its_seeds():
    from tb_conceptevo.spaces.layout import SELECTION_NEIGHBORS, trustworthiness

    reference, _, _ = _clusters(3, n_clusters=8, per_cluster=25)
    best = StableLayout(random_state=5, n_init=3).fit(reference)
    singles = [StableLayout(random_state=5 + i, n_init=1).fit(reference) for i in range(3)]
    scores = [trustworthiness(reference, s.reference_layout_, SELECTION_NEIGHBORS) for s in singles]
    chosen = int(np.argmax(scores))
    # the kept fit is exactly the single fit from the best seed
    np.testing.assert_array_equal(best.reference_layout_, singles[chosen].reference_layout_)
    assert best.trustworthiness_ == max(scores)
    assert np.isnan(singles[0].trustworthiness_)
    assert best.get_params()["n_init"] == 3
    with pytest.raises(ValueError, match="n_init"):
        StableLayout(n_init=0).fit(reference)


def test_fit_epochs_default_is_four_times_umaps_and_is_stored():
    reference, _, _ = _clusters(4, n_clusters=4, per_cluster=10)
    auto = StableLayout(random_state=0, n_init=1).fit(reference)
    assert auto.umap_.n_epochs == 2000  # 4 x UMAP's 500 for small sets
    assert auto.get_params()["fit_epochs"] is None
    short = StableLayout(random_state=0, n_init=1, fit_epochs=50).fit(reference)
    assert short.umap_.n_epochs == 50
    restored = StableLayout.from_state(*short.state())
    assert restored.get_params() == short.get_params()
    # the fit is UMAP's: other epochs, another map
    assert not np.array_equal(auto.reference_layout_, short.reference_layout_)
    for bad in (0, -3, 10 ** 6):
        with pytest.raises(ValueError, match="fit_epochs"):
            StableLayout(fit_epochs=bad).fit(reference)


def _expected_losses(layout, rows, xy):
    """The loss the transform's starts are told apart by, from UMAP's own memberships
    (``smooth_knn_dist`` with local_connectivity 0, as ``umap.transform``)."""
    from umap.umap_ import smooth_knn_dist

    from tb_conceptevo.spaces.layout import LOSS_REFERENCES, NEGATIVE_SAMPLE_RATE

    reference = layout.reference_vectors_.astype(np.float64)
    fitted = layout.reference_layout_.astype(np.float64)
    k = layout.n_neighbors_
    distances = np.linalg.norm(rows.astype(np.float64)[:, None] - reference[None], axis=2)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    near = np.take_along_axis(distances, order, axis=1)
    sigmas, _ = smooth_knn_dist(near, float(k), local_connectivity=0.0)
    weights = np.exp(-near / sigmas[:, None])
    a, b = layout.curve_
    d2 = ((xy[:, None].astype(np.float64) - fitted[order]) ** 2).sum(-1)
    attraction = (weights * np.log1p(a * d2 ** b)).sum(1)
    probes = fitted[::max(1, fitted.shape[0] // LOSS_REFERENCES)]
    power = a * (((xy[:, None].astype(np.float64) - probes[None]) ** 2).sum(-1) + 0.001) ** b
    repulsion = (np.log1p(power) - np.log(power)).mean(1)
    return attraction + NEGATIVE_SAMPLE_RATE * weights.sum(1) * repulsion


def test_extra_starts_keep_the_run_with_the_lowest_expected_loss(fitted):
    layout, _, moved, _, _ = fitted
    single = StableLayout.from_state(*layout.state())
    single.n_starts = 0
    one, best = single.transform(moved), layout.transform(moved)
    loss_one, loss_best = _expected_losses(layout, moved, one), _expected_losses(layout, moved, best)
    # The UMAP-start run is one of the candidates: never worse, up to what this oracle
    # cannot resolve (float32 positions ~1e-7, the memberships' bisection tolerance
    # 1e-5, relative); where another start wins it is another optimum, typically
    # percents lower (median 1.2 % here)
    relative_gain = (loss_one - loss_best) / np.abs(loss_one)
    assert (relative_gain >= -1e-4).all()
    changed = np.abs(best - one).max(1) > 0
    assert changed.any() and not changed.all()
    assert np.median(relative_gain[changed]) > 1e-3
    with pytest.raises(ValueError, match="n_starts"):
        StableLayout(n_starts=-1).fit(moved).transform(moved[:1])
