"""Peak memory of the reference choice and of the motion estimation versus series length.

``unimo.hmc.estimate_head_motion`` registers volumes in chunks of 64; ``unimo.reference.
select_reference('auto')`` aligns at most 64 evenly spaced steady-state volumes (it aligned all
of them at once before 2026-11-22). This script measures, in a
fresh process per step and length, the peak RSS above the RSS after loading the series, for a
synthetic 64x64x40xT series (nilearn's MNI152 template, ``unimo_bids.unimo.synthetic``, as
benchmarks/io_floor.py).

Run by hand from the repository root::

    python benchmarks/memory_scaling.py            # T = 50, 100, 200, 400 (~6 min)
    python benchmarks/memory_scaling.py --lengths 50 100 200 400 800
    python benchmarks/memory_scaling.py --quick    # T = 20, 60
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    command_line,
    load_series_with_reference_mask,
    machine_line,
    markdown_table,
)


def child(path: str, step: str, threads: int) -> None:
    import torch

    from _common import _status_kib, reset_peak_rss
    from unimo_bids.unimo.hmc import estimate_head_motion
    from unimo_bids.unimo.reference import select_reference

    torch.set_num_threads(threads)
    img, data, vs, ref, mask = load_series_with_reference_mask(path)
    rss0 = _status_kib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    if step == "select_reference":
        select_reference(data, img.affine, "auto")
    else:
        estimate_head_motion(data, img.affine, ref, mask)
    wall = time.perf_counter() - start
    print(json.dumps({"growth_mib": (_status_kib("VmHWM") - rss0) / 1024.0,
                      "data_mib": data.nbytes / 2**20, "wall": wall}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 20 and 60 only")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="series lengths T (default 50 100 200 400)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.threads)
        return 0
    lengths = args.lengths or ([20, 60] if args.quick else [50, 100, 200, 400])
    from io_floor import make_synthetic

    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_line()}\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="unimo-mem-") as tmp:
        for n in lengths:
            path = Path(tmp) / f"synthetic_{n}.nii.gz"
            make_synthetic(n, path)
            cells = {}
            for step in ("select_reference", "estimate_head_motion"):
                out = subprocess.run([sys.executable, __file__, "--child", str(path), step,
                                      "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True)
                cells[step] = json.loads(out.stdout.strip().splitlines()[-1])
            data = cells["select_reference"]["data_mib"]
            ref, est = cells["select_reference"], cells["estimate_head_motion"]
            rows.append([str(n), f"{data:.0f}", f"{ref['growth_mib']:.0f}",
                         f"{ref['growth_mib'] / data:.1f}", f"{ref['wall']:.1f}",
                         f"{est['growth_mib']:.0f}", f"{est['growth_mib'] / data:.1f}",
                         f"{est['wall']:.1f}"])
            path.unlink()
    print("Synthetic 64x64x40xT float32 series; peak RSS growth above the loaded series, fresh "
          "process per cell\n")
    print(markdown_table(["T", "series MiB", "select_reference (auto) MiB", "x series",
                          "select_reference s", "estimate_head_motion (image) MiB", "x series",
                          "estimate_head_motion s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
