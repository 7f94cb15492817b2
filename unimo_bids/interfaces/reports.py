"""Reportlets for one series, the per-subject HTML report and the group report.

* :class:`SeriesReportlets` draws five small SVG figures from the outputs of one series
  (mask and distance map, mean image before/after, tSNR before/after, motion traces, carpet).
* :func:`build_subject_report` assembles ``<out>/sub-<label>.html`` (fMRIPrep style) from the QC
  JSON files and figures already written under ``<out>/sub-<label>/``.
* :func:`build_group_report` collects every ``*_desc-qc_<suffix>.json`` into
  ``group_<suffix>.tsv`` and ``group_<suffix>.html`` (MRIQC style), optionally re-thresholding
  FD from the confounds tables.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from urllib.parse import quote

import nibabel as nb
import numpy as np
import pandas as pd
from nipype import logging
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from .confounds import MOTION_OUTLIER_PREFIX, NSS_PREFIX, qc_from_confounds
from .io import write_atomically

LOGGER = logging.getLogger("nipype.interface")

__all__ = [
    "SeriesReportlets",
    "build_subject_report",
    "build_group_report",
    "parse_entities",
    "FIGURE_CAPTIONS",
]

_DPI = 72
ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "part")
_ENTITY_RE = re.compile(r"(?:^|_)([a-z]+)-([a-zA-Z0-9]+)")

FIGURE_CAPTIONS = {
    "alignment": "Reference run (top) and an aligned run in the reference's world (bottom), "
    "at the same axial positions, with the reference's brain mask (red contour).",
    "mask": "Brain mask (red contour) and signed distance map of the mask (mm, negative "
    "inside) over the head-motion-correction reference.",
    "beforeafter": "Temporal mean of the series before (top) and after (bottom) motion "
    "correction; the red contour is the brain mask of the reference.",
    "tsnr": "Temporal SNR (mean / standard deviation over time, steady-state volumes) before "
    "(top) and after (bottom) motion correction, on the same colour scale.",
    "motion": "Estimated head motion: translations, rotations, framewise displacement (FD, "
    "Power et al. 2012; dashed line: spike threshold, red marks: motion outliers) and RMSD.",
    "carpet": "FD, standardised DVARS and carpet plot (detrended, z-scored voxel time series "
    "in the brain mask) of the motion-corrected series; non-steady-state volumes left out.",
    "unimo": "UniMo diagnostics per volume: disagreement between the image and shape "
    "branches' rigid estimates, how far test-time refinement moved the network's fused "
    "estimate (open marks: refinement started from another estimate than the network's), "
    "the registration residual, in moving-anatomy mode the tracked mask's agreement, and with "
    "--deformable the deformation's mean length, smallest Jacobian determinant and the "
    "correlation with the reference before and after it.",
}
_FIGURE_ORDER = ("mask", "beforeafter", "tsnr", "motion", "unimo", "carpet")

# QC keys that describe the settings rather than the data (not used for outlier detection).
_SETTING_KEYS = {
    "n_volumes",
    "dummy_trs",
    "fd_spike_threshold",
    "dvars_spike_threshold",
    "fd_radius",
}
_ID_COLUMNS = ("bids_name", "subject", "session", "task", "run")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    # Reproducible SVG: fixed element ids instead of random ones, and no date (below).
    matplotlib.rcParams["svg.hashsalt"] = "unimo-bids"
    import matplotlib.pyplot as plt

    return plt


# No creation date in SVG/PDF figures: the same data give the same bytes.
_NO_DATE = {"Date": None}


def _savefig(fig, path):
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", facecolor=fig.get_facecolor(),
                metadata=_NO_DATE)
    _pyplot().close(fig)
    return str(path)


def _tr_seconds(img) -> float:
    """Repetition time in seconds from a NIfTI header (1.0 when unknown)."""
    zooms = img.header.get_zooms()
    tr = float(zooms[3]) if len(zooms) > 3 else 0.0
    try:
        units = img.header.get_xyzt_units()[1]
    except Exception:  # pragma: no cover - non-NIfTI headers
        units = "sec"
    if units == "msec":
        tr /= 1000.0
    elif units == "usec":
        tr /= 1e6
    return tr if np.isfinite(tr) and tr > 0 else 1.0


def _load_3d(path):
    img = nb.load(path)
    if img.ndim == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    return img


def _mean_img(path, skip=0):
    """Temporal mean (3D image) of a 4D series, leaving out the first ``skip`` volumes."""
    img = nb.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)  # one read (gzip cannot seek cheaply)
    if data.ndim == 4:
        skip = skip if data.shape[3] > skip else 0
        data = data[..., skip:].mean(axis=3, dtype=np.float64)
    return nb.Nifti1Image(data.astype(np.float32), img.affine)


def _cuts(mask_img, n_cuts=7):
    from nilearn.plotting import find_cut_slices

    return {d: find_cut_slices(mask_img, direction=d, n_cuts=n_cuts) for d in "xyz"}


def _robust_range(img, mask_img=None, lo=2.0, hi=98.0):
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    if mask_img is not None and mask_img.shape == data.shape:
        vals = data[np.asanyarray(mask_img.dataobj) != 0]
    else:
        vals = data[data != 0]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(vals, [lo, hi])
    if vmax <= vmin:
        vmax = vmin + 1.0
    return float(vmin), float(vmax)


def _read_confounds(path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=["n/a"])


def _spike_rows(confounds: pd.DataFrame, prefix: str) -> np.ndarray:
    cols = [c for c in confounds.columns if str(c).startswith(prefix)]
    if not cols:
        return np.array([], dtype=int)
    return np.flatnonzero(confounds[cols].fillna(0).to_numpy().sum(axis=1) > 0)


def _atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder + os.replace."""
    path = Path(path)
    write_atomically({path: "text:" + text})
    return path


