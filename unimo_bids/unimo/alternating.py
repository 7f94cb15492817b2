"""Alternating optimisation of the rigid network and the deformable predictor (UniMo's scheme).

Each round trains one stage with the other held fixed:

1. rigid steps (both branches and lambda) on rigidly moved pairs that the geometric deformation
   augmenter also deforms locally (``training.train`` with ``deformation_mm``);
2. velocity-predictor steps on what the rigid stage, as it now is, hands on: a pair deformed by a
   known diffeomorphism (``deform_net.synthetic_pairs``) is moved by a random rigid motion and
   realigned by the rigid stage (:func:`realign_by_network`: the network's estimate refined as
   the app refines it, or the network's estimate alone), so the predictor learns the
   deformation plus the rigid stage's residual error, not a perfectly aligned ideal.

The first round's deformable steps may start with the supervised warm-up on the known velocity
(only pairs without a rigid residual have one); the rest use the unsupervised image + shape +
regulariser loss. Pure torch: the caller (``unimo_bids.cli.train``) loads the data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from . import deform_net
from .geometry import centroids, homogeneous, rigid_inverse
from .hmc import estimate_head_motion
from .keypoints import shape_input, to_working_grid
from .network import UniMoRigidNet, network_estimates, translations
from .training import random_rotations, train

__all__ = ["DeformableVolume", "REALIGN_MAX_ROTATION_DEG", "REALIGN_MAX_TRANSLATION_MM",
           "realign_by_network", "train_alternating"]

# The rigid motion the deformable stage's pairs are moved by before the rigid stage realigns
# them: the range where the network gives the refinement a useful start.
REALIGN_MAX_ROTATION_DEG = 20.0
REALIGN_MAX_TRANSLATION_MM = 10.0


@dataclass
class DeformableVolume:
    """The deformable predictor's training volume on its grid.

    volume: (1, 1, X, Y, Z) unit median in ``mask`` (1, 1, X, Y, Z) bool; spacing (3,) mm;
    affine: (4, 4) voxel -> world of that grid (``deform_net.volume_on_grid``).
    """

    volume: torch.Tensor
    mask: torch.Tensor
    spacing: tuple
    affine: np.ndarray

    @cached_property
    def center(self) -> torch.Tensor:
        """(3,) float64 world centroid of the mask."""
        return torch.as_tensor(centroids(self.mask[0, 0].numpy(), self.affine))


def realign_by_network(net: UniMoRigidNet, pairs: deform_net.Pairs, data: DeformableVolume,
                       g: torch.Generator, max_rotation_deg: float = REALIGN_MAX_ROTATION_DEG,
                       max_translation_mm: float = REALIGN_MAX_TRANSLATION_MM,
                       center_jitter_mm: float = 3.0, refine: bool = False) -> tuple:
    """The pairs with the moving volume moved rigidly and brought back by ``net``'s estimate.

    Each moving volume J (and its signed distance map) is moved by a random rigid transform T
    (random axis, angle up to ``max_rotation_deg``, translation up to ``max_translation_mm`` per
    axis, about the brain centroid); the network estimates T from the working-grid inputs the app
    would give it (reference and moved volume, each grid centred on the brain up to a
    segmentation error) and the moved volume is resampled at T_hat: J(T^-1 T_hat x), once.
    With ``refine`` T_hat is the app's rigid stage instead (``hmc.estimate_head_motion``: the
    network's estimate refined on the images and shape maps, one pair at a time), whose
    residual is what ``--deformable`` sees by default.
    ``velocity`` and ``displacement`` keep the known deformation, which no longer includes the
    residual rigid error: only the unsupervised losses are exact for the returned pairs.
    Returns (pairs, truth T (B, 4, 4), estimate T_hat (B, 4, 4)), float64 reference world ->
    moved world.
    """
    f64 = torch.float64
    batch = pairs.moving.shape[0]
    rotation = random_rotations(batch, g, any_rotation=0.0, max_angle_deg=max_rotation_deg)
    shift = (torch.rand(batch, 3, generator=g, dtype=f64) * 2 - 1) * max_translation_mm
    center = data.center
    truth = homogeneous(rotation, center + shift - rotation @ center)
    fixed_offsets = torch.randn(batch, 3, generator=g, dtype=f64) * center_jitter_mm
    moving_offsets = shift + torch.randn(batch, 3, generator=g, dtype=f64) * center_jitter_mm
    was_training = net.training
    net.eval()
    if refine:  # the refinement takes gradients of its own
        estimate = _refined(net, pairs, data, truth)
    else:
        estimate = _network_estimate(net, pairs, data, truth, fixed_offsets, moving_offsets)
    net.train(was_training)
    grid = tuple(pairs.moving.shape[2:])
    residual = rigid_inverse(truth) @ estimate
    moving = to_working_grid(pairs.moving, data.affine, data.affine, grid, residual,
                             antialias=False)
    moved_shape = to_working_grid(pairs.moving_shape, data.affine, data.affine, grid, residual,
                                  antialias=False, padding_mode="border")
    realigned = deform_net.Pairs(moving=moving.contiguous(), fixed=pairs.fixed,
                                 moving_shape=moved_shape.contiguous(),
                                 fixed_shape=pairs.fixed_shape, mask=pairs.mask,
                                 velocity=pairs.velocity, displacement=pairs.displacement)
    return realigned, truth, estimate


def _network_estimate(net, pairs: deform_net.Pairs, data: DeformableVolume,
                      truth: torch.Tensor, fixed_offsets: torch.Tensor,
                      moving_offsets: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) the network's fused estimates of each pair's moved volume, from the
    working-grid inputs the app would give it, each grid shifted by its offset."""
    grid_affine, grid_shape = net.grid(tuple(data.mask.shape[2:]), data.affine,
                                       data.mask[0, 0].numpy())

    def inputs(volumes, distances, transforms):
        image = to_working_grid(volumes, data.affine, grid_affine, grid_shape, transforms,
                                antialias=False)
        distance = to_working_grid(distances, data.affine, grid_affine, grid_shape, transforms,
                                   antialias=False, padding_mode="border")
        return image, shape_input(distance)

    with torch.no_grad():
        fixed_image, fixed_shape = inputs(pairs.fixed, pairs.fixed_shape,
                                          translations(fixed_offsets))
        moving_image, moving_shape = inputs(pairs.moving, pairs.moving_shape,
                                            rigid_inverse(truth) @ translations(moving_offsets))
        return network_estimates(net, fixed_image, fixed_shape, moving_image, moving_shape,
                                 grid_affine, fixed_offsets, moving_offsets, data.center).fused


