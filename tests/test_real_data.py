"""End to end on real scans: the Siemens XA30 multiband BOLD series and its T1w.

Runs only when UNIMO_TEST_DATA names the shared data folder (see its README.md); skipped
otherwise. The BIDS dataset is built in a temporary folder from copies of the files (the data
are not modified), checked with the npm bids-validator 1.x when ``npx`` is available, and
processed once with ``unimo-bids <bids> <out> participant -w <work> --nprocs 2``.

The BOLD series (64x64x33x20, 3.375x3.375x3.4 mm, oblique, TR 1 s) has very little motion.
Observed with v0.1: FD mean 0.255 mm (an independent scipy/Powell registration of the same
series gives 0.195 mm with the same pattern: a 0.1-0.2 mm oscillation along y), translations
below 0.25 mm, rotations below 0.1 degree, tSNR 105.7 before and 112.8 after correction. The
bounds below leave a wide margin over these numbers but fail for an engine that returns
random transforms (about 1 mm / 1 degree or more).

The ASL series of the shared folder (72x72x20x102) is not included: with it, the participant
run took 93 s on 2 shared cores (50 s without it), over the 90 s budget of this module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from conftest import CONTRACT, shared_data

from unimo_bids.cli.run import main

# The newest bids-validator 1.14.x release (1.14.13 was never published);
# `npm view bids-validator versions` lists them.
VALIDATOR = "bids-validator@1.14.14"
BOLD = "sub-01/func/sub-01_task-fa_bold.nii.gz"
T1W = "sub-01/anat/sub-01_T1w.nii.gz"
N_VOLUMES = 20


def build_dataset(data: Path, root: Path) -> Path:
    """A BIDS dataset of copies of the real BOLD and T1w scans (and their sidecars)."""
    copies = {
        "bold/xa30_task-fa_bold.nii.gz": BOLD,
        "bold/xa30_task-fa_bold.json": BOLD.replace(".nii.gz", ".json"),
        "anat/xa30_T1w.nii.gz": T1W,
        "anat/xa30_T1w.json": T1W.replace(".nii.gz", ".json"),
    }
    for source, target in copies.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / source, root / target)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "unimo-bids real-data test (dcm_qa_xa30)",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "License": "BSD-2-Clause",
        "Authors": ["Chris Rorden", "unimo-bids tests"],
        "ReferencesAndLinks": ["https://github.com/neurolabusc/dcm_qa_xa30"],
    }, indent=2))
    (root / "README").write_text(
        "Real Siemens Prisma XA30 scans from neurolabusc/dcm_qa_xa30 (BSD-2-Clause), converted\n"
        "with dcm2niix: a multiband 3 gradient-echo BOLD series (task fa, 20 volumes, TR 1 s)\n"
        "and a 2 mm MPRAGE T1w of the same subject and session. Built by the unimo-bids tests\n"
        "to check motion correction on real data.\n")
    (root / "CHANGES").write_text("1.0.0 2024-01-01\n  - Dataset built for the unimo-bids tests.\n")
    (root / "participants.tsv").write_text("participant_id\nsub-01\n")
    (root / "task-fa_bold.json").write_text(json.dumps({"TaskName": "fa"}))
    return root


@pytest.fixture(scope="module")
def real_bids(tmp_path_factory):
    data = shared_data()
    root = tmp_path_factory.mktemp("real")
    return build_dataset(data, root / "bids")


@pytest.fixture(scope="module")
def real_run(real_bids):
    root = real_bids.parent
    out, work = root / "out", root / "work"
    start = time.perf_counter()
    code = main([str(real_bids), str(out), "participant", "-w", str(work), "--nprocs", "2"])
    seconds = time.perf_counter() - start
    print(f"\nreal-data participant run: {seconds:.1f} s, exit code {code}")
    return {"code": code, "bids": real_bids, "out": out, "seconds": seconds}


def _output(out: Path, suffix: str) -> Path:
    return out / "sub-01" / "func" / f"sub-01_task-fa_{suffix}"


def _qc(out: Path) -> dict:
    return json.loads(_output(out, "desc-qc_bold.json").read_text())


def _confounds(out: Path) -> pd.DataFrame:
    return pd.read_csv(_output(out, "desc-confounds_timeseries.tsv"), sep="\t")


# --- the input dataset ---------------------------------------------------------------------


def _npx_validator(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Quiet, and quick to give up when the registry cannot be reached (npm's default retries
    # take over a minute); the user's own npm settings win.
    for key, value in {"npm_config_update_notifier": "false", "npm_config_fund": "false",
                       "npm_config_audit": "false", "npm_config_loglevel": "error",
                       "npm_config_fetch_retries": "1",
                       "npm_config_fetch_retry_mintimeout": "2000",
                       "npm_config_fetch_retry_maxtimeout": "10000"}.items():
        env.setdefault(key, value)
    return subprocess.run([shutil.which("npx"), "--yes", VALIDATOR, *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bids_validator_finds_no_errors_in_the_input(real_bids):
    if shutil.which("npx") is None:
        pytest.skip("npx is not on PATH: cannot run the npm bids-validator")
    # Fetch (or find in the npx cache) the validator first: a failure here is a registry or
    # network problem, not a problem of the dataset.
    try:
        fetched = _npx_validator("--version", timeout=150)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{VALIDATOR} could not be fetched in 150 s (registry unreachable?)")
    version = VALIDATOR.split("@")[1]
    if fetched.returncode != 0 or version not in fetched.stdout:
        pytest.skip(f"{VALIDATOR} could not be fetched: {fetched.stderr.strip()[-300:]}")

    result = _npx_validator(str(real_bids), "--json", timeout=120)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"{VALIDATOR} did not print a JSON report (exit {result.returncode}): "
                    f"{result.stdout[-500:]} {result.stderr[-500:]}")
    errors = report["issues"]["errors"]
    described = [f"{e['key']}: {e.get('reason')} "
                 f"{[f['file'].get('relativePath') for f in e.get('files', []) if f.get('file')]}"
                 for e in errors]
    assert not errors, "\n".join(described)
    warnings = sorted({w["key"] for w in report["issues"]["warnings"]})
    print(f"\n{VALIDATOR}: no errors; warnings {warnings}")
    summary = report["summary"]
    assert summary["subjects"] == ["01"] and summary["tasks"] == ["fa"]
    assert set(summary["dataTypes"]) == {"bold", "T1w"}
    assert summary["totalFiles"] == 9


def test_input_is_a_copy_of_the_shared_data(real_bids):
    data = shared_data()
    original = data / "bold" / "xa30_task-fa_bold.nii.gz"
    assert (real_bids / BOLD).read_bytes() == original.read_bytes()
    assert nb.load(real_bids / BOLD).shape == (64, 64, 33, N_VOLUMES)
    assert json.loads((real_bids / BOLD.replace(".nii.gz", ".json")).read_text())[
        "RepetitionTime"] == 1


# --- the participant run -------------------------------------------------------------------


def test_real_run_writes_the_output_contract(real_run):
    assert real_run["code"] == 0
    out = real_run["out"]
    for suffix in CONTRACT:
        path = _output(out, suffix)
        assert path.is_file() and path.stat().st_size > 0, path
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "unimo-bids"
    assert "raw" in description["DatasetLinks"]
    assert (out / ".bidsignore").is_file()
    assert (out / "sub-01.html").is_file()
    assert list((out / "sub-01" / "figures").glob("sub-01_task-fa_desc-*_bold.*"))
    assert (out / "logs" / "CITATION.md").read_text().strip()
    assert not list(out.rglob(".*.tmp*"))
    # The T1w is not a BOLD series: nothing is derived from it.
    assert not (out / "sub-01" / "anat").exists()


def test_real_outputs_load_as_a_pybids_derivatives_dataset(real_run):
    from bids import BIDSLayout

    assert real_run["code"] == 0
    layout = BIDSLayout(str(real_run["bids"]), derivatives=str(real_run["out"]),
                        validate=False)
    preproc = layout.get(scope="derivatives", desc="preproc", suffix="bold")
    images = [f for f in preproc if f.path.endswith(".nii.gz")]
    assert len(images) == 1
    assert images[0].entities["subject"] == "01" and images[0].entities["task"] == "fa"
    assert Path(images[0].path) == _output(real_run["out"], "desc-preproc_bold.nii.gz")
    assert images[0].get_metadata()["RepetitionTime"] == 1
    confounds = layout.get(scope="derivatives", desc="confounds", suffix="timeseries",
                           extension=".tsv")
    assert [Path(f.path) for f in confounds] == [
        _output(real_run["out"], "desc-confounds_timeseries.tsv")]
    # The raw series is still found in the raw scope.
    assert len(layout.get(scope="raw", suffix="bold", extension=".nii.gz")) == 1


def test_preproc_has_the_geometry_of_the_input(real_run):
    raw = nb.load(real_run["bids"] / BOLD)
    preproc = nb.load(_output(real_run["out"], "desc-preproc_bold.nii.gz"))
    assert preproc.shape == raw.shape == (64, 64, 33, N_VOLUMES)
    assert np.allclose(preproc.affine, raw.affine, atol=1e-4)
    assert preproc.get_data_dtype() == np.float32
    assert preproc.header.get_zooms()[3] == pytest.approx(1.0)
    for suffix in ("desc-hmc_boldref.nii.gz", "desc-brain_mask.nii.gz",
                   "label-brain_distmap.nii.gz", "stat-tsnr_desc-raw_boldmap.nii.gz",
                   "stat-tsnr_desc-preproc_boldmap.nii.gz"):
        img = nb.load(_output(real_run["out"], suffix))
        assert img.shape == raw.shape[:3], suffix
        assert np.allclose(img.affine, raw.affine, atol=1e-4), suffix
    assert np.all(np.isfinite(np.asarray(preproc.dataobj)))
    sidecar = json.loads(_output(real_run["out"], "desc-preproc_bold.json").read_text())
    assert sidecar["RepetitionTime"] == 1 and sidecar["SkullStripped"] is False
    assert sidecar["Sources"] == [f"bids:raw:{BOLD}"]
    mask = np.asarray(nb.load(_output(real_run["out"], "desc-brain_mask.nii.gz")).dataobj) > 0
    # A brain: a sizeable, not overwhelming part of the 22 x 22 x 11 cm field of view.
    brain_ml = mask.sum() * np.prod(raw.header.get_zooms()[:3]) / 1000
    assert 800 < brain_ml < 2500, brain_ml


def test_real_motion_is_small(real_run):
    table = _confounds(real_run["out"])
    qc = _qc(real_run["out"])
    assert len(table) == N_VOLUMES
    fd = table["framewise_displacement"].to_numpy()
    trans = table[["trans_x", "trans_y", "trans_z"]].to_numpy()
    rot = table[["rot_x", "rot_y", "rot_z"]].to_numpy()
    print(f"\nreal data: FD mean {np.nanmean(fd):.3f} mm, max {np.nanmax(fd):.3f} mm; "
          f"max |translation| {np.abs(trans).max():.3f} mm; "
          f"max |rotation| {np.degrees(np.abs(rot).max()):.3f} deg")
    assert np.isnan(fd[0]) and np.all(np.isfinite(fd[1:]))
    assert qc["fd_mean"] == pytest.approx(np.nanmean(fd), rel=1e-3)
    # Observed: FD mean 0.216 mm, max 0.355 mm; translations < 0.2 mm; rotations < 0.1 deg.
    assert np.nanmean(fd) < 0.4
    assert np.nanmax(fd) < 1.0
    assert np.abs(trans).max() < 2.0
    assert np.degrees(np.abs(rot)).max() < 1.0
    assert qc["fd_num"] <= 1  # volumes over the 0.5 mm threshold (observed: none)
    # One volume is the reference: its parameters are zero (to float32 sampling, ~1e-6).
    assert np.any(np.all(np.abs(table[["trans_x", "trans_y", "trans_z",
                                       "rot_x", "rot_y", "rot_z"]].to_numpy()) < 1e-4, axis=1))


def test_tsnr_is_not_lower_after_correction(real_run):
    qc = _qc(real_run["out"])
    print(f"\nreal data: tSNR {qc['tsnr_raw']:.1f} before, {qc['tsnr']:.1f} after correction")
    assert qc["tsnr_raw"] > 30  # a real, clean BOLD series (observed: 105.7)
    assert qc["tsnr"] >= 0.98 * qc["tsnr_raw"]
    # The same comparison on the maps, within the brain mask.
    mask = np.asarray(nb.load(_output(real_run["out"], "desc-brain_mask.nii.gz")).dataobj) > 0
    raw = np.asarray(nb.load(_output(real_run["out"], "stat-tsnr_desc-raw_boldmap.nii.gz"))
                     .dataobj)
    pre = np.asarray(nb.load(_output(real_run["out"], "stat-tsnr_desc-preproc_boldmap.nii.gz"))
                     .dataobj)
    assert np.median(pre[mask]) >= 0.98 * np.median(raw[mask])


def _correlations(series: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pearson correlation of each volume with the reference, within the mask: (T,)."""
    ref = reference[mask] - reference[mask].mean()
    out = []
    for t in range(series.shape[3]):
        vol = series[..., t][mask]
        vol = vol - vol.mean()
        out.append(vol @ ref / np.sqrt((vol @ vol) * (ref @ ref)))
    return np.array(out)


