"""Head-motion correction of a 4D series: estimate rigid transforms, then resample once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .deform import deformable_voxel_points, field_on_grid
from .geometry import centroids, rotation_angle, start_transforms, voxel_sizes, world_points
from .devices import fast_inference_dtype
from .heap import retained_heap
from .keypoints import inference_precision
from .network import UniMoRigidNet, encode_inputs, network_estimates
from .register import Level, RigidResult, register_rigid
from .resample import resample, sample_points, voxel_map

# The shape map (signed distance of each volume's mask) widens the capture range at coarse
# levels; the finest level uses intensities alone, which carry the sub-voxel detail.
# The finest level samples the reference off its voxel grid (1.25 voxels apart) and band-limits
# both images a little more (x1.3): the trilinear interpolation's smoothing, which otherwise
# depends on each volume's sub-voxel position, then biases the estimate less. On real BOLD,
# DWI, ASL and adult brains moved by known motion this halved the error; by 28 % when the
# reference is resampled too, and mixed on synthetic 4 mm cases (docs/benchmarks.md, sections
# 8, 10, 12 and 13). The coarser grid halves the points: below FINEST_MIN_POINTS (a fetal
# brain in its shrunken tracking mask: ~4,000) the noise that adds wins, and the voxel grid is
# used (still smoothed). Not for the binned intensity relation (PET), which it made worse
# (0.18 -> 0.30 mm): that keeps every voxel, unsmoothed (BINNED_FINEST_SPACING).
FINEST_SPACING, FINEST_SMOOTHING, FINEST_MIN_POINTS = 1.25, 1.3, 10_000
# Stopping tolerances (mm moved by the last update) per level, coarse to fine. A level that a
# finer one follows only has to hand over a start; the finest stops at 2 microns, far below the
# errors (0.03-0.06 mm). Against 0.1 micron at every level: the same errors (to the printed
# 0.001 mm) on section 8's series, 6-16 % less time (docs/benchmarks.md, section 17).
LEVEL_TOLERANCES_MM = (0.05, 0.01, 0.002)
IMAGE_SHAPE_LEVELS = (
    Level(4.0, 30, (1.0, 1.0), tolerance=LEVEL_TOLERANCES_MM[0]),
    Level(2.0, 20, (1.0, 0.5), tolerance=LEVEL_TOLERANCES_MM[1]),
    Level(FINEST_SPACING, 12, (1.0, 0.0), FINEST_SMOOTHING, FINEST_MIN_POINTS,
          LEVEL_TOLERANCES_MM[2]),
)
IMAGE_LEVELS = (Level(4.0, 30, tolerance=LEVEL_TOLERANCES_MM[0]),
                Level(2.0, 20, tolerance=LEVEL_TOLERANCES_MM[1]),
                Level(FINEST_SPACING, 12, (1.0,), FINEST_SMOOTHING, FINEST_MIN_POINTS,
                      LEVEL_TOLERANCES_MM[2]))
BINNED_FINEST_SPACING = 1.0
# Starts registered together at the coarsest level: each is a copy of the chunk's volumes.
COARSE_STARTS_AT_ONCE = 4


def series_levels(use_shape: bool, intensity_bins: int = 0) -> tuple:
    """The refinement's levels: with the shape channel or not, and the finest level's grid for
    the linear (0) or binned (> 0) intensity relation."""
    levels = IMAGE_SHAPE_LEVELS if use_shape else IMAGE_LEVELS
    if not intensity_bins:
        return levels
    finest = levels[-1]
    return levels[:-1] + (Level(BINNED_FINEST_SPACING, finest.iterations,
                                finest.channel_weights, tolerance=finest.tolerance),)

# Registration looks a little beyond the mask, where the brain edge gives strong gradients.
MASK_MARGIN_MM = 8.0
SHAPE_CLIP_MM = 20.0


def registration_weight(reference_mask: np.ndarray, affine,
                        margin_mm: float = MASK_MARGIN_MM) -> np.ndarray:
    """(X, Y, Z) float32 weight: the reference mask grown by ``margin_mm`` (shrunk when it is
    negative; never to nothing: an erosion that would empty the mask keeps the mask)."""
    mask = reference_mask.astype(bool)
    sizes = voxel_sizes(affine)
    if margin_mm >= 0:
        return (ndimage.distance_transform_edt(~mask, sampling=sizes) <= margin_mm).astype(
            np.float32)
    core = ndimage.distance_transform_edt(mask, sampling=sizes) > -margin_mm
    return (core if core.any() else mask).astype(np.float32)


def _as_batch(series: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """(X, Y, Z, T) numpy slice of volumes -> (B, 1, X, Y, Z) float32 tensor."""
    return torch.as_tensor(np.ascontiguousarray(
        np.moveaxis(series[..., start:stop], -1, 0), dtype=np.float32))[:, None]


@dataclass
class NetworkMotion:
    """The network's estimates for a series: image, shape and fused (T, 4, 4), lambda."""

    image: np.ndarray
    shape: np.ndarray
    fused: np.ndarray
    lam: float


