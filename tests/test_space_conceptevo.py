"""ConceptEvoSpace, StableLayout and the space file, checked against ground truth.

Ground truth: "models" whose channels are known detectors of concepts.  The space is
fitted on model A and a permuted, rescaled (and slightly noisy) copy B is embedded:
each B channel must land next to its A counterpart and among detectors of its own
concept.
"""

import os

import numpy as np
import pytest
import torch
from torch import nn

from tb_conceptevo.observation import LayerObservation, Observation
from tb_conceptevo.spaces import io as space_io
from tb_conceptevo.spaces.conceptevo import ConceptEvoSpace, cooccurrence_pairs, train_skipgram
from tb_conceptevo.spaces.layout import StableLayout

PROBE_HASH = "f" * 64
N_IMAGES = 1500
PER_CONCEPT = 8
N_NOISE = 20


# ----------------------------------------------------------------- synthetic world
def concept_intensity(n_images=N_IMAGES, categories=(6, 5, 4), seed=0):
    """[images, concepts]: every image has one concept per category (e.g. one colour,
    one shape, one texture) with an intensity in [0.3, 1], the others 0."""
    rng = np.random.default_rng(seed)
    intensity = np.zeros((n_images, sum(categories)))
    start = 0
    for size in categories:
        pick = rng.integers(0, size, n_images)
        intensity[np.arange(n_images), start + pick] = rng.uniform(0.3, 1.0, n_images)
        start += size
    return intensity


def detector_model(intensity, seed=1):
    """Responses [images, channels] of PER_CONCEPT detectors per concept (each with its
    own fixed preference among the images of its concept) plus N_NOISE noise channels;
    and the concept of every channel (-1 = noise)."""
    rng = np.random.default_rng(seed)
    concept = np.repeat(np.arange(intensity.shape[1]), PER_CONCEPT)
    preference = rng.uniform(0, 1, (intensity.shape[0], concept.size))
    present = intensity[:, concept] > 0
    responses = intensity[:, concept] + 0.3 * preference * present
    noise = rng.normal(size=(intensity.shape[0], N_NOISE))
    return np.concatenate([responses, noise], 1), np.concatenate([concept, -np.ones(N_NOISE, int)])


def observe(responses, layer="conv", k=10, probe_hash=PROBE_HASH, step=None):
    """Top-k observation of [images, channels] responses."""
    order = np.argsort(-responses, axis=0, kind="stable")[:k].T
    n = responses.shape[1]
    return LayerObservation(
        layer=layer, image_ids=order.astype(np.int32),
        activations=np.take_along_axis(responses.T, order, 1).astype(np.float32),
        positions=np.zeros(order.shape, np.int32), invalid=np.zeros(n, bool), map_size=(1, 1),
        input_size=(32, 32), probe_hash=probe_hash, step=step,
    )


@pytest.fixture(scope="module")
def world():
    intensity = concept_intensity()
    responses_a, concept_a = detector_model(intensity)
    rng = np.random.default_rng(5)
    permutation = rng.permutation(responses_a.shape[1])
    gain = rng.uniform(0.5, 2.0, responses_a.shape[1])
    responses_b = (responses_a + rng.normal(scale=0.02, size=responses_a.shape))[:, permutation] * gain[permutation]
    # split model A over two layers: all layers together form one neuron set
    half = responses_a.shape[1] // 2
    base = Observation(
        layers={"a1": observe(responses_a[:, :half], "a1"), "a2": observe(responses_a[:, half:], "a2")},
        probe_hash=PROBE_HASH,
    )
    return {
        "intensity": intensity, "responses_a": responses_a, "concept_a": concept_a,
        "base": base, "obs_a": observe(responses_a), "obs_b": observe(responses_b, "b"),
        "permutation": permutation, "concept_b": concept_a[permutation],
    }


@pytest.fixture(scope="module")
def space(world):
    return ConceptEvoSpace(n_groups=15, random_state=0, progress=False).fit(world["base"])


def knn_purity(points, labels, n=5):
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    neighbours = np.argsort(d, axis=1)[:, :n]
    return float(np.mean(labels[neighbours] == labels[:, None]))


