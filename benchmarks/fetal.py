"""Fetal benchmark: a brain that moves inside still surroundings (issue 4's target).

Two forms, each a series of ``--volumes`` volumes (16) whose volume 0 is the unmoved reference;
in every other volume the brain alone moves, by an angle uniform in [0, 30] deg about a uniformly
random axis through its centroid and translations uniform in [-10, 10] mm per axis; 1 % Gaussian
noise of the series maximum is added:

- embedded: the real T1w ``anat/xa30_T1w.nii.gz`` (2 mm), the part inside its brain mask,
  surrounded by a 4 mm dark fluid rim, moved inside a still,
  textured field of view (a smooth random texture in a body-like ellipsoid) on a 2.5 mm RAS grid
  of 80^3 (200 mm). Volume t = w_t * (brain and rim)_t + (1 - w_t) * surroundings, w_t the
  brain mask grown by the rim, moved the same way (linear interpolation). The brain mask
  (``--embedded-mask``): ``template`` (default), TemplateFlow's MNI152NLin2009cAsym brain mask
  (res-02, in the data folder's ``templateflow/``) carried onto the T1w by antspyx SyN from the
  template's T1w, as template-based brain extraction does, computed once with antspyx and
  cached in ``benchmarks/.cache/``; or ``classical``, the app's classical mask of the T1w, which
  on this scan takes in scalp over the vertex and cuts the cerebellum and temporal poles off
  by a plane (Dice 0.82 against the template mask): what the embedded form used before
  2026-12-07, whose "brain" a brain segmenter cannot be asked to find.
- stack: the real fetal HASTE stack ``fetal/sub-01_run-1_T2w.nii.gz`` (1.125x1.125x3.3 mm) with
  its manual brain mask, as ``hmc_accuracy.fetal_case``: on a 2.5 mm RAS grid of 64^3 centred on
  the brain, the manually masked brain moves while the mother's tissue stays still (the brain's
  place in the still image is filled with the median of a 5 mm shell around it).

Scores, per method: the mean and worst rigid error over the reference's brain
(``geometry.mean_displacement`` of estimated and true reference -> volume transforms), failures
(> 5 mm), seconds per volume, and the Dice between each volume's true brain mask and the method's
mask of that volume: for unimo's tracked mode the tracked mask, for the others the reference mask
carried by the method's transforms (``tracking.carry_mask``); the mean over moved volumes and the
lowest. Rows "segmentation only" score a segmenter's per-volume masks themselves.

Methods:

- ``tracked-user-mask``: ``tracking.track_moving_anatomy`` with the true reference mask, as
  ``--moving-anatomy --ref-mask`` runs it (no per-volume segmentation).
- ``tracked-segmenter``: the same, fully automatic: the reference mask and every volume's mask
  from the trained segmenter (``--seg-model``, default the packaged one), as ``--moving-anatomy
  --seg-model`` runs it.
- ``tracked-classical``: the same with the classical masks (``--moving-anatomy`` alone).
- ``unimo-default``: the whole-head mode (classical masks, network, refinement), as the app runs
  without ``--moving-anatomy``.
- ``ants``: antspyx ``motion_correction(type_of_transform='BOLDRigid')``, whole image.
- ``ants-mask``: the same with the true reference mask as its mask.

Run from the repository root with the antspyx environment (see benchmarks/compare_ants.py)::

    /tmp/ants-venv/bin/python benchmarks/fetal.py --write docs/benchmarks.md
    python benchmarks/fetal.py --methods tracked-user-mask tracked-segmenter  # no antspyx
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, blur_to_psf, command_line, machine_line, markdown_table, \
    warm_up, write_section  # noqa: E402
from hmc_accuracy import (  # noqa: E402
    FAIL_MM,
    Case,
    cubic_grid,
    fetal_case,
    load_scaled,
    random_axis_motions,
    run_ants,
    truth_of,
    with_noise,
)

from unimo_bids.unimo.geometry import mean_displacement, voxel_sizes, world_points  # noqa: E402
from unimo_bids.unimo.hmc import estimate_head_motion  # noqa: E402
from unimo_bids.unimo.network import load_network  # noqa: E402
from unimo_bids.unimo.segment import brain_mask, reference_mask  # noqa: E402
from unimo_bids.unimo.segnet import PACKAGED_SEGMENTER  # noqa: E402
from unimo_bids.unimo.synthetic import simulate_series  # noqa: E402
from unimo_bids.unimo.shape import dice, signed_distance  # noqa: E402
from unimo_bids.unimo.tracking import carry_mask, track_moving_anatomy  # noqa: E402

SECTION = "## 10. Fetal: a brain moving inside still surroundings (`fetal.py`)"
MAX_DEG = 30.0
MAX_MM = 10.0


def body_texture(shape, voxel_mm, rng, smooth_mm=6.0):
    """Still surroundings: a smooth random texture (0.25-0.9) in an ellipsoid filling most of
    the field of view, dark outside it."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), smooth_mm / voxel_mm)
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-12)
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    inside = (x / 0.95) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 <= 1.0
    return np.where(inside, 0.25 + 0.65 * noise, 0.02).astype(np.float32)