def parse_entities(name: str) -> dict:
    """BIDS entities of a file name (``sub-01_task-rest_run-1_bold`` -> {'sub': '01', ...})."""
    stem = Path(name).name.split(".")[0]
    return {k: v for k, v in _ENTITY_RE.findall(stem)}


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value)


# --------------------------------------------------------------------------------------------
# Reportlets
# --------------------------------------------------------------------------------------------
class _SeriesReportletsInputSpec(BaseInterfaceInputSpec):
    in_raw = File(exists=True, mandatory=True, desc="original 4D series")
    in_preproc = File(exists=True, mandatory=True, desc="motion-corrected 4D series")
    in_ref = File(exists=True, mandatory=True, desc="3D HMC reference (boldref)")
    in_mask = File(exists=True, mandatory=True, desc="3D brain mask on the reference grid")
    in_distmap = File(
        exists=True, mandatory=True, desc="3D signed distance map of the mask (mm, <0 inside)"
    )
    in_confounds = File(exists=True, mandatory=True, desc="confounds TSV (SeriesConfounds)")
    in_tsnr_raw = File(exists=True, mandatory=True, desc="tSNR map before correction")
    in_tsnr_preproc = File(exists=True, mandatory=True, desc="tSNR map after correction")
    fd_spike_threshold = traits.Float(0.5, usedefault=True, desc="FD threshold line (mm)")


class _SeriesReportletsOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="mask contour + distance map over the reference (SVG)")
    out_beforeafter = File(exists=True, desc="mean image before vs after correction (SVG)")
    out_tsnr = File(exists=True, desc="tSNR before vs after (SVG)")
    out_motion = File(exists=True, desc="motion parameters, FD and RMSD traces (SVG)")
    out_carpet = File(exists=True, desc="carpet plot with FD and DVARS traces (SVG)")
    out_unimo = File(exists=True, desc="UniMo engine diagnostics per volume (SVG)")


class SeriesReportlets(SimpleInterface):
    """Draw the six reportlets of one series (SVG files in the working directory:
    ``mask.svg``, ``beforeafter.svg``, ``tsnr.svg``, ``motion.svg``, ``carpet.svg``,
    ``unimo.svg``)."""

    input_spec = _SeriesReportletsInputSpec
    output_spec = _SeriesReportletsOutputSpec

    def _run_interface(self, runtime):
        cwd = Path(runtime.cwd)
        inputs = self.inputs
        mask_img = _load_3d(inputs.in_mask)
        cuts = _cuts(mask_img)
        confounds = _read_confounds(inputs.in_confounds)
        # leading non-steady-state volumes are left out of the means and of the carpet plot
        n_dummy = sum(1 for c in confounds.columns if str(c).startswith(NSS_PREFIX))

        self._results["out_mask"] = plot_mask_distmap(
            _load_3d(inputs.in_ref), mask_img, _load_3d(inputs.in_distmap), cuts,
            cwd / "mask.svg",
        )
        self._results["out_beforeafter"] = plot_before_after(
            _mean_img(inputs.in_raw, n_dummy), _mean_img(inputs.in_preproc, n_dummy),
            mask_img, cuts["z"],
            cwd / "beforeafter.svg",
        )
        self._results["out_tsnr"] = plot_tsnr(
            _load_3d(inputs.in_tsnr_raw), _load_3d(inputs.in_tsnr_preproc), mask_img,
            cuts["z"], cwd / "tsnr.svg",
        )
        self._results["out_motion"] = plot_motion(
            confounds, inputs.fd_spike_threshold, cwd / "motion.svg"
        )
        self._results["out_carpet"] = plot_carpet_confounds(
            nb.load(inputs.in_preproc), mask_img, confounds, inputs.fd_spike_threshold,
            cwd / "carpet.svg", skip=n_dummy,
        )
        self._results["out_unimo"] = plot_unimo_diagnostics(confounds, cwd / "unimo.svg")
        return runtime


def plot_mask_distmap(ref_img, mask_img, dist_img, cuts, out_file, band_mm=15.0):
    """Reference with the mask contour and the signed distance map overlaid (3 rows x/y/z).

    The distance map is shown in a band of +/- ``band_mm`` around the mask boundary (blue
    inside, red outside), so that the anatomy stays visible elsewhere.
    """
    plt = _pyplot()
    from nilearn.plotting import plot_anat

    dist = np.asanyarray(dist_img.dataobj, dtype=np.float32)
    finite = np.abs(dist[np.isfinite(dist)])
    vmax = float(min(band_mm, finite.max())) if finite.size and finite.max() > 0 else 1.0
    band = np.where(np.isfinite(dist) & (np.abs(dist) <= vmax), dist, 0).astype(np.float32)
    band_img = nb.Nifti1Image(band, dist_img.affine)
    vmin_ref, vmax_ref = _robust_range(ref_img, mask_img, 1, 99.5)
    fig = plt.figure(figsize=(9.5, 5.4), facecolor="k")
    for row, direction in enumerate("xyz"):
        display = plot_anat(
            ref_img,
            display_mode=direction,
            cut_coords=cuts[direction],
            figure=fig,
            axes=(0.0, 1.0 - (row + 1) / 3.0, 1.0, 1.0 / 3.0),
            annotate=False,
            draw_cross=False,
            black_bg=True,
            colorbar=False,
            vmin=vmin_ref,
            vmax=vmax_ref,
            dim=0,
        )
        display.add_overlay(
            band_img, cmap="RdBu_r", vmin=-vmax, vmax=vmax, transparency=0.5,
            colorbar=row == 2, cbar_tick_format="%.0f",
        )
        display.add_contours(mask_img, levels=[0.5], colors="r", linewidths=1.0, rasterized=True)
        display.annotate(left_right=direction != "x", positions=True, size=8)
    return _savefig(fig, out_file)


