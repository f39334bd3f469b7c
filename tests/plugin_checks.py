"""Route assertions shared by the WSGI tests (both loaders) and the real-server test.

Each ``check_*`` takes ``fetch(path, headers=None) -> Reply`` (``path`` relative to
``/data/plugin/conceptevo/`` unless it starts with ``/``) and the facts returned by
:func:`tests.plugin_fixtures.write_logdir`.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np

from . import plugin_fixtures as fx

PREFIX = "/data/plugin/conceptevo/"


@dataclass
class Reply:
    status: int
    headers: Dict[str, str]  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body.decode("utf-8"))


Fetch = Callable[..., Reply]


def url(path: str) -> str:
    return path if path.startswith("/") else PREFIX + path


def parse_map(body: bytes):
    (n,) = struct.unpack("<I", body[:4])
    assert len(body) == 4 + 16 * n
    layout = np.frombuffer(body, "<f4", 2 * n, 4).reshape(n, 2)
    channel = np.frombuffer(body, "<i4", n, 4 + 8 * n)
    group = np.frombuffer(body, "<i4", n, 4 + 12 * n)
    return layout, channel, group


def assert_json_error(reply: Reply, status: int):
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("application/json")
    message = reply.json()["error"]
    assert isinstance(message, str) and message
    assert "Traceback" not in message


# ----------------------------------------------------------------------------- checks

def check_listing(fetch: Fetch, facts):
    listing = fetch("/data/plugins_listing").json()
    entry = listing["conceptevo"]
    assert entry["enabled"] is True
    assert entry["tab_name"] == "Concept Evolution"
    assert entry["loading_mechanism"] == {"type": "IFRAME", "module_path": PREFIX + "static/index.js"} or \
        entry["loading_mechanism"]["module_path"].endswith("static/index.js")


def check_static(fetch: Fetch, facts):
    reply = fetch("static/index.js")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/javascript")
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert b"render" in reply.body
    etag = reply.headers["etag"]
    assert fetch("static/index.js", {"If-None-Match": etag}).status == 304
    for bad in ["static/../plugin/plugin.py", "static/%2e%2e/plugin/plugin.py", "static/..%2fplugin%2fplugin.py",
                "static/", "static/nope.js", "static//etc/passwd", "static/.hidden"]:
        reply = fetch(bad)
        assert 400 <= reply.status < 500, (bad, reply.status)
        assert b"ConceptEvoPlugin" not in reply.body


def check_runs(fetch: Fetch, facts):
    answer = fetch("runs").json()
    runs = {r["run"]: r for r in answer["runs"]}
    assert sorted(runs) == sorted(facts["runs"])  # scalars_only has no concept data
    base = runs["baseline"]
    assert base["layers"] == fx.LAYERS
    assert base["steps"] == [0, 1, 2]
    assert base["spaces"] == {fx.SPACE: {layer: [0, 1, 2] for layer in fx.LAYERS}}
    assert base["detectors"] == {fx.DETECTOR: {layer: [0, 1, 2] for layer in fx.LAYERS}}
    assert base["importance"] == [{"class": fx.IMPORTANCE_CLASS, "layer": layer, "steps": [2]} for layer in fx.LAYERS]
    assert base["revert"] == [{"class": fx.IMPORTANCE_CLASS, "steps": [2]}]
    assert base["anchors"] == [fx.SPACE]
    observations = facts["observations"]
    assert base["probe_hash"] == observations["baseline"][0].probe_hash
    assert runs["other_probe"]["steps"] == [0, 5]
    assert runs["other_probe"]["probe_hash"] == observations["other_probe"][0].probe_hash
    assert runs["truncated"]["probe_hash"] == base["probe_hash"]
    assert answer["comparable"] is False
    groups = {g["probe_hash"]: sorted(g["runs"]) for g in answer["probe_groups"]}
    assert groups == {base["probe_hash"]: ["baseline", "truncated"],
                      runs["other_probe"]["probe_hash"]: ["other_probe"]}
    # The payload of a newer format version is left out, with a warning saying so.
    (warning,) = answer["warnings"]
    assert "baseline" in warning and fx.FUTURE_SPACE in warning and "upgrade tb_conceptevo" in warning
    assert_json_error(fetch(f"map?run=baseline&space={fx.FUTURE_SPACE}&layer=features.0&step=0"), 422)


def check_truncated(fetch: Fetch, facts):
    """The last record (detector payload of features.2 at step 2) was cut in half."""
    run = next(r for r in fetch("runs").json()["runs"] if r["run"] == "truncated")
    assert run["detectors"][fx.DETECTOR] == {"features.0": [0, 1, 2], "features.2": [0, 1]}
    assert run["steps"] == [0, 1, 2]
    ok = fetch("labels?run=truncated&detector=netdissect&layer=features.2&step=1")
    assert ok.status == 200 and ok.json()["concepts"] == fx.CONCEPTS
    assert_json_error(fetch("labels?run=truncated&detector=netdissect&layer=features.2&step=2"), 404)
    assert fetch("map?run=truncated&space=conceptevo&layer=features.2&step=2").status == 200


def check_map(fetch: Fetch, facts):
    for run, seed in facts["seeds"].items():
        for layer in fx.LAYERS:
            step = facts["steps"][run][-1]
            reply = fetch(f"map?run={run}&space={fx.SPACE}&layer={layer}&step={step}")
            assert reply.status == 200, reply.body[:300]
            assert reply.headers["content-type"] == "application/octet-stream"
            layout, channel, group = parse_map(reply.body)
            expected = fx.layout_for(layer, step, seed)
            np.testing.assert_array_equal(layout, expected)  # NaN rows equal too
            np.testing.assert_array_equal(channel, np.arange(fx.CHANNELS[layer]))
            np.testing.assert_array_equal(group, np.arange(fx.CHANNELS[layer]) % 3)
            assert reply.headers["x-conceptevo-unplaced"] == "1"
    first = fetch("map?run=baseline&space=conceptevo&layer=features.0&step=1")
    etag = first.headers["etag"]
    again = fetch("map?run=baseline&space=conceptevo&layer=features.0&step=1", {"If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    other = fetch("map?run=baseline&space=conceptevo&layer=features.0&step=2")
    assert other.headers["etag"] != etag


def check_labels(fetch: Fetch, facts):
    answer = fetch("labels?run=baseline&detector=netdissect&layer=features.2&step=1").json()
    header, arrays = fx.detector_payload("features.2", 1)
    assert answer["concepts"] == fx.CONCEPTS and answer["categories"] == fx.CATEGORIES
    assert answer["threshold"] == header["threshold"]
    assert answer["interpretable_counts"] == header["interpretable_counts"]
    assert answer["top_concepts"] == arrays["top_concepts"].tolist()
    assert answer["top_similarity"][0] == [None, None, None]
    assert answer["top_similarity"][3][0] == float(arrays["top_similarity"][3, 0])
    assert answer["top_similarity"][3][2] is None


def check_categories(fetch: Fetch, facts):
    answer = fetch("categories?run=baseline&detector=netdissect&step=1").json()
    assert answer["layers"] == fx.LAYERS
    assert answer["categories"] == ["colour", "shape", "texture"]
    for layer in fx.LAYERS:
        counts = fx.detector_payload(layer, 1)[0]["interpretable_counts"]
        assert answer["counts"][layer] == {c: counts.get(c, 0) for c in answer["categories"]}
    assert_json_error(fetch("categories?run=baseline&detector=netdissect&step=9"), 404)


def check_neuron(fetch: Fetch, facts):
    channel, step, layer = 3, 1, "features.2"
    reply = fetch(f"neuron?run=baseline&layer={layer}&channel={channel}&step={step}&space=conceptevo&detector=netdissect")
    assert reply.status == 200, reply.body[:300]
    story = reply.json()
    obs = facts["observations"]["baseline"][step][layer]
    keep = obs.image_ids[channel] >= 0
    assert story["id"] == f"{layer}:{channel}" and story["step"] == step
    assert story["invalid"] is False
    assert [s["image"] for s in story["stimuli"]] == obs.image_ids[channel][keep].tolist()
    np.testing.assert_allclose([s["activation"] for s in story["stimuli"]], obs.activations[channel][keep], rtol=1e-6)
    assert [s["box"] for s in story["stimuli"]] == obs.patch_boxes()[channel][keep].tolist()
    assert [t["step"] for t in story["trajectory"]] == [0, 1, 2]
    for point in story["trajectory"]:
        expected = fx.layout_for(layer, point["step"], 0)[channel]
        assert abs(point["x"] - expected[0]) < 1e-6 and abs(point["y"] - expected[1]) < 1e-6
    assert [lab["concept"] for lab in story["labels"]] == [fx.CONCEPTS[(channel + s) % 4] for s in (0, 1, 2)]
    assert [lab["category"] for lab in story["labels"]] == [fx.CATEGORIES[(channel + s) % 4] for s in (0, 1, 2)]
    by_step = {entry["step"]: entry for entry in story["stimuli_by_step"]}
    assert sorted(by_step) == [0, 1, 2]
    for s, entry in by_step.items():
        o = facts["observations"]["baseline"][s][layer]
        assert entry["images"] == o.image_ids[channel][o.image_ids[channel] >= 0].tolist()
    # Neuron 1 is never placed; neuron 0 has no label.
    unplaced = fetch(f"neuron?run=baseline&layer={layer}&channel=1&step=0&space=conceptevo").json()
    assert all(p["x"] is None and p["y"] is None for p in unplaced["trajectory"])
    unlabelled = fetch(f"neuron?run=baseline&layer={layer}&channel=0&step=0&detector=netdissect").json()
    assert all(lab["concept"] is None for lab in unlabelled["labels"])
    assert unlabelled["trajectory"] == []
    etag = reply.headers["etag"]
    assert fetch(f"neuron?run=baseline&layer={layer}&channel={channel}&step={step}&space=conceptevo"
                 "&detector=netdissect", {"If-None-Match": etag}).status == 304


def check_metrics(fetch: Fetch, facts):
    scalars = fetch("metrics?run=baseline").json()["scalars"]
    loss = scalars["train/loss"]
    assert [p[0] for p in loss] == [0, 1, 2]
    np.testing.assert_allclose([p[1] for p in loss], [1.0, 0.5, 1 / 3], rtol=1e-6)
    assert [p[0] for p in scalars["concepts/entropy/conceptevo/all"]] == [0, 1, 2]
    assert "concepts/invalid_neurons/stimuli/all" in scalars
    only = fetch("metrics?run=scalars_only").json()["scalars"]
    assert list(only) == ["train/loss"]
    assert_json_error(fetch("metrics?run=nope"), 404)


def check_anchors(fetch: Fetch, facts):
    answer = fetch("anchors?run=baseline&space=conceptevo").json()
    assert answer["words"] == ["red", "circle", "dog"]
    assert answer["kind"] == ["anchor", "anchor", "concept"]
    assert answer["layout"] == [[0.0, 0.0], [1.0, 1.0], [None, 2.0]]
    assert_json_error(fetch("anchors?run=other_probe&space=conceptevo"), 404)


def check_importance(fetch: Fetch, facts):
    reply = fetch(f"importance?run=baseline&class={fx.IMPORTANCE_CLASS}&layer=features.0&step=2")
    answer = reply.json()
    assert answer["class"] == fx.IMPORTANCE_CLASS and answer["class_name"] == "class_1"
    assert answer["from_step"] == 1 and answer["to_step"] == 2 and answer["layer"] == "features.0"
    assert answer["flagged"] == [2]
    assert answer["importance"][2] is None and answer["importance"][-1] == 1.0
    assert len(answer["mean_sensitivity"]) == fx.CHANNELS["features.0"]
    assert answer["positive_count"][-1] == 20
    assert "etag" in reply.headers
    # step is optional: the latest table
    assert fetch(f"importance?run=baseline&class={fx.IMPORTANCE_CLASS}&layer=features.0").json() == answer


def check_revert(fetch: Fetch, facts):
    answer = fetch(f"revert?run=baseline&class={fx.IMPORTANCE_CLASS}&step=2").json()
    header, arrays = fx.revert_payload(1, 2)
    assert answer["bins"] == header["bin_labels"]
    np.testing.assert_allclose(answer["accuracy_change"], arrays["mean_change"], rtol=1e-6)
    np.testing.assert_allclose(answer["accuracy_change_std"], arrays["std_change"], rtol=1e-6)
    assert answer["random_change"] == header["random_mean"] and answer["random_change_std"] == header["random_std"]
    assert answer["base_accuracy"] == header["baseline_accuracy"]
    assert answer["layers"] == fx.LAYERS
    np.testing.assert_allclose(answer["bin_accuracy_change"], arrays["bin_accuracy_change"], rtol=1e-6)


def check_probe_images(fetch: Fetch, facts):
    from PIL import Image

    probe = fetch("probe?run=baseline").json()
    assert probe["n_images"] == 40 and probe["image_size"] == [32, 32]
    assert probe["thumbnail_size"] == [32, 32] and probe["atlas_grid"] == 16 and probe["n_atlases"] == 1
    assert probe["probe_hash"] == facts["observations"]["baseline"][0].probe_hash
    assert probe["labels"] is None and probe["vocabulary"] is None
    atlas = fetch("atlas?run=baseline&index=0")
    assert atlas.status == 200 and atlas.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(atlas.body)).size == (16 * 32, 16 * 32)
    assert fetch("atlas?run=baseline&index=0", {"If-None-Match": atlas.headers["etag"]}).status == 304
    patch = fetch("patch?run=baseline&image=17&x0=4&y0=8&x1=14&y1=18")
    assert patch.status == 200 and patch.headers["content-type"] == "image/png"
    crop = np.asarray(Image.open(io.BytesIO(patch.body)).convert("RGB"))
    assert crop.shape == (10, 10, 3)
    cells = np.asarray(Image.open(io.BytesIO(atlas.body)).convert("RGB"))
    row, col = divmod(17, 16)  # image 17's cell in the 16 x 16 atlas
    np.testing.assert_array_equal(crop, cells[row * 32 + 8:row * 32 + 18, col * 32 + 4:col * 32 + 14])


#: (path, status) pairs that must be rejected with a JSON error.
MALFORMED = [
    ("map", 400),
    ("map?run=baseline&space=conceptevo&layer=features.0", 400),
    ("map?run=baseline&space=conceptevo&layer=features.0&step=-1", 400),
    ("map?run=baseline&space=conceptevo&layer=features.0&step=abc", 400),
    ("map?run=baseline&space=conceptevo&layer=features.0&step=1.5", 400),
    ("map?run=baseline&space=conceptevo&layer=features.0&step=" + "9" * 30, 400),
    ("map?run=baseline&space=conceptevo&layer=features.0&step=7", 404),
    ("map?run=nope&space=conceptevo&layer=features.0&step=0", 404),
    ("map?run=&space=conceptevo&layer=features.0&step=0", 400),
    ("map?run=baseline&run=other_probe&space=conceptevo&layer=features.0&step=0", 400),
    ("map?run=baseline&space=conceptevo&layer=..%2F..%2Fetc&step=0", 400),
    ("map?run=baseline&space=con%2Fceptevo&layer=features.0&step=0", 400),
    ("map?run=baseline&space=conceptevo&layer=features.9&step=0", 404),
    ("map?run=baseline&space=text&layer=features.0&step=0", 404),
    ("map?run=base%00line&space=conceptevo&layer=features.0&step=0", 400),
    ("map?run=" + "x" * 5000 + "&space=conceptevo&layer=features.0&step=0", 400),
    ("labels?run=baseline&detector=netdissect&layer=features.0", 400),
    ("labels?run=baseline&detector=clip&layer=features.0&step=0", 404),
    ("neuron?run=baseline&layer=features.0&channel=999&step=0", 404),
    ("neuron?run=baseline&layer=features.0&channel=-1&step=0", 400),
    ("neuron?run=baseline&layer=features.0&step=0", 400),
    ("neuron?run=baseline&layer=features.0&channel=0&step=0&space=nope", 404),
    ("neuron?run=baseline&layer=features.0&channel=0&step=0&detector=bad%20name", 400),
    ("atlas?run=baseline&index=5", 404),
    ("atlas?run=baseline", 400),
    ("atlas?run=scalars_only&index=0", 404),
    ("patch?run=baseline&image=40&x0=0&y0=0&x1=4&y1=4", 404),
    ("patch?run=baseline&image=0&x0=0&y0=0&x1=40&y1=4", 400),
    ("patch?run=baseline&image=0&x0=4&y0=0&x1=4&y1=4", 400),
    ("patch?run=baseline&image=0&x0=abc&y0=0&x1=4&y1=4", 400),
    ("patch?run=baseline&image=0&x0=nan&y0=0&x1=4&y1=4", 400),
    ("probe?run=nope", 404),
    ("probe", 400),
    ("importance?run=baseline&class=abc&layer=features.0&step=2", 400),
    ("importance?run=baseline&class=7&layer=features.0&step=2", 404),
    ("importance?run=baseline&class=1&layer=features.0&step=1", 404),
    ("revert?run=baseline&class=1&step=9", 404),
    ("revert?run=other_probe&class=1", 404),
    ("anchors?run=baseline&space=nope", 404),
    ("anchors?run=baseline", 400),
    ("categories?run=nope&detector=netdissect&step=0", 404),
    ("metrics", 400),
]


def check_malformed(fetch: Fetch, facts):
    for path, status in MALFORMED:
        assert_json_error(fetch(path), status)


ALL_CHECKS = [check_listing, check_static, check_runs, check_truncated, check_map, check_labels, check_categories,
              check_neuron, check_metrics, check_anchors, check_importance, check_revert, check_probe_images,
              check_malformed]


def check_empty(fetch: Fetch, runs_expected: Optional[list] = None):
    """A logdir without concept data: empty menus, inactive tab, clean 404s."""
    listing = fetch("/data/plugins_listing").json()
    assert listing["conceptevo"]["enabled"] is False
    answer = fetch("runs").json()
    assert answer == {"runs": [], "probe_groups": [], "comparable": True, "warnings": []}
    assert_json_error(fetch("map?run=x&space=conceptevo&layer=features.0&step=0"), 404)
    assert fetch("static/index.js").status == 200
