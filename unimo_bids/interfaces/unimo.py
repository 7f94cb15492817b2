"""Interfaces to the UniMo motion engine (``unimo_bids.unimo``)."""

from __future__ import annotations

import functools
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

from ..unimo.deform import estimate_deformation
from ..unimo.deform_net import load_predictor, predict_from_masks
from ..unimo.devices import fitting_chunk, run_with_memory_fallback
from ..unimo.geometry import grid_center, mean_displacement, motion_parameters, world_points
from ..unimo.hmc import apply_head_motion, estimate_head_motion
from ..unimo.network import load_network
from ..unimo.tracking import track_moving_anatomy

BRANCHES = {"image": "image branch (keypoints of intensities)",
            "shape": "shape branch (keypoints of the brain's signed distance map)"}
PARAMETERS = {"trans_x": ("mm", "Translation along x"), "trans_y": ("mm", "Translation along y"),
              "trans_z": ("mm", "Translation along z"), "rot_x": ("rad", "Rotation about x"),
              "rot_y": ("rad", "Rotation about y"), "rot_z": ("rad", "Rotation about z")}

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
TRACKING_META = {
    "mask_agreement": {
        "Description": "Dice between the volume's segmentation (near its tracked mask) and the "
                       "reference mask carried to the volume by its rigid transform "
                       "(moving-anatomy mode; n/a without a per-volume segmentation).",
        "Units": "arbitrary",
    },
}
NETWORK_META = {
    "unimo_lambda": {
        "Description": "Learned SLERP weight of the shape branch in the fused network estimate "
                       "(0 = image branch only, 1 = shape branch only); where the two branches' "
                       "rotations are more than 45 degrees apart, the fused estimate is the "
                       "image branch's.",
        "Units": "arbitrary",
    },
    "unimo_refine_shift": {
        "Description": "Mean displacement over the reference brain mask between the network's "
                       "fused estimate and the final (refined) transform: how far test-time "
                       "refinement moved the network's answer.",
        "Units": "mm",
    },
    "unimo_branch_disagreement": {
        "Description": "Mean displacement over the reference brain mask between the image "
                       "branch's and the shape branch's rigid estimates: large where the two "
                       "branches of the network disagree.",
        "Units": "mm",
    },
    "unimo_start_network": {
        "Description": "1 where refinement continued from one of the network's estimates "
                       "(fused or shape branch), 0 where it continued from "
                       "another start (the identity, or in moving-anatomy mode "
                       "the previous round's estimate; the lowest coarse-level residual wins).",
        "Units": "boolean",
    },
    **{f"unimo_{branch}_{name}": {
        "Description": f"{label} of the {text}'s rigid estimate (same convention as "
                       f"{name}).", "Units": units}
       for branch, text in BRANCHES.items() for name, (units, label) in PARAMETERS.items()},
}


def _set_threads(num_threads: int, seed: int | None) -> None:
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if seed is not None:
        torch.manual_seed(seed)
        # With a seed, CPU results are bitwise reproducible (GPU kernels may still differ).
        torch.use_deterministic_algorithms(True, warn_only=True)


def use_gpu_trait():
    """The input nipype's MultiProc reads to count a node against ``n_gpu_procs``."""
    return traits.Bool(False, usedefault=True,
                       desc="the node runs on a GPU (nipype schedules it in a GPU slot)")


def network_diagnostics(result, affine, mask) -> dict:
    """Per-volume columns describing the network's part in ``result`` (a HeadMotion)."""
    center = grid_center(mask.shape, affine)
    points = world_points(mask.shape, affine, mask)[::7]
    columns = {"unimo_lambda": np.full(len(result.transforms), result.network.lam),
               "unimo_refine_shift": mean_displacement(result.network.fused, result.transforms,
                                                       points),
               "unimo_branch_disagreement": mean_displacement(result.network.image,
                                                              result.network.shape, points),
               "unimo_start_network": ((result.start >= 1)
                                       & (result.start <= result.network_starts)).astype(int)}
    for branch in BRANCHES:
        params = motion_parameters(getattr(result.network, branch), center)
        for i, name in enumerate(PARAMETERS):
            columns[f"unimo_{branch}_{name}"] = params[:, i]
    return columns


