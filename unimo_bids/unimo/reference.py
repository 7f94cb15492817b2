"""Choice of the head-motion reference and detection of non-steady-state volumes."""

from __future__ import annotations

import numpy as np
import torch

from .register import Level, register_rigid
from .resample import resample, voxel_map

ROUGH_LEVELS = (Level(4.0, 20), Level(2.0, 10))


def detect_non_steady_state(series: np.ndarray, max_leading: int = 10) -> int:
    """Number of leading non-steady-state volumes (T1 saturation not yet reached).

    series: (X, Y, Z, T). A leading volume counts when its mean intensity in the bright part of
    the image is a robust outlier (median + 3.5 MAD, and over 2 % above) of the rest of the series,
    as fMRIPrep's detector does. Detection stops at the first steady volume.
    """
    n_vols = series.shape[-1]
    if n_vols < 6:
        return 0
    mean_image = series.mean(axis=-1)
    bright = mean_image > np.percentile(mean_image, 75)
    signal = series[bright].mean(axis=0)  # (T,)
    baseline = signal[min(max_leading, n_vols // 2):]
    median = np.median(baseline)
    mad = 1.4826 * np.median(np.abs(baseline - median))
    threshold = max(median + 3.5 * mad, 1.02 * median)
    count = 0
    for value in signal[:max_leading]:
        if value <= threshold:
            break
        count += 1
    return min(count, n_vols - 2)


def alternating_controls(signal, min_z: float = 4.0) -> np.ndarray | None:
    """Indices of the control volumes of a label/control series without its context file, or
    None when no alternation stands out.

    signal: (T,) mean brain intensity per volume. Each volume's deviation from the mean of its
    two neighbours removes slow drifts; in an alternating series the deviations of odd and even
    volumes differ in sign. When their difference exceeds ``min_z`` standard errors, the
    brighter parity is the control (labelling lowers the signal).
    """
    signal = np.asarray(signal, dtype=float)
    if len(signal) < 6:
        return None
    deviation = signal[1:-1] - 0.5 * (signal[:-2] + signal[2:])
    parity = np.arange(1, len(signal) - 1) % 2
    odd, even = deviation[parity == 1], deviation[parity == 0]
    spread = np.sqrt(odd.var(ddof=1) / len(odd) + even.var(ddof=1) / len(even))
    difference = odd.mean() - even.mean()
    if not spread > 0 or abs(difference) < min_z * spread:
        return None
    return np.arange(1 if difference > 0 else 0, len(signal), 2)


def parse_reference_mode(mode) -> str | int:
    """Validate ``--hmc-ref``: 'auto', 'first', 'middle', 'mean' or a volume index >= 0."""
    if isinstance(mode, int) or (isinstance(mode, str) and mode.isdigit()):
        return int(mode)
    if mode in ("auto", "first", "middle", "mean"):
        return mode
    raise ValueError(f"--hmc-ref must be auto, first, middle, mean or a volume index, not {mode!r}")


def _correlation(volumes: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson correlation of each of (T, N) rows with target (N,)."""
    v = volumes - volumes.mean(axis=1, keepdims=True)
    t = target - target.mean()
    return (v @ t) / (np.linalg.norm(v, axis=1) * np.linalg.norm(t) + 1e-12)


# Volumes compared at once: 'auto' picks among at most this many evenly spaced steady-state
# volumes, and 'mean' aligns this many at a time, so memory does not grow with the series.
MAX_CANDIDATES = 64


def rough_align(series: np.ndarray, affine, reference: np.ndarray, weight=None) -> np.ndarray:
    """Coarse rigid alignment of every volume to ``reference``; returns aligned (T, X, Y, Z)."""
    moving = torch.as_tensor(np.moveaxis(series, -1, 0), dtype=torch.float32)[:, None]
    fixed = torch.as_tensor(reference, dtype=torch.float32)[None]
    weight_t = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
    result = register_rigid(fixed, moving, affine, affine, weight_t, levels=ROUGH_LEVELS)
    affine_t = torch.as_tensor(np.asarray(affine, dtype=float))
    maps = voxel_map(torch.as_tensor(result.transforms), affine_t, affine_t)
    return resample(moving, maps, reference.shape)[:, 0].numpy()


def evenly_spaced(indices: np.ndarray, at_most: int) -> np.ndarray:
    """At most ``at_most`` entries of ``indices``, evenly spaced, first and last included."""
    if len(indices) <= at_most:
        return indices
    return indices[np.unique(np.linspace(0, len(indices) - 1, at_most).round().astype(int))]


def select_reference(series: np.ndarray, affine, mode="auto", n_dummy: int = 0,
                     candidates=None):
    """Pick the head-motion reference of a series.

    series: (X, Y, Z, T); steady-state volumes are those from ``n_dummy`` on.
    mode: 'first' / 'middle' steady-state volume, an explicit volume index, 'mean' (mean of the
        roughly aligned steady-state volumes), or 'auto': the volume closest (correlation) to the
        median of the roughly aligned steady-state series, so that neither a moved nor a
        non-steady-state volume becomes the reference. Long series: 'auto' looks at
        ``MAX_CANDIDATES`` evenly spaced steady-state volumes, and 'mean' aligns them that many
        at a time, so that memory stays bounded.
    candidates: volume indices the reference may come from (e.g. the b=0 volumes of a DWI
        series, the control volumes of an ASL series); all steady-state volumes when None.
    Returns (reference (X, Y, Z) float32, index of the chosen volume or None for 'mean').
    """
    mode = parse_reference_mode(mode)
    n_vols = series.shape[-1]
    steady = np.arange(min(n_dummy, n_vols - 1), n_vols)
    if candidates is not None and len(candidates):
        allowed = np.intersect1d(steady, np.asarray(candidates, dtype=int))
        steady = allowed if len(allowed) else steady
    if isinstance(mode, int):
        if mode >= n_vols:
            raise ValueError(f"--hmc-ref {mode} is out of range: the series has {n_vols} volumes")
        return series[..., mode].astype(np.float32), mode
    if mode == "first":
        return series[..., steady[0]].astype(np.float32), int(steady[0])
    if mode == "middle":
        index = int(steady[len(steady) // 2])
        return series[..., index].astype(np.float32), index

    candidates = evenly_spaced(steady, MAX_CANDIDATES)
    data = series[..., candidates].astype(np.float32)
    flat = np.moveaxis(data, -1, 0).reshape(len(candidates), -1)
    seed = data[..., int(np.argmax(_correlation(flat, np.median(flat, axis=0))))]
    if mode == "mean":
        total = np.zeros(series.shape[:3], dtype=np.float64)
        for start in range(0, len(steady), MAX_CANDIDATES):
            chunk = series[..., steady[start:start + MAX_CANDIDATES]].astype(np.float32)
            total += rough_align(chunk, affine, seed).sum(axis=0)
        return (total / len(steady)).astype(np.float32), None
    aligned_flat = rough_align(data, affine, seed).reshape(len(candidates), -1)
    scores = _correlation(aligned_flat, np.median(aligned_flat, axis=0))
    index = int(candidates[int(np.argmax(scores))])
    return series[..., index].astype(np.float32), index
