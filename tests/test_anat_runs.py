"""Aligning the runs of one anatomical contrast (--datatypes anat): stacks of different slice
orientation, moved by known transforms, on real images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch
from conftest import shared_data

from unimo_bids.cli.run import main
from unimo_bids.unimo.geometry import centroids, mean_displacement, rigid_matrix, world_points
from unimo_bids.unimo.geometry import cube_rotations
from unimo_bids.unimo.runs import align_run
from unimo_bids.unimo.segment import reference_mask
from unimo_bids.unimo.shape import dice
from unimo_bids.unimo.synthetic import simulate_series

# Slices along world y (a coronal stack): in-plane axes x and z, a right-handed grid.
CORONAL_AXES = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def coronal_stack(volume, affine, moved, in_plane_mm, thick_mm, shape, center):
    """Resample ``volume`` (X, Y, Z) on a coronal thick-slice grid of ``shape`` centred on
    ``moved`` applied to ``center``, with its content moved by ``moved`` (world -> world):
    the new stack's world point y shows the volume at moved^-1 y. Returns (data, affine)."""
    grid = np.eye(4)
    grid[:3, :3] = CORONAL_AXES * np.array([in_plane_mm, in_plane_mm, thick_mm])
    target = moved[:3, :3] @ center + moved[:3, 3]
    grid[:3, 3] = target - grid[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return _resampled(volume, affine, np.linalg.inv(moved), shape, grid), grid


def _resampled(volume, affine, transform, shape, grid) -> np.ndarray:
    """``volume`` (on ``affine``) read on ``grid`` of ``shape`` through ``transform`` (world
    grid -> world volume), trilinear: simulate_series' convention, one volume."""
    return simulate_series(volume, affine, np.asarray(transform)[None], shape, grid,
                           order=1)[..., 0]


def test_cube_rotations_are_the_24_proper_rotations():
    rotations = cube_rotations()
    assert rotations.shape == (24, 3, 3)
    assert np.allclose(rotations[0], np.eye(3))
    assert np.allclose(np.linalg.det(rotations), 1.0)
    assert np.allclose(rotations @ rotations.transpose(0, 2, 1), np.eye(3))
    assert len({r.round().astype(int).tobytes() for r in rotations}) == 24


def test_one_moving_volume_from_several_starts_equals_the_volume_repeated(mni_template):
    """register_rigid samples a single moving volume once for all its starts; the result is
    that of the volume repeated once per start."""
    from unimo_bids.unimo.register import DEFAULT_LEVELS, register_rigid

    volume, affine = mni_template
    fixed = torch.as_tensor(volume[::2, ::2, ::2].copy())[None]
    grid = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    center = centroids(fixed[0].numpy() > np.percentile(volume, 60), grid)
    starts = np.stack([rigid_matrix(angles, shift, center) for angles, shift in
                       (((0, 0, 0), (0, 0, 0)), ((8, -5, 3), (4, 2, -3)), ((-6, 4, 9), (-5, 0, 2)))])
    moving = torch.as_tensor(np.roll(volume[::2, ::2, ::2], 2, axis=0).copy())[None, None]
    once = register_rigid(fixed, moving, grid, grid, init=starts, levels=DEFAULT_LEVELS[:2])
    repeated = register_rigid(fixed, moving.repeat(3, 1, 1, 1, 1), grid, grid, init=starts,
                              levels=DEFAULT_LEVELS[:2])
    assert np.allclose(once.transforms, repeated.transforms, atol=1e-6)
    assert np.allclose(once.residual, repeated.residual, atol=1e-6)


@pytest.mark.parametrize("angles", [(25, -10, 15), (120, 40, -30), (170, 10, 60)])
def test_a_coronal_stack_moved_by_any_rotation_is_aligned_to_an_axial_run(mni_template,
                                                                          angles):
    """Reference: the MNI template on 2 x 2 x 4 mm axial slices; run: a 2 x 2 x 4 mm coronal
    stack of it moved by a known rigid transform, with noise; no masks of the run."""
    volume, affine = mni_template
    axial = affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    reference = volume[:, :, ::2]
    ref_mask = reference_mask(reference, (2.0, 2.0, 4.0))
    center = centroids(ref_mask, axial)
    moved = rigid_matrix(angles, (8.0, -6.0, 5.0), center)
    run, run_affine = coronal_stack(volume, affine, moved, 2.0, 4.0, (100, 30, 100), center)
    rng = np.random.default_rng(0)
    run = 1.7 * run + 0.02 * run.max() * rng.standard_normal(run.shape).astype(np.float32)

    found = align_run(reference, axial, ref_mask, run, run_affine)
    error = mean_displacement(found.transform[None], moved[None],
                              world_points(ref_mask.shape, axial, ref_mask))[0]
    print(f"coronal stack moved by {angles}: {error:.3f} mm")
    assert error < 0.5, f"{error:.3f} mm"  # measured 0.09-0.10 mm


def _t1w_dataset(root: Path, volume, affine, runs) -> Path:
    """A BIDS dataset of sub-01 with one T1w run per (data, affine) in ``runs``."""
    folder = root / "sub-01" / "anat"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "anat", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    for index, (data, grid) in enumerate(runs, start=1):
        nb.Nifti1Image(np.asarray(data, np.float32), grid).to_filename(
            folder / f"sub-01_run-{index}_T1w.nii.gz")
    return root


def _run_anat(bids: Path, tmp_path: Path, *options: str) -> tuple[int, Path]:
    """``unimo-bids <bids> <tmp>/out participant --datatypes anat``: (exit code, output)."""
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--datatypes", "anat", "--skip-bids-validation", *options])
    return code, out


def _estimate(raw_file: Path, aligned_file: Path) -> np.ndarray:
    """The transform reference -> run that an aligned run's affine holds: A' = T^-1 A."""
    return nb.load(raw_file).affine @ np.linalg.inv(nb.load(aligned_file).affine)


def test_anat_runs_are_aligned_through_the_cli(mni_template, tmp_path):
    """Two T1w runs of different slice orientation, the second moved by 60 degrees: aligned
    to the first, voxels unchanged, and the outputs load as a pybids derivatives dataset."""
    volume, affine = mni_template
    axial = affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    reference = volume[:, :, ::2]
    center = centroids(reference_mask(reference, (2.0, 2.0, 4.0)), axial)
    moved = rigid_matrix((60, -20, 10), (5.0, 3.0, -4.0), center)
    run, run_affine = coronal_stack(volume, affine, moved, 2.0, 4.0, (100, 30, 100), center)
    bids = _t1w_dataset(tmp_path / "bids", volume, affine,
                        [(reference, axial), (run, run_affine)])
    code, out = _run_anat(bids, tmp_path)
    assert code == 0
    folder = out / "sub-01" / "anat"
    aligned = nb.load(folder / "sub-01_run-2_desc-aligned_T1w.nii.gz")
    raw = nb.load(bids / "sub-01" / "anat" / "sub-01_run-2_T1w.nii.gz")
    assert np.array_equal(np.asarray(aligned.dataobj), np.asarray(raw.dataobj))
    # the new affine undoes the known motion: voxel -> moved^-1 (run world)
    error = np.abs(aligned.affine - np.linalg.inv(moved) @ raw.affine)[:3].max()
    assert error < 0.5, error
    sidecar = json.loads((folder / "sub-01_run-2_desc-aligned_T1w.json").read_text())
    assert abs(sidecar["RigidAlignment"]["RotationDegrees"]
               - np.degrees(np.arccos((np.trace(moved[:3, :3]) - 1) / 2))) < 0.5
    assert (folder / "sub-01_run-2_from-orig_to-T1wref_mode-image_xfm.txt").is_file()
    report = (out / "sub-01.html").read_text()
    assert "Aligned runs" in report and "sub-01_run-2_desc-alignment_T1w.svg" in report
    assert (out / "sub-01" / "figures" / "sub-01_run-2_desc-alignment_T1w.svg").stat().st_size > 0
    assert main([str(bids), str(out), "group"]) == 0  # nothing to collect, not an error

    from bids import BIDSLayout

    layout = BIDSLayout(out, validate=False, is_derivative=True)
    found = layout.get(suffix="T1w", desc="aligned", extension=".nii.gz")
    assert sorted(f.entities["run"] for f in found) == [1, 2]


def test_a_single_anat_run_has_nothing_to_align(mni_template, tmp_path, capsys):
    volume, affine = mni_template
    bids = _t1w_dataset(tmp_path / "bids", volume, affine, [(volume, affine)])
    code, _ = _run_anat(bids, tmp_path)
    assert code == 2
    assert "no anatomical contrast has two or more runs" in capsys.readouterr().err


def _fetal_dataset(root: Path, extra_run=None) -> tuple[Path, Path]:
    """The two real fetal stacks, plus ``extra_run`` (data, mask, affine) as run 3 if given;
    their manual masks in a derivatives folder, named as the fetal toolkits name them."""
    data = shared_data() / "fetal"
    bids, masks = root / "bids", root / "masks"
    for folder in (bids / "sub-01" / "anat", masks / "sub-01" / "anat"):
        folder.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "fetal", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    for run in (1, 2):
        shutil.copyfile(data / f"sub-01_run-{run}_T2w.nii.gz",
                        bids / "sub-01" / "anat" / f"sub-01_run-{run}_T2w.nii.gz")
        shutil.copyfile(data / f"sub-01_run-{run}_T2w_desc-brain_mask.nii.gz",
                        masks / "sub-01" / "anat" / f"sub-01_run-{run}_T2w_desc-brain_mask.nii.gz")
    if extra_run is not None:
        image, mask, grid = extra_run
        nb.Nifti1Image(image.astype(np.float32), grid).to_filename(
            bids / "sub-01" / "anat" / "sub-01_run-3_T2w.nii.gz")
        nb.Nifti1Image(mask.astype(np.uint8), grid).to_filename(
            masks / "sub-01" / "anat" / "sub-01_run-3_T2w_desc-brain_mask.nii.gz")
    return bids, masks


def _load(path):
    img = nb.load(path)
    return np.asarray(img.dataobj, np.float32), img.affine


def _carried_mask(mask, mask_affine, transform, shape, affine) -> np.ndarray:
    """A run's mask seen from the reference grid through transform (reference -> run)."""
    return _resampled(mask, mask_affine, transform, shape, affine) > 0.5


def test_real_fetal_stacks_of_different_orientation_are_aligned(tmp_path):
    """Runs 1 and 2: the real HASTE stacks (axial). Run 3: run 2 resliced into a coronal
    stack and moved by a known 100-degree rotation. Run 2's manual mask, carried by its
    estimate, must overlap run 1's better than before; run 3's estimate must equal the
    known motion composed with run 2's."""
    data = shared_data() / "fetal"
    run2, affine2 = _load(data / "sub-01_run-2_T2w.nii.gz")
    mask2, _ = _load(data / "sub-01_run-2_T2w_desc-brain_mask.nii.gz")
    center = centroids(mask2 > 0, affine2)
    moved = rigid_matrix((100, 30, -20), (10.0, -5.0, 8.0), center)
    stack3, affine3 = coronal_stack(run2, affine2, moved, 1.125, 3.3, (200, 40, 200), center)
    mask3, _ = coronal_stack(mask2, affine2, moved, 1.125, 3.3, (200, 40, 200), center)
    bids, masks = _fetal_dataset(tmp_path, (stack3, mask3 > 0.5, affine3))
    code, out = _run_anat(bids, tmp_path, "--derivatives", str(masks))
    assert code == 0
    folder = out / "sub-01" / "anat"
    estimates = {run: _estimate(bids / "sub-01" / "anat" / f"sub-01_run-{run}_T2w.nii.gz",
                                folder / f"sub-01_run-{run}_desc-aligned_T2w.nii.gz")
                 for run in (2, 3)}
    mask1, affine1 = _load(data / "sub-01_run-1_T2w_desc-brain_mask.nii.gz")
    points = world_points(mask1.shape, affine1, mask1 > 0)
    consistency = mean_displacement(estimates[3][None], (moved @ estimates[2])[None], points)[0]
    print(f"stack 2 resliced and moved: {consistency:.3f} mm from stack 2's own alignment")
    assert consistency < 1.0, f"{consistency:.3f} mm"  # measured 0.15 mm

    before = dice(mask1 > 0, _carried_mask(mask2 > 0, affine2, np.eye(4), mask1.shape, affine1))
    after = dice(mask1 > 0, _carried_mask(mask2 > 0, affine2, estimates[2], mask1.shape,
                                          affine1))
    print(f"manual masks of stacks 1 and 2: Dice {before:.3f} before, {after:.3f} after")
    assert after > before and after > 0.9, (before, after)  # measured 0.916 -> 0.933
    aligned_mask = nb.load(folder / "sub-01_run-3_desc-brain_mask.nii.gz")
    assert np.allclose(aligned_mask.affine, nb.load(
        folder / "sub-01_run-3_desc-aligned_T2w.nii.gz").affine)

    from bids import BIDSLayout

    layout = BIDSLayout(out, validate=False, is_derivative=True)
    found = layout.get(suffix="T2w", desc="aligned", extension=".nii.gz")
    assert sorted(f.entities["run"] for f in found) == [1, 2, 3]


def test_an_anat_run_that_is_not_3d_fails_its_group_alone(mni_template, tmp_path, capsys):
    """A 4D T1w beside a 3D one: their group fails with one line naming the file, nothing of
    it is written, and the exit code is 1."""
    volume, affine = mni_template
    bids = _t1w_dataset(tmp_path / "bids", volume, affine,
                        [(volume, affine), (np.stack([volume] * 2, -1), affine)])
    code, out = _run_anat(bids, tmp_path)
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("ERROR:")]
    assert len(errors) == 1
    assert (f"sub-01_run-2_T1w.nii.gz: an anatomical run must be a 3D image, got shape "
            f"{(*volume.shape, 2)}") in errors[0]
    assert not list(out.glob("sub-01/anat/*"))


