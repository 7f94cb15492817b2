"""The TemplateFlow template prior for brain masks (unimo.template, interfaces.template).

Core tests build a real TemplateFlow home in a temporary folder, laid out as TemplateFlow lays
it out, from the MNI152 template that nilearn ships offline. nilearn's files are
``mni_icbm152_*_tal_nlin_sym_09a``: the ICBM152 2009a nonlinear *symmetric* template, whose
TemplateFlow identifier is MNI152NLin2009aSym (nilearn's docstring calls it "asymmetrical",
but its file names and download URL say sym_09a). Optional tests use the shared real
TEMPLATEFLOW_HOME with MNI152NLin2009cAsym (UNIMO_TEST_DATA). Nothing here imports templateflow
or touches the network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from conftest import shared_data
from unimo_bids.interfaces.template import (
    TemplateNotFound,
    TemplatePrior,
    find_template_mask,
    templateflow_home,
)
from unimo_bids.unimo.geometry import centroids, mean_displacement, voxel_sizes
from unimo_bids.unimo.segment import reference_mask
from unimo_bids.unimo.shape import dice
from unimo_bids.unimo.template import MIN_DICE, check_reference_mask, fit_template_mask

NILEARN_ID = "MNI152NLin2009aSym"
SHARED_ID = "MNI152NLin2009cAsym"


@pytest.fixture(scope="module")
def nilearn_home(tmp_path_factory) -> Path:
    """A TemplateFlow home holding tpl-MNI152NLin2009aSym: res-02 T1w, res-02 and res-01 brain
    masks and template_description.json, from nilearn's offline data."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    home = tmp_path_factory.mktemp("templateflow")
    folder = home / f"tpl-{NILEARN_ID}"
    folder.mkdir()
    load_mni152_template(resolution=2).to_filename(folder / f"tpl-{NILEARN_ID}_res-02_T1w.nii.gz")
    for res in (1, 2):
        mask = load_mni152_brain_mask(resolution=res)
        nb.Nifti1Image(np.asarray(mask.dataobj, dtype=np.uint8), mask.affine).to_filename(
            folder / f"tpl-{NILEARN_ID}_res-0{res}_desc-brain_mask.nii.gz")
    (folder / "template_description.json").write_text(json.dumps({
        "Identifier": NILEARN_ID,
        "Name": "ICBM 152 Nonlinear Symmetrical template version 2009a (as shipped by nilearn)",
        "TemplateFlowVersion": "1.0.0"}))
    return home


@pytest.fixture(scope="module")
def template(nilearn_home):
    """The res-02 brain mask of the nilearn home: (bool mask, affine)."""
    img = nb.load(find_template_mask(NILEARN_ID, nilearn_home)["mask"])
    return np.asarray(img.dataobj) > 0.5, img.affine


def similarity(rotvec, shift_mm, scale, center) -> np.ndarray:
    """(4, 4) reference world -> template world: rotate about and shift from ``center``, then
    shrink the template by ``scale`` about ``center`` (a reference brain ``scale`` times the
    template's size)."""
    rigid = np.eye(4)
    rigid[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    rigid[:3, 3] = center - rigid[:3, :3] @ center + shift_mm
    grow = np.eye(4)
    grow[:3, :3] *= scale
    grow[:3, 3] = (1.0 - scale) * center
    return np.linalg.inv(grow) @ rigid


def oblique_grid(shape, voxel_mm, world_center) -> np.ndarray:
    """An oblique, left-right flipped (LAS-like) affine whose grid centre is ``world_center``."""
    axes = Rotation.from_euler("xyz", [12, -8, 20], degrees=True).as_matrix() @ np.diag([-1, 1, 1])
    affine = np.eye(4)
    affine[:3, :3] = axes @ np.diag(voxel_mm)
    affine[:3, 3] = world_center - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def resample_mask(mask, mask_affine, transform, shape, affine) -> np.ndarray:
    """The mask read through ``transform`` (target world -> mask world) on a target grid, by
    scipy (independent of the code under test)."""
    vox_map = np.linalg.inv(mask_affine) @ transform @ affine
    moved = ndimage.affine_transform(mask.astype(np.float32), vox_map[:3, :3], vox_map[:3, 3],
                                     output_shape=shape, order=1)
    return moved > 0.5


def displacement_error(fit_transform, truth, mask, affine) -> float:
    """Mean distance (reference mm) over the reference mask between where the fitted and the
    true transforms send each point (as seen from the reference)."""
    points = np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]
    return float(mean_displacement(np.linalg.inv(truth) @ fit_transform, np.eye(4)[None],
                                   points)[0])


