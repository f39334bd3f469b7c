"""Unit tests of the plugin's pieces that need no TensorBoard server: the cache, the
store's index / blob reading strategy, parameter validation and answer encoding."""

from __future__ import annotations

import struct
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from tb_conceptevo.format import metadata
from tb_conceptevo.plugin import views, web
from tb_conceptevo.plugin.store import LRUCache, Store
from tb_conceptevo.reading import DataNotFound
from tb_conceptevo.format.summary import pack


# ----------------------------------------------------------------------------- LRU

def test_lru_is_bounded_by_bytes_and_evicts_least_recent():
    cache = LRUCache(max_bytes=3000)
    for i in range(10):
        cache.put(i, np.zeros(100, np.float64))  # 800 B + overhead each
    assert cache.size_bytes <= 3000
    assert 9 in cache and 0 not in cache
    cache.get(7)  # touch: 7 becomes most recent
    cache.put("new", np.zeros(100, np.float64))
    assert 7 in cache
    cache.put("huge", np.zeros(10_000))  # larger than the budget: not kept
    assert "huge" not in cache


def test_lru_is_thread_safe():
    cache = LRUCache(max_bytes=50_000)

    def hammer(seed):
        rng = np.random.default_rng(seed)
        for key in rng.integers(0, 200, 2000):
            cache.get_or_compute(int(key), lambda: b"x" * 500)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.size_bytes <= 50_000
    assert cache.size_bytes == sum(len(b"x" * 500) + 64 for _ in range(len(cache)))


# ----------------------------------------------------------------------------- store

class FakeProvider:
    """A remote-like provider over in-memory payloads, counting calls."""

    def __init__(self, payloads):
        # payloads: {run: {tag: {step: blobs}}}
        self.payloads = payloads
        self.read_calls = 0
        self.blob_calls = 0
        self.changed = threading.Condition()
        self.in_flight = self.most_in_flight = 0
        self.gate = 1

    def read_blob_sequences(self, ctx, experiment_id, plugin_name, downsample=None, run_tag_filter=None):
        self.read_calls += 1
        out = {}
        for run, tags in self.payloads.items():
            out[run] = {}
            for tag, steps in tags.items():
                out[run][tag] = [
                    SimpleNamespace(step=step, wall_time=float(step), values=[
                        SimpleNamespace(blob_key=f"{run}|{tag}|{step}|{i}") for i in range(len(blobs))])
                    for step, blobs in sorted(steps.items())]
        return out

    def read_blob(self, ctx, blob_key):
        run, tag, step, index = blob_key.split("|")
        with self.changed:
            self.blob_calls += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.changed.notify_all()
            # With a gate of n, a read waits (2 s at most) until n reads are in flight
            # together: concurrent reads pass at once, sequential ones see only themselves.
            self.changed.wait_for(lambda: self.in_flight >= self.gate, timeout=2.0)
        time.sleep(0.01)  # a round trip
        with self.changed:
            self.in_flight -= 1
        return self.payloads[run][tag][int(step)][int(index)]


def space_blobs(step, n=4):
    layout = np.full((n, 2), float(step), np.float32)
    return pack({"kind": "space"}, {"vectors": np.zeros((n, 3), np.float16), "layout": layout,
                                     "placed": np.ones(n, np.uint8), "groups": np.arange(n, dtype=np.int32)})


@pytest.fixture
def fake():
    tag = metadata.space_tag("s", "conv1")
    provider = FakeProvider({"run": {tag: {step: space_blobs(step) for step in range(5)}}})
    store = Store(provider, index_ttl=0.2, min_refresh=0.1)
    store.remote = True  # behave as with rustboard
    return provider, store, tag


def test_index_is_cached_refreshed_in_background_and_on_unknown_steps(fake):
    provider, store, tag = fake
    store.datum_at(None, "", "run", tag, 1)
    store.datum_at(None, "", "run", tag, 2)
    assert provider.read_calls == 1  # one index read serves both
    # A new step appears: asking for it re-reads the index at once (rate-limited to
    # one re-read per min_refresh seconds).
    provider.payloads["run"][tag][5] = space_blobs(5)
    time.sleep(0.11)
    assert store.datum_at(None, "", "run", tag, 5).step == 5
    assert provider.read_calls == 2
    # Unknown steps re-read at most every min_refresh seconds.
    for _ in range(5):
        with pytest.raises(DataNotFound):
            store.datum_at(None, "", "run", tag, 99)
    assert provider.read_calls <= 3
    # Stale index: served at once, the run's part refreshed in the background.
    time.sleep(0.25)
    calls = provider.read_calls
    assert store.datum_at(None, "", "run", tag, 1).step == 1  # answered from the stale copy
    deadline = time.time() + 2
    while provider.read_calls == calls and time.time() < deadline:
        time.sleep(0.01)
    assert provider.read_calls == calls + 1


