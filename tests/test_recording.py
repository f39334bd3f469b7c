"""Streaming top-k equals brute force on torchvision models and a custom model."""


import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tb_conceptevo.recording import list_layers, merge_topk, record, resolve_layers
from tests.conftest import ExactBranchy, TensorProbe, integer_probe, random_probe


def brute_force(model, probe, layer_names, k, reduce="max", batch_size=None, read_at=None):
    """Full activations of every image, then a per-neuron sort (ties: lower index).

    Same batches as the recorder so the floats are bit-identical (conv kernels may
    round differently for other batch sizes, which would reorder near-ties).
    ``read_at`` maps a layer to ``(module name, call)``: read that module's output at
    its ``call``-th call per forward pass (default: the layer's own output, ``".raw"``
    stripped)."""
    outputs = {}
    modules = dict(model.named_modules())
    read_at = read_at or {}
    hooks = []
    for n in layer_names:
        target, call = read_at.get(n, (n[:-4] if n.endswith(".raw") else n, 0))
        counter = {"calls": 0}

        def hook(m, i, o, n=n, call=call, counter=counter):
            if counter["calls"] == call:
                outputs.setdefault(n, []).append(o.detach().clone())  # clone: inplace ReLU follows
            counter["calls"] += 1
        hooks.append((counter, modules[target].register_forward_hook(hook)))
    model.eval()
    with torch.no_grad():
        for chunk in torch.split(probe.images, batch_size or len(probe)):
            for counter, _ in hooks:
                counter["calls"] = 0
            model(chunk)
    for _, h in hooks:
        h.remove()
    result = {}
    for name in layer_names:
        fmap = torch.cat(outputs[name]).flatten(2)  # [n, C, HW]
        peak, argmax = fmap.max(dim=2)
        resp = peak if reduce == "max" else fmap.mean(dim=2)
        resp = resp.t().numpy()  # [C, n]
        order = np.lexsort((np.broadcast_to(np.arange(resp.shape[1]), resp.shape), -resp), axis=1)[:, :k]
        result[name] = (order, np.take_along_axis(resp, order, 1), np.take_along_axis(argmax.t().numpy(), order, 1))
    return result