@dataclass
class HeadMotion:
    """transforms (T, 4, 4) world reference -> world volume; residual and iterations (T,) of
    the refinement (NaN and 0 without it); network: the network's estimates or None;
    start: (T,) index of the start the refinement went on from: 0 the identity, 1 to
    ``network_starts`` the network's estimates (fused, then with shape maps the shape
    branch's), then the ``starts`` given."""

    transforms: np.ndarray
    residual: np.ndarray
    iterations: np.ndarray
    network: NetworkMotion | None = None
    start: np.ndarray | None = None
    network_starts: int = 0


def _volume_centroids(shape_series, start, stop, affine, fallback) -> torch.Tensor:
    """(b, 3) world centroids of the masks (distance < 0) of volumes start..stop-1; the
    reference centroid for a volume with no mask (or no shape maps at all)."""
    if shape_series is None:
        return torch.as_tensor(np.tile(fallback, (stop - start, 1)))
    masks = np.moveaxis(shape_series[..., start:stop] < 0, -1, 0)
    found = centroids(masks, affine)
    return torch.as_tensor(np.where(np.isfinite(found), found, fallback))


@torch.no_grad()
def network_head_motion(
    net: UniMoRigidNet,
    series: np.ndarray,
    affine,
    reference: np.ndarray,
    reference_mask: np.ndarray,
    shape_series: np.ndarray | None = None,
    shape_reference: np.ndarray | None = None,
    device: str = "cpu",
    chunk_size: int = 64,
) -> NetworkMotion:
    """The UniMo network's rigid estimates (no refinement) for every volume of a series.

    Arguments as ``estimate_head_motion``. Every input is resampled once onto the network's
    working grid, shifted to its own mask centroid; the reference is encoded once. The
    convolutions run in ``devices.fast_inference_dtype(device)``.
    """
    net = net.to(device).eval()
    with inference_precision(net, fast_inference_dtype(device)):
        return _network_head_motion(net, series, affine, reference, reference_mask,
                                    shape_series, shape_reference, device, chunk_size)


def _network_head_motion(net, series, affine, reference, reference_mask, shape_series,
                         shape_reference, device, chunk_size) -> NetworkMotion:
    use_shape = shape_series is not None and shape_reference is not None
    grid_affine, grid_shape = net.grid(reference.shape, affine, reference_mask)
    center = centroids(reference_mask, affine)
    fixed_offsets = torch.zeros(1, 3, dtype=torch.float64)
    fixed_image, fixed_shape = encode_inputs(
        torch.as_tensor(reference, dtype=torch.float32, device=device)[None, None],
        torch.as_tensor(shape_reference, dtype=torch.float32, device=device)[None, None]
        if use_shape else None, affine, grid_affine, grid_shape, fixed_offsets)
    out = {"image": [], "shape": [], "fused": []}
    lam = 0.0
    for begin in range(0, series.shape[-1], chunk_size):
        stop = min(begin + chunk_size, series.shape[-1])
        offsets = _volume_centroids(shape_series if use_shape else None, begin, stop, affine,
                                    center) - torch.as_tensor(center)
        moving_image, moving_shape = encode_inputs(
            _as_batch(series, begin, stop).to(device),
            _as_batch(shape_series, begin, stop).to(device) if use_shape else None,
            affine, grid_affine, grid_shape, offsets)
        estimates = network_estimates(net, fixed_image, fixed_shape, moving_image,
                                      moving_shape, grid_affine, fixed_offsets.to(device),
                                      offsets.to(device), center)
        for name in out:
            out[name].append(getattr(estimates, name).cpu().numpy())
        lam = float(estimates.lam)
    return NetworkMotion(**{k: np.concatenate(v) for k, v in out.items()}, lam=lam)


