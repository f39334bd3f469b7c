"""Tests of tb_conceptevo.importance (ConceptEvo Eq. 7-9 and the revert evaluation)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tb_conceptevo.format import metadata, summary
from tb_conceptevo.importance import (
    ImportanceResult,
    check_same_architecture,
    class_images,
    class_indices,
    concept_evolution_importance,
    evolution_sensitivity,
    revert_evaluation,
)
from tb_conceptevo.format.payloads import importance_payload, importance_payloads, revert_payload

from tests.conftest import TensorProbe, float64_defaults

N_CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The models here are tiny: intra-op threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(seed: int, inplace: bool = True) -> nn.Sequential:
    """Conv + BN + in-place ReLU + pooling: the cases the hooks must get right."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 7, 3), nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, N_CLASSES),
    ).double()
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return model


CONV_LAYERS = ["0", "4", "6"]
# Where the next layer reads each conv (by hand): after its BatchNorm and ReLU.
READ_AT = {"0": "2", "4": "5", "6": "7"}


def _read_at(layer):
    return layer[:-4] if layer.endswith(".raw") else READ_AT.get(layer, layer)


@pytest.fixture
def snapshots():
    return small_cnn(0), small_cnn(1)


@pytest.fixture
def images():
    return torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def layer_outputs(model, x, layers):
    """Independent capture of each layer's output (copies; eval mode)."""
    store, handles = {}, []
    modules = dict(model.named_modules())
    for name in layers:
        handles.append(modules[_read_at(name)].register_forward_hook(
            lambda m, i, o, name=name: store.__setitem__(name, o.detach().clone())))
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return store


def brute_force_autograd(model_from, x, class_index, layer, channel, z_t, z_t2):
    """d/d eps of logit_c(model_from with Z^t + eps * dZ_n): one autograd call per neuron.

    A per-image eps (shape [B]) gives every image's directional derivative at once.
    """
    direction = torch.zeros_like(z_t)
    direction[:, channel] = z_t2[:, channel] - z_t[:, channel]
    eps = torch.zeros(x.shape[0], dtype=x.dtype, requires_grad=True)
    module = dict(model_from.named_modules())[_read_at(layer)]
    handle = module.register_forward_hook(
        lambda m, i, o: z_t + eps.view(-1, 1, 1, 1) * direction)
    try:
        logits = model_from(x)
        (grad,) = torch.autograd.grad(logits[:, class_index].sum(), eps)
    finally:
        handle.remove()
    return grad


def brute_force_finite_difference(model_from, x, class_index, layer, channel, z_t, z_t2, h=1e-6):
    """Central finite difference of Eq. 8 (float64, no autograd)."""
    direction = torch.zeros_like(z_t)
    direction[:, channel] = z_t2[:, channel] - z_t[:, channel]
    module = dict(model_from.named_modules())[_read_at(layer)]
    values = []
    for sign in (1.0, -1.0):
        handle = module.register_forward_hook(lambda m, i, o, s=sign: z_t + s * h * direction)
        try:
            with torch.no_grad():
                values.append(model_from(x)[:, class_index])
        finally:
            handle.remove()
    return (values[0] - values[1]) / (2 * h)


# --------------------------------------------------------------------------- Eq. 8 correctness


def test_sensitivity_matches_per_neuron_autograd_for_every_neuron(snapshots, images):
    model_from, model_to = snapshots
    z_t = layer_outputs(model_from, images, CONV_LAYERS)
    z_t2 = layer_outputs(model_to, images, CONV_LAYERS)
    for class_index in (0, 3):
        fast = evolution_sensitivity(model_from, model_to, images, class_index)
        assert list(fast) == CONV_LAYERS
        for layer in CONV_LAYERS:
            n_channels = fast[layer].shape[1]
            expected = torch.stack([
                brute_force_autograd(model_from, images, class_index, layer, n, z_t[layer], z_t2[layer])
                for n in range(n_channels)
            ], dim=1)
            scale = expected.abs().max()
            torch.testing.assert_close(fast[layer], expected, rtol=1e-5, atol=1e-9 * float(scale))
            assert (expected != 0).float().mean() > 0.5  # the check is not vacuous


