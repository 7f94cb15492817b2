"""The ``unimo-bids`` entry point: participant level, group level and the demo."""

from __future__ import annotations

import gc
import logging
import os
import platform
import signal
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

from .. import __version__
from .parser import DEFAULT_FD_SPIKE_THRESHOLD, UsageError, build_parser, read_option_file
from .worker_signals import NIPYPE_LEVEL_VARIABLE, set_nipype_log_level

LOGGER = logging.getLogger("unimo_bids")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted: a stream bound once would
    outlive a redirection (a caller's, or pytest's capture, closed after its test)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging(verbosity: int) -> None:
    if not LOGGER.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [unimo-bids] %(levelname)s: "
                                               "%(message)s", datefmt="%H:%M:%S"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False
    LOGGER.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
    if verbosity == 0:
        warnings.filterwarnings("ignore")
    # nipype's own tracebacks go to crash files; the summary below names each failure.
    level = {0: "CRITICAL", 1: "INFO"}.get(verbosity, "DEBUG")
    os.environ[NIPYPE_LEVEL_VARIABLE] = level  # for the MultiProc workers
    set_nipype_log_level(level)


def check_weights(path, device: str) -> None:
    """Refuse, before any work, a --weights file that is missing or not a network checkpoint
    (also checks that the packaged weights are installed)."""
    from ..unimo.network import load_network

    try:
        load_network(path, "cpu" if path is None else device)
    except ValueError as err:
        raise UsageError(f"--weights: {err}" if path is not None else str(err)) from err


def check_deform_weights(args) -> None:
    """Refuse, before any work, a --deform-weights file that is not a velocity predictor, and
    --deform-predictor or --deform-weights without --deformable (and check that the packaged
    predictor is installed when it is asked for)."""
    for option, given in (("--deform-weights", args.deform_weights is not None),
                          ("--deform-predictor", args.deform_predictor)):
        if given and not args.deformable:
            raise UsageError(f"{option} needs --deformable")
    if not args.deformable or not (args.deform_predictor or args.deform_weights):
        return
    from ..unimo.deform_net import load_predictor

    try:
        load_predictor(args.deform_weights, "cpu")
    except ValueError as err:
        raise UsageError(f"--deform-weights: {err}" if args.deform_weights else str(err)) from err


def seg_model_path(args) -> Path | None:
    """The segmenter file that --seg-model names, or None for the classical masks."""
    from ..unimo.segnet import PACKAGED_SEGMENTER

    choice = str(getattr(args, "seg_model", None) or "classical")
    if choice == "auto":
        choice = "packaged" if getattr(args, "moving_anatomy", False) else "classical"
    if choice == "classical":
        return None
    return PACKAGED_SEGMENTER if choice == "packaged" else Path(choice).resolve()


def check_seg_model(path) -> None:
    """Refuse, before any work, a --seg-model file that is not a unimo-bids segmenter."""
    if path is None:
        return
    from ..unimo.segnet import load_segmenter

    try:
        load_segmenter(path, "cpu")
    except ValueError as err:
        raise UsageError(f"--seg-model: {err}") from err


def resolve_template(requested: str) -> tuple[str | None, str]:
    """(template ID or None, TEMPLATEFLOW_HOME) for --template; never downloads anything.

    'none' turns the check off; 'auto' uses the default template when it is installed and
    says how to install it when it is not; a named template that is missing is an error.
    """
    from ..interfaces.template import (
        DEFAULT_TEMPLATE,
        TemplateNotFound,
        find_template_mask,
        templateflow_home,
    )

    home = str(templateflow_home())
    if requested.lower() == "none":
        return None, home
    name = DEFAULT_TEMPLATE if requested == "auto" else requested
    try:
        find_template_mask(name, home)
    except TemplateNotFound as err:
        if requested != "auto":
            raise UsageError(f"--template: {err}") from None
        LOGGER.info("No template check of the brain masks: %s", err)
        return None, home
    return name, home


