"""CLIP-Dissect: similarity functions against hand computation, and end to end with a
randomly initialised small open_clip model (no download) and a local checkpoint file."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from tb_conceptevo.detectors import CLIPDissect, cos_cubed, soft_wpmi
from tb_conceptevo.detectors import clip_dissect as cd
from tb_conceptevo.detectors.clip_dissect import soft_wpmi_plain
from tb_conceptevo.probes import ConceptShapes
from tb_conceptevo.recording import record

@pytest.fixture(autouse=True)
def feature_cache_dir(tmp_path, monkeypatch):
    """CLIP features go to a per-test disk cache, never the user's."""
    monkeypatch.setenv("TB_CONCEPTEVO_CACHE", str(tmp_path / "feature_cache"))
    return tmp_path / "feature_cache"


ARCH = "ViT-S-32-alt"  # smallest open_clip config (no pretrained tags: never downloads)
CONCEPTS = ["red", "green", "circle", "square", "striped", "dotted"]


def test_soft_wpmi_matches_hand_computation():
    clip_sim = torch.tensor([[0.3, 0.1], [0.2, 0.25], [0.05, 0.3], [0.1, 0.1], [0.28, 0.02]])
    responses = torch.tensor([[5.0, 0.0, 1.0], [4.0, 1.0, 2.0], [0.0, 3.0, 3.0], [1.0, 2.0, 0.5], [2.0, 5.0, 0.0]])
    a, top_k, p_start, p_end, lam = 10.0, 2, 0.998, 0.97, 1.0
    got = soft_wpmi(clip_sim, responses, top_k=top_k, a=a, lam=lam, p_start=p_start, p_end=p_end)
    probs = np.exp(a * clip_sim.numpy())
    probs /= probs.sum(axis=1, keepdims=True)
    log_given = np.zeros((3, 2))
    for n in range(3):
        order = np.argsort(-responses[:, n].numpy())[:top_k]
        for j, image in enumerate(order):
            p = p_start - j / top_k * (p_start - p_end)
            for d in range(2):
                log_given[n, d] += math.log(1 + p * (probs[image, d] - 1) + 1e-7)
    log_prior = np.log(np.exp(log_given).sum(axis=0)) - math.log(3)
    np.testing.assert_allclose(got.numpy(), log_given - lam * log_prior, rtol=1e-5, atol=1e-5)


def test_cos_cubed_matches_hand_computation():
    rng = np.random.default_rng(0)
    clip_sim = rng.normal(size=(7, 3))
    responses = rng.normal(size=(7, 4))
    got = cos_cubed(torch.tensor(clip_sim), torch.tensor(responses)).numpy()
    expected = np.zeros((4, 3))
    for n in range(4):
        x = (responses[:, n] - responses[:, n].mean()) ** 3
        for k in range(3):
            y = (clip_sim[:, k] - clip_sim[:, k].mean()) ** 3
            expected[n, k] = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(got).max() <= 1 + 1e-6


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cd.load_open_clip(ARCH, None)


@pytest.fixture(scope="module")
def probe():
    return ConceptShapes(n=24, size=32, seed=5)


def small_cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1))


@pytest.mark.parametrize("similarity", ["soft_wpmi", "cos3"])
def test_clip_dissect_end_to_end_random_model(clip_model, probe, similarity, monkeypatch):
    detector = CLIPDissect(ARCH, clip_model=clip_model, similarity=similarity, concepts=CONCEPTS,
                           top_k=5, progress=False)
    calls = []
    original = CLIPDissect._compute_image_features
    monkeypatch.setattr(CLIPDissect, "_compute_image_features",
                        lambda self, *a: calls.append(1) or original(self, *a))
    cd._FEATURE_CACHE.clear()
    results = []
    for _ in range(2):
        consumer = detector.consumer(probe, ["0", "2"])
        record(small_cnn(), probe, ["0", "2"], k=3, consumers=[consumer], progress=False)
        results.append(consumer.result())
    assert len(calls) == 1  # image features computed once per probe set and weights
    detection = results[0]["2"]
    assert detection.similarity.shape == (6, len(CONCEPTS)) and np.isfinite(detection.similarity).all()
    assert detection.concepts == CONCEPTS
    np.testing.assert_array_equal(detection.similarity, results[1]["2"].similarity)
    # the similarity is a function of the recorded responses: check against a direct call
    with torch.no_grad():
        responses = small_cnn()[:2](probe.images(list(range(len(probe))))).mean(dim=(2, 3))  # conv 0 read after its ReLU
    direct = detector.similarity_from_responses(detector.clip_similarity(probe), responses)
    np.testing.assert_allclose(results[0]["0"].similarity, direct.numpy(), rtol=1e-4, atol=1e-4)