CACHE = Path(__file__).resolve().parent / ".cache"


def template_brain_mask(root, image_path):
    """(X, Y, Z) bool brain mask of a T1w: MNI152NLin2009cAsym's brain mask warped onto it by
    antspyx SyN from the template's T1w (seed 0, one thread), cached as NIfTI."""
    import nibabel as nb

    cached = CACHE / f"{image_path.name.split('.')[0]}_desc-template_mask.nii.gz"
    if not cached.is_file():
        try:
            import ants
        except ImportError:
            raise SystemExit(f"{cached} is missing: run this benchmark once with antspyx "
                             "installed (see benchmarks/compare_ants.py), or pass "
                             "--embedded-mask classical") from None
        folder = root / "templateflow" / "tpl-MNI152NLin2009cAsym"
        fixed = ants.image_read(str(image_path))
        registration = ants.registration(
            fixed, ants.image_read(str(folder / "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz")),
            type_of_transform="SyN", random_seed=0)
        warped = ants.apply_transforms(
            fixed, ants.image_read(str(folder / "tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask"
                                                ".nii.gz")),
            registration["fwdtransforms"], interpolator="linear")
        CACHE.mkdir(exist_ok=True)
        image = nb.load(image_path)
        nb.save(nb.Nifti1Image((warped.numpy() > 0.5).astype(np.uint8), image.affine),
                cached)
    return np.asarray(nb.load(cached).dataobj) > 0


def embedded_case(root, n_volumes, rng, voxel_mm=2.5, size=80, rim_mm=4.0, fluid=0.05,
                  mask="template"):
    path = root / "anat/xa30_T1w.nii.gz"
    data, img = load_scaled(path)
    sizes = voxel_sizes(img.affine)
    brain = (template_brain_mask(root, path) if mask == "template"
             else reference_mask(data, sizes))
    grown = ndimage.distance_transform_edt(~brain, sampling=sizes) <= rim_mm
    moving_layer = np.where(brain, data, fluid).astype(np.float32)
    center = world_points(brain.shape, img.affine, brain).mean(0)
    shape, grid = cubic_grid(center, size, voxel_mm)
    motions = random_axis_motions(n_volumes, MAX_DEG, MAX_MM, center, rng)

    layer = simulate_series(blur_to_psf(moving_layer, img.affine, [voxel_mm] * 3), img.affine,
                            motions, shape, grid)
    weight = np.clip(simulate_series(grown.astype(np.float32), img.affine, motions, shape, grid,
                                     order=1), 0.0, 1.0)
    masks = simulate_series(brain.astype(np.float32), img.affine, motions, shape, grid,
                            order=1) > 0.5
    surroundings = body_texture(shape, voxel_mm, rng)
    series = weight * layer + (1.0 - weight) * surroundings[..., None]
    return Case(with_noise(series, rng), grid, truth_of(motions),
                world_points(shape, grid, masks[..., 0]), manual_mask=masks[..., 0],
                manual_masks=masks,
                description=f"real xa30 T1w brain ({mask} mask) with a {rim_mm:g} mm "
                            f"dark fluid rim in still textured surroundings, {voxel_mm:g} mm "
                            f"grid ({size}^3)")


