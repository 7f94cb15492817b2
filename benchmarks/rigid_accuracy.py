"""Accuracy of ``unimo.hmc.estimate_head_motion`` against known rigid motion.

Series of 16 volumes are made with ``unimo_bids.unimo.synthetic.simulate_series`` (cubic spline)
from a still image moved by known random rigid motions: three rotation angles and three
translations drawn independently and uniformly in [-m, m] deg / mm per axis, m in
{2, 5, 10, 20, 30}; volume 0 is not moved and is the reference (unless ``--hmc-ref auto``
style references are asked for, see below). Images:

- nilearn's MNI152 template (2 mm), blurred to the acquisition PSF (Gaussian, FWHM = voxel size
  per axis, as tests/test_engine.py ``moved_series``), at 3 mm isotropic and at 3x3x6 mm, with
  Gaussian noise of 1 % and 3 % of the series maximum;
- the real xa30 BOLD: volume 0 of bold/xa30_task-fa_bold.nii.gz moved on its own grid
  (3.4 mm, oblique; real anatomy and noise, simulated motion), plus 1 % noise;
- the real xa30 T1w (anat/xa30_T1w.nii.gz, a contrast the engine was not tuned on), blurred and
  resampled to 3 mm, plus 1 % Gaussian noise, and plus Rician (magnitude) noise at SNR 50
  (``synthetic.add_noise``).

Single-axis capture-range tables follow (one moved volume per cell, so that an aborted
registration loses one cell only; ``--no-capture`` leaves them out).

Each series goes through the pipeline's steps: the reference's brain mask
(``segment.reference_mask``), and for the "image + shape" variant (the pipeline default) the
masks and signed distance maps of every volume, then ``hmc.estimate_head_motion``. The error of
a volume is ``geometry.mean_displacement`` between the estimated and true reference -> volume
transforms over the brain (nilearn's MNI152 brain mask for template series; the engine's mask of
the unmoved volume for the real images). Reported: mean and 95th percentile over the moved
volumes, the worst volume, the failure rate (error > 1 mm), and the wall time of the estimation
per volume (masks and distance maps not included).

``--auto-ref`` adds a table where the reference is the volume chosen by
``reference.select_reference(mode='auto')`` instead of the unmoved volume 0.

Run by hand from the repository root, e.g.::

    UNIMO_TEST_DATA=/work/shared/data python benchmarks/rigid_accuracy.py
    python benchmarks/rigid_accuracy.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DATA_HELP,
    blur_to_psf,
    coarse_grid,
    command_line,
    data_dir,
    machine_line,
    markdown_table,
    mni_brain_points,
    mni_template,
    warm_up,
)

from unimo_bids.unimo.geometry import (  # noqa: E402
    grid_center,
    mean_displacement,
    voxel_sizes,
    world_points,
)
from unimo_bids.unimo.hmc import estimate_head_motion  # noqa: E402
from unimo_bids.unimo.reference import select_reference  # noqa: E402
from unimo_bids.unimo.segment import brain_mask, reference_mask  # noqa: E402
from unimo_bids.unimo.shape import signed_distance  # noqa: E402
from unimo_bids.unimo.synthetic import (  # noqa: E402
    add_noise,
    random_rigid_motions,
    simulate_series,
)

FAIL_MM = 1.0


# --------------------------------------------------------------------------------------------
# images


class Scene:
    """A still image, the grid of the series, and the brain points for the error metric."""

    def __init__(self, name, image, image_affine, shape, grid, points=None):
        self.name, self.image, self.image_affine = name, image, image_affine
        self.shape, self.grid = tuple(shape), np.asarray(grid, dtype=float)
        self.center = grid_center(self.shape, self.grid)
        # the engine's brain mask of the unmoved, noise-free image on the series grid: the
        # yardstick of the masks computed on noisy volumes, and the brain of the real images
        still = simulate_series(image, image_affine, np.eye(4)[None], shape, grid)[..., 0]
        still_mask = reference_mask(still, voxel_sizes(grid))
        self.still_mask_voxels = int(still_mask.sum())
        if points is None:
            points = world_points(shape, grid, still_mask)
        self.points = points

    def series(self, n_volumes, max_motion, noise, seed):
        """(series (X, Y, Z, T) float32, motions (T, 4, 4)); motions[0] = identity.

        noise: a float = Gaussian noise of that fraction of the series maximum (as
        tests/test_engine.py); a ``RicianNoise`` = magnitude noise (synthetic.add_noise)."""
        rng = np.random.default_rng(seed)
        motions = random_rigid_motions(n_volumes, max_motion, max_motion, self.center, rng)
        series = simulate_series(self.image, self.image_affine, motions, self.shape, self.grid)
        if isinstance(noise, RicianNoise):
            series = add_noise(series, noise.snr, rng, rician=True)
        else:
            series = series + noise * series.max() * rng.standard_normal(series.shape)
        return series.astype(np.float32), motions


class RicianNoise(float):
    """Rician (magnitude) noise at this SNR (``synthetic.add_noise``)."""

    @property
    def snr(self):
        return float(self)

    def __str__(self):
        return f"Rician SNR {float(self):g}"


def noise_label(noise):
    return str(noise) if isinstance(noise, RicianNoise) else f"{100 * noise:g} %"


def noise_seed(noise):
    return 5000 + int(noise) if isinstance(noise, RicianNoise) else int(1000 * noise)


def template_scene(voxel_mm, anisotropy):
    data, affine = mni_template()
    shape, grid = coarse_grid(data.shape, affine, voxel_mm, anisotropy)
    spacing = voxel_mm * np.asarray(anisotropy, dtype=float)
    label = "x".join(f"{s:g}" for s in spacing) + " mm"
    return Scene(f"MNI152 template, {label}", blur_to_psf(data, affine, spacing), affine,
                 shape, grid, mni_brain_points())


def bold_scene(root):
    img = nb.load(root / "bold/xa30_task-fa_bold.nii.gz")
    vol0 = np.asarray(img.dataobj[..., 0], dtype=np.float32)
    vol0 = vol0 / np.percentile(vol0, 99.5)
    return Scene("real xa30 BOLD volume 0 (simulated motion)", vol0, img.affine, vol0.shape,
                 img.affine)


def t1w_scene(root, voxel_mm=3.0):
    img = nb.load(root / "anat/xa30_T1w.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data / np.percentile(data, 99.5)
    shape, grid = coarse_grid(data.shape, img.affine, voxel_mm)
    return Scene(f"real xa30 T1w at {voxel_mm:g} mm (simulated motion)",
                 blur_to_psf(data, img.affine, [voxel_mm] * 3), img.affine, shape, grid)


# --------------------------------------------------------------------------------------------
# evaluation


def run_engine(series, affine, ref_index, use_shape, reference=None, info=None):
    """Estimate motion as the pipeline does; returns (transforms, estimation wall s).

    info: optional dict, filled with 'ref_mask_voxels' (the reference's brain mask) and, with
    shape maps, 'mask_ratio' = (min, max) over volumes of each volume's brain mask volume
    relative to the reference's."""
    vs = voxel_sizes(affine)
    if reference is None:
        reference = series[..., ref_index]
    ref_mask = reference_mask(reference, vs)
    if info is not None:
        info["ref_mask_voxels"] = int(ref_mask.sum())
    shapes = ref_shape = None
    if use_shape:
        masks = brain_mask(np.ascontiguousarray(np.moveaxis(series, -1, 0)), vs)
        shapes = np.ascontiguousarray(np.moveaxis(signed_distance(masks, vs), 0, -1))
        ref_shape = signed_distance(ref_mask, vs)
        if info is not None:
            ratio = masks.reshape(len(masks), -1).sum(1) / max(int(ref_mask.sum()), 1)
            info["mask_ratio"] = (float(ratio.min()), float(ratio.max()))
    start = time.perf_counter()
    result = estimate_head_motion(series, affine, reference, ref_mask, shapes, ref_shape)
    return result.transforms, time.perf_counter() - start


def summarise(errors, before, seconds, n_volumes, motions):
    """Row cells: before, mean, p95, max, failures, ms/volume (+ failure details)."""
    fails = np.flatnonzero(errors > FAIL_MM)
    return {
        "before": float(np.mean(before)),
        "mean": float(np.mean(errors)),
        "p95": float(np.percentile(errors, 95)),
        "max": float(np.max(errors)),
        "fails": len(fails),
        "n": len(errors),
        "ms": 1000.0 * seconds / n_volumes,
        "fail_angles": [rotation_angle_deg(motions[i]) for i in fails],
    }


def rotation_angle_deg(matrix):
    cos = np.clip((np.trace(matrix[:3, :3]) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)))


