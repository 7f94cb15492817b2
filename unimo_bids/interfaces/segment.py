"""Segmentation and shape-map interfaces (thin wrappers around ``unimo_bids.unimo``).

``Segment`` writes one brain mask per volume and one for the reference volume (classical, or
from a trained segmenter; the reference's may be given by the user instead);
``ShapeMap`` turns masks into signed distance maps in mm (negative inside, positive outside).
Outputs are uncompressed ``.nii`` files in the node's working directory (fast to write and
read back; the derivatives writer compresses what is kept).
"""

from __future__ import annotations

import nibabel as nb
import numpy as np
import torch
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)
from nipype.utils.filemanip import fname_presuffix

from ..unimo.devices import fitting_chunk, run_with_memory_fallback
from ..unimo.segment_torch import brain_mask_on
from ..unimo.segnet import load_segmenter, segment_with_model
from ..unimo.shape_torch import signed_distance_on
from .unimo import use_gpu_trait


def _out_path(in_file: str, suffix: str, cwd: str) -> str:
    """``<cwd>/<basename of in_file without .nii[.gz]><suffix>.nii``."""
    return fname_presuffix(in_file, suffix=suffix, newpath=cwd, use_ext=False) + ".nii"


def _voxel_size(img) -> tuple:
    """Spatial voxel sizes (mm) from the header zooms, checked."""
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if len(zooms) != 3 or not np.all(np.isfinite(zooms)) or min(zooms) <= 0:
        raise ValueError(f"invalid voxel size {zooms} in the header")
    return zooms


def _save_like(data: np.ndarray, like, dtype, path: str) -> str:
    """Write ``data`` with the grid (affine, qform/sform, zooms, units) of image ``like``."""
    hdr = like.header.copy()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(data.shape)
    img = nb.Nifti1Image(np.asarray(data, dtype=dtype), like.affine, hdr)
    img.header.set_slope_inter(1.0, 0.0)  # the values are the data: no scaling from the input
    img.to_filename(path)
    return path


# A mask may sit on a grid that differs from the series' by rounding in the header (mm).
GRID_TOLERANCE_MM = 0.01


def load_user_mask(mask_file: str, reference_img) -> np.ndarray:
    """A user's 3D mask of the reference volume, checked: (X, Y, Z) bool.

    Raises ValueError (one line, naming the file) when it cannot be read, is not 3D, is empty,
    or lies on another grid than ``reference_img`` (shape, or voxel-to-world affine).
    """
    try:
        img = nb.load(mask_file)
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise ValueError(f"{mask_file}: cannot read the mask ({err})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{mask_file}: the mask must be 3D, got shape {data.shape}")
    if tuple(data.shape) != tuple(reference_img.shape[:3]):
        raise ValueError(f"{mask_file}: mask of shape {tuple(data.shape)} does not match the "
                         f"series grid {tuple(reference_img.shape[:3])}")
    corners = np.array([[0, 0, 0, 1], list(np.asarray(data.shape) - 1) + [1]]).T
    shift = np.abs(img.affine @ corners - reference_img.affine @ corners).max()
    if shift > GRID_TOLERANCE_MM:
        raise ValueError(f"{mask_file}: the mask's grid is {shift:.3g} mm away from the "
                         "series' (different affine); resample it onto the series first")
    mask = np.nan_to_num(data.astype(np.float32)) > 0
    if not mask.any():
        raise ValueError(f"{mask_file}: the mask is empty (no nonzero voxel)")
    return mask


