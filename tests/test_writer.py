"""ConceptWriter writes TF-free events that both TensorBoard loaders read back."""

import os
import struct

import numpy as np
import pytest
import torch
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as stub_crc

from tb_conceptevo.format import metadata
from tb_conceptevo.observation import LayerObservation
from tb_conceptevo.format.payloads import stimuli_payload
from tb_conceptevo.reading import ConceptReader
from tb_conceptevo.format.summary import PayloadError, pack, payload_summary, unpack
from tb_conceptevo.writer import ConceptWriter
from tests.conftest import random_probe
from tests.test_recording import Branchy


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    torch.manual_seed(0)
    model = Branchy()
    probe = random_probe(n=30, size=12)
    writer = ConceptWriter(str(root / "run_a"), probe=probe, k=4, batch_size=8, progress=False)
    observations = []
    for step in range(3):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        observations.append(writer.add_concepts(model, step=step))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    writer.close()
    return root, observations, probe


@pytest.mark.parametrize("fast", [False, True], ids=["python-loader", "rustboard"])
def test_reader_returns_what_was_written(logdir, fast):
    root, observations, probe = logdir
    with ConceptReader(str(root), fast=fast) as logs:
        assert logs.runs() == ["run_a"]
        assert logs.layers("run_a") == ["left", "right", "stem"]
        assert logs.steps("run_a") == [0, 1, 2]
        for step, expected in enumerate(observations):
            got = logs.observation("run_a", step)
            assert got.probe_hash == probe.hash
            for name, layer in expected.items():
                np.testing.assert_array_equal(got[name].image_ids, layer.image_ids)
                np.testing.assert_array_equal(got[name].activations, layer.activations)
                np.testing.assert_array_equal(got[name].positions, layer.positions)
                assert got[name].map_size == layer.map_size and got[name].input_size == (12, 12)
        header, arrays = logs.probe("run_a")
        assert header["n_images"] == 30 and header["probe_hash"] == probe.hash
        assert arrays["atlas_0"][:8].tobytes() == b"\x89PNG\r\n\x1a\n"


def test_native_crc_matches_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from tb_conceptevo.event_files import NATIVE_MASKED_CRC32C

    if NATIVE_MASKED_CRC32C is not None:
        for data in (b"", b"abc", os.urandom(10_000)):
            assert NATIVE_MASKED_CRC32C(data) == stub_crc(data)
    # Same events through a ConceptWriter and a plain SummaryWriter: identical bytes after
    # the file-version record (whose wall time differs), and the plain one is untouched.
    from tensorboard.summary.writer import record_writer

    files = {}
    for name, cls in (("ours", ConceptWriter), ("plain", SummaryWriter)):
        with cls(str(tmp_path / name)) as writer:
            record = writer._get_file_writer().event_writer._async_writer._writer
            swapped = "write" in vars(record)
            assert swapped == (name == "ours" and NATIVE_MASKED_CRC32C is not None), name
            for step in range(3):
                writer.add_scalar("loss", 1.0 / (step + 1), step)
                writer.add_text("note", "x" * 5000, step)
        (path,) = (tmp_path / name).iterdir()
        files[name] = path.read_bytes()
    assert _records_without_wall_time(files["ours"]) == _records_without_wall_time(files["plain"])
    assert record_writer.masked_crc32c is stub_crc  # nothing patched process-wide


def _events(raw: bytes):
    from tensorboard.compat.proto import event_pb2

    offset, events = 0, []
    while offset < len(raw):
        (length,) = struct.unpack("<Q", raw[offset:offset + 8])
        data = raw[offset + 12:offset + 12 + length]
        (stored,) = struct.unpack("<I", raw[offset + 12 + length:offset + 16 + length])
        assert stored == stub_crc(data), "record checksum differs from TensorBoard's CRC32C"
        events.append(event_pb2.Event.FromString(data))
        offset += 16 + length
    return events


def _records_without_wall_time(raw: bytes):
    out = []
    for event in _events(raw):
        event.wall_time = 0
        out.append(event.SerializeToString())
    return out


def test_payload_roundtrip_and_errors():
    arrays = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": np.array([1.5], np.float16)}
    header, back = unpack(pack({"x": 1}, arrays))
    assert header["x"] == 1 and header["version"] == metadata.FORMAT_VERSION
    np.testing.assert_array_equal(back["a"], arrays["a"])
    blobs = pack({}, arrays)
    with pytest.raises(PayloadError, match="bytes, expected"):
        unpack(blobs[:1] + [blobs[1][:-2], blobs[2]])
    with pytest.raises(PayloadError, match="newer"):
        unpack([b'{"version": 99, "arrays": []}'])
    with pytest.raises(PayloadError, match="not valid JSON"):
        unpack([b"\xff"])