# ------------------------------------------------------------------ ground truth
def test_fitted_state(space, world):
    n = world["responses_a"].shape[1]
    assert space.neuron_ids_[0] == "a1:0" and space.neuron_ids_[-1] == f"a2:{n - n // 2 - 1}"
    assert space.neuron_embeddings_.shape == (n, 30)
    assert space.probe_hash_ == PROBE_HASH
    assert space.n_pairs_ > n and space.n_covered_images_ > 100
    assert space.reconstruction_error_ < 0.05  # Eq. 4 reproduces the base embeddings


def test_counterparts_across_models(space, world):
    emb_a, emb_b = space.embed(world["obs_a"]), space.embed(world["obs_b"])
    assert emb_a.n_unplaced == 0 and emb_b.n_unplaced == 0
    concept_a, concept_b = world["concept_a"], world["concept_b"]
    rows_b = np.flatnonzero(concept_b >= 0)
    rows_a = np.flatnonzero(concept_a >= 0)
    d = ((emb_b.vectors[rows_b, None] - emb_a.vectors[None, rows_a]) ** 2).sum(-1)
    nearest = rows_a[d.argmin(axis=1)]
    assert np.mean(nearest == world["permutation"][rows_b]) >= 0.9
    # 5-NN concept purity among B's concept channels, in the space and on the map
    assert knn_purity(emb_b.vectors[rows_b], concept_b[rows_b]) >= 0.8
    assert knn_purity(emb_b.layout[rows_b], concept_b[rows_b]) >= 0.8


def test_embedding_is_deterministic(space, world):
    first, second = space.embed(world["obs_b"]), space.embed(world["obs_b"])
    np.testing.assert_array_equal(first.vectors, second.vectors)
    np.testing.assert_array_equal(first.layout, second.layout)
    # a neuron's place does not depend on the other neurons of the call
    subset = space.embed(_rows(world["obs_b"], np.arange(10)))
    np.testing.assert_array_equal(subset.layout, first.layout[:10])


def test_fit_is_reproducible(world, space):
    again = ConceptEvoSpace(n_groups=15, random_state=0, progress=False).fit(world["base"])
    np.testing.assert_array_equal(again.neuron_embeddings_, space.neuron_embeddings_)
    np.testing.assert_array_equal(again.embed(world["obs_b"]).layout, space.embed(world["obs_b"]).layout)


def test_concept_groups(space, world):
    emb = space.embed(world["obs_b"])
    rows = np.flatnonzero(world["concept_b"] >= 0)
    groups, concepts = emb.groups[rows], world["concept_b"][rows]
    assert emb.groups.dtype == np.int32 and groups.min() >= 0 and groups.max() < 15
    # most concepts map onto one dominant group
    dominant = [np.bincount(groups[concepts == c]).max() / np.sum(concepts == c) for c in np.unique(concepts)]
    assert np.mean(dominant) >= 0.8


# ----------------------------------------------------------------- unplaced neurons
def test_unplaced_neurons_are_flagged_never_at_origin(space, world):
    obs = _rows(world["obs_b"], np.arange(6))
    obs.image_ids[0] = N_IMAGES + 100          # images the space has never seen
    obs.image_ids[1] = -1                      # no stimuli at all
    obs.invalid[2] = True                      # NaN activations during recording
    emb = space.embed(obs)
    assert emb.placed.tolist() == [False, False, False, True, True, True]
    assert emb.n_unplaced == 3
    assert np.isnan(emb.vectors[:3]).all() and np.isnan(emb.layout[:3]).all()
    assert (emb.groups[:3] == -1).all()
    assert np.isfinite(emb.layout[3:]).all()


def test_indirect_image_embeddings(world):
    """Record the base with 20 images per neuron: the first 10 are stimuli, the rest
    links uncovered images to covered ones (indirect embeddings)."""
    responses = world["responses_a"]
    base = observe(responses, "a", k=20)
    space = ConceptEvoSpace(random_state=0, progress=False, epochs=10).fit(base)
    assert space.n_indirect_images_ > 50
    # neurons whose stimuli are only the *uncovered* images among A's ranks 11-20
    tail = observe(responses, "tail", k=20)
    ids = tail.image_ids[:, 10:].copy()
    ids[space.image_status_[ids] == 1] = -1
    tail.image_ids = ids
    assert np.isin(space.image_status_[ids[ids >= 0]], [0, 2]).all()
    emb_tail, emb_head = space.embed(tail), space.embed(observe(responses, "a"))
    concept = world["concept_a"]
    rows = np.flatnonzero(concept >= 0)
    assert emb_tail.placed[rows].mean() > 0.8
    placed = rows[emb_tail.placed[rows]]
    d = ((emb_tail.vectors[placed, None] - emb_head.vectors[None, rows]) ** 2).sum(-1)
    assert np.mean(concept[rows[d.argmin(1)]] == concept[placed]) >= 0.7


