"""Input validation and head-motion reference interfaces."""

from __future__ import annotations

import gzip
import os
import zlib

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..unimo.reference import detect_non_steady_state, select_reference


class SeriesError(ValueError):
    """A series that cannot be processed; the message names the file and the problem, on one
    line (the messages of the libraries it quotes may span several)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def load_series(path: str):
    """Load a NIfTI image and its float32 data, turning read failures into one-line errors."""
    if os.path.getsize(path) == 0:
        raise SeriesError(f"{path}: the file is empty (0 bytes)")
    try:
        img = nb.load(path)
    except Exception as err:  # nibabel raises many types for unreadable headers
        raise SeriesError(f"{path}: not a readable NIfTI file ({err})") from None
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as err:
        raise SeriesError(f"{path}: truncated or corrupt image data ({err})") from None
    except (MemoryError, OverflowError) as err:  # absurd dimensions or offsets in the header
        raise SeriesError(f"{path}: the header's dimensions {img.shape} or data offset cannot "
                          f"be read ({type(err).__name__})") from None
    except TypeError as err:  # e.g. RGB voxels, which have no float32 value
        raise SeriesError(f"{path}: voxel type {img.get_data_dtype()} cannot be read as numbers "
                          f"({err})") from None
    return img, data


# Peak memory of a series' workflow: the rigid step holds about 4 float32 copies of the series
# (the mem_gb its node declares), plus torch, nipype and the engine's working grids.
SERIES_COPIES_AT_PEAK = 4
BASE_MEMORY_GB = 1.0
MAX_ANISOTROPY = 8.0  # beyond this voxel side ratio, say that through-plane motion is coarse


def estimated_peak_gb(shape) -> float:
    """Estimated peak memory (GB) of processing a series of this shape."""
    return BASE_MEMORY_GB + SERIES_COPIES_AT_PEAK * 4 * float(np.prod(shape)) / 1024**3


def screen_header(path: str, memory_gb: float) -> list[str]:
    """Checks on the NIfTI header alone, before any work.

    Raises SeriesError when the series would need more than ``memory_gb``; returns warnings
    (one line each, naming the file) for a qform that disagrees with the sform, a shearing
    affine, and extremely anisotropic voxels. Unreadable headers are left to ValidateSeries.
    """
    try:
        img = nb.load(path)
    except Exception:
        return []
    # nibabel replaces zero voxel sizes by 1 when it loads a header: read the stored ones.
    stored = raw_voxel_size(path)
    if stored is not None and not (np.all(np.isfinite(stored)) and np.all(stored > 0)):
        raise SeriesError(f"{path}: invalid voxel size {tuple(float(v) for v in stored)} mm in "
                          "the header (pixdim)")
    need = estimated_peak_gb(img.shape)
    if need > memory_gb:
        shape = "x".join(str(n) for n in img.shape)
        raise SeriesError(f"{path}: a {shape} series needs about {need:.1f} GB of memory, more "
                          f"than the {memory_gb:.1f} GB allowed (--mem, else the machine's "
                          "memory); raise --mem or split the series")
    warnings = []
    header = img.header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qcode > 0 and scode > 0:
        gap = float(np.abs(qform - sform).max())
        if gap > 1e-3:
            warnings.append(f"{path}: the qform and the sform disagree (by up to {gap:.3g} mm or "
                            "units); the sform is used, as nibabel does")
    axes = np.asarray(img.affine[:3, :3], dtype=float)
    lengths = np.linalg.norm(axes, axis=0)
    if np.all(lengths > 0) and np.all(np.isfinite(axes)):
        cosines = (axes / lengths).T @ (axes / lengths)
        shear = float(np.degrees(np.arcsin(np.clip(np.abs(cosines - np.eye(3)).max(), 0, 1))))
        if shear > 0.5:
            warnings.append(f"{path}: the affine shears the voxel grid (axes {shear:.1f} degrees "
                            "from orthogonal); motion is estimated and applied in world "
                            "coordinates, so the shear is kept")
    zooms = np.asarray(header.get_zooms()[:3], dtype=float)
    if np.all(zooms > 0) and zooms.max() / zooms.min() > MAX_ANISOTROPY:
        warnings.append(f"{path}: voxels of {' x '.join(f'{z:g}' for z in zooms)} mm (ratio "
                        f"{zooms.max() / zooms.min():.0f}); motion across the thick slices is "
                        "resolved less finely than within them")
    return warnings


def raw_voxel_size(path: str):
    """pixdim[1:4] as stored in a NIfTI-1 file (no fixes applied), or None if unreadable."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            header = nb.Nifti1Header.from_fileobj(handle, check=False)
        return np.asarray(header["pixdim"][1:4], dtype=float)
    except Exception:
        return None


def resolve_repetition_time(path: str, header, sidecar_tr: float | None) -> float:
    """Repetition time in seconds: the sidecar's, checked against the header's.

    The NIfTI header's pixdim[4] is often in ms although labelled seconds; such a header is
    accepted when it equals the sidecar value in ms.
    """
    zooms = header.get_zooms()
    header_tr = float(zooms[3]) if len(zooms) > 3 else 0.0
    unit = header.get_xyzt_units()[1]
    header_s = {"msec": header_tr / 1000.0, "usec": header_tr / 1e6}.get(unit, header_tr)
    if sidecar_tr is not None:
        if not np.isfinite(sidecar_tr) or sidecar_tr <= 0:
            raise SeriesError(f"{path}: RepetitionTime in the sidecar is {sidecar_tr}, not > 0")
        if header_s > 0 and not (np.isclose(header_s, sidecar_tr, rtol=0.01)
                                 or np.isclose(header_s / 1000.0, sidecar_tr, rtol=0.01)):
            raise SeriesError(
                f"{path}: RepetitionTime {sidecar_tr} s in the sidecar contradicts "
                f"{header_s} s in the NIfTI header")
        return float(sidecar_tr)
    if header_s > 0 and np.isfinite(header_s):
        return header_s
    raise SeriesError(f"{path}: no RepetitionTime in the sidecar and none in the NIfTI header")


