"""Band-limited EPDiff geodesic shooting (FLASH / UniMo style), in batched torch.

Representation. An initial velocity v0 is held by its lowest Fourier frequencies: complex
coefficients ``v_hat`` (B, 3, n1, n2, n3), band n = 16 by default, each axis in centred order
(index j is the frequency k = j - n // 2, i.e. k = -n/2 .. n/2 - 1 for even n). The coefficients
are normalised so that the field is v(x) = sum_k v_hat(k) exp(2 pi i k . x / N) on a grid of
N = (N1, N2, N3) voxels (the DFT with 1/N on the forward side): the same coefficients give the
same smooth, periodic field on any grid that covers the same field of view, and ``to_spatial``
zero-pads them to any grid shape. Real fields need Hermitian symmetry, v_hat(-k) = conj v_hat(k);
for an even band the row k = -n/2 has no partner k = +n/2 inside the band, so that row is always
zero (``project_real``: Hermitian projection and the unpaired Nyquist rows dropped). Every field
this module makes from coefficients is therefore exactly real, and ``band_limit`` of a real field
returns projected coefficients.

Units and axes. Velocities and displacements are in mm along the array axes (X, Y, Z) of the grid
(voxel axes scaled by ``spacing``, mm per voxel along each axis; the caller rotates to world).
Volumes are (B, C, X, Y, Z) indexed like the NIfTI array; grid_sample orders its coordinates
(Z, Y, X), which ``_normalised`` handles.

Metric. L = (alpha * lap + gamma)^p with the finite-difference Laplacian symbol
lap(k) = sum_d (2 - 2 cos(2 pi k_d / N_d)) / h_d^2 * h_ref^2, and K = L^-1. lap(k) is about
|2 pi f|^2 h_ref^2 for the physical frequency f (cycles per mm), so with a fixed reference
spacing h_ref (``Metric.reference_spacing``, mm, not the grid's own) a given alpha smooths the
same physical wavelengths on any grid. The regulariser <L v0, v0> = sum_k L(k) |v_hat(k)|^2 is the
spatial mean of v0 . L v0 over the grid (Parseval with this normalisation), in mm^2.

Shooting. EPDiff, dv/dt = -K[(Dv)^T m + div(m (x) v)] with m = L v, is integrated with forward
Euler steps in the band. The products are formed in space on a grid of ``padding`` times the band
along each axis (2 by default) and brought back to the band. A band keeps |k| <= n/2 - 1, so the
products reach |k| <= n - 2 and alias, on a grid of P points, to |k| >= P - n + 2: outside the
band as soon as P >= 3n/2 - 2, so padding 1.5 gives the same band as 2 up to rounding (it is what
``optimise_velocity`` uses; tested). Derivatives use the exact spectral symbol
i 2 pi k / (N h) (mm^-1): the derivative of the band-limited field itself, so it does not depend
on the grid the products are sampled on.

Flow and convention. With phi_t the flow of the velocities, d phi_t / dt = v_t o phi_t, the
deformed image is I o phi_1^-1 (the image is carried along v). ``shoot`` returns the PULL-BACK
displacement u = phi_1^-1 - id on the grid: I_warped(x) = I(x + u(x)), as grid_sample and ITK
displacement fields read it; for a small v0, u ~ -v0. The forward map phi_1 - id (~ +v0, where
the anatomy at x of I lands) comes from ``shoot_maps``. Both are computed on the grid along
trajectories, so that no displacement field is ever resampled (no numerical diffusion): the
discrete flow is phi_1 = (id + dt v_9) o ... o (id + dt v_0); the forward map follows each grid
point forward through these steps, the pull-back follows it backward, inverting each step
id + dt v_k by a fixed-point iteration. The velocity is sampled trilinearly from its values on the
grid, periodically (the band-limited field is periodic over the field of view). ``flow_shape``
integrates the flow on a coarser grid of the same field of view and brings the displacement to
the image grid by Fourier zero padding (used while optimising: a 32^3 flow grid is within about
0.01 mm on average, 0.08 mm at most, of the 48^3 or 64^3 one for 4 mm deformations).

Test-time optimisation (``optimise_velocity``): L-BFGS on the band coefficients, run separately for
each volume of a batch, coarse band first (``Stage``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .resample import gaussian_blur

__all__ = [
    "DEFAULT_BAND",
    "DEFAULT_ITERATIONS",
    "DEFAULT_METRIC",
    "DEFAULT_PADDING",
    "DEFAULT_SIGMA",
    "DEFAULT_STAGES",
    "DEFAULT_STEPS",
    "Metric",
    "Shot",
    "Stage",
    "band_frequencies",
    "band_limit",
    "compose",
    "jacobian_determinant",
    "operator_symbol",
    "optimise_velocity",
    "project_real",
    "random_velocity",
    "regulariser",
    "shoot",
    "shoot_maps",
    "to_spatial",
    "velocity_path",
    "warp",
]

DEFAULT_BAND = 16
DEFAULT_STEPS = 10
# Products are formed on a grid of this many times the band along each axis.
DEFAULT_PADDING = 2.0
DEFAULT_ITERATIONS = 30
# Weight of <L v0, v0> (mm^2) against the masked mean squared error of images scaled to a unit
# median inside the mask. L(0) = gamma^power, so the weight also shrinks smooth, translation-like
# fields: on a smoothed patch of the MNI template, a (3, -2, 4) mm translation came back as
# (2.7, -1.1, 2.9) mm with 1e-5 and (2.9, -1.8, 3.6) mm with 1e-6. With 2 % (5 %) image noise
# and no deformation, 1e-6 fits 0.12 (0.32) mm of spurious deformation on average over the brain,
# 1e-5 0.10 (0.30) mm: the early end of L-BFGS, not sigma, is what mostly holds noise back.
DEFAULT_SIGMA = 1e-6


@dataclass(frozen=True)
class Metric:
    """L = (alpha * lap + gamma)^power, lap measured in units of reference_spacing (mm)."""

    alpha: float = 3.0
    gamma: float = 1.0
    power: float = 3.0
    reference_spacing: float = 3.0


DEFAULT_METRIC = Metric()


# ---------------------------------------------------------------------------------------------
# band <-> space


def _band_tuple(band) -> tuple[int, int, int]:
    return tuple(int(n) for n in band) if hasattr(band, "__len__") else (int(band),) * 3


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def band_frequencies(n: int, device=None) -> torch.Tensor:
    """Integer frequencies of a centred band axis of size n: (n,) = arange(n) - n // 2."""
    return torch.arange(n, device=device) - n // 2


