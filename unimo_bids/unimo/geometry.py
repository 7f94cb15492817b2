"""World-space rigid geometry.

Conventions used across unimo_bids:

- Images live on voxel grids with a NIfTI affine ``A`` (voxel index -> RAS world mm).
- A head-motion transform ``M`` (4, 4) maps a RAS world point ``x`` of the reference grid to the
  world point of the moving volume where the same anatomy is (fixed -> moving, as ITK and
  fMRIPrep's ``from-orig_to-boldref`` files do). Resampling a moving volume at ``M @ x`` for every
  reference point ``x`` aligns it to the reference.
- Small rigid updates are parameterised by ``(rotation vector omega (rad), translation t (mm))``
  about a centre ``c``: ``x -> exp(omega) (x - c) + c + t``.
"""

from __future__ import annotations

import itertools

import numpy as np
import roma
import torch
from scipy.spatial.transform import Rotation


def grid_center(shape, affine) -> np.ndarray:
    """World coordinates (3,) of the centre ((N-1)/2) of a voxel grid."""
    centre_vox = (np.asarray(shape[:3], dtype=float) - 1.0) / 2.0
    return (np.asarray(affine, dtype=float) @ np.append(centre_vox, 1.0))[:3]


def voxel_sizes(affine) -> np.ndarray:
    """Voxel sizes (3,) in mm from an affine's column norms."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def world_points(shape, affine, mask=None) -> np.ndarray:
    """World coordinates (N, 3) of the voxels of a grid, or of the True voxels of ``mask``."""
    if mask is None:
        index = np.indices(tuple(shape[:3])).reshape(3, -1).T
    else:
        index = np.argwhere(np.asarray(mask, dtype=bool))
    affine = np.asarray(affine, dtype=float)
    return index @ affine[:3, :3].T + affine[:3, 3]


def centroids(masks: np.ndarray, affine) -> np.ndarray:
    """(..., X, Y, Z) bool masks -> (..., 3) world centroids; an empty mask gives NaN."""
    masks = np.asarray(masks, dtype=bool)
    index = np.indices(masks.shape[-3:]).reshape(3, -1).astype(float)
    flat = masks.reshape(masks.shape[:-3] + (-1,)).astype(float)
    count = flat.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = flat @ index.T / count
    affine = np.asarray(affine, dtype=float)
    return mean @ affine[:3, :3].T + affine[:3, 3]


def rigid_from_params(params: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Rigid matrices from rotation-vector + translation parameters about a centre.

    params: (B, 6) as (omega_x, omega_y, omega_z [rad], t_x, t_y, t_z [mm]).
    center: (3,) world mm.
    Returns (B, 4, 4): x -> R (x - c) + c + t.
    """
    rotation = roma.rotvec_to_rotmat(params[:, :3])
    center = center.to(params)
    translation = params[:, 3:] + center - rotation @ center
    return homogeneous(rotation, translation)


def homogeneous(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) and (B, 3) -> (B, 4, 4) homogeneous matrices."""
    batch = rotation.shape[0]
    out = torch.zeros(batch, 4, 4, dtype=rotation.dtype, device=rotation.device)
    out[:, :3, :3] = rotation
    out[:, :3, 3] = translation
    out[:, 3, 3] = 1.0
    return out


def rigid_inverse(matrices: torch.Tensor) -> torch.Tensor:
    """Exact inverse of rigid matrices (B, 4, 4), using R^T rather than a general inverse."""
    rotation_t = matrices[:, :3, :3].transpose(1, 2)
    return homogeneous(rotation_t, -(rotation_t @ matrices[:, :3, 3:]).squeeze(-1))


def mean_displacement(first: np.ndarray, second: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Mean Euclidean distance (mm) between where two transforms send the same points.

    first, second: (B, 4, 4); points: (N, 3) world mm. Returns (B,).
    """
    points_h = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    diff = np.einsum("bij,nj->bni", np.asarray(first) - np.asarray(second), points_h)[..., :3]
    return np.linalg.norm(diff, axis=-1).mean(axis=1)


