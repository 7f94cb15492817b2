"""The bad-input matrix: real brain images (nilearn's MNI152 template on coarse grids), each
series altered in one way, all in one dataset processed once through the CLI.

Every bad series must fail alone: one ERROR line naming its file and its problem, no output of
its own, while the good series finish and the exit code is 1. Inputs that can be processed
(symlinks, a shearing affine, a qform that disagrees with the sform, 1.5x1.5x15 mm voxels) are
processed, with a warning naming the file where there is something to say. docs/errors.md
shows each message.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from conftest import CONTRACT, coarse_grid

from unimo_bids.cli.run import main
from unimo_bids.unimo.geometry import grid_center
from unimo_bids.unimo.synthetic import random_rigid_motions, simulate_series

TR = 2.0
FUNC = "sub-01/func"


def _series(template, n_volumes=4, voxel_mm=8.0, anisotropy=(1.0, 1.0, 1.0), seed=0):
    data, affine = template
    shape, grid = coarse_grid(data.shape, affine, voxel_mm, anisotropy)
    rng = np.random.default_rng(seed)
    motions = random_rigid_motions(n_volumes, 2.0, 2.0, grid_center(shape, grid), rng)
    series = simulate_series(data, affine, motions, shape, grid)
    return series + 0.01 * series.max() * rng.standard_normal(series.shape).astype(np.float32), \
        grid


def _write(root: Path, task: str, data, affine, sidecar: dict | str | None = None,
           tr: float = TR, extension: str = ".nii.gz", header_edit=None) -> Path:
    """Write a series and its sidecar; ``header_edit(header)`` then alters the written header
    as it is (nibabel would otherwise rebuild it from the affine)."""
    path = root / FUNC / f"sub-01_task-{task}_bold{extension}"
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nb.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    if img.ndim >= 4:
        img.header["pixdim"][4] = tr
    img.to_filename(path)
    if header_edit is not None:
        header = img.header.copy()
        header_edit(header)
        nb.Nifti1Image(np.asarray(data, dtype=np.float32), None, header).to_filename(path)
    text = sidecar if isinstance(sidecar, str) else json.dumps(
        {"RepetitionTime": tr, "TaskName": task} if sidecar is None else sidecar)
    (root / FUNC / f"sub-01_task-{task}_bold.json").write_text(text)
    return path


def _corrupt_gzip(path: Path) -> None:
    payload = bytearray(path.read_bytes())
    middle = len(payload) // 2
    payload[middle:middle + 64] = bytes(range(64))  # same length, garbage deflate stream
    path.write_bytes(bytes(payload))


def _zero_voxel_size(path: Path) -> None:
    """Store pixdim[1] = 0 in the file itself (nibabel would write 1 in its place)."""
    payload = bytearray(gzip.decompress(path.read_bytes()))
    payload[80:84] = np.float32(0.0).tobytes()  # pixdim[1]: bytes 76 + 4
    path.write_bytes(gzip.compress(bytes(payload)))


def _huge_header(path: Path) -> None:
    """A header announcing 512x512x300x2000 int16 voxels (0.6 TB as float32) and no data."""
    header = nb.Nifti1Header()
    header.set_data_shape((512, 512, 300, 2000))
    header.set_data_dtype(np.int16)
    header.set_zooms((0.5, 0.5, 0.5, TR))
    header.set_xyzt_units("mm", "sec")
    header.set_sform(np.diag([0.5, 0.5, 0.5, 1.0]), code=1)
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 4096)


# task -> the words its ERROR line must contain
FAILING = {
    "gzcorrupt": "corrupt",
    "truncated": "truncated",
    "empty": "empty (0 bytes)",
    "threed": "3D",
    "fived": "5D",
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
    "zerovol": "all zero",
    "single": "single volume",
    "singular": "not invertible",
    "zerovoxel": "invalid voxel size",
    "huge": "GB of memory",
    "notr": "no RepetitionTime",
    "badtr": "contradicts",
    "badjson": "not valid JSON",
}
# task -> the words of its warning (None: processed without one)
PROCESSED = {
    "good": None,
    "symlinked": None,
    "sheared": "shears the voxel grid",
    "qsform": "qform and the sform disagree",
    "thick": "ratio 10",
}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, mni_template):
    root = tmp_path_factory.mktemp("matrix")
    bids = root / "bids"
    series, grid = _series(mni_template)
    (bids / FUNC).mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "bad inputs", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))

    _write(bids, "good", series, grid)
    elsewhere = _write(root / "elsewhere", "symlinked", series, grid)
    (bids / FUNC / elsewhere.name).symlink_to(elsewhere)
    (bids / FUNC / elsewhere.name.replace(".nii.gz", ".json")).symlink_to(
        elsewhere.with_name(elsewhere.name.replace(".nii.gz", ".json")))
    shear = grid.copy()
    shear[:3, :3] = grid[:3, :3] @ np.array([[1, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    _write(bids, "sheared", series, shear)

    def shift_qform(header):
        qform = header.get_best_affine().copy()
        qform[:3, 3] += 5.0
        header.set_qform(qform, code=1)
    _write(bids, "qsform", series, grid, header_edit=shift_qform)
    thick, thick_grid = _series(mni_template, voxel_mm=1.5, anisotropy=(1.0, 1.0, 10.0))
    _write(bids, "thick", thick, thick_grid)

    _corrupt_gzip(_write(bids, "gzcorrupt", series, grid))
    truncated = _write(bids, "truncated", series, grid)
    truncated.write_bytes(truncated.read_bytes()[:-3000])
    _write(bids, "empty", series, grid).write_bytes(b"")
    _write(bids, "threed", series[..., 0], grid)
    _write(bids, "fived", np.stack([series, series], axis=-1), grid)
    for task, value in (("nan", np.nan), ("inf", np.inf)):
        bad = series.copy()
        bad[3, 3, 3, 1] = value
        _write(bids, task, bad, grid)
    zero = series.copy()
    zero[..., 2] = 0
    _write(bids, "zerovol", zero, grid)
    _write(bids, "single", series[..., :1], grid)
    def singular(header):
        affine = header.get_best_affine().copy()
        affine[:3, 2] = 0
        header.set_sform(affine, code=1)
        header["qform_code"] = 0
    _write(bids, "singular", series, grid, header_edit=singular)

    _zero_voxel_size(_write(bids, "zerovoxel", series, grid))
    _huge_header(_write(bids, "huge", series[..., :2], grid, extension=".nii"))
    _write(bids, "notr", series, grid, sidecar={"TaskName": "notr"}, tr=0.0)
    _write(bids, "badtr", series, grid, sidecar={"RepetitionTime": 3.5, "TaskName": "badtr"})
    _write(bids, "badjson", series, grid, sidecar='{"RepetitionTime": 2.0,')

    out = root / "out"
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from unimo_bids.cli.run import main; "
                               "sys.exit(main(sys.argv[1:]))",
         str(bids), str(out), "participant", "-w", str(root / "work"), "--nprocs", "2",
         "--skip-bids-validation"], capture_output=True, text=True, timeout=900)
    (root / "stderr.txt").write_text(done.stderr)  # kept for docs/errors.md
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
    return {"code": done.returncode, "stderr": done.stderr, "errors": errors, "out": out,
            "bids": bids}


def test_bad_series_fail_and_the_others_finish(matrix):
    assert matrix["code"] == 1, matrix["stderr"][-3000:]
    assert f"{len(FAILING)} of {len(FAILING) + len(PROCESSED)} series failed" in matrix["stderr"]


@pytest.mark.parametrize("task", sorted(FAILING))
def test_each_bad_series_has_one_line_naming_file_and_problem(matrix, task):
    name = f"sub-01_task-{task}_bold.nii"
    lines = [line for line in matrix["errors"] if name in line]
    assert len(lines) == 1, (task, matrix["errors"])
    assert FAILING[task] in lines[0], lines[0]
    assert "Traceback" not in matrix["stderr"]
    assert not list(matrix["out"].rglob(f"*task-{task}_*")), task


@pytest.mark.parametrize("task", sorted(PROCESSED))
def test_processable_series_are_processed_with_their_warning(matrix, task):
    prefix = matrix["out"] / FUNC / f"sub-01_task-{task}"
    for suffix in CONTRACT:
        assert Path(f"{prefix}_{suffix}").is_file(), (task, suffix)
    warnings = [line for line in matrix["stderr"].splitlines()
                if "WARNING" in line and f"task-{task}_bold" in line]
    if PROCESSED[task] is None:
        assert not warnings, warnings
    else:
        assert len(warnings) == 1 and PROCESSED[task] in warnings[0], warnings


def test_sheared_and_thick_series_keep_their_geometry(matrix):
    for task in ("sheared", "thick"):
        source = nb.load(matrix["bids"] / FUNC / f"sub-01_task-{task}_bold.nii.gz")
        preproc = nb.load(matrix["out"] / FUNC / f"sub-01_task-{task}_desc-preproc_bold.nii.gz")
        assert preproc.shape == source.shape
        assert np.allclose(preproc.affine, source.affine, atol=1e-4)


def test_no_temporary_or_partial_files(matrix):
    assert not [p for p in matrix["out"].rglob("*") if p.name.endswith(".tmp")]


# --- folders and option files ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory, mni_template):
    root = tmp_path_factory.mktemp("small")
    series, grid = _series(mni_template, n_volumes=3, voxel_mm=10.0)
    (root / "bids" / FUNC).mkdir(parents=True)
    (root / "bids" / "dataset_description.json").write_text(json.dumps(
        {"Name": "small", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    _write(root / "bids", "a", series, grid)
    return root


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _mount_tmpfs(folder: Path, options: str) -> bool:
    """A real small or read-only filesystem where the machine allows it (root, Linux)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def test_read_only_output_folder_is_refused_before_any_work(small_dataset, capsys):
    out = small_dataset / "readonly"
    if not _mount_tmpfs(out, "ro,size=1m"):
        out.chmod(0o555)  # not root: permissions are enough
    try:
        code, err = _cli(capsys, small_dataset / "bids", out, "participant",
                         "-w", small_dataset / "work-ro")
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and str(out) in lines[0] and "not writable" in lines[0]