def find_derivative_mask(source: str, bids_dir: Path, derivatives) -> str | None:
    """The reference mask of a series in precomputed derivatives, or None.

    Looked for as ``<source entities>_desc-brain_mask.nii[.gz]``, then with the source's
    suffix kept (``sub-01_run-1_T2w_desc-brain_mask``, as fetal toolkits name them), in the
    source's own subfolder of each folder, then anywhere below it (first match, in the order
    given).
    """
    from ..interfaces.io import source_prefix

    relative = Path(os.path.relpath(Path(source).parent, bids_dir))
    stems = (source_prefix(source), Path(source).name.split(".")[0])
    for folder in derivatives or []:
        for stem in stems:
            for extension in (".nii.gz", ".nii"):
                name = f"{stem}_desc-brain_mask{extension}"
                if (folder / relative / name).is_file():
                    return str((folder / relative / name).absolute())
                found = sorted(folder.rglob(name))
                if found:
                    return str(found[0].absolute())
    return None


def attach_reference_masks(runs, args, bids_dir: Path) -> None:
    """Give each run its user mask (--ref-mask, else --derivatives), checked before any work:
    a missing, empty, non-3D or misplaced mask stops the command (exit 2). The runs of an
    anatomical contrast get one mask each, from --derivatives only."""
    from ..workflows.base import AnatomicalRuns

    for folder in args.derivatives or []:
        if not folder.is_dir():
            raise UsageError(f"--derivatives: {folder} is not a folder")
    if args.ref_mask is not None and not args.ref_mask.is_file():
        raise UsageError(f"--ref-mask: {args.ref_mask} does not exist")
    for run in runs:
        if isinstance(run, AnatomicalRuns):  # one mask per run, from --derivatives only
            run.masks = [checked_mask(find_derivative_mask(path, bids_dir, args.derivatives),
                                      path) for path in run.paths]
            continue
        mask = (str(args.ref_mask.absolute()) if args.ref_mask is not None else
                find_derivative_mask(run.path, bids_dir, args.derivatives))
        run.ref_mask = checked_mask(mask, run.path)


def checked_mask(mask: str | None, path: str) -> str | None:
    """``mask`` if it fits the image ``path``; a missing, empty, non-3D or misplaced mask stops
    the command (UsageError). An unreadable image is left to its workflow to report."""
    import nibabel as nb

    from ..interfaces.segment import load_user_mask

    if mask is None:
        return None
    try:
        load_user_mask(mask, nb.load(path))
    except ValueError as err:
        raise UsageError(f"{err} (reference mask for {path})") from None
    except Exception:
        pass
    return mask


def masks_summary(args) -> str:
    """One line for the report: where the masks came from."""
    parts = ["tracked (moving anatomy)" if getattr(args, "moving_anatomy", False) else
             "per volume"]
    segmenter = seg_model_path(args)
    parts.append(f"segmenter {segmenter}" if segmenter else "classical segmentation")
    if getattr(args, "ref_mask", None):
        parts.append(f"reference mask {args.ref_mask}")
    elif getattr(args, "derivatives", None):
        parts.append("reference masks from " + ", ".join(map(str, args.derivatives)))
    parts.append(f"template check {getattr(args, 'template', 'auto')}")
    return "; ".join(parts)


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; refuse CUDA that is not there."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available (torch "
                             f"{torch.__version__} sees no GPU); use --device cpu")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s)")
    return requested


