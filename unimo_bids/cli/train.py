"""``unimo-bids-train``: train the rigid network, the velocity predictor, or both, alternating.

The anatomy is nilearn's MNI152 template and its grey/white-matter probability maps (shipped
with nilearn, no download); every training sample is a new random contrast of it, so no scan
from any dataset is needed or seen. The packaged weights were made with this command
(unimo_bids/data/weights/unimo_rigid_cpu.md gives the exact line).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .. import __version__


def mni_anatomy(resolution_mm: int = 2):
    """Tissue maps (grey, white, CSF, non-brain head) of nilearn's MNI152 2009 template."""
    from nilearn import datasets

    from ..unimo.training import Anatomy

    t1 = datasets.load_mni152_template(resolution=resolution_mm)
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=resolution_mm).dataobj, float)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=resolution_mm).dataobj, float)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution_mm).dataobj, float)
    head = np.asarray(t1.dataobj, dtype=float)
    head = head / np.percentile(head[head > 0], 99)
    csf = np.clip(brain - grey - white, 0.0, 1.0)
    brain_probability = np.clip(grey + white + csf, 0.0, 1.0)
    outside = np.clip(head, 0.0, 1.5) * (1.0 - brain_probability)
    tissues = np.stack([grey, white, csf, outside]).astype(np.float32)
    return Anatomy(tissues, brain_probability.astype(np.float32), t1.affine)


def repeatable_command(record: dict) -> str:
    """The command of a training record as it would run today: runs made before the
    deformation augmenter existed (no "deformation_mm" recorded) ran without it."""
    return record["command"] + ("" if "deformation_mm" in record else " --deformation-mm 0")


def model_card(summary: dict, checkpoint: str) -> str:
    """Markdown model card for a checkpoint from its training record."""
    from ..unimo.network import MAX_FUSION_ANGLE_DEG

    before = summary["validation_any_rotation_mm_before"]
    after = summary["validation_any_rotation_mm_after"]
    rows = "\n".join(f"| {name} | {before[name]:.2f} | {after[name]:.2f} |" for name in after)
    chain, previous = [], summary.get("continued_from")
    while previous:
        chain.append(f"    {repeatable_command(previous)}    # {previous['steps']} steps, "
                     f"{previous['seconds'] / 60:.1f} min, {previous['date']}")
        previous = previous.get("continued_from")
    history = ("\nstarting from the checkpoint made by (most recent first):\n\n"
               + "\n".join(chain) + "\n") if chain else ""
    deformation = summary.get("deformation_mm", 0.0)
    deformed = (f"each volume deformed by its own smooth random field of up to {deformation:g} "
                "mm (the geometric deformation augmenter), " if deformation else "")
    rounds = summary.get("alternating")
    alternated = (f" in {rounds['rounds']} round{'s' if rounds['rounds'] != 1 else ''}, each "
                  f"followed by {rounds['deformable_steps']} "
                  f"steps of the deformable predictor (`{rounds['velocity_output']}`) on pairs "
                  "realigned by this network"
                  + (" and the refinement" if rounds.get("realign") == "refined" else "")
                  + " (alternating optimisation)" if rounds else "")
    warmup = summary.get("supervised_warmup", 1.0)
    supervised = ("log(1 + mean displacement error over brain points, mm) of each branch and of "
                  "the fusion")
    loss = (supervised + "." if warmup >= 1 else
            f"for the first {100 * warmup:g} % of the steps {supervised}; then, without the "
            "known transform, 1 - NCC of the images plus the shape maps' mean squared "
            "difference after resampling through each estimate.")
    note = f"\n{summary['note']}\n" if summary.get("note") else ""
    images = summary.get("images") or []
    scans = ("No scan from any dataset was used, so nothing here is tuned to a benchmark's "
             "images." if not images else
             f"Scans used (as intensity classes, never their own contrast): {', '.join(images)}.")
    return f"""# UniMo rigid network: `{Path(checkpoint).name}`

Made with unimo-bids {summary["unimo_bids_version"]} on {summary["date"]} \
({summary["device"]}, torch {summary["torch_version"]}) by:

    {repeatable_command(summary)}
{note}{history}
A `--minutes` budget stops at a step count that depends on the machine; to run the same \
training elsewhere, give each command `--steps` with its step count here.

- **Architecture:** two E(3)-equivariant keypoint encoders (e3nn steerable voxel convolutions, \
preset `{summary["preset"]}`: {summary["parameters"]:,} parameters, \
{summary["keypoints"]} keypoints per branch), one on intensities and one on the signed distance \
map of the brain mask, each solved by weighted Kabsch; fused by SLERP with the learned weight \
lambda = {summary["lambda"]:.3f} (0 = image branch, 1 = shape branch).
- **Data:** {summary["anatomy"]}. Every sample is a new contrast (random tissue intensities, \
gamma, bias field, noise, with or without the head around the brain), moved by a random rigid \
transform (half uniform on SO(3), half up to 60 degrees; up to \
{summary.get('max_translation_mm', 20.0):g} mm), {deformed}a third cut by a static \
field-of-view plane (the image only); shape maps from masks thresholded at random levels, or \
for a {summary.get('classical_masks', 0.0):g} share of the pairs from the app's classical \
segmentation of each image. \
{scans}
- **Training:** {summary["steps"]} Adam steps of {summary["batch"]} pairs (learning rate \
{summary["learning_rate"]}, seed {summary["seed"]}), {summary["seconds"] / 60:.1f} minutes\
{alternated}. Loss: {loss}
- **Validation** ({summary["validation_pairs"]} fixed synthetic pairs, rotations uniform on \
SO(3); mean displacement error over the brain, mm):

| estimate | before training | after |
|---|---|---|
{rows}

Use: the network's fused estimate and its shape branch's start the test-time refinement \
(`unimo-bids`, default), or the fused estimate stands alone with `--no-refine`. At inference the \
fused estimate is the image branch's wherever the two branches' rotations are more than \
{MAX_FUSION_ANGLE_DEG:g} degrees apart (training fuses every pair). Measured accuracy on real \
volumes: docs/benchmarks.md.
"""