def test_correction_does_not_misalign_the_volumes(real_run):
    """After correction, the volumes match the reference at least as well as before."""
    out = real_run["out"]
    raw_img = nb.load(real_run["bids"] / BOLD)
    raw = np.asarray(raw_img.dataobj, dtype=np.float32)
    pre = np.asarray(nb.load(_output(out, "desc-preproc_bold.nii.gz")).dataobj)
    ref = np.asarray(nb.load(_output(out, "desc-hmc_boldref.nii.gz")).dataobj)
    mask = np.asarray(nb.load(_output(out, "desc-brain_mask.nii.gz")).dataobj) > 0
    # The reference is one of the input volumes (--hmc-ref auto picks a volume).
    matches = [t for t in range(N_VOLUMES) if np.array_equal(raw[..., t], ref)]
    assert len(matches) == 1
    before = 1 - _correlations(raw, ref, mask)
    after = 1 - _correlations(pre, ref, mask)
    print(f"\nreal data: mean 1 - correlation with the reference {before.mean():.5f} before, "
          f"{after.mean():.5f} after correction")
    # Observed: 0.00091 before, 0.00077 after.
    assert after.mean() <= before.mean()
    assert np.all(after < 0.01)


def test_real_transforms_are_rigid_and_reproduce_preproc(real_run):
    import nitransforms as nt
    from nitransforms.resampling import apply

    out = real_run["out"]
    xfm = nt.linear.load(_output(out, "from-orig_to-boldref_mode-image_desc-hmc_xfm.txt"),
                         fmt="itk")
    matrices = np.asarray(xfm.matrix)
    assert matrices.shape == (N_VOLUMES, 4, 4)
    rotations = matrices[:, :3, :3]
    assert np.allclose(rotations @ np.swapaxes(rotations, 1, 2), np.eye(3), atol=1e-5)
    assert np.allclose(np.linalg.det(rotations), 1.0, atol=1e-5)
    # Resampling the most displaced volume through its transform onto the boldref grid (an
    # oblique, anisotropic grid) reproduces that volume of desc-preproc.
    fd = _confounds(out)["framewise_displacement"].to_numpy()
    index = int(np.nanargmax(fd))
    raw = nb.load(real_run["bids"] / BOLD)
    boldref = nb.load(_output(out, "desc-hmc_boldref.nii.gz"))
    preproc = np.asarray(nb.load(_output(out, "desc-preproc_bold.nii.gz")).dataobj)
    moved = np.asarray(apply(xfm[index], raw.slicer[..., index], reference=boldref,
                             order=1).dataobj)
    grid = np.indices(raw.shape[:3]).reshape(3, -1)
    grid_h = np.vstack([grid, np.ones(grid.shape[1])])
    source = (np.linalg.inv(raw.affine) @ matrices[index] @ boldref.affine @ grid_h)[:3]
    inside = np.all((source >= 0) & (source <= np.array(raw.shape[:3])[:, None] - 1), axis=0)
    inside = inside.reshape(raw.shape[:3])
    assert inside.mean() > 0.9
    scale = np.abs(preproc[..., index]).max()
    assert np.abs(moved - preproc[..., index])[inside].max() < 1e-3 * scale


