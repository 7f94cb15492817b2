"""Deformable correction after the rigid step (``unimo.deform``) and its composition with it.

The EPDiff engine itself is tested in ``test_epdiff.py``; here: the working grid, the one
resampling that composes the rigid transform with the displacement field, the estimation on a
real brain (nilearn's MNI152 template) moved rigidly and deformed by known band-limited fields,
and the ``UniMoDeform`` interface's outputs.
"""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import coarse_grid
from scipy import ndimage

from unimo_bids.interfaces.unimo import ApplyHeadMotion, UniMoDeform, load_fields
from unimo_bids.unimo import epdiff
from unimo_bids.unimo.deform import deformation_grid, estimate_deformation, field_on_grid
from unimo_bids.unimo.geometry import grid_center, rigid_matrix, voxel_sizes, world_points
from unimo_bids.unimo.hmc import apply_head_motion


@pytest.fixture(scope="module")
def brain(mni_template):
    """The MNI template, smoothed, on a 4 mm grid: (data, affine, mask)."""
    data, affine = mni_template
    data = ndimage.gaussian_filter(data, 1.0)
    shape, grid = coarse_grid(data.shape, affine, 4.0)
    index = np.indices(shape).reshape(3, -1)
    source = np.linalg.inv(affine) @ grid @ np.vstack([index, np.ones(index.shape[1])])
    volume = ndimage.map_coordinates(data, source[:3], order=1).reshape(shape)
    volume = volume.astype(np.float32)
    mask = ndimage.binary_fill_holes(volume > 0.25 * volume.max())
    return volume, grid, mask


def test_deformation_grid_covers_the_mask_and_is_ras_aligned(brain):
    _, affine, mask = brain
    grid_affine, grid_shape = deformation_grid(mask, affine, spacing_mm=3.0, margin_mm=10.0)
    assert np.allclose(grid_affine[:3, :3], 3.0 * np.eye(3))
    points = world_points(mask.shape, affine, mask)
    corners = np.stack([grid_affine[:3, 3], grid_affine[:3, 3] + 3.0 * (np.array(grid_shape) - 1)])
    assert np.all(points.min(0) - 10.0 >= corners[0] - 1e-6)
    assert np.all(points.max(0) + 10.0 <= corners[1] + 3.0)
    # A field of view too large for max_size gets a coarser spacing, never more voxels.
    big_affine, big_shape = deformation_grid(mask, affine, spacing_mm=1.0, max_size=24)
    assert max(big_shape) <= 24 and big_affine[0, 0] > 1.0


def test_zero_fields_give_the_rigid_resampling(brain):
    volume, affine, mask = brain
    series = np.stack([volume, np.roll(volume, 1, axis=0)], axis=-1)
    center = grid_center(volume.shape, affine)
    transforms = np.stack([np.eye(4), rigid_matrix((3.0, -2.0, 5.0), (1.5, -2.0, 0.5), center)])
    grid_affine, grid_shape = deformation_grid(mask, affine)
    zeros = np.zeros((2, 3, *grid_shape), dtype=np.float32)
    rigid = apply_head_motion(series, affine, transforms)
    composed = apply_head_motion(series, affine, transforms, fields=zeros,
                                 field_affine=grid_affine)
    assert np.abs(composed - rigid).max() < 1e-4 * volume.max()


def test_a_constant_field_is_a_translation(brain):
    """u = constant c reads volume t at T_t(p + c): the same as the rigid transform T_t + c."""
    volume, affine, mask = brain
    series = volume[..., None]
    grid_affine, grid_shape = deformation_grid(mask, affine)
    shift = np.array([2.5, -1.0, 3.0])
    fields = np.broadcast_to(shift[None, :, None, None, None],
                             (1, 3, *grid_shape)).astype(np.float32)
    translation = np.eye(4)
    translation[:3, 3] = shift
    expected = apply_head_motion(series, affine, translation[None])
    composed = apply_head_motion(series, affine, np.eye(4)[None], fields=fields,
                                 field_affine=grid_affine)
    assert np.abs(composed - expected).max() < 1e-4 * volume.max()
    # field_on_grid continues the edge value beyond the working grid.
    carried = field_on_grid(torch.as_tensor(fields), grid_affine, volume.shape, affine)
    assert torch.allclose(carried, torch.as_tensor(shift, dtype=carried.dtype).view(1, 3, 1, 1, 1)
                          .expand_as(carried), atol=1e-5)


