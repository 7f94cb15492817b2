"""Head-motion accuracy and speed: unimo against antspyx and SimpleITK on known motion.

Every method runs in one process on the same series, with 2 threads (torch, ITK). A series is
made from a real volume of the shared data folder (``--data``, default $UNIMO_TEST_DATA, else
``../shared/data`` next to the repository) moved by known rigid motion: volume 0 is unmoved and
is the reference; each other volume is scored by ``geometry.mean_displacement`` between the
estimated and the true reference -> volume transforms (RAS world, the engine's convention) over
the brain of the reference. Reported per regime and method: mean and worst of these errors,
failures (error > 5 mm), and wall seconds per volume over all volumes, the reference included.

Regimes (motions drawn with ``--seed``; 1 % Gaussian noise of the series maximum added to every
volume):

- small: the real BOLD ``bold/xa30_task-fa_bold.nii.gz``, volume 0 moved on its own grid
  (64x64x33, 3.4 mm, oblique); three angles uniform in [-5, 5] deg and three translations
  uniform in [-10, 10] mm per volume, about the grid centre (``synthetic.random_rigid_motions``).
  Error points: the engine's mask of the unmoved, noise-free volume.
- large: the same with [-20, 20] deg and [-30, 30] mm (the UniMo paper's levels). The 3.4 mm slab
  is 112 mm thick, so brain leaves the field of view at these angles, as it would in a scan.
- any rotation: the real T1w ``anat/xa30_T1w.nii.gz`` (2 mm) blurred to a 4 mm Gaussian PSF
  and sampled onto a cubic 4 mm RAS grid of 60^3 (240 mm) centred on its brain; rotations
  uniform on SO(3) (``roma.random_rotmat``, seeded) about that centre, translations uniform in
  [-10, 10] mm per axis. Error points: the engine's mask of the unmoved, noise-free image (on a
  T1w it takes in some scalp).
- fetal-like: the real fetal HASTE stack ``fetal/sub-01_run-1_T2w.nii.gz`` (``--fetal-run 2``:
  run-2, which the packaged segmenter's training held out; 1.125x1.125x3.3 mm)
  and its manual brain mask, on a 2.5 mm RAS grid of 64^3 centred on the brain. Volume t =
  w_t * brain_t + (1 - w_t) * surroundings, where brain_t is the stack moved by the volume's
  motion (rotation angle uniform in [0, 45] deg about a uniformly random axis through the brain
  centroid, translations uniform in [-10, 10] mm per axis), w_t is the manual mask moved the same
  way (linear interpolation), and the surroundings are the unmoved stack with its brain replaced
  by the median intensity of a 5 mm shell around it (so that no second, unmoved brain is left
  behind). The mother's tissue and the slab's edges stay still. Error points: the manual mask.
  With ``--manual-fetal-mask`` every method gets the manual mask as the reference mask, and
  unimo's shape maps come from the manual mask moved with each volume (an oracle segmentation:
  what issue 4's fetal segmentation must approach).

With ``--moved-reference`` the small and large regimes move volume 0 too (under 2 deg and 1.7 mm
per axis): in the default series the reference is the volume as acquired and only the others
are resampled, which smooths them a little; real volumes are all as acquired. ``--finest
SPACING SMOOTHING`` swaps the refinement's finest level (the sweep behind ``hmc.py``'s choice);
``--level-tolerances C M F`` its stopping tolerances per level (``hmc.LEVEL_TOLERANCES_MM``).

Each moved image comes from the still one by a single cubic spline interpolation
(``synthetic.simulate_series``): volume t shows the image at ``motions[t] @ x`` for a grid point
x, so the true transform is ``inv(motions[t]) @ motions[0]``.

Methods:

- ``unimo``: as the app runs it: the brain mask of every volume and of the reference
  (``segment.brain_mask`` / ``segment.reference_mask``, as the Segment interface), their signed
  distance maps (``shape.signed_distance``, as ShapeMap), then ``hmc.estimate_head_motion`` with
  the network (``network.load_network``) and test-time refinement. Timed: masks + distance maps
  + estimation (the network is loaded once, untimed).
- ``unimo-no-refine``: the same, ``refine=False`` (the network alone).
- ``unimo-no-network``: the same, ``network=None`` (classical refinement from the identity).
- ``unimo-tracked``: the moving-anatomy mode (``tracking.track_moving_anatomy``): registration
  inside the reference mask shrunk by 2.5 mm, the mask tracked through the series and checked
  against each volume's mask. As the app's ``--moving-anatomy`` (``--seg-model auto``), the
  reference's and every volume's masks come from the packaged segmenter
  (``segnet.segment_with_model``, timed; loaded once, untimed); ``--seg-model classical`` gives
  the classical masks, ``--manual-fetal-mask`` the manual ones.
- ``ants``: antspyx ``ants.motion_correction(series, fixed=volume 0,
  type_of_transform='BOLDRigid')`` (Mattes MI, centre-of-mass start, 2 levels, no mask unless
  ``--manual-fetal-mask``); timed as a whole, which includes antspyx's resampling of every volume
  and its transform files. Its ITK transforms (fixed LPS point -> moving LPS point) are turned
  into RAS with ``compare_ants.ants_matrix_ras``.
- ``sitk``: SimpleITK per volume: Euler3DTransform started by CenteredTransformInitializer
  (GEOMETRY), Mattes MI (32 bins, every voxel), regular-step gradient descent with scales from
  physical shifts, shrink 4/2/1 with smoothing 2/1/0 voxels, the reference's brain mask as the
  fixed mask (the engine's ``reference_mask``, timed). Its transform is converted like ANTs'.

Before the table, the LPS -> RAS conversion of ANTs and SimpleITK is checked on the real BOLD
moved by a known pure translation; the script stops if it does not come back within 0.5 mm.

antspyx pins numpy < 2.4, so it lives in a virtual environment that sees the project's packages
(see benchmarks/compare_ants.py). Full run, from the repository root (3 min on 2 cores,
measured 2026-11-21)::

    nice -n 10 /tmp/ants-venv/bin/python benchmarks/hmc_accuracy.py
    /tmp/ants-venv/bin/python benchmarks/hmc_accuracy.py --quick --weights my_weights.pt
    /tmp/ants-venv/bin/python benchmarks/hmc_accuracy.py --repeats 3   # s / volume: best of 3
    /tmp/ants-venv/bin/python benchmarks/hmc_accuracy.py --device cuda --methods unimo \\
        unimo-no-refine
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import nibabel as nb
import numpy as np
import roma
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATA,
    blur_to_psf,
    command_line,
    lps_frame,
    lps_point_map_to_ras,
    machine_line,
    markdown_table,
    warm_up,
    write_section,
)
from compare_ants import ants_matrix_ras, to_ants  # noqa: E402
from rigid_accuracy import bold_scene  # noqa: E402

from unimo_bids.cli.run import seg_model_path  # noqa: E402
from unimo_bids.unimo.geometry import (  # noqa: E402
    mean_displacement,
    rigid_matrix,
    voxel_sizes,
    world_points,
)
from unimo_bids.unimo.hmc import estimate_head_motion  # noqa: E402
from unimo_bids.unimo.network import load_network  # noqa: E402
from unimo_bids.unimo.segment import brain_mask, reference_mask  # noqa: E402
from unimo_bids.unimo.segnet import load_segmenter, segment_with_model  # noqa: E402
from unimo_bids.unimo.shape import signed_distance  # noqa: E402
from unimo_bids.unimo.synthetic import random_rigid_motions, simulate_series  # noqa: E402
from unimo_bids.unimo.tracking import track_moving_anatomy  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAIL_MM = 5.0
NOISE = 0.01
CHECK_TOLERANCE_MM = 0.5
SECTION = "## Head-motion accuracy against antspyx and SimpleITK"


# --------------------------------------------------------------------------------------------
# known-motion series


@dataclass
class Case:
    """A series with known motion; volume 0 is unmoved and is the reference."""

    series: np.ndarray  # (X, Y, Z, T) float32
    affine: np.ndarray  # grid of the series (RAS)
    truth: np.ndarray  # (T, 4, 4) true reference -> volume transforms
    points: np.ndarray  # (N, 3) world points of the reference's brain: the error's support
    manual_mask: np.ndarray | None = None  # the reference's manual brain mask, if there is one
    manual_masks: np.ndarray | None = None  # (X, Y, Z, T) the manual mask moved with each volume
    description: str = ""


def with_noise(series, rng, level=NOISE):
    noisy = series + level * series.max() * rng.standard_normal(series.shape)
    return noisy.astype(np.float32)


def truth_of(motions):
    """simulate_series shows the image at motions[t] @ x: reference -> volume transforms."""
    return np.linalg.inv(motions) @ motions[0]


def rigid_about(rotation, translation, center):
    """(4, 4) x -> R (x - c) + c + t."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = center + translation - rotation @ center
    return matrix