def test_payload_for_4096_neurons_under_1mb():
    rng = np.random.default_rng(0)
    n, k = 4096, 10
    obs = LayerObservation("layer", rng.integers(0, 2048, (n, k)).astype(np.int32),
                           rng.random((n, k), dtype=np.float32), rng.integers(0, 64, (n, k)).astype(np.int32),
                           np.zeros(n, bool), (8, 8), (64, 64), "h" * 64)
    size = payload_summary("conceptevo/stimuli/layer", *stimuli_payload(obs)).ByteSize()
    assert size <= 1_000_000, size


def test_truncated_event_file_keeps_earlier_steps(logdir, tmp_path):
    root, observations, _ = logdir
    run = tmp_path / "run_a"
    run.mkdir()
    (src,) = [f for f in os.listdir(root / "run_a") if f.startswith("events")]
    data = (root / "run_a" / src).read_bytes()
    (run / src).write_bytes(data[: len(data) - 300])  # killed mid-record
    with ConceptReader(str(tmp_path)) as logs:
        steps = logs.steps("run_a")
        assert steps[:2] == [0, 1]
        got = logs.observation("run_a", 1)
        np.testing.assert_array_equal(got["stem"].image_ids, observations[1]["stem"].image_ids)


def test_writer_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a probe set"):
        ConceptWriter(str(tmp_path / "a")).add_concepts(Branchy(), 0)

    class Bad:
        name = "a/b"

    with pytest.raises(ValueError, match="invalid space name"):
        ConceptWriter(str(tmp_path / "b"), probe=random_probe(), spaces=[Bad()])
    assert not (tmp_path / "b").exists()  # refused before creating anything


def test_reader_unknown_run_and_step(logdir):
    root, _, _ = logdir
    with ConceptReader(str(root)) as logs:
        with pytest.raises(KeyError, match="no tb_conceptevo data"):
            logs.observation("nope")
        with pytest.raises(KeyError, match="no data at step 7"):
            logs.observation("run_a", 7)


def test_importance_since_last_snapshot(tmp_path):
    torch.manual_seed(0)
    model = Branchy()
    probe = random_probe(n=16, size=8)
    writer = ConceptWriter(str(tmp_path / "run"), probe=probe, k=2, progress=False, keep_previous_weights=True)
    with pytest.raises(ValueError, match="no earlier snapshot"):
        writer.add_concept_importance(model, 1, probe.images, step=0, labels=torch.ones(16, dtype=torch.long))
    writer.add_concepts(model, step=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    writer.add_concepts(model, step=1)
    result, reverted = writer.add_concept_importance(model, 1, probe.images, step=1,
                                                     labels=torch.ones(16, dtype=torch.long), revert=True)
    writer.close()
    assert result.from_step == 0 and result.to_step == 1 and reverted is not None
    with ConceptReader(str(tmp_path)) as logs:
        header, arrays = logs.payload("run", metadata.importance_tag(1, "stem"), 1)
        assert header["from_step"] == 0 and arrays["importance"].shape == (8,)
        np.testing.assert_allclose(arrays["importance"], result.layers["stem"].importance)
        revert_header, _ = logs.payload("run", metadata.revert_tag(1), 1)
        assert revert_header["to_step"] == 1


def test_writer_says_when_a_run_gets_no_labels(tmp_path, caplog):
    from tb_conceptevo import ConceptWriter
    from tb_conceptevo.detectors import NetDissect
    from tb_conceptevo.probes import ConceptShapes
    from tb_conceptevo.writer import labels_notice

    from tests.conftest import random_probe

    probe = ConceptShapes(n=4, size=16)
    with caplog.at_level("WARNING", logger="tb_conceptevo"):
        ConceptWriter(str(tmp_path / "a"), probe=random_probe()).close()
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "no detector" in line and "no concept masks" in line and '"Your own data"' in line and "\n" not in line
    assert labels_notice([NetDissect(vocabulary=probe)], probe) is None
    caplog.clear()
    with caplog.at_level("WARNING", logger="tb_conceptevo"):
        ConceptWriter(str(tmp_path / "b"), probe=probe, detectors=[NetDissect(vocabulary=probe)]).close()
    assert not caplog.records