def evaluate(scene, max_motion, noise, n_volumes, seed, variants):
    series, motions = scene.series(n_volumes, max_motion, noise, seed)
    truth = np.linalg.inv(motions) @ motions[0]
    moved = np.arange(1, n_volumes)
    before = mean_displacement(np.repeat(np.eye(4)[None], n_volumes, 0), truth, scene.points)
    rows = {}
    for variant in variants:
        info = {}
        try:
            transforms, seconds = run_engine(series, scene.grid, 0, variant == "image + shape",
                                             info=info)
        except Exception as err:  # noqa: BLE001 - an engine error is a result here
            rows[variant] = crashed(err, before[moved])
        else:
            errors = mean_displacement(transforms, truth, scene.points)[moved]
            rows[variant] = summarise(errors, before[moved], seconds, n_volumes,
                                      motions[moved])
        rows[variant]["mask_ratio"] = info.get("mask_ratio")
        rows[variant]["ref_ratio"] = info.get("ref_mask_voxels", 0) / scene.still_mask_voxels
    return rows


def crashed(err, before):
    """A row for a series on which estimate_head_motion raised."""
    return {"before": float(np.mean(before)), "error": f"{type(err).__name__}: {err}",
            "n": len(before), "fails": len(before), "fail_angles": []}


def evaluate_auto(scene, max_motion, noise, n_volumes, seed):
    """Reference = unmoved volume 0 versus the 'auto' reference (both with shape maps).
    Every volume except 0 is moved; for reference k the truth is inv(M_t) @ M_k and the
    brain points are those of the unmoved frame carried into reference k's frame."""
    series, motions = scene.series(n_volumes, max_motion, noise, seed)
    out = {}
    start = time.perf_counter()
    reference, k = select_reference(series, scene.grid, "auto")
    select_s = time.perf_counter() - start
    for label, index in (("first (unmoved volume 0)", 0), (f"auto (volume {k})", k)):
        truth = np.linalg.inv(motions) @ motions[index]
        to_ref = np.linalg.inv(motions[index])
        points = scene.points @ to_ref[:3, :3].T + to_ref[:3, 3]
        others = np.setdiff1d(np.arange(n_volumes), [index])
        try:
            transforms, seconds = run_engine(series, scene.grid, index, True)
        except Exception as err:  # noqa: BLE001 - an engine error is a result here
            out[label] = crashed(err, np.zeros(len(others)))
            continue
        errors = mean_displacement(transforms, truth, points)[others]
        before = mean_displacement(np.repeat(np.eye(4)[None], n_volumes, 0), truth,
                                   points)[others]
        out[label] = summarise(errors, before, seconds, n_volumes, motions[others])
    return out, select_s