def test_template_check_keeps_a_good_real_mask(real_run, monkeypatch):
    """--template with the shared TEMPLATEFLOW_HOME: MNI152NLin2009cAsym's brain mask is fitted
    to the real BOLD reference's mask, agrees with it, and the mask is kept."""
    data = shared_data()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(data / "templateflow"))
    root = real_run["bids"].parent
    out = root / "out-template"
    code = main([str(real_run["bids"]), str(out), "participant", "-w", str(root / "work"),
                 "--nprocs", "2", "--template", "MNI152NLin2009cAsym"])
    assert code == 0
    sidecar = json.loads(_output(out, "desc-brain_mask.json").read_text())
    report = sidecar["TemplateCheck"]
    assert report["template"] == "MNI152NLin2009cAsym"
    assert report["dice"] > 0.85 and not report["corrected"]
    kept = nb.load(_output(out, "desc-brain_mask.nii.gz")).get_fdata()
    assert np.array_equal(kept, nb.load(_output(real_run["out"],
                                                "desc-brain_mask.nii.gz")).get_fdata())


# --- QC metrics against independent computations, the group level and the report ----------


def _steady_state(out: Path) -> int:
    return sum(c.startswith("non_steady_state_outlier") for c in _confounds(out).columns)


def test_real_tsnr_maps_match_numpy_and_nipype(real_run, tmp_path, monkeypatch):
    from nipype.algorithms.confounds import TSNR

    out = real_run["out"]
    skip = _steady_state(out)
    mask = np.asarray(nb.load(_output(out, "desc-brain_mask.nii.gz")).dataobj) > 0
    qc = _qc(out)
    for desc, series_file in (("preproc", _output(out, "desc-preproc_bold.nii.gz")),
                              ("raw", real_run["bids"] / BOLD)):
        data = np.asarray(nb.load(series_file).dataobj, dtype=np.float64)[..., skip:]
        with np.errstate(invalid="ignore", divide="ignore"):  # background: 0 / 0
            expected = data.mean(axis=3) / data.std(axis=3)
        tsnr = np.asarray(nb.load(_output(out, f"stat-tsnr_desc-{desc}_boldmap.nii.gz")).dataobj)
        np.testing.assert_allclose(tsnr[mask], expected[mask], rtol=1e-4)
        assert qc["tsnr" if desc == "preproc" else "tsnr_raw"] == pytest.approx(
            np.median(expected[mask]), rel=1e-4)
        # nipype's TSNR (what MRIQC uses) on the same steady-state volumes.
        steady = tmp_path / f"{desc}_steady.nii.gz"
        img = nb.load(series_file)
        nb.Nifti1Image(data.astype(np.float32), img.affine, img.header).to_filename(steady)
        monkeypatch.chdir(tmp_path)
        nipype_tsnr = np.asarray(nb.load(TSNR(in_file=[str(steady)]).run().outputs.tsnr_file)
                                 .dataobj)
        # nipype computes in float32 (observed: up to 0.6 % apart from the float64 values).
        np.testing.assert_allclose(tsnr[mask], nipype_tsnr[mask], rtol=1e-2)
    assert qc["tsnr_gain"] == pytest.approx(qc["tsnr"] / qc["tsnr_raw"], rel=1e-6)