def test_sensitivity_matches_finite_differences(snapshots, images):
    model_from, model_to = snapshots
    # Conv "0" is read at its raw output here: after its ReLU, the exact zeros tie inside
    # the MaxPool windows, where the logit is not differentiable and +h / -h pick other maxima.
    layers = ["0.raw", "4", "6"]
    fast = evolution_sensitivity(model_from, model_to, images, 2, layers=layers)
    z_t = layer_outputs(model_from, images, layers)
    z_t2 = layer_outputs(model_to, images, layers)
    for layer in layers:
        expected = torch.stack([
            brute_force_finite_difference(model_from, images, 2, layer, n, z_t[layer], z_t2[layer])
            for n in range(fast[layer].shape[1])
        ], dim=1)
        torch.testing.assert_close(fast[layer], expected, rtol=1e-5, atol=1e-7 * float(expected.abs().max()))


def test_raw_suffix_differentiates_at_the_conv_output(snapshots, images):
    model_from, model_to = snapshots
    layers = ["0.raw", "0"]
    z_t, z_t2 = layer_outputs(model_from, images, layers), layer_outputs(model_to, images, layers)
    fast = evolution_sensitivity(model_from, model_to, images, 1, layers=layers)
    for layer in layers:
        expected = torch.stack([brute_force_autograd(model_from, images, 1, layer, n, z_t[layer], z_t2[layer])
                                for n in range(6)], dim=1)
        torch.testing.assert_close(fast[layer], expected, rtol=1e-5, atol=1e-9 * float(expected.abs().max()))
    assert not torch.allclose(fast["0.raw"], fast["0"])


def test_gradient_comes_from_model_from(snapshots, images):
    """Eq. 8 differentiates h^t at Z^t: swapping the snapshots is not just a sign flip."""
    model_from, model_to = snapshots
    forward = evolution_sensitivity(model_from, model_to, images, 1)["4"]
    backward = evolution_sensitivity(model_to, model_from, images, 1)["4"]
    assert not torch.allclose(forward, -backward)
    # and it is zero when nothing evolved
    same = evolution_sensitivity(model_from, copy.deepcopy(model_from), images, 1)
    assert all(float(s.abs().max()) == 0.0 for s in same.values())


def test_inplace_relu_gives_same_sensitivity(images):
    inplace = evolution_sensitivity(small_cnn(0, True), small_cnn(1, True), images, 4)
    plain = evolution_sensitivity(small_cnn(0, False), small_cnn(1, False), images, 4)
    for layer in CONV_LAYERS:
        torch.testing.assert_close(inplace[layer], plain[layer], rtol=1e-12, atol=1e-12)


def test_non_conv_layer_and_float32_model(images):
    """Any [B, C, ...] output works (a Linear layer's units); float32 models get float32 inputs."""
    model_from, model_to = small_cnn(0).float(), small_cnn(1).float()
    s = evolution_sensitivity(model_from, model_to, images, 0, layers=["10", "4"])
    assert s["10"].shape == (5, N_CLASSES) and s["10"].dtype == torch.float32
    # the logit layer's own "neurons": S_n = 1[n == c] * (logit'_c - logit_c)
    logits_to, logits_from = model_to.eval()(images.float()), model_from.eval()(images.float())
    delta = (logits_to - logits_from).detach()
    torch.testing.assert_close(s["10"][:, 0], delta[:, 0], rtol=1e-5, atol=1e-6)
    assert float(s["10"][:, 1:].abs().max()) == 0.0


# --------------------------------------------------------------------------- Eq. 9 aggregation


