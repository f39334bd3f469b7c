"""The conceptevo plugin through TensorBoard's own WSGI app, under the Python loader and
rustboard (``--load_fast=true``), with the same assertions (``plugin_checks``)."""

from __future__ import annotations

import os
import time

import pytest
from werkzeug.test import Client

from tb_conceptevo.plugin.loader import ConceptEvoLoader

from . import plugin_checks as checks
from . import plugin_fixtures as fx

LOADERS = ["python", "rustboard"]


def make_app(logdir: str, loader: str):
    """``(wsgi_app, close)`` built the way ``tensorboard`` builds it, for one loader."""
    from tensorboard import program
    from tensorboard.backend import application
    from tensorboard.plugins.core import core_plugin

    board = program.TensorBoard(plugins=[core_plugin.CorePluginLoader(), ConceptEvoLoader()])
    argv = ["tensorboard", "--logdir", logdir, "--reload_interval", "0"]
    argv += ["--load_fast", "true"] if loader == "rustboard" else ["--load_fast", "false", "--reload_task", "blocking"]
    board.configure(argv)
    provider, multiplexer = board._make_data_provider()
    expected = "GrpcDataProvider" if loader == "rustboard" else "MultiplexerDataProvider"
    assert type(provider).__name__ == expected, type(provider)
    app = application.TensorBoardWSGIApp(board.flags, board.plugin_loaders, provider, None, multiplexer)

    def close():
        handle = getattr(getattr(board, "_ingester", None), "_stdin_handle", None)
        if handle is not None:  # rustboard runs with --die-after-stdin
            handle.close()

    return app, board.flags, close


def fetcher(app):
    client = Client(app)

    def fetch(path, headers=None):
        response = client.get(checks.url(path), headers=headers or {})
        try:
            body = response.get_data()
            return checks.Reply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, body)
        finally:
            response.close()

    return fetch


def wait_until(fetch, ready, timeout=60.0):
    """rustboard loads in the background: poll until ``ready(fetch)`` holds."""
    deadline = time.time() + timeout
    while True:
        try:
            if ready(fetch):
                return
        except (AssertionError, KeyError, ValueError):
            pass
        if time.time() > deadline:
            raise AssertionError("TensorBoard did not load the logdir in time")
        time.sleep(0.2)


def _loaded(facts):
    def ready(fetch):
        runs = {r["run"]: r["steps"] for r in fetch("runs").json()["runs"]}
        return runs == facts["steps"] and "train/loss" in fetch("metrics?run=scalars_only").json()["scalars"]

    return ready


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("plugin_logdir"))
    return root, fx.write_logdir(root)


@pytest.fixture(scope="module", params=LOADERS)
def served(request, logdir):
    root, facts = logdir
    app, flags, close = make_app(root, request.param)
    fetch = fetcher(app)
    wait_until(fetch, _loaded(facts))
    yield fetch, facts, flags
    close()


