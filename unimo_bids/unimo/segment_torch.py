"""The classical brain mask of :mod:`segment`, in torch: the same steps, on a GPU.

:func:`brain_mask_torch` gives the masks of ``segment.brain_mask`` (the same threshold rule,
radii and hole filling; tested equal on real volumes) with every step a batched tensor
operation, so that on a GPU the masks cost no CPU time and no transfer of the series:

- thresholds: the same fixed voxel subsets, percentiles (linear interpolation, as numpy),
  histograms (one ``bincount`` for all volumes), Gaussian smoothing (scipy's kernel, radius
  4 sigma, edge values repeated) and valley / Otsu rules;
- erosion and dilation by a ball in mm: a 3D convolution counting the ball's voxels (the field
  of view's border counts as inside for erosions, as in ``segment``);
- the largest 6-connected component: each voxel takes the largest voxel index of its run of
  foreground along each axis in turn, repeated until nothing changes (a component's label is
  then its largest index);
- hole filling slice by slice: the background reached from each slice's edges (spread the same
  way inside the slice) is outside, the rest is filled.

The spreading takes as many passes as a path through a component turns corners (a few for a
brain), each a handful of batched tensor operations: cheap on a GPU, slower than scipy on a
CPU, where ``segment.brain_mask`` stays the default. Pure torch and numpy: no nipype, no BIDS.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .devices import is_cuda
from .segment import (_MAX_PCT_SAMPLES, _MAX_SAMPLES, CLOSING_RADIUS_MM, OPENING_RADIUS_MM,
                      ball, brain_mask, checked_voxel_size, slice_axis)

__all__ = ["brain_mask_on", "brain_mask_torch", "robust_thresholds_torch"]


@lru_cache(maxsize=8)
def _subset(n_voxels: int, n: int) -> np.ndarray | None:
    """segment._subsample's fixed pseudo-random columns (None: all)."""
    if n_voxels <= n:
        return None
    return np.sort(np.random.default_rng(0).choice(n_voxels, n, replace=False))


def _subsample(flat: torch.Tensor, n: int) -> torch.Tensor:
    index = _subset(int(flat.shape[1]), n)
    if index is None:
        return flat
    return flat[:, torch.as_tensor(index, device=flat.device)]


def _percentiles(flat: torch.Tensor, q: Sequence[float]) -> torch.Tensor:
    """(len(q), T) float64 percentiles of each row, linear interpolation (numpy's default)."""
    ordered = flat.sort(dim=1).values.to(torch.float64)
    position = torch.tensor(q, dtype=torch.float64, device=flat.device) / 100.0 * (
        flat.shape[1] - 1)
    below = position.floor().long()
    above = torch.clamp(below + 1, max=flat.shape[1] - 1)
    weight = position - below
    return (ordered[:, below] * (1 - weight) + ordered[:, above] * weight).T


def _batched_hist(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  nbins: int) -> torch.Tensor:
    """(T, nbins) float64 histograms of (T, N) values on [lo_t, hi_t] (out of range ignored)."""
    rows = values.shape[0]
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    scale = (nbins * (1 - 1e-6) / span).to(torch.float32)
    position = (values - lo.to(torch.float32)[:, None]) * scale[:, None]
    index = position.clamp(-1, nbins).add(1).long()
    index = index + (nbins + 2) * torch.arange(rows, device=values.device)[:, None]
    counts = torch.bincount(index.flatten(), minlength=rows * (nbins + 2)).view(rows, nbins + 2)
    return counts[:, 1:nbins + 1].to(torch.float64)