class Branchy(nn.Module):
    """A user model with a non-sequential forward (two branches and a skip)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 6, 3, padding=1)
        self.right = nn.Conv2d(8, 6, 5, padding=2)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.left(x) + torch.sigmoid(self.right(x))
        return self.head(y.mean(dim=(2, 3)))


def _check(model, probe, layers, k, batch_size, reduce="max", read_at=None):
    names = [n for n, _ in resolve_layers(model, layers)]
    obs = record(model, probe, names, k=k, batch_size=batch_size, reduce=reduce, progress=False)
    expected = brute_force(model, probe, names, k, reduce, batch_size, read_at)
    for name in names:
        ids, values, positions = expected[name]
        got = obs[name]
        np.testing.assert_array_equal(got.image_ids, ids)
        np.testing.assert_allclose(got.activations, values, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.positions, positions)
        assert not got.invalid.any()
    return obs


def _raw(model):
    return [n + ".raw" for n in list_layers(model, conv_only=True)]


@pytest.mark.parametrize("factory,size,layers", [
    (lambda: torchvision.models.vgg16(), 32, ["features.0.raw", "features.10.raw", "features.28.raw"]),
    (lambda: torchvision.models.resnet18(), 32, _raw(torchvision.models.resnet18())),
    (lambda: torchvision.models.convnext_tiny(), 32, ["features.1.0.block.0", "features.5.2.block.0"]),
    (lambda: torchvision.models.inception_v3(init_weights=False, aux_logits=False), 80,
     ["Conv2d_1a_3x3.conv.raw", "Mixed_5b.branch_pool.conv.raw"]),
])
def test_raw_conv_topk_matches_brute_force_on_torchvision(factory, size, layers):
    torch.manual_seed(0)
    model = factory()
    probe = random_probe(n=24, size=size)
    _check(model, probe, layers, k=5, batch_size=7)


# Where the next layer reads each conv, by hand from the torchvision sources.
@pytest.mark.parametrize("factory,size,read_at", [
    (lambda: torchvision.models.vgg16(), 32, {"features.0": ("features.1", 0), "features.28": ("features.29", 0)}),
    (lambda: torchvision.models.resnet18(), 32, {
        "conv1": ("relu", 0), "layer1.0.conv1": ("layer1.0.relu", 0), "layer1.0.conv2": ("layer1.0.bn2", 0),
        "layer2.0.downsample.0": ("layer2.0.downsample.1", 0), "layer4.1.conv1": ("layer4.1.relu", 0)}),
    # ConvNeXt: a permute follows the depthwise conv, so it is read at its own output
    (lambda: torchvision.models.convnext_tiny(), 32, {"features.1.0.block.0": ("features.1.0.block.0", 0)}),
    (lambda: torchvision.models.inception_v3(init_weights=False, aux_logits=False), 80,
     {"Conv2d_1a_3x3.conv": ("Conv2d_1a_3x3.bn", 0)}),  # BasicConv2d applies F.relu: not a module
])
def test_default_point_is_after_norm_and_activation(factory, size, read_at):
    torch.manual_seed(0)
    model = factory()
    obs = _check(model, random_probe(n=24, size=size), list(read_at), k=5, batch_size=7, read_at=read_at)
    for name, (module, _) in read_at.items():
        assert obs[name].hook["module"] == module


def test_custom_model_mean_and_batch_independence():
    torch.manual_seed(0)
    _check(Branchy(), random_probe(n=50, size=16), ["left", "right"], k=4, batch_size=9, reduce="mean")
    # Batch independence is exact only where the activations are: integer-exact model
    # and images (float kernels may round differently for other batch compositions).
    model, probe = ExactBranchy(), integer_probe(n=50, size=16)
    a = _check(model, probe, None, k=6, batch_size=8)
    b = _check(model, probe, None, k=6, batch_size=50)
    assert all(a[name].hook["after"] == [] for name in a)  # torch.relu is a function, not a module
    for name in a:
        np.testing.assert_array_equal(a[name].image_ids, b[name].image_ids)
        np.testing.assert_array_equal(a[name].activations, b[name].activations)
        np.testing.assert_array_equal(a[name].positions, b[name].positions)


def test_ties_broken_by_lower_index():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            nn.init.zeros_(self.conv.weight)
            nn.init.ones_(self.conv.bias)

        def forward(self, x):
            return self.conv(x)

    obs = record(Constant(), random_probe(n=20, size=4), k=5, batch_size=3, progress=False)
    np.testing.assert_array_equal(obs["conv"].image_ids, [[0, 1, 2, 3, 4]] * 2)


def test_merge_topk_any_order():
    values = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
    ids = torch.tensor([[7, 9, 4, 1]])
    pos = torch.tensor([[0, 1, 2, 3]])
    v, i, p = merge_topk(values, ids, pos, 3)
    assert i.tolist() == [[4, 9, 1]] and p.tolist() == [[2, 1, 3]]


def test_state_restored_and_hooks_removed_on_error():
    model = Branchy().train()
    model.left.eval()  # a mixed state must come back exactly
    calls = {"n": 0}

    def boom(*_):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("boom")

    handle = model.right.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        record(model, random_probe(n=30, size=8), k=2, batch_size=4, progress=False)
    handle.remove()
    assert model.training and not model.left.training and model.right.training
    for module in model.modules():
        assert not module._forward_hooks
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("size", [6, 4, 2], ids=["36-cell-maps", "16-cell-maps", "4-cell-maps"])
def test_nan_neurons_flagged_rest_recorded(size):
    class Inject(nn.Module):
        def forward(self, y):
            y = y.clone()
            y[:3, 1] = float("nan")   # channel 1 NaN on the first images of each batch
            y[:, 2, 0, 0] = float("inf")
            return y

    class Nanny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.inject = Inject()

        def forward(self, x):
            return self.inject(self.conv(x))

    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="2 neurons produced NaN/Inf"):
        obs = record(Nanny(), random_probe(n=12, size=size), ["inject"], k=3, batch_size=12, progress=False)
    layer = obs["inject"]
    assert layer.invalid.tolist() == [False, True, True, False]
    assert (layer.image_ids[1] >= 3).all()  # ranked on finite responses only
    assert np.isnan(layer.activations[1]).sum() == 0 and np.isfinite(layer.activations[2]).all()
    assert np.isfinite(layer.activations[[0, 3]]).all()


def test_bad_inputs_have_clear_errors():
    model = Branchy()
    probe = random_probe(n=10, size=8)
    with pytest.raises(ValueError, match=r"unknown layer 'lefft'.*'left'.*list_layers"):
        record(model, probe, ["lefft"], k=2, progress=False)
    with pytest.raises(ValueError, match="no nn.Conv2d layers"):
        record(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 2)), probe, k=2, progress=False)
    with pytest.raises(ValueError, match="larger than the probe set"):
        record(model, probe, k=11, progress=False)
    with pytest.raises(ValueError, match="probe set is empty"):
        record(model, random_probe(n=0, size=8), k=1, progress=False)
    with pytest.raises(ValueError, match="cannot take the probe images"):
        record(torchvision.models.vgg11(), random_probe(n=4, size=8).__class__(torch.rand(4, 1, 8, 8)), k=1, progress=False)
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.pair = Pair()

        def forward(self, x):
            return self.pair(self.conv(x))[0]

    with pytest.raises(ValueError, match=r"layer 'pair' returns a tuple, not a tensor; record a module inside it"):
        record(Holder(), probe, ["pair"], k=2, progress=False)
    five = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Unflatten(1, (2, 2)))
    with pytest.raises(ValueError, match=r"layer '1' returns a 5-d tensor .*no channel axis found"):
        record(five, probe, ["1"], k=2, progress=False)
    for module in model.modules():
        assert not module._forward_hooks


def test_list_layers():
    names = list_layers(torchvision.models.resnet18(), conv_only=True)
    assert names[:2] == ["conv1", "layer1.0.conv1"] and "layer4.1.conv2" in names


def test_distributed_refuses_consumers_that_cannot_merge(monkeypatch):
    from tb_conceptevo.recording import RecordingConsumer, recorder

    monkeypatch.setattr(recorder, "rank_and_world", lambda: (0, 2))
    with pytest.raises(ValueError, match="cannot merge results across torch.distributed"):
        record(Branchy(), random_probe(n=8, size=8), k=2, consumers=[RecordingConsumer()], progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_probe_batches_follow_the_model_dtype(dtype):
    """float64, half and bfloat16 models get their probe images in their own dtype
    (float32 images into a float64 or bfloat16 conv would raise a dtype mismatch)."""
    torch.manual_seed(0)
    reference_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)).double()
    model = copy.deepcopy(reference_model).to(dtype)
    probe = integer_probe(n=12, size=10)
    obs = record(model, probe, k=3, batch_size=5, progress=False)
    reference = record(reference_model, probe, k=3, batch_size=5, progress=False)
    for name in obs:
        assert obs[name].activations.dtype == np.float32 and np.isfinite(obs[name].activations).all()
        # The point is that the model ran in its own dtype; its top responses agree with
        # float64 to a few percent of the layer's scale (bfloat16 keeps 8 mantissa bits:
        # a relative rounding of 2**-9 per value, a handful of roundings per output).
        scale = float(np.abs(reference[name].activations).max())
        np.testing.assert_allclose(obs[name].activations[:, 0], reference[name].activations[:, 0],
                                   rtol=0, atol=0.05 * scale)


class SharedConv(nn.Module):
    """One conv applied to two views of the image (weight sharing), then a reused ReLU."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            self.shared.weight.copy_(torch.randint(-3, 4, self.shared.weight.shape, generator=g).float())

    def forward(self, x):
        a = self.relu(self.shared(x))
        b = self.relu(self.shared(x.flip(-1)))
        return (a + b).mean(dim=(2, 3))


