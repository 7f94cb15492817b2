"""Helpers shared by the benchmark scripts (run by hand; not tests, not part of the package).

Real data are read from the folder named by the environment variable ``UNIMO_TEST_DATA``
(default ``/work/shared/data``); nothing is copied into the repository.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

DEFAULT_DATA = str(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
DATA_HELP = ("Real data are read from $UNIMO_TEST_DATA (default when unset: "
             f"{DEFAULT_DATA}); nothing is copied into the repository")


LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_frame(affine):
    """ITK's physical frame of a RAS NIfTI grid: origin (3,), spacing (3,), direction (3, 3)
    in LPS, as ANTs and SimpleITK images want it."""
    lps = LPS @ np.asarray(affine, dtype=float)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    return lps[:3, 3], spacing, lps[:3, :3] / spacing


def lps_point_map_to_ras(apply_point) -> np.ndarray:
    """4x4 RAS matrix of an ITK-style linear transform given as a function LPS point -> LPS point
    (ANTs' ``apply_to_point``, SimpleITK's ``TransformPoint``). It is read off where four points
    go, whatever the transform's parameterisation and centre."""
    probes = np.array([[0.0, 0, 0], [50, 0, 0], [0, 50, 0], [0, 0, 50]])
    mapped = np.array([apply_point(tuple(p)) for p in probes])
    lps = np.eye(4)
    lps[:3, 3] = mapped[0]
    lps[:3, :3] = ((mapped[1:] - mapped[0]) / 50.0).T
    return LPS @ lps @ LPS


def data_dir() -> Path:
    """The shared real-data folder ($UNIMO_TEST_DATA, default ../shared/data beside the repo)."""
    folder = Path(os.environ.get("UNIMO_TEST_DATA", DEFAULT_DATA))
    if not folder.is_dir():
        sys.exit(f"real-data folder {folder} not found: set UNIMO_TEST_DATA")
    return folder


# --------------------------------------------------------------------------------------------
# machine, timing, memory


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    """One markdown line describing the machine and library versions."""
    import nibabel
    import scipy
    import torch

    load = os.getloadavg()
    return (f"{os.cpu_count()} CPU cores, `lscpu` model name: {cpu_model()}; "
            f"Python {platform.python_version()}, torch {torch.__version__} "
            f"(torch.get_num_threads() = {torch.get_num_threads()}), numpy {np.__version__}, "
            f"scipy {scipy.__version__}, nibabel {nibabel.__version__}; "
            f"load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; "
            f"run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Measure:
    """Wall time, process CPU time (all threads) and peak RSS of a block."""

    wall: float
    cpu: float
    peak_mib: float  # growth above the RSS before the block
    peak_abs_mib: float  # the process's peak RSS during the block


@contextmanager
def measure():
    """``with measure() as m: ...`` -> m.wall (s), m.cpu (s), m.peak_mib (MiB above the RSS
    before the block) and m.peak_abs_mib (peak RSS of the process during the block); both are
    the whole process's peak so far when VmHWM cannot be reset. Resetting VmHWM also resets
    ``resource.getrusage().ru_maxrss``."""
    import gc

    gc.collect()
    result = Measure()
    rss0 = _status_kib("VmRSS")
    if not reset_peak_rss():
        rss0 = 0
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield result
    finally:
        result.wall = time.perf_counter() - t0
        result.cpu = time.process_time() - c0
        result.peak_abs_mib = _status_kib("VmHWM") / 1024.0
        result.peak_mib = max(_status_kib("VmHWM") - rss0, 0) / 1024.0


def markdown_table(headers, rows) -> str:
    """A markdown table from a header list and rows of already formatted cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(interpreter: str = "python") -> str:
    """The command that ran this script, as it would be typed from the repository root."""
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parents[1])
    return " ".join([interpreter, script] + sys.argv[1:])


def warm_up() -> None:
    """One small registration so that torch's first-call costs are not timed."""
    from unimo_bids.unimo.hmc import estimate_head_motion

    rng = np.random.default_rng(0)
    vol = np.zeros((24, 24, 24), np.float32)
    vol[6:18, 5:19, 7:17] = 1.0
    series = np.stack([vol + 0.01 * rng.standard_normal(vol.shape).astype(np.float32)] * 3, -1)
    for channels in (None, vol - 0.5):
        estimate_head_motion(series, np.diag([3.0, 3.0, 3.0, 1.0]), vol, vol > 0,
                             None if channels is None else np.stack([channels] * 3, -1),
                             channels)


# --------------------------------------------------------------------------------------------
# simulated series from nilearn's MNI152 template (as tests/test_engine.py ``moved_series``)


def mni_template():
    """nilearn's MNI152 template at 2 mm: (data float32, affine)."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    return np.asarray(img.get_fdata(), dtype=np.float32), img.affine


def mni_brain_points(step: int = 2) -> np.ndarray:
    """World points (N, 3) of nilearn's MNI152 brain mask (2 mm), every ``step``-th voxel per
    axis: the brain over which displacement errors of template-based series are averaged."""
    from nilearn.datasets import load_mni152_brain_mask

    from unimo_bids.unimo.geometry import world_points

    img = load_mni152_brain_mask(resolution=2)
    mask = np.zeros(img.shape, dtype=bool)
    mask[::step, ::step, ::step] = np.asarray(img.dataobj)[::step, ::step, ::step] > 0
    return world_points(img.shape, img.affine, mask)


def coarse_grid(template_shape, template_affine, voxel_mm, anisotropy=(1.0, 1.0, 1.0)):
    """A coarser (optionally anisotropic) grid covering the template: (shape, affine)."""
    spacing = np.asarray(anisotropy, dtype=float) * voxel_mm
    src = np.sqrt((np.asarray(template_affine)[:3, :3] ** 2).sum(0))
    step = spacing / src
    shape = tuple(int(n) for n in np.floor((np.asarray(template_shape) - 1) / step) + 1)
    affine = np.asarray(template_affine, dtype=float) @ np.diag(np.append(step, 1.0))
    return shape, affine


def blur_to_psf(data, data_affine, spacing_mm):
    """Gaussian blur of an image to a Gaussian PSF of FWHM = the target voxel size per axis
    (as tests/test_engine.py ``moved_series``: sigma^2 = (FWHM^2 - h^2) / 2.355^2, in voxels
    of the source, h = source voxel)."""
    from scipy import ndimage

    src = np.sqrt((np.asarray(data_affine)[:3, :3] ** 2).sum(0))
    fwhm_vox = np.asarray(spacing_mm, dtype=float) / src
    return ndimage.gaussian_filter(data, np.sqrt(np.maximum(fwhm_vox ** 2 - 1.0, 0.0)) / 2.355)


def load_series_with_reference_mask(path):
    """(img, data (X,Y,Z,T) float32, voxel sizes, middle volume, its brain mask)."""
    import nibabel as nb

    from unimo_bids.unimo.segment import reference_mask

    img = nb.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    voxel = tuple(float(z) for z in img.header.get_zooms()[:3])
    ref = data[..., data.shape[-1] // 2]
    return img, data, voxel, ref, reference_mask(ref, voxel)


def write_section(path, section: str, text: str) -> None:
    """Replace (or append) the ``section`` heading's part of a markdown file with ``text``."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    start = old.find(section)
    if start < 0:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + text
    else:
        end = old.find("\n## ", start + len(section))
        new = old[:start] + text.rstrip() + ("" if end < 0 else "\n\n" + old[end:].lstrip("\n"))
    path.write_text(new.rstrip() + "\n")