def _links(responses, k=5):
    """Each image's k most responsive channels of [images, channels] responses."""
    return np.argsort(-responses, axis=1, kind="stable")[:, :k].astype(np.int32)


def test_image_links_place_neurons_whose_stimuli_are_all_uncovered(world):
    """From one base step recorded with the default k = 10, the neurons' top-k lists
    link no uncovered image; the recorded image -> neuron links (Step 2.1) do."""
    responses = world["responses_a"]
    # neurons whose stimuli are A's ranks 11-20 with every covered image removed
    tail = observe(responses, "tail", k=20)
    without = ConceptEvoSpace(random_state=0, progress=False, epochs=10).fit(observe(responses, "a"))
    assert without.n_indirect_images_ == 0
    ids = tail.image_ids[:, 10:].copy()
    ids[without.image_status_[np.clip(ids, 0, without.n_images_ - 1)] == 1] = -1
    tail.image_ids = ids
    concept = world["concept_a"]
    rows = np.flatnonzero((concept >= 0) & (ids >= 0).any(1))
    assert rows.size > 50
    assert without.embed(tail).placed[rows].sum() == 0

    base = observe(responses, "a")
    base.image_links = _links(responses)
    space = ConceptEvoSpace(random_state=0, progress=False, epochs=10).fit(base)
    assert space.n_indirect_images_ > 200
    emb_tail, emb_head = space.embed(tail), space.embed(observe(responses, "a"))
    assert emb_tail.placed[rows].mean() > 0.9
    placed = rows[emb_tail.placed[rows]]
    d = ((emb_tail.vectors[placed, None] - emb_head.vectors[None, rows]) ** 2).sum(-1)
    assert np.mean(concept[rows[d.argmin(1)]] == concept[placed]) >= 0.7
    # a neuron is unplaced only when nothing links its stimuli: images no neuron
    # responds to (no link, in no top-k list) stay without embedding
    orphan = int(np.flatnonzero(space.image_status_ == 2)[0])   # uncovered, linked so far
    base.image_links = base.image_links.copy()
    base.image_links[orphan] = -1                                  # now nothing links it
    lonely = observe(responses, "lonely")
    lonely.image_ids = np.full_like(lonely.image_ids, -1)
    lonely.image_ids[0, 0] = orphan
    space_orphan = ConceptEvoSpace(random_state=0, progress=False, epochs=2).fit(base)
    assert space_orphan.image_status_[orphan] == 0
    assert not space_orphan.embed(lonely).placed[0] and space_orphan.embed(lonely).placed.sum() == 0


def test_image_links_recorder_and_logs(tmp_path):
    """The recorder's links are each image's top channels; the writer logs them and the
    reader brings them back with the observation (old logs: None)."""
    from tb_conceptevo.image_links import ImageLinksRecorder
    from tb_conceptevo.probes import ConceptShapes
    from tb_conceptevo.reading import ConceptReader
    from tb_conceptevo.recording import record
    from tb_conceptevo.writer import ConceptWriter

    probe = ConceptShapes(n=96, size=16, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 7, 3)).double()
    recorder = ImageLinksRecorder(k=4)
    record(model, probe, k=5, batch_size=17, consumers=[recorder], progress=False)
    links = recorder.result()
    assert set(links) == {"0", "2"} and links["2"].shape == (96, 4)
    with torch.no_grad():
        images = probe.load_batch(list(range(96))).double()
        response = model[:3](images).amax(dim=(2, 3)).numpy()
    chosen = np.take_along_axis(response, links["2"].astype(np.int64), 1)
    fourth = -np.sort(-response, axis=1)[:, 3:4]
    assert (chosen >= fourth).all() and (np.diff(chosen, axis=1) <= 0).all()

    logdir = str(tmp_path / "run")
    writer = ConceptWriter(logdir, probe=probe, k=5, progress=False, image_links=3)
    writer.add_concepts(model, step=1)
    writer.close()
    with ConceptReader(str(tmp_path)) as logs:
        obs = logs.observation("run", 1)
    np.testing.assert_array_equal(obs["2"].image_links, links["2"][:, :3])
    writer = ConceptWriter(str(tmp_path / "old"), probe=probe, k=5, progress=False, image_links=0)
    writer.add_concepts(model, step=1)
    writer.close()
    with ConceptReader(str(tmp_path)) as logs:
        assert logs.observation("old", 1)["2"].image_links is None


