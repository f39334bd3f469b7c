"""Units of the networks people train: transformer tokens on the patch grid (a small
user ViT with a non-square grid, Swin's [B, H, W, C]), untraceable CNNs, and the real
torchvision vit_b_16 / swin_t through stimuli, spaces, labels, importance and the UI."""

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tb_conceptevo.recording import TokenLayout, record, resolve_layers, resolve_points
from tests.conftest import TensorProbe, float64_defaults


class TinyViT(nn.Module):
    """A user ViT: conv patch embedding, a class token, one pre-norm block."""

    def __init__(self, dim=8, patch=4, prefix=1):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.prefix = nn.Parameter(torch.randn(1, prefix, dim))
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)               # [B, h*w, D], row-major
        tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.mlp(self.norm(tokens))
        return self.head(tokens[:, 0])


def _probe(n, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    probe = TensorProbe(torch.rand(n, 3, height, width, generator=g, dtype=torch.float64))
    probe.images = probe.images.double()
    return probe


def _captured(model, module, probe, batch_size):
    outs = []
    handle = module.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    with torch.no_grad():
        for chunk in torch.split(probe.images, batch_size):
            model.eval()(chunk)
    handle.remove()
    return torch.cat(outs)


def _topk(response, positions, k):
    """Per-neuron brute-force top-k (ties: lower index) of response [n, C]."""
    resp = response.t().numpy()
    order = np.argsort(-resp, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(resp, order, 1), np.take_along_axis(positions.t().numpy(), order, 1)


@pytest.mark.parametrize("include_prefix", [False, True])
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_user_vit_tokens_on_a_non_square_grid_match_brute_force(include_prefix, reduce):
    torch.manual_seed(0)
    with float64_defaults():
        model = TinyViT(prefix=2)
    probe = _probe(26, 16, 24)   # grid 4 x 6 of 4-px patches after 2 prefix tokens: T = 26
    tokens = TokenLayout(include_prefix=include_prefix)
    obs = record(model, probe, ["mlp.0"], k=5, batch_size=7, reduce=reduce, progress=False, tokens=tokens)
    got = obs["mlp.0"]
    assert got.map_size == (4, 6) and got.n_neurons == 16
    assert got.hook == {"module": "mlp.1", "call": None, "after": ["activation"], "layout": "tokens",
                        "prefix_tokens": 2, "prefix_in_response": include_prefix}
    out = _captured(model, model.mlp[1], probe, 7)          # [n, T, C] after the GELU
    grid = out[:, 2:]
    counted = out if include_prefix else grid
    response = counted.amax(dim=1) if reduce == "max" else counted.mean(dim=1)
    ids, values, positions = _topk(response, grid.argmax(dim=1), 5)
    np.testing.assert_array_equal(got.image_ids, ids)
    # the recorder keeps float32 responses: compare at float32 precision of the layer's scale
    np.testing.assert_allclose(got.activations, values, rtol=1e-6, atol=1e-6 * np.abs(values).max())
    np.testing.assert_array_equal(got.positions, positions)
    # a patch box is centred on its token's patch: token t -> row t // 6, column t % 6
    boxes = got.patch_boxes()
    centre_x = (boxes[..., 0] + boxes[..., 2]) / 2
    assert np.all(np.abs(centre_x - (positions % 6 + 0.5) * 4) <= 4)


def test_default_layers_of_a_transformer_are_its_mlp_hidden_units():
    model = TinyViT()
    assert [n for n, _ in resolve_layers(model)] == ["embed", "mlp.0"]
    vit = torchvision.models.vit_b_16()
    names = [n for n, _ in resolve_layers(vit)]
    assert names[0] == "conv_proj" and len(names) == 13
    assert names[1:] == [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(12)]
    points = {p.layer: p for p in resolve_points(vit)}
    assert points["encoder.layers.encoder_layer_3.mlp.0"].module == "encoder.layers.encoder_layer_3.mlp.1"


def test_swin_channels_last_blocks_match_brute_force():
    torch.manual_seed(0)
    with float64_defaults():
        model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                                                   window_size=[2, 2], num_classes=3)
    probe = _probe(12, 16, 16)
    layers = ["features.1.0.mlp.0", "features.3.0"]   # MLP hidden units and a whole block
    obs = record(model, probe, layers, k=3, batch_size=5, progress=False)
    modules = dict(model.named_modules())
    for layer, module in (("features.1.0.mlp.0", "features.1.0.mlp.1"), ("features.3.0", "features.3.0")):
        out = _captured(model, modules[module], probe, 5).permute(0, 3, 1, 2)   # [n, C, H, W]
        assert obs[layer].hook["layout"] == "channels_last" and obs[layer].map_size == tuple(out.shape[2:])
        peak, argmax = out.flatten(2).max(dim=2)
        ids, values, positions = _topk(peak, argmax, 3)
        np.testing.assert_array_equal(obs[layer].image_ids, ids)
        np.testing.assert_allclose(obs[layer].activations, values, rtol=1e-6)
        np.testing.assert_array_equal(obs[layer].positions, positions)


def test_token_and_output_errors_name_the_layer_and_the_fix():
    model = TinyViT()
    probe = _probe(4, 16, 24)
    with pytest.raises(ValueError, match=r"layer 'mlp.0' returns 25 tokens .*grid \(3, 3\).*TokenLayout\(grid="):
        record(model, probe, ["mlp.0"], k=1, progress=False, tokens=TokenLayout(grid=(3, 3)))
    with pytest.raises(ValueError, match=r"layer 'mlp.0' returns 25 tokens .*aspect ratio 16:24.*TokenLayout"):
        record(model, probe, ["mlp.0"], k=1, progress=False, tokens=TokenLayout(prefix=0))
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=1,
                                               hidden_dim=4, mlp_dim=8, num_classes=2)
    with pytest.raises(ValueError, match=r"'encoder.layers.encoder_layer_0.self_attention' returns a tuple.*"
                                         r"record a module inside it"):
        record(vit, _probe(2, 16, 16).__class__(torch.rand(2, 3, 16, 16)),
               ["encoder.layers.encoder_layer_0.self_attention"], k=1, progress=False)
    model.conceptevo_tokens = "grid"
    with pytest.raises(TypeError, match="TokenLayout"):
        record(model, probe, ["mlp.0"], k=1, progress=False)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        if float(y.sum()) < 0:
            y = -y
        return self.head(y.mean(dim=(2, 3)))


