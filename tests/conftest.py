"""Shared fixtures: real brain images shipped by installed packages, and known motion."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["NIPYPE_NO_ET"] = "1"
# The default --template check runs only when its template is installed. Point TemplateFlow at
# an empty folder, so that the suite gives the same results on a machine that has templates;
# the template tests set their own TEMPLATEFLOW_HOME.
os.environ["TEMPLATEFLOW_HOME"] = tempfile.mkdtemp(prefix="unimo-empty-templateflow-")

# Every series output of the participant level (DESIGN.md, "Output contract").
CONTRACT = [
    "desc-preproc_bold.nii.gz",
    "desc-preproc_bold.json",
    "desc-hmc_boldref.nii.gz",
    "desc-brain_mask.nii.gz",
    "label-brain_distmap.nii.gz",
    "from-orig_to-boldref_mode-image_desc-hmc_xfm.txt",
    "desc-confounds_timeseries.tsv",
    "desc-confounds_timeseries.json",
    "stat-tsnr_desc-raw_boldmap.nii.gz",
    "stat-tsnr_desc-preproc_boldmap.nii.gz",
    "desc-qc_bold.json",
]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (small tensors; two test workers share two cores),
    restored after it: later modules keep theirs. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mni_template():
    """nilearn's MNI152 2009c template at 2 mm: (data float32, affine)."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    return np.asarray(img.get_fdata(), dtype=np.float32), img.affine


def coarse_grid(template_shape, template_affine, voxel_mm, anisotropy=(1.0, 1.0, 1.0)):
    """A coarser (optionally anisotropic) grid covering the template: (shape, affine)."""
    spacing = np.asarray(anisotropy, dtype=float) * voxel_mm
    step = spacing / 2.0
    shape = tuple(int(n) for n in np.floor((np.asarray(template_shape) - 1) / step) + 1)
    affine = np.asarray(template_affine, dtype=float) @ np.diag(np.append(step, 1.0))
    return shape, affine


def shared_data() -> Path:
    """The real-data folder named by UNIMO_TEST_DATA, or skip the test."""
    folder = os.environ.get("UNIMO_TEST_DATA")
    if not folder or not Path(folder).is_dir():
        pytest.skip("UNIMO_TEST_DATA is not set to the shared data folder")
    return Path(folder).absolute()  # CI gives ../shared/data; tests and nodes change folder
