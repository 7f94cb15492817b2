"""Interfaces for diffusion-weighted series: rotated gradient tables and per-shell outliers."""

from __future__ import annotations

import json
import os

import nibabel as nb
import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
)

from ..unimo.dwi import rotate_bvecs, shell_signal_z
from .series import SeriesError

OUTLIER_Z = 3.5
SHELL_META = {
    "bval": {"Description": "b-value of the volume (from the .bval file).", "Units": "s/mm^2"},
    "dwi_signal_z": {
        "Description": "Robust z-score of the volume's mean signal in the brain mask after "
                       "correction, within its b-value shell (median and MAD of the shell): "
                       "large negative values mark signal dropout.",
        "Units": "arbitrary"},
    "dwi_outlier": {
        "Description": f"1 where |dwi_signal_z| > {OUTLIER_Z}.", "Units": "boolean"},
}


def read_bvals(bval_file: str) -> np.ndarray:
    """(T,) b-values from an FSL-style text file; SeriesError (one line, naming the file)."""
    try:
        return np.atleast_1d(np.loadtxt(bval_file, dtype=float)).ravel()
    except (OSError, ValueError) as err:
        raise SeriesError(f"{bval_file}: cannot read the b-values ({err})") from None


def read_gradients(bval_file: str, bvec_file: str, n_volumes: int | None = None):
    """(bvals (T,), bvecs (3, T)) from FSL-style text files, checked against each other and
    against the number of volumes; SeriesError (one line, naming the file) otherwise."""
    bvals = read_bvals(bval_file)
    try:
        bvecs = np.atleast_2d(np.loadtxt(bvec_file, dtype=float))
    except (OSError, ValueError) as err:
        raise SeriesError(f"{bvec_file}: cannot read the b-vectors ({err})") from None
    if bvecs.shape[0] != 3 and bvecs.shape[-1] == 3:
        bvecs = bvecs.T  # one row per volume: also seen in the wild
    if bvecs.shape != (3, len(bvals)):
        raise SeriesError(f"{bvec_file}: {bvecs.shape} b-vectors for {len(bvals)} b-values")
    if n_volumes is not None and len(bvals) != n_volumes:
        raise SeriesError(f"{bval_file}: {len(bvals)} b-values for {n_volumes} volumes")
    if not (np.all(np.isfinite(bvals)) and np.all(np.isfinite(bvecs))):
        raise SeriesError(f"{bvec_file}: non-finite gradient values")
    return bvals, bvecs


class _RotateGradientsInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the series (its affine is the bvecs')")
    in_transforms = File(exists=True, mandatory=True, desc="(T, 4, 4) .npy, reference -> volume")
    in_bval = File(exists=True, mandatory=True, desc="the .bval file of the source")
    in_bvec = File(exists=True, mandatory=True, desc="the .bvec file of the source")


class _RotateGradientsOutputSpec(TraitedSpec):
    out_bval = File(exists=True, desc="b-values (unchanged)")
    out_bvec = File(exists=True, desc="b-vectors rotated into the reference frame")


class RotateGradients(SimpleInterface):
    """Rotate the b-vectors by each volume's motion, as QSIPrep does, so that the gradient
    table matches the corrected series (``unimo.dwi.rotate_bvecs``)."""

    input_spec = _RotateGradientsInputSpec
    output_spec = _RotateGradientsOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_file)
        bvals, bvecs = read_gradients(self.inputs.in_bval, self.inputs.in_bvec, img.shape[3])
        rotated = rotate_bvecs(bvecs, img.affine, np.load(self.inputs.in_transforms))
        self._results["out_bvec"] = os.path.join(runtime.cwd, "rotated.bvec")
        np.savetxt(self._results["out_bvec"], rotated, fmt="%.8f")
        self._results["out_bval"] = os.path.join(runtime.cwd, "gradients.bval")
        np.savetxt(self._results["out_bval"], bvals[None], fmt="%g")
        return runtime


class _ShellOutliersInputSpec(BaseInterfaceInputSpec):
    in_preproc = File(exists=True, mandatory=True, desc="motion-corrected 4D series")
    in_mask = File(exists=True, mandatory=True, desc="brain mask on the reference grid")
    in_bval = File(exists=True, mandatory=True, desc="the .bval file")
    in_diagnostics = File(exists=True, mandatory=True, desc="per-volume diagnostics (.tsv)")
    in_diagnostics_meta = File(exists=True, mandatory=True, desc="their descriptions (.json)")


class _ShellOutliersOutputSpec(TraitedSpec):
    out_diagnostics = File(exists=True, desc="the diagnostics with bval, dwi_signal_z, "
                                             "dwi_outlier")
    out_diagnostics_meta = File(exists=True)


class ShellOutliers(SimpleInterface):
    """A b-value-aware outlier measure: each volume's mean brain signal against the other
    volumes of its shell (``unimo.dwi.shell_signal_z``)."""

    input_spec = _ShellOutliersInputSpec
    output_spec = _ShellOutliersOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_preproc)
        mask = np.asarray(nb.load(self.inputs.in_mask).dataobj) > 0
        signal = np.array([float(np.asarray(img.dataobj[..., t])[mask].mean())
                           for t in range(img.shape[3])])
        bvals = read_bvals(self.inputs.in_bval)
        z = shell_signal_z(signal, bvals)
        table = pd.read_csv(self.inputs.in_diagnostics, sep="\t", na_values=["n/a"])
        table = table.assign(bval=bvals, dwi_signal_z=z,
                             dwi_outlier=(np.abs(z) > OUTLIER_Z).astype(int))
        with open(self.inputs.in_diagnostics_meta) as handle:
            meta = json.load(handle)
        meta.update(SHELL_META)
        self._results["out_diagnostics"] = os.path.join(runtime.cwd, "dwi_diagnostics.tsv")
        table.to_csv(self._results["out_diagnostics"], sep="\t", index=False,
                     float_format="%.6g", na_rep="n/a")
        self._results["out_diagnostics_meta"] = os.path.join(runtime.cwd, "dwi_diagnostics.json")
        with open(self._results["out_diagnostics_meta"], "w") as handle:
            json.dump(meta, handle, indent=2)
        return runtime