def test_real_fd_and_outliers_match_hand_computation(real_run):
    """FD (Power) from the six written parameters by hand; outliers from the thresholds."""
    out = real_run["out"]
    table = _confounds(out)
    qc = _qc(out)
    params = table[["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]].to_numpy()
    steps = np.abs(np.diff(params, axis=0))
    fd = steps[:, :3].sum(axis=1) + qc["fd_radius"] * steps[:, 3:].sum(axis=1)
    assert np.isnan(table["framewise_displacement"][0])
    np.testing.assert_allclose(table["framewise_displacement"][1:], fd, rtol=1e-5, atol=1e-6)
    assert qc["fd_mean"] == pytest.approx(fd.mean(), rel=1e-5)
    assert qc["fd_max"] == pytest.approx(fd.max(), rel=1e-5)
    over = np.flatnonzero(np.concatenate([[0.0], fd]) > qc["fd_spike_threshold"])
    assert qc["fd_num"] == len(over)
    assert qc["fd_perc"] == pytest.approx(100 * len(over) / N_VOLUMES)
    dvars = table["std_dvars"].to_numpy()
    flagged = set(over) | set(np.flatnonzero(np.nan_to_num(dvars) > qc["dvars_spike_threshold"]))
    outlier_columns = [c for c in table.columns if c.startswith("motion_outlier")]
    assert sorted(int(table[c].to_numpy().argmax()) for c in outlier_columns) == sorted(flagged)


def test_real_group_level_has_one_row_per_run(real_run):
    out = real_run["out"]
    assert main([str(real_run["bids"]), str(out), "group"]) == 0
    table = pd.read_csv(out / "group_bold.tsv", sep="\t", dtype={"subject": str})
    assert len(table) == 1  # one run in this dataset
    row = table.iloc[0]
    assert row["bids_name"] == "sub-01_task-fa_bold" and row["subject"] == "01"
    qc = _qc(out)
    for metric in ("tsnr", "fd_mean", "fd_num", "dvars_std", "usable_fraction"):
        assert row[metric] == pytest.approx(qc[metric], rel=1e-3)
    assert (out / "group_bold.html").stat().st_size > 1000


def test_real_report_in_a_browser(real_run, tmp_path):
    """The xa30 report in headless Chromium: every figure loads, nothing is logged as an error.

    The screenshot is kept in pytest's temporary folder (printed) for a human to look at.
    """
    from browser import find_chromium, inspect_page

    if find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium): "
                    "cannot open the report in a browser")
    report = real_run["out"] / "sub-01.html"
    screenshot = tmp_path / "sub-01_report.png"
    seen = inspect_page(report, screenshot)
    print(f"\nreport screenshot: {screenshot} ({seen['height']} px high)")
    names = sorted(Path(src).name for src, _ in seen["images"])
    assert names == sorted(f"sub-01_task-fa_desc-{desc}_bold.svg" for desc in (
        "mask", "beforeafter", "tsnr", "motion", "unimo", "carpet"))
    assert all(width > 0 for _, width in seen["images"]), seen["images"]
    assert seen["console_errors"] == []
    assert screenshot.stat().st_size > 50_000
