"""Where the time of the rigid head-motion estimation goes, per volume, on the real BOLD.

The real xa30 BOLD series (64x64x33x20) is tiled to ``--volumes`` volumes (default 60: one
chunk). Timed separately, best of ``--repeats`` after a warm-up, in ms per volume:

- masks + shape maps: ``segment.reference_mask`` and ``segment.brain_mask`` of every volume and
  their ``shape.signed_distance`` (what the Segment and ShapeMap interfaces compute on a CPU),
  and the same in torch on ``--device`` (``segment_torch.brain_mask_torch``,
  ``shape_torch.signed_distance_torch``: what they compute on a CUDA device), with the number
  of mask voxels and the largest map difference between the two;
- network alone: ``hmc.network_head_motion`` (resampling onto the working grid, both encoders,
  Kabsch, fusion);
- refinement alone: ``hmc.estimate_head_motion`` without the network (from the identity);
- network + refinement: ``hmc.estimate_head_motion`` as the pipeline runs it.

Run by hand from the repository root::

    python benchmarks/hmc_speed.py
    python benchmarks/hmc_speed.py --device cuda --volumes 600
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
from _common import command_line, data_dir, machine_line, markdown_table  # noqa: E402

from unimo_bids.unimo.geometry import voxel_sizes  # noqa: E402
from unimo_bids.unimo.hmc import estimate_head_motion, network_head_motion  # noqa: E402
from unimo_bids.unimo.network import load_network  # noqa: E402
from unimo_bids.unimo.segment import brain_mask, reference_mask  # noqa: E402
from unimo_bids.unimo.segment_torch import brain_mask_torch  # noqa: E402
from unimo_bids.unimo.shape import signed_distance  # noqa: E402
from unimo_bids.unimo.shape_torch import signed_distance_torch  # noqa: E402


def best_ms_per_volume(step, n_volumes, repeats, device):
    step()  # warm-up: first-call and allocation costs
    best = np.inf
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / n_volumes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default=None, help="network checkpoint (packaged)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    img = nb.load(data_dir() / "bold" / "xa30_task-fa_bold.nii.gz")
    real = np.asarray(img.dataobj, dtype=np.float32)
    series = np.concatenate([real] * -(-args.volumes // real.shape[-1]), axis=-1)
    series = np.ascontiguousarray(series[..., :args.volumes])
    affine, sizes = img.affine, voxel_sizes(img.affine)
    reference = series[..., 0]
    net = load_network(args.weights, args.device)
    state = {}

    def masks_and_shapes():
        state["ref_mask"] = reference_mask(reference, sizes)
        masks = brain_mask(np.ascontiguousarray(np.moveaxis(series, -1, 0)), sizes)
        state["shapes"] = np.ascontiguousarray(np.moveaxis(signed_distance(masks, sizes), 0, -1))
        state["ref_shape"] = signed_distance(state["ref_mask"], sizes)

    def inputs():
        return (series, affine, reference, state["ref_mask"], state["shapes"],
                state["ref_shape"])

    def masks_and_shapes_torch():
        volumes = torch.as_tensor(np.moveaxis(series, -1, 0), device=args.device)
        reference_t = torch.as_tensor(reference[None], device=args.device)
        state["torch_ref_shape"] = signed_distance_torch(brain_mask_torch(reference_t, sizes),
                                                         sizes).cpu().numpy()
        masks = brain_mask_torch(volumes, sizes)
        state["torch_masks"] = masks.cpu().numpy()
        state["torch_shapes"] = signed_distance_torch(masks, sizes).cpu().numpy()

    n = args.volumes
    cost = best_ms_per_volume(masks_and_shapes, n, args.repeats, "cpu")
    rows = [["masks + shape maps (scipy, CPU)", f"{cost:.1f}"]]
    cost = best_ms_per_volume(masks_and_shapes_torch, n, args.repeats, args.device)
    scipy_masks = np.moveaxis(state["shapes"], -1, 0) < 0
    differ = int((scipy_masks != state["torch_masks"]).sum())
    largest = float(np.abs(np.moveaxis(state["shapes"], -1, 0) - state["torch_shapes"]).max())
    rows.append([f"masks + shape maps (torch, {args.device}; {differ} mask voxels differ, maps "
                 f"within {largest:.1e} mm)", f"{cost:.1f}"])
    steps = {
        "network alone": lambda: network_head_motion(net, *inputs(), device=args.device),
        "refinement alone (from the identity)":
            lambda: estimate_head_motion(*inputs(), device=args.device),
        "network + refinement (the pipeline)":
            lambda: estimate_head_motion(*inputs(), device=args.device, network=net),
    }
    for label, step in steps.items():
        rows.append([label, f"{best_ms_per_volume(step, n, args.repeats, args.device):.1f}"])
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_line()}; device {args.device}\n")
    print(f"Real xa30 BOLD (64x64x33) tiled to {n} volumes; best of {args.repeats}, "
          f"ms per volume\n")
    print(markdown_table(["step", "ms / volume"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
