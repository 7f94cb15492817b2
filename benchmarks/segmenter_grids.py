"""How the segmenter's Dice depends on the grid a fetal stack is presented on.

The same real fetal HASTE stack (``fetal/sub-01_run-{1,2}_T2w.nii.gz``, 1.125x1.125x3.3 mm,
320x320x22) is segmented by a segmenter (default: the packaged one) on its native grid and
after resampling onto cubic RAS grids centred on its manually masked brain, as a user's
resampled or reoriented data would be (and as ``hmc_accuracy.fetal_case`` and ``fetal.py``
build their series). Each row gives the Dice against the manual mask carried onto the same grid
(linear, > 0.5). Presentations:

- native: the stack as acquired;
- ``S mm / N^3``: a cube of N^3 voxels of S mm, by one cubic spline interpolation
  (``synthetic.simulate_series``); "PSF" first blurs the stack to a Gaussian PSF of S mm FWHM
  (``_common.blur_to_psf``, as the benchmarks do), "noise" adds 1 % Gaussian noise of the
  maximum everywhere (so that the space outside the slab is not exactly 0).

The slab is 72.6 mm thick: a 160 mm cube holds 44 mm of empty space above and below it, a 320 mm
cube 124 mm. ``--crop-to-signal`` runs the network only on the bounding box (plus 3 voxels) of
the working-grid voxels above 5 % of their 99th percentile (an inference change tried, not
adopted).

Run from the repository root (about 1 minute on 2 cores)::

    python benchmarks/segmenter_grids.py
    python benchmarks/segmenter_grids.py --crop-to-signal
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_DATA, blur_to_psf, command_line, machine_line, \
    markdown_table  # noqa: E402
from hmc_accuracy import cubic_grid, load_scaled, with_noise  # noqa: E402

from unimo_bids.unimo import segnet  # noqa: E402
from unimo_bids.unimo.geometry import world_points  # noqa: E402
from unimo_bids.unimo.shape import dice  # noqa: E402
from unimo_bids.unimo.synthetic import simulate_series  # noqa: E402

# (spacing mm, voxels per axis, blurred to the spacing's PSF, noise)
PRESENTATIONS = ((2.5, 64, True, True), (2.5, 64, False, False), (2.5, 128, True, False),
                 (2.5, 128, True, True), (1.25, 256, False, False))
SIGNAL_FRACTION, CROP_MARGIN = 0.05, 3


def label(spacing, size, psf, noise):
    extras = [name for name, on in (("PSF", psf), ("noise", noise)) if on]
    return f"{spacing:g} mm / {size}^3" + (f" ({', '.join(extras)})" if extras else "")


def cropped_probabilities(model, volumes, plain=segnet.grid_probabilities):
    """grid_probabilities on the bounding box of each volume's signal; 0 elsewhere."""
    out = torch.zeros_like(volumes)
    for index, volume in enumerate(volumes):
        values = volume[volume != 0].abs()
        if values.numel() == 0:
            continue
        upper = values.kthvalue(max(1, int(0.99 * values.numel()))).values
        signal = volume.abs() > SIGNAL_FRACTION * upper
        box = []
        for axis in range(3):
            hit = signal.any(dim=tuple(a for a in range(3) if a != axis)).nonzero().flatten()
            box.append(slice(max(int(hit[0]) - CROP_MARGIN, 0),
                             min(int(hit[-1]) + CROP_MARGIN + 1, volume.shape[axis])))
        out[index][tuple(box)] = plain(model, volume[tuple(box)][None])[0]
    return out


def stack_rows(root, run, model, rng):
    data, img = load_scaled(root / f"fetal/sub-01_run-{run}_T2w.nii.gz")
    manual = np.asarray(nb.load(root / f"fetal/sub-01_run-{run}_T2w_desc-brain_mask.nii.gz")
                        .dataobj) > 0
    row = [f"run-{run}" + (" (held out)" if run == 2 else " (training)"),
           f"{float(dice(segnet.segment_with_model(model, data, img.affine), manual)):.3f}"]
    center = world_points(manual.shape, img.affine, manual).mean(0)
    identity = np.eye(4)[None]
    for spacing, size, psf, noise in PRESENTATIONS:
        shape, grid = cubic_grid(center, size, spacing)
        image = blur_to_psf(data, img.affine, [spacing] * 3) if psf else data
        volume = simulate_series(image, img.affine, identity, shape, grid)
        if noise:
            volume = with_noise(volume, rng)
        truth = simulate_series(manual.astype(np.float32), img.affine, identity, shape, grid,
                                order=1)[..., 0] > 0.5
        mask = segnet.segment_with_model(model, volume[..., 0], grid)
        row.append(f"{float(dice(mask, truth)):.3f}")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("UNIMO_TEST_DATA", DEFAULT_DATA)))
    parser.add_argument("--seg-model", type=Path, default=segnet.PACKAGED_SEGMENTER)
    parser.add_argument("--crop-to-signal", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = segnet.load_segmenter(args.seg_model)
    if args.crop_to_signal:
        segnet.grid_probabilities = cropped_probabilities
    rng = np.random.default_rng(0)
    rows = [stack_rows(args.data, run, model, rng) for run in (1, 2)]
    print(f"Command: `{command_line(sys.executable)}`\n\nMachine: {machine_line()}; segmenter "
          f"{args.seg_model.name}\n")
    print(markdown_table(["stack", "native"] + [label(*p) for p in PRESENTATIONS], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
