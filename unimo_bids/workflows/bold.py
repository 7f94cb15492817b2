"""Head-motion correction workflow for one 4D series (BOLD, DWI, ASL, PET)."""

from __future__ import annotations

import os
import re

import nibabel as nb
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from niworkflows.engine.workflows import LiterateWorkflow as Workflow

from ..interfaces.confounds import SeriesConfounds
from ..interfaces.dwi import RotateGradients, ShellOutliers
from ..interfaces.io import WriteDerivatives
from ..interfaces.reports import SeriesReportlets
from ..interfaces.segment import Segment, ShapeMap
from ..interfaces.series import HMCReference, ValidateSeries
from ..interfaces.template import TemplatePrior
from ..interfaces.unimo import ApplyHeadMotion, UniMoDeform, UniMoRigid
from ..unimo import epdiff


def series_outputs(suffix: str = "bold") -> dict[str, tuple[str, str]]:
    """Derivative name (after the source entities) -> (node, output) that produces it, for a
    series whose BIDS suffix is ``suffix`` (bold, dwi, asl, pet)."""
    return {
        f"desc-preproc_{suffix}.nii.gz": ("apply_hmc", "out_file"),
        f"desc-hmc_{suffix}ref.nii.gz": ("hmc_reference", "out_file"),
        "desc-brain_mask.nii.gz": ("reference_mask", "out"),
        "label-brain_distmap.nii.gz": ("reference_shape", "out_file"),
        f"from-orig_to-{suffix}ref_mode-image_desc-hmc_xfm.txt": ("unimo_rigid", "out_itk"),
        "desc-confounds_timeseries.tsv": ("confounds", "out_confounds"),
        "desc-confounds_timeseries.json": ("confounds", "out_confounds_meta"),
        f"stat-tsnr_desc-raw_{suffix}map.nii.gz": ("confounds", "out_tsnr_raw"),
        f"stat-tsnr_desc-preproc_{suffix}map.nii.gz": ("confounds", "out_tsnr_preproc"),
        f"desc-qc_{suffix}.json": ("confounds", "out_qc"),
    }


# Per-volume masks (4D, each volume's mask in its own position, on the series' grid), written
# with --write-volume-masks: every volume's segmentation, and the tracked masks of the
# moving-anatomy mode (the reference mask carried by each volume's transform).
SEGMENTED_MASKS = {"desc-segmented_mask.nii.gz": ("segment", "out_masks")}
TRACKED_OUTPUTS = {"desc-tracked_mask.nii.gz": ("unimo_rigid", "out_masks")}
# Their JSON sidecars, by output.
VOLUME_MASK_SIDECARS = {
    "desc-segmented_mask.nii.gz": {
        "Type": "Brain", "Description": "4D: the brain mask of each volume, segmented on its own "
                                        "(before motion correction, in the volume's position)"},
    "desc-tracked_mask.nii.gz": {
        "Type": "Brain", "Description": "4D: the reference brain mask carried to each volume by "
                                        "its estimated transform (moving-anatomy mode)"},
}


def volume_mask_outputs(moving_anatomy: bool) -> dict[str, tuple[str, str]]:
    """The per-volume mask outputs of --write-volume-masks."""
    return dict(SEGMENTED_MASKS, **(TRACKED_OUTPUTS if moving_anatomy else {}))


def deform_outputs(suffix: str = "bold") -> dict[str, tuple[str, str]]:
    """Extra output of --deformable: the displacement series (convention: unimo.deform)."""
    return {f"from-orig_to-{suffix}ref_mode-image_desc-deform_xfm.nii.gz":
            ("unimo_deform", "out_fields")}


# The rotated gradient table of a DWI series, beside its preprocessed image (as QSIPrep).
GRADIENT_OUTPUTS = {"desc-preproc_dwi.bvec": ("rotate_gradients", "out_bvec"),
                    "desc-preproc_dwi.bval": ("rotate_gradients", "out_bval")}