def velocity_card(record, args, net, checkpoint: str, command: str, seconds: float,
                  alternated: str = "", continued_from: dict | None = None) -> str:
    """Markdown model card for a velocity predictor from its training record."""
    from ..unimo.deform_net import FORMAT
    from ..unimo.epdiff import DEFAULT_BAND

    validated = "\n".join(f"| {step} | {error:.3f} |" for step, error in record.errors_mm)
    history = (f"\nstarting from the predictor made by:\n\n    {continued_from['command']}    "
               f"# {continued_from['steps']} steps\n" if continued_from else "")
    return f"""# UniMo deformable predictor: `{Path(checkpoint).name}`

Made with unimo-bids {__version__} on {datetime.date.today().isoformat()} ({args.device}, \
torch {torch.__version__}) by:

    {command}
{history}
- **Architecture:** `unimo.deform_net.VelocityUNet` (format `{FORMAT}`), widths \
{tuple(net.widths)}, {sum(p.numel() for p in net.parameters()):,} parameters. Input: the rigidly \
aligned volume and the reference (unit median in the brain), their demons force channels, and \
the signed distance maps of their brain masks, on a {args.grid_mm:g} mm grid. Output: the \
band-limited ({DEFAULT_BAND}^3) EPDiff initial velocity that starts the test-time optimisation.
- **Data:** nilearn's MNI152 2009 T1 template (2 mm, shipped with nilearn), on a {args.grid_mm:g} mm \
grid. Each pair: a random band-limited diffeomorphism (largest displacement \
{args.max_displacement[0]:g}-{args.max_displacement[1]:g} mm), gamma, contrast inversion (20 %), \
a smooth bias field and noise; the moving mask is the deformed mask thresholded at a random \
level. No scan from any dataset was used.
- **Training:** {len(record.losses)} Adam steps of {args.batch} pairs (learning rate \
{args.learning_rate}, seed {args.seed}), {seconds / 60:.1f} minutes; the first \
{record.supervised_steps} steps on the known velocity (mean squared error within 12 mm of the \
brain), the rest on the image + shape + regulariser loss{alternated}.
- **Validation:** {VALIDATION_PAIRS} held-out synthetic pairs (another seed); mean \
displacement error in the brain (mm). The identity (no correction) scores \
{record.zero_error_mm:.3f} mm.

| step | error mm |
|---|---|
{validated}

Use: `unimo-bids --deformable --deform-predictor` (or `--deform-weights` this file) starts each \
volume's optimisation from this prediction (made on the half-resolution working grid). Limits: trained on one T1-weighted template with synthetic \
deformations of a few mm; measured on real volumes in docs/benchmarks.md.
"""


