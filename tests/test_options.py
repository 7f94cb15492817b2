"""Each command-line option really does what it says, on a tiny dataset.

The series is nilearn's MNI template on an 8 mm grid, 6 volumes, moved by a known, hand-written
motion whose framewise displacement straddles the thresholds used below. All participant runs
share one work folder (and run with ``--nprocs 1 --omp-nthreads 1``, nipype's in-process Linear
plugin), so a run that changes only, e.g., the confound options recomputes only the nodes that
depend on them. Each test writes to its own output folder. The tests are ordered so that runs
with the base run's options come first (they only rewrite the outputs); the order matters for
speed only, since the engine is deterministic.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from conftest import CONTRACT, coarse_grid

from unimo_bids import __version__
from unimo_bids.cli import run as run_module
from unimo_bids.cli.run import main
from unimo_bids.unimo.geometry import grid_center, rigid_matrix
from unimo_bids.unimo.synthetic import simulate_series

TR = 2.0
# (rotation_deg, translation_mm) of each volume. FD (radius 50 mm) is about
# [nan, 0, 0.9, 0, 1.0 + 50 * 2 deg = 2.75, 0]: volume 2 is an FD outlier at 0.5 mm but not at
# 1.5 mm, volume 4 at both; the rotation makes FD depend on the radius. (The moved volumes also
# have std_dvars around 1.6 after correction, so the runs below set the DVARS threshold high.)
POSES = [
    ((0, 0, 0), (0, 0, 0)),
    ((0, 0, 0), (0, 0, 0)),
    ((0, 0, 0), (0.9, 0, 0)),
    ((0, 0, 0), (0.9, 0, 0)),
    ((0, 0, 2.0), (0.9, 1.0, 0)),
    ((0, 0, 2.0), (0.9, 1.0, 0)),
]
GOOD = "sub-01/ses-1/func/sub-01_ses-1_task-a_bold.nii.gz"
# Each of these is left out by exactly one of --participant-label sub-01, --session-label 1,
# -t a; sub-03's series is 3D and fails when processed.
OTHERS = {
    "participant": "sub-02/ses-1/func/sub-02_ses-1_task-a_bold.nii.gz",
    "session": "sub-01/ses-2/func/sub-01_ses-2_task-a_bold.nii.gz",
    "task": "sub-01/ses-1/func/sub-01_ses-1_task-b_bold.nii.gz",
}
BAD = "sub-03/ses-1/func/sub-03_ses-1_task-a_bold.nii.gz"
SELECT = ["--participant-label", "sub-01", "--session-label", "1", "-t", "a"]
# The processing options of the base run. Runs that repeat them reuse its work folder as it is;
# a later occurrence of an option overrides these (argparse keeps the last value).
BASE = ["--hmc-ref", "first", "--dvars-spike-threshold", "10"]


def _write_nifti(path: Path, data: np.ndarray, affine) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nb.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    if data.ndim == 4:
        img.header.set_zooms(img.header.get_zooms()[:3] + (TR,))
    img.to_filename(path)


def _prefix(out: Path, relative: str = GOOD) -> Path:
    """Output prefix of a series: <out>/sub-X/ses-Y/func/<src>."""
    return out / Path(relative).parent / Path(relative).name.replace("_bold.nii.gz", "")


def _output(out: Path, suffix: str, relative: str = GOOD) -> Path:
    return Path(f"{_prefix(out, relative)}_{suffix}")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, mni_template):
    data, affine = mni_template
    # Smooth the 2 mm template (an EPI-like point spread) so that the 8 mm grid does not alias.
    data = ndimage.gaussian_filter(data, 1.5)
    shape, grid = coarse_grid(data.shape, affine, 8.0)
    center = grid_center(shape, grid)
    # simulate_series reads volume t at motions[t] @ x: the head appears moved by inv(motion).
    motions = np.stack([np.linalg.inv(rigid_matrix(rot, tra, center)) for rot, tra in POSES])
    series = simulate_series(data, affine, motions, shape, grid, order=1)
    rng = np.random.default_rng(3)
    series += 0.01 * series.max() * rng.standard_normal(series.shape).astype(np.float32)

    root = tmp_path_factory.mktemp("options")
    bids = root / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "options test", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (bids / "README").write_text("Tiny dataset for the command-line option tests.\n")
    for task in ("a", "b"):
        (bids / f"task-{task}_bold.json").write_text(json.dumps(
            {"TaskName": task, "RepetitionTime": TR}))
    for relative in [GOOD, *OTHERS.values()]:
        _write_nifti(bids / relative, series, grid)
    _write_nifti(bids / BAD, series[..., 0], grid)
    return {"root": root, "bids": bids, "work": root / "work", "series": series,
            "affine": grid}


def _run(dataset, out_name: str, *extra, work=None, select=True) -> int:
    """main() on the dataset, with the shared work folder and the in-process Linear plugin."""
    argv = [str(dataset["bids"]), str(dataset["root"] / out_name), "participant",
            "-w", str(work or dataset["work"]), "--nprocs", "1", "--omp-nthreads", "1",
            *(SELECT if select else []), *[str(a) for a in extra]]
    return main(argv)


@pytest.fixture(scope="module")
def base(dataset):
    """One processed series: the selection options, --device cpu, --hmc-ref first, --notrack."""
    code = _run(dataset, "out_base", *BASE, "--device", "cpu", "--notrack")
    return {"code": code, "out": dataset["root"] / "out_base"}


def _confounds(out: Path) -> pd.DataFrame:
    return pd.read_csv(_output(out, "desc-confounds_timeseries.tsv"), sep="\t")


def _qc(out: Path) -> dict:
    return json.loads(_output(out, "desc-qc_bold.json").read_text())


def _flagged(table: pd.DataFrame, prefix: str) -> list[int]:
    """Volumes flagged by the one-hot columns '<prefix>NN'."""
    columns = [c for c in table.columns if re.fullmatch(rf"{prefix}\d\d", c)]
    return sorted(int(np.flatnonzero(table[c].to_numpy())[0]) for c in columns)


def _raw_volume_matches(dataset, image: Path) -> list[int]:
    """Input volumes (float32) that the 3D image equals exactly."""
    ref = np.asarray(nb.load(image).dataobj, dtype=np.float32)
    series = np.asarray(nb.load(dataset["bids"] / GOOD).dataobj, dtype=np.float32)
    return [t for t in range(series.shape[3]) if np.array_equal(series[..., t], ref)]


# --- the base run: selection, device, reference --------------------------------------------


def test_selection_options_process_exactly_the_selected_series(dataset, base):
    assert base["code"] == 0
    out = base["out"]
    for suffix in CONTRACT:
        assert _output(out, suffix).is_file(), suffix
    # Each other series is excluded by exactly one of the three options.
    for option, relative in OTHERS.items():
        assert not list(out.rglob(f"{_prefix(out, relative).name}_*")), option
    assert not (out / "sub-02").exists() and not (out / "sub-03").exists()
    assert not (out / "sub-01" / "ses-2").exists()
    series = sorted(p.name for p in out.rglob("*_desc-preproc_bold.nii.gz"))
    assert series == ["sub-01_ses-1_task-a_desc-preproc_bold.nii.gz"]
    assert (out / "sub-01.html").is_file() and not (out / "sub-02.html").exists()
    # Without the selection options all five series (sub-03's bad one too) would be found.
    from unimo_bids.cli.bids import collect_runs

    runs, _, _ = collect_runs(dataset["bids"], dataset["root"] / "collect_work")
    assert len(runs) == 5


def test_participant_label_with_and_without_prefix_select_the_same_subject(dataset):
    from unimo_bids.cli.bids import collect_runs

    work = dataset["root"] / "collect_work"
    with_prefix, _, _ = collect_runs(dataset["bids"], work, ["sub-02"])
    without, _, _ = collect_runs(dataset["bids"], work, ["02"])
    assert [r.path for r in with_prefix] == [r.path for r in without]
    assert [r.subject for r in with_prefix] == ["02"]


def test_device_cpu_runs_and_is_reported(base):
    assert base["code"] == 0
    html = (base["out"] / "sub-01.html").read_text()
    assert re.search(r"Device</th><td>cpu<", html), "the report does not name the device"


def test_device_cuda_is_refused_without_a_gpu(dataset, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is legitimately accepted")
    capsys.readouterr()
    code = _run(dataset, "out_cuda", "--device", "cuda")
    err = capsys.readouterr().err
    assert code == 2
    assert "--device cuda" in err and "CUDA is not available" in err and "--device cpu" in err
    assert not (dataset["root"] / "out_cuda").exists()
    code = _run(dataset, "out_cuda", "--device", "cuda:1")
    assert code == 2 and "cuda:1" in capsys.readouterr().err


def test_bad_deform_weights_are_refused_before_any_work(dataset, tmp_path, capsys):
    broken = tmp_path / "broken_velocity.pt"
    broken.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    code = _run(dataset, "out_bad_velocity", "--deformable", "--deform-weights", str(broken))
    err = capsys.readouterr().err
    assert code == 2 and "--deform-weights" in err and "broken_velocity.pt" in err
    assert not (dataset["root"] / "out_bad_velocity").exists()
    code = _run(dataset, "out_bad_velocity", "--deform-weights", str(broken))
    assert code == 2 and "needs --deformable" in capsys.readouterr().err
    code = _run(dataset, "out_bad_velocity", "--deform-predictor")
    assert code == 2 and "--deform-predictor needs --deformable" in capsys.readouterr().err


def test_hmc_ref_first_uses_volume_0(dataset, base):
    assert base["code"] == 0
    assert _raw_volume_matches(dataset, _output(base["out"], "desc-hmc_boldref.nii.gz")) == [0]
    # The reference volume's transform is the identity (to float32 sampling, ~1e-6 mm), and no
    # volume is non-steady-state.
    table = _confounds(base["out"])
    assert np.allclose(table.loc[0, ["trans_x", "trans_y", "trans_z"]], 0, atol=1e-4)
    assert _flagged(table, "non_steady_state_outlier") == []
    assert _qc(base["out"])["dummy_trs"] == 0


def test_verbose_logs_nipype_node_execution(dataset, base, caplog):
    """-v turns nipype's workflow log on (INFO); without it, nipype logs only critical errors."""
    def node_messages():
        return [r for r in caplog.records
                if r.name.startswith("nipype") and "[Node]" in r.getMessage()]

    caplog.clear()
    assert _run(dataset, "out_verbose", *BASE, "-v") == 0
    assert node_messages() and all(r.levelname == "INFO" for r in node_messages())
    assert _output(dataset["root"] / "out_verbose", "desc-preproc_bold.nii.gz").is_file()
    caplog.clear()
    assert _run(dataset, "out_quiet", *BASE) == 0
    assert not node_messages()