def _max_over_calls(model, probe, name, k):
    """Brute force: every call's map of every image; response = max over calls."""
    outputs = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    with torch.no_grad():
        for image in probe.images:
            model(image[None])
    handle.remove()
    calls = len(outputs) // len(probe)
    maps = torch.stack(outputs).view(len(probe), calls, *outputs[0].shape[1:])  # [n, calls, C, H, W]
    per_call = maps.flatten(3).amax(dim=3)                                    # [n, calls, C]
    response, winner = per_call.max(dim=1)                                     # [n, C]
    best = maps[torch.arange(len(probe))[:, None], winner, torch.arange(maps.shape[2])[None]]  # [n, C, H, W]
    positions = best.flatten(2).argmax(dim=2)
    resp = response.t().numpy()
    order = np.lexsort((np.broadcast_to(np.arange(resp.shape[1]), resp.shape), -resp), axis=1)[:, :k]
    return order, np.take_along_axis(resp, order, 1), np.take_along_axis(positions.t().numpy(), order, 1)


@pytest.mark.parametrize("layer", ["shared", "relu"])
def test_module_called_twice_per_forward_merges_calls(layer):
    """Weight sharing and a reused activation: the response is the max over the calls
    (integer-exact model and images, so the comparison is exact) and no image appears
    twice in a neuron's top-k."""
    model, probe = SharedConv(), integer_probe(n=30, size=10)
    with pytest.warns(RuntimeWarning, match="run several times per forward pass"):
        obs = record(model, probe, [layer], k=6, batch_size=7, progress=False)
    ids, values, positions = _max_over_calls(model, probe, layer, 6)
    got = obs[layer]
    assert all(len(set(row)) == len(row) for row in got.image_ids.tolist())
    np.testing.assert_array_equal(got.image_ids, ids)
    np.testing.assert_array_equal(got.activations, values)
    np.testing.assert_array_equal(got.positions, positions)