# --------------------------------------------------------------- real forward pass
class ColourDetectors(nn.Module):
    """Hand-built detectors of ConceptShapes colours: channel (c, j) responds to pixels
    of colour c, weighted by a fixed spatial preference j; plus random-filter noise
    channels.  ``detect`` (a 1x1 conv) permutes and rescales them."""

    def __init__(self, palette, per_colour=6, n_noise=6, permutation=None, gains=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("palette", palette)
        self.per_colour = per_colour
        self.register_buffer("preference", 0.5 + torch.rand(palette.shape[0] * per_colour, 1, 4, 4, generator=g))
        self.noise = nn.Conv2d(3, n_noise, 3, padding=1)
        with torch.no_grad():
            self.noise.weight.copy_(torch.randn(self.noise.weight.shape, generator=g))
            self.noise.bias.zero_()
        n = palette.shape[0] * per_colour + n_noise
        self.detect = nn.Conv2d(n, n, 1, bias=False)
        permutation = torch.arange(n) if permutation is None else permutation
        gains = torch.ones(n) if gains is None else gains
        with torch.no_grad():
            self.detect.weight.zero_()
            self.detect.weight[torch.arange(n), permutation, 0, 0] = gains

    def forward(self, x):
        distance = ((x[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)
        colour = torch.exp(-distance / 0.1).repeat_interleave(self.per_colour, 1)
        preference = nn.functional.interpolate(self.preference.transpose(0, 1), size=x.shape[-2:], mode="bilinear")
        return self.detect(torch.cat([colour * preference, 0.1 * self.noise(x)], 1))


def test_real_forward_pass_on_concept_shapes():
    from tb_conceptevo.probes import ConceptShapes
    from tb_conceptevo.recording import record
    from tb_conceptevo.probes.concept_shapes import _PALETTE

    probe = ConceptShapes(n=700, size=32, seed=0)
    palette = torch.tensor(list(_PALETTE.values()), dtype=torch.float32) / 255.0
    per_colour, n_noise = 6, 6
    n = palette.shape[0] * per_colour + n_noise
    colour_of = np.concatenate([np.repeat(np.arange(palette.shape[0]), per_colour), -np.ones(n_noise, int)])
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    gains = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(4))
    model_a = ColourDetectors(palette, per_colour, n_noise)
    model_b = ColourDetectors(palette, per_colour, n_noise, permutation, gains)
    obs_a = record(model_a, probe, layers=["detect"], k=10, progress=False)
    obs_b = record(model_b, probe, layers=["detect"], k=10, progress=False)
    space = ConceptEvoSpace(random_state=0, progress=False).fit(obs_a)
    emb_a, emb_b = space.embed(obs_a["detect"]), space.embed(obs_b["detect"])
    colour_b = colour_of[permutation.numpy()]
    rows_b, rows_a = np.flatnonzero(colour_b >= 0), np.flatnonzero(colour_of >= 0)
    d = ((emb_b.vectors[rows_b, None] - emb_a.vectors[None, rows_a]) ** 2).sum(-1)
    assert np.mean(rows_a[d.argmin(1)] == permutation.numpy()[rows_b]) >= 0.9
    assert knn_purity(emb_b.vectors[rows_b], colour_b[rows_b]) >= 0.8


# ----------------------------------------------------------------------- save/load
def test_save_load_roundtrip(space, world, tmp_path):
    path = tmp_path / "space.cevo"
    space.save(path)
    loaded = ConceptEvoSpace.load(path)
    assert loaded.probe_hash_ == PROBE_HASH and loaded.neuron_ids_ == space.neuron_ids_
    before, after = space.embed(world["obs_b"]), loaded.embed(world["obs_b"])
    np.testing.assert_array_equal(before.vectors, after.vectors)
    np.testing.assert_array_equal(before.layout, after.layout)
    np.testing.assert_array_equal(before.groups, after.groups)
    assert space_io.read_header(path)["kind"] == "conceptevo"


def test_parameters_and_the_fitted_probe_hash(space, world, tmp_path):
    """scikit-learn conventions: hyper-parameters by name, fitted state ending in "_";
    ``probe_hash`` (the Space interface's name) reads the fitted ``probe_hash_``."""
    fresh = ConceptEvoSpace(progress=False)
    assert fresh.probe_hash == "" and not hasattr(fresh, "probe_hash_")
    assert fresh.set_params(dim=8, epochs=2, random_state=3) is fresh
    assert (fresh.dim, fresh.epochs, fresh.random_state) == (8, 2, 3)
    assert ConceptEvoSpace(**fresh.get_params()).get_params() == fresh.get_params()
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['dims'\].*valid parameters"):
        fresh.set_params(dims=8)
    assert fresh.dim == 8  # nothing was set
    assert space.probe_hash == space.probe_hash_ == PROBE_HASH and "probe_hash" not in vars(space)
    # the space file keeps its header key, so files written before the rename load
    path = tmp_path / "space.npz"
    space.save(path)
    assert space_io.read_header(path)["probe_hash"] == PROBE_HASH
    assert ConceptEvoSpace.load(path).probe_hash_ == PROBE_HASH
    # so do spaces pickled before it
    import pickle

    old = pickle.loads(pickle.dumps(space))
    old.__dict__["probe_hash"] = old.__dict__.pop("probe_hash_")
    revived = pickle.loads(pickle.dumps(old))
    assert revived.probe_hash_ == PROBE_HASH and "probe_hash" not in vars(revived)
    np.testing.assert_array_equal(revived.embed(world["obs_b"]).layout, space.embed(world["obs_b"]).layout)


def test_bad_space_files(space, tmp_path):
    path = tmp_path / "space.npz"
    space.save(path)
    with pytest.raises(FileNotFoundError):
        ConceptEvoSpace.load(tmp_path / "missing.npz")
    data = path.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted|not a readable"):
        ConceptEvoSpace.load(tmp_path / "truncated.npz")
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError):
        ConceptEvoSpace.load(tmp_path / "flipped.npz")
    space_io.save_space_file(tmp_path / "other.npz", "text", 1, {}, {"x": np.zeros(2)})
    with pytest.raises(ValueError, match="'text' space"):
        ConceptEvoSpace.load(tmp_path / "other.npz")
    space_io.save_space_file(tmp_path / "newer.npz", "conceptevo", 99, {}, {"x": np.zeros(2)})
    with pytest.raises(ValueError, match="version 99.*upgrade"):
        ConceptEvoSpace.load(tmp_path / "newer.npz")
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a tb_conceptevo space file"):
        ConceptEvoSpace.load(tmp_path / "plain.npz")


# ------------------------------------------------------------------------ bad input
def test_bad_input(space, world):
    other = observe(world["responses_a"], "x", probe_hash="0" * 64)
    with pytest.raises(ValueError, match="probe set"):
        space.embed(other)
    with pytest.raises(TypeError, match="per layer"):
        space.embed(world["base"])
    with pytest.raises(ValueError, match="different probe sets"):
        ConceptEvoSpace(progress=False).fit([world["obs_a"], other])
    with pytest.raises(ValueError, match="at least 3"):
        ConceptEvoSpace(progress=False).fit(_rows(world["obs_a"], np.arange(2)))
    disjoint = _rows(world["obs_a"], np.arange(5))
    disjoint.image_ids = np.arange(50, dtype=np.int32).reshape(5, 10)
    with pytest.raises(ValueError, match="no two base neurons share"):
        ConceptEvoSpace(progress=False).fit(disjoint)
    with pytest.raises(ValueError, match="dim"):
        ConceptEvoSpace(dim=0, progress=False).fit(world["obs_a"])
    with pytest.raises(RuntimeError, match="not fitted"):
        ConceptEvoSpace().embed(world["obs_a"])
    with pytest.raises(TypeError):
        ConceptEvoSpace(progress=False).fit("not observations")


# ------------------------------------------------------------------- building blocks
def test_cooccurrence_pairs_are_within_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(50), rng.integers(1, 8, 50))
    members = np.arange(groups.size) + 1000
    pairs = cooccurrence_pairs(groups, members, 4, rng)
    sizes = np.bincount(groups)
    assert pairs.shape[0] == 4 * np.sum(sizes - 1)
    group_of = dict(zip(members, groups))
    assert all(group_of[a] == group_of[b] and a != b for a, b in pairs)
    # shuffled: different repetitions give different windows
    assert len({tuple(p) for p in pairs}) > pairs.shape[0] / 4