def plugin_settings(args, progress_callback=None) -> dict:
    """Nipype plugin and its arguments from --use-plugin, --nprocs, --mem and --gpu-procs."""
    if args.use_plugin is not None:
        import yaml

        try:
            settings = yaml.safe_load(read_option_file(args.use_plugin, "plugin file"))
        except yaml.YAMLError as err:
            raise UsageError(f"{args.use_plugin}: not valid YAML ({err})") from None
        if not isinstance(settings, dict) or not isinstance(settings.get("plugin"), str) \
                or not isinstance(settings.get("plugin_args", {}), dict):
            raise UsageError(f"{args.use_plugin}: expected 'plugin: NAME' and an optional "
                             "'plugin_args:' mapping")
        settings.setdefault("plugin_args", {})
    elif args.nprocs == 1:
        settings = {"plugin": "Linear", "plugin_args": {}}
    else:
        settings = {"plugin": "MultiProc", "plugin_args": {"n_procs": args.nprocs}}
    if settings["plugin"] == "MultiProc":
        # Nodes ask for --omp-nthreads; run them even if the pool is smaller.
        settings["plugin_args"].setdefault("raise_insufficient", False)
        # A worker forked from a process whose torch thread pool already ran can deadlock;
        # workers forked from a clean server process cannot.
        settings["plugin_args"].setdefault("mp_context", "forkserver")
    if args.mem is not None and settings["plugin"] in ("MultiProc", "LegacyMultiProc"):
        settings["plugin_args"].setdefault("memory_gb", args.mem)
    if args.gpu_procs is not None and settings["plugin"] == "MultiProc":
        settings["plugin_args"].setdefault("n_gpu_procs", args.gpu_procs)
    if progress_callback is not None and settings["plugin"] in ("Linear", "MultiProc",
                                                                 "LegacyMultiProc"):
        settings["plugin_args"]["status_callback"] = progress_callback
    return settings


