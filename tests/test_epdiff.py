"""Band-limited EPDiff shooting (unimo.epdiff): Fourier band, shooting, flow conventions, random
deformations, and the recovery of a known deformation of nilearn's MNI152 template.

Measured numbers are printed (run with -s to see them)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unimo_bids.unimo import epdiff
from unimo_bids.unimo.resample import gaussian_blur

ANISO_SHAPE = (40, 32, 24)
ANISO_SPACING = (2.0, 2.5, 3.5)


def max_norm(field: torch.Tensor) -> float:
    """Largest vector length of (B, 3, X, Y, Z)."""
    return float(field.norm(dim=1).max())


def random_coefficients(shape, generator, dtype=torch.complex128) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=generator)


# ---------------------------------------------------------------------------------------------
# band <-> space


def test_to_spatial_matches_the_explicit_fourier_sum():
    """v(x) = sum_k c_k exp(2 pi i k . x / N) with centred k = j - n // 2, checked at a few voxels
    by the explicit sum over the band (after the projection to real fields)."""
    gen = torch.Generator().manual_seed(0)
    band, grid = (6, 5, 4), (12, 10, 9)
    coefficients = epdiff.project_real(random_coefficients((1, 3, *band), gen))
    field = epdiff.to_spatial(coefficients, grid)
    k = torch.stack(torch.meshgrid(*[epdiff.band_frequencies(n).double() for n in band],
                                   indexing="ij"), dim=-1)  # (n1, n2, n3, 3)
    sizes = torch.tensor(grid, dtype=torch.float64)
    for voxel in [(0, 0, 0), (3, 7, 2), (11, 9, 8), (5, 0, 6)]:
        x = torch.tensor(voxel, dtype=torch.float64)
        phase = torch.exp(2j * math.pi * (k * x / sizes).sum(-1))
        expected = (coefficients[0] * phase).sum(dim=(-3, -2, -1))
        assert expected.imag.abs().max() < 1e-12
        assert torch.allclose(field[0, :, voxel[0], voxel[1], voxel[2]], expected.real,
                              atol=1e-12)


def test_band_round_trip_and_real_fields():
    gen = torch.Generator().manual_seed(1)
    for band, grid in [((16, 16, 16), (40, 32, 24)), ((7, 8, 5), (9, 8, 11))]:
        raw = random_coefficients((2, 3, *band), gen)
        coefficients = epdiff.project_real(raw)
        # Hermitian, unpaired Nyquist rows zero, projection idempotent.
        assert torch.allclose(epdiff.project_real(coefficients), coefficients, atol=1e-15)
        mirrored = coefficients
        for axis, n in zip((-3, -2, -1), band):
            index = (n - torch.arange(n)) % n if n % 2 == 0 else n - 1 - torch.arange(n)
            mirrored = mirrored.index_select(axis, index)
        assert torch.allclose(mirrored.conj(), coefficients, atol=1e-15)
        if band[0] % 2 == 0:
            assert coefficients[:, :, 0].abs().max() == 0

        field = epdiff.to_spatial(coefficients, grid)
        assert field.dtype == torch.float64 and field.shape == (2, 3, *grid)
        # The complex inverse DFT of the zero-padded band has no imaginary part.
        padded = torch.zeros(2, 3, *grid, dtype=torch.complex128)
        index = [(epdiff.band_frequencies(n) % size) for n, size in zip(band, grid)]
        padded[:, :, index[0][:, None, None], index[1][None, :, None],
               index[2][None, None, :]] = coefficients
        complex_field = torch.fft.ifftn(padded, dim=(-3, -2, -1), norm="forward")
        assert complex_field.imag.abs().max() < 1e-13 * complex_field.real.abs().max()
        assert torch.allclose(complex_field.real, field, atol=1e-13)

        back = epdiff.band_limit(field, band)
        error = float((back - coefficients).abs().max())
        print(f"band {band} on {grid}: round-trip max |c' - c| = {error:.1e}")
        assert error < 1e-13
        # Only the real field of a non-Hermitian input shows in space.
        assert torch.allclose(epdiff.to_spatial(raw, grid), field, atol=1e-13)


def test_band_limit_of_a_cosine():
    grid = (20, 18, 16)
    x = torch.arange(grid[0], dtype=torch.float64).view(-1, 1, 1).expand(grid)
    field = torch.zeros(1, 3, *grid, dtype=torch.float64)
    field[0, 1] = 2.0 * torch.cos(2 * math.pi * 3 * x / grid[0])  # Y component varies along X
    coefficients = epdiff.band_limit(field, 8)
    expected = torch.zeros_like(coefficients)
    expected[0, 1, 4 + 3, 4, 4] = 1.0
    expected[0, 1, 4 - 3, 4, 4] = 1.0
    assert torch.allclose(coefficients, expected, atol=1e-14)


def test_regulariser_is_the_spatial_mean_of_v_dot_lv():
    gen = torch.Generator().manual_seed(2)
    band = (8, 8, 8)
    v0 = epdiff.project_real(random_coefficients((2, 3, *band), gen))
    operator = epdiff.operator_symbol(band, ANISO_SHAPE, ANISO_SPACING, dtype=torch.float64)
    assert operator.min() >= 1.0  # gamma^power
    value = epdiff.regulariser(v0, operator)
    v = epdiff.to_spatial(v0, ANISO_SHAPE)
    lv = epdiff.to_spatial(operator * v0, ANISO_SHAPE)
    spatial = (v * lv).sum(1).flatten(1).mean(1)
    assert value.shape == (2,)
    assert torch.allclose(value, spatial, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# shooting


def test_zero_velocity_gives_the_identity():
    v0 = torch.zeros(2, 3, 16, 16, 16, dtype=torch.complex64)
    shot = epdiff.shoot_maps(v0, ANISO_SHAPE, ANISO_SPACING)
    assert shot.pullback.shape == (2, 3, *ANISO_SHAPE)
    assert shot.pullback.abs().max() <= 1e-6 and shot.forward.abs().max() <= 1e-6
    assert shot.v1_hat.abs().max() == 0


def test_constant_velocity_is_a_translation_along_the_array_axes():
    """k = 0 only: Dv = 0, so v stays constant and psi_1 is the translation by v0, in mm along the
    array axes of an anisotropic grid; pull-back u = -v0, and warp reads I(x + u(x))."""
    shift_vox = torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64)
    shift_mm = shift_vox * torch.tensor(ANISO_SPACING, dtype=torch.float64)
    v0 = torch.zeros(1, 3, 16, 16, 16, dtype=torch.complex128)
    v0[0, :, 8, 8, 8] = shift_mm
    shot = epdiff.shoot_maps(v0, ANISO_SHAPE, ANISO_SPACING)
    expected = -shift_mm.view(1, 3, 1, 1, 1).expand_as(shot.pullback)
    assert torch.allclose(shot.pullback, expected, atol=1e-10)
    assert torch.allclose(shot.forward, -expected, atol=1e-10)

    gen = torch.Generator().manual_seed(3)
    image = torch.rand(1, 1, *ANISO_SHAPE, dtype=torch.float64, generator=gen)
    warped = epdiff.warp(image, shot.pullback, ANISO_SPACING)
    # warped(x) = image(x - shift): the image moves by +shift voxels along (X, Y, Z).
    rolled = torch.roll(image, shifts=(2, -1, 1), dims=(2, 3, 4))
    assert torch.allclose(warped[..., 2:-1, 1:-1, 1:-1], rolled[..., 2:-1, 1:-1, 1:-1],
                          atol=1e-10)
    assert torch.allclose(epdiff.jacobian_determinant(shot.pullback, ANISO_SPACING),
                          torch.ones(1, 38, 30, 22, dtype=torch.float64), atol=1e-12)


def test_small_velocity_linearisation():
    """For a tiny v0, psi_1 ~ id + v0: the pull-back u ~ -v0 and the forward map ~ +v0."""
    gen = torch.Generator().manual_seed(4)
    v0 = epdiff.random_velocity(2, ANISO_SHAPE, ANISO_SPACING, 1.0, gen, dtype=torch.float64)
    v0 = v0 * 1e-3  # max |v0| ~ 1 micrometre
    velocity = epdiff.to_spatial(v0, ANISO_SHAPE)
    shot = epdiff.shoot_maps(v0, ANISO_SHAPE, ANISO_SPACING)
    scale = max_norm(velocity)
    pull = max_norm(shot.pullback + velocity) / scale
    ahead = max_norm(shot.forward - velocity) / scale
    print(f"linearisation, max|v0| = {scale:.2e} mm: max|u + v0| / max|v0| = {pull:.1e}, "
          f"forward {ahead:.1e}")
    assert pull < 1e-3 and ahead < 1e-3


def test_padding_of_one_and_a_half_bands_gives_the_same_path():
    """Products of the band reach |k| <= n - 2; on 1.5 n points their aliases miss the band."""
    gen = torch.Generator().manual_seed(5)
    # Unsmoothed coefficients: much energy near the band edge, where aliasing would show.
    v0 = epdiff.project_real(random_coefficients((2, 3, 16, 16, 16), gen))
    v0 = v0 * 3.0 / max_norm(epdiff.to_spatial(v0, ANISO_SHAPE))
    wide = epdiff.velocity_path(v0, ANISO_SHAPE, ANISO_SPACING, padding=2.0)
    narrow = epdiff.velocity_path(v0, ANISO_SHAPE, ANISO_SPACING, padding=1.5)
    tight = epdiff.velocity_path(v0, ANISO_SHAPE, ANISO_SPACING, padding=1.0)
    gap = max(float((a - b).abs().max()) for a, b in zip(wide, narrow))
    aliased = max(float((a - b).abs().max()) for a, b in zip(wide, tight))
    scale = float(v0.abs().max())
    print(f"padding 1.5 vs 2: {gap / scale:.1e}; 1.0 vs 2: {aliased / scale:.1e} (relative)")
    assert gap < 1e-12 * scale
    assert aliased > 1e-4 * scale  # the check can tell an aliased path apart


def test_inverse_consistency():
    """psi_1 and psi_1^-1 compose to the identity: the forward and pull-back maps of one shot,
    and the pull-back of the shot from -v_1 (the geodesic run backward)."""
    gen = torch.Generator().manual_seed(7)
    grid, spacing = (40, 36, 32), (3.0, 3.0, 3.0)
    v0 = epdiff.random_velocity(2, grid, spacing, 4.0, gen)
    shot = epdiff.shoot_maps(v0, grid, spacing)
    assert abs(max_norm(shot.pullback) - 4.0) < 0.1
    forward_after_pullback = max_norm(epdiff.compose(shot.forward, shot.pullback, spacing,
                                                     periodic=True))
    pullback_after_forward = max_norm(epdiff.compose(shot.pullback, shot.forward, spacing,
                                                     periodic=True))
    back = epdiff.shoot_maps(-shot.v1_hat, grid, spacing)
    round_trip = max_norm(epdiff.compose(shot.pullback, back.pullback, spacing, periodic=True))
    print(f"inverse consistency, 4 mm on {grid} x 3 mm: max |phi o phi^-1 - id| = "
          f"{forward_after_pullback:.3f} mm, |phi^-1 o phi - id| = {pullback_after_forward:.3f}"
          f" mm, shooting back from -v1: {round_trip:.3f} mm")
    assert forward_after_pullback < 0.06 and pullback_after_forward < 0.06
    assert round_trip < 0.1
    # Without the inverse, the composition is the deformation itself.
    assert max_norm(epdiff.compose(shot.pullback, shot.pullback, spacing, periodic=True)) > 4.0


def test_random_velocities_are_diffeomorphic():
    gen = torch.Generator().manual_seed(3)
    grid, spacing = (32, 32, 32), (3.0, 3.0, 3.0)
    for target in (3.0, 6.0):
        v0 = epdiff.random_velocity(4, grid, spacing, target, gen)
        u = epdiff.shoot(v0, grid, spacing)
        reached = u.norm(dim=1).flatten(1).amax(1)
        jacobian = epdiff.jacobian_determinant(u, spacing).flatten(1)
        print(f"random_velocity {target} mm: max |u| {reached.numpy().round(3)}, "
              f"min det J {jacobian.amin(1).numpy().round(3)}, "
              f"max det J {jacobian.amax(1).numpy().round(3)}")
        assert torch.allclose(reached, torch.full_like(reached, target), rtol=0.02)
        assert jacobian.amin() > 0.5
        # Distinct draws.
        assert (u[0] - u[1]).norm(dim=0).max() > 0.5 * target


def test_anisotropic_grid_is_consistent_with_a_finer_grid():
    """The same coefficients on the grid and on one of twice the resolution (same field of view)
    give the same pull-back at the shared points."""
    gen = torch.Generator().manual_seed(8)
    v0 = epdiff.random_velocity(1, ANISO_SHAPE, ANISO_SPACING, 4.0, gen)
    coarse = epdiff.shoot(v0, ANISO_SHAPE, ANISO_SPACING)
    fine_shape = tuple(2 * n for n in ANISO_SHAPE)
    fine_spacing = tuple(h / 2 for h in ANISO_SPACING)
    fine = epdiff.shoot(v0, fine_shape, fine_spacing)[:, :, ::2, ::2, ::2]
    gap = max_norm(fine - coarse)
    print(f"{ANISO_SHAPE} x {ANISO_SPACING} mm vs twice the resolution: max gap {gap:.3f} mm "
          f"for max |u| {max_norm(coarse):.2f} mm")
    assert gap < 0.1
    # The components are not interchangeable: a field along X differs from one along Y.
    assert max_norm(coarse[:, [1, 0, 2]] - coarse) > 0.5


def test_recovers_a_deformation_on_an_anisotropic_grid(mni_template):
    """A patch of the template on the (40, 32, 24) grid of (2, 2.5, 3.5) mm voxels (smoothed by
    one voxel, so that one trilinear warp is accurate), deformed there by a known geodesic, and
    recovered by optimise_velocity from zero."""
    data, _ = mni_template
    template = torch.from_numpy(data)[None, None]
    centre = (torch.tensor(data.shape, dtype=torch.float32) - 1) / 2
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * h / 2.0
            for n, h in zip(ANISO_SHAPE, ANISO_SPACING)]  # in 2 mm template voxels
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) + centre
    sizes = torch.tensor(data.shape, dtype=torch.float32) - 1
    sample_grid = (2.0 * points / sizes - 1.0).flip(-1)[None]
    fixed = F.grid_sample(gaussian_blur(template, [0.6, 0.8, 1.2]), sample_grid,
                          align_corners=True)
    fixed = gaussian_blur(fixed, [1.0, 1.0, 1.0])
    mask = fixed > 0.2
    inside = mask[0, 0]
    fixed = fixed / fixed[mask].median()
    gen = torch.Generator().manual_seed(0)
    v_true = epdiff.random_velocity(2, ANISO_SHAPE, ANISO_SPACING, 4.0, gen)
    shot = epdiff.shoot_maps(v_true, ANISO_SHAPE, ANISO_SPACING)
    moving = epdiff.warp(fixed, shot.forward, ANISO_SPACING)

    start = time.perf_counter()
    v_hat = epdiff.optimise_velocity(moving, fixed, ANISO_SPACING, mask=mask)
    elapsed = time.perf_counter() - start
    u = epdiff.shoot(v_hat, ANISO_SHAPE, ANISO_SPACING)
    magnitude = shot.pullback.norm(dim=1)[:, inside].mean(1)
    ratio = (u - shot.pullback).norm(dim=1)[:, inside].mean(1) / magnitude
    # Mean error per axis: no axis is left out or swapped.
    per_axis = (u - shot.pullback).abs()[:, :, inside].mean(-1) / shot.pullback.abs()[
        :, :, inside].mean(-1)
    print(f"{ANISO_SHAPE} x {ANISO_SPACING} mm: true mean |u| {magnitude.numpy().round(3)} mm, "
          f"error {ratio.numpy().round(3)} of it; per axis {per_axis.numpy().round(2)}; "
          f"{elapsed:.1f} s for 2 volumes")
    assert (ratio < 0.45).all()
    assert (per_axis < 0.6).all()


def test_float32_matches_float64():
    grid, spacing = (32, 28, 24), (3.0, 3.0, 3.5)
    fields = {}
    for dtype in (torch.float32, torch.float64):
        gen = torch.Generator().manual_seed(9)
        v0 = epdiff.random_velocity(2, grid, spacing, 5.0, gen, dtype=dtype)
        assert v0.dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
        fields[dtype] = epdiff.shoot(v0, grid, spacing)
        assert fields[dtype].dtype == dtype
    gap = max_norm(fields[torch.float32].double() - fields[torch.float64])
    print(f"float32 vs float64, 5 mm: max gap {gap:.1e} mm")
    assert gap < 1e-3


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(10)
    grid, spacing = (10, 9, 8), (2.0, 2.5, 3.0)
    v0 = epdiff.random_velocity(1, grid, spacing, 2.0, gen, band=4, dtype=torch.float64)
    image = torch.rand(1, 1, *grid, dtype=torch.float64, generator=gen)
    operator = epdiff.operator_symbol(4, grid, spacing, dtype=torch.float64)

    def energy(parameters):
        v = torch.view_as_complex(parameters)
        u = epdiff.shoot(v, grid, spacing, steps=4, inverse_iterations=1)
        return (epdiff.warp(image, u, spacing) ** 2).sum() + epdiff.regulariser(v, operator).sum()

    parameters = torch.view_as_real(v0).clone().requires_grad_(True)
    energy(parameters).backward()
    for _ in range(3):
        direction = torch.view_as_real(epdiff.project_real(torch.view_as_complex(
            torch.randn(parameters.shape, dtype=torch.float64, generator=gen))))
        eps = 1e-6
        numeric = (energy(parameters.detach() + eps * direction)
                   - energy(parameters.detach() - eps * direction)) / (2 * eps)
        analytic = (parameters.grad * direction).sum()
        assert torch.allclose(analytic, numeric, rtol=1e-5), (float(analytic), float(numeric))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(11)
    v0 = epdiff.random_velocity(2, ANISO_SHAPE, ANISO_SPACING, 4.0, gen)
    on_cpu = epdiff.shoot(v0, ANISO_SHAPE, ANISO_SPACING)
    on_gpu = epdiff.shoot(v0.cuda(), ANISO_SHAPE, ANISO_SPACING)
    assert on_gpu.device.type == "cuda"
    assert max_norm(on_gpu.cpu() - on_cpu) < 1e-3
    moving = torch.rand(2, 1, *ANISO_SHAPE, generator=gen)
    result = epdiff.optimise_velocity(moving.cuda(), moving[:1].cuda(), ANISO_SPACING,
                                      iterations=4)
    assert result.device.type == "cuda" and torch.isfinite(torch.view_as_real(result)).all()


# ---------------------------------------------------------------------------------------------
# recovery of a known deformation of a real brain


def _centre(volume: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad each axis of a 3-D array to ``size`` about its centre."""
    out = np.zeros((size,) * 3, dtype=np.float32)
    source, target = [], []
    for n in volume.shape:
        if n >= size:
            source.append(slice((n - size) // 2, (n - size) // 2 + size))
            target.append(slice(0, size))
        else:
            source.append(slice(0, n))
            target.append(slice((size - n) // 2, (size - n) // 2 + n))
    out[tuple(target)] = volume[tuple(source)]
    return out


def test_recovers_a_known_deformation_of_the_mni_template(mni_template):
    """The 2 mm template (96^3, 192 mm) is deformed there by a known geodesic (4 mm at most),
    then both copies go to a 64^3 grid of 3 mm (antialiased, one interpolation each), and
    optimise_velocity (defaults) recovers the deformation from zero."""
    data, _ = mni_template
    fine = torch.from_numpy(_centre(data, 96))[None, None]
    grid, spacing = (64, 64, 64), (3.0, 3.0, 3.0)
    # 3 mm samples lie at 1.5 fine voxels; blur to a total sigma of half the spacing first.
    antialias = [math.sqrt(1.5 ** 2 - 1.0 ** 2) / 2.0] * 3
    index = torch.arange(64, dtype=torch.float32) * 1.5
    points = torch.stack(torch.meshgrid(index, index, index, indexing="ij"), dim=-1)
    sample_grid = (2.0 * points / 95.0 - 1.0).flip(-1)[None]

    def to_grid(volumes):
        return F.grid_sample(gaussian_blur(volumes, antialias),
                             sample_grid.expand(volumes.shape[0], -1, -1, -1, -1),
                             align_corners=True)

    fixed = to_grid(fine)
    mask = fixed > 0.2
    inside = mask[0, 0]
    median = fixed[mask].median()
    gen = torch.Generator().manual_seed(0)
    v_true = epdiff.random_velocity(2, grid, spacing, 4.0, gen)
    u_true = epdiff.shoot(v_true, grid, spacing)
    with torch.no_grad():  # the same coefficients on the 2 mm grid of the same field of view
        forward_fine = epdiff.shoot_maps(v_true, (96,) * 3, (2.0,) * 3).forward
    moving = to_grid(epdiff.warp(fine, forward_fine, (2.0,) * 3))
    fixed, moving = fixed / median, moving / median

    start = time.perf_counter()
    v_hat = epdiff.optimise_velocity(moving, fixed, spacing, mask=mask)
    elapsed = time.perf_counter() - start
    u = epdiff.shoot(v_hat, grid, spacing)

    magnitude = u_true.norm(dim=1)[:, inside].mean(1)
    error = (u - u_true).norm(dim=1)[:, inside].mean(1)
    ratio = error / magnitude

    def mse(displacement):
        return ((epdiff.warp(moving, displacement, spacing) - fixed) ** 2)[:, 0][:, inside].mean(1)

    before, after, at_truth = mse(torch.zeros_like(u)), mse(u), mse(u_true)
    min_jacobian = epdiff.jacobian_determinant(u, spacing).flatten(1).amin(1)
    print(f"MNI 64^3 x 3 mm, {int(inside.sum())} brain voxels: true mean |u| "
          f"{magnitude.numpy().round(3)} mm (max 4); mean error {error.numpy().round(3)} mm = "
          f"{ratio.numpy().round(3)} of it; MSE before {before.numpy()}, after {after.numpy()}, "
          f"at the truth {at_truth.numpy()}; min det J {min_jacobian.numpy().round(3)}; "
          f"optimise_velocity {elapsed:.1f} s for 2 volumes ({elapsed / 2:.1f} s per volume)")
    assert (ratio < 0.4).all()
    assert (after < 0.5 * before).all()
    assert (min_jacobian > 0).all()
