"""The classical brain masks and signed distance maps in torch (unimo.segment_torch,
unimo.shape_torch) against unimo.segment and unimo.shape: the same masks, voxel for voxel, and
the same maps, on real images and on the cases that take the fallbacks."""

from __future__ import annotations

import os

import nibabel as nb
import numpy as np
import pytest
import torch
from conftest import shared_data
from scipy import ndimage as ndi

from unimo_bids.unimo.segment import brain_mask, robust_thresholds
from unimo_bids.unimo.segment_torch import brain_mask_torch, robust_thresholds_torch
from unimo_bids.unimo.shape import signed_distance
from unimo_bids.unimo.shape_torch import signed_distance_torch

EXAMPLE4D = os.path.join(os.path.dirname(nb.__file__), "tests", "data", "example4d.nii.gz")


def _same_masks(volumes: np.ndarray, voxel_size) -> int:
    """Both implementations on (T, X, Y, Z) volumes; returns the mask size (checks equality)."""
    expected = brain_mask(volumes, voxel_size)
    found = brain_mask_torch(torch.as_tensor(volumes), voxel_size).numpy()
    assert found.shape == expected.shape and found.dtype == bool
    differ = int((found != expected).sum())
    assert differ == 0, f"{differ} of {int(expected.sum())} voxels differ"
    return int(expected.sum())


@pytest.mark.parametrize("zoom, voxel_size", [
    (1.0, (2.0, 2.0, 2.0)),
    ((0.5, 0.5, 0.2), (4.0, 4.0, 10.0)),  # thick slices: holes filled in the last axis' slices
    ((0.4, 0.6, 0.6), (5.0, 3.33, 3.33)),  # thick along the first axis
])
def test_masks_equal_the_numpy_masks_on_the_template(mni_template, zoom, voxel_size):
    data, _ = mni_template
    volume = ndi.zoom(data, zoom, order=1).astype(np.float32)
    assert _same_masks(volume[None], voxel_size) > 100


def test_masks_equal_the_numpy_masks_on_a_real_epi_series():
    img = nb.load(EXAMPLE4D)
    volumes = np.moveaxis(np.asarray(img.dataobj, dtype=np.float32), -1, 0)
    assert _same_masks(volumes, img.header.get_zooms()[:3]) > 1000


def test_fallbacks_and_edge_cases_match(mni_template):
    """Thresholds without a valley (noise, skewed and tiny take Otsu, two cubes the deepest
    valley; checked by hand), an object smaller than the
    opening ball, several objects (the largest kept), non-finite values, constant volumes."""
    rng = np.random.default_rng(0)
    data, _ = mni_template
    small = ndi.zoom(data, 0.5, order=1).astype(np.float32)
    shape = small.shape
    noise = rng.uniform(0, 1, shape).astype(np.float32)  # no background/object gap
    skewed = rng.exponential(1.0, shape).astype(np.float32)
    tiny = np.zeros(shape, np.float32)
    tiny[20:23, 20:23, 20:23] = 1.0  # 6 mm across: the 8 mm opening would erase it
    tiny += 0.01 * rng.standard_normal(shape).astype(np.float32)
    two = np.zeros(shape, np.float32)
    two[5:25, 5:25, 5:25] = 1.0
    two[30:40, 30:40, 30:40] = 1.0
    holes = small.copy()
    holes[np.isclose(small, small[24, 28, 24])] = np.nan
    holes[0, 0, 0] = np.inf
    volumes = np.stack([small, noise, skewed, tiny, two, holes,
                        np.full(shape, 3.0, np.float32), np.zeros(shape, np.float32)])
    finite = volumes[:5]
    np.testing.assert_allclose(robust_thresholds_torch(torch.as_tensor(finite)).numpy(),
                               robust_thresholds(finite), rtol=1e-6)
    _same_masks(volumes, (4.0, 4.0, 4.0))
    masks = brain_mask_torch(torch.as_tensor(volumes), (4.0, 4.0, 4.0)).numpy()
    assert masks[6].all() and not masks[7].any()  # constant: > 0 is all, 0 is nothing
    assert masks[3].sum() >= 27  # never emptied by the opening
    assert masks[4, 10, 10, 10] and not masks[4, 35, 35, 35]  # the larger cube


def _same_maps(masks: np.ndarray, voxel_size) -> None:
    expected = signed_distance(masks, voxel_size)
    found = signed_distance_torch(torch.as_tensor(masks), voxel_size).numpy()
    assert found.shape == expected.shape and found.dtype == np.float32
    np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-4)


