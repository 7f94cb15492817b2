"""The TemplateFlow template prior for brain masks, offline.

A TemplateFlow template's brain mask (``desc-brain_mask``) is read from ``TEMPLATEFLOW_HOME``
the way TemplateFlow lays it out, without importing ``templateflow`` (its import and its ``get``
may reach the network), registered to the reference's brain mask with the UniMo engine
(:func:`unimo_bids.unimo.template.fit_template_mask`), and used to check that mask
(:func:`unimo_bids.unimo.template.check_reference_mask`).

TemplateFlow layout (``<home>``: ``$TEMPLATEFLOW_HOME``, else ``~/.cache/templateflow``)::

    <home>/tpl-<ID>/tpl-<ID>_res-<R>_desc-brain_mask.nii.gz
    <home>/tpl-<ID>/tpl-<ID>_res-<R>_T1w.nii.gz
    <home>/tpl-<ID>/cohort-<N>/tpl-<ID>_cohort-<N>_res-<R>_desc-brain_mask.nii.gz

A file that TemplateFlow has listed but not downloaded is an empty placeholder (or, in a DataLad
clone, a broken link): it counts as missing.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch
from nipype import logging
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..unimo.template import MIN_DICE, check_reference_mask, fit_template_mask
from .segment import _out_path, _save_like
from .unimo import use_gpu_trait

LOGGER = logging.getLogger("nipype.interface")

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"
# Resolutions in order of preference: 2 mm is plenty for a prior fitted at 4 mm, and 8x
# lighter than 1 mm.
PREFERRED_RESOLUTIONS = (2, 1)

_ID = re.compile(r"[A-Za-z0-9]+")
_MODIFIER = re.compile(r"(cohort|res)-([A-Za-z0-9]+)")


class TemplateNotFound(FileNotFoundError):
    """A template (or its brain mask) is not in TEMPLATEFLOW_HOME."""


def templateflow_home() -> Path:
    """TemplateFlow's home folder: ``$TEMPLATEFLOW_HOME``, else ``~/.cache/templateflow``;
    absolute, since workflow nodes run in folders of their own."""
    home = os.environ.get("TEMPLATEFLOW_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "templateflow").absolute()


def parse_template(template: str) -> tuple[str, dict]:
    """``'ID[:cohort-N][:res-R]'`` (fMRIPrep's spelling) -> (ID, {'cohort': N, 'res': R})."""
    name, *modifiers = str(template).strip().split(":")
    if not _ID.fullmatch(name):
        raise ValueError(f"invalid TemplateFlow template {template!r}: expected an identifier "
                         f"such as {DEFAULT_TEMPLATE}, optionally followed by :cohort-N or :res-N")
    options = {}
    for modifier in modifiers:
        match = _MODIFIER.fullmatch(modifier)
        if not match:
            raise ValueError(f"invalid TemplateFlow template {template!r}: unknown modifier "
                             f"{modifier!r} (expected cohort-N or res-N)")
        options[match.group(1)] = match.group(2)
    return name, options


def _downloaded(path: Path) -> bool:
    """A real file with content (not TemplateFlow's empty placeholder nor a broken link)."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _resolution_rank(resolution: str | None, wanted: str | None) -> tuple:
    """Sort key: the requested resolution first, then 2 mm, 1 mm, then any other."""
    number = int(resolution) if resolution is not None and resolution.isdigit() else None
    if wanted is not None:
        wanted_number = int(wanted) if wanted.isdigit() else None
        if resolution == wanted or (number is not None and number == wanted_number):
            return (0, 0, "")
    if number in PREFERRED_RESOLUTIONS:
        return (1, PREFERRED_RESOLUTIONS.index(number), "")
    return (2, number if number is not None else 1 << 30, resolution or "")


def find_template_mask(template: str, home=None) -> dict:
    """Find a template's brain mask (and T1w image) in a local TemplateFlow home.

    template: a TemplateFlow identifier, optionally ``ID:cohort-N`` (cohort folders are
        ignored otherwise) and/or ``:res-R`` (preferred resolution).
    home: the TemplateFlow home; ``templateflow_home()`` when None.
    Returns ``{'mask': str path of tpl-<ID>[_cohort-<N>]_res-<R>_desc-brain_mask.nii.gz,
    'image': str path of the matching _T1w.nii.gz or None}``, preferring res-02, then res-01,
    then any. Raises ``TemplateNotFound`` (one line: the template, the home searched and how to
    pre-fetch it) when no downloaded mask is there.
    """
    name, options = parse_template(template)
    home = Path(home).expanduser() if home is not None else templateflow_home()
    cohort = options.get("cohort")
    folder = home / f"tpl-{name}"
    prefix = f"tpl-{name}" + (f"_cohort-{cohort}" if cohort else "")
    if cohort:
        folder = folder / f"cohort-{cohort}"
    pattern = re.compile(re.escape(prefix) + r"(?:_res-([A-Za-z0-9]+))?_desc-brain_mask\.nii\.gz")

    candidates, placeholders = [], 0
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.fullmatch(path.name)
            if not match:
                continue
            if _downloaded(path):
                candidates.append((_resolution_rank(match.group(1), options.get("res")), path,
                                   match.group(1)))
            else:
                placeholders += 1
    if not candidates:
        raise TemplateNotFound(_missing_message(template, name, cohort, home, folder,
                                                placeholders))
    _, mask, resolution = min(candidates)
    image = folder / (prefix + (f"_res-{resolution}" if resolution else "") + "_T1w.nii.gz")
    return {"mask": str(mask), "image": str(image) if _downloaded(image) else None}


def _missing_message(template, name, cohort, home, folder, placeholders) -> str:
    """One line: what is missing, where it was looked for, and how to pre-fetch it."""
    if not home.is_dir():
        where = f"TEMPLATEFLOW_HOME={home} does not exist"
    elif not folder.is_dir():
        where = f"TEMPLATEFLOW_HOME={home} has no {folder.relative_to(home)}/ folder"
    elif placeholders:
        where = (f"TEMPLATEFLOW_HOME={home} holds only empty placeholders of its brain masks "
                 f"(listed, not downloaded)")
    else:
        where = (f"TEMPLATEFLOW_HOME={home} has no desc-brain_mask file in "
                 f"{folder.relative_to(home)}/")
        if not cohort and any(folder.glob("cohort-*")):
            where += f" (its masks are per cohort: write e.g. {name}:cohort-1)"
    cohort_arg = f", cohort={cohort}" if cohort else ""
    return (f"TemplateFlow template '{template}' not found: {where}. Pre-fetch it on a machine "
            f"with internet (templateflow installed) with TEMPLATEFLOW_HOME={home} python -c "
            f"\"from templateflow.api import get; get('{name}'{cohort_arg}, resolution=2, "
            f"desc='brain', suffix='mask'); get('{name}'{cohort_arg}, resolution=2, desc=None, "
            f"suffix='T1w')\" (then copy that folder to this machine), or run with --template none")


class _TemplatePriorInputSpec(BaseInterfaceInputSpec):
    reference = File(exists=True, mandatory=True, desc="3D reference volume (NIfTI)")
    reference_mask = File(exists=True, mandatory=True,
                          desc="3D brain mask of the reference (NIfTI, nonzero = brain), on "
                               "the reference's grid")
    template = traits.Str(DEFAULT_TEMPLATE, usedefault=True,
                          desc="TemplateFlow template: ID, ID:cohort-N and/or :res-R")
    template_home = traits.Str(desc="TemplateFlow home (default: $TEMPLATEFLOW_HOME, else "
                                    "~/.cache/templateflow)")
    min_dice = traits.Range(0.0, 1.0, MIN_DICE, usedefault=True,
                            desc="the reference mask is kept when its Dice with the registered "
                                 "template mask reaches this")
    device = traits.Str("cpu", usedefault=True, desc="torch device")
    use_gpu = use_gpu_trait()
    # The fit moves a few thousand points: a second thread gains nothing, and OpenMP threads
    # that wait for a busy core slow it tenfold or more (measured on 2 shared cores).
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")


class _TemplatePriorOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="uint8 brain mask to use (the reference mask, or its "
                                      "correction by the template), on the reference grid")
    out_template_mask = File(exists=True, desc="uint8 template brain mask registered to the "
                                               "reference, on the reference grid")
    out_report = File(exists=True, desc="JSON: template, files, scale, Dice, transform, note")


class TemplatePrior(SimpleInterface):
    """Register a TemplateFlow template's brain mask to the reference's mask, and check it.

    The fit is a similarity (rigid by the UniMo engine on signed distance maps, plus one
    isotropic scale), see :func:`unimo_bids.unimo.template.fit_template_mask`. A reference mask
    whose Dice with the registered template mask is below ``min_dice`` is corrected (see
    :func:`unimo_bids.unimo.template.check_reference_mask`) and a warning says so.
    """

    input_spec = _TemplatePriorInputSpec
    output_spec = _TemplatePriorOutputSpec

    def _run_interface(self, runtime):
        start = time.perf_counter()
        torch.set_num_threads(max(self.inputs.num_threads, 1))
        found = find_template_mask(self.inputs.template, self.inputs.template_home or None)
        template_img = nb.load(found["mask"])
        template_mask = _volume(template_img, found["mask"]) > 0.5  # some masks are float

        reference = nb.load(self.inputs.reference)
        mask_img = nb.load(self.inputs.reference_mask)
        reference_mask = _volume(mask_img, self.inputs.reference_mask) != 0
        shape = reference.shape[:3]
        if reference_mask.shape != shape or not np.allclose(mask_img.affine, reference.affine,
                                                              atol=1e-3):
            raise ValueError(f"{self.inputs.reference_mask}: the mask is not on the grid of the "
                             f"reference {self.inputs.reference}")

        fit = fit_template_mask(template_mask, template_img.affine, reference_mask,
                                reference.affine, device=self.inputs.device)
        mask, note = check_reference_mask(reference_mask, fit, min_dice=self.inputs.min_dice)
        corrected = not np.array_equal(mask, reference_mask)
        if corrected:
            LOGGER.warning("%s: %s", self.inputs.reference_mask, note)
        else:
            LOGGER.info("%s: %s", self.inputs.reference_mask, note)

        cwd = runtime.cwd
        self._results["out_mask"] = _save_like(
            mask, reference, np.uint8, _out_path(self.inputs.reference_mask, "_checked", cwd))
        self._results["out_template_mask"] = _save_like(
            fit.mask, reference, np.uint8,
            _out_path(self.inputs.reference_mask, "_template", cwd))
        report = {
            "template": self.inputs.template,
            "template_mask": found["mask"],
            "template_image": found["image"],
            "scale": fit.scale,
            "dice": fit.dice,
            "min_dice": self.inputs.min_dice,
            "corrected": bool(corrected),
            "trimmed_fraction": fit.trimmed,
            "residual": fit.residual if np.isfinite(fit.residual) else None,
            "transform": np.asarray(fit.transform).tolist(),
            "transform_direction": "reference world (mm, RAS) -> template world (mm, RAS)",
            "note": note,
            "seconds": round(time.perf_counter() - start, 3),
        }
        report_path = os.path.join(cwd, "template_prior.json")
        Path(report_path).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        self._results["out_report"] = report_path
        return runtime


def _volume(img, path) -> np.ndarray:
    """The 3D data of an image (a 4D image with one volume is accepted)."""
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D image, got shape {data.shape}")
    return data