FIGURES = {"mask": "out_mask", "beforeafter": "out_beforeafter", "tsnr": "out_tsnr",
           "motion": "out_motion", "carpet": "out_carpet", "unimo": "out_unimo"}


def series_figures(suffix: str = "bold") -> dict[str, str]:
    """Figure name (after the source entities, no extension) -> reportlets output."""
    return {f"desc-{name}_{suffix}": output for name, output in FIGURES.items()}



def series_workflow_name(bold_file: str) -> str:
    """A valid, unique nipype name from a BIDS file name (subject stays in the parent)."""
    stem = os.path.basename(bold_file).split(".")[0]
    stem = re.sub(r"^sub-[^_]+_", "", stem)
    return "series_" + re.sub(r"[^0-9a-zA-Z]+", "_", stem) + "_wf"


def float32_gb(path: str) -> float | None:
    """GB of one float32 copy of an image, from its header alone; None when unreadable (the
    workflow's first step reports that)."""
    try:
        shape = nb.load(path).shape
    except Exception:
        return None
    voxels = 1
    for n in shape:
        voxels *= int(n)
    return voxels * 4 / 1024**3


def estimate_mem_gb(bold_file: str) -> float:
    """Memory (GB) of one float32 copy of the series, at least 0.05 (0.5 when unreadable)."""
    size = float32_gb(bold_file)
    return 0.5 if size is None else max(size, 0.05)


def _preproc_sidecar(repetition_time, source_uri, metadata, mask_report=None, suffix="bold",
                     extra=None):
    """JSON sidecars of the preprocessed series and, after a template check, of the brain mask
    (a nipype Function: imports inside); ``extra``: further name -> metadata (the per-volume
    masks'), each given the source. A repetition time of 0 (unknown, allowed for DWI and
    PET) is left out."""
    import json

    sidecar = dict(metadata)
    sidecar.update({"SkullStripped": False, "Sources": [source_uri]})
    if repetition_time:
        sidecar["RepetitionTime"] = repetition_time
    sidecars = {f"desc-preproc_{suffix}.json": sidecar}
    for name, values in (extra or {}).items():
        sidecars[name] = dict(values, Sources=[source_uri])
    if mask_report:
        with open(mask_report) as handle:
            report = json.load(handle)
        sidecars["desc-brain_mask.json"] = {"Type": "Brain", "TemplateCheck": {
            key: report[key] for key in ("template", "dice", "min_dice", "scale", "corrected",
                                         "note")}}
    return sidecars


NETWORK_DESC = """\
The UniMo network (E(3)-equivariant keypoints of the volume and of its shape map, each
aligned to the reference's by a weighted Kabsch solve and fused by a learned SLERP weight)
estimated each volume's rigid motion. """

DEFORMABLE_DESC = """Local deformation left after the rigid transform was then corrected per volume by a
band-limited LDDMM (EPDiff geodesic shooting of an initial velocity truncated to its lowest
{band}^3 Fourier frequencies, {steps} Euler steps, in the style of FLASH and UniMo), the initial
velocity being {start}optimised at test time on intensities inside the brain mask with an
<L v, v> regulariser; the rigid transform and the deformation were composed so that each volume
was interpolated once. """

PREDICTOR_DESC = """predicted by a U-Net from the pair of volumes and of their brain-mask
distance maps (trained on synthetic deformations of a template) and then """


def deformable_description(predictor: bool) -> str:
    """The methods text of --deformable."""
    return DEFORMABLE_DESC.format(band=epdiff.DEFAULT_BAND, steps=epdiff.DEFAULT_STEPS,
                                  start=PREDICTOR_DESC if predictor else "")