def plot_before_after(mean_raw, mean_pre, mask_img, cut_z, out_file):
    """Temporal mean before (top row) and after (bottom row), same scale, mask contour."""
    plt = _pyplot()
    from nilearn.plotting import plot_epi

    vmin, vmax = _robust_range(mean_pre, mask_img, 1, 99.5)
    fig = plt.figure(figsize=(9.5, 3.6), facecolor="k")
    for row, (img, label) in enumerate(((mean_raw, "before"), (mean_pre, "after"))):
        display = plot_epi(
            img,
            display_mode="z",
            cut_coords=cut_z,
            figure=fig,
            axes=(0.0, 0.5 - 0.5 * row, 1.0, 0.5),
            title=f"mean, {label}",
            annotate=False,
            draw_cross=False,
            black_bg=True,
            colorbar=False,
            cmap="gray",
            vmin=vmin,
            vmax=vmax,
        )
        display.add_contours(mask_img, levels=[0.5], colors="r", linewidths=0.7, rasterized=True)
        if row == 1:
            display.annotate(left_right=False, positions=True, size=8)
    return _savefig(fig, out_file)


def plot_aligned_run(reference_img, aligned_img, mask_img, out_file, n_cuts=6):
    """The reference run (top) and an aligned run resampled onto its grid (bottom), on the
    reference's own slices through its brain mask (red contour in both rows): the brain must
    fill the same contour. Slices are the reference's voxel planes across its thickest axis,
    so an oblique stack shows whole slices."""
    plt = _pyplot()
    from nilearn.image import resample_to_img

    reference = np.asarray(reference_img.dataobj, dtype=np.float32)
    mask = np.asarray(mask_img.dataobj) > 0
    aligned = np.asarray(resample_to_img(aligned_img, reference_img, interpolation="linear",
                                         force_resample=True, copy_header=True).dataobj,
                         dtype=np.float32)
    axis = int(np.argmax(reference_img.header.get_zooms()[:3]))
    extent = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    cuts = np.unique(np.linspace(extent[0], extent[-1], n_cuts + 2)[1:-1].round().astype(int))
    in_plane = [a for a in range(3) if a != axis]
    zooms = reference_img.header.get_zooms()[:3]
    fig, axes = plt.subplots(2, len(cuts), figsize=(1.6 * len(cuts), 3.6), facecolor="k",
                             squeeze=False)
    for row, (data, label) in enumerate(((reference, "reference run"),
                                         (aligned, "aligned run"))):
        vmin, vmax = np.percentile(data[mask], [1, 99.5]) if mask.any() else (0, 1)
        for col, cut in enumerate(cuts):
            plane = np.take(data, cut, axis=axis).T
            ax = axes[row, col]
            ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                      interpolation="nearest", aspect=zooms[in_plane[1]] / zooms[in_plane[0]])
            ax.contour(np.take(mask, cut, axis=axis).T.astype(float), levels=[0.5],
                       colors="r", linewidths=0.7)
            ax.set_axis_off()
            if col == 0:
                ax.set_title(label, color="w", fontsize=9, loc="left")
    fig.subplots_adjust(wspace=0.02, hspace=0.15)
    return _savefig(fig, out_file)


def plot_tsnr(tsnr_raw, tsnr_pre, mask_img, cut_z, out_file):
    """tSNR before (top) and after (bottom), same colour scale; medians in the titles."""
    plt = _pyplot()
    from nilearn.plotting import plot_img

    pre = np.asanyarray(tsnr_pre.dataobj, dtype=np.float32)
    mask = np.asanyarray(mask_img.dataobj) != 0
    vals = pre[mask] if pre.shape == mask.shape else pre[pre > 0]
    vals = vals[np.isfinite(vals)]
    vmax = float(np.percentile(vals, 99)) if vals.size else 1.0
    vmax = vmax if vmax > 0 else 1.0

    def median_in(img):
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        sel = data[mask] if data.shape == mask.shape else data[data > 0]
        sel = sel[np.isfinite(sel)]
        return float(np.median(sel)) if sel.size else float("nan")

    fig = plt.figure(figsize=(9.5, 3.6), facecolor="k")
    for row, (img, label) in enumerate(((tsnr_raw, "before"), (tsnr_pre, "after"))):
        display = plot_img(
            img,
            display_mode="z",
            cut_coords=cut_z,
            figure=fig,
            axes=(0.0, 0.5 - 0.5 * row, 1.0, 0.5),
            title=f"tSNR {label} (median in mask {median_in(img):.1f})",
            annotate=False,
            draw_cross=False,
            black_bg=True,
            colorbar=True,
            cmap="inferno",
            vmin=0.0,
            vmax=vmax,
            cbar_tick_format="%.0f",
        )
        if row == 1:
            display.annotate(left_right=False, positions=True, size=8)
    return _savefig(fig, out_file)


