"""``on_calling_thread``: a stretch of tiny tensor ops run without PyTorch's intra-op thread pool.

A CPU op that PyTorch parallelises (a batched matmul splits its batch across threads, however small each matrix)
opens an OpenMP parallel region: on a quiet machine that costs a few microseconds, but when the cores are busy
with anything else each region waits for a descheduled worker thread, a scheduler time slice of milliseconds,
for an op worth microseconds. A long chain of such ops (the sparse cache's eviction loop, a decode step's reads of
a small state) then runs tens of times slower than the same chain on one thread. Setting the thread count costs
under a microsecond, so the scope can be as narrow as the chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def on_calling_thread(active: bool = True) -> Iterator[None]:
    """Run the body with one intra-op thread (``torch.set_num_threads(1)``), then restore the count. Only CPU ops
    are affected; ``active=False`` (e.g. for CUDA tensors) leaves everything as it is."""
    threads = torch.get_num_threads()
    if not active or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
