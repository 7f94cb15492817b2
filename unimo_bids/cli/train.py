"""``unimo-bids-train``: train the UniMo rigid network (CPU or GPU) and write a checkpoint.

The anatomy is nilearn's MNI152 template and its grey/white-matter probability maps (shipped
with nilearn, no download); every training sample is a new random contrast of it, so no scan
from any dataset is needed or seen. The packaged weights were made with this command
(unimo_bids/data/MODEL_CARD.md gives the exact line).
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


def model_card(summary: dict, checkpoint: str) -> str:
    """Markdown model card for a checkpoint from its training record."""
    before = summary["validation_any_rotation_mm_before"]
    after = summary["validation_any_rotation_mm_after"]
    rows = "\n".join(f"| {name} | {before[name]:.2f} | {after[name]:.2f} |" for name in after)
    chain, previous = [], summary.get("continued_from")
    while previous:
        chain.append(f"    {previous['command']}    # {previous['steps']} steps, "
                     f"{previous['seconds'] / 60:.1f} min, {previous['date']}")
        previous = previous.get("continued_from")
    history = ("\nstarting from the checkpoint made by (most recent first):\n\n"
               + "\n".join(chain) + "\n") if chain else ""
    return f"""# UniMo rigid network: `{Path(checkpoint).name}`

Made with unimo-bids {summary["unimo_bids_version"]} on {summary["date"]} \
({summary["device"]}, torch {summary["torch_version"]}) by:

    {summary["command"]}
{history}
- **Architecture:** two E(3)-equivariant keypoint encoders (e3nn steerable voxel convolutions, \
preset `{summary["preset"]}`: {summary["parameters"]:,} parameters, \
{summary["keypoints"]} keypoints per branch), one on intensities and one on the signed distance \
map of the brain mask, each solved by weighted Kabsch; fused by SLERP with the learned weight \
lambda = {summary["lambda"]:.3f} (0 = image branch, 1 = shape branch).
- **Data:** {summary["anatomy"]}. Every sample is a new contrast (random tissue intensities, \
gamma, bias field, noise, with or without the head around the brain), moved by a random rigid \
transform (half uniform on SO(3), half up to 60 degrees; up to 20 mm), a third cut by a static \
field-of-view plane (the image only); shape maps from masks thresholded at random levels. No scan from any \
dataset was used, so nothing here is tuned to a benchmark's images.
- **Training:** {summary["steps"]} Adam steps of {summary["batch"]} pairs (learning rate \
{summary["learning_rate"]}, seed {summary["seed"]}), {summary["seconds"] / 60:.1f} minutes. \
Loss: log(1 + mean displacement error over brain points, mm) of each branch and of the fusion.
- **Validation** ({summary["validation_pairs"]} fixed synthetic pairs, rotations uniform on \
SO(3); mean displacement error over the brain, mm):

| estimate | before training | after |
|---|---|---|
{rows}

Use: the network's fused estimate starts the test-time refinement (`unimo-bids`, default), or \
stands alone with `--no-refine`. Measured accuracy on real volumes: docs/benchmarks.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimo-bids-train", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="checkpoint to write (.pt)")
    parser.add_argument("--preset", choices=("cpu", "cuda"), default="cpu",
                        help="working grid and network size (default: cpu)")
    parser.add_argument("--device", default="cpu", help="torch device to train on")
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-time budget")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--keypoints", type=int, default=16, help="keypoints per branch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", help="start from this checkpoint instead of random weights")
    parser.add_argument("--nthreads", type=int, default=0, help="torch CPU threads (0: all)")
    return parser


def main(argv=None) -> int:
    from ..unimo.network import UniMoRigidNet, load_network, save_network
    from ..unimo.training import train

    args = build_parser().parse_args(argv)
    if args.nthreads > 0:
        torch.set_num_threads(args.nthreads)
    torch.manual_seed(args.seed)
    if os.path.abspath(args.output) == os.path.abspath(args.init or ""):
        print("unimo-bids-train: error: output would overwrite --init", file=sys.stderr)
        return 2
    net = (load_network(args.init) if args.init
           else UniMoRigidNet(args.preset, args.keypoints)).to(args.device)
    anatomy = mni_anatomy()
    summary = train(net, anatomy, args.minutes, batch=args.batch,
                    learning_rate=args.learning_rate, seed=args.seed)
    summary.update({
        "command": "unimo-bids-train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "unimo_bids_version": __version__, "torch_version": str(torch.__version__),
        "date": datetime.date.today().isoformat(), "device": str(args.device),
        "anatomy": "nilearn MNI152 2009 template + GM/WM maps, 2 mm, random contrasts"})
    if args.init:  # keep the whole chain: the card must say how the weights were made
        summary["continued_from"] = getattr(net, "training_info", {})
    summary.update({"preset": net.preset, "keypoints": net.num_keypoints,
                    "parameters": sum(p.numel() for p in net.parameters())})
    tmp = args.output + ".part"
    save_network(net.cpu(), tmp, summary)
    os.replace(tmp, args.output)
    card = Path(args.output).with_suffix(".md")
    card.write_text(model_card(summary, args.output))
    print(f"wrote {args.output} and its model card {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