def cubic_grid(center, size, spacing_mm):
    """(shape, affine) of a RAS grid of size^3 voxels centred on a world point."""
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = np.asarray(center) - spacing_mm * (size - 1) / 2.0
    return (size,) * 3, affine


def load_scaled(path):
    """(data float32 scaled to its 99.5th percentile, image)."""
    img = nb.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data / np.percentile(data, 99.5), img


def bold_case(root, n_volumes, rng, max_deg, max_mm, moved_reference=False):
    """moved_reference: volume 0 (the reference) is moved too, by a random rotation under 2 deg
    per axis and a translation under half a voxel (1.7 mm) per axis, so that it is resampled
    like every other volume rather than left as acquired."""
    scene = bold_scene(root)
    motions = random_rigid_motions(n_volumes, max_deg, max_mm, scene.center, rng)
    if moved_reference:
        motions[0] = rigid_matrix(rng.uniform(-2, 2, 3), rng.uniform(-1.7, 1.7, 3), scene.center)
    series = simulate_series(scene.image, scene.image_affine, motions, scene.shape, scene.grid)
    return Case(with_noise(series, rng), scene.grid, truth_of(motions), scene.points,
                description=f"real xa30 BOLD volume 0 on its grid "
                            f"({'x'.join(map(str, scene.shape))}, 3.4 mm), "
                            f"+-{max_deg:g} deg, +-{max_mm:g} mm per axis"
                            + (", the reference moved too" if moved_reference else ""))


