"""ConceptDiversityLoss: gradient check, agreement with d_anchor, and training lowers it."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from tb_conceptevo.metrics.anchors import d_anchor
from tb_conceptevo.probes import ConceptShapes
from tb_conceptevo.regularizer import ConceptDiversityLoss, GroundTruthConcepts


def unit_rows(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_gradcheck_float64():
    concepts = unit_rows(4, 5, 0)
    anchors = unit_rows(3, 5, 1)
    loss = ConceptDiversityLoss(anchors, concepts, temperature=0.5).double()
    g = torch.Generator().manual_seed(0)
    activations = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    concept_activations = torch.rand(6, 4, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda x: loss(x, concept_activations), (activations,), eps=1e-6, atol=1e-5)


def test_value_matches_d_anchor_and_cos3():
    concepts = unit_rows(5, 6, 2)
    anchors = unit_rows(4, 6, 3)
    loss = ConceptDiversityLoss(anchors, concepts, temperature=0.1)
    g = torch.Generator().manual_seed(1)
    activations = torch.randn(8, 7, 3, 3, generator=g)
    concept_activations = torch.rand(8, 5, generator=g)
    sim = loss.similarity(activations, concept_activations).numpy()
    r = activations.mean(dim=(2, 3)).numpy()
    r3 = (r - r.mean(0)) ** 3
    c3 = (concept_activations.numpy() - concept_activations.numpy().mean(0)) ** 3
    np.testing.assert_allclose(sim, (r3 / np.linalg.norm(r3, axis=0)).T @ (c3 / np.linalg.norm(c3, axis=0)), atol=1e-5)
    weights = np.exp(sim / 0.1) / np.exp(sim / 0.1).sum(1, keepdims=True)
    expected = d_anchor(weights @ concepts, anchors)
    assert float(loss(activations, concept_activations)) == pytest.approx(expected, rel=1e-5)


def test_minimising_lowers_d_anchor_on_toy_model():
    data = ConceptShapes(n=96, size=16, seed=1)
    k = len(data.vocabulary)
    concepts = unit_rows(k, 16, 4)
    reg = ConceptDiversityLoss(concepts, concepts, temperature=0.05, source=GroundTruthConcepts(data))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1))
    handle = reg.attach(model, "2")
    images = data.images(list(range(96)))
    indices = torch.arange(96)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)

    def evaluate():
        with torch.no_grad():
            model(images)
            return float(reg(indices=indices))

    before = evaluate()
    for step in range(40):
        batch = indices[(step * 32) % 96:(step * 32) % 96 + 32]
        model(images[batch])
        loss = reg(indices=batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = evaluate()
    handle.remove()
    assert after < before - 0.05, (before, after)


def test_bad_inputs():
    concepts = unit_rows(3, 4, 0)
    with pytest.raises(ValueError, match="same text encoder"):
        ConceptDiversityLoss(unit_rows(2, 5, 1), concepts)
    with pytest.raises(ValueError, match="concept_vectors"):
        ConceptDiversityLoss(concepts)
    loss = ConceptDiversityLoss(concepts, concepts)
    with pytest.raises(ValueError, match="concept activations must be"):
        loss(torch.randn(4, 2, 3, 3), torch.rand(4, 5))
    with pytest.raises(ValueError, match="attach"):
        loss()
    with pytest.raises(ValueError, match="concept_presence"):
        GroundTruthConcepts(object())