def patch_solve(floor):
    """Diagnostic: torch.linalg.solve(A, b) -> solve(A + floor * I, b) for 6x6 systems."""
    solve = torch.linalg.solve

    def damped(matrix, rhs, *args, **kwargs):
        if matrix.shape[-1] == 6:
            matrix = matrix + floor * torch.eye(6, dtype=matrix.dtype, device=matrix.device)
        return solve(matrix, rhs, *args, **kwargs)

    torch.linalg.solve = damped


AXES = ("x", "y", "z")


def capture_table(scene, magnitudes):
    """Single-axis motions of growing size, one 2-volume series each (unmoved + moved), so that
    an aborted registration loses only its own cell. Cells: error (mm) with image + shape /
    with image only; 'ABORT' when estimate_head_motion raised, with the moved volume's brain
    mask volume relative to the reference's. Returns markdown."""
    from unimo_bids.unimo.geometry import rigid_matrix

    rows = []
    for kind in ("rotation", "translation"):
        for axis, name in enumerate(AXES):
            cells = []
            for mag in magnitudes:
                vector = np.zeros(3)
                vector[axis] = mag
                rot, trans = (vector, np.zeros(3)) if kind == "rotation" else (np.zeros(3),
                                                                              vector)
                motions = np.stack([np.eye(4), rigid_matrix(rot, trans, scene.center)])
                series = simulate_series(scene.image, scene.image_affine, motions, scene.shape,
                                         scene.grid)
                rng = np.random.default_rng(int(mag * 10) + axis)
                series = (series + 0.01 * series.max()
                          * rng.standard_normal(series.shape)).astype(np.float32)
                truth = np.linalg.inv(motions)
                parts = []
                for use_shape in (True, False):
                    info = {}
                    try:
                        transforms, _ = run_engine(series, scene.grid, 0, use_shape, info=info)
                    except Exception:  # noqa: BLE001 - an engine error is a result here
                        ref = info.get("ref_mask_voxels", 0) / scene.still_mask_voxels
                        parts.append(f"ABORT (ref mask {ref:.2f})")
                        continue
                    error = mean_displacement(transforms, truth, scene.points)[1]
                    parts.append(f"{error:.2f}" if error < 100 else f"{error:.0f}")
                cells.append(" / ".join(parts))
            unit = "deg" if kind == "rotation" else "mm"
            prep = "about" if kind == "rotation" else "along"
            rows.append([f"{kind} {prep} {name} ({unit})"] + cells)
    return markdown_table(["single-axis motion"] + [f"{m:g}" for m in magnitudes], rows)


