"""``unimo-bids-train-seg``: train the brain segmenter (a small 3D UNet) and write TorchScript.

The synthetic training anatomy is nilearn's MNI152 template with its grey/white-matter maps and
brain mask (shipped with nilearn, no download): every sample is a new composite (a scaled,
rotated brain with random tissue contrasts, in random surroundings, with thick slices, noise
and bias; unimo_bids/unimo/seg_training.py). Real stacks with manual brain masks
(``--fetal-dir``: ``sub-01_run-N_T2w.nii.gz`` + ``sub-01_run-N_T2w_desc-brain_mask.nii.gz``)
can be added as training samples (``--train-runs``) and held out for validation
(``--val-runs``). Writes the TorchScript file and a model card ``<OUTPUT without .pt>.md``
with the validation Dice of the model and of the classical default mask on the same stacks.
The packaged segmenter was made with this command (its model card gives the exact line).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__

PROG = "unimo-bids-train-seg"


def read_labelled(image_path: Path, mask_path: Path, name: str):
    """A LabelledStack from a 3D image and its mask file; ValueError (one line) if unusable."""
    import nibabel as nib

    from ..unimo.seg_training import LabelledStack

    for path in (image_path, mask_path):
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
    try:
        image_nii, mask_nii = nib.load(str(image_path)), nib.load(str(mask_path))
        image = np.asarray(image_nii.dataobj, dtype=np.float32)
        mask = np.asarray(mask_nii.dataobj) > 0
    except Exception as error:  # nibabel raises many kinds for broken files
        raise ValueError(f"{image_path}: cannot read ({' '.join(str(error).split())})") \
            from None
    image = image.reshape(image.shape[:3]) if image.ndim == 4 and image.shape[3] == 1 else image
    mask = mask.reshape(mask.shape[:3]) if mask.ndim == 4 and mask.shape[3] == 1 else mask
    if image.ndim != 3 or image.shape != mask.shape:
        raise ValueError(f"{image_path}: need a 3D image and a mask of the same shape, got "
                         f"{image.shape} and {mask.shape} ({mask_path.name})")
    if not np.isfinite(image).all():
        raise ValueError(f"{image_path}: contains NaN or infinite values")
    if not mask.any():
        raise ValueError(f"{mask_path}: the mask is empty")
    if not np.allclose(image_nii.affine, mask_nii.affine, atol=1e-3):
        raise ValueError(f"{mask_path}: affine differs from that of {image_path.name}")
    return LabelledStack(image, mask, np.asarray(image_nii.affine, float), name)


def fetal_runs(folder: str, runs) -> list:
    """LabelledStacks of ``sub-01_run-N_T2w`` (+ ``_desc-brain_mask``) in ``folder``."""
    base = Path(folder)
    return [read_labelled(base / f"sub-01_run-{run}_T2w.nii.gz",
                          base / f"sub-01_run-{run}_T2w_desc-brain_mask.nii.gz",
                          f"sub-01_run-{run}_T2w")
            for run in runs]


def compare_with_classical(model, stacks) -> list:
    """Per stack: Dice of the model's and the classical mask against the manual mask, and
    the model's inference seconds."""
    from ..unimo.geometry import voxel_sizes
    from ..unimo.seg_training import native_dice
    from ..unimo.segment import brain_mask
    from ..unimo.segnet import segment_with_model

    rows = []
    for stack in stacks:
        start = time.monotonic()
        mask = segment_with_model(model, stack.image, stack.affine)
        seconds = time.monotonic() - start
        classical = brain_mask(stack.image[None], voxel_sizes(stack.affine))[0]
        rows.append({"name": stack.name, "shape": list(stack.image.shape),
                     "voxel_mm": [round(float(v), 3) for v in voxel_sizes(stack.affine)],
                     "model_dice": native_dice(mask, stack.mask),
                     "classical_dice": native_dice(classical, stack.mask),
                     "model_seconds": round(seconds, 2)})
    return rows