def _col(confounds, name):
    if name in confounds:
        return pd.to_numeric(confounds[name], errors="coerce").to_numpy(dtype=float)
    return np.full(len(confounds), np.nan)


def plot_motion(confounds: pd.DataFrame, fd_threshold: float, out_file):
    """Translations, rotations, FD (with threshold and outliers) and RMSD over volumes."""
    plt = _pyplot()
    n = len(confounds)
    frames = np.arange(n)
    outliers = _spike_rows(confounds, MOTION_OUTLIER_PREFIX)
    dummies = _spike_rows(confounds, NSS_PREFIX)
    fig, axes = plt.subplots(4, 1, figsize=(8, 5.6), sharex=True)
    colors = ("tab:red", "tab:green", "tab:blue")
    for axis, col in zip("xyz", colors):
        axes[0].plot(frames, _col(confounds, f"trans_{axis}"), color=col, lw=1, label=axis)
        axes[1].plot(frames, np.degrees(_col(confounds, f"rot_{axis}")), color=col, lw=1,
                     label=axis)
    axes[0].set_ylabel("trans (mm)")
    axes[1].set_ylabel("rot (deg)")
    axes[0].legend(loc="upper right", ncol=3, fontsize=7, frameon=False)
    fd = _col(confounds, "framewise_displacement")
    axes[2].plot(frames, fd, color="k", lw=1)
    axes[2].axhline(fd_threshold, color="tab:orange", ls="--", lw=1,
                    label=f"{fd_threshold:g} mm")
    if outliers.size:
        axes[2].plot(outliers, np.nan_to_num(fd[outliers]), "o", color="tab:red", ms=3,
                     label="outlier")
    axes[2].legend(loc="upper right", fontsize=7, frameon=False)
    axes[2].set_ylabel("FD (mm)")
    axes[3].plot(frames, _col(confounds, "rmsd"), color="k", lw=1)
    axes[3].set_ylabel("RMSD (mm)")
    axes[3].set_xlabel("volume")
    for ax in axes:
        if dummies.size:
            ax.axvspan(-0.5, dummies.max() + 0.5, color="0.85", lw=0)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, lw=0.5)
        ax.set_xlim(-0.5, max(n - 0.5, 0.5))
    fig.align_ylabels(axes)
    fig.tight_layout()
    return _savefig(fig, out_file)


def plot_unimo_diagnostics(confounds: pd.DataFrame, out_file):
    """The engine's per-volume diagnostics, one panel per confounds column that is present.

    Panels: branch disagreement and refinement shift (mm), registration residual, tracked-mask
    agreement (moving-anatomy mode), deformation length, smallest Jacobian determinant and
    correlation with the reference (--deformable). The fusion weight lambda is in the title.
    """
    plt = _pyplot()
    frames = np.arange(len(confounds))
    panels = [(name, label) for name, label in (
        ("unimo_branch_disagreement", "image vs shape\nbranch (mm)"),
        ("unimo_refine_shift", "refinement\nshift (mm)"),
        ("hmc_residual", "residual"),
        ("mask_agreement", "mask Dice"),
        ("deform_mean", "deformation\nmean (mm)"),
        ("deform_jacobian_min", "deformation\nmin Jacobian"),
        ("deform_ncc", "correlation\nwith reference"),
    ) if np.isfinite(_col(confounds, name)).any()]
    if not panels:
        fig, ax = plt.subplots(figsize=(8, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "No UniMo diagnostics in the confounds of this series.",
                ha="center", va="center")
        return _savefig(fig, out_file)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.4 * len(panels) + 0.6), sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    from_network = _col(confounds, "unimo_start_network") == 1
    for ax, (name, label) in zip(axes, panels):
        values = _col(confounds, name)
        ax.plot(frames, values, color="k", lw=1,
                label="rigid + deformable" if name == "deform_ncc" else None)
        if name == "unimo_refine_shift" and np.isfinite(_col(confounds, "unimo_start_network")).any():
            ax.plot(frames[from_network], values[from_network], "o", color="tab:blue", ms=3,
                    label="from network")
            ax.plot(frames[~from_network], values[~from_network], "o", mfc="none",
                    color="tab:orange", ms=3, label="from other start")
            ax.legend(loc="upper right", fontsize=7, frameon=False, ncol=2)
        if name == "deform_ncc":
            ax.plot(frames, _col(confounds, "deform_ncc_rigid"), color="0.5", lw=1, ls="--",
                    label="rigid only")
            ax.legend(loc="lower right", fontsize=7, frameon=False, ncol=2)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, lw=0.5)
        ax.set_xlim(-0.5, max(len(frames) - 0.5, 0.5))
    axes[-1].set_xlabel("volume")
    lam = _col(confounds, "unimo_lambda")
    if np.isfinite(lam).any():
        axes[0].set_title(f"learned fusion weight lambda = {np.nanmean(lam):.3f} "
                          "(0 = image branch, 1 = shape branch)", fontsize=9)
    fig.align_ylabels(axes)
    fig.tight_layout()
    return _savefig(fig, out_file)