# --- execution options ---------------------------------------------------------------------


def test_write_graph_writes_a_dot_file_in_the_work_dir(dataset, base):
    graph = dataset["work"] / "graph.dot"
    graph.unlink(missing_ok=True)
    assert _run(dataset, "out_graph", *BASE, "--write-graph") == 0
    text = graph.read_text()
    assert text.lstrip().startswith(("digraph", "strict digraph"))
    for node in ("validate", "unimo_rigid", "apply_hmc", "confounds"):
        assert node in text, node


def _spy_plugin_settings(monkeypatch) -> list[dict]:
    """Record the plugin settings that main() passes to workflow.run."""
    seen = []
    real = run_module.plugin_settings

    def spy(args, progress_callback=None):
        settings = real(args, progress_callback)
        seen.append({"plugin": settings["plugin"], "plugin_args": {
            k: v for k, v in settings["plugin_args"].items() if k != "status_callback"}})
        return settings

    monkeypatch.setattr(run_module, "plugin_settings", spy)
    return seen


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"),
    ("plugin: [MultiProc\n", "not valid YAML"),
    ("- MultiProc\n", "expected 'plugin: NAME'"),
    ("plugin: MultiProc\nplugin_args: 4\n", "expected 'plugin: NAME'"),
])
def test_bad_plugin_file_is_refused(dataset, tmp_path, capsys, content, problem):
    plugin = tmp_path / "my_plugin.yml"
    if content is not None:
        plugin.write_text(content)
    capsys.readouterr()
    code = _run(dataset, "out_badplugin", "--use-plugin", plugin, work=tmp_path / "work")
    err = capsys.readouterr().err
    assert code == 2
    assert str(plugin) in err and problem in err, err
    assert not (dataset["root"] / "out_badplugin").exists()