def row_cells(r):
    if "error" in r:
        return [f"{r['before']:.1f}", "-", "-", "-",
                f"series aborted ({r['error'].split(':')[0]})", "-"]
    return [f"{r['before']:.1f}", f"{r['mean']:.3f}", f"{r['p95']:.3f}", f"{r['max']:.2f}",
            f"{r['fails']}/{r['n']} ({100.0 * r['fails'] / r['n']:.0f} %)", f"{r['ms']:.0f}"]


HEADERS = ["error before (mm)", "mean error (mm)", "p95 error (mm)", "worst (mm)",
           "failures (> 1 mm)", "estimation ms / volume"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + DATA_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 mm template and the real BOLD at 5 and 20 deg/mm, 1 %% noise, "
                             "8 volumes (< 2 min)")
    parser.add_argument("--volumes", type=int, default=None, help="volumes per series (16)")
    parser.add_argument("--motions", type=float, nargs="+", default=None,
                        help="max rotation (deg) = max translation (mm) per axis "
                             "(default 2 5 10 20 30)")
    parser.add_argument("--auto-ref", action="store_true",
                        help="also compare the unmoved volume 0 with select_reference('auto') "
                             "as the reference (3 mm template, 1 %% noise, 5 and 20 deg/mm)")
    parser.add_argument("--no-capture", dest="capture", action="store_false",
                        help="leave out the single-axis capture-range tables")
    parser.add_argument("--damping-floor", type=float, default=0.0,
                        help="DIAGNOSTIC, changes the engine at run time: add this times the "
                             "identity to every 6x6 Gauss-Newton system (torch.linalg.solve), "
                             "so that a volume with no overlap no longer aborts the series "
                             "(default 0 = the engine as shipped)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.damping_floor > 0:
        patch_solve(args.damping_floor)
    n_volumes = args.volumes or (8 if args.quick else 16)
    magnitudes = args.motions or ([5.0, 20.0] if args.quick else [2.0, 5.0, 10.0, 20.0, 30.0])
    variants = ("image", "image + shape")
    root = data_dir()

    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_line()}\n")
    warm_up()
    print(f"{n_volumes} volumes per series (volume 0 unmoved = reference, {n_volumes - 1} "
          f"moved volumes scored); motion drawn uniformly in [-m, m] deg and mm per axis.\n")

    plans = [(template_scene(3.0, (1, 1, 1)), (0.01,) if args.quick else (0.01, 0.03),
              magnitudes)]
    if not args.quick:
        plans.append((template_scene(3.0, (1, 1, 2)), (0.01, 0.03), magnitudes))
    plans.append((bold_scene(root), (0.01,), magnitudes))
    if not args.quick:
        plans.append((t1w_scene(root), (0.01, RicianNoise(50.0)), magnitudes))

    failure_notes = []
    for scene, noises, mags in plans:
        rows = []
        shape = "x".join(str(s) for s in scene.shape)
        for noise in noises:
            for mag in mags:
                seed = args.seed + int(100 * mag) + noise_seed(noise)
                result = evaluate(scene, mag, noise, n_volumes, seed, variants)
                for variant in variants:
                    r = result[variant]
                    ratio = r.get("mask_ratio")
                    rows.append([f"{mag:g}", noise_label(noise), variant] + row_cells(r)
                                + [f"{r['ref_ratio']:.2f}",
                                   "-" if ratio is None else f"{ratio[0]:.2f}-{ratio[1]:.2f}"])
                    if "error" in r:
                        failure_notes.append(f"{scene.name}, m = {mag:g}, noise "
                                             f"{noise_label(noise)}, {variant}: "
                                             f"estimate_head_motion raised {r['error']}")
                    elif r["fails"]:
                        angles = ", ".join(f"{a:.0f}" for a in sorted(r["fail_angles"]))
                        failure_notes.append(f"{scene.name}, m = {mag:g}, noise "
                                             f"{noise_label(noise)}, {variant}: failed volumes' "
                                             f"true rotation angles (deg) {angles}")
        print(f"**{scene.name}**, grid {shape}\n")
        print(markdown_table(["m (deg / mm)", "noise", "channels"] + HEADERS
                             + ["reference mask / noise-free mask",
                                "volume masks / reference mask (min-max)"], rows) + "\n",
              flush=True)
    if failure_notes:
        print("Failures:\n")
        print("\n".join(f"- {note}" for note in failure_notes) + "\n")

    if args.capture:
        capture_mags = [10.0, 20.0] if args.quick else [5.0, 10.0, 15.0, 20.0, 30.0, 45.0]
        for scene, _, _ in plans:
            if "3x3x6" in scene.name:
                continue
            print(f"**Capture range**, {scene.name}: error (mm) of one volume moved about or "
                  "along one axis (RAS, about the grid centre), 1 % noise; each cell: "
                  "image + shape / image only; ABORT = estimate_head_motion raised (ref mask = "
                  "volume of the reference's brain mask / that of the noise-free image)\n")
            print(capture_table(scene, capture_mags) + "\n", flush=True)

    if args.auto_ref:
        scene = plans[0][0]
        rows = []
        for mag in ([5.0, 20.0] if not args.motions else magnitudes):
            seed = args.seed + 7 + int(100 * mag)
            result, select_s = evaluate_auto(scene, mag, 0.01, n_volumes, seed)
            for label, r in result.items():
                rows.append([f"{mag:g}", label] + row_cells(r) + [f"{select_s:.1f}"])
        print(f"**Reference choice**, {scene.name}, 1 % noise, image + shape\n")
        print(markdown_table(["m (deg / mm)", "reference"] + HEADERS
                             + ["select_reference s"], rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
