"""The rigid engine: geometry, resampling, registration and reference choice, on real brains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import coarse_grid
from scipy import ndimage

from unimo_bids.unimo.geometry import (
    grid_center,
    mean_displacement,
    rigid_from_params,
    rigid_inverse,
    world_points,
)
from unimo_bids.unimo.hmc import apply_head_motion, estimate_head_motion
from unimo_bids.unimo.reference import detect_non_steady_state, select_reference
from unimo_bids.unimo.register import register_rigid
from unimo_bids.unimo.resample import resample, sample_mapped_points, voxel_map
from unimo_bids.unimo.synthetic import random_rigid_motions, rigid_matrix, simulate_series


def moved_series(template, voxel_mm, n_volumes, max_rot, max_trans, seed, anisotropy=(1, 1, 1),
                 noise=0.01):
    """A series of the template moved by known motion: (series, affine, motions, brain mask).

    The template is first blurred to the acquisition's point-spread function (FWHM = voxel size
    per axis), as a real thick-slice acquisition averages over its slice profile.
    """
    data, affine = template
    shape, grid = coarse_grid(data.shape, affine, voxel_mm, anisotropy)
    fwhm_vox = np.asarray(anisotropy, dtype=float) * voxel_mm / 2.0
    data = ndimage.gaussian_filter(data, np.sqrt(np.maximum(fwhm_vox**2 - 1.0, 0.0)) / 2.355)
    rng = np.random.default_rng(seed)
    motions = random_rigid_motions(n_volumes, max_rot, max_trans, grid_center(shape, grid), rng)
    series = simulate_series(data, affine, motions, shape, grid)
    series = series + noise * series.max() * rng.standard_normal(series.shape)
    brain = series[..., 0] > 0.25 * series[..., 0].max()
    return series.astype(np.float32), grid, motions, brain


def test_rigid_params_roundtrip():
    params = torch.tensor([[0.1, -0.2, 0.05, 3.0, -1.0, 2.0]], dtype=torch.float64)
    center = torch.tensor([10.0, -20.0, 5.0], dtype=torch.float64)
    matrix = rigid_from_params(params, center)
    assert torch.allclose(matrix @ rigid_inverse(matrix), torch.eye(4, dtype=torch.float64))
    # The centre moves by the translation only.
    moved = matrix[0, :3, :3] @ center + matrix[0, :3, 3]
    assert torch.allclose(moved, center + params[0, 3:])


def test_resample_matches_scipy_linear(mni_template):
    data, affine = mni_template
    volume = data[::2, ::2, ::2]
    grid = affine @ np.diag([2, 2, 2, 1.0])
    motion = rigid_matrix([4.0, -3.0, 2.0], [2.5, -1.0, 3.0], grid_center(volume.shape, grid))
    maps = voxel_map(torch.as_tensor(motion[None]), torch.as_tensor(grid), torch.as_tensor(grid))
    ours = resample(torch.as_tensor(volume)[None, None], maps, volume.shape)[0, 0].numpy()
    coords = np.indices(volume.shape).reshape(3, -1)
    vox = maps[0].numpy() @ np.vstack([coords, np.ones(coords.shape[1])])
    reference = ndimage.map_coordinates(volume, vox[:3], order=1, cval=0.0).reshape(volume.shape)
    assert np.abs(ours - reference).max() < 1e-3 * volume.max()


def test_resample_integer_shift_is_exact(mni_template):
    data, affine = mni_template
    volume = data[::2, ::2, ::2]
    grid = affine @ np.diag([2, 2, 2, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = grid[:3, :3] @ np.array([2.0, 0.0, 1.0])  # 2 voxels in i, 1 in k
    maps = voxel_map(torch.as_tensor(shift[None]), torch.as_tensor(grid), torch.as_tensor(grid))
    out = resample(torch.as_tensor(volume)[None, None], maps, volume.shape)[0, 0].numpy()
    np.testing.assert_allclose(out[:-2, :, :-1], volume[2:, :, 1:], atol=1e-4 * volume.max())


@pytest.mark.parametrize("batch", [3, 1])
def test_sample_mapped_points_matches_scipy_linear_and_flags_outside_points(mni_template, batch):
    """Centred world points through per-volume maps, on a non-cubic grid; batch 1 is one volume
    read through three maps at once (the registration's several starts)."""
    data, affine = mni_template
    volumes = np.stack([data[::2, ::3, ::2] * (1.0 + 0.1 * b) for b in range(batch)])
    grid = affine @ np.diag([2, 3, 2, 1.0])
    rng = np.random.default_rng(0)
    centre = grid_center(volumes.shape[1:], grid)
    points = centre + rng.uniform(-90, 90, (500, 3))  # some beyond the field of view
    motions = np.stack([rigid_matrix(rng.uniform(-20, 20, 3), rng.uniform(-9, 9, 3), centre)
                        for _ in range(3)])
    to_centre = np.eye(4)
    to_centre[:3, 3] = centre
    maps = np.linalg.inv(grid) @ motions @ to_centre
    values, inside = sample_mapped_points(torch.as_tensor(volumes, dtype=torch.float32)[:, None],
                                          torch.as_tensor(points - centre), torch.as_tensor(maps))
    assert values.shape == (3, 1, 500) and inside.shape == (3, 500)
    for s in range(3):
        vox = (maps[s] @ np.c_[points - centre, np.ones(500)].T)[:3]
        expected = ndimage.map_coordinates(volumes[s % batch], vox, order=1, cval=0.0)
        upper = np.array(volumes.shape[1:])[:, None] - 1
        within = ((vox >= 0) & (vox <= upper)).all(0)
        assert 50 < within.sum() < 500
        np.testing.assert_array_equal(inside[s].numpy(), within)
        np.testing.assert_allclose(values[s, 0].numpy(), expected, atol=1e-4 * data.max())


@pytest.mark.parametrize("anisotropy", [(1, 1, 1), (1, 1, 2.5)])
def test_registration_recovers_known_motion(mni_template, anisotropy):
    series, grid, motions, brain = moved_series(mni_template, 3.5, 8, 5.0, 5.0, seed=3,
                                                anisotropy=anisotropy)
    reference = series[..., 0]
    result = estimate_head_motion(series, grid, reference, brain)
    truth = np.linalg.inv(motions) @ motions[0]
    errors = mean_displacement(result.transforms, truth, world_points(series.shape, grid, brain))
    assert errors.mean() < 0.15, errors
    assert errors.max() < 0.3, errors
    # Without the correction the error would be millimetres: the test can fail.
    assert mean_displacement(np.eye(4)[None].repeat(8, 0), truth,
                             world_points(series.shape, grid, brain))[1:].mean() > 1.0


def test_registration_large_motion_capture(mni_template):
    """Coarse-to-fine intensity registration alone captures 20 deg / 15 mm."""
    series, grid, motions, brain = moved_series(mni_template, 4.0, 6, 20.0, 15.0, seed=7)
    fixed = torch.as_tensor(series[..., 0])[None]
    moving = torch.as_tensor(np.moveaxis(series, -1, 0))[:, None]
    result = register_rigid(fixed, moving, grid, grid, torch.as_tensor(brain.astype(np.float32)))
    truth = np.linalg.inv(motions) @ motions[0]
    errors = mean_displacement(result.transforms, truth, world_points(series.shape, grid, brain))
    assert errors.max() < 0.5, errors


def test_several_starts_per_volume_match_registering_each_copy(mni_template):
    """k starts for each of B volumes (start-major, one blur per level) give what registering
    k * B explicit copies gives; a start count that is not a multiple of B is refused."""
    series, grid, motions, brain = moved_series(mni_template, 4.0, 3, 10.0, 8.0, seed=5)
    fixed = torch.as_tensor(series[..., 0])[None]
    moving = torch.as_tensor(np.moveaxis(series[..., 1:], -1, 0))[:, None]
    center = grid_center(series.shape[:3], grid)
    starts = np.concatenate([np.tile(np.eye(4), (2, 1, 1)),
                             np.stack([rigid_matrix((6, -4, 3), (3, 1, -2), center)] * 2)])
    weight = torch.as_tensor(brain.astype(np.float32))
    shared = register_rigid(fixed, moving, grid, grid, weight, init=starts)
    copies = register_rigid(fixed, moving.repeat(2, 1, 1, 1, 1), grid, grid, weight,
                            init=starts)
    assert np.allclose(shared.transforms, copies.transforms, atol=1e-6)
    assert np.allclose(shared.residual, copies.residual, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        register_rigid(fixed, moving, grid, grid, weight, init=starts[:3])


def test_a_level_with_too_few_points_falls_back_to_the_voxel_grid(mni_template):
    """Level.min_points: the finest level 1.25 voxels apart keeps its grid when it holds enough
    weighted points, and otherwise runs on the voxel grid, with its own smoothing."""
    from unimo_bids.unimo.register import Level

    series, grid, motions, brain = moved_series(mni_template, 4.0, 3, 3.0, 3.0, seed=5)
    fixed = torch.as_tensor(series[..., 0])[None]
    moving = torch.as_tensor(np.moveaxis(series, -1, 0))[:, None]
    weight = torch.as_tensor(brain.astype(np.float32))
    coarse = (Level(2.0, 10),)

    def run(*finest):
        return register_rigid(fixed, moving, grid, grid, weight, levels=coarse + finest)

    offgrid, voxel = Level(1.25, 6, smoothing=1.3), Level(1.0, 6, smoothing=1.3)
    points = int(brain.sum())
    kept = run(offgrid, Level(1.25, 6, smoothing=1.3, min_points=points // 4)).transforms
    fallen = run(offgrid, Level(1.25, 6, smoothing=1.3, min_points=points + 1)).transforms
    np.testing.assert_array_equal(kept, run(offgrid, offgrid).transforms)
    np.testing.assert_array_equal(fallen, run(offgrid, voxel).transforms)
    assert not np.array_equal(kept, fallen)


def test_apply_head_motion_aligns_volumes(mni_template):
    series, grid, motions, brain = moved_series(mni_template, 4.0, 5, 4.0, 4.0, seed=11,
                                                noise=0.0)
    truth = np.linalg.inv(motions) @ motions[0]
    corrected = apply_head_motion(series, grid, truth)
    inner = ndimage.binary_erosion(brain, iterations=2)
    before = np.abs(series[inner] - series[inner][:, :1]).mean()
    after = np.abs(corrected[inner] - corrected[inner][:, :1]).mean()
    assert after < 0.3 * before


def test_detect_non_steady_state():
    rng = np.random.default_rng(0)
    series = 100 + rng.standard_normal((10, 10, 10, 30)).astype(np.float32)
    assert detect_non_steady_state(series) == 0
    series[..., :3] *= 1.5
    assert detect_non_steady_state(series) == 3


def test_select_reference_modes(mni_template):
    series, grid, motions, brain = moved_series(mni_template, 4.0, 9, 0.0, 0.0, seed=1)
    # Three volumes moved far away: 'auto' must pick one of the six still ones.
    moved, _, _, _ = moved_series(mni_template, 4.0, 4, 8.0, 8.0, seed=2)
    series[..., [2, 5, 7]] = moved[..., 1:]
    _, index = select_reference(series, grid, "auto")
    assert index not in (2, 5, 7)
    assert select_reference(series, grid, "first", n_dummy=2)[1] == 2
    assert select_reference(series, grid, "middle")[1] == 4
    assert select_reference(series, grid, "6")[1] == 6
    mean, index = select_reference(series, grid, "mean")
    assert index is None and mean.shape == series.shape[:3]
    with pytest.raises(ValueError, match="out of range"):
        select_reference(series, grid, 20)



def test_select_reference_on_long_series_looks_at_a_bounded_subset(mni_template, monkeypatch):
    """Past MAX_CANDIDATES steady-state volumes, 'auto' chooses among evenly spaced ones and
    'mean' averages all of them in chunks: memory does not grow with the series."""
    from unimo_bids.unimo import reference

    assert list(reference.evenly_spaced(np.arange(3, 13), 4)) == [3, 6, 9, 12]
    assert list(reference.evenly_spaced(np.arange(5), 8)) == [0, 1, 2, 3, 4]
    monkeypatch.setattr(reference, "MAX_CANDIDATES", 4)
    still, grid, _, _ = moved_series(mni_template, 8.0, 10, 0.0, 0.0, seed=3)
    moved, _, _, _ = moved_series(mni_template, 8.0, 3, 8.0, 8.0, seed=4)
    still[..., [3, 9]] = moved[..., 1:]
    assert list(reference.evenly_spaced(np.arange(1, 10), 4)) == [1, 4, 6, 9]
    _, index = reference.select_reference(still, grid, "auto", n_dummy=1)
    assert index in (1, 4, 6)  # a still candidate, not the moved 9
    mean, index = reference.select_reference(still, grid, "mean", n_dummy=1)
    assert index is None and np.isfinite(mean).all() and mean.shape == still.shape[:3]
    # the mean of 9 volumes (two moved, aligned back roughly) is close to a still volume
    brain = still[..., 1] > np.percentile(still[..., 1], 70)
    assert np.corrcoef(mean[brain], still[..., 1][brain])[0, 1] > 0.9

def test_large_through_slab_motion_does_not_abort_the_series():
    """A volume moved 10 deg / 22 mm on a 112 mm slab of real BOLD used to make the solve
    singular and lose the whole series (found by benchmarks/rigid_accuracy.py)."""
    import nibabel as nb
    from conftest import shared_data

    from unimo_bids.unimo.segment import reference_mask

    img = nb.load(shared_data() / "bold" / "xa30_task-fa_bold.nii.gz")
    volume = np.asarray(img.dataobj[..., 0], dtype=np.float32)
    motion = rigid_matrix([1.58, -2.27, 10.09], [15.8, -9.13, 11.7],
                          grid_center(volume.shape, img.affine))
    motions = np.stack([np.eye(4), motion])
    series = simulate_series(volume, img.affine, motions, volume.shape, img.affine)
    mask = reference_mask(series[..., 0], img.header.get_zooms()[:3])
    result = estimate_head_motion(series, img.affine, series[..., 0], mask)
    errors = mean_displacement(result.transforms, np.linalg.inv(motions),
                               world_points(volume.shape, img.affine, mask))
    assert errors.max() < 0.5, errors


@pytest.mark.parametrize("shape", [(49, 49, 49), (64, 64, 33), (5, 1, 7), (1, 1, 1)])
def test_affine_sampling_grid_equals_torch_affine_grid(shape):
    """resample's own grid builder gives torch's affine_grid values (one-voxel axes too)."""
    import warnings

    from unimo_bids.unimo.resample import affine_sampling_grid

    theta = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # affine_grid warns about unit-size axes
        expected = torch.nn.functional.affine_grid(theta, (3, 1, *shape), align_corners=True)
    assert torch.equal(affine_sampling_grid(theta, shape), expected)
