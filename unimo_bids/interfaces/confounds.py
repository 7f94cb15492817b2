"""Confounds, tSNR maps and QC metrics for one motion-corrected 4D series.

Conventions
-----------
Head-motion transforms arrive as a ``.npy`` array of shape ``(T, 4, 4)`` (float64). For each
volume ``t`` it holds the RAS world-space (mm) rigid matrix ``M_t`` that maps a point ``x`` of the
reference (boldref) grid to the point of volume ``t`` where the same anatomy is (fixed -> moving,
the ITK/fMRIPrep convention). The identity means no motion.

Motion parameters are reported about the centre of the reference grid in world mm,
``c = affine @ ((shape - 1) / 2, 1)``. Writing ``M_t = [[R, u], [0, 1]]`` as
``x -> R (x - c) + c + t`` gives the translation ``t = u - c + R c`` (``trans_x/y/z``, mm), and
``rot_x/y/z`` (rad) are the Euler angles of ``R = Rz @ Ry @ Rx`` (extrinsic rotations about x,
then y, then z).

Framewise displacement (Power et al. 2012) and DVARS are computed with
:mod:`nipype.algorithms.confounds` (``FramewiseDisplacement``, ``ComputeDVARS``). RMSD is the
exact root-mean-square, over the brain-mask voxels, of the displacement between consecutive
volumes' transforms.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nibabel as nb
import numpy as np
import pandas as pd
from nipype import logging
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..unimo.geometry import consecutive_rmsd, grid_center, motion_parameters

LOGGER = logging.getLogger("nipype.interface")

MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
NSS_PREFIX = "non_steady_state_outlier"
MOTION_OUTLIER_PREFIX = "motion_outlier"

__all__ = [
    "SeriesConfounds",
    "MOTION_COLUMNS",
    "compute_dvars",
    "flag_outliers",
    "qc_from_confounds",
    "tsnr_map",
    "confounds_metadata",
]


# --------------------------------------------------------------------------------------------
# Pure numpy helpers
# --------------------------------------------------------------------------------------------
def flag_outliers(fd, std_dvars, n_dummy: int, fd_threshold: float, dvars_threshold: float):
    """Boolean (T,) array of motion outliers.

    A volume is flagged when ``FD > fd_threshold`` or ``std_dvars > dvars_threshold``. NaN values
    (the first volume) never flag. Non-steady-state volumes (the first ``n_dummy``) are not
    flagged: they have their own ``non_steady_state_outlierXX`` regressors.
    """
    fd = np.asarray(fd, dtype=float)
    std_dvars = np.asarray(std_dvars, dtype=float)
    with np.errstate(invalid="ignore"):
        flags = (np.nan_to_num(fd, nan=-np.inf) > fd_threshold) | (
            np.nan_to_num(std_dvars, nan=-np.inf) > dvars_threshold
        )
    flags[: max(int(n_dummy), 0)] = False
    return flags


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _nanmean(x):
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def _nanmax(x):
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else None


def qc_from_confounds(
    confounds: pd.DataFrame,
    fd_threshold: float,
    dvars_threshold: float,
    n_dummy: int | None = None,
) -> dict:
    """Motion QC metrics (MRIQC names) from a confounds table.

    Returns ``fd_mean``, ``fd_num`` (count of FD > threshold), ``fd_perc`` (percent of volumes,
    as MRIQC: ``100 * fd_num / n_volumes``), ``fd_max``, ``dvars_std``, ``dvars_nstd``,
    ``rmsd_mean``, ``n_volumes``, ``dummy_trs``, ``n_outliers`` and ``usable_fraction``
    (volumes neither flagged nor non-steady-state, over ``n_volumes``). ``n_dummy`` defaults to
    the number of ``non_steady_state_outlierXX`` columns. Used both by :class:`SeriesConfounds`
    and to re-threshold at the group level without re-running participants.
    """
    n_volumes = int(len(confounds))
    if n_dummy is None:
        n_dummy = sum(1 for c in confounds.columns if str(c).startswith(NSS_PREFIX))
    n_dummy = min(int(n_dummy), n_volumes)

    def col(name):
        if name in confounds:
            return pd.to_numeric(confounds[name], errors="coerce").to_numpy(dtype=float)
        return np.full(n_volumes, np.nan)

    fd = col("framewise_displacement")
    std_dvars = col("std_dvars")
    with np.errstate(invalid="ignore"):
        fd_num = int(np.sum(np.nan_to_num(fd, nan=-np.inf) > fd_threshold))
    flags = flag_outliers(fd, std_dvars, n_dummy, fd_threshold, dvars_threshold)
    n_outliers = int(flags.sum())
    usable = n_volumes - n_dummy - n_outliers
    return {
        "fd_mean": _nanmean(fd),
        "fd_num": fd_num,
        "fd_perc": float(100.0 * fd_num / n_volumes) if n_volumes else None,
        "fd_max": _nanmax(fd),
        "dvars_std": _nanmean(std_dvars),
        "dvars_nstd": _nanmean(col("dvars")),
        "rmsd_mean": _nanmean(col("rmsd")),
        "n_volumes": n_volumes,
        "dummy_trs": n_dummy,
        "n_outliers": n_outliers,
        "usable_fraction": float(usable / n_volumes) if n_volumes else None,
    }


def tsnr_map(data: np.ndarray, n_dummy: int = 0, chunk: int = 8) -> np.ndarray:
    """Temporal SNR, ``mean / std`` over time, of a 4D array (X, Y, Z, T).

    The standard deviation has ddof=0, as in nipype's ``TSNR`` (which MRIQC uses).

    The first ``n_dummy`` volumes are excluded. Voxels with zero (or non-finite) temporal
    standard deviation get 0, as do all voxels when fewer than two volumes remain. Accumulates in
    float64 over chunks of slices to bound memory. Returns a float32 (X, Y, Z) array.
    """
    data = np.asanyarray(data)
    if data.ndim != 4:
        raise ValueError(f"tSNR needs a 4D series, got shape {data.shape}")
    out = np.zeros(data.shape[:3], dtype=np.float32)
    if data.shape[3] - n_dummy < 2:
        return out
    for k0 in range(0, data.shape[2], chunk):
        block = np.asarray(data[:, :, k0 : k0 + chunk, n_dummy:], dtype=np.float64)
        mean = block.mean(axis=3)
        std = block.std(axis=3, ddof=0)
        good = np.isfinite(std) & (std > 0) & np.isfinite(mean)
        tsnr = np.zeros_like(mean)
        tsnr[good] = mean[good] / std[good]
        out[:, :, k0 : k0 + chunk] = tsnr
    return out


def confounds_metadata(columns, fd_radius: float, fd_threshold: float, dvars_threshold: float,
                       extra: dict | None = None) -> dict:
    """BIDS sidecar (column -> {LongName, Description, Units}) for the confounds table."""
    centre = (
        "about the centre of the reference (boldref) grid in world coordinates, "
        "c = affine @ ((shape - 1) / 2, 1). Each head-motion transform M_t = [[R, u], [0, 1]] "
        "maps a point x of the reference grid to the point of volume t where the same anatomy is "
        "(RAS+ world mm, fixed -> moving, ITK/fMRIPrep convention), and is written as "
        "x -> R (x - c) + c + t, so t = u - c + R c"
    )
    euler = (
        "R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x), i.e. extrinsic rotations about the x, then y, "
        "then z world axes (RAS+)"
    )
    meta = {}
    for i, axis in enumerate("xyz"):
        meta[f"trans_{axis}"] = {
            "LongName": f"Translation along {axis}",
            "Description": f"Head-motion translation t[{i}] along the {axis} axis (RAS+), "
            f"{centre}.",
            "Units": "mm",
        }
    for axis in "xyz":
        meta[f"rot_{axis}"] = {
            "LongName": f"Rotation about {axis}",
            "Description": f"Head-motion rotation angle about the {axis} axis (RAS+), with "
            f"{euler}; rotations are {centre}.",
            "Units": "rad",
        }
    meta["framewise_displacement"] = {
        "LongName": "Framewise displacement (Power et al. 2012)",
        "Description": "Sum of the absolute backward differences of the six motion parameters, "
        f"rotations converted to arc length on a sphere of radius {fd_radius:g} mm "
        "(nipype.algorithms.confounds.FramewiseDisplacement). n/a for the first volume.",
        "Units": "mm",
    }
    meta["rmsd"] = {
        "LongName": "Root-mean-square displacement",
        "Description": "Root mean square, over the voxels of the brain mask (world positions), "
        "of the displacement between the transforms of this and the previous volume: "
        "sqrt(mean_x ||M_t x - M_{t-1} x||^2). n/a for the first volume.",
        "Units": "mm",
    }
    meta["dvars"] = {
        "LongName": "DVARS",
        "Description": "Root mean square over the brain mask of the temporal derivative of the "
        "motion-corrected series, after scaling the series to a median of 1000 in the mask "
        "(non-standardised DVARS, Power et al. 2012; the computation of nipype's compute_dvars). Computed over the "
        "steady-state volumes: n/a for the non-steady-state volumes and the first steady-state "
        "volume.",
        "Units": "arbitrary",
    }
    meta["std_dvars"] = {
        "LongName": "Standardised DVARS",
        "Description": "DVARS divided by its expected value under an AR(1) model of each voxel "
        "(Nichols 2013; the computation of nipype's compute_dvars), fitted on the steady-state volumes only. n/a for "
        "the non-steady-state volumes and the first steady-state volume.",
        "Units": "arbitrary",
    }
    for col in columns:
        if str(col).startswith(NSS_PREFIX):
            meta[col] = {
                "LongName": "Non-steady-state volume",
                "Description": "Spike regressor (1 at one leading non-steady-state volume, 0 "
                "elsewhere), given as input (dummy scans).",
                "Units": "arbitrary",
                "Levels": {"0": "other volume", "1": "non-steady-state volume"},
            }
        elif str(col).startswith(MOTION_OUTLIER_PREFIX):
            meta[col] = {
                "LongName": "Motion outlier",
                "Description": "Spike regressor (1 at one volume, 0 elsewhere) for a volume with "
                f"framewise_displacement > {fd_threshold:g} mm or std_dvars > "
                f"{dvars_threshold:g}. Non-steady-state volumes are not flagged again.",
                "Units": "arbitrary",
                "Levels": {"0": "other volume", "1": "outlier volume"},
            }
    for col, entry in (extra or {}).items():
        if col in columns:
            meta[col] = dict(entry) if isinstance(entry, dict) else {"Description": str(entry)}
            meta[col].setdefault("Description", "UniMo diagnostic")
            meta[col].setdefault("Units", "arbitrary")
    for col in columns:
        meta.setdefault(col, {"Description": "UniMo diagnostic", "Units": "arbitrary"})
    return {col: meta[col] for col in columns}


# --------------------------------------------------------------------------------------------
# DVARS
# --------------------------------------------------------------------------------------------
def compute_dvars(func, mask, remove_zerovariance=True, variance_tol=1e-7,
                 intensity_normalization=1000.0):
    """Same computation as :func:`nipype.algorithms.confounds.compute_dvars`, on arrays.

    ``func`` is (X, Y, Z, T) and ``mask`` (X, Y, Z). nipype fits each voxel's AR(1) model with
    nitime, one voxel at a time (about 15 s for 300 volumes); here the same lag-1 Yule-Walker coefficient of a
    demeaned series x is ``sum_t x_t x_{t+1} / sum_t x_t^2`` (nitime's biased autocorrelation),
    vectorised here over voxels. Returns ``(std_dvars, dvars, vxstd_dvars)``, each (T - 1,).
    """
    from nipype.algorithms.confounds import regress_poly

    func = np.asarray(func, dtype=np.float32)
    mask = np.asarray(mask).astype(bool)
    if func.ndim != 4:
        raise RuntimeError("Input fMRI dataset should be 4-dimensional")
    mfunc = func[mask]
    if intensity_normalization != 0:
        mfunc = (mfunc / np.median(mfunc)) * intensity_normalization
    func_sd = (
        np.percentile(mfunc, 75, axis=1, method="lower")
        - np.percentile(mfunc, 25, axis=1, method="lower")
    ) / 1.349
    if remove_zerovariance:
        keep = func_sd > variance_tol
        mfunc = mfunc[keep, :]
        func_sd = func_sd[keep]
    x = regress_poly(0, mfunc, remove_mean=True)[0].astype(np.float64)
    denom = np.einsum("ij,ij->i", x, x)
    with np.errstate(invalid="ignore", divide="ignore"):
        ar1 = np.einsum("ij,ij->i", x[:, :-1], x[:, 1:]) / denom
    ar1 = np.nan_to_num(ar1, nan=0.0)
    diff_sdhat = np.sqrt(np.clip((1 - ar1) * 2, 0, None)) * func_sd
    diff_sd_mean = diff_sdhat.mean()
    func_diff = np.diff(mfunc, axis=1)
    dvars_nstd = np.sqrt(np.square(func_diff).mean(axis=0))
    dvars_stdz = dvars_nstd / diff_sd_mean
    good = diff_sdhat > 0
    dvars_vx_stdz = np.sqrt(
        np.square(func_diff[good] / diff_sdhat[good, None]).mean(axis=0)
    )
    return dvars_stdz, dvars_nstd, dvars_vx_stdz


def _run_dvars(pre_data, in_mask, n_dummy):
    """(std_dvars, dvars, vxstd_dvars), each (T - n_dummy - 1,), over steady-state volumes.

    Non-steady-state volumes are left out: their large intensity steps would bias the AR(1)
    model of every voxel and hence inflate std_dvars over the whole series.
    """
    return compute_dvars(pre_data[..., n_dummy:], np.asanyarray(nb.load(in_mask).dataobj) != 0)


def _run_fd(params: np.ndarray, radius: float, cwd: str) -> np.ndarray:
    """FD (T - 1,) with nipype's FramewiseDisplacement, from (T, 6) trans+rot parameters."""
    from nipype.algorithms.confounds import FramewiseDisplacement

    par_file = os.path.join(cwd, "motion_params_fsl.par")
    # FSL order: rot_x rot_y rot_z trans_x trans_y trans_z
    np.savetxt(par_file, np.hstack((params[:, 3:], params[:, :3])), fmt="%.18e")
    res = FramewiseDisplacement(
        in_file=par_file,
        parameter_source="FSL",
        radius=float(radius),
        out_file=os.path.join(cwd, "fd_power_2012.txt"),
        save_plot=False,
    ).run(cwd=cwd)
    return np.atleast_1d(np.loadtxt(res.outputs.out_file, skiprows=1))


def _same_grid(img_a, img_b, atol=1e-3) -> bool:
    return tuple(img_a.shape[:3]) == tuple(img_b.shape[:3]) and np.allclose(
        img_a.affine, img_b.affine, atol=atol
    )


def _mask_on(img, mask_img) -> np.ndarray:
    """Boolean brain mask on the grid of ``img`` (nearest-neighbour resampled if needed)."""
    if _same_grid(img, mask_img):
        return np.asanyarray(mask_img.dataobj) != 0
    from nilearn.image import resample_img

    res = resample_img(
        mask_img,
        target_affine=img.affine,
        target_shape=img.shape[:3],
        interpolation="nearest",
    )
    return np.asanyarray(res.dataobj) != 0


def _save_map(data: np.ndarray, like: nb.spatialimages.SpatialImage, path: str) -> str:
    hdr = like.header.copy()
    hdr.set_data_dtype(np.float32)
    hdr["cal_min"] = hdr["cal_max"] = 0
    img = nb.Nifti1Image(np.asarray(data, dtype=np.float32), like.affine, hdr)
    img.header.set_slope_inter(1.0, 0.0)
    img.to_filename(path)
    return path


def _median_in(values: np.ndarray, mask: np.ndarray):
    v = values[mask]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


def _json_clean(obj):
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    return obj


def _write_json(path, obj):
    Path(path).write_text(json.dumps(_json_clean(obj), indent=2, allow_nan=False) + "\n")
    return str(path)


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------
class _SeriesConfoundsInputSpec(BaseInterfaceInputSpec):
    in_raw = File(exists=True, mandatory=True, desc="original 4D series (before correction)")
    in_preproc = File(exists=True, mandatory=True, desc="motion-corrected 4D series")
    in_mask = File(exists=True, mandatory=True, desc="3D brain mask on the reference grid")
    in_transforms = File(
        exists=True,
        mandatory=True,
        desc=".npy (T, 4, 4) float64 world-space (RAS mm) rigid transforms, reference -> "
        "volume t (fixed -> moving)",
    )
    fd_radius = traits.Float(50.0, usedefault=True, desc="head radius (mm) for FD")
    fd_spike_threshold = traits.Float(
        0.5, usedefault=True, desc="FD (mm) above which a volume is a motion outlier"
    )
    dvars_spike_threshold = traits.Float(
        1.5, usedefault=True, desc="std_dvars above which a volume is a motion outlier"
    )
    non_steady_state = traits.Int(
        0, usedefault=True, desc="number of leading non-steady-state (dummy) volumes"
    )
    diagnostics = File(exists=True, desc="optional TSV with extra per-volume columns to append")
    diagnostics_meta = File(
        exists=True, desc="optional JSON: column -> {Description, Units} for `diagnostics`"
    )


class _SeriesConfoundsOutputSpec(TraitedSpec):
    out_confounds = File(exists=True, desc="confounds timeseries (TSV)")
    out_confounds_meta = File(exists=True, desc="confounds sidecar (JSON)")
    out_qc = File(exists=True, desc="QC metrics (JSON, MRIQC names)")
    out_tsnr_raw = File(exists=True, desc="tSNR map of the original series")
    out_tsnr_preproc = File(exists=True, desc="tSNR map of the corrected series")


class SeriesConfounds(SimpleInterface):
    """Motion parameters, FD, RMSD, DVARS, outliers, tSNR maps and QC metrics of a series.

    Outputs are written in the interface's working directory as ``confounds_timeseries.tsv``
    (tab separated, ``n/a`` for missing values), ``confounds_timeseries.json``, ``qc.json``,
    ``tsnr_raw.nii.gz`` and ``tsnr_preproc.nii.gz``.
    """

    input_spec = _SeriesConfoundsInputSpec
    output_spec = _SeriesConfoundsOutputSpec

    def _run_interface(self, runtime):
        cwd = runtime.cwd
        inputs = self.inputs
        mask_img = nb.load(inputs.in_mask)
        if len(mask_img.shape) != 3:
            mask_img = nb.funcs.squeeze_image(mask_img)
        if len(mask_img.shape) != 3:
            raise ValueError(f"in_mask must be 3D, got shape {mask_img.shape}")
        mask = np.asanyarray(mask_img.dataobj) != 0
        if not mask.any():
            raise ValueError(f"Empty brain mask: {inputs.in_mask}")

        preproc_img = nb.load(inputs.in_preproc)
        raw_img = nb.load(inputs.in_raw)
        for name, img in (("in_preproc", preproc_img), ("in_raw", raw_img)):
            if img.ndim != 4:
                raise ValueError(f"{name} must be 4D, got shape {img.shape}")
        if preproc_img.shape[:3] != mask_img.shape:
            raise ValueError(
                f"in_preproc grid {preproc_img.shape[:3]} differs from the mask grid "
                f"{mask_img.shape}"
            )
        if not np.allclose(preproc_img.affine, mask_img.affine, atol=1e-3):
            LOGGER.warning("in_preproc and in_mask affines differ; using the mask's affine")
        n_vols = preproc_img.shape[3]
        if raw_img.shape[3] != n_vols:
            raise ValueError(
                f"in_raw has {raw_img.shape[3]} volumes, in_preproc has {n_vols}"
            )

        xfms = np.asarray(np.load(inputs.in_transforms), dtype=np.float64)
        if xfms.shape != (n_vols, 4, 4):
            raise ValueError(
                f"in_transforms must have shape ({n_vols}, 4, 4), got {xfms.shape}"
            )
        if not np.all(np.isfinite(xfms)):
            raise ValueError("in_transforms contains non-finite values")

        n_dummy = int(inputs.non_steady_state)
        if n_dummy < 0 or n_dummy > n_vols:
            raise ValueError(f"non_steady_state={n_dummy} outside [0, {n_vols}]")

        # Motion parameters
        params = motion_parameters(xfms, grid_center(mask_img.shape, mask_img.affine))
        table = pd.DataFrame(params, columns=list(MOTION_COLUMNS))

        # FD, RMSD, DVARS (first volume n/a)
        fd = np.full(n_vols, np.nan)
        std_dvars = np.full(n_vols, np.nan)
        dvars = np.full(n_vols, np.nan)
        vx_dvars = np.full(n_vols, np.nan)
        if n_vols >= 2:
            fd[1:] = _run_fd(params, inputs.fd_radius, cwd)
        pre_data = np.asarray(preproc_img.dataobj, dtype=np.float32)
        if n_vols - n_dummy >= 2:
            first = n_dummy + 1
            std_dvars[first:], dvars[first:], vx_dvars[first:] = _run_dvars(
                pre_data, inputs.in_mask, n_dummy)
        ijk = np.argwhere(mask).astype(float)
        points = nb.affines.apply_affine(mask_img.affine, ijk)
        rmsd = consecutive_rmsd(xfms, points)
        table["framewise_displacement"] = fd
        table["rmsd"] = rmsd
        table["dvars"] = dvars
        table["std_dvars"] = std_dvars

        # Spike regressors
        for i in range(n_dummy):
            col = np.zeros(n_vols, dtype=int)
            col[i] = 1
            table[f"{NSS_PREFIX}{i:02d}"] = col
        flags = flag_outliers(
            fd, std_dvars, n_dummy, inputs.fd_spike_threshold, inputs.dvars_spike_threshold
        )
        for k, idx in enumerate(np.flatnonzero(flags)):
            col = np.zeros(n_vols, dtype=int)
            col[idx] = 1
            table[f"{MOTION_OUTLIER_PREFIX}{k:02d}"] = col

        # Diagnostics
        extra_meta = {}
        if isdefined(inputs.diagnostics) and inputs.diagnostics:
            diag = pd.read_csv(inputs.diagnostics, sep="\t", na_values=["n/a"])
            if len(diag) != n_vols:
                raise ValueError(
                    f"diagnostics has {len(diag)} rows, the series has {n_vols} volumes"
                )
            clash = sorted(set(diag.columns) & set(table.columns))
            if clash:
                raise ValueError(f"diagnostics columns clash with confounds: {clash}")
            table = pd.concat([table, diag.reset_index(drop=True)], axis=1)
            if isdefined(inputs.diagnostics_meta) and inputs.diagnostics_meta:
                extra_meta = json.loads(Path(inputs.diagnostics_meta).read_text())

        out_tsv = os.path.join(cwd, "confounds_timeseries.tsv")
        table.to_csv(out_tsv, sep="\t", index=False, na_rep="n/a")
        meta = confounds_metadata(
            list(table.columns),
            inputs.fd_radius,
            inputs.fd_spike_threshold,
            inputs.dvars_spike_threshold,
            extra=extra_meta,
        )
        out_meta = _write_json(os.path.join(cwd, "confounds_timeseries.json"), meta)

        # tSNR maps
        tsnr_pre = tsnr_map(pre_data, n_dummy)
        del pre_data
        raw_data = np.asarray(raw_img.dataobj, dtype=np.float32)
        tsnr_raw = tsnr_map(raw_data, n_dummy)
        del raw_data
        out_tsnr_pre = _save_map(tsnr_pre, preproc_img, os.path.join(cwd, "tsnr_preproc.nii.gz"))
        out_tsnr_raw = _save_map(tsnr_raw, raw_img, os.path.join(cwd, "tsnr_raw.nii.gz"))

        # QC
        med_pre = _median_in(tsnr_pre, mask)
        med_raw = _median_in(tsnr_raw, _mask_on(raw_img, mask_img))
        qc = {
            "tsnr": med_pre,
            "tsnr_raw": med_raw,
            "tsnr_gain": (med_pre / med_raw) if (med_pre is not None and med_raw) else None,
        }
        motion_qc = qc_from_confounds(
            table, inputs.fd_spike_threshold, inputs.dvars_spike_threshold, n_dummy
        )
        qc.update({k: motion_qc[k] for k in ("fd_mean", "fd_num", "fd_perc", "fd_max",
                                             "dvars_std", "dvars_nstd")})
        qc["dvars_vstd"] = _nanmean(vx_dvars)
        qc.update({k: motion_qc[k] for k in ("rmsd_mean", "n_volumes", "dummy_trs",
                                             "n_outliers", "usable_fraction")})
        qc["fd_spike_threshold"] = float(inputs.fd_spike_threshold)
        qc["dvars_spike_threshold"] = float(inputs.dvars_spike_threshold)
        qc["fd_radius"] = float(inputs.fd_radius)
        out_qc = _write_json(os.path.join(cwd, "qc.json"), qc)

        self._results.update(
            out_confounds=out_tsv,
            out_confounds_meta=out_meta,
            out_qc=out_qc,
            out_tsnr_raw=out_tsnr_raw,
            out_tsnr_preproc=out_tsnr_pre,
        )
        return runtime