def rotation_angle(transforms) -> np.ndarray:
    """Angle (rad) of the rotation part of (..., 4, 4) rigid transforms (or (..., 3, 3))."""
    rotations = np.asarray(transforms, dtype=float)[..., :3, :3]
    cosine = (np.trace(rotations, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.arccos(np.clip(cosine, -1.0, 1.0))


def euler_to_matrix(angles_rad) -> np.ndarray:
    """Rotation matrices R = Rz @ Ry @ Rx (extrinsic x, then y, then z) from (..., 3) angles."""
    angles = np.asarray(angles_rad, dtype=float)
    return Rotation.from_euler("xyz", angles.reshape(-1, 3)).as_matrix().reshape(
        angles.shape[:-1] + (3, 3))


def matrix_to_euler(rotations) -> np.ndarray:
    """Angles (..., 3) in rad, (rot_x, rot_y, rot_z), such that R = Rz @ Ry @ Rx."""
    rotations = np.asarray(rotations, dtype=float)
    return Rotation.from_matrix(rotations.reshape(-1, 3, 3)).as_euler("xyz").reshape(
        rotations.shape[:-2] + (3,))


def rigid_matrix(rotation_deg, translation_mm, center_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(4, 4) rigid transform x -> R (x - c) + c + t, with R = Rz @ Ry @ Rx from degrees."""
    rotation = euler_to_matrix(np.deg2rad(np.asarray(rotation_deg, dtype=float)))
    center = np.asarray(center_mm, dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = center + np.asarray(translation_mm, dtype=float) - rotation @ center
    return matrix


def motion_parameters(transforms, center) -> np.ndarray:
    """(T, 6) trans_x/y/z (mm) and rot_x/y/z (rad) of (T, 4, 4) rigid transforms about a centre.

    M = [[R, u], [0, 1]] is written x -> R (x - c) + c + t, so t = u - c + R c, and the angles
    are those of R = Rz @ Ry @ Rx.
    """
    transforms = np.asarray(transforms, dtype=float)
    center = np.asarray(center, dtype=float)
    rotation = transforms[:, :3, :3]
    translation = transforms[:, :3, 3] - center + rotation @ center
    return np.hstack((translation, matrix_to_euler(rotation)))


def rigid_from_motion_parameters(params, center) -> np.ndarray:
    """Inverse of ``motion_parameters``: (T, 6) -> (T, 4, 4)."""
    params = np.atleast_2d(np.asarray(params, dtype=float))
    center = np.asarray(center, dtype=float)
    rotation = euler_to_matrix(params[:, 3:])
    out = np.tile(np.eye(4), (len(params), 1, 1))
    out[:, :3, :3] = rotation
    out[:, :3, 3] = params[:, :3] + center - rotation @ center
    return out


def consecutive_rmsd(transforms, points) -> np.ndarray:
    """RMS displacement (mm) between consecutive transforms over a point set; (T,), NaN first.

    rmsd[t] = sqrt(mean_x ||M_t x - M_{t-1} x||^2), evaluated exactly from the mean mu and the
    covariance S of the points (N, 3): with A, b the difference of the linear parts and
    translations, mean ||A x + b||^2 = tr(A S A^T) + ||A mu + b||^2.
    """
    transforms = np.asarray(transforms, dtype=float)
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    if points.shape[0] == 0:
        raise ValueError("RMSD needs at least one point (empty brain mask?)")
    out = np.full(len(transforms), np.nan)
    if len(transforms) < 2:
        return out
    mean = points.mean(axis=0)
    centred = points - mean
    covariance = centred.T @ centred / points.shape[0]
    delta = transforms[1:] - transforms[:-1]
    linear, shift = delta[:, :3, :3], delta[:, :3, 3]
    quadratic = np.einsum("tij,jk,tik->t", linear, covariance, linear)
    offset = linear @ mean + shift
    out[1:] = np.sqrt(np.clip(quadratic + np.einsum("ti,ti->t", offset, offset), 0.0, None))
    return out


def cube_rotations() -> np.ndarray:
    """(24, 3, 3) the proper rotations of the cube (signed permutation matrices, det +1); the
    identity first."""
    found = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[range(3), order] = signs
            if np.linalg.det(matrix) > 0:
                found.append(matrix)
    found.sort(key=lambda m: -np.trace(m))  # identity (trace 3) first
    return np.stack(found)


def start_transforms(reference_center: np.ndarray, run_center: np.ndarray) -> np.ndarray:
    """(24, 4, 4) starts world reference -> world run: each cube rotation about the reference
    centroid, then the shift of the reference centroid onto the run's. With (T, 3) run centres,
    (24, T, 4, 4): one set of starts per volume."""
    run_center = np.asarray(run_center, dtype=float)
    rotations = cube_rotations().reshape((24,) + (1,) * (run_center.ndim - 1) + (3, 3))
    starts = np.tile(np.eye(4), (24,) + run_center.shape[:-1] + (1, 1))
    starts[..., :3, :3] = rotations
    starts[..., :3, 3] = run_center - rotations @ np.asarray(reference_center, dtype=float)
    return starts