def _negated_index(n: int, device=None) -> torch.Tensor:
    """Index of frequency -k for each centred index of frequency k (the unpaired -n/2 of an even
    band maps onto itself; it is zeroed anyway)."""
    j = torch.arange(n, device=device)
    return (n - j) % n if n % 2 == 0 else n - 1 - j


def _kept(band, device=None) -> torch.Tensor:
    """(n1, n2, n3) bool: False on the unpaired Nyquist rows (index 0 of an even axis)."""
    masks = []
    for n in band:
        keep = torch.ones(n, dtype=torch.bool, device=device)
        if n % 2 == 0:
            keep[0] = False
        masks.append(keep)
    return masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]


def project_real(v_hat: torch.Tensor) -> torch.Tensor:
    """Nearest coefficients of a real field: (c(k) + conj c(-k)) / 2, Nyquist rows zeroed.

    v_hat: (..., n1, n2, n3) complex, centred order. Returns the same shape.
    """
    band = v_hat.shape[-3:]
    device = v_hat.device
    mirrored = v_hat
    for axis, n in zip((-3, -2, -1), band):
        mirrored = mirrored.index_select(axis, _negated_index(n, device))
    return 0.5 * (v_hat + mirrored.conj()) * _kept(band, device)


def _pad_axis(x: torch.Tensor, axis: int, n_out: int) -> torch.Tensor:
    """Centred band axis (size n) -> FFT order of size n_out, zeros between the halves."""
    n = x.shape[axis]
    low = n // 2
    nonneg = x.narrow(axis, low, n - low)
    neg = x.narrow(axis, 0, low)
    shape = list(x.shape)
    shape[axis] = n_out - n
    return torch.cat([nonneg, x.new_zeros(shape), neg], dim=axis)


