"""End to end through the command line: real workflows on real brain images with known motion."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
import pytest
from conftest import CONTRACT, coarse_grid

from unimo_bids.cli.demo import displacement_errors
from unimo_bids.cli.run import main
from unimo_bids.unimo.geometry import grid_center
from unimo_bids.unimo.synthetic import random_rigid_motions, simulate_series

# The BIDS entities of the output contract; 'stat' comes from BIDS statistical derivatives.
STAT_CONFIG = {"name": "unimo_stat", "entities": [
    {"name": "stat", "pattern": "[_/\\\\]+stat-([a-zA-Z0-9]+)"}]}


def write_dataset(root: Path, runs: dict[str, np.ndarray], affine, tr=2.0):
    """A BIDS dataset with the given series (relative path -> (X, Y, Z, T) array)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "test", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (root / "README").write_text("test dataset\n")
    for relative, series in runs.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        img = nb.Nifti1Image(np.asarray(series, dtype=np.float32), affine)
        img.header.set_xyzt_units("mm", "sec")
        if np.ndim(series) == 4:
            img.header.set_zooms(img.header.get_zooms()[:3] + (tr,))
        img.to_filename(path)
        task = re.search(r"task-([a-zA-Z0-9]+)", relative).group(1)
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(
            json.dumps({"RepetitionTime": tr, "TaskName": task}))


def make_series(template, rng, n_volumes=10, max_motion=5.0, voxel_mm=4.0):
    data, affine = template
    shape, grid = coarse_grid(data.shape, affine, voxel_mm)
    motions = random_rigid_motions(n_volumes, max_motion, max_motion, grid_center(shape, grid),
                                   rng)
    series = simulate_series(data, affine, motions, shape, grid)
    series += 0.01 * series.max() * rng.standard_normal(series.shape).astype(np.float32)
    return series, grid, motions


def output_files(output_dir: Path) -> dict[str, str]:
    """Relative path -> sha1 of every derivative (reports and logs excluded)."""
    digests = {}
    for path in sorted(output_dir.rglob("*")):
        relative = path.relative_to(output_dir).as_posix()
        if path.is_file() and not relative.startswith("logs/") and not relative.endswith(".html"):
            digests[relative] = hashlib.sha1(path.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory, mni_template):
    rng = np.random.default_rng(42)
    root = tmp_path_factory.mktemp("good")
    runs, truth = {}, {}
    for run in (1, 2):
        series, grid, motions = make_series(mni_template, rng)
        name = f"sub-01/ses-1/func/sub-01_ses-1_task-rest_run-{run}_bold.nii.gz"
        runs[name], truth[name] = series, motions
    write_dataset(root / "bids", runs, grid)
    argv = [str(root / "bids"), str(root / "out"), "participant", "-w", str(root / "work"),
            "--nprocs", "2", "--random-seed", "7"]
    code = main(argv)
    return {"root": root, "bids": root / "bids", "out": root / "out", "truth": truth,
            "code": code, "argv": argv}


def test_participant_writes_the_output_contract(good_dataset):
    assert good_dataset["code"] == 0
    out = good_dataset["out"]
    for name in good_dataset["truth"]:
        prefix = out / Path(name).parent / Path(name).name.replace("_bold.nii.gz", "")
        for suffix in CONTRACT:
            path = Path(f"{prefix}_{suffix}")
            assert path.is_file() and path.stat().st_size > 0, path
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "unimo-bids"
    assert description["GeneratedBy"][0]["RandomSeed"] == 7
    assert "raw" in description["DatasetLinks"]
    assert (out / ".bidsignore").is_file()
    assert (out / "sub-01.html").is_file()
    assert (out / "logs" / "CITATION.md").read_text().strip()
    assert list((out / "sub-01" / "figures").glob("sub-01_ses-1_task-rest_run-1_desc-*_bold.*"))
    assert not list(out.rglob(".*.tmp*"))
    sidecar = json.loads(next(out.rglob("*run-1_desc-preproc_bold.json")).read_text())
    assert sidecar["RepetitionTime"] == 2.0 and sidecar["SkullStripped"] is False
    assert sidecar["Sources"] == ["bids:raw:sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_"
                                  "bold.nii.gz"]


