"""Segmentation and shape-map interfaces (thin wrappers around ``unimo_bids.unimo``).

``Segment`` writes one classical brain mask per volume and one for the reference volume;
``ShapeMap`` turns masks into signed distance maps in mm (negative inside, positive outside).
Outputs are uncompressed ``.nii`` files in the node's working directory (fast to write and
read back; the derivatives writer compresses what is kept).
"""

from __future__ import annotations

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
)
from nipype.utils.filemanip import fname_presuffix

from ..unimo.segment import brain_mask, reference_mask
from ..unimo.shape import signed_distance


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


class _SegmentInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc="4D series (NIfTI); one brain mask is computed per volume")
    reference = File(exists=True, mandatory=True,
                     desc="3D reference volume (NIfTI), e.g. the head-motion reference")


class _SegmentOutputSpec(TraitedSpec):
    out_masks = File(exists=True,
                     desc="4D uint8 brain masks (1 = brain), one per volume, grid of in_file")
    out_ref_mask = File(exists=True, desc="3D uint8 brain mask of the reference, its grid")


class Segment(SimpleInterface):
    """Classical, weight-free brain masks of every volume of a series and of its reference.

    Robust histogram threshold, opening with an 8 mm ball (through the largest connected
    component), closing with a 4 mm ball and hole filling, per volume (see
    :func:`unimo_bids.unimo.segment.brain_mask`). Voxel sizes come from the header zooms.
    """

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim == 3:
            vols = data[None]
        elif data.ndim == 4:
            # (X,Y,Z,T) -> contiguous (T,X,Y,Z): each volume compact in memory for scipy
            vols = np.ascontiguousarray(np.moveaxis(data, -1, 0))
        else:
            raise ValueError(f"{self.inputs.in_file}: expected a 3D or 4D image, got shape "
                             f"{data.shape}")
        del data
        masks = brain_mask(vols, _voxel_size(img))
        del vols
        masks = masks[0] if len(img.shape) == 3 else np.moveaxis(masks, 0, -1)
        self._results["out_masks"] = _save_like(
            masks, img, np.uint8, _out_path(self.inputs.in_file, "_masks", runtime.cwd))

        ref = nb.load(self.inputs.reference)
        ref_data = np.asarray(ref.dataobj, dtype=np.float32)
        if ref_data.ndim == 4 and ref_data.shape[3] == 1:
            ref_data = ref_data[..., 0]
        if ref_data.ndim != 3:
            raise ValueError(f"{self.inputs.reference}: the reference must be 3D, got shape "
                             f"{ref_data.shape}")
        ref_mask = reference_mask(ref_data, _voxel_size(ref))
        self._results["out_ref_mask"] = _save_like(
            ref_mask, ref, np.uint8, _out_path(self.inputs.reference, "_mask", runtime.cwd))
        return runtime


class _ShapeMapInputSpec(BaseInterfaceInputSpec):
    in_masks = File(exists=True, mandatory=True,
                    desc="3D or 4D mask (NIfTI); nonzero = inside")


class _ShapeMapOutputSpec(TraitedSpec):
    out_file = File(exists=True,
                    desc="float32 signed distance to the mask boundary in mm, same shape and "
                         "grid as in_masks: negative inside, positive outside")


class ShapeMap(SimpleInterface):
    """Signed Euclidean distance maps (mm) of masks, per volume.

    Negative inside, positive outside, about +-h/2 next to the boundary; an empty mask volume
    reads + the field-of-view diagonal (see :func:`unimo_bids.unimo.shape.signed_distance`).
    """

    input_spec = _ShapeMapInputSpec
    output_spec = _ShapeMapOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_masks)
        masks = np.asarray(img.dataobj) != 0
        if masks.ndim == 4:
            dist = signed_distance(np.ascontiguousarray(np.moveaxis(masks, -1, 0)),
                                   _voxel_size(img))
            dist = np.moveaxis(dist, 0, -1)
        elif masks.ndim == 3:
            dist = signed_distance(masks, _voxel_size(img))
        else:
            raise ValueError(f"{self.inputs.in_masks}: expected a 3D or 4D mask, got shape "
                             f"{masks.shape}")
        self._results["out_file"] = _save_like(
            dist, img, np.float32, _out_path(self.inputs.in_masks, "_distmap", runtime.cwd))
        return runtime
