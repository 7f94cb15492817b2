"""Aligning the runs of one anatomical contrast (e.g. fetal T2w stacks) to a reference run.

The aligned runs keep their voxels: only the header's voxel-to-world affine changes, so thick
slices are never interpolated (slice-to-volume reconstruction, out of scope here, wants them
as acquired).
"""

from __future__ import annotations

import os

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..unimo.devices import run_with_memory_fallback
from ..unimo.geometry import mean_displacement, rotation_angle, world_points
from ..unimo.runs import align_run
from ..unimo.segment import reference_mask
from ..unimo.segnet import load_segmenter, segment_with_model
from .reports import plot_aligned_run
from .segment import _voxel_size, load_user_mask
from .series import SeriesError
from .unimo import _set_threads, use_gpu_trait, write_itk_transforms

# A fetal brain moves inside still tissue: look only just beyond a user's brain mask. An
# automatic mask of a whole head moves with it, and its scalp helps.
USER_MASK_MARGIN_MM = 4.0
AUTOMATIC_MASK_MARGIN_MM = 8.0


def load_run(path: str):
    """(image, its voxels as stored (scaled), (X, Y, Z) float32 copy) of a 3D run, read once
    and checked; SeriesError names the file."""
    try:
        img = nb.load(path)
        voxels = np.asanyarray(img.dataobj)
        data = np.asarray(voxels, dtype=np.float32)
    except Exception as err:
        raise SeriesError(f"{path}: cannot read the image ({' '.join(str(err).split())})") \
            from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SeriesError(f"{path}: an anatomical run must be a 3D image, got shape "
                          f"{data.shape}")
    if not np.isfinite(data).all():
        raise SeriesError(f"{path}: the image holds NaN or infinite values")
    if not np.ptp(data) > 0:
        raise SeriesError(f"{path}: the image is constant (no anatomy to align)")
    return img, voxels, data


def aligned_image(img, data: np.ndarray, transform: np.ndarray, dtype=None):
    """The run with its voxels unchanged and its affine moved into the reference's world:
    voxel -> run world (A) -> reference world (transform^-1 A). Header fields kept."""
    affine = np.linalg.inv(transform) @ img.affine
    header = img.header.copy()
    if dtype is not None:
        header.set_data_dtype(dtype)
    out = nb.Nifti1Image(data if dtype is None else data.astype(dtype), affine, header)
    out.set_sform(affine, int(img.header["sform_code"]) or 1)
    out.set_qform(affine, int(img.header["qform_code"]) or 1)
    return out


class _AlignRunsInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, minlen=2,
                           desc="3D runs of one contrast; the first is the reference")
    in_masks = traits.List(traits.Str, desc="the user's brain mask of each run ('' for none; "
                                            "same grid as its run)")
    source_uris = traits.List(traits.Str, desc="BIDS URI of each run, for the sidecars")
    seg_model = File(exists=True, desc="trained segmenter (TorchScript) for the runs without "
                                       "a user's mask")
    device = traits.Str("cpu", usedefault=True, desc="torch device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    seed = traits.Either(None, traits.Int, default=None, usedefault=True,
                         desc="random seed (deterministic algorithms)")
    use_gpu = use_gpu_trait()


class _AlignRunsOutputSpec(TraitedSpec):
    out_run_files = traits.List(traits.List(File(exists=True)),
                                desc="per run: aligned image, ITK transform[, aligned mask]")
    out_run_names = traits.List(traits.List(traits.Str),
                                desc="per run: derivative names after the source entities")
    out_sidecars = traits.List(traits.Dict, desc="per run: metadata of the aligned image")
    out_run_figures = traits.List(traits.List(File(exists=True)),
                                  desc="per run: its alignment figure (none for the reference)")
    out_figure_names = traits.List(traits.List(traits.Str),
                                   desc="per run: figure names after the source entities")


