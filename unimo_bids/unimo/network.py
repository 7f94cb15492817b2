"""UniMo rigid network: image and shape keypoint branches fused by a learned SLERP weight.

Each branch is a ``KeypointEncoder``: the image branch reads intensities, the shape branch the
signed distance map of the brain mask (``shape_input``). Keypoints of the reference and of a
volume give one rigid estimate per branch (weighted Kabsch); ``fuse_rigid`` blends them with
lambda = sigmoid(raw_lambda), a learned scalar.

Every volume is encoded on the same cubic working grid shifted to its own brain centroid
(``offsets``), so a large translation never pushes the brain out of the encoder's spherical
window; keypoints are shifted back into world mm before the solve.

The weights and their configuration travel together in one checkpoint (``save_network``,
``load_network``); the package ships weights trained with ``unimo-bids-train``
(unimo_bids/data/weights/unimo_rigid_cpu.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import check_digest, state_digest
from .geometry import homogeneous
from .keypoints import (
    PRESETS,
    KeypointEncoder,
    pair_weights,
    shape_input,
    to_working_grid,
    working_grid,
)
from .rotations import bounded_weight, bounded_weight_inverse, fuse_rigid, weighted_kabsch

__all__ = [
    "DEFAULT_WEIGHTS",
    "RigidEstimates",
    "UniMoRigidNet",
    "encode_inputs",
    "load_network",
    "network_estimates",
    "save_network",
    "translations",
]

DEFAULT_WEIGHTS = {
    "cpu": Path(__file__).resolve().parent.parent / "data" / "weights" / "unimo_rigid_cpu.pt",
    "cuda": Path(__file__).resolve().parent.parent / "data" / "weights" / "unimo_rigid_cuda.pt",
}


class UniMoRigidNet(torch.nn.Module):
    """The two keypoint encoders and the fusion weight, for one working-grid preset.

    preset: a ``PRESETS`` key ("cpu" or "cuda"): working grid size, spacing and encoder layers.
    num_keypoints: K keypoints per branch. lam: initial fusion weight (0: image, 1: shape).
    """

    def __init__(self, preset: str = "cpu", num_keypoints: int = 16, lam: float = 0.5):
        super().__init__()
        self.preset = preset
        self.num_keypoints = int(num_keypoints)
        config = PRESETS[preset]
        self.size = int(config["size"])
        self.spacing_mm = float(config["spacing_mm"])
        self.image_encoder = KeypointEncoder(1, self.num_keypoints, **config["encoder"])
        self.shape_encoder = KeypointEncoder(1, self.num_keypoints, **config["encoder"])
        self.raw_lambda = torch.nn.Parameter(bounded_weight_inverse(lam).reshape(()))

    @property
    def lam(self) -> torch.Tensor:
        """Fusion weight of the shape branch, in (0, 1)."""
        return bounded_weight(self.raw_lambda)

    def grid(self, shape, affine, mask=None):
        """(grid_affine, grid_shape) of the working grid for an image (see ``working_grid``)."""
        return working_grid(shape, affine, self.spacing_mm, self.size, mask=mask)


# Branches whose rotations are further apart than this are not fused (``fuse_rigid``): a
# near-symmetric mask, e.g. one cut by a thin slab, flips the shape branch about an axis of
# symmetry. The image branch is kept then: the shape branch is only as good as the
# segmentation behind it. 45 degrees was chosen, not tuned (measured with it: the unseen-modality
# benchmark, docs/benchmarks.md section 12).
MAX_FUSION_ANGLE_DEG = 45.0


@dataclass
class RigidEstimates:
    """(B, 4, 4) float64 transforms, reference world -> volume world, and lambda.

    fused is the SLERP of the branches where they agree within ``MAX_FUSION_ANGLE_DEG``, and
    the image estimate where they do not (in eval mode; in training mode every pair is fused).
    """

    image: torch.Tensor
    shape: torch.Tensor
    fused: torch.Tensor
    lam: torch.Tensor


def translations(offsets: torch.Tensor) -> torch.Tensor:
    """(B, 3) world shifts -> (B, 4, 4) float64 pure translations."""
    offsets = torch.as_tensor(offsets, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64, device=offsets.device).expand(len(offsets), 3, 3)
    return homogeneous(eye, offsets)


def encode_inputs(
    volumes: torch.Tensor,
    distance_maps: torch.Tensor | None,
    affine,
    grid_affine,
    grid_shape,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Network inputs on the working grid shifted by ``offsets`` (one resampling each).

    volumes: (B, 1, X, Y, Z) intensities on ``affine``; distance_maps: the same for signed
    distance maps (mm, negative inside) or None; offsets: (B, 3) world mm.
    Returns image (B, 1, N, N, N) and shape (B, 1, N, N, N) (or None) inputs.
    """
    shifts = translations(offsets.cpu()).to(volumes.device)
    image = to_working_grid(volumes, affine, grid_affine, grid_shape, transforms=shifts)
    shape = None
    if distance_maps is not None:
        distance = to_working_grid(distance_maps, affine, grid_affine, grid_shape,
                                   transforms=shifts, antialias=False, padding_mode="border")
        shape = shape_input(distance)
    return image, shape