def test_unknown_run_and_tag_messages(fake):
    provider, store, tag = fake
    with pytest.raises(DataNotFound, match="unknown run 'nope'; runs with concept data: 'run'"):
        store.series(None, "", "nope", tag)
    provider.read_calls = 0
    for name in ["a", "b", "c", "d"]:  # a flood of unknown names: rate-limited full re-reads
        with pytest.raises(DataNotFound):
            store.series(None, "", name, tag)
    assert provider.read_calls <= 1
    with pytest.raises(DataNotFound, match="has no space data"):
        store.series(None, "", "run", metadata.space_tag("other", "conv1"))


def test_payloads_read_blobs_once_and_reuse_the_layout_of_the_previous_step(fake):
    provider, store, tag = fake
    series = store.series(None, "", "run", tag)
    header, arrays = store.payload(None, series[0], ["layout"], optional=["groups"], layout_key=tag)
    assert set(arrays) == {"layout", "groups"} and provider.blob_calls == 3  # header, then 2 arrays
    np.testing.assert_array_equal(arrays["layout"], np.zeros((4, 2)))
    provider.gate, provider.most_in_flight = 3, 0
    _, arrays = store.payload(None, series[1], ["layout"], optional=["groups"], layout_key=tag)
    provider.gate = 1
    assert provider.blob_calls == 6
    assert provider.most_in_flight == 3  # header and both arrays in one concurrent round
    np.testing.assert_array_equal(arrays["layout"], np.ones((4, 2)))
    store.payload(None, series[1], ["layout"], optional=["groups"], layout_key=tag)
    assert provider.blob_calls == 6  # cached
    everything = store.payloads(None, series, ["layout"], layout_key=tag)
    assert [a["layout"][0, 0] for _, a in everything] == [0, 1, 2, 3, 4]
    with pytest.raises(Exception, match="no arrays"):
        store.payload(None, series[0], ["missing"])


def test_read_ahead_runs_once_per_key(fake):
    _, store, _ = fake
    done = []
    assert store.read_ahead("k", lambda: done.append(1))
    assert not store.read_ahead("k", lambda: done.append(2))
    deadline = time.time() + 2
    while not done and time.time() < deadline:
        time.sleep(0.01)
    assert done == [1]
    store.remote = False
    assert not store.read_ahead("other", lambda: None)


# ----------------------------------------------------------------------------- web

def request_for(query: str, headers=None) -> Request:
    return Request(EnvironBuilder(path="/x", query_string=query, headers=headers or {}).get_environ())


def test_parameter_validation():
    assert web.int_param(request_for("step=12"), "step") == 12
    assert web.int_param(request_for(""), "step", required=False) is None
    for bad in ["-1", "1.0", "", "0x10", " 1", "1e3", "9" * 19]:
        with pytest.raises(web.BadRequest, match="step"):
            web.int_param(request_for(f"step={bad}"), "step")
    with pytest.raises(web.BadRequest, match="missing parameter 'step'"):
        web.int_param(request_for(""), "step")
    with pytest.raises(web.BadRequest, match="given 2 times"):
        web.run_param(request_for("run=a&run=b"))
    with pytest.raises(web.BadRequest, match="invalid layer"):
        web.name_param(request_for("layer=../x"), "layer")
    assert web.name_param(request_for("layer=layer4.1.conv2"), "layer") == "layer4.1.conv2"
    assert web.number_param(request_for("x0=12.5"), "x0") == 12.5
    with pytest.raises(web.BadRequest):
        web.number_param(request_for("x0=inf"), "x0")


def test_etags_and_json_safety():
    etag = web.etag_of("map", "run", 3, 1.5)
    assert etag == web.etag_of("map", "run", 3, 1.5) != web.etag_of("map", "run", 3, 1.6)
    assert web.not_modified(request_for("", {"If-None-Match": etag}), etag)
    assert web.not_modified(request_for("", {"If-None-Match": f'"x", {etag}'}), etag)
    assert not web.not_modified(request_for("", {"If-None-Match": '"other"'}), etag)
    assert web.dumps({"a": np.array([[1, np.inf]], np.float32), "b": float("nan")}) == '{"a":[[1.0,null]],"b":null}'


# ----------------------------------------------------------------------------- views