VALIDATION_PAIRS = 8


def template_on_grid(grid_mm: float):
    """nilearn's MNI152 T1 template (2 mm) on the velocity predictor's training grid:
    ``deform_net.volume_on_grid``'s (volume, mask, spacing, grid affine)."""
    from nilearn import datasets

    from ..unimo import deform_net

    template = datasets.load_mni152_template(resolution=2)
    return deform_net.volume_on_grid(np.asarray(template.dataobj, dtype=np.float32),
                                     template.affine, spacing_mm=grid_mm)


def write_predictor(net, path: str, notes: dict, card: str) -> None:
    """The velocity predictor (through a .part file, so an interrupted write leaves no broken
    file) and its model card beside it."""
    from ..unimo import deform_net

    deform_net.save_predictor(net, path + ".part", notes)
    os.replace(path + ".part", path)
    Path(path).with_suffix(".md").write_text(card)


def train_deformable(args, command: str) -> int:
    """``--model deformable``: train the velocity predictor and write it with its model card."""
    from ..unimo import deform_net

    volume, mask, spacing, _ = template_on_grid(args.grid_mm)
    net = (deform_net.load_predictor(args.init) if args.init
           else deform_net.VelocityUNet()).train()
    started = datetime.datetime.now()

    def log(step, values):
        if step % 25 == 0:
            elapsed = (datetime.datetime.now() - started).total_seconds()
            of = f"/{args.steps}" if args.steps else ""
            print(f"step {step}{of}  loss {values['loss']:.4f}  "
                  f"{'supervised' if values['supervised'] else 'image+shape'}  "
                  f"{elapsed / 60:.1f} min", flush=True)

    record = deform_net.train_velocity_predictor(
        net, volume, mask, spacing, steps=args.steps, minutes=args.minutes, batch=args.batch,
        learning_rate=args.learning_rate, warmup=args.warmup,
        max_displacement_mm=tuple(args.max_displacement), validation_size=VALIDATION_PAIRS,
        validate_every=args.validate_every, seed=args.seed, log=log)
    seconds = (datetime.datetime.now() - started).total_seconds()
    print(f"held-out error: identity {record.zero_error_mm:.3f} mm, "
          f"untrained {record.errors_mm[0][1]:.3f} mm, trained {record.final_error_mm:.3f} mm")
    write_predictor(net, args.output, {"command": command, "steps": len(record.losses),
                                       "errors_mm": record.errors_mm,
                                       "zero_error_mm": record.zero_error_mm},
                    velocity_card(record, args, net, args.output, command, seconds))
    print(f"wrote {args.output} and its model card {Path(args.output).with_suffix('.md')}")
    return 0


