"""Finding the series to process with pybids, and the dataset-level derivative files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from .. import __version__
from ..interfaces.io import write_atomically
from ..workflows.base import AnatomicalRuns, SeriesRun
from .parser import UsageError, clean_label, read_option_file

BIDSIGNORE = """\
*.html
logs/
figures/
*_xfm.txt
*_boldref.nii.gz
*_distmap.nii.gz
*_boldmap.nii.gz
*_desc-qc_*.json
group_*.tsv
"""


def check_dataset(bids_dir: Path) -> None:
    """Refuse a path that is not a BIDS dataset root, with a one-line reason."""
    if not bids_dir.exists():
        raise UsageError(f"{bids_dir}: the BIDS dataset folder does not exist")
    if not bids_dir.is_dir():
        raise UsageError(f"{bids_dir}: is not a folder")
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        raise UsageError(f"{description}: missing; a BIDS dataset needs dataset_description.json "
                         "at its root")
    try:
        json.loads(description.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{description}: not valid JSON ({err})") from None


def check_paths(bids_dir: Path, output_dir: Path, work_dir: Path) -> None:
    """Refuse an output folder equal to the input, and a work folder inside the input."""
    bids, out, work = (p.resolve() for p in (bids_dir, output_dir, work_dir))
    if out == bids:
        raise UsageError(f"{output_dir}: the output folder must not be the BIDS dataset folder")
    if bids in out.parents and out.relative_to(bids).parts[0] != "derivatives":
        raise UsageError(f"{output_dir}: an output folder inside the BIDS dataset must be under "
                         "its derivatives/ folder")
    if work == bids or bids in work.parents:
        raise UsageError(f"{work_dir}: the work folder must not be inside the BIDS dataset")
    if work == out or out in work.parents:
        raise UsageError(f"{work_dir}: the work folder must not be inside the output folder")
    for folder, what in ((output_dir, "output"), (work_dir, "work")):
        check_writable(folder, what)


def check_writable(folder: Path, what: str) -> None:
    """Refuse a folder that cannot be created or written, before any work (and leave no trace:
    folders made for the test are removed again)."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    existing = folder.parents[len(missing) - 1] if missing else folder
    if not existing.is_dir():
        raise UsageError(f"{folder}: the {what} folder cannot be made: {existing} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".unimo-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"{folder}: the {what} folder is not writable ({err.strerror})") from None
    finally:
        for made in missing:  # deepest first
            try:
                made.rmdir()
            except OSError:
                break


def load_filters(path: Path | None) -> dict:
    """Read a --bids-filter-file: a JSON object whose 'bold' (or 'dwi', 'asl', 'pet') entry
    holds pybids filters."""
    if path is None:
        return {}
    try:
        filters = json.loads(read_option_file(path, "BIDS filter file"))
    except (ValueError, RecursionError) as err:
        raise UsageError(f"{path}: the BIDS filter file is not valid JSON ({err})") from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(f"{path}: the BIDS filter file must map query names (e.g. 'bold') to "
                         "objects of entity filters")
    known = {suffix for suffixes in SERIES_SUFFIXES.values() for suffix in suffixes}
    unknown = set(filters) - known
    if unknown:
        raise UsageError(f"{path}: unknown query name(s) {sorted(unknown)}; use "
                         f"{', '.join(repr(k) for k in sorted(known))}")
    return filters


def validate_names(layout, bids_dir: Path) -> list[str]:
    """File names that do not follow BIDS (warnings; derivatives/ and sourcedata/ excluded)."""
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    problems = []
    for path in layout.get(return_type="filename"):
        # pybids keeps the root as given: through a symlink, not resolved
        relative = "/" + Path(os.path.relpath(path, layout.root)).as_posix()
        if relative.startswith(("/derivatives/", "/sourcedata/", "/code/")):
            continue
        if not validator.is_bids(relative):
            problems.append(relative)
    return problems