def stack_case(root, n_volumes, rng, run=1):
    return fetal_case(root, n_volumes, rng, max_deg=MAX_DEG, max_mm=MAX_MM, run=run)


def stack2_case(root, n_volumes, rng):
    """The same with the second stack, which the packaged segmenter's training held out."""
    return stack_case(root, n_volumes, rng, run=2)


FORMS = {"embedded": embedded_case, "stack": stack_case, "stack2": stack2_case}


# --------------------------------------------------------------------------------------------
# methods: each returns (transforms (T, 4, 4), masks (T, X, Y, Z) bool or None)


def volumes_of(case):
    return np.ascontiguousarray(np.moveaxis(case.series, -1, 0))


def classical_masks(case):
    masks = brain_mask(volumes_of(case), voxel_sizes(case.affine))
    return masks[0], masks


def segmenter_masks(case, model):
    from unimo_bids.unimo.segnet import segment_with_model

    masks = segment_with_model(model, volumes_of(case), case.affine)
    return masks[0], masks


def run_tracked(case, network, source, model=None):
    if source == "user":
        ref_mask, volume_masks = case.manual_mask, None
    elif source == "segmenter":
        ref_mask, volume_masks = segmenter_masks(case, model)
    else:
        ref_mask, volume_masks = classical_masks(case)
    tracked = track_moving_anatomy(case.series, case.affine, case.series[..., 0], ref_mask,
                                   volume_masks, network=network)
    return tracked.transforms, tracked.masks


def run_default(case, network):
    sizes = voxel_sizes(case.affine)
    ref_mask, masks = classical_masks(case)
    shapes = np.ascontiguousarray(np.moveaxis(signed_distance(masks, sizes), 0, -1))
    motion = estimate_head_motion(case.series, case.affine, case.series[..., 0], ref_mask,
                                  shapes, signed_distance(ref_mask, sizes), network=network)
    return motion.transforms, None


def run_ants_method(case, seed, use_mask):
    return run_ants(case, seed, use_mask), None


METHOD_LABELS = {
    "tracked-user-mask": "unimo --moving-anatomy --ref-mask (true reference mask)",
    "tracked-segmenter": "unimo --moving-anatomy --seg-model (automatic)",
    "tracked-classical": "unimo --moving-anatomy (classical masks)",
    "unimo-default": "unimo whole-head default",
    "ants": "antspyx BOLDRigid, whole image",
    "ants-mask": "antspyx BOLDRigid, true reference mask",
}


def make_methods(names, args):
    network = load_network(args.weights, args.device)
    model = None
    if any(name == "tracked-segmenter" for name in names):
        from unimo_bids.unimo.segnet import load_segmenter

        model, _ = load_segmenter(args.seg_model, args.device)
    table = {
        "tracked-user-mask": partial(run_tracked, network=network, source="user"),
        "tracked-segmenter": partial(run_tracked, network=network, source="segmenter",
                                     model=model),
        "tracked-classical": partial(run_tracked, network=network, source="classical"),
        "unimo-default": partial(run_default, network=network),
        "ants": partial(run_ants_method, seed=args.seed, use_mask=False),
        "ants-mask": partial(run_ants_method, seed=args.seed, use_mask=True),
    }
    return {name: table[name] for name in names}, model


# --------------------------------------------------------------------------------------------


HEADERS = ["form", "method", "mean error (mm)", "max error (mm)", f"failures (> {FAIL_MM:g} mm)",
           "s / volume", "mask Dice mean", "mask Dice min"]