def test_importance_is_fraction_of_positive_sensitivities(snapshots):
    model_from, model_to = snapshots
    x = torch.randn(23, 3, 12, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s = evolution_sensitivity(model_from, model_to, x, 2)
    result = concept_evolution_importance(model_from, model_to, x, 2, batch_size=4, progress=False,
                                          from_step=3, to_step=9)
    assert isinstance(result, ImportanceResult) and result.n_images == 23
    assert result.layer_names == CONV_LAYERS and (result.from_step, result.to_step) == (3, 9)
    for layer in CONV_LAYERS:
        li = result[layer]
        np.testing.assert_allclose(li.importance, (s[layer] > 0).double().mean(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(li.mean_sensitivity, s[layer].mean(0).numpy(), rtol=1e-5)
        np.testing.assert_array_equal(li.positive_count, (s[layer] > 0).sum(0).numpy())
        assert not li.flagged.any()
        ranking = li.ranking()
        assert sorted(ranking.tolist()) == list(range(li.n_neurons))
        assert np.all(np.diff(li.importance[ranking]) <= 0)
    assert len(result.top(3)) == 3


def test_tensor_labels_dataset_and_loader_inputs_agree(snapshots):
    model_from, model_to = snapshots
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, 3, 12, 12, generator=g, dtype=torch.float64)
    labels = torch.arange(30) % 3
    ref = concept_evolution_importance(model_from, model_to, x[labels == 1], 1, progress=False)
    by_labels = concept_evolution_importance(model_from, model_to, x, 1, labels=labels, progress=False)
    dataset = torch.utils.data.TensorDataset(x, labels)
    by_dataset = concept_evolution_importance(model_from, model_to, dataset, 1, batch_size=4, progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=7)
    by_loader = concept_evolution_importance(model_from, model_to, loader, 1, progress=False)
    probe = TensorProbe(x, labels.tolist())
    by_probe = concept_evolution_importance(model_from, model_to, probe, 1, progress=False)
    for other in (by_labels, by_dataset, by_loader, by_probe):
        assert other.n_images == 10
        for layer in CONV_LAYERS:
            np.testing.assert_allclose(other[layer].importance, ref[layer].importance)
            np.testing.assert_allclose(other[layer].mean_sensitivity, ref[layer].mean_sensitivity,
                                       rtol=1e-5, atol=1e-6)
    capped = concept_evolution_importance(model_from, model_to, dataset, 1, max_images=4, progress=False)
    assert capped.n_images == 4


def test_non_finite_neurons_are_flagged_and_the_rest_kept(snapshots, images):
    model_from, model_to = snapshots
    broken = copy.deepcopy(model_to)
    with torch.no_grad():
        broken[6].weight[2] = float("nan")   # channel 2 of the last conv: Z^t' is NaN
    clean = concept_evolution_importance(model_from, model_to, images, 0, layers=["6"], progress=False)
    result = concept_evolution_importance(model_from, broken, images, 0, layers=["6"], progress=False)
    li = result["6"]
    assert li.flagged.tolist() == [c == 2 for c in range(7)]
    assert np.isnan(li.importance[2]) and np.isnan(li.mean_sensitivity[2])
    assert li.nonfinite_count[2] == images.shape[0]
    keep = np.arange(7) != 2
    np.testing.assert_allclose(li.importance[keep], clean["6"].importance[keep])
    np.testing.assert_allclose(li.mean_sensitivity[keep], clean["6"].mean_sensitivity[keep], rtol=1e-6)
    assert 2 not in li.ranking()


# --------------------------------------------------------------------------- bad input


def test_architecture_mismatch_names_the_layer(images):
    model_from = small_cnn(0)
    wider = small_cnn(1)
    wider[4] = nn.Conv2d(6, 9, 3, padding=1).double()
    with pytest.raises(ValueError, match=r"layer '4'.*\[8, 6, 3, 3\].*\[9, 6, 3, 3\]"):
        concept_evolution_importance(model_from, wider, images, 0, progress=False)
    other_type = small_cnn(1)
    other_type[7] = nn.Tanh()
    with pytest.raises(ValueError, match="layer '7'"):
        check_same_architecture(model_from, other_type, ["7"])
    with pytest.raises(TypeError, match="nn.Module"):
        check_same_architecture(model_from, "not a model")


def test_unknown_layer_lists_close_matches(snapshots, images):
    model = torch.nn.Module()
    model.features = small_cnn(0)
    other = torch.nn.Module()
    other.features = small_cnn(1)
    with pytest.raises(ValueError, match="features.4"):
        evolution_sensitivity(model, other, images, 0, layers=["features.44"])


def test_class_index_errors(snapshots, images):
    model_from, model_to = snapshots
    with pytest.raises(ValueError, match=r"out of range: the model has 5 outputs"):
        concept_evolution_importance(model_from, model_to, images, 5, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        concept_evolution_importance(model_from, model_to, images, -1, progress=False)
    with pytest.raises(TypeError, match="class_index must be an int"):
        concept_evolution_importance(model_from, model_to, images, "cat", progress=False)


def test_class_without_images(snapshots, images):
    model_from, model_to = snapshots
    labels = torch.tensor([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"no images of class 3.*classes present: \[0, 1, 2\]"):
        concept_evolution_importance(model_from, model_to, images, 3, labels=labels, progress=False)
    dataset = torch.utils.data.TensorDataset(images, labels)
    with pytest.raises(ValueError, match="no images of class 4"):
        concept_evolution_importance(model_from, model_to, dataset, 4, progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    with pytest.raises(ValueError, match="no images of class 4"):
        concept_evolution_importance(model_from, model_to, loader, 4, progress=False)
    with pytest.raises(TypeError, match="images must be"):
        concept_evolution_importance(model_from, model_to, [1, 2, 3], 0, progress=False)


def test_hooks_removed_and_state_restored_after_errors(snapshots, images):
    model_from, model_to = snapshots
    model_from.train()
    model_from[1].eval()                      # a mixed-mode model (frozen BN)
    model_to.train()
    model_from[0].weight.requires_grad_(False)
    before_modes = [m.training for m in model_from.modules()]
    before_grads = [p.requires_grad for p in model_from.parameters()]

    def assert_clean():
        for model in (model_from, model_to):
            for module in model.modules():
                assert not module._forward_hooks and not module._forward_pre_hooks
        assert [m.training for m in model_from.modules()] == before_modes
        assert [p.requires_grad for p in model_from.parameters()] == before_grads
        assert all(m.training for m in model_to.modules())
        assert all(p.requires_grad for p in model_to.parameters())

    with pytest.raises(ValueError, match="out of range"):
        concept_evolution_importance(model_from, model_to, images, 9, progress=False)
    assert_clean()

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    # A model failing after the hooked layers: as model_from (its gradient pass runs to
    # the logits) and as model_to of the revert evaluation.
    exploding = copy.deepcopy(model_to)
    exploding[8] = nn.Sequential(nn.AdaptiveAvgPool2d(1), Boom())
    exploding.train()
    with pytest.raises(RuntimeError, match="boom"):
        concept_evolution_importance(exploding, model_to, images, 0, progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        revert_evaluation(model_from, exploding, images, 0, {"0": np.arange(6.0)}, progress=False)
    for module in exploding.modules():
        assert not module._forward_hooks and module.training
    assert all(p.requires_grad for p in exploding.parameters())
    assert_clean()
    # and the hooked computation still works afterwards
    result = concept_evolution_importance(model_from, model_to, images, 0, progress=False)
    assert result.n_images == 5
    assert_clean()


def test_module_running_twice_is_rejected(images):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.conv(self.conv(x)).mean((2, 3)))

    with pytest.raises(ValueError, match="ran twice"):
        evolution_sensitivity(Twice().double(), Twice().double(), images, 0)


# --------------------------------------------------------------------------- helpers and payloads


def test_class_images_helper_is_deterministic_and_filters():
    g = torch.Generator().manual_seed(0)
    probe = TensorProbe(torch.rand(40, 3, 8, 8, generator=g), [i % 4 for i in range(40)])
    idx = class_indices(probe, 2, n=5, seed=1)
    assert len(idx) == 5 and all(i % 4 == 2 for i in idx) and list(idx) == sorted(idx)
    np.testing.assert_array_equal(idx, class_indices(probe, 2, n=5, seed=1))
    assert not np.array_equal(idx, class_indices(probe, 2, n=5, seed=2))
    imgs = class_images(probe, 2, n=5, seed=1)
    torch.testing.assert_close(imgs, probe.images[torch.from_numpy(idx)])
    assert class_images(probe, 2, n=100).shape[0] == 10
    with pytest.raises(ValueError, match="no images of class 7"):
        class_images(probe, 7)


def test_payloads_round_trip(snapshots, images):
    model_from, model_to = snapshots
    broken = copy.deepcopy(model_to)
    with torch.no_grad():
        broken[6].weight[0] = float("inf")
    result = concept_evolution_importance(model_from, broken, images, 3, progress=False,
                                          class_name="star", from_step=2, to_step=7)
    payloads = importance_payloads(result)
    assert list(payloads) == [metadata.importance_tag(3, layer) for layer in CONV_LAYERS]
    header, arrays = importance_payload(result, "6")
    blobs = summary.pack(header, arrays)    # NaNs live in arrays, never in the JSON header
    head, decoded = summary.unpack(blobs)
    assert head["class_index"] == 3 and head["class_name"] == "star" and head["layer"] == "6"
    assert (head["from_step"], head["to_step"], head["n_neurons"]) == (2, 7, 7)
    assert head["n_flagged"] == 1 and decoded["flagged"].tolist()[0] == 1
    np.testing.assert_array_equal(decoded["importance"], result["6"].importance)
    assert metadata.parse_tag(metadata.importance_tag(3, "6")) == ("importance", ("3",), "6")

    revert = revert_evaluation(model_from, model_to, images, 3, result, layers=["0", "4"],
                               seeds=(0, 1), progress=False)
    header, arrays = revert_payload(revert)
    head, decoded = summary.unpack(summary.pack(header, arrays))
    assert head["layers"] == ["0", "4"] and head["bin_labels"] == ["0-25%", "25-50%", "50-75%", "75-100%"]
    assert head["class_name"] == "star" and head["to_step"] == 7
    assert decoded["bin_accuracy_change"].shape == (2, 4)
    assert decoded["random_accuracy_change"].shape == (2, 2)
    assert decoded["bin_sizes"].sum(1).tolist() == [6, 8]
    assert decoded["random_sizes"].tolist() == [2, 2]
    summary.payload_summary(metadata.revert_tag(3), header, arrays)  # serialisable as a summary


# --------------------------------------------------------------------------- revert evaluation


def test_reverting_every_neuron_of_the_logit_layer_gives_model_from(snapshots, images):
    model_from, model_to = snapshots
    # The Linear head's units are neurons too; reverting all of them (one bin) turns
    # model_to's logits into model_from's.
    result = concept_evolution_importance(model_from, model_to, images, 1, layers=["10"], progress=False)
    single = revert_evaluation(model_from, model_to, images, 1, result, n_bins=1, seeds=(0,), progress=False)
    with torch.no_grad():
        logits_from = model_from.eval()(images)
        logits_to = model_to.eval()(images)
    expected_change = float((logits_from[:, 1] - logits_to[:, 1]).mean())
    np.testing.assert_allclose(single.bin_logit_change[0, 0], expected_change, rtol=1e-9)
    acc_from = float((logits_from.argmax(1) == 1).double().mean())
    acc_to = float((logits_to.argmax(1) == 1).double().mean())
    assert single.baseline_accuracy == pytest.approx(acc_to)
    assert single.bin_accuracy_change[0, 0] == pytest.approx(acc_from - acc_to)
    # a random bin of the full size is the same set
    np.testing.assert_allclose(single.random_logit_change, single.bin_logit_change)


def test_revert_substitutes_only_the_binned_channels(snapshots, images):
    model_from, model_to = snapshots
    scores = {"4": np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4])}
    table = revert_evaluation(model_from, model_to, images, 2, scores, n_bins=4, seeds=(5,), progress=False)
    np.testing.assert_array_equal(table.bin_sizes, [[2, 2, 2, 2]])
    # reference: bin 0 = channels {0, 2}, reverted by hand
    z_from = layer_outputs(model_from, images, ["4"])["4"]
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[0, 2]] = True
    handle = model_to[5].register_forward_hook(  # the ReLU after conv "4": what conv "6" reads
        lambda m, i, o: torch.where(mask.view(1, -1, 1, 1), z_from, o))
    try:
        with torch.no_grad():
            reverted = model_to.eval()(images)[:, 2]
    finally:
        handle.remove()
    with torch.no_grad():
        base = model_to(images)[:, 2]
    np.testing.assert_allclose(table.bin_logit_change[0, 0], float((reverted - base).mean()), rtol=1e-9)
    with pytest.raises(ValueError, match="fewer than n_bins"):
        revert_evaluation(model_from, model_to, images, 2, scores, n_bins=9, progress=False)
    result = concept_evolution_importance(model_from, model_to, images, 1, layers=["4"], progress=False)
    with pytest.raises(ValueError, match="computed for class 1"):
        revert_evaluation(model_from, model_to, images, 2, result, progress=False)


@pytest.fixture(scope="module")
def trained_snapshots(single_thread):
    """A tiny CNN trained for 300 steps on ConceptShapes colours: snapshots at 10 and 300.

    Initialised and trained in float64: in float32, one-ulp differences between CPU
    code paths (ATEN_CPU_CAPABILITY, threads) grow through training into different
    networks; in float64 the trained weights agree to ~1e-10 on every machine, so the
    assertions below are about the method, not about the machine."""
    probes = pytest.importorskip("tb_conceptevo.probes")
    train = probes.ConceptShapes(n=600, size=24, seed=1, label="colour")
    x = train.images(np.arange(len(train))).double()
    y = torch.from_numpy(train.labels)
    n_classes = len(train.class_names)
    torch.manual_seed(0)
    with float64_defaults():
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, n_classes),
        )
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    generator = torch.Generator().manual_seed(0)
    snapshots = {}
    for step in range(1, 301):
        batch = torch.randint(0, len(train), (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step in (10, 300):
            snapshots[step] = copy.deepcopy(model)
    probe = probes.ConceptShapes(n=300, size=24, seed=5, label="colour")
    return snapshots[10], snapshots[300], probe, n_classes


def test_reverting_important_evolutions_hurts_most(trained_snapshots):
    model_from, model_to, probe, n_classes = trained_snapshots
    means, randoms, logits = [], [], []
    for class_index in range(n_classes):
        table = revert_evaluation(model_from, model_to, probe, class_index, progress=False)
        assert table.n_images > 10 and table.baseline_accuracy > 0.5
        means.append(table.mean_change)
        randoms.append(table.random_mean)
        logits.append(table.bin_logit_change.mean(0))
    # The paper's claim is about the average over classes (single classes of a
    # 7-class toy net can invert the end bins); the network is trained in float64, so
    # these class averages are the same on every machine.
    means = np.mean(means, axis=0)
    assert means[0] < means[-1]
    assert means[0] < np.mean(randoms) < means[-1]
    assert means[0] < -0.2          # reverting the top quartile costs real accuracy
    logits = np.mean(logits, axis=0)
    assert logits[0] < logits[1] < logits[-1]


# --------------------------------------------------------------------------- command line


FACTORY_SOURCE = '''
import torch
from torch import nn

def make():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))

NOT_A_FUNCTION = 3
'''


def run_cli(argv):
    import argparse

    from tb_conceptevo.cli import importance as importance_cli

    parser = argparse.ArgumentParser(prog="tb-conceptevo")
    importance_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["importance"] + argv)
    return args.func(args)


def read_payloads(run_dir):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    import glob

    found = {}
    for path in sorted(glob.glob(str(run_dir / "events.out.tfevents.*"))):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME
                found[value.tag] = (event.step, summary.unpack(list(value.tensor.string_val)))
    return found


@pytest.fixture
def cli_setup(tmp_path):
    pytest.importorskip("tb_conceptevo.probes")
    factory = tmp_path / "tiny_models.py"
    factory.write_text(FACTORY_SOURCE)
    namespace = {}
    exec(FACTORY_SOURCE, namespace)
    torch.manual_seed(0)
    torch.save(namespace["make"]().state_dict(), tmp_path / "t.pt")
    torch.save({"model": namespace["make"]().state_dict(), "epoch": 9}, tmp_path / "t2.pt")
    base = ["--factory", f"{factory}:make", "--from", str(tmp_path / "t.pt"), "--to", str(tmp_path / "t2.pt"),
            "--images", "concept_shapes:n=96,size=32,seed=0", "--logdir", str(tmp_path / "runs"),
            "--run", "r1", "--from-step", "3", "--to-step", "9", "--n-images", "8", "--no-progress"]
    return tmp_path, base


def test_cli_writes_importance_and_revert_events(cli_setup, capsys):
    tmp_path, base = cli_setup
    assert run_cli(base + ["--class", "1", "--class", "star", "--revert", "--revert-seeds", "0", "1"]) == 0
    found = read_payloads(tmp_path / "runs" / "r1")
    star = 3
    expected = {metadata.importance_tag(c, layer) for c in (1, star) for layer in ("0", "3")}
    expected |= {metadata.revert_tag(1), metadata.revert_tag(star)}
    assert set(found) == expected
    step, (header, arrays) = found[metadata.importance_tag(star, "3")]
    assert step == 9 and header["class_name"] == "star" and header["from_step"] == 3
    assert header["n_images"] == 8 and arrays["importance"].shape == (8,)
    step, (header, arrays) = found[metadata.revert_tag(1)]
    assert header["layers"] == ["0", "3"] and arrays["random_accuracy_change"].shape == (2, 2)
    assert "importance" in capsys.readouterr().out


def test_cli_bad_input(cli_setup, tmp_path):
    tmp_path, base = cli_setup
    args = dict(zip(base[::2], base[1::2]))

    def with_(**changes):
        merged = dict(args, **changes)
        return [x for pair in merged.items() for x in pair] + ["--no-progress", "--class", "0"]

    with pytest.raises(ValueError, match="module:function"):
        run_cli(with_(**{"--factory": "no_colon_here"}))
    with pytest.raises(ValueError, match="cannot import module"):
        run_cli(with_(**{"--factory": "surely_not_a_module_xyz:make"}))
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        run_cli(with_(**{"--factory": f"{tmp_path / 'tiny_models.py'}:nope"}))
    with pytest.raises(ValueError, match="not callable"):
        run_cli(with_(**{"--factory": f"{tmp_path / 'tiny_models.py'}:NOT_A_FUNCTION"}))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit the factory's model: missing"):
        run_cli(with_(**{"--to": str(tmp_path / "other.pt")}))
    with pytest.raises(FileNotFoundError):
        run_cli(with_(**{"--from": str(tmp_path / "missing.pt")}))
    with pytest.raises(ValueError, match="neither a folder nor a probe set"):
        run_cli(with_(**{"--images": "imagenet:n=3"}))
    with pytest.raises(ValueError, match="neither an index nor a class name"):
        run_cli(with_() + ["--class", "hexagon"])
    assert not (tmp_path / "runs").exists()  # nothing written on errors
