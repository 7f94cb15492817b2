"""Where the engine's compute sits relative to the gzip I/O floor of a series.

For each series: time to read the .nii.gz into float32, time to write the corrected float32
series as .nii.gz (nibabel's default compresslevel), and the compute of each engine step
(reference choice, brain masks, signed distance maps, rigid estimation without and with shape
maps, resampling), in seconds and seconds per volume, with the ratio to read + write and the
peak memory growth of each step.

Series: the real BOLD (bold/xa30_task-fa_bold.nii.gz, 64x64x33x20), the real pCASL
(asl/dcmqaasl_9_pcasl_2d.nii.gz, 72x72x20x102), and a long synthetic series (64x64x40xT, T = 600
by default) made from nilearn's MNI152 template with ``unimo_bids.unimo.synthetic``.

Run by hand from the repository root, e.g.::

    UNIMO_TEST_DATA=/work/shared/data python benchmarks/io_floor.py
    python benchmarks/io_floor.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nb
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DATA_HELP,
    blur_to_psf,
    command_line,
    data_dir,
    machine_line,
    markdown_table,
    measure,
    mni_template,
    warm_up,
)

from unimo_bids.unimo.hmc import apply_head_motion, estimate_head_motion  # noqa: E402
from unimo_bids.unimo.reference import detect_non_steady_state, select_reference  # noqa: E402
from unimo_bids.unimo.segment import brain_mask, reference_mask  # noqa: E402
from unimo_bids.unimo.shape import signed_distance  # noqa: E402
from unimo_bids.unimo.synthetic import add_noise, rigid_matrix, simulate_series  # noqa: E402

REAL = {
    "xa30 BOLD (real)": "bold/xa30_task-fa_bold.nii.gz",
    "pCASL (real)": "asl/dcmqaasl_9_pcasl_2d.nii.gz",
}
SYNTH_SHAPE = (64, 64, 40)
SYNTH_VOXEL = (3.0, 3.5, 3.5)


def make_synthetic(n_volumes: int, path: Path, seed: int = 0) -> None:
    """Write a 64x64x40xT int16 series of the MNI152 template with slow drift and a few
    spikes of motion (up to about 3 mm / 3 deg), Rician noise at SNR 50."""
    data, affine = mni_template()
    data = blur_to_psf(data, affine, SYNTH_VOXEL)
    grid = np.diag(list(SYNTH_VOXEL) + [1.0])
    centre_world = np.array([0.0, -18.0, 12.0])
    grid[:3, 3] = centre_world - grid[:3, :3] @ ((np.asarray(SYNTH_SHAPE) - 1) / 2.0)
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0.0, 0.04, size=(n_volumes, 6)), axis=0)
    spikes = rng.random(n_volumes) < 0.02
    walk[spikes] += rng.uniform(-2.0, 2.0, size=(int(spikes.sum()), 6))
    walk = np.clip(walk - walk[0], -3.0, 3.0)
    motions = np.stack([rigid_matrix(p[:3], p[3:], centre_world) for p in walk])
    series = simulate_series(data, affine, motions, SYNTH_SHAPE, grid, order=1)
    series = add_noise(series * 1000.0, 50.0, rng)
    img = nb.Nifti1Image(np.clip(np.rint(series), 0, 32767).astype(np.int16), grid)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.0
    img.to_filename(path)


def run_series(path: Path, device: str, out_dir: Path, image_only: bool = True) -> dict:
    """Time every step on one series; returns {step: Measure} plus metadata."""
    steps = {}
    with measure() as m:
        img = nb.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    steps["read .nii.gz -> float32"] = m
    affine = img.affine
    vs = tuple(float(z) for z in img.header.get_zooms()[:3])

    with measure() as m:
        n_dummy = detect_non_steady_state(data)
        reference, index = select_reference(data, affine, "auto", n_dummy=n_dummy)
    steps["select_reference (auto)"] = m

    with measure() as m:
        volumes = np.ascontiguousarray(np.moveaxis(data, -1, 0))
        masks = brain_mask(volumes, vs)
        ref_mask = reference_mask(reference, vs)
        del volumes
    steps["brain_mask (all volumes + reference)"] = m

    with measure() as m:
        shapes = signed_distance(masks, vs)
        ref_shape = signed_distance(ref_mask, vs)
    steps["signed_distance (all volumes + reference)"] = m
    shapes = np.ascontiguousarray(np.moveaxis(shapes, 0, -1))

    if image_only:
        with measure() as m:
            estimate_head_motion(data, affine, reference, ref_mask, device=device)
        steps["estimate_head_motion (image)"] = m

    with measure() as m:
        result = estimate_head_motion(data, affine, reference, ref_mask, shapes, ref_shape,
                                      device=device)
    steps["estimate_head_motion (image + shape)"] = m

    with measure() as m:
        corrected = apply_head_motion(data, affine, result.transforms, device=device)
    steps["apply_head_motion"] = m

    with measure() as m:
        header = img.header.copy()
        header.set_data_dtype(np.float32)
        nb.Nifti1Image(corrected, affine, header).to_filename(out_dir / "preproc.nii.gz")
    steps["write float32 .nii.gz"] = m
    return {"steps": steps, "shape": data.shape, "ref_index": index,
            "bytes_in": path.stat().st_size,
            "bytes_out": (out_dir / "preproc.nii.gz").stat().st_size}


IO_STEPS = ("read .nii.gz -> float32", "write float32 .nii.gz")
PIPELINE = ("select_reference (auto)", "brain_mask (all volumes + reference)",
            "signed_distance (all volumes + reference)",
            "estimate_head_motion (image + shape)", "apply_head_motion")


def best(runs, step, attr="wall"):
    return min(getattr(r["steps"][step], attr) for r in runs)


def report_case(name, runs) -> tuple[str, list]:
    n_vols = runs[0]["shape"][-1]
    io = best(runs, IO_STEPS[0]) + best(runs, IO_STEPS[1])
    rows = []
    for step in runs[0]["steps"]:
        wall = best(runs, step)
        rows.append([step, f"{wall:.3f}", f"{wall / n_vols * 1000:.1f}",
                     f"{best(runs, step, 'cpu'):.2f}", f"{wall / io:.1f}",
                     f"{max(r['steps'][step].peak_mib for r in runs):.0f}"])
    compute = sum(best(runs, s) for s in PIPELINE)
    rows.append(["**pipeline compute** (reference + masks + distance maps + image+shape "
                 "estimation + resampling)", f"{compute:.2f}", f"{compute / n_vols * 1000:.1f}",
                 "", f"**{compute / io:.1f}**", ""])
    table = markdown_table(
        ["step", "wall s", "ms / volume", "CPU s (all threads)", "x (read + write)",
         "peak RSS growth MiB"], rows)
    shape = "x".join(str(s) for s in runs[0]["shape"])
    head = (f"**{name}**, {shape}, {runs[0]['bytes_in'] / 2**20:.1f} MiB .nii.gz in, "
            f"{runs[0]['bytes_out'] / 2**20:.1f} MiB out; reference (auto) = volume "
            f"{runs[0]['ref_index']}; min over {len(runs)} run(s); 1-min load average "
            f"{runs[0]['load'][0]:.1f} before, {runs[0]['load'][1]:.1f} after")
    summary = [name, shape, f"{best(runs, IO_STEPS[0]):.2f}", f"{best(runs, IO_STEPS[1]):.2f}",
               f"{compute:.1f}", f"{compute / io:.0f}",
               f"{best(runs, 'estimate_head_motion (image + shape)') / n_vols * 1000:.0f}",
               f"{max(max(m.peak_abs_mib for m in r['steps'].values()) for r in runs):.0f}"]
    return head + "\n\n" + table, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + DATA_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the real BOLD and a 60-volume synthetic series only (< 2 min)")
    parser.add_argument("--volumes", type=int, default=None,
                        help="volumes of the synthetic series (default 600; 60 with --quick)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per real series; the minimum wall time of each step is "
                             "reported (default 2; the machine may be shared)")
    parser.add_argument("--synth-repeats", type=int, default=1,
                        help="runs of the synthetic series (default 1)")
    parser.add_argument("--synth-image-only", action="store_true",
                        help="also time the image-only estimation on the synthetic series "
                             "(left out by default to keep the run near 10 min)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_synth = args.volumes or (60 if args.quick else 600)
    root = data_dir()
    cases = {k: root / v for k, v in REAL.items()}
    if args.quick:
        cases.pop("pCASL (real)")

    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_line()}; nibabel gzip compresslevel "
          f"{nb.openers.Opener.default_compresslevel}\n")
    warm_up()
    summaries = []
    with tempfile.TemporaryDirectory(prefix="unimo-io-floor-") as tmp:
        tmp = Path(tmp)
        synth_path = tmp / "synthetic_bold.nii.gz"
        make_synthetic(n_synth, synth_path)
        cases[f"synthetic MNI152 (T={n_synth})"] = synth_path
        for name, path in cases.items():
            repeats = args.synth_repeats if path == synth_path else args.repeats
            load = os.getloadavg()[0]
            image_only = path != synth_path or args.synth_image_only
            runs = [run_series(path, args.device, tmp, image_only) for _ in range(repeats)]
            runs[0]["load"] = (load, os.getloadavg()[0])
            text, summary = report_case(name, runs)
            summaries.append(summary)
            print(text + "\n", flush=True)
    print(markdown_table(["series", "shape", "read s", "write s", "pipeline compute s",
                         "compute / (read + write)", "image+shape estimation ms / volume",
                         "process peak RSS MiB"], summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