def test_clip_dissect_local_checkpoint_and_disk_cache(clip_model, probe, tmp_path):
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save(clip_model.state_dict(), checkpoint)
    cd._FEATURE_CACHE.clear()
    from_file = CLIPDissect(ARCH, pretrained=str(checkpoint), concepts=CONCEPTS, cache_dir=tmp_path / "cache",
                            top_k=5, progress=False)
    assert from_file.weights_hash == cd.weights_hash(clip_model)
    in_memory = CLIPDissect(ARCH, clip_model=clip_model, concepts=CONCEPTS, top_k=5, progress=False)
    a = from_file.clip_similarity(probe)
    assert len(list((tmp_path / "cache").glob("clip_features_*.npy"))) == 2  # image + text features
    cd._FEATURE_CACHE.clear()
    b = in_memory.clip_similarity(probe)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    cd._FEATURE_CACHE.clear()
    again = CLIPDissect(ARCH, pretrained=str(checkpoint), concepts=CONCEPTS, cache_dir=tmp_path / "cache",
                        progress=False)
    again._compute_image_features = None  # must come from the disk cache
    torch.testing.assert_close(again.clip_similarity(probe), a)
    assert again.config()["pretrained"] == str(checkpoint.resolve())


def test_clip_dissect_bad_inputs(clip_model, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="neither an existing file nor an open_clip tag"):
        CLIPDissect(ARCH, pretrained="no-such-weights")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        CLIPDissect("ViT-Nope", pretrained=None)
    with pytest.raises(ValueError, match="empty"):
        CLIPDissect(ARCH, clip_model=clip_model, concepts=[])
    with pytest.raises(ValueError, match="similarity"):
        CLIPDissect(ARCH, clip_model=clip_model, similarity="cosine")
    with pytest.warns(UserWarning, match="duplicate"):
        detector = CLIPDissect(ARCH, clip_model=clip_model, concepts=["red", "red", "blue"])
    assert detector.concepts == ["red", "blue"]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not load"):
        CLIPDissect(ARCH, pretrained=str(broken))

    import open_clip

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(RuntimeError, match="pretrained='/path/to/that/file'"):
        CLIPDissect("ViT-B-32", pretrained="openai")


def test_regularizer_with_clip_concepts(clip_model, probe):
    from tb_conceptevo.regularizer import CLIPConcepts, ConceptDiversityLoss

    detector = CLIPDissect(ARCH, clip_model=clip_model, concepts=CONCEPTS, progress=False)
    source = CLIPConcepts(detector)
    images = probe.images(list(range(6)))
    concept_activations = source(images=images)
    assert concept_activations.shape == (6, len(CONCEPTS))
    text = detector.text_features().numpy()
    loss_fn = ConceptDiversityLoss(text, text, source=source)
    model = small_cnn()
    loss = loss_fn(model(images), images=images)
    loss.backward()
    assert torch.isfinite(loss) and model[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------- soft-WPMI speed-up is exact
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k,p_start,block", [(100, 0.998, 1 << 20), (37, 0.998, 5000), (64, 0.9999, 1),
                                                 (500, 0.5, 1 << 20)])