@pytest.fixture(scope="module")
def moved_reference(template):
    """The template mask moved by a known similarity (47 degrees about a random axis, 10 mm,
    scale 0.8) onto an oblique, flipped 3.4 x 3.4 x 3.6 mm grid: (mask, affine, truth)."""
    mask, affine = template
    rng = np.random.default_rng(7)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    shift = rng.normal(size=3)
    center = centroids(mask, affine)
    truth = similarity(np.deg2rad(47.0) * axis, 10.0 * shift / np.linalg.norm(shift), 0.8, center)
    shape = (64, 64, 40)
    ref_affine = oblique_grid(shape, (3.4, 3.4, 3.6),
                              np.linalg.solve(truth, np.append(center, 1.0))[:3])
    return resample_mask(mask, affine, truth, shape, ref_affine), ref_affine, truth


@pytest.fixture(scope="module")
def reference_fit(template, moved_reference):
    """The template's fit to ``moved_reference``."""
    mask, affine = template
    ref_mask, ref_affine, _ = moved_reference
    return fit_template_mask(mask, affine, ref_mask, ref_affine)


# --- lookup ------------------------------------------------------------------------------------


def test_lookup_prefers_res02_and_finds_the_t1w(nilearn_home, monkeypatch):
    folder = nilearn_home / f"tpl-{NILEARN_ID}"
    found = find_template_mask(NILEARN_ID, nilearn_home)
    assert found == {"mask": str(folder / f"tpl-{NILEARN_ID}_res-02_desc-brain_mask.nii.gz"),
                     "image": str(folder / f"tpl-{NILEARN_ID}_res-02_T1w.nii.gz")}
    # An explicit resolution wins; there is no 1 mm T1w.
    found = find_template_mask(f"{NILEARN_ID}:res-1", nilearn_home)
    assert found["mask"].endswith("_res-01_desc-brain_mask.nii.gz") and found["image"] is None
    # Without ``home``: $TEMPLATEFLOW_HOME, else TemplateFlow's default folder.
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(nilearn_home))
    assert templateflow_home() == nilearn_home
    assert find_template_mask(NILEARN_ID)["mask"] == str(
        folder / f"tpl-{NILEARN_ID}_res-02_desc-brain_mask.nii.gz")
    monkeypatch.delenv("TEMPLATEFLOW_HOME")
    assert templateflow_home() == Path.home() / ".cache" / "templateflow"
    # A relative $TEMPLATEFLOW_HOME is made absolute: workflow nodes run in other folders.
    monkeypatch.chdir(nilearn_home.parent)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", nilearn_home.name)
    assert templateflow_home() == nilearn_home.absolute()


def test_lookup_in_the_shared_templateflow_home(monkeypatch):
    home = shared_data() / "templateflow"
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    found = find_template_mask(SHARED_ID)
    folder = home / f"tpl-{SHARED_ID}"
    assert found == {"mask": str(folder / f"tpl-{SHARED_ID}_res-02_desc-brain_mask.nii.gz"),
                     "image": str(folder / f"tpl-{SHARED_ID}_res-02_T1w.nii.gz")}
    assert find_template_mask(f"{SHARED_ID}:res-01", home)["mask"].endswith(
        "_res-01_desc-brain_mask.nii.gz")


def _assert_clear(error: Exception, template: str, home: Path):
    message = str(error)
    assert "\n" not in message
    assert template in message and str(home) in message
    assert "templateflow" in message.lower() and "--template none" in message