def small_case(root, n_volumes, rng, **options):
    return bold_case(root, n_volumes, rng, 5.0, 10.0, **options)


def large_case(root, n_volumes, rng, **options):
    return bold_case(root, n_volumes, rng, 20.0, 30.0, **options)


def edit_refinement_levels(edit):
    """Replace hmc's refinement levels (with and without the shape channel) by ``edit(levels)``
    (benchmark only)."""
    from unimo_bids.unimo import hmc

    for name in ("IMAGE_SHAPE_LEVELS", "IMAGE_LEVELS"):
        setattr(hmc, name, edit(getattr(hmc, name)))


def set_finest_level(spacing_factor, smoothing):
    """Replace the refinement's finest level (the sweep behind hmc.py's FINEST_SPACING and
    FINEST_SMOOTHING)."""
    edit_refinement_levels(lambda levels: levels[:-1] + (replace(
        levels[-1], spacing_factor=spacing_factor, smoothing=smoothing, min_points=0),))


def set_level_tolerances(tolerances):
    """Replace the refinement's per-level stopping tolerances (mm), coarse to fine (the
    comparison behind hmc.py's LEVEL_TOLERANCES_MM)."""
    edit_refinement_levels(lambda levels: tuple(
        replace(level, tolerance=tolerance) for level, tolerance in zip(levels, tolerances)))


