"""Cost of separable Gaussian blurs on CPU: why ``unimo.resample.gaussian_blur`` uses matmuls.

The registration blurs the moving volumes once per level. This script times, on batches of
64x64x33 volumes (the real BOLD grid) at the sigmas of the coarse levels, three formulations
that give the same result to float32 rounding: three ``F.conv3d`` calls with (k, 1, 1)-shaped
kernels and replicate padding (``resample.blur_axis_conv``, what ``gaussian_blur`` did until
2026-11-21 and still does on axes longer than ``MATMUL_BLUR_MAX_SIZE``), a matrix product with a
banded (N, N) Gaussian matrix per axis with the padding folded in (``gaussian_blur`` now), and
``scipy.ndimage.gaussian_filter1d`` (mode 'nearest' = replicate, same truncation).

Run by hand from the repository root::

    python benchmarks/blur.py
    python benchmarks/blur.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_line, markdown_table  # noqa: E402

from unimo_bids.unimo.resample import blur_axis_conv, gaussian_blur  # noqa: E402


def blur_conv(volumes, sigma_vox):
    """The former ``gaussian_blur``: one conv3d with a 1-D kernel per axis."""
    out = volumes
    for axis, sigma in enumerate(sigma_vox):
        if sigma > 0.05:
            out = blur_axis_conv(out, axis, sigma)
    return out


def blur_scipy(volumes, sigma_vox):
    out = volumes.numpy()
    for axis, sigma in enumerate(sigma_vox):
        if sigma <= 0.05:
            continue
        radius = max(1, int(round(3.0 * sigma)))
        out = ndimage.gaussian_filter1d(out, sigma, axis=2 + axis, mode="nearest",
                                        truncate=radius / sigma)
    return torch.as_tensor(out)


def timed(fn, *args, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 20 only, 2 repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 5
    batches = [20] if args.quick else [20, 64]
    # the sigmas (voxels) that register_rigid uses at its 4x and 2x levels on the BOLD grid
    from unimo_bids.unimo.register import level_grid
    from unimo_bids.unimo.resample import band_limit_sigma

    affine = np.diag([3.375, 3.375, 3.4, 1.0])
    sigmas = {f"{f:g}x level": [round(float(s), 2) for s in
                                band_limit_sigma(affine, level_grid((64, 64, 33), affine, f)[2])]
              for f in (4.0, 2.0)}
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_line()}\n")
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        for channels in (1, 2):
            volumes = torch.as_tensor(rng.standard_normal((batch, channels, 64, 64, 33),
                                                          dtype=np.float32))
            for label, sigma in sigmas.items():
                gaussian_blur(volumes[:1], sigma)  # first-call costs
                t_conv, ref = timed(blur_conv, volumes, sigma, repeats=repeats)
                t_mm, out_mm = timed(gaussian_blur, volumes, sigma, repeats=repeats)
                t_sp, out_sp = timed(blur_scipy, volumes, sigma, repeats=repeats)
                diff = max(float((out_mm - ref).abs().max()), float((out_sp - ref).abs().max()))
                rows.append([f"{batch}x{channels}x64x64x33", f"{label} {sigma}",
                             f"{1000 * t_conv:.0f}",
                             f"{1000 * t_mm:.0f}", f"{1000 * t_sp:.0f}",
                             f"{t_conv / t_mm:.1f}", f"{diff:.1e}"])
    print(f"Best of {repeats} runs, ms\n")
    print(markdown_table(["volumes (B x C x X x Y x Z)", "sigma", "conv3d (blur_axis_conv)",
                          "banded matmul (gaussian_blur)", "scipy gaussian_filter1d",
                          "conv3d / matmul", "max abs difference"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
