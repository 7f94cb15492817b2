"""Top-level workflow factories: the whole dataset, then one subject."""

from __future__ import annotations

from dataclasses import dataclass, field

from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from .. import __version__
from .anat import init_anat_runs_wf
from .bold import init_series_wf


@dataclass
class SeriesRun:
    """One series to correct: its file, subject, and BIDS metadata (sidecar inheritance applied)."""

    path: str
    subject: str
    metadata: dict = field(default_factory=dict)
    ref_mask: str | None = None  # the user's mask of the reference volume, if any
    suffix: str = "bold"  # bold, dwi, asl or pet: names the outputs
    reference_candidates: list[int] | None = None  # DWI: b=0 volumes; ASL: control volumes
    require_tr: bool = True  # DWI and PET go on without a repetition time
    gradients: tuple[str, str] | None = None  # DWI: (bval, bvec) files
    intensity_bins: int = 0  # PET: contrast changes across frames (see register_rigid)


@dataclass
class AnatomicalRuns:
    """The runs of one anatomical contrast in one session (same entities but run), to align
    to the first: ``path`` is that reference run."""

    paths: list[str]
    subject: str
    suffix: str
    masks: list[str | None] = field(default_factory=list)  # the user's mask of each run

    @property
    def path(self) -> str:
        return self.paths[0]


@dataclass
class WorkflowOptions:
    """The processing choices made on the command line."""

    bids_dir: str
    output_dir: str
    work_dir: str
    hmc_ref: str | None = None  # None: auto, or first for a run with a user's reference mask
    dummy_scans: int | None = None
    fd_radius: float = 50.0
    fd_spike_threshold: float = 0.5
    dvars_spike_threshold: float = 1.5
    device: str = "cpu"
    omp_nthreads: int = 1
    seed: int | None = None
    weights: str | None = None
    refine: bool = True
    moving_anatomy: bool = False
    write_volume_masks: bool = False
    deformable: bool = False
    deform_weights: str | None = None
    deform_predictor: bool = False
    seg_model: str | None = None
    template: str | None = None
    template_home: str | None = None


def init_unimo_bids_wf(runs: list[SeriesRun | AnatomicalRuns], options: WorkflowOptions) -> Workflow:
    """Build the participant-level workflow: one sub-workflow per subject.

    Inputs
    ------
    (none)

    Outputs
    -------
    (derivatives are written by each series workflow)
    """
    workflow = Workflow(name=f"unimo_bids_{__version__.replace('.', '_')}_wf")
    workflow.base_dir = options.work_dir
    for subject in sorted({run.subject for run in runs}):
        subject_runs = [run for run in runs if run.subject == subject]
        workflow.add_nodes([init_single_subject_wf(subject, subject_runs, options)])
    return workflow


def init_single_subject_wf(subject: str, runs: list[SeriesRun | AnatomicalRuns], options: WorkflowOptions
                           ) -> Workflow:
    """Motion-correct every series of one subject; each series is independent of the others,
    so a series that fails does not stop the rest.

    Inputs
    ------
    (none)

    Outputs
    -------
    (derivatives are written by each series workflow)
    """
    workflow = Workflow(name=f"sub_{subject}_wf")
    workflow.__desc__ = f"""\
Results included in this manuscript come from preprocessing performed using *unimo-bids*
{__version__}, which is based on *Nipype* 1.x (Gorgolewski et al., 2011).

"""
    workflow.__postdesc__ = """
UniMo: Wang et al., "UniMo: Universal Motion Correction For Medical Images without Network
Retraining". Framewise displacement: Power et al., 2012, NeuroImage 59(3). DVARS: Power et al.,
2012; standardised DVARS: Nichols, 2013.
"""
    for run in sorted(runs, key=lambda r: r.path):
        if isinstance(run, AnatomicalRuns):
            workflow.add_nodes([init_anat_runs_wf(
                run.paths, options.bids_dir, options.output_dir, masks=run.masks,
                device=options.device, omp_nthreads=options.omp_nthreads, seed=options.seed,
                seg_model=options.seg_model)])
            continue
        workflow.add_nodes([init_series_wf(
            run.path, options.bids_dir, options.output_dir, run.metadata,
            hmc_ref=options.hmc_ref or ("first" if run.ref_mask else "auto"),
            # Non-steady-state detection is for BOLD: DWI b=0 volumes or ASL M0 scans are
            # bright by design, not because T1 saturation has not settled.
            dummy_scans=options.dummy_scans if run.suffix == "bold" else 0,
            fd_radius=options.fd_radius, fd_spike_threshold=options.fd_spike_threshold,
            dvars_spike_threshold=options.dvars_spike_threshold, device=options.device,
            omp_nthreads=options.omp_nthreads, seed=options.seed, weights=options.weights,
            refine=options.refine, moving_anatomy=options.moving_anatomy,
            write_volume_masks=options.write_volume_masks, ref_mask=run.ref_mask,
            seg_model=options.seg_model, template=options.template,
            template_home=options.template_home, deformable=options.deformable,
            deform_weights=options.deform_weights, deform_predictor=options.deform_predictor,
            suffix=run.suffix, reference_candidates=run.reference_candidates,
            require_tr=run.require_tr, gradients=run.gradients,
            intensity_bins=run.intensity_bins)])
    return workflow
