"""Plugin backend under load: time to the first map, then the map route's latency.

Fixture (issue 6): 10 runs x 50 steps x 4 layers x 1,024 neurons written by
``ConceptWriter`` (stimuli with k = 10 and one 16-d space per layer and step, written
with ``add_payload`` for speed) in a temporary directory.  For each loader (rustboard
``--load_fast=true`` and the Python loader) a real ``tensorboard`` process is started
on 127.0.0.1 and we measure:

* time from process start to the first successful ``/map`` answer (first run, first
  layer, step 0: what the tab shows first), and until every run's 50 steps are listed;
* a bounded load test: ``--threads`` concurrent clients send ``--requests`` map
  requests over random (run, layer, step) keys (a fixed seed), twice: a *mixed* pass
  (mostly first requests, the plugin's cache is cold) and a *warm* pass.

Target: p95 <= 50 ms once loaded (the warm pass) and 0 errors in both passes; the mixed
pass is reported because it shows the cost of first reads (one rustboard round trip,
~40 ms on loopback, per cold map).  The machine's load average is printed: on a
shared 2-core machine latencies scale with it.  Run ``python benchmarks/bench_plugin.py``
(``--loaders rustboard,python`` for both; ``--logdir DIR`` keeps the fixture).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np

RUNS, STEPS, LAYERS, NEURONS, K, DIM = 10, 50, 4, 1024, 10, 16
LAYER_NAMES = [f"features.{3 * i}" for i in range(LAYERS)]
SPACE = "conceptevo"
P95_TARGET_MS = 50.0


def write_fixture(root: str, runs: int, steps: int) -> float:
    from tb_conceptevo.format import metadata
    from tb_conceptevo.observation import LayerObservation
    from tb_conceptevo.format.payloads import embedding_payload, stimuli_payload
    from tb_conceptevo.spaces.base import Embedding
    from tb_conceptevo.writer import ConceptWriter

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    probe_header = {"kind": "probe", "probe_hash": "bench", "n_images": 4096, "image_size": [64, 64],
                    "thumbnail_size": [32, 32], "atlas_grid": 16, "n_atlases": 0, "class_names": None,
                    "vocabulary": None, "probe_type": "bench"}
    for r in range(runs):
        writer = ConceptWriter(os.path.join(root, f"run_{r:02d}"), probe=None, progress=False)
        writer.add_payload(metadata.probe_tag(), probe_header, {}, 0)
        for step in range(steps):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)
            for layer in LAYER_NAMES:
                ids = rng.integers(0, 4096, size=(NEURONS, K), dtype=np.int32)
                obs = LayerObservation(layer=layer, image_ids=ids,
                                       activations=np.sort(rng.random((NEURONS, K), dtype=np.float32))[:, ::-1],
                                       positions=rng.integers(0, 16 * 16, size=(NEURONS, K)).astype(np.int32),
                                       invalid=np.zeros(NEURONS, bool), map_size=(16, 16), input_size=(64, 64),
                                       probe_hash="bench", step=step)
                header, arrays = stimuli_payload(obs)
                writer.add_payload(metadata.stimuli_tag(layer), header, arrays, step)
                layout = rng.normal(size=(NEURONS, 2)).astype(np.float32)
                placed = rng.random(NEURONS) > 0.02
                layout[~placed] = np.nan
                vectors = np.where(placed[:, None], rng.normal(size=(NEURONS, DIM)), np.nan).astype(np.float32)
                embedding = Embedding(vectors=vectors, layout=layout, placed=placed,
                                      groups=rng.integers(-1, 8, NEURONS).astype(np.int32))
                header, arrays = embedding_payload(SPACE, layer, embedding, "bench")
                writer.add_payload(metadata.space_tag(SPACE, layer), header, arrays, step)
        writer.close()
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str, timeout: float = 30.0):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def map_path(run: int, layer: str, step: int) -> str:
    query = urllib.parse.urlencode({"run": f"run_{run:02d}", "space": SPACE, "layer": layer, "step": step})
    return f"/data/plugin/conceptevo/map?{query}"


def wait_for(predicate, timeout: float, process) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError("tensorboard exited early")
        try:
            if predicate():
                return time.perf_counter()
        except (OSError, ValueError, KeyError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"not ready within {timeout} s")


def load_test(port: int, keys, threads: int):
    latencies = np.zeros(len(keys))
    errors = []
    cursor = iter(range(len(keys)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            start = time.perf_counter()
            try:
                status, body = get(port, map_path(*keys[index]))
                ok = status == 200 and len(body) == 4 + 16 * NEURONS
                if not ok:
                    status = f"{status} {body[:200]!r}"
            except (OSError, http.client.HTTPException) as exc:
                ok, status = False, repr(exc)
            latencies[index] = time.perf_counter() - start
            if not ok:
                errors.append(status)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    wall = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - wall
    ms = latencies * 1000
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max()), "errors": len(errors),
            "rps": len(keys) / wall, "error_samples": errors[:3]}


def bench_loader(root: str, loader: str, runs: int, steps: int, requests: int, threads: int) -> dict:
    load_before = os.getloadavg()[0]
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", root, "--host", "127.0.0.1",
               "--port", str(port), "--load_fast", "true" if loader == "rustboard" else "false"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = (0, LAYER_NAMES[0], 0)  # what the tab shows first
        first_map = wait_for(lambda: get(port, map_path(*first))[0] == 200, 1800, process) - start

        def all_loaded():
            status, body = get(port, "/data/plugin/conceptevo/runs")
            listed = json.loads(body)["runs"] if status == 200 else []
            every_step = list(range(steps))
            return len(listed) == runs and all(
                r["spaces"].get(SPACE, {}).get(layer) == every_step for r in listed for layer in LAYER_NAMES)

        loaded = wait_for(all_loaded, 1800, process) - start
        rng = np.random.default_rng(1)
        keys = [(int(r), LAYER_NAMES[int(l)], int(s)) for r, l, s in
                zip(rng.integers(0, runs, requests), rng.integers(0, LAYERS, requests), rng.integers(0, steps, requests))]
        mixed = load_test(port, keys, threads)
        warm = load_test(port, keys, threads)
        return {"first_map_s": first_map, "loaded_s": loaded, "mixed": mixed, "warm": warm,
                "load_before": load_before}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--loaders", default="rustboard",
                        help="comma-separated: rustboard (TensorBoard's default where available), python "
                             "(slow to load 300 MB: pure-Python CRC and proto parsing; try --runs 2)")
    parser.add_argument("--logdir", help="reuse / keep the fixture here instead of a temporary directory")
    args = parser.parse_args()

    root = args.logdir or tempfile.mkdtemp(prefix="bench_plugin_")
    try:
        if not os.path.isdir(root) or not os.listdir(root):
            seconds = write_fixture(root, args.runs, args.steps)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
            print(f"fixture: {args.runs} runs x {args.steps} steps x {LAYERS} layers x {NEURONS} neurons, "
                  f"{size / 2**20:.0f} MiB, written in {seconds:.1f} s")
        ok = True
        for loader in args.loaders.split(","):
            result = bench_loader(root, loader, args.runs, args.steps, args.requests, args.threads)
            print(f"[{loader}] machine load average at start: {result['load_before']:.1f} ({os.cpu_count()} cores, shared)")
            print(f"[{loader}] start -> first map {result['first_map_s']:.1f} s, "
                  f"all runs listed {result['loaded_s']:.1f} s")
            for name in ("mixed", "warm"):
                r = result[name]
                print(f"[{loader}] {name:5s} {args.requests} map requests, {args.threads} clients: "
                      f"p50 {r['p50']:.1f} ms  p95 {r['p95']:.1f} ms  p99 {r['p99']:.1f} ms  "
                      f"max {r['max']:.0f} ms  {r['rps']:.0f} req/s  errors {r['errors']}"
                  + (f" e.g. {r['error_samples']}" if r["errors"] else ""))
            # Target: the steady state (data loaded, plugin cache warm) and no error at all.  The
            # mixed pass is reported, not judged: on rustboard each first read of a blob is a
            # gRPC round trip with a ~40 ms floor on loopback (TensorBoard's own provider).
            passed = result["warm"]["p95"] <= P95_TARGET_MS \
                and result["mixed"]["errors"] == 0 and result["warm"]["errors"] == 0
            ok &= passed
            print(f"[{loader}] warm p95 <= {P95_TARGET_MS:.0f} ms and 0 errors in both passes: "
                  f"{'PASS' if passed else 'FAIL'} (mixed p95 {result['mixed']['p95']:.0f} ms, reported only)")
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if not args.logdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