def test_full_disk_gives_one_line_and_no_partial_outputs(small_dataset, tmp_path):
    """Output folder on a 64 kB filesystem (a tmpfs; where mounting is not allowed, the
    process's file size limit, RLIMIT_FSIZE, gives the same kind of OS write error)."""
    out = tmp_path / "small-disk"
    mounted = _mount_tmpfs(out, "size=64k")
    limit = "" if mounted else (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000)); ")
    try:
        done = subprocess.run(
            [sys.executable, "-c", limit + "import sys; from unimo_bids.cli.run import main; "
                                           "sys.exit(main(sys.argv[1:]))",
             str(small_dataset / "bids"), str(out), "participant",
             "-w", str(tmp_path / "work"), "--nprocs", "1"],
            capture_output=True, text=True, timeout=600)
        errors = [line for line in done.stderr.splitlines()
                  if line.startswith(("ERROR:", "unimo-bids: error"))]
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert any("sub-01_task-a_bold.nii.gz" in line and
                   re.search(r"No space left|File too large", line) for line in errors), errors
        leftovers = [p.name for p in out.rglob("*") if p.is_file()]
        assert not [n for n in leftovers if n.endswith(".tmp") or "task-a" in n], leftovers
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], capture_output=True)


@pytest.mark.parametrize("option", ["--bids-filter-file", "--use-plugin"])
@pytest.mark.parametrize("target", ["folder", "/dev/zero", "big"])
def test_option_files_must_be_small_regular_files(small_dataset, tmp_path, capsys, option,
                                                  target):
    if target == "folder":
        path = tmp_path
    elif target == "big":
        path = tmp_path / "big.json"
        path.write_text(" " * (2 << 20) + "{}")
    else:
        path = Path(target)
    code, err = _cli(capsys, small_dataset / "bids", tmp_path / "out", "participant",
                     "-w", tmp_path / "work", option, path)
    assert code == 2 and str(path) in err
    assert "regular file" in err or "at most 1 MB" in err
    assert not (tmp_path / "out").exists()