def _series_inputs(inputs):
    """Threads and seed set; (image, series (X, Y, Z, T) float32, reference, reference mask)."""
    _set_threads(inputs.num_threads, inputs.seed)
    img = nb.load(inputs.in_file)
    series = np.asarray(img.dataobj, dtype=np.float32)
    reference = np.asarray(nb.load(inputs.reference).dataobj, dtype=np.float32)
    return img, series, reference, np.asarray(nb.load(inputs.reference_mask).dataobj) > 0


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
    use_network = traits.Bool(True, usedefault=True,
                              desc="start from the UniMo network's keypoint estimates")
    weights = traits.Either(None, File(exists=True), default=None, usedefault=True,
                            desc="network checkpoint; None: the packaged weights")
    refine = traits.Bool(True, usedefault=True,
                         desc="test-time refinement; False reports the network alone")
    moving_anatomy = traits.Bool(False, usedefault=True,
                                 desc="the anatomy in the reference mask moves inside still "
                                      "tissue (fetal): register inside the mask only and "
                                      "track the mask (see unimo.tracking)")
    in_masks = File(exists=True, desc="moving-anatomy mode: 4D segmentation of each volume, "
                                      "checked against the tracked masks")
    intensity_bins = traits.Int(0, usedefault=True,
                                desc="0: linear intensity relation to the reference; n > 0: "
                                     "any function of it, in n bins (contrast that changes "
                                     "across the series, e.g. PET frames)")
    use_gpu = use_gpu_trait()


class _UniMoRigidOutputSpec(TraitedSpec):
    out_transforms = File(exists=True, desc="(T, 4, 4) .npy, RAS reference -> volume")
    out_itk = File(exists=True, desc="ITK text file, one AffineTransform per volume")
    out_diagnostics = File(exists=True, desc="per-volume diagnostics (.tsv)")
    out_diagnostics_meta = File(exists=True, desc="descriptions and units (.json)")
    out_masks = File(desc="moving-anatomy mode: 4D uint8 tracked masks (the reference mask "
                          "carried to each volume)")


class UniMoRigid(SimpleInterface):
    """Batched rigid head-motion estimation on the chosen device."""

    input_spec = _UniMoRigidInputSpec
    output_spec = _UniMoRigidOutputSpec

    def _run_interface(self, runtime):
        img, series, reference, mask = _series_inputs(self.inputs)
        shapes = shape_ref = None
        if self.inputs.in_shape_maps and self.inputs.reference_shape_map:
            shapes = np.asarray(nb.load(self.inputs.in_shape_maps).dataobj, dtype=np.float32)
            shape_ref = np.asarray(nb.load(self.inputs.reference_shape_map).dataobj,
                                   dtype=np.float32)
        network = (load_network(self.inputs.weights, self.inputs.device)
                   if self.inputs.use_network or not self.inputs.refine else None)
        tracked = None
        if self.inputs.moving_anatomy:
            volume_masks = None
            if self.inputs.in_masks:
                volume_masks = np.asarray(nb.load(self.inputs.in_masks).dataobj) > 0
                volume_masks = np.ascontiguousarray(np.moveaxis(
                    volume_masks.reshape(series.shape), -1, 0))
            tracked = run_with_memory_fallback(
                lambda device, chunk: track_moving_anatomy(
                    series, img.affine, reference, mask, volume_masks, network=network,
                    device=device, chunk_size=chunk),
                self.inputs.device, fitting_chunk(self.inputs.device, series.shape, 64))
            result = tracked.motion
            masks_path = os.path.join(runtime.cwd, "tracked_masks.nii")
            header = img.header.copy()
            header.set_data_dtype(np.uint8)
            out = nb.Nifti1Image(np.moveaxis(tracked.masks, 0, -1).astype(np.uint8),
                                 img.affine, header)
            out.header.set_slope_inter(1.0, 0.0)
            out.to_filename(masks_path)
            self._results["out_masks"] = masks_path
        else:
            result = run_with_memory_fallback(
                lambda device, chunk: estimate_head_motion(
                    series, img.affine, reference, mask, shapes, shape_ref, device=device,
                    chunk_size=chunk, network=network, refine=self.inputs.refine,
                    intensity_bins=self.inputs.intensity_bins),
                self.inputs.device, fitting_chunk(self.inputs.device, series.shape, 64))

        self._results["out_transforms"] = os.path.join(runtime.cwd, "hmc_transforms.npy")
        np.save(self._results["out_transforms"], result.transforms)
        self._results["out_itk"] = os.path.join(runtime.cwd, "hmc_xfm.txt")
        write_itk_transforms(result.transforms, self._results["out_itk"])
        self._results["out_diagnostics"] = os.path.join(runtime.cwd, "hmc_diagnostics.tsv")
        columns = {"hmc_residual": result.residual, "hmc_iterations": result.iterations}
        meta = dict(DIAGNOSTICS_META)
        if tracked is not None:
            columns["mask_agreement"] = tracked.agreement
            meta.update(TRACKING_META)
        if result.network is not None:
            columns.update(network_diagnostics(result, img.affine, mask))
            meta.update(NETWORK_META)
        pd.DataFrame(columns).to_csv(self._results["out_diagnostics"], sep="\t", index=False,
                                     float_format="%.6g", na_rep="n/a")
        self._results["out_diagnostics_meta"] = os.path.join(runtime.cwd, "hmc_diagnostics.json")
        with open(self._results["out_diagnostics_meta"], "w") as handle:
            json.dump(meta, handle, indent=2)
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="validated 4D series")
    in_transforms = File(exists=True, mandatory=True, desc="(T, 4, 4) .npy transforms")
    in_fields = File(exists=True, desc="deformable displacement series (UniMoDeform), composed "
                                       "with the transforms into one interpolation")
    device = traits.Str("cpu", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    use_gpu = use_gpu_trait()


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="motion-corrected series (.nii.gz, float32)")


