"""A real ``tensorboard`` process on 127.0.0.1 (entry-point discovery, both loaders'
default choice, real HTTP): every documented route answers, junk gets 4xx."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from . import plugin_checks as checks
from . import plugin_fixtures as fx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_fetcher(base: str):
    def fetch(path, headers=None):
        request = urllib.request.Request(base + checks.url(path), headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return checks.Reply(response.status, {k.lower(): v for k, v in response.headers.items()},
                                    response.read())
        except urllib.error.HTTPError as exc:
            return checks.Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())

    return fetch


def start_tensorboard(logdir: str, *extra: str):
    """``(process, base_url)``; the caller stops the process."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
               "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return process, f"http://127.0.0.1:{port}"


def stop(process) -> None:
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    if process.poll() is None:  # did not stop on SIGTERM
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("server_logdir"))
    facts = fx.write_logdir(root)
    process, base = start_tensorboard(root)
    fetch = http_fetcher(base)
    deadline = time.time() + 90
    while True:
        if process.poll() is not None:
            raise AssertionError(f"tensorboard exited: {process.stderr.read().decode()[-2000:]}")
        try:
            runs = {r["run"]: r["steps"] for r in fetch("runs").json()["runs"]}
            if runs == facts["steps"] and "train/loss" in fetch("metrics?run=scalars_only").json()["scalars"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        if time.time() > deadline:
            stop(process)
            raise AssertionError("tensorboard did not serve the logdir within 90 s")
        time.sleep(0.3)
    yield fetch, facts
    stop(process)


@pytest.mark.parametrize("check", checks.ALL_CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_real_server(server, check):
    fetch, facts = server
    check(fetch, facts)


def test_real_server_security_headers(server):
    fetch, _ = server
    reply = fetch("runs")
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["content-type"].startswith("application/json")
    module = fetch("static/index.js")
    assert module.headers["content-type"].startswith("text/javascript")
    # The plugin's iframe entry page (served by TensorBoard) imports our ES module.
    entry = fetch("/data/plugin_entry.html?name=conceptevo")
    assert entry.status == 200 and b"./static/index.js" in entry.body