def test_untraceable_model_is_read_after_its_norm_and_activation_from_an_executed_pass():
    torch.manual_seed(0)
    model = Untraceable()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    probe = _probe(10, 8, 8).__class__(torch.rand(10, 3, 8, 8))
    obs = record(model, probe, k=3, batch_size=4, progress=False)
    assert obs["conv"].hook == {"module": "act", "call": None, "after": ["norm", "activation"], "layout": "map"}
    out = _captured(model, model.act, probe, 4)
    peak, argmax = out.flatten(2).max(dim=2)
    ids, _, _ = _topk(peak, argmax, 3)
    np.testing.assert_array_equal(obs["conv"].image_ids, ids)


def test_stimuli_header_records_the_hook_point_and_old_logs_still_load():
    from tb_conceptevo.format.payloads import stimuli_payload
    from tb_conceptevo.format.payloads import layer_observation

    model = Untraceable()
    obs = record(model, _probe(6, 8, 8).__class__(torch.rand(6, 3, 8, 8)), k=2, progress=False)["conv"]
    header, arrays = stimuli_payload(obs)
    assert header["hook"]["module"] == "act"
    assert layer_observation(header, arrays, 0).hook == obs.hook
    del header["hook"]   # written before hook points were recorded
    assert layer_observation(header, arrays, 0).hook is None


# ----------------------------------------------------------------------------- torchvision end to end

def _perturbed(model, seed):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return other


def _check_read_back(logdir, layers, observations, grid):
    from tb_conceptevo.reading import ConceptReader

    with ConceptReader(str(logdir)) as logs:
        assert set(layers) <= set(logs.layers("run"))
        for step, expected in enumerate(observations):
            got = logs.observation("run", step)
            for layer in layers:
                np.testing.assert_array_equal(got[layer].image_ids, expected[layer].image_ids)
                np.testing.assert_array_equal(got[layer].positions, expected[layer].positions)
                assert got[layer].hook == expected[layer].hook and got[layer].map_size == grid[layer]


