"""Workflow aligning the runs of one anatomical contrast (e.g. fetal T2w stacks)."""

from __future__ import annotations

import os

from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.anat import AlignRuns
from ..interfaces.io import WriteDerivatives
from .bold import float32_gb, series_workflow_name


def pick(items: list, index: int):
    """items[index] (for a connection that hands one run its own outputs)."""
    return items[index]


def init_anat_runs_wf(
    run_files: list[str],
    bids_dir: str,
    output_dir: str,
    *,
    masks: list[str | None] | None = None,
    device: str = "cpu",
    omp_nthreads: int = 1,
    seed: int | None = None,
    seg_model: str | None = None,
    name: str | None = None,
) -> Workflow:
    """Align each run to the first and write, per run, its aligned image (voxels unchanged,
    affine moved), its transform, and its aligned mask when the user gave one.

    Workflow graph: align_runs -> one derivatives writer per run.

    run_files: 3D runs of one suffix in one session, the reference first.
    masks: the user's brain mask of each run (None for none), e.g. from --derivatives.
    seg_model: a trained segmenter (TorchScript) for the runs without a user's mask.
    """
    suffix = os.path.basename(run_files[0]).split(".")[0].rsplit("_", 1)[-1]
    workflow = Workflow(name=name or series_workflow_name(run_files[0]))
    shape = (", and on the signed distance maps of the brain masks at coarse resolutions,"
             if (masks and any(masks)) or seg_model else "")
    workflow.__desc__ = f"""\
The {len(run_files)} {suffix} runs were aligned rigidly to the first with the registration of
*unimo-bids* (multi-resolution Gauss-Newton on intensities{shape} started from each of the 24
rotations of the cube about the brain's centroid). Each aligned run keeps its voxels; only its
affine changed (no resampling).
"""
    on_gpu = device.startswith("cuda")
    align = pe.Node(
        AlignRuns(in_files=list(run_files),
                  in_masks=[m or "" for m in (masks or [None] * len(run_files))],
                  source_uris=[f"bids:raw:{os.path.relpath(f, bids_dir)}" for f in run_files],
                  device=device, num_threads=omp_nthreads, seed=seed, use_gpu=on_gpu),
        # measured: 2.2 GB peak for two 197x233x189 runs (35 MB each as float32)
        name="align_runs", mem_gb=0.5 + 25 * sum(float32_gb(f) or 0.0 for f in run_files),
        n_procs=1 if on_gpu else omp_nthreads)
    if seg_model:
        align.inputs.seg_model = seg_model
    for index, run_file in enumerate(run_files):
        write = pe.Node(WriteDerivatives(base_directory=output_dir, bids_dir=bids_dir,
                                         source_file=run_file),
                        name=f"write_run{index}", run_without_submitting=True)
        workflow.connect([(align, write, [
            (("out_run_files", pick, index), "in_files"),
            (("out_run_names", pick, index), "names"),
            (("out_sidecars", pick, index), "sidecars"),
            (("out_run_figures", pick, index), "in_figures"),
            (("out_figure_names", pick, index), "figure_names"),
        ])])
    return workflow