class Progress:
    """A tqdm bar over finished workflow nodes (nipype's status_callback)."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="unimo-bids", disable=not enabled,
                        file=sys.stderr, mininterval=1.0, dynamic_ncols=True)

    def __call__(self, node, status):
        if status in ("end", "exception"):
            self.bar.update(1)
            self.bar.set_postfix_str(node.fullname.split(".", 1)[-1][-50:], refresh=False)

    def close(self):
        self.bar.close()


def collect_crashes(crash_dir: Path, runs) -> dict[str, list[str]]:
    """One-line messages per subject from nipype crash files of this invocation."""
    from nipype.utils.filemanip import loadcrash

    from ..workflows.bold import series_workflow_name

    by_workflow = {f"sub_{run.subject}_wf.{series_workflow_name(run.path)}": run for run in runs}
    errors: dict[str, list[str]] = {}
    for crashfile in sorted(crash_dir.glob("crash-*.pklz")):
        crash = loadcrash(str(crashfile))
        node = str(crash.get("node", ""))
        lines = [line.strip() for line in "".join(crash.get("traceback", [])).splitlines()
                 if line.strip()]
        last = lines[-1] if lines else "unknown error"
        # 'package.module.SeriesError: <file>: <problem>' -> '<file>: <problem>'
        kind, _, detail = last.partition(": ")
        message = detail if detail and kind.rsplit(".", 1)[-1] == "SeriesError" else last
        run = next((r for key, r in by_workflow.items() if key in node), None)
        subject = run.subject if run else "unknown"
        if run is not None and not any(path in message
                                       for path in getattr(run, "paths", [run.path])):
            message = f"{run.path}: step {node.rsplit('.', 1)[-1]} failed: {message}"
        errors.setdefault(subject, []).append(f"{message} (details: {crashfile})")
    return errors


def run_participant(args) -> int:
    from ..workflows.base import WorkflowOptions, init_unimo_bids_wf
    from .bids import (
        check_dataset,
        check_paths,
        collect_runs,
        load_filters,
        screen_runs,
        write_dataset_files,
    )
    from .reports import build_reports

    bids_dir, output_dir = args.bids_dir.absolute(), args.output_dir.absolute()
    work_dir = args.work_dir.absolute()
    check_dataset(bids_dir)
    check_paths(bids_dir, output_dir, work_dir)
    if output_dir.is_dir():  # what a killed run left half-written
        from ..interfaces.io import remove_stale_temporaries

        for path in remove_stale_temporaries(output_dir):
            LOGGER.info("Removed %s, left by an interrupted run", path)
    if args.reports_only:
        return build_reports(args, output_dir, bids_dir, errors={})
    device = resolve_device(args.device)
    check_weights(args.weights, device)
    seg_model = seg_model_path(args)
    check_seg_model(seg_model)
    if seg_model is not None and args.seg_model == "auto":
        LOGGER.info("--moving-anatomy: every volume is segmented with the packaged segmenter "
                    "(%s); --seg-model PATH or 'classical' chooses otherwise", seg_model.name)
    check_deform_weights(args)
    if args.moving_anatomy and not args.refine:
        raise UsageError("--no-refine cannot be combined with --moving-anatomy (tracking "
                         "refines by construction)")
    template, template_home = resolve_template(args.template)
    filters = load_filters(args.bids_filter_file)
    settings = plugin_settings(args)  # validate the plugin file before any work
    runs, run_errors, notes = collect_runs(
        bids_dir, work_dir, args.participant_label, args.session_label, args.task_id, filters,
        validate=not args.skip_bids_validation, datatypes=tuple(args.datatypes),
        suffixes=args.suffix)
    runs, header_errors, header_notes = screen_runs(runs, args.mem)
    run_errors += header_errors
    for note in notes + header_notes:
        LOGGER.warning(note)
    attach_reference_masks(runs, args, bids_dir)

    from nipype import config

    # Nodes copy nipype's configuration when they are created: set it before building.
    crash_dir = work_dir / "crash" / f"{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:8]}"
    config.update_config({"execution": {
        "crashdump_dir": str(crash_dir), "crashfile_format": "pklz",
        "stop_on_first_crash": args.stop_on_first_crash,
        "check_version": False, "poll_sleep_duration": 0.05}})
    omp_nthreads = args.omp_nthreads or int(settings["plugin_args"].get("n_procs", args.nprocs))
    options = WorkflowOptions(
        bids_dir=str(bids_dir), output_dir=str(output_dir), work_dir=str(work_dir),
        hmc_ref=args.hmc_ref, dummy_scans=args.dummy_scans, fd_radius=args.fd_radius,
        fd_spike_threshold=(DEFAULT_FD_SPIKE_THRESHOLD if args.fd_spike_threshold is None
                            else args.fd_spike_threshold),
        dvars_spike_threshold=args.dvars_spike_threshold, device=device,
        omp_nthreads=omp_nthreads, seed=args.random_seed,
        weights=str(args.weights.resolve()) if args.weights else None, refine=args.refine,
        moving_anatomy=args.moving_anatomy, write_volume_masks=args.write_volume_masks,
        deformable=args.deformable,
        deform_weights=str(args.deform_weights.resolve()) if args.deform_weights else None,
        deform_predictor=bool(args.deform_predictor or args.deform_weights),
        seg_model=str(seg_model) if seg_model else None,
        template=template, template_home=template_home)
    workflow = init_unimo_bids_wf(runs, options)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_files(output_dir, bids_dir, args.random_seed, workflow.visit_desc())
    if args.boilerplate_only:
        print(f"Methods text written to {output_dir / 'logs' / 'CITATION.md'}")
        return 0

    if args.write_graph:
        write_graph(workflow, work_dir)

    LOGGER.info("Correcting %d series of %d subject(s) on %s; work folder %s", len(runs),
                len({r.subject for r in runs}), device, work_dir)
    progress = Progress(len(workflow.list_node_names()), enabled=True)
    settings = plugin_settings(args, progress)
    failure = None
    try:
        if runs:
            # nipype's scheduler calls gc.collect() at every step; with torch and nilearn
            # loaded each call costs ~0.5 s unless the start-up objects are frozen first.
            gc.freeze()
            quiet_workers_on_sigint(settings)
            workflow.run(**settings)
    except Exception as err:  # nipype re-raises the first node error; crash files hold all
        failure = err
    finally:
        os.environ.pop("UNIMO_BIDS_FORKSERVER", None)
        progress.close()
    errors = collect_crashes(crash_dir, runs) if crash_dir.exists() else {}
    if failure is not None and not errors:
        raise failure
    for subject, message in run_errors:
        errors.setdefault(subject, []).append(message)
    for subject in sorted(errors):
        for message in errors[subject]:
            print(f"ERROR: {message}", file=sys.stderr)
    build_reports(args, output_dir, bids_dir, errors,
                  subjects=sorted({r.subject for r in runs} | set(errors)), device=device)
    n_failed = sum(len(v) for v in errors.values())
    if n_failed:
        n_total = len(runs) + len(run_errors)
        print(f"unimo-bids: {n_failed} of {n_total} series failed; the other "
              f"{n_total - n_failed} finished. Outputs in {output_dir}", file=sys.stderr)
        return 1
    print(f"unimo-bids: finished {len(runs)} series. Outputs in {output_dir}")
    LOGGER.info("Peak memory of the largest process: %.2f GB", peak_memory_gb())
    return 0


def peak_memory_gb() -> float:
    """Largest resident set of this process or of any of its finished workers (GB)."""
    import resource

    kilobytes = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return kilobytes / 1024**2


def quiet_workers_on_sigint(settings: dict) -> None:
    """MultiProc workers from a forkserver ignore SIGINT (see ``cli.worker_signals``); the
    forkserver starts during the run and reads the flag from its environment."""
    import multiprocessing

    if settings["plugin"] == "MultiProc" and \
            settings["plugin_args"].get("mp_context") == "forkserver":
        os.environ["UNIMO_BIDS_FORKSERVER"] = "1"
        multiprocessing.set_forkserver_preload(["unimo_bids.cli.worker_signals"])


def write_graph(workflow, work_dir: Path) -> None:
    """The workflow graph as .dot (and .svg when graphviz is installed) in the work folder."""
    import shutil

    work_dir.mkdir(parents=True, exist_ok=True)
    dotfile = work_dir / "graph.dot"
    fmt = "svg" if shutil.which("dot") else "dot"
    workflow.write_graph(dotfilename=str(dotfile), graph2use="colored", format=fmt,
                         simple_form=True)
    LOGGER.info("Workflow graph written to %s", dotfile)


def run_group(args) -> int:
    from ..interfaces.reports import build_group_report, group_suffixes

    output_dir = args.output_dir.absolute()
    suffixes = group_suffixes(output_dir)
    if not suffixes and list(output_dir.glob("sub-*/**/*_desc-aligned_*.json")):
        print(f"unimo-bids: nothing to collect in {output_dir}: it holds aligned anatomical "
              "runs only (their alignments are in each subject's report)")
        return 0
    if not suffixes:
        raise UsageError(f"{output_dir}: no participant-level outputs (*_desc-qc_<suffix>.json); "
                         "run the participant level first")
    for suffix in suffixes:  # one table and report per kind of series (bold, dwi, ...)
        tsv, html = build_group_report(output_dir, args.fd_spike_threshold, suffix)
        print(f"Group QC table: {tsv}\nGroup report: {html}")
    return 0


def versions() -> dict:
    import nipype
    import torch

    return {"unimo-bids": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "nipype": nipype.__version__}


# Set by a SIGINT or SIGTERM to the main process. The KeyboardInterrupt the handler raises can
# be swallowed ("Exception ignored in ...") when it lands in a finaliser or callback; the run
# then ends as if nothing happened, and this flag still makes it exit as interrupted.
_INTERRUPTED = threading.Event()


def _interrupt_on_signals() -> None:
    """Ctrl-C, and SIGTERM (batch schedulers, docker stop) the same way: unwind and clean up."""
    main_pid = os.getpid()
    _INTERRUPTED.clear()

    def handler(signum, frame):
        if os.getpid() != main_pid:  # a forked worker: end quietly, the main process reports
            if signum == signal.SIGINT:
                return signal.default_int_handler(signum, frame)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return None
        _INTERRUPTED.set()
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _interrupted() -> int:
    # The dying worker pool reports its broken futures; the line below says it all.
    logging.getLogger("concurrent.futures").setLevel(logging.CRITICAL + 1)
    print("unimo-bids: interrupted; finished outputs are complete, unfinished ones were not "
          "written", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    _interrupt_on_signals()
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        return _interrupted()
    return _interrupted() if _INTERRUPTED.is_set() else code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    try:
        if args.demo is not None:
            from .demo import run_demo

            return run_demo(args)
        if args.bids_dir is None or args.output_dir is None or args.analysis_level is None:
            parser.error("bids_dir, output_dir and analysis_level are required (or use --demo)")
        if args.analysis_level == "group":
            return run_group(args)
        return run_participant(args)
    except UsageError as err:
        print(f"unimo-bids: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a disk that filled up, or a folder made read-only mid-run
        where = f"{err.filename}: " if err.filename else ""
        print(f"unimo-bids: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1

