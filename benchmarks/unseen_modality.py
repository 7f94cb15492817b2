"""Unseen modalities: the UniMo network's rigid error on contrasts it was not trained on (issue 7).

The packaged network was trained only on random contrasts of nilearn's MNI152 2009 template
tissue maps (unimo_bids/data/weights/unimo_rigid_cpu.md). Here it meets real scans and templates it never saw.
Each case is one still volume; volume 0 of its series is that volume unmoved (the reference), and
``--volumes`` copies are moved by known rigid motion. Cases:

- ``mni-control``: a CONTROL, not an unseen modality: nilearn's MNI152 2009 T1 template with
  nilearn's brain mask, the training anatomy in one of the contrasts training drew.
- ``t1w``: the real xa30 T1w MPRAGE (anat/xa30_T1w.nii.gz, 2 mm).
- ``t2-template``: the ICBM152 2009c asymmetric T2 template (anat/mni152nlin2009casym_2mm_T2,
  listed in the data README), with the TemplateFlow MNI152NLin2009cAsym res-02 brain mask. Its
  anatomy is the training template's family (ICBM152 2009); only the contrast is new.
- ``dwi-b0``, ``dwi-b1000``: volumes 0 (b=0) and 7 (b=1000) of the real DWI (4 mm).
- ``fetal-run1``, ``fetal-run2``: the two real fetal HASTE T2w stacks with their manual brain
  masks. The manually masked brain moves; the mother's tissue stays still (as
  ``hmc_accuracy.fetal_case``: the brain's place in the still image is filled with the median of a
  5 mm shell around it).
- ``bold-inverted``: volume 0 of the real xa30 BOLD with its intensities inverted inside the head
  (value 1 - v, the volume scaled to its 99.5th percentile, floored at 0; 0 outside the head).

The brain of a case (the error's support and the "true" masks below) is its given mask (nilearn,
TemplateFlow, manual) or else ``segment.reference_mask`` of the still volume on its own grid (for
the DWI, of the b=0 volume; for the inverted BOLD, of the original volume). In the adult scans
the background outside the head (head = the filled largest component above 10 % of the 99.5th
percentile, lightly smoothed; for the DWI that of the b=0 volume) is set to 0: the simulation
moves the scan's field of view with the anatomy, and its edges would otherwise show.

Adult cases are blurred to a 4 mm Gaussian PSF and sampled on a cubic 4 mm RAS grid of 64^3
(256 mm) centred on the brain; fetal cases on a 2.5 mm grid of 80^3 (200 mm). 1 % Gaussian noise
of the series maximum is added. Regimes, all about the brain centroid:

- ``small``: rotation angle uniform in [0, 10] deg about a uniformly random axis, translations
  uniform in [-10, 10] mm per axis.
- ``any rotation``: rotation uniform on SO(3) (``roma.random_rotmat``, seeded), translations
  uniform in [-30, 30] mm per axis.

Masks, as the app makes them: ``segment.reference_mask`` of the reference and
``segment.brain_mask`` of every volume, and their ``shape.signed_distance`` maps ("classical").
Fetal cases use the manual mask moved with the brain ("manual"). With true masks (the
default) the adult cases are also run with the still brain mask moved with each volume ("true"):
the shape branch without segmentation errors.

Estimates (``hmc.estimate_head_motion``):

- the network alone (``refine=False``, as ``--no-refine``): the image branch (lambda = 0), the
  shape branch (lambda = 1) and their fused estimate (the learned lambda; the image branch where
  the two rotations are more than 45 degrees apart, ``network.MAX_FUSION_ANGLE_DEG``), from
  ``HeadMotion.network`` (the ``unimo_image_*``/``unimo_shape_*`` diagnostics of UniMoRigid);
  once with the packaged weights (``network.load_network(None)``) and once with untrained random
  weights (``network.UniMoRigidNet('cpu', 16)`` after ``torch.manual_seed(--untrained-seed)``;
  lambda 0.5);
- the packaged network's fused estimate + test-time refinement (the app's default). Fetal cases
  register inside the manual mask shrunk by 2.5 mm (``tracking.TRACKING_MARGIN_MM``, the first
  step of ``--moving-anatomy --ref-mask``; the whole-head 8 mm margin would take in the mother),
  with that mode's 24 cube-rotation starts (``rotation_search``).

Error of a volume: ``geometry.mean_displacement`` between the estimated and the true
reference -> volume transforms over the still brain mask's points (mm). Reported per case and
regime: mean / median over the moved volumes and failures (error > 5 mm); for the classical masks,
their mean Dice with the true masks, the reference mask's volume over the true one's, and the
spread of the volumes' mask sizes. Then every case but the control pooled.

Run from the repository root (2.2-3.3 minutes on 2 cores, measured 2026-11-21)::

    python benchmarks/unseen_modality.py --write docs/benchmarks.md
    python benchmarks/unseen_modality.py --quick
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np
import roma
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA_HELP, blur_to_psf, command_line, data_dir, machine_line, \
    markdown_table, warm_up, write_section  # noqa: E402
from hmc_accuracy import FAIL_MM, cubic_grid, load_scaled, random_axis_motions, rigid_about, \
    truth_of, with_noise, without_brain  # noqa: E402

from unimo_bids.unimo.geometry import mean_displacement, voxel_sizes, world_points  # noqa: E402
from unimo_bids.unimo.hmc import MASK_MARGIN_MM, estimate_head_motion  # noqa: E402
from unimo_bids.unimo.network import (  # noqa: E402
    DEFAULT_WEIGHTS,
    MAX_FUSION_ANGLE_DEG,
    UniMoRigidNet,
    load_network,
)
from unimo_bids.unimo.segment import brain_mask, reference_mask  # noqa: E402
from unimo_bids.unimo.shape import dice, signed_distance  # noqa: E402
from unimo_bids.unimo.synthetic import simulate_series  # noqa: E402
from unimo_bids.unimo.tracking import TRACKING_MARGIN_MM  # noqa: E402

SECTION = "## 12. Unseen modalities (`unseen_modality.py`)"
ADULT_GRID = (64, 4.0)
FETAL_GRID = (80, 2.5)
SMALL_DEG, SMALL_MM, ANY_MM = 10.0, 10.0, 30.0
REGIMES = ("small", "any rotation")
BRANCHES = ("image", "shape", "fused")


@dataclass
class Still:
    """A still volume to be moved: the image, its brain mask (both on ``affine``), and whether
    only the brain moves (the rest of the image stays still)."""

    name: str
    description: str
    image: np.ndarray
    affine: np.ndarray
    brain: np.ndarray
    brain_only: bool = False


def head_mask(data):
    """The filled largest component above 10 % of a volume scaled to its 99.5th percentile
    (lightly smoothed first)."""
    labels, count = ndimage.label(ndimage.binary_fill_holes(
        ndimage.gaussian_filter(data, 1.0) > 0.1))
    sizes = ndimage.sum(np.ones_like(data), labels, range(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def mni_control(root):
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return Still("mni-control", "CONTROL, seen in training: nilearn's MNI152 2009 T1 template, "
                 "2 mm, with nilearn's brain mask (the training anatomy, in a T1 contrast)",
                 data / np.percentile(data, 99.5), img.affine,
                 np.asarray(load_mni152_brain_mask(resolution=2).dataobj) > 0)


def t1w(root):
    data, img = load_scaled(root / "anat/xa30_T1w.nii.gz")
    return Still("t1w", "real xa30 T1w MPRAGE, 2 mm", data * head_mask(data), img.affine,
                 reference_mask(data, voxel_sizes(img.affine)))


def t2_template(root):
    data, img = load_scaled(root / "anat/mni152nlin2009casym_2mm_T2.nii.gz")
    data = data * head_mask(data)
    mask = nb.load(root / "templateflow/tpl-MNI152NLin2009cAsym/"
                   "tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz")
    return Still("t2-template", "ICBM152 2009c asymmetric T2 template, 2 mm (TemplateFlow brain "
                 "mask)", data, img.affine, np.asarray(mask.dataobj) > 0)


def dwi_volume(root, index):
    img = nb.load(root / "dwi/ds000114_sub-01_ses-test_desc-trunc_dwi.nii.gz")
    bvals = np.loadtxt(root / "dwi/ds000114_sub-01_ses-test_desc-trunc_dwi.bval")
    data = np.asarray(img.dataobj[..., index], dtype=np.float32)
    data = data / np.percentile(data, 99.5)
    b0 = np.asarray(img.dataobj[..., int(np.flatnonzero(bvals == 0)[0])], dtype=np.float32)
    b0 = b0 / np.percentile(b0, 99.5)
    return Still(f"dwi-b{bvals[index]:g}", f"real DWI volume {index} (b={bvals[index]:g}), 4 mm; "
                 "head and brain = those of the first b=0 volume", data * head_mask(b0),
                 img.affine, reference_mask(b0, voxel_sizes(img.affine)))


def fetal(root, run):
    data, img = load_scaled(root / f"fetal/sub-01_run-{run}_T2w.nii.gz")
    manual = np.asarray(nb.load(root / f"fetal/sub-01_run-{run}_T2w_desc-brain_mask.nii.gz")
                        .dataobj) > 0
    return Still(f"fetal-run{run}", f"real fetal HASTE T2w stack run-{run}, 1.125x1.125x3.3 mm, "
                 "manual brain mask; the brain moves inside the still mother", data, img.affine,
                 manual, brain_only=True)


def inverted_bold(root):
    img = nb.load(root / "bold/xa30_task-fa_bold.nii.gz")
    vol = np.asarray(img.dataobj[..., 0], dtype=np.float32)
    vol = vol / np.percentile(vol, 99.5)
    inverted = np.where(head_mask(vol), np.maximum(1.0 - vol, 0.0), 0.0).astype(np.float32)
    return Still("bold-inverted", "real xa30 BOLD volume 0 (3.4 mm, oblique), intensities "
                 "inverted inside the head; brain = the classical mask of the original volume",
                 inverted, img.affine, reference_mask(vol, voxel_sizes(img.affine)))


CASES = {
    "mni-control": mni_control,
    "t1w": t1w,
    "t2-template": t2_template,
    "dwi-b0": lambda root: dwi_volume(root, 0),
    "dwi-b1000": lambda root: dwi_volume(root, 7),
    "fetal-run1": lambda root: fetal(root, 1),
    "fetal-run2": lambda root: fetal(root, 2),
    "bold-inverted": inverted_bold,
}


# --------------------------------------------------------------------------------------------
# known motion


@dataclass
class Series:
    series: np.ndarray  # (X, Y, Z, T), volume 0 unmoved
    affine: np.ndarray
    truth: np.ndarray  # (T, 4, 4) reference -> volume
    true_masks: np.ndarray  # (T, X, Y, Z) the still brain mask moved with each volume
    points: np.ndarray  # (N, 3) world points of the reference's brain


def any_rotation_motions(n_volumes, max_mm, center, rng):
    """Rotations uniform on SO(3) about center, translations uniform in [-max_mm, max_mm] per
    axis; motions[0] = identity."""
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    rotations = roma.random_rotmat(n_volumes, generator=generator).double().numpy()
    motions = np.stack([rigid_about(r, rng.uniform(-max_mm, max_mm, 3), center)
                        for r in rotations])
    motions[0] = np.eye(4)
    return motions


def moved_series(still: Still, regime, n_moved, rng) -> Series:
    size, voxel_mm = FETAL_GRID if still.brain_only else ADULT_GRID
    center = world_points(still.brain.shape, still.affine, still.brain).mean(0)
    shape, grid = cubic_grid(center, size, voxel_mm)
    if regime == "small":
        motions = random_axis_motions(n_moved + 1, SMALL_DEG, SMALL_MM, center, rng)
    else:
        motions = any_rotation_motions(n_moved + 1, ANY_MM, center, rng)
    image = simulate_series(blur_to_psf(still.image, still.affine, [voxel_mm] * 3), still.affine,
                            motions, shape, grid)
    weight = np.clip(simulate_series(still.brain.astype(np.float32), still.affine, motions,
                                     shape, grid, order=1), 0.0, 1.0)
    true_masks = np.ascontiguousarray(np.moveaxis(weight > 0.5, -1, 0))
    if still.brain_only:
        surroundings = without_brain(image[..., 0], weight[..., 0], true_masks[0], voxel_mm)
        image = weight * image + (1.0 - weight) * surroundings[..., None]
    return Series(with_noise(image, rng), grid, truth_of(motions), true_masks,
                  world_points(shape, grid, true_masks[0]))


# --------------------------------------------------------------------------------------------
# estimates


def masks_of(case: Series, masks_source):
    """(reference mask (X, Y, Z), every volume's mask (T, X, Y, Z))."""
    if masks_source != "classical":
        return case.true_masks[0], case.true_masks
    sizes = voxel_sizes(case.affine)
    return (reference_mask(case.series[..., 0], sizes),
            brain_mask(np.ascontiguousarray(np.moveaxis(case.series, -1, 0)), sizes))


def estimates(case: Series, ref_mask, masks, networks, refine_margin_mm, rotation_search=False):
    """{label: (transforms (T, 4, 4), seconds)}: every network's branches, and with a
    ``refine_margin_mm`` the packaged network + refinement (with the 24 cube-rotation starts
    of ``--moving-anatomy`` when ``rotation_search``)."""
    sizes = voxel_sizes(case.affine)
    shapes = np.ascontiguousarray(np.moveaxis(signed_distance(masks, sizes), 0, -1))
    args = (case.series, case.affine, case.series[..., 0], ref_mask, shapes,
            signed_distance(ref_mask, sizes))
    out = {}
    for weights, net in networks.items():
        start = time.perf_counter()
        motion = estimate_head_motion(*args, network=net, refine=False)
        seconds = time.perf_counter() - start
        for branch in BRANCHES:
            out[(weights, branch)] = getattr(motion.network, branch), seconds
    if refine_margin_mm is not None:
        start = time.perf_counter()
        motion = estimate_head_motion(*args, network=networks["packaged"],
                                      margin_mm=refine_margin_mm,
                                      rotation_search=rotation_search)
        out[("packaged", "fused + refinement")] = (motion.transforms,
                                                   time.perf_counter() - start)
    return out


COLUMNS = [("packaged", "image"), ("packaged", "shape"), ("packaged", "fused"),
           ("untrained", "image"), ("untrained", "shape"), ("untrained", "fused"),
           ("packaged", "fused + refinement")]


def weights_line(path, net):
    """The checkpoint's file name, md5 prefix, training command and lambda."""
    path = Path(path) if path else DEFAULT_WEIGHTS["cpu"]
    digest = hashlib.md5(path.read_bytes()).hexdigest()[:8]
    command = net.training_info.get("command", "no training record")
    return (f"`{path.name}` (md5 {digest}, {net.training_info.get('steps', '?')} steps of "
            f"`{command}`), lambda = {float(net.lam.detach()):.3f}")


def column_label(column):
    weights, estimate = column
    return f"{weights} {estimate}"


def cell(errors):
    return (f"{fmt(np.mean(errors))} / {fmt(np.median(errors))} "
            f"({int((errors > FAIL_MM).sum())}/{len(errors)})")


def fmt(value):
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


# --------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + DATA_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES),
                        type=lambda name: name.replace("-", " "),
                        metavar="{small,any-rotation}")
    parser.add_argument("--volumes", type=int, default=None,
                        help="moved volumes per case and regime (16; --quick: 3)")
    parser.add_argument("--quick", action="store_true",
                        help="3 moved volumes, classical/manual masks only (3.1 min measured with "
                             "another job on both cores; not measured idle)")
    parser.add_argument("--no-true-masks", dest="true_masks", action="store_false",
                        help="leave out the adult cases' runs with the true moved masks")
    parser.add_argument("--weights", default=None, help="network checkpoint (packaged)")
    parser.add_argument("--untrained-seed", type=int, default=0,
                        help="torch seed of the untrained network's random weights (0)")
    parser.add_argument("--seed", type=int, default=0, help="motion and noise seed (0)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--write", type=Path, default=None,
                        help="also write the results as section 12 of this markdown file")
    args = parser.parse_args(argv)
    if args.volumes is None:
        args.volumes = 3 if args.quick else 16
    if args.quick:
        args.true_masks = False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    root = data_dir()
    machine = machine_line()
    run_start = time.perf_counter()
    warm_up()
    packaged = load_network(args.weights, "cpu")
    torch.manual_seed(args.untrained_seed)
    untrained = UniMoRigidNet("cpu", packaged.num_keypoints).eval()
    networks = {"packaged": packaged, "untrained": untrained}

    errors = {}  # (case, regime, masks) -> {column: (errors, seconds per volume)}
    mask_notes = {}  # (case, regime) -> classical masks against the true ones
    notes = []
    for case_index, name in enumerate(CASES):
        if name not in args.cases:
            continue
        still = CASES[name](root)
        notes.append(f"- `{name}`: {still.description}")
        sources = ["manual"] if still.brain_only else (
            ["classical", "true"] if args.true_masks else ["classical"])
        for regime_index, regime in enumerate(REGIMES):
            if regime not in args.regimes:
                continue
            rng = np.random.default_rng([args.seed, case_index, regime_index])
            case = moved_series(still, regime, args.volumes, rng)
            moved = np.arange(1, case.series.shape[-1])
            identity = np.repeat(np.eye(4)[None], len(case.truth), 0)
            for source in sources:
                margin = (TRACKING_MARGIN_MM if still.brain_only else
                          MASK_MARGIN_MM if source == "classical" else None)
                row = {"none": (mean_displacement(identity, case.truth, case.points)[moved],
                                None)}
                ref_mask, masks = masks_of(case, source)
                if source == "classical":
                    mask_notes[(name, regime)] = (
                        f"{dice(masks, case.true_masks).mean():.2f}, "
                        f"{ref_mask.sum() / case.true_masks[0].sum():.2f}, "
                        f"{np.ptp(masks.reshape(len(masks), -1).sum(1)) / ref_mask.sum():.2f}")
                for column, (transforms, seconds) in estimates(
                        case, ref_mask, masks, networks, margin,
                        rotation_search=still.brain_only).items():
                    row[column] = (mean_displacement(transforms, case.truth, case.points)[moved],
                                   seconds / case.series.shape[-1])
                errors[(name, regime, source)] = row
                print(f"{name}, {regime}, {source} masks: " + "; ".join(
                    f"{column if column == 'none' else column_label(column)} "
                    f"{np.round(e, 1).tolist()}" for column, (e, _) in row.items()),
                    file=sys.stderr, flush=True)
    wall = time.perf_counter() - run_start

    headers = (["case", "masks", "no correction"] + [column_label(c) for c in COLUMNS]
               + ["classical masks: Dice, reference / true volume, spread"])
    tables = []
    for regime in args.regimes:
        rows = [[name, source, cell(row["none"][0])]
                + [cell(row[c][0]) if c in row else "-" for c in COLUMNS]
                + [mask_notes[(name, regime)] if source == "classical" else "-"]
                for (name, reg, source), row in errors.items() if reg == regime]
        tables += [f"**{regime}**: mean / median error (mm) over the moved volumes (failures "
                   f"> {FAIL_MM:g} mm)", "", markdown_table(headers, rows), ""]

    pooled_rows = []
    for regime in args.regimes:
        for sources, label in ((("classical", "manual"), "classical (fetal: manual)"),
                               (("true", "manual"), "true (fetal: manual)")):
            rows = [row for (name, reg, source), row in errors.items()
                    if reg == regime and source in sources and name != "mni-control"]
            if not rows or (label.startswith("true") and not args.true_masks):
                continue
            cells = []
            for column in ["none"] + COLUMNS:
                found = [row[column][0] for row in rows if column in row]
                cells.append(cell(np.concatenate(found)) if len(found) == len(rows) else "-")
            pooled_rows.append([regime, label] + cells)
    timing = {}
    for row in errors.values():
        for column, (_, seconds) in row.items():
            if seconds is not None:
                timing.setdefault(column[0] if column[1] != "fused + refinement"
                                  else "packaged + refinement", []).append(seconds)
    timing_line = "; ".join(f"{label} {np.mean(s):.2f}" for label, s in timing.items())

    text = "\n".join([
        SECTION, "", f"Command: `{command_line()}`", "", f"Machine: {machine}", "",
        f"Whole run: {wall / 60:.1f} min. Packaged weights: {weights_line(args.weights, packaged)}; "
        f"untrained weights: torch seed {args.untrained_seed}, lambda = "
        f"{float(untrained.lam.detach()):.3f}. {args.volumes} moved volumes per case and regime "
        f"(volume 0 the unmoved reference), seed {args.seed}; 1 % Gaussian noise.", "",
        f"Regimes: small = angle uniform in [0, {SMALL_DEG:g}] deg about a random axis, "
        f"+-{SMALL_MM:g} mm per axis; any rotation = uniform on SO(3), +-{ANY_MM:g} mm per axis. "
        f"Adult cases on a {ADULT_GRID[1]:g} mm grid of {ADULT_GRID[0]}^3, fetal cases on a "
        f"{FETAL_GRID[1]:g} mm grid of {FETAL_GRID[0]}^3. Masks: classical = the app's "
        "`reference_mask`/`brain_mask`; true = the still brain mask moved with each volume; "
        "manual = the fetal manual mask moved with the brain. Image = lambda 0, shape = "
        "lambda 1, fused = the network's lambda (the image branch where the branches' rotations "
        f"are over {MAX_FUSION_ANGLE_DEG:g} deg apart); refinement only with the app's masks "
        f"(fetal: inside the manual mask shrunk by {-TRACKING_MARGIN_MM:g} mm, with the 24 "
        "cube-rotation starts of --moving-anatomy). Last column, rows with "
        "classical masks: their mean Dice with the true masks, the reference mask's volume over "
        "the true one's, and the spread (max - min) of the volumes' mask sizes over the "
        "reference mask's.", "",
        *notes, "", *tables,
        f"**Unseen cases pooled** (every case but `mni-control`; mean / median (failures > "
        f"{FAIL_MM:g} mm)):", "",
        markdown_table(["regime", "masks", "no correction"] + [column_label(c) for c in COLUMNS],
                       pooled_rows), "",
        f"Seconds per volume (estimation only, masks and distance maps not included): "
        f"{timing_line}.", ""])
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