def masks_description(moving_anatomy: bool, ref_mask, seg_model, template) -> str:
    """The methods text on masks and shape maps."""
    if ref_mask:
        text = "The reference volume's mask was supplied by the user. "
    elif template:
        text = (f"The reference volume's mask was checked against the {template} brain mask "
                "(TemplateFlow), scaled and rigidly fitted to it by its signed distance map. ")
    else:
        text = ""
    text += ("A trained 3D U-Net segmented every volume" if seg_model else
             "A brain mask was computed for every volume with robust intensity thresholds, "
             "morphology and the largest connected component")
    if moving_anatomy:
        return text + (
            ". The anatomy in the reference mask was treated as moving inside still tissue: "
            "each volume was registered using the voxels of the (slightly shrunk) reference "
            "mask only, the mask was carried to every volume by its transform, each volume's "
            "segmentation near its carried mask was compared with it, and the signed distance "
            "maps (mm) of the agreeing masks served as shape maps for another registration, "
            "until the transforms changed by less than 0.05 mm (at most three rounds). ")
    return text + (", and its signed Euclidean distance transform (mm) served as a shape "
                   "map. ")


def init_series_wf(
    bold_file: str,
    bids_dir: str,
    output_dir: str,
    metadata: dict,
    *,
    hmc_ref: str = "auto",
    dummy_scans: int | None = None,
    fd_radius: float = 50.0,
    fd_spike_threshold: float = 0.5,
    dvars_spike_threshold: float = 1.5,
    device: str = "cpu",
    omp_nthreads: int = 1,
    seed: int | None = None,
    weights: str | None = None,
    refine: bool = True,
    moving_anatomy: bool = False,
    write_volume_masks: bool = False,
    ref_mask: str | None = None,
    seg_model: str | None = None,
    template: str | None = None,
    template_home: str | None = None,
    deformable: bool = False,
    deform_weights: str | None = None,
    deform_predictor: bool = False,
    suffix: str = "bold",
    reference_candidates: list[int] | None = None,
    require_tr: bool = True,
    gradients: tuple[str, str] | None = None,
    intensity_bins: int = 0,
    name: str | None = None,
) -> Workflow:
    """Motion-correct one 4D series and write its derivatives.

    Workflow graph: validate -> reference -> segment (mask per volume) [-> template check of
    the reference mask] -> shape maps -> UniMo rigid -> one resampling -> confounds and tSNR
    -> reportlets -> derivatives. With ``moving_anatomy`` the rigid step registers inside the
    reference mask only and tracks it through the series.

    write_volume_masks: also write the per-volume masks (``volume_mask_outputs``); otherwise
        they stay in the work directory.

    ref_mask: the user's mask of the reference volume (replaces the segmented one; not
        checked against the template).
    seg_model: a trained segmenter (TorchScript) instead of the classical masks.
    template: a TemplateFlow template ID whose brain mask, fitted to the reference mask, checks
        (and corrects) a segmented reference mask; read from ``template_home``.
    deformable: after the rigid step, estimate a band-limited EPDiff deformation per volume
        (``UniMoDeform``) and compose it with the rigid transform in the one resampling.
    deform_predictor: start each volume's optimisation from a velocity predictor's estimate
        (``deform_weights``, None: the packaged one) instead of zero.
    suffix: the series' BIDS suffix (bold, dwi, asl, pet); it names the outputs.
    reference_candidates: the volumes the reference may be chosen from (DWI: the b=0 volumes;
        ASL: the control volumes); None: any steady-state volume.
    require_tr: fail the series without a repetition time (time series); DWI and PET go on.
    gradients: (bval, bvec) files of a DWI series: the b-vectors are rotated by each volume's
        motion and written with the series, and a per-shell outlier measure is added.
    intensity_bins: 0 registers each volume assuming a linear intensity relation to the
        reference; n > 0 allows any function of it (PET frames, whose contrast changes), and
        leaves out the per-volume shape maps.

    Inputs
    ------
    (none: the series is fixed when the workflow is built)

    Outputs
    -------
    outputnode.out_files
        derivative files written for this series
    outputnode.preproc
        motion-corrected series in the work directory
    """
    workflow = Workflow(name=name or series_workflow_name(bold_file))
    refinement = (
        "Starting from the identity or from the network's estimate, whichever fit better at "
        "the coarsest level, the transforms were refined for all volumes at once by a "
        "multi-resolution, inverse-compositional Gauss-Newton registration (Huber-weighted, with "
        "a per-volume linear intensity fit), using the shape maps at the coarse levels and "
        "intensities throughout." if refine else
        "The network's fused estimates were used as they are (no test-time refinement).")
    workflow.__desc__ = """\
Head-motion parameters of the series were estimated with *unimo-bids* against a reference
volume ({ref}). {masks}{network}{refinement}
{deformable}Each volume was then resampled once onto the reference grid (trilinear). Framewise displacement
(Power, radius {radius:g} mm), RMSD and DVARS were computed with Nipype, and volumes with FD >
{fd:g} mm or standardised DVARS > {dvars:g} were flagged as motion outliers.
""".format(ref=hmc_ref, radius=fd_radius, fd=fd_spike_threshold, dvars=dvars_spike_threshold,
           network=NETWORK_DESC, refinement=refinement,
           deformable=deformable_description(deform_predictor) if deformable else "",
           masks=masks_description(moving_anatomy, ref_mask, seg_model, template))

    outputnode = pe.Node(niu.IdentityInterface(fields=["out_files", "preproc"]),
                         name="outputnode")
    mem_gb = estimate_mem_gb(bold_file)
    validate = pe.Node(ValidateSeries(in_file=bold_file,
                                      repetition_time=metadata.get("RepetitionTime"),
                                      require_tr=require_tr),
                       name="validate", mem_gb=2 * mem_gb)
    hmc_reference = pe.Node(
        HMCReference(hmc_ref=str(hmc_ref), dummy_scans=-1 if dummy_scans is None else dummy_scans,
                     source_file=bold_file, candidates=list(reference_candidates or [])),
        name="hmc_reference", mem_gb=3 * mem_gb, n_procs=omp_nthreads)
    # On a GPU, a node takes one of MultiProc's n_gpu_procs slots (nipype counts a GPU node's
    # n_procs in GPU slots too), so that --gpu-procs N runs N of them at once.
    on_gpu = device.startswith("cuda")
    gpu_procs = 1 if on_gpu else omp_nthreads
    segment = pe.Node(Segment(device=device, num_threads=omp_nthreads, use_gpu=on_gpu),
                      name="segment", mem_gb=3 * mem_gb, n_procs=gpu_procs)
    if ref_mask:
        segment.inputs.ref_mask = ref_mask
    if seg_model:
        segment.inputs.seg_model = seg_model
    if template and not ref_mask:
        # one thread: two gain nothing on a fit this small, and stall under load
        reference_mask = pe.Node(TemplatePrior(template=template, device=device, use_gpu=on_gpu),
                                 name="template_prior", mem_gb=0.5)
        if template_home:
            reference_mask.inputs.template_home = template_home
        mask_output = "out_mask"
    else:
        reference_mask = pe.Node(niu.IdentityInterface(fields=["out"]), name="reference_mask")
        mask_output = "out"
    # scipy's transforms run in omp_nthreads threads (groups of volumes); a GPU node takes one.
    volume_shapes = pe.Node(ShapeMap(device=device, num_threads=omp_nthreads, use_gpu=on_gpu),
                            name="volume_shapes", mem_gb=3 * mem_gb, n_procs=gpu_procs)
    reference_shape = pe.Node(ShapeMap(device=device, use_gpu=on_gpu), name="reference_shape",
                              mem_gb=0.2)
    unimo_rigid = pe.Node(
        UniMoRigid(device=device, num_threads=omp_nthreads, seed=seed, weights=weights,
                   refine=refine, moving_anatomy=moving_anatomy,
                   intensity_bins=intensity_bins, use_gpu=on_gpu),
        name="unimo_rigid", mem_gb=4 * mem_gb, n_procs=gpu_procs)
    apply_hmc = pe.Node(ApplyHeadMotion(device=device, num_threads=omp_nthreads, use_gpu=on_gpu),
                        name="apply_hmc", mem_gb=3 * mem_gb, n_procs=gpu_procs)
    confounds = pe.Node(
        SeriesConfounds(fd_radius=fd_radius, fd_spike_threshold=fd_spike_threshold,
                        dvars_spike_threshold=dvars_spike_threshold),
        name="confounds", mem_gb=4 * mem_gb)
    reportlets = pe.Node(SeriesReportlets(fd_spike_threshold=fd_spike_threshold),
                         name="reportlets", mem_gb=3 * mem_gb)

    relative = os.path.relpath(bold_file, bids_dir)
    sidecar = pe.Node(
        niu.Function(function=_preproc_sidecar, input_names=["repetition_time", "source_uri",
                                                              "metadata", "mask_report",
                                                              "suffix", "extra"],
                     output_names=["sidecars"]),
        name="sidecar")
    sidecar.inputs.suffix = suffix
    sidecar.inputs.source_uri = f"bids:raw:{relative}"
    sidecar.inputs.metadata = {k: v for k, v in metadata.items()
                               if k in ("TaskName", "SliceTiming", "EchoTime",
                                        "PhaseEncodingDirection", "TotalReadoutTime")}

    volume_masks = volume_mask_outputs(moving_anatomy) if write_volume_masks else {}
    sidecar.inputs.extra = {name.replace(".nii.gz", ".json"): VOLUME_MASK_SIDECARS[name]
                            for name in volume_masks}
    outputs = dict(series_outputs(suffix), **volume_masks,
                   **(deform_outputs(suffix) if deformable else {}),
                   **(GRADIENT_OUTPUTS if gradients else {}))
    figures = series_figures(suffix)
    outputs["desc-brain_mask.nii.gz"] = ("reference_mask", mask_output)
    names = list(outputs)
    gather_files = pe.Node(niu.Merge(len(names)), name="gather_files", run_without_submitting=True)
    gather_figures = pe.Node(niu.Merge(len(figures)), name="gather_figures",
                             run_without_submitting=True)
    write = pe.Node(
        WriteDerivatives(base_directory=output_dir, bids_dir=bids_dir, source_file=bold_file,
                         names=names, figure_names=list(figures)),
        name="write_derivatives", run_without_submitting=True)

    nodes = {"apply_hmc": apply_hmc, "hmc_reference": hmc_reference, "segment": segment,
             "reference_shape": reference_shape, "unimo_rigid": unimo_rigid,
             "confounds": confounds, "reference_mask": reference_mask}
    if deformable:
        unimo_deform = pe.Node(UniMoDeform(device=device, num_threads=omp_nthreads, seed=seed,
                                           predictor=deform_weights,
                                           use_predictor=deform_predictor, use_gpu=on_gpu),
                               name="unimo_deform", mem_gb=4 * mem_gb, n_procs=gpu_procs)
        nodes["unimo_deform"] = unimo_deform
        # The predictor's moving shapes: the masks the rigid step registered.
        if moving_anatomy:
            workflow.connect(unimo_rigid, "out_masks", unimo_deform, "in_masks")
        else:
            workflow.connect(segment, "out_masks", unimo_deform, "in_masks")
        workflow.connect([
            (validate, unimo_deform, [("out_file", "in_file")]),
            (hmc_reference, unimo_deform, [("out_file", "reference")]),
            (reference_mask, unimo_deform, [(mask_output, "reference_mask")]),
            (unimo_rigid, unimo_deform, [("out_transforms", "in_transforms"),
                                         ("out_diagnostics", "in_diagnostics"),
                                         ("out_diagnostics_meta", "in_diagnostics_meta")]),
            (unimo_deform, apply_hmc, [("out_fields", "in_fields")]),
        ])
        diagnostics = unimo_deform
    else:
        diagnostics = unimo_rigid
    if gradients:
        rotate_gradients = pe.Node(RotateGradients(in_bval=gradients[0], in_bvec=gradients[1]),
                                   name="rotate_gradients")
        shell_outliers = pe.Node(ShellOutliers(in_bval=gradients[0]), name="shell_outliers",
                                 mem_gb=2 * mem_gb)
        nodes["rotate_gradients"] = rotate_gradients
        workflow.connect([
            (validate, rotate_gradients, [("out_file", "in_file")]),
            (unimo_rigid, rotate_gradients, [("out_transforms", "in_transforms")]),
            (apply_hmc, shell_outliers, [("out_file", "in_preproc")]),
            (reference_mask, shell_outliers, [(mask_output, "in_mask")]),
            (diagnostics, shell_outliers, [("out_diagnostics", "in_diagnostics"),
                                           ("out_diagnostics_meta", "in_diagnostics_meta")]),
        ])
        diagnostics = shell_outliers
    workflow.connect(diagnostics, "out_diagnostics", confounds, "diagnostics")
    workflow.connect(diagnostics, "out_diagnostics_meta", confounds, "diagnostics_meta")
    if mask_output == "out_mask":  # the template check needs the reference too
        workflow.connect([(hmc_reference, reference_mask, [("out_file", "reference")]),
                          (segment, reference_mask, [("out_ref_mask", "reference_mask")]),
                          (reference_mask, sidecar, [("out_report", "mask_report")])])
    else:
        workflow.connect(segment, "out_ref_mask", reference_mask, "out")
    if moving_anatomy:  # tracked masks: the rigid step makes its own shape maps
        workflow.connect(segment, "out_masks", unimo_rigid, "in_masks")
    elif not intensity_bins:
        # Where contrast changes from volume to volume (PET), each volume's mask follows its
        # contrast, and the shapes mislead the registration more than they guide it.
        workflow.connect([
            (segment, volume_shapes, [("out_masks", "in_masks")]),
            (volume_shapes, unimo_rigid, [("out_file", "in_shape_maps")]),
            (reference_shape, unimo_rigid, [("out_file", "reference_shape_map")]),
        ])
    workflow.connect([
        (validate, hmc_reference, [("out_file", "in_file")]),
        (validate, segment, [("out_file", "in_file")]),
        (hmc_reference, segment, [("out_file", "reference")]),
        (reference_mask, reference_shape, [(mask_output, "in_masks")]),
        (validate, unimo_rigid, [("out_file", "in_file")]),
        (hmc_reference, unimo_rigid, [("out_file", "reference")]),
        (reference_mask, unimo_rigid, [(mask_output, "reference_mask")]),
        (validate, apply_hmc, [("out_file", "in_file")]),
        (unimo_rigid, apply_hmc, [("out_transforms", "in_transforms")]),
        (validate, confounds, [("out_file", "in_raw")]),
        (apply_hmc, confounds, [("out_file", "in_preproc")]),
        (reference_mask, confounds, [(mask_output, "in_mask")]),
        (unimo_rigid, confounds, [("out_transforms", "in_transforms")]),
        (hmc_reference, confounds, [("n_dummy", "non_steady_state")]),
        (validate, reportlets, [("out_file", "in_raw")]),
        (apply_hmc, reportlets, [("out_file", "in_preproc")]),
        (hmc_reference, reportlets, [("out_file", "in_ref")]),
        (reference_mask, reportlets, [(mask_output, "in_mask")]),
        (reference_shape, reportlets, [("out_file", "in_distmap")]),
        (confounds, reportlets, [("out_confounds", "in_confounds"),
                                 ("out_tsnr_raw", "in_tsnr_raw"),
                                 ("out_tsnr_preproc", "in_tsnr_preproc")]),
        (validate, sidecar, [("repetition_time", "repetition_time")]),
        (gather_files, write, [("out", "in_files")]),
        (gather_figures, write, [("out", "in_figures")]),
        (sidecar, write, [("sidecars", "sidecars")]),
        (write, outputnode, [("out_files", "out_files")]),
        (apply_hmc, outputnode, [("out_file", "preproc")]),
    ])
    for position, (node_name, output) in enumerate(outputs.values(), start=1):
        workflow.connect(nodes[node_name], output, gather_files, f"in{position}")
    for position, output in enumerate(figures.values(), start=1):
        workflow.connect(reportlets, output, gather_figures, f"in{position}")
    return workflow