def any_rotation_case(root, n_volumes, rng, voxel_mm=4.0, size=60, max_mm=10.0):
    data, img = load_scaled(root / "anat/xa30_T1w.nii.gz")
    brain = reference_mask(data, voxel_sizes(img.affine))
    center = world_points(data.shape, img.affine, brain).mean(0)
    shape, grid = cubic_grid(center, size, voxel_mm)
    image = blur_to_psf(data, img.affine, [voxel_mm] * 3)

    seed = int(rng.integers(2 ** 31))  # roma draws from torch: seed it from this regime's rng
    rotations = roma.random_rotmat(n_volumes, generator=torch.Generator().manual_seed(seed))
    motions = np.stack([rigid_about(rot, rng.uniform(-max_mm, max_mm, 3), center)
                        for rot in rotations.double().numpy()])
    motions[0] = np.eye(4)
    still = simulate_series(image, img.affine, np.eye(4)[None], shape, grid)[..., 0]
    points = world_points(shape, grid, reference_mask(still, [voxel_mm] * 3))
    series = simulate_series(image, img.affine, motions, shape, grid)
    return Case(with_noise(series, rng), grid, truth_of(motions), points,
                description=f"real xa30 T1w, {voxel_mm:g} mm PSF and grid ({size}^3), "
                            f"rotation uniform on SO(3), +-{max_mm:g} mm per axis")


def random_axis_motions(n_volumes, max_deg, max_mm, center, rng):
    """Rotation angle uniform in [0, max_deg] about a uniformly random axis through center,
    translations uniform in [-max_mm, max_mm] per axis; motions[0] = identity."""
    motions = np.tile(np.eye(4), (n_volumes, 1, 1))
    for t in range(1, n_volumes):
        axis = rng.standard_normal(3)
        angle = np.deg2rad(rng.uniform(0.0, max_deg))
        rotation = Rotation.from_rotvec(angle * axis / np.linalg.norm(axis)).as_matrix()
        motions[t] = rigid_about(rotation, rng.uniform(-max_mm, max_mm, 3), center)
    return motions


def fetal_case(root, n_volumes, rng, voxel_mm=2.5, size=64, max_deg=45.0, max_mm=10.0,
               run=1):
    data, img = load_scaled(root / f"fetal/sub-01_run-{run}_T2w.nii.gz")
    manual = np.asarray(nb.load(root / f"fetal/sub-01_run-{run}_T2w_desc-brain_mask.nii.gz")
                        .dataobj) > 0
    center = world_points(manual.shape, img.affine, manual).mean(0)
    shape, grid = cubic_grid(center, size, voxel_mm)
    image = blur_to_psf(data, img.affine, [voxel_mm] * 3)
    motions = random_axis_motions(n_volumes, max_deg, max_mm, center, rng)

    brain = simulate_series(image, img.affine, motions, shape, grid)
    weight = np.clip(simulate_series(manual.astype(np.float32), img.affine, motions, shape,
                                     grid, order=1), 0.0, 1.0)
    still_mask = weight[..., 0] > 0.5
    surroundings = without_brain(brain[..., 0], weight[..., 0], still_mask, voxel_mm)
    series = weight * brain + (1.0 - weight) * surroundings[..., None]
    return Case(with_noise(series, rng), grid, truth_of(motions),
                world_points(shape, grid, still_mask), manual_mask=still_mask,
                manual_masks=weight > 0.5,
                description=f"real fetal HASTE stack run-{run}, {voxel_mm:g} mm grid ({size}^3), brain "
                            f"moved inside still surroundings, 0-{max_deg:g} deg about random "
                            f"axes, +-{max_mm:g} mm per axis")


def without_brain(still, weight, mask, voxel_mm, shell_mm=5.0):
    """The still image with its brain replaced by the median of a shell around it."""
    outside = ndimage.distance_transform_edt(~mask, sampling=voxel_mm)
    fill = np.median(still[(outside > 0) & (outside <= shell_mm)])
    return (1.0 - weight) * still + weight * fill


REGIMES = {
    "small": small_case,
    "large": large_case,
    "any-rotation": any_rotation_case,
    "fetal": fetal_case,
}


# --------------------------------------------------------------------------------------------
# methods; each returns (T, 4, 4) RAS reference -> volume transforms for a Case