def collect_runs(
    bids_dir: Path,
    work_dir: Path,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
    task_ids: list[str] | None = None,
    filters: dict | None = None,
    validate: bool = True,
    datatypes: tuple[str, ...] = ("func",),
    suffixes: list[str] | None = None,
) -> tuple[list[SeriesRun], list[str], list[str]]:
    """Every series of the chosen datatypes (``SERIES_SUFFIXES``) that the selection keeps.

    Returns (runs, errors, warnings): errors are (subject, one-line message) about single series
    that cannot be processed (e.g. a malformed sidecar); they do not stop the other series.
    """
    from bids import BIDSLayout, BIDSLayoutIndexer

    # One index per participant selection, so that parallel jobs (one subject each) sharing a
    # work folder never rewrite each other's database.
    selection = ",".join(sorted(clean_label(label) for label in participant_labels or []))
    database = work_dir / "bids_db" / (hashlib.sha1(selection.encode()).hexdigest()[:12]
                                       if selection else "all")
    database.mkdir(parents=True, exist_ok=True)
    bad_names, bad_json = unindexable_files(bids_dir)
    try:
        layout = BIDSLayout(str(bids_dir), validate=False, database_path=str(database),
                            reset_database=True,
                            indexer=BIDSLayoutIndexer(validate=False,
                                                      ignore=index_ignores(bids_dir, bad_json)))
    except Exception as err:  # pybids raises several types for unreadable datasets
        raise UsageError(f"{bids_dir}: cannot be read as a BIDS dataset ({err})") from None
    warnings = []
    if validate:
        bad = validate_names(layout, bids_dir)
        if bad:
            warnings.append(f"{len(bad)} file name(s) do not follow BIDS and are ignored, e.g. "
                            f"{bad[0]} (use --skip-bids-validation to silence this check)")

    subjects = layout.get_subjects()
    if participant_labels:
        labels = sorted({clean_label(label) for label in participant_labels})
        missing = [label for label in labels if label not in subjects]
        if missing:
            raise UsageError(f"{bids_dir}: participant(s) {', '.join('sub-' + m for m in missing)} "
                             f"not found; the dataset has "
                             f"{', '.join('sub-' + s for s in sorted(subjects)) or 'none'}")
    else:
        labels = sorted(subjects)
    kinds = [(datatype, suffix) for datatype in datatypes for suffix in SERIES_SUFFIXES[datatype]
             if not suffixes or suffix in suffixes]
    files, queries = [], []
    for datatype, suffix in kinds:
        query = {"datatype": datatype, "suffix": suffix, "extension": [".nii", ".nii.gz"]}
        query.update((filters or {}).get(suffix, {}))
        query["subject"] = labels
        if session_labels:
            query["session"] = sorted({clean_label(s, "session") for s in session_labels})
        if task_ids and datatype in ("func", "perf", "pet"):
            query["task"] = list(task_ids)
        try:
            files += layout.get(return_type="filename", **query)
        except Exception as err:
            raise UsageError(f"the BIDS filters {query} are not valid for pybids ({err})") \
                from None
        queries.append(query)
    if not files:
        raise UsageError(f"{bids_dir}: no series match the selection "
                         f"{queries[0] if len(queries) == 1 else queries}")

    runs, errors = [], []
    anatomical = [path for path in files if layout.parse_file_entities(path).get("datatype")
                  == "anat"]
    files = [path for path in files if path not in anatomical]
    groups, singles = group_anatomical_runs(anatomical, layout)
    runs += groups
    if singles:
        warnings.append(f"{len(singles)} anatomical image(s) have no other run of the same "
                        f"contrast in their session, so there is nothing to align them to, e.g. "
                        f"{singles[0]}")
    if anatomical and not files and not groups:
        raise UsageError(f"{bids_dir}: no anatomical contrast has two or more runs in a session "
                         "(--datatypes anat aligns runs to each other)")
    for path in sorted(files):
        subject = layout.parse_file_entities(path)["subject"]
        broken = [(sidecar, problem) for sidecar, problem in bad_json.items()
                  if applies_to(sidecar, Path(path))]
        if broken:
            sidecar, problem = broken[0]
            errors.append((subject, f"{path}: its JSON sidecar {sidecar} is not valid JSON "
                                    f"({problem})"))
            continue
        try:
            metadata = layout.get_metadata(path)
        except Exception as err:  # a sidecar pybids cannot read
            errors.append((subject, f"{path}: cannot read its JSON sidecar ({err})"))
            continue
        problem = metadata_problem(metadata)
        if problem:
            errors.append((subject, f"{path}: {problem}"))
            continue
        run = SeriesRun(path=path, subject=subject, metadata=dict(metadata),
                        suffix=layout.parse_file_entities(path)["suffix"])
        try:
            note = describe_series_kind(run, layout)
        except UsageError as err:
            errors.append((subject, str(err)))
            continue
        if note:
            warnings.append(note)
        runs.append(run)
    if any(run.suffix == "dwi" for run in runs):
        warnings.append("DWI is experimental: volumes with b > 0 are registered to the b=0 "
                        "reference across contrast, which no test here can check against "
                        "ground truth; look at their motion in the confounds (README, "
                        "'Other datatypes')")
    wanted = tuple(f"_{suffix}{ext}" for _, suffix in kinds for ext in (".nii.gz", ".nii"))
    for path in bad_names:
        subject = re.search(r"sub-([a-zA-Z0-9]+)", str(path))
        if path.name.endswith(wanted) and subject and subject.group(1) in labels:
            errors.append((subject.group(1), f"{printable(path)}: the file name is not valid "
                                             "UTF-8 (pybids cannot index it); rename it"))
    return runs, errors, warnings


