"""Tracked masks for anatomy that moves inside still tissue (the fetal mode): the engine
(unimo.tracking), the user's reference mask checks, and the CLI's --moving-anatomy path.

The moving-brain series: nilearn's MNI152 brain (template x brain mask) with a dark 4 mm fluid
rim, moved by known rigid motions (up to 25 deg, 8 mm) inside a still, smooth random texture,
on a 4 mm grid.
"""

from __future__ import annotations

import json

from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from conftest import coarse_grid
from scipy import ndimage
from test_cli import write_dataset

from unimo_bids.cli.run import main
from unimo_bids.interfaces.segment import load_user_mask
from unimo_bids.unimo.geometry import mean_displacement, rigid_matrix, voxel_sizes, world_points
from unimo_bids.unimo.hmc import registration_weight
from unimo_bids.unimo.synthetic import simulate_series
from unimo_bids.unimo.shape import dice
from unimo_bids.unimo.tracking import carry_mask, track_moving_anatomy

POSES = [((0, 0, 0), (0, 0, 0)), ((25, 0, 0), (5, 0, 0)), ((0, -20, 10), (0, 8, -4)),
         ((15, 15, -15), (-6, 3, 6)), ((-10, 0, 20), (4, -8, 0)), ((5, 5, 5), (2, 2, 2))]


@pytest.fixture(scope="module")
def moving_brain(mni_template):
    """(series (X,Y,Z,T), affine, truth (T,4,4) reference -> volume, true masks (T,X,Y,Z))."""
    return moving_brain_series(mni_template, POSES)


def moving_brain_series(mni_template, poses):
    """The moving-brain series (module note) with volume t at poses[t] = (degrees, mm)."""
    from nilearn.datasets import load_mni152_brain_mask

    data, affine = mni_template
    brain = np.asarray(load_mni152_brain_mask(resolution=2).dataobj) > 0
    sizes = voxel_sizes(affine)
    grown = ndimage.distance_transform_edt(~brain, sampling=sizes) <= 4.0
    layer = np.where(brain, data / np.percentile(data[brain], 99), 0.05)
    center = world_points(brain.shape, affine, brain).mean(0)
    motions = np.stack([rigid_matrix(r, t, center) for r, t in poses])
    shape, grid = coarse_grid(data.shape, affine, 4.0)
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 0.8)
    texture = 0.2 + 1.0 * (texture - texture.min()) / np.ptp(texture)
    weight = np.clip(simulate_series(grown.astype(np.float32), affine, motions, shape, grid,
                                     order=1), 0, 1)
    moved = simulate_series(ndimage.gaussian_filter(layer, 1.0), affine, motions, shape, grid)
    series = weight * moved + (1 - weight) * texture[..., None]
    series += 0.01 * rng.standard_normal(series.shape)
    masks = simulate_series(brain.astype(np.float32), affine, motions, shape, grid, order=1)
    truth = np.linalg.inv(motions) @ motions[0]
    return (series.astype(np.float32), grid, truth,
            np.ascontiguousarray(np.moveaxis(masks > 0.5, -1, 0)))


def _errors(transforms, truth, mask, affine):
    return mean_displacement(transforms, truth, world_points(mask.shape, affine, mask))[1:]


def test_tracking_follows_a_brain_moving_in_still_tissue(moving_brain):
    series, affine, truth, masks = moving_brain
    tracked = track_moving_anatomy(series, affine, series[..., 0], masks[0])
    errors = _errors(tracked.transforms, truth, masks[0], affine)
    assert errors.max() < 0.6, errors
    assert tracked.rounds == 1 and np.isnan(tracked.agreement).all()
    assert tracked.masks.shape == masks.shape
    assert dice(tracked.masks, masks)[1:].min() > 0.9


def test_segmentation_and_registration_iterate_until_they_agree(moving_brain):
    series, affine, truth, masks = moving_brain
    # a segmentation that spills one voxel over the brain, as a real segmenter might
    segmented = np.stack([ndimage.binary_dilation(m) for m in masks])
    tracked = track_moving_anatomy(series, affine, series[..., 0], masks[0], segmented)
    assert 2 <= tracked.rounds <= 3
    assert tracked.change_mm < 0.2
    assert np.all(tracked.agreement > 0.8), tracked.agreement
    assert _errors(tracked.transforms, truth, masks[0], affine).max() < 0.6


def test_an_implausible_segmentation_is_not_used(moving_brain):
    """Masks of the whole body (as the classical method gives on fetal MRI) disagree with the
    tracked masks and do not spoil the registration."""
    series, affine, truth, masks = moving_brain
    body = np.ones_like(masks)
    tracked = track_moving_anatomy(series, affine, series[..., 0], masks[0], body, max_rounds=2)
    assert np.all(tracked.agreement < 0.8)
    assert _errors(tracked.transforms, truth, masks[0], affine).max() < 0.6