def _usable_starts(coarse: RigidResult, n_starts: int) -> np.ndarray:
    """(n_starts, b) whether each start kept at least 80 % of the median overlap of the
    volume's starts with the field of view (a residual over few points is not comparable).
    The median, not the best: one wrong pose that crams more of the brain into a thin slab
    must not rule out the right one (a resliced fetal stack: 0.86 against 0.67)."""
    overlap = coarse.overlap.reshape(n_starts, -1)
    return overlap >= 0.8 * np.median(overlap, axis=0)


def pick_start(coarse: RigidResult, n_starts: int) -> np.ndarray:
    """(b,) index of the best start per volume: the lowest coarse residual among the usable
    starts. ``coarse`` holds n_starts blocks of b volumes, start-major."""
    residual = coarse.residual.reshape(n_starts, -1)
    return np.argmin(np.where(_usable_starts(coarse, n_starts), residual, np.inf), axis=0)


def rival_start(coarse: RigidResult, n_starts: int, pick: np.ndarray,
                 agree_mm: float = 2.0, close: float = 1.2) -> np.ndarray:
    """(b,) index of the best usable start whose coarse result disagrees with the picked one
    (by more than ``agree_mm``: translation plus rotation at 50 mm) while its coarse residual
    is within ``close`` times the picked one's; -1 where there is none."""
    count = len(pick)
    ends = coarse.transforms.reshape(n_starts, count, 4, 4)
    chosen = ends[pick, np.arange(count)]
    relative = np.linalg.inv(chosen)[None] @ ends  # (n_starts, b, 4, 4)
    apart = (np.linalg.norm(relative[..., :3, 3], axis=-1) + 50.0 * rotation_angle(relative)
             > agree_mm)
    residual = coarse.residual.reshape(n_starts, count)
    near = residual <= close * residual[pick, np.arange(count)]
    score = np.where(apart & near & _usable_starts(coarse, n_starts), residual, np.inf)
    best = np.argmin(score, axis=0)
    return np.where(np.isfinite(score[best, np.arange(count)]), best, -1)