@pytest.mark.parametrize("check", checks.ALL_CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_routes(served, check):
    fetch, facts, _ = served
    check(fetch, facts)


def test_fix_flags_keeps_every_step(served):
    _, _, flags = served
    assert flags.samples_per_plugin["conceptevo"] == 0


def test_fix_flags_respects_the_user():
    import argparse

    flags = argparse.Namespace(samples_per_plugin={"conceptevo": 5, "images": 3})
    ConceptEvoLoader().fix_flags(flags)
    assert flags.samples_per_plugin == {"conceptevo": 5, "images": 3}


def test_entry_point_module_is_light():
    import subprocess
    import sys

    code = ("import sys, tb_conceptevo.plugin.loader as m; "
            "print(sorted(x for x in ('torch', 'numpy', 'tb_conceptevo.plugin.plugin') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch" not in out and "plugin.plugin" not in out, out


def test_no_route_answers_500_on_junk(served):
    """Every route, every parameter: junk values answer 4xx JSON, never 500."""
    fetch, _, _ = served
    routes = {
        "map": "run=baseline&space=conceptevo&layer=features.0&step=0",
        "labels": "run=baseline&detector=netdissect&layer=features.0&step=0",
        "neuron": "run=baseline&layer=features.0&channel=0&step=0&space=conceptevo&detector=netdissect",
        "categories": "run=baseline&detector=netdissect&step=0",
        "anchors": "run=baseline&space=conceptevo",
        "importance": "run=baseline&class=1&layer=features.0&step=2",
        "revert": "run=baseline&class=1&step=2",
        "probe": "run=baseline", "atlas": "run=baseline&index=0",
        "patch": "run=baseline&image=0&x0=0&y0=0&x1=4&y1=4", "metrics": "run=baseline",
    }
    junk = ["", "-1", "1e3", "0x1", "%FF%FE", "%00", "..", "a/b", "%E2%80%AE", " 1", "1 ", "99999999999999999999"]
    for route, query in routes.items():
        assert fetch(f"{route}?{query}").status == 200, route
        pairs = [p.split("=", 1) for p in query.split("&")]
        for i, (name, _) in enumerate(pairs):
            for value in junk:
                mutated = "&".join(f"{n}={value if j == i else v}" for j, (n, v) in enumerate(pairs))
                reply = fetch(f"{route}?{mutated}")
                assert 400 <= reply.status < 500, (route, mutated, reply.status, reply.body[:200])
                assert reply.json()["error"]


def test_cache_is_bounded_and_reused(served):
    fetch, _, _ = served
    first = fetch("map?run=baseline&space=conceptevo&layer=features.2&step=0")
    second = fetch("map?run=baseline&space=conceptevo&layer=features.2&step=0")
    assert first.body == second.body and first.headers["etag"] == second.headers["etag"]


@pytest.mark.parametrize("loader", LOADERS)
def test_empty_and_scalars_only_logdirs(tmp_path, loader):
    empty = tmp_path / "empty"
    empty.mkdir()
    scalars = tmp_path / "scalars"
    fx.write_scalars_only(str(scalars / "run"))
    for root in (empty, scalars):
        app, _, close = make_app(str(root), loader)
        try:
            fetch = fetcher(app)
            if root == scalars:
                wait_until(fetch, lambda f: "train/loss" in f("metrics?run=run").json()["scalars"])
            checks.check_empty(fetch)
        finally:
            close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _stores():
    import gc

    from tb_conceptevo.plugin.store import Store

    return [o for o in gc.get_objects() if type(o) is Store]  # type(): isinstance would touch lazy modules


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
@pytest.mark.parametrize("loader", LOADERS)
def test_memory_stays_bounded_whatever_experiment_ids_clients_send(logdir, loader):
    """TensorBoard routes any /experiment/<id>/data/plugin/...: 2,000 distinct ids must
    not grow the plugin's state without bound.  The structural bound (at most
    ``max_experiments`` experiment indexes kept) is exact; RSS growth is checked against
    a generous ceiling: before the bound each id kept its own index (and RSS grew by
    ~0.7 MiB an id on a demo-sized logdir)."""
    from tb_conceptevo.plugin.store import DEFAULT_MAX_EXPERIMENTS

    root, facts = logdir
    app, _, close = make_app(root, loader)
    try:
        fetch = fetcher(app)
        wait_until(fetch, _loaded(facts))
        n_ids = 2000 if loader == "python" else 400   # rustboard: ~40 ms a gRPC index read

        def hammer(ids):
            for i in ids:
                prefix = f"/experiment/e{i}/data/plugin/conceptevo/"
                assert fetch(prefix + "runs").status == 200
                assert fetch(prefix + "map?run=baseline&space=conceptevo&layer=features.2&step=0").status == 200

        hammer(range(20))   # warm: allocator pools, caches of the first answers
        before = _rss_bytes()
        hammer(range(20, 20 + n_ids))
        grown = _rss_bytes() - before
        stores = [s for s in _stores() if s.n_experiments]
        assert stores and all(s.n_experiments <= DEFAULT_MAX_EXPERIMENTS for s in stores)
        assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB over {n_ids} experiment ids"
    finally:
        close()
