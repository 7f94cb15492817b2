"""Running where neuroimagers run: the container recipe, nipype plugins and GPU slots, memory
fallbacks, and parallel participant jobs writing into one output folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch
from conftest import CONTRACT, shared_data
from packaging.requirements import Requirement

from unimo_bids.cli.parser import build_parser
from unimo_bids.cli.run import plugin_settings
from unimo_bids.interfaces.io import write_atomically
from unimo_bids.unimo.devices import fitting_chunk, run_with_memory_fallback
from unimo_bids.workflows.bold import init_series_wf

ROOT = Path(__file__).resolve().parents[1]


# --- the container recipe ------------------------------------------------------------------


def test_docker_pins_satisfy_the_package_requirements():
    """docker/requirements.txt pins every dependency of pyproject.toml (torch aside: install.sh
    installs it from the CPU or CUDA index) at a version the package accepts."""
    pins = {}
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            pins[requirement.name.lower().replace("_", "-")] = next(
                iter(requirement.specifier)).version
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for text in dependencies:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        if name == "torch":
            assert "torch" not in pins
            continue
        assert name in pins, f"{name} is not pinned in docker/requirements.txt"
        assert requirement.specifier.contains(pins[name]), (name, pins[name], text)


def test_dockerfile_runs_offline_as_any_user():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["unimo-bids"\]$', text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "chmod -R go=u /home/unimo" in text  # a HOME any UID can write
    for variable in ("TEMPLATEFLOW_HOME=/opt/templateflow", "OMP_NUM_THREADS=1",
                     "MKL_NUM_THREADS=1", "NIPYPE_NO_ET=1"):
        assert variable in text
    assert "docker/install.sh" in text and "docker/fetch_templates.py" in text
    assert "org.opencontainers.image.title" in text
    # the runtime stage sees the templates the build stage fetched
    assert "COPY --from=builder /opt/templateflow /opt/templateflow" in text


# --- nipype plugins and GPU slots ----------------------------------------------------------


def _args(*extra):
    return build_parser().parse_args(["bids", "out", "participant", *extra])


def test_gpu_procs_and_memory_reach_multiproc(tmp_path):
    settings = plugin_settings(_args("--nprocs", "2", "--gpu-procs", "3", "--mem", "6"))
    assert settings["plugin"] == "MultiProc"
    assert settings["plugin_args"]["n_gpu_procs"] == 3
    assert settings["plugin_args"]["memory_gb"] == 6
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: SLURM\nplugin_args:\n  sbatch_args: '--time=1:00:00'\n")
    settings = plugin_settings(_args("--use-plugin", str(plugin), "--gpu-procs", "3"))
    assert settings == {"plugin": "SLURM", "plugin_args": {"sbatch_args": "--time=1:00:00"}}


def _series_file(tmp_path) -> str:
    path = tmp_path / "sub-01" / "func" / "sub-01_task-a_bold.nii.gz"
    path.parent.mkdir(parents=True)
    nb.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)).to_filename(path)
    return str(path)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_gpu_steps_take_gpu_slots_only_on_a_gpu(tmp_path, device):
    """nipype's MultiProc counts a node in n_gpu_procs when its interface says use_gpu; such
    nodes ask for one slot, so that --gpu-procs N runs N of them at once."""
    bold = _series_file(tmp_path)
    workflow = init_series_wf(bold, str(tmp_path), str(tmp_path / "out"), {"RepetitionTime": 2.0},
                              device=device, omp_nthreads=2, deformable=True)
    nodes = {name.split(".")[-1]: workflow.get_node(name)
             for name in workflow.list_node_names()}
    gpu_nodes = {name for name, node in nodes.items() if node.is_gpu_node()}
    if device == "cpu":
        assert gpu_nodes == set()
        assert nodes["unimo_rigid"].n_procs == 2
    else:
        # Classical masks and shape maps are made on the GPU too (segment_torch, shape_torch).
        assert gpu_nodes == {"unimo_rigid", "apply_hmc", "unimo_deform", "segment",
                             "volume_shapes", "reference_shape"}
        assert {nodes[name].n_procs for name in gpu_nodes} == {1}


# --- memory ----------------------------------------------------------------------------------


def test_cpu_batches_are_not_sized_by_gpu_memory():
    assert fitting_chunk("cpu", (256, 256, 256), 64) == 64


def _fails_above(limit, calls, exception=torch.cuda.OutOfMemoryError):
    def run(device, chunk):
        calls.append((device, chunk))
        if (device != "cpu" or limit < 0) and chunk > limit:
            raise exception("CUDA out of memory. Tried to allocate 2.00 GiB")
        return device, chunk
    return run


def test_out_of_memory_halves_the_batch_then_goes_on():
    calls, warnings = [], []
    result = run_with_memory_fallback(_fails_above(10, calls), "cuda:0", 64, warn=warnings.append)
    assert result == ("cuda:0", 8)
    assert [chunk for _, chunk in calls] == [64, 32, 16, 8]
    assert len(warnings) == 3 and "out of GPU memory" in warnings[0]


def test_out_of_memory_with_one_volume_falls_back_to_the_cpu():
    calls, warnings = [], []
    result = run_with_memory_fallback(_fails_above(0, calls, RuntimeError), "cuda", 4,
                                      cpu_chunk_size=16, warn=warnings.append)
    assert result == ("cpu", 16)
    assert calls == [("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 16)]
    assert "on the CPU" in warnings[-1]


def test_other_errors_and_cpu_errors_propagate():
    def broken(device, chunk):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        run_with_memory_fallback(broken, "cuda", 8, warn=lambda message: None)
    calls = []
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the CPU has no fallback
        run_with_memory_fallback(_fails_above(-1, calls), "cuda", 1, warn=lambda message: None)
    assert calls == [("cuda", 1), ("cpu", 64)]


# --- parallel jobs, one output folder --------------------------------------------------------


def test_concurrent_atomic_writes_leave_one_whole_file(tmp_path):
    """Processes writing the same dataset files at once: each file is whole, one writer's."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from unimo_bids.interfaces.io import write_atomically\n"
        "out, tag = Path(sys.argv[1]), sys.argv[2]\n"
        "for i in range(200):\n"
        "    write_atomically({out / 'dataset_description.json': {'writer': tag, 'i': i, "
        "'pad': 'x' * 20000}, out / '.bidsignore': 'text:' + tag * 1000})\n"
    )
    jobs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), tag])
            for tag in "ab"]
    assert [job.wait(timeout=120) for job in jobs] == [0, 0]
    description = json.loads((tmp_path / "dataset_description.json").read_text())
    assert description["writer"] in "ab" and description["i"] == 199
    assert (tmp_path / ".bidsignore").read_text() in ("a" * 1000, "b" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bidsignore",
                                                          "dataset_description.json"]
    write_atomically({tmp_path / "dataset_description.json": {"writer": "c"}})
    assert json.loads((tmp_path / "dataset_description.json").read_text()) == {"writer": "c"}