class ApplyHeadMotion(SimpleInterface):
    """Resample each volume onto the reference grid once, through its rigid transform (and its
    deformation, when given)."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.num_threads, None)
        img = nb.load(self.inputs.in_file)
        series = np.asarray(img.dataobj, dtype=np.float32)
        transforms = np.load(self.inputs.in_transforms)
        fields = field_affine = None
        if self.inputs.in_fields:
            fields, field_affine = load_fields(self.inputs.in_fields)
        corrected = run_with_memory_fallback(
            lambda device, chunk: apply_head_motion(series, img.affine, transforms, device=device,
                                                    chunk_size=chunk, fields=fields,
                                                    field_affine=field_affine),
            self.inputs.device, fitting_chunk(self.inputs.device, series.shape, 64, 8))
        header = img.header.copy()
        header.set_data_dtype(np.float32)
        self._results["out_file"] = os.path.join(runtime.cwd, "preproc.nii.gz")
        nb.Nifti1Image(corrected, img.affine, header).to_filename(self._results["out_file"])
        return runtime


DEFORM_META = {
    "deform_mean": {
        "Description": "Mean length of the deformable displacement (after the rigid "
                       "transform) over the reference brain mask.",
        "Units": "mm",
    },
    "deform_max": {
        "Description": "Largest length of the deformable displacement over the reference "
                       "brain mask.",
        "Units": "mm",
    },
    "deform_jacobian_min": {
        "Description": "Smallest Jacobian determinant of the deformation on its working grid "
                       "(> 0: the deformation is invertible, folds nowhere).",
        "Units": "arbitrary",
    },
    "deform_rejected": {
        "Description": "1 where the estimated deformation folded (a Jacobian determinant <= 0) "
                       "and was not used: the volume was corrected rigidly only.",
        "Units": "boolean",
    },
    "deform_ncc_rigid": {
        "Description": "Correlation with the reference inside the brain mask after the rigid "
                       "transform alone (working grid).",
        "Units": "arbitrary",
    },
    "deform_ncc": {
        "Description": "Correlation with the reference inside the brain mask after the rigid "
                       "transform and the deformation (working grid).",
        "Units": "arbitrary",
    },
}


def save_fields(deformation, path: str) -> str:
    """Write a Deformation's fields as a 5D NIfTI (X', Y', Z', T, 3) of world RAS mm vectors on
    its working grid (intent 'vector'), the convention of ``unimo.deform``."""
    data = np.ascontiguousarray(np.transpose(deformation.displacement, (2, 3, 4, 0, 1)),
                                dtype=np.float32)
    img = nb.Nifti1Image(data, deformation.grid_affine)
    img.header.set_intent("vector", (), name="RAS mm pull-back")
    img.header.set_xyzt_units("mm")
    img.to_filename(path)
    return path


def load_fields(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(fields (T, 3, X', Y', Z') float32, grid affine (4, 4)) from ``save_fields``' file."""
    img = nb.load(path)
    if img.ndim != 5 or img.shape[4] != 3:
        raise ValueError(f"{path}: expected a (X, Y, Z, T, 3) displacement series, got shape "
                         f"{img.shape}")
    data = np.asarray(img.dataobj, dtype=np.float32)
    return np.ascontiguousarray(np.transpose(data, (3, 4, 0, 1, 2))), img.affine


