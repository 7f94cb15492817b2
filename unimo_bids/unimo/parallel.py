"""Per-volume numpy/scipy work over the volumes of a series, in threads.

scipy's distance transforms, labelling and binary morphology release the GIL, so a few threads,
each on its own contiguous group of volumes, use the cores that torch would use. Measured on
2 CPU cores (AMD EPYC), 16 real BOLD volumes (64x64x33): signed distance maps 0.22 -> 0.12 s,
classical brain masks 0.12 -> 0.08 s with two threads. Results do not depend on the number of
threads: every volume is processed on its own.

Pure numpy/torch: no nipype, no BIDS.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

__all__ = ["thread_count", "volume_groups", "run_on_groups"]


def thread_count(workers: int | None = None) -> int:
    """``workers``, or the process's compute budget: torch's thread count (the interfaces set it
    from their ``num_threads``)."""
    return max(1, int(workers if workers is not None else torch.get_num_threads()))


def volume_groups(count: int, workers: int, most: int | None = None) -> list[slice]:
    """Contiguous slices covering ``count`` volumes: ``workers`` groups of nearly equal size (no
    more groups than volumes), each cut into pieces of at most ``most`` volumes."""
    groups = np.array_split(np.arange(count), max(1, min(workers, count)))
    slices = []
    for group in groups:
        if group.size == 0:
            continue
        step = group.size if most is None else max(1, most)
        slices += [slice(int(start), int(min(start + step, group[-1] + 1)))
                   for start in range(int(group[0]), int(group[-1]) + 1, step)]
    return slices


def run_on_groups(function: Callable[[slice], None], count: int, workers: int | None = None,
                  most: int | None = None) -> None:
    """Call ``function(group)`` for the ``volume_groups`` of ``count`` volumes, in
    ``thread_count(workers)`` threads (in this thread when there is one). ``function`` writes
    its own results (e.g. into slices of a preallocated array); its first error is raised."""
    workers = thread_count(workers)
    groups = volume_groups(count, workers, most)
    if workers == 1 or len(groups) == 1:
        for group in groups:
            function(group)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(groups))) as pool:
        for future in [pool.submit(function, group) for group in groups]:
            future.result()