def finish_best_start(coarse: RigidResult, n_starts: int, finish) -> tuple:
    """The finer levels from each volume's best coarse start (``pick_start``), and from its
    rival where there is one (``rival_start``): the coarse level cannot always tell a wrong
    start from the right one when contrast differs from the reference; the finest residual
    can, and the lower one wins.

    coarse: n_starts blocks of b volumes, start-major. finish(init (k, 4, 4), index (k,)) runs
    the finer levels for volumes ``index`` from ``init``; returns a RigidResult.
    Returns (RigidResult of the b volumes, (b,) index of the start each went on from).
    """
    count = len(coarse.residual) // n_starts
    ends = coarse.transforms.reshape(n_starts, count, 4, 4)
    pick = pick_start(coarse, n_starts)
    result = finish(ends[pick, np.arange(count)], np.arange(count))
    rival = rival_start(coarse, n_starts, pick)
    contested = np.flatnonzero(rival >= 0)
    if contested.size:
        other = finish(ends[rival[contested], contested], contested)
        better = other.residual < result.residual[contested]
        for field in ("transforms", "residual", "iterations", "overlap"):
            getattr(result, field)[contested[better]] = getattr(other, field)[better]
        pick[contested[better]] = rival[contested[better]]
    return result, pick


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
    network: UniMoRigidNet | None = None,
    refine: bool = True,
    margin_mm: float = MASK_MARGIN_MM,
    starts: np.ndarray | None = None,
    intensity_bins: int = 0,
    rotation_search: bool = False,
) -> HeadMotion:
    """Rigid transforms aligning every volume of a series to the reference.

    series: (X, Y, Z, T); reference: (X, Y, Z) on the same grid (``affine``).
    reference_mask: (X, Y, Z) bool brain mask of the reference.
    shape_series, shape_reference: optional signed distance maps (mm) of each volume's and the
        reference's mask, same shapes as series / reference; the shape branch's input and a
        second channel of the refinement's coarse levels.
    chunk_size: volumes registered at once, which bounds memory on long series.
    progress: optional callable(n_done) called after each chunk.
    network: the UniMo network; its fused estimate is a start for the refinement. Each volume is
        refined from the identity and from the network's estimate at the coarsest level, and
        goes on from the better one, so the network widens the capture range without costing
        accuracy where it is less precise than the refinement.
    refine: False returns the network's fused estimate alone (needs ``network``).
    margin_mm: the registration looks this far beyond the reference mask. Around a head that
        moves as a whole, the brain's edge and scalp help; around anatomy that moves inside
        still tissue (a fetal brain) anything beyond the moving structure pulls towards the
        identity, so the tracked mode shrinks the mask instead (a negative margin).
    starts: optional (T, 4, 4) further starting transforms (e.g. a previous estimate), tried
        at the coarsest level with the identity and the network's estimate.
    intensity_bins: 0 for a linear intensity relation between each volume and the reference;
        n > 0 for any functional relation (``register_rigid``), when contrast changes across
        the series (DWI shells, PET frames).
    rotation_search: also start from the 24 rotations of the cube about the reference brain's
        centroid, moved onto each volume's mask centroid (``geometry.start_transforms``), so
        that no rotation is out of reach when the network's estimates are not (a fetal brain
        can turn by any angle). The coarsest level runs 24 more times.
    """
    if not refine and network is None:
        raise ValueError("refine=False needs a network")
    with retained_heap():
        return _estimate(series, affine, reference, reference_mask, shape_series,
                         shape_reference, device, chunk_size, progress, network, refine,
                         margin_mm, starts, intensity_bins, rotation_search)


def _coarse_level(fixed_t, moving, affine, weight, candidates, level, intensity_bins,
                  group: int = COARSE_STARTS_AT_ONCE) -> RigidResult:
    """The coarsest level from every start in ``candidates`` (a list of (b, 4, 4)), a few
    starts at a time so that memory does not grow with their number; start-major, as
    ``pick_start`` reads it."""
    parts = []
    for first in range(0, len(candidates), group):
        block = candidates[first:first + group]
        parts.append(register_rigid(fixed_t, moving, affine, affine, weight,
                                    init=np.concatenate(block), levels=(level,),
                                    intensity_bins=intensity_bins))
    return RigidResult(*(np.concatenate([getattr(part, name) for part in parts])
                         for name in ("transforms", "residual", "iterations", "overlap")))