@pytest.fixture(scope="module")
def deformed(brain):
    """Volume 0 is the brain; volumes 1-2 are deformed (largest displacement 4 mm) by known
    band-limited fields and then moved rigidly. Returns the series and the truth."""
    volume, affine, mask = brain
    spacing = tuple(voxel_sizes(affine))
    generator = torch.Generator().manual_seed(5)
    velocity = epdiff.random_velocity(2, volume.shape, spacing, 4.0, generator=generator,
                                      dtype=torch.float64)
    shot = epdiff.shoot_maps(velocity, volume.shape, spacing)
    warped = epdiff.warp(torch.as_tensor(volume, dtype=torch.float64)[None, None],
                         shot.pullback, spacing)[:, 0].numpy().astype(np.float32)
    center = grid_center(volume.shape, affine)
    rigid = np.stack([np.eye(4), rigid_matrix((2.0, -1.0, 3.0), (1.0, 0.5, -1.0), center),
                      rigid_matrix((-3.0, 2.0, 0.0), (-1.5, 0.0, 2.0), center)])
    moved = [apply_head_motion(warped[t][..., None], affine, np.linalg.inv(rigid[t + 1])[None])
             for t in range(2)]
    series = np.concatenate([volume[..., None], *moved], axis=-1)
    # The anatomy at p of the reference is at T_t(p + forward_t(p)) in volume t (the grid's
    # axes are RAS here, so array-axis mm are world mm).
    forward = np.concatenate([np.zeros((1, 3, *volume.shape)), shot.forward.numpy()])
    return {"series": series, "rigid": rigid, "forward": forward}


@pytest.fixture(scope="module")
def estimated(brain, deformed):
    volume, affine, mask = brain
    # Noise-free data: the engine's weak default regulariser, not the app's real-data one
    # (deform.SIGMA = 1e-3 gives 0.98 / 1.17 mm here, against 0.70 / 0.80 mm).
    return estimate_deformation(deformed["series"], affine, volume, mask, deformed["rigid"],
                                iterations=30, sigma=epdiff.DEFAULT_SIGMA)


def test_known_deformation_is_recovered_on_a_real_brain(brain, deformed, estimated):
    volume, affine, mask = brain
    fields = field_on_grid(torch.as_tensor(estimated.displacement), estimated.grid_affine,
                           volume.shape, affine).numpy()
    truth = deformed["forward"]
    error = np.linalg.norm(fields - truth, axis=1)[:, mask].mean(axis=1)
    size = np.linalg.norm(truth, axis=1)[:, mask].mean(axis=1)
    print(f"\ndeformation: true mean {size.round(2)} mm, error {error.round(2)} mm; "
          f"correlation {estimated.ncc_rigid.round(4)} -> {estimated.ncc_deformed.round(4)}; "
          f"min Jacobian {estimated.min_jacobian.round(2)}")
    # Observed: true 1.2-1.4 mm, error ~0.8 mm on moved volumes, ~0.1 mm on the reference.
    assert error[0] < 0.3
    assert np.all(error[1:] < 0.75 * size[1:])
    assert np.all(estimated.ncc_deformed[1:] > estimated.ncc_rigid[1:])
    assert np.all(estimated.min_jacobian > 0) and not estimated.rejected.any()
    assert np.allclose(estimated.mean_mm[1:], np.linalg.norm(
        estimated.displacement[1:], axis=1).mean(axis=(1, 2, 3)), rtol=1.0)


def test_composed_resampling_is_closer_to_the_reference(brain, deformed, estimated):
    volume, affine, mask = brain
    rigid_only = apply_head_motion(deformed["series"], affine, deformed["rigid"])
    composed = apply_head_motion(deformed["series"], affine, deformed["rigid"],
                                 fields=estimated.displacement,
                                 field_affine=estimated.grid_affine)
    for t in (1, 2):
        before = np.sqrt(np.mean((rigid_only[..., t] - volume)[mask] ** 2))
        after = np.sqrt(np.mean((composed[..., t] - volume)[mask] ** 2))
        assert after < 0.8 * before, (t, before, after)


def test_unimo_deform_interface_writes_fields_and_diagnostics(brain, deformed, tmp_path,
                                                              monkeypatch):
    volume, affine, mask = brain
    monkeypatch.chdir(tmp_path)
    paths = {}
    for name, data in (("series", deformed["series"]), ("reference", volume),
                       ("mask", mask.astype(np.uint8))):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nb.Nifti1Image(data, affine).to_filename(paths[name])
    np.save(tmp_path / "xfm.npy", deformed["rigid"])
    pd.DataFrame({"hmc_residual": [0.0, 0.1, 0.2]}).to_csv(tmp_path / "diag.tsv", sep="\t",
                                                          index=False)
    (tmp_path / "diag.json").write_text(json.dumps({"hmc_residual": {"Units": "arbitrary"}}))
    result = UniMoDeform(in_file=paths["series"], reference=paths["reference"],
                         reference_mask=paths["mask"], in_transforms=str(tmp_path / "xfm.npy"),
                         in_diagnostics=str(tmp_path / "diag.tsv"),
                         in_diagnostics_meta=str(tmp_path / "diag.json"), iterations=4).run()
    fields, grid_affine = load_fields(result.outputs.out_fields)
    img = nb.load(result.outputs.out_fields)
    assert img.ndim == 5 and img.shape[3:] == (3, 3) and fields.shape[:2] == (3, 3)
    assert img.header.get_intent()[0] == "vector"
    assert np.allclose(np.diag(grid_affine)[:3], np.diag(grid_affine)[0])
    table = pd.read_csv(result.outputs.out_diagnostics, sep="\t")
    assert list(table.columns) == ["hmc_residual", "deform_mean", "deform_max",
                                   "deform_jacobian_min", "deform_rejected", "deform_ncc_rigid",
                                   "deform_ncc"]
    assert (table["deform_rejected"] == 0).all()
    assert np.allclose(table["hmc_residual"], [0.0, 0.1, 0.2])
    assert (table["deform_mean"][1:] > 0.1).all()
    meta = json.loads(open(result.outputs.out_diagnostics_meta).read())
    assert meta["deform_mean"]["Units"] == "mm" and "hmc_residual" in meta
    # ApplyHeadMotion composes the fields it is given.
    rigid = ApplyHeadMotion(in_file=paths["series"], in_transforms=str(tmp_path / "xfm.npy")).run()
    rigid_data = nb.load(rigid.outputs.out_file).get_fdata()  # the next run writes the same name
    composed = ApplyHeadMotion(in_file=paths["series"], in_transforms=str(tmp_path / "xfm.npy"),
                               in_fields=result.outputs.out_fields).run()
    assert not np.allclose(rigid_data, nb.load(composed.outputs.out_file).get_fdata())


