"""The package's compiled loops never change torch's thread count (numba's OpenMP
layer resets it when its pool first runs) and stay within it."""

import os
import subprocess
import sys
import textwrap

import numba
import torch

from tb_conceptevo._compiled import torch_threads_kept


def test_recording_and_detection_leave_torch_threads_alone():
    # a fresh process: the reset happens only when numba's pool first starts
    script = textwrap.dedent("""
        import numba, torch
        from tb_conceptevo import record
        from tb_conceptevo.detectors import NetDissect
        from tb_conceptevo.image_links import ImageLinksRecorder
        from tb_conceptevo.probes import ConceptShapes
        from tb_conceptevo.spaces.layout import StableLayout
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
        probe = ConceptShapes(n=32, size=24, seed=0)
        detector = NetDissect(vocabulary=probe.vocabulary, progress=False)
        record(model, probe, layers=["0", "2"], k=4, batch_size=16, progress=False,
               consumers=[detector.consumer(probe, ["0", "2"]), ImageLinksRecorder()])
        assert torch.get_num_threads() == 1
        vectors = torch.randn(40, 5, generator=torch.Generator().manual_seed(0)).double().numpy()
        StableLayout(random_state=0).fit(vectors).transform(vectors[:3])
        print(torch.get_num_threads(), numba.get_num_threads())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    torch_threads, numba_threads = out.stdout.split()
    assert torch_threads == "1"
    assert numba_threads == "2"   # numba's own setting is restored too


def test_a_loop_inside_an_outer_guard_restores_torch_threads_at_once():
    # Inside one guard (as during recording, where the model runs between loop calls)
    # each call re-checks torch's count.  The pool's first start resets the OpenMP count
    # to numba's, which differs from torch's when numba may use fewer threads.
    script = textwrap.dedent("""
        import numpy as np, torch
        from tb_conceptevo._compiled import torch_threads_kept
        from tb_conceptevo.recording import _kernels
        torch.set_num_threads(2)
        with torch_threads_kept():
            _kernels.merge_topk(np.zeros((4, 3), np.float32), np.zeros((4, 3), np.int64), np.ones((4, 1), np.uint64),
                                np.ones((4, 8), np.uint8),
                                np.arange(4),
                                np.full((3, 2), -np.inf, np.float32), np.full((3, 2), -1, np.int64),
                                np.zeros((3, 2), np.int64), np.zeros(3, np.float32), 1)
            print(torch.get_num_threads())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2"]


def test_compiled_loops_stay_within_torch_threads():
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch_threads_kept():
            inside = numba.get_num_threads()
        assert inside == 1
        assert numba.get_num_threads() == numba_threads
    finally:
        torch.set_num_threads(torch_threads)
