"""TextSpace (Concept-Monitor) with the real offline MiniLM encoder and StableLayout."""

import numpy as np
import pytest

from tb_conceptevo.detectors import MiniLMTextEncoder, NetDissect
from tb_conceptevo.detectors.base import Detection
from tb_conceptevo.detectors.text_encoders import TextEncoder
from tb_conceptevo.metrics.anchors import d_anchor
from tb_conceptevo.observation import LayerObservation
from tb_conceptevo.probes import ConceptShapes
from tb_conceptevo.spaces.text import TextSpace

ANCHORS = ["red", "circle", "striped", "animal"]


@pytest.fixture(scope="module")
def encoder():
    return MiniLMTextEncoder()


@pytest.fixture(scope="module")
def space(encoder):
    probe = ConceptShapes(n=8, size=16)
    return TextSpace(NetDissect(vocabulary=probe), text_encoder=encoder, anchors=ANCHORS, temperature=0.1)


def observation(n, invalid=()):
    flags = np.zeros(n, bool)
    flags[list(invalid)] = True
    return LayerObservation("conv", np.zeros((n, 2), np.int32), np.zeros((n, 2), np.float32),
                            np.zeros((n, 2), np.int32), flags, (4, 4), (16, 16), "hash")


def detection(space, sim):
    return Detection("conv", sim.astype(np.float32), space.concepts, space.categories, 0.04)


def test_minilm_offline_encoder(encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vectors = encoder.encode(["red", "crimson", "circle"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # semantic: red ~ crimson
    assert encoder.identifier.startswith("minilm:")
    np.testing.assert_array_equal(encoder.encode(["circle"])[0], vectors[2])


def test_embedding_is_softmax_weighted_text_vectors(space):
    rng = np.random.default_rng(0)
    sim = rng.random((6, len(space.concepts)))
    sim[2] = np.nan               # unplaced: no similarity
    sim[4, :3] = np.nan           # partial NaN: ignored entries
    emb = space.embed(observation(6, invalid=[5]), detection(space, sim))
    assert emb.placed.tolist() == [True, True, False, True, True, False]
    weights = np.exp(sim[0] / 0.1) / np.exp(sim[0] / 0.1).sum()
    np.testing.assert_allclose(emb.vectors[0], weights @ space.concept_vectors, atol=1e-5)
    finite = np.isfinite(sim[4])
    weights4 = np.exp(sim[4, finite] / 0.1) / np.exp(sim[4, finite] / 0.1).sum()
    np.testing.assert_allclose(emb.vectors[4], weights4 @ space.concept_vectors[finite], atol=1e-5)
    assert np.isnan(emb.vectors[[2, 5]]).all() and np.isnan(emb.layout[[2, 5]]).all()
    assert np.isfinite(emb.layout[emb.placed]).all()
    again = space.embed(observation(6, invalid=[5]), detection(space, sim))
    np.testing.assert_array_equal(again.layout, emb.layout)  # deterministic


def test_neuron_at_concept_lands_near_it(space):
    """A neuron sure of one concept sits on that concept's text vector."""
    sim = np.zeros((1, len(space.concepts)))
    sim[0, space.concepts.index("striped")] = 5.0
    emb = space.embed(observation(1), detection(space, sim))
    np.testing.assert_allclose(emb.vectors[0], space.concept_vectors[space.concepts.index("striped")], atol=1e-4)
    anchors = space.anchors()
    assert anchors.words[:4] == ANCHORS and anchors.kind[:4] == ["anchor"] * 4
    assert set(anchors.kind[4:]) == {"concept"} and "striped" not in anchors.words[4:]
    assert anchors.vectors.shape == (len(anchors.words), 384) and anchors.layout.shape == (len(anchors.words), 2)
    # Concept-Monitor Eq. 2 with one neuron: each anchor's distance to it, averaged.
    distances = np.linalg.norm(np.asarray(space.anchor_vectors, np.float64) - emb.vectors[0], axis=1)
    assert d_anchor(emb.vectors, space.anchor_vectors) == pytest.approx(distances.mean(), rel=1e-6)


def test_save_load_roundtrip_and_encoder_mismatch(space, encoder, tmp_path):
    path = tmp_path / "text.space"
    space.save(path)
    loaded = TextSpace.load(path, text_encoder=encoder)
    assert loaded.concepts == space.concepts and loaded.anchor_words == space.anchor_words
    assert loaded.detector is not None and loaded.detector.concepts == space.concepts
    sim = np.random.default_rng(1).random((5, len(space.concepts)))
    a = space.embed(observation(5), detection(space, sim))
    b = loaded.embed(observation(5), detection(space, sim))
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_allclose(a.layout, b.layout, atol=1e-5)

    class Tiny(TextEncoder):
        name = "tiny"
        dim = 8
        identifier = "tiny:0"

        def spec(self):
            return {"kind": "tiny"}

        def _encode(self, words):
            return np.ones((len(words), 8))

    with pytest.raises(ValueError, match="384-d"):
        TextSpace.load(path, text_encoder=Tiny())
    with pytest.raises(FileNotFoundError):
        TextSpace.load(tmp_path / "missing.space")
    corrupt = tmp_path / "bad.space"
    corrupt.write_bytes(b"not a space file")
    with pytest.raises(ValueError, match="not a readable space file"):
        TextSpace.load(corrupt)


def test_bad_inputs(space, encoder):
    with pytest.raises(ValueError, match="needs the detection"):
        space.embed(observation(3))
    with pytest.raises(ValueError, match="not concepts of detector"):
        TextSpace(space.detector, concepts=["red", "zebra"], text_encoder=encoder)
    with pytest.raises(ValueError, match="empty"):
        TextSpace(space.detector, anchors=[], text_encoder=encoder)
    with pytest.raises(ValueError, match="temperature"):
        TextSpace(space.detector, temperature=0, text_encoder=encoder)
    wrong = Detection("conv", np.zeros((3, 2), np.float32), ["red", "blue"], ["colour", "colour"], 0.1)
    with pytest.raises(ValueError, match="no similarity"):
        space.embed(observation(3), wrong)
