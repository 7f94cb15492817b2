"""Batched world-space resampling with torch.

Volumes are tensors (B, C, X, Y, Z) indexed like the NIfTI array. ``torch.nn.functional.grid_sample``
orders its sampling coordinates (W, H, D) = (Z, Y, X), so the voxel -> normalised matrices below
swap the axes once, here, and nowhere else.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import voxel_sizes


def _normalise_matrix(shape, dtype, device) -> torch.Tensor:
    """(4, 4) matrix from voxel index (i, j, k, 1) to grid_sample coordinates (k', j', i', 1)."""
    sizes = torch.tensor([max(n - 1, 1) for n in shape[:3]], dtype=dtype, device=device)
    scale = torch.zeros(4, 4, dtype=dtype, device=device)
    for axis in range(3):
        scale[2 - axis, axis] = 2.0 / sizes[axis]
        scale[2 - axis, 3] = -1.0
    scale[3, 3] = 1.0
    return scale


def voxel_map(
    transforms: torch.Tensor, moving_affine: torch.Tensor, target_affine: torch.Tensor
) -> torch.Tensor:
    """Matrices (B, 4, 4) from a target voxel index to the moving voxel index it reads.

    transforms: (B, 4, 4) world (target) -> world (moving), see geometry's conventions.
    moving_affine, target_affine: (4, 4) or (B, 4, 4) voxel -> world.
    """
    return torch.linalg.inv(moving_affine) @ transforms @ target_affine


def resample(
    volumes: torch.Tensor,
    vox_to_vox: torch.Tensor,
    target_shape,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Resample volumes through affine voxel maps.

    volumes: (B, C, X, Y, Z) moving data.
    vox_to_vox: (B, 4, 4) target voxel index -> moving voxel index (see ``voxel_map``).
    target_shape: (X', Y', Z').
    Returns (B, C, X', Y', Z'). ``mode='bilinear'`` is trilinear for 3D data.
    """
    compute = torch.float64
    source = _normalise_matrix(volumes.shape[2:], compute, volumes.device)
    target = _normalise_matrix(target_shape, compute, volumes.device)
    theta = (source @ vox_to_vox.to(compute) @ torch.linalg.inv(target))[:, :3, :]
    grid = affine_sampling_grid(theta.to(volumes.dtype), target_shape)
    return F.grid_sample(volumes, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def affine_sampling_grid(theta: torch.Tensor, target_shape) -> torch.Tensor:
    """``F.affine_grid(theta, (B, 1, *target_shape), align_corners=True)``, the same values,
    as one batched product (about 3x faster on a CPU: 16 ms against 44 for 16 grids of 49^3).

    theta: (B, 3, 4) in grid_sample's normalised frame; target_shape: (X, Y, Z).
    Returns (B, X, Y, Z, 3).
    """
    def axis(n):  # affine_grid's coordinates: -1..1, and 0 on a one-voxel axis
        if n <= 1:
            return torch.zeros(1, dtype=theta.dtype, device=theta.device)
        return torch.linspace(-1.0, 1.0, n, dtype=theta.dtype, device=theta.device)

    size_x, size_y, size_z = (int(n) for n in target_shape[:3])
    # grid_sample reads (k', j', i'): the last axis first
    base = torch.stack(torch.meshgrid(axis(size_x), axis(size_y), axis(size_z), indexing="ij")
                       [::-1], dim=-1).reshape(-1, 3)
    grid = torch.baddbmm(theta[:, None, :, 3], base.expand(theta.shape[0], -1, -1),
                         theta[:, :, :3].transpose(1, 2))
    return grid.view(theta.shape[0], size_x, size_y, size_z, 3)


def sample_points(
    volumes: torch.Tensor, vox_points: torch.Tensor, padding_mode: str = "zeros"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear samples at arbitrary voxel coordinates, and whether each lies inside the grid.

    volumes: (B, C, X, Y, Z); vox_points: (B, N, 3) voxel indices (i, j, k) into volumes.
    Returns values (B, C, N) and inside (B, N) bool.
    """
    shape = volumes.shape[2:]
    sizes = torch.tensor([max(n - 1, 1) for n in shape], dtype=vox_points.dtype,
                         device=vox_points.device)
    normalised = (2.0 * vox_points / sizes - 1.0).flip(-1)
    grid = normalised.to(volumes.dtype).view(volumes.shape[0], -1, 1, 1, 3)
    values = F.grid_sample(volumes, grid, mode="bilinear", padding_mode=padding_mode,
                           align_corners=True)
    upper = torch.tensor(shape, dtype=vox_points.dtype, device=vox_points.device) - 1
    inside = ((vox_points >= 0) & (vox_points <= upper)).all(-1)
    return values.view(volumes.shape[0], volumes.shape[1], -1), inside


def sample_mapped_points(
    volumes: torch.Tensor, points: torch.Tensor, point_to_voxel: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear samples of each volume at shared points, each mapped by its own affine.

    volumes: (B, C, X, Y, Z), or (1, C, X, Y, Z) sampled through all S maps at once;
    points: (N, 3) coordinates in any frame (best centred, for float32 precision);
    point_to_voxel: (S, 4, 4) float64 maps from those coordinates to voxel indices, S = B.
    Returns values (S, C, N) and inside (S, N) bool. The maps are folded into grid_sample's
    normalised frame first, so that the (S, N, 3) grid is one float32 product: cheaper than
    ``sample_points`` on voxel coordinates computed beforehand.
    """
    shape = volumes.shape[2:]
    theta = (_normalise_matrix(shape, torch.float64, volumes.device)
             @ point_to_voxel.to(torch.float64)).to(volumes.dtype)
    count = theta.shape[0]
    grid = torch.baddbmm(theta[:, None, :3, 3], points.to(volumes.dtype).expand(count, -1, -1),
                         theta[:, :3, :3].transpose(1, 2))  # (S, N, 3), (k', j', i') order
    values = F.grid_sample(volumes, grid.view(volumes.shape[0], -1, 1, 1, 3), mode="bilinear",
                           padding_mode="zeros", align_corners=True)
    # grid_sample's frame spans [-1, 1] on each axis (a one-voxel axis: only -1).
    upper = torch.tensor([1.0 if n > 1 else -1.0 for n in reversed(shape)], dtype=grid.dtype,
                         device=grid.device)
    inside = ((grid >= -1.0) & (grid <= upper)).all(-1)
    return values.view(volumes.shape[1], count, -1).transpose(0, 1) if volumes.shape[0] == 1 \
        and count > 1 else values.view(count, volumes.shape[1], -1), inside


# Up to this many voxels along an axis, a dense (n, n) banded matrix product (BLAS) beats
# conv3d with a 1-D kernel 8-15x on CPU (benchmarks/blur.py); beyond, its n MACs per voxel lose.
MATMUL_BLUR_MAX_SIZE = 160


def band_limit_sigma(affine, spacing_mm) -> list[float]:
    """Per-axis Gaussian sigma (voxels of ``affine``) that band-limits data to a working
    spacing (mm, scalar or per axis): a total sigma of half the spacing, less the voxel's own."""
    vox = voxel_sizes(affine)
    sigma_mm = np.sqrt(np.maximum((0.5 * np.asarray(spacing_mm)) ** 2 - (0.5 * vox) ** 2, 0.0))
    return list(sigma_mm / vox)


def gaussian_kernel(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised Gaussian taps truncated at round(3 sigma) (at least 1) voxels: (2r + 1,)."""
    radius = max(1, int(round(3.0 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def gaussian_matrix(n: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, n) matrix M with (M x)_i = sum_o k_o x_clamp(i + o): the truncated kernel with
    replicate padding, so that blurring an axis is one matrix product."""
    kernel = gaussian_kernel(sigma, torch.float64, device)
    radius = (kernel.numel() - 1) // 2
    rows = torch.arange(n, device=device)[:, None].expand(n, kernel.numel())
    columns = (rows + torch.arange(-radius, radius + 1, device=device)).clamp(0, n - 1)
    matrix = torch.zeros(n, n, dtype=torch.float64, device=device)
    matrix.index_put_((rows, columns), kernel.expand(n, -1), accumulate=True)
    return matrix.to(dtype)


def gaussian_blur(volumes: torch.Tensor, sigma_vox) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, X, Y, Z) with per-axis sigma in voxels (3,).

    Taps truncated at 3 sigma; replicate padding keeps the blurred edge of the field of view
    from fading to zero. Each axis is one matrix product (``gaussian_matrix``) when it is short
    enough, else a 1-D convolution; both give the same result to float rounding."""
    out = volumes
    for axis, sigma in enumerate(sigma_vox):
        if sigma <= 0.05:
            continue
        n = out.shape[2 + axis]
        if n <= MATMUL_BLUR_MAX_SIZE:
            matrix = gaussian_matrix(n, sigma, out.dtype, out.device)
            out = torch.movedim(torch.tensordot(out, matrix, dims=([2 + axis], [1])), -1,
                                2 + axis)
        else:
            out = blur_axis_conv(out, axis, sigma)
    return out.contiguous()


def blur_axis_conv(volumes: torch.Tensor, axis: int, sigma: float) -> torch.Tensor:
    """Blur one spatial axis (0, 1, 2) of (B, C, X, Y, Z) by conv3d with replicate padding."""
    kernel = gaussian_kernel(sigma, volumes.dtype, volumes.device)
    radius = (kernel.numel() - 1) // 2
    shape = [1, 1, 1, 1, 1]
    shape[2 + axis] = kernel.numel()
    channels = volumes.shape[1]
    weight = kernel.view(shape).repeat(channels, 1, 1, 1, 1)
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (2 - axis)] = radius
    pad[2 * (2 - axis) + 1] = radius
    return F.conv3d(F.pad(volumes, pad, mode="replicate"), weight, groups=channels)
