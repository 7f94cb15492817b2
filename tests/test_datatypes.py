"""Series beyond BOLD (--datatypes): DWI gradient rotation and shells, ASL label/control
alternation, and the DWI series of the shared data through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from conftest import coarse_grid, shared_data
from scipy.spatial.transform import Rotation

from unimo_bids.cli.run import main
from unimo_bids.unimo.dwi import (
    _voxel_to_world_rotation,
    angle_between_deg,
    b0_indices,
    rotate_bvecs,
    shell_signal_z,
)
from unimo_bids.unimo.geometry import mean_displacement, world_points
from unimo_bids.unimo.hmc import estimate_head_motion
from unimo_bids.unimo.segment import brain_mask


@pytest.mark.parametrize("flip", [False, True], ids=["radiological", "neurological"])
def test_rotated_bvecs_undo_a_known_head_rotation(flip):
    """Volume t was acquired with the head rotated by Q_t: the scanner gradient that gives the
    contrast of head-frame direction g is Q_t g. After correction the b-vectors must be g
    again, in the file convention of either voxel handedness."""
    rng = np.random.default_rng(0)
    affine = np.diag([-2.0 if flip else 2.0, 2.0, 2.5, 1.0])
    affine[:3, :3] = Rotation.from_euler("xyz", [10, -5, 20], degrees=True).as_matrix() @ \
        affine[:3, :3]
    n = 12
    truth = rng.normal(size=(3, n))
    truth /= np.linalg.norm(truth, axis=0)
    truth[:, :2] = 0  # two b=0 volumes
    head = Rotation.random(n, random_state=3).as_matrix()
    to_world = _voxel_to_world_rotation(affine)
    acquired = np.linalg.solve(to_world, np.einsum("tij,jt->it", head, to_world @ truth))
    transforms = np.tile(np.eye(4), (n, 1, 1))
    transforms[:, :3, :3] = head
    transforms[:, :3, 3] = rng.uniform(-5, 5, (n, 3))  # translations do not turn gradients
    corrected = rotate_bvecs(acquired, affine, transforms)
    assert np.all(corrected[:, :2] == 0)
    assert angle_between_deg(corrected[:, 2:], truth[:, 2:]).max() < 1e-6
    # the identity leaves the file unchanged
    assert np.allclose(rotate_bvecs(acquired, affine, np.tile(np.eye(4), (n, 1, 1))), acquired)


def test_shell_outlier_measure_compares_volumes_within_their_shell():
    bvals = np.array([0, 0, 0, 1000, 1000, 1000, 1000, 1000, 2000, 2000, 2000])
    signal = np.array([900, 910, 905, 300, 305, 298, 302, 150, 120, 121, 119.5])
    z = shell_signal_z(signal, bvals)
    assert list(b0_indices(bvals)) == [0, 1, 2]
    assert z[7] < -3.5  # a dropout in the b=1000 shell
    assert np.abs(np.delete(z, 7)).max() < 3.5  # the b=2000 shell is not an outlier of b=1000


def test_asl_alternation_without_motion_gives_near_zero_motion(mni_template):
    """Label and control alternate (a 2 % signal in grey-matter-like tissue), nothing moves:
    the estimated motion against a control volume stays near zero."""
    data, affine = mni_template
    shape, grid = coarse_grid(data.shape, affine, 3.4)
    from unimo_bids.unimo.synthetic import simulate_series

    still = simulate_series(data, affine, np.tile(np.eye(4), (1, 1, 1)), shape, grid)[..., 0]
    rng = np.random.default_rng(1)
    tissue = (still > np.percentile(still, 60)) & (still < np.percentile(still, 85))
    series = np.repeat(still[..., None], 12, axis=-1)
    series[..., 0::2] += 0.02 * still[..., None] * tissue[..., None]  # label volumes
    series += 0.005 * still.max() * rng.standard_normal(series.shape).astype(np.float32)
    mask = brain_mask(still[None], (3.4,) * 3)[0]
    result = estimate_head_motion(series.astype(np.float32), grid, series[..., 1], mask)
    points = world_points(mask.shape, grid, mask)[::5]
    error = mean_displacement(np.tile(np.eye(4), (12, 1, 1)), result.transforms, points)
    print(f"ASL alternation, no motion: max error {error.max():.4f} mm")
    assert error.max() < 0.05, error


def _dwi_dataset(root: Path) -> Path:
    data = shared_data()
    source = data / "dwi" / "ds000114_sub-01_ses-test_desc-trunc_dwi"
    folder = root / "sub-01" / "dwi"
    folder.mkdir(parents=True)
    for extension in (".nii.gz", ".bval", ".bvec"):
        shutil.copyfile(f"{source}{extension}", folder / f"sub-01_dwi{extension}")
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "dwi", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    return root


@pytest.fixture(scope="module")
def dwi_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dwi")
    bids = _dwi_dataset(root / "bids")
    code = main([str(bids), str(root / "out"), "participant", "-w", str(root / "work"),
                 "--nprocs", "2", "--datatypes", "dwi", "--skip-bids-validation"])
    return {"code": code, "bids": bids, "out": root / "out"}


def test_real_dwi_runs_through_the_cli_and_loads_as_derivatives(dwi_run):
    assert dwi_run["code"] == 0
    folder = dwi_run["out"] / "sub-01" / "dwi"
    preproc = nb.load(folder / "sub-01_desc-preproc_dwi.nii.gz")
    assert preproc.shape[-1] == 20
    bvecs = np.loadtxt(folder / "sub-01_desc-preproc_dwi.bvec")
    bvals = np.loadtxt(folder / "sub-01_desc-preproc_dwi.bval")
    original = np.loadtxt(dwi_run["bids"] / "sub-01" / "dwi" / "sub-01_dwi.bvec")
    assert bvecs.shape == (3, 20) and list(bvals[:7]) == [0] * 7
    assert np.all(bvecs[:, :7] == 0) and np.allclose(np.linalg.norm(bvecs[:, 7:], axis=0), 1)
    # the head barely moved: the rotated table stays within a few degrees of the original
    assert angle_between_deg(bvecs[:, 7:], original[:, 7:]).max() < 5.0
    confounds = (folder / "sub-01_desc-confounds_timeseries.tsv").read_text().splitlines()
    for column in ("bval", "dwi_signal_z", "dwi_outlier"):
        assert column in confounds[0].split("\t")
    assert "non_steady_state" not in confounds[0]  # b=0 volumes are not dummy scans

    from bids import BIDSLayout

    layout = BIDSLayout(dwi_run["out"], validate=False, is_derivative=True)
    found = layout.get(suffix="dwi", desc="preproc", extension=".nii.gz")
    assert [f.entities["subject"] for f in found] == ["01"]


def test_group_level_collects_the_dwi_series(dwi_run, capsys):
    import pandas as pd

    assert main([str(dwi_run["bids"]), str(dwi_run["out"]), "group"]) == 0
    table = pd.read_csv(dwi_run["out"] / "group_dwi.tsv", sep="\t", dtype={"subject": str})
    assert list(table["bids_name"]) == ["sub-01_dwi"] and list(table["subject"]) == ["01"]
    assert "fd_mean" in table.columns
    assert "group report: DWI" in (dwi_run["out"] / "group_dwi.html").read_text()
    assert not (dwi_run["out"] / "group_bold.tsv").exists()


def test_real_dwi_b0_volumes_are_registered_to_the_b0_reference(dwi_run):
    """The reference is a b=0 volume and the b=0 volumes move little (under 1 mm)."""
    import pandas as pd

    folder = dwi_run["out"] / "sub-01" / "dwi"
    table = pd.read_csv(folder / "sub-01_desc-confounds_timeseries.tsv", sep="\t")
    b0 = table[table["bval"] == 0]
    assert b0[["trans_x", "trans_y", "trans_z"]].abs().max().max() < 1.0


def test_known_rotation_of_the_real_dwi_series_is_undone_and_bvecs_follow():
    """Every volume but the reference (volume 0, b=0) of the real DWI series is moved by a
    known rigid transform (up to 6 degrees and 4 mm) and its b-vector turned with the head.
    The estimates must change by exactly those transforms (the series' own motion is
    unknown, so the unmoved series is the baseline), and the rotated b-vectors must be those
    of the unmoved series."""
    import torch

    from unimo_bids.unimo.geometry import grid_center, rigid_matrix
    from unimo_bids.unimo.resample import resample, voxel_map

    source = shared_data() / "dwi" / "ds000114_sub-01_ses-test_desc-trunc_dwi"
    img = nb.load(f"{source}.nii.gz")
    series = np.asarray(img.dataobj, dtype=np.float32)
    bvecs = np.loadtxt(f"{source}.bvec")
    n = series.shape[-1]
    voxel = img.header.get_zooms()[:3]
    reference = series[..., 0]
    mask = brain_mask(reference[None], voxel)[0]
    baseline = estimate_head_motion(series, img.affine, reference, mask).transforms

    rng = np.random.default_rng(5)
    center = grid_center(reference.shape, img.affine)
    known = np.stack([np.eye(4)] + [rigid_matrix(rng.uniform(-6, 6, 3), rng.uniform(-4, 4, 3),
                                                 center) for _ in range(n - 1)])
    affine_t = torch.as_tensor(img.affine)
    volumes = torch.as_tensor(np.moveaxis(series, -1, 0))[:, None]
    # volume t now shows the head moved by known[t]: it reads the original at known[t]^-1
    maps = voxel_map(torch.linalg.inv(torch.as_tensor(known)), affine_t, affine_t).float()
    moved = np.moveaxis(resample(volumes, maps, reference.shape)[:, 0].numpy(), 0, -1)
    to_world = _voxel_to_world_rotation(img.affine)
    acquired = np.linalg.solve(to_world, np.einsum("tij,jt->it", known[:, :3, :3],
                                                   to_world @ bvecs))
    estimated = estimate_head_motion(moved, img.affine, reference, mask).transforms

    points = world_points(mask.shape, img.affine, mask)[::7]
    error = mean_displacement(estimated, known @ baseline, points)
    print(f"known-motion error: mean {error[1:].mean():.3f} mm, max {error.max():.3f} mm")
    assert error[1:].mean() < 0.3 and error.max() < 0.6, error.round(2)
    turned = rotate_bvecs(acquired, img.affine, estimated)
    expected = rotate_bvecs(bvecs, img.affine, baseline)
    weighted = b0_indices(np.loadtxt(f"{source}.bval")).max() + 1
    angles = angle_between_deg(turned[:, weighted:], expected[:, weighted:])
    print(f"b-vector angle to the unmoved series: max {angles.max():.3f} deg")
    assert angles.max() < 1.0


def test_large_known_motion_of_the_real_dwi_series_loses_no_volume():
    """Up to 20 degrees and 15 mm on every volume, as the app runs it (network start, per-volume
    masks and shape maps): the network's start once won the coarse level on b=1000 volumes
    and sent 5 of 13 to 67-89 mm; the finest residual now arbitrates between starts."""
    import torch

    from unimo_bids.unimo.geometry import grid_center, rigid_matrix
    from unimo_bids.unimo.network import load_network
    from unimo_bids.unimo.resample import resample, voxel_map
    from unimo_bids.unimo.shape import signed_distance

    source = shared_data() / "dwi" / "ds000114_sub-01_ses-test_desc-trunc_dwi"
    img = nb.load(f"{source}.nii.gz")
    series = np.asarray(img.dataobj, dtype=np.float32)
    voxel = img.header.get_zooms()[:3]
    network = load_network(None)

    def app_estimate(data):
        masks = brain_mask(np.moveaxis(data, -1, 0), voxel)
        maps = np.moveaxis(signed_distance(masks, voxel), 0, -1).astype(np.float32)
        return estimate_head_motion(data, img.affine, data[..., 0], masks[0], maps,
                                    maps[..., 0], network=network).transforms, masks[0]

    rng = np.random.default_rng(11)
    center = grid_center(series.shape[:3], img.affine)
    known = np.stack([np.eye(4)] + [rigid_matrix(rng.uniform(-20, 20, 3),
                                                 rng.uniform(-15, 15, 3), center)
                                    for _ in range(series.shape[-1] - 1)])
    affine_t = torch.as_tensor(img.affine)
    maps = voxel_map(torch.linalg.inv(torch.as_tensor(known)), affine_t, affine_t).float()
    moved = np.moveaxis(resample(torch.as_tensor(np.moveaxis(series, -1, 0))[:, None], maps,
                                 series.shape[:3])[:, 0].numpy(), 0, -1)
    baseline, _ = app_estimate(series)
    estimated, mask = app_estimate(moved)
    error = mean_displacement(estimated, known @ baseline,
                              world_points(mask.shape, img.affine, mask)[::7])
    print(f"large known motion, DWI: mean {error.mean():.2f} mm, max {error.max():.2f} mm")
    assert error.max() < 2.0, error.round(1)  # measured: max 1.11 mm


def test_dwi_without_or_with_a_wrong_gradient_table_fails_alone(tmp_path):
    from unimo_bids.cli.bids import collect_runs
    from unimo_bids.interfaces.dwi import read_gradients
    from unimo_bids.interfaces.series import SeriesError

    root = tmp_path / "bids"
    folder = root / "sub-01" / "dwi"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "dwi", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    for run in (1, 2):
        nb.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)).to_filename(
            folder / f"sub-01_run-{run}_dwi.nii.gz")
    np.savetxt(folder / "sub-01_run-2_dwi.bval", [[0, 1000, 1000]], fmt="%g")
    np.savetxt(folder / "sub-01_run-2_dwi.bvec", [[0, 1, 0], [0, 0, 1], [0, 0, 0]], fmt="%g")
    runs, errors, warnings = collect_runs(root, tmp_path / "work", validate=False,
                                          datatypes=("dwi",))
    assert [Path(run.path).name for run in runs] == ["sub-01_run-2_dwi.nii.gz"]
    assert runs[0].reference_candidates == [0] and not runs[0].require_tr
    assert len(errors) == 1 and "run-1_dwi.nii.gz: no .bval/.bvec file" in errors[0][1]
    assert any("DWI is experimental" in warning for warning in warnings)
    bval, bvec = runs[0].gradients
    with pytest.raises(SeriesError, match="3 b-values for 4 volumes"):
        read_gradients(bval, bvec, 4)
    np.savetxt(bvec, [[0, 1], [0, 0], [0, 0]], fmt="%g")
    with pytest.raises(SeriesError, match=r"\(3, 2\) b-vectors for 3 b-values"):
        read_gradients(bval, bvec, 3)


def test_real_asl_runs_through_the_cli_with_a_control_volume_reference(tmp_path):
    """The real pCASL series (its first 40 of 102 volumes, for time) in perf/, with an
    aslcontext.tsv: its odd volumes are the brighter ones, hence the controls. The reference
    is chosen among them, the label volumes are not shifted as a class, and the outputs load
    as derivatives."""
    source = shared_data() / "asl" / "dcmqaasl_9_pcasl_2d"
    folder = tmp_path / "bids" / "sub-01" / "perf"
    folder.mkdir(parents=True)
    img = nb.load(f"{source}.nii.gz")
    raw = np.asarray(img.dataobj, dtype=np.float32)[..., :40]
    nb.Nifti1Image(raw, img.affine, img.header).to_filename(folder / "sub-01_asl.nii.gz")
    shutil.copyfile(f"{source}.json", folder / "sub-01_asl.json")
    means = raw.mean(axis=(0, 1, 2))
    assert means[1::2].mean() > means[0::2].mean()  # controls carry no label: brighter
    kinds = ["label", "control"] * (raw.shape[-1] // 2)
    (folder / "sub-01_aslcontext.tsv").write_text("volume_type\n" + "\n".join(kinds) + "\n")
    (tmp_path / "bids" / "dataset_description.json").write_text(json.dumps(
        {"Name": "asl", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    out = tmp_path / "out"
    code = main([str(tmp_path / "bids"), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--nprocs", "2", "--datatypes", "perf", "--skip-bids-validation"])
    assert code == 0
    result = out / "sub-01" / "perf"
    assert nb.load(result / "sub-01_desc-preproc_asl.nii.gz").shape == raw.shape
    reference = np.asarray(nb.load(result / "sub-01_desc-hmc_aslref.nii.gz").dataobj)
    closest = int(np.argmin(np.abs(raw - reference[..., None]).mean(axis=(0, 1, 2))))
    assert kinds[closest] == "control", closest
    confounds = np.genfromtxt(result / "sub-01_desc-confounds_timeseries.tsv", names=True,
                              delimiter="\t")
    shifts = np.stack([confounds[f"trans_{axis}"] for axis in "xyz"], axis=1)
    # The labelling must not shift the label volumes as a class: each label volume against
    # the mean of its neighbouring controls, averaged over the run.
    labels = np.arange(0, raw.shape[-1], 2)
    neighbours = np.stack([shifts[[j for j in (i - 1, i + 1) if 0 <= j < len(shifts)]].mean(0)
                           for i in labels])
    class_offset = np.abs((shifts[labels] - neighbours).mean(axis=0)).max()
    print(f"real ASL: label volumes {class_offset:.3f} mm from their neighbouring controls")
    assert class_offset < 0.1, f"{class_offset:.3f} mm"  # measured 0.026 mm
    assert np.nanmax(confounds["framewise_displacement"]) < 1.0  # measured 0.48 mm

    from bids import BIDSLayout

    layout = BIDSLayout(out, validate=False, is_derivative=True)
    assert len(layout.get(suffix="asl", desc="preproc", extension=".nii.gz")) == 1


def _pet_frames(mni_template, motions, times):
    """Synthetic PET frames on a 4 mm grid: grey matter bright early (flow), white matter
    rising late (uptake), CSF washing out; 6 mm FWHM, 3 % noise; frame t moved by motions[t]."""
    from scipy import ndimage

    from unimo_bids.unimo.synthetic import simulate_series

    data, affine = mni_template
    grey = (data > np.percentile(data, 70)) & (data < np.percentile(data, 88))
    white = data >= np.percentile(data, 88)
    csf = (data > np.percentile(data, 55)) & ~grey & ~white
    shape, grid = coarse_grid(data.shape, affine, 4.0)
    rng = np.random.default_rng(0)
    frames = []
    for time, motion in zip(times, motions):
        activity = ((3 * np.exp(-time / 3) + 1) * grey + (0.3 + 1.6 * (1 - np.exp(-time / 10)))
                    * white + (2 * np.exp(-time / 1.5) + 0.1) * csf + 0.05)
        activity = ndimage.gaussian_filter(activity.astype(np.float32), 6 / 2.355 / 2)
        frame = simulate_series(activity, affine, motion[None], shape, grid, order=1)[..., 0]
        frames.append(frame + 0.03 * frame.max() * rng.standard_normal(frame.shape))
    return np.stack(frames, -1).astype(np.float32), grid


def test_pet_frames_whose_contrast_changes_are_realigned(mni_template, tmp_path):
    """Eight PET-like frames (grey/white contrast inverts between the first and the last)
    moved by known transforms (up to 4 degrees, 5 mm), through the CLI: the reference is a
    late frame, and every frame is realigned to it."""
    from unimo_bids.unimo.geometry import centroids, rigid_matrix

    data, affine = mni_template
    times = np.array([0.5, 1, 2, 4, 8, 15, 25, 40])  # minutes
    rng = np.random.default_rng(0)
    center = centroids(data > np.percentile(data, 55), affine)
    motions = np.stack([np.eye(4)] + [rigid_matrix(rng.uniform(-4, 4, 3), rng.uniform(-5, 5, 3),
                                                   center) for _ in times[1:]])
    frames, grid = _pet_frames(mni_template, motions, times)
    folder = tmp_path / "bids" / "sub-01" / "pet"
    folder.mkdir(parents=True)
    nb.Nifti1Image(frames, grid).to_filename(folder / "sub-01_pet.nii.gz")
    (folder / "sub-01_pet.json").write_text(json.dumps(
        {"FrameTimesStart": list(times * 60), "TracerName": "synthetic"}))
    (tmp_path / "bids" / "dataset_description.json").write_text(json.dumps(
        {"Name": "pet", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    out = tmp_path / "out"
    code = main([str(tmp_path / "bids"), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--datatypes", "pet", "--skip-bids-validation"])
    assert code == 0
    from nitransforms.linear import load as load_transforms

    result = out / "sub-01" / "pet"
    estimated = load_transforms(
        result / "sub-01_from-orig_to-petref_mode-image_desc-hmc_xfm.txt", fmt="itk").matrix
    reference = int(np.argmin(np.abs(estimated - np.eye(4)).sum(axis=(1, 2))))
    assert reference >= len(times) - len(times) // 3  # a late frame
    mask = nb.load(result / "sub-01_desc-brain_mask.nii.gz")
    points = world_points(mask.shape, mask.affine, np.asarray(mask.dataobj) > 0)
    # frame t shows the anatomy at motions[t] x: reference -> frame t is motions[t]^-1 m[ref]
    error = mean_displacement(estimated, np.linalg.inv(motions) @ motions[reference], points)
    print(f"PET frames: mean error {error.mean():.3f} mm, max {error.max():.3f} mm")
    assert error.mean() < 0.5 and error.max() < 1.5, error.round(2)  # measured 0.16 / 0.73

    from bids import BIDSLayout

    layout = BIDSLayout(out, validate=False, is_derivative=True)
    assert len(layout.get(suffix="pet", desc="preproc", extension=".nii.gz")) == 1


def test_an_inverted_contrast_is_registered_with_intensity_bins(mni_template):
    """A volume whose contrast is inverted (and squared) cannot be fitted by a linear
    intensity relation; the binned relation recovers its known motion."""
    import torch

    from unimo_bids.unimo.geometry import rigid_matrix
    from unimo_bids.unimo.register import register_rigid
    from unimo_bids.unimo.synthetic import simulate_series

    data, affine = mni_template
    shape, grid = coarse_grid(data.shape, affine, 3.0)
    mask = brain_mask(simulate_series(data, affine, np.eye(4)[None], shape, grid)[None, ..., 0],
                      (3.0,) * 3)[0]
    center = world_points(mask.shape, grid, mask).mean(axis=0)
    motion = rigid_matrix((5, -4, 6), (3, -2, 4), center)
    fixed = simulate_series(data, affine, np.eye(4)[None], shape, grid)[..., 0]
    inverted = (data.max() - data) ** 2 * (data > 0.05 * data.max())
    moving = simulate_series(inverted, affine, motion[None], shape, grid)[..., 0]
    weight = torch.as_tensor(mask.astype(np.float32))
    points = world_points(mask.shape, grid, mask)
    errors = {}
    for bins in (0, 16):
        found = register_rigid(torch.as_tensor(fixed)[None], torch.as_tensor(moving)[None, None],
                               grid, grid, weight, intensity_bins=bins)
        errors[bins] = mean_displacement(found.transforms, np.linalg.inv(motion)[None],
                                         points)[0]
    print(f"inverted contrast: linear {errors[0]:.2f} mm, binned {errors[16]:.3f} mm")
    assert errors[16] < 0.3 and errors[0] > 1.0, errors


def test_alternating_controls_are_found_through_drift_and_noise():
    from unimo_bids.unimo.reference import alternating_controls

    rng = np.random.default_rng(4)
    count = 60
    drift = 1000 + 0.8 * np.arange(count) + 5 * np.sin(np.arange(count) / 7)
    labelled = np.where(np.arange(count) % 2 == 0, -3.0, 0.0)  # even volumes labelled
    found = alternating_controls(drift + labelled + rng.normal(0, 1.0, count))
    assert found is not None and list(found[:3]) == [1, 3, 5]
    found = alternating_controls(drift + np.roll(labelled, 1) + rng.normal(0, 1.0, count))
    assert found is not None and list(found[:3]) == [0, 2, 4]  # odd labelled: even controls
    assert alternating_controls(drift + rng.normal(0, 1.0, count)) is None  # no alternation
    assert alternating_controls(drift[:4]) is None


def test_real_asl_without_aslcontext_takes_the_brighter_volumes_as_controls(tmp_path):
    """No aslcontext.tsv: the real pCASL series' alternation names the odd volumes controls,
    with a warning; the real BOLD series shows no alternation."""
    from unimo_bids.cli.bids import collect_runs

    data = shared_data()
    bids = tmp_path / "bids"
    for folder, name, source in (("perf", "sub-01_asl", data / "asl" / "dcmqaasl_9_pcasl_2d"),
                                 ("perf", "sub-02_asl", data / "bold" / "xa30_task-fa_bold")):
        subject = name.split("_")[0]
        (bids / subject / folder).mkdir(parents=True)
        shutil.copyfile(f"{source}.nii.gz", bids / subject / folder / f"{name}.nii.gz")
        shutil.copyfile(f"{source}.json", bids / subject / folder / f"{name}.json")
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "asl", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    runs, errors, warnings = collect_runs(bids, tmp_path / "work", datatypes=("perf",),
                                          validate=False)
    assert not errors
    by_subject = {run.subject: run for run in runs}
    assert by_subject["01"].reference_candidates == list(range(1, 102, 2))
    assert by_subject["02"].reference_candidates is None
    assert any("sub-01_asl.nii.gz: no sub-01_aslcontext.tsv; its odd volumes" in w
               for w in warnings)
    assert any("sub-02_asl.nii.gz: no sub-02_aslcontext.tsv, and no label/control alternation"
               in w for w in warnings)