def reference_mask_of(case, use_manual):
    if use_manual and case.manual_mask is not None:
        return case.manual_mask
    return reference_mask(case.series[..., 0], voxel_sizes(case.affine))


def run_unimo(case, network, refine, device, use_manual):
    """The app's steps: masks and signed distance maps of every volume, then the engine."""
    sizes = voxel_sizes(case.affine)
    reference = case.series[..., 0]
    ref_mask = reference_mask_of(case, use_manual)
    if use_manual and case.manual_masks is not None:  # an oracle segmentation (issue 4's aim)
        masks = np.ascontiguousarray(np.moveaxis(case.manual_masks, -1, 0))
    else:
        masks = brain_mask(np.ascontiguousarray(np.moveaxis(case.series, -1, 0)), sizes)
    shapes = np.ascontiguousarray(np.moveaxis(signed_distance(masks, sizes), 0, -1))
    result = estimate_head_motion(case.series, case.affine, reference, ref_mask, shapes,
                                  signed_distance(ref_mask, sizes), device=device,
                                  network=network, refine=refine)
    return result.transforms


def run_unimo_tracked(case, network, device, use_manual, segmenter=None):
    """The moving-anatomy mode as the app runs it: every volume's mask and the reference's from
    the trained segmenter (``--seg-model auto``: the packaged one), or the classical masks
    (``--seg-model classical``); register inside the reference mask and track it. With
    ``--manual-fetal-mask`` the manual masks instead."""
    volumes = np.ascontiguousarray(np.moveaxis(case.series, -1, 0))
    if use_manual and case.manual_masks is not None:
        masks = np.ascontiguousarray(np.moveaxis(case.manual_masks, -1, 0))
        ref_mask = case.manual_mask
    elif segmenter is not None:
        masks = segment_with_model(segmenter, volumes, case.affine, device=device)
        ref_mask = masks[0]  # the reference is volume 0
    else:
        masks = brain_mask(volumes, voxel_sizes(case.affine))
        ref_mask = reference_mask_of(case, use_manual)
    return track_moving_anatomy(case.series, case.affine, case.series[..., 0], ref_mask, masks,
                                network=network, device=device).transforms


def to_ants_series(series, affine):
    """(X, Y, Z, T) numpy series on a RAS grid -> 4D ants image in the same physical space."""
    import ants

    origin, spacing, direction = lps_frame(affine)
    direction4 = np.eye(4)
    direction4[:3, :3] = direction
    return ants.from_numpy(np.ascontiguousarray(series, dtype=np.float32),
                           origin=tuple(origin) + (0.0,),
                           spacing=tuple(spacing) + (1.0,), direction=direction4)


def run_ants(case, seed, use_manual):
    import ants

    mask = case.manual_mask if use_manual else None
    with tempfile.TemporaryDirectory(prefix="unimo-ants-") as tmp:
        result = ants.motion_correction(
            to_ants_series(case.series, case.affine),
            fixed=to_ants(case.series[..., 0], case.affine),
            type_of_transform="BOLDRigid",
            mask=None if mask is None else to_ants(mask.astype(np.float32), case.affine),
            outprefix=os.path.join(tmp, "hmc"), random_seed=seed)
        # one transform file per volume ("NA" only for a constant volume)
        return np.stack([ants_matrix_ras(files[0]) for files in result["motion_parameters"]])


def to_sitk(volume, affine):
    """A 3D numpy volume on a RAS grid -> SimpleITK image in the same (LPS) physical space."""
    import SimpleITK as sitk

    origin, spacing, direction = lps_frame(affine)
    # SimpleITK arrays are indexed (z, y, x)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(volume, (2, 1, 0))))
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple(direction.ravel()))
    return image


def sitk_matrix_ras(transform):
    """4x4 RAS matrix of a SimpleITK transform (fixed LPS point -> moving LPS point)."""
    return lps_point_map_to_ras(transform.TransformPoint)


