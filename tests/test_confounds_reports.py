"""Tests of the confounds/QC interface, the reportlets and the HTML/TSV reports.

All computations are real (no mocks): a small 4D series is built from nilearn's MNI152 template
at 4 mm, its volumes moved by known rigid transforms with scipy.ndimage.affine_transform.
"""

import json
import os
import shutil
import xml.etree.ElementTree as ET

os.environ.setdefault("NIPYPE_NO_ET", "1")

import nibabel as nb  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from scipy import ndimage  # noqa: E402

from unimo_bids.interfaces.confounds import SeriesConfounds, compute_dvars  # noqa: E402
from unimo_bids.unimo.geometry import (  # noqa: E402
    consecutive_rmsd,
    euler_to_matrix,
    grid_center,
    matrix_to_euler,
    motion_parameters,
    rigid_from_motion_parameters,
)
from browser import find_chromium, inspect_page  # noqa: E402
from unimo_bids.interfaces.reports import (  # noqa: E402
    SeriesReportlets,
    build_group_report,
    build_subject_report,
    plot_unimo_diagnostics,
)

# Known motion: trans (mm) then rot (rad); row 5 is a large jump and row 6 jumps back.
PARAMS = np.array(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.1, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.1, 0.05, 0.0, 0.002, 0.0, 0.0],
        [0.15, 0.05, -0.1, 0.002, -0.001, 0.001],
        [0.15, 0.05, -0.1, 0.002, -0.001, 0.001],
        [2.0, -1.0, 1.5, 0.03, 0.02, -0.04],
        [0.2, 0.05, -0.1, 0.002, -0.001, 0.001],
        [0.2, 0.06, -0.1, 0.003, -0.001, 0.001],
    ]
)
N_DUMMY = 1


def _rot(axis, a):
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _save(data, affine, path, tr=None):
    img = nb.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    if tr is not None:
        img.header.set_zooms(tuple(np.sqrt((affine[:3, :3] ** 2).sum(0))) + (tr,))
    img.to_filename(str(path))
    return str(path)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from nilearn.datasets import load_mni152_template

    root = tmp_path_factory.mktemp("series")
    tpl = load_mni152_template(resolution=2)
    ref = np.asarray(tpl.dataobj, dtype=np.float32)[::2, ::2, ::2] * 1000.0
    affine = tpl.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    mask = ref > 0.2 * ref.max()
    center = grid_center(ref.shape, affine)

    # Independent construction of the transforms: x -> R (x - c) + c + t, R = Rz Ry Rx
    xfms = np.tile(np.eye(4), (len(PARAMS), 1, 1))
    for t, (tx, ty, tz, rx, ry, rz) in enumerate(PARAMS):
        R = _rot("z", rz) @ _rot("y", ry) @ _rot("x", rx)
        xfms[t, :3, :3] = R
        xfms[t, :3, 3] = R @ (-center) + center + np.array([tx, ty, tz])

    rng = np.random.default_rng(42)
    sigma = 0.01 * ref.max()
    raw, pre = [], []
    for M in xfms:
        # volume_t(M x) = ref(x)  =>  volume_t(y) = ref(M^-1 y), in voxel coordinates
        vox = np.linalg.inv(affine) @ np.linalg.inv(M) @ affine
        moved = ndimage.affine_transform(ref, vox[:3, :3], vox[:3, 3], order=1)
        raw.append(moved + rng.normal(0, sigma, ref.shape))
        pre.append(ref + rng.normal(0, sigma, ref.shape))
    raw = np.stack(raw, -1).astype(np.float32)
    pre = np.stack(pre, -1).astype(np.float32)

    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    dist = ndimage.distance_transform_edt(~mask, sampling=zooms) - ndimage.distance_transform_edt(
        mask, sampling=zooms
    )
    files = {
        "raw": _save(raw, affine, root / "raw.nii.gz", tr=2.0),
        "pre": _save(pre, affine, root / "pre.nii.gz", tr=2.0),
        "mask": _save(mask.astype(np.uint8), affine, root / "mask.nii.gz"),
        "ref": _save(ref, affine, root / "ref.nii.gz"),
        "dist": _save(dist.astype(np.float32), affine, root / "dist.nii.gz"),
        "xfm": str(root / "xfm.npy"),
    }
    np.save(files["xfm"], xfms)

    diag = pd.DataFrame({"unimo_lambda": np.linspace(0.2, 0.9, len(PARAMS)),
                         "unimo_disagreement": np.arange(len(PARAMS), dtype=float)})
    diag.iloc[0, 1] = np.nan
    files["diag"] = str(root / "diag.tsv")
    diag.to_csv(files["diag"], sep="\t", index=False, na_rep="n/a")
    files["diag_meta"] = str(root / "diag.json")
    with open(files["diag_meta"], "w") as fobj:
        json.dump({"unimo_lambda": {"Description": "SO(3) fusion weight", "Units": "arbitrary"}},
                  fobj)

    return {"root": root, "files": files, "affine": affine, "mask": mask, "center": center,
            "xfms": xfms, "pre": pre, "raw": raw, "ref": ref}


