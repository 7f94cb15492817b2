"""Training the UniMo rigid network on synthetic motion of a domain-randomised anatomy.

The network must work on modalities it never saw, so it never sees one twice: every sample is a
new contrast drawn from tissue probability maps (random intensity per tissue, random gamma, a
smooth multiplicative bias field, noise, sometimes no head around the brain), moved by a random
rigid transform (half of them uniform on SO(3), the rest up to 60 degrees; translations up to
20 mm), sometimes cut by a field-of-view plane that stays put while the head moves, and (the
geometric deformation augmenter, ``random_deformations``) deformed by a smooth random field of a
few mm, so the rigid estimate learns to see past local deformation. The shape
branch sees signed distance maps of masks thresholded at random levels, so the reference and
the moving volume never have quite the same segmentation.

The loss is the mean displacement error over brain points (mm) of each branch's estimate and of
their fusion, log-compressed so that whole-turn errors early on do not swamp the gradient; after
an optional supervised warm-up it can be the unsupervised image and shape alignment of
``alignment_loss`` instead (1 - NCC of the images, MSE of the shape maps).

Pure torch and numpy: the caller (``unimo_bids.cli.train``) loads the anatomy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import roma
import torch
from scipy import ndimage

from .geometry import centroids, homogeneous, rigid_inverse, voxel_sizes, world_points
from .keypoints import shape_input, to_working_grid
from .resample import band_limit_sigma, gaussian_blur, resample, voxel_map
from .network import RigidEstimates, UniMoRigidNet, network_estimates, translations
from .deform import masked_ncc
from .epdiff import warp
from .segment import brain_mask
from .shape import signed_distance

__all__ = ["Anatomy", "alignment_loss", "anatomy_from_image", "random_deformations",
           "sample_pairs", "displacement_error", "evaluate", "train"]


@dataclass
class Anatomy:
    """Tissue maps of one head on one grid.

    tissues: (C, X, Y, Z) float32 probability maps (e.g. grey matter, white matter, CSF, and
        non-brain head); brain: (X, Y, Z) brain probability; affine: (4, 4) voxel -> world.
    """

    tissues: np.ndarray
    brain: np.ndarray
    affine: np.ndarray

    def __post_init__(self):
        self.tissues_t = torch.as_tensor(np.asarray(self.tissues, dtype=np.float32))
        self._band_limited = {}
        mask = self.brain > 0.5
        self.center = centroids(mask, self.affine)
        self.points = torch.as_tensor(world_points(mask.shape, self.affine, mask)[::97])
        # Segmentations at several thresholds: the shape branch must tolerate their differences.
        self.distance_maps = torch.as_tensor(np.stack([
            signed_distance(ndimage.binary_fill_holes(self.brain > level),
                            voxel_sizes(self.affine))
            for level in (0.2, 0.35, 0.5, 0.65, 0.8)]).astype(np.float32))[:, None]

    def band_limited(self, spacing_mm: float) -> torch.Tensor:
        """(C, X, Y, Z) tissue maps blurred once for a working spacing (as ``to_working_grid``
        would blur each sample: contrasts are linear in the maps, so one blur serves all)."""
        if spacing_mm not in self._band_limited:
            self._band_limited[spacing_mm] = gaussian_blur(
                self.tissues_t[None], band_limit_sigma(self.affine, spacing_mm))[0]
        return self._band_limited[spacing_mm]


def anatomy_from_image(data: np.ndarray, affine, mask: np.ndarray, classes: int = 3,
                       smoothing_vox: float = 0.7) -> Anatomy:
    """Tissue maps of any brain image, for training on it without a segmentation.

    data: (X, Y, Z) intensities; mask: (X, Y, Z) bool brain mask. The brain is split into
    ``classes`` intensity classes of equal size (quantiles, e.g. CSF / grey / white matter in a
    T1w, in some order in another contrast), the rest of the head is one more map (its
    intensities, scaled to [0, 1.5] as ``unimo-bids-train``'s template head), and each map is
    blurred by ``smoothing_vox`` voxels so that random contrasts of them have soft edges. Every
    training sample then draws new intensities per class, so the network never learns the
    image's own contrast. Returns an :class:`Anatomy` (brain probability = the blurred mask).
    """
    data = np.nan_to_num(np.asarray(data, dtype=np.float64))
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the brain mask is empty")
    inside = data[mask]
    edges = np.quantile(inside, np.linspace(0.0, 1.0, classes + 1)[1:-1])
    labels = np.digitize(data, edges)
    maps = [ndimage.gaussian_filter(((labels == k) & mask).astype(np.float32), smoothing_vox)
            for k in range(classes)]
    head = data / max(float(np.percentile(data[data > 0], 99)), 1e-6) if (data > 0).any() \
        else np.zeros_like(data)
    brain = ndimage.gaussian_filter(mask.astype(np.float32), smoothing_vox)
    maps.append((np.clip(head, 0.0, 1.5) * (1.0 - brain)).astype(np.float32))
    return Anatomy(np.stack(maps).astype(np.float32), brain.astype(np.float32),
                   np.asarray(affine, dtype=float))


def random_rotations(batch: int, generator: torch.Generator, any_rotation: float = 0.5,
                     max_angle_deg: float = 60.0) -> torch.Tensor:
    """(B, 3, 3) float64: uniform on SO(3) with probability ``any_rotation``, else a random
    axis and an angle uniform in [0, max_angle_deg]."""
    quat = torch.randn(batch, 4, generator=generator, dtype=torch.float64)
    uniform = roma.unitquat_to_rotmat(quat / quat.norm(dim=-1, keepdim=True))
    axis = torch.randn(batch, 3, generator=generator, dtype=torch.float64)
    angle = torch.rand(batch, 1, generator=generator, dtype=torch.float64) * math.radians(
        max_angle_deg)
    bounded = roma.rotvec_to_rotmat(axis / axis.norm(dim=-1, keepdim=True) * angle)
    pick = torch.rand(batch, generator=generator) < any_rotation
    return torch.where(pick[:, None, None], uniform, bounded)


def _contrast(tissues: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
    """(B, 1, X, Y, Z) random contrasts of (C, X, Y, Z) tissue maps."""
    n_tissues = tissues.shape[0]
    levels = torch.rand(batch, n_tissues, generator=g)
    no_head = torch.rand(batch, generator=g) < 0.3
    levels[no_head, -1] = 0.0
    image = torch.einsum("bc,cxyz->bxyz", levels, tissues)[:, None]
    image = image / image.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
    gamma = torch.exp(0.4 * torch.randn(batch, 1, 1, 1, 1, generator=g))
    image = image.clamp_min(0) ** gamma
    coarse = torch.randn(batch, 1, 4, 4, 4, generator=g) * 0.25
    bias = torch.nn.functional.interpolate(coarse, size=image.shape[2:], mode="trilinear",
                                           align_corners=True)
    return image * torch.exp(bias)


def _field_of_view(grid_affine, grid_shape, offsets, normals, distances, center):
    """(B, 1, N, N, N) 1 inside the half-space n . (x - c) <= d of each sample, on its grid."""
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)
                                         for n in grid_shape], indexing="ij"), dim=-1)
    affine = torch.as_tensor(grid_affine, dtype=torch.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3]  # (N, N, N, 3)
    center = torch.as_tensor(center, dtype=torch.float64)
    signed = torch.einsum("xyzi,bi->bxyz", world - center, normals)
    signed = signed + (offsets * normals).sum(-1)[:, None, None, None]
    return (signed <= distances[:, None, None, None]).to(torch.float32)[:, None]


def random_deformations(batch: int, grid_shape, max_displacement_mm: float,
                        g: torch.Generator, lattice: int = 5) -> torch.Tensor:
    """(B, 3, X, Y, Z) float32 smooth random pull-back displacements (mm): the geometric
    deformation augmenter.

    Gaussian displacements on a ``lattice``^3 control grid spanning the volume, upsampled
    trilinearly, each item scaled so that its largest displacement is uniform in
    [0, max_displacement_mm]. With control points a fifth of the field of view apart and a few mm
    of displacement, the Jacobian stays near 1: a local, invertible deformation (brain pulsation,
    susceptibility distortion, a fetus bending) on top of the rigid motion.
    """
    coarse = torch.randn(batch, 3, lattice, lattice, lattice, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=tuple(grid_shape), mode="trilinear",
                                            align_corners=True)
    largest = field.norm(dim=1).flatten(1).amax(1).clamp_min(1e-6)
    size = torch.rand(batch, generator=g) * float(max_displacement_mm)
    return field * (size / largest).view(-1, 1, 1, 1, 1)


def sample_pairs(anatomy: Anatomy, grid_affine, grid_shape, batch: int, g: torch.Generator,
                 any_rotation: float = 0.5, max_translation_mm: float = 20.0,
                 center_jitter_mm: float = 3.0, noise: float = 0.05,
                 classical_masks: float = 0.0, deformation_mm: float = 0.0):
    """B synthetic (reference, moved volume) pairs on the working grid.

    The shape maps come from the anatomy's brain masks (thresholded at random levels), or, for
    a ``classical_masks`` share of the pairs, from ``segment.brain_mask`` of each image, as the
    app segments real volumes. With ``deformation_mm`` > 0 each volume (image and shape map) is
    also deformed by its own ``random_deformations`` field of up to that many mm: the rigid
    truth stays the anatomy's motion, so the network learns to see past local deformation.

    Returns a dict of tensors: fixed_image, moving_image, fixed_shape, moving_shape
    (B, 1, N, N, N); fixed_offsets, moving_offsets (B, 3) (each grid's world shift, as at
    inference: centred on the brain centroid up to a segmentation error); truth (B, 4, 4)
    float64 reference world -> volume world.
    """
    f64 = torch.float64
    rotation = random_rotations(batch, g, any_rotation)
    shift = (torch.rand(batch, 3, generator=g, dtype=f64) * 2 - 1) * max_translation_mm
    center = torch.as_tensor(anatomy.center, dtype=f64)
    # truth: x -> R (x - c) + c + shift
    truth = homogeneous(rotation, center + shift - rotation @ center)
    fixed_offsets = torch.randn(batch, 3, generator=g, dtype=f64) * center_jitter_mm
    moving_offsets = shift + torch.randn(batch, 3, generator=g, dtype=f64) * center_jitter_mm

    spacing = float(voxel_sizes(grid_affine).min())
    image = _contrast(anatomy.band_limited(spacing), batch, g)
    # The moved volume J(y) = I(truth^-1 y), sampled at its grid point p + offset.
    fixed_tx = translations(fixed_offsets)
    moving_tx = rigid_inverse(truth) @ translations(moving_offsets)
    fixed_image = to_working_grid(image, anatomy.affine, grid_affine, grid_shape, fixed_tx,
                                  antialias=False)
    moving_image = to_working_grid(image, anatomy.affine, grid_affine, grid_shape, moving_tx,
                                   antialias=False)
    fields = (None, None)
    if deformation_mm > 0:
        spacings = voxel_sizes(grid_affine)
        fields = tuple(random_deformations(batch, grid_shape, deformation_mm, g)
                       for _ in range(2))
        fixed_image = warp(fixed_image, fields[0], spacings)
        moving_image = warp(moving_image, fields[1], spacings)

    # A static field-of-view plane in world space for a third of the pairs.
    cut = torch.rand(batch, generator=g) < 0.33
    normals = torch.randn(batch, 3, generator=g, dtype=f64)
    normals = normals / normals.norm(dim=-1, keepdim=True)
    distances = torch.where(cut, 35.0 + 40.0 * torch.rand(batch, generator=g, dtype=f64),
                            torch.full((batch,), 1e6, dtype=f64))
    fixed_image = fixed_image * _field_of_view(grid_affine, grid_shape, fixed_offsets, normals,
                                               distances, center)
    moving_image = moving_image * _field_of_view(grid_affine, grid_shape, moving_offsets,
                                                 normals, distances, center)
    scale = torch.rand(batch, 1, 1, 1, 1, generator=g) * noise
    fixed_image = fixed_image + scale * torch.randn(fixed_image.shape, generator=g)
    moving_image = moving_image + scale * torch.randn(moving_image.shape, generator=g)

    n_maps = anatomy.distance_maps.shape[0]
    pick_f = torch.randint(n_maps, (batch,), generator=g)
    pick_m = torch.randint(n_maps, (batch,), generator=g)
    fixed_shape = shape_input(to_working_grid(
        anatomy.distance_maps[pick_f], anatomy.affine, grid_affine, grid_shape, fixed_tx,
        antialias=False, padding_mode="border"))
    moving_shape = shape_input(to_working_grid(
        anatomy.distance_maps[pick_m], anatomy.affine, grid_affine, grid_shape, moving_tx,
        antialias=False, padding_mode="border"))
    if fields[0] is not None:
        fixed_shape = warp(fixed_shape, fields[0], spacings)
        moving_shape = warp(moving_shape, fields[1], spacings)
    # For some pairs, the masks the app makes: its classical segmentation of each image, which
    # on real scans may take in the whole head, miss part of the brain, or follow a field-of-view
    # cut. The shape branch and the fusion weight must learn what such masks are worth.
    classical = torch.rand(batch, generator=g) < classical_masks
    if bool(classical.any()):
        index = torch.nonzero(classical)[:, 0]
        voxel = tuple(voxel_sizes(grid_affine))
        for images, shapes in ((fixed_image, fixed_shape), (moving_image, moving_shape)):
            masks = brain_mask(images[index, 0].detach().cpu().numpy(), voxel)
            distances = torch.as_tensor(signed_distance(masks, voxel))[:, None]
            shapes[index] = shape_input(distances.to(shapes))
    return {"fixed_image": fixed_image, "moving_image": moving_image,
            "fixed_shape": fixed_shape, "moving_shape": moving_shape,
            "fixed_offsets": fixed_offsets, "moving_offsets": moving_offsets, "truth": truth}


def displacement_error(estimate: torch.Tensor, truth: torch.Tensor,
                       points: torch.Tensor) -> torch.Tensor:
    """(B,) mean distance (mm) between where two (B, 4, 4) transforms send (P, 3) points."""
    diff = estimate - truth
    moved = points @ diff[:, :3, :3].transpose(1, 2) + diff[:, None, :3, 3]
    return moved.norm(dim=-1).mean(-1)


def alignment_loss(estimate: torch.Tensor, pairs: dict, grid_affine,
                   near_brain_mm: float = 10.0, clip_mm: float = 20.0) -> torch.Tensor:
    """(B,) unsupervised loss of (B, 4, 4) estimates (reference world -> volume world): the
    moved volume's image and shape input resampled through each estimate onto the reference's
    grid; 1 - NCC of the images within ``near_brain_mm`` of the reference brain, plus the mean
    squared difference of the shape inputs / clip^2. Differentiable in the estimate; needs no
    known transform (the paper's image and shape alignment losses)."""
    affine = torch.as_tensor(np.asarray(grid_affine, dtype=float), dtype=torch.float64)
    fixed_affine = translations(pairs["fixed_offsets"]) @ affine
    moving_affine = translations(pairs["moving_offsets"]) @ affine
    maps = voxel_map(estimate, moving_affine, fixed_affine)
    grid_shape = tuple(pairs["fixed_image"].shape[2:])
    moved = torch.cat([pairs["moving_image"], pairs["moving_shape"]], 1)
    warped = resample(moved, maps, grid_shape)
    image, shape = warped[:, :1], warped[:, 1:]
    ncc = masked_ncc(image, pairs["fixed_image"],
                     pairs["fixed_shape"] > clip_mm - near_brain_mm)
    shape_error = ((shape - pairs["fixed_shape"]) ** 2).flatten(1).mean(1) / clip_mm ** 2
    return 1.0 - ncc + shape_error


def _estimates(net, pairs, grid_affine, center) -> RigidEstimates:
    return network_estimates(net, pairs["fixed_image"], pairs["fixed_shape"],
                             pairs["moving_image"], pairs["moving_shape"], grid_affine,
                             pairs["fixed_offsets"], pairs["moving_offsets"], center)


def _errors(estimates: RigidEstimates, truth, points) -> dict:
    return {name: displacement_error(getattr(estimates, name), truth, points)
            for name in ("image", "shape", "fused")}


def evaluate(net: UniMoRigidNet, batches: list) -> dict:
    """Mean displacement error (mm) per branch over fixed validation batches, each an
    (anatomy, grid_affine, pairs) tuple."""
    sums: dict = {}
    with torch.no_grad():
        for anatomy, grid_affine, pairs in batches:
            errors = _errors(_estimates(net, pairs, grid_affine, anatomy.center),
                             pairs["truth"], anatomy.points)
            for name, value in errors.items():
                sums.setdefault(name, []).append(value)
    return {name: float(torch.cat(values).mean()) for name, values in sums.items()}


def train(net: UniMoRigidNet, anatomies, minutes: float, batch: int = 4,
          learning_rate: float = 3e-3, seed: int = 0, validation_pairs: int = 32,
          max_translation_mm: float = 30.0, classical_masks: float = 0.5,
          optimizer_state: dict | None = None,
          checkpoint=None, checkpoint_minutes: float = 0.0, log=print,
          max_steps: int | None = None, deformation_mm: float = 0.0,
          validate_every: int = 0, validation_seed: int | None = None,
          supervised_warmup: float = 1.0) -> dict:
    """Train ``net`` in place for ``minutes`` of wall time (CPU or the net's device), or
    ``max_steps`` steps if that comes first (a fixed step count gives the same weights on any
    machine, with the same seed).

    anatomies: one :class:`Anatomy` or a list; each step draws its batch from one of them at
    random, and validation pairs (rotations uniform on SO(3)) come from each in turn.
    classical_masks: share of pairs whose shape maps come from the app's classical
    segmentation of each image (``sample_pairs``). deformation_mm: the geometric deformation
    augmenter's largest displacement, in training and validation pairs (``sample_pairs``).
    validate_every: log the validation error every N steps (0: only before and after).
    validation_seed: seed of the validation pairs (default seed + 10000).
    supervised_warmup: share of the steps (of ``max_steps``, else of the time) trained on the
    known transform (the displacement error); the rest on ``alignment_loss`` (image and shape
    alignment, no known transform). 1 (default): every step supervised.
    optimizer_state: an Adam state to resume from (``summary["optimizer_state"]`` of an earlier
    run). checkpoint(summary): called every ``checkpoint_minutes`` (> 0) with the summary so
    far (its "validation_any_rotation_mm_after" None: not measured yet), so that a long run can
    be saved and resumed.
    Returns a summary dict (steps, seconds, validation errors before and after, the optimizer
    state), written into the checkpoint by the caller so the model card can quote it.
    """
    if isinstance(anatomies, Anatomy):
        anatomies = [anatomies]
    g = torch.Generator().manual_seed(seed)
    grids = [net.grid(a.brain.shape, a.affine, a.brain > 0.5) for a in anatomies]
    val_g = torch.Generator().manual_seed(seed + 10_000 if validation_seed is None
                                          else validation_seed)
    validation = []
    for index in range(max(1, validation_pairs // batch)):
        anatomy = anatomies[index % len(anatomies)]
        grid_affine, grid_shape = grids[index % len(anatomies)]
        validation.append((anatomy, grid_affine,
                           sample_pairs(anatomy, grid_affine, grid_shape, batch, val_g,
                                        any_rotation=1.0, max_translation_mm=max_translation_mm,
                                        classical_masks=classical_masks,
                                        deformation_mm=deformation_mm)))
    before = evaluate(net.eval(), validation)
    log(f"validation before: {_fmt(before)}")
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    start = time.monotonic()
    last_checkpoint = start
    steps, running = 0, None

    def summary(after=None) -> dict:
        return {"steps": steps, "seconds": round(time.monotonic() - start, 1), "batch": batch,
                "validation_pairs": len(validation) * batch, "learning_rate": learning_rate,
                "seed": seed, "max_translation_mm": max_translation_mm,
                "classical_masks": classical_masks, "deformation_mm": deformation_mm,
                "supervised_warmup": supervised_warmup,
                "validation_any_rotation_mm_before": before,
                "validation_any_rotation_mm_after": after,
                "lambda": float(net.lam.detach()), "optimizer_state": optimizer.state_dict()}

    net.train()
    while (time.monotonic() - start < minutes * 60.0
           and (max_steps is None or steps < max_steps)):
        pick = int(torch.randint(len(anatomies), (1,), generator=g))
        anatomy, (grid_affine, grid_shape) = anatomies[pick], grids[pick]
        pairs = sample_pairs(anatomy, grid_affine, grid_shape, batch, g,
                             max_translation_mm=max_translation_mm,
                             classical_masks=classical_masks, deformation_mm=deformation_mm)
        estimates = _estimates(net, pairs, grid_affine, anatomy.center)
        errors = _errors(estimates, pairs["truth"], anatomy.points)
        progress = (steps / max_steps if max_steps is not None
                    else (time.monotonic() - start) / max(minutes * 60.0, 1e-9))
        if progress < supervised_warmup:
            loss = sum(torch.log1p(e).mean() for e in errors.values())
        else:
            loss = sum(alignment_loss(getattr(estimates, name), pairs, grid_affine).mean()
                       for name in ("image", "shape", "fused"))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        steps += 1
        value = float(errors["fused"].detach().mean())
        running = value if running is None else 0.98 * running + 0.02 * value
        if steps % 25 == 0:
            of = f"/{max_steps} ({100 * steps / max_steps:.0f} %)" if max_steps else ""
            log(f"step {steps}{of}: loss {float(loss.detach()):.3f}, fused error {running:.2f} mm "
                f"(running mean), lambda {float(net.lam.detach()):.3f}, "
                f"{time.monotonic() - start:.0f} s")
        if validate_every and steps % validate_every == 0:
            log(f"validation after {steps} steps: {_fmt(evaluate(net.eval(), validation))}")
            net.train()
        if (checkpoint is not None and checkpoint_minutes > 0
                and time.monotonic() - last_checkpoint >= 60.0 * checkpoint_minutes):
            checkpoint(summary())
            net.train()
            last_checkpoint = time.monotonic()
    after = evaluate(net.eval(), validation)
    log(f"validation after {steps} steps: {_fmt(after)}")
    return summary(after)


def _fmt(errors: dict) -> str:
    return ", ".join(f"{k} {v:.2f} mm" for k, v in errors.items())