def _check_ui_patches(logdir, layer, observation, channel=0):
    """The plugin's neuron view serves the stimuli with their patch boxes on the image."""
    from tests import plugin_checks as checks
    from tests.test_plugin import fetcher, make_app

    app, _, close = make_app(str(logdir), "python")
    try:
        reply = fetcher(app)(f"neuron?run=run&layer={layer}&channel={channel}&step={observation.step}")
        assert reply.status == 200, reply.body[:300]
        story = checks.Reply.json(reply)
        keep = observation.image_ids[channel] >= 0
        assert [s["image"] for s in story["stimuli"]] == observation.image_ids[channel][keep].tolist()
        assert [s["box"] for s in story["stimuli"]] == observation.patch_boxes()[channel][keep].tolist()
    finally:
        close()


def test_swin_t_through_stimuli_spaces_labels_importance_revert_and_the_ui(tmp_path):
    from tb_conceptevo.detectors import MiniLMTextEncoder, NetDissect
    from tb_conceptevo.importance import revert_evaluation
    from tb_conceptevo.probes import ConceptShapes
    from tb_conceptevo.spaces.conceptevo import ConceptEvoSpace
    from tb_conceptevo.spaces.text import TextSpace
    from tb_conceptevo.writer import ConceptWriter

    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=4)
    probe = ConceptShapes(n=6, size=32, seed=0)
    layers = ["features.1.0.mlp.0", "features.7.1"]   # hidden MLP units ([B, 8, 8, 384]) and a last block
    conceptevo = ConceptEvoSpace(dim=4, epochs=2, repetitions=2, k=2, progress=False)
    conceptevo.fit(record(model, probe, layers, k=2, batch_size=6, progress=False))
    text = TextSpace(NetDissect(vocabulary=probe, progress=False), text_encoder=MiniLMTextEncoder(),
                     anchors=["red", "circle"])
    writer = ConceptWriter(str(tmp_path / "run"), probe=probe, layers=layers, k=2, batch_size=6,
                           spaces=[conceptevo, text], progress=False)
    later = _perturbed(model, 1)
    observations = [writer.add_concepts(model, step=0), writer.add_concepts(later, step=1)]
    importance, revert = writer.add_concept_importance(later, 0, probe, step=1, from_model=model, from_step=0,
                                                       layers=["features.1.0.mlp.0"], max_images=2)
    writer.close()
    assert importance["features.1.0.mlp.0"].n_neurons == 384 and np.isfinite(importance["features.1.0.mlp.0"].importance).all()
    table = revert_evaluation(model, later, probe, 0, importance, n_bins=2, seeds=(0,), max_images=2, progress=False)
    assert table.bin_sizes.tolist() == [[192, 192]]
    _check_read_back(tmp_path, layers, observations, {"features.1.0.mlp.0": (8, 8), "features.7.1": (1, 1)})
    _check_ui_patches(tmp_path, "features.1.0.mlp.0", observations[1]["features.1.0.mlp.0"])


def test_vit_b_16_through_stimuli_labels_importance_and_the_ui(tmp_path):
    from tb_conceptevo.detectors import MiniLMTextEncoder, NetDissect
    from tb_conceptevo.importance import concept_evolution_importance
    from tb_conceptevo.probes import ConceptShapes
    from tb_conceptevo.spaces.text import TextSpace
    from tb_conceptevo.writer import ConceptWriter

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(num_classes=4)
    probe = ConceptShapes(n=2, size=224, seed=0)   # vit_b_16 takes 224 px only
    layer = "encoder.layers.encoder_layer_1.mlp.0"
    text = TextSpace(NetDissect(vocabulary=probe, progress=False), text_encoder=MiniLMTextEncoder(), anchors=["red"])
    writer = ConceptWriter(str(tmp_path / "run"), probe=probe, layers=[layer], k=1, batch_size=2,
                           spaces=[text], progress=False)
    observation = writer.add_concepts(model, step=0)
    writer.close()
    assert observation[layer].hook["layout"] == "tokens" and observation[layer].hook["prefix_tokens"] == 1
    _check_read_back(tmp_path, [layer], [observation], {layer: (14, 14)})
    _check_ui_patches(tmp_path, layer, observation[layer])
    result = concept_evolution_importance(model, _perturbed(model, 1), probe.images(np.arange(2)), 0,
                                          layers=[layer], progress=False)
    assert result[layer].n_neurons == 3072 and not result[layer].flagged.any()
