"""Batched multi-resolution rigid registration (inverse-compositional Gauss-Newton).

Every moving volume of a batch is aligned to one fixed image at once. The fixed image's gradient,
and hence the Jacobian, is computed once per level (inverse compositional scheme); each iteration
then costs one trilinear sampling of the moving volumes and a 6x6 solve per volume. A per-volume
linear intensity fit and Huber weights make the cost robust to global intensity drift and to
local signal changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .geometry import grid_center, rigid_from_params, rigid_inverse, voxel_sizes
from .resample import band_limit_sigma, gaussian_blur, sample_mapped_points, sample_points


@dataclass(frozen=True)
class Level:
    """One resolution level.

    spacing_factor: working spacing as a multiple of the finest voxel size (isotropic when coarse).
    iterations: maximum Gauss-Newton iterations.
    channel_weights: weight of each image channel at this level (e.g. intensity, shape map).
    smoothing: both images are band-limited as for a grid this many times coarser than the
        level's own (1: for the level's grid).
    min_points: when the level's grid holds fewer weighted points than this, the level uses
        the finest voxel grid (spacing factor 1) instead.
    tolerance: this level's stopping tolerance (mm, as ``register_rigid``'s), or None for
        ``register_rigid``'s: a level that a finer one follows need not converge as tightly.
    """

    spacing_factor: float
    iterations: int
    channel_weights: tuple = (1.0,)
    smoothing: float = 1.0
    min_points: int = 0
    tolerance: float | None = None


DEFAULT_LEVELS = (Level(4.0, 30), Level(2.0, 20), Level(1.0, 12))
POINTS_PER_BIN = 256  # fewest fixed points per intensity bin (``intensity_bins``)
MEDIAN_POINTS = 8192  # points (at least) behind each robust residual scale


@dataclass
class RigidResult:
    """transforms: (B, 4, 4) float64 world (fixed) -> world (moving).
    residual: (B,) robust normalised residual at the finest level (0 = perfect match).
    iterations: (B,) Gauss-Newton iterations used at the finest level.
    overlap: (B,) fraction of the weighted fixed points that fell inside the moving field of
        view at the last iteration (a residual over few points is not comparable)."""

    transforms: np.ndarray
    residual: np.ndarray
    iterations: np.ndarray
    overlap: np.ndarray | None = None


def level_grid(shape, affine, spacing_factor: float):
    """Working grid for a level: spacing per axis max(factor * min voxel size, voxel size).

    Returns (shape (3,), affine (4, 4), spacing mm (3,)). The grid starts at voxel 0.
    """
    vox = voxel_sizes(affine)
    spacing = np.maximum(spacing_factor * vox.min(), vox)
    step = spacing / vox
    new_shape = np.floor((np.asarray(shape[:3]) - 1) / step).astype(int) + 1
    new_affine = np.asarray(affine, dtype=float) @ np.diag(np.append(step, 1.0))
    return tuple(int(n) for n in new_shape), new_affine, spacing


def _fixed_level(fixed, fixed_affine, fixed_weight, level: Level):
    """Sample the fixed image, its world gradient and its weight on the level grid.

    fixed: (C, X, Y, Z). Returns points (N, 3) world float64, values (C, N), jacobian (C, N, 6)
    for a centre at the fixed grid centre, and base weights (N,), restricted to weighted voxels.
    """
    shape, affine, spacing = level_grid(fixed.shape[1:], fixed_affine, level.spacing_factor)
    device, dtype = fixed.device, fixed.dtype
    blurred = gaussian_blur(fixed[None], band_limit_sigma(fixed_affine,
                                                          level.smoothing * spacing))
    index = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float64, device=device) for n in shape],
                       indexing="ij"), dim=-1).reshape(-1, 3)
    step = torch.as_tensor(spacing / voxel_sizes(fixed_affine), dtype=torch.float64, device=device)
    values, _ = sample_points(blurred, (index * step)[None])
    values = values[0]  # (C, N)
    grid_values = values.view(values.shape[0], *shape)
    grad_vox = torch.stack(torch.gradient(grid_values, dim=(1, 2, 3)), dim=1)  # (C, 3, X, Y, Z)
    to_world = torch.linalg.inv(torch.as_tensor(affine[:3, :3], dtype=torch.float64)).T
    grad_world = torch.einsum("ij,cjn->cin", to_world.to(device=device, dtype=dtype),
                              grad_vox.reshape(values.shape[0], 3, -1))  # (C, 3, N)
    affine_t = torch.as_tensor(affine, dtype=torch.float64, device=device)
    points = index @ affine_t[:3, :3].T + affine_t[:3, 3]

    if fixed_weight is None:
        weight = torch.ones(points.shape[0], dtype=dtype, device=device)
    else:
        weight, _ = sample_points(fixed_weight[None, None].to(dtype), (index * step)[None])
        weight = weight[0, 0]
    keep = weight > 1e-3
    points, values, grad_world, weight = (points[keep], values[:, keep], grad_world[:, :, keep],
                                          weight[keep])

    center = torch.as_tensor(grid_center(fixed.shape[1:], fixed_affine), dtype=torch.float64,
                             device=device)
    offset = (points - center).to(dtype)  # (N, 3)
    grad = grad_world.transpose(1, 2)  # (C, N, 3)
    jacobian = torch.cat([torch.cross(offset.expand_as(grad), grad, dim=-1), grad], dim=-1)
    return points, values, jacobian, weight, spacing


def _robust_scale(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted standard deviation of values (..., N) with weights (N,), floored to avoid 0."""
    total = weight.sum().clamp_min(1e-12)
    mean = (values * weight).sum(-1, keepdim=True) / total
    var = (((values - mean) ** 2) * weight).sum(-1) / total
    return var.sqrt().clamp_min(1e-6)