def test_skipgram_separates_two_cliques():
    clique = [(a, b) for a in range(5) for b in range(5) if a != b]
    pairs = torch.tensor(clique + [(a + 5, b + 5) for a, b in clique] * 1)
    g = torch.Generator().manual_seed(0)
    table = torch.rand(10, 8, generator=g) - 0.5
    train_skipgram(table, pairs.repeat(20, 1), torch.arange(10), negatives=3, lr=0.05, epochs=20,
                   batch_size=16, generator=g, progress=False)
    sim = table @ table.T
    within = (sim[:5, :5].sum() - sim[:5, :5].diag().sum()) / 20
    across = sim[:5, 5:].mean()
    assert within > 0.2 and across < -0.2


def _sppmi_dense(image, neuron, n, negatives):
    """The shifted positive PMI matrix, written out densely (the definition)."""
    counts = np.zeros((n, n))
    for img in np.unique(image):
        members = neuron[image == img]
        for a in members:
            for b in members:
                if a != b:
                    counts[a, b] += 1
    degree = counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):  # zero counts are masked below
        pmi = np.log(counts * counts.sum() / np.outer(degree, degree)) - np.log(negatives)
    return np.where(counts > 0, np.maximum(pmi, 0), 0.0), degree


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sppmi_embeddings_factorise_the_shifted_pmi(seed):
    from tb_conceptevo.spaces._neuron_embedding import sppmi_embeddings

    rng = np.random.default_rng(seed)
    n, dim = 40, 4
    concept = np.arange(n) % 4  # four concepts, ten neurons each
    # every image activates a few neurons of one concept (and sometimes one stray neuron)
    entries = []
    for img in range(400):
        c = rng.integers(4)
        members = rng.choice(np.flatnonzero(concept == c), 3, replace=False).tolist()
        if rng.random() < 0.2:
            members.append(int(rng.integers(n - 2)))
        entries += [(img, m) for m in set(members)]
    image, neuron = np.array(entries).T
    valid = np.ones(n + 2, dtype=bool)  # neuron n: stimuli but no partner; n + 1: no stimuli
    valid[n + 1] = False
    image, neuron = np.r_[image, 10_000], np.r_[neuron, n]
    emb = sppmi_embeddings(image, neuron, valid, dim, 3, torch.Generator().manual_seed(seed))
    dense, degree = _sppmi_dense(image, neuron, n + 2, 3)
    values, vectors = np.linalg.eigh(dense)
    top = np.argsort(values)[::-1][:dim]
    expected = (vectors[:, top] * values[top]) @ vectors[:, top].T  # best rank-dim reconstruction
    # Subspace iteration (6 steps, dim + 10 columns) converges like
    # (|lambda_{dim+11}| / lambda_dim)^6: the reconstruction is the exact one within that
    # (times a safety factor of 2) plus float32 rounding of the embeddings.
    by_size = np.sort(np.abs(values))[::-1]
    rate = (by_size[dim + 10] / values[top].min()) ** 6
    assert rate < 0.05  # the four concepts' eigenvalues stand above the rest
    np.testing.assert_allclose(emb[:n] @ emb[:n].T, expected[:n, :n], rtol=0,
                               atol=(2 * rate + 1e-6) * np.abs(expected).max())
    # each neuron's nearest neighbour detects its concept
    d = ((emb[:n, None] - emb[None, :n]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (concept[d.argmin(1)] == concept).all()
    assert np.isfinite(emb[n]).all() and np.abs(emb[n]).max() <= 0.5  # uniform init, as the paper's
    assert np.isnan(emb[n + 1]).all()
    again = sppmi_embeddings(image, neuron, valid, dim, 3, torch.Generator().manual_seed(seed))
    np.testing.assert_array_equal(emb, again)


def test_stable_layout_small_reference_and_state():
    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.normal(size=(15, 8)), rng.normal(size=(15, 8)) + 6]).astype(np.float32)
    layout = StableLayout(random_state=0).fit(reference)
    assert layout.n_neighbors_ <= 29
    query = np.concatenate([reference[:3] + 0.01, np.full((1, 8), np.nan)])
    xy = layout.transform(query)
    assert np.isnan(xy[3]).all() and np.isfinite(xy[:3]).all()
    np.testing.assert_array_equal(xy, layout.transform(query))
    # row-independent, bit for bit (tests/test_layout.py checks this in depth)
    np.testing.assert_array_equal(xy[:1], layout.transform(query[:1]))
    # points of the first cluster stay with the first cluster on the map
    ref_xy = layout.reference_layout_
    nearest = ((xy[:3, None] - ref_xy[None]) ** 2).sum(-1).argmin(1)
    assert (nearest < 15).all()
    header, arrays = layout.state()
    restored = StableLayout.from_state(header, arrays)
    np.testing.assert_array_equal(restored.transform(query), xy)
    with pytest.raises(ValueError, match="at least 4"):
        StableLayout().fit(reference[:3])
    with pytest.raises(ValueError, match="dimensions"):
        layout.transform(np.zeros((2, 5)))