def test_nothing_is_written_through_a_symlink_out_of_the_output_folder(small_dataset,
                                                                       tmp_path, capsys):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "sub-01").symlink_to(outside, target_is_directory=True)
    code, err = _cli(capsys, small_dataset / "bids", out, "participant", "-w", tmp_path / "work",
                     "--nprocs", "1")
    assert code == 1
    assert "refusing to write outside" in err
    assert list(outside.rglob("*")) == []


def test_corrupt_gzip_is_named_by_the_reader(tmp_path):
    """The gzip layer's own error reaches the message (not only 'cannot read')."""
    from unimo_bids.interfaces.series import SeriesError, load_series

    path = tmp_path / "x.nii.gz"
    nb.Nifti1Image(np.ones((6, 6, 6, 3), np.float32), np.eye(4)).to_filename(path)
    with gzip.open(path) as handle:
        assert handle.read()
    _corrupt_gzip(path)
    with pytest.raises(SeriesError, match=re.escape(str(path))):
        load_series(str(path))


# --- interruption ----------------------------------------------------------------------------


def test_an_interrupt_swallowed_by_a_finaliser_still_ends_the_run_as_interrupted(
        tmp_path, monkeypatch, capsys):
    """Python only reports ("Exception ignored") a KeyboardInterrupt raised while a finaliser
    runs, and goes on; the run then finishes, and must still exit 130."""
    import signal

    from unimo_bids.cli import run

    class InterruptedWhileFinalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between these bytecodes, inside __del__
                pass

    def group_level(args):
        InterruptedWhileFinalised()  # dropped at once: __del__ runs here
        return 0

    monkeypatch.setattr(run, "run_group", group_level)
    previous = signal.getsignal(signal.SIGINT)
    try:
        code = run.main([str(tmp_path), str(tmp_path / "out"), "group"])
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err.splitlines()[-1]


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_interrupted_run_stops_cleanly(small_dataset, tmp_path, signal_name):
    """SIGTERM to the main process (docker stop, a batch scheduler), or SIGINT to the whole
    process group (Ctrl-C), once the first steps have finished: exit code 130, a message that
    says so, and in the output folder no temporary file and no incomplete series."""
    import signal
    import time

    bids = small_dataset / "bids"
    out, work = tmp_path / "out", tmp_path / "work"
    job = subprocess.Popen(
        [sys.executable, "-c", "import sys; from unimo_bids.cli.run import main; "
                               "sys.exit(main(sys.argv[1:]))",
         str(bids), str(out), "participant", "-w", str(work), "--nprocs", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(work.rglob("result_segment.pklz")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.poll() is None, "the run ended before it could be interrupted"
    number = getattr(signal, signal_name)
    if signal_name == "SIGINT":
        os.killpg(job.pid, number)
    else:
        os.kill(job.pid, number)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr.splitlines()[-1], stderr[-3000:]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    written = [p for p in out.rglob("*_desc-preproc_bold.nii.gz")]
    for path in written:  # a series is complete or absent
        prefix = str(path).replace("_desc-preproc_bold.nii.gz", "")
        assert all(Path(f"{prefix}_{suffix}").is_file() for suffix in CONTRACT)


def test_file_name_that_is_not_utf8_fails_alone(small_dataset, tmp_path, capsys):
    """pybids cannot index such a name; the series is reported (its name escaped) and the
    others are processed."""
    import shutil

    bids = tmp_path / "bids"
    shutil.copytree(small_dataset / "bids", bids)
    source = bids / FUNC / "sub-01_task-a_bold.nii.gz"
    func = os.fsencode(bids / FUNC)
    shutil.copyfile(source, os.fsdecode(func + b"/sub-01_task-caf\xe9_bold.nii.gz"))
    code, err = _cli(capsys, bids, tmp_path / "out", "participant", "-w", tmp_path / "work",
                     "--nprocs", "1")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "sub-01_task-caf\\xe9_bold.nii.gz" in errors[0]
    assert "not valid UTF-8" in errors[0]
    assert (tmp_path / "out" / FUNC / "sub-01_task-a_desc-preproc_bold.nii.gz").is_file()


def test_dataset_reached_through_a_symlink_is_processed(small_dataset, tmp_path, capsys):
    """A BIDS folder given by a path through a symlink (common on clusters): the name check
    used to compare pybids' unresolved paths with the resolved root and crash."""
    link = tmp_path / "link"
    link.symlink_to(small_dataset / "bids", target_is_directory=True)
    code, err = _cli(capsys, link, tmp_path / "out", "participant", "-w", tmp_path / "work",
                     "--nprocs", "1")
    assert code == 0, err[-2000:]
    assert (tmp_path / "out" / FUNC / "sub-01_task-a_desc-preproc_bold.nii.gz").is_file()



def test_the_worker_server_exits_quietly_when_the_main_process_is_gone():
    """The forkserver that starts the MultiProc workers (with worker_signals preloaded) ends with
    EOFError or EBADF when the interrupted main process closes its socket mid-request; CI once
    saw that traceback after the 'interrupted' line. Other errors still print."""
    env = dict(os.environ, UNIMO_BIDS_FORKSERVER="1")
    quiet = "import unimo_bids.cli.worker_signals, errno; raise {}"
    for error in ("EOFError()", "OSError(errno.EBADF, 'Bad file descriptor')"):
        done = subprocess.run([sys.executable, "-c", quiet.format(error)], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr == "", done.stderr
    done = subprocess.run([sys.executable, "-c", quiet.format("ValueError('real')")], env=env,
                          capture_output=True, text=True)
    assert "ValueError: real" in done.stderr