def test_outputs_load_as_a_derivatives_dataset(good_dataset):
    from bids import BIDSLayout
    from bids.layout import parse_file_entities

    layout = BIDSLayout(good_dataset["bids"], derivatives=str(good_dataset["out"]),
                        validate=False)
    preproc = layout.get(scope="derivatives", desc="preproc", suffix="bold",
                         extension=".nii.gz")
    assert sorted(f.entities["run"] for f in preproc) == [1, 2]
    confounds = layout.get(scope="derivatives", desc="confounds", suffix="timeseries",
                           extension=".tsv", run=1)
    assert len(confounds) == 1

    out = good_dataset["out"]
    for path in out.rglob("*"):
        relative = path.relative_to(out)
        if (path.is_dir() or relative.parts[0] == "logs" or "figures" in relative.parts
                or path.suffix == ".html" or path.name.startswith(".")
                or relative.as_posix() in ("dataset_description.json", "group_bold.tsv")):
            continue
        entities = parse_file_entities(str(path), config=["bids", "derivatives", STAT_CONFIG])
        stem = path.name.split(".")[0]
        pairs = stem.split("_")[:-1]
        values = {str(v) for v in entities.values()}
        for pair in pairs:
            key, _, value = pair.partition("-")
            assert value and value.lstrip("0") in {v.lstrip("0") for v in values}, (path, pair)
        assert entities["suffix"] == stem.split("_")[-1], path


def test_hmc_transforms_recover_known_motion(good_dataset):
    out = good_dataset["out"]
    for name, motions in good_dataset["truth"].items():
        prefix = out / Path(name).parent / Path(name).name.replace("_bold.nii.gz", "")
        errors = displacement_errors(
            Path(f"{prefix}_from-orig_to-boldref_mode-image_desc-hmc_xfm.txt"),
            Path(f"{prefix}_desc-brain_mask.nii.gz"), motions)
        assert errors.mean() < 0.2, errors
        assert errors.max() < 0.5, errors


def test_itk_transforms_reproduce_preproc(good_dataset):
    import nitransforms as nt
    from nitransforms.resampling import apply

    out, bids = good_dataset["out"], good_dataset["bids"]
    name = next(iter(good_dataset["truth"]))
    prefix = out / Path(name).parent / Path(name).name.replace("_bold.nii.gz", "")
    xfm = nt.linear.load(f"{prefix}_from-orig_to-boldref_mode-image_desc-hmc_xfm.txt", fmt="itk")
    raw = nb.load(bids / name)
    preproc = np.asarray(nb.load(f"{prefix}_desc-preproc_bold.nii.gz").dataobj)
    boldref = nb.load(f"{prefix}_desc-hmc_boldref.nii.gz")
    assert len(xfm.matrix) == raw.shape[3]
    grid = np.indices(raw.shape[:3]).reshape(3, -1)
    grid_h = np.vstack([grid, np.ones(grid.shape[1])])
    for index in (0, 4, raw.shape[3] - 1):
        volume = raw.slicer[..., index]
        moved = np.asarray(apply(xfm[index], volume, reference=boldref, order=1).dataobj)
        # Compare where the sample point lies inside the original grid; outside it the two
        # resamplers pad differently.
        source = (np.linalg.inv(raw.affine) @ xfm.matrix[index] @ boldref.affine @ grid_h)[:3]
        inside = np.all((source >= 0) & (source <= np.array(raw.shape[:3])[:, None] - 1), axis=0)
        inside = inside.reshape(raw.shape[:3])
        assert inside.mean() > 0.7
        scale = np.abs(preproc[..., index]).max()
        assert np.abs(moved - preproc[..., index])[inside].max() < 1e-3 * scale


def test_confounds_follow_fmriprep_names(good_dataset):
    out = good_dataset["out"]
    tsv = next(out.rglob("*run-1_desc-confounds_timeseries.tsv"))
    table = pd.read_csv(tsv, sep="\t")
    for column in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                   "framewise_displacement", "rmsd", "dvars", "std_dvars"):
        assert column in table.columns
    assert len(table) == 10
    assert np.isnan(table["framewise_displacement"][0])
    meta = json.loads(tsv.with_suffix(".json").read_text())
    assert meta["trans_x"]["Units"] == "mm" and meta["rot_x"]["Units"] == "rad"
    # 5 mm / 5 degree random motion gives FD well above 0.
    assert table["framewise_displacement"][1:].mean() > 0.5