def test_missing_template_gives_one_clear_line(nilearn_home, tmp_path):
    with pytest.raises(TemplateNotFound) as error:  # not in a real home
        find_template_mask(SHARED_ID, nilearn_home)
    _assert_clear(error.value, SHARED_ID, nilearn_home)
    assert f"get('{SHARED_ID}', resolution=2, desc='brain', suffix='mask')" in str(error.value)
    assert isinstance(error.value, FileNotFoundError)

    empty = tmp_path / "empty"
    empty.mkdir()
    for home in (empty, tmp_path / "does-not-exist"):
        with pytest.raises(TemplateNotFound) as error:
            find_template_mask(SHARED_ID, home)
        _assert_clear(error.value, SHARED_ID, home)

    # TemplateFlow's listing without the download: empty placeholder files.
    folder = tmp_path / "skeleton" / f"tpl-{SHARED_ID}"
    folder.mkdir(parents=True)
    (folder / f"tpl-{SHARED_ID}_res-02_desc-brain_mask.nii.gz").touch()
    with pytest.raises(TemplateNotFound, match="placeholder") as error:
        find_template_mask(SHARED_ID, tmp_path / "skeleton")
    _assert_clear(error.value, SHARED_ID, tmp_path / "skeleton")

    # A cohort that is not there, and a template whose masks live in cohorts only.
    with pytest.raises(TemplateNotFound, match="cohort=1") as error:
        find_template_mask(f"{NILEARN_ID}:cohort-1", nilearn_home)
    _assert_clear(error.value, f"{NILEARN_ID}:cohort-1", nilearn_home)
    (tmp_path / "infant" / "tpl-MNIInfant" / "cohort-1").mkdir(parents=True)
    with pytest.raises(TemplateNotFound, match="MNIInfant:cohort-1"):
        find_template_mask("MNIInfant", tmp_path / "infant")

    for bad in ("../etc", "MNI152NLin2009cAsym:res-2:foo-1", ""):
        with pytest.raises(ValueError, match="invalid TemplateFlow template"):
            find_template_mask(bad, nilearn_home)


# --- fit ---------------------------------------------------------------------------------------


def test_fit_recovers_a_known_similarity(reference_fit, moved_reference):
    ref_mask, ref_affine, truth = moved_reference
    fit = reference_fit
    # Measured: Dice 0.994, scale 0.802, 0.19 mm (1.2 s on one core).
    assert fit.mask.shape == ref_mask.shape and fit.mask.dtype == bool
    assert fit.dice >= 0.98
    assert abs(fit.scale - 0.8) < 0.02
    assert displacement_error(fit.transform, truth, ref_mask, ref_affine) < 1.0
    assert fit.trimmed == 0.0


def test_fit_finds_any_orientation_and_partial_coverage(template):
    """Rotations far from the identity (uniform on SO(3)), and a brain that leaves the field
    of view (the scale comes from the volumes inside it)."""
    mask, affine = template
    center = centroids(mask, affine)
    for seed, (scale, shape, voxel) in enumerate([(1.2, (60, 60, 30), (3.0, 3.0, 4.0)),
                                                  (0.5, (96, 96, 20), (1.5, 1.5, 4.0))]):
        rotvec = Rotation.random(random_state=seed + 3).as_rotvec()
        truth = similarity(rotvec, np.array([4.0, -6.0, 3.0]), scale, center)
        ref_affine = oblique_grid(shape, voxel, np.linalg.solve(truth, np.append(center, 1))[:3])
        ref_mask = resample_mask(mask, affine, truth, shape, ref_affine)
        fit = fit_template_mask(mask, affine, ref_mask, ref_affine)
        # Measured: 89 deg, scale 1.2 cut by the FOV: Dice 0.993, scale 1.207, 0.41 mm;
        # 116 deg, scale 0.5 on 20 thick slices: Dice 0.992, scale 0.500, 0.41 mm.
        assert fit.dice >= 0.97, (seed, fit.dice)
        assert abs(fit.scale / scale - 1) < 0.03, (seed, fit.scale)
        assert displacement_error(fit.transform, truth, ref_mask, ref_affine) < 1.5