N_VOLUMES = 8


def _two_subject_dataset(data: Path, root: Path) -> Path:
    """sub-01 and sub-02: the first volumes of the real XA30 BOLD (sub-02's in reverse order)."""
    img = nb.load(data / "bold" / "xa30_task-fa_bold.nii.gz")
    series = np.asarray(img.dataobj)[..., :N_VOLUMES]
    sidecar = json.loads((data / "bold" / "xa30_task-fa_bold.json").read_text())
    for subject, volumes in (("01", series), ("02", series[..., ::-1])):
        path = root / f"sub-{subject}" / "func" / f"sub-{subject}_task-fa_bold.nii.gz"
        path.parent.mkdir(parents=True)
        nb.Nifti1Image(np.ascontiguousarray(volumes), img.affine, img.header).to_filename(path)
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(sidecar))
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "two jobs", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
    (root / "README").write_text("Real XA30 BOLD (dcm_qa_xa30, BSD-2-Clause), two subjects.\n")
    return root


def _job_command(bids: Path, out: Path, work: Path, plugin: Path, subject: str) -> list[str]:
    """One participant job as a scheduler would start it: a fresh Python process."""
    return [sys.executable, "-c", "import sys; from unimo_bids.cli.run import main; "
                                  "sys.exit(main(sys.argv[1:]))",
            str(bids), str(out), "participant", "--participant-label", subject, "-w", str(work),
            "--use-plugin", str(plugin), "--random-seed", "3", "--skip-bids-validation"]


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    """As a SLURM array does: two processes, one subject each, each with a MultiProc plugin
    file (2 processes), the same output folder, their own work folders."""
    data = shared_data()
    root = tmp_path_factory.mktemp("two-jobs")
    bids = _two_subject_dataset(data, root / "bids")
    plugin = root / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 2\n  memory_gb: 4\n")
    jobs = [subprocess.Popen(_job_command(bids, root / "out", root / f"work-{subject}", plugin,
                                          subject),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for subject in ("01", "02")]
    results = [job.communicate(timeout=600) for job in jobs]
    return {"root": root, "bids": bids, "out": root / "out", "plugin": plugin,
            "codes": [job.returncode for job in jobs], "stderr": [e for _, e in results]}


def _subject_files(out: Path, subject: str) -> dict[str, str]:
    """Relative path -> SHA-256 of a subject's derivatives (the HTML report excluded)."""
    import hashlib

    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / f"sub-{subject}").rglob("*")) if p.is_file()}