def test_a_brain_turned_by_any_angle_is_found_by_the_rotation_search(mni_template):
    """Turns of 90-170 degrees: the first registration's 24 cube-rotation starts reach every
    volume; without them (no network here) some volumes stay in a wrong pose."""
    poses = [((0, 0, 0), (0, 0, 0)), ((170, 0, 0), (4, 0, 0)), ((0, 120, 30), (0, -5, 3)),
             ((90, -90, 0), (3, 3, -3)), ((-140, 40, 160), (-2, 6, 0))]
    series, affine, truth, masks = moving_brain_series(mni_template, poses)
    found = track_moving_anatomy(series, affine, series[..., 0], masks[0])
    errors = _errors(found.transforms, truth, masks[0], affine)
    print(f"turned brain, rotation search: errors {np.round(errors, 2).tolist()} mm")
    assert errors.max() < 0.6, errors
    lost = track_moving_anatomy(series, affine, series[..., 0], masks[0],
                                rotation_search=False)
    assert _errors(lost.transforms, truth, masks[0], affine).max() > 5.0


def test_carried_mask_matches_the_moved_mask(moving_brain):
    series, affine, truth, masks = moving_brain
    carried = carry_mask(masks[0], affine, truth)
    assert dice(carried, masks).min() > 0.95


def test_registration_weight_shrinks_but_never_vanishes():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 5:15, 5:15] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    assert registration_weight(mask, affine, 2.0).sum() > mask.sum()
    shrunk = registration_weight(mask, affine, -2.5)
    assert 0 < shrunk.sum() < mask.sum() and np.all(shrunk <= mask)
    assert np.array_equal(registration_weight(mask, affine, -50.0), mask.astype(np.float32))


def test_dice_of_empty_masks_is_one():
    empty = np.zeros((2, 3, 3, 3), bool)
    assert np.array_equal(dice(empty, empty), [1.0, 1.0])


def test_tracking_refuses_an_empty_reference_mask(moving_brain):
    series, affine, _, masks = moving_brain
    with pytest.raises(ValueError, match="empty"):
        track_moving_anatomy(series, affine, series[..., 0], np.zeros_like(masks[0]))


# --------------------------------------------------------------------------------------------
# the user's reference mask


def _save(path, data, affine):
    nb.Nifti1Image(np.asarray(data, dtype=np.uint8), affine).to_filename(path)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("empty", "the mask is empty"),
    ("shape", "does not match the series grid"),
    ("affine", "grid is"),
    ("4d", "must be 3D"),
    ("garbage", "cannot read the mask"),
])
def test_bad_user_masks_get_one_line_errors(tmp_path, moving_brain, case, message):
    series, affine, _, masks = moving_brain
    reference = nb.Nifti1Image(series[..., 0], affine)
    path = tmp_path / "mask.nii.gz"
    if case == "empty":
        _save(path, np.zeros_like(masks[0]), affine)
    elif case == "shape":
        _save(path, masks[0][:-1], affine)
    elif case == "affine":
        shifted = affine.copy()
        shifted[:3, 3] += 4.0
        _save(path, masks[0], shifted)
    elif case == "4d":
        _save(path, np.stack([masks[0]] * 2, -1), affine)
    else:
        path.write_bytes(b"not a nifti")
    with pytest.raises(ValueError) as info:
        load_user_mask(str(path), reference)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


# --------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def fetal_dataset(tmp_path_factory, moving_brain):
    series, affine, truth, masks = moving_brain
    root = tmp_path_factory.mktemp("fetal") / "bids"
    relative = "sub-01/func/sub-01_task-fetal_bold.nii.gz"
    write_dataset(root, {relative: series}, affine)
    derivatives = root.parent / "masks" / "sub-01" / "func"
    derivatives.mkdir(parents=True)
    mask_file = _save(derivatives / "sub-01_task-fetal_desc-brain_mask.nii.gz", masks[0], affine)
    return root, mask_file, relative


@pytest.mark.slow
def test_moving_anatomy_through_the_cli(tmp_path, fetal_dataset, moving_brain, capsys):
    _, affine, truth, masks = moving_brain
    root, mask_file, relative = fetal_dataset
    out = tmp_path / "out"
    code = main([str(root), str(out), "participant", "--moving-anatomy", "--derivatives",
                 str(root.parent / "masks"), "--seg-model", "classical", "--nprocs", "1",
                 "--omp-nthreads", "1", "-w", str(tmp_path / "work"), "--template", "none",
                 "--write-volume-masks"])
    assert code == 0, capsys.readouterr().err
    prefix = out / relative.replace("_bold.nii.gz", "")
    tracked = nb.load(f"{prefix}_desc-tracked_mask.nii.gz")
    assert tracked.shape == masks.shape[1:] + (len(masks),)
    tracked_masks = np.moveaxis(np.asarray(tracked.dataobj) > 0, -1, 0)
    assert dice(tracked_masks, masks)[1:].min() > 0.9
    # every volume's own (classical) segmentation, beside the tracked masks
    segmented = nb.load(f"{prefix}_desc-segmented_mask.nii.gz")
    assert segmented.shape == tracked.shape and np.asarray(segmented.dataobj).any()
    for name in ("tracked", "segmented"):
        sidecar = json.loads(Path(f"{prefix}_desc-{name}_mask.json").read_text())
        assert sidecar["Type"] == "Brain" and sidecar["Sources"] == [f"bids:raw:{relative}"]
    used = np.asarray(nb.load(f"{prefix}_desc-brain_mask.nii.gz").dataobj) > 0
    assert np.array_equal(used, masks[0])  # the derivatives' mask, on the first volume
    from nitransforms.linear import load as load_xfm

    estimated = load_xfm(f"{prefix}_from-orig_to-boldref_mode-image_desc-hmc_xfm.txt",
                         fmt="itk").matrix
    assert _errors(estimated, truth, masks[0], affine).max() < 0.6
    confounds = (prefix.parent / f"{prefix.name}_desc-confounds_timeseries.tsv").read_text()
    assert "mask_agreement" in confounds.splitlines()[0]
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "moving inside still tissue" in citation