def test_mem_is_accepted_and_passed_to_multiproc(dataset, base):
    from unimo_bids.cli.parser import build_parser

    assert _run(dataset, "out_mem", *BASE, "--mem", "2GB") == 0
    assert _output(dataset["root"] / "out_mem", "desc-preproc_bold.nii.gz").is_file()
    parser = build_parser()
    for value in ("2GB", "2G", "2", "2048MB", "2048M"):
        assert parser.parse_args(["b", "o", "participant", "--mem", value]).mem == 2.0, value
    # MultiProc gets the limit (its scheduler keeps the sum of the nodes' mem_gb below it).
    args = parser.parse_args(["b", "o", "participant", "--nprocs", "2", "--mem", "2GB"])
    settings = run_module.plugin_settings(args)
    assert settings["plugin"] == "MultiProc"
    assert settings["plugin_args"]["memory_gb"] == 2.0
    assert settings["plugin_args"]["n_procs"] == 2


@pytest.mark.parametrize("value", ["banana", "0", "-1GB", "12XB"])
def test_mem_refuses_what_is_not_an_amount(dataset, capsys, value):
    with pytest.raises(SystemExit) as info:
        main([str(dataset["bids"]), str(dataset["root"] / "out_banana"), "participant",
              "--mem=" + value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--mem" in err and value in err
    assert not (dataset["root"] / "out_banana").exists()


def test_version_prints_the_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code in (0, None)
    assert capsys.readouterr().out.strip() == f"unimo-bids {__version__}"


# --- reports and boilerplate ---------------------------------------------------------------


def test_deformable_adds_fields_composes_them_and_says_so(dataset, base):
    """--deformable (here started from the packaged velocity predictor, which reads each
    volume's mask): the displacement series is written (5D, world mm, on its own grid), the
    confounds gain the deformation diagnostics, the corrected series changes (one composed
    resampling), and the methods and report say so."""
    assert _run(dataset, "out_deform", *BASE, "--deformable", "--deform-predictor") == 0
    out = dataset["root"] / "out_deform"
    fields = nb.load(_output(out, "from-orig_to-boldref_mode-image_desc-deform_xfm.nii.gz"))
    assert fields.ndim == 5 and fields.shape[3:] == (len(POSES), 3)
    assert fields.header.get_intent()[0] == "vector"
    table = _confounds(out)
    for column in ("deform_mean", "deform_max", "deform_jacobian_min", "deform_ncc"):
        assert table[column].notna().all(), column
    assert (table["deform_jacobian_min"] > 0).all()
    meta = json.loads(_output(out, "desc-confounds_timeseries.json").read_text())
    assert meta["deform_mean"]["Units"] == "mm"
    # The rigid part is the base run's (same work folder); only the resampling differs.
    assert np.allclose(table[["trans_x", "rot_z"]], _confounds(base["out"])[["trans_x", "rot_z"]])
    rigid = nb.load(_output(base["out"], "desc-preproc_bold.nii.gz")).get_fdata()
    deformed = nb.load(_output(out, "desc-preproc_bold.nii.gz")).get_fdata()
    assert rigid.shape == deformed.shape and not np.allclose(rigid, deformed)
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "EPDiff" in citation and "predicted by a U-Net" in citation
    assert "EPDiff deformation (predicted, then optimised)" in (out / "sub-01.html").read_text()
    assert not _output(base["out"], "from-orig_to-boldref_mode-image_desc-deform_xfm.nii.gz"
                       ).exists()


def test_reports_only_rebuilds_the_report_without_a_work_dir(dataset, base, tmp_path, capsys):
    assert base["code"] == 0
    out = tmp_path / "out"
    shutil.copytree(base["out"], out)
    (out / "sub-01.html").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    work = tmp_path / "no_work"
    code = main([str(dataset["bids"]), str(out), "participant", "-w", str(work),
                 "--reports-only"])
    assert code == 0
    html = (out / "sub-01.html").read_text()
    assert "sub-01_ses-1_task-a" in html and "figures/" in html
    assert not work.exists()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing else rewritten
    assert {p for p in out.rglob("*") if p.is_file()} == set(stamps) | {out / "sub-01.html"}


def test_boilerplate_only_writes_the_methods_text_and_nothing_else(dataset, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    code = main([str(dataset["bids"]), str(out), "participant", "-w", str(work),
                 "--boilerplate-only", "--fd-radius", "42", "--random-seed", "11"])
    assert code == 0
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "unimo-bids" in citation and "42 mm" in citation
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["RandomSeed"] == 11
    assert not list(out.rglob("*.nii*")) and not list(out.rglob("*.tsv"))
    assert not list(out.glob("sub-*"))
    assert not list(work.rglob("result_*.pklz"))  # no node ran
    assert "CITATION.md" in capsys.readouterr().out


# --- a failing series ----------------------------------------------------------------------


def test_stop_on_first_crash_exits_non_zero(dataset, base, capsys):
    from nipype import config

    def run(out_name, *extra):
        capsys.readouterr()
        argv = [str(dataset["bids"]), str(dataset["root"] / out_name), "participant",
                "-w", str(dataset["work"]), "--nprocs", "1", "--omp-nthreads", "1",
                "--participant-label", "sub-01", "sub-03", "--session-label", "1", "-t", "a",
                *BASE, *extra]
        return main(argv), capsys.readouterr().err

    def names_the_bad_series(err):
        return any("sub-03_ses-1_task-a_bold.nii.gz" in line and "3D" in line
                   for line in err.splitlines() if line.startswith("ERROR:"))

    # Without the option the bad series fails alone and the good one is written.
    code, err = run("out_nostop")
    assert code == 1 and names_the_bad_series(err), err
    assert _output(dataset["root"] / "out_nostop", "desc-preproc_bold.nii.gz").is_file()
    # With it, the run stops at the crash (the Linear plugin runs the nodes generation by
    # generation, so the bad series' validation comes before the good series' last step) and
    # still exits non-zero, naming the bad series.
    code, err = run("out_stop", "--stop-on-first-crash")
    assert code == 1 and names_the_bad_series(err), err
    assert config.getboolean("execution", "stop_on_first_crash")
    assert not list((dataset["root"] / "out_stop").rglob("*_desc-preproc_bold.nii.gz"))


# --- options that change results (after the cached runs above, which reuse the base run's
# work folder as it is) ------------------------------------------------------------------


def _fd_from_parameters(table: pd.DataFrame, radius: float) -> np.ndarray:
    """Power's FD from the motion columns of the confounds table."""
    diff = np.abs(np.diff(table[["trans_x", "trans_y", "trans_z",
                                 "rot_x", "rot_y", "rot_z"]].to_numpy(), axis=0))
    return diff[:, :3].sum(axis=1) + radius * diff[:, 3:].sum(axis=1)


def test_fd_radius_scales_the_rotational_part_of_fd(dataset, base):
    # The base run used the default radius, 50 mm; this run differs only in the radius.
    assert _run(dataset, "out_r100", *BASE, "--fd-radius", "100") == 0
    r50, r100 = base["out"], dataset["root"] / "out_r100"
    xfm = "from-orig_to-boldref_mode-image_desc-hmc_xfm.txt"
    assert _output(r50, xfm).read_text() == _output(r100, xfm).read_text()  # same motion
    t50, t100 = _confounds(r50), _confounds(r100)
    fd50 = t50["framewise_displacement"].to_numpy()[1:]
    fd100 = t100["framewise_displacement"].to_numpy()[1:]
    assert np.allclose(fd50, _fd_from_parameters(t50, 50.0), atol=1e-4)
    assert np.allclose(fd100, _fd_from_parameters(t100, 100.0), atol=1e-4)
    # Volume 4 rotates by 2 degrees: its FD grows by 50 mm * 0.0349 rad; volume 2 only
    # translates, so its FD grows far less (by its small estimated rotation).
    assert fd100[3] - fd50[3] == pytest.approx(50 * np.deg2rad(2.0), rel=0.15)
    assert fd100[3] - fd50[3] > 5 * (fd100[1] - fd50[1])
    assert _qc(r50)["fd_radius"] == 50.0 and _qc(r100)["fd_radius"] == 100.0
    assert _qc(r100)["fd_mean"] > _qc(r50)["fd_mean"]
    meta = json.loads(_output(r100, "desc-confounds_timeseries.json").read_text())
    assert "100 mm" in json.dumps(meta["framewise_displacement"])


def _expected_outliers(table: pd.DataFrame, fd_threshold: float, dvars_threshold: float):
    flags = ((table["framewise_displacement"].fillna(0) > fd_threshold)
             | (table["std_dvars"].fillna(0) > dvars_threshold))
    return list(np.flatnonzero(flags.to_numpy()))


def test_fd_spike_threshold_changes_the_motion_outliers(dataset, base):
    # The base run used the default threshold, 0.5 mm.
    table = _confounds(base["out"])
    fd = table["framewise_displacement"].to_numpy()
    # The estimated motion is what the dataset was built with.
    assert 0.7 < fd[2] < 1.2 and fd[4] > 2.0 and np.all(fd[[1, 3, 5]] < 0.3), fd
    assert _flagged(table, "motion_outlier") == _expected_outliers(table, 0.5, 10.0) == [2, 4]
    assert _run(dataset, "out_fd15", *BASE, "--fd-spike-threshold", "1.5") == 0
    out = dataset["root"] / "out_fd15"
    table = _confounds(out)
    assert _flagged(table, "motion_outlier") == _expected_outliers(table, 1.5, 10.0) == [4]
    assert _qc(out)["fd_spike_threshold"] == 1.5 and _qc(out)["fd_num"] == 1
    assert _qc(base["out"])["fd_num"] == 2


def test_use_plugin_file_runs_multiproc(dataset, base, monkeypatch, tmp_path):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args: {n_procs: 1}\n")
    seen = _spy_plugin_settings(monkeypatch)
    # A new DVARS threshold makes the confounds and reportlets nodes run in a worker.
    code = _run(dataset, "out_plugin", *BASE, "--use-plugin", plugin,
                "--dvars-spike-threshold", "2.5")
    assert code == 0
    assert seen[-1]["plugin"] == "MultiProc" and seen[-1]["plugin_args"]["n_procs"] == 1
    out = dataset["root"] / "out_plugin"
    for suffix in CONTRACT:
        assert _output(out, suffix).is_file(), suffix
    assert _qc(out)["dvars_spike_threshold"] == 2.5


def test_use_plugin_file_alone_runs_multiproc(dataset, base, tmp_path):
    """The README's plugin file, with no other resource option."""
    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 CPUs for --nprocs (default) > n_procs of the plugin file")
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args: {n_procs: 1}\n")
    code = main([str(dataset["bids"]), str(dataset["root"] / "out_plugin_alone"),
                 "participant", "-w", str(dataset["work"]), *SELECT, *BASE,
                 "--use-plugin", str(plugin)])
    assert code == 0


def test_group_level_recounts_fd_outliers_with_the_given_threshold(base, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(base["out"], out)
    bids = str(base["out"].parent / "bids")
    assert main([bids, str(out), "group"]) == 0
    table = pd.read_csv(out / "group_bold.tsv", sep="\t")
    assert len(table) == 1 and table.loc[0, "fd_num"] == 2  # FD 1.1 and 3.0 mm > 0.5 mm
    assert main([bids, str(out), "group", "--fd-spike-threshold", "1.5"]) == 0
    table = pd.read_csv(out / "group_bold.tsv", sep="\t")
    assert table.loc[0, "fd_num"] == 1
    assert (out / "group_bold.html").is_file()


@pytest.mark.parametrize("argv", [["--fd-spike-threshold=1.5"], ["--fd-spike", "1.5"]])
def test_group_level_threshold_in_other_spellings(base, tmp_path, argv):
    out = tmp_path / "out"
    shutil.copytree(base["out"], out)
    assert main([str(base["out"].parent / "bids"), str(out), "group", *argv]) == 0
    assert pd.read_csv(out / "group_bold.tsv", sep="\t").loc[0, "fd_num"] == 1


# --- options that change the reference ----------------------------------------------------


def test_hmc_ref_index_uses_that_volume(dataset, base, capsys):
    assert _run(dataset, "out_ref2", *BASE, "--hmc-ref", "2") == 0
    out = dataset["root"] / "out_ref2"
    assert _raw_volume_matches(dataset, _output(out, "desc-hmc_boldref.nii.gz")) == [2]
    table = _confounds(out)
    # Volume 2 is the reference now: its parameters are zero (to float32 sampling), volume 0's
    # are not.
    assert np.allclose(table.loc[2, ["trans_x", "trans_y", "trans_z"]], 0, atol=1e-4)
    assert np.abs(table.loc[0, ["trans_x", "trans_y", "trans_z"]]).max() > 0.5
    # Out of range for this 6-volume series: the series fails, named with the reason.
    capsys.readouterr()
    assert _run(dataset, "out_ref9", *BASE, "--hmc-ref", "9") == 1
    err = capsys.readouterr().err
    assert "sub-01_ses-1_task-a_bold.nii.gz" in err and "out of range" in err, err


def test_dummy_scans_adds_non_steady_state_columns(dataset, base):
    assert _run(dataset, "out_dummy", *BASE, "--dummy-scans", "2") == 0
    out = dataset["root"] / "out_dummy"
    table = _confounds(out)
    columns = [c for c in table.columns if c.startswith("non_steady_state_outlier")]
    assert columns == ["non_steady_state_outlier00", "non_steady_state_outlier01"]
    assert _flagged(table, "non_steady_state_outlier") == [0, 1]
    assert _qc(out)["dummy_trs"] == 2
    # 'first' now means the first steady-state volume, and dummies are never motion outliers.
    assert _raw_volume_matches(dataset, _output(out, "desc-hmc_boldref.nii.gz")) == [2]
    assert not set(_flagged(table, "motion_outlier")) & {0, 1}


# --- the UniMo network: --no-refine, --weights ----------------------------------------------


def test_confounds_carry_the_network_diagnostics(base):
    table = _confounds(base["out"])
    meta = json.loads(_output(base["out"], "desc-confounds_timeseries.json").read_text())
    names = ["unimo_lambda", "unimo_refine_shift", "unimo_start_network",
             *[f"unimo_{b}_{p}" for b in ("image", "shape")
               for p in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")]]
    for name in names:
        assert name in table.columns and name in meta and meta[name]["Units"], name
    lam = table["unimo_lambda"].to_numpy()
    assert np.all((lam > 0) & (lam < 1)) and np.ptp(lam) == 0
    assert set(table["unimo_start_network"]) <= {0, 1}
    # The reference (volume 0) is the identity for both branches, up to keypoint rounding.
    assert np.abs(table.loc[0, [c for c in table.columns if c.startswith("unimo_image_t")]]
                  ).max() < 0.05


def test_no_refine_reports_the_network_alone(dataset, base):
    out = dataset["root"] / "out_no_refine"
    assert _run(dataset, "out_no_refine", *BASE, "--no-refine") == 0
    table = _confounds(out)
    assert (table["hmc_iterations"] == 0).all() and (table["unimo_refine_shift"] == 0).all()
    assert table["hmc_residual"].isna().all()  # written as n/a: nothing was refined
    # The network's own estimate differs from the refined one of the base run.
    refined = _confounds(base["out"])
    assert not np.allclose(table["trans_x"], refined["trans_x"], atol=1e-4)
    text = (out / "logs" / "CITATION.md").read_text()
    assert "no test-time refinement" in text


@pytest.mark.parametrize("content", [None, b"not a checkpoint"])
def test_bad_weights_are_refused_before_any_work(dataset, tmp_path, capsys, content):
    weights = tmp_path / "weights.pt"
    if content is not None:
        weights.write_bytes(content)
    capsys.readouterr()
    code = _run(dataset, "out_bad_weights", "--weights", weights)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "--weights" in err[0] and str(weights) in err[0], err
    assert not (dataset["root"] / "out_bad_weights").exists()


def test_weights_option_uses_that_checkpoint(dataset, base, tmp_path):
    import torch

    from unimo_bids.unimo.network import load_network, save_network

    net = load_network()
    with torch.no_grad():
        net.raw_lambda.fill_(2.0)  # lambda = sigmoid(2) = 0.881, unlike the packaged one
    save_network(net, tmp_path / "mine.pt")
    assert _run(dataset, "out_weights", *BASE, "--weights", tmp_path / "mine.pt") == 0
    table = _confounds(dataset["root"] / "out_weights")
    np.testing.assert_allclose(table["unimo_lambda"], 1 / (1 + np.exp(-2.0)), atol=1e-5)