@pytest.fixture(scope="module")
def confounds(series, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("confounds")
    f = series["files"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        res = SeriesConfounds(
            in_raw=f["raw"],
            in_preproc=f["pre"],
            in_mask=f["mask"],
            in_transforms=f["xfm"],
            non_steady_state=N_DUMMY,
            diagnostics=f["diag"],
            diagnostics_meta=f["diag_meta"],
        ).run()
    out = res.outputs
    return {
        "tsv": out.out_confounds,
        "meta": out.out_confounds_meta,
        "qc": out.out_qc,
        "tsnr_raw": out.out_tsnr_raw,
        "tsnr_pre": out.out_tsnr_preproc,
        "table": pd.read_csv(out.out_confounds, sep="\t", na_values=["n/a"]),
        "cwd": cwd,
    }


# ---------------------------------------------------------------------------------------------
# Pure computations
# ---------------------------------------------------------------------------------------------
def test_euler_roundtrip():
    rng = np.random.default_rng(0)
    angles = rng.uniform(-0.5, 0.5, size=(20, 3))
    R = euler_to_matrix(np.stack([angles[:, 0], angles[:, 1], angles[:, 2]], axis=-1))
    for a, Ri in zip(angles, R):
        np.testing.assert_allclose(Ri, _rot("z", a[2]) @ _rot("y", a[1]) @ _rot("x", a[0]),
                                   atol=1e-14)
    np.testing.assert_allclose(matrix_to_euler(R), angles, atol=1e-12)
    c = np.array([1.0, -20.0, 7.5])
    params = np.hstack((rng.normal(0, 2, (20, 3)), angles))
    np.testing.assert_allclose(
        motion_parameters(rigid_from_motion_parameters(params, c), c), params, atol=1e-12
    )


def test_grid_center():
    affine = np.array([[2.0, 0, 0, -10], [0, 3.0, 0, 5], [0, 0, 4.0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(grid_center((11, 5, 2), affine), [0.0, 11.0, 2.0])


def test_rmsd_closed_form_matches_brute_force():
    rng = np.random.default_rng(1)
    pts = rng.normal(0, 40, size=(500, 3)) + [5, -10, 20]
    params = np.hstack((rng.normal(0, 1, (4, 3)), rng.normal(0, 0.05, (4, 3))))
    M = rigid_from_motion_parameters(params, [0.0, 0.0, 0.0])
    got = consecutive_rmsd(M, pts)
    assert np.isnan(got[0])
    hom = np.c_[pts, np.ones(len(pts))]
    for t in range(1, 4):
        d = (hom @ M[t].T)[:, :3] - (hom @ M[t - 1].T)[:, :3]
        assert got[t] == pytest.approx(np.sqrt((d ** 2).sum(1).mean()), rel=1e-10)


def test_dvars_fallback_matches_direct_formula(series):
    """The vectorised DVARS equals a per-voxel computation of Nichols' standardised DVARS."""
    std, nstd, vx = compute_dvars(series["pre"], series["mask"])
    data = series["pre"][series["mask"]].astype(np.float64)
    data = data / np.median(data) * 1000.0
    iqr = (np.percentile(data, 75, axis=1, method="lower")
           - np.percentile(data, 25, axis=1, method="lower")) / 1.349
    keep = iqr > 1e-7
    data, iqr = data[keep], iqr[keep]
    sub = np.arange(0, len(data), 97)  # per-voxel AR(1) on a subset, checked separately
    for i in sub[:50]:
        x = data[i] - data[i].mean()
        r = np.correlate(x, x, mode="full")[len(x) - 1:]
        ar1_loop = r[1] / r[0]
        x2 = data[i:i + 1] - data[i:i + 1].mean()
        ar1_vec = (x2[:, :-1] * x2[:, 1:]).sum() / (x2 ** 2).sum()
        assert ar1_loop == pytest.approx(ar1_vec, rel=1e-9)
    diff = np.diff(data, axis=1)
    np.testing.assert_allclose(nstd, np.sqrt((diff ** 2).mean(0)), rtol=1e-4)
    assert np.all(std > 0) and np.all(vx > 0)


def test_dvars_matches_nipype(series, tmp_path):
    """Our vectorised DVARS reproduces nipype's compute_dvars (which needs nitime)."""
    pytest.importorskip("nitime")
    from nipype.algorithms.confounds import compute_dvars as nipype_compute_dvars

    box = (slice(15, 35), slice(20, 40), slice(15, 35))  # a central block keeps this fast
    pre, mask = series["pre"][box], series["mask"][box]
    pre_file = _save(pre, series["affine"], tmp_path / "pre.nii.gz", tr=2.0)
    mask_file = _save(mask.astype(np.uint8), series["affine"], tmp_path / "mask.nii.gz")
    ours = compute_dvars(pre, mask)
    ref = nipype_compute_dvars(pre_file, mask_file, remove_zerovariance=True, variance_tol=1e-7)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# SeriesConfounds
# ---------------------------------------------------------------------------------------------
def test_columns_and_na_first_row(confounds):
    table = confounds["table"]
    expected = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                "framewise_displacement", "rmsd", "dvars", "std_dvars",
                "non_steady_state_outlier00", "motion_outlier00", "motion_outlier01",
                "unimo_lambda", "unimo_disagreement"]
    assert list(table.columns) == expected
    assert len(table) == len(PARAMS)
    with open(confounds["tsv"]) as fobj:
        header = fobj.readline().rstrip("\n").split("\t")
        first = dict(zip(header, fobj.readline().rstrip("\n").split("\t")))
    for col in ("framewise_displacement", "rmsd", "dvars", "std_dvars", "unimo_disagreement"):
        assert first[col] == "n/a"
    assert first["trans_x"] == "0.0"


def test_motion_parameters_recovered_exactly(confounds):
    got = confounds["table"][["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]]
    np.testing.assert_allclose(got.to_numpy(), PARAMS, atol=1e-12)


def test_fd_is_power(confounds):
    fd = confounds["table"]["framewise_displacement"].to_numpy()
    assert np.isnan(fd[0])
    for t in (1, 3, 5, 6):
        d = np.abs(PARAMS[t] - PARAMS[t - 1])
        power = d[:3].sum() + 50.0 * d[3:].sum()
        assert fd[t] == pytest.approx(power, abs=1e-9)
    assert fd[1] == pytest.approx(0.1, abs=1e-12)
    assert fd[5] == pytest.approx(1.85 + 1.05 + 1.6 + 50 * (0.028 + 0.021 + 0.041), abs=1e-9)


def test_rmsd_over_mask(confounds, series):
    rmsd = confounds["table"]["rmsd"].to_numpy()
    ijk = np.argwhere(series["mask"])
    world = nb.affines.apply_affine(series["affine"], ijk)
    hom = np.c_[world, np.ones(len(world))]
    xf = series["xfms"]
    for t in (2, 5):
        d = (hom @ xf[t].T - hom @ xf[t - 1].T)[:, :3]
        assert rmsd[t] == pytest.approx(np.sqrt((d ** 2).sum(1).mean()), rel=1e-9)
    assert rmsd[1] == pytest.approx(0.1, rel=1e-9)  # pure translation: exact |dt|
    assert rmsd[4] == pytest.approx(0.0, abs=1e-9)


def test_outliers_and_dummies(confounds):
    table = confounds["table"]
    assert table["non_steady_state_outlier00"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert table["motion_outlier00"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert table["motion_outlier01"].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]
    # noise-only corrected series: no DVARS spikes
    assert np.nanmax(table["std_dvars"]) < 1.5
    # DVARS is computed over steady-state volumes: n/a up to the first steady-state volume
    assert table["dvars"].iloc[: N_DUMMY + 1].isna().all()
    assert table["std_dvars"].iloc[: N_DUMMY + 1].isna().all()
    assert np.all(table["dvars"].iloc[N_DUMMY + 1:] > 0)


def test_confounds_json(confounds):
    meta = json.loads(open(confounds["meta"]).read())
    assert set(meta) == set(confounds["table"].columns)
    for col, entry in meta.items():
        assert entry["Description"] and "Units" in entry, col
    assert meta["trans_x"]["Units"] == "mm"
    assert meta["rot_z"]["Units"] == "rad"
    assert meta["framewise_displacement"]["Units"] == "mm"
    assert "Rz" in meta["rot_x"]["Description"] and "u - c + R c" in meta["trans_y"]["Description"]
    assert meta["unimo_lambda"]["Description"] == "SO(3) fusion weight"
    assert meta["unimo_disagreement"]["Units"]


def test_qc_json(confounds):
    qc = json.loads(open(confounds["qc"]).read())
    for key in ("tsnr", "tsnr_raw", "tsnr_gain", "fd_mean", "fd_num", "fd_perc", "fd_max",
                "dvars_std", "dvars_vstd", "rmsd_mean", "n_volumes", "n_outliers",
                "usable_fraction", "fd_spike_threshold", "dvars_spike_threshold", "fd_radius"):
        assert key in qc, key
    fd = confounds["table"]["framewise_displacement"].to_numpy()[1:]
    assert qc["fd_mean"] == pytest.approx(fd.mean())
    assert qc["fd_max"] == pytest.approx(fd.max())
    assert qc["fd_num"] == 2 and qc["fd_perc"] == pytest.approx(25.0)
    assert qc["n_volumes"] == 8 and qc["n_outliers"] == 2
    assert qc["usable_fraction"] == pytest.approx((8 - N_DUMMY - 2) / 8)
    # the uncorrected series moves, so correction must raise the tSNR
    assert qc["tsnr_gain"] == pytest.approx(qc["tsnr"] / qc["tsnr_raw"])
    assert qc["tsnr_gain"] > 1.2
    for path in (confounds["tsnr_raw"], confounds["tsnr_pre"]):
        img = nb.load(path)
        assert img.shape == (50, 59, 48) and img.get_data_dtype() == np.float32


def test_dvars_spike_is_flagged(series, tmp_path, monkeypatch):
    f = series["files"]
    pre = series["pre"].copy()
    pre[..., 3][series["mask"]] *= 1.3  # a global intensity spike at volume 3
    spiky = _save(pre, series["affine"], tmp_path / "spiky.nii.gz", tr=2.0)
    monkeypatch.chdir(tmp_path)
    res = SeriesConfounds(in_raw=f["raw"], in_preproc=spiky, in_mask=f["mask"],
                          in_transforms=f["xfm"], fd_spike_threshold=100.0).run()
    table = pd.read_csv(res.outputs.out_confounds, sep="\t", na_values=["n/a"])
    std_dvars = table["std_dvars"].to_numpy()
    assert std_dvars[3] > 1.5 and std_dvars[4] > 1.5
    flagged = [int(np.flatnonzero(table[c])[0]) for c in table if c.startswith("motion_outlier")]
    assert flagged == list(np.flatnonzero(np.nan_to_num(std_dvars) > 1.5))
    assert 3 in flagged and 4 in flagged
    assert not any(c.startswith("non_steady_state") for c in table)


def test_tsnr_constant_plus_noise(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    shape, n_vols, n_dummy = (10, 10, 10), 60, 3
    data = 100.0 + rng.normal(0, 2.0, shape + (n_vols,))
    data[..., :n_dummy] = 300.0 + rng.normal(0, 2.0, shape + (n_dummy,))
    data = data.astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    series_file = _save(data, affine, tmp_path / "bold.nii.gz", tr=2.0)
    mask_file = _save(np.ones(shape, np.uint8), affine, tmp_path / "mask.nii.gz")
    np.save(tmp_path / "xfm.npy", np.tile(np.eye(4), (n_vols, 1, 1)))
    monkeypatch.chdir(tmp_path)
    res = SeriesConfounds(in_raw=series_file, in_preproc=series_file, in_mask=mask_file,
                          in_transforms=str(tmp_path / "xfm.npy"),
                          non_steady_state=n_dummy).run()
    steady = data[..., n_dummy:].astype(np.float64)
    expected = steady.mean(-1) / steady.std(-1, ddof=0)
    tsnr = np.asanyarray(nb.load(res.outputs.out_tsnr_preproc).dataobj)
    np.testing.assert_allclose(tsnr, expected, rtol=1e-5)
    assert np.median(tsnr) == pytest.approx(50.0, rel=0.05)
    qc = json.loads(open(res.outputs.out_qc).read())
    assert qc["tsnr"] == pytest.approx(np.median(expected), rel=1e-5)
    assert qc["tsnr_gain"] == pytest.approx(1.0)
    assert qc["fd_max"] == 0.0 and qc["rmsd_mean"] == 0.0
    assert qc["usable_fraction"] == pytest.approx((n_vols - n_dummy) / n_vols)
    assert qc["n_outliers"] == 0 and qc["dummy_trs"] == n_dummy
    table = pd.read_csv(res.outputs.out_confounds, sep="\t", na_values=["n/a"])
    assert [c for c in table if c.startswith("non_steady")] == [
        "non_steady_state_outlier00", "non_steady_state_outlier01", "non_steady_state_outlier02"]
    assert np.diag(table[[f"non_steady_state_outlier0{i}" for i in range(3)]].to_numpy()[:3]
                   ).tolist() == [1, 1, 1]


def test_bad_transforms_shape(series, tmp_path, monkeypatch):
    f = series["files"]
    np.save(tmp_path / "bad.npy", np.tile(np.eye(4), (3, 1, 1)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="in_transforms"):
        SeriesConfounds(in_raw=f["raw"], in_preproc=f["pre"], in_mask=f["mask"],
                        in_transforms=str(tmp_path / "bad.npy")).run()


# ---------------------------------------------------------------------------------------------
# Reportlets and reports
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reportlets(series, confounds, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reportlets")
    f = series["files"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        res = SeriesReportlets(
            in_raw=f["raw"], in_preproc=f["pre"], in_ref=f["ref"], in_mask=f["mask"],
            in_distmap=f["dist"], in_confounds=confounds["tsv"],
            in_tsnr_raw=confounds["tsnr_raw"], in_tsnr_preproc=confounds["tsnr_pre"],
        ).run()
    return res.outputs.get()


def test_reportlets_are_valid_svg(reportlets):
    assert set(reportlets) == {"out_mask", "out_beforeafter", "out_tsnr", "out_motion",
                               "out_carpet", "out_unimo"}
    for name, path in reportlets.items():
        size = os.path.getsize(path)
        assert 1000 < size < 400_000, (name, size)
        root = ET.parse(path).getroot()
        assert root.tag.endswith("svg"), name


def _axes_count(svg_path) -> int:
    root = ET.parse(svg_path).getroot()
    return sum(1 for g in root.iter("{http://www.w3.org/2000/svg}g")
               if g.get("id", "").startswith("axes_"))


def test_unimo_diagnostics_has_one_panel_per_diagnostic(tmp_path):
    n = 12
    table = pd.DataFrame({"unimo_lambda": np.full(n, 0.8),
                          "unimo_branch_disagreement": np.linspace(0, 3, n),
                          "unimo_refine_shift": np.linspace(1, 0, n),
                          "unimo_start_network": np.arange(n) % 2,
                          "hmc_residual": np.linspace(0.01, 0.02, n)})
    assert _axes_count(plot_unimo_diagnostics(table, tmp_path / "three.svg")) == 3
    table["mask_agreement"] = np.linspace(0.9, 1.0, n)
    assert _axes_count(plot_unimo_diagnostics(table, tmp_path / "four.svg")) == 4
    # Columns that are all n/a (e.g. mask_agreement without segmentations) get no panel.
    table["mask_agreement"] = np.nan
    assert _axes_count(plot_unimo_diagnostics(table, tmp_path / "nan.svg")) == 3
    empty = plot_unimo_diagnostics(table[["unimo_lambda"]], tmp_path / "none.svg")
    assert _axes_count(empty) == 1  # a single blank axis with a note


def _make_derivatives(out, series, confounds, reportlets):
    """A small derivatives tree: sub-01 (task-fa run-1, task-fa without run), sub-02 (ses-1)."""
    runs = {
        ("01", None, "sub-01_task-fa_run-1"): 1.0,
        ("01", None, "sub-01_task-fa"): 0.5,
        ("02", "1", "sub-02_ses-1_task-fa_run-1"): 0.1,
    }
    for (sub, ses, src), scale in runs.items():
        func = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"
        func.mkdir(parents=True, exist_ok=True)
        table = confounds["table"].copy()
        table["framewise_displacement"] *= scale
        table.to_csv(func / f"{src}_desc-confounds_timeseries.tsv", sep="\t", index=False,
                     na_rep="n/a")
        qc = json.loads(open(confounds["qc"]).read())
        qc["fd_mean"] *= scale
        (func / f"{src}_desc-qc_bold.json").write_text(json.dumps(qc))
        figs = out / f"sub-{sub}" / "figures"
        figs.mkdir(parents=True, exist_ok=True)
        for key, desc in (("out_motion", "motion"), ("out_carpet", "carpet")):
            shutil.copy(reportlets[key], figs / f"{src}_desc-{desc}_bold.svg")
    return runs


def test_subject_report(tmp_path, series, confounds, reportlets):
    out = tmp_path / "out"
    _make_derivatives(out, series, confounds, reportlets)
    (out / "logs").mkdir()
    (out / "logs" / "CITATION.md").write_text("# Methods\n\nMotion was corrected <script>x</script>"
                                              " with UniMo & friends.\n")
    summary = {"Subject": "01", "Device": "cpu", "Random seed": 1234,
               "Command line": "unimo-bids /data /out participant --fd-radius 50 <x>",
               "Versions": {"unimo-bids": "0.1.0", "nipype": "1.11"},
               "Inputs": ["sub-01_task-fa_run-1_bold.nii.gz", "sub-01_task-fa_bold.nii.gz"]}
    path = build_subject_report(out, "01", summary, [])
    assert path == out / "sub-01.html"
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "No errors to report" in text
    assert "<script>" not in text and "&lt;script&gt;" in text and "&lt;x&gt;" in text
    assert "UniMo &amp; friends" in text
    sections = text.split('<section id="run-')[1:]
    assert len(sections) == 2  # sub-01 has two runs; sub-02 is not included
    by_prefix = {}
    for sec in sections:
        code = sec.split("<code>")[1].split("</code>")[0]
        by_prefix[code] = sec
    assert set(by_prefix) == {"sub-01_task-fa", "sub-01_task-fa_run-1"}
    run1 = by_prefix["sub-01_task-fa_run-1"]
    norun = by_prefix["sub-01_task-fa"]
    assert 'src="sub-01/figures/sub-01_task-fa_run-1_desc-motion_bold.svg"' in run1
    assert 'src="sub-01/figures/sub-01_task-fa_run-1_desc-carpet_bold.svg"' in run1
    assert "sub-01_task-fa_desc-motion_bold.svg" in norun
    assert "run-1_desc" not in norun.split("</section>")[0]
    assert run1.index("desc-motion") < run1.index("desc-carpet")
    assert "fd_perc" in run1 and "tsnr_gain" in run1
    # The flagged-volume table lists the dummy scan and the FD outliers, read from the TSV.
    table = confounds["table"]
    flagged_rows = run1.split('<table class="outliers">')[1].split("</table>")[0]
    listed = [int(row.split("<td>")[1].split("<")[0])
              for row in flagged_rows.split("<tr>")[2:]]
    outlier_cols = [c for c in table.columns if c.startswith(("motion_outlier",
                                                              "non_steady_state"))]
    assert listed == list(np.flatnonzero(table[outlier_cols].sum(axis=1) > 0))
    assert listed[0] == 0 and "non-steady state" in flagged_rows
    fd = table["framewise_displacement"].to_numpy()
    assert flagged_rows.count("FD &gt; 0.5 mm") == int(np.sum(np.nan_to_num(fd) > 0.5))
    # referenced figures exist relative to the report
    for sec in sections:
        for src in [s.split('"')[0] for s in sec.split('<img src="')[1:]]:
            assert (out / src).is_file()

    path = build_subject_report(out, "sub-01", summary, ["Node hmc failed: <boom>"])
    text = path.read_text()
    assert "No errors to report" not in text and "&lt;boom&gt;" in text
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_subject_report_in_a_browser(tmp_path, series, confounds, reportlets):
    if find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium): "
                    "cannot open the report in a browser")
    out = tmp_path / "out"
    _make_derivatives(out, series, confounds, reportlets)
    report = build_subject_report(out, "01", {"Device": "cpu"}, [])
    seen = inspect_page(report, tmp_path / "sub-01.png")
    assert seen["title"] == "unimo-bids report: sub-01"
    assert len(seen["images"]) == 4  # two runs, two figures each
    assert all(width > 0 for _, width in seen["images"]), seen["images"]
    assert seen["console_errors"] == []
    assert (tmp_path / "sub-01.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The check itself can fail: a missing figure is seen as such.
    next((out / "sub-01" / "figures").glob("*motion*")).unlink()
    seen = inspect_page(report, tmp_path / "broken.png")
    assert sorted(width > 0 for _, width in seen["images"]) == [False, True, True, True]
    assert any("ERR_FILE_NOT_FOUND" in error for error in seen["console_errors"])


def test_group_report_and_rethreshold(tmp_path, series, confounds, reportlets):
    out = tmp_path / "out"
    _make_derivatives(out, series, confounds, reportlets)
    tsv, html_path = build_group_report(out)
    assert tsv == out / "group_bold.tsv" and html_path == out / "group_bold.html"
    table = pd.read_csv(tsv, sep="\t", na_values=["n/a"], dtype={"subject": str, "run": str,
                                                                  "session": str})
    assert list(table.columns[:5]) == ["bids_name", "subject", "session", "task", "run"]
    assert sorted(table["bids_name"]) == ["sub-01_task-fa_bold", "sub-01_task-fa_run-1_bold",
                                          "sub-02_ses-1_task-fa_run-1_bold"]
    row = table.set_index("bids_name").loc["sub-02_ses-1_task-fa_run-1_bold"]
    assert row["subject"] == "02" and row["session"] == "1" and row["run"] == "1"
    assert table.set_index("bids_name").loc["sub-01_task-fa_bold", "run"] != "1"
    assert (table["fd_num"] == 2).all()  # as computed at participant level (threshold 0.5)
    text = html_path.read_text()
    assert "data:image/svg+xml;base64," in text and "fd_perc &gt; 20" in text

    # Re-threshold from the confounds tables, without re-running participants.
    fd_full = confounds["table"]["framewise_displacement"].to_numpy()
    thr = 0.12
    tsv, _ = build_group_report(out, fd_spike_threshold=thr)
    table = pd.read_csv(tsv, sep="\t", na_values=["n/a"]).set_index("bids_name")
    for name, scale in (("sub-01_task-fa_run-1_bold", 1.0), ("sub-01_task-fa_bold", 0.5),
                        ("sub-02_ses-1_task-fa_run-1_bold", 0.1)):
        fd = fd_full * scale
        n = int(np.sum(np.nan_to_num(fd, nan=-1) > thr))
        assert table.loc[name, "fd_num"] == n
        assert table.loc[name, "fd_perc"] == pytest.approx(100 * n / 8)
        flagged = set(np.flatnonzero(np.nan_to_num(fd, nan=-1) > thr)) - {0}  # dummy: row 0
        assert table.loc[name, "usable_fraction"] == pytest.approx((8 - 1 - len(flagged)) / 8)
        assert table.loc[name, "fd_spike_threshold"] == pytest.approx(thr)
    # 0.15, 0.25, 9, 8.95 exceed 0.12 at full scale
    assert table.loc["sub-01_task-fa_run-1_bold", "fd_num"] == 4
    assert table.loc["sub-02_ses-1_task-fa_run-1_bold", "fd_num"] == 2
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_group_report_empty(tmp_path):
    tsv, html_path = build_group_report(tmp_path)
    assert tsv.read_text().startswith("bids_name\tsubject")
    assert "No runs found" in html_path.read_text()
