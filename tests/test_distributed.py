"""Two gloo processes each record a shard; the merged top-k equals one process exactly.

Batch size 1 makes every image's activations bit-identical whatever the sharding
(conv kernels may round differently for other batch compositions), so the only
thing under test is the cross-rank merge, which must then be exact."""

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tb_conceptevo.recording import record
from tests.conftest import random_probe
from tests.test_recording import Branchy


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Branchy()
        from tb_conceptevo.writer import ConceptWriter

        writer = ConceptWriter(os.path.join(out_dir, "run"), probe=random_probe(n=37, size=12), k=5,
                               batch_size=1, progress=False)
        obs = writer.add_concepts(model, step=3)
        writer.close()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"),
                 **{f"{n}_{f}": getattr(o, f) for n, o in obs.items()
                    for f in ("image_ids", "activations", "positions")})
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    torch.manual_seed(0)
    single = record(Branchy(), random_probe(n=37, size=12), k=5, batch_size=1, progress=False)
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for name, o in single.items():
            np.testing.assert_array_equal(got[f"{name}_image_ids"], o.image_ids)
            np.testing.assert_array_equal(got[f"{name}_activations"], o.activations)
            np.testing.assert_array_equal(got[f"{name}_positions"], o.positions)
    # only rank 0 wrote an event file
    files = [f for f in os.listdir(tmp_path / "run") if f.startswith("events")]
    assert len(files) == 1
