"""Command-line parser (fMRIPrep / MRIQC conventions)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from .. import __version__


DEFAULT_FD_SPIKE_THRESHOLD = 0.5


class UsageError(Exception):
    """A problem with the command line or the paths it names; the message is one line."""


MAX_OPTION_FILE_BYTES = 1 << 20


def read_option_file(path, what: str) -> str:
    """The text of a small file named on the command line (--bids-filter-file, --use-plugin).

    Refuses, with one line naming it: a missing path, anything but a regular file (a folder,
    a FIFO or a device such as /dev/zero would hang or exhaust memory), files over 1 MB, and
    unreadable or non-UTF-8 files.
    """
    import stat

    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: the {what} does not exist") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read the {what} ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{path}: the {what} must be a regular file")
    if info.st_size > MAX_OPTION_FILE_BYTES:
        raise UsageError(f"{path}: the {what} is {info.st_size} bytes; at most 1 MB is read")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: the {what} is not UTF-8 text ({err})") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read the {what} ({err.strerror})") from None


_MEM_UNITS = {"": 1.0, "k": 1 / 1024**2, "m": 1 / 1024, "g": 1.0, "t": 1024.0}


def parse_memory_gb(value: str) -> float:
    """'16', '16G', '16GB', '16000MB' -> GB (a bare number is GB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[bB]?\s*", str(value))
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"--mem: cannot read {value!r} as an amount of memory "
                                         "(e.g. 16GB or 16000MB)")
    return float(match.group(1)) * _MEM_UNITS[match.group(2).lower()]


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return number
    return parse


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return number


def _hmc_ref(value: str) -> str:
    if value in ("auto", "first", "middle", "mean") or value.isdigit():
        return value
    raise argparse.ArgumentTypeError("must be auto, first, middle, mean or a volume index")


def _device(value: str) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        return value
    raise argparse.ArgumentTypeError("must be auto, cpu, cuda or cuda:N")