def test_grouped_soft_wpmi_equals_the_plain_form(seed, top_k, p_start, block):
    """Grouped products in blocks == the straightforward full-tensor form, to 1e-4 in float64
    (groups padded or not, one neuron per block, tiny least terms, top_k above M)."""
    generator = torch.Generator().manual_seed(seed)
    clip_sim = torch.rand(300, 40, generator=generator, dtype=torch.float64) * 0.6 - 0.1
    responses = torch.randn(300, 23, generator=generator, dtype=torch.float64)
    fast = soft_wpmi(clip_sim, responses, top_k=top_k, p_start=p_start, block_elements=block)
    plain = soft_wpmi_plain(clip_sim, responses, top_k=top_k, p_start=p_start)
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
    # float32 (the detector's dtype) stays close too: its error grows with the k summed
    # logs (measured 2.1e-2 at k = 300, 4e-3 at k = 100); 2e-4 per term bounds both
    fast32 = soft_wpmi(clip_sim.float(), responses.float(), top_k=top_k, p_start=p_start, block_elements=block)
    k = min(top_k, clip_sim.shape[0])
    torch.testing.assert_close(fast32.double(), plain, rtol=0, atol=2e-4 * k)


# --------------------------------------------------------------- chance level
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_clip_weights_label_almost_no_neuron(seed):
    """Random CLIP weights: with tau = 0 every neuron has a 'label', but the chance level
    (rotated text features) lets at most 5 % through (measured 0 % on seeds 0-2)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = cd.load_open_clip(ARCH, None)
    probe = ConceptShapes(n=48, size=32, seed=seed)
    words = CONCEPTS + ["blue", "yellow", "star", "triangle", "checkered", "wood", "sky", "dog", "car", "tree"]
    detector = CLIPDissect(ARCH, clip_model=clip, concepts=words, top_k=10, threshold=0.0, progress=False)
    torch.manual_seed(100 + seed)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3, stride=2, padding=1))
    consumer = detector.consumer(probe, ["0", "2"])
    record(model, probe, ["0", "2"], k=3, consumers=[consumer], progress=False)
    detections = consumer.result().values()
    best = np.concatenate([d.top()[1] for d in detections])
    interpretable = np.concatenate([d.interpretable() for d in detections])
    assert (best > 0).all()  # tau alone would call them all interpretable
    assert interpretable.mean() <= 0.05


def planted_features(seed, n_concepts=40, dim=64, per_concept=20, strength=0.3):
    """Image features leaning towards one concept's text feature each (cosine spread
    ~0.09, like real CLIP), one neuron per concept responding to its images, and twice
    as many neurons responding to none: CLIP-Dissect with a real image-text link."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(n_concepts, dim, generator=generator, dtype=torch.float64), dim=1)
    concept_of_image = torch.arange(n_concepts).repeat_interleave(per_concept)
    images = strength * text[concept_of_image] + torch.randn(len(concept_of_image), dim, generator=generator,
                                                             dtype=torch.float64) / dim ** 0.5
    images = torch.nn.functional.normalize(images, dim=1)
    preferred = torch.arange(n_concepts)
    detectors = (concept_of_image[:, None] == preferred[None, :]).double() * 3.0
    detectors += torch.rand(detectors.shape, generator=generator, dtype=torch.float64)
    unrelated = torch.rand(len(concept_of_image), 2 * n_concepts, generator=generator, dtype=torch.float64)
    return images.float(), text.float(), torch.cat([detectors, unrelated], dim=1).float(), preferred


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("similarity", ["soft_wpmi", "cos3"])
def test_chance_level_passes_real_links_and_stops_random_words(clip_model, seed, similarity):
    """A planted image-text link: the detector neurons pass their chance level with the
    right word (>= 95 %; measured 100 %), the unrelated neurons and the same neurons with
    unrelated words (a random rotation of the text) do not (<= 5 %; measured 0-2 %)."""
    detector = CLIPDissect(ARCH, clip_model=clip_model, similarity=similarity,
                           concepts=[f"w{i}" for i in range(40)], top_k=20, threshold=-1e9, progress=False)
    images, text, responses, preferred = planted_features(seed)
    planted = len(preferred)
    sim = detector.similarity_from_responses(images @ text.t(), responses)
    passed = sim.max(dim=1).values.numpy() > detector.chance_levels(responses, images, text)
    assert torch.equal(sim.argmax(dim=1)[:planted], preferred)
    assert passed[:planted].mean() >= 0.95
    assert passed[planted:].mean() <= 0.05
    rotation, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(50 + seed),
                                              dtype=torch.float64))
    unrelated = (text.double() @ rotation).float()
    sim = detector.similarity_from_responses(images @ unrelated.t(), responses)
    assert (sim.max(dim=1).values.numpy() > detector.chance_levels(responses, images, unrelated)).mean() <= 0.05


