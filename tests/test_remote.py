"""Event-file rotation, and what a run costs on an S3-compatible object store on loopback.

Object stores have no append: TensorBoard's S3 layer re-uploads the whole event file at
every flush, so a run's upload cost grows with the square of its length unless the
writer starts a new file once the current one is large (``rotate_bytes``).
"""

from __future__ import annotations

import contextlib
import os
import socket

import numpy as np
import pytest
import torch

from tb_conceptevo import ConceptReader
from tb_conceptevo.writer import ConceptWriter

from . import plugin_fixtures as fx
from .conftest import random_probe
from .test_plugin import LOADERS
from .test_reliability import serving

SNAPSHOTS = 6


def _write_snapshots(log_dir: str, rotate_bytes) -> None:
    model = fx.SmallNet(0)
    writer = ConceptWriter(log_dir, probe=random_probe(n=40, size=32, seed=0), layers=fx.LAYERS, k=5,
                           progress=False, rotate_bytes=rotate_bytes)
    try:
        for step in range(SNAPSHOTS):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            writer.add_concepts(model, step=step)
    finally:
        writer.close()


def _event_files(run_dir: str):
    return sorted(f for f in os.listdir(run_dir) if f.startswith("events.out.tfevents."))


@pytest.mark.parametrize("loader", LOADERS)
def test_rotated_event_files_are_read_whole_by_both_loaders(tmp_path, loader):
    run_dir = os.path.join(str(tmp_path), "rotated")
    _write_snapshots(run_dir, rotate_bytes=1)  # a new file after every snapshot
    assert len(_event_files(run_dir)) == SNAPSHOTS
    with serving(str(tmp_path), loader, "rotated") as fetch:
        for step in range(SNAPSHOTS):
            reply = fetch(f"neuron?run=rotated&layer={fx.LAYERS[1]}&channel=3&step={step}")
            assert reply.status == 200, (step, reply.body[:200])
    with ConceptReader(str(tmp_path)) as logs:
        assert logs.steps("rotated") == list(range(SNAPSHOTS))


def test_local_logdirs_do_not_rotate_by_default(tmp_path):
    run_dir = os.path.join(str(tmp_path), "local")
    _write_snapshots(run_dir, rotate_bytes="auto")
    assert len(_event_files(run_dir)) == 1


@contextlib.contextmanager
def _s3_on_loopback(monkeypatch):
    """A moto S3 server on 127.0.0.1 and TensorBoard's S3 file layer pointed at it;
    yields a list that collects the size of every object upload."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    from tensorboard.compat.tensorflow_stub.io import gfile

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        s3 = gfile.get_filesystem("s3://bucket/x")
        monkeypatch.setattr(s3, "_s3_endpoint", f"http://127.0.0.1:{port}")
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket="runs")
        uploads = []
        original_write = type(s3).write

        def counting_write(self, filename, file_content, binary_mode=False):
            uploads.append(len(file_content))
            return original_write(self, filename, file_content, binary_mode)

        monkeypatch.setattr(type(s3), "write", counting_write)
        yield uploads
    finally:
        server.stop()


def test_an_object_store_run_costs_linear_uploads_with_rotation(tmp_path, monkeypatch):
    from tensorboard.compat.tensorflow_stub.io import gfile

    with _s3_on_loopback(monkeypatch) as uploads:
        _write_snapshots("s3://runs/logs/plain", rotate_bytes=None)
        plain_uploaded = sum(uploads)
        plain_files = gfile.listdir("s3://runs/logs/plain")
        plain_size = sum(gfile.stat(f"s3://runs/logs/plain/{f}").length for f in plain_files)
        uploads.clear()

        # One snapshot's payloads as the bound: a new file after every snapshot.
        _write_snapshots("s3://runs/logs/rotated", rotate_bytes=1)
        rotated_uploaded = sum(uploads)
        rotated_files = gfile.listdir("s3://runs/logs/rotated")
        rotated_size = sum(gfile.stat(f"s3://runs/logs/rotated/{f}").length for f in rotated_files)
        first_file = gfile.stat(f"s3://runs/logs/rotated/{sorted(rotated_files)[0]}").length  # probe + snapshot 0

        with ConceptReader("s3://runs/logs") as logs:
            assert logs.steps("rotated") == logs.steps("plain") == list(range(SNAPSHOTS))
            np.testing.assert_array_equal(logs.observation("rotated", step=4)[fx.LAYERS[0]].image_ids,
                                          logs.observation("plain", step=4)[fx.LAYERS[0]].image_ids)

    print(f"\nS3 uploads for {SNAPSHOTS} snapshots: without rotation {plain_uploaded} B for a {plain_size} B log, "
          f"with rotation {rotated_uploaded} B for {rotated_size} B in {len(rotated_files)} files")
    # Each file is uploaded when created (its file-version record) and twice while closing
    # (TensorBoard's event writer flushes, then its file flushes again on close): at most
    # 2x its size, 3x as a bound with room for the records.  Without rotation every snapshot's flush
    # re-uploads everything before it as well.
    assert len(rotated_files) == SNAPSHOTS
    assert rotated_uploaded <= 3 * rotated_size + 4 * 128 * len(rotated_files)
    assert plain_uploaded >= SNAPSHOTS * first_file + 2 * plain_size