class AlignRuns(SimpleInterface):
    """Rigidly align each run to the first (``unimo_bids.unimo.runs.align_run``).

    Masks: the user's where given, else the trained segmenter's (``seg_model``) when there is
    one; without either, the reference run's classical brain mask and no mask of the other
    runs (their intensities alone, from every cube rotation). Each aligned
    run is written with its voxels unchanged and a new affine; its transform (reference world
    -> run world, ITK) and, with a mask, the mask with the same new affine.
    """

    input_spec = _AlignRunsInputSpec
    output_spec = _AlignRunsOutputSpec

    def _run_interface(self, runtime):
        _set_threads(self.inputs.num_threads, self.inputs.seed)
        files = list(self.inputs.in_files)
        masks = list(self.inputs.in_masks) if self.inputs.in_masks else [""] * len(files)
        uris = list(self.inputs.source_uris) if self.inputs.source_uris else files
        suffix = os.path.basename(files[0]).split(".")[0].rsplit("_", 1)[-1]
        runs = [load_run(path) for path in files]
        user_masks, source = [], "user"
        for (img, _, _), mask in zip(runs, masks):
            try:
                user_masks.append(load_user_mask(mask, img) if mask else None)
            except ValueError as err:
                raise SeriesError(str(err)) from None
        if self.inputs.seg_model and any(mask is None for mask in user_masks):
            model, _ = load_segmenter(self.inputs.seg_model, self.inputs.device)
            user_masks = [segment_with_model(model, data, img.affine, self.inputs.device)
                          if mask is None else mask
                          for (img, _, data), mask in zip(runs, user_masks)]
            source = "segmenter" if not any(masks) else "user and segmenter"
        ref_img, _, ref_data = runs[0]
        ref_mask = user_masks[0]
        if ref_mask is None or not ref_mask.any():
            ref_mask = reference_mask(ref_data, _voxel_size(ref_img))
            if not ref_mask.any():
                raise SeriesError(f"{files[0]}: no brain found in the reference run (empty "
                                  "automatic mask); give its mask with --derivatives")
            user_masks[0] = None
        by_user = user_masks[0] is not None
        margin = USER_MASK_MARGIN_MM if by_user else AUTOMATIC_MASK_MARGIN_MM
        points = world_points(ref_mask.shape, ref_img.affine, ref_mask)[::7]

        run_files, run_names, sidecars, run_figures, figure_names = [], [], [], [], []
        mask_img = nb.Nifti1Image(ref_mask.astype(np.uint8), ref_img.affine)
        for index, ((img, voxels, data), mask) in enumerate(zip(runs, user_masks)):
            if index == 0:
                transform, residual, overlap = np.eye(4), 0.0, 1.0
            else:
                found = run_with_memory_fallback(
                    lambda device, _: align_run(ref_data, ref_img.affine, ref_mask, data,
                                                img.affine, mask if by_user else None,
                                                margin_mm=margin, device=device),
                    self.inputs.device, 1)
                transform, residual, overlap = found.transform, found.residual, found.overlap
            stem = os.path.join(runtime.cwd, f"run{index:03d}")
            aligned = aligned_image(img, voxels, transform)
            aligned.to_filename(stem + "_aligned.nii")
            write_itk_transforms(transform[None], stem + "_xfm.txt")
            files_out = [stem + "_aligned.nii", stem + "_xfm.txt"]
            names = [f"desc-aligned_{suffix}.nii.gz",
                     f"from-orig_to-{suffix}ref_mode-image_xfm.txt"]
            if mask is not None:
                aligned_image(img, mask, transform, np.uint8).to_filename(stem + "_mask.nii")
                files_out.append(stem + "_mask.nii")
                names.append("desc-brain_mask.nii.gz")
            run_files.append(files_out)
            run_names.append(names)
            if index == 0:
                run_figures.append([])
                figure_names.append([])
            else:
                run_figures.append([plot_aligned_run(ref_img, aligned, mask_img,
                                                     stem + "_alignment.svg")])
                figure_names.append([f"desc-alignment_{suffix}"])
            sidecars.append({f"desc-aligned_{suffix}.json": {
                "Sources": [uris[index]],
                "SpatialReference": uris[0],
                "Description": "The run's voxels unchanged; its affine moved rigidly into the "
                               "reference run's world (no resampling).",
                "RigidAlignment": {
                    "ReferenceRun": uris[0],
                    "RotationDegrees": round(float(np.degrees(rotation_angle(transform))), 4),
                    "TranslationMillimetres": round(float(np.linalg.norm(transform[:3, 3])), 4),
                    "MeanDisplacementMillimetres": round(float(mean_displacement(
                        transform[None], np.eye(4)[None], points)[0]), 4),
                    "Residual": round(float(residual), 6),
                    "Overlap": round(float(overlap), 4),
                    "Masks": source if by_user else "automatic (reference run only)",
                },
            }})
        self._results["out_run_files"] = run_files
        self._results["out_run_names"] = run_names
        self._results["out_sidecars"] = sidecars
        self._results["out_run_figures"] = run_figures
        self._results["out_figure_names"] = figure_names
        return runtime
