"""Classical, weight-free brain masks, vectorised over the volumes of a series.

The default segmentation of unimo-bids needs no network weights. Per volume it does:

1. a robust intensity threshold (:func:`robust_thresholds`): the minimum of the smoothed intensity
   histogram between the 20th and 85th percentiles (the background/object gap, as in nilearn's
   ``compute_epi_mask``), with fallbacks (a wider window, then Otsu on percentile-clipped
   intensities) when there is no interior valley;
2. an opening with a ball whose radius is given in mm (so anisotropic voxels are handled), done as
   erosion -> largest connected component -> dilation, which cuts thin bridges (e.g. scalp, neck,
   ghosts) off the brain;
3. a closing with a ball (smooths the outline, bridges sulci);
4. hole filling, slice by slice (ventricles, dark CSF, signal drop-outs, dark deep brain).

Everything works on the whole 4D boolean array at once: the structuring elements have size 1 along
the volume axis, so a single ``scipy.ndimage`` call treats all volumes and no information flows
between volumes (long series are cut into chunks of volumes only to bound memory, and groups of
volumes run in threads: ``parallel.run_on_groups``). About 1.7 s for a 64x64x33x200 BOLD series
on 2 CPU cores in one thread. This module is numpy/scipy (no nipype, no BIDS).

Quality measured on real data (Dice against a reference mask): nilearn's MNI152 template 0.995;
MNI152NLin2009cAsym 2 mm T1w and T2w *with skull* 0.97 and 0.95 (TemplateFlow brain mask); BOLD,
pCASL and b=0 DWI volumes 0.91-0.97 against nilearn's ``compute_epi_mask`` of the series mean
(which, unlike this mask, leaves out the dark deep brain of partial-coverage EPI), with mask
volumes stable to 0.4 % over the volumes of a series. Limits: on an anatomical image with a
strong receive bias, darker brain (e.g. temporal lobes) can be missed; low-SNR volumes
(b=1000 DWI) give rougher masks; a fetal brain inside the mother's body is out of reach of this
classical method (the mask covers the brain, and much of the body around it).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from .parallel import run_on_groups

__all__ = ["brain_mask", "reference_mask", "robust_thresholds", "ball", "checked_voxel_size",
           "slice_axis"]

# Default radii. 8 mm opening removes structures thinner than ~16 mm that hang on the brain
# (scalp bridges, optic nerves, ghosts) but keeps gyri and the cerebellum; 4 mm closing smooths
# the outline without swallowing much CSF.
OPENING_RADIUS_MM = 8.0
CLOSING_RADIUS_MM = 4.0

# Above this many elements a ball morphology is cheaper as an exact Euclidean distance transform
# per volume (O(N), independent of the radius) than as a 4D binary erosion/dilation (O(N * k)).
_EDT_MIN_BALL_ELEMENTS = 250

# At most this many voxels per volume enter the percentiles and histograms (keeps thresholds
# cheap on large anatomical volumes; fewer samples make the valley noisy).
_MAX_SAMPLES = 1 << 18
_MAX_PCT_SAMPLES = 1 << 15

# Volumes are processed in chunks of at most this many voxels (int32 labels: 4 bytes each).
_MAX_CHUNK_VOXELS = 1 << 26


def ball(radius_mm: float, voxel_size: Sequence[float]) -> np.ndarray:
    """Voxelised ball of ``radius_mm`` on a grid with spacing ``voxel_size`` (mm).

    Returns a bool array of shape (2*n_x+1, 2*n_y+1, 2*n_z+1), n_i = floor(r / h_i): the offsets
    o (in voxels) with ``|o * h| <= r``. With anisotropic voxels it is an ellipsoid in voxels.
    A radius below the smallest voxel size gives the single centre voxel (a no-op morphology).
    """
    h = np.asarray(voxel_size, dtype=float)[:3]
    r = float(radius_mm)
    n = np.floor(r / h + 1e-6).astype(int)
    grids = np.ogrid[tuple(slice(-k, k + 1) for k in n)]
    d2 = sum((g * hi) ** 2 for g, hi in zip(grids, h))
    return d2 <= r * r * (1 + 1e-9)


def checked_voxel_size(voxel_size: Sequence[float]) -> Tuple[float, float, float]:
    """The 3 voxel sizes (mm) of header zooms (extra entries such as TR are ignored); a one-line
    ValueError unless there are 3 positive ones."""
    h = tuple(float(v) for v in np.asarray(voxel_size, dtype=float).ravel()[:3])
    if len(h) != 3 or min(h) <= 0:
        raise ValueError(f"voxel_size must hold 3 positive sizes in mm, got {voxel_size!r}")
    return h


def slice_axis(voxel_size: Sequence[float]) -> int:
    """The axis of the largest voxel size (the slice axis of anisotropic acquisitions; the last
    axis on ties): holes are filled in the slices normal to it."""
    h = np.asarray(voxel_size, dtype=float)
    return int(np.flatnonzero(h >= h.max() - 1e-6)[-1])


def _struct4d(s3: np.ndarray) -> np.ndarray:
    """3D structuring element -> 4D one with extent 1 along the volume axis (no cross-talk)."""
    return s3[None]


def _conn6_4d() -> np.ndarray:
    """6-connectivity inside each volume, none across volumes; shape (3,3,3,3) for ndi.label."""
    s = np.zeros((3, 3, 3, 3), dtype=bool)
    s[1] = ndi.generate_binary_structure(3, 1)
    return s


def _erode(masks: np.ndarray, radius_mm: float, voxel_size, within=None) -> np.ndarray:
    """Erode every volume of (T,X,Y,Z) ``masks`` by a ball; the FOV border counts as inside.

    Treating the border as inside keeps masks that touch the field of view (partial-coverage EPI,
    thin slabs) from being eaten from the edge. ``within`` (optional, a superset of ``masks``,
    normally ``masks`` itself) lets scipy skip the voxels outside it; the result is the same.
    """
    b = ball(radius_mm, voxel_size)
    if b.sum() <= 1:
        return masks.copy()
    if b.sum() > _EDT_MIN_BALL_ELEMENTS:
        # exact: x survives iff its nearest background voxel is farther than r
        out = np.zeros_like(masks)
        for t in range(masks.shape[0]):
            if masks[t].all():
                out[t] = True
            elif masks[t].any():
                out[t] = ndi.distance_transform_edt(masks[t], sampling=voxel_size) > radius_mm
        return out
    return ndi.binary_erosion(masks, _struct4d(b), border_value=1, mask=within)


def _dilate(masks: np.ndarray, radius_mm: float, voxel_size, within=None) -> np.ndarray:
    """Dilate every volume of (T,X,Y,Z) ``masks`` by a ball of ``radius_mm``.

    ``within`` (optional, same shape, a superset of ``masks``): the result is intersected with
    it. Passed to scipy as ``mask=``, which skips all voxels outside it (about 3x faster).
    """
    b = ball(radius_mm, voxel_size)
    if b.sum() <= 1:
        return masks.copy() if within is None else masks & within
    if b.sum() > _EDT_MIN_BALL_ELEMENTS:
        out = np.zeros_like(masks)
        for t in range(masks.shape[0]):
            if masks[t].all():
                out[t] = True
            elif masks[t].any():
                out[t] = ndi.distance_transform_edt(~masks[t], sampling=voxel_size) <= radius_mm
        return out if within is None else out & within
    if within is None:
        return ndi.binary_dilation(masks, _struct4d(b))
    return ndi.binary_dilation(masks, _struct4d(b), mask=within)


def _largest_component(masks: np.ndarray) -> np.ndarray:
    """Keep the largest 6-connected component of each volume of (T,X,Y,Z) ``masks``.

    One ``ndi.label`` call for all volumes. Labels are assigned in raster order and volumes are
    not connected, so the labels of volume t form the contiguous range (max label before t, max
    label of t]; only the argmax over each range of the (small) size table is per volume.
    """
    labels, n = ndi.label(masks, structure=_conn6_4d())
    if n == 0:
        return masks.copy()
    # bincount of the labelled voxels only: much cheaper than on the whole int32 label array
    counts = np.bincount(labels[masks], minlength=n + 1)
    counts[0] = 0
    last = labels.reshape(labels.shape[0], -1).max(axis=1)  # (T,) last label of each volume
    keep = np.zeros(n + 1, dtype=bool)
    first = np.concatenate([[0], np.maximum.accumulate(last)[:-1]]) + 1  # (T,)
    for t in np.flatnonzero(last >= first):  # volumes with at least one component
        seg = counts[first[t]:last[t] + 1]
        keep[first[t] + int(np.argmax(seg))] = True
    return keep[labels]


def _fill_holes(masks: np.ndarray, plane_axis: int | None = None) -> np.ndarray:
    """Fill holes of each volume of (T,X,Y,Z) ``masks``.

    ``plane_axis=None``: 3D holes, i.e. background components (6-connected, within one volume)
    that touch none of the six spatial faces of the field of view. ``plane_axis=a`` (0, 1 or 2,
    a spatial axis): 2D holes of every slice normal to that axis (4-connected in the slice,
    touching none of the slice's four edges). One labelling for all volumes (and slices);
    cheaper than ``binary_fill_holes`` (iterated dilation) on a 4D array.
    """
    s = np.zeros((3, 3, 3, 3), dtype=bool)
    s[1] = ndi.generate_binary_structure(3, 1)
    border_axes = (1, 2, 3)
    if plane_axis is not None:
        # no connection along the slice normal: every slice is labelled on its own
        idx = [1, slice(None), slice(None), slice(None)]
        for off in (0, 2):
            idx[1 + plane_axis] = off
            s[tuple(idx)] = False
        border_axes = tuple(a for a in (1, 2, 3) if a != 1 + plane_axis)
    labels, n = ndi.label(~masks, structure=s)
    if n == 0:
        return masks.copy()
    faces = np.concatenate([
        np.take(labels, i, axis=a).ravel() for a in border_axes for i in (0, -1)
    ])
    outside = np.zeros(n + 1, dtype=bool)
    outside[faces] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def _batched_hist(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, nbins: int):
    """Per-row histograms of (T, N) ``values`` on [lo_t, hi_t] with ``nbins`` bins.

    Values outside [lo_t, hi_t] are ignored. Returns (T, nbins) float64 counts. One
    ``np.bincount`` for all rows, with a trash bin on each side of every row (cheaper than
    boolean selection of the in-range values).
    """
    t = values.shape[0]
    # the 1e-6 keeps values equal to hi in the last bin
    scale = (nbins * (1 - 1e-6) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)
    pos = values - lo.astype(np.float32)[:, None]  # float32: the big (T, N) temporary
    pos *= scale[:, None]
    np.clip(pos, -1, nbins, out=pos)  # -1 -> below lo, nbins -> above hi
    pos += 1
    idx = pos.astype(np.intp)
    idx += (nbins + 2) * np.arange(t, dtype=np.intp)[:, None]
    counts = np.bincount(idx.ravel(), minlength=t * (nbins + 2)).reshape(t, nbins + 2)
    return counts[:, 1:nbins + 1].astype(np.float64)


def _otsu(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, nbins: int = 256) -> np.ndarray:
    """Otsu threshold of each row of (T, N) ``values`` clipped to [lo_t, hi_t]; returns (T,)."""
    clipped = np.clip(values, lo[:, None].astype(values.dtype), hi[:, None].astype(values.dtype))
    hist = _batched_hist(clipped, lo, hi, nbins)
    centers = (np.arange(nbins) + 0.5) / nbins  # in units of the [lo, hi] span
    p = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    w = np.cumsum(p, axis=1)
    mu = np.cumsum(p * centers, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sb = (mu[:, -1:] * w - mu) ** 2 / (w * (1 - w))
    sb = np.nan_to_num(sb, nan=-1.0, posinf=-1.0)
    k = np.argmax(sb, axis=1)
    # threshold at the upper edge of the last bin of the lower class (k < nbins - 1, since
    # w = 1 there gives sb = NaN): strictly below hi when hi > lo
    return lo + (k + 1) / nbins * (hi - lo)


def _valley(flat: np.ndarray, w_lo: np.ndarray, w_hi: np.ndarray, nbins: int = 128,
            sigma: float = 6.0, deepest: bool = False):
    """Valley of the smoothed histogram of each row of (T, N) ``flat`` in the window
    [w_lo_t, w_hi_t] (both (T,), percentiles of the row).

    ``deepest=False``: the lowest bin; ``ok`` is False when the window is empty or the minimum
    sits on the window edge (a monotone histogram: no background/object gap inside).
    ``deepest=True``: the bin with the deepest dip below the smaller of the highest peaks on
    its left and on its right (robust to a sparse bright tail at the window's top); ``ok`` is
    False when that dip is shallower than 20 % of the peak.

    Returns ``(threshold, ok)``, both (T,).
    ``sigma`` (in bins, ~5 % of the window) is wide on purpose: EPI histograms have broad flat
    valleys, and a narrow smoothing makes the argmin jump between volumes of one series.
    """
    hist = _batched_hist(flat, w_lo, w_hi, nbins)
    hist = ndi.gaussian_filter1d(hist, sigma, axis=1, mode="nearest")
    if deepest:
        left = np.maximum.accumulate(hist, axis=1)
        right = np.maximum.accumulate(hist[:, ::-1], axis=1)[:, ::-1]
        peak = np.minimum(left, right)
        k = np.argmax(peak - hist, axis=1)
        rows = np.arange(hist.shape[0])
        ok = (w_hi > w_lo) & (hist[rows, k] < 0.8 * peak[rows, k])
    else:
        k = np.argmin(hist, axis=1)
        ok = (w_hi > w_lo) & (k > 2) & (k < nbins - 3)
    return w_lo + (k + 0.5) / nbins * (w_hi - w_lo), ok


def robust_thresholds(volumes: np.ndarray) -> np.ndarray:
    """Per-volume intensity threshold separating the object (head/brain) from background.

    Parameters
    ----------
    volumes : (T, X, Y, Z) float array, finite.

    Returns
    -------
    (T,) float64 thresholds; the object is ``volume > threshold``.

    The threshold is the minimum of the smoothed intensity histogram between the 20th and 85th
    percentiles (as nilearn's ``compute_epi_mask``; valid when the object fills 15-80 % of the
    field of view, true for EPI, anatomical images and templates). Where that window has no
    interior minimum, the deepest valley of the window 10-95 % is used (small objects, e.g. a b=0
    DWI in a large noisy FOV), then Otsu on intensities clipped to the 0.5-99.5 percentiles (so
    that bright vessels/fat do not drive it). Histograms use at most 2^18 voxels per volume and the
    percentiles at most 2^15 (fixed pseudo-random subsets).
    """
    t = volumes.shape[0]
    flat = _subsample(volumes.reshape(t, -1), _MAX_SAMPLES).astype(np.float32, copy=False)
    # percentiles only bound the search window: a smaller sample is enough (and 10x cheaper
    # than partitioning every voxel of a long series)
    p05, p10, p20, p85, p95, p995 = np.percentile(
        _subsample(flat, _MAX_PCT_SAMPLES), [0.5, 10, 20, 85, 95, 99.5], axis=1
    ).astype(np.float64)

    thr, ok = _valley(flat, p20, p85)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        thr2, ok2 = _valley(flat[bad], p10[bad], p95[bad], deepest=True)
        thr[bad[ok2]] = thr2[ok2]
        ok[bad[ok2]] = True
    if not ok.all():
        bad = np.flatnonzero(~ok)
        thr[bad] = _otsu(flat[bad], p05[bad], np.maximum(p995[bad], p05[bad]), 256)
    return thr


def _subsample(flat: np.ndarray, n: int) -> np.ndarray:
    """Columns of (T, N) ``flat``: all if N <= n, else a fixed pseudo-random subset of n (a
    stride could alias with the voxel grid; a fixed seed keeps results reproducible)."""
    if flat.shape[1] <= n:
        return flat
    idx = np.random.default_rng(0).choice(flat.shape[1], n, replace=False)
    return flat[:, np.sort(idx)]


def _bbox(union: np.ndarray, margin: Sequence[int]) -> Tuple[slice, slice, slice]:
    """Slices of the bounding box of (X,Y,Z) ``union`` grown by ``margin`` voxels (clipped to
    the FOV); empty slices when ``union`` is empty."""
    out = []
    for ax in range(3):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != ax)))
        if hit.size == 0:
            return (slice(0, 0),) * 3
        out.append(slice(max(hit[0] - margin[ax], 0),
                         min(hit[-1] + 1 + margin[ax], union.shape[ax])))
    return tuple(out)


def _clean(fg: np.ndarray, h, opening_radius_mm: float, closing_radius_mm: float) -> np.ndarray:
    """Opening (erosion -> largest component -> dilation), closing and hole filling of the
    (T,X,Y,Z) threshold masks ``fg``; returns (T,X,Y,Z) bool.

    Works inside the bounding box of the union of ``fg`` over volumes, grown by a margin wider
    than the balls: there the margin ring is background in every volume, so erosions, dilations
    and hole filling give exactly the full-FOV result at a fraction of the cost (EPI brains
    fill about half of the FOV box).
    """
    half = np.maximum(
        np.floor(opening_radius_mm / np.asarray(h) + 1e-6),
        np.floor(closing_radius_mm / np.asarray(h) + 1e-6),
    ).astype(int) + 2
    box = (slice(None),) + _bbox(fg.any(axis=0), half)
    out = np.zeros_like(fg)
    fgc = fg[box]
    if fgc.size == 0:
        return out

    # Opening as erosion -> largest component -> dilation: the component is chosen on the
    # eroded "cores", so thin bridges no longer connect brain and non-brain.
    core = _erode(fgc, opening_radius_mm, h, within=fgc)
    lost = ~core.reshape(core.shape[0], -1).any(axis=1)
    core[lost] = fgc[lost]  # object smaller than the ball: do not open that volume
    mask = _largest_component(core)
    if not lost.any():
        mask = _dilate(mask, opening_radius_mm, h, within=fgc)
    elif not lost.all():
        opened = ~lost
        mask[opened] = _dilate(mask[opened], opening_radius_mm, h, within=fgc[opened])

    # Closing (border counts as inside for the erosion, so it never eats the FOV edge), then
    # holes: after the closing more cavities are sealed and get filled.
    dil = _dilate(mask, closing_radius_mm, h)
    mask = _erode(dil, closing_radius_mm, h, within=dil)
    # Holes are filled slice by slice (normal = the axis of the largest voxel size, i.e. the
    # slice axis of anisotropic acquisitions; the last axis on ties). This fills every 3D hole
    # too (a 3D hole is enclosed in each of its slices), and also the dark deep brain of
    # partial-coverage EPI with a strong receive bias, which is open to the FOV edge in 3D but
    # enclosed by cortex in each slice.
    out[box] = _fill_holes(mask, plane_axis=slice_axis(h))
    return out


def brain_mask(
    volumes: np.ndarray,
    voxel_size: Sequence[float],
    *,
    opening_radius_mm: float = OPENING_RADIUS_MM,
    closing_radius_mm: float = CLOSING_RADIUS_MM,
    workers: int | None = None,
) -> np.ndarray:
    """Brain (or head) mask of every volume of a series, without network weights.

    Parameters
    ----------
    volumes : (T, X, Y, Z) array. Non-finite values are treated as the volume minimum.
    voxel_size : (3,) voxel sizes in mm (header zooms; extra entries such as TR are ignored).
    opening_radius_mm, closing_radius_mm : ball radii in mm for the opening (erosion ->
        largest component -> dilation) and the closing.
    workers : threads, each on its own group of volumes (default: torch's thread count;
        ``parallel.run_on_groups``). The masks do not depend on it.

    Returns
    -------
    (T, X, Y, Z) bool masks. Each volume is segmented independently.

    Guarantees: a volume with intensity contrast never gets an empty mask (if the erosion removes
    the whole object, the opening is skipped for that volume and the largest component of the
    threshold mask is used). A volume without contrast (constant) gets an all-True mask when its
    value is > 0, an empty mask otherwise (all-zero volumes).
    """
    vol = np.asarray(volumes)
    if vol.ndim != 4:
        raise ValueError(f"volumes must be (T, X, Y, Z), got shape {vol.shape}")
    h = checked_voxel_size(voxel_size)
    # contiguous (T, X, Y, Z): scipy's filters and the reshapes below are slow/copying on views
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    if not np.isfinite(vol).all():
        vol = vol.copy()
        bad = ~np.isfinite(vol)
        vmin = np.where(bad, np.inf, vol).reshape(vol.shape[0], -1).min(axis=1)
        vmin = np.where(np.isfinite(vmin), vmin, 0.0).astype(np.float32)
        vol[bad] = np.broadcast_to(vmin[:, None, None, None], vol.shape)[bad]

    # volumes are independent: chunks only bound the memory of the int32 label arrays
    per_chunk = max(1, _MAX_CHUNK_VOXELS // max(1, int(np.prod(vol.shape[1:]))))
    out = np.empty(vol.shape, dtype=bool)

    def segment(group: slice) -> None:
        out[group] = _brain_mask_chunk(vol[group], h, opening_radius_mm, closing_radius_mm)

    run_on_groups(segment, vol.shape[0], workers, most=per_chunk)
    return out


def _brain_mask_chunk(vol: np.ndarray, h, opening_radius_mm, closing_radius_mm) -> np.ndarray:
    """:func:`brain_mask` of (T, X, Y, Z) finite float32 ``vol``."""
    flat = vol.reshape(vol.shape[0], -1)
    vmin, vmax = flat.min(axis=1), flat.max(axis=1)
    flat_vol = vmax <= vmin  # (T,) no contrast at all

    thr = robust_thresholds(vol)
    fg = vol > thr[:, None, None, None]  # threshold mask (may hold scalp, noise, ghosts)
    mask = _clean(fg, h, opening_radius_mm, closing_radius_mm)

    # safety nets
    empty = ~mask.reshape(mask.shape[0], -1).any(axis=1)
    redo = empty & fg.reshape(fg.shape[0], -1).any(axis=1)
    mask[redo] = fg[redo]
    if flat_vol.any():
        mask[flat_vol] = (vmax[flat_vol] > 0)[:, None, None, None]
    return mask


def reference_mask(volume: np.ndarray, voxel_size: Sequence[float], **kwargs) -> np.ndarray:
    """Brain mask of one (X, Y, Z) volume; returns (X, Y, Z) bool. See :func:`brain_mask`."""
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be (X, Y, Z), got shape {vol.shape}")
    return brain_mask(vol[None], voxel_size, **kwargs)[0]