def test_fit_to_a_real_bold_mask():
    """A classical mask of a real BOLD mean against TemplateFlow's MNI152NLin2009cAsym."""
    data = shared_data()
    found = find_template_mask(SHARED_ID, data / "templateflow")
    tpl = nb.load(found["mask"])
    bold = nb.load(data / "bold" / "xa30_task-fa_bold.nii.gz")
    mean = np.asarray(bold.dataobj, dtype=np.float32).mean(-1)
    ref_mask = reference_mask(mean, bold.header.get_zooms()[:3])
    fit = fit_template_mask(np.asarray(tpl.dataobj) > 0.5, tpl.affine, ref_mask, bold.affine)
    # Measured: Dice 0.942, scale 0.893 (an individual brain against a rigid + scale template).
    assert fit.dice >= 0.9
    assert 0.8 < fit.scale < 1.05
    kept, note = check_reference_mask(ref_mask, fit)
    assert np.array_equal(kept, ref_mask) and note.startswith("brain mask kept")


# --- check -------------------------------------------------------------------------------------


def spoiled_masks(brain, ref_affine, truth) -> dict:
    """Masks spoiled on purpose, as classical masks go wrong: 'body', the brain with a slab of
    extra tissue 0-45 mm below its lowest point across the field of view; 'half', the brain
    that lost its lower half (a signal drop-out)."""
    world = np.indices(brain.shape).reshape(3, -1).T @ ref_affine[:3, :3].T + ref_affine[:3, 3]
    # The template's inferior direction, seen in the reference world.
    down = np.linalg.solve(np.linalg.inv(truth)[:3, :3].T, [0.0, 0.0, -1.0])
    depth = (world @ (down / np.linalg.norm(down))).reshape(brain.shape)
    lowest = depth[brain].max()
    return {"body": brain | ((depth > lowest - 5) & (depth < lowest + 45)),
            "half": brain & (depth < np.median(depth[brain]))}


def test_check_keeps_a_good_mask_and_corrects_spoiled_ones(template, moved_reference,
                                                          reference_fit):
    mask, affine = template
    brain, ref_affine, truth = moved_reference
    kept, note = check_reference_mask(brain, reference_fit)
    assert np.array_equal(kept, brain) and "kept" in note and "\n" not in note

    spoiled = spoiled_masks(brain, ref_affine, truth)
    # Extra tissue: the fit stays on the brain (robust scale, trimming) and the mask is cut to
    # it. Measured: Dice with the fit 0.707, fit against the true brain 0.993, corrected 0.996.
    body_fit = fit_template_mask(mask, affine, spoiled["body"], ref_affine)
    assert body_fit.dice < MIN_DICE and body_fit.trimmed > 0.2
    assert abs(body_fit.scale - 0.8) < 0.02 and dice(body_fit.mask, brain) >= 0.98
    corrected, note = check_reference_mask(spoiled["body"], body_fit)
    assert note.startswith("brain mask corrected") and "cut to the template" in note
    assert "\n" not in note
    assert dice(corrected, brain) >= 0.98 > dice(spoiled["body"], brain) + 0.2

    # Half a brain looks like a smaller brain to a similarity fit: it is flagged, and only
    # filled, never cut. Measured: Dice 0.73 with the fit; 0.667 -> 0.673 against the truth.
    half_fit = fit_template_mask(mask, affine, spoiled["half"], ref_affine)
    assert half_fit.dice < MIN_DICE
    corrected, note = check_reference_mask(spoiled["half"], half_fit)
    assert "filled with the template" in note
    assert np.all(corrected[spoiled["half"]])
    assert dice(corrected, brain) >= dice(spoiled["half"], brain)


# --- interface ---------------------------------------------------------------------------------


def _write_reference(tmp_path, brain, ref_affine, name="ref"):
    """A reference volume (brain bright, smoothed) and its mask on the same grid."""
    image = ndimage.gaussian_filter(brain.astype(np.float32) * 1000.0, 1.0)
    hdr = nb.Nifti1Header()
    hdr.set_xyzt_units("mm", "sec")
    ref = tmp_path / f"{name}_boldref.nii.gz"
    msk = tmp_path / f"{name}_mask.nii.gz"
    nb.Nifti1Image(image, ref_affine, hdr).to_filename(ref)
    nb.Nifti1Image(brain.astype(np.uint8), ref_affine, hdr).to_filename(msk)
    return str(ref), str(msk)