def sitk_register(fixed, moving, fixed_mask):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                                 numberOfIterations=200,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    start = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg.SetInitialTransform(start, inPlace=False)
    return reg.Execute(fixed, moving)


def run_sitk(case, use_manual):
    fixed = to_sitk(case.series[..., 0], case.affine)
    mask = to_sitk(reference_mask_of(case, use_manual).astype(np.uint8), case.affine)
    return np.stack([sitk_matrix_ras(sitk_register(fixed, to_sitk(case.series[..., t],
                                                                 case.affine), mask))
                     for t in range(case.series.shape[-1])])


METHOD_LABELS = {
    "unimo": "unimo",
    "unimo-no-refine": "unimo --no-refine",
    "unimo-no-network": "unimo, no network",
    "unimo-tracked": "unimo --moving-anatomy",
    "ants": "antspyx BOLDRigid",
    "sitk": "SimpleITK",
}
NETWORK_METHODS = ("unimo", "unimo-no-refine", "unimo-tracked")


def load_tracking_segmenter(args):
    """The segmenter of the moving-anatomy rows, chosen by ``--seg-model`` as the app's
    ``--moving-anatomy`` chooses it (None: classical masks); loaded untimed."""
    path = seg_model_path(argparse.Namespace(seg_model=args.seg_model, moving_anatomy=True))
    if path is None or "unimo-tracked" not in args.methods:
        return None
    return load_segmenter(path, args.device)[0]


def make_methods(names, args):
    """{name: callable(Case) -> transforms}; the network is loaded once (untimed)."""
    network = None
    if any(name in NETWORK_METHODS for name in names):
        try:
            network = load_network(args.weights, args.device)
        except ValueError as err:
            sys.exit(f"{err}; pass --weights PATH")
    unimo = partial(run_unimo, device=args.device, use_manual=args.manual_fetal_mask)
    every = {
        "unimo": partial(unimo, network=network, refine=True),
        "unimo-no-refine": partial(unimo, network=network, refine=False),
        "unimo-no-network": partial(unimo, network=None, refine=True),
        "unimo-tracked": partial(run_unimo_tracked, network=network, device=args.device,
                                 use_manual=args.manual_fetal_mask,
                                 segmenter=load_tracking_segmenter(args)),
        "ants": partial(run_ants, seed=args.seed, use_manual=args.manual_fetal_mask),
        "sitk": partial(run_sitk, use_manual=args.manual_fetal_mask),
    }
    return {name: every[name] for name in names}


# --------------------------------------------------------------------------------------------
# checks and scoring


def check_conversions(root, methods):
    """ANTs' and SimpleITK's LPS transforms, converted, must give back a known translation."""
    scene = bold_scene(root)
    motions = np.stack([np.eye(4), rigid_matrix([0, 0, 0], [4.0, -3.0, 2.0], scene.center)])
    series = simulate_series(scene.image, scene.image_affine, motions, scene.shape, scene.grid)
    case = Case(series, scene.grid, truth_of(motions), scene.points)
    rows = []
    for name in ("ants", "sitk"):
        if name not in methods:
            continue
        estimate = methods[name](case)
        error = mean_displacement(estimate[1:], case.truth[1:], case.points)[0]
        rows.append([METHOD_LABELS[name], str(estimate[1][:3, 3].round(2).tolist()),
                     str(case.truth[1][:3, 3].round(2).tolist()), f"{error:.3f}"])
        if error > CHECK_TOLERANCE_MM:
            print(markdown_table(["method", "converted", "true", "error (mm)"], rows))
            sys.exit(f"the LPS -> RAS conversion of {METHOD_LABELS[name]} does not hold")
    if not rows:
        return ""
    return ("Conversion check: the real BOLD moved by a known pure translation (true reference "
            "-> volume transform: a translation of (-4, 3, -2) mm, RAS), no noise:\n\n"
            + markdown_table(
                ["method", "converted translation (RAS, mm)", "true translation (mm)",
                 "error (mm)"], rows))


