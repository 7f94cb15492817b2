"""Finding the series to process with pybids, and the dataset-level derivative files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import __version__
from ..interfaces.io import write_atomically
from ..workflows.base import SeriesRun
from .parser import UsageError, clean_label

BIDSIGNORE = """\
*.html
logs/
figures/
*_xfm.txt
*_boldref.nii.gz
*_distmap.nii.gz
*_boldmap.nii.gz
*_desc-qc_bold.json
group_bold.tsv
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


def load_filters(path: Path | None) -> dict:
    """Read a --bids-filter-file: a JSON object whose 'bold' entry holds pybids filters."""
    if path is None:
        return {}
    try:
        filters = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: the BIDS filter file does not exist") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: the BIDS filter file is not valid JSON ({err})") from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(f"{path}: the BIDS filter file must map query names (e.g. 'bold') to "
                         "objects of entity filters")
    unknown = set(filters) - {"bold"}
    if unknown:
        raise UsageError(f"{path}: unknown query name(s) {sorted(unknown)}; use 'bold'")
    return filters


def validate_names(layout, bids_dir: Path) -> list[str]:
    """File names that do not follow BIDS (warnings; derivatives/ and sourcedata/ excluded)."""
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    problems = []
    for path in layout.get(return_type="filename"):
        relative = "/" + Path(path).relative_to(bids_dir.resolve()).as_posix()
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
) -> tuple[list[SeriesRun], list[str], list[str]]:
    """Every BOLD series that the selection keeps.

    Returns (runs, errors, warnings): errors are (subject, one-line message) about single series
    that cannot be processed (e.g. a malformed sidecar); they do not stop the other series.
    """
    from bids import BIDSLayout

    # One index per participant selection, so that parallel jobs (one subject each) sharing a
    # work folder never rewrite each other's database.
    selection = ",".join(sorted(clean_label(label) for label in participant_labels or []))
    database = work_dir / "bids_db" / (hashlib.sha1(selection.encode()).hexdigest()[:12]
                                       if selection else "all")
    database.mkdir(parents=True, exist_ok=True)
    try:
        layout = BIDSLayout(str(bids_dir), validate=False, database_path=str(database),
                            reset_database=True)
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
    query = {"datatype": "func", "suffix": "bold", "extension": [".nii", ".nii.gz"]}
    query.update((filters or {}).get("bold", {}))
    query["subject"] = labels
    if session_labels:
        query["session"] = sorted({clean_label(s, "session") for s in session_labels})
    if task_ids:
        query["task"] = list(task_ids)
    try:
        files = layout.get(return_type="filename", **query)
    except Exception as err:
        raise UsageError(f"the BIDS filters {query} are not valid for pybids ({err})") from None
    if not files:
        raise UsageError(f"{bids_dir}: no BOLD series match the selection {query}")

    runs, errors = [], []
    for path in sorted(files):
        subject = layout.parse_file_entities(path)["subject"]
        try:
            metadata = layout.get_metadata(path)
        except Exception as err:  # a malformed JSON sidecar
            errors.append((subject, f"{path}: cannot read its JSON sidecar ({err})"))
            continue
        runs.append(SeriesRun(path=path, subject=subject, metadata=dict(metadata)))
    return runs, errors, warnings


def write_dataset_files(output_dir: Path, bids_dir: Path, seed: int | None,
                        boilerplate: str | None = None) -> None:
    """dataset_description.json (derivative, GeneratedBy, DatasetLinks), .bidsignore and the
    methods text, written atomically."""
    generated = {"Name": "unimo-bids", "Version": __version__}
    container = os.environ.get("UNIMO_BIDS_CONTAINER")
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