# PET frames change contrast (early: blood flow; late: uptake): they are registered allowing
# any function of the reference's intensity, in this many bins (unimo.register).
PET_INTENSITY_BINS = 16

# The series each --datatypes value brings, by BIDS suffix.
SERIES_SUFFIXES = {"func": ("bold",), "dwi": ("dwi",), "perf": ("asl",), "pet": ("pet",),
                   "anat": ("T1w", "T2w", "PDw", "FLAIR")}


def group_anatomical_runs(paths: list[str], layout) -> tuple[list[AnatomicalRuns], list[str]]:
    """Anatomical images grouped by every entity but run (the same contrast, acquisition and
    session): groups of two or more, each sorted with its reference (first run) first, and
    the images that stand alone."""
    grouped: dict[tuple, list[str]] = {}
    for path in paths:
        entities = layout.parse_file_entities(path)
        key = tuple(sorted((k, str(v)) for k, v in entities.items()
                           if k not in ("run", "extension")))
        grouped.setdefault(key, []).append(path)
    groups, singles = [], []
    for members in grouped.values():
        if len(members) < 2:
            singles += members
            continue
        members = sorted(members, key=lambda p: (int(layout.parse_file_entities(p).get(
            "run", 0)), p))
        entities = layout.parse_file_entities(members[0])
        groups.append(AnatomicalRuns(paths=members, subject=entities["subject"],
                                     suffix=entities["suffix"]))
    return groups, sorted(singles)


def guess_asl_controls(run: SeriesRun, context: Path) -> str:
    """Without aslcontext.tsv: the control volumes told by the alternation of the series'
    mean signal (``unimo.reference.alternating_controls``). Returns the warning to show."""
    import nibabel as nb

    from ..unimo.reference import alternating_controls

    try:
        data = np.asarray(nb.load(run.path).dataobj, dtype=np.float32)
    except Exception:  # an unreadable series: its validation node reports it
        data = None
    if data is None or data.ndim != 4:
        return f"{run.path}: no {context.name}; its label and control volumes are unknown"
    mean = data.mean(axis=-1)
    controls = alternating_controls(data[mean > np.percentile(mean, 75)].mean(axis=0))
    if controls is None:
        return (f"{run.path}: no {context.name}, and no label/control alternation stands out; "
                "the reference may be any volume")
    run.reference_candidates = controls.tolist()
    parity = "odd" if controls[0] == 1 else "even"
    return (f"{run.path}: no {context.name}; its {parity} volumes (counting from 0) are the "
            "brighter ones, so they are taken as the control volumes the reference is chosen "
            "from")


