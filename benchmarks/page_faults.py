"""How much of ``estimate_head_motion``'s time goes to page faults of glibc's malloc.

The registration allocates large temporaries at every Gauss-Newton iteration. With glibc's
default settings, blocks above the dynamic mmap threshold are given back to the kernel when
freed and faulted in again (zeroed) at the next allocation, which shows up as system CPU time.
This script runs the same estimation (image + shape maps, as the pipeline does) on a synthetic
64x64x40xT series (nilearn's MNI152 template, ``unimo_bids.unimo.synthetic``, as
benchmarks/io_floor.py) in fresh processes, with glibc's defaults and with
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set to 4 GiB (freed memory stays in the
process), and reports wall, user and system time and minor page faults. The package is not
changed; the environment variables only affect the child processes.

Run by hand from the repository root::

    python benchmarks/page_faults.py            # T = 200, 2 runs per setting, ~2 min
    python benchmarks/page_faults.py --quick    # T = 60, 1 run per setting
"""

from __future__ import annotations

import argparse
import json
import os
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

TUNED = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def child(path: str, threads: int) -> None:
    """Estimate motion on the series at ``path``; print one JSON line of measurements."""
    import resource

    import numpy as np
    import torch

    from unimo_bids.unimo.hmc import estimate_head_motion
    from unimo_bids.unimo.segment import brain_mask
    from unimo_bids.unimo.shape import signed_distance

    torch.set_num_threads(threads)
    img, data, vs, ref, ref_mask = load_series_with_reference_mask(path)
    shapes = np.ascontiguousarray(np.moveaxis(
        signed_distance(brain_mask(np.ascontiguousarray(np.moveaxis(data, -1, 0)), vs), vs),
        0, -1))
    ref_shape = signed_distance(ref_mask, vs)
    estimate_head_motion(data[..., :2], img.affine, ref, ref_mask, shapes[..., :2], ref_shape)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    estimate_head_motion(data, img.affine, ref, ref_mask, shapes, ref_shape)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall": wall, "user": after.ru_utime - before.ru_utime,
                      "sys": after.ru_stime - before.ru_stime,
                      "minflt": after.ru_minflt - before.ru_minflt,
                      "volumes": int(data.shape[-1])}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 60, one run per setting")
    parser.add_argument("--volumes", type=int, default=None, help="T (default 200)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per setting, alternating; min wall reported (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.threads)
        return 0
    n_volumes = args.volumes or (60 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 2)
    from io_floor import make_synthetic

    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {machine_line()}\n")
    settings = {"glibc defaults": {}, "MALLOC_MMAP_THRESHOLD_ = MALLOC_TRIM_THRESHOLD_ = 4 GiB":
                TUNED}
    results = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="unimo-faults-") as tmp:
        path = Path(tmp) / "synthetic_bold.nii.gz"
        make_synthetic(n_volumes, path)
        for _ in range(repeats):
            for name, extra in settings.items():
                env = {k: v for k, v in os.environ.items() if k not in TUNED}
                env.update(extra)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(path), "--threads",
                     str(args.threads)], env=env, capture_output=True, text=True, check=True)
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for name, runs in results.items():
        best = min(runs, key=lambda r: r["wall"])
        rows.append([name, f"{best['wall']:.1f}", f"{1000 * best['wall'] / n_volumes:.0f}",
                     f"{best['user']:.1f}", f"{best['sys']:.1f}", f"{best['minflt']:,}"])
    print(f"estimate_head_motion (image + shape), synthetic 64x64x40x{n_volumes}, fresh process "
          f"per run, best of {repeats} run(s) by wall time\n")
    print(markdown_table(["malloc setting", "wall s", "ms / volume", "user CPU s",
                          "system CPU s", "minor page faults"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