def _series_volumes(img, path: str) -> np.ndarray:
    """(T, X, Y, Z) float32, contiguous per volume (scipy and torch work per volume)."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 3:
        return data[None]
    if data.ndim == 4:
        return np.ascontiguousarray(np.moveaxis(data, -1, 0))
    raise ValueError(f"{path}: expected a 3D or 4D image, got shape {data.shape}")


class _SegmentInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc="4D series (NIfTI); one brain mask is computed per volume")
    reference = File(exists=True, mandatory=True,
                     desc="3D reference volume (NIfTI), e.g. the head-motion reference")
    ref_mask = File(exists=True, desc="the user's mask of the reference (same grid); used "
                                      "instead of segmenting the reference")
    seg_model = File(exists=True, desc="trained segmenter (TorchScript, from "
                                       "unimo-bids-train-seg); default: classical masks")
    device = traits.Str("cpu", usedefault=True,
                        desc="torch device of the segmenter, or of the classical masks when "
                             "it is a CUDA device")
    num_threads = traits.Int(1, usedefault=True, desc="torch CPU threads")
    use_gpu = use_gpu_trait()


class _SegmentOutputSpec(TraitedSpec):
    out_masks = File(exists=True,
                     desc="4D uint8 brain masks (1 = brain), one per volume, grid of in_file")
    out_ref_mask = File(exists=True, desc="3D uint8 brain mask of the reference, its grid")


class Segment(SimpleInterface):
    """Brain masks of every volume of a series and of its reference.

    Classical by default: robust histogram threshold, opening with an 8 mm ball (through the
    largest connected component), closing with a 4 mm ball and hole filling, per volume (see
    :func:`unimo_bids.unimo.segment.brain_mask`; on a CUDA ``device`` the same masks are made
    there, :func:`unimo_bids.unimo.segment_torch.brain_mask_torch`). With ``seg_model``, a
    trained segmenter
    (:func:`unimo_bids.unimo.segnet.segment_with_model`). With ``ref_mask``, the reference's
    mask is the user's, checked (:func:`load_user_mask`). Voxel sizes come from the header.
    """

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_file)
        ref = nb.load(self.inputs.reference)
        ref_data = np.asarray(ref.dataobj, dtype=np.float32)
        if ref_data.ndim == 4 and ref_data.shape[3] == 1:
            ref_data = ref_data[..., 0]
        if ref_data.ndim != 3:
            raise ValueError(f"{self.inputs.reference}: the reference must be 3D, got shape "
                             f"{ref_data.shape}")
        user_mask = (load_user_mask(self.inputs.ref_mask, ref) if self.inputs.ref_mask
                     else None)

        vols = _series_volumes(img, self.inputs.in_file)
        if self.inputs.seg_model:
            torch.set_num_threads(max(self.inputs.num_threads, 1))
            model, _ = load_segmenter(self.inputs.seg_model, self.inputs.device)

            def segment(device, chunk):
                model.to(device)
                masks = segment_with_model(model, vols, img.affine, device=device, chunk=chunk)
                return masks, (user_mask if user_mask is not None else segment_with_model(
                    model, ref_data[None], ref.affine, device=device)[0])

            masks, ref_mask = run_with_memory_fallback(
                segment, self.inputs.device, fitting_chunk(self.inputs.device, img.shape, 4),
                cpu_chunk_size=4)
        else:
            workers = self.inputs.num_threads  # parallel.thread_count: at least one

            def segment(device, chunk):
                masks = brain_mask_on(vols, _voxel_size(img), device, chunk, workers)
                return masks, (user_mask if user_mask is not None else brain_mask_on(
                    ref_data[None], _voxel_size(ref), device, workers=workers)[0])

            # On a GPU about 8 float32 values per voxel: the volume, counts and int64 labels.
            masks, ref_mask = run_with_memory_fallback(
                segment, self.inputs.device,
                fitting_chunk(self.inputs.device, img.shape, 64, floats_per_voxel=8))
        vols = None  # freed before the masks are written
        masks = masks[0] if len(img.shape) == 3 else np.moveaxis(masks, 0, -1)
        self._results["out_masks"] = _save_like(
            masks, img, np.uint8, _out_path(self.inputs.in_file, "_masks", runtime.cwd))
        self._results["out_ref_mask"] = _save_like(
            ref_mask, ref, np.uint8, _out_path(self.inputs.reference, "_mask", runtime.cwd))
        return runtime


class _ShapeMapInputSpec(BaseInterfaceInputSpec):
    in_masks = File(exists=True, mandatory=True,
                    desc="3D or 4D mask (NIfTI); nonzero = inside")
    device = traits.Str("cpu", usedefault=True,
                        desc="torch device: on a CUDA device the maps are made there "
                             "(unimo.shape_torch), elsewhere by scipy")
    num_threads = traits.Int(1, usedefault=True,
                             desc="CPU threads of the scipy maps (each a group of volumes)")
    use_gpu = use_gpu_trait()


class _ShapeMapOutputSpec(TraitedSpec):
    out_file = File(exists=True,
                    desc="float32 signed distance to the mask boundary in mm, same shape and "
                         "grid as in_masks: negative inside, positive outside")


class ShapeMap(SimpleInterface):
    """Signed Euclidean distance maps (mm) of masks, per volume.

    Negative inside, positive outside, about +-h/2 next to the boundary; an empty mask volume
    reads + the field-of-view diagonal (see :func:`unimo_bids.unimo.shape.signed_distance`;
    on a CUDA ``device``, the same maps from
    :func:`unimo_bids.unimo.shape_torch.signed_distance_torch`).
    """

    input_spec = _ShapeMapInputSpec
    output_spec = _ShapeMapOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_masks)
        masks = np.asarray(img.dataobj) != 0
        if masks.ndim not in (3, 4):
            raise ValueError(f"{self.inputs.in_masks}: expected a 3D or 4D mask, got shape "
                             f"{masks.shape}")
        volumes = (np.ascontiguousarray(np.moveaxis(masks, -1, 0)) if masks.ndim == 4
                   else masks[None])
        # On a GPU the two nearest-voxel transforms hold about 32 float32 values per voxel.
        dist = run_with_memory_fallback(
            lambda device, chunk: signed_distance_on(volumes, _voxel_size(img), device, chunk,
                                                     self.inputs.num_threads),
            self.inputs.device,
            fitting_chunk(self.inputs.device, img.shape, 64, floats_per_voxel=32))
        dist = np.moveaxis(dist, 0, -1) if masks.ndim == 4 else dist[0]
        self._results["out_file"] = _save_like(
            dist, img, np.float32, _out_path(self.inputs.in_masks, "_distmap", runtime.cwd))
        return runtime
