"""Side by side: ANTs rigid registration (antspyx) and ``unimo.hmc.estimate_head_motion``.

The same simulated series as benchmarks/rigid_accuracy.py (nilearn's MNI152 template blurred to
a 3 mm PSF, 3 mm isotropic grid, 16 volumes, volume 0 unmoved = the reference, random rigid
motion uniform in [-m, m] deg / mm per axis, Gaussian noise 1 % of the maximum), for m = 5 and
m = 20, and the same on the real xa30 BOLD (volume 0 moved on its own grid, as
rigid_accuracy.py). ANTs registers each volume to the reference separately with
``ants.registration(type_of_transform=...)`` ('Rigid' and 'QuickRigid' by default, ANTs'
defaults otherwise: Mattes mutual information, no mask). The unimo engine runs as in the
pipeline (reference mask, shape maps of every volume, image + shape estimation), on the same
series in the same process.

ANTs writes ITK transforms: they map a point of the FIXED image (the reference) to the point of
the MOVING image (the volume), in LPS physical coordinates. The engine's convention is the same
direction (reference -> volume) in RAS, so M_ras = F M_lps F with F = diag(-1, -1, 1, 1). The
script checks this conversion first, on a volume moved by a known pure translation, and stops if
it does not hold.

antspyx pins numpy < 2.4 and scipy < 1.16; install it in a separate virtual environment that
sees the project's packages (the project's own environment is left alone)::

    python -m venv --system-site-packages /tmp/ants-venv
    /tmp/ants-venv/bin/pip install antspyx
    /tmp/ants-venv/bin/python benchmarks/compare_ants.py            # ~10 min on 2 cores
    /tmp/ants-venv/bin/python benchmarks/compare_ants.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    LPS,
    command_line,
    lps_frame,
    lps_point_map_to_ras,
    machine_line,
    markdown_table,
    warm_up,
)
from rigid_accuracy import (  # noqa: E402
    FAIL_MM,
    HEADERS,
    bold_scene,
    crashed,
    row_cells,
    run_engine,
    summarise,
    template_scene,
)

from unimo_bids.unimo.geometry import mean_displacement, rigid_matrix  # noqa: E402

def to_ants(volume, affine):
    """A 3D numpy volume on a RAS NIfTI grid -> ants image with the same physical space."""
    import ants

    origin, spacing, direction = lps_frame(affine)
    return ants.from_numpy(np.asarray(volume, dtype=np.float32), origin=tuple(origin),
                           spacing=tuple(spacing), direction=direction)


def ants_matrix_ras(transform_file):
    """4x4 RAS matrix (reference -> volume) of an ANTs/ITK linear transform file."""
    import ants

    return lps_point_map_to_ras(ants.read_transform(transform_file).apply_to_point)


def ants_register(series, affine, ref_index, kind, seed):
    """Per-volume ANTs registration to volume ``ref_index``: (T, 4, 4) RAS, seconds."""
    import ants

    fixed = to_ants(series[..., ref_index], affine)
    out = np.repeat(np.eye(4)[None], series.shape[-1], 0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unimo-ants-") as tmp:
        for t in range(series.shape[-1]):
            if t == ref_index:
                continue
            reg = ants.registration(fixed, to_ants(series[..., t], affine),
                                    type_of_transform=kind, random_seed=seed,
                                    outprefix=os.path.join(tmp, f"v{t}_"))
            out[t] = ants_matrix_ras(reg["fwdtransforms"][0])
    return out, time.perf_counter() - start


def check_conversion(scene, kinds):
    """A known pure translation (and a known rotation) must come back through the conversion."""
    rows = []
    for label, motion in (
        ("translation (4, -3, 2) mm",
         rigid_matrix([0, 0, 0], [4.0, -3.0, 2.0], scene.center)),
        ("rotation (6, 0, -4) deg + translation (2, 3, -1) mm",
         rigid_matrix([6.0, 0, -4.0], [2.0, 3.0, -1.0], scene.center)),
    ):
        from unimo_bids.unimo.synthetic import simulate_series

        motions = np.stack([np.eye(4), motion])
        series = simulate_series(scene.image, scene.image_affine, motions, scene.shape,
                                 scene.grid)
        truth = np.linalg.inv(motions)
        for kind in kinds:
            est, _ = ants_register(series, scene.grid, 0, kind, 1)
            err = mean_displacement(est[1:], truth[1:], scene.points)[0]
            # the wrong conventions, for comparison: no LPS flip, and the inverse direction
            flat = LPS @ est[1] @ LPS
            wrong_flip = mean_displacement(flat[None], truth[1:], scene.points)[0]
            wrong_dir = mean_displacement(np.linalg.inv(est[1])[None], truth[1:],
                                          scene.points)[0]
            rows.append([label, kind, f"{est[1][:3, 3].round(2).tolist()}",
                         f"{truth[1][:3, 3].round(2).tolist()}", f"{err:.3f}",
                         f"{wrong_flip:.2f}", f"{wrong_dir:.2f}"])
            if err > 0.5:
                print(markdown_table(["known motion", "ANTs", "ANTs translation (RAS)",
                                      "true translation", "error mm", "", ""], rows))
                sys.exit("the LPS -> RAS conversion of ANTs transforms does not hold")
    return markdown_table(["known motion", "ANTs transform", "converted translation (RAS, mm)",
                           "true reference -> volume translation", "error (mm)",
                           "error without LPS flip", "error with inverse direction"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="m = 5 and 20 with 6 volumes, QuickRigid only (< 2 min)")
    parser.add_argument("--volumes", type=int, default=None, help="volumes per series (16)")
    parser.add_argument("--motions", type=float, nargs="+", default=[5.0, 20.0],
                        help="max rotation (deg) = max translation (mm) per axis (5 20)")
    parser.add_argument("--ants", nargs="+", default=None,
                        help="ANTs type_of_transform values (default Rigid QuickRigid)")
    parser.add_argument("--no-bold", action="store_true",
                        help="leave out the real xa30 BOLD (volume 0 moved by simulated motion, "
                             "read from $UNIMO_TEST_DATA, default /work/shared/data)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads and ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS (2)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (0), as "
                        "rigid_accuracy.py: the same series for the same m")
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    try:
        import ants
    except ImportError:
        sys.exit("antspyx is not installed: see this script's docstring")
    import torch

    torch.set_num_threads(args.threads)
    n_volumes = args.volumes or (6 if args.quick else 16)
    kinds = args.ants or (["QuickRigid"] if args.quick else ["Rigid", "QuickRigid"])

    print(f"Command: `{command_line(sys.executable)}`\n")
    print(f"Machine: {machine_line()}; antspyx {ants.__version__}, ITK threads "
          f"{args.threads}\n")
    warm_up()
    scene = template_scene(3.0, (1, 1, 1))
    print("Check of the LPS -> RAS conversion (template, 3 mm, no noise):\n")
    print(check_conversion(scene, kinds) + "\n", flush=True)

    scenes = [scene]
    if not args.no_bold:
        from _common import data_dir

        scenes.append(bold_scene(data_dir()))
    noise = 0.01
    for current in scenes:
        rows = []
        for mag in args.motions:
            seed = args.seed + int(100 * mag) + int(1000 * noise)  # as rigid_accuracy.py
            series, motions = current.series(n_volumes, mag, noise, seed)
            truth = np.linalg.inv(motions) @ motions[0]
            moved = np.arange(1, n_volumes)
            before = mean_displacement(np.repeat(np.eye(4)[None], n_volumes, 0), truth,
                                       current.points)[moved]
            runs = {}
            try:
                runs["unimo (image + shape)"] = run_engine(series, current.grid, 0, True)
            except Exception as err:  # noqa: BLE001 - an engine error is a result here
                runs["unimo (image + shape)"] = err
            for kind in kinds:
                runs[f"ANTs {kind}"] = ants_register(series, current.grid, 0, kind, seed)
            for label, run in runs.items():
                if isinstance(run, Exception):
                    rows.append([f"{mag:g}", label] + row_cells(crashed(run, before)))
                    print(f"m = {mag:g}, {label}: raised {type(run).__name__}", flush=True)
                    continue
                transforms, seconds = run
                errors = mean_displacement(transforms, truth, current.points)[moved]
                r = summarise(errors, before, seconds, n_volumes, motions[moved])
                if label.startswith("ANTs"):  # the reference volume is not registered
                    r["ms"] = 1000.0 * seconds / (n_volumes - 1)
                rows.append([f"{mag:g}", label] + row_cells(r))
                print(f"m = {mag:g}, {label}: errors {np.round(errors, 2).tolist()}",
                      flush=True)
        print(f"\n**{current.name}**, grid {'x'.join(map(str, current.shape))}, {n_volumes} "
              f"volumes, 1 % noise; failure = error > {FAIL_MM:g} mm\n")
        print(markdown_table(["m (deg / mm)", "method"] + HEADERS, rows) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
