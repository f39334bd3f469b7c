"""Two gloo processes each record a shard; the merged top-k equals one process exactly.

The model and images are integer-exact (tests.conftest.ExactBranchy): every
activation is the same integer in every process, whatever the batch composition,
thread count or CPU code path, so the only thing under test is the cross-rank merge,
which must then be exact."""

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tb_conceptevo.recording import record
from tests.conftest import ExactBranchy, integer_probe


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = ExactBranchy()
        from tb_conceptevo.writer import ConceptWriter

        writer = ConceptWriter(os.path.join(out_dir, "run"), probe=integer_probe(n=37, size=12), k=5,
                               batch_size=3, progress=False)
        obs = writer.add_concepts(model, step=3)
        writer.close()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"),
                 **{f"{n}_{f}": getattr(o, f) for n, o in obs.items()
                    for f in ("image_ids", "activations", "positions")})
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    single = record(ExactBranchy(), integer_probe(n=37, size=12), k=5, batch_size=8, progress=False)
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for name, o in single.items():
            np.testing.assert_array_equal(got[f"{name}_image_ids"], o.image_ids)
            np.testing.assert_array_equal(got[f"{name}_activations"], o.activations)
            np.testing.assert_array_equal(got[f"{name}_positions"], o.positions)
    # only rank 0 wrote an event file
    files = [f for f in os.listdir(tmp_path / "run") if f.startswith("events")]
    assert len(files) == 1


def _detector_worker(rank, world, port, out_dir):
    """Both detectors under distributed: NetDissect's thresholds and counts and
    CLIP-Dissect's responses must merge into the single-process result."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        probe, model, consumers = _detector_setup()
        record(model, probe, LAYERS, k=3, batch_size=4, consumers=consumers, progress=False)
        netdissect, clip = consumers
        dissected = netdissect.result()
        np.savez(os.path.join(out_dir, f"detectors{rank}.npz"),
                 **{f"iou_{n}": d.similarity for n, d in dissected.items()},
                 **{f"chance_{n}": d.null_similarity for n, d in dissected.items()},
                 **{f"responses_{n}": r.numpy() for n, r in clip.responses.items()})
    finally:
        dist.destroy_process_group()


LAYERS = ["1", "3"]


class _Quantise(torch.nn.Module):
    def forward(self, x):
        return torch.round(x * 255)


def _detector_setup():
    import warnings

    import torch.nn as nn

    from tb_conceptevo.detectors import CLIPDissect, NetDissect
    from tb_conceptevo.detectors import clip_dissect
    from tb_conceptevo.probes import ConceptShapes

    probe = ConceptShapes(n=30, size=16, seed=3)
    # Integer-exact activations (see ExactBranchy): pixels quantised to 0..255 (one
    # correctly rounded multiply and a round), then integer-weight convolutions.
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(_Quantise(), nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False))
    with torch.no_grad():
        for conv in (model[1], model[3]):
            conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape, generator=g).float())
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip_model = clip_dissect.load_open_clip("ViT-S-32-alt", None)
    netdissect = NetDissect(vocabulary=probe, quantile=0.9, progress=False).consumer(probe, LAYERS)
    clip = CLIPDissect("ViT-S-32-alt", clip_model=clip_model, concepts=["red", "circle"], reduce="max",
                       progress=False).consumer(probe, LAYERS)
    return probe, model, [netdissect, clip]


def test_detectors_under_two_process_gloo_equal_single_process(tmp_path):
    mp.start_processes(_detector_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    probe, model, consumers = _detector_setup()
    record(model, probe, LAYERS, k=3, batch_size=7, consumers=consumers, progress=False)
    netdissect, clip = consumers
    single = netdissect.result()
    for rank in (0, 1):
        got = np.load(tmp_path / f"detectors{rank}.npz")
        for name in LAYERS:
            np.testing.assert_array_equal(got[f"iou_{name}"], single[name].similarity)
            np.testing.assert_array_equal(got[f"chance_{name}"], single[name].null_similarity)
            np.testing.assert_array_equal(got[f"responses_{name}"], clip.responses[name].numpy())