def fmt(value):
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def evaluate(form, case, methods, model):
    n_volumes = case.series.shape[-1]
    moved = np.arange(1, n_volumes)
    truth_masks = np.moveaxis(case.manual_masks, -1, 0)
    identity = np.repeat(np.eye(4)[None], n_volumes, 0)
    still = dice(np.repeat(case.manual_mask[None], n_volumes, 0), truth_masks)[moved]
    errors = mean_displacement(identity, case.truth, case.points)[moved]
    rows = [[form, "no correction", fmt(errors.mean()), fmt(errors.max()),
             f"{int((errors > FAIL_MM).sum())}/{len(moved)}", "-", f"{still.mean():.3f}",
             f"{still.min():.3f}"]]
    for label, masks in segmentation_only(case, model).items():
        overlap = dice(masks, truth_masks)
        rows.append([form, label, "-", "-", "-", "-", f"{overlap.mean():.3f}",
                     f"{overlap.min():.3f}"])
    for name, method in methods.items():
        start = time.perf_counter()
        try:
            transforms, masks = method(case)
        except Exception as err:  # noqa: BLE001 - a method that raises is a result here
            rows.append([form, METHOD_LABELS[name], "-", "-", f"raised {type(err).__name__}",
                         "-", "-", "-"])
            print(f"{form}, {name}: raised {err!r}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - start
        if masks is None:
            masks = carry_mask(case.manual_mask, case.affine, transforms)
        errors = mean_displacement(transforms, case.truth, case.points)[moved]
        overlap = dice(masks, truth_masks)[moved]
        rows.append([form, METHOD_LABELS[name], fmt(errors.mean()), fmt(errors.max()),
                     f"{int((errors > FAIL_MM).sum())}/{len(moved)}",
                     f"{seconds / n_volumes:.2f}", f"{overlap.mean():.3f}",
                     f"{overlap.min():.3f}"])
        print(f"{form}, {name}: errors (mm) {np.round(errors, 2).tolist()}, Dice "
              f"{np.round(overlap, 3).tolist()}, {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


def segmentation_only(case, model):
    """Per-volume masks of each segmenter, scored on their own (all volumes)."""
    out = {"segmentation only: classical": classical_masks(case)[1]}
    if model is not None:
        out["segmentation only: trained segmenter"] = segmenter_masks(case, model)[1]
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("UNIMO_TEST_DATA", DEFAULT_DATA)))
    parser.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS))
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_LABELS),
                        default=list(METHOD_LABELS))
    parser.add_argument("--weights", default=None, help="network checkpoint (packaged)")
    parser.add_argument("--seg-model", type=Path, default=PACKAGED_SEGMENTER,
                        help="trained segmenter (default: the packaged one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--embedded-mask", choices=("template", "classical"), default="template",
                        help="the embedded form's brain: the template-registered mask "
                             "(default) or the T1w's classical mask (the form before "
                             "2026-12-07)")
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None,
                        help="also write the results as a section of this markdown file")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"data folder {args.data} not found: pass --data or set UNIMO_TEST_DATA")
    if "tracked-segmenter" in args.methods and not args.seg_model.is_file():
        print(f"no segmenter at {args.seg_model}: skipping tracked-segmenter", file=sys.stderr)
        args.methods = [m for m in args.methods if m != "tracked-segmenter"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    methods, model = make_methods(args.methods, args)
    warm_up()
    rows, notes = [], []
    for form in args.forms:
        options = {"mask": args.embedded_mask} if form == "embedded" else {}
        case = FORMS[form](args.data, args.volumes, np.random.default_rng(args.seed), **options)
        notes.append(f"- {form}: {case.description}")
        rows += evaluate(form, case, methods, model)
    libraries = [f"torch {torch.__version__}", f"{args.threads} threads"]
    if any(m.startswith("ants") for m in args.methods):
        import ants

        libraries.append(f"antspyx {ants.__version__}")
    text = "\n".join([
        SECTION, "", f"Command: `{command_line(sys.executable)}`", "",
        f"Machine: {machine_line()}; {', '.join(libraries)}; segmenter {args.seg_model.name}",
        "", f"Brain alone moving, 0-{MAX_DEG:g} deg about random axes, +-{MAX_MM:g} mm per "
        f"axis, {args.volumes} volumes (volume 0 the reference), seed {args.seed}:", "",
        *notes, "", markdown_table(HEADERS, rows), ""])
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