def _quantile_bins(values: torch.Tensor, weight: torch.Tensor, count: int) -> torch.Tensor:
    """(C, N) long: the quantile bin (0..count-1) of each fixed value, per channel, among the
    weighted points."""
    inner = torch.linspace(0, 1, count + 1, dtype=values.dtype, device=values.device)[1:-1]
    used = values[:, weight > 0]
    edges = torch.quantile(used[:, :: max(1, used.shape[1] // 100_000)], inner, dim=1).T
    return torch.searchsorted(edges.contiguous(), values.contiguous())


def _binned_map(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor,
                bins: torch.Tensor):
    """The moving intensity predicted from the fixed one, and its slope.

    fixed: (C, N); moving: (b, C, N); weight: (b, N); bins: (C, N) from ``_quantile_bins``.
    Per volume and channel, the weighted means of fixed and moving in each bin are joined
    piecewise linearly; an empty bin takes its neighbours' line. Returns (b, C, N) twice.
    """
    count = int(bins.max()) + 1
    b, channels, _ = moving.shape
    index = bins.expand(b, channels, -1)
    w = weight[:, None].expand(b, channels, -1)

    def binned(values):
        return torch.zeros(b, channels, count, dtype=values.dtype, device=values.device
                           ).scatter_add_(-1, index, values)

    mass = binned(w)
    filled = mass > 1e-6 * mass.sum(-1, keepdim=True)
    centre = binned(w * fixed[None]) / mass.clamp_min(1e-12)
    level = binned(w * moving) / mass.clamp_min(1e-12)
    # An empty bin (e.g. outside the field of view) takes its neighbours' line.
    centre, level = _fill_gaps(centre, filled), _fill_gaps(level, filled)
    near = torch.gather(centre, -1, index)
    right = (fixed[None] >= near).long()
    other = (index + 2 * right - 1).clamp(0, count - 1)
    other = torch.where(other == index, (index + 1 - 2 * right).clamp(0, count - 1), other)
    c0, c1 = near, torch.gather(centre, -1, other)
    l0, l1 = torch.gather(level, -1, index), torch.gather(level, -1, other)
    slope = (l1 - l0) / torch.where((c1 - c0).abs() > 1e-9, c1 - c0,
                                    torch.full_like(c0, 1e-9))
    return l0 + slope * (fixed[None] - c0), slope


def _fill_gaps(values: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """(..., K) values with the unfilled entries replaced by linear interpolation between the
    nearest filled ones (held constant beyond the ends); all-empty rows stay 0."""
    if bool(filled.all()):
        return values
    flat_v = values.reshape(-1, values.shape[-1]).cpu().numpy()
    flat_f = filled.reshape(-1, values.shape[-1]).cpu().numpy()
    out = flat_v.copy()
    axis = np.arange(values.shape[-1])
    for row in range(out.shape[0]):
        known = flat_f[row]
        if known.any() and not known.all():
            out[row] = np.interp(axis, axis[known], flat_v[row, known])
    return torch.as_tensor(out, device=values.device).reshape(values.shape)


def register_rigid(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_affine,
    moving_affine,
    fixed_weight: torch.Tensor | None = None,
    init: np.ndarray | None = None,
    levels=DEFAULT_LEVELS,
    huber: float = 1.345,
    tolerance: float = 1e-4,
    intensity_bins: int = 0,
) -> RigidResult:
    """Rigidly align each moving volume to the fixed image.

    fixed: (C, X, Y, Z) float tensor; channels are e.g. intensity and a shape map.
    moving: (B, C, X', Y', Z') on the grid ``moving_affine`` (shared by the batch). With an
        ``init`` of k * B transforms (start-major: row i starts volume i mod B), every volume
        is registered from each of its k starts; each level blurs the B volumes once.
    fixed_weight: (X, Y, Z) non-negative weights on the fixed grid (e.g. a dilated brain mask);
        None weighs every voxel equally.
    init: (B, 4, 4) initial transforms (world fixed -> world moving); identity when None.
    levels: coarse-to-fine ``Level``s. tolerance: stop when every update moves points by less
        than this many mm (rotation measured at 50 mm), at the levels without their own.
    intensity_bins: 0 fits moving = gain * fixed + offset per volume and channel; n > 0 fits
        any function of the fixed intensity instead (piecewise linear through the moving
        volume's mean in n quantile bins of the fixed intensity, as the correlation ratio),
        for contrasts that change non-linearly or invert (DWI shells, PET frames).
    Returns a ``RigidResult`` with transforms (B, 4, 4) float64.
    """
    device = fixed.device
    batch = moving.shape[0] if init is None else len(init)
    if batch % moving.shape[0]:
        raise ValueError(f"{batch} starts for {moving.shape[0]} volumes: need a multiple")
    starts_per_volume = batch // moving.shape[0]
    transforms = (torch.eye(4, dtype=torch.float64, device=device).repeat(batch, 1, 1)
                  if init is None else torch.as_tensor(init, dtype=torch.float64, device=device))
    moving_vox_from_world = torch.linalg.inv(
        torch.as_tensor(np.asarray(moving_affine, dtype=float), device=device))
    center = torch.as_tensor(grid_center(fixed.shape[1:], fixed_affine), device=device)
    residual = torch.zeros(batch, dtype=torch.float64, device=device)
    used = torch.zeros(batch, dtype=torch.long, device=device)
    overlap = torch.ones(batch, dtype=torch.float64, device=device)

    to_center = torch.eye(4, dtype=torch.float64, device=device)
    to_center[:3, 3] = center  # sampling points are kept relative to the centre (float32)
    channels_in = fixed.shape[0]
    for level in levels:
        weights_c = torch.as_tensor(level.channel_weights, dtype=fixed.dtype, device=device)
        weights_c = weights_c.expand(channels_in) if weights_c.numel() == 1 else weights_c
        # Channels weighted 0 at this level are neither sampled nor scored.
        kept = (weights_c > 0).nonzero().squeeze(1)
        if kept.numel() == 0:
            continue
        weights_c = weights_c[kept]
        points, fixed_values, jacobian, base_weight, spacing = _fixed_level(
            fixed[kept], fixed_affine, fixed_weight, level)
        if len(points) < level.min_points and level.spacing_factor != 1.0:
            level = replace(level, spacing_factor=1.0)
            points, fixed_values, jacobian, base_weight, spacing = _fixed_level(
                fixed[kept], fixed_affine, fixed_weight, level)
        centred = (points - center).to(fixed.dtype)
        moving_level = gaussian_blur(moving[:, kept],
                                     band_limit_sigma(moving_affine, level.smoothing * spacing))
        if starts_per_volume > 1 and moving_level.shape[0] > 1:
            # one copy per start (a single volume is sampled through all its maps at once)
            moving_level = moving_level.repeat(starts_per_volume, 1, 1, 1, 1)
        scale = _robust_scale(fixed_values, base_weight)  # (C,)
        # Enough points per bin that a wrong alignment cannot be fitted away (coarse levels
        # have few points).
        bins = _quantile_bins(fixed_values, base_weight, int(np.clip(
            fixed_values.shape[1] // POINTS_PER_BIN, 4, intensity_bins))) if intensity_bins \
            else None
        # The robust scale of the residual is a median: a subsample of points estimates it.
        median_stride = max(1, fixed_values.shape[1] // MEDIAN_POINTS)
        channel_weight = (weights_c / scale ** 2)[None, :, None]
        jac = jacobian.to(fixed.dtype)  # (C, N, 6)
        level_tolerance = tolerance if level.tolerance is None else level.tolerance
        active = torch.ones(batch, dtype=torch.bool, device=device)
        used.zero_()
        gathered, gathered_idx = moving_level, None  # the active volumes, re-gathered on change
        for _ in range(level.iterations):
            if not active.any():
                break
            idx = active.nonzero().squeeze(1)
            if moving_level.shape[0] > 1 and len(idx) < moving_level.shape[0] and (
                    gathered_idx is None or not torch.equal(gathered_idx, idx)):
                gathered, gathered_idx = moving_level[idx], idx
            sampled, inside = sample_mapped_points(
                gathered, centred, moving_vox_from_world @ transforms[idx] @ to_center)
            weight = base_weight * inside.to(fixed.dtype)  # (b, N)

            if intensity_bins:
                predicted, slope = _binned_map(fixed_values, sampled, weight, bins)
                # Residual and Jacobian in units of the moving volume's spread: the map's slope
                # carries the fixed image's gradient into the moving image's contrast.
                total = weight.sum(-1).clamp_min(1e-12)[:, None]
                mean_m = (sampled * weight[:, None]).sum(-1) / total
                spread = ((((sampled - mean_m[..., None]) ** 2) * weight[:, None]).sum(-1)
                          / total).sqrt().clamp_min(1e-6)  # (b, C)
                error = (sampled - predicted) / spread[..., None]
                gain = slope / spread[..., None] * scale[None, :, None]  # (b, C, N)
            else:
                # Per volume and channel linear intensity fit: moving ~ gain * fixed + offset.
                total = weight.sum(-1).clamp_min(1e-6)[:, None]
                mean_f = (fixed_values[None] * weight[:, None]).sum(-1) / total
                mean_m = (sampled * weight[:, None]).sum(-1) / total
                cov = ((fixed_values[None] - mean_f[..., None]) * (sampled - mean_m[..., None])
                       * weight[:, None]).sum(-1) / total
                var_f = (((fixed_values[None] - mean_f[..., None]) ** 2) * weight[:, None]).sum(-1)
                gain = (cov / (var_f / total).clamp_min(1e-12)).clamp_min(1e-3)
                error = ((sampled - mean_m[..., None]) / gain[..., None]
                         - (fixed_values[None] - mean_f[..., None])) / scale[None, :, None]
                gain = None

            # Huber weights from a robust (MAD) residual scale per volume and channel.
            sigma = 1.4826 * error[..., ::median_stride].abs().median(dim=-1).values.clamp_min(
                1e-6)
            cutoff = huber * sigma[..., None]
            robust = torch.where(error.abs() <= cutoff, torch.ones_like(error),
                                 cutoff / error.abs().clamp_min(1e-12))
            w = weight[:, None] * robust * channel_weight  # (b, C, N)
            scaled_error = error * scale[None, :, None]
            if gain is None:
                w_jac, w_grad = w, w * scaled_error
            else:  # the map's slope per point scales the Jacobian
                w_jac, w_grad = w * gain ** 2, w * gain * scaled_error
            # Sums over points in float32 (BLAS); the 6x6 solve in float64.
            hessian = torch.einsum("bcn,cni,cnj->bij", w_jac, jac, jac).to(torch.float64)
            gradient = torch.einsum("bcn,cni->bi", w_grad, jac).to(torch.float64)
            # The floor keeps the system solvable when a volume has left the field of view.
            damping = 1e-6 * hessian.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] + 1e-9
            step = torch.linalg.solve(hessian + damping * torch.eye(6, dtype=torch.float64,
                                                                    device=device), gradient)
            # Bound each step (0.2 rad, 4 working voxels) so that one bad linearisation
            # cannot throw a volume out of the field of view; a volume with too few points
            # inside it keeps its current estimate.
            limit = torch.stack([step[:, :3].norm(dim=-1) / 0.2,
                                 step[:, 3:].norm(dim=-1) / (4.0 * float(spacing.max()))],
                                dim=-1).amax(-1).clamp_min(1.0)
            step = step / limit[:, None]
            step[weight.sum(-1) < 32] = 0.0
            update = rigid_inverse(rigid_from_params(step, center))
            transforms[idx] = transforms[idx] @ update
            used[idx] += 1
            residual[idx] = ((robust * error.abs() ** 2 * weight[:, None]).sum((-1, -2))
                             / (weight.sum(-1) * fixed_values.shape[0])).sqrt().to(torch.float64)
            overlap[idx] = (weight.sum(-1) / base_weight.sum().clamp_min(1e-12)).to(
                torch.float64)
            motion = step[:, :3].norm(dim=-1) * 50.0 + step[:, 3:].norm(dim=-1)
            active[idx] = motion > level_tolerance
    return RigidResult(transforms.cpu().numpy(), residual.cpu().numpy(), used.cpu().numpy(),
                       overlap.cpu().numpy())
