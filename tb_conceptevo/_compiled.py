"""The package's parallel numba loops, run so that they leave torch's threads alone.

numba's OpenMP threading layer resets the process's OpenMP thread count when its pool
first runs, and torch reads that count as its own: a ``torch.set_num_threads(1)`` made
for reproducible training silently became the core count after the first
``add_concepts`` (measured: 1 -> 2 on a 2-core machine), so recording changed how the
user's network trained.  Every parallel loop here is called through
:func:`parallel_loop`, which restores torch's count after the call and runs the loop on
at most torch's threads (the user's budget for this process).  Inside an outer
:func:`torch_threads_kept` block (the recording pass wraps all of its hundreds of
loop calls in one) a call only re-checks torch's count afterwards: entering and
leaving the guard costs about 30 us (profiled), more than many of those loops.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numba
import torch


# numba's thread count is per thread, so is the guard's state: the torch count kept
_kept = threading.local()


@contextlib.contextmanager
def torch_threads_kept():
    """Inside: numba's parallel loops use at most ``torch.get_num_threads()`` threads.
    After: torch's thread count is what it was before, whatever ran inside (our loops,
    umap-learn's or pynndescent's)."""
    threads = torch.get_num_threads()
    outer = getattr(_kept, "threads", None)
    _kept.threads = threads
    try:
        previous = numba.get_num_threads()
        wanted = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
        if previous != wanted:
            numba.set_num_threads(wanted)
        try:
            yield
        finally:
            if previous != wanted:
                numba.set_num_threads(previous)
    finally:
        _kept.threads = outer
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def parallel_loop(function=None, *, fastmath=False):
    """``numba.njit(parallel=True, cache=True, nogil=True, fastmath=fastmath)``, called
    inside :func:`torch_threads_kept`.  The compiled dispatcher is ``.compiled``.
    Usable bare (``@parallel_loop``) or with options (``@parallel_loop(fastmath=...)``)."""
    if function is None:
        return functools.partial(parallel_loop, fastmath=fastmath)
    compiled = numba.njit(parallel=True, cache=True, nogil=True, fastmath=fastmath)(function)

    @functools.wraps(function)
    def call(*args):
        threads = getattr(_kept, "threads", None)
        if threads is None:
            with torch_threads_kept():
                return compiled(*args)
        try:  # numba's count was set by the enclosing block
            return compiled(*args)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    call.compiled = compiled
    return call