def test_rerun_reuses_cache_and_gives_identical_outputs(good_dataset):
    out = good_dataset["out"]
    before = output_files(out)
    transforms = sorted(good_dataset["root"].joinpath("work").rglob("hmc_transforms.npy"))
    stamps = [p.stat().st_mtime_ns for p in transforms]
    # Remove a derivative: the cached run must still write it again.
    removed = next(out.rglob("*run-2_desc-preproc_bold.nii.gz"))
    removed.unlink()
    assert main(good_dataset["argv"]) == 0
    assert [p.stat().st_mtime_ns for p in transforms] == stamps  # nothing re-estimated
    assert output_files(out) == before



def test_same_seed_in_fresh_folders_gives_bitwise_identical_outputs(good_dataset, tmp_path):
    """--random-seed: a second run with new work and output folders (nothing cached) writes
    the same bytes, and the seed is recorded in dataset_description.json and the report."""
    argv = list(good_dataset["argv"])
    argv[1], argv[4] = str(tmp_path / "out"), str(tmp_path / "work")
    assert main(argv) == 0
    first, second = output_files(good_dataset["out"]), output_files(tmp_path / "out")
    assert len(first) > 2 * len(CONTRACT) and second == first
    description = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["RandomSeed"] == 7
    report = (tmp_path / "out" / "sub-01.html").read_text()
    assert re.search(r"Random seed.{0,80}\b7\b", report, re.S)