@pytest.mark.parametrize("options, message", [
    (["--moving-anatomy", "--no-refine"], "--no-refine cannot be combined"),
    (["--ref-mask", "MISSING"], "does not exist"),
    (["--ref-mask", "WRONG"], "does not match the series grid"),
    (["--derivatives", "MISSING"], "is not a folder"),
])
def test_mask_options_are_checked_before_any_work(tmp_path, fetal_dataset, moving_brain,
                                                  capsys, options, message):
    root, _, _ = fetal_dataset
    wrong = _save(tmp_path / "wrong.nii.gz", moving_brain[3][0][:-2], moving_brain[1])
    options = [{"MISSING": str(tmp_path / "nothing"), "WRONG": wrong}.get(o, o)
               for o in options]
    code = main([str(root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                 "--template", "none", *options])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not (tmp_path / "out" / "sub-01").exists()


def test_a_missing_template_says_how_to_fetch_it(tmp_path, fetal_dataset, capsys):
    root, _, _ = fetal_dataset
    code = main([str(root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                 "--template", "MNI152NLin2009cAsym"])
    err = capsys.readouterr().err
    assert code == 2 and "MNI152NLin2009cAsym" in err and "templateflow" in err.lower()
    assert not (tmp_path / "out" / "sub-01").exists()


PACKAGED_SEGMENTER = Path(__file__).resolve().parents[1] / "unimo_bids" / "data" / "weights" / \
    "unimo_segmenter_cpu.pt"


@pytest.mark.slow
def test_trained_segmenter_through_the_cli(tmp_path, fetal_dataset, moving_brain, capsys):
    """--moving-anatomy's default segmenter: the packaged U-Net segments every volume;
    tracking checks its masks against the tracked ones (mask_agreement) and still follows the
    brain."""
    _, affine, truth, masks = moving_brain
    root, _, relative = fetal_dataset
    out = tmp_path / "out"
    code = main([str(root), str(out), "participant", "--moving-anatomy", "--derivatives",
                 str(root.parent / "masks"), "--nprocs", "1", "--omp-nthreads", "1",
                 "-w", str(tmp_path / "work"), "--template", "none"])
    assert code == 0, capsys.readouterr().err
    prefix = out / relative.replace("_bold.nii.gz", "")
    confounds = pd.read_csv(f"{prefix}_desc-confounds_timeseries.tsv", sep="\t")
    assert confounds["mask_agreement"].notna().all()
    # without --write-volume-masks the per-volume masks stay in the work directory
    assert not list(out.rglob("*desc-tracked_mask*")) and not list(out.rglob("*segmented*"))
    assert "U-Net" in (out / "logs" / "CITATION.md").read_text()
    from nitransforms.linear import load as load_xfm

    estimated = load_xfm(f"{prefix}_from-orig_to-boldref_mode-image_desc-hmc_xfm.txt",
                         fmt="itk").matrix
    assert _errors(estimated, truth, masks[0], affine).max() < 0.6


def test_seg_model_choices():
    from argparse import Namespace

    from unimo_bids.cli.run import seg_model_path

    assert seg_model_path(Namespace(seg_model="auto", moving_anatomy=True)) == PACKAGED_SEGMENTER
    assert seg_model_path(Namespace(seg_model="auto", moving_anatomy=False)) is None
    assert seg_model_path(Namespace(seg_model="packaged", moving_anatomy=False)) == \
        PACKAGED_SEGMENTER
    assert seg_model_path(Namespace(seg_model="classical", moving_anatomy=True)) is None
    assert seg_model_path(Namespace(seg_model="my.pt", moving_anatomy=True)).name == "my.pt"
    assert PACKAGED_SEGMENTER.is_file()


def test_a_bad_segmenter_file_is_refused_before_any_work(tmp_path, fetal_dataset, capsys):
    root, _, _ = fetal_dataset
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not torchscript")
    code = main([str(root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                 "--template", "none", "--seg-model", str(bogus)])
    err = capsys.readouterr().err
    assert code == 2 and "--seg-model" in err and str(bogus) in err
    assert not (tmp_path / "out" / "sub-01").exists()