def test_real_fetal_stacks_with_the_packaged_segmenter(tmp_path):
    """No user masks: --seg-model segments each stack (Dice 0.90 against the manual masks),
    and the alignment stays close to the one the manual masks give."""
    data = shared_data() / "fetal"
    bids, _ = _fetal_dataset(tmp_path)  # its masks folder is not given: no user masks
    segmenter = Path(__file__).resolve().parents[1] / "unimo_bids" / "data" / "weights" / \
        "unimo_segmenter_cpu.pt"
    code, out = _run_anat(bids, tmp_path, "--seg-model", str(segmenter))
    assert code == 0
    folder = out / "sub-01" / "anat"
    sidecar = json.loads((folder / "sub-01_run-2_desc-aligned_T2w.json").read_text())
    assert sidecar["RigidAlignment"]["Masks"] == "segmenter"
    estimate = _estimate(bids / "sub-01" / "anat" / "sub-01_run-2_T2w.nii.gz",
                         folder / "sub-01_run-2_desc-aligned_T2w.nii.gz")
    run1, affine1 = _load(data / "sub-01_run-1_T2w.nii.gz")
    mask1 = _load(data / "sub-01_run-1_T2w_desc-brain_mask.nii.gz")[0] > 0
    run2, affine2 = _load(data / "sub-01_run-2_T2w.nii.gz")
    mask2 = _load(data / "sub-01_run-2_T2w_desc-brain_mask.nii.gz")[0] > 0
    manual = align_run(run1, affine1, mask1, run2, affine2, mask2).transform
    gap = mean_displacement(estimate[None], manual[None],
                            world_points(mask1.shape, affine1, mask1)[::7])[0]
    print(f"segmenter masks against manual masks: alignments {gap:.2f} mm apart")
    assert gap < 1.0, f"{gap:.2f} mm"  # measured 0.06 mm (0.72 with the previous segmenter)


def test_runs_are_grouped_by_contrast_and_session(mni_template, tmp_path):
    """Two T1w runs form a group (run 1 first); a lone T2w is named in a warning."""
    from unimo_bids.cli.bids import collect_runs

    volume, affine = mni_template
    bids = _t1w_dataset(tmp_path / "bids", volume, affine,
                        [(volume, affine), (volume, affine), (volume, affine)])
    anat = bids / "sub-01" / "anat"
    (anat / "sub-01_run-3_T1w.nii.gz").rename(anat / "sub-01_T2w.nii.gz")
    (anat / "sub-01_run-2_T1w.nii.gz").rename(anat / "sub-01_run-10_T1w.nii.gz")
    runs, errors, warnings = collect_runs(bids, tmp_path / "work", datatypes=("anat",),
                                          validate=False)
    assert not errors and len(runs) == 1
    assert [Path(p).name for p in runs[0].paths] == ["sub-01_run-1_T1w.nii.gz",
                                                      "sub-01_run-10_T1w.nii.gz"]
    assert any("1 anatomical image(s) have no other run of the same contrast" in w
               and w.endswith("sub-01_T2w.nii.gz") for w in warnings)