@pytest.fixture
def keep_torch_threads():
    """The interface sets torch's (process-wide) thread count: restore it for later tests."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_template_prior_interface(nilearn_home, moved_reference, tmp_path, monkeypatch,
                                  keep_torch_threads):
    brain, ref_affine, truth = moved_reference
    monkeypatch.chdir(tmp_path)
    ref, msk = _write_reference(tmp_path, brain, ref_affine)
    result = TemplatePrior(reference=ref, reference_mask=msk, template=NILEARN_ID,
                           template_home=str(nilearn_home)).run()
    out = result.outputs
    for path in (out.out_mask, out.out_template_mask):
        img = nb.load(path)
        assert np.allclose(img.affine, ref_affine) and img.get_data_dtype() == np.uint8
        assert img.shape == brain.shape
    assert np.array_equal(np.asarray(nb.load(out.out_mask).dataobj) > 0, brain)
    report = json.loads(Path(out.out_report).read_text())
    assert report["template"] == NILEARN_ID and report["corrected"] is False
    assert report["template_mask"].endswith("_res-02_desc-brain_mask.nii.gz")
    assert report["dice"] >= 0.98 and abs(report["scale"] - 0.8) < 0.02
    assert np.asarray(report["transform"]).shape == (4, 4) and report["seconds"] > 0

    # A spoiled mask is corrected, with a warning through nipype's logger.
    spoiled = spoiled_masks(brain, ref_affine, truth)["body"]
    ref2, msk2 = _write_reference(tmp_path, spoiled, ref_affine, "spoiled")
    handler = _Collect()
    logger = logging.getLogger("nipype.interface")
    level = logger.level  # a CLI run earlier in the session may have raised it to CRITICAL
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        result = TemplatePrior(reference=ref2, reference_mask=msk2, template=NILEARN_ID,
                               template_home=str(nilearn_home)).run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    report = json.loads(Path(result.outputs.out_report).read_text())
    assert report["corrected"] is True and report["dice"] < MIN_DICE
    assert any("brain mask corrected" in message for message in handler.messages)
    corrected = np.asarray(nb.load(result.outputs.out_mask).dataobj) > 0
    assert dice(corrected, brain) >= 0.98

    # A template that is not there stops the node with the one-line error.
    with pytest.raises(TemplateNotFound, match=SHARED_ID):
        TemplatePrior(reference=ref, reference_mask=msk, template=SHARED_ID,
                      template_home=str(nilearn_home)).run()


def test_template_prior_with_the_shared_templateflow_home(tmp_path, monkeypatch,
                                                          keep_torch_threads):
    """The default template from a real TEMPLATEFLOW_HOME, on a real BOLD reference."""
    data = shared_data()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(data / "templateflow"))
    monkeypatch.chdir(tmp_path)
    bold = nb.load(data / "bold" / "xa30_task-fa_bold.nii.gz")
    mean = np.asarray(bold.dataobj, dtype=np.float32).mean(-1)
    ref = tmp_path / "boldref.nii.gz"
    msk = tmp_path / "boldref_mask.nii.gz"
    nb.Nifti1Image(mean, bold.affine, bold.header).to_filename(ref)
    nb.Nifti1Image(reference_mask(mean, bold.header.get_zooms()[:3]).astype(np.uint8),
                   bold.affine, bold.header).to_filename(msk)
    result = TemplatePrior(reference=str(ref), reference_mask=str(msk)).run()
    report = json.loads(Path(result.outputs.out_report).read_text())
    assert report["template"] == SHARED_ID and report["corrected"] is False
    assert report["template_image"].endswith("_res-02_T1w.nii.gz")
    assert report["dice"] >= 0.9
    template_mask = nb.load(result.outputs.out_template_mask)
    assert np.allclose(template_mask.affine, bold.affine)
    assert np.allclose(voxel_sizes(template_mask.affine), voxel_sizes(bold.affine))