def _branch(encoder, fixed_x, moving_x, grid_affine, fixed_offsets, moving_offsets):
    """One branch's rigid estimate from working-grid inputs; (B, 4, 4) float64."""
    n_fixed, batch = fixed_x.shape[0], moving_x.shape[0]
    points, weights = encoder.keypoints(torch.cat([fixed_x, moving_x]), grid_affine)
    offsets = torch.cat([fixed_offsets, moving_offsets]).to(points)
    points = points + offsets[:, None, :]
    kp_fixed = points[:n_fixed].expand(batch, -1, -1)
    w_fixed = weights[:n_fixed].expand(batch, -1)
    rotation, translation = weighted_kabsch(
        kp_fixed, points[n_fixed:], pair_weights(w_fixed, weights[n_fixed:]))
    return rotation, translation


def network_estimates(
    net: UniMoRigidNet,
    fixed_image: torch.Tensor,
    fixed_shape: torch.Tensor | None,
    moving_image: torch.Tensor,
    moving_shape: torch.Tensor | None,
    grid_affine,
    fixed_offsets: torch.Tensor,
    moving_offsets: torch.Tensor,
    center,
) -> RigidEstimates:
    """Image, shape and fused rigid estimates for B (reference, volume) pairs.

    fixed_image, moving_image: (B, 1, N, N, N) working-grid inputs (``encode_inputs``); a
    fixed batch of 1 serves every volume. fixed_shape, moving_shape: the shape inputs, or
    None (the fused estimate is then the image estimate and lambda reads 0).
    fixed_offsets, moving_offsets: (B, 3) (or (1, 3) for the fixed) world shifts of each
    input's grid.
    center: (3,) world mm about which the two translations are interpolated (the reference
    brain centroid).
    """
    R_i, t_i = _branch(net.image_encoder, fixed_image, moving_image, grid_affine,
                       fixed_offsets, moving_offsets)
    image = homogeneous(R_i, t_i)
    if fixed_shape is None or moving_shape is None:
        zero = torch.zeros((), dtype=torch.float64, device=image.device)
        return RigidEstimates(image, image, image, zero)
    R_g, t_g = _branch(net.shape_encoder, fixed_shape, moving_shape, grid_affine,
                       fixed_offsets, moving_offsets)
    lam = net.lam.to(torch.float64)
    # Training fuses every pair, so that the loss shapes lambda on all of them (and the packaged
    # weights' training runs as it did before the gate).
    max_angle = None if net.training else math.radians(MAX_FUSION_ANGLE_DEG)
    fused = fuse_rigid(R_i, t_i, R_g, t_g, lam, center, max_angle)
    return RigidEstimates(image, homogeneous(R_g, t_g), fused, lam)


def save_network(net: UniMoRigidNet, path, training: dict | None = None,
                 optimizer_state: dict | None = None) -> None:
    """Write the weights with what is needed to rebuild the network (and how it was trained;
    with ``optimizer_state``, what ``unimo-bids-train --resume`` needs to continue)."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    checkpoint = {"format": "unimo-rigid-1", "preset": net.preset,
                  "num_keypoints": net.num_keypoints, "state_dict": state,
                  "sha256": state_digest(state), "training": training or {}}
    if optimizer_state is not None:
        checkpoint["optimizer_state"] = optimizer_state
    torch.save(checkpoint, path)


def load_network(path=None, device="cpu") -> UniMoRigidNet:
    """Load a checkpoint written by ``save_network``; None loads the packaged weights for the
    device type. Raises ValueError naming the file when it is missing, not such a checkpoint, or
    its weights do not match their recorded SHA-256 (``checkpoint.check_digest``).
    """
    device = torch.device(device)
    if path is None:
        path = DEFAULT_WEIGHTS["cuda" if device.type == "cuda" else "cpu"]
        if not Path(path).exists() and device.type == "cuda":
            path = DEFAULT_WEIGHTS["cpu"]
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: network weights not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own messages run over many lines
        raise ValueError(f"{path}: not a unimo-bids rigid network checkpoint (torch.load "
                         f"cannot read it: {type(err).__name__})") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != "unimo-rigid-1":
        raise ValueError(f"{path}: not a unimo-bids rigid network checkpoint (no "
                         f"'unimo-rigid-1' format tag)")
    check_digest(path, checkpoint)
    try:
        net = UniMoRigidNet(checkpoint["preset"], checkpoint["num_keypoints"])
        net.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:160]
        raise ValueError(f"{path}: network checkpoint does not match this version of "
                         f"unimo-bids ({reason})") from err
    net.training_info = checkpoint.get("training", {})
    return net.to(device).eval()