def test_two_participant_jobs_at_once_into_one_output_folder(two_jobs):
    """Both finish, with complete outputs and a valid dataset_description.json."""
    for code, stderr in zip(two_jobs["codes"], two_jobs["stderr"]):
        assert code == 0, stderr[-3000:]
    out = two_jobs["out"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "unimo-bids"
    assert description["GeneratedBy"][0]["RandomSeed"] == 3
    assert (out / ".bidsignore").read_text().strip()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for subject in ("01", "02"):
        prefix = out / f"sub-{subject}" / "func" / f"sub-{subject}_task-fa"
        for suffix in CONTRACT:
            path = Path(f"{prefix}_{suffix}")
            assert path.is_file() and path.stat().st_size > 0, path
        assert nb.load(f"{prefix}_desc-preproc_bold.nii.gz").shape[-1] == N_VOLUMES
        assert (out / f"sub-{subject}.html").is_file()

    from bids import BIDSLayout

    layout = BIDSLayout(out, validate=False, is_derivative=True)
    preproc = layout.get(desc="preproc", suffix="bold", extension=".nii.gz")
    assert sorted(f.entities["subject"] for f in preproc) == ["01", "02"]


def test_killed_job_resumed_in_its_work_folder_gives_identical_outputs(two_jobs, tmp_path):
    """SIGKILL of the whole job (main process and MultiProc workers) at a random moment, then
    the same command with the same work folder: the outputs are byte for byte those of the
    uninterrupted job of the same subject (above)."""
    import os
    import signal
    import time

    rng = np.random.default_rng(11)
    out, work = tmp_path / "out", tmp_path / "work"
    command = _job_command(two_jobs["bids"], out, work, two_jobs["plugin"], "01")
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    time.sleep(float(rng.uniform(4.0, 14.0)))
    assert job.poll() is None, "the job finished before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert _subject_files(out, "01") == _subject_files(two_jobs["out"], "01")


@pytest.mark.parametrize("name", ["multiproc.yml", "slurm.yml", "sge.yml"])
def test_documented_plugin_files_are_accepted(name):
    """The plugin files docs/usage.md shows are read by the code that reads --use-plugin."""
    path = ROOT / "docs" / "examples" / name
    settings = plugin_settings(_args("--use-plugin", str(path)))
    assert settings["plugin"].lower() == name.split(".")[0]
    assert settings["plugin_args"]


def test_documented_slurm_array_script_is_valid_bash():
    script = ROOT / "docs" / "examples" / "slurm_array.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "--participant-label" in script.read_text()