def describe_series_kind(run: SeriesRun, layout) -> str | None:
    """What the workflow needs to know about a series beyond BOLD (sets fields of ``run``).

    DWI: its .bval/.bvec (BIDS inheritance), and the b=0 volumes as reference candidates; no
    repetition time needed. ASL: the control volumes of its aslcontext.tsv as reference
    candidates (the label/control alternation then never enters the reference); without
    aslcontext.tsv (BIDS requires it), the controls are told by the alternation of the signal,
    and a warning is returned. PET: no repetition time needed; the reference is chosen among
    the last third of the frames, whose tracer distribution changes least, and each frame may
    relate to it by any function of intensity (``PET_INTENSITY_BINS``). Raises UsageError (one
    line, naming the file) for a DWI series without a gradient table.
    """
    import nibabel as nb

    from ..interfaces.dwi import read_gradients
    from ..interfaces.series import SeriesError
    from ..unimo.dwi import b0_indices

    if run.suffix == "dwi":
        run.require_tr = False
        try:
            bval, bvec = layout.get_bval(run.path), layout.get_bvec(run.path)
        except Exception:
            bval = bvec = None
        if not bval or not bvec:
            raise UsageError(f"{run.path}: no .bval/.bvec file for this DWI series")
        run.gradients = (bval, bvec)
        try:
            bvals, _ = read_gradients(bval, bvec)
        except SeriesError as err:
            raise UsageError(str(err)) from None
        run.reference_candidates = b0_indices(bvals).tolist() or None
    elif run.suffix == "asl":
        context = Path(re.sub(r"_asl\.nii(\.gz)?$", "_aslcontext.tsv", run.path))
        if context.is_file():
            kinds = [line.strip() for line in context.read_text().splitlines()[1:]
                     if line.strip()]
            run.reference_candidates = [i for i, kind in enumerate(kinds)
                                        if kind == "control"] or None
        else:
            return guess_asl_controls(run, context)
    elif run.suffix == "pet":
        run.require_tr = False
        run.intensity_bins = PET_INTENSITY_BINS
        try:
            shape = nb.load(run.path).shape
        except Exception:  # an unreadable series: its validation node reports it
            shape = ()
        if len(shape) == 4 and shape[3] > 1:
            frames = shape[3]
            run.reference_candidates = list(range(frames - max(1, frames // 3), frames))


def metadata_problem(metadata) -> str | None:
    """What makes a series' sidecar metadata unusable, or None: a RepetitionTime that is not a
    finite number (a string, a list, true, or an integer too large for a float)."""
    value = metadata.get("RepetitionTime")
    if value is None:
        return None
    try:
        finite = (not isinstance(value, bool) and isinstance(value, (int, float))
                  and math.isfinite(float(value)))
    except OverflowError:
        finite = False
    if not finite:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        return f"RepetitionTime in the sidecar is {shown}, not a number of seconds"
    return None


# Top-level folders that are not raw data (pybids skips them too).
NOT_RAW = {"derivatives", "sourcedata", "code", "stimuli", "models"}


def printable(path) -> str:
    """A path with undecodable bytes shown as escapes (e.g. caf\\xe9), safe to print."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unindexable_files(bids_dir: Path) -> tuple[list[Path], dict[Path, str]]:
    """Files of the raw dataset that pybids would choke on: names that are not UTF-8, and JSON
    files that do not parse (problem per file)."""
    bad_names, bad_json = [], {}
    for folder, subfolders, names in os.walk(bids_dir):
        if Path(folder) == bids_dir:
            subfolders[:] = [d for d in subfolders if d not in NOT_RAW and not d.startswith(".")]
        for name in names + subfolders:
            path = Path(folder, name)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                bad_names.append(path)
                continue
            if name.endswith(".json") and name in names:
                try:
                    if not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
                        bad_json[path] = "not a JSON object"
                except (ValueError, OSError) as err:
                    bad_json[path] = " ".join(str(err).split())
                except RecursionError:
                    bad_json[path] = "nested too deeply"
        subfolders[:] = [d for d in subfolders if Path(folder, d) not in bad_names]
    return bad_names, bad_json


def index_ignores(bids_dir: Path, bad_json: dict[Path, str]) -> list:
    """pybids' default ignores, plus undecodable names and the JSON files that do not parse."""
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    return [*DEFAULT_LOCATIONS_TO_IGNORE, re.compile("[\udc80-\udcff]"),
            *(re.compile("^/" + re.escape(path.relative_to(bids_dir).as_posix()) + "$")
              for path in bad_json)]


def _entities(name: str) -> tuple[dict[str, str], str]:
    """({key: value}, suffix) of a BIDS file name."""
    stem = name.split(".", 1)[0]
    parts = stem.split("_")
    return dict(part.split("-", 1) for part in parts[:-1] if "-" in part), parts[-1]


def applies_to(sidecar: Path, series: Path) -> bool:
    """Whether a JSON sidecar holds metadata of a series under BIDS inheritance: it lies in
    the series' folder or above, has its suffix, and its entities are a subset of the series'."""
    if sidecar.parent not in (series.parent, *series.parents):
        return False
    keys, suffix = _entities(sidecar.name)
    series_keys, series_suffix = _entities(series.name)
    return suffix == series_suffix and all(series_keys.get(k) == v for k, v in keys.items())


def machine_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def screen_runs(runs: list[SeriesRun], memory_gb: float | None):
    """Header checks of every run before any work (``interfaces.series.screen_header``).

    Returns (runs that can go on, errors as (subject, message), warnings). Without ``--mem``
    the limit is 90 % of the machine's memory, as nipype's MultiProc assumes.
    """
    from ..interfaces.series import SeriesError, screen_header

    limit = memory_gb if memory_gb is not None else 0.9 * machine_memory_gb()
    kept, errors, warnings = [], [], []
    for run in runs:
        try:
            for path in getattr(run, "paths", [run.path]):
                warnings.extend(screen_header(path, limit))
        except SeriesError as err:
            errors.append((run.subject, str(err)))
            continue
        kept.append(run)
    return kept, errors, warnings


def write_dataset_files(output_dir: Path, bids_dir: Path, seed: int | None,
                        boilerplate: str | None = None) -> None:
    """dataset_description.json (derivative, GeneratedBy, DatasetLinks), .bidsignore and the
    methods text, written atomically."""
    generated = {"Name": "unimo-bids", "Version": __version__}
    container = os.environ.get("UNIMO_BIDS_CONTAINER")  # set in the Docker image
    if container and (os.environ.get("APPTAINER_CONTAINER")
                      or os.environ.get("SINGULARITY_CONTAINER")):
        container = "singularity"  # the Docker image run by Apptainer/Singularity
    if container:
        generated["Container"] = {"Type": container}
    description = {
        "Name": "unimo-bids motion-corrected outputs",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "DatasetLinks": {"raw": str(bids_dir.resolve())},
    }
    if seed is not None:
        description["GeneratedBy"][0]["RandomSeed"] = seed
    targets: dict[Path, object] = {
        output_dir / "dataset_description.json": description,
        output_dir / ".bidsignore": "text:" + BIDSIGNORE,
    }
    if boilerplate is not None:
        targets[output_dir / "logs" / "CITATION.md"] = "text:" + boilerplate
    write_atomically(targets)
