"""Batch sizes that fit the device's free memory, and a way out when they do not.

Several participants (several nipype workers, or several jobs) may share one GPU. Each engine
call therefore sizes its batches from the memory that is free when it starts, and a CUDA
out-of-memory error halves the batch and retries, down to one volume, then runs on the CPU.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

import torch

LOGGER = logging.getLogger("unimo_bids")
T = TypeVar("T")

# Working memory of the registration engine per voxel of one native volume, in float32
# values: the volume, its shape map, their resampled copies, the pyramid levels and the
# gradients of the refinement. An estimate: the out-of-memory fallback covers what it misses.
ENGINE_FLOATS_PER_VOXEL = 48
FREE_MEMORY_SPARE = 0.2  # left to other processes and to the allocator's fragmentation


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def fitting_chunk(device: str | torch.device, volume_shape, largest: int,
                  floats_per_voxel: int = ENGINE_FLOATS_PER_VOXEL) -> int:
    """How many volumes to process at once on ``device``: ``largest`` on the CPU; on a GPU, at
    most what 80 % of its free memory (``torch.cuda.mem_get_info``, all processes counted)
    holds at ``floats_per_voxel`` float32 values per voxel of a volume of ``volume_shape``.
    """
    if not is_cuda(device):
        return largest
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    per_volume = 4 * floats_per_voxel * int(torch.tensor(volume_shape[:3]).prod())
    return max(1, min(largest, int(free * (1 - FREE_MEMORY_SPARE)) // per_volume))


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "CUDA out of memory" in str(error))


def run_with_memory_fallback(run: Callable[[str, int], T], device: str, chunk_size: int,
                             cpu_chunk_size: int = 64,
                             warn: Callable[[str], None] = LOGGER.warning) -> T:
    """``run(device, chunk_size)``, retried after a CUDA out-of-memory error with half the
    chunk, and on the CPU with ``cpu_chunk_size`` once one volume does not fit. Each retry is
    announced through ``warn``. Errors other than out-of-memory, and any error on the CPU,
    propagate unchanged.
    """
    while True:
        try:
            return run(device, chunk_size)
        except Exception as error:
            if not (is_cuda(device) and is_out_of_memory(error)):
                raise
            torch.cuda.empty_cache()
            if chunk_size > 1:
                chunk_size //= 2
                warn(f"{device}: out of GPU memory; retrying with {chunk_size} volume(s) per "
                     "batch")
            else:
                warn(f"{device}: out of GPU memory even with one volume per batch; "
                     "continuing on the CPU (slower)")
                return run("cpu", cpu_chunk_size)


def fast_inference_dtype(device) -> torch.dtype:
    """The dtype of the networks' convolutions at inference (the keypoint encoders, the
    segmenter) on ``device``: bfloat16 on a CPU that multiplies it natively (AVX512-BF16 or
    AMX), where it halves the convolutions' time (2 cores, AMD EPYC: 0.23 -> 0.12 s per
    encoder branch for 16 volumes), else float32 (emulated bfloat16 is slower; the GPU path
    has not been measured). The keypoints move by a small fraction of the network's own error
    and the masks by a few boundary voxels (docs/benchmarks.md, section 16); the refinement,
    which sets the final accuracy, runs in float32 and float64 either way. The environment
    variable UNIMO_NETWORK_FLOAT32=1 keeps float32 everywhere (the same results on every
    CPU)."""
    if torch.device(device).type != "cpu" or os.environ.get("UNIMO_NETWORK_FLOAT32") == "1":
        return torch.float32
    cpu = getattr(torch, "cpu", None)
    native = any(bool(getattr(cpu, name, lambda: False)())
                 for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else torch.float32
