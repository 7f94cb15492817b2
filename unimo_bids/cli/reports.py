"""Subject HTML reports, after processing or on their own (--reports-only)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .parser import clean_label


def build_reports(args, output_dir: Path, bids_dir: Path, errors: dict[str, list[str]],
                  subjects: list[str] | None = None, device: str | None = None) -> int:
    """Write ``sub-<label>.html`` for each subject; returns 0 (an exit code)."""
    from ..interfaces.reports import build_subject_report
    from .run import masks_summary
    from .run import versions

    if subjects is None:
        subjects = sorted(p.name[4:] for p in output_dir.glob("sub-*") if p.is_dir())
        if args.participant_label:
            wanted = {clean_label(label) for label in args.participant_label}
            subjects = [s for s in subjects if s in wanted]
    summary = {
        "Input dataset": str(bids_dir),
        "Command": "unimo-bids " + shlex.join(args.argv),
        "Device": device or args.device,
        "Random seed": "not set" if args.random_seed is None else str(args.random_seed),
        "Head-motion reference": args.hmc_ref or "auto (first where a reference mask is given)",
        "Masks": masks_summary(args),
        "Motion model": ("rigid, then band-limited EPDiff deformation" + (
            " (predicted, then optimised)" if args.deform_predictor or args.deform_weights
            else " (optimised from zero)") if args.deformable
            else "rigid") + ("" if args.refine else " (network alone)"),
        "Versions": ", ".join(f"{k} {v}" for k, v in versions().items()),
    }
    for subject in subjects:
        report = build_subject_report(output_dir, subject, summary, errors.get(subject, []))
        print(f"Report: {report}", file=sys.stderr if errors.get(subject) else sys.stdout)
    return 0
