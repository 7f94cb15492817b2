"""Diffusion-weighted series: b=0 volumes, b-vector rotation, per-shell outliers.

Conventions: b-vectors as in BIDS/FSL files, (3, T), in the voxel axes of the image, with the
first axis flipped when the voxel-to-world matrix has a positive determinant (FSL's
radiological convention). Transforms are (T, 4, 4) RAS mm, reference -> volume (fixed ->
moving), as everywhere in ``unimo``.
"""

from __future__ import annotations

import numpy as np

B0_THRESHOLD = 50.0  # s/mm^2: b-values at or below this are b=0 volumes (BIDS practice)


def b0_indices(bvals, threshold: float = B0_THRESHOLD) -> np.ndarray:
    """Indices of the b=0 volumes of (T,) b-values."""
    return np.flatnonzero(np.asarray(bvals, dtype=float) <= threshold)


def _voxel_to_world_rotation(affine) -> np.ndarray:
    """(3, 3) matrix taking FSL b-vector coordinates to world (RAS) directions."""
    axes = np.asarray(affine, dtype=float)[:3, :3]
    directions = axes / np.linalg.norm(axes, axis=0)
    flip = np.diag([-1.0, 1.0, 1.0]) if np.linalg.det(axes) > 0 else np.eye(3)
    return directions @ flip


def rotate_bvecs(bvecs, affine, transforms) -> np.ndarray:
    """B-vectors of the motion-corrected series.

    bvecs: (3, T) as in the .bvec file; affine: (4, 4) voxel -> RAS of the series (the
    corrected series keeps it); transforms: (T, 4, 4) reference -> volume. Volume t was
    acquired with gradient g (scanner frame); in the reference frame the same direction is
    A_t^-1 g, with A_t the rotation of transform t. Returns (3, T); zero vectors (b=0) stay
    zero, the others have unit length.
    """
    bvecs = np.asarray(bvecs, dtype=float)
    to_world = _voxel_to_world_rotation(affine)
    world = to_world @ bvecs  # (3, T)
    rotations = np.asarray(transforms, dtype=float)[:, :3, :3]
    # polar factor: the nearest rotation, in case a transform carries rounding
    u, _, vt = np.linalg.svd(rotations)
    rotations = u @ vt
    in_reference = np.einsum("tji,jt->it", rotations, world)  # A_t^T g_t
    out = np.linalg.solve(to_world, in_reference)
    norms = np.linalg.norm(out, axis=0)
    moving = norms > 1e-8
    out[:, moving] /= norms[moving]
    out[:, ~moving] = 0.0
    return out


def angle_between_deg(a, b) -> np.ndarray:
    """Angle (degrees) between the columns of two (3, T) direction arrays, sign ignored
    (a diffusion direction and its opposite are the same)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    cos = np.abs((a * b).sum(0)) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


def shell_signal_z(signal, bvals, shell_width: float = 100.0) -> np.ndarray:
    """Robust z-score of each volume's mean brain signal within its b-value shell.

    signal: (T,) mean intensity inside the brain mask; bvals: (T,). Volumes are grouped by
    b-value rounded to ``shell_width``; within a shell, z = (s - median) / (1.4826 MAD). Signal
    dropout (a moved or spoiled volume) shows as a large negative z; comparing across shells
    would flag every high-b volume instead. Shells of fewer than 3 volumes give 0.
    """
    signal = np.asarray(signal, dtype=float)
    shells = np.round(np.asarray(bvals, dtype=float) / shell_width)
    z = np.zeros_like(signal)
    for shell in np.unique(shells):
        members = shells == shell
        if members.sum() < 3:
            continue
        values = signal[members]
        median = np.median(values)
        mad = 1.4826 * np.median(np.abs(values - median))
        scale = mad if mad > 1e-12 * max(abs(median), 1.0) else max(abs(median), 1.0) * 1e-3
        z[members] = (values - median) / scale
    return z