def model_card(summary: dict, output: str) -> str:
    """Markdown model card of a trained segmenter from its training record."""
    rows = "\n".join(
        f"| {r['name']} ({'x'.join(map(str, r['shape']))}, "
        f"{'x'.join(f'{v:g}' for v in r['voxel_mm'])} mm) | {r['role']} | "
        f"{r['model_dice']:.3f} | {r['classical_dice']:.3f} |"
        for r in summary["comparison"]) or "| (no labelled stacks given) | | | |"
    best = summary["best"]
    history = "\n".join(
        f"| {h['step']} | {h['seconds'] / 60:.1f} | {h['synthetic_dice']:.3f} | "
        + (", ".join(f"{v:.3f}" for v in h["stack_dice"].values()) or "-") + " |"
        for h in summary["history"])
    chain, previous = [], summary.get("continued_from")
    total_minutes = summary["seconds"] / 60
    while previous:
        total_minutes += previous["seconds"] / 60
        chain.append(f"    {previous['command']}    # {previous['steps']} steps, "
                     f"{previous['seconds'] / 60:.1f} min, {previous['date']}")
        previous = previous.get("continued_from")
    history_note = ("\nstarting from the weights made by (most recent first):\n\n"
                    + "\n".join(chain) + "\n") if chain else ""
    after = " after the runs above" if chain else ""
    variation = ("each axis stretched by 0.88-1.12 and most brains warped by a smooth random "
                 "field of up to 5 % of their size (`--shape-variation`), "
                 if summary.get("shape_variation") else "")
    stretched = ", stretched and warped" if summary.get("shape_variation") else ""
    largest = max(summary["grid_shapes"], key=lambda shape: int(np.prod(shape)))
    fields = (f"; training grids of up to {'x'.join(map(str, largest))} working voxels "
              "(`--large-fields`)" if summary.get("large_fields") else "")
    return f"""# Brain segmenter: `{Path(output).name}`

Made with unimo-bids {summary["unimo_bids_version"]} on {summary["date"]} \
({summary["device"]}, {summary["threads"]} CPU thread(s), torch {summary["torch_version"]}) by:

    {summary["command"]}
{history_note}
- **Use:** `unimo-bids ... --seg-model {Path(output).name}`, or
  `unimo_bids.unimo.segnet.load_segmenter` + `segment_with_model` (TorchScript; the record
  `unimo_segmenter.json` inside the file holds this training information).
- **Architecture:** 3D UNet, {len(summary["widths"])} levels of widths {summary["widths"]} \
(two 3^3 convolutions + instance norm + leaky ReLU per block, max pooling, trilinear \
upsampling), {summary["parameters"]:,} parameters; input: intensities divided by the 99th \
percentile of the non-zero voxels, on an isotropic {summary["spacing_mm"]:g} mm grid aligned \
with the image axes and covering its field of view; output: brain probability, mapped back to \
the native grid (trilinear), thresholded at 0.5, largest component, holes filled.
- **Data:** {summary["anatomy"]}, as synthetic composites: brain scaled 0.35-0.85 (fetal) or \
0.9-1.1 (adult), any rotation, {variation}random tissue contrasts, inside random shells \
(CSF, skull, fluid rim or scalp) and a static random "maternal" texture or air; gamma, bias \
field, thick slices, per-slice brain motion, noise, field-of-view cuts{fields}. Real stacks \
with manual masks used for training ({summary["real_fraction"]:.0%} of the samples, augmented): \
{", ".join(summary["train_stacks"]) or "none"}. Held out for validation and model selection: \
{", ".join(summary["val_stacks"]) or "none"}.
- **Training (this run):** {summary["steps"]} Adam steps of up to {summary["batch"]} samples \
(fewer on grids larger than 56^3; learning rate {summary["learning_rate"]} with cosine decay, \
seed {summary["seed"]}), {summary["seconds"] / 60:.1f} minutes{after}. Loss: binary \
cross-entropy + soft Dice. Kept: the weights of step {best["step"]} (best mean of synthetic \
and held-out Dice).

## Dice against manual masks (native grid)

| image | role | this model | classical `brain_mask` |
|---|---|---|---|
{rows}

Validation during training (synthetic: {summary["synthetic_validation_samples"]} fixed \
composites on 64^3 grids; held-out: the stacks above):

| step | minutes | synthetic Dice | held-out Dice |
|---|---|---|---|
{history}

## Limits

- The only real fetal data are two stacks of one fetus from one scanner (1.5 T Siemens \
HASTE); the held-out stack is the same fetus minutes later, so its Dice is optimistic for \
other fetuses, gestational ages, scanners and sequences, and it also chose the kept weights.
- One synthetic anatomy (the adult MNI152 brain, scaled{stretched}); fetal brains have other \
shapes (smoother cortex, larger ventricles) that only the real stacks show.
- Trained on {summary["threads"]} CPU thread(s) for {total_minutes:.0f} minutes in all: \
a small network, not converged; more time (or a GPU: `--device cuda`) should help.
- The mask is of the brain inside the field of view; a brain cut by the field of view is \
cut too.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("output", help="TorchScript file to write (.pt)")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-time budget")
    parser.add_argument("--batch", type=int, default=2, help="samples per step")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device to train on")
    parser.add_argument("--nthreads", type=int, default=0, help="torch CPU threads (0: all)")
    parser.add_argument("--fetal-dir", help="folder with sub-01_run-N_T2w.nii.gz and "
                        "sub-01_run-N_T2w_desc-brain_mask.nii.gz")
    parser.add_argument("--train-runs", type=int, nargs="*", default=[1],
                        help="runs of --fetal-dir used as training samples (default: 1)")
    parser.add_argument("--val-runs", type=int, nargs="*", default=[2],
                        help="runs of --fetal-dir held out for validation (default: 2)")
    parser.add_argument("--real-fraction", type=float, default=0.2,
                        help="share of training samples drawn from the real training stacks")
    parser.add_argument("--shape-variation", action="store_true",
                        help="stretch each axis of the synthetic brains by 0.88-1.12 and warp "
                             "most by a smooth random field of up to 5 %% of their size "
                             "(off by default: the packaged segmenter was trained without)")
    parser.add_argument("--large-fields", action="store_true",
                        help="also train on whole-body cubes of 96^3 and 108x108x72 working "
                             "voxels (288-324 mm), as stacks resampled onto large isotropic "
                             "grids look (off by default: the packaged segmenter was trained "
                             "without)")
    parser.add_argument("--init", help="continue training from this segmenter (TorchScript "
                        "file written by this command) instead of random weights")
    parser.add_argument("--eval", nargs=2, action="append", default=[],
                        metavar=("IMAGE", "MASK"),
                        help="extra labelled 3D image to report in the model card (not used "
                             "for training or selection); repeatable")
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    argv = list(argv) if argv is not None else sys.argv[1:]
    if args.minutes <= 0 or args.batch < 1:
        return _fail("--minutes and --batch must be positive")
    if not 0.0 <= args.real_fraction <= 1.0:
        return _fail("--real-fraction must be between 0 and 1")
    output = Path(args.output)
    if not output.parent.is_dir():
        return _fail(f"{output.parent}: no such folder for the output")
    if set(args.train_runs) & set(args.val_runs) and args.fetal_dir:
        return _fail("--train-runs and --val-runs overlap")
    if args.nthreads > 0:
        torch.set_num_threads(args.nthreads)
    try:
        torch.device(args.device)
    except RuntimeError:
        return _fail(f"--device {args.device}: not a torch device")

    from ..unimo.seg_training import GRID_SHAPES, LARGE_GRID_SHAPES, train_segmenter
    from ..unimo.segnet import load_segmenter, save_segmenter
    from .train import mni_anatomy

    if args.init and os.path.abspath(args.init) == os.path.abspath(args.output):
        return _fail("output would overwrite --init")
    try:
        initial, previous = (load_segmenter(args.init) if args.init else (None, None))
        train_stacks = fetal_runs(args.fetal_dir, args.train_runs) if args.fetal_dir else []
        val_stacks = fetal_runs(args.fetal_dir, args.val_runs) if args.fetal_dir else []
        extra = [read_labelled(Path(image), Path(mask), Path(image).name.split(".")[0])
                 for image, mask in args.eval]
        anatomy = mni_anatomy()
    except (ValueError, OSError) as error:
        return _fail(str(error))

    def progress(line: str) -> None:
        print(f"[{datetime.datetime.now():%H:%M:%S}] {line}", flush=True)

    progress(f"training on {args.device} for {args.minutes:g} min; real training stacks: "
             f"{[s.name for s in train_stacks] or 'none'}, held out: "
             f"{[s.name for s in val_stacks] or 'none'}")
    try:
        model, summary = train_segmenter(
            [anatomy], train_stacks, val_stacks, minutes=args.minutes, batch=args.batch,
            lr=args.learning_rate, seed=args.seed, device=args.device, progress=progress,
            real_fraction=args.real_fraction, shape_variation=args.shape_variation,
            shapes=GRID_SHAPES + (LARGE_GRID_SHAPES if args.large_fields else ()),
            initial_state=initial.state_dict() if initial is not None else None,
            **({"widths": previous["widths"], "spacing_mm": previous["spacing_mm"]}
               if previous else {}))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    comparison = []
    for role, stacks in (("held out", val_stacks), ("training", train_stacks),
                         ("extra", extra)):
        for row in compare_with_classical(model, stacks):
            row["role"] = role
            comparison.append(row)
            progress(f"{row['name']} ({role}): Dice model {row['model_dice']:.3f}, "
                     f"classical {row['classical_dice']:.3f}")
    summary.update({
        "command": f"{PROG} " + " ".join(argv), "unimo_bids_version": __version__,
        "torch_version": str(torch.__version__), "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(), "comparison": comparison,
        "large_fields": args.large_fields,
        "anatomy": "nilearn's MNI152 2009 template (GM/WM/CSF maps and brain mask, 2 mm)"})
    if previous:  # keep the whole chain: the card must say how the weights were made
        summary["continued_from"] = {key: previous.get(key) for key in (
            "command", "steps", "seconds", "date", "threads", "device", "continued_from")}
    tmp = output.with_name(output.name + ".part")
    try:
        save_segmenter(model, tmp, summary)
        os.replace(tmp, output)
        card = output.with_suffix(".md")
        card.write_text(model_card(summary, str(output)))
    except OSError as error:
        return _fail(f"{output}: cannot write ({error.strerror or error})")
    except Exception as error:  # scripting failed (e.g. segnet.py edited during training)
        rescue = output.with_name(output.name + ".state_dict")
        torch.save({"state_dict": model.state_dict(), "record": summary}, rescue)
        return _fail(f"{output}: cannot write TorchScript ({' '.join(str(error).split())[:200]}); "
                     f"the trained weights are in {rescue} (torch.save of a state_dict)")
    progress(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB) and its model card {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