def _crop_axis(x: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """FFT-order axis -> centred band of size n (the inverse of ``_pad_axis``)."""
    n_in = x.shape[axis]
    low = n // 2
    return torch.cat([x.narrow(axis, n_in - low, low), x.narrow(axis, 0, n - low)], dim=axis)


def _half(v_hat: torch.Tensor) -> torch.Tensor:
    """Full centred band -> its k3 >= 0 half (..., n1, n2, n3 - n3 // 2); the rest is implied."""
    n3 = v_hat.shape[-1]
    return v_hat[..., n3 // 2:]


def _full(half: torch.Tensor, n3: int) -> torch.Tensor:
    """k3 >= 0 half -> full centred band, filling k3 < 0 with conj c(-k)."""
    n1, n2 = half.shape[-3:-1]
    device = half.device
    mirrored = half[..., 1:n3 // 2 + 1].flip(-1)  # -k3 = n3 // 2 .. 1
    mirrored = mirrored.index_select(-3, _negated_index(n1, device))
    mirrored = mirrored.index_select(-2, _negated_index(n2, device)).conj()
    if n3 % 2 == 0:  # k3 = -n3/2 has no partner in the half: the zero Nyquist plane
        mirrored = torch.cat([torch.zeros_like(half[..., :1]), mirrored], dim=-1)
    full = torch.cat([mirrored, half], dim=-1)
    return full * _kept((n1, n2, n3), device)


def _space_from_half(half: torch.Tensor, grid_shape) -> torch.Tensor:
    """Half-band coefficients (..., n1, n2, h3) -> real fields (..., X, Y, Z)."""
    x_size, y_size, z_size = grid_shape
    padded = _pad_axis(half, -3, x_size)
    padded = _pad_axis(padded, -2, y_size)
    shape = list(padded.shape)
    shape[-1] = z_size // 2 + 1 - half.shape[-1]
    padded = torch.cat([padded, padded.new_zeros(shape)], dim=-1)
    return torch.fft.irfftn(padded, s=tuple(grid_shape), dim=(-3, -2, -1), norm="forward")


def _half_from_space(field: torch.Tensor, band) -> torch.Tensor:
    """Real fields (..., X, Y, Z) -> half-band coefficients (..., n1, n2, n3 - n3 // 2), with the
    unpaired Nyquist rows of axes 1 and 2 zeroed."""
    n1, n2, n3 = band
    spectrum = torch.fft.rfftn(field, dim=(-3, -2, -1), norm="forward")
    half = _crop_axis(_crop_axis(spectrum, -3, n1), -2, n2)[..., :n3 - n3 // 2]
    return half * _kept((n1, n2, n3), field.device)[..., n3 // 2:]


def _check_band(band, grid_shape):
    if any(n > size for n, size in zip(band, grid_shape)):
        raise ValueError(f"band {tuple(band)} does not fit the grid {tuple(grid_shape)}")


def band_limit(field: torch.Tensor, band=DEFAULT_BAND) -> torch.Tensor:
    """Lowest Fourier coefficients of real fields on their own grid.

    field: (B, C, X, Y, Z) real (any leading dims); band: int or (n1, n2, n3), each <= the grid.
    Returns (B, C, n1, n2, n3) complex, centred, projected (``project_real``).
    """
    band = _band_tuple(band)
    _check_band(band, field.shape[-3:])
    return _full(_half_from_space(field, band), band[2])


def to_spatial(v_hat: torch.Tensor, grid_shape) -> torch.Tensor:
    """Real fields on a grid of shape (X, Y, Z) from band coefficients (zero padding).

    v_hat: (B, C, n1, n2, n3) complex. Returns (B, C, X, Y, Z) in the matching real dtype: the
    field of ``project_real(v_hat)`` (non-Hermitian parts and Nyquist rows do not show).
    """
    _check_band(v_hat.shape[-3:], grid_shape)
    return _space_from_half(_half(project_real(v_hat)), grid_shape)


# ---------------------------------------------------------------------------------------------
# operators


def _frequency_grids(band, grid_shape, dtype, device):
    """Per-axis integer frequencies as floats over the band, broadcastable to (n1, n2, n3)."""
    grids = []
    for axis, n in enumerate(band):
        shape = [1, 1, 1]
        shape[axis] = n
        grids.append(band_frequencies(n, device).to(dtype).view(shape))
    return grids


def operator_symbol(band, grid_shape, spacing, metric: Metric = DEFAULT_METRIC,
                    dtype=torch.float32, device=None) -> torch.Tensor:
    """L(k) on the centred band: (n1, n2, n3) real, >= gamma^power > 0; K = 1 / L."""
    band = _band_tuple(band)
    lap = 0.0
    for k, size, h in zip(_frequency_grids(band, grid_shape, torch.float64, device),
                          grid_shape, spacing):
        lap = lap + (2.0 - 2.0 * torch.cos(2.0 * math.pi * k / size)) / float(h) ** 2
    lap = lap * metric.reference_spacing ** 2
    return ((metric.alpha * lap + metric.gamma) ** metric.power).to(dtype)


def _derivative_symbols(band, grid_shape, spacing, dtype, device) -> torch.Tensor:
    """Exact spectral derivative factors 2 pi k_d / (N_d h_d) (mm^-1): (3, n1, n2, n3) real
    (the derivative along axis d multiplies by i times entry d)."""
    grids = _frequency_grids(band, grid_shape, torch.float64, device)
    omega = [2.0 * math.pi * k / (size * float(h))
             for k, size, h in zip(grids, grid_shape, spacing)]
    return torch.stack(torch.broadcast_tensors(*omega)).to(dtype)


def regulariser(v0_hat: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
    """<L v0, v0> per batch item: (B,) real, mm^2 (spatial mean of v0 . L v0).

    v0_hat: (B, 3, n1, n2, n3); operator: L symbol (n1, n2, n3) from ``operator_symbol``.
    The field of ``project_real(v0_hat)`` is measured, as in ``shoot``.
    """
    v = project_real(v0_hat)
    return (operator * (v.real ** 2 + v.imag ** 2)).flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# shooting


def _padded_shape(band, padding: float):
    return tuple(max(n, int(math.ceil(padding * n))) for n in band)


def _epdiff_rate(v_half, l_half, k_half, omega_half, padded_shape, band):
    """dv/dt = -K[(Dv)^T m + div(m (x) v)] on half-band coefficients (B, 3, n1, n2, h3)."""
    m_half = l_half * v_half
    # [b, i, j] = d_i v_j: derivative axis i, component j
    dv_half = 1j * omega_half[None, :, None] * v_half[:, None]
    fields = _space_from_half(torch.cat([v_half, m_half, dv_half.flatten(1, 2)], dim=1),
                              padded_shape)
    v, m, dv = fields[:, :3], fields[:, 3:6], fields[:, 6:].unflatten(1, (3, 3))
    transport = (dv * m[:, None]).sum(2)  # (Dv)^T m: sum_j d_i v_j m_j
    momentum_flux = m[:, :, None] * v[:, None]  # [b, i, j] = m_i v_j
    spectra = _half_from_space(torch.cat([transport, momentum_flux.flatten(1, 2)], dim=1), band)
    flux_hat = spectra[:, 3:].unflatten(1, (3, 3))
    divergence = (1j * omega_half[None, None] * flux_hat).sum(2)  # sum_j d_j (m_i v_j)
    return -k_half * (spectra[:, :3] + divergence)


def velocity_path(v0_hat: torch.Tensor, grid_shape, spacing, metric: Metric = DEFAULT_METRIC,
                  steps: int = DEFAULT_STEPS,
                  padding: float = DEFAULT_PADDING) -> list[torch.Tensor]:
    """Half-band velocities v_0 .. v_steps (forward Euler, dt = 1 / steps) of the geodesic.

    v0_hat: (B, 3, n1, n2, n3) complex (projected first). Returns steps + 1 tensors
    (B, 3, n1, n2, n3 - n3 // 2), the k3 >= 0 halves (``_full`` restores a full band).
    """
    band = tuple(v0_hat.shape[-3:])
    _check_band(band, grid_shape)
    real = _real_dtype(v0_hat.dtype)
    device = v0_hat.device
    l_half = _half(operator_symbol(band, grid_shape, spacing, metric, real, device))
    k_half = 1.0 / l_half
    omega_half = _half(_derivative_symbols(band, grid_shape, spacing, real, device))
    padded_shape = _padded_shape(band, padding)
    dt = 1.0 / steps
    path = [_half(project_real(v0_hat))]
    for _ in range(steps):
        v = path[-1]
        path.append(v + dt * _epdiff_rate(v, l_half, k_half, omega_half, padded_shape, band))
    return path


def _identity_points(grid_shape, dtype, device) -> torch.Tensor:
    """Voxel indices (X, Y, Z, 3)."""
    axes = [torch.arange(n, dtype=dtype, device=device) for n in grid_shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _sample_periodic(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of periodic fields (B, C, X, Y, Z) at voxel points (B, ..., 3),
    wrapped into the period: returns (B, C, ...)."""
    shape = field.shape[2:]
    # One wrapped slice at the end lets trilinear interpolation cross the period seam.
    wrapped = F.pad(field, (0, 1, 0, 1, 0, 1), mode="circular")
    sizes = torch.tensor(shape, dtype=points.dtype, device=points.device)
    normalised = (2.0 * torch.remainder(points, sizes) / sizes - 1.0).flip(-1)
    grid = normalised.reshape(points.shape[0], -1, 1, 1, 3)
    values = F.grid_sample(wrapped, grid.to(field.dtype), mode="bilinear",
                           padding_mode="border", align_corners=True)
    return values.view(*field.shape[:2], *points.shape[1:-1])


def _grid_velocities(path, grid_shape, spacing, steps):
    """Velocities v_0 .. v_{steps-1} on the grid, in voxels per unit time: (B, 3, X, Y, Z) each."""
    dtype = _real_dtype(path[0].dtype)
    scale = 1.0 / torch.tensor([float(h) for h in spacing], dtype=dtype, device=path[0].device)
    return [_space_from_half(v, grid_shape) * scale.view(1, 3, 1, 1, 1) for v in path[:steps]]


def _pullback(velocities, dt: float, inverse_iterations: int) -> torch.Tensor:
    """Trajectories backward through the steps: phi_1^-1 on the grid, voxel points (B, X, Y, Z, 3).

    Each step x -> x + dt v_k(x) is inverted by y = x - dt v_k(y), started from y = x - dt v_k(x).
    """
    last = velocities[-1]
    points = _identity_points(last.shape[2:], last.dtype, last.device)
    # The last step starts on the grid points themselves: no interpolation needed.
    target = points - dt * last.movedim(1, -1)
    for _ in range(inverse_iterations):
        target = points - dt * _sample_periodic(last, target).movedim(1, -1)
    for velocity in velocities[-2::-1]:
        moved = target - dt * _sample_periodic(velocity, target).movedim(1, -1)
        for _ in range(inverse_iterations):
            moved = target - dt * _sample_periodic(velocity, moved).movedim(1, -1)
        target = moved
    return target


def _forward(velocities, dt: float) -> torch.Tensor:
    """Trajectories forward through the steps: phi_1 on the grid, voxel points (B, X, Y, Z, 3)."""
    first = velocities[0]
    points = _identity_points(first.shape[2:], first.dtype, first.device)
    position = points + dt * first.movedim(1, -1)
    for velocity in velocities[1:]:
        position = position + dt * _sample_periodic(velocity, position).movedim(1, -1)
    return position


def _displacement_mm(points: torch.Tensor, spacing) -> torch.Tensor:
    """Voxel points (B, X, Y, Z, 3) -> displacement (B, 3, X, Y, Z) in mm."""
    identity = _identity_points(points.shape[1:4], points.dtype, points.device)
    scale = torch.tensor([float(h) for h in spacing], dtype=points.dtype, device=points.device)
    return ((points - identity) * scale).movedim(-1, 1).contiguous()


def _flow_grid(grid_shape, spacing, flow_shape):
    """Shape and spacing (mm) of the grid the flow is integrated on: the same periodic field of
    view as the image grid, with at most as many points."""
    if flow_shape is None:
        return tuple(grid_shape), tuple(float(h) for h in spacing)
    shape = tuple(min(int(q), int(n)) for q, n in zip(flow_shape, grid_shape))
    return shape, tuple(float(h) * n / q for h, n, q in zip(spacing, grid_shape, shape))


def _resample_periodic(field: torch.Tensor, grid_shape) -> torch.Tensor:
    """Periodic real fields (B, C, Q1, Q2, Q3) on a finer grid (B, C, X, Y, Z) by Fourier zero
    padding (the unpaired Nyquist rows of the coarse grid are dropped)."""
    shape = tuple(field.shape[2:])
    if shape == tuple(grid_shape):
        return field
    return _space_from_half(_half_from_space(field, shape), grid_shape)


def _flow_maps(path, grid_shape, spacing, steps, inverse_iterations, flow_shape, forward):
    """(pull-back, forward or None) displacements (B, 3, X, Y, Z) mm from a velocity path."""
    shape, flow_spacing = _flow_grid(grid_shape, spacing, flow_shape)
    velocities = _grid_velocities(path, shape, flow_spacing, steps)
    dt = 1.0 / steps
    pullback = _displacement_mm(_pullback(velocities, dt, inverse_iterations), flow_spacing)
    pullback = _resample_periodic(pullback, grid_shape)
    if not forward:
        return pullback, None
    ahead = _displacement_mm(_forward(velocities, dt), flow_spacing)
    return pullback, _resample_periodic(ahead, grid_shape)


def shoot(v0_hat: torch.Tensor, grid_shape, spacing, metric: Metric = DEFAULT_METRIC,
          steps: int = DEFAULT_STEPS, padding: float = DEFAULT_PADDING,
          inverse_iterations: int = 2, flow_shape=None) -> torch.Tensor:
    """Pull-back displacement u = phi_1^-1 - id of the geodesic from v0: (B, 3, X, Y, Z) mm.

    v0_hat: (B, 3, n1, n2, n3) complex band; grid_shape (X, Y, Z); spacing (3,) mm per voxel.
    I_warped(x) = I(x + u(x)) (``warp``). Differentiable in v0_hat.
    inverse_iterations: fixed-point refinements when inverting each Euler step (0 gives the
        first-order inverse id - dt v_k: one trilinear sample per step instead of
        1 + inverse_iterations).
    flow_shape: integrate the flow on this coarser grid (same field of view) and bring the
        displacement to grid_shape by Fourier zero padding; None integrates on grid_shape.
    """
    grid_shape = tuple(int(n) for n in grid_shape)
    path = velocity_path(v0_hat, grid_shape, spacing, metric, steps, padding)
    return _flow_maps(path, grid_shape, spacing, steps, inverse_iterations, flow_shape, False)[0]


@dataclass
class Shot:
    """pullback: (B, 3, X, Y, Z) mm, phi_1^-1 - id (``shoot``); forward: phi_1 - id, mm;
    v1_hat: (B, 3, n1, n2, n3) the velocity at t = 1 (shooting -v1_hat gives back phi_1^-1)."""

    pullback: torch.Tensor
    forward: torch.Tensor
    v1_hat: torch.Tensor


def shoot_maps(v0_hat: torch.Tensor, grid_shape, spacing, metric: Metric = DEFAULT_METRIC,
               steps: int = DEFAULT_STEPS, padding: float = DEFAULT_PADDING,
               inverse_iterations: int = 2, flow_shape=None) -> Shot:
    """``shoot`` plus the forward map and the final velocity (one more sample per step)."""
    grid_shape = tuple(int(n) for n in grid_shape)
    path = velocity_path(v0_hat, grid_shape, spacing, metric, steps, padding)
    pullback, forward = _flow_maps(path, grid_shape, spacing, steps, inverse_iterations,
                                   flow_shape, True)
    return Shot(pullback=pullback, forward=forward, v1_hat=_full(path[-1], v0_hat.shape[-1]))


# ---------------------------------------------------------------------------------------------
# fields and images


def _normalised(points: torch.Tensor, grid_shape) -> torch.Tensor:
    """Voxel points (..., 3) -> grid_sample coordinates (..., 3) in (Z, Y, X) order."""
    sizes = torch.tensor([max(n - 1, 1) for n in grid_shape], dtype=points.dtype,
                         device=points.device)
    return (2.0 * points / sizes - 1.0).flip(-1)


def _sample_points(displacement: torch.Tensor, spacing) -> torch.Tensor:
    """Voxel points x + u(x) / h as grid_sample coordinates (B, X, Y, Z, 3)."""
    grid_shape = displacement.shape[2:]
    scale = torch.tensor([float(h) for h in spacing], dtype=displacement.dtype,
                         device=displacement.device)
    points = _identity_points(grid_shape, displacement.dtype, displacement.device)
    return _normalised(points + displacement.movedim(1, -1) / scale, grid_shape)


def warp(images: torch.Tensor, displacement: torch.Tensor, spacing,
         mode: str = "bilinear") -> torch.Tensor:
    """Pull-back warp I_warped(x) = I(x + u(x)), trilinear, border padding.

    images: (B, C, X, Y, Z) or (1, C, X, Y, Z); displacement: (B, 3, X, Y, Z) mm.
    Returns (B, C, X, Y, Z).
    """
    batch = displacement.shape[0]
    if images.shape[0] != batch:
        images = images.expand(batch, *images.shape[1:])
    grid = _sample_points(displacement, spacing).to(images.dtype)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=True)


def compose(outer: torch.Tensor, inner: torch.Tensor, spacing,
            periodic: bool = False) -> torch.Tensor:
    """Displacement of the map x -> (x + inner(x)) + outer(x + inner(x)): (B, 3, X, Y, Z) mm.

    With pull-back fields, warp(warp(I, outer), inner) ~ warp(I, compose(outer, inner)).
    periodic: sample ``outer`` as a periodic field (as shooting's fields are) rather than with
    border padding.
    """
    if periodic:
        scale = torch.tensor([float(h) for h in spacing], dtype=inner.dtype, device=inner.device)
        points = _identity_points(inner.shape[2:], inner.dtype, inner.device)
        return inner + _sample_periodic(outer, points + inner.movedim(1, -1) / scale)
    return inner + warp(outer, inner, spacing)


def jacobian_determinant(displacement: torch.Tensor, spacing) -> torch.Tensor:
    """det(I + Du) of x -> x + u(x) by central differences: (B, X - 2, Y - 2, Z - 2).

    displacement: (B, 3, X, Y, Z) mm; spacing (3,) mm. Interior voxels only (no one-sided edge).
    """
    u = displacement
    grads = []
    for axis, h in enumerate(spacing):
        dim = 2 + axis
        size = u.shape[dim]
        ahead = u.narrow(dim, 2, size - 2)
        behind = u.narrow(dim, 0, size - 2)
        diff = (ahead - behind) / (2.0 * float(h))
        crop = [slice(None), slice(None)] + [slice(1, -1)] * 3
        crop[dim] = slice(None)
        grads.append(diff[tuple(crop)])
    # jac[b, i, j] = delta_ij + d u_i / d x_j
    jac = torch.stack(grads, dim=2)
    eye = torch.eye(3, dtype=u.dtype, device=u.device).view(1, 3, 3, 1, 1, 1)
    jac = jac + eye
    return (jac[:, 0, 0] * (jac[:, 1, 1] * jac[:, 2, 2] - jac[:, 1, 2] * jac[:, 2, 1])
            - jac[:, 0, 1] * (jac[:, 1, 0] * jac[:, 2, 2] - jac[:, 1, 2] * jac[:, 2, 0])
            + jac[:, 0, 2] * (jac[:, 1, 0] * jac[:, 2, 1] - jac[:, 1, 1] * jac[:, 2, 0]))


# ---------------------------------------------------------------------------------------------
# random deformations


def random_velocity(batch: int, grid_shape, spacing, max_displacement_mm: float,
                    generator: torch.Generator | None = None, band=DEFAULT_BAND,
                    metric: Metric = DEFAULT_METRIC, smoothness: float = 2.0,
                    dtype=torch.float32, device=None) -> torch.Tensor:
    """Random smooth initial velocities whose geodesics move some voxel by ~max_displacement_mm.

    Coefficients are complex Gaussian noise times K(k)^smoothness (K = 1 / L of ``metric``), so
    that the deformation is as smooth as the metric at least. Each item is scaled in two passes:
    first linearly, so that max |v0| = max_displacement_mm (u ~ -v0 for small fields), then once
    more by max_displacement_mm / max |u| measured by shooting; the result is within a few
    percent of the target for deformations of a few mm (the map v0 -> u is nearly linear there).
    The noise is drawn in float64 (on ``generator``'s device, else ``device``) and then cast, so
    that a seed gives the same field in float32 and float64.
    Returns (B, 3, n1, n2, n3) complex.
    """
    band = _band_tuple(band)
    grid_shape = tuple(int(n) for n in grid_shape)
    _check_band(band, grid_shape)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn((batch, 3, *band), dtype=torch.complex128, generator=generator,
                        device=device)
    noise = noise.to(_complex_dtype(dtype))
    kernel = 1.0 / operator_symbol(band, grid_shape, spacing, metric, dtype, device)
    v0 = project_real(noise * kernel ** smoothness)
    largest = to_spatial(v0, grid_shape).norm(dim=1).flatten(1).amax(1)
    v0 = v0 * (max_displacement_mm / largest.clamp_min(1e-12)).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        reached = shoot(v0, grid_shape, spacing, metric).norm(dim=1).flatten(1).amax(1)
    return v0 * (max_displacement_mm / reached.clamp_min(1e-12)).view(-1, 1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# test-time optimisation


def _embed_band(v_hat: torch.Tensor, band) -> torch.Tensor:
    """Centred coefficients zero-padded (or cropped) to another band size (n1, n2, n3)."""
    out = project_real(v_hat)
    for axis, n in zip((-3, -2, -1), band):
        size = out.shape[axis]
        if n > size:
            before = n // 2 - size // 2
            pad = [0, 0] * 3
            pad[2 * (-1 - axis)] = before
            pad[2 * (-1 - axis) + 1] = n - size - before
            out = F.pad(out, pad)
        elif n < size:
            out = out.narrow(axis, size // 2 - n // 2, n)
    return project_real(out)


def _masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over voxels of (B, C, X, Y, Z) values: (B,)."""
    return (values * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-12)


def _image_loss(warped, fixed, weight, kind: str) -> torch.Tensor:
    """(B,) mean squared error, or 1 - correlation, inside the weights."""
    if kind == "mse":
        return _masked_mean((warped - fixed) ** 2, weight)
    a = warped - _masked_mean(warped, weight).view(-1, 1, 1, 1, 1)
    b = fixed - _masked_mean(fixed, weight).view(-1, 1, 1, 1, 1)
    ncc = _masked_mean(a * b, weight) / (_masked_mean(a * a, weight)
                                          * _masked_mean(b * b, weight)).sqrt().clamp_min(1e-12)
    return 1.0 - ncc


@dataclass(frozen=True)
class Stage:
    """One stage of ``optimise_velocity``.

    share: its part of the iterations; blur_vox: Gaussian blur of both images (sigma, voxels);
    band: the band optimised (capped by the requested band); flow_size: the flow is integrated on
    a grid of at most this many points per axis (``shoot``'s flow_shape). A coarse band first
    captures the large, smooth part of the deformation at a fraction of the cost.
    """

    share: float
    blur_vox: float
    band: int
    flow_size: int


# Measured on the MNI template (64^3 x 3 mm, 4 mm deformations): three stages with 30 evaluations
# recover as well as two (bands 8, 16) with 40, in 60 % of the time.
DEFAULT_STAGES = (Stage(0.4, 1.0, 8, 16), Stage(0.3, 1.0, 12, 24),
                  Stage(0.3, 1.0, DEFAULT_BAND, 2 * DEFAULT_BAND))
# Exactly alias-free for the quadratic terms (see the module note); used while optimising.
OPTIMISE_PADDING = 1.5


def _batched_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1)


class _BatchedLBFGS:
    """L-BFGS with an Armijo backtracking line search, run independently for every row of a
    (B, D) problem: each row has its own history, step length and acceptance, so that the
    volumes of a batch do not influence each other. Each round evaluates ``trial()`` once and
    passes the result to ``update``: rows that pass the Armijo test move on along a new
    quasi-Newton direction with a unit step, the others retry with a quarter of the step."""

    def __init__(self, x, value, gradient, first_scale, history: int = 8):
        self.x, self.value, self.gradient = x, value, gradient
        self.history = history
        self.pairs = []  # (s, y, 1 / s.y) with zero rows where a row stored nothing
        self.gamma = first_scale  # (B,) initial inverse Hessian scale
        self.direction = -self.gamma[:, None] * gradient
        self.alpha = torch.ones_like(value)

    def trial(self) -> torch.Tensor:
        return self.x + self.alpha[:, None] * self.direction

    def _two_loop(self, gradient):
        q = -gradient
        coefficients = []
        for s, y, rho in reversed(self.pairs):
            a = rho * _batched_dot(s, q)
            coefficients.append(a)
            q = q - a[:, None] * y
        q = q * self.gamma[:, None]
        for (s, y, rho), a in zip(self.pairs, reversed(coefficients)):
            b = rho * _batched_dot(y, q)
            q = q + (a - b)[:, None] * s
        return q

    def update(self, x_trial, value, gradient):
        """Accept or reject the trial of every row; returns the accepted mask (B,)."""
        slope = _batched_dot(self.gradient, self.direction)
        accepted = torch.isfinite(value) & (
            value <= self.value + 1e-4 * self.alpha * slope)
        s = x_trial - self.x
        y = gradient - self.gradient
        sy = _batched_dot(s, y)
        good = accepted & (sy > 1e-10 * _batched_dot(s, s).sqrt() * _batched_dot(y, y).sqrt())
        if bool(good.any()):
            keep = good[:, None]
            zero = torch.zeros_like(s)
            rho = torch.where(good, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
            self.pairs.append((torch.where(keep, s, zero), torch.where(keep, y, zero), rho))
            self.pairs = self.pairs[-self.history:]
            self.gamma = torch.where(
                good, sy / _batched_dot(y, y).clamp_min(1e-30), self.gamma)
        rows = accepted[:, None]
        self.x = torch.where(rows, x_trial, self.x)
        self.value = torch.where(accepted, value, self.value)
        self.gradient = torch.where(rows, gradient, self.gradient)
        direction = self._two_loop(self.gradient)
        # A row whose direction is not a descent direction restarts from the scaled gradient.
        descent = _batched_dot(direction, self.gradient) < 0
        direction = torch.where(descent[:, None], direction,
                                -self.gamma[:, None] * self.gradient)
        self.direction = torch.where(rows, direction, self.direction)
        self.alpha = torch.where(accepted, torch.ones_like(self.alpha), 0.25 * self.alpha)
        return accepted


def optimise_velocity(moving: torch.Tensor, fixed: torch.Tensor, spacing, mask=None, init=None,
                      iterations: int = DEFAULT_ITERATIONS, sigma: float = DEFAULT_SIGMA,
                      band=DEFAULT_BAND, metric: Metric = DEFAULT_METRIC,
                      steps: int = DEFAULT_STEPS, loss: str = "mse",
                      stages=DEFAULT_STAGES, first_step_mm: float = 0.5,
                      max_step_mm: float = 2.0, precondition: float = 1.0) -> torch.Tensor:
    """Initial velocities whose geodesics warp each moving volume onto the fixed image.

    moving: (B, 1, X, Y, Z); fixed: (B, 1, X, Y, Z) or (1, 1, X, Y, Z); spacing (3,) mm.
    mask: bool or weights, (B or 1, 1, X, Y, Z), on the fixed grid; None weighs all voxels.
    init: (B, 3, n1, n2, n3) starting coefficients, None for zero.
    Minimises, for each volume independently, loss(warp(moving, shoot(v0)), fixed)
    + sigma * <L v0, v0>, with loss the masked mean squared error ("mse", for images on a
    common intensity scale) or 1 - correlation ("ncc"), by L-BFGS run separately per volume
    (``_BatchedLBFGS``) in the variables w of v0 = K^precondition w (a Sobolev-type
    preconditioning: the first steps are smooth fields). ``iterations`` counts function
    evaluations, split over ``stages`` (coarse to fine; the last should use the full band).
    first_step_mm: size (max over the grid) of the first, gradient step; max_step_mm: no step
    moves the velocity field by more than this anywhere.
    While optimising, the flow runs on a grid of at most ``Stage.flow_size`` points per axis
    with first-order step inverses, and products on a 1.5x padded grid: within a few hundredths
    of a mm of ``shoot`` for deformations of a few mm.
    Returns (B, 3, n1, n2, n3) complex, detached, projected.
    """
    if loss not in ("mse", "ncc"):
        raise ValueError(f"loss must be 'mse' or 'ncc', not {loss!r}")
    band = _band_tuple(band)
    grid_shape = tuple(int(n) for n in moving.shape[2:])
    _check_band(band, grid_shape)
    dtype, device = moving.dtype, moving.device
    batch = moving.shape[0]
    weight = torch.ones_like(fixed[:1]) if mask is None else mask.to(dtype)
    v0 = (torch.zeros((batch, 3, *band), dtype=_complex_dtype(dtype), device=device)
          if init is None else project_real(init.detach().to(_complex_dtype(dtype))))

    total_share = sum(stage.share for stage in stages)
    done = 0
    for index, stage in enumerate(stages):
        count = (iterations - done if index == len(stages) - 1
                 else int(round(iterations * stage.share / total_share)))
        done += count
        if count <= 0:
            continue
        stage_band = tuple(min(int(stage.band), n) for n in band)
        flow_shape = tuple(min(int(stage.flow_size), n) for n in grid_shape)
        sigmas = [stage.blur_vox] * 3
        moving_s = gaussian_blur(moving, sigmas) if stage.blur_vox > 0 else moving
        fixed_s = gaussian_blur(fixed, sigmas) if stage.blur_vox > 0 else fixed
        operator = operator_symbol(stage_band, grid_shape, spacing, metric, dtype, device)
        scale = operator ** -precondition
        shape = (batch, 3, *stage_band, 2)

        def velocity(x):
            return project_real(torch.view_as_complex(x.view(shape))) * scale

        def step_size(x):
            """Largest |v| over a grid resolving the band, (B,): the size of a step x."""
            return to_spatial(velocity(x), flow_shape).norm(dim=1).flatten(1).amax(1)

        def evaluate(x):
            x = x.detach().requires_grad_(True)
            v = velocity(x)
            path = velocity_path(v, grid_shape, spacing, metric, steps, OPTIMISE_PADDING)
            displacement = _flow_maps(path, grid_shape, spacing, steps, 0, flow_shape, False)[0]
            warped = warp(moving_s, displacement, spacing)
            value = _image_loss(warped, fixed_s, weight, loss) + sigma * regulariser(v, operator)
            (gradient,) = torch.autograd.grad(value.sum(), x)
            return value.detach(), gradient

        start = torch.view_as_real((_embed_band(v0, stage_band) / scale).contiguous())
        x = start.reshape(batch, -1).clone()
        value, gradient = evaluate(x)
        with torch.no_grad():
            first_scale = first_step_mm / step_size(gradient).clamp_min(1e-30)
        optimiser = _BatchedLBFGS(x, value, gradient, first_scale)
        for _ in range(count - 1):
            with torch.no_grad():
                # Bound each step so that one bad curvature estimate cannot fold the field.
                size = step_size(optimiser.alpha[:, None] * optimiser.direction)
                optimiser.alpha = optimiser.alpha * (max_step_mm / size.clamp_min(1e-30)
                                                     ).clamp(max=1.0)
                trial = optimiser.trial()
            value, gradient = evaluate(trial)
            with torch.no_grad():
                optimiser.update(trial, value, gradient)
        with torch.no_grad():
            v0 = velocity(optimiser.x)
    return _embed_band(v0, band).detach()