def test_group_level(good_dataset):
    out = good_dataset["out"]
    assert main([str(good_dataset["bids"]), str(out), "group"]) == 0
    table = pd.read_csv(out / "group_bold.tsv", sep="\t")
    assert len(table) == 2
    assert (out / "group_bold.html").is_file()


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory, mni_template):
    rng = np.random.default_rng(5)
    root = tmp_path_factory.mktemp("bad")
    series, grid, _ = make_series(mni_template, rng, n_volumes=6, max_motion=2.0)
    nan_series = series.copy()
    nan_series[10, 10, 10, 2] = np.nan
    runs = {
        "sub-01/func/sub-01_task-good_bold.nii.gz": series,
        "sub-01/func/sub-01_task-threed_bold.nii.gz": series[..., 0],
        "sub-01/func/sub-01_task-nan_bold.nii.gz": nan_series,
        "sub-01/func/sub-01_task-single_bold.nii.gz": series[..., :1],
        "sub-01/func/sub-01_task-trunc_bold.nii.gz": series,
    }
    write_dataset(root / "bids", runs, grid)
    truncated = root / "bids" / "sub-01/func/sub-01_task-trunc_bold.nii.gz"
    payload = truncated.read_bytes()
    truncated.write_bytes(payload[: len(payload) // 2])
    code = main([str(root / "bids"), str(root / "out"), "participant", "-w", str(root / "work"),
                 "--nprocs", "2"])
    return {"root": root, "out": root / "out", "code": code}


def test_bad_runs_fail_alone(bad_dataset, capsys):
    assert bad_dataset["code"] == 1
    out = bad_dataset["out"]
    assert (out / "sub-01" / "func" / "sub-01_task-good_desc-preproc_bold.nii.gz").is_file()
    for task in ("threed", "nan", "single", "trunc"):
        assert not list(out.rglob(f"*task-{task}_*")), task
    assert not list(out.rglob(".*.tmp*"))
    assert (out / "sub-01.html").is_file()


def test_bad_runs_are_named_with_their_problem(tmp_path, mni_template, capsys):
    rng = np.random.default_rng(9)
    series, grid, _ = make_series(mni_template, rng, n_volumes=4, max_motion=1.0, voxel_mm=6.0)
    nan_series = series.copy()
    nan_series[5, 5, 5, 1] = np.nan
    write_dataset(tmp_path / "bids", {
        "sub-01/func/sub-01_task-threed_bold.nii.gz": series[..., 0],
        "sub-01/func/sub-01_task-nan_bold.nii.gz": nan_series,
        "sub-01/func/sub-01_task-single_bold.nii.gz": series[..., :1],
        "sub-01/func/sub-01_task-trunc_bold.nii.gz": series,
    }, grid)
    truncated = tmp_path / "bids" / "sub-01/func/sub-01_task-trunc_bold.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:-2000])
    code = main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
                 "-w", str(tmp_path / "work"), "--nprocs", "1"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("ERROR:")]
    expected = {"threed": "3D", "nan": "NaN", "single": "single volume", "trunc": "truncated"}
    for task, problem in expected.items():
        assert any(f"task-{task}_bold.nii.gz" in line and problem in line for line in lines), \
            (task, lines)
    assert not list((tmp_path / "out").rglob("*desc-preproc*"))


def _run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    bids = tmp_path / "bids"
    code, err = _run_cli([tmp_path / "missing", tmp_path / "out", "participant"], capsys)
    assert code == 2 and "missing" in err and "does not exist" in err

    bids.mkdir()
    code, err = _run_cli([bids, tmp_path / "out", "participant"], capsys)
    assert code == 2 and "dataset_description.json" in err

    write_dataset(tmp_path / "ok", {
        "sub-01/func/sub-01_task-a_bold.nii.gz": np.ones((4, 4, 4, 3))}, np.eye(4))
    ok = tmp_path / "ok"
    code, err = _run_cli([ok, ok, "participant"], capsys)
    assert code == 2 and "must not be the BIDS dataset" in err
    code, err = _run_cli([ok, tmp_path / "out", "participant", "-w", ok / "work"], capsys)
    assert code == 2 and "work folder" in err
    code, err = _run_cli([ok, tmp_path / "out", "participant", "-w", tmp_path / "w",
                          "--participant-label", "sub-99"], capsys)
    assert code == 2 and "sub-99" in err and "sub-01" in err
    for label in ("../01", "01/x", "sub-", ""):
        code, err = _run_cli([ok, tmp_path / "out", "participant", "-w", tmp_path / "w",
                              "--participant-label", label], capsys)
        assert code == 2 and "label" in err, label
    bad_filter = tmp_path / "filter.json"
    bad_filter.write_text("{not json")
    code, err = _run_cli([ok, tmp_path / "out", "participant", "-w", tmp_path / "w",
                          "--bids-filter-file", bad_filter], capsys)
    assert code == 2 and "filter.json" in err and "JSON" in err
    # None of the refusals wrote outputs.
    assert not (tmp_path / "out").exists()


def test_filters_select_runs(tmp_path, capsys):
    series = np.ones((4, 4, 4, 3))
    write_dataset(tmp_path / "bids", {
        "sub-01/func/sub-01_task-a_run-1_bold.nii.gz": series,
        "sub-01/func/sub-01_task-a_run-2_bold.nii.gz": series,
        "sub-02/ses-x/func/sub-02_ses-x_task-b_bold.nii.gz": series}, np.eye(4))
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"bold": {"run": 2}}))
    code = main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w",
                 str(tmp_path / "w"), "--bids-filter-file", str(filters), "--boilerplate-only"])
    assert code == 0
    assert (tmp_path / "out" / "logs" / "CITATION.md").is_file()
    assert not list((tmp_path / "out").rglob("*_bold.nii.gz"))
    from unimo_bids.cli.bids import collect_runs

    runs, _, _ = collect_runs(tmp_path / "bids", tmp_path / "w",
                              filters={"bold": {"run": 2}})
    assert [Path(r.path).name for r in runs] == ["sub-01_task-a_run-2_bold.nii.gz"]
    runs, _, _ = collect_runs(tmp_path / "bids", tmp_path / "w", participant_labels=["sub-02"],
                              session_labels=["x"], task_ids=["b"])
    assert [r.subject for r in runs] == ["02"]


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = main(["--demo", str(tmp_path / "demo"), "--nprocs", "2"])
    out = capsys.readouterr().out
    assert code == 0
    means = [float(m) for m in re.findall(r"mean ([0-9.]+) mm", out)]
    assert len(means) == 2 and max(means) < 0.2, out
    assert (tmp_path / "demo" / "derivatives" / "sub-01.html").is_file()
    assert (tmp_path / "demo" / "derivatives" / "group_bold.html").is_file()