def test_reused_relu_of_a_resnet_has_no_duplicate_stimuli():
    model = torchvision.models.resnet18(num_classes=4).eval()
    with pytest.warns(RuntimeWarning, match="run several times"):
        obs = record(model, random_probe(n=40, size=32), ["layer1.0.relu"], k=10, batch_size=16, progress=False)
    ids = obs["layer1.0.relu"].image_ids
    assert all(len(set(row)) == len(row) for row in ids.tolist())


def test_module_called_at_two_sizes_is_refused_clearly():
    class TwoScales(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.shared(x).mean() + self.shared(x[..., ::2, ::2]).mean()

    with pytest.raises(ValueError, match="different output shapes"):
        record(TwoScales(), random_probe(n=6, size=8), ["shared"], k=2, progress=False)


def _resnet_bn_of(conv_name):
    """By hand from torchvision's ResNet: the BatchNorm after each conv, and whether a
    ReLU module reads it directly (conv2's BatchNorm feeds the residual add instead)."""
    if conv_name == "conv1":
        return "bn1", True
    if conv_name.endswith("downsample.0"):
        return conv_name[:-1] + "1", False
    block, conv = conv_name.rsplit(".", 1)
    return f"{block}.bn{conv[-1]}", conv == "conv1"


@pytest.mark.parametrize("seed", [0, 1])
def test_negative_batchnorm_scales_rank_by_what_the_next_layer_reads(seed):
    """Half the BatchNorm scales of a resnet18 flipped: the recorded top-k of every
    conv channel is the brute-force top-k of the post-BatchNorm(+ReLU) response, which
    for a flipped channel is not the raw conv ranking.  float64 model and images, and a
    checked gap between the k-th and (k+1)-th response, so no tie or rounding decides."""
    from tests.conftest import float64_defaults

    with float64_defaults():
        model = torchvision.models.resnet18(num_classes=3)
    g = torch.Generator().manual_seed(seed)
    flipped = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                flip = torch.randperm(channels, generator=g)[: channels // 2]
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.weight[flip] *= -1
                module.bias.uniform_(-0.2, 0.2, generator=g)
                module.running_mean.uniform_(-0.1, 0.1, generator=g)
                module.running_var.uniform_(0.5, 2.0, generator=g)
                flipped[name] = np.sort(flip.numpy())
    probe = TensorProbe(torch.rand(30, 3, 32, 32, generator=g, dtype=torch.float64))
    probe.images = probe.images.double()
    convs = list_layers(model, conv_only=True)
    k = 4
    obs = record(model, probe, convs + [c + ".raw" for c in convs], k=k, batch_size=8, progress=False)

    # Brute force: every image's BatchNorm output, ReLU by hand where a ReLU reads it.
    outputs = {}
    modules = dict(model.named_modules())
    handles = [modules[bn].register_forward_hook(lambda m, i, o, bn=bn: outputs.setdefault(bn, []).append(o.detach().clone()))
               for bn in flipped]
    model.eval()
    with torch.no_grad():
        for chunk in torch.split(probe.images, 8):
            model(chunk)
    for h in handles:
        h.remove()
    differs_from_raw = 0
    for conv in convs:
        bn, relu = _resnet_bn_of(conv)
        fmap = torch.cat(outputs[bn])
        fmap = torch.relu(fmap) if relu else fmap
        response, argmax = fmap.flatten(2).max(dim=2)
        response = response.t().numpy()  # [C, n]
        order = np.argsort(-response, axis=1, kind="stable")
        ranked = np.take_along_axis(response, order, 1)
        channels = flipped[bn]
        # Every order decision in the top k+1 is either a clear gap or an exact tie at the
        # ReLU's 0 (broken by the lower index on both sides), never a rounding near-tie.
        top = ranked[channels, : k + 1]
        gaps = top[:, :-1] - top[:, 1:]
        exact_zero_tie = (gaps == 0) & (top[:, 1:] == 0)
        assert ((gaps > 1e-9 * np.abs(top).max()) | exact_zero_tie).all(), "data must be tie-free"
        got = obs[conv]
        assert got.hook["after"] == (["norm", "activation"] if relu else ["norm"])
        np.testing.assert_array_equal(got.image_ids[channels], order[channels, :k])
        np.testing.assert_allclose(got.activations[channels], ranked[channels, :k], rtol=1e-6)
        np.testing.assert_array_equal(got.positions[channels], np.take_along_axis(argmax.t().numpy(), order, 1)[channels, :k])
        # A flipped channel's raw conv ranking is (nearly) the reverse: the old unit was wrong.
        raw = obs[conv + ".raw"]
        differs_from_raw += int((raw.image_ids[channels] != got.image_ids[channels]).any(axis=1).sum())
        assert raw.hook == {"module": conv, "call": None, "after": [], "layout": "map"}
    assert differs_from_raw > 0.8 * sum(len(flipped[_resnet_bn_of(c)[0]]) for c in convs)


@pytest.mark.parametrize("compiled", [True, False], ids=["cpu-compiled-loops", "accelerator-tensor-ops"])
def test_both_position_strategies_give_the_brute_force_result(monkeypatch, compiled):
    """The CPU path (argmax only where a pair may enter) and the accelerator path (max
    with indices everywhere, one sync per batch) on exact data, shared modules and NaN."""
    from tb_conceptevo.recording import responses

    monkeypatch.setattr(responses, "_compiled_loops", lambda device: compiled)
    _check(ExactBranchy(), integer_probe(n=50, size=16), None, k=6, batch_size=8)
    _check(ExactBranchy(), integer_probe(n=50, size=16), ["left", "right"], k=4, batch_size=9, reduce="mean")
    for size in (4, 3, 1):  # maps of 16, 9 and 1 cells: many ties, the first cell wins
        _check(ExactBranchy(), integer_probe(n=50, size=size), None, k=6, batch_size=8)
    test_module_called_twice_per_forward_merges_calls("relu")
    test_nan_neurons_flagged_rest_recorded(2)
    test_nan_neurons_flagged_rest_recorded(6)


def test_compiled_topk_merge_equals_the_tensor_merge():
    """The compiled merge and the tensor merge keep the same top-k (values, ids and
    positions) on tie-heavy batches of several sizes, including -inf responses, when the
    "may enter" flags are exactly the entering pairs plus some that do not enter (the
    flags only allow skipping); a word of zero flags is skipped."""
    from tb_conceptevo.recording.topk import _TopK

    g = torch.Generator().manual_seed(3)
    compiled, tensors = _TopK(37, 5, "cpu"), _TopK(37, 5, "cpu")
    start = 0
    for size in [3, 8, 1, 16, 9, 2, 12, 5]:
        values = torch.randint(-3, 4, (size, 37), generator=g).float()
        values[torch.rand(values.shape, generator=g) < 0.1] = -torch.inf
        positions = torch.randint(0, 50, (size, 37), generator=g)
        indices = torch.arange(start, start + size)
        start += size
        entered = torch.zeros((size, 40), dtype=torch.uint8)  # 37 columns padded to 5 words
        entered[:, :37] = (values > compiled.values[:, -1]) | (torch.rand(values.shape, generator=g) < 0.2)
        kth = np.full(37, np.nan, np.float32)
        compiled.merge_compiled(values, positions, entered, indices, kth)
        tensors.merge(values, indices, None, positions=positions)
        for field in ("values", "ids", "positions"):
            assert torch.equal(getattr(compiled, field), getattr(tensors, field)), field
        np.testing.assert_array_equal(kth, tensors.values[:, -1].numpy())   # every neuron's k-th value
    # pairs flagged "cannot enter" are not merged, even above the k-th value
    kept = compiled.values.clone()
    compiled.merge_compiled(torch.full((2, 37), 9.0), torch.zeros((2, 37), dtype=torch.int64),
                            torch.zeros((2, 40), dtype=torch.uint8), torch.arange(start, start + 2),
                            np.empty(37, np.float32))
    assert torch.equal(compiled.values, kept)


@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
@pytest.mark.parametrize("cells", [1, 2, 4, 9, 16, 25, 63, 64, 100, 256, 300])
def test_max_loops_equal_tensor_amax_then_entrant_scan(cells, layout):
    """The loops that take their own max (maps of one cell; of few cells; channels-last
    maps of any size, from 256 cells in blocks of rows) and the general one (after a
    tensor ``amax``) write the same responses, entrant positions, "may enter" flags and
    non-finite count, into the layer's columns of whole batch buffers only:
    on tie-heavy integer maps, signed zeros, and NaN / +Inf / -Inf at the first, a middle
    and the last cell of a map."""
    from tb_conceptevo.recording import _kernels

    g = torch.Generator().manual_seed(cells)
    maps = torch.randint(-3, 4, (9, 7, cells), generator=g).float()
    maps[0, 0] = -0.0
    maps[1, 1, 0], maps[2, 2, cells // 2], maps[3, 3, -1] = float("nan"), float("inf"), -float("inf")
    maps[4, 4] = -float("inf")   # all -inf: non-finite response
    maps[5, 5, -1], maps[5, 5, 0] = float("nan"), float("inf")
    kth = torch.randint(-4, 3, (7,), generator=g).float().numpy()
    outputs = []
    col = 3   # the layer's columns within whole batch buffers of 12; the others stay as they were
    for fused in (True, False):
        values, positions = np.full((9, 12), 7.0, np.float32), np.full((9, 12), -1, np.int64)
        entered = np.full((9, 12), 2, np.uint8)
        if fused and cells == 1:
            positions[:, col:col + 7] = 0   # the one-cell loop leaves positions to the caller's zeros
            n_bad = _kernels.single_cell_entrants(maps[:, :, 0].contiguous().numpy(), kth, values, positions, entered, col)
        elif fused and layout == "channels-last":
            cells_first = maps.transpose(1, 2).contiguous()  # [B, S, C]
            n_bad = _kernels.max_entrant_positions_channels_last(cells_first.numpy(), kth, values, positions, entered, col)
        elif fused:
            n_bad = _kernels.max_entrant_positions(maps.numpy(), kth, values, positions, entered, col)
        else:
            n_bad = _kernels.entrant_positions(maps.numpy(), maps.amax(dim=2).numpy(), kth, False, values, positions,
                                               entered, col)
        for buffer, untouched in ((values, 7.0), (positions, -1), (entered, 2)):
            assert (buffer[:, :col] == untouched).all() and (buffer[:, col + 7:] == untouched).all()
        outputs.append((n_bad, values[:, col:col + 7], positions[:, col:col + 7], entered[:, col:col + 7]))
    (bad_fused, values_fused, at_fused, in_fused), (bad_torch, values_torch, at_torch, in_torch) = outputs
    assert bad_fused == bad_torch > 0
    np.testing.assert_array_equal(values_fused, values_torch)  # NaN where NaN
    entrants = in_torch.astype(bool) & np.isfinite(values_torch)   # a position is read only there
    np.testing.assert_array_equal(at_fused[entrants], at_torch[entrants])
    # "may enter": every pair above its k-th value or non-finite, and no other
    response = maps.amax(dim=2).numpy()
    may_enter = (response > kth) | ~np.isfinite(response)
    np.testing.assert_array_equal(in_fused, may_enter)
    np.testing.assert_array_equal(in_torch, may_enter)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
def test_nan_appearing_after_the_first_batch_on_small_maps(memory_format):
    """A NaN first met in a later batch (where small or channels-last maps take a
    compiled max loop) flags the neuron and leaves the others exactly ranked."""

    class Poison(nn.Module):
        def forward(self, y, x):
            y = y.clone()
            y[x[:, 0, 0, 0] < -1e3, 1, 1, 1] = float("nan")
            return y

    class LateNaN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.poison = Poison()

        def forward(self, x):
            return self.poison(self.conv(x.contiguous(memory_format=memory_format)), x)

    torch.manual_seed(0)
    probe = random_probe(n=24, size=4)
    probe.images[17, 0, 0, 0] = -1e4   # in the third batch of 8
    model = LateNaN()
    assert model(probe.images[:2]).is_contiguous(memory_format=memory_format)
    with pytest.warns(RuntimeWarning, match="1 neurons produced NaN/Inf"):
        obs = record(model, probe, ["poison"], k=3, batch_size=8, progress=False)
    layer = obs["poison"]
    assert layer.invalid.tolist() == [False, True, False, False]
    # a brute-force top-k, the poisoned neuron's on its finite cells only
    with torch.no_grad():  # in the recording's batches of 8, so the values are the same floats
        maps = torch.cat([model(chunk) for chunk in torch.split(probe.images, 8)])
    response = torch.nan_to_num(maps, nan=-float("inf")).amax(dim=(2, 3)).t().numpy()
    for channel in range(4):
        order = np.argsort(-response[channel], kind="stable")[:3]
        np.testing.assert_array_equal(layer.image_ids[channel], order)


def test_shapes_remembered_between_passes_follow_every_change_of_the_model():
    """Layer shapes are measured once per model and remembered; whatever changes between
    two snapshots (a layer swapped, a conv's stride, a flag read by ``forward`` that no
    structure shows, a branch no longer called), the next pass records exactly what a
    model never seen before would."""
    from tb_conceptevo.recording import recorder

    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.side = nn.Conv2d(4, 2, 1)
            self.pool, self.use_side = False, True

        def forward(self, x):
            y = self.conv(x)
            y = nn.functional.max_pool2d(y, 2) if self.pool else y
            return self.side(y) if self.use_side else y

    def fresh_record(model, layers):
        recorder._MEASURED.clear()
        return record(model, probe, layers, k=3, batch_size=5, progress=False)

    def same(a, b):
        for name in a.layers:
            for field in ("image_ids", "activations", "positions"):
                np.testing.assert_array_equal(getattr(a[name], field), getattr(b[name], field))
            assert a[name].map_size == b[name].map_size

    torch.manual_seed(0)
    probe = random_probe(n=12, size=8)
    model = Flagged()
    first = record(model, probe, ["conv.raw", "side"], k=3, batch_size=5, progress=False)
    assert model in recorder._MEASURED
    measured = []
    original = recorder.layer_shapes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recorder, "layer_shapes", lambda *a, **kw: measured.append(1) or original(*a, **kw))
        again = record(model, probe, ["conv.raw", "side"], k=3, batch_size=5, progress=False)
        assert not measured  # remembered
        same(first, again)

        model.pool = True   # invisible to the structure: found from the map, measured again
        got = record(model, probe, ["conv.raw", "side"], k=3, batch_size=5, progress=False)
        assert got["side"].map_size == (4, 4) and len(measured) == 1
        same(got, fresh_record(model, ["conv.raw", "side"]))

        model.conv.stride = (2, 2)   # a setting: a new structure key
        got = record(model, probe, ["conv.raw", "side"], k=3, batch_size=5, progress=False)
        assert got["conv.raw"].map_size == (4, 4)
        same(got, fresh_record(model, ["conv.raw", "side"]))

        model.side = nn.Conv2d(4, 6, 1)   # a swapped layer with more channels
        got = record(model, probe, ["conv.raw", "side"], k=3, batch_size=5, progress=False)
        assert got["side"].image_ids.shape == (6, 3)
        same(got, fresh_record(model, ["conv.raw", "side"]))

        record(model, probe, ["conv.raw", "side"], k=3, batch_size=5, progress=False)
        model.use_side = False   # a layer no longer called: the usual clear error
        with pytest.raises(ValueError, match=r"\['side'\] were not called"):
            record(model, probe, ["conv.raw", "side"], k=3, batch_size=5, progress=False)


def test_lazy_layers_are_measured_while_uninitialised_and_remembered_after():
    """A model with lazy layers (parameters without a shape until the first forward) is
    recorded; its shapes are remembered only once its structure can be read."""
    from tb_conceptevo.recording import recorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.LazyConv2d(2, 1))
    probe = random_probe(n=10, size=8)
    first = record(model, probe, ["0", "2"], k=2, batch_size=4, progress=False)
    assert first["0"].image_ids.shape == (4, 2) and first["2"].map_size == (6, 6)
    assert model in recorder._MEASURED   # initialised by the measuring pass
    again = record(model, probe, ["0", "2"], k=2, batch_size=4, progress=False)
    np.testing.assert_array_equal(first["2"].image_ids, again["2"].image_ids)


def test_a_layer_whose_batch_axis_changes_is_a_clear_error():
    """A block that doubles the batch (test-time augmentation inside the model) cannot be
    ranked per probe image: a clear error naming the layer, not a silent mix-up."""

    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(torch.cat([x, x.flip(3)]))

    with pytest.raises(ValueError, match="layer 'conv' gave a map of shape .* for a batch of 5 images"):
        record(Doubling(), random_probe(n=10, size=8), ["conv"], k=2, batch_size=5, progress=False)
