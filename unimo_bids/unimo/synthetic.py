"""Known rigid motion, for demos and tests.

World space is RAS in mm; all transforms are 4x4 homogeneous matrices acting on column vectors
of world points. Pure numpy/scipy: no nipype, no BIDS.

Convention of :func:`simulate_series` (read it before using the motions as ground truth):
volume ``t`` at output voxel ``v`` is the image read at world point
``motions[t] @ out_affine @ v``. So ``motions[t]`` maps a point of the motionless frame to the
point of the anatomy that is seen there; the head in volume t appears moved by
``inv(motions[t])``. A head-motion correction that resamples volume t at ``T_t @ x`` for every
reference point ``x`` (the "reference -> volume" convention of ITK/fMRIPrep HMC transforms)
recovers ``T_t = inv(motions[t])``, provided that the reference grid is the motionless frame.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from .geometry import rigid_matrix

__all__ = ["rigid_matrix", "random_rigid_motions", "simulate_series", "add_noise"]


def random_rigid_motions(
    n: int,
    max_rotation_deg: float,
    max_translation_mm: float,
    center_mm: Sequence[float],
    rng: np.random.Generator,
) -> np.ndarray:
    """n random rigid transforms about ``center_mm``; returns (n, 4, 4) float64.

    Angles and translations are drawn independently and uniformly in [-max, max] per axis
    (see :func:`rigid_matrix`). The first transform is the identity (the motionless reference).
    """
    out = np.tile(np.eye(4), (int(n), 1, 1))
    for i in range(1, int(n)):
        rot = rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)
        tra = rng.uniform(-max_translation_mm, max_translation_mm, size=3)
        out[i] = rigid_matrix(rot, tra, center_mm)
    return out


def simulate_series(
    image: np.ndarray,
    image_affine: np.ndarray,
    motions: np.ndarray,
    out_shape: Sequence[int],
    out_affine: np.ndarray,
    order: int = 3,
) -> np.ndarray:
    """Resample a 3D image into a moving 4D series.

    Parameters
    ----------
    image : (X, Y, Z) the anatomy, with voxel-to-world ``image_affine`` (4, 4).
    motions : (T, 4, 4) world transforms; ``motions[t]`` maps a point of the motionless frame to
        the point of the anatomy that volume t shows there (see the module docstring).
    out_shape : (3,) grid (X', Y', Z') of the series, with voxel-to-world ``out_affine`` (4, 4).
    order : spline order (3 = cubic; 0/1 for masks and speed).

    Returns
    -------
    (X', Y', Z', T) float32 (NIfTI order): ``out[..., t][v] = image(inv(image_affine) @
    motions[t] @ out_affine @ v)``, spline-interpolated; points outside the image read 0.

    The image is spline-prefiltered once; then one ``scipy.ndimage.affine_transform`` (the affine
    special case of ``map_coordinates``, without a coordinate array) per volume.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {img.shape}")
    motions = np.asarray(motions, dtype=float).reshape(-1, 4, 4)
    out_shape = tuple(int(s) for s in out_shape)
    to_img = np.linalg.inv(np.asarray(image_affine, dtype=float))
    a_out = np.asarray(out_affine, dtype=float)

    # prefilter once for all volumes, with the same boundary mode as the sampling
    coeffs = ndi.spline_filter(img, order=order, mode="constant") if order > 1 else img
    out = np.empty(out_shape + (motions.shape[0],), dtype=np.float32)
    for t, m in enumerate(motions):
        vox = to_img @ m @ a_out  # output voxel -> image voxel
        out[..., t] = ndi.affine_transform(
            coeffs, vox[:3, :3], offset=vox[:3, 3], output_shape=out_shape, order=order,
            mode="constant", cval=0.0, prefilter=False,
        )
    return out


def add_noise(
    series: np.ndarray,
    snr: float,
    rng: np.random.Generator,
    rician: bool = True,
) -> np.ndarray:
    """Add noise of standard deviation ``level / snr``; returns float32, same shape.

    ``level`` is a robust foreground intensity: the median of the values above 10 % of the 99th
    percentile of ``series`` (the object, whatever the background fraction). ``rician=True``
    gives magnitude-MR noise ``|s + n1 + i n2|`` (non-negative, Rician, as in real magnitude
    images); ``rician=False`` adds Gaussian noise ``s + n1``.
    """
    s = np.asarray(series, dtype=np.float32)
    p99 = float(np.percentile(s, 99))
    fg = s[s > 0.1 * p99]
    level = float(np.median(fg)) if fg.size else p99
    sigma = np.float32(level / float(snr)) if level > 0 else np.float32(0.0)
    n1 = rng.standard_normal(s.shape, dtype=np.float32) * sigma
    if not rician:
        return s + n1
    n2 = rng.standard_normal(s.shape, dtype=np.float32) * sigma
    return np.sqrt((s + n1) ** 2 + n2 ** 2)