def _gaussian_smooth(hist: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy's gaussian_filter1d(mode="nearest") along the rows of (T, n) float64."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=hist.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    padded = F.pad(hist[:, None], (radius, radius), mode="replicate")
    return F.conv1d(padded, kernel)[:, 0]


def _valley(flat, w_lo, w_hi, nbins: int = 128, sigma: float = 6.0, deepest: bool = False):
    """segment._valley: (threshold (T,), ok (T,))."""
    hist = _gaussian_smooth(_batched_hist(flat, w_lo, w_hi, nbins), sigma)
    if deepest:
        left = torch.cummax(hist, dim=1).values
        right = torch.cummax(hist.flip(1), dim=1).values.flip(1)
        peak = torch.minimum(left, right)
        k = torch.argmax(peak - hist, dim=1)
        rows = torch.arange(hist.shape[0], device=hist.device)
        ok = (w_hi > w_lo) & (hist[rows, k] < 0.8 * peak[rows, k])
    else:
        k = torch.argmin(hist, dim=1)
        ok = (w_hi > w_lo) & (k > 2) & (k < nbins - 3)
    return w_lo + (k + 0.5) / nbins * (w_hi - w_lo), ok


def _otsu(values, lo, hi, nbins: int = 256) -> torch.Tensor:
    """segment._otsu: (T,) thresholds."""
    clipped = torch.minimum(torch.maximum(values, lo[:, None].to(values.dtype)),
                            hi[:, None].to(values.dtype))
    hist = _batched_hist(clipped, lo, hi, nbins)
    centers = (torch.arange(nbins, dtype=torch.float64, device=values.device) + 0.5) / nbins
    p = hist / hist.sum(dim=1, keepdim=True).clamp_min(1)
    w = torch.cumsum(p, dim=1)
    mu = torch.cumsum(p * centers, dim=1)
    between = (mu[:, -1:] * w - mu) ** 2 / (w * (1 - w))
    between = torch.nan_to_num(between, nan=-1.0, posinf=-1.0)
    k = torch.argmax(between, dim=1)
    return lo + (k + 1) / nbins * (hi - lo)


def robust_thresholds_torch(volumes: torch.Tensor) -> torch.Tensor:
    """``segment.robust_thresholds`` of (T, X, Y, Z) finite volumes: (T,) float64."""
    rows = volumes.shape[0]
    flat = _subsample(volumes.reshape(rows, -1), _MAX_SAMPLES).to(torch.float32)
    p05, p10, p20, p85, p95, p995 = _percentiles(_subsample(flat, _MAX_PCT_SAMPLES),
                                                 (0.5, 10, 20, 85, 95, 99.5))
    threshold, ok = _valley(flat, p20, p85)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok)[:, 0]
        second, ok2 = _valley(flat[bad], p10[bad], p95[bad], deepest=True)
        threshold[bad[ok2]] = second[ok2]
        ok[bad[ok2]] = True
    if not bool(ok.all()):
        bad = torch.nonzero(~ok)[:, 0]
        threshold[bad] = _otsu(flat[bad], p05[bad], torch.maximum(p995[bad], p05[bad]), 256)
    return threshold


