"""Deformable benchmark: rigid motion plus smooth deformations of real volumes (issue 6).

For each real volume (a reference R with its classical brain mask), ``--volumes`` moved copies are
simulated: volume t shows the anatomy of R deformed by a random band-limited diffeomorphism phi_t
(``epdiff.random_velocity``, the geometric deformation augmenter, largest displacement
``--max-mm`` on the volume's own grid) and then moved rigidly by T_t (a rotation uniform in
[0, 4] deg about a random axis and translations in [-3, 3] mm), so that the anatomy at p in R
is at q = T_t(phi_t(p)) in volume t; 1 % Gaussian noise of the maximum is added. R itself is
volume 0.

Methods:

- ``rigid``: the app's rigid step (``hmc.estimate_head_motion`` with the packaged network and
  test-time refinement), then one resampling.
- ``rigid+optimised``: the same rigid transforms, then ``deform.estimate_deformation``
  (band-limited EPDiff, test-time optimisation from zero) and one composed resampling, as
  ``--deformable``.
- ``rigid+predicted``: the packaged velocity predictor's estimate alone (no optimisation), from
  the volumes and their classical brain masks (``segment.brain_mask``), as the app gives it.
- ``rigid+predicted+optimised``: the optimisation started from the prediction, as
  ``--deformable --deform-predictor``.

Scores inside the reference mask, mean over the moved volumes: the displacement error (mm)
between where the method reads each reference point and where its anatomy truly is (T_t(phi_t(p))
against T_est(p + u_est(p))); intensity RMSE of the corrected volume against R (in % of R's
median in the mask) and its correlation with R; the smallest Jacobian determinant; seconds per
volume of each step.

Run from the repository root::

    python benchmarks/deformable.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, command_line, machine_line, markdown_table, warm_up, \
    write_section  # noqa: E402

from unimo_bids.unimo import epdiff  # noqa: E402
from unimo_bids.unimo.deform import SIGMA, estimate_deformation, field_on_grid  # noqa: E402
from unimo_bids.unimo.deform_net import load_predictor, predict_from_masks  # noqa: E402
from unimo_bids.unimo.geometry import grid_center, rigid_matrix, voxel_sizes  # noqa: E402
from unimo_bids.unimo.hmc import apply_head_motion, estimate_head_motion  # noqa: E402
from unimo_bids.unimo.network import load_network  # noqa: E402
from unimo_bids.unimo.segment import brain_mask, reference_mask  # noqa: E402

SECTION = "## 11. Deformable correction (`deformable.py`)"
CASES = {
    "bold": ("bold/xa30_task-fa_bold.nii.gz", "real BOLD, volume 0 (64x64x33, 3.4 mm, oblique)"),
    "t1w": ("anat/xa30_T1w.nii.gz", "real T1w MPRAGE (96x128x128, 2 mm)"),
    "dwi": ("dwi/ds000114_sub-01_ses-test_desc-trunc_dwi.nii.gz",
            "real DWI b=0 volume (64x64x36, 4 mm)"),
}
HEADERS = ["volume", "method", "displacement error mm (mean / worst)", "RMSE %", "correlation",
           "min Jacobian", "s / volume"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--volumes", type=int, default=6, help="moved volumes per case")
    parser.add_argument("--max-mm", type=float, default=4.0, help="largest deformation, mm")
    parser.add_argument("--iterations", type=int, default=epdiff.DEFAULT_ITERATIONS)
    parser.add_argument("--sigma", type=float, default=SIGMA,
                        help="weight of the regulariser")
    parser.add_argument("--predictor", type=Path, default=None,
                        help="velocity predictor (default: the packaged one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="markdown file to update (section 11)")
    return parser.parse_args(argv)


def load_reference(data: Path, case: str):
    img = nb.load(data / CASES[case][0])
    volume = np.asarray(img.dataobj, dtype=np.float32)
    if volume.ndim == 4:
        volume = volume[..., 0]
    return volume, img.affine, reference_mask(volume, tuple(voxel_sizes(img.affine)))


def simulate(reference, affine, n_volumes, max_mm, rng, generator):
    """(series (X, Y, Z, 1 + n), true rigid (1 + n, 4, 4), true forward fields (1 + n, 3, X, Y, Z)
    world mm on the reference grid)."""
    shape = reference.shape
    spacing = tuple(voxel_sizes(affine))
    velocity = epdiff.random_velocity(n_volumes, shape, spacing, max_mm, generator=generator,
                                      dtype=torch.float64)
    shot = epdiff.shoot_maps(velocity, shape, spacing)
    warped = epdiff.warp(torch.as_tensor(reference, dtype=torch.float64)[None, None],
                         shot.pullback, spacing)[:, 0].numpy()
    directions = affine[:3, :3] / np.asarray(spacing)
    forward = np.einsum("ij,bj...->bi...", directions, shot.forward.numpy())
    center = grid_center(shape, affine)
    rigid = [np.eye(4)]
    volumes = [reference]
    for t in range(n_volumes):
        axis = rng.standard_normal(3)
        angles = np.degrees(axis / np.linalg.norm(axis) * np.radians(rng.uniform(0, 4)))
        motion = rigid_matrix(tuple(angles), tuple(rng.uniform(-3, 3, 3)), center)
        rigid.append(motion)
        volumes.append(apply_head_motion(warped[t][..., None].astype(np.float32), affine,
                                         np.linalg.inv(motion)[None])[..., 0])
    series = np.stack(volumes, -1)
    series += 0.01 * series.max() * rng.standard_normal(series.shape).astype(np.float32)
    fields = np.concatenate([np.zeros((1, 3, *shape)), forward])
    return series, np.stack(rigid), fields


def reference_points(mask, affine):
    index = np.argwhere(mask)
    return index, index @ affine[:3, :3].T + affine[:3, 3]


def map_error(points, index, true_rigid, true_fields, rigid, fields=None):
    """Mean and max over the points of |T(p + f(p)) - T_est(p + u(p))| for one volume (mm)."""
    truth = points + true_fields[:, index[:, 0], index[:, 1], index[:, 2]].T
    truth = truth @ true_rigid[:3, :3].T + true_rigid[:3, 3]
    moved = points if fields is None else points + fields[:, index[:, 0], index[:, 1],
                                                          index[:, 2]].T
    estimate = moved @ rigid[:3, :3].T + rigid[:3, 3]
    error = np.linalg.norm(truth - estimate, axis=1)
    return error.mean(), error.max()


def image_scores(corrected, reference, mask):
    ref = reference[mask]
    out = corrected[mask]
    rmse = 100 * np.sqrt(np.mean((out - ref) ** 2)) / np.median(ref)
    a, b = out - out.mean(), ref - ref.mean()
    return rmse, float(a @ b / np.sqrt((a @ a) * (b @ b)))


def score(case, method, series, affine, reference, mask, true_rigid, true_fields, transforms,
          deformation, seconds):
    """One table row: errors and image scores over the moved volumes (1..n)."""
    index, points = reference_points(mask, affine)
    if deformation is None:
        fields = None
        image = apply_head_motion(series, affine, transforms)
    else:
        fields = field_on_grid(torch.as_tensor(deformation.displacement),
                               deformation.grid_affine, reference.shape, affine).numpy()
        image = apply_head_motion(series, affine, transforms, fields=deformation.displacement,
                                  field_affine=deformation.grid_affine)
    errors, rmses, nccs = [], [], []
    for t in range(1, series.shape[-1]):
        errors.append(map_error(points, index, true_rigid[t], true_fields[t], transforms[t],
                                None if fields is None else fields[t]))
        rmse, ncc = image_scores(image[..., t], reference, mask)
        rmses.append(rmse)
        nccs.append(ncc)
    errors = np.array(errors)
    jacobian = "1" if deformation is None else f"{deformation.min_jacobian[1:].min():.2f}"
    return [case, method, f"{errors[:, 0].mean():.2f} / {errors[:, 1].max():.2f}",
            f"{np.mean(rmses):.2f}", f"{np.mean(nccs):.4f}", jacobian, seconds]


def evaluate(case, args, network):
    reference, affine, mask = load_reference(args.data, case)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    series, true_rigid, true_fields = simulate(reference, affine, args.volumes, args.max_mm, rng,
                                               generator)
    n = series.shape[-1]

    start = time.perf_counter()
    motion = estimate_head_motion(series, affine, reference, mask, network=network)
    rigid_seconds = (time.perf_counter() - start) / n
    masks = np.moveaxis(brain_mask(np.moveaxis(series, -1, 0), tuple(voxel_sizes(affine))), 0, -1)
    predictor = functools.partial(predict_from_masks, load_predictor(args.predictor))
    runs = {"rigid+optimised": {"iterations": args.iterations},
            "rigid+predicted": {"iterations": 0, "predictor": predictor, "masks": masks},
            "rigid+predicted+optimised": {"iterations": args.iterations, "predictor": predictor,
                                          "masks": masks}}
    rows = [score(case, "rigid", series, affine, reference, mask, true_rigid, true_fields,
                  motion.transforms, None, f"{rigid_seconds:.2f}")]
    for method, options in runs.items():
        start = time.perf_counter()
        deformation = estimate_deformation(series, affine, reference, mask, motion.transforms,
                                           sigma=args.sigma, **options)
        seconds = (time.perf_counter() - start) / n
        rows.append(score(case, method, series, affine, reference, mask, true_rigid,
                          true_fields, motion.transforms, deformation,
                          f"{rigid_seconds:.2f} + {seconds:.2f}"))
    truth = np.linalg.norm(true_fields[1:], axis=1)[:, mask]
    note = (f"- {case}: {CASES[case][1]}; true deformation {truth.mean():.2f} mm mean, "
            f"{truth.max():.2f} mm largest inside the mask")
    return rows, note


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warm_up()
    network = load_network(None, "cpu")
    rows, notes = [], []
    for case in args.cases:
        case_rows, note = evaluate(case, args, network)
        rows += case_rows
        notes.append(note)
        print(markdown_table(HEADERS, case_rows), flush=True)
    text = "\n".join([
        SECTION, "", f"Command: `{command_line(sys.executable)}`", "",
        f"Machine: {machine_line()}; {args.threads} threads", "",
        f"Each case: the volume and {args.volumes} copies, each deformed (largest displacement "
        f"{args.max_mm:g} mm) and moved rigidly (<= 4 deg, <= 3 mm per axis), seed {args.seed}; "
        f"{args.iterations} optimisation steps per volume, regulariser weight {args.sigma:g}:",
        "", *notes, "",
        markdown_table(HEADERS, rows), ""])
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