def _refined(net, pairs: deform_net.Pairs, data: DeformableVolume,
             truth: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) the app's rigid estimates of each pair's moved volume (see
    ``realign_by_network``), the network giving one start of the refinement as in the app."""
    grid = tuple(pairs.moving.shape[2:])
    back = rigid_inverse(truth)
    moved = to_working_grid(pairs.moving, data.affine, data.affine, grid, back, antialias=False)
    moved_shape = to_working_grid(pairs.moving_shape, data.affine, data.affine, grid, back,
                                  antialias=False, padding_mode="border")
    mask = data.mask[0, 0].numpy()
    out = []
    for index in range(len(truth)):
        motion = estimate_head_motion(
            moved[index, 0].numpy()[..., None], data.affine, pairs.fixed[index, 0].numpy(), mask,
            moved_shape[index, 0].numpy()[..., None], pairs.fixed_shape[index, 0].numpy(),
            network=net)
        out.append(torch.as_tensor(motion.transforms[0]))
    return torch.stack(out)


def train_alternating(rigid_net: UniMoRigidNet, velocity_net: deform_net.VelocityUNet,
                      anatomies, data: DeformableVolume, rounds: int, rigid_steps: int,
                      deformable_steps: int, batch: int = 4, deformable_batch: int = 4,
                      learning_rate: float = 3e-3, deformable_learning_rate: float = 2e-3,
                      warmup: float = 0.0, seed: int = 0, max_translation_mm: float = 30.0,
                      classical_masks: float = 0.5, deformation_mm: float = 3.0,
                      max_displacement_mm=(1.0, 6.0),
                      rigid_optimizer_state: dict | None = None, after_round=None,
                      validate_every: int = 0, refine: bool = True,
                      validation_pairs: int = 32, supervised_warmup: float = 1.0,
                      log=print) -> tuple:
    """``rounds`` rounds of ``rigid_steps`` rigid then ``deformable_steps`` deformable Adam steps,
    both nets trained in place. Each stage keeps its Adam state from round to round.

    warmup: share of the first round's deformable steps on the known velocity (pairs without
    a rigid residual); 0 for a predictor that has been trained before. validate_every: also
    validate every N steps within a stage; validation_pairs: the rigid validation's size;
    supervised_warmup: share of each round's rigid steps on the known transform (the rest on
    the alignment loss, ``training.train``). Both stages validate on the same held-out pairs
    in every round. refine: the deformable pairs are realigned by the app's rigid stage
    (network and refinement, as ``unimo-bids --deformable`` runs by default); False: by the
    network's estimate alone (the paper's pipeline, ``--no-refine``).
    after_round(rounds_done, rigid_summary, record): called after each round (to write
    checkpoints), with the running totals as returned.
    Returns (rigid summary, deformable record): the rigid summary as ``training.train``'s, over
    all rounds (steps and seconds summed; validation before the first and after the last round);
    the deformable ``TrainingRecord`` with every round's losses and held-out errors (at the
    cumulative step), ``seconds`` summed.
    """
    if rounds < 1 or rigid_steps < 1 or deformable_steps < 1:
        raise ValueError("rounds, rigid_steps and deformable_steps must be at least 1")
    rigid_summary, record = None, deform_net.TrainingRecord()
    velocity_state = None
    started = time.monotonic()
    for round_index in range(rounds):
        log(f"round {round_index + 1}/{rounds}: rigid network, {rigid_steps} steps")
        summary = train(rigid_net, anatomies, minutes=float("inf"), batch=batch,
                        learning_rate=learning_rate, seed=seed + 101 * round_index,
                        max_translation_mm=max_translation_mm, classical_masks=classical_masks,
                        optimizer_state=rigid_optimizer_state, log=log, max_steps=rigid_steps,
                        deformation_mm=deformation_mm, validate_every=validate_every,
                        validation_seed=seed + 10_000, validation_pairs=validation_pairs,
                        supervised_warmup=supervised_warmup)
        rigid_optimizer_state = summary["optimizer_state"]
        if rigid_summary is None:
            rigid_summary = summary
        else:
            rigid_summary.update(
                steps=rigid_summary["steps"] + summary["steps"],
                seconds=round(rigid_summary["seconds"] + summary["seconds"], 1),
                validation_any_rotation_mm_after=summary["validation_any_rotation_mm_after"],
                **{"lambda": summary["lambda"], "optimizer_state": rigid_optimizer_state})
        log(f"round {round_index + 1}/{rounds}: deformable predictor, {deformable_steps} steps "
            "on the rigid network's realignments")
        first_step = len(record.losses)

        def realign(pairs, g):
            return realign_by_network(rigid_net, pairs, data, g, refine=refine)[0]

        def progress(step, values):
            if step % 25 == 0:
                log(f"deformable step {first_step + step}: loss {values['loss']:.4f} "
                    f"({'supervised' if values['supervised'] else 'image+shape'}), "
                    f"{time.monotonic() - started:.0f} s")

        part = deform_net.train_velocity_predictor(
            velocity_net, data.volume, data.mask, data.spacing, steps=deformable_steps,
            batch=deformable_batch, learning_rate=deformable_learning_rate,
            warmup=warmup if round_index == 0 else 0.0,
            max_displacement_mm=max_displacement_mm, seed=seed + 101 * round_index,
            validate_every=validate_every, realign=realign, optimiser_state=velocity_state,
            held_out_seed=seed + 1, log=progress)
        velocity_state = part.optimiser_state
        if round_index == 0:
            record.zero_error_mm = part.zero_error_mm
            record.errors_mm.append(part.errors_mm[0])
        record.errors_mm.append((first_step + part.errors_mm[-1][0], part.final_error_mm))
        record.losses += part.losses
        record.supervised_steps += part.supervised_steps
        record.seconds += part.seconds
        log(f"round {round_index + 1}/{rounds}: held-out deformation error "
            f"{part.final_error_mm:.3f} mm (identity {part.zero_error_mm:.3f} mm)")
        record.optimiser_state = velocity_state
        if after_round is not None:
            after_round(round_index + 1, rigid_summary, record)
    return rigid_summary, record