def _estimate(series, affine, reference, reference_mask, shape_series, shape_reference, device,
              chunk_size, progress, network, refine, margin_mm, starts,
              intensity_bins, rotation_search) -> HeadMotion:
    n_vols = series.shape[-1]
    estimates = None
    if network is not None:
        estimates = network_head_motion(network, series, affine, reference, reference_mask,
                                        shape_series, shape_reference, device, chunk_size)
    if not refine:
        if progress is not None:
            progress(n_vols)
        return HeadMotion(estimates.fused, np.full(n_vols, np.nan), np.zeros(n_vols, int),
                          estimates, np.ones(n_vols, int), 1)

    use_shape = shape_series is not None and shape_reference is not None
    fixed = [reference]
    if use_shape:
        fixed.append(np.clip(shape_reference, -SHAPE_CLIP_MM, SHAPE_CLIP_MM))
    fixed_t = torch.as_tensor(np.stack(fixed).astype(np.float32), device=device)
    weight = torch.as_tensor(registration_weight(reference_mask, affine, margin_mm),
                              device=device)
    levels = series_levels(use_shape, intensity_bins)
    reference_center = centroids(reference_mask, affine)
    network_branches = (() if estimates is None else
                        ("fused", "shape") if use_shape else ("fused",))

    results, starts_used = [], []
    for begin in range(0, n_vols, chunk_size):
        stop = min(begin + chunk_size, n_vols)
        moving = _as_batch(series, begin, stop)
        if use_shape:
            shapes = _as_batch(shape_series, begin, stop).clamp(-SHAPE_CLIP_MM, SHAPE_CLIP_MM)
            moving = torch.cat([moving, shapes], dim=1)
        moving = moving.to(device)
        count = stop - begin
        candidates = [np.tile(np.eye(4), (count, 1, 1))]
        if estimates is not None:
            # The shape branch's too: where the branches disagree the fused estimate is the
            # image branch's, and the shape branch's may be the one in the capture range.
            candidates += [getattr(estimates, name)[begin:stop] for name in network_branches]
        if starts is not None:
            candidates.append(np.asarray(starts, dtype=float)[begin:stop])
        if rotation_search:
            centers = _volume_centroids(shape_series if use_shape else None, begin, stop,
                                        affine, reference_center).numpy()
            candidates += list(start_transforms(reference_center, centers))
        if len(candidates) == 1:
            results.append(register_rigid(fixed_t, moving, affine, affine, weight,
                                          levels=levels, intensity_bins=intensity_bins))
            starts_used.append(np.zeros(count, int))
        else:
            n_starts = len(candidates)
            coarse = _coarse_level(fixed_t, moving, affine, weight, candidates, levels[0],
                                   intensity_bins)
            result, pick = finish_best_start(
                coarse, n_starts,
                lambda init, index: register_rigid(
                    fixed_t, moving[torch.as_tensor(index)], affine, affine, weight, init=init,
                    levels=levels[1:], intensity_bins=intensity_bins))
            results.append(result)
            starts_used.append(pick)
        if progress is not None:
            progress(stop - begin)
    return HeadMotion(
        transforms=np.concatenate([r.transforms for r in results]),
        residual=np.concatenate([r.residual for r in results]),
        iterations=np.concatenate([r.iterations for r in results]),
        network=estimates,
        start=np.concatenate(starts_used),
        network_starts=len(network_branches),
    )


def apply_head_motion(
    series: np.ndarray, affine, transforms: np.ndarray, device: str = "cpu", chunk_size: int = 64,
    fields: np.ndarray | None = None, field_affine=None,
) -> np.ndarray:
    """Resample every volume onto the reference grid through its transform, once (trilinear).

    series: (X, Y, Z, T); transforms: (T, 4, 4). With ``fields`` (T, 3, X', Y', Z'), world mm
    displacements on the grid ``field_affine`` (``deform.Deformation``), volume t is read at
    T_t(p + u_t(p)): the rigid and deformable parts compose into one interpolation.
    Returns (X, Y, Z, T) float32; points that fall outside the original field of view are 0.
    """
    affine_t = torch.as_tensor(np.asarray(affine, dtype=float), device=device)
    out = np.empty(series.shape, dtype=np.float32)
    if fields is not None:
        chunk_size = min(chunk_size, 16)  # one (B, N, 3) float64 point array per chunk
        reference_world = torch.as_tensor(world_points(series.shape[:3], affine), device=device)
    for start in range(0, series.shape[-1], chunk_size):
        stop = min(start + chunk_size, series.shape[-1])
        volumes = _as_batch(series, start, stop).to(device)
        transforms_t = torch.as_tensor(transforms[start:stop], device=device)
        if fields is None:
            moved = resample(volumes, voxel_map(transforms_t, affine_t, affine_t),
                             series.shape[:3])
        else:
            displacement = field_on_grid(torch.as_tensor(fields[start:stop], device=device),
                                         field_affine, series.shape[:3], affine_t)
            points = deformable_voxel_points(transforms_t, displacement, reference_world,
                                             affine_t)
            values, _ = sample_points(volumes, points)
            moved = values.view(volumes.shape)
        out[..., start:stop] = np.moveaxis(moved[:, 0].cpu().numpy(), 0, -1)
    return out