def _ball_count(masks: torch.Tensor, radius_mm: float, voxel_size, border: float):
    """(T, X, Y, Z) number of the ball's voxels that are inside ``masks`` about each voxel, the
    field of view's border counting as ``border``; and the ball's size (None: a single voxel)."""
    element = ball(radius_mm, voxel_size)
    size = int(element.sum())
    if size <= 1:
        return None, size
    kernel = torch.as_tensor(element, dtype=torch.float32, device=masks.device)[None, None]
    half = [k // 2 for k in element.shape]
    padded = F.pad(masks[:, None].to(torch.float32),
                   (half[2], half[2], half[1], half[1], half[0], half[0]), value=border)
    return F.conv3d(padded, kernel)[:, 0], size


def _erode(masks: torch.Tensor, radius_mm: float, voxel_size) -> torch.Tensor:
    """Ball erosion of each volume; the border counts as inside (segment._erode)."""
    count, size = _ball_count(masks, radius_mm, voxel_size, border=1.0)
    return masks.clone() if count is None else count > size - 0.5


def _dilate(masks: torch.Tensor, radius_mm: float, voxel_size, within=None) -> torch.Tensor:
    """Ball dilation of each volume, intersected with ``within`` (segment._dilate)."""
    count, _ = _ball_count(masks, radius_mm, voxel_size, border=0.0)
    grown = masks.clone() if count is None else count > 0.5
    return grown if within is None else grown & within


def _run_max(values: torch.Tensor, inside: torch.Tensor, axis: int) -> torch.Tensor:
    """Each voxel of ``inside`` takes the max of ``values`` over its run of consecutive
    ``inside`` voxels along ``axis`` (1, 2 or 3) of (T, X, Y, Z); 0 elsewhere. One pass carries
    a label a whole run's length, where a face-neighbour step carries it one voxel."""
    n = values.shape[axis]
    lines = values.movedim(axis, -1).reshape(-1, n)
    within = inside.movedim(axis, -1).reshape(-1, n)
    # Every voxel outside starts a run: the inside voxels after it share its id.
    run = torch.cumsum(~within, dim=1) + (n + 1) * torch.arange(
        lines.shape[0], device=values.device)[:, None]
    best = torch.zeros(lines.shape[0] * (n + 1), dtype=values.dtype, device=values.device)
    best.scatter_reduce_(0, run.flatten(), lines.flatten(), reduce="amax")
    out = torch.where(within, best[run], 0)
    shape = list(values.movedim(axis, -1).shape)
    return out.reshape(shape).movedim(-1, axis)


def _spread_within(values: torch.Tensor, inside: torch.Tensor, axes: Sequence[int]):
    """Spread the max of ``values`` (0 outside ``inside``) through each component of ``inside``
    connected along ``axes`` (face neighbours), by runs, until nothing changes."""
    while True:
        grown = values
        for axis in axes:
            grown = _run_max(grown, inside, axis)
        if torch.equal(grown, values):
            return values
        values = grown


def _largest_component(masks: torch.Tensor) -> torch.Tensor:
    """Largest 6-connected component of each volume of (T, X, Y, Z) bool masks."""
    rows = masks.shape[0]
    n = math.prod(masks.shape[1:])
    index = torch.arange(1, n + 1, device=masks.device, dtype=torch.int64).view(masks.shape[1:])
    labels = _spread_within(torch.where(masks, index, 0), masks, (1, 2, 3))
    offsets = (n + 1) * torch.arange(rows, device=masks.device)[:, None, None, None]
    counts = torch.bincount((labels + offsets)[masks], minlength=rows * (n + 1)).view(rows, n + 1)
    counts[:, 0] = 0
    best = counts.argmax(dim=1)
    return masks & (labels == best[:, None, None, None]) & (best > 0)[:, None, None, None]


def _fill_holes_in_slices(masks: torch.Tensor, plane_axis: int) -> torch.Tensor:
    """Fill the 2D holes of every slice normal to spatial axis ``plane_axis`` (0, 1, 2): the
    background that no 4-connected path inside its slice joins to the slice's edges."""
    in_plane = [axis for axis in (1, 2, 3) if axis != 1 + plane_axis]
    background = ~masks
    edges = torch.zeros_like(masks)
    for axis in in_plane:
        edges.narrow(axis, 0, 1).fill_(True)
        edges.narrow(axis, masks.shape[axis] - 1, 1).fill_(True)
    outside = _spread_within((edges & background).to(torch.int32), background, in_plane)
    return ~outside.bool()


def _clean(foreground: torch.Tensor, h, opening_radius_mm: float,
           closing_radius_mm: float) -> torch.Tensor:
    """segment._clean on the whole field of view (its bounding box is only a saving there)."""
    core = _erode(foreground, opening_radius_mm, h)
    lost = ~core.flatten(1).any(dim=1)
    core[lost] = foreground[lost]  # object smaller than the ball: do not open that volume
    mask = _largest_component(core)
    opened = ~lost
    if bool(opened.any()):
        mask[opened] = _dilate(mask[opened], opening_radius_mm, h, within=foreground[opened])
    grown = _dilate(mask, closing_radius_mm, h)
    mask = _erode(grown, closing_radius_mm, h)
    return _fill_holes_in_slices(mask, slice_axis(h))


def brain_mask_torch(volumes: torch.Tensor, voxel_size: Sequence[float], *,
                     opening_radius_mm: float = OPENING_RADIUS_MM,
                     closing_radius_mm: float = CLOSING_RADIUS_MM,
                     chunk: int = 64) -> torch.Tensor:
    """``segment.brain_mask`` of (T, X, Y, Z) volumes (any float dtype, any device), on their
    device: (T, X, Y, Z) bool. Non-finite values count as the volume's minimum. ``chunk``
    volumes at a time bound the memory (the component labels are int64 per voxel)."""
    if volumes.ndim != 4:
        raise ValueError(f"volumes must be (T, X, Y, Z), got shape {tuple(volumes.shape)}")
    h = checked_voxel_size(voxel_size)
    volumes = volumes.to(torch.float32)
    if not bool(torch.isfinite(volumes).all()):
        finite = torch.isfinite(volumes)
        lowest = torch.where(finite, volumes, torch.inf).flatten(1).amin(1)
        lowest = torch.where(torch.isfinite(lowest), lowest, 0.0)
        volumes = torch.where(finite, volumes, lowest[:, None, None, None])
    return torch.cat([_brain_mask_chunk(volumes[start:start + chunk], h, opening_radius_mm,
                                        closing_radius_mm)
                      for start in range(0, volumes.shape[0], max(int(chunk), 1))])


def _brain_mask_chunk(volumes, h, opening_radius_mm, closing_radius_mm) -> torch.Tensor:
    flat = volumes.flatten(1)
    lowest, highest = flat.amin(1), flat.amax(1)
    no_contrast = highest <= lowest
    threshold = robust_thresholds_torch(volumes)
    foreground = volumes > threshold[:, None, None, None]  # compared in float64, as numpy
    mask = _clean(foreground, h, opening_radius_mm, closing_radius_mm)
    redo = ~mask.flatten(1).any(1) & foreground.flatten(1).any(1)
    mask[redo] = foreground[redo]
    if bool(no_contrast.any()):
        mask[no_contrast] = (highest[no_contrast] > 0)[:, None, None, None]
    return mask


def brain_mask_on(volumes: np.ndarray, voxel_size: Sequence[float], device="cpu",
                  chunk_size: int = 64, workers: int | None = None) -> np.ndarray:
    """``segment.brain_mask`` of (T, X, Y, Z) numpy volumes, made on a CUDA ``device`` by
    :func:`brain_mask_torch` (``chunk_size`` volumes at a time), elsewhere by scipy (faster on
    a CPU) in ``workers`` threads. Returns (T, X, Y, Z) bool numpy."""
    if not is_cuda(device):
        return brain_mask(volumes, voxel_size, workers=workers)
    return brain_mask_torch(torch.as_tensor(np.asarray(volumes), device=device), voxel_size,
                            chunk=chunk_size).cpu().numpy()