def train_both(args, command: str, net, anatomies, finish) -> int:
    """``--model both``: alternate the rigid network (``net``) and the velocity predictor;
    write both, with their model cards, after every round."""
    from ..unimo import deform_net
    from ..unimo.alternating import (REALIGN_MAX_ROTATION_DEG, REALIGN_MAX_TRANSLATION_MM,
                                     DeformableVolume, train_alternating)

    data = DeformableVolume(*template_on_grid(args.grid_mm))
    continued_from = None
    try:
        velocity_net = (deform_net.load_predictor(args.init_deformable) if args.init_deformable
                        else deform_net.VelocityUNet()).train()
    except ValueError as err:
        print(f"unimo-bids-train: error: {err}", file=sys.stderr)
        return 2
    if args.init_deformable:
        notes = torch.load(args.init_deformable, weights_only=True)["notes"]
        continued_from = {key: notes[key] for key in ("command", "steps") if key in notes}
    velocity_output = args.velocity_output or str(
        Path(args.output).with_name(Path(args.output).name.removesuffix(".pt") + "_velocity.pt"))
    rigid_steps, deformable_steps = args.round_steps
    schedule = {"rounds": args.rounds, "rigid_steps": rigid_steps,
                "deformable_steps": deformable_steps,
                "velocity_output": Path(velocity_output).name, "realign": args.realign}
    started = datetime.datetime.now()
    alternated = (f", in {args.rounds} rounds alternated with {rigid_steps} steps of the rigid "
                  f"network (`{Path(args.output).name}`) each; the unsupervised steps see the "
                  f"moving volume moved by a random rigid motion (up to "
                  f"{REALIGN_MAX_ROTATION_DEG:g} degrees, {REALIGN_MAX_TRANSLATION_MM:g} mm) and "
                  + ("realigned by the app's rigid stage (that network's estimate, refined)"
                     if args.realign == "refined" else
                     "realigned by that network's fused estimate alone")
                  + ", so the predictor learns what the rigid stage leaves")

    def write(rounds_done, rigid_summary, record):
        summary = finish(dict(rigid_summary, alternating=dict(schedule, rounds=rounds_done)))
        Path(args.output).with_suffix(".md").write_text(model_card(summary, args.output))
        seconds = (datetime.datetime.now() - started).total_seconds()
        write_predictor(velocity_net, velocity_output, {
            "command": command, "steps": len(record.losses), "errors_mm": record.errors_mm,
            "zero_error_mm": record.zero_error_mm, "rigid_network": Path(args.output).name,
            "continued_from": continued_from}, velocity_card(
                record, args, velocity_net, velocity_output, command, seconds, alternated,
                continued_from))
        print(f"round {rounds_done}: wrote {args.output} and {velocity_output} with their model "
              "cards", flush=True)

    train_alternating(
        net, velocity_net, anatomies, data, args.rounds, rigid_steps, deformable_steps,
        batch=args.batch, deformable_batch=args.batch, learning_rate=args.learning_rate,
        deformable_learning_rate=args.learning_rate, warmup=args.warmup, seed=args.seed,
        max_translation_mm=args.max_translation, classical_masks=args.classical_masks,
        deformation_mm=args.deformation_mm, max_displacement_mm=tuple(args.max_displacement),
        after_round=write, validate_every=args.validate_every,
        validation_pairs=args.validation_pairs, supervised_warmup=args.supervised_warmup,
        refine=args.realign == "refined",
        log=lambda text: print(text, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimo-bids-train", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="checkpoint to write (.pt)")
    parser.add_argument("--model", choices=("rigid", "deformable", "both"), default="rigid",
                        help="rigid: the keypoint network; deformable: the velocity predictor "
                             "of --deformable; both: the two, by alternating optimisation "
                             "(default: rigid)")
    parser.add_argument("--preset", choices=("cpu", "cuda"), default="cpu",
                        help="working grid and network size (default: cpu)")
    parser.add_argument("--device", default="cpu", help="torch device to train on")
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-time budget")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="stop after N steps if the time budget lasts that long (the same "
                             "seed and step count repeat a run on another machine)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--keypoints", type=int, default=16, help="keypoints per branch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="start from this checkpoint instead of random weights")
    parser.add_argument("--resume", help="continue this checkpoint's run (weights and optimizer "
                                         "state); it may be the output itself")
    parser.add_argument("--checkpoint-minutes", type=float, default=10.0,
                        help="write the output every N minutes while training, so that an "
                             "interrupted run can --resume (0: only at the end; default 10; "
                             "--model both writes after every round)")
    parser.add_argument("--images", nargs="+", metavar="PATH",
                        help="rigid model: also train on these NIfTI images or folders of them "
                             "(4D: their mean); each becomes intensity classes of random "
                             "contrast")
    parser.add_argument("--bids-dir", type=Path, metavar="DIR",
                        help="rigid model: also train on the BOLD series of this BIDS dataset")
    parser.add_argument("--no-template", action="store_true",
                        help="rigid model: leave out nilearn's MNI152 template")
    parser.add_argument("--max-translation", type=float, default=30.0, metavar="MM",
                        help="rigid model: translations up to this many mm per axis (default 30)")
    parser.add_argument("--deformation-mm", type=float, default=3.0, metavar="MM",
                        help="rigid model: the geometric deformation augmenter deforms each "
                             "volume by up to this many mm besides its rigid motion (0: off; "
                             "default 3)")
    parser.add_argument("--validate-every", type=int, default=100, metavar="N",
                        help="held-out validation every N steps (default 100)")
    parser.add_argument("--supervised-warmup", type=float, default=1.0, metavar="SHARE",
                        help="rigid model: share of the steps trained on the known transform; "
                             "the rest on the image and shape alignment loss (1 - NCC, shape "
                             "MSE), which needs no known transform (default 1: all supervised)")
    parser.add_argument("--validation-pairs", type=int, default=32, metavar="N",
                        help="rigid model: fixed synthetic pairs of the validation (default 32)")
    parser.add_argument("--classical-masks", type=float, default=0.5, metavar="SHARE",
                        help="rigid model: share of pairs whose shape maps come from the app's "
                             "classical segmentation of each image, not the anatomy's brain "
                             "mask (default 0.5)")
    parser.add_argument("--nthreads", type=int, default=0, help="torch CPU threads (0: all)")
    deformable = parser.add_argument_group("deformable predictor (--model deformable or both)")
    deformable.add_argument("--grid-mm", type=float, default=6.0,
                            help="training grid spacing: twice the working grid's (default 6)")
    deformable.add_argument("--warmup", type=float, default=0.5,
                            help="share of the time trained on the known velocity (--model "
                                 "both: of the first round's deformable steps; default 0.5)")
    deformable.add_argument("--max-displacement", type=float, nargs=2, default=(1.0, 6.0),
                            metavar=("LOW", "HIGH"),
                            help="largest displacement of each pair, drawn in [LOW, HIGH] mm")
    both = parser.add_argument_group(
        "alternating optimisation (--model both): rounds of rigid steps, then deformable steps "
        "on the rigid network's realignments; OUTPUT is the rigid network")
    both.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    both.add_argument("--round-steps", type=int, nargs=2, default=(100, 100),
                      metavar=("RIGID", "DEFORMABLE"),
                      help="Adam steps of each stage per round (default 100 100)")
    both.add_argument("--velocity-output", metavar="PATH",
                      help="the velocity predictor to write (default: OUTPUT's name with "
                           "_velocity.pt)")
    both.add_argument("--realign", choices=("refined", "network"), default="refined",
                      help="what realigns the deformable stage's pairs: the app's rigid stage "
                           "(network and refinement, as unimo-bids runs; default) or the "
                           "network alone (the paper's pipeline, as --no-refine)")
    both.add_argument("--init-deformable", metavar="PATH",
                      help="start the velocity predictor from this file (e.g. the packaged "
                           "one) instead of random weights")
    return parser


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def training_images(paths, bids_dir) -> list[Path]:
    """NIfTI files named by --images (files, or folders searched recursively) and the BOLD
    series of a --bids-dir dataset (pybids, no validation), sorted."""
    found = []
    for path in paths or []:
        path = Path(path)
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.name.endswith(NIFTI_SUFFIXES)]
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    if bids_dir is not None:
        from bids import BIDSLayout

        layout = BIDSLayout(str(bids_dir), validate=False)
        bold = layout.get(suffix="bold", extension=[".nii", ".nii.gz"], return_type="file")
        if not bold:
            raise ValueError(f"{bids_dir}: no BOLD series in this BIDS dataset")
        found += [Path(p) for p in bold]
    return sorted(set(found))


def image_anatomy(path: Path):
    """Tissue maps of one image (its temporal mean when 4D) and its classical brain mask."""
    import nibabel as nb

    from ..unimo.geometry import voxel_sizes
    from ..unimo.segment import reference_mask
    from ..unimo.training import anatomy_from_image

    try:
        img = nb.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many kinds for a broken file
        raise ValueError(f"{path}: cannot be read as NIfTI ({type(err).__name__})") from None
    if data.ndim == 4:
        data = data.mean(axis=-1)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D or 4D image, got {data.ndim}D")
    mask = reference_mask(data, tuple(voxel_sizes(img.affine)))
    return anatomy_from_image(data, img.affine, mask)


def main(argv=None) -> int:
    from ..unimo.network import UniMoRigidNet, load_network, save_network
    from ..unimo.training import train

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.model == "both":
        if args.resume:
            parser.error("--resume continues a rigid run; to continue --model both, give "
                         "--init and --init-deformable")
        if args.rounds < 1 or min(args.round_steps) < 1:
            parser.error("--rounds and --round-steps must be at least 1")
    if args.nthreads > 0:
        torch.set_num_threads(args.nthreads)
    torch.manual_seed(args.seed)
    start_from = args.resume or args.init
    if os.path.abspath(args.output) == os.path.abspath(start_from or "") and not args.resume:
        print("unimo-bids-train: error: output would overwrite --init", file=sys.stderr)
        return 2
    command = "unimo-bids-train " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.model == "deformable":
        return train_deformable(args, command)
    try:
        net = (load_network(start_from) if start_from
               else UniMoRigidNet(args.preset, args.keypoints)).to(args.device)
        images = training_images(args.images, args.bids_dir)
        anatomies = ([] if args.no_template else [mni_anatomy()])
        anatomies += [image_anatomy(path) for path in images]
    except ValueError as err:
        print(f"unimo-bids-train: error: {err}", file=sys.stderr)
        return 2
    if not anatomies:
        print("unimo-bids-train: error: --no-template needs --images or --bids-dir",
              file=sys.stderr)
        return 2
    optimizer_state = None
    if args.resume:
        optimizer_state = torch.load(args.resume, map_location="cpu",
                                     weights_only=True).get("optimizer_state")
    described = (["nilearn MNI152 2009 template + GM/WM maps, 2 mm"] if not args.no_template
                 else []) + [f"{p.name} (intensity classes)" for p in images]
    anatomy_text = "; ".join(described) + "; random contrasts"

    def finish(summary: dict) -> dict:
        summary = dict(summary)
        optimizer = summary.pop("optimizer_state", None)
        summary.update({
            "command": command, "unimo_bids_version": __version__,
            "torch_version": str(torch.__version__), "date": datetime.date.today().isoformat(),
            "device": str(args.device), "anatomy": anatomy_text,
            "images": [str(p) for p in images],
            "preset": net.preset, "keypoints": net.num_keypoints,
            "parameters": sum(p.numel() for p in net.parameters())})
        if start_from:  # keep the whole chain: the card must say how the weights were made
            summary["continued_from"] = getattr(net, "training_info", {})
        tmp = args.output + ".part"
        save_network(net, tmp, summary, optimizer_state=optimizer)
        os.replace(tmp, args.output)
        return summary

    def checkpoint(summary: dict) -> None:
        finish(summary)
        print(f"checkpoint: {args.output} after {summary['steps']} steps", flush=True)

    if args.model == "both":
        return train_both(args, command, net, anatomies, finish)
    summary = train(net, anatomies, args.minutes, batch=args.batch,
                    learning_rate=args.learning_rate, seed=args.seed,
                    max_translation_mm=args.max_translation,
                    classical_masks=args.classical_masks, optimizer_state=optimizer_state,
                    checkpoint=checkpoint, checkpoint_minutes=args.checkpoint_minutes,
                    max_steps=args.steps, deformation_mm=args.deformation_mm,
                    validate_every=args.validate_every,
                    validation_pairs=args.validation_pairs,
                    supervised_warmup=args.supervised_warmup)
    summary = finish(summary)
    card = Path(args.output).with_suffix(".md")
    card.write_text(model_card(summary, args.output))
    print(f"wrote {args.output} and its model card {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
