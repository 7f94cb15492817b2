"""Aligning separate runs of one contrast (e.g. fetal T2w stacks) to a reference run.

Runs are acquired minutes apart, often in different slice orientations, and a fetus may turn
by any angle between them. Each run keeps its own grid: the registration samples it in world
space (thick slices included), and starts from every rotation of the cube about the brain's
centroid, so that no rotation is out of reach; the coarse level's best start goes on to the
finer levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import centroids, start_transforms, voxel_sizes
from .hmc import SHAPE_CLIP_MM, finish_best_start, registration_weight, series_levels
from .register import register_rigid
from .shape import signed_distance


def crop_to_mask(volume: np.ndarray, affine, mask: np.ndarray, margin_mm: float):
    """The box around ``mask`` grown by ``margin_mm``: (volume, affine, mask) cropped, the
    affine shifted so that world positions are unchanged."""
    affine = np.asarray(affine, dtype=float)
    margin = np.ceil(margin_mm / voxel_sizes(affine)).astype(int)
    found = np.argwhere(mask)
    low = np.maximum(found.min(0) - margin, 0)
    high = np.minimum(found.max(0) + margin + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
    return volume[box], shifted, mask[box]


@dataclass
class RunAlignment:
    """transform (4, 4) world reference -> world run; residual: robust normalised residual at
    the finest level; overlap: fraction of the reference's weighted points inside the run;
    start: index of the start the refinement went on from (0 = no rotation)."""

    transform: np.ndarray
    residual: float
    overlap: float
    start: int


def _channels(volume: np.ndarray, affine, mask: np.ndarray | None) -> np.ndarray:
    """(C, X, Y, Z) float32: intensity, and the mask's clipped signed distance (mm) if any."""
    channels = [np.asarray(volume, dtype=np.float32)]
    if mask is not None:
        distance = signed_distance(mask[None], voxel_sizes(affine))[0]
        channels.append(np.clip(distance, -SHAPE_CLIP_MM, SHAPE_CLIP_MM).astype(np.float32))
    return np.stack(channels)


def align_run(
    reference: np.ndarray,
    reference_affine,
    reference_mask: np.ndarray,
    run: np.ndarray,
    run_affine,
    run_mask: np.ndarray | None = None,
    margin_mm: float = 4.0,
    device: str = "cpu",
) -> RunAlignment:
    """Rigidly align one run to the reference run.

    reference: (X, Y, Z) with its brain mask (X, Y, Z) bool; run: (X', Y', Z') on its own grid
    ``run_affine``, with its own mask when one is known (it gives the starting shift and the
    shape channel of the coarse levels). margin_mm: the registration looks this far beyond the
    reference mask (a fetal brain moves inside still tissue: keep it small).
    Every one of the 24 cube rotations is tried at the coarsest level.
    """
    reference_mask = np.asarray(reference_mask, dtype=bool)
    run_mask = None if run_mask is None or not run_mask.any() else run_mask.astype(bool)
    # The registration never looks far beyond the masks: crop for speed.
    reach = margin_mm + 2 * SHAPE_CLIP_MM
    reference, reference_affine, reference_mask = crop_to_mask(
        reference, reference_affine, reference_mask, reach)
    run_center = centroids(reference_mask, reference_affine)
    if run_mask is not None:
        run_center = centroids(run_mask, run_affine)
        run, run_affine, run_mask = crop_to_mask(run, run_affine, run_mask, reach)
    fixed = torch.as_tensor(_channels(reference, reference_affine,
                                      reference_mask if run_mask is not None else None),
                            device=device)
    moving = torch.as_tensor(_channels(run, run_affine, run_mask), device=device)[None]
    weight = torch.as_tensor(registration_weight(reference_mask, reference_affine, margin_mm),
                             device=device)
    levels = series_levels(run_mask is not None)
    starts = start_transforms(centroids(reference_mask, reference_affine), run_center)
    coarse = register_rigid(fixed, moving, reference_affine, run_affine, weight, init=starts,
                            levels=levels[:1])
    fine, pick = finish_best_start(
        coarse, len(starts),
        lambda init, index: register_rigid(fixed, moving, reference_affine, run_affine, weight,
                                           init=init, levels=levels[1:]))
    return RunAlignment(fine.transforms[0], float(fine.residual[0]), float(fine.overlap[0]),
                        int(pick[0]))