def fmt_mm(value):
    """Three decimals below 0.1 mm (errors of a few hundredths are compared there)."""
    return f"{value:.3f}" if value < 0.1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def score_row(regime, label, errors, seconds, n_volumes):
    fails = int(np.sum(errors > FAIL_MM))
    # three digits below 0.1 s: the speed ratios to antspyx are read from this column
    speed = "-" if seconds is None else (f"{seconds / n_volumes:.3f}" if seconds < 0.1 * n_volumes
                                         else f"{seconds / n_volumes:.2f}")
    return [regime, label, fmt_mm(float(np.mean(errors))), fmt_mm(float(np.max(errors))),
            f"{fails}/{len(errors)}", speed, str(len(errors))]


HEADERS = ["regime", "method", "mean error (mm)", "max error (mm)",
           f"failures (> {FAIL_MM:g} mm)", "s / volume", "n volumes"]


def evaluate(regime, case, methods, repeats=1):
    """Rows for one regime: no correction, then every method (an exception is a row too).
    Each method runs ``repeats`` times: its errors are the first run's, its time the
    fastest run's (this shared machine's load moves single timings by a third)."""
    n_volumes = case.series.shape[-1]
    moved = np.arange(1, n_volumes)
    identity = np.repeat(np.eye(4)[None], n_volumes, 0)
    rows = [score_row(regime, "no correction",
                      mean_displacement(identity, case.truth, case.points)[moved], None,
                      n_volumes)]
    for name, method in methods.items():
        try:
            timings = []
            for run in range(repeats):
                start = time.perf_counter()
                found = method(case)
                timings.append(time.perf_counter() - start)
                if run == 0:
                    transforms = found
            seconds = min(timings)
        except Exception as err:  # noqa: BLE001 - a method that raises is a result here
            rows.append([regime, METHOD_LABELS[name], "-", "-", f"raised {type(err).__name__}",
                         "-", str(len(moved))])
            print(f"{regime}, {METHOD_LABELS[name]}: raised {err!r}", file=sys.stderr)
            continue
        errors = mean_displacement(transforms, case.truth, case.points)[moved]
        rows.append(score_row(regime, METHOD_LABELS[name], errors, seconds, n_volumes))
        print(f"{regime}, {METHOD_LABELS[name]}: errors (mm) {np.round(errors, 2).tolist()}, "
              f"{seconds:.2f} s", file=sys.stderr, flush=True)
    return rows


def warm_up_methods(case, methods):
    """First calls (torch kernels, the network's grid) on two volumes, untimed."""
    warm_up()
    two = Case(case.series[..., :2], case.affine, case.truth[:2], case.points, case.manual_mask)
    for name in methods:
        if name.startswith("unimo"):
            methods[name](two)


