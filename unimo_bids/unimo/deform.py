"""Deformable correction after the rigid step: EPDiff (``epdiff``) on a working grid.

Convention. The rigid transform ``T_t`` maps a reference point to the point of volume ``t`` with
the same anatomy (``geometry``). The deformation of volume ``t`` is a displacement field
``u_t`` (world RAS, mm) on the reference side: the corrected volume reads volume ``t`` at
``T_t(p + u_t(p))`` for each reference point ``p``. The field is estimated between the reference
and the rigidly aligned volume (pull-back: ``aligned(p + u(p)) ~ reference(p)``), on an
isotropic grid axis-aligned with RAS that covers the brain mask, so that its array axes are the
world axes and no rotation of the vectors is needed. The field is band-limited (smooth), so
trilinear interpolation carries it to any other grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import epdiff
from .geometry import voxel_sizes, world_points
from .keypoints import to_working_grid
from .resample import resample, voxel_map

# A 3 mm grid resolves the 16 lowest frequencies of a 20 cm brain (wavelengths >= 2.4 cm) with
# room to spare and keeps the optimisation affordable on a CPU; on 4 mm data it still recovers
# deformations better than a 4 mm grid does (tests/test_deform.py: 0.7-0.8 against 1.0-1.1 mm).
GRID_SPACING_MM = 3.0
GRID_MARGIN_MM = 12.0
GRID_MAX_SIZE = 72
# Regulariser weight for real data: stronger than epdiff's default (tuned on the noise-free
# template), so that noise and contrast are not explained by deformation. On the real BOLD, T1w
# and DWI of benchmarks/deformable.py, 1e-3 was the only value tried (1e-6 to 1e-2) whose worst
# point error never exceeded the rigid correction's while the mean error still fell.
SIGMA = 1e-3


@dataclass
class Deformation:
    """Deformable estimates for a series, on one working grid.

    grid_affine: (4, 4) voxel -> world of the working grid (diagonal: RAS-aligned).
    displacement: (T, 3, X', Y', Z') float32 world RAS mm, pull-back (see the module note).
    velocity: (T, 3, n, n, n) complex64 initial velocities (band-limited Fourier coefficients).
    mean_mm, max_mm: (T,) mean and largest |u| over the mask.
    min_jacobian: (T,) smallest Jacobian determinant of p -> p + u(p) over the grid.
    ncc_rigid, ncc_deformed: (T,) correlation with the reference inside the mask, before and
        after the deformation.
    rejected: (T,) bool, volumes whose deformation folded (a Jacobian determinant <= 0): their
        displacement and velocity are set to zero (rigid only); min_jacobian still reports the
        rejected field's.
    """

    grid_affine: np.ndarray
    displacement: np.ndarray
    velocity: np.ndarray
    mean_mm: np.ndarray
    max_mm: np.ndarray
    min_jacobian: np.ndarray
    ncc_rigid: np.ndarray
    ncc_deformed: np.ndarray
    rejected: np.ndarray


def deformation_grid(mask: np.ndarray, affine, spacing_mm: float = GRID_SPACING_MM,
                     margin_mm: float = GRID_MARGIN_MM, max_size: int = GRID_MAX_SIZE):
    """RAS-aligned isotropic grid over the world bounding box of ``mask`` plus a margin.

    Returns (grid_affine (4, 4), grid_shape (3,) even ints). The spacing grows when a side would
    exceed ``max_size`` voxels (very large fields of view).
    """
    points = world_points(mask.shape, affine, mask if mask.any() else None)
    low = points.min(axis=0) - margin_mm
    high = points.max(axis=0) + margin_mm
    spacing = max(float(spacing_mm), float((high - low).max()) / (max_size - 1))
    # Even sides: the predictor's half-resolution grid (every other point) then spans the same
    # field of view, so that its Fourier coefficients are this grid's.
    shape = tuple(2 * int(np.ceil((int(np.ceil((hi - lo) / spacing)) + 1) / 2))
                  for lo, hi in zip(low, high))
    grid_affine = np.diag([spacing, spacing, spacing, 1.0])
    grid_affine[:3, 3] = (low + high) / 2.0 - spacing * (np.array(shape) - 1) / 2.0
    return grid_affine, shape


def unit_median(volumes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each volume of (B, 1, X, Y, Z) scaled to unit median inside ``mask`` (a bool mask of the
    grid, (X, Y, Z) or (1, 1, X, Y, Z))."""
    inside = volumes.flatten(1)[:, mask.flatten()]
    return volumes / inside.median(dim=1).values.clamp_min(1e-6).view(-1, 1, 1, 1, 1)


def reference_on_grid(reference: np.ndarray, affine, reference_mask: np.ndarray, grid_affine,
                      grid_shape, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The reference on a working grid, unit median in its mask, and that mask on the grid:
    ((1, 1, X', Y', Z') float32, (X', Y', Z') bool)."""
    reference_t = torch.as_tensor(np.asarray(reference, np.float32), device=device)[None, None]
    fixed = to_working_grid(reference_t, affine, grid_affine, grid_shape)
    mask_t = torch.as_tensor(np.asarray(reference_mask, np.float32), device=device)[None, None]
    grid_mask = to_working_grid(mask_t, affine, grid_affine, grid_shape,
                                antialias=False)[0, 0] > 0.5
    return unit_median(fixed, grid_mask), grid_mask


def masked_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson correlation inside ``mask`` of (B, 1, ...) a and b: (B,). mask: bool or 0/1,
    (...) shared by the batch or (B, 1, ...) one per item. Differentiable in a and b."""
    weight = mask.to(a.dtype).expand_as(a)
    total = weight.flatten(1).sum(1).clamp_min(1.0)

    def centred(x):
        mean = (x * weight).flatten(1).sum(1) / total
        return (x - mean.view((-1,) + (1,) * (x.ndim - 1))) * weight

    a, b = centred(a), centred(b)
    return (a * b).flatten(1).sum(1) / ((a * a).flatten(1).sum(1)
                                        * (b * b).flatten(1).sum(1)).sqrt().clamp_min(1e-12)


def _volumes_tensor(array: np.ndarray, start: int, stop: int, device) -> torch.Tensor:
    """Volumes start:stop of an (X, Y, Z, T) array as a (B, 1, X, Y, Z) float32 tensor."""
    return torch.as_tensor(np.ascontiguousarray(np.moveaxis(array[..., start:stop], -1, 0),
                                                dtype=np.float32), device=device)[:, None]


def estimate_deformation(series: np.ndarray, affine, reference: np.ndarray,
                         reference_mask: np.ndarray, transforms: np.ndarray,
                         device: str = "cpu", chunk_size: int = 16,
                         iterations: int = epdiff.DEFAULT_ITERATIONS,
                         sigma: float = SIGMA, progress=None, predictor=None,
                         masks: np.ndarray | None = None) -> Deformation:
    """Estimate each volume's deformation after its rigid transform (test-time optimisation).

    series: (X, Y, Z, T); reference, reference_mask: (X, Y, Z) on the same grid; transforms:
    (T, 4, 4) rigid, reference world -> volume world. Volumes are processed in chunks of
    ``chunk_size``, each chunk optimised as one batch; ``iterations`` and ``sigma`` (the weight of
    the regulariser) go to ``epdiff.optimise_velocity``. ``progress(done, total)`` is called after
    each chunk when given.
    predictor: None (the optimisation starts from zero) or a callable (moving (B, 1, ...), fixed
    (1, 1, ...), moving_mask (B, 1, ...) bool, fixed_mask (1, 1, ...) bool, spacing) -> (B, 3,
    n1, n2, n3) initial velocities (e.g. ``deform_net.predict_from_masks`` with a trained net),
    run on the half-resolution grid (every other point, same field of view); ``iterations`` = 0
    then keeps the prediction as it is. masks: (X, Y, Z, T) brain masks of the volumes (the
    predictor's moving shapes); None: the reference mask carried by each rigid transform.
    """
    grid_affine, grid_shape = deformation_grid(reference_mask.astype(bool), affine)
    spacing = tuple(voxel_sizes(grid_affine))
    fixed, grid_mask = reference_on_grid(reference, affine, reference_mask, grid_affine,
                                         grid_shape, device)
    if predictor is not None:
        half_affine = grid_affine.copy()
        half_affine[:3, :3] *= 2.0
        half_shape = tuple(n // 2 for n in grid_shape)
        half_spacing = tuple(2.0 * s for s in spacing)
        half_fixed, half_mask = reference_on_grid(reference, affine, reference_mask, half_affine,
                                                  half_shape, device)

    n_volumes = series.shape[-1]
    fields, velocities = [], []
    mean_mm, max_mm, min_jac, ncc_rigid, ncc_deformed, rejected = [], [], [], [], [], []
    for start in range(0, n_volumes, chunk_size):
        stop = min(start + chunk_size, n_volumes)
        chunk_transforms = transforms[start:stop]
        volumes = _volumes_tensor(series, start, stop, device)
        moving = to_working_grid(volumes, affine, grid_affine, grid_shape,
                                 transforms=chunk_transforms)
        moving = unit_median(moving, grid_mask)
        # Only where the moved volume has data: beyond its field of view it reads zeros, which a
        # deformation would otherwise stretch the brain to explain.
        in_view = to_working_grid(torch.ones_like(volumes[:, :1, :, :, :]), affine, grid_affine,
                                  grid_shape, transforms=chunk_transforms,
                                  antialias=False) > 0.999
        weight = in_view & grid_mask[None, None]
        init = None
        if predictor is not None:
            half_moving = unit_median(to_working_grid(volumes, affine, half_affine, half_shape,
                                                      transforms=chunk_transforms), half_mask)
            if masks is None:  # the reference mask, moved with the volume
                volume_masks = torch.as_tensor(np.asarray(reference_mask, np.float32),
                                               device=device)[None, None].expand_as(volumes)
            else:
                volume_masks = _volumes_tensor(masks, start, stop, device)
            half_moving_mask = to_working_grid(volume_masks, affine, half_affine, half_shape,
                                               transforms=chunk_transforms,
                                               antialias=False) > 0.5
            init = predictor(half_moving, half_fixed, half_moving_mask, half_mask[None, None],
                             half_spacing)
        if iterations > 0:
            velocity = epdiff.optimise_velocity(moving, fixed, spacing, mask=weight, init=init,
                                                iterations=iterations, sigma=sigma)
        elif init is not None:  # the prediction alone
            velocity = epdiff.project_real(init.to(torch.complex64))
        else:
            velocity = torch.zeros((stop - start, 3) + (epdiff.DEFAULT_BAND,) * 3,
                                   dtype=torch.complex64, device=device)
        with torch.no_grad():
            displacement = epdiff.shoot(velocity, grid_shape, spacing)
            jacobian = epdiff.jacobian_determinant(displacement, spacing).flatten(1).amin(1)
            # A folding field is not a diffeomorphism: such a volume keeps its rigid transform.
            folded = jacobian <= 0
            displacement[folded] = 0.0
            velocity[folded] = 0.0
            warped = epdiff.warp(moving, displacement, spacing)
            magnitude = displacement.norm(dim=1)[:, grid_mask]
            fields.append(displacement.float().cpu().numpy())
            velocities.append(velocity.to(torch.complex64).cpu().numpy())
            mean_mm.append(magnitude.mean(1).cpu().numpy())
            max_mm.append(magnitude.amax(1).cpu().numpy())
            min_jac.append(jacobian.cpu().numpy())
            rejected.append(folded.cpu().numpy())
            ncc_rigid.append(masked_ncc(moving, fixed, grid_mask).cpu().numpy())
            ncc_deformed.append(masked_ncc(warped, fixed, grid_mask).cpu().numpy())
        if progress is not None:
            progress(stop, n_volumes)
    return Deformation(grid_affine=grid_affine, displacement=np.concatenate(fields),
                       velocity=np.concatenate(velocities), mean_mm=np.concatenate(mean_mm),
                       max_mm=np.concatenate(max_mm), min_jacobian=np.concatenate(min_jac),
                       ncc_rigid=np.concatenate(ncc_rigid),
                       ncc_deformed=np.concatenate(ncc_deformed),
                       rejected=np.concatenate(rejected))


def field_on_grid(displacement: torch.Tensor, grid_affine, target_shape, target_affine
                  ) -> torch.Tensor:
    """Displacement fields carried from the working grid to another grid (trilinear).

    displacement: (B, 3, X', Y', Z') world mm on ``grid_affine``. Returns (B, 3, X, Y, Z).
    Beyond the working grid the edge value continues (the field is smooth, not zero, there).
    """
    dtype = torch.float64
    device = displacement.device
    identity = torch.eye(4, dtype=dtype, device=device).expand(displacement.shape[0], 4, 4)
    maps = voxel_map(identity, torch.as_tensor(np.asarray(grid_affine, float), device=device),
                     torch.as_tensor(np.asarray(target_affine, float), device=device))
    return resample(displacement, maps, tuple(target_shape), padding_mode="border")


def deformable_voxel_points(transforms: torch.Tensor, displacement: torch.Tensor,
                            reference_world: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Where each reference voxel reads each volume: inv(A) T_t (p + u_t(p)), p = A x.

    transforms: (B, 4, 4) rigid; displacement: (B, 3, X, Y, Z) world mm on the reference grid
    (``field_on_grid``); reference_world: (N, 3) world points p of the reference voxels in C order
    (``geometry.world_points``), N = X * Y * Z; affine: (4, 4) voxel -> world of the volumes.
    Returns (B, N, 3) voxel coordinates into the volumes.
    """
    dtype = torch.float64
    moved = reference_world.to(dtype)[None] + displacement.to(dtype).flatten(2).transpose(1, 2)
    maps = torch.linalg.inv(affine.to(dtype)) @ transforms.to(dtype)
    return moved @ maps[:, :3, :3].transpose(1, 2) + maps[:, None, :3, 3]