def validate_series(path: str, img, data: np.ndarray) -> None:
    """Raise SeriesError unless data is a finite 4D series of >= 2 volumes on a valid grid."""
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[..., 0, :]
    if data.ndim != 4:
        raise SeriesError(f"{path}: image is {data.ndim}D with shape {data.shape}; "
                          "a time series must be 4D")
    if data.shape[3] < 2:
        raise SeriesError(f"{path}: the series has a single volume; motion correction needs "
                          "at least 2")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise SeriesError(f"{path}: invalid voxel size {tuple(zooms)} mm")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        raise SeriesError(f"{path}: the affine is not invertible")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise SeriesError(f"{path}: {bad} voxels are NaN or infinite")
    flat = data.reshape(-1, data.shape[3])
    empty = np.flatnonzero(~flat.any(axis=0))
    if empty.size:
        raise SeriesError(f"{path}: volume(s) {empty.tolist()} are all zero")


class _ValidateSeriesInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="4D series as found in the BIDS dataset")
    repetition_time = traits.Either(None, traits.Float, default=None, usedefault=True,
                                    desc="RepetitionTime from the sidecar, if any")
    require_tr = traits.Bool(True, usedefault=True,
                             desc="fail without a repetition time (time series: BOLD, ASL); "
                                  "DWI and PET series go on without one")


class _ValidateSeriesOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="validated series, float32, uncompressed")
    repetition_time = traits.Float(desc="repetition time in seconds")
    n_volumes = traits.Int()


class ValidateSeries(SimpleInterface):
    """Check a 4D series and write it as float32 NIfTI for the rest of the workflow.

    Errors are one line, naming the file and the problem.
    """

    input_spec = _ValidateSeriesInputSpec
    output_spec = _ValidateSeriesOutputSpec

    def _run_interface(self, runtime):
        img, data = load_series(self.inputs.in_file)
        validate_series(self.inputs.in_file, img, data)
        if data.ndim == 5:
            data = data[..., 0, :]
        try:
            tr = resolve_repetition_time(self.inputs.in_file, img.header,
                                         self.inputs.repetition_time)
        except SeriesError:
            if self.inputs.require_tr:
                raise
            tr = 0.0  # unknown; nothing downstream needs it for these series
        header = img.header.copy()
        header.set_data_dtype(np.float32)
        header.set_xyzt_units(xyz=header.get_xyzt_units()[0] or "mm", t="sec")
        header.set_zooms(tuple(header.get_zooms()[:3]) + (tr or 1.0,))
        out = nb.Nifti1Image(data, img.affine, header)
        out.header.set_slope_inter(1.0, 0.0)
        self._results["out_file"] = os.path.join(runtime.cwd, "series.nii")
        out.to_filename(self._results["out_file"])
        self._results["repetition_time"] = tr
        self._results["n_volumes"] = int(data.shape[3])
        return runtime


class _ReferenceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="validated 4D series")
    hmc_ref = traits.Str("auto", usedefault=True, desc="auto, first, middle, mean or an index")
    dummy_scans = traits.Int(-1, usedefault=True,
                             desc="leading non-steady-state volumes; -1 detects them")
    source_file = traits.Str("", usedefault=True, desc="the BIDS file, named in errors")
    candidates = traits.List(traits.Int, value=[], usedefault=True,
                             desc="volumes the reference may come from (DWI: b=0; ASL: control); "
                                  "empty: all")


class _ReferenceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="3D reference image")
    reference_index = traits.Int(desc="index of the reference volume, -1 for a mean")
    n_dummy = traits.Int(desc="non-steady-state volumes left out of the reference")


class HMCReference(SimpleInterface):
    """Choose the head-motion reference (``--hmc-ref``) after dropping non-steady-state volumes."""

    input_spec = _ReferenceInputSpec
    output_spec = _ReferenceOutputSpec

    def _run_interface(self, runtime):
        img = nb.load(self.inputs.in_file)
        data = np.asarray(img.dataobj, dtype=np.float32)
        n_dummy = self.inputs.dummy_scans
        if n_dummy < 0:
            n_dummy = detect_non_steady_state(data)
        elif n_dummy > data.shape[3] - 2:
            raise SeriesError(f"{self.inputs.source_file or self.inputs.in_file}: "
                              f"--dummy-scans {n_dummy} leaves fewer than 2 steady-state "
                              f"volumes of {data.shape[3]}")
        reference, index = select_reference(data, img.affine, self.inputs.hmc_ref, n_dummy,
                                            self.inputs.candidates or None)
        header = img.header.copy()
        header.set_data_shape(reference.shape)
        out = nb.Nifti1Image(reference, img.affine, header)
        self._results["out_file"] = os.path.join(runtime.cwd, "reference.nii")
        out.to_filename(self._results["out_file"])
        self._results["reference_index"] = -1 if index is None else int(index)
        self._results["n_dummy"] = int(n_dummy)
        return runtime