class _UniMoDeformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="validated 4D series")
    reference = File(exists=True, mandatory=True, desc="3D reference on the same grid")
    reference_mask = File(exists=True, mandatory=True, desc="brain mask of the reference")
    in_transforms = File(exists=True, mandatory=True, desc="(T, 4, 4) .npy rigid transforms")
    in_diagnostics = File(exists=True, desc="the rigid step's diagnostics (.tsv), extended")
    in_diagnostics_meta = File(exists=True, desc="their descriptions (.json), extended")
    in_masks = File(exists=True, desc="4D brain masks of the volumes (the predictor's moving "
                                      "shapes); the reference mask moved rigidly when absent")
    iterations = traits.Int(-1, usedefault=True,
                            desc="test-time optimisation steps; -1: the engine's default; 0: "
                                 "the predictor's estimate alone")
    predictor = traits.Either(None, File(exists=True), default=None, usedefault=True,
                              desc="velocity predictor; None: the packaged one")
    use_predictor = traits.Bool(False, usedefault=True,
                                desc="start the optimisation from the predictor (else from 0)")
    device = traits.Str("cpu", usedefault=True, desc="torch device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    seed = traits.Either(None, traits.Int, default=None, usedefault=True)
    use_gpu = use_gpu_trait()


class _UniMoDeformOutputSpec(TraitedSpec):
    out_fields = File(exists=True, desc="5D NIfTI (X', Y', Z', T, 3) displacement series")
    out_diagnostics = File(exists=True, desc="rigid + deformable diagnostics (.tsv)")
    out_diagnostics_meta = File(exists=True, desc="descriptions and units (.json)")


class UniMoDeform(SimpleInterface):
    """Band-limited EPDiff deformable correction after the rigid transforms (``unimo.deform``).
    """

    input_spec = _UniMoDeformInputSpec
    output_spec = _UniMoDeformOutputSpec

    def _run_interface(self, runtime):
        img, series, reference, mask = _series_inputs(self.inputs)
        options = {"iterations": self.inputs.iterations} if self.inputs.iterations >= 0 else {}
        net = None
        if self.inputs.use_predictor:
            net = load_predictor(self.inputs.predictor, self.inputs.device)
            if self.inputs.in_masks:
                options["masks"] = np.asarray(nb.load(self.inputs.in_masks).dataobj) > 0
        transforms = np.load(self.inputs.in_transforms)

        def deform(device, chunk):
            if net is not None:  # on the device of this attempt
                options["predictor"] = functools.partial(predict_from_masks, net.to(device))
            return estimate_deformation(series, img.affine, reference, mask, transforms,
                                        device=device, chunk_size=chunk, **options)

        deformation = run_with_memory_fallback(
            deform, self.inputs.device, fitting_chunk(self.inputs.device, series.shape, 16),
            cpu_chunk_size=16)
        self._results["out_fields"] = save_fields(
            deformation, os.path.join(runtime.cwd, "deform_fields.nii.gz"))

        columns = (pd.read_csv(self.inputs.in_diagnostics, sep="\t", na_values=["n/a"])
                   if self.inputs.in_diagnostics else pd.DataFrame(index=range(series.shape[3])))
        meta = {}
        if self.inputs.in_diagnostics_meta:
            with open(self.inputs.in_diagnostics_meta) as handle:
                meta = json.load(handle)
        columns = columns.assign(deform_mean=deformation.mean_mm, deform_max=deformation.max_mm,
                                 deform_jacobian_min=deformation.min_jacobian,
                                 deform_rejected=deformation.rejected.astype(int),
                                 deform_ncc_rigid=deformation.ncc_rigid,
                                 deform_ncc=deformation.ncc_deformed)
        meta.update(DEFORM_META)
        self._results["out_diagnostics"] = os.path.join(runtime.cwd, "deform_diagnostics.tsv")
        columns.to_csv(self._results["out_diagnostics"], sep="\t", index=False,
                       float_format="%.6g", na_rep="n/a")
        self._results["out_diagnostics_meta"] = os.path.join(runtime.cwd,
                                                             "deform_diagnostics.json")
        with open(self._results["out_diagnostics_meta"], "w") as handle:
            json.dump(meta, handle, indent=2)
        return runtime