def test_masks_and_maps_equal_the_numpy_ones_on_the_shared_scans():
    folder = shared_data()
    for name in ("bold/xa30_task-fa_bold.nii.gz",
                 "dwi/ds000114_sub-01_ses-test_desc-trunc_dwi.nii.gz",
                 "fetal/sub-01_run-1_T2w.nii.gz"):
        img = nb.load(str(folder / name))
        data = np.asarray(img.dataobj, dtype=np.float32)
        volumes = np.moveaxis(data, -1, 0)[:4] if data.ndim == 4 else data[None]
        voxel_size = img.header.get_zooms()[:3]
        assert _same_masks(volumes, voxel_size) > 1000, name
        if volumes.shape[0] > 1:  # the series; the 320x320 fetal slices take too long on a CPU
            _same_maps(brain_mask(volumes, voxel_size), voxel_size)


@pytest.mark.parametrize("zoom, voxel_size", [
    (0.5, (4.0, 4.0, 4.0)),  # the brute force is slow on a CPU: small grids
    ((0.5, 0.5, 0.2), (4.0, 4.0, 10.0)),
    ((0.3, 0.7, 0.6), (6.7, 2.9, 3.3)),
])
def test_distance_maps_equal_the_numpy_maps(mni_template, zoom, voxel_size):
    data, _ = mni_template
    mask = ndi.zoom(data, zoom, order=1) > 0.3 * data.max()
    _same_maps(mask, voxel_size)  # one 3D mask
    shape = mask.shape
    edge = np.zeros(shape, bool)
    edge[: shape[0] // 3] = True  # touches the field of view's border
    dot = np.zeros(shape, bool)
    dot[shape[0] // 2, shape[1] // 2, shape[2] // 2] = True
    volumes = np.stack([mask, ~mask, edge, dot, np.zeros(shape, bool), np.ones(shape, bool)])
    _same_maps(volumes, voxel_size)
    maps = signed_distance_torch(torch.as_tensor(volumes), voxel_size).numpy()
    assert (maps[4] > 0).all() and (maps[5] < 0).all()  # empty and full: +-FOV diagonal


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_segment_and_shape_interfaces_make_the_same_outputs_on_a_gpu(tmp_path):
    from unimo_bids.interfaces.segment import Segment

    img = nb.load(EXAMPLE4D)
    reference = nb.Nifti1Image(np.asarray(img.dataobj, np.float32)[..., 0], img.affine)
    reference.to_filename(tmp_path / "ref.nii.gz")
    from unimo_bids.interfaces.segment import ShapeMap

    masks, maps = {}, {}
    for device in ("cpu", "cuda"):
        (tmp_path / device).mkdir()
        out = Segment(in_file=EXAMPLE4D, reference=str(tmp_path / "ref.nii.gz"),
                      device=device).run(cwd=str(tmp_path / device))
        masks[device] = np.asarray(nb.load(out.outputs.out_masks).dataobj)
        shapes = ShapeMap(in_masks=out.outputs.out_masks, device=device).run(
            cwd=str(tmp_path / device))
        maps[device] = np.asarray(nb.load(shapes.outputs.out_file).dataobj)
    np.testing.assert_array_equal(masks["cpu"], masks["cuda"])
    np.testing.assert_allclose(maps["cpu"], maps["cuda"], atol=1e-4)


def test_nearest_voxel_distances_are_scipys_euclidean_distances():
    """The transform behind the maps (and the tracking's neighbourhood on a GPU): squared
    distances to the nearest target voxel, anisotropic voxels, volumes without a target."""
    from unimo_bids.unimo.shape_torch import nearest_voxel, within_distance_on

    rng = np.random.default_rng(3)
    targets = rng.random((3, 17, 12, 9)) > 0.97
    targets[2] = False
    voxel_size = (1.5, 2.0, 3.5)
    squared, nearest = nearest_voxel(torch.as_tensor(targets), voxel_size)
    for t in range(2):
        expected = ndi.distance_transform_edt(~targets[t], sampling=voxel_size)
        np.testing.assert_allclose(np.sqrt(squared[t].numpy()), expected, atol=1e-6)
        assert targets[t][tuple(nearest[:, t].reshape(3, -1).numpy())].all()
    assert torch.isinf(squared[2]).all()
    near = within_distance_on(targets, voxel_size, 4.0)  # the scipy path
    np.testing.assert_array_equal(near[:2], squared[:2].numpy() <= 16.0)
    assert not near[2].any()