def test_load_fields_refuses_a_4d_image(tmp_path):
    path = tmp_path / "bad.nii.gz"
    nb.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)).to_filename(path)
    with pytest.raises(ValueError, match="bad.nii.gz"):
        load_fields(str(path))


def test_a_folding_deformation_is_rejected(brain, deformed, monkeypatch):
    """A field that folds (here: the optimiser replaced by a 40 mm random field, far beyond what
    the regulariser allows) is not used: the volume keeps its rigid correction."""
    volume, affine, mask = brain

    def folding(moving, fixed, spacing, **_):
        generator = torch.Generator().manual_seed(0)
        return epdiff.random_velocity(moving.shape[0], moving.shape[2:], spacing, 40.0,
                                      generator=generator, smoothness=0.5)

    monkeypatch.setattr(epdiff, "optimise_velocity", folding)
    result = estimate_deformation(deformed["series"][..., :2], affine, volume, mask,
                                  deformed["rigid"][:2])
    assert result.rejected.all() and np.all(result.min_jacobian <= 0)
    assert np.all(result.displacement == 0) and np.all(result.velocity == 0)
    assert np.allclose(result.ncc_deformed, result.ncc_rigid)


def test_a_predictor_starts_the_optimisation_on_the_half_resolution_grid(brain, deformed):
    """The predictor hook sees the half-resolution grid (same field of view, twice the spacing)
    with each volume's mask moved by its rigid transform; its coefficients are used as they are
    with iterations=0, and as the optimiser's start otherwise."""
    volume, affine, mask = brain
    grid_affine, grid_shape = deformation_grid(mask, affine)
    assert all(n % 2 == 0 for n in grid_shape)
    spacing = tuple(voxel_sizes(grid_affine))
    known = epdiff.random_velocity(2, grid_shape, spacing, 2.0,
                                   generator=torch.Generator().manual_seed(9))
    seen = {}

    def predictor(moving, fixed, moving_mask, fixed_mask, half_spacing):
        seen.update(moving=moving, fixed=fixed, moving_mask=moving_mask, fixed_mask=fixed_mask,
                    spacing=half_spacing)
        return known[:moving.shape[0]]

    series, rigid = deformed["series"][..., :2], deformed["rigid"][:2]
    # Volume 1's own mask: the reference mask carried to where its anatomy is.
    masks = np.stack([mask, apply_head_motion(mask[..., None].astype(np.float32), affine,
                                              np.linalg.inv(rigid[1])[None])[..., 0] > 0.5], -1)
    alone = estimate_deformation(series, affine, volume, mask, rigid, iterations=0,
                                 predictor=predictor, masks=masks)
    assert seen["moving"].shape == (2, 1, *(n // 2 for n in grid_shape))
    assert seen["fixed"].shape == seen["fixed_mask"].shape == (1, 1, *(n // 2 for n in grid_shape))
    assert seen["moving_mask"].dtype == torch.bool
    assert np.allclose(seen["spacing"], 2 * np.array(spacing))
    # Aligned by its rigid transform, each volume's mask agrees with the reference mask.
    for t in range(2):
        overlap = (seen["moving_mask"][t] & seen["fixed_mask"][0]).sum()
        union = (seen["moving_mask"][t] | seen["fixed_mask"][0]).sum()
        assert float(overlap) / float(union) > 0.9
    assert torch.allclose(torch.as_tensor(alone.velocity), epdiff.project_real(known), atol=1e-6)
    expected = epdiff.shoot(known, grid_shape, spacing).numpy()
    assert np.abs(alone.displacement - expected).max() < 1e-4
    # From the prediction, the optimiser moves on; from zero with no steps nothing happens.
    refined = estimate_deformation(series, affine, volume, mask, rigid, iterations=3,
                                   predictor=predictor, masks=masks)
    assert not np.allclose(refined.velocity, alone.velocity)
    nothing = estimate_deformation(series, affine, volume, mask, rigid, iterations=0)
    assert np.all(nothing.displacement == 0)
