"""Head-motion correction of a 4D series: estimate rigid transforms, then resample once."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .geometry import voxel_sizes
from .register import Level, RigidResult, register_rigid
from .resample import resample, voxel_map

# The shape map (signed distance of each volume's mask) widens the capture range at coarse
# levels; the finest level uses intensities alone, which carry the sub-voxel detail.
IMAGE_SHAPE_LEVELS = (
    Level(4.0, 30, (1.0, 1.0)),
    Level(2.0, 20, (1.0, 0.5)),
    Level(1.0, 12, (1.0, 0.0)),
)
IMAGE_LEVELS = (Level(4.0, 30), Level(2.0, 20), Level(1.0, 12))

# Registration looks a little beyond the mask, where the brain edge gives strong gradients.
MASK_MARGIN_MM = 8.0
SHAPE_CLIP_MM = 20.0


def registration_weight(reference_mask: np.ndarray, affine) -> np.ndarray:
    """(X, Y, Z) float32 weight: the reference mask dilated by ``MASK_MARGIN_MM``."""
    outside = ndimage.distance_transform_edt(~reference_mask.astype(bool),
                                             sampling=voxel_sizes(affine))
    return (outside <= MASK_MARGIN_MM).astype(np.float32)


def _as_batch(series: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """(X, Y, Z, T) numpy slice of volumes -> (B, 1, X, Y, Z) float32 tensor."""
    return torch.as_tensor(np.ascontiguousarray(
        np.moveaxis(series[..., start:stop], -1, 0), dtype=np.float32))[:, None]


def estimate_head_motion(
    series: np.ndarray,
    affine,
    reference: np.ndarray,
    reference_mask: np.ndarray,
    shape_series: np.ndarray | None = None,
    shape_reference: np.ndarray | None = None,
    device: str = "cpu",
    chunk_size: int = 64,
    progress=None,
) -> RigidResult:
    """Rigid transforms aligning every volume of a series to the reference.

    series: (X, Y, Z, T); reference: (X, Y, Z) on the same grid (``affine``).
    reference_mask: (X, Y, Z) bool brain mask of the reference.
    shape_series, shape_reference: optional signed distance maps (mm) of each volume's and the
        reference's mask, same shapes as series / reference; used as a second channel.
    chunk_size: volumes registered at once, which bounds memory on long series.
    progress: optional callable(n_done) called after each chunk.
    Returns a RigidResult with transforms (T, 4, 4) world reference -> world volume.
    """
    use_shape = shape_series is not None and shape_reference is not None
    fixed = [reference]
    if use_shape:
        fixed.append(np.clip(shape_reference, -SHAPE_CLIP_MM, SHAPE_CLIP_MM))
    fixed_t = torch.as_tensor(np.stack(fixed).astype(np.float32), device=device)
    weight = torch.as_tensor(registration_weight(reference_mask, affine), device=device)
    levels = IMAGE_SHAPE_LEVELS if use_shape else IMAGE_LEVELS

    results = []
    n_vols = series.shape[-1]
    for start in range(0, n_vols, chunk_size):
        stop = min(start + chunk_size, n_vols)
        moving = _as_batch(series, start, stop)
        if use_shape:
            shapes = _as_batch(np.clip(shape_series, -SHAPE_CLIP_MM, SHAPE_CLIP_MM), start, stop)
            moving = torch.cat([moving, shapes], dim=1)
        results.append(register_rigid(fixed_t, moving.to(device), affine, affine, weight,
                                      levels=levels))
        if progress is not None:
            progress(stop - start)
    return RigidResult(
        transforms=np.concatenate([r.transforms for r in results]),
        residual=np.concatenate([r.residual for r in results]),
        iterations=np.concatenate([r.iterations for r in results]),
    )


def apply_head_motion(
    series: np.ndarray, affine, transforms: np.ndarray, device: str = "cpu", chunk_size: int = 64
) -> np.ndarray:
    """Resample every volume onto the reference grid through its transform, once (trilinear).

    series: (X, Y, Z, T); transforms: (T, 4, 4). Returns (X, Y, Z, T) float32; points that fall
    outside the original field of view are 0.
    """
    affine_t = torch.as_tensor(np.asarray(affine, dtype=float), device=device)
    out = np.empty(series.shape, dtype=np.float32)
    for start in range(0, series.shape[-1], chunk_size):
        stop = min(start + chunk_size, series.shape[-1])
        maps = voxel_map(torch.as_tensor(transforms[start:stop], device=device), affine_t,
                         affine_t)
        moved = resample(_as_batch(series, start, stop).to(device), maps, series.shape[:3])
        out[..., start:stop] = np.moveaxis(moved[:, 0].cpu().numpy(), 0, -1)
    return out