def clean_label(label: str, what: str = "participant") -> str:
    """Strip a 'sub-'/'ses-' prefix and refuse labels that are empty or not alphanumeric
    (which also refuses path separators and '..')."""
    prefix = {"participant": "sub-", "session": "ses-"}[what]
    cleaned = label[len(prefix):] if label.startswith(prefix) else label
    if not cleaned:
        raise UsageError(f"empty {what} label {label!r}")
    if "/" in cleaned or "\\" in cleaned or ".." in cleaned:
        raise UsageError(f"{what} label {label!r} contains a path separator or '..'")
    if not re.fullmatch(r"[0-9a-zA-Z]+", cleaned):
        raise UsageError(f"{what} label {label!r} is not a BIDS label (letters and digits only)")
    return cleaned


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unimo-bids",
        description="UniMo motion correction of BIDS datasets, with BIDS-Derivatives outputs. "
                    "Run with --demo to try it on a built-in dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", nargs="?", type=Path,
                        help="the root folder of a BIDS dataset")
    parser.add_argument("output_dir", nargs="?", type=Path,
                        help="where derivatives and reports are written")
    parser.add_argument("analysis_level", nargs="?", choices=["participant", "group"],
                        help="participant: correct each subject; group: collect QC across runs")
    parser.add_argument("--version", action="version", version=f"unimo-bids {__version__}")
    parser.add_argument("--demo", nargs="?", const=Path("unimo-demo"), type=Path, metavar="DIR",
                        help="build a small dataset with known simulated motion in DIR "
                             "(default ./unimo-demo), run both levels and report the error")

    g_bids = parser.add_argument_group("Selecting data")
    g_bids.add_argument("--participant-label", "--participant_label", nargs="+", default=None,
                        metavar="LABEL", help="subjects to process (with or without 'sub-')")
    g_bids.add_argument("--session-label", nargs="+", default=None, metavar="LABEL",
                        help="sessions to process (with or without 'ses-')")
    g_bids.add_argument("-t", "--task-id", nargs="+", default=None, metavar="TASK",
                        help="tasks to process")
    g_bids.add_argument("--datatypes", nargs="+", default=["func"],
                        choices=["func", "dwi", "perf", "anat", "pet"], metavar="DATATYPE",
                        help="datatypes to correct: func (BOLD, the default), dwi, perf (ASL), "
                             "anat (aligns the runs of each contrast in a session, e.g. fetal "
                             "T2w stacks), pet")
    g_bids.add_argument("--suffix", nargs="+", default=None, metavar="SUFFIX",
                        help="only series with these BIDS suffixes (bold, dwi, asl, pet, T1w, "
                             "T2w, PDw, FLAIR)")
    g_bids.add_argument("--bids-filter-file", type=Path, default=None, metavar="FILE",
                        help="JSON of pybids filters, e.g. {\"bold\": {\"run\": 1}}")
    g_bids.add_argument("--skip-bids-validation", action="store_true",
                        help="do not check that input file names follow BIDS")

    g_perf = parser.add_argument_group("Resources")
    g_perf.add_argument("-w", "--work-dir", type=Path, default=Path("work"),
                        help="intermediate results, reused when a run is repeated")
    g_perf.add_argument("--nprocs", "--n-cpus", type=_int_at_least(1), default=os.cpu_count() or 1,
                        help="processes run at once (1 runs nodes one after the other)")
    g_perf.add_argument("--omp-nthreads", type=_int_at_least(1), default=None,
                        help="threads per process (default: --nprocs)")
    g_perf.add_argument("--mem", "--mem-gb", type=parse_memory_gb, default=None,
                        metavar="MEMORY", help="memory limit, e.g. 16GB (a bare number is GB)")
    g_perf.add_argument("--use-plugin", type=Path, default=None, metavar="FILE",
                        help="nipype plugin YAML: {plugin: MultiProc, plugin_args: {...}}")
    g_perf.add_argument("--device", type=_device, default="auto",
                        help="torch device: auto, cpu, cuda or cuda:N")
    g_perf.add_argument("--gpu-procs", type=_int_at_least(1), default=None, metavar="N",
                        help="GPU steps run at once by MultiProc (nipype's n_gpu_procs; "
                             "default: one per visible GPU); batches shrink to the GPU memory "
                             "left free")
    g_perf.add_argument("--stop-on-first-crash", action="store_true",
                        help="stop at the first failing node instead of finishing other runs")

    g_hmc = parser.add_argument_group("Motion correction")
    g_hmc.add_argument("--hmc-ref", type=_hmc_ref, default=None,
                       help="reference: auto (low-motion volume near the median), first, "
                            "middle, mean, or a volume index (default: auto; first when a "
                            "reference mask is given by --ref-mask or --derivatives, which "
                            "must be drawn on that volume)")
    g_hmc.add_argument("--weights", type=Path, default=None, metavar="PATH",
                       help="UniMo network checkpoint (default: the packaged weights, "
                            "made with unimo-bids-train)")
    g_hmc.add_argument("--no-refine", dest="refine", action="store_false",
                       help="report the network's fused estimate without test-time refinement "
                            "(to judge the network alone)")
    g_hmc.add_argument("--deformable", action="store_true",
                       help="after the rigid step, correct local deformation per volume with "
                            "band-limited EPDiff shooting (test-time optimised), composed with "
                            "the rigid transform into one resampling; writes the displacement "
                            "fields")
    g_hmc.add_argument("--deform-predictor", action="store_true",
                       help="with --deformable: start each volume's optimisation from the "
                            "packaged U-Net's predicted velocity instead of zero (on the "
                            "benchmark it ends at the same accuracy, at more cost; see "
                            "docs/benchmarks.md)")
    g_hmc.add_argument("--deform-weights", type=Path, default=None, metavar="PATH",
                       help="with --deformable: start from this velocity predictor's estimate "
                            "(from unimo-bids-train --model deformable); implies "
                            "--deform-predictor")
    g_hmc.add_argument("--dummy-scans", type=_int_at_least(0), default=None, metavar="N",
                       help="leading non-steady-state volumes (default: detected)")
    g_hmc.add_argument("--random-seed", type=int, default=None, metavar="SEED",
                       help="seed for every random choice")

    g_seg = parser.add_argument_group("Masks and moving anatomy")
    g_seg.add_argument("--moving-anatomy", action="store_true",
                       help="the anatomy in the reference mask moves inside still tissue (fetal "
                            "MRI): register inside that mask only and track it through the "
                            "series, iterating segmentation and registration")
    g_seg.add_argument("--ref-mask", type=Path, default=None, metavar="PATH",
                       help="mask of the moving anatomy on the reference volume (3D NIfTI on "
                            "the series' grid); used for every selected series")
    g_seg.add_argument("--derivatives", type=Path, nargs="+", default=None, metavar="DIR",
                       help="folders of precomputed derivatives searched for each series' "
                            "reference mask (<source entities>_desc-brain_mask.nii.gz)")
    g_seg.add_argument("--seg-model", default="auto", metavar="PATH",
                       help="how each volume is segmented: a trained segmenter (TorchScript, "
                            "made with unimo-bids-train-seg), 'packaged' (the segmenter shipped "
                            "with unimo-bids, trained for fetal MRI), or 'classical' (weight-free "
                            "masks); 'auto' (default): packaged with --moving-anatomy, "
                            "classical otherwise")
    g_seg.add_argument("--write-volume-masks", action="store_true",
                       help="also write each volume's brain mask (4D, in the volume's own "
                            "position): desc-segmented_mask, and with --moving-anatomy "
                            "desc-tracked_mask; otherwise they stay in the work directory")
    g_seg.add_argument("--template", default="auto", metavar="ID",
                       help="TemplateFlow template whose brain mask checks the reference mask, "
                            "read offline from TEMPLATEFLOW_HOME; 'auto' uses "
                            "MNI152NLin2009cAsym when it is there, 'none' turns the check off")

    g_conf = parser.add_argument_group("Confounds")
    g_conf.add_argument("--fd-radius", type=_positive_float, default=50.0, metavar="MM",
                        help="head radius for framewise displacement (mm)")
    # None tells the group level that no new threshold was asked for.
    g_conf.add_argument("--fd-spike-threshold", type=_positive_float, default=None, metavar="MM",
                        help=f"FD above which a volume is a motion outlier (default "
                             f"{DEFAULT_FD_SPIKE_THRESHOLD}); at the group level, re-counts "
                             "outliers from the confounds files")
    g_conf.add_argument("--dvars-spike-threshold", type=_positive_float, default=1.5,
                        help="standardised DVARS above which a volume is a motion outlier")

    g_out = parser.add_argument_group("Outputs and logging")
    g_out.add_argument("--boilerplate-only", "--boilerplate", action="store_true",
                       help="write the methods text (logs/CITATION.md) and stop")
    g_out.add_argument("--reports-only", action="store_true",
                       help="rebuild the HTML reports from existing derivatives")
    g_out.add_argument("--write-graph", action="store_true",
                       help="write the workflow graph (graphviz .dot, and .svg when 'dot' is "
                            "installed) to the work directory")
    g_out.add_argument("--notrack", action="store_true",
                       help="accepted for fMRIPrep compatibility: unimo-bids never sends usage "
                            "data, and sets NIPYPE_NO_ET=1")
    g_out.add_argument("-v", "--verbose", action="count", default=0,
                       help="more log output (-vv for debug)")
    return parser
