"""UniMo's deformable predictor: a small 3D U-Net that predicts the EPDiff initial velocity.

The network (:class:`VelocityUNet`) sees a pair on the deformation working grid (``deform``:
RAS-aligned, isotropic, any shape): the moving (rigidly aligned) and the fixed (reference)
volume, both scaled to unit median inside the brain mask, and optionally their shape maps. It
returns a spatial velocity field (B, 3, X, Y, Z) in mm along the grid axes; :func:`predict_velocity`
keeps its lowest Fourier coefficients (``epdiff.band_limit``), so the prediction is an initial
velocity ``v0_hat`` that ``epdiff.shoot`` turns into a pull-back displacement u (the corrected
moving volume is ``epdiff.warp(moving, u)``), and that ``epdiff.optimise_velocity(init=...)``
can refine at test time. Its first layer also reads demons force channels (``_forces``):
the normalised demons step of each pair and its blurs, a first estimate the net corrects.

Resolution. The net works at twice the working grid's spacing (6 mm for the 3 mm grid): it is
trained there (``unimo-bids-train --model deformable --grid-mm 6``) and ``deform`` runs it on
every other point of its grid, which spans the same field of view, so that the predicted
coefficients are the working grid's (``epdiff``'s coefficients are per field of view).

Shape maps. The shape arguments of this module are signed distance maps of the brain masks, in
mm (``shape.signed_distance``: negative inside). They are clipped as the keypoint encoder clips
them (``keypoints.shape_input``: clamp(clip - d, 0, 2 clip), 0 from ``clip_mm`` outside the
boundary on), so that the far field, which only grows towards the field-of-view edges, carries
nothing. The network reads them divided by ``clip_mm`` (values in [0, 2], like the images).

Losses (:func:`deformable_losses`), separate image and shape terms as in the UniMo paper: masked
mean squared error of the warped moving image against the fixed one; mean squared error of the
warped clipped shape map against the fixed one, over the whole grid, divided by clip^2 (so it is
O(1) and does not depend on the clip); the EPDiff regulariser <L v0, v0> (mm^2); and, when the
true coefficients are known, a supervised term: sum_k |v0_hat - v_true|^2, which by Parseval is
the spatial mean of |v0 - v_true|^2 over the grid (mm^2), so it does not shrink with the band.

Training (:func:`train_velocity_predictor`) uses synthetic pairs from one real brain volume
(:func:`synthetic_pairs`, e.g. nilearn's MNI152 template on a grid, :func:`volume_on_grid`): a random
correcting velocity c (``epdiff.random_velocity``) is shot to its pull-back u_c and forward map
f_c = phi_1 - id, and moving = warp(fixed, f_c). Then warp(moving, u_c)(x) = fixed(phi_1(phi_1^-1
x)) = fixed(x): c is exactly the velocity the network should predict and u_c the displacement it
should produce (no inversion of a generated field is needed; c plays the role of the -v1 of a
generating geodesic). Intensities are augmented per pair (gamma, contrast inversion) and per
volume (smooth bias field, noise), then renormalised to unit median in the mask, as ``deform``
does with real data. The shape maps are signed distances of binary masks, as in the
pipeline: the fixed mask, and the moving one carried by the same map and thresholded at a random
level. A supervised warm-up on c comes first (:func:`supervised_loss`: within 12 mm of the
brain, since beyond the head no image shows the field), then the unsupervised image + shape +
regulariser loss.

Predictors are stored as state_dicts with a JSON-able record of the architecture and the
SHA-256 of the tensors (:func:`save_predictor`, :func:`load_predictor`, format ``FORMAT``); the
package ships one (``DEFAULT_PREDICTOR``, with its model card).

Pure torch / numpy / scipy: no nipype, no BIDS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from . import epdiff
from .checkpoint import check_digest, state_digest
from .deform import deformation_grid, reference_on_grid, unit_median
from .keypoints import shape_input
from .resample import gaussian_blur
from .shape import signed_distance

__all__ = [
    "DEFAULT_PREDICTOR",
    "FORMAT",
    "SHAPE_CLIP_MM",
    "Pairs",
    "TrainingRecord",
    "VelocityUNet",
    "deformable_losses",
    "displacement_error",
    "load_predictor",
    "near_brain",
    "predict_from_masks",
    "predict_velocity",
    "save_predictor",
    "synthetic_pairs",
    "supervised_loss",
    "train_velocity_predictor",
    "volume_on_grid",
]

FORMAT = "unimo-velocity-unet-1"
# Packaged predictor, made with ``unimo-bids-train --model deformable`` (its model card beside it).
DEFAULT_PREDICTOR = (Path(__file__).resolve().parent.parent / "data" / "weights"
                     / "unimo_velocity_cpu.pt")
# keypoints.shape_input's default: the shape map carries the 20 mm about the brain boundary.
SHAPE_CLIP_MM = 20.0
# Loss weights. SIGMA is epdiff's test-time weight of <L v0, v0> against the image MSE (same
# scaling of the images); the shape term is O(1) by construction and is weighted like the image.
DEFAULT_SHAPE_WEIGHT = 1.0


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    """Two (3^3 convolution, leaky ReLU) layers, the first with ``stride``: (B, C_in, ...) ->
    (B, C_out, ...). No normalisation layer: the images are already on a common scale, and the
    velocity is a regression in mm whose size should follow the input's contrast differences."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
            torch.nn.LeakyReLU(0.1),
            torch.nn.Conv3d(out_channels, out_channels, 3, padding=1),
            torch.nn.LeakyReLU(0.1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _central_gradient(x: torch.Tensor) -> torch.Tensor:
    """Central differences (per voxel, one-sided at the edges by replication) of (B, 1, X, Y,
    Z): (B, 3, X, Y, Z)."""
    padded = F.pad(x, [1, 1, 1, 1, 1, 1], mode="replicate")
    gx = padded[:, :, 2:, 1:-1, 1:-1] - padded[:, :, :-2, 1:-1, 1:-1]
    gy = padded[:, :, 1:-1, 2:, 1:-1] - padded[:, :, 1:-1, :-2, 1:-1]
    gz = padded[:, :, 1:-1, 1:-1, 2:] - padded[:, :, 1:-1, 1:-1, :-2]
    return 0.5 * torch.cat([gx, gy, gz], dim=1)


# Smoothing scales (voxels) of the force channels: the smoothed demons step is already a fair
# estimate of the correction (scaled, sigma 2-4 voxels: about a third off the identity's error on
# synthetic pairs), so the net starts from it instead of having to learn the smoothing.
FORCE_SCALES = (0.0, 1.0, 2.0, 4.0)


def _forces(x: torch.Tensor) -> torch.Tensor:
    """Demons force channels of (moving, fixed) channel pairs: (B, 3 * len(FORCE_SCALES) * C / 2,
    X, Y, Z).

    For each pair (m, f) with s = (m + f) / 2: (m - f) grad(s) / (|grad s|^2 + (m - f)^2), in
    voxels (Thirion's normalised demons step, bounded by half a voxel), and its Gaussian blurs at
    ``FORCE_SCALES``. The unnormalised product (m - f) grad(s) is a hundred times smaller than
    the images and the net did not learn from it in hundreds of steps.
    """
    forces: List[torch.Tensor] = []
    for c in range(0, x.shape[1] - 1, 2):
        moving, fixed = x[:, c:c + 1], x[:, c + 1:c + 2]
        difference = moving - fixed
        gradient = _central_gradient(0.5 * (moving + fixed))
        denominator = (gradient ** 2).sum(1, keepdim=True) + difference ** 2
        step = difference * gradient / (denominator + 1e-6)
        forces.extend(step if sigma <= 0 else gaussian_blur(step, (sigma,) * 3)
                      for sigma in FORCE_SCALES)
    return torch.cat(forces, dim=1)


class VelocityUNet(torch.nn.Module):
    """Small 3D U-Net: a pair on the working grid -> spatial velocity (B, 3, X, Y, Z) in mm.

    Input (B, C, X, Y, Z), C = 2 (moving, fixed images) or 4 (moving, fixed, moving shape,
    fixed shape, the shapes as ``shape_input(d) / clip_mm``); :func:`predict_velocity` builds it.
    The first layer also reads the demons-style force channels of each (moving, fixed) pair
    (``_forces``), computed inside ``forward``.
    ``widths`` gives the channels of each level; each level below the first halves the grid by
    a stride-2 convolution, the decoder upsamples trilinearly and concatenates the skip. Any grid
    works: the input is zero-padded at the high end of each axis to a multiple of
    2^(levels - 1) and the output cropped back (zero is "no signal" and "far outside" in both
    kinds of channel). The head is initialised to zero, so an untrained net predicts the
    identity. Default (8, 16, 32): 2 downsamplings, about 65k parameters.
    """

    def __init__(self, widths=(8, 16, 32), shape_inputs: bool = True,
                 clip_mm: float = SHAPE_CLIP_MM, output_mm: float = 10.0):
        super().__init__()
        widths = [int(w) for w in widths]
        self.widths = widths
        self.shape_inputs = bool(shape_inputs)
        self.clip_mm = float(clip_mm)
        self.in_channels = 4 if self.shape_inputs else 2
        # each (moving, fixed) pair of channels adds its force channels at each scale
        features = self.in_channels + 3 * len(FORCE_SCALES) * (self.in_channels // 2)
        self.multiple = 2 ** (len(widths) - 1)
        self.encoder = torch.nn.ModuleList(
            [_Block(features if i == 0 else widths[i - 1], w, 1 if i == 0 else 2)
             for i, w in enumerate(widths)])
        # deepest first: decoder[k] upsamples to level n - 2 - k and merges that level's skip
        self.decoder = torch.nn.ModuleList(
            [_Block(widths[i] + widths[i + 1], widths[i]) for i in reversed(range(len(widths) - 1))])
        self.head = torch.nn.Conv3d(widths[0], 3, 3, padding=1)
        # The head's output is in units of this many mm: with Adam, whose steps are about the
        # learning rate whatever the gradient's scale, a zero-initialised head reaches
        # millimetre fields in a few steps instead of hundreds.
        self.output_mm = float(output_mm)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def config(self) -> dict:
        """What rebuilds this architecture: stored next to the weights."""
        return {"widths": list(self.widths), "shape_inputs": self.shape_inputs,
                "clip_mm": self.clip_mm, "output_mm": self.output_mm}

    def _pad(self, size: int) -> int:
        m = self.multiple
        return (size + m - 1) // m * m - size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_x, size_y, size_z = x.shape[2], x.shape[3], x.shape[4]
        x = torch.cat([x, _forces(x)], dim=1)
        x = F.pad(x, [0, self._pad(size_z), 0, self._pad(size_y), 0, self._pad(size_x)])
        skips: List[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips[-1]
        n_up = len(skips) - 1
        for step, block in enumerate(self.decoder):
            skip = skips[n_up - 1 - step]
            x = F.interpolate(x, size=[skip.shape[2], skip.shape[3], skip.shape[4]],
                              mode="trilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.output_mm * self.head(x)[:, :, :size_x, :size_y, :size_z]


def network_input(net: VelocityUNet, moving: torch.Tensor, fixed: torch.Tensor,
                  moving_shape=None, fixed_shape=None) -> torch.Tensor:
    """(B, C, X, Y, Z) input of ``net``: images (B or 1, 1, ...), shapes signed distances (mm)."""
    batch = max(moving.shape[0], fixed.shape[0])
    channels = [moving.expand(batch, *moving.shape[1:]), fixed.expand(batch, *fixed.shape[1:])]
    if net.shape_inputs:
        if moving_shape is None or fixed_shape is None:
            raise ValueError("this predictor reads shape maps: give moving_shape and fixed_shape")
        for distance in (moving_shape, fixed_shape):
            channel = shape_input(distance, net.clip_mm) / net.clip_mm
            channels.append(channel.expand(batch, *channel.shape[1:]).to(moving.dtype))
    return torch.cat(channels, dim=1)


def predict_velocity(net: VelocityUNet, moving: torch.Tensor, fixed: torch.Tensor,
                     moving_shape=None, fixed_shape=None,
                     band=epdiff.DEFAULT_BAND) -> torch.Tensor:
    """Initial velocity coefficients predicted for each pair: (B, 3, n1, n2, n3) complex.

    moving: (B, 1, X, Y, Z); fixed: (B or 1, 1, X, Y, Z), both unit median in the mask;
    moving_shape, fixed_shape: signed distance maps (mm), same shapes, needed when the net reads
    shapes. The net's field is band-limited (``epdiff.band_limit``: real, smooth, the grid's own
    field of view), so the result plugs into ``epdiff.shoot`` and ``optimise_velocity(init=...)``.
    Differentiable in the net's parameters.
    """
    field_mm = net(network_input(net, moving, fixed, moving_shape, fixed_shape))
    return epdiff.band_limit(field_mm, band)


def predict_from_masks(net: VelocityUNet, moving: torch.Tensor, fixed: torch.Tensor,
                       moving_mask: torch.Tensor, fixed_mask: torch.Tensor, spacing,
                       band=epdiff.DEFAULT_BAND) -> torch.Tensor:
    """Initial velocities (B, 3, n1, n2, n3) for pairs given as images and binary brain masks.

    moving: (B, 1, X, Y, Z), fixed: (1, 1, X, Y, Z), both unit median in the fixed mask;
    moving_mask (B, 1, X, Y, Z), fixed_mask (1, 1, X, Y, Z) bool; spacing (3,) mm. The shape
    inputs are the masks' signed distances, as in training. This is ``deform``'s
    ``estimate_deformation(predictor=...)`` hook (on its half-resolution grid, which has the
    working grid's field of view, so the coefficients are the working grid's).
    """
    with torch.no_grad():
        moving_shape = fixed_shape = None
        if net.shape_inputs:
            moving_shape = torch.as_tensor(signed_distance(
                moving_mask[:, 0].cpu().numpy(), spacing))[:, None].to(moving)
            fixed_shape = torch.as_tensor(signed_distance(
                fixed_mask[0, 0].cpu().numpy(), spacing))[None, None].to(moving)
        return predict_velocity(net, moving, fixed, moving_shape, fixed_shape, band)


def near_brain(mask: torch.Tensor, spacing, margin_mm: float = 12.0) -> torch.Tensor:
    """(1, 1, X, Y, Z) float: the mask dilated by ``margin_mm``. Where the supervised loss looks:
    beyond the head the true field moves only background and no image can show it."""
    structure = ndimage.generate_binary_structure(3, 1)
    iterations = max(1, int(round(margin_mm / min(spacing))))
    grown = ndimage.binary_dilation(mask[0, 0].cpu().numpy(), structure, iterations)
    return torch.as_tensor(grown, dtype=torch.float32, device=mask.device)[None, None]


def supervised_loss(v0_hat: torch.Tensor, true_velocity: torch.Tensor,
                    near: torch.Tensor) -> torch.Tensor:
    """Mean |v0 - v_true|^2 (mm^2) over the ``near`` region, per pair: (B,).

    v0_hat, true_velocity: (B, 3, n1, n2, n3); near: (1, 1, X, Y, Z) weights on the grid."""
    grid_shape = tuple(near.shape[2:])
    difference = epdiff.to_spatial(v0_hat - true_velocity, grid_shape)
    return _masked_mean((difference ** 2).sum(1, keepdim=True), near)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over voxels and channels of (B, C, X, Y, Z) values: (B,)."""
    weight = weight.expand_as(values[:, :1]).to(values.dtype)
    total = (values * weight).flatten(1).sum(1)
    return total / (weight.flatten(1).sum(1) * values.shape[1]).clamp_min(1e-12)


def deformable_losses(v0_hat: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
                      moving_shape, fixed_shape, spacing, mask=None,
                      sigma: float = epdiff.DEFAULT_SIGMA, true_velocity=None,
                      clip_mm: float = SHAPE_CLIP_MM, metric: epdiff.Metric = epdiff.DEFAULT_METRIC,
                      flow_size: int | None = 32) -> dict:
    """Separate loss terms for predicted velocities: dict of (B,) tensors.

    v0_hat: (B, 3, n1, n2, n3); moving, fixed: (B or 1, 1, X, Y, Z) images; moving_shape,
    fixed_shape: signed distance maps (mm) of the same shapes, or None to skip the shape term;
    spacing (3,) mm; mask: bool or weights (B or 1, 1, X, Y, Z) on the fixed grid (None: all).
    Keys: "image" masked MSE of warp(moving, shoot(v0)) against fixed; "shape" MSE over the grid
    of the warped clipped moving shape map against the fixed one, / clip^2; "regulariser"
    <L v0, v0> (mm^2) (not multiplied by sigma); "total" image + shape + sigma * regulariser;
    "supervised" (only with true_velocity (B, 3, n1, n2, n3)) sum_k |v0_hat - true|^2, the
    spatial mean of |v0 - v_true|^2 (mm^2).
    The flow runs as in ``optimise_velocity`` (first-order step inverses, 1.5x padding, on at
    most ``flow_size`` points per axis; None: the full grid): a few hundredths of a mm from
    ``shoot``, and cheap enough to train through.
    """
    grid_shape = tuple(int(n) for n in moving.shape[2:])
    flow_shape = None if flow_size is None else tuple(min(int(flow_size), n) for n in grid_shape)
    displacement = epdiff.shoot(v0_hat, grid_shape, spacing, metric,
                                padding=epdiff.OPTIMISE_PADDING, inverse_iterations=0,
                                flow_shape=flow_shape)
    weight = torch.ones_like(fixed[:1]) if mask is None else mask
    warped = epdiff.warp(moving, displacement, spacing)
    losses = {"image": _masked_mean((warped - fixed) ** 2, weight)}
    if moving_shape is not None and fixed_shape is not None:
        moving_clip = shape_input(moving_shape, clip_mm).to(displacement.dtype)
        fixed_clip = shape_input(fixed_shape, clip_mm).to(displacement.dtype)
        warped_shape = epdiff.warp(moving_clip, displacement, spacing)
        losses["shape"] = ((warped_shape - fixed_clip) ** 2).flatten(1).mean(1) / clip_mm ** 2
    operator = epdiff.operator_symbol(v0_hat.shape[-3:], grid_shape, spacing, metric,
                                      displacement.dtype, v0_hat.device)
    losses["regulariser"] = epdiff.regulariser(v0_hat, operator)
    total = losses["image"] + sigma * losses["regulariser"]
    if "shape" in losses:
        total = total + DEFAULT_SHAPE_WEIGHT * losses["shape"]
    losses["total"] = total
    if true_velocity is not None:
        difference = epdiff.project_real(v0_hat) - epdiff.project_real(true_velocity)
        losses["supervised"] = (difference.real ** 2 + difference.imag ** 2).flatten(1).sum(1)
    return losses


def displacement_error(v0_hat: torch.Tensor, true_displacement: torch.Tensor, spacing,
                       mask: torch.Tensor) -> torch.Tensor:
    """Mean |shoot(v0) - u_true| (mm) inside the mask, per pair: (B,).

    true_displacement: (B, 3, X, Y, Z) pull-back mm; mask: (B or 1, 1, X, Y, Z). With zero
    coefficients this is the mean |u_true|: the error of predicting the identity.
    """
    with torch.no_grad():
        grid_shape = tuple(true_displacement.shape[2:])
        predicted = epdiff.shoot(v0_hat, grid_shape, spacing)
        distance = (predicted - true_displacement).norm(dim=1, keepdim=True)
        return _masked_mean(distance, mask)


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------


def volume_on_grid(data: np.ndarray, affine, spacing_mm: float = 4.0, margin_mm: float = 12.0,
                   mask=None):
    """A brain volume on a deformation working grid (``deform.deformation_grid``).

    data: (X, Y, Z) intensities on ``affine``; mask: its brain mask, or None for
    fill_holes(data > 0.25 max). Returns (volume (1, 1, X', Y', Z') float32 unit median in the
    mask, mask (1, 1, X', Y', Z') bool, spacing (3,) mm, grid affine (4, 4)).
    """
    data = np.asarray(data, dtype=np.float32)
    if mask is None:
        mask = ndimage.binary_fill_holes(data > 0.25 * data.max())
    grid_affine, grid_shape = deformation_grid(np.asarray(mask, bool), affine, spacing_mm,
                                               margin_mm)
    volume, grid_mask = reference_on_grid(data, affine, mask, grid_affine, grid_shape)
    spacing = tuple(float(abs(grid_affine[i, i])) for i in range(3))
    return volume, grid_mask[None, None], spacing, grid_affine


@dataclass
class Pairs:
    """A batch of synthetic training pairs on one grid.

    moving, fixed: (B, 1, X, Y, Z) unit median in the fixed mask; moving_shape, fixed_shape:
    (B, 1, X, Y, Z) signed distances (mm) of the moving (deformed) and fixed masks; mask:
    (1, 1, X, Y, Z) bool fixed mask; velocity: (B, 3, n, n, n) the correcting initial velocity;
    displacement: (B, 3, X, Y, Z) its pull-back (warp(moving, displacement) ~ fixed, mm).
    """

    moving: torch.Tensor
    fixed: torch.Tensor
    moving_shape: torch.Tensor
    fixed_shape: torch.Tensor
    mask: torch.Tensor
    velocity: torch.Tensor
    displacement: torch.Tensor


def _uniform(batch: int, low: float, high: float, generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)


def _bias_fields(batch: int, grid_shape, strength: float, generator) -> torch.Tensor:
    """Smooth multiplicative fields exp(b), |b| <~ strength: (B, 1, X, Y, Z) float32. A 4^3
    Gaussian lattice upsampled trilinearly: the slow receive-coil shading of EPI."""
    coarse = torch.randn((batch, 1, 4, 4, 4), generator=generator) * strength / 2.0
    return torch.exp(F.interpolate(coarse, size=tuple(grid_shape), mode="trilinear",
                                   align_corners=True))


def synthetic_pairs(template: torch.Tensor, mask: torch.Tensor, spacing, batch: int,
                    generator: torch.Generator, max_displacement_mm=(1.0, 6.0),
                    band=epdiff.DEFAULT_BAND, augment: bool = True,
                    noise: float = 0.03, bias: float = 0.2, gamma: float = 0.3,
                    inversion_probability: float = 0.2) -> Pairs:
    """Training pairs from one real brain volume (see the module note for the truth).

    template: (1, 1, X, Y, Z) unit median in ``mask`` (1, 1, X, Y, Z) bool; spacing (3,) mm;
    max_displacement_mm: (low, high): each pair's largest displacement is drawn uniformly in it.
    Augmentation (``augment``): per pair, intensity ** exp(N(0, gamma)) and, with
    ``inversion_probability``, an inverted contrast inside the head (2 - x, clamped at 0, as an
    EPI's bright CSF against a T1's dark one), and a smooth bias field of about ``bias`` (log);
    per volume, Gaussian noise of ``noise`` (relative to the median). Both volumes of a pair
    share gamma, inversion and shading (one series, one contrast, one coil), not the noise.
    All draws come from ``generator`` (CPU), so a seed gives the same batch.
    """
    grid_shape = tuple(int(n) for n in template.shape[2:])
    low, high = (float(max_displacement_mm[0]), float(max_displacement_mm[1]))
    sizes = _uniform(batch, low, high, generator)
    velocity = epdiff.random_velocity(batch, grid_shape, spacing, 1.0, generator=generator,
                                      band=band, dtype=template.dtype)
    velocity = velocity * sizes.to(template.dtype).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        # Rescaling after random_velocity's own scaling is nearly linear for a few mm; the true
        # displacement is measured, not assumed, so this only sets the spread of sizes.
        shot = epdiff.shoot_maps(velocity, grid_shape, spacing)
    fixed = template.expand(batch, 1, *grid_shape)
    # moving = fixed o phi_1, so that warp(moving, u_c) = fixed o phi_1 o phi_1^-1 = fixed.
    moving = epdiff.warp(fixed, shot.forward, spacing)
    # The shape maps are what the pipeline gives: signed distances of binary masks on the grid.
    # The moving mask is the fixed one carried by the same map and thresholded at a random level,
    # as a segmentation of the deformed volume would place its boundary within a voxel.
    fixed_shape = torch.as_tensor(signed_distance(mask[0, 0].numpy(), spacing))[None, None]
    fixed_shape = fixed_shape.to(template.dtype).expand(batch, 1, *grid_shape)
    moved_fraction = epdiff.warp(mask.to(template.dtype).expand(batch, 1, *grid_shape),
                                 shot.forward, spacing)
    levels = _uniform(batch, 0.3, 0.7, generator).to(template.dtype).view(-1, 1, 1, 1, 1)
    moved_mask = moved_fraction > levels
    moving_shape = torch.as_tensor(signed_distance(moved_mask[:, 0].numpy(), spacing))[:, None]
    if augment:
        exponents = torch.exp(torch.randn(batch, generator=generator, dtype=torch.float64)
                              * gamma).to(template.dtype).view(-1, 1, 1, 1, 1)
        invert = (torch.rand(batch, generator=generator) < inversion_probability).view(
            -1, 1, 1, 1, 1)
        # One coil shading for both: it belongs to the scanner, not to the head.
        shading = _bias_fields(batch, grid_shape, bias, generator)
        augmented = []
        for volume, head in ((moving, moved_mask), (fixed, mask.expand(batch, *mask.shape[1:]))):
            volume = volume.clamp_min(0.0) ** exponents
            volume = torch.where(invert, (2.0 - volume).clamp_min(0.0) * head, volume)
            volume = volume * shading
            volume = volume + noise * torch.randn(volume.shape, generator=generator)
            augmented.append(unit_median(volume, mask))
        moving, fixed = augmented
    return Pairs(moving=moving.contiguous(), fixed=fixed.contiguous(),
                 moving_shape=moving_shape.contiguous(), fixed_shape=fixed_shape,
                 mask=mask, velocity=velocity, displacement=shot.pullback)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingRecord:
    """What a training run did.

    losses: the optimised loss per step; supervised_steps: how many came first with the
    supervised loss; zero_error_mm: held-out mean |u_true| in the mask (the error of the
    identity); errors_mm: (step, held-out mean displacement error in mm) after those steps,
    step 0 before training; seconds: wall time of the steps (validation excluded);
    optimiser_state: the Adam state at the end.
    """

    losses: list = field(default_factory=list)
    supervised_steps: int = 0
    zero_error_mm: float = float("nan")
    errors_mm: list = field(default_factory=list)
    seconds: float = 0.0
    optimiser_state: dict | None = None

    @property
    def final_error_mm(self) -> float:
        return self.errors_mm[-1][1]


def _select(pairs: Pairs, index: torch.Tensor) -> Pairs:
    """The pairs at ``index`` (1D) of a batch."""
    return Pairs(moving=pairs.moving[index], fixed=pairs.fixed[index],
                 moving_shape=pairs.moving_shape[index], fixed_shape=pairs.fixed_shape[index],
                 mask=pairs.mask, velocity=pairs.velocity[index],
                 displacement=pairs.displacement[index])


def _validate(net, pairs: Pairs, spacing, band) -> float:
    with torch.no_grad():
        v = predict_velocity(net, pairs.moving, pairs.fixed, pairs.moving_shape,
                             pairs.fixed_shape, band)
        return float(displacement_error(v, pairs.displacement, spacing, pairs.mask).mean())


def train_velocity_predictor(net: VelocityUNet, template: torch.Tensor, mask: torch.Tensor,
                             spacing, steps: int | None = None, minutes: float | None = None,
                             batch: int = 2, learning_rate: float = 2e-3,
                             warmup: float = 0.5, sigma: float = epdiff.DEFAULT_SIGMA,
                             max_displacement_mm=(1.0, 6.0), band=epdiff.DEFAULT_BAND,
                             validation_size: int = 4, validate_every: int = 0, seed: int = 0,
                             pool_size: int = 8, reuse: int = 4, log=None, realign=None,
                             optimiser_state: dict | None = None,
                             held_out_seed: int | None = None) -> TrainingRecord:
    """Train ``net`` in place on synthetic pairs of ``template``; returns a TrainingRecord.

    template, mask: (1, 1, X, Y, Z) (:func:`volume_on_grid`); spacing (3,) mm. Runs
    ``steps`` Adam steps, or as many as fit in ``minutes`` (one of them; with both, whichever
    ends first). The first ``warmup`` part (of the steps, or of the time) uses the supervised
    loss on the true velocity (:func:`supervised_loss`, near the brain); the rest the unsupervised image + shape + sigma * regulariser
    loss. A held-out batch of ``validation_size`` pairs (seed + 1, never trained on) gives the
    error before and after (and every ``validate_every`` steps when > 0). ``log(step, dict)``
    is called after each step when given.
    Pairs are drawn ``pool_size`` at a time (one batched ``synthetic_pairs`` call; making a pair
    costs about as much as a training step on a CPU, mostly ``random_velocity``'s shooting) and
    each pool serves ``reuse`` passes in random batches of ``batch``.
    realign(pairs, generator) -> pairs: applied to each unsupervised batch before the step
    (``alternating.realign_by_network``: the rigid stage's residual on top of the deformation);
    the supervised warm-up and the held-out pairs (seed ``held_out_seed``, default seed + 1)
    stay pure deformations. optimiser_state: an Adam state to continue from; the record keeps
    the final one (``record.optimiser_state``).
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes")
    generator = torch.Generator().manual_seed(int(seed))
    held_out_seed = int(seed) + 1 if held_out_seed is None else int(held_out_seed)
    held_out = synthetic_pairs(template, mask, spacing, validation_size,
                               torch.Generator().manual_seed(held_out_seed),
                               max_displacement_mm, band)
    near = near_brain(mask, spacing)
    record = TrainingRecord()
    record.zero_error_mm = float(held_out.displacement.norm(dim=1, keepdim=True)
                                 .flatten(1)[:, mask.flatten()].mean())
    record.errors_mm.append((0, _validate(net, held_out, spacing, band)))
    optimiser = torch.optim.Adam(net.parameters(), lr=learning_rate)
    if optimiser_state:
        optimiser.load_state_dict(optimiser_state)
    budget = None if minutes is None else 60.0 * float(minutes)
    started = time.perf_counter()
    step = 0
    queue: list = []
    pool = None
    while True:
        elapsed = time.perf_counter() - started
        if steps is not None and step >= steps:
            break
        if budget is not None and elapsed >= budget:
            break
        if steps is not None:
            supervised = step < warmup * steps
        else:
            supervised = elapsed < warmup * budget
        if not queue:
            pool = synthetic_pairs(template, mask, spacing, pool_size, generator,
                                   max_displacement_mm, band)
            for _ in range(max(int(reuse), 1)):
                order = torch.randperm(pool_size, generator=generator)
                queue.extend(order[i:i + batch] for i in range(0, pool_size - batch + 1, batch))
        pairs = _select(pool, queue.pop(0))
        if realign is not None and not supervised:
            pairs = realign(pairs, generator)
        net.train()
        v = predict_velocity(net, pairs.moving, pairs.fixed, pairs.moving_shape,
                             pairs.fixed_shape, band)
        if supervised:
            loss = supervised_loss(v, pairs.velocity, near).mean()
            record.supervised_steps += 1
        else:
            terms = deformable_losses(v, pairs.moving, pairs.fixed, pairs.moving_shape,
                                      pairs.fixed_shape, spacing, pairs.mask, sigma)
            loss = terms["total"].mean()
        optimiser.zero_grad()
        loss.backward()
        # One unlucky pair (a large field the net is far from) must not throw the weights off.
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimiser.step()
        step += 1
        record.losses.append(float(loss.detach()))
        if log is not None:
            log(step, {"loss": float(loss.detach()), "supervised": supervised})
        if validate_every and step % validate_every == 0:
            pause = time.perf_counter()
            record.errors_mm.append((step, _validate(net, held_out, spacing, band)))
            started += time.perf_counter() - pause  # validation does not eat the budget
    record.seconds = time.perf_counter() - started
    record.optimiser_state = optimiser.state_dict()
    net.eval()
    if record.errors_mm[-1][0] != step:
        record.errors_mm.append((step, _validate(net, held_out, spacing, band)))
    return record


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def save_predictor(net: VelocityUNet, path, notes: dict | None = None) -> None:
    """Write the weights and the architecture record (format ``FORMAT``) to ``path``
    (torch.save of plain tensors and JSON-able values; loads with weights_only)."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    torch.save({"format": FORMAT, "config": net.config(), "notes": dict(notes or {}),
                "state_dict": state, "sha256": state_digest(state)}, str(path))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_predictor(path=None, device="cpu") -> VelocityUNet:
    """A :class:`VelocityUNet` from :func:`save_predictor`'s file (None: the packaged
    ``DEFAULT_PREDICTOR``), in eval mode.

    Raises ValueError (one line, naming the file) when the file is missing, cannot be read, is
    not a predictor of this architecture version, or its weights do not match their recorded
    SHA-256.
    """
    path = Path(DEFAULT_PREDICTOR if path is None else path)
    if not path.is_file():
        raise ValueError(f"{path}: velocity predictor not found")
    try:
        payload = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged or foreign file
        raise ValueError(f"{path}: not a readable velocity predictor ({_one_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: velocity predictor format {found!r}, expected {FORMAT!r}")
    check_digest(path, payload)
    try:
        config = payload["config"]
        net = VelocityUNet(widths=config["widths"], shape_inputs=config["shape_inputs"],
                           clip_mm=config["clip_mm"], output_mm=config["output_mm"])
        net.load_state_dict(payload["state_dict"])
    except Exception as exc:
        raise ValueError(f"{path}: weights do not match {FORMAT} ({_one_line(exc)})") from None
    return net.to(device).eval()