def test_gzip_outputs_are_deterministic(good_dataset):
    path = next(good_dataset["out"].rglob("*run-1_desc-brain_mask.nii.gz"))
    with open(path, "rb") as handle:
        header = handle.read(10)
    assert header[4:8] == b"\x00\x00\x00\x00"  # gzip mtime 0: reruns are byte-identical
    with gzip.open(path) as handle:
        assert len(handle.read()) > 348


def test_multiproc_after_torch_in_the_same_process(tmp_path, mni_template):
    """Workers must not deadlock when the calling process already used torch's thread pool
    (a plain fork copies a half-initialised pool). Run in a subprocess, with a timeout."""
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    series, grid, _ = make_series(mni_template, rng, n_volumes=4, max_motion=1.0, voxel_mm=6.0)
    write_dataset(tmp_path / "bids", {"sub-01/func/sub-01_task-a_bold.nii.gz": series}, grid)
    script = (
        "import torch, sys\n"
        "torch.set_num_threads(2)\n"
        "torch.randn(512, 512) @ torch.randn(512, 512)\n"
        "from unimo_bids.cli.run import main\n"
        f"sys.exit(main([{str(tmp_path / 'bids')!r}, {str(tmp_path / 'out')!r}, 'participant', "
        f"'-w', {str(tmp_path / 'work')!r}, '--nprocs', '2']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], timeout=300, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "out").rglob("*_desc-preproc_bold.nii.gz"))


def test_workers_log_at_the_level_asked_for(tmp_path, mni_template):
    """Through the installed command (its workers re-run the entry script): without -v no
    nipype node log crosses the progress bar, with -v they are there."""
    import shutil
    import subprocess
    import sys

    command = shutil.which("unimo-bids", path=str(Path(sys.executable).parent)) or \
        shutil.which("unimo-bids")
    if command is None:
        pytest.skip("the unimo-bids command is not installed")
    rng = np.random.default_rng(3)
    series, grid, _ = make_series(mni_template, rng, n_volumes=3, max_motion=1.0, voxel_mm=6.0)
    write_dataset(tmp_path / "bids", {"sub-01/func/sub-01_task-a_bold.nii.gz": series}, grid)
    for options, logged in (([], False), (["-v"], True)):
        done = subprocess.run(
            [command, str(tmp_path / "bids"), str(tmp_path / f"out{len(options)}"),
             "participant", "-w", str(tmp_path / f"work{len(options)}"), "--nprocs", "2",
             "--template", "none", *options], timeout=300, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        printed = done.stdout + done.stderr  # nipype logs to stdout
        assert ("nipype.workflow INFO" in printed) == logged, printed[-2000:]


def test_too_many_dummy_scans_fail_the_series(tmp_path, mni_template, capsys):
    rng = np.random.default_rng(4)
    series, grid, _ = make_series(mni_template, rng, n_volumes=4, max_motion=1.0, voxel_mm=6.0)
    write_dataset(tmp_path / "bids", {"sub-01/func/sub-01_task-a_bold.nii.gz": series}, grid)
    code = main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w",
                 str(tmp_path / "work"), "--nprocs", "1", "--dummy-scans", "3"])
    err = capsys.readouterr().err
    assert code == 1
    assert "sub-01_task-a_bold.nii.gz" in err and "--dummy-scans 3" in err
    assert not list((tmp_path / "out").rglob("*desc-preproc*"))


def test_log_lines_follow_the_current_stderr(capsys):
    """unimo-bids' log handler writes to sys.stderr as it is at each record, so a stream that
    was redirected (and closed) when logging was set up does not swallow or break later
    lines."""
    import contextlib
    import io

    from unimo_bids.cli.run import LOGGER, _setup_logging

    first = io.StringIO()
    with contextlib.redirect_stderr(first):
        _setup_logging(0)
        LOGGER.info("first line")
    assert "first line" in first.getvalue()
    first.close()
    LOGGER.info("second line")
    err = capsys.readouterr().err
    assert "second line" in err and "Logging error" not in err