def _rows(obs, rows):
    return LayerObservation(
        layer=obs.layer, image_ids=obs.image_ids[rows].copy(), activations=obs.activations[rows].copy(),
        positions=obs.positions[rows].copy(), invalid=obs.invalid[rows].copy(), map_size=obs.map_size,
        input_size=obs.input_size, probe_hash=obs.probe_hash, step=obs.step,
    )


# ------------------------------------------------------------------ command line
def _log_run(logdir, run, steps, responses, seed):
    from tb_conceptevo.writer import ConceptWriter

    rng = np.random.default_rng(seed)
    writer = ConceptWriter(os.path.join(logdir, run), probe=None, progress=False)
    for step in steps:
        noisy = responses + rng.normal(scale=0.05, size=responses.shape)
        half = noisy.shape[1] // 2
        obs = Observation(layers={"a1": observe(noisy[:, :half], "a1", step=step),
                                  "a2": observe(noisy[:, half:], "a2", step=step)},
                          step=step, probe_hash=PROBE_HASH)
        writer.add_observation(obs, step)
    writer.close()


def _event_files(logdir):
    return sorted((root, name, os.path.getsize(os.path.join(root, name)))
                  for root, _, names in os.walk(logdir) for name in names if "tfevents" in name)


def test_cli_fit_space_and_project(world, tmp_path, capsys):
    from tb_conceptevo.cli import main
    from tb_conceptevo.reading import ConceptReader

    logdir, space_file = str(tmp_path / "logs"), str(tmp_path / "space.npz")
    assert main(["project", "--logdir", logdir, "--space", space_file]) == 2   # no space file yet
    os.makedirs(logdir)
    space = ConceptEvoSpace(progress=False).fit(world["base"])
    space.save(space_file)
    assert main(["project", "--logdir", logdir, "--space", space_file, "--no-progress"]) == 2
    assert "no tb_conceptevo observations" in capsys.readouterr().err

    _log_run(logdir, "base", [0, 10, 20], world["responses_a"], 0)
    _log_run(logdir, "other", [5, 15], world["responses_a"], 1)
    assert main(["fit-space", "--logdir", logdir, "--out", space_file, "--no-progress"]) == 2
    assert "several runs" in capsys.readouterr().err
    assert main(["fit-space", "--logdir", logdir, "--run", "base", "--out", space_file,
                 "--epochs", "5", "--groups", "4", "--no-progress"]) == 0
    fitted = ConceptEvoSpace.load(space_file)
    assert fitted.neuron_ids_[0] == "a1:0" and fitted.group_centers_.shape == (4, 30)

    # back-fill one run first, then everything: only the missing steps are written
    assert main(["project", "--logdir", logdir, "--space", space_file, "--runs", "other", "--no-progress"]) == 0
    assert main(["project", "--logdir", logdir, "--space", space_file, "--no-progress"]) == 0
    with ConceptReader(logdir) as logs:
        for run, steps in (("base", [0, 10, 20]), ("other", [5, 15])):
            for layer in ("a1", "a2"):
                assert logs.space_steps(run, "conceptevo", layer) == steps
        embedding = logs.embedding("base", "conceptevo", "a1", 20)
        expected = fitted.embed(logs.observation("base", 20)["a1"])
        np.testing.assert_allclose(embedding.layout, expected.layout, rtol=1e-3, atol=1e-3)
        scalars = logs.scalars("base")
        assert [s for s, _ in scalars["concepts/entropy/conceptevo/all"]] == [0, 10, 20]
        assert [s for s, _ in scalars["concepts/speed/conceptevo/a1"]] == [10, 20]
    # running it again changes nothing
    before = _event_files(logdir)
    capsys.readouterr()
    assert main(["project", "--logdir", logdir, "--space", space_file, "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _event_files(logdir) == before
    # a new step logged later: only that one is filled, and its speed uses step 20
    _log_run(logdir, "base", [30], world["responses_a"], 2)
    assert main(["project", "--logdir", logdir, "--space", space_file, "--no-progress"]) == 0
    with ConceptReader(logdir) as logs:
        assert logs.space_steps("base", "conceptevo", "a2") == [0, 10, 20, 30]
        assert [s for s, _ in logs.scalars("base")["concepts/speed/conceptevo/a2"]] == [10, 20, 30]
        # the whole-model series too: the first back-filled step is measured against step 20
        assert [s for s, _ in logs.scalars("base")["concepts/speed/conceptevo/all"]] == [10, 20, 30]
    # another probe set: clear error
    other_space = tmp_path / "other.npz"
    fitted.probe_hash_ = "1" * 64
    fitted.save(other_space)
    capsys.readouterr()
    _log_run(logdir, "base", [40], world["responses_a"], 3)
    assert main(["project", "--logdir", logdir, "--space", str(other_space), "--no-progress"]) == 2
    assert "probe set" in capsys.readouterr().err


def test_image_link_ranking_is_the_stable_descending_sort():
    from tb_conceptevo.recording.topk import ranking_keys

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        channels = int(torch.randint(1, 40, (1,), generator=g))
        values = torch.randint(-3, 4, (6, channels), generator=g).float() * 0.5  # many ties
        values[torch.rand(6, channels, generator=g) < 0.1] = -torch.inf
        values[torch.rand(6, channels, generator=g) < 0.05] = -0.0  # equal to 0.0 for the sort
        values[torch.rand(6, channels, generator=g) < 0.05] = torch.inf
        take = min(5, channels)
        expected = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :take]
        assert torch.equal(torch.topk(ranking_keys(values), take, dim=1).indices, expected)


@pytest.mark.parametrize("compiled", [True, False], ids=["cpu-compiled-loop", "accelerator-tensor-ops"])
def test_image_links_both_paths_are_the_stable_sort(monkeypatch, compiled):
    """Links of layers of several widths (some narrower than k) on tie-heavy responses
    with NaN and infinities: each image's channels in stable descending order, NaN and
    -inf dropped, whichever path selects them."""
    from tb_conceptevo.image_links import ImageLinksRecorder
    from tb_conceptevo.recording import responses as recording_responses

    monkeypatch.setattr(recording_responses, "_compiled_loops", lambda device: compiled)
    g = torch.Generator().manual_seed(1)
    widths = [3, 7, 7, 2, 11, 7]
    starts = np.cumsum([0] + widths)[:-1]
    columns = {f"l{i}": slice(int(s), int(s + w)) for i, (s, w) in enumerate(zip(starts, widths))}
    values = torch.randint(-2, 3, (40, sum(widths)), generator=g).float()
    values[torch.rand(values.shape, generator=g) < 0.1] = torch.nan
    values[torch.rand(values.shape, generator=g) < 0.05] = -torch.inf
    values[torch.rand(values.shape, generator=g) < 0.05] = torch.inf
    recorder = ImageLinksRecorder(k=4)
    recorder.begin_pass(0, {}, range(40))
    for batch in torch.split(torch.arange(40), 13):
        recorder.update_batch(0, values[batch], columns, batch)
    links = recorder.result()
    for name, cols in columns.items():
        layer = values[:, cols]
        order = torch.sort(layer.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf), dim=1,
                           descending=True, stable=True).indices[:, :4]
        expected = torch.where(torch.gather(layer, 1, order) > -torch.inf, order, torch.full_like(order, -1))
        expected = torch.cat([expected, torch.full((40, 4 - expected.shape[1]), -1)], dim=1)
        np.testing.assert_array_equal(links[name], expected.numpy(), err_msg=name)