# --------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("UNIMO_TEST_DATA", DEFAULT_DATA)),
                        help="shared real-data folder (default $UNIMO_TEST_DATA, else "
                             "../shared/data next to the repository)")
    parser.add_argument("--weights", default=None,
                        help="network checkpoint (default: the packaged weights)")
    parser.add_argument("--device", default="cpu", help="torch device of the unimo rows (cpu)")
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_LABELS),
                        default=list(METHOD_LABELS))
    parser.add_argument("--volumes", type=int, default=None,
                        help="volumes per series, the unmoved reference included (16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads and ITK threads (2)")
    parser.add_argument("--manual-fetal-mask", action="store_true",
                        help="fetal-like regime: give every method the manual brain mask of "
                             "the reference instead of the engine's computed mask (ANTs "
                             "otherwise uses none), and unimo the manual mask moved with each "
                             "volume for its shape maps (an oracle segmentation)")
    parser.add_argument("--seg-model", default="auto", metavar="PATH",
                        help="masks of the moving-anatomy rows, as the app's --seg-model: "
                             "'auto' (default) or 'packaged' the packaged segmenter, "
                             "'classical', or a segmenter file")
    parser.add_argument("--fetal-run", type=int, choices=(1, 2), default=1,
                        help="fetal-like regime: the real stack to move (1; 2 is the one the "
                             "packaged segmenter's training held out)")
    parser.add_argument("--quick", action="store_true", help="4 volumes per series (smoke run)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each method per series: errors from the first, s / "
                             "volume from the fastest (1)")
    parser.add_argument("--moved-reference", action="store_true",
                        help="small and large regimes: move the reference volume too (under "
                             "2 deg and 1.7 mm), so that it is resampled like the others")
    parser.add_argument("--finest", type=float, nargs=2, metavar=("SPACING", "SMOOTHING"),
                        help="replace the refinement's finest level: grid spacing factor and "
                             "band-limit factor (the app uses 1.25 1.3)")
    parser.add_argument("--level-tolerances", type=float, nargs=3, metavar=("COARSE", "MIDDLE",
                                                                           "FINEST"),
                        help="replace the refinement's stopping tolerances per level (mm; the "
                             "app uses 0.05 0.01 0.002)")
    parser.add_argument("--write", type=Path, default=None,
                        help="also write the results as a section of this markdown file "
                             "(replacing an earlier one)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"data folder {args.data} not found: pass --data or set UNIMO_TEST_DATA")
    args.volumes = args.volumes or (4 if args.quick else 16)
    if args.volumes < 2:
        parser.error("--volumes must be at least 2")
    return args


def set_threads(threads, methods):
    """Threads for torch and ITK; antspyx and SimpleITK are imported only when they run, so
    that unimo rows (e.g. on a GPU machine) need neither."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # read at ITK's import
    torch.set_num_threads(threads)
    if "sitk" in methods:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def library_line(args):
    parts = []
    if "ants" in args.methods:
        import ants

        parts.append(f"antspyx {ants.__version__}")
    if "sitk" in args.methods:
        import SimpleITK as sitk

        parts.append(f"SimpleITK {sitk.Version_VersionString()}")
    device = args.device
    if torch.device(device).type == "cuda":
        device += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return ", ".join(parts + [f"{args.threads} threads (torch, ITK)", f"unimo device {device}",
                              f"weights {args.weights or 'packaged'}"]
                 + ([f"segmenter {args.seg_model}"] if "unimo-tracked" in args.methods else []))


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads, args.methods)
    methods = make_methods(args.methods, args)

    header = [f"Command: `{command_line(sys.executable)}`", "",
              f"Machine: {machine_line()}; {library_line(args)}", ""]
    print("\n".join(header), flush=True)
    conversion = check_conversions(args.data, methods)
    if conversion:
        print(conversion + "\n", flush=True)

    if args.finest:
        set_finest_level(*args.finest)
    if args.level_tolerances:
        set_level_tolerances(args.level_tolerances)
    cases = {}
    for name in args.regimes:
        rng = np.random.default_rng([args.seed, list(REGIMES).index(name)])
        options = ({"moved_reference": True}
                   if args.moved_reference and name in ("small", "large") else {})
        if name == "fetal":
            options["run"] = args.fetal_run
        cases[name] = REGIMES[name](args.data, args.volumes, rng, **options)
    warm_up_methods(next(iter(cases.values())), methods)

    rows = []
    for name, case in cases.items():
        rows += evaluate(name, case, methods, args.repeats)
    regimes = "\n".join(f"- {name}: {case.description}" for name, case in cases.items())
    body = (f"{args.volumes} volumes per series (volume 0 unmoved = the reference; "
            f"{args.volumes - 1} moved volumes scored), 1 % Gaussian noise; error = mean "
            f"displacement over the reference's brain (mm); s / volume = wall time over all "
            f"volumes" + (f", the fastest of {args.repeats} runs" if args.repeats > 1 else "")
            + f"; failure = error > {FAIL_MM:g} mm."
            + (" Fetal-like: every method is given the manual reference brain mask."
               if args.manual_fetal_mask else "")
            + f"\n\n{regimes}\n\n" + markdown_table(HEADERS, rows))
    print(body)
    if args.write:
        write_section(args.write, SECTION, "\n".join(
            [SECTION, ""] + header + ([conversion, ""] if conversion else []) + [body]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