# --------------------------------------------------------------- disk cache
def test_feature_cache_on_disk_by_default(clip_model, probe, feature_cache_dir, monkeypatch):
    """The default cache directory serves a later process: nothing is computed again."""
    cd._FEATURE_CACHE.clear()
    first = CLIPDissect(ARCH, clip_model=clip_model, concepts=CONCEPTS, progress=False)
    assert first.cache_dir == feature_cache_dir
    expected = first.clip_similarity(probe)
    assert len(list(feature_cache_dir.glob("clip_features_*.npy"))) == 2
    cd._FEATURE_CACHE.clear()  # a new process
    monkeypatch.setattr(CLIPDissect, "_compute_image_features", None)
    monkeypatch.setattr(CLIPDissect, "_compute_text_features", None)
    again = CLIPDissect(ARCH, clip_model=clip_model, concepts=CONCEPTS, progress=False)
    torch.testing.assert_close(again.clip_similarity(probe), expected, rtol=0, atol=0)
    assert CLIPDissect(ARCH, clip_model=clip_model, concepts=CONCEPTS, cache_dir=False).cache_dir is None
    monkeypatch.delenv("TB_CONCEPTEVO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(feature_cache_dir.parent / "xdg"))
    assert cd.default_cache_dir() == feature_cache_dir.parent / "xdg" / "tb_conceptevo"


def test_random_weights_say_labels_mean_nothing(clip_model):
    from tb_conceptevo.writer import labels_notice

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        random = CLIPDissect(ARCH, pretrained=None, concepts=CONCEPTS, progress=False)
    assert "random CLIP weights" in random.unlabelled_reason
    assert CLIPDissect(ARCH, clip_model=clip_model, concepts=CONCEPTS).unlabelled_reason is None
    notice = labels_notice([random], ConceptShapes(n=4, size=16))
    assert "Your own data" in notice and "\n" not in notice


def test_in_memory_feature_cache_is_bounded_least_recently_used_first(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(cd, "FEATURE_CACHE_BYTES", 3 * 400)  # room for three 100-float matrices
    cd._FEATURE_CACHE.clear()
    owner = SimpleNamespace(cache_dir=None)
    computed = []

    def features(key):
        return CLIPDissect._cached(owner, key, lambda: computed.append(key) or torch.full((100,), float(len(computed))))

    for key in "abc":
        features(key)
    features("a")                      # a hit: now the most recently used
    features("d")                      # over budget: "b", the least recently used, goes
    assert list(cd._FEATURE_CACHE) == ["c", "a", "d"] and computed == ["a", "b", "c", "d"]
    features("b")                      # recomputed, evicting "c"
    assert computed[-1] == "b" and list(cd._FEATURE_CACHE) == ["a", "d", "b"]
    assert sum(t.numel() * t.element_size() for t in cd._FEATURE_CACHE.values()) <= cd.FEATURE_CACHE_BYTES
    # one matrix larger than the budget is still kept (the current one is always usable)
    monkeypatch.setattr(cd, "FEATURE_CACHE_BYTES", 10)
    features("e")
    assert list(cd._FEATURE_CACHE) == ["e"]
    cd._FEATURE_CACHE.clear()
