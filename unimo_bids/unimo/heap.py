"""Keep freed memory in the process while the engine runs (glibc only).

The engine allocates and frees tensors of the same few sizes thousands of times. With glibc's
defaults, every large block goes back to the kernel when freed and comes back as fresh zeroed
pages, so a registration spends about half its wall time in page faults
(benchmarks/page_faults.py: 23.9 s of system time for 200 volumes). ``retained_heap`` raises the
mmap and trim thresholds for the duration of a computation, so the blocks are reused, and on exit
restores glibc's defaults and returns the memory (``malloc_trim``). Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024,
             _M_MMAP_THRESHOLD: 128 * 1024}
_RETAINED = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 2**30, _M_MMAP_THRESHOLD: 2**31 - 1}


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextmanager
def retained_heap():
    """Context in which freed memory stays in the process (see the module note)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    for option, value in _RETAINED.items():
        libc.mallopt(option, value)
    try:
        yield
    finally:
        for option, value in _DEFAULTS.items():
            libc.mallopt(option, value)
        libc.malloc_trim(0)