def plot_carpet_confounds(preproc_img, mask_img, confounds, fd_threshold, out_file, skip=0):
    """nilearn carpet plot of the corrected series under FD and std_dvars traces.

    The first ``skip`` (non-steady-state) volumes are left out of the carpet and the traces.
    """
    plt = _pyplot()
    from matplotlib.gridspec import GridSpec
    from nilearn.plotting import plot_carpet

    if 0 < skip < preproc_img.shape[3] - 1:
        preproc_img = preproc_img.slicer[..., skip:]
        confounds = confounds.iloc[skip:].reset_index(drop=True)
    n = preproc_img.shape[3]
    fig = plt.figure(figsize=(8, 5.5))
    grid = GridSpec(3, 1, height_ratios=(1, 1, 4.5), hspace=0.15, figure=fig)
    frames = np.arange(n)
    traces = (
        ("framewise_displacement", "FD (mm)", fd_threshold),
        ("std_dvars", "std DVARS", None),
    )
    for row, (name, label, thr) in enumerate(traces):
        ax = fig.add_subplot(grid[row])
        ax.plot(frames, _col(confounds, name)[:n], color="k", lw=0.8)
        if thr is not None:
            ax.axhline(thr, color="tab:orange", ls="--", lw=0.8)
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_xticks([])
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    ax_carpet = fig.add_subplot(grid[2])
    mask_bin = nb.Nifti1Image(
        (np.asanyarray(mask_img.dataobj) != 0).astype(np.uint8), mask_img.affine
    )
    plot_carpet(
        preproc_img,
        mask_img=mask_bin,
        t_r=_tr_seconds(preproc_img),
        detrend=n > 2,
        figure=fig,
        axes=ax_carpet,
    )
    return _savefig(fig, out_file)


