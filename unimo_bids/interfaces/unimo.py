"""Interfaces to the UniMo motion engine (``unimo_bids.unimo``)."""

from __future__ import annotations

import json
import os

import nibabel as nb
import numpy as np
import pandas as pd
import torch
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)
from nitransforms.linear import LinearTransformsMapping

from ..unimo.hmc import apply_head_motion, estimate_head_motion

DIAGNOSTICS_META = {
    "hmc_residual": {
        "Description": "Robust normalised intensity residual between the aligned volume and "
                       "the reference after rigid registration (0 = identical).",
        "Units": "arbitrary",
    },
    "hmc_iterations": {
        "Description": "Gauss-Newton iterations used at the finest registration level.",
        "Units": "count",
    },
}


def _set_threads(num_threads: int, seed: int | None) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if seed is not None:
        torch.manual_seed(seed)


def write_itk_transforms(transforms: np.ndarray, path: str) -> None:
    """Write (T, 4, 4) RAS fixed -> moving matrices as one ITK AffineTransform per volume."""
    LinearTransformsMapping(transforms).to_filename(path, fmt="itk")


class _UniMoRigidInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="validated 4D series")
    reference = File(exists=True, mandatory=True, desc="3D reference on the same grid")
    reference_mask = File(exists=True, mandatory=True, desc="brain mask of the reference")
    in_shape_maps = File(exists=True, desc="4D signed distance maps of each volume's mask")
    reference_shape_map = File(exists=True, desc="signed distance map of the reference mask")
    device = traits.Str("cpu", usedefault=True, desc="torch device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    seed = traits.Either(None, traits.Int, default=None, usedefault=True)


class _UniMoRigidOutputSpec(TraitedSpec):
    out_transforms = File(exists=True, desc="(T, 4, 4) .npy, RAS reference -> volume")
    out_itk = File(exists=True, desc="ITK text file, one AffineTransform per volume")
    out_diagnostics = File(exists=True, desc="per-volume diagnostics (.tsv)")
    out_diagnostics_meta = File(exists=True, desc="descriptions and units (.json)")


class UniMoRigid(SimpleInterface):
    """Batched rigid head-motion estimation on the chosen device."""

    input_spec = _UniMoRigidInputSpec
    output_spec = _UniMoRigidOutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.num_threads, self.inputs.seed)
        img = nb.load(self.inputs.in_file)
        series = np.asarray(img.dataobj, dtype=np.float32)
        reference = np.asarray(nb.load(self.inputs.reference).dataobj, dtype=np.float32)
        mask = np.asarray(nb.load(self.inputs.reference_mask).dataobj) > 0
        shapes = shape_ref = None
        if self.inputs.in_shape_maps and self.inputs.reference_shape_map:
            shapes = np.asarray(nb.load(self.inputs.in_shape_maps).dataobj, dtype=np.float32)
            shape_ref = np.asarray(nb.load(self.inputs.reference_shape_map).dataobj,
                                   dtype=np.float32)
        result = estimate_head_motion(series, img.affine, reference, mask, shapes, shape_ref,
                                      device=self.inputs.device)

        self._results["out_transforms"] = os.path.join(runtime.cwd, "hmc_transforms.npy")
        np.save(self._results["out_transforms"], result.transforms)
        self._results["out_itk"] = os.path.join(runtime.cwd, "hmc_xfm.txt")
        write_itk_transforms(result.transforms, self._results["out_itk"])
        self._results["out_diagnostics"] = os.path.join(runtime.cwd, "hmc_diagnostics.tsv")
        pd.DataFrame({"hmc_residual": result.residual,
                      "hmc_iterations": result.iterations}).to_csv(
            self._results["out_diagnostics"], sep="\t", index=False, float_format="%.6g")
        self._results["out_diagnostics_meta"] = os.path.join(runtime.cwd, "hmc_diagnostics.json")
        with open(self._results["out_diagnostics_meta"], "w") as handle:
            json.dump(DIAGNOSTICS_META, handle, indent=2)
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="validated 4D series")
    in_transforms = File(exists=True, mandatory=True, desc="(T, 4, 4) .npy transforms")
    device = traits.Str("cpu", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="motion-corrected series (.nii.gz, float32)")


class ApplyHeadMotion(SimpleInterface):
    """Resample each volume onto the reference grid once, through its rigid transform."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.num_threads, None)
        img = nb.load(self.inputs.in_file)
        series = np.asarray(img.dataobj, dtype=np.float32)
        transforms = np.load(self.inputs.in_transforms)
        corrected = apply_head_motion(series, img.affine, transforms, device=self.inputs.device)
        header = img.header.copy()
        header.set_data_dtype(np.float32)
        self._results["out_file"] = os.path.join(runtime.cwd, "preproc.nii.gz")
        nb.Nifti1Image(corrected, img.affine, header).to_filename(self._results["out_file"])
        return runtime