def test_map_bytes_layout():
    layout = np.array([[1, 2], [np.nan, np.nan], [3, 4]], np.float32)
    blob = views.map_bytes(layout, np.array([0, -1, 2]))
    n = struct.unpack("<I", blob[:4])[0]
    assert n == 3 and len(blob) == 4 + 16 * n and len(blob) % 4 == 0
    np.testing.assert_array_equal(np.frombuffer(blob, "<f4", 6, 4).reshape(3, 2), layout)
    assert np.frombuffer(blob, "<i4", 3, 28).tolist() == [0, 1, 2]
    assert np.frombuffer(blob, "<i4", 3, 40).tolist() == [0, -1, 2]
    assert views.unplaced_count(layout) == 1
    with pytest.raises(ValueError):
        views.map_bytes(layout, np.zeros(2))


def test_crop_box_maps_input_pixels_to_thumbnail_pixels():
    thumbnail = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    crop = views.crop_box(thumbnail, (0, 0, 64, 32), (64, 64))  # half-size thumbnail
    assert crop.shape == (16, 32, 3)
    assert views.crop_box(thumbnail, (63.5, 63.5, 64, 64), (64, 64)).shape == (1, 1, 3)


def test_run_summary_sorts_layers_naturally_and_lists_everything():
    datum = lambda step: SimpleNamespace(step=step)  # noqa: E731
    tags = {
        metadata.stimuli_tag("features.10"): [datum(0), datum(1)],
        metadata.stimuli_tag("features.2"): [datum(0)],
        metadata.space_tag("text", "features.2"): [datum(1)],
        metadata.importance_tag(3, "features.2"): [datum(1)],
        metadata.revert_tag(3): [datum(1)],
        metadata.anchors_tag("text"): [datum(0)],
    }
    summary = views.run_summary("r", tags, "abc")
    assert summary["layers"] == ["features.2", "features.10"]
    assert summary["steps"] == [0, 1]
    assert summary["spaces"] == {"text": {"features.2": [1]}}
    assert summary["importance"] == [{"class": 3, "layer": "features.2", "steps": [1]}]
    assert summary["revert"] == [{"class": 3, "steps": [1]}] and summary["anchors"] == ["text"]
    answer = views.runs_answer([summary, dict(summary, run="s", probe_hash="other")], [])
    assert answer["comparable"] is False and len(answer["probe_groups"]) == 2


# ----------------------------------------------------------------------------- detector labels

def test_labels_carry_interpretable_flags_and_chance_levels():
    from tb_conceptevo.detectors.base import Detection
    from tb_conceptevo.metrics.anchors import interpretable_counts, interpretable_fraction
    from tb_conceptevo.format.payloads import detection_payload

    sim = np.array([[0.5, 0.1], [0.3, 0.0], [0.03, 0.0], [np.nan, np.nan]], np.float32)
    detection = Detection("l", sim, ["red", "circle"], ["colour", "shape"], 0.04,
                          null_similarity=np.array([0.2, 0.4, 0.01, np.nan], np.float32))
    header, arrays = detection_payload("netdissect", detection, interpretable_counts(detection),
                                       interpretable_fraction(detection))
    header = dict(header, kind="detector")
    answer = views.labels_answer(header, arrays)
    assert answer["interpretable"] == [True, False, False, False]
    np.testing.assert_array_equal(answer["null_similarity"], detection.null_similarity)
    point = views.label_point(3, header, arrays, 1)
    assert point == {"step": 3, "concept": "red", "category": "colour", "similarity": pytest.approx(0.3),
                     "interpretable": False, "threshold": pytest.approx(0.04), "null_similarity": pytest.approx(0.4)}
    unscored = views.label_point(3, header, arrays, 3)
    assert unscored["concept"] is None and unscored["interpretable"] is False and unscored["null_similarity"] is None


def test_labels_of_older_logs_fall_back_to_tau():
    header = {"kind": "detector", "concepts": ["red", "circle"], "categories": ["colour", "shape"], "threshold": 0.04}
    arrays = {"top_concepts": np.array([[0, 1], [1, 0], [-1, -1]], np.int32),
              "top_similarity": np.array([[0.5, 0.1], [0.03, 0.0], [np.nan, np.nan]], np.float32)}
    answer = views.labels_answer(header, arrays)
    assert answer["interpretable"] == [True, False, False] and "null_similarity" not in answer
    point = views.label_point(0, header, arrays, 0)
    assert point["interpretable"] is True and point["threshold"] == 0.04 and point["null_similarity"] is None