# --------------------------------------------------------------------------------------------
# Subject report
# --------------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#222}
nav{position:sticky;top:0;background:#2c3e50;padding:.5em 1em;z-index:2}
nav a{color:#fff;margin-right:1.2em;text-decoration:none;font-size:.95em}
main{padding:0 2em 2em 2em;max-width:1200px}
h1{margin-top:.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.3em}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.6em;font-size:.85em}
.ok{color:#2e7d32}.err{color:#c62828}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid img{width:300px}
"""


def _html_page(title: str, nav: list[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{_esc(anchor)}">{_esc(label)}</a>' for anchor, label in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<nav>{links}</nav>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _value_html(value) -> str:
    if isinstance(value, dict):
        rows = "".join(
            f"<tr><th>{_esc(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in value.items()
        )
        return f"<table>{rows}</table>"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value) and len(value) <= 1:
            return _esc(" ".join(_fmt(v) for v in value))
        return "<ul>" + "".join(f"<li>{_value_html(v)}</li>" for v in value) + "</ul>"
    return _esc(_fmt(value))


def _metrics_table(metrics: dict) -> str:
    rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in metrics.items()
    )
    return f"<table class=\"qc\">{rows}</table>"


def _run_title(entities: dict) -> str:
    names = {"ses": "session", "task": "task", "acq": "acquisition", "ce": "contrast",
             "rec": "reconstruction", "dir": "direction", "run": "run", "echo": "echo",
             "part": "part"}
    parts = [f"{names[k]} {entities[k]}" for k in ENTITY_ORDER[1:] if k in entities]
    return ", ".join(parts) if parts else "series"


_EMPHASIS = re.compile(r"\*([^*\n]+)\*")


def _markdown_html(text: str) -> str:
    """Tiny, safe rendering of a Markdown text: headings, paragraphs and *emphasis* (all
    escaped first)."""
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    out = []
    for block in blocks:
        match = re.match(r"^(#{1,6})\s+(.*)$", block)
        if match and "\n" not in block:
            level = min(len(match.group(1)) + 2, 6)
            out.append(f"<h{level}>{_esc(match.group(2))}</h{level}>")
        else:
            out.append("<p>" + _EMPHASIS.sub(r"<em>\1</em>", _esc(block)) + "</p>")
    return "\n".join(out)


def _repetition_time(qc_file: Path, prefix: str) -> float | None:
    suffix = qc_file.name.rsplit("_", 1)[-1]  # 'bold.json', 'dwi.json', ...
    sidecar = qc_file.with_name(prefix + "desc-preproc_" + suffix)
    try:
        tr = float(json.loads(sidecar.read_text())["RepetitionTime"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tr if np.isfinite(tr) and tr > 0 else None


def outlier_table(qc_file: Path, prefix: str, metrics: dict, max_rows: int = 100) -> str:
    """HTML table of the run's flagged volumes, read from its confounds TSV.

    One row per non-steady-state or motion-outlier volume: index, onset (s), FD, std_dvars and
    which criterion flagged it (thresholds from the QC JSON).
    """
    table_file = qc_file.with_name(prefix + "desc-confounds_timeseries.tsv")
    try:
        confounds = _read_confounds(table_file)
    except (OSError, ValueError) as exc:
        return f"<p class=\"err\">Could not read {_esc(table_file.name)}: {_esc(exc)}</p>"
    dummies = set(_spike_rows(confounds, NSS_PREFIX).tolist())
    outliers = set(_spike_rows(confounds, MOTION_OUTLIER_PREFIX).tolist())
    flagged = sorted(dummies | outliers)
    if not flagged:
        return "<p class=\"ok\">No volume was flagged.</p>"
    fd, dvars = _col(confounds, "framewise_displacement"), _col(confounds, "std_dvars")
    fd_thr = metrics.get("fd_spike_threshold")
    dvars_thr = metrics.get("dvars_spike_threshold")
    tr = _repetition_time(qc_file, prefix)
    rows = []
    for index in flagged[:max_rows]:
        reasons = []
        if index in dummies:
            reasons.append("non-steady state")
        if index in outliers:
            criteria = []
            if fd_thr is not None and np.isfinite(fd[index]) and fd[index] > fd_thr:
                criteria.append(f"FD &gt; {_esc(_fmt(fd_thr))} mm")
            if dvars_thr is not None and np.isfinite(dvars[index]) and dvars[index] > dvars_thr:
                criteria.append(f"std DVARS &gt; {_esc(_fmt(dvars_thr))}")
            reasons.extend(criteria or ["motion outlier"])
        onset = _fmt(index * tr) if tr else "n/a"
        rows.append(f"<tr><td>{index}</td><td>{onset}</td><td>{_esc(_fmt(fd[index]))}</td>"
                    f"<td>{_esc(_fmt(dvars[index]))}</td><td>{', '.join(reasons)}</td></tr>")
    more = (f"<p>... and {len(flagged) - max_rows} more (see "
            f"{_esc(table_file.name)}).</p>" if len(flagged) > max_rows else "")
    return ("<table class=\"outliers\"><tr><th>volume</th><th>onset (s)</th><th>FD (mm)</th>"
            f"<th>std DVARS</th><th>flagged for</th></tr>{''.join(rows)}</table>{more}")


def _figure_desc(name: str) -> str | None:
    match = re.search(r"(?:^|_)desc-([a-zA-Z0-9]+)", name)
    return match.group(1) if match else None


ALIGNMENT_COLUMNS = ("RotationDegrees", "TranslationMillimetres", "MeanDisplacementMillimetres",
                     "Residual", "Overlap", "Masks")


def aligned_runs_table(subj_dir: Path) -> str:
    """HTML table of the anatomical runs aligned to a reference run (their ``desc-aligned``
    sidecars' RigidAlignment), then their ``desc-alignment`` figures; '' when there are none."""
    rows, figures = [], []
    for sidecar in sorted(subj_dir.rglob("*_desc-aligned_*.json")) if subj_dir.is_dir() else []:
        figure = subj_dir / "figures" / sidecar.name.replace("_desc-aligned_", "_desc-alignment_"
                                                              ).replace(".json", ".svg")
        if figure.is_file():
            relative = quote(f"{subj_dir.name}/figures/{figure.name}")
            figures.append(f"<figure><img src=\"{_esc(relative)}\" alt=\"{_esc(figure.name)}\" "
                           f"loading=\"lazy\"><figcaption>{_esc(FIGURE_CAPTIONS['alignment'])} "
                           f"<a href=\"{_esc(relative)}\">{_esc(figure.name)}</a></figcaption>"
                           "</figure>")
        try:
            alignment = json.loads(sidecar.read_text()).get("RigidAlignment", {})
        except (OSError, ValueError, AttributeError):
            alignment = {}
        cells = "".join(f"<td>{_esc(alignment.get(key, 'n/a'))}</td>" for key in ALIGNMENT_COLUMNS)
        reference = str(alignment.get("ReferenceRun", "n/a")).rsplit("/", 1)[-1]
        rows.append(f"<tr><td><code>{_esc(sidecar.name)}</code></td><td>{_esc(reference)}</td>"
                    f"{cells}</tr>")
    if not rows:
        return ""
    header = "".join(f"<th>{_esc(name)}</th>" for name in ("Run", "Reference",
                                                            *ALIGNMENT_COLUMNS))
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>{''.join(figures)}"


def build_subject_report(output_dir, subject: str, summary: dict, errors: list[str]) -> Path:
    """Write ``<output_dir>/sub-<subject>.html`` and return its path.

    Sections: Summary (``summary``), one section per ``*_desc-qc_<suffix>.json`` found under
    ``<output_dir>/sub-<subject>/`` (QC table + the figures of ``sub-<subject>/figures/`` whose
    name starts with that run's source prefix, linked relatively), Methods
    (``logs/CITATION.md``) and Errors. Every value is HTML-escaped. Written atomically.
    """
    output_dir = Path(output_dir)
    label = str(subject)
    label = label[4:] if label.startswith("sub-") else label
    subj_dir = output_dir / f"sub-{label}"
    fig_dir = subj_dir / "figures"

    qc_files = sorted(
        p for p in subj_dir.rglob("*_desc-qc_*.json") if fig_dir not in p.parents
    ) if subj_dir.is_dir() else []
    # 'sub-01_task-a_desc-qc_bold.json' -> 'sub-01_task-a_' (any series suffix)
    prefixes = {p: p.name[: p.name.index("desc-qc_")] for p in qc_files}

    # Each figure belongs to the run with the longest matching source prefix, so that
    # ``sub-01_task-a_`` does not claim the figures of ``sub-01_task-a_run-1_``.
    figures: dict[Path, list[Path]] = {p: [] for p in qc_files}
    if fig_dir.is_dir():
        for fig in sorted(fig_dir.iterdir()):
            if fig.suffix.lower() not in (".svg", ".png", ".jpg", ".jpeg", ".gif"):
                continue
            owners = [p for p, pre in prefixes.items() if fig.name.startswith(pre)]
            if owners:
                owner = max(owners, key=lambda p: len(prefixes[p]))
                figures[owner].append(fig)

    nav = [("summary", "Summary")]
    sections = [f"<h1>{_esc('sub-' + label)}</h1>"]
    summary_rows = "".join(
        f"<tr><th>{_esc(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in (summary or {}).items()
    )
    sections.append(
        f"<section id=\"summary\"><h2>Summary</h2><table>{summary_rows}</table></section>"
    )

    for idx, qc_file in enumerate(qc_files):
        anchor = f"run-{idx}"
        entities = parse_entities(qc_file.name)
        title = _run_title(entities)
        nav.append((anchor, title))
        try:
            metrics = json.loads(qc_file.read_text())
        except (OSError, ValueError) as exc:
            metrics = {"error": f"could not read {qc_file.name}: {exc}"}
        fig_html = []

        def order(path):
            desc = _figure_desc(path.name)
            rank = _FIGURE_ORDER.index(desc) if desc in _FIGURE_ORDER else len(_FIGURE_ORDER)
            return (rank, path.name)

        for fig in sorted(figures[qc_file], key=order):
            rel = fig.relative_to(output_dir).as_posix()
            desc = _figure_desc(fig.name)
            caption = FIGURE_CAPTIONS.get(desc, fig.name)
            fig_html.append(
                f"<figure><img src=\"{_esc(quote(rel))}\" alt=\"{_esc(fig.name)}\" "
                f"loading=\"lazy\"><figcaption>{_esc(caption)} "
                f"<a href=\"{_esc(quote(rel))}\">{_esc(fig.name)}</a></figcaption></figure>"
            )
        sections.append(
            f"<section id=\"{anchor}\"><h2>{_esc(title)}</h2>"
            f"<p><code>{_esc(prefixes[qc_file].rstrip('_'))}</code></p>"
            f"<h3>Quality metrics</h3>{_metrics_table(metrics)}"
            f"<h3>Flagged volumes</h3>{outlier_table(qc_file, prefixes[qc_file], metrics)}"
            f"<h3>Figures</h3>{''.join(fig_html) or '<p>No figures found.</p>'}</section>"
        )
    aligned = aligned_runs_table(subj_dir)
    if aligned:
        nav.append(("aligned", "Aligned runs"))
        sections.append(f"<section id=\"aligned\"><h2>Aligned runs</h2>{aligned}</section>")
    if not qc_files and not aligned:
        sections.append("<section id=\"runs\"><h2>Runs</h2><p>No processed runs found.</p>"
                        "</section>")

    nav.append(("methods", "Methods"))
    citation = output_dir / "logs" / "CITATION.md"
    if citation.is_file():
        methods = _markdown_html(citation.read_text(encoding="utf-8", errors="replace"))
    else:
        methods = "<p>No boilerplate (logs/CITATION.md) found.</p>"
    sections.append(f"<section id=\"methods\"><h2>Methods</h2>{methods}</section>")

    nav.append(("errors", "Errors"))
    if errors:
        items = "".join(f"<li><pre>{_esc(e)}</pre></li>" for e in errors)
        err_html = f"<ul class=\"err\">{items}</ul>"
    else:
        err_html = "<p class=\"ok\">No errors to report!</p>"
    sections.append(f"<section id=\"errors\"><h2>Errors</h2>{err_html}</section>")

    page = _html_page(f"unimo-bids report: sub-{label}", nav, "\n".join(sections))
    return _atomic_write_text(output_dir / f"sub-{label}.html", page)


# --------------------------------------------------------------------------------------------
# Group report
# --------------------------------------------------------------------------------------------
def _collect_group(output_dir: Path, fd_spike_threshold, suffix: str = "bold") -> pd.DataFrame:
    rows = []
    for sub_dir in sorted(p for p in output_dir.glob("sub-*") if p.is_dir()):
        for qc_file in sorted(sub_dir.rglob(f"*_desc-qc_{suffix}.json")):
            if "figures" in qc_file.relative_to(sub_dir).parts:
                continue
            try:
                metrics = json.loads(qc_file.read_text())
            except (OSError, ValueError) as exc:
                LOGGER.warning("Skipping unreadable %s: %s", qc_file, exc)
                continue
            prefix = qc_file.name[: -len(f"_desc-qc_{suffix}.json")]
            ents = parse_entities(prefix)
            row = {
                "bids_name": f"{prefix}_{suffix}",
                "subject": ents.get("sub"),
                "session": ents.get("ses"),
                "task": ents.get("task"),
                "run": ents.get("run"),
            }
            row.update(metrics)
            if fd_spike_threshold is not None:
                conf = qc_file.with_name(f"{prefix}_desc-confounds_timeseries.tsv")
                if conf.is_file():
                    dvars_thr = metrics.get("dvars_spike_threshold")
                    dvars_thr = 1.5 if dvars_thr is None else float(dvars_thr)
                    new = qc_from_confounds(
                        _read_confounds(conf), float(fd_spike_threshold), dvars_thr
                    )
                    for key in ("fd_num", "fd_perc", "usable_fraction", "n_outliers"):
                        row[key] = new[key]
                    row["fd_spike_threshold"] = float(fd_spike_threshold)
                else:
                    LOGGER.warning(
                        "No confounds table for %s: keeping its FD metrics at threshold %s",
                        prefix, metrics.get("fd_spike_threshold"),
                    )
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=list(_ID_COLUMNS))
    return table


def _metric_columns(table: pd.DataFrame) -> list[str]:
    cols = []
    for col in table.columns:
        if col in _ID_COLUMNS or col in _SETTING_KEYS:
            continue
        values = pd.to_numeric(table[col], errors="coerce")
        if values.notna().any():
            cols.append(col)
    return cols


def _outlier_table(table: pd.DataFrame, metrics: list[str], z_thr=3.0, fd_perc_thr=20.0):
    found = []
    for col in metrics:
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(values)
        if ok.sum() >= 3:
            med = np.median(values[ok])
            mad = 1.4826 * np.median(np.abs(values[ok] - med))
            if mad > 0:
                z = (values - med) / mad
                for i in np.flatnonzero(ok & (np.abs(z) > z_thr)):
                    found.append((table["bids_name"].iloc[i], col, values[i],
                                  f"robust z = {z[i]:+.1f}"))
        if col == "fd_perc":
            for i in np.flatnonzero(ok & (values > fd_perc_thr)):
                found.append((table["bids_name"].iloc[i], col, values[i],
                              f"fd_perc > {fd_perc_thr:g}"))
    return found


def _metric_plot_uri(table: pd.DataFrame, col: str) -> str:
    plt = _pyplot()
    values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(values)
    fig, ax = plt.subplots(figsize=(3.4, 1.5))
    if ok.any():
        try:  # matplotlib >= 3.10
            ax.boxplot(values[ok], orientation="horizontal", widths=0.5, showfliers=False)
        except TypeError:
            ax.boxplot(values[ok], vert=False, widths=0.5, showfliers=False)
        jitter = np.random.default_rng(0).uniform(-0.12, 0.12, ok.sum())
        ax.plot(values[ok], 1 + jitter, "o", ms=3, alpha=0.7, color="tab:blue")
    ax.set_yticks([])
    ax.set_title(col, fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata=_NO_DATE)
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def group_suffixes(output_dir) -> list[str]:
    """The series suffixes (bold, dwi, asl, pet) that have participant-level QC files."""
    found = {p.name.rsplit("_desc-qc_", 1)[1][: -len(".json")]
             for p in Path(output_dir).glob("sub-*/**/*_desc-qc_*.json")
             if "figures" not in p.parts}
    return sorted(found)


def build_group_report(output_dir, fd_spike_threshold: float | None = None,
                       suffix: str = "bold") -> tuple[Path, Path]:
    """Write ``<output_dir>/group_<suffix>.tsv`` and ``group_<suffix>.html``; return both paths.

    One row per ``sub-*/**/*_desc-qc_<suffix>.json`` (bids_name, subject, session, task, run and
    the QC metrics). With ``fd_spike_threshold``, fd_num, fd_perc, n_outliers and
    usable_fraction are recomputed from each run's ``*_desc-confounds_timeseries.tsv`` at that
    threshold. Outlier runs: |robust z| > 3 (median / 1.4826 MAD, at least 3 runs) on any
    metric, or fd_perc > 20. Files are written atomically.
    """
    output_dir = Path(output_dir)
    table = _collect_group(output_dir, fd_spike_threshold, suffix)
    kind = suffix.upper()
    tsv_path = _atomic_write_text(
        output_dir / f"group_{suffix}.tsv", table.to_csv(sep="\t", index=False, na_rep="n/a")
    )

    metrics = _metric_columns(table) if len(table) else []
    outliers = _outlier_table(table, metrics) if len(table) else []
    body = [f"<h1>unimo-bids group report: {_esc(kind)}</h1>"]
    thr_note = (
        f"FD metrics re-thresholded at {float(fd_spike_threshold):g} mm from the confounds "
        "tables." if fd_spike_threshold is not None else
        "FD metrics as computed at participant level (see fd_spike_threshold)."
    )
    body.append(
        f"<section id=\"summary\"><h2>Summary</h2><p>{len(table)} run(s), "
        f"{table['subject'].nunique() if len(table) else 0} subject(s). {_esc(thr_note)}</p>"
        f"<p>Table: <a href=\"group_{suffix}.tsv\">group_{suffix}.tsv</a></p></section>"
    )
    if metrics:
        imgs = "".join(
            f"<figure><img src=\"{_metric_plot_uri(table, col)}\" alt=\"{_esc(col)}\">"
            f"</figure>" for col in metrics
        )
        body.append(f"<section id=\"distributions\"><h2>Distributions</h2>"
                    f"<div class=\"grid\">{imgs}</div></section>")
    else:
        body.append("<section id=\"distributions\"><h2>Distributions</h2>"
                    "<p>No runs found.</p></section>")
    if outliers:
        rows = "".join(
            f"<tr><td>{_esc(name)}</td><td>{_esc(col)}</td><td>{_esc(_fmt(val))}</td>"
            f"<td>{_esc(why)}</td></tr>" for name, col, val, why in outliers
        )
        out_html = (f"<table><tr><th>bids_name</th><th>metric</th><th>value</th>"
                    f"<th>reason</th></tr>{rows}</table>")
    else:
        out_html = "<p class=\"ok\">No outlier runs.</p>"
    body.append(f"<section id=\"outliers\"><h2>Outlier runs</h2>{out_html}</section>")
    if len(table):
        head = "".join(f"<th>{_esc(c)}</th>" for c in table.columns)
        rows = "".join(
            "<tr>" + "".join(f"<td>{_esc(_fmt(v) if not pd.isna(v) else 'n/a')}</td>"
                             for v in rec) + "</tr>"
            for rec in table.itertuples(index=False, name=None)
        )
        body.append(f"<section id=\"table\"><h2>All runs</h2><div style=\"overflow-x:auto\">"
                    f"<table><tr>{head}</tr>{rows}</table></div></section>")
    nav = [("summary", "Summary"), ("distributions", "Distributions"),
           ("outliers", "Outliers"), ("table", "All runs")]
    html_path = _atomic_write_text(
        output_dir / f"group_{suffix}.html",
        _html_page(f"unimo-bids group report ({kind})", nav, "\n".join(body)),
    )
    return tsv_path, html_path
